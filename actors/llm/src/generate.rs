//! Generation with the unified vocabulary (paper §3.3 and eq. 7; official
//! `LaVIT/models/lavit_for_generation.py` `generate_image_tokens` and
//! `lavit_for_understanding.py` `generate`).
//!
//! - text → image tokens: append [IMG], only visual ids and [/IMG] allowed ([/IMG] forbidden
//!   before the minimum), top-k / top-p / temperature, classifier-free guidance with the
//!   unconditional stream = [IMG] + generated tokens; the conditional and unconditional
//!   sequences of every request run in one batched forward per step ([`crate::batch`]).
//! - image → text: greedy, beam search or sampling with repetition penalty; every id ≥
//!   `text_vocab_size` forbidden; min/max new tokens; stop on EOS.
//!
//! Both run on the continuous-batching [`Engine`] that serves requests (one path): here the
//! requests of one call, run to their end. The only host read per step is the picked ids.
//!
//! Cancellation: the `*_with` forms take a [`ShouldStop`] callback, called once per generated
//! token before any work on it (it only reads an atomic flag: no host round-trip); when it
//! answers `true` the loop stops with [`Error::Cancelled`]. The plain forms never stop early.

use lavit_runtime::stage::ShouldStop;
use lavit_runtime::{Error, Result};
use tch::{Device, Kind, Tensor};

use crate::batch::{Engine, EngineLimits, Finished, Group, GroupKind};
use crate::modeling_llama::LlamaForCausalLM;
use crate::vocab::UnifiedVocab;

/// How the next token is picked from the (processed) logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// false = greedy (arg-max).
    pub do_sample: bool,
    /// Logits are divided by it (> 0).
    pub temperature: f64,
    /// Keep the k best (0 = off).
    pub top_k: i64,
    /// Keep the smallest set with cumulative probability ≥ top_p (1.0 = off).
    pub top_p: f64,
}

impl Default for Sampling {
    /// The official v2 image-generation settings (top-k 50, τ 1).
    fn default() -> Self {
        Self {
            do_sample: true,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    /// Reject NaN, negative or out-of-range values.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(format!(
                "temperature must be a positive number, got {}",
                self.temperature
            )));
        }
        if self.top_k < 0 {
            return Err(Error::invalid(format!(
                "top_k must be ≥ 0, got {}",
                self.top_k
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Keep the `k` largest logits of each row (B, V); the rest become −inf.
pub fn top_k_filter(logits: &Tensor, k: i64) -> Tensor {
    let v = logits.size()[logits.dim() - 1];
    if k <= 0 || k >= v {
        return logits.shallow_clone();
    }
    let (vals, _) = logits.topk(k, -1, true, true);
    let kth = vals.narrow(-1, k - 1, 1); // (B, 1)
    logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY)
}

/// HF `TopPLogitsWarper`: keep the smallest set of best tokens whose probability sums to at
/// least `p` (always at least one); the rest become −inf.
pub fn top_p_filter(logits: &Tensor, p: f64) -> Tensor {
    if p >= 1.0 {
        return logits.shallow_clone();
    }
    let (sorted, idx) = logits.sort(-1, false); // ascending
    let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
    let remove = cum.le(1.0 - p);
    let last = remove.size()[remove.dim() - 1] - 1;
    let _ = remove.narrow(-1, last, 1).fill_(0); // keep the best token
    let remove = remove.scatter(-1, &idx, &remove.shallow_clone());
    logits.masked_fill(&remove, f64::NEG_INFINITY)
}

/// HF `RepetitionPenaltyLogitsProcessor` over the tokens in `seen` (B, L): negative logits
/// multiplied, positive divided by `penalty`.
pub fn repetition_penalty(logits: &Tensor, seen: &Tensor, penalty: f64) -> Tensor {
    if penalty == 1.0 || seen.size()[1] == 0 {
        return logits.shallow_clone();
    }
    let s = logits.gather(1, seen, false);
    let s = (&s * penalty).where_self(&s.lt(0.0), &(&s / penalty));
    logits.scatter(1, seen, &s)
}

/// A counter-based random stream for sampling: the noise of step `t` is a hash of
/// (seed, t, row, column), computed on the device. Results depend only on the seed (not on
/// other threads using libtorch's global generator) and are the same on CPU and GPU.
#[derive(Debug, Clone)]
pub struct SampleRng {
    seed: u64,
    step: u64,
}

impl SampleRng {
    /// `None` draws a seed from libtorch's global generator.
    pub fn new(seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(|| {
            Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64
        });
        Self { seed, step: 0 }
    }

    /// Mix (seed, step, salt) into 32 bits on the host (splitmix64).
    fn key(&self, salt: u64) -> i64 {
        stream_key(self.seed, self.step, salt)
    }

    /// The two keys of the noise of step `step` of the stream of `seed`.
    pub fn keys(seed: u64, step: u64) -> (i64, i64) {
        (stream_key(seed, step, 1), stream_key(seed, step, 2))
    }

    /// The stream's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Standard Gumbel noise shaped like `like` (B, V), then advance the stream.
    pub fn gumbel(&mut self, like: &Tensor) -> Tensor {
        let (k1, k2) = (self.key(1), self.key(2));
        self.step += 1;
        let n = like.numel() as i64;
        let idx = Tensor::arange(n, (Kind::Int64, like.device())).view(like.size().as_slice());
        gumbel_of(&idx, &Tensor::from(k1), &Tensor::from(k2))
    }
}

/// splitmix64 of (seed, step, salt), kept to 32 bits.
fn stream_key(seed: u64, step: u64, salt: u64) -> i64 {
    let mut z = seed
        .wrapping_add(step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(salt.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) & 0xffff_ffff) as i64
}

/// Standard Gumbel noise of the counters `idx` (int64, any shape) under the keys `k1`, `k2`
/// (broadcast against `idx`): a 32-bit integer hash, (x ^ x>>16)·0x45d9f3b twice, in int64
/// without overflow, then u in (0, 1) with 32 bits and −log(−log u).
fn gumbel_of(idx: &Tensor, k1: &Tensor, k2: &Tensor) -> Tensor {
    let dev = idx.device();
    let hash = |x: Tensor| {
        let mask = 0xffff_ffffi64;
        let x = (x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16)) * 0x45d_9f3b)
            .bitwise_and(mask);
        let x = (x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16)) * 0x45d_9f3b)
            .bitwise_and(mask);
        x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
    };
    let x = hash(
        hash(idx.bitwise_xor_tensor(&k1.to_device(dev))).bitwise_xor_tensor(&k2.to_device(dev)),
    );
    let u = (x.to_kind(Kind::Double) + 0.5) / 4_294_967_296.0;
    u.log().neg().log().neg().to_kind(Kind::Float)
}

/// Pick next tokens (B,) from logits (B, V) that already carry the suppression (−inf):
/// arg-max, or a sample from softmax(filtered logits / T) by the Gumbel-max trick.
pub fn pick(logits: &Tensor, s: &Sampling, rng: &mut SampleRng) -> Tensor {
    if !s.do_sample {
        return logits.argmax(-1, false);
    }
    let l = logits.to_kind(Kind::Float) / s.temperature;
    let l = top_k_filter(&l, s.top_k);
    let l = top_p_filter(&l, s.top_p);
    (&l + rng.gumbel(&l)).argmax(-1, false)
}

/// How one row of [`pick_rows`] is picked: its sampling settings and its place in its random
/// stream (the row's noise is what [`pick`] draws for row `row` of a batch of the stream of
/// `seed` at step `step`, whatever else shares the batch).
#[derive(Debug, Clone)]
pub struct RowPick {
    pub sampling: Sampling,
    pub seed: u64,
    pub step: u64,
    pub row: i64,
}

/// [`pick`] for rows with their own settings and random streams, in one pass: logits
/// (R, V) → ids (R,). Each row gets what [`pick`] gives it in its own request.
pub fn pick_rows(logits: &Tensor, rows: &[RowPick]) -> Tensor {
    let dev = logits.device();
    let greedy = logits.argmax(-1, false);
    if rows.iter().all(|r| !r.sampling.do_sample) {
        return greedy;
    }
    let (r, v) = (rows.len() as i64, logits.size()[1]);
    let col = |x: Vec<f32>| Tensor::from_slice(&x).to_device(dev).view([r, 1]);
    let temp = col(rows
        .iter()
        .map(|p| {
            if p.sampling.do_sample {
                p.sampling.temperature as f32
            } else {
                1.0
            }
        })
        .collect());
    let mut l = logits.to_kind(Kind::Float) / temp;
    // top-k with a k per row: the k-th largest value of each row is the threshold.
    let ks: Vec<i64> = rows
        .iter()
        .map(|p| {
            let k = p.sampling.top_k;
            if p.sampling.do_sample && k > 0 && k < v {
                k
            } else {
                0
            }
        })
        .collect();
    let kmax = ks.iter().copied().max().unwrap_or(0);
    if kmax > 0 {
        let (vals, _) = l.topk(kmax, -1, true, true); // (R, kmax)
        let at: Vec<i64> = ks.iter().map(|&k| (k - 1).max(0)).collect();
        let at = Tensor::from_slice(&at).to_device(dev).view([r, 1]);
        let kth = vals.gather(1, &at, false); // (R, 1)
        let on = Tensor::from_slice(&ks.iter().map(|&k| k > 0).collect::<Vec<_>>())
            .to_device(dev)
            .view([r, 1]);
        l = l.masked_fill(&l.lt_tensor(&kth).logical_and(&on), f64::NEG_INFINITY);
    }
    // top-p with a p per row (HF `TopPLogitsWarper`), rows with p = 1 untouched.
    if rows
        .iter()
        .any(|p| p.sampling.do_sample && p.sampling.top_p < 1.0)
    {
        let thr = col(rows
            .iter()
            .map(|p| (1.0 - p.sampling.top_p) as f32)
            .collect());
        let on = Tensor::from_slice(
            &rows
                .iter()
                .map(|p| p.sampling.do_sample && p.sampling.top_p < 1.0)
                .collect::<Vec<_>>(),
        )
        .to_device(dev)
        .view([r, 1]);
        let (sorted, idx) = l.sort(-1, false); // ascending
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove = cum.le_tensor(&thr);
        let _ = remove.narrow(-1, v - 1, 1).fill_(0); // keep the best token
        let remove = remove.scatter(-1, &idx, &remove.shallow_clone());
        l = l.masked_fill(&remove.logical_and(&on), f64::NEG_INFINITY);
    }
    // Gumbel noise: row i at counter row·V + column of its own stream's step.
    let mut k1 = Vec::with_capacity(rows.len());
    let mut k2 = Vec::with_capacity(rows.len());
    for p in rows {
        let (a, b) = SampleRng::keys(p.seed, p.step);
        k1.push(a);
        k2.push(b);
    }
    let base: Vec<i64> = rows.iter().map(|p| p.row * v).collect();
    let idx = Tensor::from_slice(&base).to_device(dev).view([r, 1])
        + Tensor::arange(v, (Kind::Int64, dev)).view([1, v]);
    let k1 = Tensor::from_slice(&k1).view([r, 1]);
    let k2 = Tensor::from_slice(&k2).view([r, 1]);
    let sampled = (&l + gumbel_of(&idx, &k1, &k2)).argmax(-1, false);
    let sample = Tensor::from_slice(
        &rows
            .iter()
            .map(|p| p.sampling.do_sample)
            .collect::<Vec<_>>(),
    )
    .to_device(dev);
    sampled.where_self(&sample, &greedy)
}

/// Additive (V,) bias: 0 where `allowed`, −inf elsewhere.
pub(crate) fn allow_bias(vocab_size: i64, allowed: impl Fn(i64) -> bool, device: Device) -> Tensor {
    let v: Vec<f32> = (0..vocab_size)
        .map(|i| if allowed(i) { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    Tensor::from_slice(&v).to_device(device)
}

/// Settings of text → image-token generation.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTokenConfig {
    /// Guidance scale α of eq. 7 (1.0 = no guidance, the unconditional stream is skipped).
    pub cfg_scale: f64,
    /// Stop after this many new tokens ([/IMG] included).
    pub max_new_tokens: i64,
    /// [/IMG] is forbidden for the first `min_new_tokens` steps.
    pub min_new_tokens: i64,
    pub sampling: Sampling,
    /// Samples per prompt.
    pub num_return_sequences: i64,
    /// Seed of the sampling noise (None = a random seed).
    pub seed: Option<u64>,
}

impl Default for ImageTokenConfig {
    /// The official LaVIT-7B-v2 settings ([`GenerationManifest::default`]: guidance 4,
    /// top-k 50, 20..300 tokens).
    fn default() -> Self {
        let g = lavit_runtime::manifest::GenerationManifest::default();
        Self {
            cfg_scale: g.llm_guidance,
            max_new_tokens: g.t2i_max_new_tokens,
            min_new_tokens: g.t2i_min_new_tokens,
            sampling: Sampling::default(),
            num_return_sequences: 1,
            seed: None,
        }
    }
}

impl ImageTokenConfig {
    /// Reject options no generation can run with (NaN, zero or negative counts).
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.num_return_sequences < 1 || self.max_new_tokens < 1 || self.min_new_tokens < 0 {
            return Err(Error::invalid(format!(
                "num_return_sequences ({}) and max_new_tokens ({}) must be ≥ 1, min_new_tokens ({}) ≥ 0",
                self.num_return_sequences, self.max_new_tokens, self.min_new_tokens
            )));
        }
        if !self.cfg_scale.is_finite() {
            return Err(Error::invalid(format!(
                "cfg_scale must be finite, got {}",
                self.cfg_scale
            )));
        }
        Ok(())
    }

    /// The engine's request for one prompt: `cond` and `uncond` (P, H) embeddings of the
    /// conditional and unconditional prompts, [IMG] included; the seed drawn when unset.
    pub fn group(&self, model: &LlamaForCausalLM, cond: &Tensor, uncond: &Tensor) -> Result<Group> {
        self.validate()?;
        let longest = cond.size()[0].max(uncond.size()[0]);
        check_context(model, longest, self.max_new_tokens)?;
        let n = self.num_return_sequences as usize;
        let guidance = (self.cfg_scale != 1.0).then_some(self.cfg_scale);
        let mut seqs: Vec<Tensor> = (0..n).map(|_| cond.shallow_clone()).collect();
        if guidance.is_some() {
            seqs.extend((0..n).map(|_| uncond.shallow_clone()));
        }
        Ok(Group::new(
            GroupKind::Image { n, guidance },
            seqs,
            self.sampling.clone(),
            self.seed.unwrap_or_else(|| SampleRng::new(None).seed()),
            self.min_new_tokens,
            self.max_new_tokens,
        ))
    }
}

/// Text (or any multimodal prompt of ids: text ids and discrete images) → image tokens.
///
/// `prompts` are id lists WITHOUT the trailing [IMG] (it is appended). Returns, for each
/// prompt and each of its `num_return_sequences` samples (prompt-major), the generated ids:
/// visual ids, ending with [/IMG] when the model closed the image before `max_new_tokens`.
/// Use [`UnifiedVocab::codes_of`] to get codebook indices.
pub fn generate_image_tokens(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    prompts: &[Vec<i64>],
    cfg: &ImageTokenConfig,
) -> Result<Vec<Vec<i64>>> {
    generate_image_tokens_with(model, vocab, prompts, cfg, &|| false)
}

/// [`generate_image_tokens`] that calls `should_stop` once per token and stops with
/// [`Error::Cancelled`] when it answers `true`. The prompts run as requests of one
/// [`Engine`] (the serving path), sharing one random stream prompt-major.
pub fn generate_image_tokens_with(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    prompts: &[Vec<i64>],
    cfg: &ImageTokenConfig,
    should_stop: ShouldStop,
) -> Result<Vec<Vec<i64>>> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let _g = tch::no_grad_guard();
    let dev = model.device();
    let embed = |ids: &[i64]| -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| !(0..vocab.vocab_size).contains(&i)) {
            return Err(Error::invalid(format!(
                "prompt id {bad} outside the vocabulary of {}",
                vocab.vocab_size
            )));
        }
        model.f_embed(&Tensor::from_slice(ids).to_device(dev))
    };
    let uncond = embed(&[vocab.image_start_id])?;
    // One stream for the whole call (prompt-major rows), as one batch draws it.
    let cfg = ImageTokenConfig {
        seed: Some(cfg.seed.unwrap_or_else(|| SampleRng::new(None).seed())),
        ..cfg.clone()
    };
    let mut groups = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let mut ids = p.clone();
        ids.push(vocab.image_start_id);
        let cond = embed(&ids)?;
        let mut g = cfg.group(model, &cond, &uncond)?;
        g.rng_row0 = i as i64 * cfg.num_return_sequences;
        groups.push(g);
    }
    let out = run_groups(model, vocab, groups, should_stop, &mut |_, _| true)?;
    Ok(out
        .into_iter()
        .flat_map(|f| match f {
            Finished::Image(rows) => rows,
            Finished::Text { ids, .. } => ids,
        })
        .collect())
}

/// What [`run_groups`] calls after each step: the engine and the requests that finished in
/// it; `false` stops the run.
type AfterStep<'a> = dyn FnMut(&Engine, &[(u64, Finished)]) -> bool + 'a;

/// Run `groups` as the requests of one engine to their end, calling `should_stop` once per
/// step (`Cancelled` when it answers `true`) and `after_step` with the engine after each step
/// (`false`: stop with `Cancelled`). Their results, in order.
fn run_groups(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    groups: Vec<Group>,
    should_stop: ShouldStop,
    after_step: &mut AfterStep,
) -> Result<Vec<Finished>> {
    let unbounded = EngineLimits::unbounded();
    let limits = EngineLimits {
        max_seqs: groups.iter().map(Group::seqs).sum(),
        kv_blocks: groups.iter().map(|g| g.blocks_needed(&unbounded)).sum(),
        ..unbounded
    };
    let mut engine = Engine::new(limits);
    let n = groups.len();
    for (i, g) in groups.into_iter().enumerate() {
        engine.add(i as u64, g)?;
    }
    let mut out: Vec<Option<Finished>> = vec![None; n];
    while !engine.is_empty() {
        if engine.plan().is_empty() {
            return Err(Error::invalid("the requests do not fit the engine"));
        }
        if should_stop() {
            return Err(Error::Cancelled);
        }
        let fin = engine.step(model, vocab, &mut |_, _| {})?;
        if !after_step(&engine, &fin) {
            return Err(Error::Cancelled);
        }
        for (k, f) in fin {
            if let Some(slot) = out.get_mut(k as usize) {
                *slot = Some(f);
            }
        }
    }
    out.into_iter()
        .map(|f| f.ok_or_else(|| Error::invalid("a request ended without a result")))
        .collect()
}

/// Settings of image → text generation.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub max_new_tokens: i64,
    /// EOS is forbidden before this many new tokens.
    pub min_new_tokens: i64,
    /// Used when `num_beams == 1`.
    pub sampling: Sampling,
    /// > 1 = beam search (deterministic; `sampling` is ignored).
    pub num_beams: i64,
    /// Beam scores are divided by length^length_penalty.
    pub length_penalty: f64,
    /// HF repetition penalty over the generated tokens (1.0 = off).
    pub repetition_penalty: f64,
    pub seed: Option<u64>,
}

impl Default for TextConfig {
    /// The official understanding defaults (greedy… beam 5 in the demos; here greedy).
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            min_new_tokens: 0,
            sampling: Sampling::greedy(),
            num_beams: 1,
            length_penalty: 1.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

/// Image (+ question) → text. `prefixes` are (T_i, H) input embeddings (e.g. from
/// [`crate::vocab::build_sequence`] with an `ImageEmbeds` segment); they run as one request
/// of an [`Engine`] (the serving path). Returns the generated text ids of each prefix,
/// without the EOS.
pub fn generate_text(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    prefixes: &[Tensor],
    cfg: &TextConfig,
) -> Result<Vec<Vec<i64>>> {
    generate_text_with(model, vocab, prefixes, cfg, &|| false, None)
}

/// What [`generate_text_with`] calls after each step when streaming: the new id of every
/// stream (EOS for finished ones); `false` stops the loop with [`Error::Cancelled`].
pub type OnTokens<'a> = &'a mut dyn FnMut(&[i64]) -> bool;

impl TextConfig {
    /// Reject options no generation can run with.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_new_tokens < 1
            || self.num_beams < 1
            || self.repetition_penalty.is_nan()
            || self.repetition_penalty <= 0.0
        {
            return Err(Error::invalid(format!(
                "max_new_tokens ({}) and num_beams ({}) must be ≥ 1 and repetition_penalty ({}) > 0",
                self.max_new_tokens, self.num_beams, self.repetition_penalty
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::invalid(format!(
                "length_penalty must be finite, got {}",
                self.length_penalty
            )));
        }
        Ok(())
    }

    /// The engine's request for `prefixes` (T_i, H), streamed (prompt 0) when `stream`.
    pub fn group(
        &self,
        model: &LlamaForCausalLM,
        prefixes: &[Tensor],
        stream: bool,
    ) -> Result<Group> {
        self.validate()?;
        let longest = prefixes
            .iter()
            .map(|p| p.size().first().copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        check_context(model, longest, self.max_new_tokens)?;
        let k = self.num_beams;
        // Beams of one prefix are adjacent: sequence b·k + j.
        let seqs = prefixes
            .iter()
            .flat_map(|p| {
                let p = p.to_device(model.device()).to_kind(model.kind());
                (0..k).map(move |_| p.shallow_clone())
            })
            .collect();
        let sampling = if k > 1 {
            Sampling::greedy()
        } else {
            self.sampling.clone()
        };
        Ok(Group::new(
            GroupKind::Text {
                prompts: prefixes.len(),
                beams: k,
                repetition_penalty: self.repetition_penalty,
                length_penalty: self.length_penalty,
                stream: stream && k == 1,
            },
            seqs,
            sampling,
            self.seed.unwrap_or_else(|| SampleRng::new(None).seed()),
            self.min_new_tokens,
            self.max_new_tokens,
        ))
    }
}

/// [`generate_text`] that calls `should_stop` once per token (stopping with
/// [`Error::Cancelled`] when it answers `true`) and, when streaming, `on_tokens` with the ids
/// of each step; streaming needs `num_beams == 1` (beams reorder).
pub fn generate_text_with(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    prefixes: &[Tensor],
    cfg: &TextConfig,
    should_stop: ShouldStop,
    mut on_tokens: Option<OnTokens>,
) -> Result<Vec<Vec<i64>>> {
    cfg.validate()?;
    if on_tokens.is_some() && cfg.num_beams != 1 {
        return Err(Error::invalid(format!(
            "streaming needs num_beams = 1, got {}",
            cfg.num_beams
        )));
    }
    if prefixes.is_empty() {
        return Ok(Vec::new());
    }
    let _g = tch::no_grad_guard();
    let group = cfg.group(model, prefixes, false)?;
    let eos = vocab.eos_id;
    let mut seen = vec![0usize; prefixes.len()];
    let mut after = |e: &Engine, fin: &[(u64, Finished)]| -> bool {
        let Some(f) = on_tokens.as_mut() else {
            return true;
        };
        // The new id of every stream this step: its last one, or EOS once it has finished.
        let now: Vec<Vec<i64>> = match fin.iter().find(|(k, _)| *k == 0) {
            Some((_, Finished::Text { ids, .. })) => ids.clone(),
            _ => match e.group(0) {
                Some(g) => g.generated().to_vec(),
                None => return true,
            },
        };
        let ids: Vec<i64> = now
            .iter()
            .zip(seen.iter_mut())
            .map(|(v, n)| {
                let id = if v.len() > *n { v[v.len() - 1] } else { eos };
                *n = v.len();
                id
            })
            .collect();
        f(&ids)
    };
    let mut out = run_groups(model, vocab, vec![group], should_stop, &mut after)?;
    match out.pop() {
        Some(Finished::Text { ids, .. }) => Ok(ids),
        _ => Err(Error::invalid("the text generation ended without a result")),
    }
}

/// Refuse a generation whose prompt and new tokens do not fit the model's context
/// (`max_position_embeddings`): checked before the first forward, so a huge
/// `max_new_tokens` fails at once instead of running for hours.
fn check_context(model: &LlamaForCausalLM, prompt_len: i64, max_new_tokens: i64) -> Result<()> {
    let ctx = model.config.max_position_embeddings;
    if prompt_len.saturating_add(max_new_tokens) > ctx {
        return Err(Error::invalid(format!(
            "a prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of {ctx} positions (max_position_embeddings)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy decoding takes `torch.argmax`'s first index on an exact tie, as transformers'
    /// greedy search does; suppressed (−inf) ids never win.
    #[test]
    fn greedy_pick_takes_the_first_of_tied_ids() {
        let inf = f32::NEG_INFINITY;
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 3.0, 2.0, inf, 0.5, 0.5, 0.5]).view([2, 4]);
        let picked = pick(&logits, &Sampling::greedy(), &mut SampleRng::new(Some(0)));
        assert_eq!(Vec::<i64>::try_from(picked).unwrap(), vec![1, 1]);
    }
}

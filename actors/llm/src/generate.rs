//! Generation with the unified vocabulary (paper §3.3 and eq. 7; official
//! `LaVIT/models/lavit_for_generation.py` `generate_image_tokens` and
//! `lavit_for_understanding.py` `generate`).
//!
//! - text → image tokens: append [IMG], only visual ids and [/IMG] allowed ([/IMG] forbidden
//!   before the minimum), top-k / top-p / temperature, classifier-free guidance with the
//!   unconditional stream = [IMG] + generated tokens; conditional and unconditional streams run
//!   as ONE left-padded batched forward with per-stream positions and KV cache.
//! - image → text: greedy, beam search or sampling with repetition penalty; every id ≥
//!   `text_vocab_size` forbidden; min/max new tokens; stop on EOS.
//!
//! Decoding loops stay on the device; the only host read per step is the "all finished?" check
//! (when streaming, the new ids are read instead, in that same one read).
//!
//! Cancellation: the `*_with` forms take a [`ShouldStop`] callback, called once per generated
//! token before any work on it (it only reads an atomic flag: no host round-trip); when it
//! answers `true` the loop stops with [`Error::Cancelled`]. The plain forms never stop early.

use lavit_runtime::stage::ShouldStop;
use lavit_runtime::{Error, Result};
use tch::{Device, Kind, Tensor};

use crate::modeling_llama::{ForwardArgs, KvCache, LlamaForCausalLM};
use crate::vocab::{has_padding, left_pad_embeds, left_pad_ids, UnifiedVocab};

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
        let mut z = self
            .seed
            .wrapping_add(self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(salt.wrapping_mul(0xD1B5_4A32_D192_ED03));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) & 0xffff_ffff) as i64
    }

    /// Standard Gumbel noise shaped like `like` (B, V), then advance the stream.
    pub fn gumbel(&mut self, like: &Tensor) -> Tensor {
        // 32-bit integer hash (x ^ x>>16)·0x45d9f3b, twice, in int64 without overflow.
        let hash = |x: Tensor| {
            let mask = 0xffff_ffffi64;
            let x = (x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16)) * 0x45d_9f3b)
                .bitwise_and(mask);
            let x = (x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16)) * 0x45d_9f3b)
                .bitwise_and(mask);
            x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
        };
        let (k1, k2) = (self.key(1), self.key(2));
        self.step += 1;
        let n = like.numel() as i64;
        let idx = Tensor::arange(n, (Kind::Int64, like.device())).view(like.size().as_slice());
        let x = hash(hash(idx.bitwise_xor(k1)).bitwise_xor(k2));
        // u in (0, 1) with 32 bits; gumbel = −log(−log u)
        let u = (x.to_kind(Kind::Double) + 0.5) / 4_294_967_296.0;
        u.log().neg().log().neg().to_kind(Kind::Float)
    }
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

/// Additive (V,) bias: 0 where `allowed`, −inf elsewhere.
fn allow_bias(vocab_size: i64, allowed: impl Fn(i64) -> bool, device: Device) -> Tensor {
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
    /// The official LaVIT-7B-v2 settings (guidance 4, top-k 50, 20..300 tokens).
    fn default() -> Self {
        Self {
            cfg_scale: 4.0,
            max_new_tokens: 300,
            min_new_tokens: 20,
            sampling: Sampling::default(),
            num_return_sequences: 1,
            seed: None,
        }
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
/// [`Error::Cancelled`] when it answers `true`.
pub fn generate_image_tokens_with(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    prompts: &[Vec<i64>],
    cfg: &ImageTokenConfig,
    should_stop: ShouldStop,
) -> Result<Vec<Vec<i64>>> {
    cfg.sampling.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if cfg.num_return_sequences < 1 || cfg.max_new_tokens < 1 || cfg.min_new_tokens < 0 {
        return Err(Error::invalid(format!(
            "num_return_sequences ({}) and max_new_tokens ({}) must be ≥ 1, min_new_tokens ({}) ≥ 0",
            cfg.num_return_sequences, cfg.max_new_tokens, cfg.min_new_tokens
        )));
    }
    if !cfg.cfg_scale.is_finite() {
        return Err(Error::invalid(format!(
            "cfg_scale must be finite, got {}",
            cfg.cfg_scale
        )));
    }
    for p in prompts {
        if let Some(bad) = p.iter().find(|&&i| !(0..vocab.vocab_size).contains(&i)) {
            return Err(Error::invalid(format!(
                "prompt id {bad} outside the vocabulary of {}",
                vocab.vocab_size
            )));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64 + 1; // + [IMG]
    check_context(model, longest, cfg.max_new_tokens)?;
    let mut rng = SampleRng::new(cfg.seed);
    let _g = tch::no_grad_guard();
    let dev = model.device();
    let guided = cfg.cfg_scale != 1.0;
    // Streams: n conditional (prompt-major × samples), then n unconditional.
    let mut streams: Vec<Vec<i64>> = Vec::new();
    for p in prompts {
        for _ in 0..cfg.num_return_sequences {
            let mut s = p.clone();
            s.push(vocab.image_start_id);
            streams.push(s);
        }
    }
    let n = streams.len() as i64;
    if guided {
        for _ in 0..n {
            streams.push(vec![vocab.image_start_id]);
        }
    }
    let (ids, mask) = left_pad_ids(&streams, 0);
    let padded = has_padding(&mask);
    let (ids, mask) = (ids.to_device(dev), mask.to_device(dev));
    let mut cache = KvCache::new();
    let args = ForwardArgs {
        attention_mask: padded.then_some(&mask),
        ..Default::default()
    };
    let mut logits = model.forward_last(&model.embed(&ids), &args, Some(&mut cache)); // (S, V)
    let visual_or_end = |i: i64| vocab.is_visual(i) || i == vocab.image_end_id;
    let bias_open = allow_bias(vocab.vocab_size, |i| vocab.is_visual(i), dev);
    let bias_close = allow_bias(vocab.vocab_size, visual_or_end, dev);
    let mut out: Vec<Tensor> = Vec::new();
    let mut done = Tensor::zeros([n], (Kind::Bool, dev));
    let end = Tensor::from(vocab.image_end_id).to_device(dev);
    for step in 0..cfg.max_new_tokens {
        if should_stop() {
            return Err(Error::Cancelled);
        }
        let l = logits.to_kind(Kind::Float);
        let scores = if guided {
            // eq. 7: l = lsm(uncond) + α·(lsm(cond) − lsm(uncond))
            let lsm = l.log_softmax(-1, Kind::Float);
            let c = lsm.narrow(0, 0, n);
            let u = lsm.narrow(0, n, n);
            &u + (&c - &u) * cfg.cfg_scale
        } else {
            l
        };
        let bias = if step < cfg.min_new_tokens {
            &bias_open
        } else {
            &bias_close
        };
        let next = pick(&(scores + bias), &cfg.sampling, &mut rng); // (n,)
                                                                    // Finished streams keep emitting [/IMG] (dropped below).
        let next = end.where_self(&done, &next);
        out.push(next.shallow_clone());
        done = done.logical_or(&next.eq(vocab.image_end_id));
        if step + 1 == cfg.max_new_tokens || done.all().int64_value(&[]) != 0 {
            break;
        }
        let feed = if guided {
            Tensor::cat(&[&next, &next], 0)
        } else {
            next
        }
        .view([-1, 1]);
        logits = model.forward_last(
            &model.embed(&feed),
            &ForwardArgs::default(),
            Some(&mut cache),
        );
    }
    let all = Tensor::stack(&out, 1).to_device(Device::Cpu); // (n, steps)
    let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&all)
        .map_err(|e| Error::invalid(format!("reading generated ids: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let end = r
                .iter()
                .position(|&i| i == vocab.image_end_id)
                .map_or(r.len(), |p| p + 1);
            r[..end].to_vec()
        })
        .collect())
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
/// [`crate::vocab::build_sequence`] with an `ImageEmbeds` segment); they are left-padded into
/// one batch. Returns the generated text ids of each prefix, without the EOS.
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

/// [`generate_text`] that calls `should_stop` once per token (stopping with
/// [`Error::Cancelled`] when it answers `true`) and, when streaming, `on_tokens` with the ids
/// of each step. Streaming reads the new ids in place of the "all finished?" read, so it costs
/// no extra host round-trip; it needs `num_beams == 1` (beams reorder).
pub fn generate_text_with(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    prefixes: &[Tensor],
    cfg: &TextConfig,
    should_stop: ShouldStop,
    mut on_tokens: Option<OnTokens>,
) -> Result<Vec<Vec<i64>>> {
    cfg.sampling.validate()?;
    if on_tokens.is_some() && cfg.num_beams != 1 {
        return Err(Error::invalid(format!(
            "streaming needs num_beams = 1, got {}",
            cfg.num_beams
        )));
    }
    if prefixes.is_empty() {
        return Ok(Vec::new());
    }
    if cfg.max_new_tokens < 1
        || cfg.num_beams < 1
        || cfg.repetition_penalty.is_nan()
        || cfg.repetition_penalty <= 0.0
    {
        return Err(Error::invalid(format!(
            "max_new_tokens ({}) and num_beams ({}) must be ≥ 1 and repetition_penalty ({}) > 0",
            cfg.max_new_tokens, cfg.num_beams, cfg.repetition_penalty
        )));
    }
    let longest = prefixes
        .iter()
        .map(|p| p.size().first().copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    check_context(model, longest, cfg.max_new_tokens)?;
    let mut rng = SampleRng::new(cfg.seed);
    let _g = tch::no_grad_guard();
    let dev = model.device();
    let k = cfg.num_beams;
    // Beams of one prefix are adjacent: stream b·k + j.
    let seqs: Vec<Tensor> = prefixes
        .iter()
        .flat_map(|p| {
            let p = p.to_device(dev).to_kind(model.kind());
            (0..k).map(move |_| p.shallow_clone())
        })
        .collect();
    let (embeds, mask) = left_pad_embeds(&seqs);
    let padded = has_padding(&mask);
    let b = prefixes.len() as i64;
    let s = b * k;
    let mut cache = KvCache::new();
    let args = ForwardArgs {
        attention_mask: padded.then_some(&mask),
        ..Default::default()
    };
    let mut logits = model.forward_last(&embeds, &args, Some(&mut cache)); // (S, V)
    let v = vocab.vocab_size;
    let eos = vocab.eos_id;
    let text_only = allow_bias(v, |i| vocab.is_text(i), dev);
    let text_no_eos = allow_bias(v, |i| vocab.is_text(i) && i != eos, dev);
    let eos_only = allow_bias(v, |i| i == eos, dev);
    let mut tokens = Tensor::zeros([s, 0], (Kind::Int64, dev));
    let mut done = Tensor::zeros([s], (Kind::Bool, dev));
    let mut lens = Tensor::zeros([s], (Kind::Float, dev));
    // Only the first beam of each prefix is live at the start (the others are copies).
    let beam_scores = Tensor::zeros([b, k], (Kind::Float, dev));
    if k > 1 {
        let _ = beam_scores.narrow(1, 1, k - 1).fill_(-1e9);
    }
    let beam_scores_flat = |t: &Tensor| t.view([-1]);
    let mut beam_scores = beam_scores_flat(&beam_scores);
    for step in 0..cfg.max_new_tokens {
        if should_stop() {
            return Err(Error::Cancelled);
        }
        let l = logits.to_kind(Kind::Float);
        let l = repetition_penalty(&l, &tokens, cfg.repetition_penalty);
        let bias = if step < cfg.min_new_tokens {
            &text_no_eos
        } else {
            &text_only
        };
        // Finished streams may only repeat EOS.
        let bias = eos_only
            .view([1, v])
            .where_self(&done.view([s, 1]), &bias.view([1, v]));
        let l = l + bias;
        let next = if k == 1 {
            pick(&l, &cfg.sampling, &mut rng)
        } else {
            // Beam search on the device: finished beams extend with EOS at no cost.
            let lp = l.log_softmax(-1, Kind::Float);
            // A finished beam continues only with EOS, at log-prob 0.
            let lp = eos_only.view([1, v]).where_self(&done.view([s, 1]), &lp);
            let cand = (beam_scores.view([s, 1]) + lp).view([b, k * v]);
            let (top, idx) = cand.topk(k, -1, true, true); // (B, k)
            let src_beam = idx.divide_scalar_mode(v, "floor"); // (B, k)
            let tok = idx.remainder(v).view([s]);
            let src = (src_beam + Tensor::arange(b, (Kind::Int64, dev)).view([b, 1]) * k).view([s]);
            cache.select(&src);
            tokens = tokens.index_select(0, &src);
            done = done.index_select(0, &src);
            lens = lens.index_select(0, &src);
            beam_scores = top.view([s]);
            tok
        };
        let next = Tensor::from(eos).to_device(dev).where_self(&done, &next);
        lens = &lens + done.logical_not().to_kind(Kind::Float);
        tokens = Tensor::cat(&[&tokens, &next.view([s, 1])], 1);
        done = done.logical_or(&next.eq(eos));
        let all_done = match on_tokens.as_mut() {
            // One host read: the new ids (a stream is finished once it emitted EOS).
            Some(f) => {
                let both = Tensor::cat(&[&next, &done.to_kind(Kind::Int64)], 0); // (2S,)
                let host = Vec::<i64>::try_from(&both.to_device(Device::Cpu))
                    .map_err(|e| Error::invalid(format!("reading generated ids: {e}")))?;
                let (ids, finished) = host.split_at(s as usize);
                if !f(ids) {
                    return Err(Error::Cancelled);
                }
                finished.iter().all(|&d| d != 0)
            }
            None => done.all().int64_value(&[]) != 0,
        };
        if step + 1 == cfg.max_new_tokens || all_done {
            break;
        }
        logits = model.forward_last(
            &model.embed(&next.view([s, 1])),
            &ForwardArgs::default(),
            Some(&mut cache),
        );
    }
    // Best beam of each prefix by score / length^length_penalty.
    let best = if k > 1 {
        let norm = &beam_scores / lens.clamp_min(1.0).pow_tensor_scalar(cfg.length_penalty);
        let j = norm.view([b, k]).argmax(-1, false);
        j + Tensor::arange(b, (Kind::Int64, dev)) * k
    } else {
        Tensor::arange(b, (Kind::Int64, dev))
    };
    let rows = tokens.index_select(0, &best).to_device(Device::Cpu);
    let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&rows)
        .map_err(|e| Error::invalid(format!("reading generated ids: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| r.into_iter().take_while(|&i| i != eos).collect())
        .collect())
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

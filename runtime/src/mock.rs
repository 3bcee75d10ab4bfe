//! Mock stages: small deterministic tensor computations with the shapes of the real stages, for
//! testing the actor machinery and the server without model weights (and for stages whose
//! model has not been wired). Each does real work (matmuls), scaled by `work`, so per-stage
//! timings are measurable; the LLM and decoder loops call their cancellation callback once per
//! token / step exactly as the real loops must. A [`Gate`] can hold the LLM and decoder loops
//! (tests of admission and cancellation use it instead of sleeps).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::actors::{Builder, StageBuilders};
use crate::messages::{CaptionOptions, GenerateOptions};
use crate::stage::*;

/// Sizes and knobs of the mock stages.
#[derive(Clone, Debug)]
pub struct MockConfig {
    pub image_size: i64,
    pub patch: i64,
    /// Feature width C.
    pub width: i64,
    /// Codebook size.
    pub n_code: i64,
    /// LLM width D.
    pub llm_hidden: i64,
    pub text_vocab: i64,
    pub visual_offset: i64,
    /// Visual tokens generated per image.
    pub image_tokens: usize,
    /// Side of the generated pixels.
    pub pixel_size: i64,
    /// Extra matmuls per call / per step (makes stages measurably slow).
    pub work: usize,
    pub seed: i64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            image_size: 28,
            patch: 7,
            width: 32,
            n_code: 64,
            llm_hidden: 24,
            text_vocab: 50,
            visual_offset: 52,
            image_tokens: 8,
            pixel_size: 16,
            work: 0,
            seed: 7,
        }
    }
}

/// Holds the LLM and decoder loops at each token / step while closed.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        Gate(Arc::new((Mutex::new(false), Condvar::new())))
    }
    pub fn open(&self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.0 .1.notify_all();
    }
    pub fn close(&self) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
    /// Wait while closed; returns early when `stop()` says so.
    fn pass(&self, stop: &dyn Fn() -> bool) {
        let mut open = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            if stop() {
                return;
            }
            open = self
                .0
                 .1
                .wait_timeout(open, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Deterministic pseudo-random values (splitmix64 → uniform with unit variance), independent
/// of libtorch's global generator so concurrently built stages never race on a seed.
fn noise(seed: u64, shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            ((u * 2.0 - 1.0) * 3f64.sqrt()) as f32
        })
        .collect();
    Tensor::from_slice(&v).reshape(shape).to_device(device)
}

fn weights(cfg: &MockConfig, salt: i64, shape: &[i64], device: Device) -> Tensor {
    noise((cfg.seed * 1000 + salt) as u64, shape, device) / (shape[0] as f64).sqrt()
}

fn busy(cfg: &MockConfig, w: &Tensor) {
    let mut x = w.shallow_clone();
    for _ in 0..cfg.work {
        x = x.matmul(&w.tr()).tanh().matmul(w);
    }
    let _ = x.sum(Kind::Float).double_value(&[]);
}

pub struct MockEncoder {
    cfg: MockConfig,
    proj: Tensor,
}
impl MockEncoder {
    pub fn new(cfg: &MockConfig, device: Device) -> Self {
        let d = 3 * cfg.patch * cfg.patch;
        MockEncoder {
            cfg: cfg.clone(),
            proj: weights(cfg, 1, &[d, cfg.width], device),
        }
    }
}
impl Trainable for MockEncoder {}
impl EncoderStage for MockEncoder {
    fn encode(&mut self, images: &Tensor) -> StageResult<Tensor> {
        let (b, c, h, w) = images
            .size4()
            .map_err(|e| StageError::Invalid(format!("images: {e}")))?;
        let p = self.cfg.patch;
        if c != 3 || h % p != 0 || w % p != 0 {
            return Err(StageError::Invalid(format!(
                "images must be (B, 3, H, W) with H, W multiples of {p}, got {:?}",
                images.size()
            )));
        }
        busy(&self.cfg, &self.proj);
        let x = images
            .reshape([b, 3, h / p, p, w / p, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, (h / p) * (w / p), 3 * p * p]); // (B, N, 3·p·p)
        Ok(x.matmul(&self.proj)) // (B, N, C)
    }
}

pub struct MockSelectorMerger {
    cfg: MockConfig,
    score: Tensor,
    mix: Tensor,
    vit_proj: Tensor,
}
impl MockSelectorMerger {
    pub fn new(cfg: &MockConfig, device: Device) -> Self {
        MockSelectorMerger {
            cfg: cfg.clone(),
            score: weights(cfg, 2, &[cfg.width, 1], device),
            mix: weights(cfg, 3, &[cfg.width, cfg.width], device),
            vit_proj: weights(cfg, 4, &[cfg.width, cfg.llm_hidden], device),
        }
    }
}
impl Trainable for MockSelectorMerger {}
impl SelectorMergerStage for MockSelectorMerger {
    /// A fixed threshold: the mock has no Gumbel sampling, so `selection` changes nothing.
    fn select_merge(
        &mut self,
        pf: &Tensor,
        _: Option<SelectionChoice>,
    ) -> StageResult<(Tensor, Tensor)> {
        busy(&self.cfg, &self.mix);
        let x = pf; // (B, N, C)
        let s = x.matmul(&self.score).squeeze_dim(-1); // (B, N)
        let keep = s.gt(0.0).to_kind(Kind::Float);
        let first = Tensor::zeros_like(&keep);
        let _ = first.narrow(1, 0, 1).fill_(1.0);
        let keep = keep.maximum(&first); // the first position is always kept
        let merged = (x.matmul(&self.mix)).tanh() + x; // (B, N, C)
        Ok((keep, merged))
    }
    fn understanding(&mut self, pf: &Tensor) -> StageResult<Vec<Tensor>> {
        let (keep, merged) = self.select_merge(pf, None)?;
        let b = merged.size()[0];
        Ok((0..b)
            .map(|i| {
                let idx = keep.get(i).nonzero().squeeze_dim(-1);
                merged.get(i).index_select(0, &idx).matmul(&self.vit_proj) // (T_i, D)
            })
            .collect())
    }
}

pub struct MockQuantizer {
    cfg: MockConfig,
    codebook: Tensor,
}
impl MockQuantizer {
    pub fn new(cfg: &MockConfig, device: Device) -> Self {
        let cb = weights(cfg, 5, &[cfg.n_code, cfg.width], device);
        let norm = cb.norm_scalaropt_dim(2, [1], true);
        MockQuantizer {
            cfg: cfg.clone(),
            codebook: cb / norm,
        }
    }
}
impl Trainable for MockQuantizer {}
impl QuantizerStage for MockQuantizer {
    fn quantize(&mut self, merged: &Tensor, decisions: &Tensor) -> StageResult<Vec<Vec<i64>>> {
        busy(&self.cfg, &self.codebook.tr());
        let b = merged.size()[0];
        let mut out = Vec::new();
        for i in 0..b {
            let idx = decisions.get(i).nonzero().squeeze_dim(-1);
            let f = merged.get(i).index_select(0, &idx); // (T, C)
            let sim = f.matmul(&self.codebook.tr()); // (T, K)
            let ids = sim.argmax(-1, false) + self.cfg.visual_offset;
            out.push(
                Vec::<i64>::try_from(&ids)
                    .map_err(|e| StageError::failed(StageKind::Quantizer, e))?,
            );
        }
        Ok(out)
    }
}

pub struct MockLlm {
    cfg: MockConfig,
    w: Tensor,
    out: Tensor,
    pub gate: Option<Gate>,
}
impl MockLlm {
    pub fn new(cfg: &MockConfig, device: Device, gate: Option<Gate>) -> Self {
        let d = cfg.llm_hidden;
        MockLlm {
            cfg: cfg.clone(),
            w: weights(cfg, 6, &[d, d], device),
            out: weights(cfg, 7, &[d, cfg.text_vocab + 2 + cfg.n_code], device),
            gate,
        }
    }
    fn prompt_state(&self, prompt: &str, n: i64, seed: u64) -> Tensor {
        let d = self.cfg.llm_hidden;
        let mut v = vec![0f32; (n * d) as usize];
        for (i, b) in prompt.bytes().enumerate() {
            v[i % d as usize] += b as f32 / 255.0;
        }
        for s in 0..n as usize {
            v[s * d as usize] += (seed as f32 + s as f32) * 0.1;
            for j in 0..d as usize {
                v[s * d as usize + j] += v[j];
            }
        }
        Tensor::from_slice(&v)
            .reshape([n, d])
            .to_device(self.w.device())
    }
}
impl Trainable for MockLlm {}
impl LlmStage for MockLlm {
    fn caption(
        &mut self,
        prefix: &Tensor,
        prompt: &str,
        opts: &CaptionOptions,
        on_token: &mut dyn FnMut(i64, &str) -> bool,
    ) -> StageResult<Vec<i64>> {
        let mut h = prefix.mean_dim(0, true, Kind::Float) + self.prompt_state(prompt, 1, opts.seed); // (1, D)
        let mut ids = Vec::new();
        for _ in 0..opts.max_new_tokens {
            busy(&self.cfg, &self.w);
            h = (h.matmul(&self.w)).tanh() + 0.5 * &h;
            let logits = h.matmul(&self.out).narrow(1, 0, self.cfg.text_vocab); // (1, V_text)
            let id = logits.argmax(-1, false).int64_value(&[0]);
            ids.push(id);
            let stop = !on_token(id, &format!(" w{id}"));
            if let Some(g) = &self.gate {
                g.pass(&|| stop);
            }
            if stop {
                return Err(StageError::Cancelled);
            }
            if id == 2 {
                break;
            }
        }
        Ok(ids)
    }
    fn caption_prompt_len(&mut self, prefix: &Tensor, prompt: &str) -> Option<usize> {
        // The mock reads the prefix rows and one "token" per word.
        Some(prefix.size()[0] as usize + prompt.split_whitespace().count())
    }
    fn decode_text(&mut self, ids: &[i64]) -> StageResult<String> {
        Ok(ids
            .iter()
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" "))
    }
    fn image_tokens(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        let n = opts.n as i64;
        let mut h = self.prompt_state(prompt, n, opts.seed); // (n, D)
        let v0 = self.cfg.text_vocab + 2;
        let mut ids = vec![Vec::new(); opts.n];
        for _ in 0..self.cfg.image_tokens {
            busy(&self.cfg, &self.w);
            h = (h.matmul(&self.w)).tanh() + 0.5 * &h;
            let logits = h.matmul(&self.out).narrow(1, v0, self.cfg.n_code); // (n, K)
            let t = Vec::<i64>::try_from(&logits.argmax(-1, false))
                .map_err(|e| StageError::failed(StageKind::Llm, e))?;
            for (s, id) in t.into_iter().enumerate() {
                ids[s].push(id + self.cfg.visual_offset);
            }
            if let Some(g) = &self.gate {
                g.pass(should_stop);
            }
            if should_stop() {
                return Err(StageError::Cancelled);
            }
        }
        Ok(ids)
    }
}

pub struct MockDecoder {
    cfg: MockConfig,
    embed: Tensor,
    w: Tensor,
    to_px: Tensor,
    pub gate: Option<Gate>,
}
impl MockDecoder {
    pub fn new(cfg: &MockConfig, device: Device, gate: Option<Gate>) -> Self {
        let d = cfg.width;
        let s = cfg.pixel_size;
        MockDecoder {
            cfg: cfg.clone(),
            embed: weights(cfg, 8, &[cfg.n_code, d], device),
            w: weights(cfg, 9, &[d, d], device),
            to_px: weights(cfg, 10, &[d, 3 * s * s], device),
            gate,
        }
    }
}
impl Trainable for MockDecoder {}
impl DecoderStage for MockDecoder {
    fn decode(
        &mut self,
        ids: &[Vec<i64>],
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Tensor> {
        let dev = self.w.device();
        let conds = ids
            .iter()
            .map(|seq| {
                let raw: Vec<i64> = seq
                    .iter()
                    .map(|i| (i - self.cfg.visual_offset).clamp(0, self.cfg.n_code - 1))
                    .collect();
                if raw.is_empty() {
                    return Err(StageError::Invalid("no visual ids to decode".into()));
                }
                Ok(self
                    .embed
                    .index_select(0, &Tensor::from_slice(&raw).to_device(dev))
                    .mean_dim(0, true, Kind::Float)) // (1, D)
            })
            .collect::<StageResult<Vec<_>>>()?;
        let cond = Tensor::cat(&conds, 0); // (n, D)
        let mut x = noise(opts.seed ^ 0xDEC0DE, &cond.size(), dev);
        for _ in 0..opts.steps {
            busy(&self.cfg, &self.w);
            x = (x.matmul(&self.w) + &cond).tanh();
            if let Some(g) = &self.gate {
                g.pass(should_stop);
            }
            if should_stop() {
                return Err(StageError::Cancelled);
            }
        }
        let s = self.cfg.pixel_size;
        Ok(x.matmul(&self.to_px).sigmoid().reshape([-1, 3, s, s])) // (n, 3, S, S)
    }
}

/// Builders of the five mock stages (gates on the LLM and decoder, if given).
pub fn builders(cfg: &MockConfig, gate: Option<Gate>) -> StageBuilders {
    fn b<S: 'static>(f: impl FnOnce(Device) -> S + Send + 'static) -> Builder<S> {
        Box::new(move |d| Ok(f(d)))
    }
    let (c1, c2, c3, c4, c5) = (
        cfg.clone(),
        cfg.clone(),
        cfg.clone(),
        cfg.clone(),
        cfg.clone(),
    );
    let g2 = gate.clone();
    StageBuilders {
        encoder: b(move |d| Box::new(MockEncoder::new(&c1, d)) as Box<dyn EncoderStage>),
        selector_merger: b(move |d| {
            Box::new(MockSelectorMerger::new(&c2, d)) as Box<dyn SelectorMergerStage>
        }),
        quantizer: b(move |d| Box::new(MockQuantizer::new(&c3, d)) as Box<dyn QuantizerStage>),
        llm: b(move |d| Box::new(MockLlm::new(&c4, d, gate)) as Box<dyn LlmStage>),
        decoder: b(move |d| Box::new(MockDecoder::new(&c5, d, g2)) as Box<dyn DecoderStage>),
    }
}

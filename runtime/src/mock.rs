//! Mock stages: small deterministic tensor computations with the shapes of the real stages, for
//! testing the actor machinery and the server without model weights (and for stages whose
//! model has not been wired). Each does real work (matmuls), scaled by `work`, so per-stage
//! timings are measurable. The LLM and the decoder batch like the real ones: every step
//! advances all the requests they hold by one token / one step in one computation, and calls
//! its cancellation callback once as the real steps do. A [`Gate`] can hold their steps
//! (tests of admission and cancellation use it instead of sleeps).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::actors::{Builder, StageBuilders};
use crate::messages::{
    DecodeRequest, LlmEvent, LlmOutput, LlmRequest, PromptPart, TextAnswer, TokenEvent,
};
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

/// A request in the mock Llm: its state rows and what it has generated.
struct MockLlmReq {
    /// Image tokens (else text).
    image: bool,
    h: Tensor,
    steps: usize,
    max: usize,
    out: Vec<Vec<i64>>,
    done: Vec<bool>,
    prompt_tokens: usize,
    stream: bool,
}

pub struct MockLlm {
    cfg: MockConfig,
    w: Tensor,
    out: Tensor,
    pub gate: Option<Gate>,
    reqs: std::collections::BTreeMap<u64, MockLlmReq>,
}
impl MockLlm {
    pub fn new(cfg: &MockConfig, device: Device, gate: Option<Gate>) -> Self {
        let d = cfg.llm_hidden;
        MockLlm {
            cfg: cfg.clone(),
            w: weights(cfg, 6, &[d, d], device),
            out: weights(cfg, 7, &[d, cfg.text_vocab + 2 + cfg.n_code], device),
            gate,
            reqs: Default::default(),
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
    /// A prompt's text (ids written out as text, so a synthesis prompt's images change the
    /// answer) and its image embeddings (the mock reads them so).
    fn parts(parts: Vec<PromptPart>) -> (String, Option<Tensor>) {
        let mut text = String::new();
        let mut image = None;
        for p in parts {
            match p {
                PromptPart::Text(t) => text.push_str(&t),
                PromptPart::ImageEmbeds(e) => image = Some(e),
                PromptPart::Ids(ids) | PromptPart::ImageIds(ids) => {
                    for i in ids {
                        text.push_str(&format!("<{i}>"));
                    }
                }
            }
        }
        (text, image)
    }
}
impl Trainable for MockLlm {}
impl Iterative<LlmRequest, LlmEvent> for MockLlm {
    fn join(&mut self, key: u64, req: LlmRequest) -> StageResult<()> {
        let r = match req {
            LlmRequest::ImageTokens { prompt, opts, .. } => {
                let (text, _) = Self::parts(prompt);
                MockLlmReq {
                    image: true,
                    h: self.prompt_state(&text, opts.n as i64, opts.seed),
                    steps: 0,
                    max: self.cfg.image_tokens,
                    out: vec![Vec::new(); opts.n],
                    done: vec![false; opts.n],
                    prompt_tokens: 0,
                    stream: false,
                }
            }
            LlmRequest::Text {
                prompts,
                opts,
                stream,
            } => {
                let mut hs = Vec::new();
                let mut prompt_tokens = 0;
                for p in prompts {
                    let (text, prefix) = Self::parts(p);
                    let prefix = prefix
                        .ok_or_else(|| StageError::Invalid("a caption without an image".into()))?;
                    prompt_tokens = prefix.size()[0] as usize + text.split_whitespace().count();
                    hs.push(
                        prefix.mean_dim(0, true, Kind::Float)
                            + self.prompt_state(&text, 1, opts.seed),
                    ); // (1, D)
                }
                let n = hs.len();
                MockLlmReq {
                    image: false,
                    h: Tensor::cat(&hs, 0),
                    steps: 0,
                    max: opts.max_new_tokens,
                    out: vec![Vec::new(); n],
                    done: vec![false; n],
                    prompt_tokens,
                    stream: stream && n == 1,
                }
            }
        };
        self.reqs.insert(key, r);
        Ok(())
    }
    fn held(&self) -> usize {
        self.reqs.len()
    }
    fn plan(&mut self) -> Vec<u64> {
        self.reqs.keys().copied().collect()
    }
    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, LlmEvent),
    ) -> StageResult<()> {
        if should_stop() || self.reqs.is_empty() {
            return Ok(());
        }
        // One forward over every request's rows.
        busy(&self.cfg, &self.w);
        let keys: Vec<u64> = self.reqs.keys().copied().collect();
        let hs: Vec<Tensor> = self.reqs.values().map(|r| r.h.shallow_clone()).collect();
        let h = Tensor::cat(&hs, 0);
        let h: Tensor = (h.matmul(&self.w)).tanh() + 0.5 * &h;
        let logits = h.matmul(&self.out); // (R, V)
        let v0 = self.cfg.text_vocab + 2;
        let mut at = 0;
        let mut finished = Vec::new();
        for key in keys {
            let Some(r) = self.reqs.get_mut(&key) else {
                continue;
            };
            let n = r.h.size()[0];
            r.h = h.narrow(0, at, n);
            let l = logits.narrow(0, at, n);
            at += n;
            let ids = if r.image {
                l.narrow(1, v0, self.cfg.n_code).argmax(-1, false) + self.cfg.visual_offset
            } else {
                l.narrow(1, 0, self.cfg.text_vocab).argmax(-1, false)
            };
            let ids =
                Vec::<i64>::try_from(&ids).map_err(|e| StageError::failed(StageKind::Llm, e))?;
            r.steps += 1;
            for (s, id) in ids.into_iter().enumerate() {
                if r.done[s] {
                    continue;
                }
                r.out[s].push(id);
                if r.stream {
                    emit(
                        key,
                        LlmEvent::Token(TokenEvent {
                            id,
                            text: format!(" w{id}"),
                        }),
                    );
                }
                if !r.image && id == 2 {
                    r.done[s] = true;
                }
            }
            if r.steps >= r.max || r.done.iter().all(|&d| d) {
                finished.push(key);
            }
        }
        if let Some(g) = &self.gate {
            g.pass(should_stop);
        }
        for key in finished {
            let Some(r) = self.reqs.remove(&key) else {
                continue;
            };
            let out = if r.image {
                LlmOutput::ImageTokens(r.out)
            } else {
                LlmOutput::Text(
                    r.out
                        .into_iter()
                        .map(|ids| TextAnswer {
                            text: ids
                                .iter()
                                .map(|i| format!("w{i}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                            ids,
                            prompt_tokens: r.prompt_tokens,
                        })
                        .collect(),
                )
            };
            emit(key, LlmEvent::Done(out));
        }
        Ok(())
    }
    fn leave(&mut self, key: u64) {
        self.reqs.remove(&key);
    }
}
impl LlmStage for MockLlm {}

/// A request in the mock Decoder.
struct MockDecodeReq {
    cond: Tensor,
    x: Tensor,
    steps: usize,
    done: usize,
}

pub struct MockDecoder {
    cfg: MockConfig,
    embed: Tensor,
    w: Tensor,
    to_px: Tensor,
    pub gate: Option<Gate>,
    reqs: std::collections::BTreeMap<u64, MockDecodeReq>,
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
            reqs: Default::default(),
        }
    }
}
impl Trainable for MockDecoder {}
impl Iterative<DecodeRequest, Tensor> for MockDecoder {
    fn join(&mut self, key: u64, req: DecodeRequest) -> StageResult<()> {
        let dev = self.w.device();
        let conds = req
            .ids
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
        if conds.is_empty() {
            return Err(StageError::Invalid("no images to decode".into()));
        }
        let cond = Tensor::cat(&conds, 0); // (n, D)
        let x = noise(req.opts.seed ^ 0xDEC0DE, &cond.size(), dev);
        self.reqs.insert(
            key,
            MockDecodeReq {
                cond,
                x,
                steps: req.opts.steps,
                done: 0,
            },
        );
        Ok(())
    }
    fn held(&self) -> usize {
        self.reqs.len()
    }
    fn plan(&mut self) -> Vec<u64> {
        self.reqs.keys().copied().collect()
    }
    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, Tensor),
    ) -> StageResult<()> {
        if should_stop() || self.reqs.is_empty() {
            return Ok(());
        }
        // One denoising step of every running image.
        let running: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.done < r.steps)
            .map(|(&k, _)| k)
            .collect();
        if !running.is_empty() {
            busy(&self.cfg, &self.w);
            let xs: Vec<Tensor> = running
                .iter()
                .map(|k| self.reqs[k].x.shallow_clone())
                .collect();
            let cs: Vec<Tensor> = running
                .iter()
                .map(|k| self.reqs[k].cond.shallow_clone())
                .collect();
            let x = (Tensor::cat(&xs, 0).matmul(&self.w) + Tensor::cat(&cs, 0)).tanh();
            let mut at = 0;
            for k in &running {
                if let Some(r) = self.reqs.get_mut(k) {
                    let n = r.x.size()[0];
                    r.x = x.narrow(0, at, n);
                    at += n;
                    r.done += 1;
                }
            }
            if let Some(g) = &self.gate {
                g.pass(should_stop);
            }
        }
        let finished: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.done >= r.steps)
            .map(|(&k, _)| k)
            .collect();
        let s = self.cfg.pixel_size;
        for k in finished {
            if let Some(r) = self.reqs.remove(&k) {
                emit(k, r.x.matmul(&self.to_px).sigmoid().reshape([-1, 3, s, s]));
                // (n, 3, S, S)
            }
        }
        Ok(())
    }
    fn leave(&mut self, key: u64) {
        self.reqs.remove(&key);
    }
}
impl DecoderStage for MockDecoder {}

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

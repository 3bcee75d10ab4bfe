//! The real stages of a LaVIT checkpoint folder as [`lavit_runtime::stage`] implementations:
//! thin adapters over [`crate::tokenizer::VisualTokenizer`] (EVA encoder, selector + merger,
//! quantizer, feature decoders), [`lavit_llm::actor::LlmStageModel`] and
//! [`crate::generate::PixelDecoder`]. Each builder runs on its stage's own thread and loads
//! only what that stage needs onto the stage's device.
//!
//! The SelectorMerger, Quantizer and Decoder stages each hold a `VisualTokenizer` without the
//! EVA encoder (a [`NoBackbone`] stands in). `tokenizer_encoder` (selector/merger weights, task
//! layer + codebook) is read from disk once per pipeline ([`SharedState`]); each stage copies
//! the tensors onto its own device. The backbone and the codebook are the built-in ones or
//! plugins ([`TokenizerPlugins`]).
//!
//! The Encoder, SelectorMerger and Quantizer adapters also implement [`Trainable`]: stage 1
//! (`lavit train tokenizer`) runs through them as `TrainForward` → `Backward` →
//! `OptimizerStep` messages (see [`stage1_builders`] and the keys in [`train_keys`]); the Llm
//! and Decoder adapters do the same for stages 2 and 1b.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use lavit_decoder::feature_decoder::{FeatureDecoderConfig, VQDecoder};
use lavit_llm::actor::LlmStageModel;
use lavit_plugin_api::{Backbone, Codebook, PluginError, PluginResult, QuantizeOut};
use lavit_quantizer::{l2norm, EmaConfig, VectorQuantizer};
use lavit_runtime::actors::StageBuilders;
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{
    CaptionOptions, GenerateOptions, StepControl, StepReport, TrainBatch, TrainParts,
};
use lavit_runtime::stage::*;
use lavit_runtime::train::{AdamW, AdamWConfig};
use lavit_selector::SelectionMode;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::ModelInfo;
use crate::generate::{Condition, DecodeOptions, PixelDecoder, Resolution};
use crate::tokenizer::{files, resolve_file, LoadParts, TokenizerPlugins, VisualTokenizer};

/// Stands in for the encoder in stages that never run it.
struct NoBackbone {
    image_size: i64,
    patch_size: i64,
    width: i64,
}

impl Backbone for NoBackbone {
    fn name(&self) -> String {
        "none (this stage does not run the encoder)".into()
    }
    fn image_size(&self) -> i64 {
        self.image_size
    }
    fn patch_size(&self) -> i64 {
        self.patch_size
    }
    fn width(&self) -> i64 {
        self.width
    }
    fn forward(&self, _images: &Tensor) -> PluginResult<Tensor> {
        Err(lavit_plugin_api::PluginError::new(
            "the encoder runs in the Encoder stage",
        ))
    }
}

/// One read of a checkpoint file (CPU tensors) shared by the stage builders of a pipeline.
/// (`tch::Tensor` is `Send` but not `Sync`, hence the mutex; a stage holds it only to take
/// shallow copies, then copies the tensors onto its device.)
#[derive(Clone)]
pub struct SharedState {
    sd: Arc<Mutex<StateDict>>,
    source: Arc<str>,
}

impl SharedState {
    /// Read `path` once.
    pub fn load(path: &Path) -> lavit_runtime::Result<Self> {
        Ok(Self {
            sd: Arc::new(Mutex::new(checkpoint::load_path(path)?)),
            source: path.display().to_string().into(),
        })
    }
    /// Shallow copies of the tensors (no data copied).
    pub fn get(&self) -> StateDict {
        let sd = self.sd.lock().unwrap_or_else(|e| e.into_inner());
        sd.iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect()
    }
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl NoBackbone {
    fn of(m: &LavitManifest) -> Self {
        NoBackbone {
            image_size: m.tokenizer.img_size,
            patch_size: m.tokenizer.patch_size,
            width: m.tokenizer.encoder_width,
        }
    }
}

/// Stands in for the codebook in stages that never quantise.
struct NoCodebook {
    num_codes: i64,
    code_dim: i64,
}

impl NoCodebook {
    fn of(m: &LavitManifest) -> Self {
        NoCodebook {
            num_codes: m.tokenizer.n_code,
            code_dim: m.tokenizer.code_dim,
        }
    }
    fn refuse<T>() -> PluginResult<T> {
        Err(PluginError::new("the codebook runs in the Quantizer stage"))
    }
}

impl Codebook for NoCodebook {
    fn name(&self) -> String {
        "none (this stage does not run the codebook)".into()
    }
    fn num_codes(&self) -> i64 {
        self.num_codes
    }
    fn code_dim(&self) -> i64 {
        self.code_dim
    }
    fn quantize(&self, _z: &Tensor) -> PluginResult<Tensor> {
        Self::refuse()
    }
    fn embed(&self, _ids: &Tensor) -> PluginResult<Tensor> {
        Self::refuse()
    }
    fn quantize_train(&mut self, _z: &Tensor) -> PluginResult<QuantizeOut> {
        Self::refuse()
    }
}

/// The checkpoint's tokenizer without the encoder, with the config's codebook (a plugin
/// when `[plugins.codebook]` names one).
fn tokenizer_without_encoder(
    dir: &Path,
    device: Device,
    parts: LoadParts,
    plugins: &TokenizerPlugins,
    enc: &SharedState,
) -> lavit_runtime::Result<VisualTokenizer> {
    let m = LavitManifest::for_checkpoint(dir)?;
    let codebook = plugins.codebook(Some(dir), device)?;
    VisualTokenizer::from_checkpoint_with_state(
        dir,
        device,
        parts,
        Box::new(NoBackbone::of(&m)),
        codebook,
        enc.get(),
        enc.source(),
    )
}

fn lock<T: ?Sized>(m: &Mutex<Box<T>>) -> MutexGuard<'_, Box<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A codebook shared between the Quantizer stage that runs it and the trainer that saves,
/// restores and initialises it between steps (each call locks it).
#[derive(Clone)]
pub struct SharedCodebook(pub Arc<Mutex<Box<dyn Codebook>>>);

impl SharedCodebook {
    pub fn new(c: Box<dyn Codebook>) -> Self {
        SharedCodebook(Arc::new(Mutex::new(c)))
    }
}

impl Codebook for SharedCodebook {
    fn name(&self) -> String {
        lock(&self.0).name()
    }
    fn num_codes(&self) -> i64 {
        lock(&self.0).num_codes()
    }
    fn code_dim(&self) -> i64 {
        lock(&self.0).code_dim()
    }
    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor> {
        lock(&self.0).quantize(z)
    }
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        lock(&self.0).embed(ids)
    }
    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut> {
        lock(&self.0).quantize_train(z)
    }
    fn update(&mut self, z: &Tensor, ids: &Tensor) -> PluginResult<()> {
        lock(&self.0).update(z, ids)
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        lock(&self.0).trainable_parameters()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        lock(&self.0).state_dict()
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        lock(&self.0).load_state_dict(state)
    }
    fn init_from_samples(&mut self, z: &Tensor, seed: u64) -> PluginResult<()> {
        lock(&self.0).init_from_samples(z, seed)
    }
}

/// A backbone shared between the Encoder stage and the trainer (see [`SharedCodebook`]).
#[derive(Clone)]
pub struct SharedBackbone(pub Arc<Mutex<Box<dyn Backbone>>>);

impl SharedBackbone {
    pub fn new(b: Box<dyn Backbone>) -> Self {
        SharedBackbone(Arc::new(Mutex::new(b)))
    }
}

impl Backbone for SharedBackbone {
    fn name(&self) -> String {
        lock(&self.0).name()
    }
    fn image_size(&self) -> i64 {
        lock(&self.0).image_size()
    }
    fn patch_size(&self) -> i64 {
        lock(&self.0).patch_size()
    }
    fn width(&self) -> i64 {
        lock(&self.0).width()
    }
    fn num_patches(&self) -> i64 {
        lock(&self.0).num_patches()
    }
    fn forward(&self, images: &Tensor) -> PluginResult<Tensor> {
        lock(&self.0).forward(images)
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        lock(&self.0).trainable_parameters()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        lock(&self.0).state_dict()
    }
}

fn err(kind: StageKind) -> impl Fn(lavit_runtime::Error) -> StageError {
    move |e| match e {
        lavit_runtime::Error::Invalid(m) => StageError::Invalid(m),
        lavit_runtime::Error::Cancelled => StageError::Cancelled,
        e => StageError::failed(kind, e),
    }
}

/// Encoder stage: the EVA ViT (or a plugin backbone) → patch features (B, N, C).
pub struct EncoderReal {
    tok: VisualTokenizer,
    train: bool,
}
/// The backbone is frozen (LaVIT's EVA-CLIP is): the training forward computes patch
/// features without autograd and the optimiser step has nothing to do.
impl Trainable for EncoderReal {
    fn train_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        need_train(self.train, StageKind::Encoder)?;
        let images = take(&mut batch, train_keys::IMAGES, StageKind::Encoder)?;
        let _g = tch::no_grad_guard();
        let f = self
            .tok
            .encoder_features(&images)
            .map_err(err(StageKind::Encoder))?;
        batch.tensors.insert(train_keys::PATCH_FEATURES.into(), f);
        Ok(batch)
    }
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}
impl EncoderStage for EncoderReal {
    fn encode(&mut self, images: &Tensor) -> StageResult<Tensor> {
        let _g = tch::no_grad_guard();
        self.tok
            .encoder_features(images)
            .map_err(err(StageKind::Encoder))
    }
}

/// SelectorMerger stage: token selector + merger (+ the understanding merger and `vit_proj`
/// from `language_model/visual_weight`).
pub struct SelectorMergerReal {
    tok: VisualTokenizer,
    training: Option<SelectorTraining>,
    train: bool,
}

/// What the SelectorMerger stage holds for stage-1 training.
struct SelectorTraining {
    optim: StageOptim,
    loss: Stage1Loss,
}

/// Stage-1 forward of the selector and merger: Gumbel keep decisions (hard forward, soft
/// backward) at the batch's seed and temperature, the merger, and two loss terms: the kept
/// ratio `λ · mean_b (ρ − mean_n M_bn)²` and the confidence term (mean binary entropy of the
/// keep probability × its weight).
impl Trainable for SelectorMergerReal {
    fn train_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        const K: StageKind = StageKind::SelectorMerger;
        need_train(self.train, K)?;
        let t = self.training.as_mut().ok_or_else(|| not_trainable(K))?;
        let feats = take(&mut batch, train_keys::PATCH_FEATURES, K)?;
        let seed = scalar(&batch, train_keys::GUMBEL_SEED, K)?.int64_value(&[]) as u64;
        let tau = scalar(&batch, train_keys::TAU, K)?.double_value(&[]);
        if let Ok(lr) = scalar(&batch, train_keys::LR, K) {
            t.optim.lr = Some(lr.double_value(&[]));
        }
        let mode = SelectionMode::Gumbel { seed, tau };
        let (log_probs, dec) = self.tok.select(&feats, mode); // (B, N, 2), (B, N)
        let merged = self.tok.causal_encoder.forward(&feats, &dec); // (B, N, C)
        let kept = dec.mean_dim(1, false, Kind::Float); // (B,)
        let ratio = (kept - t.loss.rho).square().mean(Kind::Float) * t.loss.lambda;
        let entropy = (log_probs.exp() * &log_probs)
            .sum_dim_intlist(-1, false, Kind::Float)
            .neg(); // (B, N)
        let confidence = entropy.mean(Kind::Float) * t.loss.confidence_weight;
        batch.losses.push((train_keys::LOSS_RATIO.into(), ratio));
        batch
            .losses
            .push((train_keys::LOSS_CONFIDENCE.into(), confidence));
        batch
            .tensors
            .insert(train_keys::PATCH_FEATURES.into(), feats);
        batch.tensors.insert(train_keys::DECISIONS.into(), dec);
        batch.tensors.insert(train_keys::MERGED.into(), merged);
        Ok(batch)
    }
    fn optimizer_step(&mut self) -> StageResult<()> {
        let t = self
            .training
            .as_mut()
            .ok_or_else(|| not_trainable(StageKind::SelectorMerger))?;
        t.optim.step(StageKind::SelectorMerger)
    }
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}
impl SelectorMergerStage for SelectorMergerReal {
    fn select_merge(&mut self, features: &Tensor) -> StageResult<(Tensor, Tensor)> {
        let _g = tch::no_grad_guard();
        let (_, decisions) = self.tok.select(features, self.tok.selection);
        let merged = self.tok.causal_encoder.forward(features, &decisions);
        Ok((decisions, merged))
    }
    fn understanding(&mut self, features: &Tensor) -> StageResult<Vec<Tensor>> {
        use tch::nn::Module;
        let _g = tch::no_grad_guard();
        let (_, decisions) = self.tok.select(features, self.tok.selection);
        let (merger, proj) = match &self.tok.understanding {
            Some(u) => (&u.causal_encoder, &u.vit_proj),
            None => (&self.tok.causal_encoder, &self.tok.vit_proj),
        };
        let updated = proj.forward(&merger.forward(features, &decisions)); // (B, N, H)
        let (kept, counts) = VisualTokenizer::gather_kept(&updated, &decisions); // (T, H)
        let mut out = Vec::with_capacity(counts.len());
        let mut pos = 0;
        for n in counts {
            out.push(kept.narrow(0, pos, n)); // (T_i, H)
            pos += n;
        }
        Ok(out)
    }
}

/// Quantizer stage: `encode_task_layer` + codebook (or a plugin codebook).
pub struct QuantizerReal {
    tok: VisualTokenizer,
    training: Option<QuantizerTraining>,
    train: bool,
}

/// What the Quantizer stage holds for stage-1 training: its optimiser (task layer, feature
/// decoder trunk, the codebook's own parameters), the lowres feature decoder that
/// reconstructs the patch features (stage 1's target; it is the first part of the Decoder
/// stage at inference, trained here with the codes it reads), and the last step's codes for
/// the codebook's post-step update (EMA).
struct QuantizerTraining {
    optim: StageOptim,
    _dec_vs: nn::VarStore,
    decoder: VQDecoder,
    last: Option<(Tensor, Tensor)>,
}

/// Kept positions of decisions [B, N] → (gather index [B, L], mask [B, L]), L ≥ 1.
fn kept_index(dec: &Tensor) -> (Tensor, Tensor) {
    let keep: Vec<Vec<i64>> = (0..dec.size()[0])
        .map(|b| {
            let row: Vec<f32> = Vec::try_from(dec.get(b).detach()).expect("decisions");
            row.iter()
                .enumerate()
                .filter(|(_, v)| **v > 0.5)
                .map(|(i, _)| i as i64)
                .collect()
        })
        .collect();
    let l = keep.iter().map(|v| v.len()).max().unwrap_or(0).max(1);
    let mut idx = Vec::new();
    let mut mask = Vec::new();
    for v in &keep {
        for j in 0..l {
            idx.push(*v.get(j).unwrap_or(&0));
            mask.push(if j < v.len() { 1f32 } else { 0. });
        }
    }
    let b = keep.len() as i64;
    (
        Tensor::from_slice(&idx)
            .reshape([b, l as i64])
            .to_device(dec.device()),
        Tensor::from_slice(&mask)
            .reshape([b, l as i64])
            .to_device(dec.device()),
    )
}

/// Stage-1 forward of the task layer, the codebook and the reconstruction: the kept merged
/// tokens through `encode_task_layer`, quantised with a straight-through estimator (or,
/// before quantised training starts, l2-normalised), scaled by the keep decisions (so the
/// selector gets the reconstruction's gradient), decoded by the feature decoder trunk and
/// compared with the patch features: loss terms `reconstruction` = mean(1 − cos) and
/// `commitment` (the codebook's loss).
impl Trainable for QuantizerReal {
    fn train_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        const K: StageKind = StageKind::Quantizer;
        need_train(self.train, K)?;
        let t = self.training.as_mut().ok_or_else(|| not_trainable(K))?;
        let feats = take(&mut batch, train_keys::PATCH_FEATURES, K)?;
        let dec = take(&mut batch, train_keys::DECISIONS, K)?;
        let merged = take(&mut batch, train_keys::MERGED, K)?;
        let quantize = scalar(&batch, train_keys::QUANTIZE, K)?.int64_value(&[]) != 0;
        if let Ok(lr) = scalar(&batch, train_keys::LR, K) {
            t.optim.lr = Some(lr.double_value(&[]));
        }
        let z = self.tok.encode_task_layer.forward(&merged); // (B, N, D)
        let (idx, mask) = kept_index(&dec);
        let d = z.size()[2];
        let z_sel = z.gather(1, &idx.unsqueeze(-1).expand([-1, -1, d], false), false); // (B, L, D)
        let dec_sel = dec.gather(1, &idx, false) * &mask; // (B, L)
        let keep = mask.gt(0.5);
        let z_flat = z_sel.masked_select(&keep.unsqueeze(-1)).reshape([-1, d]); // (T, D)
        let (codes_flat, qloss, ids) = if quantize {
            let q = self
                .tok
                .quantize
                .quantize_train(&z_flat)
                .map_err(|e| StageError::failed(K, format!("codebook: {e}")))?;
            (q.quantized, q.loss, Some(q.ids))
        } else {
            (
                l2norm(&z_flat),
                Tensor::zeros([], (Kind::Float, z.device())),
                None,
            )
        };
        let codes = z_sel
            .zeros_like()
            .masked_scatter(&keep.unsqueeze(-1), &codes_flat)
            * dec_sel.unsqueeze(-1); // (B, L, D): ST factor carries the selector's gradient
        let rec = t
            .decoder
            .trunk
            .decode_padded(&codes, &mask)
            .map_err(err(K))?; // (B, N, C)
        let cos = Tensor::cosine_similarity(&rec, &feats, -1, 1e-8); // (B, N)
        let rec_loss = (cos.neg() + 1.0).mean(Kind::Float);
        let z_flat = z_flat.detach();
        t.last = ids
            .as_ref()
            .map(|i| (z_flat.shallow_clone(), i.shallow_clone()));
        batch
            .losses
            .push((train_keys::LOSS_RECONSTRUCTION.into(), rec_loss));
        batch
            .losses
            .push((train_keys::LOSS_COMMITMENT.into(), qloss));
        batch
            .tensors
            .insert(train_keys::COS.into(), cos.mean(Kind::Float).detach());
        batch.tensors.insert(train_keys::DECISIONS.into(), dec);
        batch.tensors.insert(train_keys::CODES_Z.into(), z_flat);
        if let Some(ids) = ids {
            batch.tensors.insert(train_keys::IDS.into(), ids);
        }
        Ok(batch)
    }
    /// The optimiser step, then the codebook's update with the step's codes (EMA, restarts).
    fn optimizer_step(&mut self) -> StageResult<()> {
        const K: StageKind = StageKind::Quantizer;
        let t = self.training.as_mut().ok_or_else(|| not_trainable(K))?;
        t.optim.step(K)?;
        if let Some((z, ids)) = t.last.take() {
            self.tok
                .quantize
                .update(&z, &ids)
                .map_err(|e| StageError::failed(K, format!("codebook update: {e}")))?;
        }
        Ok(())
    }
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}
impl QuantizerStage for QuantizerReal {
    fn quantize(&mut self, merged: &Tensor, decisions: &Tensor) -> StageResult<Vec<Vec<i64>>> {
        let _g = tch::no_grad_guard();
        let (kept, counts) = VisualTokenizer::gather_kept(merged, decisions);
        let z = tch::nn::Module::forward(&self.tok.encode_task_layer, &kept);
        let ids = self
            .tok
            .quantize
            .quantize(&z)
            .map_err(|e| StageError::failed(StageKind::Quantizer, e))?;
        let off = self.tok.manifest.llm.visual_token_offset;
        let flat = Vec::<i64>::try_from(&ids.to_device(Device::Cpu))
            .map_err(|e| StageError::failed(StageKind::Quantizer, e))?;
        let mut out = Vec::with_capacity(counts.len());
        let mut pos = 0usize;
        for n in counts {
            out.push(
                flat[pos..pos + n as usize]
                    .iter()
                    .map(|i| i + off)
                    .collect(),
            );
            pos += n as usize;
        }
        Ok(out)
    }
}

/// Llm stage: serving through [`LlmStageModel`] (captions, image tokens) and, when built by
/// the stage-2 trainer, training the same model on the same thread and device
/// ([`crate::train::llm::LlmTrainer`]).
pub struct LlmReal {
    pub llm: LlmStageModel,
    pub train: Option<crate::train::llm::LlmTrainer>,
}

impl LlmReal {
    fn trainer(&mut self) -> StageResult<&mut crate::train::llm::LlmTrainer> {
        self.train
            .as_mut()
            .ok_or_else(|| StageError::Invalid("this Llm stage was not built for training".into()))
    }
}

impl Trainable for LlmReal {
    fn train_forward(&mut self, batch: TrainBatch) -> StageResult<TrainBatch> {
        let t = self.train.as_ref().ok_or_else(|| {
            StageError::Invalid("this Llm stage was not built for training".into())
        })?;
        t.forward(&self.llm, batch)
    }
    fn optimizer_step(&mut self) -> StageResult<()> {
        Err(StageError::Invalid(
            "the Llm stage steps under the trainer's control (OptimizerStepWith)".into(),
        ))
    }
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        self.trainer()?.step(ctl)
    }
    fn train_state(&mut self) -> StageResult<TrainParts> {
        let t = self.train.as_ref().ok_or_else(|| {
            StageError::Invalid("this Llm stage was not built for training".into())
        })?;
        t.state(&self.llm)
    }
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        let llm = &self.llm;
        match self.train.as_mut() {
            Some(t) => t.load(llm, parts),
            None => Err(StageError::Invalid(
                "this Llm stage was not built for training".into(),
            )),
        }
    }
}

impl LlmStage for LlmReal {
    fn caption(
        &mut self,
        prefix: &Tensor,
        prompt: &str,
        opts: &CaptionOptions,
        on_token: &mut dyn FnMut(i64, &str) -> bool,
    ) -> StageResult<Vec<i64>> {
        let _g = tch::no_grad_guard();
        self.llm.caption(prefix, prompt, opts, on_token)
    }
    fn decode_text(&mut self, ids: &[i64]) -> StageResult<String> {
        self.llm.decode_text(ids)
    }
    fn caption_prompt_len(&mut self, prefix: &Tensor, prompt: &str) -> Option<usize> {
        self.llm.caption_prompt_len(prefix, prompt)
    }
    fn image_tokens(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        let _g = tch::no_grad_guard();
        self.llm.image_tokens(prompt, opts, should_stop)
    }
}

/// Decoder stage: feature decoder (highres or lowres) + U-Net + VAE + scheduler; when built
/// by the stage-1b trainer, the same [`PixelDecoder`] trains on this thread and device
/// ([`crate::train::decoder::DecoderTrainer`]).
pub struct DecoderReal {
    /// The feature decoders (serving; a training-only stage has none).
    tok: Option<VisualTokenizer>,
    pub pixels: PixelDecoder,
    resolution: Resolution,
    pub train: Option<crate::train::decoder::DecoderTrainer>,
}

impl DecoderReal {
    /// A Decoder stage that trains `pixels` (its U-Net) with `train`.
    pub fn for_training(
        pixels: PixelDecoder,
        train: crate::train::decoder::DecoderTrainer,
    ) -> Self {
        DecoderReal {
            tok: None,
            resolution: pixels.resolution,
            pixels,
            train: Some(train),
        }
    }
}

fn not_training() -> StageError {
    StageError::Invalid("this Decoder stage was not built for training".into())
}

impl Trainable for DecoderReal {
    fn train_forward(&mut self, batch: TrainBatch) -> StageResult<TrainBatch> {
        let t = self.train.as_ref().ok_or_else(not_training)?;
        t.forward(&self.pixels, batch)
    }
    fn optimizer_step(&mut self) -> StageResult<()> {
        Err(StageError::Invalid(
            "the Decoder stage steps under the trainer's control (OptimizerStepWith)".into(),
        ))
    }
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        let pixels = &self.pixels;
        self.train
            .as_mut()
            .ok_or_else(not_training)?
            .step(pixels, ctl)
    }
    fn train_state(&mut self) -> StageResult<TrainParts> {
        self.train
            .as_ref()
            .ok_or_else(not_training)?
            .state(&self.pixels)
    }
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        let pixels = &self.pixels;
        self.train
            .as_mut()
            .ok_or_else(not_training)?
            .load(pixels, parts)
    }
}

impl DecoderStage for DecoderReal {
    fn decode(
        &mut self,
        ids: &[Vec<i64>],
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Tensor> {
        let e = err(StageKind::Decoder);
        if ids.iter().any(Vec::is_empty) {
            return Err(StageError::Invalid("an image without visual tokens".into()));
        }
        let tok = self.tok.as_ref().ok_or_else(|| {
            StageError::Invalid("this Decoder stage has no feature decoder".into())
        })?;
        let cond = match self.resolution {
            Resolution::Highres => {
                let (prompt_embeds, pooled_embeds) = tok.decode_highres(ids).map_err(&e)?;
                Condition::Highres {
                    prompt_embeds,
                    pooled_embeds,
                }
            }
            Resolution::Lowres => Condition::Lowres {
                hidden: tok.decode_lowres(ids).map_err(&e)?,
            },
        };
        if should_stop() {
            return Err(StageError::Cancelled);
        }
        let dopts = DecodeOptions {
            steps: opts.steps,
            guidance: opts.guidance,
            height: Some(opts.height as i64),
            width: Some(opts.width as i64),
            seed: Some(opts.seed as i64),
            ..DecodeOptions::default()
        };
        // One `should_stop` call per diffusion step.
        self.pixels
            .decode_with(&cond, &dopts, should_stop)
            .map_err(&e)
    }
}

/// Builders for the five real stages of the checkpoint in `dir` (each loads its weights on its
/// own thread and device), with the backbone and codebook `plugins` names. With
/// `tokenizer_only` the Llm and Decoder stages are [`Absent`] (a stage-1 export has neither).
pub fn builders(
    dir: &Path,
    plugins: &TokenizerPlugins,
    tokenizer_only: bool,
) -> anyhow::Result<(StageBuilders, ModelInfo)> {
    let m = LavitManifest::for_checkpoint(dir)?;
    if plugins.config().backbone.is_none() {
        resolve_file(dir, files::EVA)?;
    }
    // Read once, shared by the Encoder, SelectorMerger, Quantizer and Decoder builders.
    let enc_state = SharedState::load(&resolve_file(dir, files::TOKENIZER_ENCODER)?)?;
    let resolution = if dir.join(Resolution::Highres.folder()).is_dir() {
        Resolution::Highres
    } else {
        Resolution::Lowres
    };
    let native = if tokenizer_only {
        (m.tokenizer.img_size as usize, m.tokenizer.img_size as usize)
    } else {
        native_size(dir, resolution)?
    };
    let info = ModelInfo {
        image_size: m.tokenizer.img_size,
        default_size: native,
    };
    let d: PathBuf = dir.to_path_buf();
    let (d1, d2, d3, d4, d5) = (d.clone(), d.clone(), d.clone(), d.clone(), d);
    let (p1, p2, p3, p5) = (
        plugins.clone(),
        plugins.clone(),
        plugins.clone(),
        plugins.clone(),
    );
    let (s1, s2, s3, s5) = (
        enc_state.clone(),
        enc_state.clone(),
        enc_state.clone(),
        enc_state,
    );
    let llm: lavit_runtime::actors::Builder<Box<dyn LlmStage>> = if tokenizer_only {
        Box::new(|_| Ok(Box::new(Absent(StageKind::Llm)) as Box<dyn LlmStage>))
    } else {
        Box::new(move |dev| {
            Ok(Box::new(LlmReal {
                llm: LlmStageModel::load(&d4, dev)?,
                train: None,
            }) as Box<dyn LlmStage>)
        })
    };
    let decoder: lavit_runtime::actors::Builder<Box<dyn DecoderStage>> = if tokenizer_only {
        Box::new(|_| Ok(Box::new(Absent(StageKind::Decoder)) as Box<dyn DecoderStage>))
    } else {
        Box::new(move |dev| {
            let parts = LoadParts {
                highres_decoder: resolution == Resolution::Highres,
                lowres_decoder: resolution == Resolution::Lowres,
                ..LoadParts::tokenize_only()
            };
            let tok = tokenizer_without_encoder(&d5, dev, parts, &p5, &s5)?;
            let pixels = PixelDecoder::load(&d5, resolution, dev)?;
            Ok(Box::new(DecoderReal {
                tok: Some(tok),
                pixels,
                resolution,
                train: None,
            }) as Box<dyn DecoderStage>)
        })
    };
    let builders = StageBuilders {
        encoder: Box::new(move |dev| {
            let tok = VisualTokenizer::load_with_state(
                &d1,
                dev,
                LoadParts::tokenize_only(),
                &p1,
                s1.get(),
                s1.source(),
            )?;
            Ok(Box::new(EncoderReal { tok, train: false }) as Box<dyn EncoderStage>)
        }),
        selector_merger: Box::new(move |dev| {
            let parts = LoadParts {
                understanding: resolve_file(&d2, files::VISUAL_WEIGHT).is_ok(),
                ..LoadParts::tokenize_only()
            };
            let tok = tokenizer_without_encoder(&d2, dev, parts, &p2, &s2)?;
            Ok(Box::new(SelectorMergerReal {
                tok,
                training: None,
                train: false,
            }) as Box<dyn SelectorMergerStage>)
        }),
        quantizer: Box::new(move |dev| {
            let tok = tokenizer_without_encoder(&d3, dev, LoadParts::tokenize_only(), &p3, &s3)?;
            Ok(Box::new(QuantizerReal {
                tok,
                training: None,
                train: false,
            }) as Box<dyn QuantizerStage>)
        }),
        llm,
        decoder,
    };
    Ok((builders, info))
}

/// A stage this graph does not have (the LLM and the decoder of a tokenizer-only pipeline or
/// of stage-1 training): every call is refused with a clear error.
pub struct Absent(pub StageKind);

impl Absent {
    fn refuse<T>(&self) -> StageResult<T> {
        Err(StageError::Invalid(format!(
            "this pipeline has no {} stage (tokenizer stages only)",
            self.0
        )))
    }
}
impl Trainable for Absent {}
impl LlmStage for Absent {
    fn caption(
        &mut self,
        _prefix: &Tensor,
        _prompt: &str,
        _opts: &CaptionOptions,
        _on_token: &mut dyn FnMut(i64, &str) -> bool,
    ) -> StageResult<Vec<i64>> {
        self.refuse()
    }
    fn decode_text(&mut self, _ids: &[i64]) -> StageResult<String> {
        self.refuse()
    }
    fn image_tokens(
        &mut self,
        _prompt: &str,
        _opts: &GenerateOptions,
        _should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        self.refuse()
    }
}
impl DecoderStage for Absent {
    fn decode(
        &mut self,
        _ids: &[Vec<i64>],
        _opts: &GenerateOptions,
        _should_stop: ShouldStop,
    ) -> StageResult<Tensor> {
        self.refuse()
    }
}

// ---------------------------------------------------------------------------------------------
// Stage-1 training through the tokenizer stages.

/// Names of the tensors and loss terms a stage-1 [`TrainBatch`] carries between the stages.
pub mod train_keys {
    /// In (Encoder): images (B, 3, S, S), CLIP-normalised.
    pub const IMAGES: &str = "images";
    /// Encoder → SelectorMerger → Quantizer: patch features (B, N, C), no grad (frozen).
    pub const PATCH_FEATURES: &str = "patch_features";
    /// In (SelectorMerger): the step's Gumbel seed (0-d int64, the u64's bits).
    pub const GUMBEL_SEED: &str = "gumbel_seed";
    /// In (SelectorMerger): the Gumbel temperature (0-d double).
    pub const TAU: &str = "tau";
    /// In (Quantizer): 1 = quantise with the codebook, 0 = l2-normalised codes (0-d int64).
    pub const QUANTIZE: &str = "quantize";
    /// In (optional): the learning rate of the optimiser step that follows (0-d double).
    pub const LR: &str = "lr";
    /// SelectorMerger → Quantizer → out: keep decisions (B, N), hard, with grad.
    pub const DECISIONS: &str = "decisions";
    /// SelectorMerger → Quantizer: merged features (B, N, C), with grad.
    pub const MERGED: &str = "merged";
    /// Out (Quantizer): mean cosine of reconstruction and features (0-d, no grad).
    pub const COS: &str = "cos";
    /// Out (Quantizer): the kept tokens' codes before quantisation (T, D), no grad.
    pub const CODES_Z: &str = "codes_z";
    /// Out (Quantizer, when quantising): code ids (T,).
    pub const IDS: &str = "ids";
    /// Loss terms: reconstruction (Quantizer), kept ratio and confidence (SelectorMerger),
    /// codebook/commitment (Quantizer).
    pub const LOSS_RECONSTRUCTION: &str = "reconstruction";
    pub const LOSS_RATIO: &str = "ratio";
    pub const LOSS_CONFIDENCE: &str = "confidence";
    pub const LOSS_COMMITMENT: &str = "commitment";
}

fn take(batch: &mut TrainBatch, key: &str, kind: StageKind) -> StageResult<Tensor> {
    batch.tensors.remove(key).ok_or_else(|| {
        StageError::Invalid(format!("stage {kind}: the training batch has no `{key}`"))
    })
}

fn scalar<'a>(batch: &'a TrainBatch, key: &str, kind: StageKind) -> StageResult<&'a Tensor> {
    batch.tensors.get(key).ok_or_else(|| {
        StageError::Invalid(format!("stage {kind}: the training batch has no `{key}`"))
    })
}

fn need_train(train: bool, kind: StageKind) -> StageResult<()> {
    if train {
        Ok(())
    } else {
        Err(StageError::Invalid(format!(
            "stage {kind} is in inference mode (send SetTrain(true) before training batches)"
        )))
    }
}

fn not_trainable(kind: StageKind) -> StageError {
    StageError::Invalid(format!("stage {kind} was not built for training"))
}

/// Stage-1 loss weights the SelectorMerger stage applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage1Loss {
    /// Target kept ratio ρ and its weight λ.
    pub rho: f64,
    pub lambda: f64,
    /// Weight of the selector's mean binary entropy.
    pub confidence_weight: f64,
}

/// A stage's optimiser, shared with the trainer (which saves, restores and clips the
/// gradients between steps), and the learning rate the last training batch named.
struct StageOptim {
    opt: Arc<Mutex<AdamW>>,
    lr: Option<f64>,
}

impl StageOptim {
    fn step(&mut self, kind: StageKind) -> StageResult<()> {
        let lr = self.lr.ok_or_else(|| {
            StageError::Invalid(format!(
                "stage {kind}: optimiser step without a learning rate (the training batch names none)"
            ))
        })?;
        let mut opt = self.opt.lock().unwrap_or_else(|e| e.into_inner());
        opt.step(lr).map_err(|e| StageError::failed(kind, e))?;
        opt.zero_grad();
        Ok(())
    }
}

/// What the stage-1 stages are built from (see [`stage1_builders`]).
pub struct Stage1Spec {
    /// Sizes of every part.
    pub manifest: LavitManifest,
    /// The frozen backbone (runs on the device it was built on).
    pub backbone: Box<dyn Backbone>,
    /// A plugin codebook; `None`: the built-in l2 VQ with EMA updates, built on the
    /// Quantizer stage's device.
    pub codebook: Option<Box<dyn Codebook>>,
    /// The built-in codebook's EMA settings, commitment weight and k-means iterations.
    pub ema: EmaConfig,
    pub beta: f64,
    pub kmeans_iters: usize,
    /// Seed of the initial weights (`init_weights`: the tokenizer with `seed`, the decoder
    /// with `seed ^ 0xdec`).
    pub seed: u64,
    pub loss: Stage1Loss,
    pub adamw: AdamWConfig,
}

/// What a stage-1 stage hands back to the trainer when it is built: shallow handles on its
/// state (the same tensors the stage trains), for checkpoints, resume and the final model.
pub enum Stage1Handle {
    Encoder {
        backbone: SharedBackbone,
    },
    SelectorMerger {
        /// Every variable of the stage's tokenizer (`token_predictor.*`, `causal_encoder.*`
        /// are the ones it trains).
        vars: Vec<(String, Tensor)>,
        optimizer: Arc<Mutex<AdamW>>,
    },
    Quantizer {
        /// Every variable of the stage's tokenizer (`encode_task_layer.*` is trained here).
        vars: Vec<(String, Tensor)>,
        /// The lowres feature decoder's variables.
        decoder_vars: Vec<(String, Tensor)>,
        optimizer: Arc<Mutex<AdamW>>,
        codebook: SharedCodebook,
    },
}

/// Variable-name prefixes of the tokenizer that the SelectorMerger stage trains (the
/// Quantizer trains `encode_task_layer`; `vit_proj` is not trained in stage 1).
pub const SELECTOR_PREFIXES: [&str; 2] = ["token_predictor", "causal_encoder"];

fn sorted_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn prefixed(prefix: &str, v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter()
        .map(|(n, t)| (format!("{prefix}{n}"), t))
        .collect()
}

fn stage1_adamw(params: Vec<(String, Tensor)>, cfg: &AdamWConfig) -> lavit_runtime::Result<AdamW> {
    Ok(AdamW::new(params, cfg.clone())?.no_decay(|n| {
        lavit_runtime::train::is_no_decay(n) || n.ends_with("_embed") || n.starts_with("codebook.")
    }))
}

/// Builders of the stage graph stage 1 trains through: the real Encoder, SelectorMerger and
/// Quantizer adapters built for training (random weights from `spec.seed`), the Llm and
/// Decoder [`Absent`]. Each stage sends its [`Stage1Handle`] on the returned channel when it
/// is built (so after `StageGraph::spawn` returns all three are there).
pub fn stage1_builders(
    spec: Stage1Spec,
) -> (StageBuilders, std::sync::mpsc::Receiver<Stage1Handle>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let Stage1Spec {
        manifest,
        backbone,
        codebook,
        ema,
        beta,
        kmeans_iters,
        seed,
        loss,
        adamw,
    } = spec;
    let (m1, m2, m3) = (manifest.clone(), manifest.clone(), manifest);
    let (tx1, tx2, tx3) = (tx.clone(), tx.clone(), tx);
    let adamw2 = adamw.clone();
    let builders = StageBuilders {
        encoder: Box::new(move |dev| {
            let backbone = SharedBackbone::new(backbone);
            let tok = VisualTokenizer::with_parts(
                &m1,
                dev,
                Box::new(backbone.clone()),
                Box::new(NoCodebook::of(&m1)),
            )?;
            let _ = tx1.send(Stage1Handle::Encoder { backbone });
            Ok(Box::new(EncoderReal { tok, train: false }) as Box<dyn EncoderStage>)
        }),
        selector_merger: Box::new(move |dev| {
            let tok = VisualTokenizer::with_parts(
                &m2,
                dev,
                Box::new(NoBackbone::of(&m2)),
                Box::new(NoCodebook::of(&m2)),
            )?;
            crate::train::tokenizer::init_weights(&tok.vs, seed);
            let params = lavit_runtime::train::trainable_variables(&tok.vs, |n| {
                SELECTOR_PREFIXES.iter().any(|p| n.starts_with(p))
            });
            let opt = Arc::new(Mutex::new(stage1_adamw(
                prefixed("tokenizer.", params),
                &adamw,
            )?));
            let _ = tx2.send(Stage1Handle::SelectorMerger {
                vars: sorted_vars(&tok.vs),
                optimizer: opt.clone(),
            });
            Ok(Box::new(SelectorMergerReal {
                tok,
                training: Some(SelectorTraining {
                    optim: StageOptim { opt, lr: None },
                    loss,
                }),
                train: false,
            }) as Box<dyn SelectorMergerStage>)
        }),
        quantizer: Box::new(move |dev| {
            let t = &m3.tokenizer;
            let codebook: Box<dyn Codebook> = match codebook {
                Some(c) => c,
                None => {
                    let mut vq = VectorQuantizer::new(t.n_code, t.code_dim, dev).with_ema(ema);
                    vq.beta = beta;
                    vq.kmeans_iters = kmeans_iters;
                    Box::new(vq)
                }
            };
            let codebook = SharedCodebook::new(codebook);
            let tok = VisualTokenizer::with_parts(
                &m3,
                dev,
                Box::new(NoBackbone::of(&m3)),
                Box::new(codebook.clone()),
            )?;
            crate::train::tokenizer::init_weights(&tok.vs, seed);
            let dec_vs = nn::VarStore::new(dev);
            let decoder = VQDecoder::new(
                dec_vs.root(),
                &FeatureDecoderConfig::from_manifest(&m3.feature_decoder),
            );
            crate::train::tokenizer::init_weights(&dec_vs, seed ^ 0xdec);
            let mut params = prefixed(
                "tokenizer.",
                lavit_runtime::train::trainable_variables(&tok.vs, |n| {
                    n.starts_with("encode_task_layer")
                }),
            );
            params.extend(prefixed(
                "decoder.",
                lavit_runtime::train::trainable_variables(&dec_vs, |n| !n.starts_with("unet_proj")),
            ));
            params.extend(
                codebook
                    .trainable_parameters()
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| (format!("codebook.{i}"), p)),
            );
            let opt = Arc::new(Mutex::new(stage1_adamw(params, &adamw2)?));
            let _ = tx3.send(Stage1Handle::Quantizer {
                vars: sorted_vars(&tok.vs),
                decoder_vars: sorted_vars(&dec_vs),
                optimizer: opt.clone(),
                codebook,
            });
            Ok(Box::new(QuantizerReal {
                tok,
                training: Some(QuantizerTraining {
                    optim: StageOptim { opt, lr: None },
                    _dec_vs: dec_vs,
                    decoder,
                    last: None,
                }),
                train: false,
            }) as Box<dyn QuantizerStage>)
        }),
        llm: Box::new(|_| Ok(Box::new(Absent(StageKind::Llm)) as Box<dyn LlmStage>)),
        decoder: Box::new(|_| Ok(Box::new(Absent(StageKind::Decoder)) as Box<dyn DecoderStage>)),
    };
    (builders, rx)
}

/// The decoder's native output size (width, height) from its configs (no weights loaded):
/// U-Net `sample_size` × the VAE's downscale (2^(len(block_out_channels) − 1); 1 without a VAE).
fn native_size(dir: &Path, resolution: Resolution) -> anyhow::Result<(usize, usize)> {
    let folder = dir.join(resolution.folder());
    let read = |p: PathBuf| -> anyhow::Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let unet = read(folder.join("unet/config.json"))?;
    let sample = match &unet["sample_size"] {
        serde_json::Value::Array(a) => a.first().and_then(|v| v.as_u64()),
        v => v.as_u64(),
    }
    .ok_or_else(|| anyhow::anyhow!("{}: unet/config.json has no sample_size", folder.display()))?;
    let vae = folder.join("vae/config.json");
    let scale = if vae.exists() {
        let n = read(vae)?["block_out_channels"]
            .as_array()
            .map_or(1, Vec::len);
        1u64 << n.saturating_sub(1)
    } else {
        1
    };
    let side = (sample * scale) as usize;
    Ok((side, side))
}

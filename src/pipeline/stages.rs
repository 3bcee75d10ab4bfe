//! The real stages of a LaVIT checkpoint folder as [`lavit_runtime::stage`] implementations:
//! thin adapters over [`crate::tokenizer::VisualTokenizer`] (EVA encoder, selector + merger,
//! quantizer, feature decoders), [`lavit_llm::actor::LlmStageModel`] and
//! [`crate::generate::PixelDecoder`]. Each builder runs on its stage's own thread and loads
//! only what that stage needs onto the stage's device.
//!
//! The SelectorMerger, Quantizer and Decoder stages each hold a `VisualTokenizer` without the
//! EVA encoder (a [`NoBackbone`] stands in). `tokenizer_encoder` (selector/merger weights, task
//! layer + codebook) is read from disk once per pipeline ([`SharedState`]); each stage copies
//! the tensors onto its own device.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lavit_llm::actor::LlmStageModel;
use lavit_plugin_api::{Backbone, PluginResult};
use lavit_runtime::actors::StageBuilders;
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{
    CaptionOptions, GenerateOptions, StepControl, StepReport, TrainBatch, TrainParts,
};
use lavit_runtime::stage::*;
use tch::{Device, Tensor};

use super::ModelInfo;
use crate::generate::{Condition, DecodeOptions, PixelDecoder, Resolution};
use crate::tokenizer::{files, resolve_file, LoadParts, VisualTokenizer};

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

fn tokenizer_without_encoder(
    dir: &Path,
    device: Device,
    parts: LoadParts,
    enc: &SharedState,
) -> lavit_runtime::Result<VisualTokenizer> {
    let m = LavitManifest::for_checkpoint(dir)?;
    let none = NoBackbone {
        image_size: m.tokenizer.img_size,
        patch_size: m.tokenizer.patch_size,
        width: m.tokenizer.encoder_width,
    };
    VisualTokenizer::from_checkpoint_with_state(
        dir,
        device,
        parts,
        Box::new(none),
        enc.get(),
        enc.source(),
    )
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
}
impl Trainable for EncoderReal {}
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
}
impl Trainable for SelectorMergerReal {}
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
}
impl Trainable for QuantizerReal {}
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
/// own thread and device).
pub fn builders(dir: &Path) -> anyhow::Result<(StageBuilders, ModelInfo)> {
    let m = LavitManifest::for_checkpoint(dir)?;
    let eva_path = resolve_file(dir, files::EVA)?;
    // Read once, shared by the Encoder, SelectorMerger, Quantizer and Decoder builders.
    let enc_state = SharedState::load(&resolve_file(dir, files::TOKENIZER_ENCODER)?)?;
    let resolution = if dir.join(Resolution::Highres.folder()).is_dir() {
        Resolution::Highres
    } else {
        Resolution::Lowres
    };
    let native = native_size(dir, resolution)?;
    let info = ModelInfo {
        image_size: m.tokenizer.img_size,
        default_size: native,
    };
    let d: PathBuf = dir.to_path_buf();
    let (d1, d2, d3, d4, d5) = (d.clone(), d.clone(), d.clone(), d.clone(), d);
    let (s1, s2, s3, s5) = (
        enc_state.clone(),
        enc_state.clone(),
        enc_state.clone(),
        enc_state,
    );
    let builders = StageBuilders {
        encoder: Box::new(move |dev| {
            let eva_cfg = lavit_encoder::eva_vit::EvaVitConfig::from_manifest(
                &LavitManifest::for_checkpoint(&d1)?.tokenizer,
            );
            let eva = lavit_encoder::eva_vit::EvaBackbone::load(&eva_path, &eva_cfg, dev)?;
            let tok = VisualTokenizer::from_checkpoint_with_state(
                &d1,
                dev,
                LoadParts::tokenize_only(),
                Box::new(eva),
                s1.get(),
                s1.source(),
            )?;
            Ok(Box::new(EncoderReal { tok }) as Box<dyn EncoderStage>)
        }),
        selector_merger: Box::new(move |dev| {
            let parts = LoadParts {
                understanding: resolve_file(&d2, files::VISUAL_WEIGHT).is_ok(),
                ..LoadParts::tokenize_only()
            };
            let tok = tokenizer_without_encoder(&d2, dev, parts, &s2)?;
            Ok(Box::new(SelectorMergerReal { tok }) as Box<dyn SelectorMergerStage>)
        }),
        quantizer: Box::new(move |dev| {
            let tok = tokenizer_without_encoder(&d3, dev, LoadParts::tokenize_only(), &s3)?;
            Ok(Box::new(QuantizerReal { tok }) as Box<dyn QuantizerStage>)
        }),
        llm: Box::new(move |dev| {
            Ok(Box::new(LlmReal {
                llm: LlmStageModel::load(&d4, dev)?,
                train: None,
            }) as Box<dyn LlmStage>)
        }),
        decoder: Box::new(move |dev| {
            let parts = LoadParts {
                highres_decoder: resolution == Resolution::Highres,
                lowres_decoder: resolution == Resolution::Lowres,
                ..LoadParts::tokenize_only()
            };
            let tok = tokenizer_without_encoder(&d5, dev, parts, &s5)?;
            let pixels = PixelDecoder::load(&d5, resolution, dev)?;
            Ok(Box::new(DecoderReal {
                tok: Some(tok),
                pixels,
                resolution,
                train: None,
            }) as Box<dyn DecoderStage>)
        }),
    };
    Ok((builders, info))
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

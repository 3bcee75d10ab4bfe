//! The Decoder stage: visual ids → the feature decoder (`VQDecoder` for the lowres pixel
//! decoder, `HighresVQDecoder` for the highres one) → the diffusion U-Net → the VAE → pixels,
//! as a [`lavit_runtime::stage::DecoderStage`]. It owns the feature decoder and the pixel
//! decoder, and a read-only copy of the codebook table that turns the ids it receives into
//! code vectors (the Quantizer stage owns and trains the codebook).
//!
//! It trains in two of LaVIT's stages:
//! - stage 1 ([`DecoderStageModel::for_stage1`]): the lowres feature decoder reconstructs
//!   the patch features from the Quantizer stage's codes; loss term `reconstruction` =
//!   mean(1 − cos);
//! - stage 1b ([`DecoderStageModel::for_training`]): the U-Net, through [`DecoderTrainer`].

use std::path::Path;

use lavit_plugin_api::Codebook;
use lavit_runtime::layout::{files, resolve_file};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{
    train_keys, GenerateOptions, StepControl, StepReport, TrainBatch, TrainParts,
};
use lavit_runtime::stage::{
    DecoderStage, ShouldStop, StageError, StageKind, StageResult, Trainable,
};
use lavit_runtime::train::{need_train, not_trainable, StageOptim};
use lavit_runtime::{Error, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::feature_decoder::{FeatureDecoderConfig, HighresVQDecoder, VQDecoder};
use crate::pixel_decoder::{Condition, DecodeOptions, FeatureDecoders, PixelDecoder, Resolution};
use crate::train::DecoderTrainer;

const K: StageKind = StageKind::Decoder;

/// The Decoder stage's model.
pub struct DecoderStageModel {
    /// Read-only codebook: visual ids → code vectors.
    codebook: Option<Box<dyn Codebook>>,
    visual_token_offset: i64,
    pub lowres: Option<(nn::VarStore, VQDecoder)>,
    pub highres: Option<(nn::VarStore, HighresVQDecoder)>,
    pub pixels: Option<PixelDecoder>,
    /// Stage 1b: the U-Net's training state.
    pub train: Option<DecoderTrainer>,
    /// Stage 1: the feature decoder's optimiser.
    stage1: Option<StageOptim>,
    train_mode: bool,
}

fn stage_err(e: Error) -> StageError {
    StageError::from_error(K, e)
}

impl DecoderStageModel {
    /// The checkpoint's decoder for `resolution`: its feature decoder (frozen) and pixel
    /// decoder, their weights in `kind` but the VAE's (float32, as the official code
    /// upcasts it), around `codebook` (the checkpoint's, see `lavit_quantizer::load_codebook`).
    pub fn load(
        dir: &Path,
        device: Device,
        codebook: Box<dyn Codebook>,
        resolution: Resolution,
        kind: Kind,
    ) -> Result<Self> {
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let dcfg = FeatureDecoderConfig::from_manifest(&manifest.feature_decoder);
        let mut me = Self::empty(manifest.llm.visual_token_offset);
        me.codebook = Some(codebook);
        match resolution {
            Resolution::Lowres => {
                let (mut vs, m) = VQDecoder::load(
                    &resolve_file(dir, files::LOWRES_DECODER)?,
                    &dcfg,
                    device,
                    kind,
                )?;
                vs.freeze();
                me.lowres = Some((vs, m));
            }
            Resolution::Highres => {
                let (mut vs, m) = HighresVQDecoder::load(
                    &resolve_file(dir, files::HIGHRES_DECODER)?,
                    &dcfg,
                    device,
                    kind,
                )?;
                vs.freeze();
                me.highres = Some((vs, m));
            }
        }
        me.pixels = Some(PixelDecoder::load(dir, resolution, device, kind)?);
        Ok(me)
    }

    fn empty(visual_token_offset: i64) -> Self {
        DecoderStageModel {
            codebook: None,
            visual_token_offset,
            lowres: None,
            highres: None,
            pixels: None,
            train: None,
            stage1: None,
            train_mode: false,
        }
    }

    /// A Decoder stage that trains `pixels` (its U-Net) with `train` (stage 1b).
    pub fn for_training(pixels: PixelDecoder, train: DecoderTrainer) -> Self {
        let mut me = Self::empty(0);
        me.pixels = Some(pixels);
        me.train = Some(train);
        me
    }

    /// A Decoder stage that trains a new lowres feature decoder `decoder` (its variables in
    /// `vs`, the optimiser in `optim`) to reconstruct patch features (stage 1).
    pub fn for_stage1(
        manifest: &LavitManifest,
        vs: nn::VarStore,
        decoder: VQDecoder,
        optim: StageOptim,
    ) -> Self {
        let mut me = Self::empty(manifest.llm.visual_token_offset);
        me.lowres = Some((vs, decoder));
        me.stage1 = Some(optim);
        me
    }

    /// Visual ids (with the LLM offset) of several images → (code vectors [T, D], counts).
    pub fn embed_ids(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Vec<i64>)> {
        let codebook = self
            .codebook
            .as_ref()
            .ok_or_else(|| Error::invalid("this Decoder stage has no codebook"))?;
        embed_visual_ids(
            codebook.as_ref(),
            self.visual_token_offset,
            ids,
            self.device(),
        )
    }

    fn device(&self) -> Device {
        match (&self.lowres, &self.highres, &self.pixels) {
            (Some((vs, _)), _, _) | (None, Some((vs, _)), _) => vs.device(),
            (None, None, Some(p)) => p.device,
            _ => Device::Cpu,
        }
    }

    fn pixels(&self) -> StageResult<&PixelDecoder> {
        self.pixels
            .as_ref()
            .ok_or_else(|| StageError::Invalid("this Decoder stage has no pixel decoder".into()))
    }

    fn stage1_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        let feats = batch.take(train_keys::PATCH_FEATURES, K)?;
        let codes = batch.take(train_keys::CODES, K)?;
        let mask = batch.take(train_keys::CODES_MASK, K)?;
        let (_, decoder) = self.lowres.as_ref().ok_or_else(|| not_trainable(K))?;
        let dev = self.device();
        let rec = decoder
            .trunk
            .decode_padded(&codes.to_device(dev), &mask.to_device(dev))
            .map_err(stage_err)?; // (B, N, C)
        let cos = Tensor::cosine_similarity(&rec, &feats.to_device(dev), -1, 1e-8); // (B, N)
        let rec_loss = (cos.neg() + 1.0).mean(Kind::Float);
        batch
            .losses
            .push((train_keys::LOSS_RECONSTRUCTION, rec_loss));
        batch
            .tensors
            .insert(train_keys::COS, cos.mean(Kind::Float).detach());
        Ok(batch)
    }
}

/// Visual ids (with the LLM offset `off`) of several images → (code vectors [T, D] on
/// `device`, counts). Ids outside the codebook's range are refused.
pub fn embed_visual_ids(
    codebook: &dyn Codebook,
    off: i64,
    ids: &[Vec<i64>],
    device: Device,
) -> Result<(Tensor, Vec<i64>)> {
    let k = codebook.num_codes();
    let mut flat = Vec::new();
    for (i, v) in ids.iter().enumerate() {
        for &id in v {
            if id < off || id >= off + k {
                return Err(Error::invalid(format!(
                    "image {i}: id {id} is not a visual id (valid: {off}..{})",
                    off + k
                )));
            }
            flat.push(id - off);
        }
    }
    let counts = ids.iter().map(|v| v.len() as i64).collect();
    let t = Tensor::from_slice(&flat).to_device(device);
    let e = codebook
        .embed(&t)
        .map_err(|e| Error::invalid(format!("codebook: {e}")))?;
    Ok((e.to_device(device), counts))
}

impl FeatureDecoders for DecoderStageModel {
    fn decode_lowres(&self, ids: &[Vec<i64>]) -> Result<Tensor> {
        let (_, dec) = self
            .lowres
            .as_ref()
            .ok_or_else(|| Error::invalid("the lowres feature decoder is not loaded"))?;
        let (e, counts) = self.embed_ids(ids)?;
        let _g = tch::no_grad_guard();
        dec.forward(&e, &counts)
    }
    fn decode_highres(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        let (_, dec) = self
            .highres
            .as_ref()
            .ok_or_else(|| Error::invalid("the highres feature decoder is not loaded"))?;
        let (e, counts) = self.embed_ids(ids)?;
        let _g = tch::no_grad_guard();
        dec.forward(&e, &counts)
    }
}

/// The checkpoint part of stage 1's feature decoder.
const STAGE1_PART: &str = "decoder";

impl DecoderStageModel {
    /// Stage 1's feature decoder variables, sorted by name.
    fn stage1_vars(&self) -> StageResult<Vec<(String, Tensor)>> {
        let (vs, _) = self.lowres.as_ref().ok_or_else(|| not_trainable(K))?;
        Ok(lavit_runtime::train::sorted_vars(vs))
    }
}

fn not_training() -> StageError {
    StageError::Invalid("this Decoder stage was not built for training".into())
}

impl Trainable for DecoderStageModel {
    fn train_forward(&mut self, batch: TrainBatch) -> StageResult<TrainBatch> {
        if self.stage1.is_some() {
            need_train(self.train_mode, K)?;
            return self.stage1_forward(batch);
        }
        let t = self.train.as_ref().ok_or_else(not_training)?;
        t.forward(self.pixels()?, batch)
    }
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        if let Some(o) = self.stage1.as_mut() {
            return o.step_with(K, ctl);
        }
        let pixels = self.pixels.as_ref().ok_or_else(not_training)?;
        self.train
            .as_mut()
            .ok_or_else(not_training)?
            .step(pixels, ctl)
    }
    fn trained_params(&mut self) -> StageResult<Vec<(String, Tensor)>> {
        if let Some(o) = self.stage1.as_ref() {
            return Ok(o.params());
        }
        Ok(self.train.as_ref().ok_or_else(not_training)?.params())
    }
    /// Stage 1: `decoder` (the lowres feature decoder's variables) and its optimiser's
    /// state; stage 1b: `model`, `optimizer`, `ema` of the U-Net.
    fn train_state(&mut self) -> StageResult<TrainParts> {
        if let Some(o) = self.stage1.as_ref() {
            return o.parts(K, STAGE1_PART, &self.stage1_vars()?);
        }
        let t = self.train.as_ref().ok_or_else(not_training)?;
        t.state(self.pixels()?)
    }
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        if let Some(o) = self.stage1.as_ref() {
            let rest = o.load_parts(K, STAGE1_PART, &self.stage1_vars()?, parts)?;
            return match rest.first() {
                None => Ok(()),
                Some((p, _)) => Err(StageError::Invalid(format!(
                    "stage {K}: no training part `{p}`"
                ))),
            };
        }
        let pixels = self.pixels.as_ref().ok_or_else(not_training)?;
        self.train
            .as_mut()
            .ok_or_else(not_training)?
            .load(pixels, parts)
    }
    /// Stage 1b: start from rank 0's EMA copy (not a trained parameter, so the driver's
    /// broadcast does not reach it).
    fn set_process_group(
        &mut self,
        pg: std::sync::Arc<lavit_runtime::dist::ProcessGroup>,
    ) -> StageResult<()> {
        if let Some(t) = self.train.as_ref() {
            lavit_runtime::dist::broadcast_named(&pg, &t.ema_tensors())
                .map_err(|e| StageError::failed(K, e))?;
        }
        Ok(())
    }
    fn set_train(&mut self, train: bool) {
        self.train_mode = train;
    }
}

impl DecoderStage for DecoderStageModel {
    fn decode(
        &mut self,
        ids: &[Vec<i64>],
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Tensor> {
        if ids.iter().any(Vec::is_empty) {
            return Err(StageError::Invalid("an image without visual tokens".into()));
        }
        let pixels = self.pixels()?;
        let cond: Condition = pixels.condition_for(self, ids).map_err(stage_err)?;
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
        pixels
            .decode_with(&cond, &dopts, should_stop)
            .map_err(stage_err)
    }
}

/// What the request side needs to know of a checkpoint's pixel decoder, read from its
/// configs (no weights loaded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderGeometry {
    /// Side of the native square output: U-Net `sample_size` × the VAE's downscale
    /// (2^(len(block_out_channels) − 1); 1 without a VAE).
    pub native: i64,
    /// Output sides must be multiples of this (VAE downscale × U-Net downsampling).
    pub multiple: i64,
    /// Most diffusion steps the scheduler takes: its `num_train_timesteps`.
    pub max_steps: i64,
}

impl DecoderGeometry {
    /// Read `dir/<resolution folder>/{unet,vae}/config.json` and `scheduler/scheduler_config.json`.
    pub fn read(dir: &Path, resolution: Resolution) -> Result<Self> {
        let folder = dir.join(resolution.folder());
        let read = |p: std::path::PathBuf| -> Result<serde_json::Value> {
            let text = lavit_runtime::fsread::read_config(&p)?;
            serde_json::from_str(&text)
                .map_err(|e| Error::config(p.display().to_string(), "-", e.to_string()))
        };
        let unet_path = folder.join("unet/config.json");
        let unet = read(unet_path.clone())?;
        let sample = match &unet["sample_size"] {
            serde_json::Value::Array(a) => a.first().and_then(|v| v.as_u64()),
            v => v.as_u64(),
        }
        .filter(|&s| (1..=1 << 14).contains(&s))
        .ok_or_else(|| {
            Error::config(
                unet_path.display().to_string(),
                "sample_size",
                "missing or out of range 1..=16384",
            )
        })? as i64;
        let levels = unet["block_out_channels"]
            .as_array()
            .map_or(1, Vec::len)
            .clamp(1, 8) as i64;
        let vae = folder.join("vae/config.json");
        let scale = if vae.exists() {
            let n = read(vae)?["block_out_channels"]
                .as_array()
                .map_or(1, Vec::len)
                .clamp(1, 8) as i64;
            1i64 << (n - 1)
        } else {
            1
        };
        let sched = folder.join("scheduler/scheduler_config.json");
        let max_steps = if sched.exists() {
            crate::schedulers::SchedulerConfig::from_json_file(&sched)?.num_train_timesteps
        } else {
            crate::schedulers::SchedulerConfig::default().num_train_timesteps
        };
        Ok(DecoderGeometry {
            native: sample * scale,
            multiple: scale << (levels - 1),
            max_steps,
        })
    }
}

/// `auto` → highres when the folder has `highres_pixel_decoding/` (the official release),
/// else lowres (e.g. a folder written by `lavit demo`); else `highres` / `lowres`.
pub fn resolve_resolution(arg: &str, checkpoint: &Path) -> Result<Resolution> {
    if arg == "auto" {
        return Ok(if checkpoint.join(Resolution::Highres.folder()).is_dir() {
            Resolution::Highres
        } else {
            Resolution::Lowres
        });
    }
    arg.parse()
}

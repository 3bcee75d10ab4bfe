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
//! - stage 1b ([`DecoderStageModel::for_training`]): the pixel decoder's denoiser (the U-Net
//!   or a plugin's), through [`DecoderTrainer`].

use std::collections::VecDeque;
use std::path::Path;

use lavit_plugin_api::{Codebook, Denoiser};
use lavit_runtime::layout::{files, resolve_file};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{
    train_keys, DecodeRequest, StepControl, StepReport, TrainBatch, TrainParts,
};
use lavit_runtime::stage::{
    DecoderStage, Iterative, ShouldStop, StageError, StageKind, StageResult, Trainable,
};
use lavit_runtime::train::{need_train, not_trainable, StageOptim};
use lavit_runtime::{Error, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::feature_decoder::{FeatureDecoderConfig, HighresVQDecoder, VQDecoder};
use crate::pixel_decoder::{
    add_time_ids, DecodeOptions, Denoising, FeatureDecoders, PixelDecoder, Resolution,
};
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
    /// The running batch: requests waiting for a place, and those being denoised.
    waiting: VecDeque<DecodeJob>,
    running: Vec<DecodeJob>,
    /// Images per U-Net call.
    max_batch: usize,
}

fn stage_err(e: Error) -> StageError {
    StageError::from_error(K, e)
}

impl DecoderStageModel {
    /// The checkpoint's decoder for `resolution`: its feature decoder (frozen) and pixel
    /// decoder, their weights in `kind` but the VAE's (float32, as the official code
    /// upcasts it), around `codebook` (the checkpoint's, see `lavit_quantizer::load_codebook`)
    /// and `denoiser` (a plugin's, on `device`; `None`: the folder's built-in U-Net).
    pub fn load(
        dir: &Path,
        device: Device,
        codebook: Box<dyn Codebook>,
        denoiser: Option<Box<dyn Denoiser>>,
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
        me.pixels = Some(PixelDecoder::load_folder_with(
            &dir.join(resolution.folder()),
            resolution,
            device,
            kind,
            denoiser,
        )?);
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
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_batch: lavit_runtime::stage::Batching::default().decoder_max_batch,
        }
    }

    /// A Decoder stage that trains `pixels` (its denoiser) with `train` (stage 1b).
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
    /// state; stage 1b: `model`, `optimizer`, `ema` of the denoiser.
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
        let pixels = self.pixels.as_mut().ok_or_else(not_training)?;
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
        if let Some(t) = self.train.as_mut() {
            t.broadcast_ema(&pg)?;
        }
        Ok(())
    }
    fn set_train(&mut self, train: bool) {
        self.train_mode = train;
    }
}

/// A request in the Decoder's running batch.
struct DecodeJob {
    key: u64,
    ids: Vec<Vec<i64>>,
    opts: DecodeOptions,
    /// `None` until its condition is decoded (the step after it is admitted).
    loop_: Option<Denoising>,
}

/// Requests waiting to be admitted beyond which new ones stay in the stage's mailbox.
const WAITING_ROOM: usize = 8;

impl DecoderStageModel {
    /// The running batch's limit: images per U-Net call (guidance rows on top).
    pub fn with_batching(mut self, batching: &lavit_runtime::stage::Batching) -> Self {
        self.max_batch = batching.decoder_max_batch.max(1);
        self
    }

    /// Decode the conditions of the newly admitted requests in one feature-decoder call and
    /// start their diffusion loops (seeded initial latents, as alone).
    fn start_new(&mut self) -> Result<()> {
        let new: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].loop_.is_none())
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let ids: Vec<Vec<i64>> = new
            .iter()
            .flat_map(|&i| self.running[i].ids.iter().cloned())
            .collect();
        let pixels = self
            .pixels
            .as_ref()
            .ok_or_else(|| Error::invalid("this Decoder stage has no pixel decoder"))?;
        let cond = pixels.condition_for(self, &ids)?;
        let mut at = 0;
        let mut loops = Vec::with_capacity(new.len());
        for &i in &new {
            let job = &self.running[i];
            let n = job.ids.len() as i64;
            let c = cond.narrow(at, n);
            at += n;
            let (nh, nw) = pixels.native_size();
            let (h, w) = (job.opts.height.unwrap_or(nh), job.opts.width.unwrap_or(nw));
            pixels.validate_size(h, w)?;
            let latents = pixels.initial_latents(n, h, w, job.opts.seed);
            let tid = add_time_ids((h, w), job.opts.crops_coords_top_left, (h, w));
            let time_ids = Tensor::from_slice(&tid)
                .view([1, 6])
                .repeat([n, 1])
                .to_device(pixels.device);
            loops.push(pixels.start(&c, latents, &time_ids, &job.opts)?);
        }
        for (&i, l) in new.iter().zip(loops) {
            self.running[i].loop_ = Some(l);
        }
        Ok(())
    }
}

impl Iterative<DecodeRequest, Tensor> for DecoderStageModel {
    fn join(&mut self, key: u64, req: DecodeRequest) -> StageResult<()> {
        if req.ids.is_empty() {
            return Err(StageError::Invalid("no images to decode".into()));
        }
        if req.ids.iter().any(Vec::is_empty) {
            return Err(StageError::Invalid("an image without visual tokens".into()));
        }
        // Ids outside the codebook would fail the whole step's feature decoder: refuse now.
        if let Some(cb) = &self.codebook {
            let (off, k) = (self.visual_token_offset, cb.num_codes());
            for (i, v) in req.ids.iter().enumerate() {
                if let Some(bad) = v.iter().find(|&&id| id < off || id >= off + k) {
                    return Err(StageError::Invalid(format!(
                        "image {i}: id {bad} is not a visual id (valid: {off}..{})",
                        off + k
                    )));
                }
            }
        }
        let pixels = self.pixels()?;
        let opts = DecodeOptions {
            steps: req.opts.steps,
            guidance: req.opts.guidance,
            height: Some(req.opts.height as i64),
            width: Some(req.opts.width as i64),
            seed: Some(req.opts.seed as i64),
            ..DecodeOptions::default()
        };
        pixels
            .validate_size(req.opts.height as i64, req.opts.width as i64)
            .map_err(stage_err)?;
        self.waiting.push_back(DecodeJob {
            key,
            ids: req.ids,
            opts,
            loop_: None,
        });
        Ok(())
    }

    fn held(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    fn has_room(&self) -> bool {
        self.waiting.len() < WAITING_ROOM
    }

    fn plan(&mut self) -> Vec<u64> {
        let mut images: usize = self.running.iter().map(|j| j.ids.len()).sum();
        while let Some(j) = self.waiting.front() {
            if !self.running.is_empty() && images + j.ids.len() > self.max_batch {
                break;
            }
            images += j.ids.len();
            if let Some(j) = self.waiting.pop_front() {
                self.running.push(j);
            }
        }
        self.running.iter().map(|j| j.key).collect()
    }

    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, Tensor),
    ) -> StageResult<()> {
        if should_stop() {
            return Ok(());
        }
        self.start_new().map_err(stage_err)?;
        let pixels = self
            .pixels
            .as_ref()
            .ok_or_else(|| StageError::Invalid("this Decoder stage has no pixel decoder".into()))?;
        // One U-Net call per latent size, over every running request's rows.
        let mut sizes: Vec<Vec<i64>> = Vec::new();
        for j in &self.running {
            if let Some(l) = &j.loop_ {
                let s = l.latents.size()[1..].to_vec();
                if !sizes.contains(&s) {
                    sizes.push(s);
                }
            }
        }
        for size in sizes {
            let mut group: Vec<&mut Denoising> = self
                .running
                .iter_mut()
                .filter_map(|j| j.loop_.as_mut())
                .filter(|l| l.latents.size()[1..] == size[..])
                .collect();
            pixels.denoise(&mut group).map_err(stage_err)?;
        }
        // Finished requests: one VAE call per latent size, then they leave.
        let (done, running): (Vec<DecodeJob>, Vec<DecodeJob>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|j| j.loop_.as_ref().is_some_and(Denoising::is_done));
        self.running = running;
        let mut done: Vec<(u64, Tensor)> = done
            .into_iter()
            .filter_map(|j| j.loop_.map(|l| (j.key, l.latents)))
            .collect();
        while !done.is_empty() {
            let size = done[0].1.size()[1..].to_vec();
            let (same, rest): (Vec<_>, Vec<_>) = done
                .into_iter()
                .partition(|(_, l)| l.size()[1..] == size[..]);
            done = rest;
            let lat: Vec<&Tensor> = same.iter().map(|(_, l)| l).collect();
            let px = pixels.vae_decode(&Tensor::cat(&lat, 0))?; // (ΣB, 3, H, W)
            let mut at = 0;
            for (key, l) in &same {
                let n = l.size()[0];
                emit(*key, px.narrow(0, at, n));
                at += n;
            }
        }
        Ok(())
    }

    fn leave(&mut self, key: u64) {
        self.waiting.retain(|j| j.key != key);
        self.running.retain(|j| j.key != key);
    }
}

impl DecoderStage for DecoderStageModel {}

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
    /// Read `dir/<resolution folder>/{unet,vae}/config.json` and `scheduler/scheduler_config.json`
    /// (a plugin denoiser's folder: `denoiser.json` instead of `unet/config.json`).
    pub fn read(dir: &Path, resolution: Resolution) -> Result<Self> {
        let folder = dir.join(resolution.folder());
        let read = |p: std::path::PathBuf| -> Result<serde_json::Value> {
            let text = lavit_runtime::fsread::read_config(&p)?;
            serde_json::from_str(&text)
                .map_err(|e| Error::config(p.display().to_string(), "-", e.to_string()))
        };
        let unet_path = folder.join("unet/config.json");
        let plugin = if unet_path.exists() {
            None
        } else {
            lavit_runtime::plugin_host::DenoiserManifest::read(&folder)?
        };
        // (sample side, the denoiser's size multiple)
        let (sample, denoiser_multiple) = match plugin {
            Some(m) => (m.sample_size, m.size_multiple),
            None => {
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
                (sample, 1i64 << (levels - 1))
            }
        };
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
            multiple: scale * denoiser_multiple,
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

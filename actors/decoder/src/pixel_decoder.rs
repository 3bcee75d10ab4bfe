//! Visual tokens → pixels, as the official `LaVITforGeneration` (LaVIT, ICLR 2024;
//! reference: `LaVIT/models/lavit_for_generation.py` `generate_image` and
//! `pixel_decoding_origin`, `LaVIT/models/image_detokenize.py`).
//!
//! Two pixel decoders ship with LaVIT-7B-v2:
//! - **highres** (`highres_pixel_decoding/`, SDXL-shaped U-Net): conditioned on the
//!   `HighresVQDecoder` output (prompt embeds + pooled embeds) with `text_time` added
//!   conditioning; the negative condition is all zeros; time ids = original size, crop
//!   top-left, target size; several aspect ratios.
//! - **lowres** (`pixel_decoding/`, SD-1.5-shaped U-Net): conditioned on the `VQDecoder`
//!   output; the negative condition is zeros with `uncond_embeddings.bin` written into its
//!   first positions; encoder attention masks mark the real positions.
//!
//! The noise predictor is a [`Denoiser`]: the diffusers `UNet2DConditionModel` of the folder's
//! `unet/` (built in, [`UNetDenoiser`]) or a plugin's (`[plugins.denoiser]`, its weights in
//! `denoiser.safetensors`).
//!
//! A pixel-decoding folder without `vae/` is a pixel-space decoder (what `lavit train decoder`
//! trains for tiny configs): the U-Net denoises pixels directly. Without
//! `uncond_embeddings.bin` the lowres negative condition is all zeros (unmasked), the
//! condition-dropout value of that trainer.
//!
//! Classifier-free guidance runs as one batched U-Net forward ([negative; positive]), the whole
//! diffusion loop stays on the device (no host round-trips), then the VAE decodes.
//!
//! Randomness is per request: the initial latents of a seed come from a counter-based stream
//! drawn on the host ([`seeded_gaussian`]), never from libtorch's process-global generator, so
//! a seeded request gives the same picture whatever other requests are in flight (and on every
//! device). The DDIM / Euler steps used here draw no noise.
//!
//! Cancellation: the `*_with` forms take a [`ShouldStop`] callback called once per diffusion
//! step (it reads an atomic flag: no host round-trip); `true` stops with [`Error::Cancelled`].

use std::path::{Path, PathBuf};

use crate::denoiser::UNetDenoiser;
use crate::schedulers::{self, SchedulerConfig};
use crate::AutoencoderKL;
use lavit_plugin_api::{Denoiser, DenoiserInput};
use lavit_runtime::shape::dims;
use lavit_runtime::stage::ShouldStop;
use lavit_runtime::train::splitmix64;
use lavit_runtime::{checkpoint, Error, Result, TchContext};
use tch::{nn, Device, Kind, Tensor};

/// Which of the two official pixel decoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// `highres_pixel_decoding/` (SDXL-shaped, up to 1024², several aspect ratios).
    Highres,
    /// `pixel_decoding/` (SD-1.5-shaped, 512²), the paper's original decoder.
    Lowres,
}

impl Resolution {
    /// The folder of a LaVIT checkpoint holding this decoder.
    pub fn folder(self) -> &'static str {
        match self {
            Resolution::Highres => "highres_pixel_decoding",
            Resolution::Lowres => "pixel_decoding",
        }
    }
}

impl std::str::FromStr for Resolution {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "highres" => Ok(Resolution::Highres),
            "lowres" => Ok(Resolution::Lowres),
            _ => Err(Error::invalid(format!(
                "pixel decoding `{s}`: highres or lowres"
            ))),
        }
    }
}

/// The aspect ratios of the official highres decoder, as (name, (height, width)) at 1024².
pub const ASPECT_RATIOS: &[(&str, (i64, i64))] = &[
    ("1:1", (1024, 1024)),
    ("4:3", (896, 1152)),
    ("3:2", (832, 1216)),
    ("16:9", (768, 1344)),
    ("2:3", (1216, 832)),
    ("3:4", (1152, 896)),
];

/// What the feature decoder gives the pixel decoder.
#[derive(Debug)]
pub enum Condition {
    /// `HighresVQDecoder` output: prompt embeds (B, N, C) and pooled embeds (B, P).
    Highres {
        prompt_embeds: Tensor,
        pooled_embeds: Tensor,
    },
    /// `VQDecoder` output (B, N, C).
    Lowres { hidden: Tensor },
}

impl Condition {
    pub fn batch(&self) -> i64 {
        match self {
            Condition::Highres { prompt_embeds, .. } => prompt_embeds.size()[0],
            Condition::Lowres { hidden } => hidden.size()[0],
        }
    }

    /// Rows `start..start + len` (the images of one request of a batched condition).
    pub fn narrow(&self, start: i64, len: i64) -> Condition {
        match self {
            Condition::Highres {
                prompt_embeds,
                pooled_embeds,
            } => Condition::Highres {
                prompt_embeds: prompt_embeds.narrow(0, start, len),
                pooled_embeds: pooled_embeds.narrow(0, start, len),
            },
            Condition::Lowres { hidden } => Condition::Lowres {
                hidden: hidden.narrow(0, start, len),
            },
        }
    }
}

/// One request's diffusion loop between its steps ([`PixelDecoder::start`],
/// [`PixelDecoder::denoise`]).
pub struct Denoising {
    /// (R, N, C) U-Net encoder hidden states: [negative; positive] (R = 2B) under guidance,
    /// the positive alone (R = B) at guidance 1.
    ehs: Tensor,
    /// Lowres: (R, N) bool encoder attention mask.
    mask: Option<Tensor>,
    /// Highres: (R, P) pooled text embeds and (R, 6) time ids.
    text_embeds: Option<Tensor>,
    time_ids: Option<Tensor>,
    /// (B, C, h, w) float32.
    pub latents: Tensor,
    scheduler: Box<dyn schedulers::Scheduler>,
    timesteps: Vec<f64>,
    /// Steps done.
    next: usize,
    guidance: f64,
    guided: bool,
}

impl Denoising {
    /// Every step done.
    pub fn is_done(&self) -> bool {
        self.next >= self.timesteps.len()
    }
    /// Images.
    pub fn batch(&self) -> i64 {
        self.latents.size()[0]
    }
    /// U-Net rows of its next step.
    pub fn rows(&self) -> i64 {
        self.batch() * if self.guided { 2 } else { 1 }
    }
}

/// Settings of one decoding.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Denoising steps (official: 25 highres, 50 lowres).
    pub steps: usize,
    /// Decoder guidance scale (official: 7.0 highres, 5.0 lowres).
    pub guidance: f64,
    /// Output height in pixels (`None`: the decoder's native size).
    pub height: Option<i64>,
    /// Output width in pixels.
    pub width: Option<i64>,
    /// SDXL `original_size` time ids (default: the target size).
    pub original_size: Option<(i64, i64)>,
    /// SDXL crop top-left time ids.
    pub crops_coords_top_left: (i64, i64),
    /// Seed of the initial latents (`None`: a seed drawn from libtorch's generator).
    pub seed: Option<i64>,
    /// `ddim` (default, what the checkpoint's scheduler_config names) or `euler`.
    pub scheduler: Option<String>,
}

/// The official highres settings ([`GenerationManifest::default`]: 25 steps, guidance 7).
impl Default for DecodeOptions {
    fn default() -> Self {
        let g = lavit_runtime::manifest::GenerationManifest::default();
        Self {
            steps: g.ddim_steps.max(1) as usize,
            guidance: g.decoder_guidance,
            height: None,
            width: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            seed: None,
            scheduler: None,
        }
    }
}

/// SDXL's six added time ids: original (h, w), crop top-left (y, x), target (h, w).
pub fn add_time_ids(original: (i64, i64), crop: (i64, i64), target: (i64, i64)) -> [f64; 6] {
    [original.0, original.1, crop.0, crop.1, target.0, target.1].map(|v| v as f64)
}

/// One pixel decoder of a LaVIT checkpoint: denoiser (the U-Net) + VAE + scheduler config
/// (+ the lowres unconditional embeddings).
pub struct PixelDecoder {
    pub resolution: Resolution,
    /// The noise predictor: the built-in [`UNetDenoiser`] or a plugin's.
    pub denoiser: Box<dyn Denoiser>,
    /// The denoiser's dtype (of its first weight; inputs are cast to it).
    kind: Kind,
    /// `None`: a pixel-space decoder (no `vae/` folder).
    pub vae: Option<(nn::VarStore, AutoencoderKL)>,
    pub scheduler_config: SchedulerConfig,
    /// Lowres only: (L_u, C) from `uncond_embeddings.bin` (`None`: zeros negative).
    pub uncond_embeddings: Option<Tensor>,
    pub device: Device,
}

impl std::fmt::Debug for PixelDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PixelDecoder")
            .field("resolution", &self.resolution)
            .field("denoiser", &self.denoiser.name())
            .field("kind", &self.kind)
            .field("vae", &self.vae.is_some())
            .field("scheduler_config", &self.scheduler_config)
            .field("device", &self.device)
            .finish()
    }
}

impl PixelDecoder {
    /// Assemble a pixel decoder from its parts (`lavit train decoder` builds one this way).
    /// The denoiser's dtype is that of its first weight (float32 when it has none).
    pub fn new(
        resolution: Resolution,
        denoiser: Box<dyn Denoiser>,
        vae: Option<(nn::VarStore, AutoencoderKL)>,
        scheduler_config: SchedulerConfig,
        uncond_embeddings: Option<Tensor>,
        device: Device,
    ) -> Result<Self> {
        let kind = denoiser
            .state_dict()
            .map_err(|e| Error::invalid(format!("denoiser `{}`: {e}", denoiser.name())))?
            .first()
            .map_or(Kind::Float, |(_, t)| t.kind());
        Ok(Self {
            resolution,
            denoiser,
            kind,
            vae,
            scheduler_config,
            uncond_embeddings,
            device,
        })
    }

    /// Load `checkpoint_dir/{highres_,}pixel_decoding/{unet,vae,scheduler}` (and
    /// `uncond_embeddings.bin` for lowres) onto `device`, strictly, the U-Net in `unet_kind`
    /// (e.g. bf16 on a GPU; the VAE stays float32 as the official code upcasts it).
    pub fn load(
        checkpoint_dir: &Path,
        resolution: Resolution,
        device: Device,
        unet_kind: Kind,
    ) -> Result<Self> {
        let dir = checkpoint_dir.join(resolution.folder());
        Self::load_folder(&dir, resolution, device, unet_kind)
    }

    /// Load from the pixel-decoding folder itself.
    pub fn load_folder(
        dir: &Path,
        resolution: Resolution,
        device: Device,
        unet_kind: Kind,
    ) -> Result<Self> {
        Self::load_folder_with(dir, resolution, device, unet_kind, None)
    }

    /// [`Self::load_folder`] around `denoiser` (a plugin's, already on `device`) instead of
    /// the folder's `unet/` when it is given; the VAE, scheduler and unconditional
    /// embeddings come from the folder either way.
    pub fn load_folder_with(
        dir: &Path,
        resolution: Resolution,
        device: Device,
        unet_kind: Kind,
        denoiser: Option<Box<dyn Denoiser>>,
    ) -> Result<Self> {
        let denoiser = match denoiser {
            Some(d) => d,
            None => {
                let unet = UNetDenoiser::from_pretrained(&dir.join("unet"), device, unet_kind)?;
                if resolution == Resolution::Highres && unet.config().addition_embed_type.is_none()
                {
                    return Err(Error::invalid(format!(
                        "{}: the highres decoder needs a text_time U-Net (addition_embed_type)",
                        dir.display()
                    )));
                }
                Box::new(unet)
            }
        };
        let vae = if dir.join("vae").is_dir() {
            Some(AutoencoderKL::from_pretrained(&dir.join("vae"), device)?)
        } else {
            None
        };
        let scheduler_config =
            SchedulerConfig::from_json_file(&dir.join("scheduler/scheduler_config.json"))?;
        let uncond_embeddings = match resolution {
            Resolution::Highres => None,
            Resolution::Lowres => {
                let p = dir.join("uncond_embeddings.bin");
                if p.is_file() {
                    Some(load_uncond(&p, denoiser.cross_attention_dim(), device)?)
                } else {
                    None
                }
            }
        };
        Self::new(
            resolution,
            denoiser,
            vae,
            scheduler_config,
            uncond_embeddings,
            device,
        )
    }

    fn unet_kind(&self) -> Kind {
        self.kind
    }

    /// Pixels per latent cell (8 for SD).
    pub fn vae_scale(&self) -> i64 {
        self.vae.as_ref().map_or(1, |(_, v)| v.config.downscale())
    }

    /// Output sizes must be multiples of this (VAE scale × the denoiser's multiple, e.g. the
    /// U-Net's downsampling).
    pub fn size_multiple(&self) -> i64 {
        self.vae_scale() * self.denoiser.size_multiple().max(1)
    }

    /// The decoder's native (height, width): the denoiser's `sample_size` × VAE scale.
    pub fn native_size(&self) -> (i64, i64) {
        let s = self.denoiser.sample_size() * self.vae_scale();
        (s, s)
    }

    /// The official aspect-ratio sizes scaled to this decoder's native size, rounded to
    /// valid multiples: (name, (height, width)).
    pub fn aspect_ratio_sizes(&self) -> Vec<(&'static str, (i64, i64))> {
        aspect_ratio_sizes(self.native_size().0, self.size_multiple())
    }

    /// Check a requested size.
    pub fn validate_size(&self, height: i64, width: i64) -> Result<()> {
        let m = self.size_multiple();
        if height <= 0 || width <= 0 || height % m != 0 || width % m != 0 {
            return Err(Error::invalid(format!(
                "image size {height}×{width}: height and width must be positive multiples of {m}"
            )));
        }
        if height > 4096 || width > 4096 {
            return Err(Error::invalid(format!(
                "image size {height}×{width}: at most 4096 per side"
            )));
        }
        Ok(())
    }

    /// Gaussian initial latents (B, C, H/s, W/s) of `seed` ([`seeded_gaussian`], drawn on the
    /// host so a seed gives the same picture on every device and whatever else runs), then
    /// moved to the decoder's device.
    pub fn initial_latents(
        &self,
        batch: i64,
        height: i64,
        width: i64,
        seed: Option<i64>,
    ) -> Tensor {
        let seed = seed.map_or_else(random_seed, |s| s as u64);
        let s = self.vae_scale();
        seeded_gaussian(
            seed,
            &[batch, self.denoiser.in_channels(), height / s, width / s],
        )
        .to_device(self.device)
    }

    /// Decode a condition to images (B, 3, H, W) in [0, 1] (float32, on the device).
    pub fn decode(&self, cond: &Condition, opts: &DecodeOptions) -> Result<Tensor> {
        self.decode_with(cond, opts, &|| false)
    }

    /// [`Self::decode`] that calls `should_stop` once per diffusion step.
    pub fn decode_with(
        &self,
        cond: &Condition,
        opts: &DecodeOptions,
        should_stop: ShouldStop,
    ) -> Result<Tensor> {
        let (nh, nw) = self.native_size();
        let height = opts.height.unwrap_or(nh);
        let width = opts.width.unwrap_or(nw);
        self.validate_size(height, width)?;
        let latents = self.initial_latents(cond.batch(), height, width, opts.seed);
        let ids = add_time_ids(
            opts.original_size.unwrap_or((height, width)),
            opts.crops_coords_top_left,
            (height, width),
        );
        let time_ids = Tensor::from_slice(&ids)
            .view([1, 6])
            .repeat([cond.batch(), 1])
            .to_device(self.device);
        self.decode_latents_with(cond, latents, &time_ids, opts, should_stop)
    }

    /// The diffusion loop and VAE decode from given initial `latents` (B, C, h, w) and
    /// SDXL `time_ids` (B, 6) (ignored by the lowres decoder).
    pub fn decode_latents(
        &self,
        cond: &Condition,
        latents: Tensor,
        time_ids: &Tensor,
        opts: &DecodeOptions,
    ) -> Result<Tensor> {
        self.decode_latents_with(cond, latents, time_ids, opts, &|| false)
    }

    /// [`Self::decode_latents`] that calls `should_stop` once per diffusion step (before the
    /// step's U-Net forward) and stops with [`Error::Cancelled`] when it answers `true`. The
    /// loop is [`Self::start`] and [`Self::denoise`] over a batch of one (the serving path).
    pub fn decode_latents_with(
        &self,
        cond: &Condition,
        latents: Tensor,
        time_ids: &Tensor,
        opts: &DecodeOptions,
        should_stop: ShouldStop,
    ) -> Result<Tensor> {
        let mut job = self.start(cond, latents, time_ids, opts)?;
        while !job.is_done() {
            if should_stop() {
                return Err(Error::Cancelled);
            }
            self.denoise(&mut [&mut job])?;
        }
        self.vae_decode(&job.latents)
    }

    /// A diffusion loop ready for its first step: the U-Net rows of `cond` ([negative;
    /// positive] under guidance, the positive alone at guidance 1, where eq. 7 is the
    /// positive prediction), the scheduled timesteps, `latents` (B, C, h, w) scaled to the
    /// initial noise. `time_ids` (B, 6) are the SDXL ones (ignored by the lowres decoder).
    pub fn start(
        &self,
        cond: &Condition,
        latents: Tensor,
        time_ids: &Tensor,
        opts: &DecodeOptions,
    ) -> Result<Denoising> {
        let _guard = tch::no_grad_guard();
        let b = cond.batch();
        let dev = self.device;
        let kind = self.unet_kind();
        let lsize = latents.size();
        let channels = self.denoiser.in_channels();
        if lsize.len() != 4 || lsize[0] != b || lsize[1] != channels {
            return Err(Error::invalid(format!(
                "initial latents {lsize:?} do not fit batch {b} × {channels} channels"
            )));
        }
        if !opts.guidance.is_finite() {
            return Err(Error::invalid(format!(
                "guidance must be finite, got {}",
                opts.guidance
            )));
        }
        let mut scheduler =
            schedulers::from_config(&self.scheduler_config, opts.scheduler.as_deref())?;
        scheduler.set_timesteps(opts.steps)?;
        let guided = opts.guidance != 1.0;
        // [negative; positive] rows, or the positive rows alone.
        let rows = |neg: Tensor, pos: Tensor| {
            if guided {
                Tensor::cat(&[neg, pos], 0)
            } else {
                pos
            }
        };
        let (ehs, mask, text_embeds, time_ids) = match (cond, self.resolution) {
            (
                Condition::Highres {
                    prompt_embeds,
                    pooled_embeds,
                },
                Resolution::Highres,
            ) => {
                let pe = prompt_embeds.to_device(dev).to_kind(kind);
                let pp = pooled_embeds.to_device(dev).to_kind(kind);
                let tid = time_ids.to_device(dev).to_kind(kind);
                if tid.size() != [b, 6] {
                    return Err(Error::invalid(format!(
                        "time_ids must be ({b}, 6), got {:?}",
                        tid.size()
                    )));
                }
                // "The negative prompt embeddings shall be forced to always be set to 0"
                let ehs = rows(pe.zeros_like(), pe); // (R, N, C)
                let te = rows(pp.zeros_like(), pp); // (R, P)
                let tid = rows(tid.shallow_clone(), tid); // (R, 6)
                (ehs, None, Some(te), Some(tid))
            }
            (Condition::Lowres { hidden }, Resolution::Lowres) => {
                let x = hidden.to_device(dev).to_kind(kind);
                let (bn, n, c) = x.size3().ctx("lowres condition (B, N, C)")?;
                let neg = Tensor::zeros([bn, n, c], (kind, dev));
                let pos_mask = Tensor::ones([bn, n], (Kind::Bool, dev));
                let neg_mask = match &self.uncond_embeddings {
                    Some(uncond) => {
                        let uncond = uncond.to_kind(kind);
                        let (lu, cu) = uncond.size2().ctx("uncond embeddings (L, C)")?;
                        if cu != c {
                            return Err(Error::invalid(format!(
                                "uncond embeddings have width {cu}, the condition {c}"
                            )));
                        }
                        let lu = lu.min(n);
                        // negative condition: zeros with the unconditional embeddings in front
                        neg.narrow(1, 0, lu).copy_(
                            &uncond
                                .narrow(0, 0, lu)
                                .unsqueeze(0)
                                .expand([bn, lu, c], false),
                        );
                        let m = Tensor::zeros([bn, n], (Kind::Bool, dev));
                        let _ = m.narrow(1, 0, lu).fill_(1);
                        m
                    }
                    // no uncond_embeddings.bin: an all-zero, unmasked negative
                    None => pos_mask.shallow_clone(),
                };
                let ehs = rows(neg, x); // (R, N, C)
                let mask = rows(neg_mask, pos_mask); // (R, N)
                (ehs, Some(mask), None, None)
            }
            _ => {
                return Err(Error::invalid(format!(
                    "a {:?} condition does not fit the {:?} pixel decoder",
                    match cond {
                        Condition::Highres { .. } => Resolution::Highres,
                        Condition::Lowres { .. } => Resolution::Lowres,
                    },
                    self.resolution
                )))
            }
        };
        if ehs.size()[0] != if guided { 2 * b } else { b } {
            return Err(Error::invalid("condition parts disagree on the batch size"));
        }
        let timesteps = scheduler.timesteps().to_vec();
        let latents = latents.to_device(dev).to_kind(Kind::Float) * scheduler.init_noise_sigma();
        Ok(Denoising {
            ehs,
            mask,
            text_embeds,
            time_ids,
            latents,
            scheduler,
            timesteps,
            next: 0,
            guidance: opts.guidance,
            guided,
        })
    }

    /// One denoising step of every loop in `jobs` in ONE U-Net call: their rows are
    /// concatenated, each with its own timestep, and each loop's scheduler takes its own rows
    /// (continuous batching of the diffusion loops of concurrent requests). The latents of
    /// all jobs must have the same size (C, h, w).
    pub fn denoise(&self, jobs: &mut [&mut Denoising]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let jobs: Vec<&mut &mut Denoising> = jobs.iter_mut().filter(|j| !j.is_done()).collect();
        let Some(first) = jobs.first() else {
            return Ok(());
        };
        let shape = first.latents.size()[1..].to_vec();
        if jobs.iter().any(|j| j.latents.size()[1..] != shape[..]) {
            return Err(Error::invalid(
                "one U-Net call over latents of different sizes",
            ));
        }
        let (dev, kind) = (self.device, self.unet_kind());
        let (mut xs, mut ts, mut ehs, mut masks, mut te, mut tid) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for j in &jobs {
            let t = j.timesteps[j.next];
            let x = if j.guided {
                Tensor::cat(&[&j.latents, &j.latents], 0) // (2B, C, h, w)
            } else {
                j.latents.shallow_clone()
            };
            let x = j.scheduler.scale_model_input(&x, t).to_kind(kind);
            ts.extend(std::iter::repeat_n(t as f32, x.size()[0] as usize));
            xs.push(x);
            ehs.push(j.ehs.shallow_clone());
            masks.extend(j.mask.as_ref().map(Tensor::shallow_clone));
            te.extend(j.text_embeds.as_ref().map(Tensor::shallow_clone));
            tid.extend(j.time_ids.as_ref().map(Tensor::shallow_clone));
        }
        let cat = |v: &[Tensor]| (v.len() == jobs.len()).then(|| Tensor::cat(v, 0));
        let (mask, te, tid) = (cat(&masks), cat(&te), cat(&tid));
        let (text_embeds, time_ids) = match (&te, &tid) {
            (Some(te), Some(ti)) => (Some(te), Some(ti)),
            _ => (None, None),
        };
        let t = Tensor::from_slice(&ts).to_device(dev); // (R,)
        let sample = Tensor::cat(&xs, 0); // (R, C, h, w)
        let ehs = Tensor::cat(&ehs, 0); // (R, N, C)
        let input = DenoiserInput {
            sample: &sample,
            timestep: &t,
            encoder_hidden_states: &ehs,
            encoder_attention_mask: mask.as_ref(),
            text_embeds,
            time_ids,
        };
        let out = self
            .denoiser
            .forward(&input)
            .map_err(|e| Error::invalid(format!("denoiser `{}`: {e}", self.denoiser.name())))?;
        if out.size() != sample.size() {
            return Err(Error::invalid(format!(
                "denoiser `{}` returned {:?} for a sample {:?}",
                self.denoiser.name(),
                out.size(),
                sample.size()
            )));
        }
        let out = out.to_kind(Kind::Float);
        let mut at = 0;
        for j in jobs {
            let n = j.latents.size()[0] * if j.guided { 2 } else { 1 };
            let mine = out.narrow(0, at, n);
            at += n;
            let noise = if j.guided {
                let parts = mine.chunk(2, 0);
                let (uncond, text) = (&parts[0], &parts[1]);
                uncond + (text - uncond) * j.guidance
            } else {
                mine
            };
            let t = j.timesteps[j.next];
            j.latents = j.scheduler.step(&noise, t, &j.latents)?;
            j.next += 1;
        }
        Ok(())
    }

    /// VAE decode of scaled latents to RGB images in [0, 1]: `decode(z / scaling_factor)`,
    /// then `(x / 2 + 0.5).clamp(0, 1)`. A pixel-space decoder skips the VAE; one-channel
    /// images are repeated to RGB.
    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let img = match &self.vae {
            Some((_, vae)) => {
                let sf = vae.config.scaling_factor;
                vae.decode(&(latents.to_kind(Kind::Float) / sf))?
            }
            None => latents.to_kind(Kind::Float),
        };
        let img = (img / 2.0 + 0.5).clamp(0.0, 1.0);
        let [_, c, _, _] = dims(&img, "decoded images (B, C, H, W)")?;
        Ok(if c == 1 {
            img.repeat([1, 3, 1, 1])
        } else {
            img
        })
    }
}

mod images;
use images::load_uncond;
pub use images::{
    aspect_ratio_sizes, random_seed, save_pngs, save_rgb_pngs, seeded_gaussian, to_rgb8,
    visual_ids_only,
};

/// The feature-decoder half of the visual tokenizer, as the pixel decoders need it
/// (the official `generate_image_embeds`): visual ids (with the LLM offset) of each image →
/// the U-Net condition. The assembled `VisualTokenizer` implements it.
pub trait FeatureDecoders {
    /// `VQDecoder`: → (B, N, lowres_unet_proj).
    fn decode_lowres(&self, ids: &[Vec<i64>]) -> Result<Tensor>;
    /// `HighresVQDecoder`: → (prompt embeds (B, N, C), pooled embeds (B, P)).
    fn decode_highres(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Tensor)>;
}

impl PixelDecoder {
    /// The condition of this decoder for the visual ids of each image.
    pub fn condition_for(&self, fd: &dyn FeatureDecoders, ids: &[Vec<i64>]) -> Result<Condition> {
        if ids.is_empty() {
            return Err(Error::invalid("no images to decode"));
        }
        if let Some(i) = ids.iter().position(|v| v.is_empty()) {
            return Err(Error::invalid(format!("image {i} has no visual tokens")));
        }
        Ok(match self.resolution {
            Resolution::Highres => {
                let (prompt_embeds, pooled_embeds) = fd.decode_highres(ids)?;
                Condition::Highres {
                    prompt_embeds,
                    pooled_embeds,
                }
            }
            Resolution::Lowres => Condition::Lowres {
                hidden: fd.decode_lowres(ids)?,
            },
        })
    }

    /// Visual ids → images (B, 3, H, W) in [0, 1]: feature decoder, U-Net with decoder
    /// guidance, VAE.
    pub fn decode_ids(
        &self,
        fd: &dyn FeatureDecoders,
        ids: &[Vec<i64>],
        opts: &DecodeOptions,
    ) -> Result<Tensor> {
        self.decode_ids_with(fd, ids, opts, &|| false)
    }

    /// [`Self::decode_ids`] that calls `should_stop` once per diffusion step.
    pub fn decode_ids_with(
        &self,
        fd: &dyn FeatureDecoders,
        ids: &[Vec<i64>],
        opts: &DecodeOptions,
        should_stop: ShouldStop,
    ) -> Result<Tensor> {
        let cond = self.condition_for(fd, ids)?;
        self.decode_with(&cond, opts, should_stop)
    }
}

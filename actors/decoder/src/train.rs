//! Stage-1b training state of the Decoder stage (LaVIT, ICLR 2024): the diffusion pixel
//! decoder learns ε-prediction (or v, or x0) on VAE latents — or directly on pixels for tiny
//! configs without a VAE — conditioned on the frozen tokenizer's reconstructed features.
//! The network trained is the pixel decoder's [`Denoiser`] (the built-in U-Net or a plugin's),
//! through its named `trainable_parameters`, `state_dict` and `load_state_dict`.
//! The official repository ships no training code; this follows the diffusers
//! `train_text_to_image.py` recipe: uniform timesteps, MSE on the target, condition dropout
//! (zeros, the negative condition used at sampling), AdamW, EMA weights. The shared driver
//! (`lavit::train::decoder`) sends the stage `TrainForward` → `Backward` →
//! `OptimizerStepWith` messages; this holds what the stage needs between them.

use lavit_plugin_api::{Denoiser, DenoiserInput};
use lavit_runtime::checkpoint::StateDict;
use lavit_runtime::messages::{StepControl, StepReport, TrainBatch, TrainKey, TrainParts};
use lavit_runtime::stage::{StageError, StageKind, StageResult};
use lavit_runtime::train::{is_no_decay, AdamW, AdamWConfig};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::pixel_decoder::PixelDecoder;
use crate::schedulers::{DDIMScheduler, Scheduler, SchedulerConfig};

/// Names of the tensors a stage-1b [`TrainBatch`] carries to and from the Decoder stage.
pub mod keys {
    use lavit_runtime::messages::TrainKey;
    /// In (a training step): images (B, C, H, W) in [-1, 1] and their conditions (B, L, dim).
    pub const IMAGES: TrainKey = TrainKey::new("images");
    pub const COND: TrainKey = TrainKey::new("cond");
    /// Out (a training step): the loss term.
    pub const LOSS: TrainKey = TrainKey::new("loss");
    /// In (an evaluation): images, `COND`, and the seed of the noise and timesteps (0-d).
    pub const EVAL_IMAGES: TrainKey = TrainKey::new("eval_images");
    pub const EVAL_SEED: TrainKey = TrainKey::new("eval_seed");
    /// Out (an evaluation): the denoising loss (0-d, no grad).
    pub const EVAL_LOSS: TrainKey = TrainKey::new("eval_loss");
    /// In (sampling): conditions (n, L, dim) and the output size [H, W].
    pub const SAMPLE_COND: TrainKey = TrainKey::new("sample_cond");
    pub const SAMPLE_HW: TrainKey = TrainKey::new("sample_hw");
    /// Out (sampling): the EMA U-Net's samples (n, C, H, W) in [-1, 1].
    pub const SAMPLES: TrainKey = TrainKey::new("samples");
}

/// Optimisation and bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Total optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: i64,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay to `min_lr_ratio · lr`.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
    /// EMA decay of the exported weights.
    pub ema_decay: f64,
    /// Probability of replacing a sample's condition by zeros (so guidance works).
    pub cond_dropout: f64,
    /// Seed of everything random in the run.
    pub seed: u64,
    /// Log a metrics line every this many steps.
    pub log_every: usize,
    /// Save the checkpoint every this many steps (and at the end).
    pub save_every: usize,
    /// Committed checkpoints kept.
    pub keep_checkpoints: usize,
    /// Write a sample grid every this many steps (0 = only at the end).
    pub sample_every: usize,
    /// DDIM steps of the sample grids.
    pub sample_steps: usize,
    /// Decoder guidance of the sample grids.
    pub sample_guidance: f64,
    /// Images in a sample grid.
    pub sample_count: i64,
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// Continue from the newest committed checkpoint of `out_dir/checkpoints/` when there is one.
    pub resume: bool,
    /// Stop after this many steps in total, as if interrupted, with the checkpoint saved
    /// (0 = run to `steps`). Resuming later continues the same schedule.
    pub stop_after: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            lr: 1e-3,
            warmup_steps: 20,
            min_lr_ratio: 0.1,
            weight_decay: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            ema_decay: 0.999,
            cond_dropout: 0.1,
            seed: 0,
            log_every: 10,
            save_every: 200,
            keep_checkpoints: 2,
            sample_every: 0,
            sample_steps: 20,
            sample_guidance: 3.0,
            sample_count: 8,
            device: "cpu".into(),
            resume: true,
            stop_after: 0,
            progress: true,
        }
    }
}

/// The stage-1b training state the Decoder stage holds beside its [`PixelDecoder`] (whose
/// denoiser trains and whose VAE, if any, encodes the images): the optimiser, the EMA copy of
/// the denoiser, the noise schedule and the step's knobs.
pub struct DecoderTrainer {
    opt: AdamW,
    ema: Box<dyn Denoiser>,
    scheduler: DDIMScheduler,
    num_train_timesteps: i64,
    cond_dropout: f64,
    grad_clip: f64,
    ema_decay: f64,
    sample_steps: usize,
    sample_guidance: f64,
    seed: u64,
}

fn stage_fail(e: impl std::fmt::Display) -> StageError {
    StageError::failed(StageKind::Decoder, e)
}

/// A denoiser's state dict as the checkpoints store it.
fn state_of(d: &dyn Denoiser) -> lavit_runtime::Result<StateDict> {
    Ok(d.state_dict()
        .map_err(|e| lavit_runtime::Error::invalid(format!("denoiser `{}`: {e}", d.name())))?
        .into_iter()
        .collect())
}

/// Restore a saved state into a denoiser (`what` names it in errors).
fn load_state(d: &mut dyn Denoiser, sd: &StateDict, what: &str) -> lavit_runtime::Result<()> {
    let v: Vec<(String, Tensor)> = sd
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    d.load_state_dict(&v)
        .map_err(|e| lavit_runtime::Error::invalid(format!("{what}: denoiser `{}`: {e}", d.name())))
}

impl DecoderTrainer {
    /// The optimiser over `pixels`' denoiser (its named `trainable_parameters`) and `ema`, a
    /// second denoiser of the same architecture that becomes its EMA copy (its weights are
    /// overwritten with the denoiser's here).
    pub fn new(
        pixels: &PixelDecoder,
        mut ema: Box<dyn Denoiser>,
        t: &TrainConfig,
        scheduler: &SchedulerConfig,
    ) -> lavit_runtime::Result<Self> {
        let model = pixels.denoiser.as_ref();
        load_state(ema.as_mut(), &state_of(model)?, "the EMA copy")?;
        let params = model.trainable_parameters();
        if params.is_empty() {
            return Err(lavit_runtime::Error::invalid(format!(
                "denoiser `{}` has no trainable parameters",
                model.name()
            )));
        }
        let opt = AdamW::new(
            params,
            AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
        )?
        .no_decay(is_no_decay);
        Ok(Self {
            opt,
            ema,
            scheduler: DDIMScheduler::new(scheduler.clone())?,
            num_train_timesteps: scheduler.num_train_timesteps,
            cond_dropout: t.cond_dropout,
            grad_clip: t.grad_clip,
            ema_decay: t.ema_decay,
            sample_steps: t.sample_steps.max(1),
            sample_guidance: t.sample_guidance,
            seed: t.seed,
        })
    }

    /// Images (B, C, H, W) in [-1, 1] → the diffusion target space (VAE latents · scaling
    /// factor, or the pixels themselves).
    fn to_x0(pixels: &PixelDecoder, img: &Tensor) -> StageResult<Tensor> {
        match &pixels.vae {
            Some((_, v)) => {
                let _g = tch::no_grad_guard();
                Ok(v.encode(img).map_err(stage_fail)?.sample() * v.config.scaling_factor)
            }
            None => Ok(img.shallow_clone()),
        }
    }

    /// One forward message. By the keys of `b.tensors`:
    /// - `images` (B, C, H, W) + `cond` (B, L, dim): the training loss with grad (uniform
    ///   timesteps, noise, condition dropout to zeros), added as the loss term `loss`;
    /// - `eval_images` + `cond` + `eval_seed` (scalar): the denoising loss of the current
    ///   weights on noise and timesteps drawn from that seed (`eval_loss`, no grad);
    /// - `sample_cond` (n, L, dim) + `sample_hw` ([H, W]): DDIM samples of the EMA U-Net with
    ///   decoder guidance and zero negative conditions (`samples`, (n, C, H, W) in [-1, 1]).
    pub fn forward(&self, pixels: &PixelDecoder, mut b: TrainBatch) -> StageResult<TrainBatch> {
        let get = |k: TrainKey| b.tensors.get(&k).map(Tensor::shallow_clone);
        let need = |k: TrainKey| {
            get(k).ok_or_else(|| StageError::Invalid(format!("training batch has no `{k}`")))
        };
        let dev = pixels.device;
        let model = pixels.denoiser.as_ref();
        if let Some(img) = get(keys::IMAGES) {
            let cond = need(keys::COND)?;
            let n = img.size()[0];
            let x0 = Self::to_x0(pixels, &img)?;
            // Per-row randomness for the step's global batch (data parallel: this rank keeps
            // its rows), in the order one rank with the whole batch draws it.
            let (off, global) = b.rows(n, StageKind::Decoder)?;
            let (noise, ts, keep) = if global == n {
                let noise = x0.randn_like();
                let ts = Tensor::randint(self.num_train_timesteps, [n], (Kind::Int64, dev));
                let keep = Tensor::rand([n, 1, 1], (Kind::Float, dev));
                (noise, ts, keep)
            } else {
                let mut shape = x0.size();
                shape[0] = global;
                let noise = Tensor::randn(shape.as_slice(), (x0.kind(), dev)).narrow(0, off, n);
                let ts = Tensor::randint(self.num_train_timesteps, [global], (Kind::Int64, dev))
                    .narrow(0, off, n);
                let keep = Tensor::rand([global, 1, 1], (Kind::Float, dev)).narrow(0, off, n);
                (noise, ts, keep)
            };
            let keep = keep.ge(self.cond_dropout).to_kind(cond.kind());
            let cond = cond * keep; // dropped conditions become zeros (the sampling negative)
            let xt = self.scheduler.add_noise(&x0, &noise, &ts);
            let target = target_for(&self.scheduler, &x0, &noise, &ts);
            let pred = predict(model, &xt, &ts, &cond)?;
            b.losses
                .push((keys::LOSS, pred.mse_loss(&target, tch::Reduction::Mean)));
        } else if let Some(img) = get(keys::EVAL_IMAGES) {
            let _g = tch::no_grad_guard();
            let cond = need(keys::COND)?;
            tch::manual_seed(need(keys::EVAL_SEED)?.int64_value(&[]));
            let x0 = Self::to_x0(pixels, &img)?;
            let noise = x0.randn_like();
            let ts = Tensor::randint(
                self.num_train_timesteps,
                [img.size()[0]],
                (Kind::Int64, dev),
            );
            let xt = self.scheduler.add_noise(&x0, &noise, &ts);
            let target = target_for(&self.scheduler, &x0, &noise, &ts);
            let pred = predict(model, &xt, &ts, &cond)?;
            b.tensors.insert(
                keys::EVAL_LOSS,
                pred.mse_loss(&target, tch::Reduction::Mean),
            );
        } else if let Some(cond) = get(keys::SAMPLE_COND) {
            let hw = Vec::<i64>::try_from(&need(keys::SAMPLE_HW)?.to_device(Device::Cpu))
                .map_err(stage_fail)?;
            let samples = self.sample(pixels, &cond, hw[0], hw[1])?;
            b.tensors.insert(keys::SAMPLES, samples);
        } else {
            return Err(StageError::Invalid(
                "decoder training batch: needs `images`, `eval_images` or `sample_cond`".into(),
            ));
        }
        Ok(b)
    }

    fn sample(&self, pixels: &PixelDecoder, cond: &Tensor, h: i64, w: i64) -> StageResult<Tensor> {
        let _g = tch::no_grad_guard();
        let dev = pixels.device;
        let n = cond.size()[0];
        let mut s = DDIMScheduler::new(self.scheduler.config.clone()).map_err(stage_fail)?;
        s.set_timesteps(self.sample_steps).map_err(stage_fail)?;
        tch::manual_seed(self.seed.wrapping_add(77) as i64);
        let (c, h, w) = match &pixels.vae {
            Some((_, v)) => {
                let k = v.config.downscale();
                (v.config.latent_channels, h / k, w / k)
            }
            None => (self.ema.in_channels(), h, w),
        };
        let mut x = Tensor::randn([n, c, h, w], (Kind::Float, dev));
        let ehs = Tensor::cat(&[cond.zeros_like(), cond.shallow_clone()], 0);
        for ts in s.timesteps().to_vec() {
            let tt = Tensor::full([2 * n], ts, (Kind::Float, dev)); // (2n,)
            let out = predict(self.ema.as_ref(), &Tensor::cat(&[&x, &x], 0), &tt, &ehs)?;
            let p = out.chunk(2, 0);
            let eps = &p[0] + (&p[1] - &p[0]) * self.sample_guidance;
            x = s.step(&eps, ts, &x).map_err(stage_fail)?;
        }
        Ok(match &pixels.vae {
            Some((_, v)) => v
                .decode(&(x / v.config.scaling_factor))
                .map_err(stage_fail)?,
            None => x,
        })
    }

    /// Apply (clip or measure the gradient norm, AdamW at `ctl.lr`, EMA update) or skip, then
    /// zero the gradients.
    pub fn step(&mut self, pixels: &PixelDecoder, ctl: &StepControl) -> StageResult<StepReport> {
        let mut report = StepReport::default();
        if ctl.apply {
            let norm = if self.grad_clip > 0.0 {
                self.opt.clip_grad_norm(self.grad_clip)
            } else {
                self.opt.grad_norm()
            }
            .map_err(stage_fail)?;
            report.grad_norm = Some(norm);
            self.opt.step(ctl.lr).map_err(stage_fail)?;
            ema_update(
                self.ema.as_mut(),
                pixels.denoiser.as_ref(),
                ema_decay_at(self.ema_decay, ctl.step.max(0) as usize),
            )
            .map_err(stage_fail)?;
        }
        self.opt.zero_grad();
        Ok(report)
    }

    /// The denoiser's parameters the optimiser updates (shallow).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.opt.params()
    }

    /// Data-parallel training: the EMA copy starts from rank 0's (it is not a trained
    /// parameter, so the driver's broadcast of those does not reach it).
    pub fn broadcast_ema(&mut self, pg: &lavit_runtime::dist::ProcessGroup) -> StageResult<()> {
        let sd: Vec<(String, Tensor)> = state_of(self.ema.as_ref())
            .map_err(stage_fail)?
            .into_iter()
            .collect();
        lavit_runtime::dist::broadcast_named(pg, &sd).map_err(stage_fail)?;
        let sd: StateDict = sd.into_iter().collect();
        load_state(self.ema.as_mut(), &sd, "broadcast EMA").map_err(stage_fail)
    }

    /// The EMA copy's weights (what `lavit train decoder` exports).
    pub fn ema_state(&self) -> StageResult<StateDict> {
        state_of(self.ema.as_ref()).map_err(stage_fail)
    }

    /// `model`, `optimizer` and `ema`, as the checkpoints store them.
    pub fn state(&self, pixels: &PixelDecoder) -> StageResult<TrainParts> {
        Ok(vec![
            (
                "model".into(),
                state_of(pixels.denoiser.as_ref()).map_err(stage_fail)?,
            ),
            (
                "optimizer".into(),
                self.opt.state_dict().map_err(stage_fail)?,
            ),
            ("ema".into(), self.ema_state()?),
        ])
    }

    /// Load a saved state strictly (exact resume).
    pub fn load(&mut self, pixels: &mut PixelDecoder, parts: TrainParts) -> StageResult<()> {
        for (name, sd) in parts {
            let src = format!("checkpoint {name}");
            match name.as_str() {
                "model" => {
                    load_state(pixels.denoiser.as_mut(), &sd, &src).map_err(stage_fail)?;
                }
                "optimizer" => self.opt.load_state_dict(&sd, &src).map_err(stage_fail)?,
                "ema" => load_state(self.ema.as_mut(), &sd, &src).map_err(stage_fail)?,
                other => {
                    return Err(StageError::Invalid(format!(
                        "the Decoder stage has no training part `{other}`"
                    )))
                }
            }
        }
        Ok(())
    }
}

pub fn target_for(s: &DDIMScheduler, x0: &Tensor, noise: &Tensor, ts: &Tensor) -> Tensor {
    match s.config.prediction_type.as_str() {
        "v_prediction" => s.get_velocity(x0, noise, ts),
        "sample" => x0.shallow_clone(),
        _ => noise.shallow_clone(),
    }
}

pub fn ema_decay_at(decay: f64, step: usize) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

/// `ema ← decay · ema + (1 − decay) · model`, tensor by tensor of their state dicts (a
/// tensor the model lacks keeps its value), written back through `load_state_dict`.
pub fn ema_update(
    ema: &mut dyn Denoiser,
    model: &dyn Denoiser,
    decay: f64,
) -> lavit_runtime::Result<()> {
    let _g = tch::no_grad_guard();
    let src = state_of(model)?;
    let new: StateDict = state_of(ema)?
        .into_iter()
        .map(|(n, e)| {
            let v = match src.get(&n) {
                Some(p) => &e * decay + p * (1.0 - decay),
                None => e,
            };
            (n, v)
        })
        .collect();
    load_state(ema, &new, "the EMA update")
}

/// The denoiser's prediction for noisy `xt` (B, C, h, w) at integer timesteps `ts` (B,) (or
/// one 0-d float timestep), conditioned on `cond` (B, L, D) (no mask, no added conditions:
/// training conditions by the feature tokens only).
fn predict(d: &dyn Denoiser, xt: &Tensor, ts: &Tensor, cond: &Tensor) -> StageResult<Tensor> {
    let t = ts.to_kind(Kind::Float);
    let out = d
        .forward(&DenoiserInput {
            sample: xt,
            timestep: &t,
            encoder_hidden_states: cond,
            encoder_attention_mask: None,
            text_embeds: None,
            time_ids: None,
        })
        .map_err(|e| stage_fail(format!("denoiser `{}`: {e}", d.name())))?;
    if out.size() != xt.size() {
        return Err(stage_fail(format!(
            "denoiser `{}` returned {:?} for a sample {:?}",
            d.name(),
            out.size(),
            xt.size()
        )));
    }
    Ok(out)
}

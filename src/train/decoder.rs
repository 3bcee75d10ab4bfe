//! Stage 1b of LaVIT (ICLR 2024): the diffusion pixel decoder learns ε-prediction (or v) on
//! VAE latents — or directly on pixels for tiny configs without a VAE — conditioned on the
//! frozen tokenizer's reconstructed features (what the official lowres decoder reads through
//! cross-attention). The official repository ships no training code; this follows the
//! diffusers `train_text_to_image.py` recipe: uniform timesteps, MSE on the noise, condition
//! dropout (zeros, the negative condition used at sampling), AdamW, EMA weights.
//!
//! Library entry points: [`train`] (what `lavit train decoder --config FILE` runs, and what
//! the demo calls with its own images and conditioner) and [`load_image_folder`].
//! The loop is the shared one of `lavit_runtime::train`: AdamW, warm-up + cosine, per-step
//! seeding, the NaN policy, atomic checkpoints in `out_dir/checkpoints/step-N/` (parts
//! `model`, `optimizer`, `ema`) with exact resume, `metrics.jsonl` + `metrics.html` +
//! `loss.png`, a progress bar. The EMA U-Net is exported as a diffusers folder
//! (`unet/config.json` + `unet/diffusion_pytorch_model.safetensors`, `scheduler/`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lavit_decoder::schedulers::{DDIMScheduler, Scheduler, SchedulerConfig};
use lavit_decoder::unet_2d_condition::{UNet2DConditionModel, UNet2DConditionModelConfig};
use lavit_decoder::AutoencoderKL;
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::train::{
    is_no_decay, var_store_state_dict, AdamW, AdamWConfig, Checkpointer, LrSchedule, MetricsLog,
    NanGuard, StepRng, StepVerdict, TrainProgress, TrainState,
};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// Where the training images come from (for the CLI; the library takes a tensor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A folder searched recursively for PNG/JPEG images.
    pub images: PathBuf,
    /// Images are resized (squashed) to this square size.
    pub image_size: u32,
    /// Use at most this many images (0 = all).
    pub max_images: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            images: PathBuf::from("images"),
            image_size: 32,
            max_images: 0,
        }
    }
}

/// The conditioning features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConditionConfig {
    /// `patches`: a frozen, seeded random projection of image patches (a stand-in for the
    /// tokenizer's reconstruction when no trained tokenizer is given).
    pub kind: String,
    /// Patches per side (the condition has grid² tokens).
    pub grid: i64,
    /// Width of each condition token (= the U-Net's `cross_attention_dim`).
    pub dim: i64,
    /// Seed of the frozen projection.
    pub seed: i64,
}

impl Default for ConditionConfig {
    fn default() -> Self {
        Self {
            kind: "patches".into(),
            grid: 4,
            dim: 32,
            seed: 1234,
        }
    }
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

/// A `lavit train decoder` config file (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecoderTrainConfig {
    /// Output folder: checkpoint, metrics, sample grids, exported diffusers folders.
    pub out_dir: PathBuf,
    /// Start from this diffusers `unet/` folder instead of `[unet]`.
    pub unet_from: Option<PathBuf>,
    /// The U-Net to train from scratch (diffusers `config.json` fields).
    pub unet: UNet2DConditionModelConfig,
    /// A diffusers `vae/` folder: train on its latents. Absent: train on pixels.
    pub vae: Option<PathBuf>,
    /// The noise schedule (diffusers `scheduler_config.json` fields).
    pub scheduler: SchedulerConfig,
    pub data: DataConfig,
    pub condition: ConditionConfig,
    pub train: TrainConfig,
}

impl Default for DecoderTrainConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("runs/decoder"),
            unet_from: None,
            unet: tiny_pixel_unet(3, 32),
            vae: None,
            // DDPM's pixel-space schedule: x₀ predictions clipped to [-1, 1] when sampling
            scheduler: SchedulerConfig {
                beta_schedule: "linear".into(),
                clip_sample: true,
                set_alpha_to_one: false,
                steps_offset: 1,
                ..Default::default()
            },
            data: DataConfig::default(),
            condition: ConditionConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

impl DecoderTrainConfig {
    /// Read a TOML config; errors name the file and the key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self =
            toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.steps == 0 || t.batch_size <= 0 {
            bail!("train.steps and train.batch_size must be positive");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bail!("train.lr must be positive, got {}", t.lr);
        }
        if !(0.0..=1.0).contains(&t.cond_dropout) || !(0.0..1.0).contains(&t.ema_decay) {
            bail!("train.cond_dropout must be in [0, 1] and train.ema_decay in [0, 1)");
        }
        if self.condition.kind != "patches" {
            bail!(
                "condition.kind `{}`: only `patches` (pass a tokenizer through the library API)",
                self.condition.kind
            );
        }
        if self.condition.grid <= 0 || self.condition.dim <= 0 {
            bail!("condition.grid and condition.dim must be positive");
        }
        if self.unet_from.is_none() {
            self.unet.validate("[unet]")?;
            if self.unet.cross_attention_dim != self.condition.dim {
                bail!(
                    "unet.cross_attention_dim {} must equal condition.dim {}",
                    self.unet.cross_attention_dim,
                    self.condition.dim
                );
            }
            if self.unet.addition_embed_type.as_deref() == Some("text_time") {
                bail!(
                    "unet.addition_embed_type: training supports conditioning by the feature tokens only (cross-attention, optionally with `text` pooling), not text_time"
                );
            }
        }
        self.scheduler.validate("[scheduler]")?;
        Ok(())
    }
}

/// A small pixel-space U-Net for 28–32 px images: two resolutions, transformers (self- and
/// cross-attention) at the lower one and in the mid block.
pub fn tiny_pixel_unet(channels: i64, cond_dim: i64) -> UNet2DConditionModelConfig {
    use lavit_decoder::unet_2d_condition::PerBlock;
    UNet2DConditionModelConfig {
        in_channels: channels,
        out_channels: channels,
        block_out_channels: vec![32, 64],
        down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
        up_block_types: vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
        layers_per_block: PerBlock::One(1),
        attention_head_dim: PerBlock::One(4),
        norm_num_groups: 8,
        cross_attention_dim: cond_dim,
        sample_size: Some(32),
        ..Default::default()
    }
}

/// Maps a batch of training images to the condition tokens the U-Net cross-attends to —
/// for LaVIT, the frozen tokenizer's reconstructed features (`VQDecoder` output).
pub trait Conditioner {
    /// Images (B, C, H, W) in [-1, 1] → conditions (B, L, dim), on the images' device.
    fn condition(&self, images: &Tensor) -> Result<Tensor>;
    /// Width of each condition token.
    fn dim(&self) -> i64;
}

/// A frozen, seeded random projection of image patches: a stand-in for the tokenizer's
/// reconstruction that carries the image content, for runs without a trained tokenizer.
pub struct PatchConditioner {
    proj: Tensor,
    grid: i64,
    dim: i64,
}

impl PatchConditioner {
    pub fn new(
        channels: i64,
        image_size: i64,
        grid: i64,
        dim: i64,
        seed: i64,
        device: Device,
    ) -> Result<Self> {
        if image_size % grid != 0 {
            bail!("image size {image_size} is not divisible by condition.grid {grid}");
        }
        let p = image_size / grid;
        let fan_in = channels * p * p;
        tch::manual_seed(seed);
        let proj = (Tensor::randn([fan_in, dim], (Kind::Float, Device::Cpu))
            / (fan_in as f64).sqrt())
        .to_device(device);
        Ok(Self { proj, grid, dim })
    }
}

impl Conditioner for PatchConditioner {
    fn condition(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.size4()?;
        let g = self.grid;
        let (ph, pw) = (h / g, w / g);
        let patches = images
            .reshape([b, c, g, ph, g, pw])
            .permute([0, 2, 4, 1, 3, 5]) // (B, g, g, C, ph, pw)
            .reshape([b, g * g, c * ph * pw]);
        Ok(patches.matmul(&self.proj.to_kind(images.kind()))) // (B, g², dim)
    }
    fn dim(&self) -> i64 {
        self.dim
    }
}

/// Load every PNG/JPEG under `dir` (recursively, sorted), composite transparency onto
/// white, resize to `size`², as (N, 3, size, size) in [-1, 1]. Unreadable images are
/// skipped with a warning; returns the tensor and the number skipped.
pub fn load_image_folder(dir: &Path, size: u32, max_images: usize) -> Result<(Tensor, usize)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension()
                    .and_then(|e| e.to_str())
                    .map(|e| e.to_ascii_lowercase())
                    .as_deref(),
                Some("png" | "jpg" | "jpeg")
            ) {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut data = Vec::new();
    let mut skipped = 0;
    let mut n = 0;
    for f in files {
        if max_images > 0 && n >= max_images {
            break;
        }
        let img = match image::ImageReader::open(&f).and_then(|r| r.with_guessed_format()) {
            Ok(mut r) => {
                let mut limits = image::Limits::default();
                limits.max_image_width = Some(8192);
                limits.max_image_height = Some(8192);
                limits.max_alloc = Some(256 << 20);
                r.limits(limits);
                r.decode()
            }
            Err(e) => Err(image::ImageError::IoError(e)),
        };
        let img = match img {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("skipping {}: {e}", f.display());
                skipped += 1;
                continue;
            }
        };
        let rgba = image::imageops::resize(
            &img.to_rgba8(),
            size,
            size,
            image::imageops::FilterType::Triangle,
        );
        for px in rgba.pixels() {
            let a = px[3] as f32 / 255.0;
            for ch in 0..3 {
                let v = px[ch] as f32 / 255.0 * a + (1.0 - a); // onto white
                data.push(v * 2.0 - 1.0);
            }
        }
        n += 1;
    }
    if n == 0 {
        bail!("no readable images under {}", dir.display());
    }
    let s = size as i64;
    let t = Tensor::from_slice(&data)
        .view([n as i64, s, s, 3])
        .permute([0, 3, 1, 2]) // (N, 3, H, W)
        .contiguous();
    Ok((t, skipped))
}

/// What a training run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Steps done in total (including resumed ones).
    pub steps: usize,
    /// Denoising loss on a fixed evaluation batch (fixed noise and timesteps), EMA-free
    /// weights, before this run's first step and after its last.
    pub eval_loss_start: f64,
    pub eval_loss_end: f64,
    /// Mean training loss over the first and the last `log_every` steps of this run.
    pub train_loss_first: f64,
    pub train_loss_last: f64,
    /// Files written: the last checkpoint folder, the exported U-Net, the grids.
    pub checkpoint: PathBuf,
    pub exported_unet: PathBuf,
    pub sample_grids: Vec<PathBuf>,
}

/// Train the pixel decoder on `images` (N, C, H, W) in [-1, 1] (C = 3 with a VAE, else the
/// U-Net's channels). `conditioner` gives the condition tokens of each batch.
pub fn train(
    cfg: &DecoderTrainConfig,
    images: &Tensor,
    conditioner: &dyn Conditioner,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let t = &cfg.train;
    let device = Device::cuda_if_available_for(&t.device)?;
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("creating {}", cfg.out_dir.display()))?;

    // Frozen VAE (latent training) or none (pixel space).
    let vae = match &cfg.vae {
        Some(dir) => Some(AutoencoderKL::from_pretrained(dir, device)?),
        None => None,
    };

    // The U-Net and its EMA copy.
    let unet_cfg = match &cfg.unet_from {
        Some(dir) => UNet2DConditionModelConfig::from_json_file(&dir.join("config.json"))?,
        None => cfg.unet.clone(),
    };
    if unet_cfg.cross_attention_dim != conditioner.dim() {
        bail!(
            "the U-Net cross-attends to width {}, the conditioner gives {}",
            unet_cfg.cross_attention_dim,
            conditioner.dim()
        );
    }
    tch::manual_seed(t.seed as i64);
    let vs = nn::VarStore::new(device);
    let unet = UNet2DConditionModel::new(vs.root(), unet_cfg.clone())?;
    if let Some(dir) = &cfg.unet_from {
        let sd = checkpoint::load_path(dir)?;
        checkpoint::load_into(
            &vs,
            "",
            &sd,
            &dir.display().to_string(),
            &Default::default(),
        )?;
    }
    let mut ema_vs = nn::VarStore::new(device);
    let ema_unet = UNet2DConditionModel::new(ema_vs.root(), unet_cfg.clone())?;
    ema_vs.copy(&vs)?;
    ema_vs.freeze();

    let mut opt = AdamW::from_var_store(
        &vs,
        |_| true,
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
    )?
    .no_decay(is_no_decay);
    let schedule = LrSchedule::warmup_cosine(
        t.lr,
        t.warmup_steps as i64,
        t.steps as i64,
        t.lr * t.min_lr_ratio,
    );
    schedule.validate("decoder training config", "train")?;
    let scheduler = DDIMScheduler::new(cfg.scheduler.clone())?;
    let sf = vae
        .as_ref()
        .map(|(_, v)| v.config.scaling_factor)
        .unwrap_or(1.0);

    let images = images.to_device(device).to_kind(Kind::Float);
    let n_img = images.size()[0];
    let want_c = if vae.is_some() {
        3
    } else {
        unet_cfg.in_channels
    };
    if images.dim() != 4 || images.size()[1] != want_c {
        bail!(
            "training images must be (N, {want_c}, H, W), got {:?}",
            images.size()
        );
    }
    let to_x0 = |img: &Tensor| -> Tensor {
        match &vae {
            Some((_, v)) => tch::no_grad(|| v.encode(img).sample() * sf),
            None => img.shallow_clone(),
        }
    };

    // Resume from the newest committed checkpoint (model, optimizer, EMA, state).
    let ck = Checkpointer::new(cfg.out_dir.join("checkpoints"), t.keep_checkpoints.max(1))?;
    let mut state = TrainState {
        seed: t.seed,
        ..Default::default()
    };
    if t.resume {
        if let Some(path) = ck.latest()? {
            let mut loaded = lavit_runtime::train::load(&path)?;
            let src = path.display().to_string();
            checkpoint::load_into(&vs, "", &loaded.take("model")?, &src, &Default::default())?;
            opt.load_state_dict(&loaded.take("optimizer")?, &src)?;
            checkpoint::load_into(&ema_vs, "", &loaded.take("ema")?, &src, &Default::default())?;
            state = loaded.state;
            tracing::info!("resumed {} at step {}", path.display(), state.step);
        }
    }
    let start = state.step.max(0) as usize;

    // A fixed evaluation batch: same images, noise, timesteps every time.
    let eval = {
        tch::manual_seed((t.seed ^ 0x5eed) as i64);
        let b = n_img.min(16);
        let img = images.narrow(0, 0, b);
        let x0 = to_x0(&img);
        let noise = x0.randn_like();
        let ts = Tensor::randint(
            cfg.scheduler.num_train_timesteps,
            [b],
            (Kind::Int64, device),
        );
        let cond = conditioner.condition(&img)?;
        (x0, noise, ts, cond)
    };
    let eval_loss = |u: &UNet2DConditionModel| -> Result<f64> {
        let _g = tch::no_grad_guard();
        let (x0, noise, ts, cond) = &eval;
        let xt = scheduler.add_noise(x0, noise, ts);
        let target = target_for(&scheduler, x0, noise, ts);
        let pred = u.forward(&xt, &ts.to_kind(Kind::Float), cond, None, None)?;
        Ok(pred
            .mse_loss(&target, tch::Reduction::Mean)
            .double_value(&[]))
    };
    let eval_loss_start = eval_loss(&unet)?;

    let mut log = MetricsLog::open(&cfg.out_dir, state.step)?;
    let log_every = t.log_every.max(1);
    let bar = if t.progress {
        Some(TrainProgress::new(
            "decoder",
            t.steps as u64,
            start as u64,
            log_every as u64,
        ))
    } else {
        None
    };
    let rng = StepRng::new(state.seed);
    let mut guard = NanGuard::new(5).with_counts(state.consecutive_skips, state.skipped_total);
    let save = |state: &TrainState, opt: &AdamW| -> Result<PathBuf> {
        let model = var_store_state_dict(&vs);
        let ema = var_store_state_dict(&ema_vs);
        let optim = opt.state_dict()?;
        Ok(ck.save(
            state,
            &[("model", &model), ("optimizer", &optim), ("ema", &ema)],
        )?)
    };

    let mut losses = Vec::new();
    let mut grids = Vec::new();
    let end = if t.stop_after > 0 {
        t.stop_after.min(t.steps)
    } else {
        t.steps
    };
    while (state.step as usize) < end {
        let step = state.step;
        rng.begin_step(step); // everything random in this step derives from (seed, step)
        let idx = Tensor::randint(n_img, [t.batch_size], (Kind::Int64, device));
        let img = images.index_select(0, &idx);
        let x0 = to_x0(&img);
        let noise = x0.randn_like();
        let ts = Tensor::randint(
            cfg.scheduler.num_train_timesteps,
            [t.batch_size],
            (Kind::Int64, device),
        );
        let cond = tch::no_grad(|| conditioner.condition(&img))?;
        let keep = Tensor::rand([t.batch_size, 1, 1], (Kind::Float, device))
            .ge(t.cond_dropout)
            .to_kind(cond.kind());
        let cond = cond * keep; // dropped conditions become zeros (the sampling negative)
        let xt = scheduler.add_noise(&x0, &noise, &ts);
        let target = target_for(&scheduler, &x0, &noise, &ts);
        let pred = unet.forward(&xt, &ts.to_kind(Kind::Float), &cond, None, None)?;
        let loss = pred.mse_loss(&target, tch::Reduction::Mean);
        let loss_v = loss.double_value(&[]);
        let lr = schedule.lr_at(step);
        let mut grad_norm = f64::NAN;
        match guard.observe(step, loss_v) {
            StepVerdict::Apply => {
                opt.zero_grad();
                loss.backward();
                grad_norm = if t.grad_clip > 0.0 {
                    opt.clip_grad_norm(t.grad_clip)?
                } else {
                    opt.grad_norm()?
                };
                opt.step(lr)?;
                ema_update(&ema_vs, &vs, ema_decay_at(t.ema_decay, step as usize));
            }
            StepVerdict::Skip => {}
            StepVerdict::Stop => {
                let p = save(&state, &opt)?;
                return Err(guard.stop_error(step, Some(p)).into());
            }
        }
        state.step += 1;
        (state.consecutive_skips, state.skipped_total) =
            (guard.consecutive(), guard.skipped_total());
        losses.push(loss_v);
        log.log(
            step,
            &[("loss", loss_v), ("lr", lr), ("grad_norm", grad_norm)],
        )?;
        if let Some(b) = &bar {
            b.step(step as u64, &[("loss", loss_v)]);
        }
        let done = state.step as usize;
        if done.is_multiple_of(t.save_every.max(1)) && done != end {
            save(&state, &opt)?;
        }
        if t.sample_every > 0 && done.is_multiple_of(t.sample_every) && done != end {
            grids.push(sample_grid(
                cfg,
                &ema_unet,
                vae.as_ref().map(|(_, v)| v),
                &images,
                conditioner,
                done,
            )?);
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    let done = state.step.max(0) as usize;
    let checkpoint = save(&state, &opt)?;
    log.write_report("pixel decoder")?;
    let exported_unet = export_diffusers(cfg, &ema_vs, &unet_cfg)?;
    grids.push(sample_grid(
        cfg,
        &ema_unet,
        vae.as_ref().map(|(_, v)| v),
        &images,
        conditioner,
        done,
    )?);
    let eval_loss_end = eval_loss(&unet)?;
    let k = log_every.min(losses.len().max(1));
    let mean = |s: &[f64]| {
        if s.is_empty() {
            f64::NAN
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        }
    };
    let summary = TrainSummary {
        steps: done,
        eval_loss_start,
        eval_loss_end,
        train_loss_first: mean(&losses[..k.min(losses.len())]),
        train_loss_last: mean(&losses[losses.len().saturating_sub(k)..]),
        checkpoint,
        exported_unet,
        sample_grids: grids,
    };
    tracing::info!(
        "decoder training: eval loss {:.4} → {:.4}, train loss {:.4} → {:.4}",
        summary.eval_loss_start,
        summary.eval_loss_end,
        summary.train_loss_first,
        summary.train_loss_last
    );
    Ok(summary)
}

fn target_for(s: &DDIMScheduler, x0: &Tensor, noise: &Tensor, ts: &Tensor) -> Tensor {
    match s.config.prediction_type.as_str() {
        "v_prediction" => s.get_velocity(x0, noise, ts),
        "sample" => x0.shallow_clone(),
        _ => noise.shallow_clone(),
    }
}

fn ema_decay_at(decay: f64, step: usize) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

fn ema_update(ema: &nn::VarStore, vs: &nn::VarStore, decay: f64) {
    let _g = tch::no_grad_guard();
    let src = vs.variables();
    for (n, mut e) in ema.variables() {
        if let Some(p) = src.get(&n) {
            let new = &e * decay + p * (1.0 - decay);
            e.copy_(&new);
        }
    }
}

/// Export the EMA weights as diffusers folders `out_dir/unet` and `out_dir/scheduler`.
fn export_diffusers(
    cfg: &DecoderTrainConfig,
    ema: &nn::VarStore,
    unet_cfg: &UNet2DConditionModelConfig,
) -> Result<PathBuf> {
    let dir = cfg.out_dir.join("unet");
    std::fs::create_dir_all(&dir)?;
    let mut json = serde_json::to_value(unet_cfg)?;
    if let Some(o) = json.as_object_mut() {
        o.insert("_class_name".into(), "UNet2DConditionModel".into());
    }
    checkpoint::atomic_write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let sd: StateDict = ema
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    checkpoint::save_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), &sd, None)?;
    let sdir = cfg.out_dir.join("scheduler");
    std::fs::create_dir_all(&sdir)?;
    let mut sj = serde_json::to_value(&cfg.scheduler)?;
    if let Some(o) = sj.as_object_mut() {
        o.insert("_class_name".into(), "DDIMScheduler".into());
    }
    checkpoint::atomic_write(
        &sdir.join("scheduler_config.json"),
        serde_json::to_string_pretty(&sj)?.as_bytes(),
    )?;
    Ok(dir)
}

/// Sample with the EMA U-Net (DDIM, decoder guidance with zero negative conditions) from
/// the conditions of the first training images; write a grid: originals on top, samples
/// below. Returns the PNG path.
fn sample_grid(
    cfg: &DecoderTrainConfig,
    ema_unet: &UNet2DConditionModel,
    vae: Option<&AutoencoderKL>,
    images: &Tensor,
    conditioner: &dyn Conditioner,
    step: usize,
) -> Result<PathBuf> {
    let _g = tch::no_grad_guard();
    let t = &cfg.train;
    let n = t.sample_count.min(images.size()[0]).max(1);
    let img = images.narrow(0, 0, n);
    let cond = conditioner.condition(&img)?;
    let mut s = DDIMScheduler::new(cfg.scheduler.clone())?;
    s.set_timesteps(t.sample_steps.max(1))?;
    tch::manual_seed(t.seed.wrapping_add(77) as i64);
    let (c, h, w) = match vae {
        Some(v) => {
            let k = v.config.downscale();
            (
                v.config.latent_channels,
                img.size()[2] / k,
                img.size()[3] / k,
            )
        }
        None => (ema_unet.config.in_channels, img.size()[2], img.size()[3]),
    };
    let mut x = Tensor::randn([n, c, h, w], (Kind::Float, img.device()));
    let ehs = Tensor::cat(&[cond.zeros_like(), cond.shallow_clone()], 0);
    for ts in s.timesteps().to_vec() {
        let tt = Tensor::from(ts)
            .to_kind(Kind::Float)
            .to_device(img.device());
        let out = ema_unet.forward(&Tensor::cat(&[&x, &x], 0), &tt, &ehs, None, None)?;
        let p = out.chunk(2, 0);
        let eps = &p[0] + (&p[1] - &p[0]) * t.sample_guidance;
        x = s.step(&eps, ts, &x)?;
    }
    let samples = match vae {
        Some(v) => v.decode(&(x / v.config.scaling_factor)),
        None => x,
    };
    let to01 = |t: &Tensor| {
        let t = (t / 2.0 + 0.5).clamp(0.0, 1.0);
        if t.size()[1] == 1 {
            t.repeat([1, 3, 1, 1])
        } else {
            t
        }
    };
    let top = Tensor::cat(
        &img.unbind(0)
            .iter()
            .map(to01_one(&to01))
            .collect::<Vec<_>>(),
        2,
    ); // (3, H, nW)
    let bottom = Tensor::cat(
        &samples
            .unbind(0)
            .iter()
            .map(to01_one(&to01))
            .collect::<Vec<_>>(),
        2,
    );
    let grid = Tensor::cat(&[top, bottom], 1).unsqueeze(0); // (1, 3, 2H, nW)
    let dir = cfg.out_dir.join("samples");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("step-{step:06}.png"));
    crate::generate::save_pngs(&grid, &path)?;
    Ok(path)
}

fn to01_one<'a>(f: &'a dyn Fn(&Tensor) -> Tensor) -> impl Fn(&Tensor) -> Tensor + 'a {
    move |t: &Tensor| f(&t.unsqueeze(0)).squeeze_dim(0)
}

/// Arguments of `lavit train decoder`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML config (sections: out_dir, unet / unet_from, vae, scheduler, data, condition, train).
    #[arg(long)]
    pub config: PathBuf,
    /// Override `train.steps`.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Override `out_dir`.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let mut cfg = DecoderTrainConfig::from_toml_file(&args.config)?;
    if let Some(s) = args.steps {
        cfg.train.steps = s;
    }
    if let Some(o) = args.out_dir {
        cfg.out_dir = o;
    }
    let (images, skipped) =
        load_image_folder(&cfg.data.images, cfg.data.image_size, cfg.data.max_images)?;
    tracing::info!(
        "{} training images from {} ({skipped} skipped)",
        images.size()[0],
        cfg.data.images.display()
    );
    let device = Device::cuda_if_available_for(&cfg.train.device)?;
    let channels = if cfg.vae.is_some() {
        3
    } else {
        cfg.unet.in_channels
    };
    if images.size()[1] != channels {
        bail!("the U-Net trains on {channels} channels; the image folder gives RGB (set unet.in_channels = 3)");
    }
    let cond = PatchConditioner::new(
        3,
        cfg.data.image_size as i64,
        cfg.condition.grid,
        cfg.condition.dim,
        cfg.condition.seed,
        device,
    )?;
    let s = train(&cfg, &images, &cond)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// Parse a device name (`cpu`, `cuda`, `cuda:N`).
trait DeviceExt {
    fn cuda_if_available_for(name: &str) -> Result<Device>;
}

impl DeviceExt for Device {
    fn cuda_if_available_for(name: &str) -> Result<Device> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::cuda_if_available()),
            s if s.starts_with("cuda:") => {
                let i: usize = s[5..].parse().with_context(|| format!("device `{s}`"))?;
                Ok(Device::Cuda(i))
            }
            s => bail!("device `{s}`: cpu, cuda or cuda:N"),
        }
    }
}

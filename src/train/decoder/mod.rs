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
//!
//! The network trained is the pixel decoder's denoiser: the built-in U-Net (`[unet]` /
//! `unet_from`) or, with `[plugins.denoiser]`, a plugin's (`lavit_plugin_api::Denoiser`),
//! exported as `denoiser.safetensors` + `denoiser.json` beside `scheduler/`. Either way
//! `out_dir` is a pixel-decoding folder the pipeline loads.
//!
//! The U-Net (with its EMA copy, optimiser and the frozen VAE) lives in the pipeline's Decoder
//! stage actor (`lavit_decoder::stage::DecoderStageModel`, on the device
//! `placement.decoder` names) and trains there: each step is `TrainForward` (images +
//! conditions → loss, [`DecoderTrainer::forward`]) → `Backward` → `OptimizerStepWith`
//! ([`DecoderTrainer::step`]: clip, AdamW, EMA) through [`StageGraph`]; evaluation losses and
//! sample grids are forward messages too, checkpoints come from the stage (`GetTrainState`).
//! The data loop, conditioner, schedule, NaN policy, metrics and progress stay on the calling
//! thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lavit_decoder::schedulers::SchedulerConfig;
use lavit_decoder::unet_2d_condition::UNet2DConditionModelConfig;
use lavit_decoder::{AutoencoderKL, UNetDenoiser};
use lavit_plugin_api::Denoiser;
use lavit_runtime::actors::{GraphOptions, StageBuilders, StageGraph};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::dist::ProcessGroup;
use lavit_runtime::fsread;
use lavit_runtime::image_input::{self, ImageLimits};
use lavit_runtime::messages::{TrainBatch, TrainKey};
use lavit_runtime::plugin_host::{
    DenoiserManifest, PluginsConfig, TokenizerPlugins, DENOISER_MANIFEST,
};
use lavit_runtime::stage::{DecoderStage, Placement, StageKind};
use lavit_runtime::train::driver::checkpoint_dir;
use lavit_runtime::train::{drive, DriverConfig, LrSchedule, Metrics, Step, TrainJob, TrainState};

use crate::generate::{PixelDecoder, Resolution};
use lavit_decoder::stage::DecoderStageModel;
pub use lavit_decoder::train::{
    ema_decay_at, ema_update, keys, target_for, DecoderTrainer, TrainConfig,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

mod config;
pub use config::{ConditionConfig, DataConfig, DecoderTrainConfig};

/// Largest `data.image_size`: the decoder trains at most at the official 1024² (each image
/// is held as 3 × size² floats, and resized through a size² RGBA buffer).
pub const MAX_TRAIN_IMAGE_SIZE: u32 = 1024;
/// Most values of the frozen patch projection (2^28 floats = 1 GiB).
const MAX_PROJECTION: i64 = 1 << 28;

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
/// skipped with a warning; returns the tensor and the number skipped. The folder walk
/// refuses link loops and special files by name ([`fsread::walk_files`]); each image goes
/// through the one limited decoder.
pub fn load_image_folder(dir: &Path, size: u32, max_images: usize) -> Result<(Tensor, usize)> {
    if !(1..=MAX_TRAIN_IMAGE_SIZE).contains(&size) {
        bail!("data.image_size = {size}: must be in [1, {MAX_TRAIN_IMAGE_SIZE}]");
    }
    let files = fsread::walk_files(dir, fsread::MAX_WALK_DEPTH, |p| {
        fsread::has_extension(p, &["png", "jpg", "jpeg"])
    })
    .with_context(|| format!("data.images {}", dir.display()))?;
    let lim = ImageLimits::default();
    let mut data = Vec::new();
    let mut skipped = 0;
    let mut n = 0;
    for f in files {
        if max_images > 0 && n >= max_images {
            break;
        }
        let img = match image_input::read(&f, &lim) {
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
    /// Files written: the last checkpoint folder, the exported U-Net folder (`out_dir/unet`)
    /// or plugin denoiser weights (`out_dir/denoiser.safetensors`), the grids.
    pub checkpoint: PathBuf,
    pub exported_unet: PathBuf,
    pub sample_grids: Vec<PathBuf>,
    /// Data parallelism: ranks, wall seconds of this call's steps and of them the seconds
    /// spent in collectives (gradient averaging, loss and metric means).
    pub world_size: usize,
    pub loop_seconds: f64,
    pub comm_seconds: f64,
}

/// Train the pixel decoder on `images` (N, C, H, W) in [-1, 1] (C = 3 with a VAE, else the
/// U-Net's channels), the Decoder stage on `train.device`. `conditioner` gives the condition
/// tokens of each batch.
pub fn train(
    cfg: &DecoderTrainConfig,
    images: &Tensor,
    conditioner: &dyn Conditioner,
) -> Result<TrainSummary> {
    let device = &cfg.train.device;
    let device = if device == "cuda" && !tch::Cuda::is_available() {
        "cpu".to_string()
    } else {
        device.clone()
    };
    let placement = Placement {
        decoder: device,
        ..Placement::default()
    };
    let pg = Arc::new(ProcessGroup::single());
    train_placed(cfg, images, conditioner, &placement, &pg)
}

/// [`train`] with the Decoder stage where `placement.decoder` says (the serving placement),
/// data-parallel over `pg` (each rank trains on its share of every step's global batch of
/// `batch_size × world` images; rank 0 writes checkpoints, samples and the export).
pub fn train_placed(
    cfg: &DecoderTrainConfig,
    images: &Tensor,
    conditioner: &dyn Conditioner,
    placement: &Placement,
    pg: &Arc<ProcessGroup>,
) -> Result<TrainSummary> {
    cfg.validate()?;
    // Every step draws noise, timesteps and condition dropout from libtorch's generator: the
    // run holds the process's turn on it, so a job beside it in the same process (the demo
    // trains the LLM at the same time) can neither shift its numbers nor have its own shifted.
    let _turn = lavit_runtime::train::torch_rng_turn(cfg.train.seed);
    placement.device(StageKind::Decoder)?;
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("creating {}", cfg.out_dir.display()))?;
    // The built-in U-Net's config (None: a plugin denoiser, described by its stage below).
    let unet_cfg = match (&cfg.plugins.denoiser, &cfg.unet_from) {
        (Some(_), _) => None,
        (None, Some(dir)) => Some(UNet2DConditionModelConfig::from_json_file(
            &dir.join("config.json"),
        )?),
        (None, None) => Some(cfg.unet.clone()),
    };
    let images = images.to_kind(Kind::Float);
    if let Some(u) = &unet_cfg {
        if u.cross_attention_dim != conditioner.dim() {
            bail!(
                "the U-Net cross-attends to width {}, the conditioner gives {}",
                u.cross_attention_dim,
                conditioner.dim()
            );
        }
        let want_c = if cfg.vae.is_some() { 3 } else { u.in_channels };
        if images.dim() != 4 || images.size()[1] != want_c {
            bail!(
                "training images must be (N, {want_c}, H, W), got {:?}",
                images.size()
            );
        }
    } else if images.dim() != 4 {
        bail!(
            "training images must be (N, C, H, W), got {:?}",
            images.size()
        );
    }
    let plugins = TokenizerPlugins::load(&cfg.plugins)?;

    // The Decoder stage builds the denoiser (+ EMA, optimiser, frozen VAE) on its own device.
    let mut builders = StageBuilders::unused();
    let described = Arc::new(std::sync::Mutex::new(None::<DenoiserManifest>));
    let (c2, u2, d2) = (cfg.clone(), unet_cfg.clone(), described.clone());
    let (cond_dim, image_c) = (conditioner.dim(), images.size()[1]);
    builders.decoder = Box::new(move |dev| {
        let build = || -> Result<Box<dyn DecoderStage>> {
            let vae = match &c2.vae {
                Some(dir) => Some(AutoencoderKL::from_pretrained(dir, dev)?),
                None => None,
            };
            tch::manual_seed(c2.train.seed as i64);
            let (model, ema): (Box<dyn Denoiser>, Box<dyn Denoiser>) =
                match (&u2, &c2.plugins.denoiser) {
                    (Some(u2), _) => {
                        let unet = UNetDenoiser::new(u2.clone(), dev)?;
                        if let Some(dir) = &c2.unet_from {
                            let sd = checkpoint::load_path(dir)?;
                            checkpoint::load_into(
                                &unet.vs,
                                "",
                                &sd,
                                &dir.display().to_string(),
                                &Default::default(),
                            )?;
                        }
                        let ema = UNetDenoiser::new(u2.clone(), dev)?;
                        (Box::new(unet), Box::new(ema))
                    }
                    (None, Some(component)) => {
                        let build = || -> Result<Box<dyn Denoiser>> {
                            plugins
                                .denoiser(None, dev)?
                                .context("[plugins.denoiser] built no denoiser")
                        };
                        let (model, ema) = (build()?, build()?);
                        let want_c = match &vae {
                            Some((_, v)) => v.config.latent_channels,
                            None => image_c,
                        };
                        if model.in_channels() != want_c || model.cross_attention_dim() != cond_dim
                        {
                            bail!(
                            "denoiser `{}` takes {} channels and condition width {}; the training \
                             data gives {want_c} channels ({}) and condition width {cond_dim}",
                            model.name(),
                            model.in_channels(),
                            model.cross_attention_dim(),
                            if vae.is_some() { "VAE latents" } else { "image channels" }
                        );
                        }
                        *d2.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(DenoiserManifest::describe(component, model.as_ref()));
                        (model, ema)
                    }
                    (None, None) => {
                        bail!("no denoiser to train: give [unet], unet_from or [plugins.denoiser]")
                    }
                };
            let pixels = PixelDecoder::new(
                Resolution::Lowres,
                model,
                vae,
                c2.scheduler.clone(),
                None,
                dev,
            )?;
            let train = DecoderTrainer::new(&pixels, ema, &c2.train, &c2.scheduler)?;
            Ok(Box::new(DecoderStageModel::for_training(pixels, train)))
        };
        build().map_err(|e| lavit_runtime::Error::invalid(format!("{e:#}")))
    });
    let graph = StageGraph::spawn(builders, placement, GraphOptions::default())?;
    let export = match unet_cfg {
        Some(u) => Export::UNet(Box::new(u)),
        None => Export::Plugin(
            described
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .context("the Decoder stage did not describe its plugin denoiser")?,
        ),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(run_job(&graph, pg, cfg, &export, &images, conditioner));
    drop(graph);
    r
}

/// What the run exports: the U-Net as a diffusers folder, or a plugin denoiser's weights and
/// `denoiser.json`.
enum Export {
    UNet(Box<UNet2DConditionModelConfig>),
    Plugin(DenoiserManifest),
}

const DEC: StageKind = StageKind::Decoder;

/// Send one forward message to the Decoder stage.
async fn forward(g: &StageGraph, tensors: Vec<(TrainKey, Tensor)>) -> Result<TrainBatch> {
    let mut b = TrainBatch::new(vec![DEC]);
    for (k, t) in tensors {
        b.tensors.insert(k, t);
    }
    Ok(g.train_forward(b).await?)
}

/// Stage 1b as a job of the shared driver: every step draws `batch_size × world` image
/// indices from the step's seed, this rank conditions and sends its share.
struct DecoderJob<'a> {
    cfg: &'a DecoderTrainConfig,
    images: &'a Tensor,
    conditioner: &'a dyn Conditioner,
    end: usize,
    grids: Vec<PathBuf>,
    /// The fixed evaluation batch (images, conditions, noise seed) and its loss when the
    /// call started (after resume).
    eval: (Tensor, Tensor, Tensor),
    eval_loss_start: f64,
}

/// The loss of the fixed evaluation batch: same images, noise (drawn from the seed),
/// timesteps every time.
async fn eval_loss(g: &StageGraph, eval: &(Tensor, Tensor, Tensor)) -> Result<f64> {
    let out = forward(
        g,
        vec![
            (keys::EVAL_IMAGES, eval.0.shallow_clone()),
            (keys::COND, eval.1.shallow_clone()),
            (keys::EVAL_SEED, eval.2.shallow_clone()),
        ],
    )
    .await?;
    let l = out
        .tensors
        .get(&keys::EVAL_LOSS)
        .context("the Decoder stage returned no eval_loss")?;
    Ok(l.double_value(&[]))
}

impl TrainJob for DecoderJob<'_> {
    async fn start(&mut self, g: &StageGraph, _: &TrainState) -> lavit_runtime::Result<()> {
        self.eval_loss_start = eval_loss(g, &self.eval)
            .await
            .map_err(|e| lavit_runtime::Error::invalid(format!("{e:#}")))?;
        Ok(())
    }

    async fn step(&mut self, s: &mut Step<'_>) -> lavit_runtime::Result<Metrics> {
        let fail = |e: anyhow::Error| lavit_runtime::Error::invalid(format!("{e:#}"));
        let b = self.cfg.train.batch_size;
        let world = s.pg.world_size() as i64;
        let n_img = self.images.size()[0];
        let idx = Tensor::randint(n_img, [b * world], (Kind::Int64, self.images.device()));
        let rows = s.shard(b as usize);
        let mine = idx.narrow(0, rows.start as i64, b);
        let img = self.images.index_select(0, &mine);
        let cond = tch::no_grad(|| self.conditioner.condition(&img)).map_err(fail)?;
        // TrainForward: the noise, timesteps and condition dropout are drawn on the stage,
        // for the global batch (this rank keeps its rows).
        let mut batch = TrainBatch::new(vec![DEC]);
        batch.tensors.insert(keys::IMAGES, img);
        batch.tensors.insert(keys::COND, cond);
        if world > 1 {
            batch.set_rows(rows.start as i64, b * world);
        }
        let loss = s.forward(batch).await?.take_loss(keys::LOSS, DEC)?;
        s.backward(DEC, loss).await?;
        Ok(Vec::new())
    }

    async fn after_step(&mut self, g: &StageGraph, done: i64) -> lavit_runtime::Result<()> {
        let t = &self.cfg.train;
        let done = done.max(0) as usize;
        if t.sample_every > 0 && done.is_multiple_of(t.sample_every) && done != self.end {
            let grid = sample_grid(g, self.cfg, self.images, self.conditioner, done)
                .await
                .map_err(|e| lavit_runtime::Error::invalid(format!("{e:#}")))?;
            self.grids.push(grid);
        }
        Ok(())
    }
}

/// The stage-1b run: evaluation loss, the driver's loop, export and samples.
async fn run_job(
    g: &StageGraph,
    pg: &Arc<ProcessGroup>,
    cfg: &DecoderTrainConfig,
    export: &Export,
    images: &Tensor,
    conditioner: &dyn Conditioner,
) -> Result<TrainSummary> {
    let t = &cfg.train;
    let n_img = images.size()[0];
    let schedule = LrSchedule::warmup_cosine(
        t.lr,
        t.warmup_steps as i64,
        t.steps as i64,
        t.lr * t.min_lr_ratio,
    );
    schedule.validate("decoder training config", "train")?;
    let end = if t.stop_after > 0 {
        t.stop_after.min(t.steps)
    } else {
        t.steps
    };
    let driver = DriverConfig {
        name: "decoder".into(),
        out_dir: cfg.out_dir.clone(),
        stages: vec![DEC],
        schedule,
        steps: t.steps as i64,
        end: end as i64,
        run_steps: 0,
        save_every: t.save_every.max(1) as i64,
        keep: t.keep_checkpoints.max(1),
        max_nan_steps: 5,
        log_every: t.log_every.max(1) as u64,
        seed: t.seed,
        resume: t.resume,
        progress: t.progress,
        grad_clip: 0.0,  // the stage clips (after the driver averaged over ranks)
        torch_rng: true, // noise, timesteps, condition dropout (the run holds the turn)
    };

    let eval_img = images.narrow(0, 0, n_img.min(16));
    let eval_cond = tch::no_grad(|| conditioner.condition(&eval_img))?;
    let eval_seed = Tensor::from((t.seed ^ 0x5eed) as i64);
    let mut job = DecoderJob {
        cfg,
        images,
        conditioner,
        end,
        grids: Vec::new(),
        eval: (eval_img, eval_cond, eval_seed),
        eval_loss_start: f64::NAN,
    };
    let mut outcome = drive(g, pg, &driver, &mut job).await?;
    let done = outcome.state.step.max(0) as usize;
    let losses = std::mem::take(&mut outcome.losses);
    let eval_loss_start = job.eval_loss_start;
    let eval_loss_end = eval_loss(g, &job.eval).await?;
    let mut grids = job.grids;
    let (checkpoint, exported_unet) = if pg.is_rank0() {
        let ema = g
            .train_state(DEC)
            .await?
            .into_iter()
            .find(|(k, _)| k == "ema")
            .map(|(_, sd)| sd)
            .context("the Decoder stage has no EMA weights")?;
        let exported = export_denoiser(cfg, &ema, export)?;
        grids.push(sample_grid(g, cfg, images, conditioner, done).await?);
        let ck = match outcome.checkpoint.clone() {
            Some(p) => p,
            None => lavit_runtime::train::latest(&checkpoint_dir(&cfg.out_dir))?
                .context("the run wrote no checkpoint")?,
        };
        (ck, exported)
    } else {
        (PathBuf::new(), PathBuf::new())
    };
    let k = t.log_every.max(1).min(losses.len().max(1));
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
        world_size: pg.world_size(),
        loop_seconds: outcome.loop_seconds,
        comm_seconds: outcome.comm_seconds,
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
/// Export the EMA weights: the U-Net as the diffusers folder `out_dir/unet`, a plugin
/// denoiser as `out_dir/denoiser.safetensors` + `out_dir/denoiser.json`; and
/// `out_dir/scheduler`. Returns the U-Net folder or the plugin's weights file.
fn export_denoiser(cfg: &DecoderTrainConfig, ema: &StateDict, export: &Export) -> Result<PathBuf> {
    let sd: StateDict = ema.iter().map(|(k, v)| (k.clone(), v.detach())).collect();
    let exported = match export {
        Export::UNet(unet_cfg) => {
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
            checkpoint::save_safetensors(
                &dir.join("diffusion_pytorch_model.safetensors"),
                &sd,
                None,
            )?;
            dir
        }
        Export::Plugin(manifest) => {
            let weights = cfg.out_dir.join(format!(
                "{}.safetensors",
                lavit_runtime::layout::files::PLUGIN_DENOISER
            ));
            checkpoint::save_safetensors(&weights, &sd, None)?;
            checkpoint::atomic_write(
                &cfg.out_dir.join(DENOISER_MANIFEST),
                serde_json::to_string_pretty(manifest)?.as_bytes(),
            )?;
            weights
        }
    };
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
    Ok(exported)
}

/// Sample with the EMA U-Net on the Decoder stage (DDIM, decoder guidance with zero negative
/// conditions) from the conditions of the first training images; write a grid: originals on
/// top, samples below. Returns the PNG path.
async fn sample_grid(
    g: &StageGraph,
    cfg: &DecoderTrainConfig,
    images: &Tensor,
    conditioner: &dyn Conditioner,
    step: usize,
) -> Result<PathBuf> {
    let t = &cfg.train;
    let n = t.sample_count.min(images.size()[0]).max(1);
    let img = images.narrow(0, 0, n);
    let cond = tch::no_grad(|| conditioner.condition(&img))?;
    let hw = Tensor::from_slice(&[img.size()[2], img.size()[3]]);
    let out = forward(g, vec![(keys::SAMPLE_COND, cond), (keys::SAMPLE_HW, hw)]).await?;
    let samples = out
        .tensors
        .get(&keys::SAMPLES)
        .context("the Decoder stage returned no samples")?
        .to_device(img.device());
    let _g = tch::no_grad_guard();
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
    /// TOML config (sections: out_dir, unet / unet_from, vae, scheduler, data, condition, train,
    /// plugins). `[plugins]` loads plugin libraries: native code run in this process, trusted
    /// like a linked library; `[plugins.denoiser]` trains a plugin's denoiser instead of `[unet]`.
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
    lavit_runtime::device::resolve_device(&cfg.train.device).context("train.device")?;
    let channels = if cfg.vae.is_some() || cfg.plugins.denoiser.is_some() {
        3 // a plugin denoiser's channels are checked by the stage that builds it
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
        Device::Cpu, // the conditioner runs on the driver's side; the stage moves the batch
    )?;
    let rank = crate::train::join_group()?;
    let placement = Placement {
        decoder: rank
            .device
            .clone()
            .unwrap_or_else(|| cfg.train.device.clone()),
        ..Placement::default()
    };
    let s = train_placed(&cfg, &images, &cond, &placement, &rank.pg)?;
    if rank.pg.is_rank0() {
        println!("{}", serde_json::to_string_pretty(&s)?);
    }
    Ok(())
}

//! Stage-1 training of LaVIT's dynamic visual tokenizer (`lavit train tokenizer`), which the
//! official repository does not ship. Paper: Jin et al., ICLR 2024, §3.1 and §4 (loss
//! eq. 3); recipe from the authors in LaVIT issues #10 and #29.
//!
//! The encoder is frozen (its patch features are computed once per image). Trained: the
//! token selector, the merger, `encode_task_layer`, the codebook (EMA) and the lowres
//! feature decoder's trunk, with
//!
//! ```text
//! loss = mean(1 − cos(x, x_rec)) + λ · mean_b (ρ − mean_n M_bn)² + β‖l2(z) − sg(z_q)‖²
//! ```
//!
//! where M are Gumbel-softmax keep decisions (hard forward, soft backward; temperature
//! annealed from `tau_start` to `tau_end`). Phases: `steps_no_quant` steps without the
//! codebook (the decoder reads the l2-normalised continuous codes), then the codebook is
//! initialised by spherical k-means on encoder outputs, then end-to-end training with EMA
//! codebook updates and dead-code restarts.
//!
//! Every step's randomness (batch, Gumbel noise) is a function of `(seed, step)`, and the
//! checkpoint holds model, optimiser and codebook state, so resuming after N steps and
//! running N more equals 2N straight steps.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lavit_encoder::eva_vit::{EvaBackbone, EvaVitConfig};
use lavit_encoder::LaVITImageProcessor;
use lavit_plugin_api::{Backbone, Codebook};
use lavit_quantizer::{l2norm, spherical_kmeans, EmaConfig, VectorQuantizer};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::train::{
    splitmix64, var_store_state_dict, AdamW, AdamWConfig, Checkpointer, LrSchedule, MetricsLog,
    NanGuard, StepRng, StepVerdict, TrainProgress, TrainState,
};
use lavit_selector::SelectionMode;
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::tokenizer::{files, resolve_file, VisualTokenizer};
use lavit_decoder::feature_decoder::{FeatureDecoderConfig, VQDecoder};

/// Stage-1 configuration (`lavit train tokenizer --config FILE`, TOML). Defaults are a
/// small CPU run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerTrainConfig {
    /// Folder of training images, searched recursively (png, jpg, jpeg, bmp, gif).
    pub data_dir: PathBuf,
    /// Use at most this many images (0: all), in sorted path order.
    pub max_images: usize,
    /// A checkpoint folder whose `manifest.json` gives the sizes and whose
    /// `visual_tokenizer/eva_vitg_psz14.*` is the frozen encoder. Without it the sizes come
    /// from `manifest` and the encoder has random (frozen) weights.
    pub encoder_dir: Option<PathBuf>,
    /// A `manifest.json` for the sizes when `encoder_dir` is not given (official if none).
    pub manifest: Option<PathBuf>,
    /// Run folder: checkpoints, metrics, and the exported tokenizer (`export/`).
    pub out_dir: PathBuf,
    /// Run seed (batches, Gumbel noise, initial weights, k-means, restarts).
    pub seed: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Total steps.
    pub steps: i64,
    /// Stop after this many steps as if interrupted (for resume tests); None: run all.
    pub stop_after: Option<i64>,
    /// Phase 1 length: steps without quantisation.
    pub steps_no_quant: i64,
    /// k-means iterations for the codebook initialisation.
    pub kmeans_iters: usize,
    /// Batches of codes collected for k-means.
    pub kmeans_batches: usize,
    /// Peak learning rate, warm-up steps and cosine floor.
    pub lr: f64,
    pub warmup_steps: i64,
    pub min_lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient clipping (global L2 norm).
    pub grad_clip: f64,
    /// Target kept ratio ρ and its weight λ.
    pub rho: f64,
    pub lambda: f64,
    /// Gumbel temperature, annealed exponentially from start to end over the run.
    pub tau_start: f64,
    pub tau_end: f64,
    /// Commitment weight β.
    pub beta: f64,
    /// Weight of the mean binary entropy of the selector's keep probability (not in the
    /// paper): pushes decisions to be confident so that the deterministic arg-max used for
    /// serving keeps about as many tokens as Gumbel sampling does in training.
    pub confidence_weight: f64,
    /// EMA decay and dead-code threshold of the codebook.
    pub ema_decay: f64,
    pub dead_threshold: f64,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_every: i64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Non-finite losses in a row before the run stops.
    pub max_nan_steps: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

impl Default for TokenizerTrainConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/images"),
            max_images: 0,
            encoder_dir: None,
            manifest: None,
            out_dir: PathBuf::from("runs/tokenizer"),
            seed: 0,
            batch_size: 8,
            steps: 200,
            stop_after: None,
            steps_no_quant: 80,
            kmeans_iters: 10,
            kmeans_batches: 4,
            lr: 1e-3,
            warmup_steps: 10,
            min_lr: 1e-5,
            weight_decay: 0.01,
            grad_clip: 1.0,
            rho: 1.0 / 3.0,
            lambda: 2.0,
            tau_start: 1.0,
            tau_end: 0.3,
            beta: 0.25,
            confidence_weight: 0.05,
            ema_decay: 0.95,
            dead_threshold: 0.02,
            save_every: 50,
            keep_checkpoints: 2,
            max_nan_steps: 5,
            device: "cpu".into(),
        }
    }
}

impl TokenizerTrainConfig {
    /// Read a TOML file; errors name the file and the bad key.
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
        let pos = |k: &str, ok: bool| -> Result<()> {
            if ok {
                Ok(())
            } else {
                bail!("key `{k}`: must be positive")
            }
        };
        pos("batch_size", self.batch_size > 0)?;
        pos("steps", self.steps > 0)?;
        pos("lr", self.lr > 0.0)?;
        pos("tau_start", self.tau_start > 0.0)?;
        pos("tau_end", self.tau_end > 0.0)?;
        pos("save_every", self.save_every > 0)?;
        if !(0.0..=1.0).contains(&self.rho) {
            bail!("key `rho`: must be in [0, 1], got {}", self.rho);
        }
        if self.steps_no_quant < 0 || self.steps_no_quant > self.steps {
            bail!(
                "key `steps_no_quant`: must be in 0..={}, got {}",
                self.steps,
                self.steps_no_quant
            );
        }
        Ok(())
    }

    fn tau_at(&self, step: i64) -> f64 {
        let f = step as f64 / (self.steps.max(2) - 1) as f64;
        self.tau_start * (self.tau_end / self.tau_start).powf(f.min(1.0))
    }
}

/// What a run returns (the library entry point's "metrics out").
pub struct TrainReport {
    /// Steps completed (including earlier runs resumed from).
    pub steps: i64,
    /// Per-step metrics (loss, rec_loss, cos, kept, usage, perplexity, lr, tau).
    pub records: Vec<(i64, Vec<(String, f64)>)>,
    /// Images that could not be read and were skipped.
    pub skipped_images: usize,
    /// Images used.
    pub images: usize,
    /// The exported checkpoint folder (official layout, safetensors), when the run finished.
    pub export_dir: Option<PathBuf>,
    /// The trained tokenizer (lowres decoder included), ready for `tokenize`.
    pub tokenizer: VisualTokenizer,
}

impl TrainReport {
    /// The values of one metric in step order.
    pub fn series(&self, key: &str) -> Vec<f64> {
        self.records
            .iter()
            .filter_map(|(_, v)| v.iter().find(|(k, _)| k == key).map(|(_, x)| *x))
            .collect()
    }
}

/// Read every image under `dir` (recursively, sorted). Unreadable images are skipped with a
/// warning and counted. Returns ([M, 3, S, S], skipped).
pub fn load_image_folder(dir: &Path, size: i64, max_images: usize) -> Result<(Tensor, usize)> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(ext) = p.extension().and_then(|e| e.to_str()) {
                if ["png", "jpg", "jpeg", "bmp", "gif"].contains(&ext.to_ascii_lowercase().as_str())
                {
                    paths.push(p);
                }
            }
        }
    }
    paths.sort();
    let proc = LaVITImageProcessor::new(size as u32);
    let mut images = Vec::new();
    let mut skipped = 0;
    for p in paths {
        if max_images > 0 && images.len() >= max_images {
            break;
        }
        match proc.load(&p) {
            Ok(t) => images.push(t),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "skipping unreadable image");
                skipped += 1;
            }
        }
    }
    if images.is_empty() {
        bail!("no readable images under {}", dir.display());
    }
    Ok((Tensor::stack(&images, 0), skipped))
}

fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| anyhow::anyhow!("key `device`: unknown device `{s}`")),
    }
}

/// Batch of `step`: a seeded permutation per epoch, a pure function of (seed, step).
fn batch_indices(seed: u64, step: i64, n: usize, b: usize) -> Vec<i64> {
    let start = step as usize * b;
    (start..start + b)
        .map(|g| {
            let epoch = (g / n) as u64;
            let mut perm: Vec<usize> = (0..n).collect();
            let mut s = splitmix64(seed ^ splitmix64(epoch.wrapping_add(0x5eed)));
            for i in (1..n).rev() {
                s = splitmix64(s);
                perm.swap(i, (s % (i as u64 + 1)) as usize);
            }
            perm[g % n] as i64
        })
        .collect()
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

/// Deterministic initialisation of every variable of `vs` from `seed` (independent of
/// libtorch's global generator, so concurrent runs in one process stay reproducible), as
/// the official `_init_weights` does: biases 0, LayerNorm weights 1, everything else
/// truncated normal (σ = 0.02, cut at ±2σ).
pub fn init_weights(vs: &nn::VarStore, seed: u64) {
    let _g = tch::no_grad_guard();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state = splitmix64(seed ^ 0x1a71);
    let mut uniform = move || {
        state = splitmix64(state);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    for (name, var) in vars {
        let last = name.rsplit('.').next().unwrap_or(&name);
        let init = if last == "bias" || last.ends_with("_bias") {
            var.zeros_like()
        } else if var.dim() == 1 && last == "weight" {
            var.ones_like()
        } else {
            let n = var.numel();
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                // Box–Muller, redrawn outside ±2σ (truncated normal).
                let (u1, u2) = (uniform(), uniform());
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                if z.abs() <= 2.0 {
                    v.push((z * 0.02) as f32);
                }
            }
            Tensor::from_slice(&v)
                .reshape(var.size())
                .to_kind(var.kind())
        };
        var.shallow_clone().copy_(&init.to_device(var.device()));
    }
}

/// The trainable stage-1 model.
struct Stage1 {
    tok: VisualTokenizer,
    codebook: VectorQuantizer,
    dec_vs: nn::VarStore,
    decoder: VQDecoder,
}

impl Stage1 {
    fn is_trained(name: &str) -> bool {
        !name.starts_with("vit_proj") && !name.starts_with("unet_proj")
    }

    /// One forward: returns (loss, rec_loss, cos, kept, z_flat, ids).
    fn forward(
        &mut self,
        feats: &Tensor,
        cfg: &TokenizerTrainConfig,
        step: i64,
        seed: u64,
        quantize: bool,
    ) -> Result<(Tensor, f64, f64, f64, Tensor, Option<Tensor>)> {
        let mode = SelectionMode::Gumbel {
            seed,
            tau: cfg.tau_at(step),
        };
        let (log_probs, dec) = self.tok.select(feats, mode); // (B, N, 2), (B, N)
        let merged = self.tok.causal_encoder.forward(feats, &dec); // (B, N, C)
        let z = self.tok.encode_task_layer.forward(&merged); // (B, N, D)
        let (idx, mask) = kept_index(&dec);
        let d = z.size()[2];
        let z_sel = z.gather(1, &idx.unsqueeze(-1).expand([-1, -1, d], false), false); // (B, L, D)
        let dec_sel = dec.gather(1, &idx, false) * &mask; // (B, L)
        let keep = mask.gt(0.5);
        let z_flat = z_sel.masked_select(&keep.unsqueeze(-1)).reshape([-1, d]); // (T, D)
        let (codes_flat, qloss, ids) = if quantize {
            let q = self
                .codebook
                .quantize_train(&z_flat)
                .map_err(|e| anyhow::anyhow!("codebook: {e}"))?;
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
        let rec = self.decoder.trunk.decode_padded(&codes, &mask)?; // (B, N, C)
        let cos = Tensor::cosine_similarity(&rec, feats, -1, 1e-8); // (B, N)
        let rec_loss = (cos.neg() + 1.0).mean(Kind::Float);
        let kept = dec.mean_dim(1, false, Kind::Float); // (B,)
        let ratio_loss = (kept - cfg.rho).square().mean(Kind::Float) * cfg.lambda;
        let entropy = (log_probs.exp() * &log_probs)
            .sum_dim_intlist(-1, false, Kind::Float)
            .neg();
        let loss =
            &rec_loss + ratio_loss + qloss + entropy.mean(Kind::Float) * cfg.confidence_weight;
        let r = rec_loss.double_value(&[]);
        let c = cos.mean(Kind::Float).double_value(&[]);
        let k = dec.mean(Kind::Float).double_value(&[]);
        Ok((loss, r, c, k, z_flat.detach(), ids))
    }

    fn save_parts(&self) -> (StateDict, StateDict, StateDict) {
        (
            var_store_state_dict(&self.tok.vs),
            var_store_state_dict(&self.dec_vs),
            self.codebook.ema_state(),
        )
    }
}

/// `lavit train tokenizer` as a library call: images from `cfg.data_dir`, the encoder from
/// `cfg.encoder_dir` (or random at the manifest's sizes).
pub fn train(cfg: &TokenizerTrainConfig) -> Result<TrainReport> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let (manifest, encoder) = match &cfg.encoder_dir {
        Some(dir) => {
            let m = LavitManifest::for_checkpoint(dir)?;
            let p = resolve_file(dir, files::EVA)?;
            let e = EvaBackbone::load(&p, &EvaVitConfig::from_manifest(&m.tokenizer), device)?;
            (m, e)
        }
        None => {
            let m = match &cfg.manifest {
                Some(p) => LavitManifest::from_json_file(p)?,
                None => LavitManifest::official(),
            };
            let mut e = EvaBackbone::new(&EvaVitConfig::from_manifest(&m.tokenizer), device);
            init_weights(&e.vs, cfg.seed ^ 0xe7a);
            e.vs.freeze();
            (m, e)
        }
    };
    let (images, skipped) =
        load_image_folder(&cfg.data_dir, manifest.tokenizer.img_size, cfg.max_images)?;
    train_with_images(cfg, &manifest, encoder, &images, skipped)
}

/// The stage-1 loop on preprocessed images [M, 3, S, S] (CLIP-normalised) with a frozen
/// EVA encoder — what the demo calls after its stage 0.
pub fn train_with_images(
    cfg: &TokenizerTrainConfig,
    manifest: &LavitManifest,
    encoder: EvaBackbone,
    images: &Tensor,
    skipped_images: usize,
) -> Result<TrainReport> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let t = &manifest.tokenizer;
    let f = &manifest.feature_decoder;
    if f.decoder_out_dim != t.encoder_width {
        bail!(
            "feature_decoder.decoder_out_dim ({}) must equal tokenizer.encoder_width ({}) to reconstruct the encoder features",
            f.decoder_out_dim,
            t.encoder_width
        );
    }
    let m = images.size()[0] as usize;
    // Frozen encoder: features once.
    let eva_state: StateDict = var_store_state_dict(&encoder.vs)
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect();
    let feats_all = {
        let _g = tch::no_grad_guard();
        let mut v = Vec::new();
        for c in images.split(16, 0) {
            v.push(
                encoder
                    .forward(&c.to_device(device))
                    .map_err(|e| anyhow::anyhow!("encoder: {e}"))?,
            );
        }
        Tensor::cat(&v, 0).to_kind(Kind::Float)
    };

    // Model (initial weights from the run seed, see `init_weights`).
    let placeholder = VectorQuantizer::new(t.n_code, t.code_dim, device);
    let tok =
        VisualTokenizer::with_parts(manifest, device, Box::new(encoder), Box::new(placeholder));
    let codebook = VectorQuantizer::new(t.n_code, t.code_dim, device).with_ema(EmaConfig {
        decay: cfg.ema_decay,
        eps: 1e-5,
        dead_threshold: cfg.dead_threshold,
        seed: cfg.seed,
    });
    let mut codebook = codebook;
    codebook.beta = cfg.beta;
    let dec_vs = nn::VarStore::new(device);
    let decoder = VQDecoder::new(dec_vs.root(), &FeatureDecoderConfig::from_manifest(f));
    init_weights(&tok.vs, cfg.seed);
    init_weights(&dec_vs, cfg.seed ^ 0xdec);
    let mut model = Stage1 {
        tok,
        codebook,
        dec_vs,
        decoder,
    };

    let mut params: Vec<(String, Tensor)> = Vec::new();
    for (prefix, vs) in [("tokenizer.", &model.tok.vs), ("decoder.", &model.dec_vs)] {
        for (n, v) in lavit_runtime::train::trainable_variables(vs, Stage1::is_trained) {
            params.push((format!("{prefix}{n}"), v));
        }
    }
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?
    .no_decay(|n| lavit_runtime::train::is_no_decay(n) || n.ends_with("_embed"));
    let schedule = LrSchedule::warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr);

    let ck = Checkpointer::new(cfg.out_dir.join("checkpoints"), cfg.keep_checkpoints)?;
    let mut state = TrainState {
        seed: cfg.seed,
        ..Default::default()
    };
    if let Some(path) = ck.latest()? {
        let mut l = lavit_runtime::train::load(&path)?;
        let src = |p: &str| path.join(format!("{p}.safetensors")).display().to_string();
        checkpoint::load_into(
            &model.tok.vs,
            "",
            &l.take("tokenizer")?,
            &src("tokenizer"),
            &Default::default(),
        )?;
        checkpoint::load_into(
            &model.dec_vs,
            "",
            &l.take("decoder")?,
            &src("decoder"),
            &Default::default(),
        )?;
        model.codebook.load_ema_state(&l.take("codebook")?)?;
        opt.load_state_dict(&l.take("optimizer")?, &src("optimizer"))?;
        state = l.state;
        tracing::info!(step = state.step, path = %path.display(), "stage 1 resumed");
    }
    let rng = StepRng::new(state.seed);
    let mut guard =
        NanGuard::new(cfg.max_nan_steps).with_counts(state.consecutive_skips, state.skipped_total);
    let mut log = MetricsLog::open(&cfg.out_dir, state.step)?;
    let end = cfg.stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    let bar = TrainProgress::new("stage-1 tokenizer", cfg.steps as u64, state.step as u64, 20);
    let save = |state: &TrainState, model: &Stage1, opt: &AdamW| -> Result<PathBuf> {
        let (a, b, c) = model.save_parts();
        let o = opt.state_dict()?;
        Ok(ck.save(
            state,
            &[
                ("tokenizer", &a),
                ("decoder", &b),
                ("codebook", &c),
                ("optimizer", &o),
            ],
        )?)
    };

    while state.step < end {
        let step = state.step;
        let seed = rng.begin_step(step);
        let quantize = step >= cfg.steps_no_quant;
        if quantize && step == cfg.steps_no_quant {
            // Phase 2 starts: k-means initialisation of the codebook from encoder outputs.
            let _g = tch::no_grad_guard();
            let mut zs = Vec::new();
            for j in 0..cfg.kmeans_batches.max(1) {
                let idx = batch_indices(cfg.seed ^ 0xc0de, j as i64, m, cfg.batch_size);
                let fb = feats_all.index_select(0, &Tensor::from_slice(&idx).to_device(device));
                let (_, _, _, _, z, _) = model.forward(&fb, cfg, step, seed, false)?;
                zs.push(z);
            }
            let z = Tensor::cat(&zs, 0);
            let codes = spherical_kmeans(&z, t.n_code, cfg.kmeans_iters, cfg.seed);
            model.codebook.set_codes(&codes);
            bar.println(format!(
                "step {step}: codebook initialised by k-means on {} codes",
                z.size()[0]
            ));
        }
        let idx = batch_indices(cfg.seed, step, m, cfg.batch_size);
        let fb = feats_all.index_select(0, &Tensor::from_slice(&idx).to_device(device));
        let (loss, rec, cos, kept, z, ids) = model.forward(&fb, cfg, step, seed, quantize)?;
        let lv = loss.double_value(&[]);
        let lr = schedule.lr_at(step);
        match guard.observe(step, lv) {
            StepVerdict::Apply => {
                opt.zero_grad();
                loss.backward();
                opt.clip_grad_norm(cfg.grad_clip)?;
                opt.step(lr)?;
                if let Some(ids) = &ids {
                    model
                        .codebook
                        .update(&z, ids)
                        .map_err(|e| anyhow::anyhow!("codebook update: {e}"))?;
                }
            }
            StepVerdict::Skip => {}
            StepVerdict::Stop => {
                let p = save(&state, &model, &opt)?;
                return Err(guard.stop_error(step, Some(p)).into());
            }
        }
        let (usage, ppl) = match &ids {
            Some(ids) => VectorQuantizer::usage(ids, t.n_code),
            None => (0.0, 0.0),
        };
        state.step += 1;
        (state.consecutive_skips, state.skipped_total) =
            (guard.consecutive(), guard.skipped_total());
        let metrics = [
            ("loss", lv),
            ("rec_loss", rec),
            ("cos", cos),
            ("kept", kept),
            ("usage", usage),
            ("perplexity", ppl),
            ("lr", lr),
            ("tau", cfg.tau_at(step)),
        ];
        log.log(step, &metrics)?;
        bar.step(
            step as u64,
            &[("loss", lv), ("cos", cos), ("kept", kept), ("ppl", ppl)],
        );
        if state.step % cfg.save_every == 0 || state.step == end {
            save(&state, &model, &opt)?;
        }
    }
    bar.finish();
    log.write_report("stage-1 tokenizer")?;
    let records = log
        .records()
        .iter()
        .map(|(s, v)| (*s, v.iter().map(|(k, x)| (k.clone(), *x)).collect()))
        .collect();

    let Stage1 {
        mut tok,
        codebook,
        dec_vs,
        decoder,
    } = model;
    let export_dir = if state.step >= cfg.steps {
        let dir = cfg.out_dir.join("export");
        export(&dir, manifest, &eva_state, &tok.vs, &codebook, &dec_vs)?;
        Some(dir)
    } else {
        None
    };
    tok.quantize = Box::new(codebook);
    tok.lowres_decoder = Some((dec_vs, decoder));
    Ok(TrainReport {
        steps: state.step,
        records,
        skipped_images,
        images: m,
        export_dir,
        tokenizer: tok,
    })
}

/// Write a checkpoint folder in the official layout (safetensors) that
/// [`VisualTokenizer::from_checkpoint`] loads: manifest.json, the encoder, the tokenizer
/// encoder (with `quantize.embedding.weight`) and the lowres feature decoder.
pub fn export(
    dir: &Path,
    manifest: &LavitManifest,
    eva: &StateDict,
    tok_vs: &nn::VarStore,
    codebook: &VectorQuantizer,
    dec_vs: &nn::VarStore,
) -> Result<()> {
    let vt = dir.join("visual_tokenizer");
    std::fs::create_dir_all(&vt).with_context(|| format!("creating {}", vt.display()))?;
    let mut enc = var_store_state_dict(tok_vs);
    enc.insert("quantize.embedding.weight".into(), codebook.weight.detach());
    let st = |name: &str| dir.join(format!("{name}.safetensors"));
    checkpoint::save_safetensors(&st(files::EVA), eva, None)?;
    checkpoint::save_safetensors(&st(files::TOKENIZER_ENCODER), &enc, None)?;
    checkpoint::save_safetensors(
        &st(files::LOWRES_DECODER),
        &var_store_state_dict(dec_vs),
        None,
    )?;
    let json = serde_json::to_vec_pretty(manifest)?;
    checkpoint::atomic_write(&dir.join("manifest.json"), &json)?;
    Ok(())
}

/// Arguments of `lavit train tokenizer`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training config (TOML, keys of [`TokenizerTrainConfig`]).
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TokenizerTrainConfig::from_toml_file(&args.config)?;
    let r = train(&cfg)?;
    let loss = r.series("loss");
    println!(
        "{}",
        serde_json::json!({
            "steps": r.steps,
            "images": r.images,
            "skipped_images": r.skipped_images,
            "first_loss": loss.first(),
            "last_loss": loss.last(),
            "last_cos": r.series("cos").last(),
            "last_kept": r.series("kept").last(),
            "last_perplexity": r.series("perplexity").last(),
            "export": r.export_dir,
        })
    );
    Ok(())
}

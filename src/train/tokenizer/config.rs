//! The stage-1 configuration file (`lavit train tokenizer --config FILE`).

use super::*;

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
    /// Where ρ applies: `batch` (the batch's mean kept ratio; each image keeps what its
    /// reconstruction needs) or `image` (every image's ratio, DynamicViT's form).
    pub ratio_scope: RatioScope,
    /// With `ratio_scope = "batch"`: an image whose mean keep probability falls below this
    /// is pulled back (against collapse); 0: no floor.
    pub floor: f64,
    /// Gumbel temperature, annealed exponentially from start to end over the run.
    pub tau_start: f64,
    pub tau_end: f64,
    /// Commitment weight β.
    pub beta: f64,
    /// Weight of the mean binary entropy of the selector's keep probability (not in the
    /// paper): pushes decisions to be confident so that the deterministic arg-max used for
    /// serving keeps about as many tokens as Gumbel sampling does in training. 0.3: on the
    /// demo's held-out photos the arg-max and the sampled selection then keep the same patches
    /// (kept ratio 0.340 | 0.341); at 0.05 the arg-max kept 0.203 against 0.337 sampled.
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
    /// `cpu` or `cuda:N`: where the parts the trainer builds live, and every stage's device
    /// unless `placement` says otherwise.
    pub device: String,
    /// Where each stage runs: the `[placement]` table of a serving config (`encoder`,
    /// `selector_merger`, `quantizer`, …). None: every stage on `device`.
    #[serde(skip_serializing)]
    pub placement: Option<Placement>,
    /// A placement file shared with serving (`configs/placement-*.toml`, relative to this
    /// config file); read into `placement` (giving both is an error).
    pub placement_file: Option<PathBuf>,
    /// Plugin libraries and the backbone / codebook taken from them instead of EVA-CLIP and
    /// the built-in VQ (the same `[plugins]` section `lavit serve` and `lavit tokenize`
    /// read). A plugin backbone replaces `encoder_dir`'s EVA. Plugins are native code loaded
    /// into this process, trusted like any shared library.
    pub plugins: PluginsConfig,
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
            ratio_scope: RatioScope::Batch,
            floor: 0.1,
            tau_start: 1.0,
            tau_end: 0.3,
            beta: 0.25,
            confidence_weight: 0.3,
            ema_decay: 0.95,
            dead_threshold: 0.02,
            save_every: 50,
            keep_checkpoints: 2,
            max_nan_steps: 5,
            device: "cpu".into(),
            placement: None,
            placement_file: None,
            plugins: PluginsConfig::default(),
        }
    }
}

impl lavit_runtime::config::Validate for TokenizerTrainConfig {}

impl TokenizerTrainConfig {
    /// Read a TOML file through the one config mechanism
    /// ([`lavit_runtime::config::load_config`]: `LAVIT__KEY` overrides); errors name the file
    /// (or variable) and the bad key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let mut cfg: Self = lavit_runtime::config::load_config(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.plugins = cfg.plugins.resolved(base);
        if let Some(file) = &cfg.placement_file {
            if cfg.placement.is_some() {
                bail!(
                    "config {}: give either [placement] or `placement_file`, not both",
                    path.display()
                );
            }
            let file = base.join(file);
            cfg.placement = Some(
                Placement::from_file(&file)
                    .with_context(|| format!("config {}: placement_file", path.display()))?,
            );
            cfg.placement_file = Some(file);
        }
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
        if !(0.0..1.0).contains(&self.floor) {
            bail!("key `floor`: must be in [0, 1), got {}", self.floor);
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

    /// The Gumbel temperature of `step`.
    pub fn tau_at(&self, step: i64) -> f64 {
        let f = step as f64 / (self.steps.max(2) - 1) as f64;
        self.tau_start * (self.tau_end / self.tau_start).powf(f.min(1.0))
    }
}

//! The pixel-decoder training config (`lavit train decoder --config FILE`).

use super::*;

/// Where the training images come from (for the CLI; the library takes a tensor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A folder searched recursively for PNG/JPEG images.
    pub images: PathBuf,
    /// Images are resized (squashed) to this square size ([`MAX_TRAIN_IMAGE_SIZE`] at most).
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
    /// Plugins (the `[plugins]` section of every config): with `[plugins.denoiser]` the
    /// plugin's denoiser trains instead of `[unet]` (relative paths: against the config
    /// file's folder).
    pub plugins: PluginsConfig,
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
            plugins: PluginsConfig::default(),
        }
    }
}

impl lavit_runtime::config::Validate for DecoderTrainConfig {}

impl DecoderTrainConfig {
    /// Read a TOML config through the one config mechanism
    /// ([`lavit_runtime::config::load_config`]: `LAVIT__SECTION__KEY` overrides); errors name
    /// the file (or variable) and the key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let mut cfg: Self = lavit_runtime::config::load_config(path)?;
        cfg.plugins = cfg
            .plugins
            .resolved(path.parent().unwrap_or(Path::new(".")));
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
        let size = self.data.image_size;
        if !(8..=MAX_TRAIN_IMAGE_SIZE).contains(&size) {
            bail!("data.image_size = {size}: must be in [8, {MAX_TRAIN_IMAGE_SIZE}]");
        }
        let grid = self.condition.grid;
        if grid > size as i64 || size as i64 % grid != 0 {
            bail!("condition.grid = {grid} must divide data.image_size = {size}");
        }
        // The frozen projection is (3·(size/grid)², dim) floats.
        let patch = size as i64 / grid;
        let proj = 3 * patch * patch;
        if proj
            .checked_mul(self.condition.dim)
            .is_none_or(|n| n > MAX_PROJECTION)
        {
            bail!(
                "condition.dim = {} with patches of {patch}² pixels (data.image_size / \
                 condition.grid) makes a {proj} × {} projection, over {MAX_PROJECTION} values",
                self.condition.dim,
                self.condition.dim
            );
        }
        if self.plugins.denoiser.is_some() && self.unet_from.is_some() {
            bail!("give either [plugins.denoiser] or unet_from, not both");
        }
        if self.unet_from.is_none() && self.plugins.denoiser.is_none() {
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

//! Diffusion schedulers behind one trait (reference: `diffusers/schedulers/`): DDIM (what
//! LaVIT samples with) and Euler discrete, each built from a diffusers `scheduler_config.json`.

pub mod ddim;
pub mod euler;

use std::path::Path;

use lavit_runtime::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use ddim::DDIMScheduler;
pub use euler::EulerDiscreteScheduler;

/// The method set every sampler shares (as in diffusers and diffusers-rs).
pub trait Scheduler: Send {
    /// Choose `n` inference timesteps out of the training schedule.
    fn set_timesteps(&mut self, n: usize) -> Result<()>;
    /// The current inference timesteps, first to last (descending).
    fn timesteps(&self) -> &[f64];
    /// Scale the denoising model input at `timestep` (identity for DDIM).
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Tensor;
    /// One reverse step: from the model output at `timestep` and the current sample, the
    /// previous (less noisy) sample.
    fn step(&mut self, model_output: &Tensor, timestep: f64, sample: &Tensor) -> Result<Tensor>;
    /// Forward diffusion: `original` noised with `noise` to the per-sample integer
    /// training `timesteps` (B,).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor;
    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;
}

/// The fields of a diffusers `scheduler_config.json` (DDIM, DDPM, Euler, DPM-Solver share them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Which diffusers class wrote this file (`DDIMScheduler`, `EulerDiscreteScheduler`, …).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Training timesteps.
    pub num_train_timesteps: i64,
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit betas (override the schedule).
    pub trained_betas: Option<Vec<f64>>,
    /// Clip the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: bool,
    /// Clip range.
    pub clip_sample_range: f64,
    /// DDIM: use ᾱ = 1 for the step past the last one (else ᾱ₀).
    pub set_alpha_to_one: bool,
    /// Added to the `leading` timesteps.
    pub steps_offset: i64,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: String,
    /// Rescale betas to zero terminal SNR (not supported when true).
    pub rescale_betas_zero_snr: bool,
    /// Dynamic thresholding (not supported when true).
    pub thresholding: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
            thresholding: false,
        }
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are spread over the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl SchedulerConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = lavit_runtime::fsread::read_config(path)?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::config(path.display().to_string(), "(json)", e.to_string()))?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        use lavit_runtime::manifest::caps::MAX_TRAIN_TIMESTEPS;
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&self.num_train_timesteps) {
            return Err(Error::config(
                origin,
                "num_train_timesteps",
                format!(
                    "must be in 2..={MAX_TRAIN_TIMESTEPS}, got {}",
                    self.num_train_timesteps
                ),
            ));
        }
        for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                return Err(Error::config(
                    origin,
                    key,
                    format!("must be a finite number in [0, 1), got {v}"),
                ));
            }
        }
        if let Some(b) = &self.trained_betas {
            if let Some(v) = b
                .iter()
                .find(|v| !(v.is_finite() && (0.0..1.0).contains(*v)))
            {
                return Err(Error::config(
                    origin,
                    "trained_betas",
                    format!("every beta must be a finite number in [0, 1), got {v}"),
                ));
            }
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return Err(Error::config(
                origin,
                "clip_sample_range",
                format!(
                    "must be finite and positive, got {}",
                    self.clip_sample_range
                ),
            ));
        }
        if !(0..self.num_train_timesteps).contains(&self.steps_offset) {
            return Err(Error::config(
                origin,
                "steps_offset",
                format!(
                    "must be in 0..num_train_timesteps ({}), got {}",
                    self.num_train_timesteps, self.steps_offset
                ),
            ));
        }
        if self.rescale_betas_zero_snr || self.thresholding {
            return Err(Error::config(
                origin,
                "rescale_betas_zero_snr",
                "zero-SNR rescaling and thresholding are not supported".to_string(),
            ));
        }
        self.prediction(origin)?;
        self.spacing(origin)?;
        let _ = self.betas(origin)?;
        Ok(())
    }

    pub fn prediction(&self, origin: &str) -> Result<PredictionType> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            v => Err(Error::config(
                origin,
                "prediction_type",
                format!("`{v}`: epsilon, v_prediction or sample"),
            )),
        }
    }

    pub fn spacing(&self, origin: &str) -> Result<TimestepSpacing> {
        match self.timestep_spacing.as_str() {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            "linspace" => Ok(TimestepSpacing::Linspace),
            v => Err(Error::config(
                origin,
                "timestep_spacing",
                format!("`{v}`: leading, trailing or linspace"),
            )),
        }
    }

    /// β₁…β_T in float32, as diffusers computes them.
    pub fn betas(&self, origin: &str) -> Result<Tensor> {
        let n = self.num_train_timesteps;
        let opts = (Kind::Float, tch::Device::Cpu);
        if let Some(b) = &self.trained_betas {
            if b.len() as i64 != n {
                return Err(Error::config(
                    origin,
                    "trained_betas",
                    format!("{} values for {n} timesteps", b.len()),
                ));
            }
            return Ok(Tensor::from_slice(b).to_kind(Kind::Float));
        }
        match self.beta_schedule.as_str() {
            "linear" => Ok(Tensor::linspace(self.beta_start, self.beta_end, n, opts)),
            "scaled_linear" => {
                Ok(
                    Tensor::linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n, opts)
                        .square(),
                )
            }
            "squaredcos_cap_v2" => {
                // betas_for_alpha_bar with the cosine ᾱ(t) = cos²((t + 0.008)/1.008 · π/2), β ≤ 0.999
                let abar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                let v: Vec<f64> = (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - abar(t2) / abar(t1)).min(0.999)
                    })
                    .collect();
                Ok(Tensor::from_slice(&v).to_kind(Kind::Float))
            }
            v => Err(Error::config(
                origin,
                "beta_schedule",
                format!("`{v}`: linear, scaled_linear or squaredcos_cap_v2"),
            )),
        }
    }

    /// ᾱ_t = Π(1 − β) in float32 (as f64 values), t = 0…T−1.
    pub fn alphas_cumprod(&self, origin: &str) -> Result<Vec<f64>> {
        let betas = self.betas(origin)?;
        let ac = (betas.ones_like() - betas).cumprod(0, Kind::Float);
        let v: Vec<f32> =
            Vec::try_from(&ac).map_err(|e| Error::invalid(format!("alphas_cumprod: {e}")))?;
        Ok(v.into_iter().map(f64::from).collect())
    }
}

/// Build the scheduler a `scheduler_config.json` names (`_class_name`), DDIM when unnamed.
/// `override_class` picks another one (`ddim` or `euler`) with the same betas.
pub fn from_config(
    cfg: &SchedulerConfig,
    override_class: Option<&str>,
) -> Result<Box<dyn Scheduler>> {
    let which = match override_class {
        Some(c) => c.to_ascii_lowercase(),
        None => match cfg.class_name.as_deref() {
            Some("EulerDiscreteScheduler") => "euler".into(),
            _ => "ddim".into(),
        },
    };
    match which.as_str() {
        "ddim" => Ok(Box::new(DDIMScheduler::new(cfg.clone())?)),
        "euler" => Ok(Box::new(EulerDiscreteScheduler::new(cfg.clone())?)),
        other => Err(Error::invalid(format!(
            "unknown scheduler `{other}` (ddim or euler)"
        ))),
    }
}

/// ᾱ at integer training timesteps, gathered for a (B,) tensor and shaped to broadcast over
/// `like` (B, …).
pub(crate) fn gather_broadcast(values: &[f64], timesteps: &Tensor, like: &Tensor) -> Tensor {
    let table = Tensor::from_slice(values)
        .to_device(like.device())
        .to_kind(like.kind());
    let g = table.index_select(0, &timesteps.to_device(like.device()).to_kind(Kind::Int64));
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
    g.view(shape.as_slice())
}

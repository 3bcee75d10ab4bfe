//! Euler discrete sampler (Karras et al. 2022, Algorithm 2 with s_churn = 0) as diffusers'
//! `schedulers/scheduling_euler_discrete.py`, on the same betas as DDIM.

use lavit_runtime::{Error, Result};
use tch::Tensor;

use super::ddim::round_half_even;
use super::{gather_broadcast, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};

/// Euler discrete with σ_t = √((1 − ᾱ_t)/ᾱ_t).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    pub config: SchedulerConfig,
    /// ᾱ_t, t = 0…T−1.
    pub alphas_cumprod: Vec<f64>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    /// σ at each inference step, then a final 0.
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

impl EulerDiscreteScheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let origin = "EulerDiscreteScheduler config";
        config.validate(origin)?;
        let alphas_cumprod = config.alphas_cumprod(origin)?;
        let prediction = config.prediction(origin)?;
        if prediction == PredictionType::Sample {
            return Err(Error::config(
                origin,
                "prediction_type",
                "Euler supports epsilon and v_prediction",
            ));
        }
        let spacing = config.spacing(origin)?;
        let mut s = Self {
            config,
            alphas_cumprod,
            prediction,
            spacing,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
        };
        // Before set_timesteps: every training timestep, descending (as diffusers' __init__).
        let n = s.config.num_train_timesteps;
        s.timesteps = (0..n).rev().map(|t| t as f64).collect();
        s.sigmas = s
            .timesteps
            .iter()
            .map(|&t| s.train_sigma(t))
            .chain([0.0])
            .collect();
        Ok(s)
    }

    fn train_sigma(&self, t: f64) -> f64 {
        // np.interp over integer timesteps
        let n = self.alphas_cumprod.len();
        let sig = |i: usize| ((1.0 - self.alphas_cumprod[i]) / self.alphas_cumprod[i]).sqrt();
        let t = t.clamp(0.0, (n - 1) as f64);
        let lo = t.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        let w = t - lo as f64;
        sig(lo) * (1.0 - w) + sig(hi) * w
    }

    fn index_of(&self, timestep: f64) -> Result<usize> {
        self.timesteps
            .iter()
            .position(|&t| (t - timestep).abs() < 1e-6)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "timestep {timestep} is not one of the scheduled ones"
                ))
            })
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let big_n = self.config.num_train_timesteps;
        if n == 0 || n as i64 > big_n {
            return Err(Error::invalid(format!(
                "Euler steps must be in 1..={big_n}, got {n}"
            )));
        }
        let ts: Vec<f64> = match self.spacing {
            TimestepSpacing::Linspace => {
                let last = (big_n - 1) as f64;
                (0..n)
                    .rev()
                    .map(|i| {
                        if n == 1 {
                            0.0
                        } else {
                            last * i as f64 / (n - 1) as f64
                        }
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = big_n / n as i64;
                (0..n as i64)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = big_n as f64 / n as f64;
                (0..n)
                    .map(|i| round_half_even(big_n as f64 - i as f64 * ratio) - 1.0)
                    .collect()
            }
        };
        if ts.iter().any(|&t| t < 0.0 || t > (big_n - 1) as f64) {
            return Err(Error::invalid(format!(
                "{n} steps give a timestep outside 0..{big_n}"
            )));
        }
        self.sigmas = ts
            .iter()
            .map(|&t| self.train_sigma(t))
            .chain([0.0])
            .collect();
        self.timesteps = ts;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Tensor {
        let sigma = self
            .index_of(timestep)
            .map(|i| self.sigmas[i])
            .unwrap_or(0.0);
        sample / (sigma * sigma + 1.0).sqrt()
    }

    fn step(&mut self, model_output: &Tensor, timestep: f64, sample: &Tensor) -> Result<Tensor> {
        let i = self.index_of(timestep)?;
        let sigma = self.sigmas[i];
        let x0 = match self.prediction {
            PredictionType::Epsilon => sample - model_output * sigma,
            // x0 = out · (−σ/√(σ²+1)) + sample/(σ²+1)
            _ => {
                model_output * (-sigma / (sigma * sigma + 1.0).sqrt())
                    + sample / (sigma * sigma + 1.0)
            }
        };
        let derivative = (sample - x0) / sigma;
        let dt = self.sigmas[i + 1] - sigma;
        Ok(sample + derivative * dt)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let n = self.alphas_cumprod.len();
        let sig: Vec<f64> = (0..n).map(|i| self.train_sigma(i as f64)).collect();
        original + gather_broadcast(&sig, timesteps, original) * noise
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }
}

//! DDIM (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021), deterministic
//! (η = 0), as diffusers' `schedulers/scheduling_ddim.py` — the sampler LaVIT uses.

use lavit_runtime::{Error, Result};
use tch::Tensor;

use super::{gather_broadcast, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};

/// DDIM with the betas, spacing and prediction type of a `scheduler_config.json`.
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    pub config: SchedulerConfig,
    /// ᾱ_t, t = 0…T−1 (float32 values).
    pub alphas_cumprod: Vec<f64>,
    /// ᾱ used past the last step: 1 with `set_alpha_to_one`, else ᾱ₀.
    pub final_alpha_cumprod: f64,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl DDIMScheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let origin = "DDIMScheduler config";
        config.validate(origin)?;
        let alphas_cumprod = config.alphas_cumprod(origin)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let prediction = config.prediction(origin)?;
        let spacing = config.spacing(origin)?;
        // Before set_timesteps: every training timestep, descending.
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            spacing,
            num_inference_steps: 0,
            timesteps,
        })
    }

    /// The integer timesteps diffusers picks for `n` steps.
    pub fn compute_timesteps(&self, n: usize) -> Vec<i64> {
        let big_n = self.config.num_train_timesteps;
        let n_i = n as i64;
        match self.spacing {
            TimestepSpacing::Leading => {
                // (arange(0, n) * (T // n)).round()[::-1] + steps_offset
                let ratio = big_n / n_i;
                (0..n_i)
                    .rev()
                    .map(|i| i * ratio + self.config.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // round(arange(T, 0, -T/n)) - 1
                let ratio = big_n as f64 / n as f64;
                let mut v = Vec::new();
                let mut x = big_n as f64;
                while x > 0.0 {
                    v.push(round_half_even(x) as i64 - 1);
                    x -= ratio;
                }
                v
            }
            TimestepSpacing::Linspace => {
                // linspace(0, T - 1, n).round()[::-1]
                let last = (big_n - 1) as f64;
                (0..n)
                    .rev()
                    .map(|i| {
                        let x = if n == 1 {
                            0.0
                        } else {
                            last * i as f64 / (n - 1) as f64
                        };
                        round_half_even(x) as i64
                    })
                    .collect()
            }
        }
    }

    fn alpha_at(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// The v-prediction target √ᾱ·ε − √(1−ᾱ)·x₀ at training `timesteps` (B,).
    pub fn get_velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let sa: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let s1: Vec<f64> = self
            .alphas_cumprod
            .iter()
            .map(|a| (1.0 - a).sqrt())
            .collect();
        gather_broadcast(&sa, timesteps, sample) * noise
            - gather_broadcast(&s1, timesteps, sample) * sample
    }
}

/// numpy's `round` (half to even).
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

impl Scheduler for DDIMScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let big_n = self.config.num_train_timesteps as usize;
        if n == 0 || n > big_n {
            return Err(Error::invalid(format!(
                "DDIM steps must be in 1..={big_n}, got {n}"
            )));
        }
        let ts = self.compute_timesteps(n);
        if let Some(bad) = ts.iter().find(|&&t| t < 0 || t >= big_n as i64) {
            return Err(Error::invalid(format!(
                "{n} steps with steps_offset {} give timestep {bad} outside 0..{big_n}",
                self.config.steps_offset
            )));
        }
        self.num_inference_steps = n;
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Tensor {
        sample.shallow_clone()
    }

    fn step(&mut self, model_output: &Tensor, timestep: f64, sample: &Tensor) -> Result<Tensor> {
        if self.num_inference_steps == 0 {
            return Err(Error::invalid("DDIM step before set_timesteps"));
        }
        let t = timestep as i64;
        if t < 0 || t >= self.config.num_train_timesteps {
            return Err(Error::invalid(format!("DDIM timestep {t} out of range")));
        }
        // prev_timestep = timestep - T // n
        let prev = t - self.config.num_train_timesteps / self.num_inference_steps as i64;
        let a_t = self.alpha_at(t);
        let a_prev = self.alpha_at(prev);
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => {
                let x0 = (sample - model_output * b_t.sqrt()) / a_t.sqrt();
                (x0, model_output.shallow_clone())
            }
            PredictionType::Sample => {
                let eps = (sample - model_output * a_t.sqrt()) / b_t.sqrt();
                (model_output.shallow_clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = sample * a_t.sqrt() - model_output * b_t.sqrt();
                let eps = model_output * a_t.sqrt() + sample * b_t.sqrt();
                (x0, eps)
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r);
        }
        // η = 0: σ_t = 0, direction = √(1 − ᾱ_prev) · ε
        Ok(x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let sa: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let s1: Vec<f64> = self
            .alphas_cumprod
            .iter()
            .map(|a| (1.0 - a).sqrt())
            .collect();
        gather_broadcast(&sa, timesteps, original) * original
            + gather_broadcast(&s1, timesteps, original) * noise
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
}

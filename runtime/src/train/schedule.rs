//! Learning-rate schedules: linear warm-up then constant or cosine decay (the schedule of
//! LaVIT's training recipe, and nanoGPT's `get_lr`). A pure function of the step, so it
//! needs no saved state for exact resume.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What follows the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Stay at `lr`.
    Constant,
    /// Half-cosine from `lr` at the end of warm-up to `min_lr` at `total_steps`.
    #[default]
    Cosine,
}

/// A learning-rate schedule. Step numbers start at 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up: step `s < warmup_steps` uses `lr · (s + 1) / warmup_steps`.
    pub warmup_steps: i64,
    /// Decay after the warm-up.
    pub decay: Decay,
    /// Last step of the cosine (the rate stays at `min_lr` after it).
    pub total_steps: i64,
    /// Floor of the cosine.
    pub min_lr: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            warmup_steps: 0,
            decay: Decay::Cosine,
            total_steps: 1000,
            min_lr: 0.0,
        }
    }
}

impl LrSchedule {
    /// A constant rate.
    pub fn constant(lr: f64) -> Self {
        Self {
            lr,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps: 0,
            min_lr: lr,
        }
    }

    /// Linear warm-up then cosine decay to `min_lr` at `total_steps`.
    pub fn warmup_cosine(lr: f64, warmup_steps: i64, total_steps: i64, min_lr: f64) -> Self {
        Self {
            lr,
            warmup_steps,
            decay: Decay::Cosine,
            total_steps,
            min_lr,
        }
    }

    /// The rate at `step`.
    pub fn lr_at(&self, step: i64) -> f64 {
        let step = step.max(0);
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Cosine => {
                let span = (self.total_steps - self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
                let coeff = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                self.min_lr + coeff * (self.lr - self.min_lr)
            }
        }
    }

    /// Rates finite and non-negative, step counts non-negative, `min_lr <= lr`.
    pub fn validate(&self, origin: &str, section: &str) -> Result<()> {
        let key = |k: &str| format!("{section}.{k}");
        let check = |ok: bool, k: &str, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(Error::config(origin, key(k), msg))
            }
        };
        check(
            self.lr.is_finite() && self.lr >= 0.0,
            "lr",
            format!("must be a finite non-negative number, got {}", self.lr),
        )?;
        check(
            self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "min_lr",
            format!("must lie in [0, lr = {}], got {}", self.lr, self.min_lr),
        )?;
        check(
            self.warmup_steps >= 0,
            "warmup_steps",
            format!("must be non-negative, got {}", self.warmup_steps),
        )?;
        check(
            self.total_steps >= 0,
            "total_steps",
            format!("must be non-negative, got {}", self.total_steps),
        )
    }
}

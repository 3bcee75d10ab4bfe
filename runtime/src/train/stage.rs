//! What a stage needs to train inside its own actor, shared by every stage crate: its
//! optimiser handle (shared with the training driver, which saves, restores and clips
//! between steps), the deterministic weight initialisation, and the mode checks.

use std::sync::{Arc, Mutex};

use tch::{nn, Tensor};

use super::{splitmix64, AdamW, AdamWConfig};
use crate::stage::{StageError, StageKind, StageResult};

/// A stage's optimiser, shared with the training driver, and the learning rate the last
/// training batch named.
pub struct StageOptim {
    pub opt: Arc<Mutex<AdamW>>,
    pub lr: Option<f64>,
}

impl StageOptim {
    pub fn new(opt: AdamW) -> Self {
        StageOptim {
            opt: Arc::new(Mutex::new(opt)),
            lr: None,
        }
    }
    /// Step at the last named learning rate, then zero the gradients.
    pub fn step(&mut self, kind: StageKind) -> StageResult<()> {
        let lr = self.lr.ok_or_else(|| {
            StageError::Invalid(format!(
                "stage {kind}: optimiser step without a learning rate (the training batch names none)"
            ))
        })?;
        let mut opt = self.opt.lock().unwrap_or_else(|e| e.into_inner());
        opt.step(lr).map_err(|e| StageError::failed(kind, e))?;
        opt.zero_grad();
        Ok(())
    }
}

/// AdamW for a stage-1 stage: no weight decay on biases, norms, embeddings and codebook
/// parameters.
pub fn stage1_adamw(params: Vec<(String, Tensor)>, cfg: &AdamWConfig) -> crate::Result<AdamW> {
    Ok(AdamW::new(params, cfg.clone())?
        .no_decay(|n| super::is_no_decay(n) || n.ends_with("_embed") || n.starts_with("codebook.")))
}

/// Every variable of `vs`, sorted by name (shallow copies).
pub fn sorted_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `prefix` prepended to every name.
pub fn prefixed(prefix: &str, v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter()
        .map(|(n, t)| (format!("{prefix}{n}"), t))
        .collect()
}

/// An error unless the stage was switched to training mode.
pub fn need_train(train: bool, kind: StageKind) -> StageResult<()> {
    if train {
        Ok(())
    } else {
        Err(StageError::Invalid(format!(
            "stage {kind} is in inference mode (send SetTrain(true) before training batches)"
        )))
    }
}

/// The error of a stage that was not built for training.
pub fn not_trainable(kind: StageKind) -> StageError {
    StageError::Invalid(format!("stage {kind} was not built for training"))
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

//! What a stage needs to train inside its own actor, shared by every stage crate: its
//! optimiser handle (shared with the training driver, which saves, restores and clips
//! between steps), the deterministic weight initialisation, and the mode checks.

use std::sync::{Arc, Mutex};

use tch::{nn, Tensor};

use super::{splitmix64, AdamW, AdamWConfig};
use crate::checkpoint::StateDict;
use crate::messages::{StepControl, StepReport, TrainParts};
use crate::stage::{StageError, StageKind, StageResult};

/// A stage's optimiser (shared with whoever built the stage, e.g. a test that calls the
/// stage directly). The training driver reaches it through the stage's messages:
/// `OptimizerStepWith`, `GetTrainedParams`, `GetTrainState`, `SetTrainState`.
pub struct StageOptim {
    pub opt: Arc<Mutex<AdamW>>,
}

impl StageOptim {
    pub fn new(opt: AdamW) -> Self {
        StageOptim {
            opt: Arc::new(Mutex::new(opt)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdamW> {
        self.opt.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The driver's step: AdamW at `ctl.lr` when `ctl.apply`, then zero the gradients.
    pub fn step_with(&mut self, kind: StageKind, ctl: &StepControl) -> StageResult<StepReport> {
        let mut opt = self.lock();
        if ctl.apply {
            opt.step(ctl.lr).map_err(|e| StageError::failed(kind, e))?;
        }
        opt.zero_grad();
        Ok(StepReport::default())
    }

    /// The parameters this optimiser updates (shallow, with the names it was given).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.lock().params()
    }

    /// A stage's training parts: `name` (the stage's variables `vars`, shallow) and
    /// `name_optimizer` (this optimiser's state).
    pub fn parts(
        &self,
        kind: StageKind,
        name: &str,
        vars: &[(String, Tensor)],
    ) -> StageResult<TrainParts> {
        let sd: StateDict = vars
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let opt = self
            .lock()
            .state_dict()
            .map_err(|e| StageError::failed(kind, e))?;
        Ok(vec![
            (name.to_string(), sd),
            (format!("{name}_optimizer"), opt),
        ])
    }

    /// Load the parts [`parts`](Self::parts) wrote (strict); returns the parts it did not
    /// know, for the stage's own (e.g. the codebook).
    pub fn load_parts(
        &self,
        kind: StageKind,
        name: &str,
        vars: &[(String, Tensor)],
        parts: TrainParts,
    ) -> StageResult<TrainParts> {
        let opt_name = format!("{name}_optimizer");
        let mut rest = Vec::new();
        let (mut got_vars, mut got_opt) = (false, false);
        for (part, sd) in parts {
            if part == name {
                load_vars(vars, &sd, &format!("checkpoint part `{part}`"))
                    .map_err(StageError::Invalid)?;
                got_vars = true;
            } else if part == opt_name {
                self.lock()
                    .load_state_dict(&sd, &format!("checkpoint part `{part}`"))
                    .map_err(|e| StageError::Invalid(e.to_string()))?;
                got_opt = true;
            } else {
                rest.push((part, sd));
            }
        }
        if !(got_vars && got_opt) {
            return Err(StageError::Invalid(format!(
                "stage {kind}: the checkpoint lacks `{name}` or `{opt_name}`"
            )));
        }
        Ok(rest)
    }
}

impl StageOptim {
    /// [`load_parts`](Self::load_parts) for a stage whose training state is only these two
    /// parts: any other part is an error naming it.
    pub fn load_exact(
        &self,
        kind: StageKind,
        name: &str,
        vars: &[(String, Tensor)],
        parts: TrainParts,
    ) -> StageResult<()> {
        match self.load_parts(kind, name, vars, parts)?.first() {
            None => Ok(()),
            Some((p, _)) => Err(StageError::Invalid(format!(
                "stage {kind}: no training part `{p}`"
            ))),
        }
    }
}

/// Copy `sd` into the variables `vars` (strict: the same names and shapes; the error lists
/// every difference, naming `src`).
pub fn load_vars(vars: &[(String, Tensor)], sd: &StateDict, src: &str) -> Result<(), String> {
    let mut problems = Vec::new();
    for (n, v) in vars {
        match sd.get(n) {
            None => problems.push(format!("missing `{n}`")),
            Some(t) if t.size() != v.size() => problems.push(format!(
                "`{n}`: saved {:?}, the model {:?}",
                t.size(),
                v.size()
            )),
            Some(_) => {}
        }
    }
    for k in sd.keys() {
        if !vars.iter().any(|(n, _)| n == k) {
            problems.push(format!("unexpected `{k}`"));
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "{src}: the state does not fit: {}",
            problems.join("; ")
        ));
    }
    tch::no_grad(|| {
        for (n, v) in vars {
            let t = sd[n]
                .f_to_kind(v.kind())
                .and_then(|t| t.f_to_device(v.device()))
                .map_err(|e| format!("{src}: `{n}`: {e}"))?;
            v.shallow_clone()
                .f_copy_(&t)
                .map_err(|e| format!("{src}: `{n}`: {e}"))?;
        }
        Ok(())
    })
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

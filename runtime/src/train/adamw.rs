//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019) as
//! `torch.optim.AdamW` computes it (torch/optim/adamw.py, `_single_tensor_adamw`,
//! amsgrad off), over a list of named tensors, with its state held here so it can be
//! saved and restored exactly (tch's `nn::Optimizer` state cannot be saved).
//!
//! Per parameter `p` with gradient `g`, at its own step `t` (incremented first):
//! ```text
//! p   ← p · (1 − lr·wd)                      (decoupled decay)
//! m   ← β1·m + (1 − β1)·g
//! v   ← β2·v + (1 − β2)·g²
//! p   ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)
//! ```
//! A parameter without a gradient is left alone (its step does not advance), as in torch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::checkpoint::StateDict;
use crate::error::{Error, Result, TchContext};

/// AdamW hyper-parameters. `Default` = `torch.optim.AdamW` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// β1, the first-moment decay (torch `betas[0]`, 0.9).
    pub beta1: f64,
    /// β2, the second-moment decay (torch `betas[1]`, 0.999).
    pub beta2: f64,
    /// Added to the denominator (torch 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (torch 1e-2). Parameters named by [`AdamW::no_decay`] get 0.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
    decay: bool,
}

/// AdamW over named tensors (each a leaf that requires grad).
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// Optimiser steps taken (calls of [`AdamW::step`]).
    steps: i64,
}

impl AdamW {
    /// Optimise `params` (name, tensor). Names must be unique; they key the saved state.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, p) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(format!(
                    "AdamW: parameter `{name}` given twice"
                )));
            }
            let z = || {
                Tensor::f_zeros_like(&p)
                    .and_then(|t| t.f_detach())
                    .ctx(format!("AdamW state for `{name}`"))
            };
            out.push(ParamState {
                exp_avg: z()?,
                exp_avg_sq: z()?,
                name,
                param: p,
                step: 0,
                decay: true,
            });
        }
        Ok(Self {
            cfg,
            params: out,
            steps: 0,
        })
    }

    /// Every trainable variable of `vs` (those with `requires_grad`) whose name `keep`
    /// accepts, in name order.
    pub fn from_var_store(
        vs: &nn::VarStore,
        keep: impl Fn(&str) -> bool,
        cfg: AdamWConfig,
    ) -> Result<Self> {
        Self::new(trainable_variables(vs, keep), cfg)
    }

    /// Exclude the parameters whose name `pred` accepts from weight decay (biases, norms).
    pub fn no_decay(mut self, pred: impl Fn(&str) -> bool) -> Self {
        for p in &mut self.params {
            p.decay = !pred(&p.name);
        }
        self
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// Names of the optimised parameters.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The optimised tensors by name (shallow clones).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.param.shallow_clone()))
            .collect()
    }

    /// Drop every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.param.zero_grad();
        }
    }

    /// The global L2 norm of all gradients (torch `clip_grad_norm_`'s total norm).
    pub fn grad_norm(&self) -> Result<f64> {
        let _g = tch::no_grad_guard();
        let mut sq = 0f64;
        for p in &self.params {
            let g = p.param.grad();
            if g.defined() {
                let n = g
                    .f_to_kind(Kind::Double)
                    .and_then(|g| g.f_square())
                    .and_then(|g| g.f_sum(Kind::Double))
                    .ctx(format!("grad norm of `{}`", p.name))?;
                sq += n.double_value(&[]);
            }
        }
        Ok(sq.sqrt())
    }

    /// Scale all gradients so their global norm is at most `max_norm` (torch
    /// `clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)` clamped to 1). Returns the
    /// norm before clipping; a non-finite norm leaves the gradients unchanged.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        if !norm.is_finite() {
            return Ok(norm);
        }
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let _g = tch::no_grad_guard();
            for p in &self.params {
                let mut g = p.param.grad();
                if g.defined() {
                    let _ = g
                        .f_mul_scalar_(coef)
                        .ctx(format!("clipping `{}`", p.name))?;
                }
            }
        }
        Ok(norm)
    }

    /// One AdamW update at learning rate `lr` using the current gradients.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let _g = tch::no_grad_guard();
        for p in &mut self.params {
            let g = p.param.grad();
            if !g.defined() {
                continue;
            }
            let name = p.name.clone();
            let c = move |what: &str| format!("AdamW {what} of `{name}`");
            p.step += 1;
            let t = p.step as f64;
            if p.decay && weight_decay != 0.0 {
                let _ = p
                    .param
                    .f_mul_scalar_(1.0 - lr * weight_decay)
                    .ctx(c("weight decay"))?;
            }
            // exp_avg.lerp_(grad, 1 − β1)
            let _ = p.exp_avg.f_lerp_(&g, 1.0 - beta1).ctx(c("first moment"))?;
            // exp_avg_sq.mul_(β2).addcmul_(grad, grad, value = 1 − β2)
            let _ = p
                .exp_avg_sq
                .f_mul_scalar_(beta2)
                .and_then(|mut v| v.f_add_(&g.f_mul_scalar(1.0 - beta2)?.f_mul(&g)?))
                .ctx(c("second moment"))?;
            let bias_correction1 = 1.0 - beta1.powf(t);
            let bias_correction2_sqrt = (1.0 - beta2.powf(t)).sqrt();
            let step_size = lr / bias_correction1;
            // denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
            let denom = p
                .exp_avg_sq
                .f_sqrt()
                .and_then(|d| d.f_div_scalar(bias_correction2_sqrt))
                .and_then(|d| d.f_add_scalar(eps))
                .ctx(c("denominator"))?;
            // param.addcdiv_(exp_avg, denom, value = −step_size)
            let upd = p
                .exp_avg
                .f_div(&denom)
                .and_then(|u| u.f_mul_scalar(step_size))
                .ctx(c("update"))?;
            let _ = p.param.f_sub_(&upd).ctx(c("update"))?;
        }
        self.steps += 1;
        Ok(())
    }

    /// The optimiser state as tensors: `exp_avg.<name>`, `exp_avg_sq.<name>`,
    /// `step.<name>` (0-d int64) and `steps` (0-d int64). Copies, on the CPU.
    pub fn state_dict(&self) -> Result<StateDict> {
        let mut sd = BTreeMap::new();
        let cpu = |t: &Tensor, what: &str| {
            t.f_to_device(tch::Device::Cpu)
                .and_then(|t| t.f_detach_copy())
                .ctx(format!("saving AdamW {what}"))
        };
        for p in &self.params {
            sd.insert(format!("exp_avg.{}", p.name), cpu(&p.exp_avg, &p.name)?);
            sd.insert(
                format!("exp_avg_sq.{}", p.name),
                cpu(&p.exp_avg_sq, &p.name)?,
            );
            sd.insert(format!("step.{}", p.name), Tensor::from(p.step));
        }
        sd.insert("steps".into(), Tensor::from(self.steps));
        Ok(sd)
    }

    /// Restore [`AdamW::state_dict`]. Strict: every parameter's entries must be present
    /// with the parameter's shape, and nothing else.
    pub fn load_state_dict(&mut self, sd: &StateDict, source: &str) -> Result<()> {
        let bad = |msg: String| Error::ckpt(source, msg);
        let mut used = 1usize;
        let get = |key: &str| -> Result<&Tensor> {
            sd.get(key)
                .ok_or_else(|| bad(format!("optimiser state has no `{key}`")))
        };
        let steps = get("steps")?
            .f_int64_value(&[])
            .map_err(|e| bad(format!("`steps`: {e}")))?;
        let _g = tch::no_grad_guard();
        for p in &mut self.params {
            for (slot, key) in [
                (&mut p.exp_avg, format!("exp_avg.{}", p.name)),
                (&mut p.exp_avg_sq, format!("exp_avg_sq.{}", p.name)),
            ] {
                let t = get(&key)?;
                if t.size() != slot.size() {
                    return Err(bad(format!(
                        "`{key}` has shape {:?}, the parameter {:?}",
                        t.size(),
                        slot.size()
                    )));
                }
                let src = t
                    .f_to_kind(slot.kind())
                    .and_then(|t| t.f_to_device(slot.device()))
                    .map_err(|e| bad(format!("`{key}`: {e}")))?;
                slot.f_copy_(&src)
                    .map_err(|e| bad(format!("`{key}`: {e}")))?;
            }
            let key = format!("step.{}", p.name);
            p.step = get(&key)?
                .f_int64_value(&[])
                .map_err(|e| bad(format!("`{key}`: {e}")))?;
            used += 3;
        }
        if sd.len() != used {
            let known: std::collections::BTreeSet<String> = self
                .params
                .iter()
                .flat_map(|p| ["exp_avg", "exp_avg_sq", "step"].map(|s| format!("{s}.{}", p.name)))
                .chain(["steps".to_string()])
                .collect();
            let extra: Vec<&String> = sd.keys().filter(|k| !known.contains(*k)).collect();
            return Err(bad(format!(
                "optimiser state holds entries for parameters this optimiser does not have: {extra:?}"
            )));
        }
        self.steps = steps;
        Ok(())
    }
}

/// The variables of `vs` that require grad and whose name `keep` accepts, in name order.
pub fn trainable_variables(
    vs: &nn::VarStore,
    keep: impl Fn(&str) -> bool,
) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, t)| t.requires_grad() && keep(n))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The usual no-decay rule: biases, norms and embeddings' 1-d parameters.
pub fn is_no_decay(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    last == "bias" || name.contains("norm") || last.ends_with("_bias")
}

//! Keep/drop decisions from the selector's log-probs.
//!
//! The official code samples `F.gumbel_softmax(pred_score, hard=True)[:, :, 0]`; serving
//! defaults to the deterministic arg-max (keep where log p(keep) > log p(drop)) so the same
//! image always gives the same tokens. Gumbel noise here comes from a seeded Rust RNG, so a
//! seed reproduces the same decisions on any device.

use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Kind, Tensor};

/// How keep/drop decisions are taken.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SelectionMode {
    /// keep where log p(keep) > log p(drop).
    #[default]
    Argmax,
    /// Gumbel-softmax hard sample (temperature `tau`) with noise from `seed`.
    Gumbel { seed: u64, tau: f64 },
}

/// log-probs [B, N, 2] → decisions [B, N] in {0., 1.} (1 = keep), no gradient.
pub fn keep_argmax(log_probs: &Tensor) -> Tensor {
    log_probs
        .select(-1, 0)
        .gt_tensor(&log_probs.select(-1, 1))
        .to_kind(log_probs.kind())
}

/// Standard Gumbel noise −log(−log U) of `shape` from a seeded RNG, as float32 on `device`.
pub fn gumbel_noise(shape: &[i64], rng: &mut StdRng, device: tch::Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            // U in (0, 1): never exactly 0 or 1.
            let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
            (-(-u.ln()).ln()) as f32
        })
        .collect();
    Tensor::from_slice(&v).reshape(shape).to_device(device)
}

/// `F.gumbel_softmax(logits, tau, hard=True)` with noise from `seed`: the forward value is
/// one-hot, the gradient that of the soft sample (straight-through). Returns [.., 2].
pub fn gumbel_softmax_hard(logits: &Tensor, tau: f64, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let g = gumbel_noise(&logits.size(), &mut rng, logits.device()).to_kind(logits.kind());
    let y_soft = ((logits + g) / tau).softmax(-1, logits.kind());
    let index = y_soft.argmax(-1, true);
    let y_hard = y_soft.zeros_like().scatter_value(-1, &index, 1.0);
    &y_hard - y_soft.detach() + &y_soft
}

impl SelectionMode {
    /// log-probs [B, N, 2] → keep decisions [B, N] (differentiable in Gumbel mode).
    pub fn decide(&self, log_probs: &Tensor) -> Tensor {
        match *self {
            SelectionMode::Argmax => keep_argmax(log_probs),
            SelectionMode::Gumbel { seed, tau } => {
                gumbel_softmax_hard(log_probs, tau, seed).select(-1, 0)
            }
        }
    }
}

/// Kept ratio of decisions [B, N] as a float in [0, 1].
pub fn kept_ratio(decisions: &Tensor) -> f64 {
    decisions
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

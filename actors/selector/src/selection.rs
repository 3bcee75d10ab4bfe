//! Keep/drop decisions from the selector's log-probs.
//!
//! The official code samples `F.gumbel_softmax(pred_score, hard=True)[:, :, 0]`; serving
//! defaults to the deterministic arg-max (keep where log p(keep) > log p(drop)) so the same
//! image always gives the same tokens. Gumbel noise here comes from a seeded Rust RNG, so a
//! seed reproduces the same decisions on any device.
//!
//! Either way an image keeps at least [`MIN_KEPT`] patches ([`keep_at_least`]): a selector that
//! scores every patch of an image below "drop" would otherwise hand the merger, the LLM and
//! the pixel decoder an empty sequence.

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

/// Fewest patches any image keeps, in every selection mode (an empty token sequence describes
/// nothing; LaVIT's inference keeps at least one).
pub const MIN_KEPT: i64 = 1;

/// Decisions [B, N] in which every image keeps at least `min` patches (clamped to N): an image
/// that keeps fewer also keeps its best-scoring dropped patches, by the margin
/// log p(keep) − log p(drop) of `log_probs` [B, N, 2]. The added keeps are constants; every
/// other decision (and its straight-through gradient) is unchanged.
pub fn keep_at_least(decisions: &Tensor, log_probs: &Tensor, min: i64) -> Tensor {
    let n = decisions.size().last().copied().unwrap_or(0);
    let min = min.clamp(0, n);
    if min == 0 {
        return decisions.shallow_clone();
    }
    let kept = decisions.detach().gt(0.5); // (B, N)
    let counts = kept.sum_dim_intlist(1, true, Kind::Int64); // (B, 1)
    if counts.min().int64_value(&[]) >= min {
        return decisions.shallow_clone();
    }
    let margin = (log_probs.select(-1, 0) - log_probs.select(-1, 1)).detach(); // (B, N)
    let dropped_margin = margin.masked_fill(&kept, f64::NEG_INFINITY);
    let (_, best) = dropped_margin.topk(min, 1, true, true); // (B, min): dropped patches first
    let need = (-counts + min).clamp_min(0); // (B, 1)
    let rank = Tensor::arange(min, (Kind::Int64, decisions.device())).unsqueeze(0); // (1, min)
    let take = rank.lt_tensor(&need).to_kind(decisions.kind()); // (B, min)
    let added = decisions.detach().zeros_like().scatter(1, &best, &take); // (B, N)
    decisions + added
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
    gumbel_softmax_hard_from_row(logits, tau, seed, 0)
}

/// [`gumbel_softmax_hard`] for rows `row0..` of a larger batch: the noise the whole batch
/// draws for those rows (the draws of the `row0` rows before are skipped).
pub fn gumbel_softmax_hard_from_row(logits: &Tensor, tau: f64, seed: u64, row0: i64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let per_row: i64 = logits.size().iter().skip(1).product();
    for _ in 0..row0.max(0).saturating_mul(per_row) {
        let _: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    }
    let g = gumbel_noise(&logits.size(), &mut rng, logits.device()).to_kind(logits.kind());
    let y_soft = ((logits + g) / tau).softmax(-1, logits.kind());
    let index = y_soft.argmax(-1, true);
    let y_hard = y_soft.zeros_like().scatter_value(-1, &index, 1.0);
    &y_hard - y_soft.detach() + &y_soft
}

impl SelectionMode {
    /// log-probs [B, N, 2] → keep decisions [B, N] (differentiable in Gumbel mode), at
    /// least [`MIN_KEPT`] per image.
    pub fn decide(&self, log_probs: &Tensor) -> Tensor {
        self.decide_from_row(log_probs, 0)
    }

    /// [`decide`](Self::decide) for rows `row0..` of a larger batch (Gumbel noise as the
    /// whole batch draws it for them).
    pub fn decide_from_row(&self, log_probs: &Tensor, row0: i64) -> Tensor {
        let raw = match *self {
            SelectionMode::Argmax => keep_argmax(log_probs),
            SelectionMode::Gumbel { seed, tau } => {
                gumbel_softmax_hard_from_row(log_probs, tau, seed, row0).select(-1, 0)
            }
        };
        keep_at_least(&raw, log_probs, MIN_KEPT)
    }
}

/// Kept ratio of decisions [B, N] as a float in [0, 1].
pub fn kept_ratio(decisions: &Tensor) -> f64 {
    decisions
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

//! Keep/drop decisions from the selector's log-probs.
//!
//! The official code samples `F.gumbel_softmax(pred_score, hard=True)[:, :, 0]`; a checkpoint's
//! manifest says which of that and the deterministic arg-max it is served with
//! (`tokenizer.selection`, `tokenizer.selection_seed`). Gumbel noise comes from a seeded Rust
//! RNG, so a seed reproduces the same decisions on any device. Every choice between keep and
//! drop, and between tied candidates, is taken as torch takes it: `torch.argmax` over
//! [keep, drop] returns the first index of the largest value, so an exact tie keeps, and NaN
//! counts as the largest value.
//!
//! At inference ([`SelectionMode::decide`]) an image's Gumbel noise is a function of the seed
//! alone: every image of a batch draws the same noise rows, so its tokens do not depend on
//! its position in the batch or on what it is batched with. Stage-1 training
//! ([`SelectionMode::decide_from_row`]) draws distinct noise for every row of the global
//! batch, as `F.gumbel_softmax` does.
//!
//! Either way an image keeps at least [`MIN_KEPT`] patches ([`keep_at_least`]): a selector that
//! scores every patch of an image below "drop" would otherwise hand the merger, the LLM and
//! the pixel decoder an empty sequence.

use lavit_runtime::manifest::{Selection, SelectionChoice};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Kind, Tensor};

/// How keep/drop decisions are taken.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SelectionMode {
    /// keep where `torch.argmax([log p(keep), log p(drop)]) == 0`: log p(keep) ≥ log p(drop).
    #[default]
    Argmax,
    /// Gumbel-softmax hard sample (temperature `tau`) with noise from `seed`.
    Gumbel { seed: u64, tau: f64 },
}

impl From<SelectionChoice> for SelectionMode {
    /// A manifest's (or a request's) selection: arg-max, or Gumbel from its seed at τ = 1
    /// (`F.gumbel_softmax`'s default, as the official code calls it).
    fn from(c: SelectionChoice) -> Self {
        match c.selection {
            Selection::Argmax => SelectionMode::Argmax,
            Selection::Gumbel => SelectionMode::Gumbel {
                seed: c.seed,
                tau: 1.0,
            },
        }
    }
}

/// log-probs [B, N, 2] → decisions [B, N] in {0., 1.} (1 = keep), no gradient: keep where
/// `torch.argmax` over [keep, drop] picks keep — log p(keep) ≥ log p(drop) (an exact tie
/// keeps, the first index), and a NaN log p(keep) keeps while a NaN log p(drop) beside a
/// number drops (torch's argmax takes NaN for the maximum).
pub fn keep_argmax(log_probs: &Tensor) -> Tensor {
    log_probs
        .argmax(-1, false)
        .eq(0i64)
        .to_kind(log_probs.kind())
}

/// Fewest patches any image keeps, in every selection mode (an empty token sequence describes
/// nothing; LaVIT's inference keeps at least one).
pub const MIN_KEPT: i64 = 1;

/// Decisions [B, N] in which every image keeps at least `min` patches (clamped to N): an image
/// that keeps fewer also keeps its best-scoring dropped patches, by the margin
/// log p(keep) − log p(drop) of `log_probs` [B, N, 2], equal margins in raster order (the
/// first position first, as `torch.argmax` breaks ties). The added keeps are constants;
/// every other decision (and its straight-through gradient) is unchanged.
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
    // A stable descending sort: the best margins first, equal margins by position.
    let (_, order) = dropped_margin.sort_stable(true, 1, true); // (B, N)
    let best = order.narrow(1, 0, min); // (B, min): dropped patches first
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
/// one-hot, the gradient that of the soft sample (straight-through). Returns [.., 2]. The
/// noise has the shape of `logits` (distinct for every row), as in stage-1 training.
pub fn gumbel_softmax_hard(logits: &Tensor, tau: f64, seed: u64) -> Tensor {
    gumbel_softmax_hard_from_row(logits, tau, seed, 0)
}

/// [`gumbel_softmax_hard`] for rows `row0..` of a larger batch: the noise the whole batch
/// draws for those rows (the draws of the `row0` rows before are skipped). Stage-1 training.
pub fn gumbel_softmax_hard_from_row(logits: &Tensor, tau: f64, seed: u64, row0: i64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let per_row: i64 = logits.size().iter().skip(1).product();
    for _ in 0..row0.max(0).saturating_mul(per_row) {
        let _: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    }
    let g = gumbel_noise(&logits.size(), &mut rng, logits.device()).to_kind(logits.kind());
    hard_sample(logits, &g, tau)
}

/// [`gumbel_softmax_hard`] with the noise of one row, drawn from `seed` alone and added to
/// every row of `logits` [B, ..]: an image's sample depends on its log-probs and the seed,
/// not on its place in the batch or on the other images. Inference.
pub fn gumbel_softmax_hard_per_image(logits: &Tensor, tau: f64, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let row = logits
        .size()
        .get(1..)
        .map(<[i64]>::to_vec)
        .unwrap_or_default();
    let g = gumbel_noise(&row, &mut rng, logits.device()).to_kind(logits.kind()); // (N, 2)
    hard_sample(logits, &g, tau)
}

/// softmax((logits + g) / τ), its arg-max (`torch.max`'s first index on a tie) as a one-hot
/// forward value, the soft sample's gradient (straight-through); `g` broadcasts.
fn hard_sample(logits: &Tensor, g: &Tensor, tau: f64) -> Tensor {
    let y_soft = ((logits + g) / tau).softmax(-1, logits.kind());
    let index = y_soft.argmax(-1, true);
    let y_hard = y_soft.zeros_like().scatter_value(-1, &index, 1.0);
    &y_hard - y_soft.detach() + &y_soft
}

impl SelectionMode {
    /// Inference: log-probs [B, N, 2] → keep decisions [B, N] (differentiable in Gumbel
    /// mode), at least [`MIN_KEPT`] per image. Gumbel noise as
    /// [`gumbel_softmax_hard_per_image`] draws it: the same rows for every image, so each
    /// image's decisions depend on the seed and its own log-probs only.
    pub fn decide(&self, log_probs: &Tensor) -> Tensor {
        let raw = match *self {
            SelectionMode::Argmax => keep_argmax(log_probs),
            SelectionMode::Gumbel { seed, tau } => {
                gumbel_softmax_hard_per_image(log_probs, tau, seed).select(-1, 0)
            }
        };
        keep_at_least(&raw, log_probs, MIN_KEPT)
    }

    /// Stage-1 training: [`decide`](Self::decide) for rows `row0..` of a larger batch, with
    /// distinct Gumbel noise for every row (as the whole batch draws it for them).
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

#[cfg(test)]
mod tests {
    use super::*;

    /// log-probs [1, N, 2] from (keep, drop) pairs.
    fn lp(pairs: &[(f32, f32)]) -> Tensor {
        let flat: Vec<f32> = pairs.iter().flat_map(|&(k, d)| [k, d]).collect();
        Tensor::from_slice(&flat).view([1, pairs.len() as i64, 2])
    }

    fn row(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.reshape([-1])).unwrap()
    }

    /// torch.argmax over [keep, drop]: the first index on an exact tie (keep), NaN the maximum.
    #[test]
    fn keep_argmax_decides_ties_and_nan_as_torch_argmax() {
        let nan = f32::NAN;
        let x = lp(&[
            (-0.7, -0.7), // exact tie → keep
            (-0.5, -0.9), // keep
            (-0.9, -0.5), // drop
            (0.0, -0.0),  // +0 and −0 are equal → keep
            (nan, -0.1),  // NaN keep → keep
            (-0.1, nan),  // NaN drop → drop
            (nan, nan),   // both NaN → the first → keep
        ]);
        assert_eq!(row(&keep_argmax(&x)), vec![1., 1., 0., 1., 1., 0., 1.]);
        // the same as libtorch's own argmax == 0, row by row
        let torch = x.argmax(-1, false).eq(0i64).to_kind(Kind::Float);
        assert_eq!(row(&keep_argmax(&x)), row(&torch));
    }

    /// The floor adds the best dropped patches; equal margins go in raster order.
    #[test]
    fn keep_at_least_breaks_margin_ties_by_position() {
        let x = lp(&[
            (-2.0, -0.1),
            (-1.0, -0.2),
            (-1.0, -0.2),
            (-3.0, -0.1),
            (-1.0, -0.2),
        ]);
        let none = Tensor::zeros([1, 5], (Kind::Float, tch::Device::Cpu));
        assert_eq!(row(&keep_at_least(&none, &x, 1)), vec![0., 1., 0., 0., 0.]);
        assert_eq!(row(&keep_at_least(&none, &x, 2)), vec![0., 1., 1., 0., 0.]);
        assert_eq!(row(&keep_at_least(&none, &x, 4)), vec![1., 1., 1., 0., 1.]);
        // every margin equal: the first positions
        let flat = lp(&[(-1.0, -0.5); 6]);
        let none = Tensor::zeros([1, 6], (Kind::Float, tch::Device::Cpu));
        assert_eq!(
            row(&keep_at_least(&none, &flat, 3)),
            vec![1., 1., 1., 0., 0., 0.]
        );
    }

    /// A Gumbel sample whose perturbed logits tie exactly (the log-probs are minus the noise
    /// the seed draws, so logits + noise = 0) keeps, as `y_soft.max(-1)` takes the first index.
    #[test]
    fn gumbel_hard_sample_ties_keep() {
        let (n, seed) = (16, 5);
        let mut rng = StdRng::seed_from_u64(seed);
        let g = gumbel_noise(&[n, 2], &mut rng, tch::Device::Cpu); // (N, 2)
        let x = g.neg().unsqueeze(0).repeat([3, 1, 1]); // (3, N, 2)
        let dec = SelectionMode::Gumbel { seed, tau: 1.0 }.decide(&x);
        assert_eq!(row(&dec), vec![1.0; 3 * n as usize]);
        // training draws other noise for rows after the first: no tie there
        let mut rng = StdRng::seed_from_u64(seed);
        let g = gumbel_noise(&[3, n, 2], &mut rng, tch::Device::Cpu); // (3, N, 2)
        let hard = gumbel_softmax_hard(&g.neg(), 1.0, seed).select(-1, 0);
        assert_eq!(row(&hard), vec![1.0; 3 * n as usize]);
    }

    /// At inference an image's Gumbel decisions depend on its own log-probs and the seed only:
    /// batched with others, alone, or at another position, the same.
    #[test]
    fn gumbel_decisions_do_not_depend_on_the_batch() {
        let x = (Tensor::arange(3 * 49 * 2, (Kind::Float, tch::Device::Cpu)) * 0.7)
            .sin()
            .view([3, 49, 2])
            .log_softmax(-1, Kind::Float);
        let mode = SelectionMode::Gumbel { seed: 11, tau: 1.0 };
        let together = mode.decide(&x);
        for i in 0..3 {
            let alone = mode.decide(&x.narrow(0, i, 1));
            assert!(alone.equal(&together.narrow(0, i, 1)), "image {i}");
        }
        let reversed = mode.decide(&x.flip([0]));
        assert!(reversed.flip([0]).equal(&together));
        // the same log-probs in two rows: the same decisions
        let twice = mode.decide(&Tensor::cat(&[x.narrow(0, 0, 1), x.narrow(0, 0, 1)], 0));
        assert!(twice.get(0).equal(&twice.get(1)));
        // training: distinct noise per row of the global batch
        let train =
            mode.decide_from_row(&Tensor::cat(&[x.narrow(0, 0, 1), x.narrow(0, 0, 1)], 0), 0);
        assert!(!train.get(0).equal(&train.get(1)));
        // and another seed decides otherwise
        let other = SelectionMode::Gumbel { seed: 12, tau: 1.0 }.decide(&x);
        assert!(!other.equal(&together));
    }
}

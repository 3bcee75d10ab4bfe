//! Fréchet distance between two sets of embeddings (Heusel et al. 2017, "GANs trained by a
//! two time-scale update rule converge to a local Nash equilibrium"; reference
//! `pytorch-fid`'s `calculate_frechet_distance`), over whatever embedding the caller chooses.
//!
//! d² = ‖μ₁ − μ₂‖² + tr(C₁) + tr(C₂) − 2 tr √(C₁C₂), with unbiased covariances (N − 1) as
//! `np.cov`. tr √(C₁C₂) is computed without a general matrix square root: C₁C₂ is similar to
//! the symmetric positive semi-definite S = √C₁ C₂ √C₁, so tr √(C₁C₂) = Σ √λᵢ(S). Both square
//! roots come from symmetric eigendecompositions in f64, with eigenvalues that rounding made
//! slightly negative clamped to 0 — no complex parts to discard, no `eps` added to the
//! diagonal, and well defined when a covariance is singular (fewer samples than dimensions).

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Mean and unbiased covariance of embeddings [N, D] (N ≥ 2), in f64.
pub fn mean_cov(x: &Tensor) -> Result<(Tensor, Tensor)> {
    ensure!(
        x.dim() == 2,
        "embeddings must be [N, D], got {:?}",
        x.size()
    );
    let n = x.size()[0];
    ensure!(n >= 2, "a covariance needs at least 2 embeddings, got {n}");
    let x = x.to_kind(Kind::Double);
    let mu = x.mean_dim(0, false, Kind::Double); // (D,)
    let c = &x - mu.unsqueeze(0); // (N, D)
    let cov = c.transpose(0, 1).matmul(&c) / (n - 1) as f64; // (D, D)
    Ok((mu, cov))
}

/// √A of a symmetric positive semi-definite matrix (symmetrised first; eigenvalues < 0
/// from rounding clamped to 0).
fn sqrt_psd(a: &Tensor) -> Result<Tensor> {
    let sym = (a + a.transpose(0, 1)) / 2.0;
    let (w, v) = sym.f_linalg_eigh("L")?; // (D,), (D, D)
    let s = w.clamp_min(0.0).sqrt();
    Ok((&v * s.unsqueeze(0)).matmul(&v.transpose(0, 1)))
}

/// Fréchet distance between two Gaussians (μ, C) given in f64.
pub fn frechet_distance(mu1: &Tensor, c1: &Tensor, mu2: &Tensor, c2: &Tensor) -> Result<f64> {
    ensure!(
        mu1.size() == mu2.size() && c1.size() == c2.size(),
        "the two embedding sets differ in width: {:?} and {:?}",
        mu1.size(),
        mu2.size()
    );
    let (mu1, mu2) = (mu1.to_kind(Kind::Double), mu2.to_kind(Kind::Double));
    let (c1, c2) = (c1.to_kind(Kind::Double), c2.to_kind(Kind::Double));
    let diff = (&mu1 - &mu2).square().sum(Kind::Double).double_value(&[]);
    let r1 = sqrt_psd(&c1)?;
    let s = r1.matmul(&c2).matmul(&r1);
    let s = (&s + s.transpose(0, 1)) / 2.0;
    let (w, _) = s.f_linalg_eigh("L")?;
    let tr_sqrt = w.clamp_min(0.0).sqrt().sum(Kind::Double).double_value(&[]);
    let tr1 = c1.trace().double_value(&[]);
    let tr2 = c2.trace().double_value(&[]);
    let d = diff + tr1 + tr2 - 2.0 * tr_sqrt;
    ensure!(d.is_finite(), "Fréchet distance is not finite ({d})");
    Ok(d.max(0.0))
}

/// FID between two sets of embeddings [N₁, D] and [N₂, D].
pub fn fid(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (mu1, c1) = mean_cov(a)?;
    let (mu2, c2) = mean_cov(b)?;
    frechet_distance(&mu1, &c1, &mu2, &c2)
}

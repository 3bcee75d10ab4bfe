//! What the token selector keeps, and where (LaVIT's central claim: the selector keeps the
//! informative patches, so the token count follows the image).
//!
//! On Fashion-MNIST the informative patches are the garment's: a patch is "on the garment"
//! when its mean pixel value is above [`GARMENT_THRESHOLD`] (25/255 on the 28 px photo; the
//! background is black). From the keep masks of held-out photos this measures
//!
//! - the share of kept patches that lie on the garment, against the share a position-blind
//!   selector would reach (the garment's share of all patches);
//! - Spearman's rank correlation between an image's kept count and its garment patches;
//! - how many images have a keep mask no other image has (a fixed-position selector — one mask
//!   for every image — scores near 0);
//! - the mean kept ratio.

use lavit_selector::SelectionMode;
use serde::{Deserialize, Serialize};
use tch::Kind;

use super::data::{to_model_input, Split, SIDE};
use crate::tokenizer::VisualTokenizer;

/// A patch whose mean pixel value (in [0, 1]) is above this lies on the garment.
pub const GARMENT_THRESHOLD: f64 = 25.0 / 255.0;

/// The selection figures of a set of images (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SelectionFigures {
    /// Images measured.
    pub images: usize,
    /// Kept patches / patches.
    pub mean_kept_ratio: f64,
    /// Mean kept patches per image.
    pub mean_kept: f64,
    /// Kept patches on the garment / kept patches.
    pub garment_share: f64,
    /// Garment patches / patches: the garment share of a selector blind to the image.
    pub garment_share_chance: f64,
    /// Garment patches kept / garment patches (how much of the garment is kept).
    pub garment_recall: f64,
    /// Spearman's ρ between an image's kept count and its number of garment patches.
    pub spearman_kept_garment: f64,
    /// Distinct keep masks among the images.
    pub distinct_masks: usize,
    /// Images whose keep mask no other image has / images.
    pub own_mask_share: f64,
}

/// Per patch of a `side`×`side` image (`pixels` in [0, 1], row-major), whether it lies on the
/// garment, for patches of `patch`×`patch` pixels in raster order.
pub fn garment_patches(pixels: &[f32], side: usize, patch: usize) -> Vec<bool> {
    let grid = side / patch.max(1);
    let mut out = Vec::with_capacity(grid * grid);
    for gy in 0..grid {
        for gx in 0..grid {
            let mut sum = 0.0f64;
            for y in 0..patch {
                for x in 0..patch {
                    sum += pixels[(gy * patch + y) * side + gx * patch + x] as f64;
                }
            }
            out.push(sum / (patch * patch) as f64 > GARMENT_THRESHOLD);
        }
    }
    out
}

/// Average ranks (1-based; ties share their mean rank), as scipy's `rankdata`.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// Pearson's correlation; 0 when either side is constant.
fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (ma, mb) = (
        a[..n].iter().sum::<f64>() / n as f64,
        b[..n].iter().sum::<f64>() / n as f64,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (da, db) = (a[i] - ma, b[i] - mb);
        sab += da * db;
        saa += da * da;
        sbb += db * db;
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

/// Spearman's rank correlation (Pearson's on average ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// The figures of keep masks `keep` (one row of 0/1 per image, raster order) against the
/// images' garment patches `garment` (same shape).
pub fn figures(keep: &[Vec<u8>], garment: &[Vec<bool>]) -> SelectionFigures {
    let n = keep.len().min(garment.len());
    if n == 0 {
        return SelectionFigures::default();
    }
    let (mut kept, mut kept_on, mut patches, mut on) = (0usize, 0usize, 0usize, 0usize);
    let mut counts = Vec::with_capacity(n);
    let mut garment_counts = Vec::with_capacity(n);
    for (k, g) in keep.iter().zip(garment).take(n) {
        let c = k.iter().filter(|&&x| x != 0).count();
        let gc = g.iter().filter(|&&x| x).count();
        kept += c;
        kept_on += k.iter().zip(g).filter(|(&x, &y)| x != 0 && y).count();
        patches += k.len();
        on += gc;
        counts.push(c as f64);
        garment_counts.push(gc as f64);
    }
    let mut seen = std::collections::HashMap::<&[u8], usize>::new();
    for k in keep.iter().take(n) {
        *seen.entry(k.as_slice()).or_default() += 1;
    }
    let own = keep
        .iter()
        .take(n)
        .filter(|k| seen.get(k.as_slice()) == Some(&1))
        .count();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    SelectionFigures {
        images: n,
        mean_kept_ratio: ratio(kept, patches),
        mean_kept: kept as f64 / n as f64,
        garment_share: ratio(kept_on, kept),
        garment_share_chance: ratio(on, patches),
        garment_recall: ratio(kept_on, on),
        spearman_kept_garment: spearman(&counts, &garment_counts),
        distinct_masks: seen.len(),
        own_mask_share: own as f64 / n as f64,
    }
}

/// Garment patches of every image of `split` on the tokenizer's patch grid (the 28 px photo as
/// the demo feeds it: `img_size` = 28, patch `patch`).
pub fn split_garment(split: &Split, patch: usize) -> Vec<Vec<bool>> {
    (0..split.len())
        .map(|i| {
            let px: Vec<f32> = split.image(i).iter().map(|&v| v as f32 / 255.0).collect();
            garment_patches(&px, SIDE, patch)
        })
        .collect()
}

/// Keep masks (one 0/1 row per image, raster order) of every image of `split` under `mode`,
/// `batch` images per forward.
pub fn keep_masks(
    tok: &VisualTokenizer,
    split: &Split,
    mode: SelectionMode,
    batch: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let _g = tch::no_grad_guard();
    let size = tok.manifest.tokenizer.img_size;
    let all: Vec<usize> = (0..split.len()).collect();
    let mut out = Vec::with_capacity(split.len());
    for chunk in all.chunks(batch.max(1)) {
        let x = to_model_input(&split.batch_unit(chunk), size).to_device(tok.device);
        let trace = tok.trace(&x, mode)?;
        let d = trace
            .decisions
            .gt(0.5)
            .to_kind(Kind::Uint8)
            .to_device(tch::Device::Cpu);
        for row in 0..chunk.len() as i64 {
            out.push(Vec::<u8>::try_from(d.get(row))?);
        }
    }
    Ok(out)
}

/// The selection figures of `tok` on `split` in arg-max and in Gumbel mode (seed `seed`).
pub fn measure(tok: &VisualTokenizer, split: &Split, seed: u64) -> anyhow::Result<ModeFigures> {
    anyhow::ensure!(
        tok.manifest.tokenizer.img_size == SIDE as i64,
        "selection figures need the 28 px photo as the tokenizer input"
    );
    let garment = split_garment(split, tok.manifest.tokenizer.patch_size as usize);
    let argmax = figures(
        &keep_masks(tok, split, SelectionMode::Argmax, 250)?,
        &garment,
    );
    let gumbel = figures(
        &keep_masks(tok, split, SelectionMode::Gumbel { seed, tau: 1.0 }, 250)?,
        &garment,
    );
    Ok(ModeFigures { argmax, gumbel })
}

/// [`SelectionFigures`] of the arg-max and of the sampled (Gumbel) selection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModeFigures {
    pub argmax: SelectionFigures,
    pub gumbel: SelectionFigures,
}

/// The paper's figure of selected patches: `per_class` held-out photos of every class (a row
/// per class), each twice — as it is, then with its dropped patches darkened and its kept
/// patches tinted — as a PNG grid.
pub fn write_kept_grid(
    path: &std::path::Path,
    split: &Split,
    keep: &[Vec<u8>],
    patch: usize,
    per_class: usize,
) -> anyhow::Result<()> {
    let grid = SIDE / patch.max(1);
    let mut tiles = Vec::new();
    for c in 0..10u8 {
        let shown = (0..split.len().min(keep.len()))
            .filter(|&i| split.labels[i] == c)
            .take(per_class);
        for i in shown {
            let px: Vec<f32> = split.image(i).iter().map(|&v| v as f32 / 255.0).collect();
            let plain = tch::Tensor::from_slice(&px).view([1, SIDE as i64, SIDE as i64]);
            let mut rgb = vec![0f32; 3 * SIDE * SIDE];
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let cell = (y / patch).min(grid - 1) * grid + (x / patch).min(grid - 1);
                    let v = px[y * SIDE + x];
                    let kept = keep[i].get(cell).copied().unwrap_or(0) != 0;
                    let border = kept && (y % patch == 0 || x % patch == 0);
                    let (r, g, b) = match (kept, border) {
                        (true, true) => (1.0, 0.55, 0.0),
                        (true, false) => (0.25 + 0.75 * v, 0.15 + 0.75 * v, 0.75 * v),
                        (false, _) => (0.3 * v, 0.3 * v, 0.35 * v + 0.08),
                    };
                    rgb[y * SIDE + x] = r;
                    rgb[SIDE * SIDE + y * SIDE + x] = g;
                    rgb[2 * SIDE * SIDE + y * SIDE + x] = b;
                }
            }
            tiles.push(plain.repeat([3, 1, 1]));
            tiles.push(tch::Tensor::from_slice(&rgb).view([3, SIDE as i64, SIDE as i64]));
        }
    }
    anyhow::ensure!(!tiles.is_empty(), "no photo to draw the kept patches of");
    let images = tch::Tensor::stack(&tiles, 0);
    super::report::write_grid(path, &images, 2 * per_class.max(1), 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties_as_scipy() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 25.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0);
    }

    #[test]
    fn garment_patches_threshold_the_patch_mean() {
        // 4×4 image, patch 2: only the top-left patch is bright enough on average.
        let mut px = vec![0.0f32; 16];
        px[0] = 0.5; // top-left patch mean 0.125 > 0.098
        px[3] = 0.3; // top-right patch mean 0.075 < 0.098
        assert_eq!(garment_patches(&px, 4, 2), vec![true, false, false, false]);
    }

    #[test]
    fn a_fixed_mask_and_a_content_mask_score_apart() {
        // Three images whose garment grows; a selector that keeps the garment, and one that
        // keeps the same two positions everywhere.
        let garment = vec![
            vec![true, false, false, false],
            vec![true, true, false, false],
            vec![true, true, true, false],
        ];
        let content: Vec<Vec<u8>> = garment
            .iter()
            .map(|g| g.iter().map(|&x| x as u8).collect())
            .collect();
        let f = figures(&content, &garment);
        assert_eq!(f.garment_share, 1.0);
        assert_eq!(f.own_mask_share, 1.0);
        assert!((f.spearman_kept_garment - 1.0).abs() < 1e-12);
        assert!((f.garment_share_chance - 0.5).abs() < 1e-12);
        let fixed = vec![vec![0, 0, 1, 1]; 3];
        let f = figures(&fixed, &garment);
        assert_eq!(f.distinct_masks, 1);
        assert_eq!(f.own_mask_share, 0.0);
        assert!((f.garment_share - 1.0 / 6.0).abs() < 1e-12);
        assert_eq!(f.spearman_kept_garment, 0.0);
    }
}

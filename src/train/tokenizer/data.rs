//! Stage 1's data: the image folder, and the batch of each step as a function of (seed, step).

use super::*;

/// Read every image under `dir` (recursively, sorted). Unreadable images are skipped with a
/// warning and counted; link loops and special files are refused by name
/// ([`lavit_runtime::fsread::walk_files`]). Returns ([M, 3, S, S], skipped).
pub fn load_image_folder(dir: &Path, size: i64, max_images: usize) -> Result<(Tensor, usize)> {
    use lavit_runtime::fsread;
    let paths = fsread::walk_files(dir, fsread::MAX_WALK_DEPTH, |p| {
        fsread::has_extension(p, &["png", "jpg", "jpeg", "bmp", "gif"])
    })
    .with_context(|| format!("data_dir {}", dir.display()))?;
    let proc = LaVITImageProcessor::new(size as u32);
    let mut images = Vec::new();
    let mut skipped = 0;
    for p in paths {
        if max_images > 0 && images.len() >= max_images {
            break;
        }
        match proc.load(&p) {
            Ok(t) => images.push(t),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "skipping unreadable image");
                skipped += 1;
            }
        }
    }
    if images.is_empty() {
        bail!("no readable images under {}", dir.display());
    }
    Ok((Tensor::stack(&images, 0), skipped))
}

pub(super) fn parse_device(s: &str) -> Result<Device> {
    lavit_runtime::device::resolve_device(s).context("key `device`")
}

/// Batch of `step`: a seeded permutation per epoch, a pure function of (seed, step).
pub fn batch_indices(seed: u64, step: i64, n: usize, b: usize) -> Vec<i64> {
    let start = step as usize * b;
    (start..start + b)
        .map(|g| {
            let epoch = (g / n) as u64;
            let mut perm: Vec<usize> = (0..n).collect();
            let mut s = splitmix64(seed ^ splitmix64(epoch.wrapping_add(0x5eed)));
            for i in (1..n).rev() {
                s = splitmix64(s);
                perm.swap(i, (s % (i as u64 + 1)) as usize);
            }
            perm[g % n] as i64
        })
        .collect()
}

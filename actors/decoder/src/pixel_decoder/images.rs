//! Seeds and initial noise, the unconditional embedding file, aspect-ratio sizes, and the
//! decoded pixels as 8-bit images and PNG files.

use super::*;

/// A seed from libtorch's generator, for requests that give none.
/// A fresh seed for a request that names none.
pub fn random_seed() -> u64 {
    Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64
}

/// Standard normal values of `shape` (float32, CPU) from `seed` alone: a counter-based stream
/// (splitmix64 of (seed, index)) through Box–Muller. It touches no global generator, so two
/// requests with seeds never draw from each other's stream.
pub fn seeded_gaussian(seed: u64, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let key = splitmix64(seed ^ 0x6c61_7669_745f_6e6f); // "lavit_no"
    let unit = |i: u64| {
        // 53 random bits → (0, 1)
        ((splitmix64(key ^ splitmix64(i)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut v = Vec::with_capacity(n.max(0) as usize);
    let mut i = 0u64;
    while (v.len() as i64) < n {
        let (u1, u2) = (unit(i), unit(i + 1));
        i += 2;
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        v.push((r * a.cos()) as f32);
        if (v.len() as i64) < n {
            v.push((r * a.sin()) as f32);
        }
    }
    Tensor::from_slice(&v).view(shape)
}

pub(super) fn load_uncond(path: &Path, cross_attention_dim: i64, device: Device) -> Result<Tensor> {
    let sd = checkpoint::load_file(path)?;
    let t = sd
        .get("")
        .or_else(|| {
            if sd.len() == 1 {
                sd.values().next()
            } else {
                None
            }
        })
        .ok_or_else(|| Error::ckpt(path, "expected one tensor [1, L, C]"))?;
    let s = t.size();
    let c = cross_attention_dim;
    if s.len() != 3 || s[0] != 1 || s[2] != c {
        return Err(Error::ckpt(
            path,
            format!("shape {s:?}, expected [1, L, {c}]"),
        ));
    }
    Ok(t.get(0).to_kind(Kind::Float).to_device(device))
}

/// The official aspect ratios scaled from 1024² to `native` px, rounded to multiples of
/// `multiple` (at least one multiple per side).
pub fn aspect_ratio_sizes(native: i64, multiple: i64) -> Vec<(&'static str, (i64, i64))> {
    let round = |v: i64| {
        let scaled = v as f64 * native as f64 / 1024.0 / multiple as f64;
        (scaled.round() as i64).max(1) * multiple
    };
    ASPECT_RATIOS
        .iter()
        .map(|&(name, (h, w))| (name, (round(h), round(w))))
        .collect()
}

/// Images (B, 3, H, W) in [0, 1] → 8-bit RGB buffers, rounded as the official `numpy_to_pil`.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = images.size4().ctx("images (B, 3, H, W)")?;
    if c != 3 {
        return Err(Error::invalid(format!(
            "images have {c} channels, expected 3"
        )));
    }
    let bytes = (images.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1]) // (B, H, W, 3)
        .contiguous();
    let flat: Vec<u8> = Vec::try_from(bytes.flatten(0, -1)).ctx("image bytes")?;
    let per = (h * w * 3) as usize;
    (0..b as usize)
        .map(|i| {
            image::RgbImage::from_raw(w as u32, h as u32, flat[i * per..(i + 1) * per].to_vec())
                .ok_or_else(|| Error::invalid("image buffer size"))
        })
        .collect()
}

/// Write images as PNG: `path` itself for one image, else `stem-{i}.png` beside it.
/// Returns the written paths.
pub fn save_pngs(images: &Tensor, path: &Path) -> Result<Vec<PathBuf>> {
    save_rgb_pngs(&to_rgb8(images)?, path)
}

/// Write RGB images as PNG: `path` for one image, `STEM-i.png` beside it for several.
pub fn save_rgb_pngs(imgs: &[image::RgbImage], path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        let p = if imgs.len() == 1 {
            path.to_path_buf()
        } else {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            path.with_file_name(format!("{stem}-{i}.png"))
        };
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| Error::invalid(format!("encoding PNG {}: {e}", p.display())))?;
        checkpoint::atomic_write(&p, buf.get_ref())?;
        out.push(p);
    }
    Ok(out)
}

/// Keep the visual ids of a generated sequence, as the official code does
/// (`image_token - 32002`, kept where ≥ 0): [IMG], [/IMG] and text ids are dropped.
pub fn visual_ids_only(generated: &[i64], visual_token_offset: i64) -> Vec<i64> {
    generated
        .iter()
        .copied()
        .filter(|&i| i >= visual_token_offset)
        .collect()
}

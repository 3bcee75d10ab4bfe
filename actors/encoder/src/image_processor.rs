//! Image input of LaVIT: `LaVITImageProcessor` (reference `LaVIT/models/transform.py`):
//! decode → RGB → `transforms.Resize((size, size), BICUBIC)` on a PIL image → `ToTensor` →
//! `Normalize(CLIP mean, CLIP std)`.
//!
//! torchvision resizes PIL images with PIL's own resampler, so the resize here follows
//! Pillow's `ImagingResample` (libImaging/Resample.c): a separable convolution with the
//! bicubic kernel (a = −0.5) whose support widens by the scale factor when shrinking
//! (antialiasing), coefficients normalised per output pixel and applied in 22-bit fixed
//! point, horizontal pass first with an 8-bit intermediate image.
//!
//! Decoding is the runtime's one limited decoder ([`lavit_runtime::image_input`]): the limits
//! are in force before the header is read, so a decompression bomb is refused up front.

use std::path::Path;

pub use lavit_runtime::image_input::ImageLimits;
use lavit_runtime::Result;
use tch::{Kind, Tensor};

/// CLIP normalisation (`transform.py`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `LaVITImageProcessor(image_size)`.
#[derive(Debug, Clone)]
pub struct LaVITImageProcessor {
    /// Output size (square), the encoder's `img_size`.
    pub image_size: u32,
    pub limits: ImageLimits,
}

impl LaVITImageProcessor {
    pub fn new(image_size: u32) -> Self {
        Self {
            image_size,
            limits: ImageLimits::default(),
        }
    }

    /// Read and preprocess an image file → [3, S, S] float32 (errors name the file).
    pub fn load(&self, path: &Path) -> Result<Tensor> {
        let rgb = lavit_runtime::image_input::read_rgb8(path, &self.limits)?;
        Ok(self.preprocess(&rgb))
    }

    /// Decode encoded bytes (PNG, JPEG, BMP, GIF) under the limits → RGB8.
    pub fn decode(&self, bytes: &[u8]) -> Result<image::RgbImage> {
        Ok(lavit_runtime::image_input::decode_rgb8(
            bytes,
            &self.limits,
        )?)
    }

    /// Encoded bytes → [3, S, S] float32, CLIP-normalised.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<Tensor> {
        let rgb = self.decode(bytes)?;
        Ok(self.preprocess(&rgb))
    }

    /// RGB8 image → [3, S, S] float32: PIL bicubic resize, /255, CLIP mean/std.
    pub fn preprocess(&self, rgb: &image::RgbImage) -> Tensor {
        let s = self.image_size;
        let resized = pil_resize_bicubic(rgb.as_raw(), rgb.width(), rgb.height(), s, s);
        let hwc = Tensor::from_slice(&resized)
            .reshape([s as i64, s as i64, 3])
            .to_kind(Kind::Float)
            / 255.0; // ToTensor
        let chw = hwc.permute([2, 0, 1]).contiguous(); // (3, S, S)
        let mean = Tensor::from_slice(&CLIP_MEAN)
            .to_kind(Kind::Float)
            .reshape([3, 1, 1]);
        let std = Tensor::from_slice(&CLIP_STD)
            .to_kind(Kind::Float)
            .reshape([3, 1, 1]);
        (chw - mean) / std
    }
}

/// Pillow's bicubic kernel (`bicubic_filter`, a = −0.5, support 2).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index and the fixed-point weights.
fn coeffs(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let mut w: Vec<f64> = (0..xmax)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = w.iter().sum();
            if ww != 0.0 {
                w.iter_mut().for_each(|k| *k /= ww);
            }
            let fixed = w
                .iter()
                .map(|&k| {
                    let v = k * (1u64 << PRECISION_BITS) as f64;
                    if k < 0.0 {
                        (-0.5 + v) as i64
                    } else {
                        (0.5 + v) as i64
                    }
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow `Image.resize((w, h), Image.BICUBIC)` on an RGB8 buffer (row-major, HWC).
pub fn pil_resize_bicubic(src: &[u8], w: u32, h: u32, ow: u32, oh: u32) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let (w_us, ow_us) = (w as usize, ow as usize);
    // Horizontal pass (skipped when the width is unchanged, as Pillow does).
    let horiz: Vec<u8> = if ow != w {
        let cx = coeffs(w, ow);
        let mut out = vec![0u8; h as usize * ow_us * 3];
        for y in 0..h as usize {
            for (xx, (xmin, k)) in cx.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = round;
                    for (x, kv) in k.iter().enumerate() {
                        ss += src[(y * w_us + xmin + x) * 3 + c] as i64 * kv;
                    }
                    out[(y * ow_us + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if oh == h {
        return horiz;
    }
    let cy = coeffs(h, oh);
    let mut out = vec![0u8; oh as usize * ow_us * 3];
    for (yy, (ymin, k)) in cy.iter().enumerate() {
        for x in 0..ow_us {
            for c in 0..3 {
                let mut ss = round;
                for (y, kv) in k.iter().enumerate() {
                    ss += horiz[((ymin + y) * ow_us + x) * 3 + c] as i64 * kv;
                }
                out[(yy * ow_us + x) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}

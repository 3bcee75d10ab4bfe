//! The one limited image decoder: every image that enters lavit (an HTTP request, a CLI
//! argument, an eval data file, a training folder) is decoded here, under [`ImageLimits`].
//!
//! An image is untrusted input: a 40 KB PNG can claim 100,000 × 100,000 pixels, a 0.6 MB one
//! can carry an ICC profile that inflates to 512 MiB (the `image` crate's default budget for
//! a PNG's ancillary chunks), a 16-bit one doubles every buffer. So, in this order:
//! 1. the encoded size is checked, and the format from the magic bytes (PNG, JPEG, GIF, BMP
//!    only);
//! 2. the limits are in force *before* the header is read: a PNG is read with the `png`
//!    crate under a small metadata budget ([`ImageLimits::max_metadata_bytes`]) with its
//!    ICC profile and text chunks skipped (LaVIT's reference, PIL's `convert("RGB")`, does
//!    not apply them); the other formats through `image::ImageReader` with its `Limits`
//!    set first;
//! 3. width, height and pixel count from the header are checked, then the bytes the decode
//!    will hold at once (the decoded frame plus the conversion to RGB) against
//!    [`ImageLimits::max_decode_bytes`], before any pixel buffer is allocated;
//! 4. 16-bit samples are reduced to 8 bits row by row as they are decoded (the high byte,
//!    as PIL's `RGB;16B` unpacker), palettes and grey are expanded within the same budget:
//!    there is never a full-size 16-bit intermediate;
//! 5. a panic inside a decoder is caught and becomes an error.
//!
//! The result is 8-bit RGB, or RGBA when the image has transparency (the training folder
//! reader composites it onto white); [`decode_rgb8`] drops alpha as PIL's `convert("RGB")`.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage, RgbaImage};

/// Size limits applied before decoding an untrusted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width or height in pixels.
    pub max_side: u32,
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Largest accepted encoded size in bytes.
    pub max_file_bytes: u64,
    /// Most bytes of pixel buffers a decode holds at once (the decoded frame and its
    /// conversion to 8-bit RGB / RGBA).
    pub max_decode_bytes: u64,
    /// Most bytes a PNG's ancillary chunks (eXIf, palette, …) and the decoder's line buffer
    /// may take; ICC profiles and text chunks are skipped, never inflated.
    pub max_metadata_bytes: u64,
}

impl Default for ImageLimits {
    /// 8192 per side, 40 M pixels, 64 MiB encoded (the CLI, eval and training readers).
    fn default() -> Self {
        Self::new(8192, 40_000_000, 64 << 20)
    }
}

impl ImageLimits {
    /// Limits from the three user-facing caps; the decode budget follows from the pixel
    /// cap (8 bytes per pixel: an RGBA frame and its RGB conversion, plus 1 MiB), the
    /// metadata budget is 2 MiB.
    pub fn new(max_side: u32, max_pixels: u64, max_file_bytes: u64) -> Self {
        Self {
            max_side,
            max_pixels,
            max_file_bytes,
            max_decode_bytes: max_pixels.saturating_mul(8).saturating_add(1 << 20),
            max_metadata_bytes: 2 << 20,
        }
    }
}

/// What was wrong with an image (the server answers 413, 415 or 400 by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The encoded image is over `max_file_bytes`.
    TooLarge,
    /// Not a PNG, JPEG, GIF or BMP.
    Unsupported,
    /// Unreadable, truncated, over a size limit, or a decoder failure.
    Invalid,
}

/// An image refused or not decodable, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct DecodeError {
    /// What class of problem (the HTTP status follows from it).
    pub kind: DecodeErrorKind,
    /// What was wrong, for the user.
    pub msg: String,
}

impl DecodeError {
    fn invalid(msg: impl Into<String>) -> Self {
        DecodeError {
            kind: DecodeErrorKind::Invalid,
            msg: msg.into(),
        }
    }
}

impl From<DecodeError> for crate::Error {
    fn from(e: DecodeError) -> Self {
        crate::Error::Invalid(e.msg)
    }
}

/// Decode an encoded image (PNG, JPEG, GIF, BMP) under `lim` → 8-bit RGB, or RGBA when it
/// has an alpha channel (see the module documentation for the order of the checks).
pub fn decode(bytes: &[u8], lim: &ImageLimits) -> Result<DynamicImage, DecodeError> {
    if bytes.len() as u64 > lim.max_file_bytes {
        return Err(DecodeError {
            kind: DecodeErrorKind::TooLarge,
            msg: format!(
                "the encoded image is {} bytes, more than the {}-byte limit",
                bytes.len(),
                lim.max_file_bytes
            ),
        });
    }
    if bytes.is_empty() {
        return Err(DecodeError::invalid("empty image"));
    }
    let format = image::guess_format(bytes).map_err(|_| DecodeError {
        kind: DecodeErrorKind::Unsupported,
        msg: "not a PNG, JPEG, GIF or BMP image (unknown magic bytes)".into(),
    })?;
    let run = || match format {
        ImageFormat::Png => decode_png(bytes, lim),
        ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::Bmp => {
            decode_with_image(bytes, format, lim)
        }
        other => Err(DecodeError {
            kind: DecodeErrorKind::Unsupported,
            msg: format!("{other:?} images are not accepted (PNG, JPEG, GIF, BMP)"),
        }),
    };
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        Err(DecodeError::invalid(
            "the image decoder failed on this file",
        ))
    })
}

/// [`decode`], then alpha dropped (PIL's `convert("RGB")`).
pub fn decode_rgb8(bytes: &[u8], lim: &ImageLimits) -> Result<RgbImage, DecodeError> {
    Ok(decode(bytes, lim)?.into_rgb8())
}

/// Read an image file through the capped regular-file reader ([`crate::fsread`]: never a
/// FIFO, a device or a file over `max_file_bytes`) and [`decode`] it; errors name the file.
pub fn read(path: &Path, lim: &ImageLimits) -> crate::Result<DynamicImage> {
    let bytes = crate::fsread::read_capped(path, lim.max_file_bytes)?;
    decode(&bytes, lim).map_err(|e| crate::Error::ckpt(path, e.msg))
}

/// [`read`], then alpha dropped.
pub fn read_rgb8(path: &Path, lim: &ImageLimits) -> crate::Result<RgbImage> {
    Ok(read(path, lim)?.into_rgb8())
}

/// Width, height and pixel count against the limits.
fn check_size(w: u32, h: u32, lim: &ImageLimits) -> Result<(), DecodeError> {
    if w == 0 || h == 0 {
        return Err(DecodeError::invalid(format!(
            "the image has an empty size {w}x{h}"
        )));
    }
    let pixels = w as u64 * h as u64;
    if w > lim.max_side || h > lim.max_side || pixels > lim.max_pixels {
        return Err(DecodeError::invalid(format!(
            "the image is {w}x{h} ({pixels} pixels), over the limit (each side at most {}, \
             at most {} pixels)",
            lim.max_side, lim.max_pixels
        )));
    }
    Ok(())
}

/// The bytes a decode will hold at once against the decode budget.
fn check_budget(need: u64, w: u32, h: u32, lim: &ImageLimits) -> Result<(), DecodeError> {
    if need > lim.max_decode_bytes {
        return Err(DecodeError::invalid(format!(
            "decoding this {w}x{h} image needs {need} bytes of pixel buffers, over the \
             {}-byte decode budget",
            lim.max_decode_bytes
        )));
    }
    Ok(())
}

fn png_error(e: png::DecodingError) -> DecodeError {
    match e {
        png::DecodingError::LimitsExceeded => {
            DecodeError::invalid("the PNG's metadata chunks are over the decoder's metadata budget")
        }
        e => DecodeError::invalid(format!("cannot decode the PNG: {e}")),
    }
}

/// A PNG through the `png` crate: metadata budget and skipped ICC / text before the header,
/// size checks right after it, 16 → 8 bits and palette expansion row by row.
fn decode_png(bytes: &[u8], lim: &ImageLimits) -> Result<DynamicImage, DecodeError> {
    let budget = usize::try_from(lim.max_metadata_bytes).unwrap_or(usize::MAX);
    let mut dec = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: budget });
    dec.set_ignore_iccp_chunk(true);
    dec.set_ignore_text_chunk(true);
    let (w, h) = {
        let info = dec.read_header_info().map_err(png_error)?;
        (info.width, info.height)
    };
    check_size(w, h, lim)?;
    // EXPAND: palette → RGB(A), grey < 8 bits → 8 bits, tRNS → alpha; STRIP_16: the high
    // byte of each 16-bit sample, per row.
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(png_error)?;
    let (color, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight {
        return Err(DecodeError::invalid(format!(
            "unsupported PNG sample depth {depth:?} after expansion"
        )));
    }
    let frame = reader
        .output_buffer_size()
        .ok_or_else(|| DecodeError::invalid("the PNG frame does not fit in memory"))?
        as u64;
    let pixels = w as u64 * h as u64;
    let converted = match color {
        png::ColorType::Rgb | png::ColorType::Rgba => 0, // used in place
        png::ColorType::Grayscale => pixels * 3,
        png::ColorType::GrayscaleAlpha => pixels * 4,
        png::ColorType::Indexed => {
            return Err(DecodeError::invalid("a palette PNG was not expanded"));
        }
    };
    check_budget(frame + converted, w, h, lim)?;
    let mut buf = vec![0u8; frame as usize];
    let out = reader.next_frame(&mut buf).map_err(png_error)?;
    // The first frame of an APNG may be a sub-rectangle: take its own size.
    let (fw, fh) = (out.width, out.height);
    buf.truncate(out.buffer_size());
    let bad = || DecodeError::invalid("the PNG frame has an inconsistent size");
    Ok(match color {
        png::ColorType::Rgb => {
            DynamicImage::ImageRgb8(RgbImage::from_raw(fw, fh, buf).ok_or_else(bad)?)
        }
        png::ColorType::Rgba => {
            DynamicImage::ImageRgba8(RgbaImage::from_raw(fw, fh, buf).ok_or_else(bad)?)
        }
        png::ColorType::Grayscale => {
            let rgb: Vec<u8> = buf.iter().flat_map(|&v| [v, v, v]).collect();
            DynamicImage::ImageRgb8(RgbImage::from_raw(fw, fh, rgb).ok_or_else(bad)?)
        }
        png::ColorType::GrayscaleAlpha => {
            let rgba: Vec<u8> = buf
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0], p[1]])
                .collect();
            DynamicImage::ImageRgba8(RgbaImage::from_raw(fw, fh, rgba).ok_or_else(bad)?)
        }
        png::ColorType::Indexed => return Err(bad()),
    })
}

/// JPEG, GIF and BMP through `image::ImageReader`, its `Limits` set before the header is
/// read; the decoded frame then converted to 8-bit RGB / RGBA.
fn decode_with_image(
    bytes: &[u8],
    format: ImageFormat,
    lim: &ImageLimits,
) -> Result<DynamicImage, DecodeError> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(lim.max_side);
    limits.max_image_height = Some(lim.max_side);
    limits.max_alloc = Some(lim.max_decode_bytes);
    reader.limits(limits);
    let dec = reader
        .into_decoder()
        .map_err(|e| DecodeError::invalid(format!("unreadable image header: {e}")))?;
    let (w, h) = dec.dimensions();
    check_size(w, h, lim)?;
    let pixels = w as u64 * h as u64;
    let color = dec.color_type();
    let out_channels: u64 = if color.has_alpha() { 4 } else { 3 };
    let eight_bit_rgb = matches!(color, image::ColorType::Rgb8 | image::ColorType::Rgba8);
    let converted = if eight_bit_rgb {
        0
    } else {
        pixels * out_channels
    };
    check_budget(dec.total_bytes().saturating_add(converted), w, h, lim)?;
    let img = DynamicImage::from_decoder(dec)
        .map_err(|e| DecodeError::invalid(format!("cannot decode the image: {e}")))?;
    Ok(match img {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => img,
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.into_rgba8()),
        other => DynamicImage::ImageRgb8(other.into_rgb8()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_every_colour_type_to_eight_bit_rgb() {
        let lim = ImageLimits::default();
        let rgb = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        // 8-bit RGB round trips exactly, through PNG and BMP.
        let d = decode_rgb8(&png_bytes(&DynamicImage::ImageRgb8(rgb.clone())), &lim).unwrap();
        assert_eq!(d, rgb);
        let mut bmp = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(rgb.clone())
            .write_to(&mut bmp, ImageFormat::Bmp)
            .unwrap();
        assert_eq!(decode_rgb8(bmp.get_ref(), &lim).unwrap(), rgb);
        // 16-bit: the high byte of each sample.
        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(4, 2, |x, y| {
            image::Rgb([x as u16 * 0x1234, y as u16 * 0x8001, 0xfffe])
        });
        let d = decode_rgb8(&png_bytes(&DynamicImage::ImageRgb16(rgb16.clone())), &lim).unwrap();
        for (a, b) in d.pixels().zip(rgb16.pixels()) {
            assert_eq!(a.0, b.0.map(|v| (v >> 8) as u8));
        }
        // Grey and grey + alpha expand; alpha is kept by `decode`, dropped by `decode_rgb8`.
        let la = image::GrayAlphaImage::from_fn(3, 3, |x, _| image::LumaA([x as u8 * 100, 9]));
        let d = decode(&png_bytes(&DynamicImage::ImageLumaA8(la)), &lim).unwrap();
        let rgba = d.as_rgba8().unwrap();
        assert_eq!(rgba.get_pixel(2, 0).0, [200, 200, 200, 9]);
        assert_eq!(d.into_rgb8().get_pixel(1, 1).0, [100, 100, 100]);
    }

    /// A PNG from chunks: the signature, IHDR, then `extra` chunks, one IDAT of `idat`, IEND.
    fn png_with(
        w: u32,
        h: u32,
        bit_depth: u8,
        color: u8,
        extra: &[(&[u8; 4], Vec<u8>)],
        idat: &[u8],
    ) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend((data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend(kind);
            out.extend(data);
            let crc = crc32(&out[start..]);
            out.extend(crc.to_be_bytes());
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([bit_depth, color, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        for (k, d) in extra {
            chunk(&mut out, k, d);
        }
        chunk(&mut out, b"IDAT", idat);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// zlib stream of `n` zero bytes, deflated (stored blocks would be as large as `n`).
    fn zlib_zeros(n: usize) -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let chunk = vec![0u8; 1 << 20];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            z.write_all(&chunk[..k]).unwrap();
            left -= k;
        }
        z.finish().unwrap()
    }

    #[test]
    fn bombs_are_refused_before_any_pixel_buffer() {
        let lim = ImageLimits::default();
        // A header claiming 100,000 × 100,000 pixels.
        let bomb = png_with(100_000, 100_000, 8, 2, &[], &zlib_zeros(1000));
        let e = decode(&bomb, &lim).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Invalid);
        assert!(e.msg.contains("100000x100000"), "{}", e.msg);
        // 16-bit RGBA: the frame is decoded at 8 bits (4 bytes / pixel), so it fits a budget
        // of 5 bytes per pixel that a full-size 16-bit frame (8 bytes / pixel) would not.
        let small = ImageLimits {
            max_decode_bytes: 64 * 64 * 5,
            ..ImageLimits::new(64, 64 * 64, 1 << 20)
        };
        let p16 = png_with(64, 64, 16, 6, &[], &z_rows(64, 64 * 8));
        let d = decode(&p16, &small).unwrap();
        assert_eq!(d.as_rgba8().unwrap().get_pixel(5, 5).0, [0x40; 4]);
        // Grey + alpha → RGBA needs 2 + 4 bytes per pixel: over that budget, refused.
        let ga = png_with(64, 64, 8, 4, &[], &z_rows(64, 64 * 2));
        let e = decode(&ga, &small).unwrap_err();
        assert!(e.msg.contains("decode budget"), "{}", e.msg);
        // An ICC profile inflating to 64 MiB is skipped, never inflated.
        let mut iccp = b"icc\0\0".to_vec();
        iccp.extend(zlib_zeros(64 << 20));
        let p = png_with(64, 64, 16, 6, &[(b"iCCP", iccp)], &z_rows(64, 64 * 8));
        assert!(decode(&p, &small).is_ok());
        // Other ancillary data over the metadata budget is refused.
        let exif = png_with(
            64,
            64,
            16,
            6,
            &[(b"eXIf", vec![0; 3 << 20])],
            &z_rows(64, 64 * 8),
        );
        let e = decode(
            &exif,
            &ImageLimits {
                max_file_bytes: 8 << 20,
                ..small
            },
        )
        .unwrap_err();
        assert!(e.msg.contains("metadata budget"), "{}", e.msg);
        // Unknown magic bytes and oversized input have their own kinds.
        assert_eq!(
            decode(b"GIF", &lim).unwrap_err().kind,
            DecodeErrorKind::Unsupported
        );
        assert_eq!(
            decode(
                &bomb,
                &ImageLimits {
                    max_file_bytes: 10,
                    ..lim
                }
            )
            .unwrap_err()
            .kind,
            DecodeErrorKind::TooLarge
        );
    }

    fn z_rows(h: usize, row_bytes: usize) -> Vec<u8> {
        let rows: Vec<u8> = (0..h)
            .flat_map(|_| std::iter::once(0u8).chain(std::iter::repeat_n(0x40, row_bytes)))
            .collect();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut z, &rows).unwrap();
        z.finish().unwrap()
    }
}

//! Request bodies of the HTTP API and their validation. Everything here runs before any model
//! work and answers bad input with a 4xx and a message naming the field; it never panics.

use std::io::Cursor;

use base64::Engine;
use image::DynamicImage;
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, Limits};

/// POST /v1/images/generations
#[derive(Deserialize, Debug)]
pub struct GenerationRequest {
    pub prompt: String,
    /// When given, the served model id (else 404).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "one")]
    pub n: u64,
    /// "WIDTHxHEIGHT"
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Decoder (U-Net) guidance.
    #[serde(default)]
    pub guidance: Option<f64>,
    /// LLM guidance.
    #[serde(default)]
    pub llm_guidance: Option<f64>,
    #[serde(default)]
    pub steps: Option<u64>,
    /// Only "b64_json" is produced (no URLs are hosted).
    #[serde(default)]
    pub response_format: Option<String>,
}

fn one() -> u64 {
    1
}

/// POST /v1/tokenize
#[derive(Deserialize, Debug)]
pub struct TokenizeRequest {
    /// One base64 image (optionally a `data:` URL) …
    #[serde(default)]
    pub image: Option<String>,
    /// … or several.
    #[serde(default)]
    pub images: Option<Vec<String>>,
    /// Also return the selector's keep mask per image (`keep`, `grid`).
    #[serde(default)]
    pub keep_mask: bool,
}

/// POST /v1/chat/completions (the fields this server uses; others are ignored).
#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// When given, the served model id (else 404).
    #[serde(default)]
    pub model: Option<String>,
    /// Choices per request: only 1.
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
}

/// `stream_options` of a streamed chat request.
#[derive(Deserialize, Debug)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and empty `choices` before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize, Debug)]
pub struct ChatMessage {
    pub role: String,
    pub content: Value,
}

pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// A finite number in `[lo, hi]`, or a 400 naming the field.
pub fn check_range(name: &str, v: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(
            ApiError::bad(format!("`{name}` = {v} is out of range [{lo}, {hi}]")).with_param(name),
        );
    }
    Ok(v)
}

pub fn check_int(name: &str, v: u64, lo: u64, hi: u64) -> Result<usize, ApiError> {
    if v < lo || v > hi {
        return Err(
            ApiError::bad(format!("`{name}` = {v} is out of range [{lo}, {hi}]")).with_param(name),
        );
    }
    Ok(v as usize)
}

pub fn check_prompt(name: &str, p: &str, lim: &Limits) -> Result<(), ApiError> {
    check_prompt_inner(name, p, lim).map_err(|e| e.with_param(name))
}

fn check_prompt_inner(name: &str, p: &str, lim: &Limits) -> Result<(), ApiError> {
    if p.trim().is_empty() {
        return Err(ApiError::bad(format!("`{name}` is empty")));
    }
    let n = p.chars().count();
    if n > lim.max_prompt_chars {
        return Err(ApiError::bad(format!(
            "`{name}` has {n} characters, the limit is {}",
            lim.max_prompt_chars
        )));
    }
    if p.contains('\0') {
        return Err(ApiError::bad(format!("`{name}` contains a NUL character")));
    }
    Ok(())
}

/// "WxH" with both sides multiples of 8 in `[8, max_image_side]`.
pub fn parse_size(s: &str, lim: &Limits) -> Result<(usize, usize), ApiError> {
    parse_size_inner(s, lim).map_err(|e| e.with_param("size"))
}

fn parse_size_inner(s: &str, lim: &Limits) -> Result<(usize, usize), ApiError> {
    let bad = || ApiError::bad(format!("`size` = {s:?}: expected \"WIDTHxHEIGHT\""));
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    for (name, v) in [("width", w), ("height", h)] {
        if v < 8 || v > lim.max_image_side || v % 8 != 0 {
            return Err(ApiError::bad(format!(
                "`size` {name} {v} must be a multiple of 8 in [8, {}]",
                lim.max_image_side
            )));
        }
    }
    Ok((w, h))
}

/// An image given as base64 (or a `data:image/...;base64,` URL), checked before decoding:
/// encoded length, base64, magic bytes, then the header's width, height and pixel count against
/// the caps (decompression bombs are refused before any pixel is decoded), then decoded with
/// allocation limits.
pub fn decode_image(name: &str, b64: &str, lim: &Limits) -> Result<DynamicImage, ApiError> {
    decode_image_inner(name, b64, lim).map_err(|e| e.with_param(name))
}

fn decode_image_inner(name: &str, b64: &str, lim: &Limits) -> Result<DynamicImage, ApiError> {
    let data = if let Some(rest) = b64.strip_prefix("data:") {
        let (head, payload) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::bad(format!("`{name}`: a data URL without a comma")))?;
        if !head.ends_with(";base64") {
            return Err(ApiError::bad(format!(
                "`{name}`: only base64 data URLs are accepted"
            )));
        }
        payload
    } else if b64.starts_with("http://") || b64.starts_with("https://") {
        return Err(ApiError::bad(format!(
            "`{name}`: remote image URLs are not fetched; send the image as base64"
        )));
    } else {
        b64
    };
    let data = data.trim();
    if data.len() > lim.max_image_bytes.div_ceil(3) * 4 + 4 {
        return Err(ApiError::too_large(format!(
            "`{name}`: the encoded image is larger than {} bytes",
            lim.max_image_bytes
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ApiError::bad(format!("`{name}`: bad base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::bad(format!("`{name}`: empty image")));
    }
    let format = image::guess_format(&bytes).map_err(|_| {
        ApiError::unsupported(format!(
            "`{name}`: not a PNG, JPEG, GIF or BMP image (unknown magic bytes)"
        ))
    })?;
    if !matches!(
        format,
        image::ImageFormat::Png
            | image::ImageFormat::Jpeg
            | image::ImageFormat::Gif
            | image::ImageFormat::Bmp
    ) {
        return Err(ApiError::unsupported(format!(
            "`{name}`: {format:?} images are not accepted (PNG, JPEG, GIF, BMP)"
        )));
    }
    let (w, h) = image::ImageReader::with_format(Cursor::new(&bytes), format)
        .into_dimensions()
        .map_err(|e| ApiError::bad(format!("`{name}`: unreadable image header: {e}")))?;
    let side = lim.max_image_side as u64;
    if w == 0 || h == 0 || w as u64 > side || h as u64 > side {
        return Err(ApiError::bad(format!(
            "`{name}`: image is {w}x{h}; each side must be in [1, {side}]"
        )));
    }
    if w as u64 * h as u64 > lim.max_image_pixels {
        return Err(ApiError::bad(format!(
            "`{name}`: image has {} pixels, the limit is {}",
            w as u64 * h as u64,
            lim.max_image_pixels
        )));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(&bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(lim.max_image_pixels * 4 * 2 + (1 << 20));
    reader.limits(limits);
    let decoded = std::panic::catch_unwind(move || reader.decode())
        .map_err(|_| ApiError::bad(format!("`{name}`: the image decoder failed on this file")))?;
    decoded.map_err(|e| ApiError::bad(format!("`{name}`: cannot decode the image: {e}")))
}

/// The question text and the images (base64 strings) of the last user message.
pub fn chat_inputs(req: &ChatRequest) -> Result<(String, Vec<String>), ApiError> {
    chat_inputs_inner(req).map_err(|e| e.with_param("messages"))
}

fn chat_inputs_inner(req: &ChatRequest) -> Result<(String, Vec<String>), ApiError> {
    let msg = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .ok_or_else(|| ApiError::bad("`messages` has no user message"))?;
    let mut text = String::new();
    let mut images = Vec::new();
    match &msg.content {
        Value::String(s) => text.push_str(s),
        Value::Array(parts) => {
            for (i, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" => {
                        text.push_str(p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::bad(format!("content[{i}]: a text part without `text`"))
                        })?)
                    }
                    "image_url" => {
                        let url = p
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::bad(format!("content[{i}]: `image_url.url` is missing"))
                            })?;
                        images.push(url.to_string());
                    }
                    "image" => images.push(
                        p.get("image")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::bad(format!("content[{i}]: `image` is missing"))
                            })?
                            .to_string(),
                    ),
                    other => {
                        return Err(ApiError::bad(format!(
                            "content[{i}]: unsupported part type {other:?}"
                        )))
                    }
                }
            }
        }
        _ => {
            return Err(ApiError::bad(
                "`content` must be a string or an array of parts",
            ))
        }
    }
    Ok((text, images))
}

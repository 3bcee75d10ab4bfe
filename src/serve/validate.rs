//! Request bodies of the HTTP API and their validation. Everything here runs before any model
//! work (before admission) and answers bad input with a 4xx and a message naming the field;
//! it never panics (`tests/fuzz.rs` mutates request bodies through it).

use base64::Engine;
use image::DynamicImage;
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, Limits};
pub use crate::pipeline::options::{generation_cost, GenerateParams, OptionError, SizeRule};
use crate::pipeline::ModelInfo;
use lavit_runtime::image_input::DecodeErrorKind;
use lavit_runtime::manifest::{Selection, SelectionChoice};
use lavit_runtime::messages::{CaptionOptions, GenerateOptions};

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
    /// Keep/drop decisions: `argmax` or `gumbel`; absent: the served default (the checkpoint
    /// manifest's `tokenizer.selection`, unless the server's `[pipeline]` config overrides it).
    #[serde(default)]
    pub selection: Option<String>,
    /// Seed of the Gumbel noise; absent: the served default's.
    #[serde(default)]
    pub seed: Option<u64>,
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

/// "WxH", syntax only (the sides are checked by the options builder,
/// [`ModelInfo::generate_options`]).
pub fn parse_size(s: &str) -> Result<(usize, usize), ApiError> {
    let bad =
        || ApiError::bad(format!("`size` = {s:?}: expected \"WIDTHxHEIGHT\"")).with_param("size");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    Ok((w, h))
}

impl From<OptionError> for ApiError {
    fn from(e: OptionError) -> Self {
        let a = ApiError::bad(e.message);
        match e.param {
            Some(p) => a.with_param(p),
            None => a,
        }
    }
}

/// A generation request checked and turned into options, before admission and before any
/// model work: the prompt and the response format here, everything else by the one options
/// builder ([`ModelInfo::generate_options`]: `n`, `size` against the model's geometry,
/// guidance, `steps`, then the per-request cost budget).
pub fn generation_options(
    r: &GenerationRequest,
    lim: &Limits,
    info: &ModelInfo,
) -> Result<GenerateOptions, ApiError> {
    check_prompt("prompt", &r.prompt, lim)?;
    Ok(info.generate_options(&request_params(r)?, &lim.budget())?)
}

/// The options a generation or image-edit request asks for (the prompt aside: each endpoint
/// checks its own), for the one options builder: `response_format` and the `size` syntax are
/// checked here, the values by the builder.
pub fn request_params(r: &GenerationRequest) -> Result<GenerateParams, ApiError> {
    if let Some(f) = &r.response_format {
        if f != "b64_json" {
            return Err(ApiError::bad(format!(
                "`response_format` = {f:?}: only \"b64_json\" is served"
            ))
            .with_param("response_format"));
        }
    }
    Ok(GenerateParams {
        n: Some(r.n),
        seed: r.seed,
        size: r.size.as_deref().map(parse_size).transpose()?,
        guidance: r.guidance,
        llm_guidance: r.llm_guidance,
        steps: r.steps,
        ..GenerateParams::default()
    })
}

/// A chat request checked: the question, the one image (base64, decoded later off the async
/// workers), the caption options, and whether to stream (with a usage chunk).
#[derive(Debug)]
pub struct ChatPlan {
    pub question: String,
    pub image: String,
    pub opts: CaptionOptions,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn chat_plan(r: ChatRequest, lim: &Limits) -> Result<ChatPlan, ApiError> {
    if let Some(n) = r.n {
        check_int("n", n, 1, 1)?;
    }
    let (question, mut images) = chat_inputs(&r)?;
    if images.len() != 1 {
        return Err(ApiError::bad(format!(
            "the user message must hold exactly one image part, it holds {}",
            images.len()
        ))
        .with_param("messages"));
    }
    if !question.is_empty() {
        check_prompt("text", &question, lim)?;
    }
    let mut opts = CaptionOptions::default();
    if let Some(m) = r.max_completion_tokens.or(r.max_tokens) {
        opts.max_new_tokens = check_int("max_tokens", m, 1, lim.max_new_tokens)?;
    }
    if let Some(t) = r.temperature {
        opts.temperature = check_range("temperature", t, 0.0, 2.0)?;
    }
    if let Some(p) = r.top_p {
        opts.top_p = check_range("top_p", p, 0.0, 1.0)?;
        if opts.top_p == 0.0 {
            return Err(ApiError::bad("`top_p` must be > 0").with_param("top_p"));
        }
    }
    if let Some(k) = r.top_k {
        opts.top_k = check_int("top_k", k, 0, 100_000)?;
    }
    if let Some(s) = r.seed {
        opts.seed = s;
    }
    if r.stream_options.is_some() && !r.stream {
        return Err(
            ApiError::bad("`stream_options` is only allowed with `stream: true`")
                .with_param("stream_options"),
        );
    }
    Ok(ChatPlan {
        question,
        image: images.pop().unwrap_or_default(),
        opts,
        stream: r.stream,
        include_usage: r.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// The selection a tokenize request asks for: `None` when it names neither `selection` nor
/// `seed` (the SelectorMerger stage's default, `default`), else `default` with the fields it
/// names replaced. An unknown `selection` is a 400 naming the field.
pub fn tokenize_selection(
    r: &TokenizeRequest,
    default: SelectionChoice,
) -> Result<Option<SelectionChoice>, ApiError> {
    let selection = match r.selection.as_deref() {
        None => default.selection,
        Some(s) => Selection::parse(s).ok_or_else(|| {
            ApiError::bad(format!(
                "`selection` = {s:?} is not one of \"argmax\", \"gumbel\""
            ))
            .with_param("selection")
        })?,
    };
    if r.selection.is_none() && r.seed.is_none() {
        return Ok(None);
    }
    Ok(Some(SelectionChoice {
        selection,
        seed: r.seed.unwrap_or(default.seed),
    }))
}

/// The images of a tokenize request (1 to `max_images` base64 strings).
pub fn tokenize_images(r: TokenizeRequest, lim: &Limits) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match (r.image, r.images) {
        (Some(one), None) => vec![one],
        (None, Some(many)) => many,
        _ => return Err(ApiError::bad("give exactly one of `image` or `images`")),
    };
    if list.is_empty() || list.len() > lim.max_images {
        return Err(ApiError::bad(format!(
            "`images` must hold 1 to {} images, got {}",
            lim.max_images,
            list.len()
        ))
        .with_param("images"));
    }
    Ok(list)
}

/// An image given as base64 (or a `data:image/...;base64,` URL): the encoded length, the
/// base64, then [`lavit_runtime::image_input::decode`] under the server's caps (magic bytes,
/// the header's width, height and pixel count before any pixel is decoded, a decode budget,
/// ancillary chunks bounded). 413 over `max_image_bytes`, 415 for another format, else 400.
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
    decode_image_inner_bytes(name, &bytes, lim)
}

/// An image sent as its encoded bytes (a multipart file field): the byte count, then the one
/// limited decoder as [`decode_image`]. 413 over `max_image_bytes`, 415 for another format,
/// else 400; the error names the field.
pub fn decode_image_bytes(
    name: &str,
    bytes: &[u8],
    lim: &Limits,
) -> Result<DynamicImage, ApiError> {
    if bytes.len() > lim.max_image_bytes {
        return Err(ApiError::too_large(format!(
            "`{name}`: the image has {} bytes, more than server.max_image_bytes = {}",
            bytes.len(),
            lim.max_image_bytes
        ))
        .with_param(name));
    }
    decode_image_inner_bytes(name, bytes, lim).map_err(|e| e.with_param(name))
}

fn decode_image_inner_bytes(
    name: &str,
    bytes: &[u8],
    lim: &Limits,
) -> Result<DynamicImage, ApiError> {
    // The one limited decoder: the caps are in force before the header is read.
    lavit_runtime::image_input::decode(bytes, &lim.image_limits()).map_err(|e| {
        let msg = format!("`{name}`: {e}");
        match e.kind {
            DecodeErrorKind::TooLarge => ApiError::too_large(msg),
            DecodeErrorKind::Unsupported => ApiError::unsupported(msg),
            DecodeErrorKind::Invalid => ApiError::bad(msg),
        }
    })
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

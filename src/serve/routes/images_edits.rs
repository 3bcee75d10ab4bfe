//! `POST /v1/images/edits`: image and text parts → images, LaVIT's multimodal synthesis (the
//! official `multimodal_synthesis`) in the form of the OpenAI API's image edits, so the
//! official `openai` client's `images.edit` works unmodified (scripts/openai-check.py).
//!
//! The body is `multipart/form-data` ([`super::multipart`]) with the fields
//! - `image` or `image[]`: one or several image files (PNG, JPEG, BMP, GIF), at most
//!   `server.max_images`, each under the server's image caps;
//! - `prompt`: the text (may be empty or left out: the images alone are the prompt);
//! - `n`, `size`, `response_format` (`b64_json`), `model`, and lavit's `seed`, `guidance`,
//!   `llm_guidance`, `steps`, with the meaning and bounds of `/v1/images/generations`;
//!   `llm_guidance` defaults to the checkpoint's synthesis guidance (official 5.0).
//!
//! The prompt is the images in the order sent, then the text: the official example's
//! [image, "It is running in the snow"]. A `mask` (OpenAI's inpainting) is refused, as is any
//! field not named here; all checks, the prompt's worst-case length in the language model
//! included ([`crate::pipeline::SynthesisInfo::check_prompt`]), run before admission. The
//! answer is the generations' `{"created", "data": [{"b64_json"}]}`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::images::images_reply;
use crate::pipeline::Part;
use crate::serve::multipart::{self, Field};
use crate::serve::state::{off_worker, wait_watching, AppState, Reply};
use crate::serve::validate::{check_prompt, decode_image_bytes, request_params, GenerationRequest};
use crate::serve::{ApiError, Limits};
use lavit_runtime::messages::GenerateOptions;

/// The form fields this endpoint reads (anything else is a 400).
const FIELDS: [&str; 11] = [
    "image",
    "prompt",
    "n",
    "size",
    "response_format",
    "model",
    "seed",
    "guidance",
    "llm_guidance",
    "steps",
    "user",
];

/// An edit request checked: the images' bytes (decoded later, off the async workers), the
/// prompt text and the options.
pub struct EditPlan<'a> {
    pub images: Vec<&'a [u8]>,
    pub prompt: String,
    pub opts: GenerateOptions,
}

/// The image field's name as the client wrote it (`image` or `image[]`, also `image[0]`).
fn is_image_field(name: &str) -> bool {
    name == "image"
        || name
            .strip_prefix("image[")
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|i| i.chars().all(|c| c.is_ascii_digit()))
}

fn number<T: std::str::FromStr>(f: &Field, what: &str) -> Result<T, ApiError> {
    let t = f.text()?.trim();
    t.parse().map_err(|_| {
        ApiError::bad(format!("`{}` = {t:?} is not {what}", f.name)).with_param(&f.name)
    })
}

/// The fields of an edit request checked against the limits and the model, before any model
/// work (a 4xx naming the field otherwise).
pub fn edit_plan<'a>(
    fields: &[Field<'a>],
    lim: &Limits,
    info: &crate::pipeline::ModelInfo,
) -> Result<EditPlan<'a>, ApiError> {
    let mut images = Vec::new();
    let mut r = GenerationRequest {
        prompt: String::new(),
        model: None,
        n: 1,
        size: None,
        seed: None,
        guidance: None,
        llm_guidance: None,
        steps: None,
        response_format: None,
    };
    let mut seen: Vec<&str> = Vec::new();
    for f in fields {
        if is_image_field(&f.name) {
            if images.len() == lim.max_images {
                return Err(ApiError::bad(format!(
                    "more than {} images; this server takes at most server.max_images = {} \
                     per request",
                    lim.max_images, lim.max_images
                ))
                .with_param("image"));
            }
            images.push(f.data);
            continue;
        }
        let name = f.name.as_str();
        if name == "mask" {
            return Err(ApiError::bad(
                "`mask` is not supported: LaVIT draws a new image from the image and text \
                 parts (multimodal synthesis), it does not inpaint",
            )
            .with_param("mask"));
        }
        if !FIELDS.contains(&name) {
            return Err(ApiError::bad(format!(
                "unknown form field `{name}`; this endpoint takes image (or image[]), {}",
                FIELDS[1..].join(", ")
            ))
            .with_param(name));
        }
        if seen.contains(&name) {
            return Err(
                ApiError::bad(format!("form field `{name}` is given twice")).with_param(name)
            );
        }
        seen.push(name);
        match name {
            "prompt" => r.prompt = f.text()?.to_string(),
            "n" => r.n = number(f, "a whole number")?,
            "size" => r.size = Some(f.text()?.to_string()),
            "response_format" => r.response_format = Some(f.text()?.to_string()),
            "model" => r.model = Some(f.text()?.to_string()),
            "seed" => r.seed = Some(number(f, "a whole number")?),
            "guidance" => r.guidance = Some(number(f, "a number")?),
            "llm_guidance" => r.llm_guidance = Some(number(f, "a number")?),
            "steps" => r.steps = Some(number(f, "a whole number")?),
            // OpenAI's end-user id: accepted, not used.
            _ => {}
        }
    }
    if images.is_empty() {
        return Err(ApiError::bad(
            "no `image` file: an edit needs at least one image (field `image` or `image[]`)",
        )
        .with_param("image"));
    }
    if !r.prompt.is_empty() {
        check_prompt("prompt", &r.prompt, lim)?;
    }
    let opts = info.synthesis_options(&request_params(&r)?, &lim.budget())?;
    info.synthesis
        .check_prompt(images.len(), &[r.prompt.as_str()], &opts)
        .map_err(|m| ApiError::bad(m).with_param("image"))?;
    Ok(EditPlan {
        images,
        prompt: r.prompt,
        opts,
    })
}

/// The plan's `model` field (checked against the served model by the handler).
fn model_of<'a>(fields: &'a [Field]) -> Option<&'a str> {
    fields
        .iter()
        .find(|f| f.name == "model")
        .and_then(|f| std::str::from_utf8(f.data).ok())
}

pub(crate) async fn edits(
    req: HttpRequest,
    body: web::Bytes,
    st: web::Data<AppState>,
) -> HttpResponse {
    edits_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

async fn edits_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multipart::boundary(ct)?;
    let fields = multipart::parse(&body, &boundary)?;
    st.check_model(model_of(&fields))?;
    let plan = edit_plan(&fields, &st.limits, st.pipe.info())?;
    let owned: Vec<Vec<u8>> = plan.images.iter().map(|b| b.to_vec()).collect();
    let (prompt, opts) = (plan.prompt, plan.opts);
    let ticket = st.pipe.admit()?;
    // Decoding and preprocessing the images is CPU work: off the async workers.
    let (pipe, lim) = (st.pipe.clone(), st.limits.clone());
    let request = off_worker(&st, "image_decode", move || {
        let mut parts = owned
            .iter()
            .enumerate()
            .map(|(i, b)| decode_image_bytes(&format!("image[{i}]"), b, &lim).map(Part::Image))
            .collect::<Result<Vec<_>, _>>()?;
        if !prompt.is_empty() {
            parts.push(Part::Text(prompt));
        }
        Ok(pipe.synthesis_request(&parts, opts)?)
    })
    .await?;
    let mut handle = st.pipe.start_synthesis(ticket, request).await?;
    let out = wait_watching(&req, &mut handle).await?;
    images_reply(&st, out).await
}

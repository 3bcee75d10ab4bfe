//! `POST /v1/images/generations`: text → images (b64_json PNGs), as the OpenAI API; the
//! image reply `/v1/images/edits` shares.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::serve::state::*;
use crate::serve::validate::*;
use crate::serve::ApiError;
use lavit_runtime::messages::Output;

pub(crate) async fn generations(
    req: HttpRequest,
    body: web::Bytes,
    st: web::Data<AppState>,
) -> HttpResponse {
    generations_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

async fn generations_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let r: GenerationRequest = parse_json(&body)?;
    st.check_model(r.model.as_deref())?;
    // Everything, the per-request cost budget included, is checked before admission.
    let opts = generation_options(&r, &st.limits, st.pipe.info())?;
    let ticket = st.pipe.admit()?;
    let mut handle = st.pipe.start_generate(ticket, r.prompt, opts).await?;
    let out = wait_watching(&req, &mut handle).await?;
    images_reply(&st, out).await
}

/// The answer of an image request (generations, edits): `{"created", "data": [{"b64_json"}]}`
/// from the pipeline's pixels, PNG-encoded off the async workers.
pub(crate) async fn images_reply(st: &web::Data<AppState>, out: Output) -> Reply {
    let Output::Pixels { images: px, .. } = out else {
        return Err(ApiError::internal(
            "stage",
            "the pipeline returned no pixels",
        ));
    };
    // Pixels → PNG → base64 is CPU work: off the async workers.
    let data = off_worker(st, "png_encode", move || {
        let images = crate::pipeline::to_images(&px)
            .map_err(|e| ApiError::internal("output", format!("generated pixels: {e}")))?;
        images
            .iter()
            .map(|im| png_base64(im).map(|b| json!({ "b64_json": b })))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({ "created": now_secs(), "data": data })))
}

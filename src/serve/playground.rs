//! The web playground at `/`: prompt → images, image upload → caption, and the token view
//! (which patches the selector kept, how many tokens each image became). Three static files
//! embedded in the binary; the page calls the same `/v1/*` endpoints as any client, so it
//! needs nothing the API does not offer. No CDN, no build step.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;

const INDEX: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE: &str = include_str!("static/style.css");

/// Register the playground's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/static/app.js", web::get().to(app_js))
        .route("/static/style.css", web::get().to(style))
        .route("/playground/info", web::get().to(info));
}

fn page(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-content-type-options", "nosniff"))
        .body(body)
}

async fn index() -> HttpResponse {
    page("text/html; charset=utf-8", INDEX)
}

async fn app_js() -> HttpResponse {
    page("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> HttpResponse {
    page("text/css; charset=utf-8", STYLE)
}

/// What the page needs to set itself up: the model id, whether a key is required, the sizes,
/// the served default selection (and the manifest's note on it).
async fn info(st: web::Data<AppState>) -> HttpResponse {
    let i = st.pipe.info();
    HttpResponse::Ok().json(json!({
        "model": st.limits.model_id,
        "api_key_required": st.api_key.is_some(),
        "image_size": i.image_size,
        "default_size": [i.default_size.0, i.default_size.1],
        "max_n": st.limits.max_n,
        "max_steps": st.limits.max_steps,
        "generate": !st.pipe.tokenizer_only(),
        "selection": i.selection,
        "selection_note": i.selection_note,
    }))
}

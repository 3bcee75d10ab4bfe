//! `GET /v1/models` and `GET /v1/models/{id}`: the one model this server serves.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::serve::state::AppState;

pub(crate) async fn models(req: HttpRequest, st: web::Data<AppState>) -> HttpResponse {
    match st.authorize(&req) {
        Ok(()) => HttpResponse::Ok().json(json!({"object": "list", "data": [st.model_object()]})),
        Err(e) => e.response(),
    }
}

pub(crate) async fn model(
    req: HttpRequest,
    id: web::Path<String>,
    st: web::Data<AppState>,
) -> HttpResponse {
    let found = st
        .authorize(&req)
        .and_then(|()| st.check_model(Some(id.as_str())));
    match found {
        Ok(()) => HttpResponse::Ok().json(st.model_object()),
        Err(e) => e.response(),
    }
}

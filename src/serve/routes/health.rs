//! Probes and metrics: `GET /health`, `GET /ready`, `GET /metrics` (Prometheus text).

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::serve::state::AppState;
use crate::serve::{metrics, ApiError};

pub(crate) async fn health(st: web::Data<AppState>) -> HttpResponse {
    if st.pipe.graph().healthy() {
        HttpResponse::Ok().json(json!({"status": "ok"}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "unhealthy"}))
    }
}

/// `GET /ready`: 200 once warmed up, 503 with the reason otherwise: still warming up,
/// draining, or unhealthy (a stage exited, e.g. after `max_consecutive_panics` panics in a
/// row; `exited` names it and how it ended). The same transition shows in `/metrics` as
/// `lavit_healthy 0` and `lavit_stage_up{stage} 0`.
pub(crate) async fn ready(st: web::Data<AppState>) -> HttpResponse {
    let g = st.pipe.graph();
    let reason = if !g.healthy() {
        "unhealthy: a stage exited"
    } else if g.admission().is_draining() {
        "draining"
    } else if !st.ready.load(Ordering::SeqCst) {
        "warming up"
    } else {
        return HttpResponse::Ok().json(json!({"status": "ready"}));
    };
    let exited: serde_json::Map<String, serde_json::Value> = lavit_runtime::stage::StageKind::ALL
        .into_iter()
        .filter_map(|k| {
            g.exit_status(k)
                .map(|x| (k.name().to_string(), json!(format!("{x:?}"))))
        })
        .collect();
    HttpResponse::ServiceUnavailable()
        .json(json!({"status": "not ready", "reason": reason, "exited": exited}))
}

pub(crate) async fn metrics_route(st: web::Data<AppState>) -> HttpResponse {
    match metrics::render(&st) {
        Ok(text) => HttpResponse::Ok()
            .content_type(prometheus::TEXT_FORMAT)
            .body(text),
        Err(e) => ApiError::internal("metrics", format!("metrics: {e}")).response(),
    }
}

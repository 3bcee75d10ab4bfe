//! `POST /admin/fault` (test builds only, with `fault_injection = true`).

#![cfg(feature = "testing")]

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::serve::state::AppState;
use crate::serve::validate::parse_json;
use crate::serve::ApiError;

/// `POST /admin/fault` (only with `fault_injection = true`): the named stage's next forward
/// pass returns an error or panics, to check how clients see a 500.
pub(crate) async fn fault(body: web::Bytes, st: web::Data<AppState>) -> HttpResponse {
    #[derive(Deserialize)]
    struct F {
        stage: String,
        fault: String,
    }
    let go = || -> Result<(), ApiError> {
        let f: F = parse_json(&body)?;
        let stage = lavit_runtime::stage::StageKind::ALL
            .into_iter()
            .find(|k| k.to_string() == f.stage)
            .ok_or_else(|| {
                ApiError::bad(format!("unknown stage {:?}", f.stage)).with_param("stage")
            })?;
        let kind = match f.fault.as_str() {
            "error" => crate::pipeline::Fault::Error,
            "panic" => crate::pipeline::Fault::Panic,
            other => {
                return Err(
                    ApiError::bad(format!("`fault` = {other:?}: \"error\" or \"panic\""))
                        .with_param("fault"),
                )
            }
        };
        st.pipe.graph().inject_fault(stage, kind);
        Ok(())
    };
    match go() {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "armed"})),
        Err(e) => e.response(),
    }
}

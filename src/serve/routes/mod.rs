//! The HTTP routes, one file per endpoint family; every handler runs its request through
//! the pipeline's typed methods ([`crate::pipeline::Pipeline::start_generate`], …).

mod admin;
mod chat;
mod health;
mod images;
pub mod images_edits;
mod models;
mod tokenize;

use actix_web::web;

/// Register every API route (the playground and the fallback are added by the caller).
pub(crate) fn configure(cfg: &mut web::ServiceConfig, fault_injection: bool) {
    cfg.route(
        "/v1/images/generations",
        web::post().to(images::generations),
    )
    .route("/v1/images/edits", web::post().to(images_edits::edits))
    .route("/v1/chat/completions", web::post().to(chat::chat))
    .route("/v1/models", web::get().to(models::models))
    .route("/v1/models/{id}", web::get().to(models::model))
    .route("/v1/tokenize", web::post().to(tokenize::tokenize))
    .route("/health", web::get().to(health::health))
    .route("/ready", web::get().to(health::ready))
    .route("/metrics", web::get().to(health::metrics_route));
    #[cfg(feature = "testing")]
    if fault_injection {
        cfg.route("/admin/fault", web::post().to(admin::fault));
    }
    #[cfg(not(feature = "testing"))]
    let _ = fault_injection;
}

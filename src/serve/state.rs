//! What every handler shares: the state of the HTTP workers (the pipeline, limits, metrics,
//! the API key), waiting for a request while watching its client, and running CPU work (image
//! decoding, PNG encoding) off the async workers.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::json;

use super::validate::decode_image;
use super::{metrics, ApiError, Limits};
use crate::pipeline::{Pipeline, RequestHandle};
use lavit_runtime::messages::Output;
use lavit_runtime::stage::StageError;

/// A handler's result: the response, or an error the caller turns into one.
pub(crate) type Reply = Result<HttpResponse, ApiError>;

/// Shared state of the HTTP workers.
pub struct AppState {
    pub pipe: Arc<Pipeline>,
    pub limits: Limits,
    /// `/metrics`: the HTTP counters here and a collector reading the pipeline's gauges.
    pub metrics: metrics::Metrics,
    pub ready: AtomicBool,
    /// Unix time the server started (`created` of the model object).
    pub started: u64,
    pub(crate) api_key: Option<String>,
}

impl AppState {
    pub(crate) fn authorize(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant-time comparison.
        let ok = given.len() == key.len()
            && given
                .bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer <key>)",
            ))
        }
    }

    /// A request's `model`, when given, must be the one served.
    pub(crate) fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.limits.model_id => Err(ApiError::not_found(format!(
                "the model `{m}` does not exist; this server serves `{}` (GET /v1/models)",
                self.limits.model_id
            ))
            .with_param("model")),
            _ => Ok(()),
        }
    }

    pub(crate) fn model_object(&self) -> serde_json::Value {
        json!({"id": self.limits.model_id, "object": "model", "created": self.started,
               "owned_by": "lavit-rs"})
    }
}

/// A duplicate of the connection's socket, to notice a client that went away while its request
/// is being computed (actix-web does not cancel a pending handler on disconnect).
#[derive(Clone)]
pub(crate) struct PeerWatch(Arc<std::net::TcpStream>);

impl PeerWatch {
    fn is_closed(&self) -> bool {
        let mut b = [0u8; 1];
        match self.0.peek(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }
}

#[cfg(unix)]
pub(crate) fn on_connect(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    use std::os::fd::AsFd;
    if let Some(sock) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        if let Ok(fd) = sock.as_fd().try_clone_to_owned() {
            let s = std::net::TcpStream::from(fd);
            if s.set_nonblocking(true).is_ok() {
                ext.insert(PeerWatch(Arc::new(s)));
            }
        }
    }
}

#[cfg(not(unix))]
pub(crate) fn on_connect(_conn: &dyn std::any::Any, _ext: &mut actix_web::dev::Extensions) {}

/// Wait for a request's result; cancel it if the client disconnects meanwhile (then still wait
/// for the stages to give the request up, which takes at most one token / step).
pub(crate) async fn wait_watching(
    req: &HttpRequest,
    handle: &mut RequestHandle,
) -> Result<Output, StageError> {
    let peer = req.conn_data::<PeerWatch>().cloned();
    let cancel = handle.cancel.clone();
    let id = handle.id;
    let wait = handle.wait();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            r = &mut wait => return r,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if !cancel.is_cancelled() && peer.as_ref().is_some_and(PeerWatch::is_closed) {
                    tracing::info!(request = id, "client disconnected; cancelling");
                    cancel.cancel();
                }
            }
        }
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn png_base64(img: &image::RgbImage) -> Result<String, ApiError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| ApiError::internal("output", format!("PNG encoding failed: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf.into_inner()))
}

/// Run CPU-bound request work (image decoding and resizing, PNG encoding) on actix's
/// blocking thread pool, never on an async worker; counted per `job` in
/// `lavit_blocking_jobs_total`. A panic in it is a 500 of kind `panic`.
pub(crate) async fn off_worker<T: Send + 'static>(
    st: &AppState,
    job: &'static str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    st.metrics.blocking_job(job);
    web::block(f)
        .await
        .map_err(|e| ApiError::internal("panic", format!("{job} failed: {e}")))?
}

/// Decode base64 images (each named by its request field in errors) and preprocess them to the encoder's
/// input tensor, off the async workers.
pub(crate) async fn decode_and_preprocess(
    st: &web::Data<AppState>,
    named: Vec<(String, String)>,
) -> Result<tch::Tensor, ApiError> {
    let pipe = st.pipe.clone();
    let lim = st.limits.clone();
    off_worker(st, "image_decode", move || {
        let images = named
            .iter()
            .map(|(name, b64)| decode_image(name, b64, &lim))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pipe.preprocess(&images))
    })
    .await
}

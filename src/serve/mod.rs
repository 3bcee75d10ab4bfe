//! The HTTP server of `lavit serve` (actix-web) over a [`Pipeline`].
//!
//! Endpoints: `POST /v1/images/generations`, `POST /v1/images/edits` (image and text parts →
//! image, multipart, [`images_edits`]), `POST /v1/chat/completions` (image parts,
//! optional SSE streaming), `GET /v1/models` and `/v1/models/{id}`, `POST /v1/tokenize`,
//! `GET /health`, `GET /ready`, `GET /metrics`, and the web playground at `/`
//! ([`playground`]).
//!
//! OpenAI compatibility (checked with the official `openai` Python client in
//! `scripts/openai-check.py`): the list/model objects, `usage` on replies, streamed chunks with
//! `stream_options.include_usage`, and errors as `{"error": {"message", "type", "param",
//! "code"}}` with the statuses the client maps to its exception classes (400, 401, 404, 413,
//! 415, 429, 500, 503).
//!
//! Behaviour (../shared/RELIABILITY.md "Serving"):
//! - Admission: `max_in_flight` requests in the stages plus `max_queue` waiting; the next one gets
//!   429 at once (counted in `/metrics`).
//! - Validation before work: body cap (413), JSON, prompt and token limits, numeric ranges
//!   (NaN, negative, huge), `size` within the model's geometry (multiples of its decoder's
//!   multiple, at most twice its native side), and the per-request cost budget
//!   `max_request_cost` (see [`validate::generation_cost`]), all before admission; image checks
//!   from the header before decoding; all 4xx with a message.
//! - Blocking work off the async workers: image decoding and resizing, and PNG encoding of the
//!   results, run on actix's blocking pool (`web::block`).
//! - Internal failures (a stage's I/O, libtorch or plugin error, a caught panic, a stage that
//!   exited) are 5xx and counted in `lavit_internal_errors_total{kind}`; client mistakes are
//!   4xx and never counted there.
//! - Cancellation: a client that disconnects cancels its request; the stage loops see it at
//!   their next token / diffusion step and the slot frees.
//! - Faults: the recovery policy of [`lavit_runtime::actors`]: an error or caught panic fails
//!   that request with 500; a stage that panics `max_consecutive_panics` times in a row makes
//!   the server unhealthy (`/health` and `/ready` 503, `/ready` naming the exited stage;
//!   `lavit_healthy 0` and `lavit_stage_up{stage} 0` in `/metrics`) and `lavit serve` drains
//!   and exits non-zero.
//! - Drain: [`RunningServer::drain`] (SIGTERM / SIGINT in `lavit serve`) refuses new requests
//!   with 503, lets the admitted ones finish (up to `drain_timeout_s`), then stops.
//! - API key: when `api_key` is set, or the environment variable named by `api_key_env` (which
//!   overrides it), `/v1/*` requires `Authorization: Bearer <key>` (401 otherwise).

pub mod images_edits;
pub mod intake;
pub mod metrics;
pub mod multipart;
pub mod playground;
pub mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use crate::pipeline::{Pipeline, PipelineConfig};
use lavit_runtime::actors::{Input, RequestHandle};
use lavit_runtime::messages::{CaptionOptions, GenerateOptions, Output, Task};
use lavit_runtime::stage::StageError;
use validate::*;

/// Request limits and server settings (`[server]` in configs/serve.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Address to listen on.
    #[serde(default = "d_bind")]
    pub bind: String,
    /// HTTP worker threads (1 to [`MAX_WORKERS`]).
    #[serde(default = "d_workers")]
    pub workers: usize,
    /// Largest request body in bytes (413 above). Bodies with a `Content-Encoding` are
    /// refused (415), never inflated ([`intake`]).
    #[serde(default = "d_body")]
    pub body_limit_bytes: usize,
    /// Bytes of request bodies the server buffers at once, over all connections (429 when
    /// spent); at least `body_limit_bytes`.
    #[serde(default = "d_buffered")]
    pub max_buffered_body_bytes: usize,
    /// Seconds a request body may take to arrive (408 after).
    #[serde(default = "d_body_timeout")]
    pub body_timeout_s: u64,
    /// Largest request head (path, query and headers) in bytes (431 above).
    #[serde(default = "d_header")]
    pub max_header_bytes: usize,
    /// Most open connections, all workers together (more wait in the backlog).
    #[serde(default = "d_connections")]
    pub max_connections: usize,
    /// Connections the kernel queues before they are accepted.
    #[serde(default = "d_backlog")]
    pub backlog: u32,
    /// Milliseconds a client has to send a request head once connected (or once its
    /// previous request is answered), else the connection is closed.
    #[serde(default = "d_head_timeout")]
    pub request_head_timeout_ms: u64,
    /// Seconds an idle keep-alive connection stays open (0: no keep-alive).
    #[serde(default = "d_keep_alive")]
    pub keep_alive_s: u64,
    /// Longest prompt / question in characters.
    #[serde(default = "d_prompt")]
    pub max_prompt_chars: usize,
    /// Most text tokens a caption may ask for.
    #[serde(default = "d_tokens")]
    pub max_new_tokens: u64,
    /// Most images per generation request.
    #[serde(default = "d_n")]
    pub max_n: u64,
    /// Most diffusion steps.
    #[serde(default = "d_steps")]
    pub max_steps: u64,
    /// Largest guidance scale.
    #[serde(default = "d_guidance")]
    pub max_guidance: f64,
    /// Largest image side (input images and generated sizes).
    #[serde(default = "d_side")]
    pub max_image_side: usize,
    /// Per-request cost budget of a generation, in native-image diffusion steps:
    /// `n × steps × (width × height) / native²` (native = the decoder's native side) must not
    /// exceed it; checked before admission, so a refused request never reaches the LLM. The
    /// default, 200, allows e.g. 4 native images of 50 steps or 1 of 150 steps.
    #[serde(default = "d_cost")]
    pub max_request_cost: f64,
    /// Largest input image pixel count (checked from the header before decoding).
    #[serde(default = "d_pixels")]
    pub max_image_pixels: u64,
    /// Largest encoded input image in bytes.
    #[serde(default = "d_image_bytes")]
    pub max_image_bytes: usize,
    /// Most images per tokenize or image-edit request.
    #[serde(default = "d_images")]
    pub max_images: usize,
    /// Seconds a drain waits for admitted requests.
    #[serde(default = "d_drain")]
    pub drain_timeout_s: u64,
    /// API key `/v1/*` requires (`Authorization: Bearer <key>`); unset = no key.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Name of the environment variable holding the API key; when set and not empty it
    /// overrides `api_key`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Run one request of each kind before reporting ready.
    #[serde(default = "d_true")]
    pub warmup: bool,
    /// The model id this server answers to (`GET /v1/models`, `model` in replies); a request
    /// naming another model gets 404.
    #[serde(default = "d_model")]
    pub model_id: String,
    /// Serve the web playground at `/`.
    #[serde(default = "d_true")]
    pub playground: bool,
    /// Test hook: `POST /admin/fault {"stage", "fault": "error" | "panic"}` makes a stage's next
    /// forward pass fail. Off by default, and refused by a build without the `testing`
    /// feature; never turn it on for a real deployment.
    #[serde(default)]
    pub fault_injection: bool,
}

impl Limits {
    /// The caps of an input image for the one limited decoder.
    pub fn image_limits(&self) -> lavit_runtime::image_input::ImageLimits {
        let side = u32::try_from(self.max_image_side).unwrap_or(u32::MAX);
        lavit_runtime::image_input::ImageLimits::new(
            side,
            self.max_image_pixels,
            self.max_image_bytes as u64,
        )
    }

    /// The API key in force: the environment variable named by `api_key_env` when it is set
    /// and not empty, else `api_key`.
    pub fn effective_api_key(&self) -> Option<String> {
        self.api_key_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
            .filter(|k| !k.is_empty())
            .or_else(|| self.api_key.clone().filter(|k| !k.is_empty()))
    }
}

fn d_bind() -> String {
    "127.0.0.1:8080".into()
}
fn d_workers() -> usize {
    2
}
fn d_body() -> usize {
    8 << 20
}
fn d_buffered() -> usize {
    64 << 20
}
fn d_body_timeout() -> u64 {
    30
}
fn d_header() -> usize {
    16 << 10
}
fn d_connections() -> usize {
    1024
}
fn d_backlog() -> u32 {
    1024
}
fn d_head_timeout() -> u64 {
    5000
}
fn d_keep_alive() -> u64 {
    5
}
fn d_prompt() -> usize {
    2000
}
fn d_tokens() -> u64 {
    256
}
fn d_n() -> u64 {
    4
}
fn d_steps() -> u64 {
    150
}
fn d_guidance() -> f64 {
    50.0
}
fn d_cost() -> f64 {
    200.0
}
fn d_side() -> usize {
    2048
}
fn d_pixels() -> u64 {
    2048 * 2048
}
fn d_image_bytes() -> usize {
    6 << 20
}
fn d_images() -> usize {
    8
}
fn d_drain() -> u64 {
    30
}
fn d_true() -> bool {
    true
}
fn d_model() -> String {
    "lavit".into()
}

impl Default for Limits {
    fn default() -> Self {
        toml::Value::Table(Default::default())
            .try_into()
            .unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// configs/serve.toml: `[server]`, `[pipeline]` and the top-level `[plugins]`, loaded through
/// the one config mechanism ([`lavit_runtime::config`]): every key can be overridden as
/// `LAVIT__SERVER__MAX_N=1`, `LAVIT__PIPELINE__MAX_QUEUE=0`, …; without a file, the built-in
/// defaults (all stages on the CPU, the limits below) with those overrides.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub server: Limits,
    pub pipeline: PipelineConfig,
    /// The top-level `[plugins]` table (moved into `pipeline.plugins` on load).
    plugins: Option<lavit_runtime::plugin_host::PluginsConfig>,
}

impl lavit_runtime::config::Validate for ServeConfig {
    fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        self.server.validate(origin)?;
        self.pipeline.validate(origin)
    }
}

/// Most HTTP workers (`server.workers`): actix-web refuses (panics on) more than 512.
pub const MAX_WORKERS: usize = 512;

impl Limits {
    /// Range checks (every limit at least 1; workers at most [`MAX_WORKERS`]; guidance and
    /// cost budget finite and positive; the body budget holds at least one largest body).
    pub fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(lavit_runtime::Error::config(
                    origin,
                    format!("server.{key}"),
                    "must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        positive("workers", self.workers as u64)?;
        if self.workers > MAX_WORKERS {
            return Err(lavit_runtime::Error::config(
                origin,
                "server.workers",
                format!(
                    "{} is over the {MAX_WORKERS} HTTP workers actix-web runs",
                    self.workers
                ),
            ));
        }
        positive("body_limit_bytes", self.body_limit_bytes as u64)?;
        positive("body_timeout_s", self.body_timeout_s)?;
        positive("max_header_bytes", self.max_header_bytes as u64)?;
        positive("max_connections", self.max_connections as u64)?;
        positive("backlog", self.backlog as u64)?;
        positive("request_head_timeout_ms", self.request_head_timeout_ms)?;
        if self.max_buffered_body_bytes < self.body_limit_bytes {
            return Err(lavit_runtime::Error::config(
                origin,
                "server.max_buffered_body_bytes",
                format!(
                    "{} is less than server.body_limit_bytes = {}: one largest body must fit",
                    self.max_buffered_body_bytes, self.body_limit_bytes
                ),
            ));
        }
        positive("max_prompt_chars", self.max_prompt_chars as u64)?;
        positive("max_new_tokens", self.max_new_tokens)?;
        positive("max_n", self.max_n)?;
        positive("max_steps", self.max_steps)?;
        positive("max_image_side", self.max_image_side as u64)?;
        positive("max_image_pixels", self.max_image_pixels)?;
        positive("max_image_bytes", self.max_image_bytes as u64)?;
        positive("max_images", self.max_images as u64)?;
        for (key, v) in [
            ("max_guidance", self.max_guidance),
            ("max_request_cost", self.max_request_cost),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(lavit_runtime::Error::config(
                    origin,
                    format!("server.{key}"),
                    format!("must be finite and positive, got {v}"),
                ));
            }
        }
        if self.fault_injection && !cfg!(feature = "testing") {
            return Err(lavit_runtime::Error::config(
                origin,
                "server.fault_injection",
                "needs a build with the `testing` feature (`cargo build --features testing`); \
                 a release build has no fault injection",
            ));
        }
        Ok(())
    }
}

impl ServeConfig {
    /// Load a serving config file, or with `None` the built-in defaults; `LAVIT__*`
    /// environment overrides apply either way.
    pub fn load(path: Option<&Path>) -> crate::Result<Self> {
        let mut cfg: ServeConfig = lavit_runtime::config::load_optional_config(path)?;
        let origin = path.unwrap_or(Path::new("./(built-in defaults)"));
        cfg.pipeline = cfg.pipeline.resolved(cfg.plugins.take(), origin)?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> crate::Result<Self> {
        Self::load(Some(path))
    }
}

/// An HTTP error with OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// For an internal failure (a 5xx that is the server's fault): its kind, counted in
    /// `lavit_internal_errors_total{kind}` ([`metrics::INTERNAL_KINDS`]).
    pub internal: Option<&'static str>,
}

/// The kind of internal failure a response carries (read by the metrics middleware).
#[derive(Clone, Copy, Debug)]
pub struct InternalFailure(pub &'static str);

impl ApiError {
    pub fn new(status: StatusCode, m: impl Into<String>) -> Self {
        ApiError {
            status,
            message: m.into(),
            param: None,
            internal: None,
        }
    }
    pub fn bad(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, m)
    }
    pub fn unsupported(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    /// A 500 of `kind` (one of [`metrics::INTERNAL_KINDS`]).
    pub fn internal(kind: &'static str, m: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::INTERNAL_SERVER_ERROR, m);
        e.internal = Some(kind);
        e
    }
    /// Name the request field at fault (`param` in the body).
    pub fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }
    /// OpenAI's `type` and `code` for this status.
    pub fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self.status.as_u16() {
            401 => ("authentication_error", "invalid_api_key"),
            404 if self.param.as_deref() == Some("model") => {
                ("invalid_request_error", "model_not_found")
            }
            404 => ("invalid_request_error", "not_found"),
            413 => ("invalid_request_error", "request_too_large"),
            415 => ("invalid_request_error", "unsupported_media_type"),
            429 => ("rate_limit_error", "rate_limit_exceeded"),
            499 => ("invalid_request_error", "cancelled"),
            400..=499 => ("invalid_request_error", "invalid_value"),
            503 => ("server_error", "service_unavailable"),
            _ => ("server_error", "internal_error"),
        }
    }
    /// The JSON error object (also sent as an SSE event when a stream fails).
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind_and_code();
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": code}})
    }
    pub fn response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status).json(self.body());
        if let Some(k) = self.internal {
            r.extensions_mut().insert(InternalFailure(k));
        }
        r
    }
}

impl From<StageError> for ApiError {
    fn from(e: StageError) -> Self {
        let status = match &e {
            StageError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            StageError::Draining | StageError::Closed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            StageError::Invalid(_) => StatusCode::BAD_REQUEST,
            // 499: the client closed the request (nobody reads it).
            StageError::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            StageError::Failed { .. } | StageError::Panicked { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut a = ApiError::new(status, e.to_string());
        a.internal = match &e {
            StageError::Failed { kind, .. } => Some(kind.name()),
            StageError::Panicked { .. } => Some("panic"),
            StageError::Closed { .. } => Some("stage_down"),
            _ => None,
        };
        a
    }
}

/// Shared state of the HTTP workers.
pub struct AppState {
    pub pipe: Arc<Pipeline>,
    pub limits: Limits,
    /// `/metrics`: the HTTP counters here and a collector reading the pipeline's gauges.
    pub metrics: metrics::Metrics,
    pub ready: AtomicBool,
    /// Unix time the server started (`created` of the model object).
    pub started: u64,
    api_key: Option<String>,
}

impl AppState {
    fn authorize(&self, req: &HttpRequest) -> Result<(), ApiError> {
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
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.limits.model_id => Err(ApiError::not_found(format!(
                "the model `{m}` does not exist; this server serves `{}` (GET /v1/models)",
                self.limits.model_id
            ))
            .with_param("model")),
            _ => Ok(()),
        }
    }

    fn model_object(&self) -> serde_json::Value {
        json!({"id": self.limits.model_id, "object": "model", "created": self.started,
               "owned_by": "lavit-rs"})
    }
}

/// A duplicate of the connection's socket, to notice a client that went away while its request
/// is being computed (actix-web does not cancel a pending handler on disconnect).
#[derive(Clone)]
struct PeerWatch(Arc<std::net::TcpStream>);

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
fn on_connect(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
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
fn on_connect(_conn: &dyn std::any::Any, _ext: &mut actix_web::dev::Extensions) {}

/// Wait for a request's result; cancel it if the client disconnects meanwhile (then still wait
/// for the stages to give the request up, which takes at most one token / step).
async fn wait_watching(
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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn png_base64(img: &image::RgbImage) -> Result<String, ApiError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| ApiError::internal("output", format!("PNG encoding failed: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf.into_inner()))
}

type Reply = Result<HttpResponse, ApiError>;

async fn generations(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> HttpResponse {
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
    let graph = st.pipe.graph();
    let ticket = graph.admit()?;
    let mut handle = graph
        .start(ticket, Task::Generate { opts }, Input::Prompt(r.prompt))
        .await?;
    let out = wait_watching(&req, &mut handle).await?;
    images_reply(&st, out).await
}

/// The answer of an image request (generations, edits): `{"created", "data": [{"b64_json"}]}`
/// from the pipeline's pixels, PNG-encoded off the async workers.
async fn images_reply(st: &web::Data<AppState>, out: Output) -> Reply {
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

/// Run CPU-bound request work (image decoding and resizing, PNG encoding) on actix's
/// blocking thread pool, never on an async worker; counted per `job` in
/// `lavit_blocking_jobs_total`. A panic in it is a 500 of kind `panic`.
async fn off_worker<T: Send + 'static>(
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
async fn decode_and_preprocess(
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

async fn tokenize(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> HttpResponse {
    tokenize_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

/// `POST /v1/tokenize`: per image its visual ids and their count, and the `selection` the
/// decisions were taken with (`{"selection": "argmax"|"gumbel", "seed": N}`: the request's
/// `selection` / `seed`, else the served default, the checkpoint manifest's); with
/// `"keep_mask": true` also the selector's keep mask over the patch grid (`keep`: 0/1 per
/// patch in raster order, `grid`: [rows, cols]), which the playground draws.
async fn tokenize_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let r: TokenizeRequest = parse_json(&body)?;
    let keep_mask = r.keep_mask;
    let selection = tokenize_selection(&r, st.pipe.info().selection)?;
    let used = selection.unwrap_or(st.pipe.info().selection);
    let list = tokenize_images(r, &st.limits)?;
    let graph = st.pipe.graph();
    let ticket = graph.admit()?;
    let named = list
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("images[{i}]"), b))
        .collect();
    let pixels = decode_and_preprocess(&st, named).await?;
    let task = if keep_mask || selection.is_some() {
        Task::Select { selection }
    } else {
        Task::Tokenize
    };
    let mut handle = graph.start(ticket, task, Input::Images(pixels)).await?;
    match wait_watching(&req, &mut handle).await? {
        Output::VisualIds(ids) => {
            let counts: Vec<usize> = ids.iter().map(Vec::len).collect();
            Ok(HttpResponse::Ok()
                .json(json!({ "tokens": ids, "counts": counts, "selection": used })))
        }
        Output::Selection { ids, .. } if !keep_mask => {
            let counts: Vec<usize> = ids.iter().map(Vec::len).collect();
            Ok(HttpResponse::Ok()
                .json(json!({ "tokens": ids, "counts": counts, "selection": used })))
        }
        Output::Selection { ids, keep } => {
            let counts: Vec<usize> = ids.iter().map(Vec::len).collect();
            let n = keep.first().map_or(0, Vec::len);
            let side = (n as f64).sqrt().round() as usize;
            let grid = if side * side == n {
                [side, side]
            } else {
                [1, n]
            };
            let keep: Vec<Vec<u8>> = keep
                .iter()
                .map(|row| row.iter().map(|&k| k as u8).collect())
                .collect();
            Ok(HttpResponse::Ok().json(json!({
                "tokens": ids, "counts": counts, "keep": keep, "grid": grid, "patches": n,
                "selection": used,
            })))
        }
        _ => Err(ApiError::internal(
            "stage",
            "the pipeline returned no visual ids",
        )),
    }
}

async fn models(req: HttpRequest, st: web::Data<AppState>) -> HttpResponse {
    match st.authorize(&req) {
        Ok(()) => HttpResponse::Ok().json(json!({"object": "list", "data": [st.model_object()]})),
        Err(e) => e.response(),
    }
}

async fn model(req: HttpRequest, id: web::Path<String>, st: web::Data<AppState>) -> HttpResponse {
    let found = st
        .authorize(&req)
        .and_then(|()| st.check_model(Some(id.as_str())));
    match found {
        Ok(()) => HttpResponse::Ok().json(st.model_object()),
        Err(e) => e.response(),
    }
}

async fn chat(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> HttpResponse {
    chat_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

/// OpenAI's `usage` object.
fn usage(prompt_tokens: Option<usize>, completion: usize) -> serde_json::Value {
    let prompt = prompt_tokens.unwrap_or(0);
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// `length` when the reply used every token it was allowed, else `stop`.
fn finish_reason(ids: &[i64], max_new_tokens: usize) -> &'static str {
    if ids.len() >= max_new_tokens {
        "length"
    } else {
        "stop"
    }
}

async fn chat_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let r: ChatRequest = parse_json(&body)?;
    st.check_model(r.model.as_deref())?;
    let ChatPlan {
        question,
        image,
        opts,
        stream,
        include_usage,
    } = chat_plan(r, &st.limits)?;
    let graph = st.pipe.graph();
    let ticket = graph.admit()?;
    let pixels = decode_and_preprocess(&st, vec![("image".into(), image)]).await?;
    let max_new_tokens = opts.max_new_tokens;
    let task = Task::Caption {
        prompt: question,
        opts,
    };
    let mut handle = graph.start(ticket, task, Input::Images(pixels)).await?;
    let id = format!("chatcmpl-{}", handle.id);
    let model = st.limits.model_id.clone();
    let created = now_secs();
    if !stream {
        return match wait_watching(&req, &mut handle).await? {
            Output::Text {
                text,
                ids,
                prompt_tokens,
            } => Ok(HttpResponse::Ok().json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason(&ids, max_new_tokens),
                             "logprobs": null}],
                "usage": usage(prompt_tokens, ids.len()),
            }))),
            _ => Err(ApiError::internal("stage", "the pipeline returned no text")),
        };
    }
    // SSE: a role chunk, one chunk per token, a finish chunk, the usage chunk (empty choices)
    // when asked, then [DONE]. Dropping the stream (client gone) drops the handle, which
    // cancels the request.
    let chunk = move |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut ev = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": choices});
        if include_usage {
            ev["usage"] = usage.unwrap_or(serde_json::Value::Null);
        }
        format!("data: {ev}\n\n")
    };
    enum Phase {
        Start,
        Tokens,
        Done,
    }
    struct S<F> {
        handle: RequestHandle,
        chunk: F,
        phase: Phase,
        st: web::Data<AppState>,
    }
    let stream = futures::stream::unfold(
        S {
            handle,
            chunk,
            phase: Phase::Start,
            st: st.clone(),
        },
        move |mut s| async move {
            let out = match s.phase {
                Phase::Done => return None,
                Phase::Start => {
                    s.phase = Phase::Tokens;
                    (s.chunk)(
                        json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": null, "logprobs": null}]),
                        None,
                    )
                }
                Phase::Tokens => {
                    let next = match s.handle.tokens.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => None,
                    };
                    if let Some(tok) = next {
                        (s.chunk)(
                            json!([{"index": 0, "delta": {"content": tok.text},
                                    "finish_reason": null, "logprobs": null}]),
                            None,
                        )
                    } else {
                        s.phase = Phase::Done;
                        match s.handle.wait().await {
                            Ok(Output::Text {
                                ids, prompt_tokens, ..
                            }) => {
                                let mut o = (s.chunk)(
                                    json!([{"index": 0, "delta": {},
                                            "finish_reason": finish_reason(&ids, max_new_tokens),
                                            "logprobs": null}]),
                                    None,
                                );
                                if include_usage {
                                    o.push_str(&(s.chunk)(
                                        json!([]),
                                        Some(usage(prompt_tokens, ids.len())),
                                    ));
                                }
                                o + "data: [DONE]\n\n"
                            }
                            other => {
                                let e = match other {
                                    Err(e) => ApiError::from(e),
                                    Ok(_) => {
                                        ApiError::internal("stage", "unexpected pipeline output")
                                    }
                                };
                                // The 200 head is sent: count the failure here.
                                if let Some(kind) = e.internal {
                                    s.st.metrics.internal_error(kind);
                                }
                                format!("data: {}\n\ndata: [DONE]\n\n", e.body())
                            }
                        }
                    }
                }
            };
            Some((Ok::<_, actix_web::Error>(web::Bytes::from(out)), s))
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(stream))
}

#[cfg(feature = "testing")]
/// `POST /admin/fault` (only with `fault_injection = true`): the named stage's next forward
/// pass returns an error or panics, to check how clients see a 500.
async fn fault(body: web::Bytes, st: web::Data<AppState>) -> HttpResponse {
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

async fn health(st: web::Data<AppState>) -> HttpResponse {
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
async fn ready(st: web::Data<AppState>) -> HttpResponse {
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

async fn metrics_route(st: web::Data<AppState>) -> HttpResponse {
    match metrics::render(&st) {
        Ok(text) => HttpResponse::Ok()
            .content_type(prometheus::TEXT_FORMAT)
            .body(text),
        Err(e) => ApiError::internal("metrics", format!("metrics: {e}")).response(),
    }
}

fn count<B: MessageBody>(st: &AppState, res: &ServiceResponse<B>) {
    if let Some(InternalFailure(kind)) = res.response().extensions().get::<InternalFailure>() {
        st.metrics.internal_error(kind);
    }
    let class = match res.status().as_u16() {
        200..=399 => "2xx",
        429 => "429",
        400..=499 => "4xx",
        _ => "5xx",
    };
    st.metrics.http_response(class);
}

/// A server running on its own thread.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: web::Data<AppState>,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Refuse new requests (503), let admitted ones finish (at most `timeout`), stop the HTTP
    /// server. Returns whether everything admitted finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let finished = self.state.pipe.graph().drain(timeout).await;
        self.handle.stop(true).await;
        finished
    }
    /// Stop at once.
    pub fn stop(mut self) {
        futures::executor::block_on(self.handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
    /// Wait until the server thread ends.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One warm-up request through each route the pipeline serves (the stages its `stages` set
/// leaves out are skipped).
pub async fn warm_up(pipe: &Pipeline) -> Result<(), StageError> {
    use lavit_runtime::stage::StageKind;
    let s = pipe.info().image_size as u32;
    let img = image::DynamicImage::new_rgb8(s, s);
    let set = pipe.stages();
    if set.has(StageKind::Encoder) {
        pipe.tokenize(std::slice::from_ref(&img)).await?;
    }
    if !set.has(StageKind::Llm) {
        return Ok(()); // no LLM or pixel decoder to warm up
    }
    if set.has(StageKind::Encoder) {
        let copts = CaptionOptions {
            max_new_tokens: 1,
            ..CaptionOptions::default()
        };
        pipe.caption(&img, "", copts).await?;
    }
    if !set.has(StageKind::Decoder) {
        return Ok(());
    }
    let (width, height) = pipe.info().default_size;
    let gopts = GenerateOptions {
        steps: 1,
        width,
        height,
        ..GenerateOptions::default()
    };
    pipe.generate("warm up", gopts).await?;
    Ok(())
}

/// Start the HTTP server on its own thread (its own actix system) over `pipe`. `bind` may use
/// port 0; the bound address is in the result.
pub fn spawn(pipe: Arc<Pipeline>, limits: Limits) -> anyhow::Result<RunningServer> {
    let api_key = limits.effective_api_key();
    let state = web::Data::new(AppState {
        pipe,
        limits: limits.clone(),
        metrics: metrics::Metrics::new()?,
        ready: AtomicBool::new(false),
        started: now_secs(),
        api_key,
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let st = state.clone();
    let thread = std::thread::Builder::new()
        .name("lavit-http".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let body_limit = st.limits.body_limit_bytes;
                let st2 = st.clone();
                // One body budget for the whole server, shared by the workers.
                let intake = web::Data::new(intake::Intake::new(&st.limits));
                let server = HttpServer::new(move || {
                    let st3 = st2.clone();
                    let app = App::new()
                        .app_data(st2.clone())
                        .app_data(intake.clone())
                        .app_data(web::PayloadConfig::new(body_limit))
                        .wrap(actix_web::middleware::from_fn(intake::intake))
                        .wrap_fn(move |req, srv| {
                            use actix_web::dev::Service;
                            let st4 = st3.clone();
                            let fut = srv.call(req);
                            async move {
                                let res = fut.await?;
                                count(&st4, &res);
                                Ok(res)
                            }
                        })
                        .route("/v1/images/generations", web::post().to(generations))
                        .route("/v1/images/edits", web::post().to(images_edits::edits))
                        .route("/v1/chat/completions", web::post().to(chat))
                        .route("/v1/models", web::get().to(models))
                        .route("/v1/models/{id}", web::get().to(model))
                        .route("/v1/tokenize", web::post().to(tokenize))
                        .route("/health", web::get().to(health))
                        .route("/ready", web::get().to(ready))
                        .route("/metrics", web::get().to(metrics_route));
                    #[cfg(feature = "testing")]
                    let app = if st2.limits.fault_injection {
                        app.route("/admin/fault", web::post().to(fault))
                    } else {
                        app
                    };
                    let app = if st2.limits.playground {
                        app.configure(playground::routes)
                    } else {
                        app
                    };
                    app.default_service(web::to(|req: HttpRequest| async move {
                        ApiError::not_found(format!("no route {} {}", req.method(), req.path()))
                            .response()
                    }))
                })
                .workers(st.limits.workers.clamp(1, MAX_WORKERS))
                // Connection limits: an idle or half-sent connection costs a few KiB for at
                // most request_head_timeout_ms / keep_alive_s (a body is bounded by intake).
                .max_connections(st.limits.max_connections.div_ceil(st.limits.workers.max(1)))
                .backlog(st.limits.backlog)
                .client_request_timeout(Duration::from_millis(st.limits.request_head_timeout_ms))
                .client_disconnect_timeout(Duration::from_secs(1))
                .keep_alive(match st.limits.keep_alive_s {
                    0 => actix_web::http::KeepAlive::Disabled,
                    s => actix_web::http::KeepAlive::Timeout(Duration::from_secs(s)),
                })
                .disable_signals()
                .on_connect(on_connect)
                .shutdown_timeout(st.limits.drain_timeout_s);
                let server = match server.bind(&st.limits.bind) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ =
                            tx.send(Err(anyhow::anyhow!("cannot bind {}: {e}", st.limits.bind)));
                        return Ok(());
                    }
                };
                let addr = server.addrs().first().copied();
                let server = server.run();
                let _ = tx.send(
                    addr.map(|a| (a, server.handle()))
                        .ok_or_else(|| anyhow::anyhow!("bound no address")),
                );
                server.await
            })
        })?;
    let (addr, handle) = rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the HTTP server thread died at start"))??;
    Ok(RunningServer {
        addr,
        state,
        handle,
        thread: Some(thread),
    })
}

/// Run the warm-up (if configured) and mark the server ready.
pub async fn mark_ready(server: &RunningServer) -> Result<(), StageError> {
    if server.state.limits.warmup {
        warm_up(&server.state.pipe).await?;
    }
    server.state.ready.store(true, Ordering::SeqCst);
    Ok(())
}

//! The HTTP server of `lavit serve` (actix-web) over a [`Pipeline`].
//!
//! Endpoints: `POST /v1/images/generations`, `POST /v1/chat/completions` (image parts,
//! optional SSE streaming), `POST /v1/tokenize`, `GET /health`, `GET /ready`, `GET /metrics`.
//!
//! Behaviour (../shared/RELIABILITY.md "Serving"):
//! - Admission: `max_in_flight` requests in the stages plus `max_queue` waiting; the next one gets
//!   429 at once (counted in `/metrics`).
//! - Validation before work: body cap (413), JSON, prompt and token limits, numeric ranges
//!   (NaN, negative, huge), image checks from the header before decoding; all 4xx with a message.
//! - Cancellation: a client that disconnects cancels its request; the stage loops see it at
//!   their next token / diffusion step and the slot frees.
//! - Faults: the recovery policy of [`lavit_runtime::actors`]: an error or caught panic fails
//!   that request with 500; a stage that panics `max_consecutive_panics` times in a row makes
//!   the server unhealthy (`/health` 503) and `lavit serve` drains and exits non-zero.
//! - Drain: [`RunningServer::drain`] (SIGTERM / SIGINT in `lavit serve`) refuses new requests
//!   with 503, lets the admitted ones finish (up to `drain_timeout_s`), then stops.
//! - API key: when the environment variable named by `api_key_env` is set, `/v1/*` requires
//!   `Authorization: Bearer <key>` (401 otherwise).

pub mod metrics;
pub mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// HTTP worker threads.
    #[serde(default = "d_workers")]
    pub workers: usize,
    /// Largest request body in bytes (413 above).
    #[serde(default = "d_body")]
    pub body_limit_bytes: usize,
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
    /// Largest input image pixel count (checked from the header before decoding).
    #[serde(default = "d_pixels")]
    pub max_image_pixels: u64,
    /// Largest encoded input image in bytes.
    #[serde(default = "d_image_bytes")]
    pub max_image_bytes: usize,
    /// Most images per tokenize request.
    #[serde(default = "d_images")]
    pub max_images: usize,
    /// Seconds a drain waits for admitted requests.
    #[serde(default = "d_drain")]
    pub drain_timeout_s: u64,
    /// Name of the environment variable holding the API key (unset variable = no key).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Run one request of each kind before reporting ready.
    #[serde(default = "d_true")]
    pub warmup: bool,
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

impl Limits {
    /// Range checks (every limit at least 1; guidance finite and positive).
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
        positive("body_limit_bytes", self.body_limit_bytes as u64)?;
        positive("max_prompt_chars", self.max_prompt_chars as u64)?;
        positive("max_new_tokens", self.max_new_tokens)?;
        positive("max_n", self.max_n)?;
        positive("max_steps", self.max_steps)?;
        positive("max_image_side", self.max_image_side as u64)?;
        positive("max_image_pixels", self.max_image_pixels)?;
        positive("max_image_bytes", self.max_image_bytes as u64)?;
        positive("max_images", self.max_images as u64)?;
        if !(self.max_guidance.is_finite() && self.max_guidance > 0.0) {
            return Err(lavit_runtime::Error::config(
                origin,
                "server.max_guidance",
                format!("must be finite and positive, got {}", self.max_guidance),
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

/// An HTTP error with a JSON body `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad(m: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: m.into(),
        }
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: m.into(),
        }
    }
    pub fn unsupported(m: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: m.into(),
        }
    }
    pub fn response(&self) -> HttpResponse {
        let kind = match self.status.as_u16() {
            429 => "rate_limit_error",
            401 => "authentication_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        HttpResponse::build(self.status).json(json!({
            "error": {"message": self.message, "type": kind, "code": self.status.as_u16()}
        }))
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
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

/// Counters of HTTP responses by class.
#[derive(Default)]
pub struct HttpCounters {
    pub ok: AtomicU64,
    pub too_many: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
}

/// Shared state of the HTTP workers.
pub struct AppState {
    pub pipe: Arc<Pipeline>,
    pub limits: Limits,
    pub counters: HttpCounters,
    pub ready: AtomicBool,
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
            Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong API key (Authorization: Bearer <key>)".into(),
            })
        }
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
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("PNG encoding failed: {e}"),
        })?;
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
    let lim = &st.limits;
    let r: GenerationRequest = parse_json(&body)?;
    check_prompt("prompt", &r.prompt, lim)?;
    // The checkpoint's recommended settings (manifest `generation`), then the request's.
    let mut opts = GenerateOptions {
        n: check_int("n", r.n, 1, lim.max_n)?,
        ..st.pipe.info().generate_defaults.clone()
    };
    let (w, h) = match &r.size {
        Some(s) => parse_size(s, lim)?,
        None => st.pipe.info().default_size,
    };
    (opts.width, opts.height) = (w, h);
    if let Some(s) = r.seed {
        opts.seed = s;
    }
    if let Some(g) = r.guidance {
        opts.guidance = check_range("guidance", g, 0.0, lim.max_guidance)?;
    }
    if let Some(g) = r.llm_guidance {
        opts.llm_guidance = check_range("llm_guidance", g, 0.0, lim.max_guidance)?;
    }
    if let Some(s) = r.steps {
        opts.steps = check_int("steps", s, 1, lim.max_steps)?;
    }
    if let Some(f) = &r.response_format {
        if f != "b64_json" {
            return Err(ApiError::bad(format!(
                "`response_format` = {f:?}: only \"b64_json\" is served"
            )));
        }
    }
    let graph = st.pipe.graph();
    let ticket = graph.admit()?;
    let mut handle = graph
        .start(ticket, Task::Generate { opts }, Input::Prompt(r.prompt))
        .await?;
    let out = wait_watching(&req, &mut handle).await?;
    let Output::Pixels { images: px, .. } = out else {
        return Err(StageError::Invalid("unexpected output".into()).into());
    };
    let images = crate::pipeline::to_images(&px)?;
    let data = images
        .iter()
        .map(|im| png_base64(im).map(|b| json!({ "b64_json": b })))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(json!({ "created": now_secs(), "data": data })))
}

async fn tokenize(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> HttpResponse {
    tokenize_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

async fn tokenize_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let r: TokenizeRequest = parse_json(&body)?;
    let list: Vec<String> = match (r.image, r.images) {
        (Some(one), None) => vec![one],
        (None, Some(many)) => many,
        _ => return Err(ApiError::bad("give exactly one of `image` or `images`")),
    };
    if list.is_empty() || list.len() > st.limits.max_images {
        return Err(ApiError::bad(format!(
            "`images` must hold 1 to {} images, got {}",
            st.limits.max_images,
            list.len()
        )));
    }
    let graph = st.pipe.graph();
    let ticket = graph.admit()?;
    let images = list
        .iter()
        .enumerate()
        .map(|(i, b)| decode_image(&format!("images[{i}]"), b, &st.limits))
        .collect::<Result<Vec<_>, _>>()?;
    let mut handle = graph
        .start(
            ticket,
            Task::Tokenize,
            Input::Images(st.pipe.preprocess(&images)),
        )
        .await?;
    match wait_watching(&req, &mut handle).await? {
        Output::VisualIds(ids) => {
            let counts: Vec<usize> = ids.iter().map(Vec::len).collect();
            Ok(HttpResponse::Ok().json(json!({ "tokens": ids, "counts": counts })))
        }
        _ => Err(StageError::Invalid("unexpected output".into()).into()),
    }
}

async fn chat(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> HttpResponse {
    chat_inner(req, body, st)
        .await
        .unwrap_or_else(|e| e.response())
}

async fn chat_inner(req: HttpRequest, body: web::Bytes, st: web::Data<AppState>) -> Reply {
    st.authorize(&req)?;
    let lim = &st.limits;
    let r: ChatRequest = parse_json(&body)?;
    let (question, images) = chat_inputs(&r)?;
    if images.len() != 1 {
        return Err(ApiError::bad(format!(
            "the user message must hold exactly one image part, it holds {}",
            images.len()
        )));
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
            return Err(ApiError::bad("`top_p` must be > 0"));
        }
    }
    if let Some(k) = r.top_k {
        opts.top_k = check_int("top_k", k, 0, 100_000)?;
    }
    if let Some(s) = r.seed {
        opts.seed = s;
    }
    let graph = st.pipe.graph();
    let ticket = graph.admit()?;
    let image = decode_image("image", &images[0], lim)?;
    let input = Input::Images(st.pipe.preprocess(std::slice::from_ref(&image)));
    let task = Task::Caption {
        prompt: question,
        opts,
    };
    let mut handle = graph.start(ticket, task, input).await?;
    let id = format!("chatcmpl-{}", handle.id);
    if !r.stream {
        return match wait_watching(&req, &mut handle).await? {
            Output::Text { text, ids } => Ok(HttpResponse::Ok().json(json!({
                "id": id, "object": "chat.completion", "created": now_secs(), "model": "lavit",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"completion_tokens": ids.len()},
            }))),
            _ => Err(StageError::Invalid("unexpected output".into()).into()),
        };
    }
    // SSE: one event per token, then a final event and [DONE]. Dropping the stream (client gone)
    // drops the handle, which cancels the request.
    struct S {
        handle: RequestHandle,
        id: String,
        done: bool,
    }
    let stream = futures::stream::unfold(
        S {
            handle,
            id,
            done: false,
        },
        |mut s| async move {
            if s.done {
                return None;
            }
            let next = match s.handle.tokens.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            let chunk = if let Some(tok) = next {
                let ev = json!({"id": s.id, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": tok.text}, "finish_reason": null}]});
                format!("data: {ev}\n\n")
            } else {
                s.done = true;
                match s.handle.wait().await {
                    Ok(_) => {
                        let ev = json!({"id": s.id, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
                        format!("data: {ev}\n\ndata: [DONE]\n\n")
                    }
                    Err(e) => {
                        let e = ApiError::from(e);
                        let ev =
                            json!({"error": {"message": e.message, "code": e.status.as_u16()}});
                        format!("data: {ev}\n\ndata: [DONE]\n\n")
                    }
                }
            };
            Some((Ok::<_, actix_web::Error>(web::Bytes::from(chunk)), s))
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(stream))
}

async fn health(st: web::Data<AppState>) -> HttpResponse {
    if st.pipe.graph().healthy() {
        HttpResponse::Ok().json(json!({"status": "ok"}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "unhealthy"}))
    }
}

async fn ready(st: web::Data<AppState>) -> HttpResponse {
    let g = st.pipe.graph();
    if st.ready.load(Ordering::SeqCst) && g.healthy() && !g.admission().is_draining() {
        HttpResponse::Ok().json(json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "not ready"}))
    }
}

async fn metrics_route(st: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics::render(&st))
}

fn count<B: MessageBody>(st: &AppState, res: &ServiceResponse<B>) {
    let c = &st.counters;
    let s = res.status().as_u16();
    let counter = match s {
        200..=399 => &c.ok,
        429 => &c.too_many,
        400..=499 => &c.client_errors,
        _ => &c.server_errors,
    };
    counter.fetch_add(1, Ordering::SeqCst);
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
    let api_key = limits
        .api_key_env
        .as_ref()
        .and_then(|v| std::env::var(v).ok())
        .filter(|k| !k.is_empty());
    let state = web::Data::new(AppState {
        pipe,
        limits: limits.clone(),
        counters: HttpCounters::default(),
        ready: AtomicBool::new(false),
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
                let server = HttpServer::new(move || {
                    let st3 = st2.clone();
                    App::new()
                        .app_data(st2.clone())
                        .app_data(web::PayloadConfig::new(body_limit))
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
                        .route("/v1/chat/completions", web::post().to(chat))
                        .route("/v1/tokenize", web::post().to(tokenize))
                        .route("/health", web::get().to(health))
                        .route("/ready", web::get().to(ready))
                        .route("/metrics", web::get().to(metrics_route))
                        .default_service(web::to(|| async {
                            ApiError {
                                status: StatusCode::NOT_FOUND,
                                message: "no such route".into(),
                            }
                            .response()
                        }))
                })
                .workers(st.limits.workers.max(1))
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

//! The HTTP server of `lavit serve` (actix-web) over a [`Pipeline`].
//!
//! Endpoints: `POST /v1/images/generations`, `POST /v1/images/edits` (image and text parts →
//! image, multipart), `POST /v1/chat/completions` (image parts,
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

pub mod config;
pub mod error;
pub mod intake;
pub mod metrics;
pub mod multipart;
pub mod playground;
mod routes;
pub mod state;
pub mod validate;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceResponse};
use actix_web::{web, App, HttpRequest, HttpServer};

pub use config::{Limits, ServeConfig};
pub use error::{ApiError, InternalFailure};
pub use routes::images_edits;
pub use state::AppState;

use crate::pipeline::Pipeline;
use config::MAX_WORKERS;
use lavit_runtime::messages::{CaptionOptions, GenerateOptions};
use lavit_runtime::stage::StageError;
use state::{now_secs, on_connect};

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
                        .configure(|c| routes::configure(c, st2.limits.fault_injection));
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

//! Request intake: what the server accepts from a connection before a handler runs.
//!
//! A client controls every byte here, so each cost is bounded before it is paid:
//! - the request head: at most `server.max_header_bytes` (431 above; actix itself stops
//!   reading a head at 128 KiB and 96 headers);
//! - `Content-Encoding`: an encoded body (gzip, br, zstd, deflate) is refused with 415 before
//!   a byte of it is read — actix-web would inflate each received chunk whole before its
//!   body limit looks at the size (a 40 KB gzip request became 1.2 GiB), so nothing here
//!   inflates anything;
//! - the body: a declared length over `server.body_limit_bytes` is refused at once (413);
//!   the bytes are buffered under one server-wide budget, `server.max_buffered_body_bytes`,
//!   charged for each buffer's capacity — a declared length whole before reading, a chunked
//!   body as its buffer grows — (429 when it is spent, like a full admission queue: many slow
//!   uploads at once cannot hold more than that), and must all arrive within `server.body_timeout_s` (408), so a
//!   connection that sends half a body and goes quiet holds its share for at most that long.
//!
//! Connection-level limits (count, backlog, head timeout, keep-alive) are set on the
//! `HttpServer` in [`super::spawn`] from the same `[server]` section.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpMessage, HttpResponse};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, Limits};

/// Unit of the body budget's semaphore: 1 KiB.
const UNIT: usize = 1024;

/// The intake limits and the server-wide body budget (one per server, shared by workers).
pub struct Intake {
    budget: Arc<Semaphore>,
    body_limit: usize,
    max_header_bytes: usize,
    body_timeout: Duration,
}

/// A buffered body's share of the budget; released when the request ends (it lives in the
/// request's extensions).
struct BodyPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// What one body holds of the budget, grown as its buffer grows.
struct Charge<'a> {
    intake: &'a Intake,
    permit: Option<OwnedSemaphorePermit>,
    /// Units held.
    held: usize,
}

impl Charge<'_> {
    /// Hold at least `bytes` of the budget (429 when the server's budget is spent).
    fn cover(&mut self, bytes: usize) -> Result<(), ApiError> {
        let need = bytes.div_ceil(UNIT);
        if need <= self.held {
            return Ok(());
        }
        let more = u32::try_from(need - self.held).map_err(|_| Intake::busy())?;
        let got = self
            .intake
            .budget
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| Intake::busy())?;
        match self.permit.as_mut() {
            Some(p) => p.merge(got),
            None => self.permit = Some(got),
        }
        self.held = need;
        Ok(())
    }
}

/// The body of a refusal (the JSON error object) holding the refused request's unread
/// payload until the body is sent: actix then sees an unread payload and closes the
/// connection (after `client_disconnect_timeout`). Were the payload dropped first, actix would
/// keep the connection open to drain a chunked body for as long as the client cares to send.
struct RefusalBody {
    json: Option<Bytes>,
    len: u64,
    _unread: Payload,
}

impl MessageBody for RefusalBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.len)
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(self.get_mut().json.take().map(Ok))
    }
}

/// The refusal `e` as a response whose body holds `unread` (see [`RefusalBody`]).
fn refusal(e: &ApiError, unread: Payload) -> HttpResponse<RefusalBody> {
    let json = Bytes::from(e.body().to_string());
    HttpResponse::build(e.status)
        .content_type("application/json")
        .message_body(RefusalBody {
            len: json.len() as u64,
            json: Some(json),
            _unread: unread,
        })
        .unwrap_or_else(|err| {
            HttpResponse::from_error(err).set_body(RefusalBody {
                len: 0,
                json: None,
                _unread: Payload::None,
            })
        })
}

impl Intake {
    /// The intake of a server with limits `l` (its body budget starts whole).
    pub fn new(l: &Limits) -> Self {
        let units = (l.max_buffered_body_bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Intake {
            budget: Arc::new(Semaphore::new(units)),
            body_limit: l.body_limit_bytes,
            max_header_bytes: l.max_header_bytes,
            body_timeout: Duration::from_secs(l.body_timeout_s),
        }
    }

    /// Head size and `Content-Encoding`, from the head alone.
    fn check_head(&self, req: &ServiceRequest) -> Result<(), ApiError> {
        let uri = req.uri();
        let head = uri.path().len()
            + uri.query().map_or(0, str::len)
            + req
                .headers()
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head > self.max_header_bytes {
            return Err(ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!(
                    "the request head is {head} bytes, over server.max_header_bytes = {}",
                    self.max_header_bytes
                ),
            ));
        }
        for v in req.headers().get_all(header::CONTENT_ENCODING) {
            let enc = v.to_str().unwrap_or("?").trim();
            if !enc.eq_ignore_ascii_case("identity") {
                return Err(ApiError::unsupported(format!(
                    "request bodies with `Content-Encoding: {}` are not accepted; send the \
                     body uncompressed",
                    lavit_runtime::fsread::excerpt(enc, 40)
                )));
            }
        }
        Ok(())
    }

    /// Read the whole body under the limits, put it back as the request's payload, and keep
    /// its share of the budget in the request until the request ends. On a refusal, the
    /// payload is handed back with the error (see [`RefusalBody`]).
    async fn buffer_body(&self, req: &mut ServiceRequest) -> Result<(), (ApiError, Payload)> {
        let mut payload = req.take_payload();
        match self.read_body(req, &mut payload).await {
            Ok(()) => Ok(()),
            Err(e) => Err((e, payload)),
        }
    }

    async fn read_body(
        &self,
        req: &mut ServiceRequest,
        payload: &mut Payload,
    ) -> Result<(), ApiError> {
        let declared = match req.headers().get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .ok_or_else(|| ApiError::bad("`Content-Length` is not a number"))?,
            ),
        };
        if let Some(n) = declared {
            if n > self.body_limit {
                return Err(self.too_large(n));
            }
        }
        let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
        if declared.unwrap_or(0) == 0 && !chunked {
            req.set_payload(std::mem::replace(payload, Payload::None));
            return Ok(());
        }
        // The budget is charged for the buffer's capacity, not only its length: a declared
        // length is charged (and allocated) whole before anything is read, a chunked body as
        // its buffer grows.
        let mut budget = Charge {
            intake: self,
            permit: None,
            held: 0,
        };
        let mut buf = BytesMut::new();
        if let Some(n) = declared {
            budget.cover(n)?;
            buf = BytesMut::with_capacity(n);
        }
        let deadline = tokio::time::Instant::now() + self.body_timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, payload.next())
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the request body did not arrive within server.body_timeout_s = {} \
                             s ({} bytes received)",
                            self.body_timeout.as_secs(),
                            buf.len()
                        ),
                    )
                })?;
            let Some(chunk) = next else { break };
            let chunk =
                chunk.map_err(|e| ApiError::bad(format!("reading the request body: {e}")))?;
            let total = buf.len() + chunk.len();
            if total > self.body_limit {
                return Err(self.too_large(total));
            }
            if total > buf.capacity() {
                // The buffer grows (by doubling): charge what it now holds, or give it up.
                buf.reserve(chunk.len());
                budget.cover(buf.capacity())?;
            }
            buf.extend_from_slice(&chunk);
        }
        let permit = budget.permit.take();
        req.extensions_mut().insert(BodyPermit(permit));
        req.set_payload(Payload::from(buf.freeze()));
        Ok(())
    }

    fn busy() -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy: the server is receiving too many request bodies at once \
             (server.max_buffered_body_bytes); retry shortly",
        )
    }

    fn too_large(&self, n: usize) -> ApiError {
        ApiError::too_large(format!(
            "the request body is {n} bytes or more, over server.body_limit_bytes = {}",
            self.body_limit
        ))
    }
}

/// The intake middleware (`App::wrap(from_fn(intake))`); the [`Intake`] is app data.
pub async fn intake(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let checked = match req.app_data::<web::Data<Intake>>().cloned() {
        Some(i) => match i.check_head(&req) {
            Ok(()) => i.buffer_body(&mut req).await,
            Err(e) => {
                let payload = req.take_payload();
                Err((e, payload))
            }
        },
        None => Ok(()),
    };
    match checked {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err((e, payload)) => Ok(req
            .into_response(refusal(&e, payload))
            .map_into_right_body()),
    }
}

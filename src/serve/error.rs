//! Errors as OpenAI's clients read them: `{"error": {"message", "type", "param", "code"}}`
//! with the statuses the official client maps to its exception classes.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde_json::json;

use lavit_runtime::stage::StageError;

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

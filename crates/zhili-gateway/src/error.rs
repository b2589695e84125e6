//! What can go wrong on the request path, typed: which side caused a failure (client, gateway,
//! upstream) and whether any of the request can have reached the upstream. Retries, the circuit
//! breaker and outlier ejection read exactly this. Every error answer the gateway itself makes
//! is problem+json (RFC 9457), like the rest of Zhili's API.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{full, Body};

/// The gateway's own answer to a request it cannot pass on: problem+json whose `detail` says why.
pub fn problem(status: StatusCode, detail: &str) -> Response<Body> {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = serde_json::json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail}).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    r
}

/// A request refused before any phase acted on it (a malformed target, CONNECT).
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub detail: String,
}

impl Refused {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, detail: detail.into() }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut r = problem(self.status, &self.detail);
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
        }
        r
    }
}

/// Why a try failed: which side caused it and whether any of the request may have reached the
/// upstream. Retries, the circuit breaker and outlier ejection read exactly this: only the
/// upstream's failures count against it, and a request is sent again only when it provably was
/// not sent (or the route allows retrying it).
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection was made: nothing was sent (safe to retry for any method).
    Connect(String),
    /// The upstream failed after the request (or part of it) went out.
    Failed(String),
    /// The upstream did not answer within the try's time.
    Timeout(String),
    /// The gateway's own limit on connections to the endpoint: nothing was sent.
    Saturated(String),
    /// The client's own request could not be read (bad chunking, an abandoned upload).
    Client(String),
}

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Gateway,
    Upstream,
}

impl UpstreamError {
    pub fn side(&self) -> Side {
        match self {
            Self::Connect(_) | Self::Failed(_) | Self::Timeout(_) => Side::Upstream,
            Self::Saturated(_) => Side::Gateway,
            Self::Client(_) => Side::Client,
        }
    }

    /// Whether the request may be sent again after this failure: always when the upstream
    /// provably received nothing of it, otherwise only when repeating it is safe (`idempotent`:
    /// the method is, or the route says so) and the failure was the upstream's.
    pub fn retry_safe(&self, idempotent: bool) -> bool {
        self.nothing_sent() || (idempotent && self.side() == Side::Upstream)
    }

    /// Whether the upstream provably received nothing of the request.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Saturated(_))
    }

    pub fn status(&self) -> StatusCode {
        if let Self::Timeout(_) = self {
            return StatusCode::GATEWAY_TIMEOUT;
        }
        match self.side() {
            Side::Client => StatusCode::BAD_REQUEST,
            Side::Gateway => StatusCode::SERVICE_UNAVAILABLE,
            Side::Upstream => StatusCode::BAD_GATEWAY,
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "refused the connection: {e}"),
            UpstreamError::Failed(e) => write!(f, "failed: {e}"),
            UpstreamError::Timeout(e) => write!(f, "{e}"),
            UpstreamError::Saturated(e) => write!(f, "{e}"),
            UpstreamError::Client(e) => write!(f, "could not be sent: the request body is broken: {e}"),
        }
    }
}

//! The one place errors become HTTP responses: `application/problem+json` (RFC 9457) whose
//! `detail` says what is wrong. Bad input is answered, not logged; internal errors get a generic
//! body and a log line with the cause.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use zhili_acl::AclError;
use zhili_model::ValidationError;
use zhili_registry::RegistryError;
use zhili_store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    Conflict(String),
    PayloadTooLarge(String),
    Unavailable(String),
    Internal(String),
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Self::Internal(_) => "internal error; see the server log",
            Self::BadRequest(d)
            | Self::Unauthorized(d)
            | Self::Forbidden(d)
            | Self::NotFound(d)
            | Self::Conflict(d)
            | Self::PayloadTooLarge(d)
            | Self::Unavailable(d) => d,
        }
    }

    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Self::BadRequest(format!("{field}: {message}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(%cause, "request failed");
        }
        let status = self.status();
        let body = serde_json::to_vec(&Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.detail(),
        })
        .unwrap_or_default();
        let mut resp = (status, [(header::CONTENT_TYPE, "application/problem+json")], body).into_response();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read: the connection cannot carry another request,
            // and a client that reused it would see it closed under its next request.
            resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::LeaseNotFound(_) => Self::NotFound(e.to_string()),
            StoreError::Compacted { .. } => Self::Conflict(e.to_string()),
            StoreError::Closed => Self::Unavailable(e.to_string()),
            StoreError::Engine(_) | StoreError::Corrupt(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::ServiceNotFound(_) | RegistryError::InstanceNotFound(_) | RegistryError::CheckNotFound(_) => Self::NotFound(e.to_string()),
            RegistryError::NotTtl(_) => Self::Conflict(e.to_string()),
            RegistryError::Store(s) => s.into(),
            RegistryError::Corrupt { .. } => Self::Internal(e.to_string()),
        }
    }
}

impl From<AclError> for ApiError {
    fn from(e: AclError) -> Self {
        match e {
            AclError::TokenNotFound => Self::Forbidden(e.to_string()),
            AclError::AlreadyBootstrapped => Self::Forbidden(e.to_string()),
            AclError::PolicyNotFound(_) => Self::NotFound(e.to_string()),
            AclError::BuiltIn(_) => Self::Conflict(e.to_string()),
            AclError::Invalid(v) => v.into(),
            AclError::Store(s) => s.into(),
            AclError::Corrupt(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<zhili_kv::KvError> for ApiError {
    fn from(e: zhili_kv::KvError) -> Self {
        match e {
            zhili_kv::KvError::Store(s) => s.into(),
            zhili_kv::KvError::Invalid(v) => v.into(),
            zhili_kv::KvError::Contention => Self::Unavailable(e.to_string()),
            zhili_kv::KvError::Corrupt { .. } => Self::Internal(e.to_string()),
        }
    }
}

impl From<zhili_routes::RoutesError> for ApiError {
    fn from(e: zhili_routes::RoutesError) -> Self {
        match e {
            zhili_routes::RoutesError::Invalid(v) => v.into(),
            zhili_routes::RoutesError::Store(s) => s.into(),
            zhili_routes::RoutesError::Corrupt(what, why) => Self::Internal(format!("stored {what}: {why}")),
        }
    }
}

impl From<zhili_events::SubscriptionError> for ApiError {
    fn from(e: zhili_events::SubscriptionError) -> Self {
        use zhili_events::SubscriptionError as E;
        match e {
            E::NotFound(_) => Self::NotFound(e.to_string()),
            E::Invalid(v) => v.into(),
            E::Store(s) => s.into(),
            E::Log(l) => Self::Internal(l.to_string()),
            E::Corrupt(..) => Self::Internal(e.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

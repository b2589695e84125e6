//! The one authorization layer in front of every route: it reads the caller's token, resolves it
//! against the ACL snapshot once, and leaves the resulting [`Authority`] on the request. Handlers
//! then state exactly what they need with [`Caller::require`].

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use zhili_model::acl::{Access, Authority, Resource};

use crate::error::ApiError;
use crate::AppState;

/// The resolved permissions of the caller, put there by [`authorize`].
#[derive(Clone)]
pub struct Caller {
    pub authority: Authority,
    pub token: Option<String>,
}

impl Caller {
    pub fn require(&self, resource: Resource, name: &str, access: Access) -> Result<(), ApiError> {
        if self.authority.allows(resource, name, access) {
            return Ok(());
        }
        let what = match access {
            Access::Write => "write",
            _ => "read",
        };
        let kind = match resource {
            Resource::Service => "service",
            Resource::Kv => "kv",
            Resource::Acl => "acl",
            Resource::Operator => "operator",
            Resource::Route => "route",
            Resource::Consumer => "consumer",
        };
        let who = if self.token.is_some() { "this token" } else { "anonymous callers (no token given)" };
        Err(ApiError::Forbidden(format!("permission denied: {who} may not {what} {kind} {name:?}")))
    }

    pub fn can(&self, resource: Resource, name: &str, access: Access) -> bool {
        self.authority.allows(resource, name, access)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| ApiError::Internal("authorization layer missing".into()))
    }
}

/// The token from `Authorization: Bearer`, `X-Zhili-Token` or `X-Consul-Token`.
pub fn token_from(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        if let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")) {
            return Some(t.trim().to_string());
        }
    }
    ["x-zhili-token", "x-consul-token"].iter().find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string()))
}

/// Consul clients may also pass the token as `?token=` on `/v1` routes.
fn query_token(req: &Request) -> Option<String> {
    if !req.uri().path().starts_with("/v1/") {
        return None;
    }
    let q = req.uri().query()?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok()?.into_iter().find(|(k, _)| k == "token").map(|(_, v)| v).filter(|v| !v.is_empty())
}

pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = token_from(req.headers()).or_else(|| query_token(&req));
    match state.acl.resolve(token.as_deref()) {
        Ok(authority) => {
            req.extensions_mut().insert(Caller { authority, token });
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

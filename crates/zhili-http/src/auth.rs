//! The one authorization layer in front of every route: it reads the caller's token, resolves it
//! against the ACL snapshot once, and leaves the resulting [`Authority`] on the request. Handlers
//! then state exactly what they need with [`Caller::require`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName};
use axum::response::{IntoResponse, Response};
use http_body::Body as _;
use zhili_acl::{Acl, AclError};
use zhili_model::acl::{Access, Authority, Resource};

use crate::error::ApiError;
use crate::layer::{Gate, GateLayer, Step};
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
        let who = if self.token.is_some() { "this token" } else { "anonymous callers (no token given)" };
        Err(ApiError::Forbidden(format!("permission denied: {who} may not {} {} {name:?}", access_word(access), resource.as_str())))
    }

    /// Like [`Self::require`] for every name under `prefix`: multi-key writes (recursive
    /// deletes, delete-tree) need this, not just the right on the prefix in the URL.
    pub fn require_all(&self, resource: Resource, prefix: &str, access: Access) -> Result<(), ApiError> {
        if self.authority.allows_all_under(resource, prefix, access) {
            return Ok(());
        }
        self.require(resource, prefix, access)?;
        let who = if self.token.is_some() { "this token" } else { "anonymous callers (no token given)" };
        Err(ApiError::Forbidden(format!("permission denied: {who} may not {} everything under {prefix:?} (a rule inside it grants less)", access_word(access))))
    }

    pub fn can(&self, resource: Resource, name: &str, access: Access) -> bool {
        self.authority.allows(resource, name, access)
    }
}

fn access_word(access: Access) -> &'static str {
    match access {
        Access::Write => "write",
        _ => "read",
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
    // Names as constants: a `&str` name is parsed and checked on every lookup.
    static TOKEN_HEADERS: [HeaderName; 2] = [HeaderName::from_static("x-zhili-token"), HeaderName::from_static("x-consul-token")];
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")) {
            return Some(t.trim().to_string());
        }
    }
    TOKEN_HEADERS.iter().find_map(|h| headers.get(h).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string()))
}

/// The first value of `name` in a query string (decoded), without decoding the other pairs.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Consul clients may also pass the token as `?token=` on `/v1` routes.
fn query_token(req: &Request) -> Option<String> {
    // Decoding every pair is skipped when no key can be `token` (only an escape could spell it).
    let query = req.uri().query().filter(|q| req.uri().path().starts_with("/v1/") && (q.contains("token") || q.contains('%')))?;
    query_param(query, "token").filter(|v| !v.is_empty())
}

/// The API listener's layer: the token from the headers (or Consul's `?token=`), resolved once.
pub fn authorize(state: &AppState) -> GateLayer<Authorize> {
    GateLayer(Authorize {
        acl: state.acl.clone(),
        token: |req| token_from(req.headers()).or_else(|| query_token(req)),
        refused: |e| e.map_or_else(|| ApiError::Forbidden(REVOKED.into()), ApiError::from).into_response(),
    })
}

/// Token to caller, for every surface: resolves the request's token (`token` finds it) against
/// the ACL snapshot, leaves the [`Caller`] on the request and runs it [`until_revoked`].
/// `refused` answers an unknown token (`Some(error)`) or one revoked while the request waited
/// (`None`), in the surface's own shape.
#[derive(Clone)]
pub struct Authorize {
    pub acl: Arc<Acl>,
    pub token: fn(&Request) -> Option<String>,
    pub refused: fn(Option<AclError>) -> Response,
}

impl Gate for Authorize {
    fn check(&self, req: &mut Request) -> Step {
        let token = (self.token)(req);
        // Watched only for a token under enforced ACLs, and subscribed before resolving so a
        // revocation between the two is not missed.
        let changes = (token.is_some() && self.acl.enabled()).then(|| self.acl.changes());
        let authority = match self.acl.resolve(token.as_deref()) {
            Ok(authority) => authority,
            Err(e) => return Step::Answer((self.refused)(Some(e))),
        };
        req.extensions_mut().insert(Caller { authority: authority.clone(), token: token.clone() });
        let Some(changes) = changes else { return Step::Pass };
        let (acl, refused) = (self.acl.clone(), self.refused);
        Step::Wrap(Box::new(move |handler| Box::pin(async move { until_revoked(&acl, changes, token, authority, handler, || refused(None)).await })))
    }
}

/// What a request or stream is told when its token was deleted or its rights changed.
pub const REVOKED: &str = "the token of this request was deleted or its rights changed; retry with a valid token";

/// Runs a request under its token's current rights: if the token is deleted, or its policies
/// change what it may do, while the handler waits (a blocking read, a long-poll) the request is
/// answered with `refused()`; if it happens while the answer streams (SSE), the stream ends.
/// Callers without a token, and every caller while ACLs are off, are unaffected and pay nothing.
pub async fn until_revoked(
    acl: &Arc<Acl>,
    changes: tokio::sync::watch::Receiver<u64>,
    token: Option<String>,
    granted: Authority,
    handler: impl Future<Output = Response>,
    refused: impl FnOnce() -> Response,
) -> Response {
    let Some(secret) = token.filter(|_| acl.enabled()) else { return handler.await };
    let acl = acl.clone();
    let mut revoked: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move { acl.revoked(changes, &secret, &granted).await });
    let resp = tokio::select! {
        resp = handler => resp,
        () = &mut revoked => return refused(),
    };
    // A body of known length is already complete; only open-ended ones (streams) need watching.
    if resp.body().size_hint().exact().is_some() {
        return resp;
    }
    resp.map(|body| Body::new(Revocable { body, revoked: Some(revoked) }))
}

/// A streamed answer that ends when its token is revoked.
struct Revocable {
    body: Body,
    revoked: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl http_body::Body for Revocable {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Some(r) = self.revoked.as_mut() {
            if r.as_mut().poll(cx).is_ready() {
                self.revoked = None;
                tracing::info!("stream ended: its token was revoked");
                return Poll::Ready(None);
            }
        } else {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::{query_param, query_token, Request};

    #[test]
    fn consul_query_tokens_are_found_however_the_key_is_written() {
        let token = |uri: &str| query_token(&Request::builder().uri(uri).body(axum::body::Body::empty()).unwrap());
        assert_eq!(token("/v1/kv/a?token=s1&index=3").as_deref(), Some("s1"));
        assert_eq!(token("/v1/kv/a?index=3&%74oken=s2").as_deref(), Some("s2"), "an escaped key is still `token`");
        assert_eq!(token("/v1/kv/a?index=3&wait=5s"), None);
        assert_eq!(token("/v1/kv/a?token="), None, "an empty token is no token");
        assert_eq!(token("/api/v1/kv/a?token=s3"), None, "only Consul's /v1 routes take it from the query");
    }

    #[test]
    fn query_param_decodes_the_first_match_only() {
        assert_eq!(query_param("a=1&accessToken=x%2By+z&accessToken=second", "accessToken").as_deref(), Some("x+y z"));
        assert_eq!(query_param("accesstoken=x&token", "accessToken"), None);
        assert_eq!(query_param("token", "token").as_deref(), Some(""));
        assert_eq!(query_param("", "token"), None);
    }
}

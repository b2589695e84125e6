//! HTTP APIs of the API listener: the native REST API (`/api/v1`), operational endpoints
//! (`/metrics`, `/health/*`, `/api/openapi.json`). One authorization layer sits in front of every
//! route; errors become problem+json in one place ([`error`]).

pub mod auth;
pub mod consul;
pub mod error;
pub mod extract;
pub mod nacos;
pub mod native;
pub mod openapi;
mod ops;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use zhili_acl::Acl;
use zhili_kv::Kv;
use zhili_registry::Registry;
use zhili_store::Store;
use zhili_telemetry::{HttpLabels, Metrics};

/// Largest request body on any route: a 512 KiB KV value plus headroom for JSON bodies.
pub const MAX_BODY: usize = 640 * 1024;
pub use zhili_kv::KV_PREFIX;

/// Shared by every handler. One `Arc`, because axum clones the state for each layer and route on
/// every request: one atomic increment instead of one per field.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

pub struct Services {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub acl: Arc<Acl>,
    pub kv: Arc<Kv>,
    pub consul: consul::ConsulIdentity,
    pub consul_health: consul::HealthCache,
    /// Nacos gRPC connections and push fan-out; dormant unless the Nacos listeners run.
    pub nacos: nacos::NacosHub,
    pub metrics: Arc<Metrics>,
    /// Set once persisted state is loaded and listeners are up; `/health/ready` reports it.
    pub ready: Arc<AtomicBool>,
}

/// The API listener's router, layers applied outermost-last:
/// - metrics: outermost, so it times everything including auth rejections;
/// - body limit: before any handler reads a body;
/// - authorize: resolves the token once per request for every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(native::routes())
        .merge(consul::routes())
        .merge(ops::routes())
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(refuse_oversized))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .with_state(state)
}

/// Answers 413 at once when the announced body is larger than any route takes, before a byte of
/// it is read (and before any handler waits on it).
pub(crate) async fn refuse_oversized(req: Request, next: Next) -> Response {
    let announced = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return axum::response::IntoResponse::into_response(error::ApiError::PayloadTooLarge(format!(
            "body: Content-Length {} is over the limit of {MAX_BODY} bytes",
            announced.unwrap_or_default()
        )));
    }
    next.run(req).await
}

async fn fallback(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn record_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    // The route template keeps label cardinality bounded; unmatched paths share one label.
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    let labels = HttpLabels { method, route, status: resp.status().as_u16() };
    state.metrics.http_requests.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
    resp
}

//! What every HTTP surface (native, Consul, Nacos, and later DTM and the console) shares: the
//! state handlers see ([`AppState`]), the one token-to-caller layer ([`auth`]), problem+json
//! errors ([`error`]), extractors that name the bad field ([`extract`]), body limits and request
//! metrics. A surface crate builds its router on these and never on another surface.

pub mod auth;
pub mod error;
pub mod extract;
pub mod layer;
pub mod rendered;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use layer::{Gate, GateLayer, Step};
use zhili_acl::Acl;
use zhili_kv::Kv;
use zhili_registry::Registry;
use zhili_store::Store;
use zhili_telemetry::Metrics;

/// Largest request body on any route: a 512 KiB KV value plus headroom for JSON bodies.
pub const MAX_BODY: usize = 640 * 1024;

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

/// The domain services behind every surface.
pub struct Services {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub acl: Arc<Acl>,
    pub kv: Arc<Kv>,
    /// The durable event log (streams, `$registry`, ...).
    pub events: Arc<dyn zhili_store::events::EventLog>,
    /// Persistent subscriptions (consumer groups, webhooks) on the event log.
    pub subscriptions: Arc<zhili_events::Subscriptions>,
    /// Successful writes of every surface, to `$audit`.
    pub audit: zhili_events::Audit,
    /// The transaction coordinator (None with `--dtm-addr off`).
    pub transactions: Option<Arc<zhili_txn::Coordinator>>,
    /// Plans (maintenance windows, rollouts, config changes) gated on feedback.
    pub plans: Arc<zhili_plans::Plans>,
    /// The embedded gateway (None with `--gateway-addr off`): its counters feed the topology.
    pub gateway: Option<Arc<zhili_gateway::Gateway>>,
    pub metrics: Arc<Metrics>,
    /// Set once persisted state is loaded and listeners are up; `/health/ready` reports it.
    pub ready: Arc<AtomicBool>,
}

/// Bounds the request bodies of a router's routes: 413 at once when the announced length is over
/// the route's limit (before a byte is read), and a hard cap on what extractors read. `max` holds
/// on every route except those whose template starts with `larger.0`, which take `larger.1`.
/// A [`Gate`], so it goes into the router's one `Router::layer` call with the other layers (axum
/// boxes every route's future, and clones its service, once per call and request). Unmatched
/// paths are left alone: the fallback reads no body.
pub fn limit_bodies(max: usize, larger: Option<(&'static str, usize)>) -> GateLayer<BodyLimits> {
    GateLayer(BodyLimits { max, larger })
}

/// See [`limit_bodies`].
#[derive(Clone, Copy)]
pub struct BodyLimits {
    max: usize,
    larger: Option<(&'static str, usize)>,
}

impl Gate for BodyLimits {
    fn check(&self, req: &mut Request) -> Step {
        let announced = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        // A request without a body (most reads) needs neither check.
        if announced.is_none() && http_body::Body::is_end_stream(req.body()) {
            return Step::Pass;
        }
        let Some(route) = req.extensions().get::<MatchedPath>() else { return Step::Pass };
        let max = match self.larger {
            Some((prefix, larger)) if route.as_str().starts_with(prefix) => larger,
            _ => self.max,
        };
        if let Some(n) = announced.filter(|n| *n > max as u64) {
            return Step::Answer(error::ApiError::PayloadTooLarge(format!("body: Content-Length {n} is over the limit of {max} bytes")).into_response());
        }
        DefaultBodyLimit::max(max).apply(req);
        Step::Pass
    }
}

/// Times every request of a router into `http_requests` (outermost, so auth refusals count).
pub fn record_metrics(state: &AppState) -> layer::ObserveLayer {
    layer::ObserveLayer(state.clone())
}

/// Records every successful write of a router in `$audit` (`surface` names the API), with the
/// caller's token accessor id. Reads, heartbeats and other liveness traffic are not audited.
/// Compose it with the surface's other layers (a `tower::ServiceBuilder`) into one
/// `Router::layer` call: axum boxes every route's future once per call.
pub fn audit_writes(state: &AppState, surface: &'static str) -> GateLayer<Audit> {
    GateLayer(Audit { state: state.clone(), surface })
}

/// See [`audit_writes`].
#[derive(Clone)]
pub struct Audit {
    state: AppState,
    surface: &'static str,
}

impl Gate for Audit {
    fn check(&self, req: &mut Request) -> Step {
        let method = req.method();
        if matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS) || unaudited(method, req.uri().path()) {
            return Step::Pass;
        }
        let method = method.to_string();
        let path = req.uri().path().to_string();
        let accessor =
            req.extensions().get::<auth::Caller>().and_then(|c| c.token.as_deref()).and_then(|t| self.state.acl.token_by_secret(t)).map(|t| t.accessor_id);
        let (state, surface) = (self.state.clone(), self.surface);
        Step::Wrap(Box::new(move |handler| {
            Box::pin(async move {
                let resp = handler.await;
                if resp.status().is_success() {
                    state.audit.record(zhili_events::AuditRecord { surface, method, path, status: resp.status().as_u16(), accessor });
                }
                resp
            })
        }))
    }
}

/// Writes not audited: heartbeats and TTL check updates (frequent, and not changes anyone
/// audits), and the event log's data traffic: appends and streaming publishes (each event is
/// its own durable record) and consumer acks/nacks (a group's progress, not a change of state).
/// Stream deletion, metadata and subscription definitions stay audited.
fn unaudited(method: &axum::http::Method, path: &str) -> bool {
    let liveness =
        path.ends_with("/heartbeat") || path.ends_with("/instance/beat") || path.starts_with("/v1/agent/check/") || path.starts_with("/v1/session/renew/");
    let event_data = *method == axum::http::Method::POST
        && (path.strip_prefix("/api/v1/streams/").is_some_and(|rest| !rest.contains('/') || rest.ends_with("/publish"))
            || path.strip_prefix("/api/v1/subscriptions/").is_some_and(|rest| rest.ends_with("/ack") || rest.ends_with("/nack")));
    liveness || event_data
}

/// Every read carries the index it reflects, for blocking reads to continue from.
pub fn indexed(index: u64, body: impl IntoResponse) -> Response {
    let mut resp = body.into_response();
    static INDEX: HeaderName = HeaderName::from_static("x-zhili-index");
    resp.headers_mut().insert(INDEX.clone(), HeaderValue::from(index));
    resp
}

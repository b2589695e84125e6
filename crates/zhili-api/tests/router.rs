//! The API listener's router in process, without sockets: the native routes, a surface merged
//! under the one authorization layer, problem+json errors and the fallback, on an in-memory store.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use zhili_api::{AppState, Services};
use zhili_model::{CheckDefinition, CheckKey};
use zhili_registry::{CheckScheduler, Registry};
use zhili_store::memory::MemoryStore;
use zhili_store::Store;

struct NoChecks;

impl CheckScheduler for NoChecks {
    fn schedule(&self, _key: CheckKey, _def: CheckDefinition) {}
    fn cancel(&self, _key: &CheckKey) {}
}

fn state(acl: bool) -> AppState {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let metrics = zhili_telemetry::Metrics::new();
    let events: Arc<dyn zhili_store::events::EventLog> = Arc::new(zhili_store::memory::MemoryEventLog::new());
    AppState::new(Services {
        registry: Registry::load(store.clone(), Arc::new(NoChecks), metrics.clone()).unwrap(),
        acl: zhili_acl::Acl::load(store.clone(), acl).unwrap(),
        kv: zhili_kv::Kv::new(store.clone()),
        events: events.clone(),
        subscriptions: zhili_events::Subscriptions::load(store.clone(), events.clone()).unwrap(),
        audit: zhili_events::Audit::new(events).0,
        transactions: None,
        gateway: None,
        plans: zhili_plans::Plans::start(store.clone(), Arc::new(zhili_plans::EmptyWorld), None, std::time::Duration::from_millis(100)).unwrap(),
        store,
        metrics,
        ready: Arc::new(AtomicBool::new(true)),
    })
}

async fn call(app: &Router, method: Method, uri: &str, body: &str) -> (StatusCode, String, String) {
    let req = Request::builder().method(method).uri(uri).body(Body::from(body.to_string())).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let ct = resp.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn native_routes_errors_and_fallback() {
    let app = zhili_api::router(state(false), []);
    let (status, _, body) = call(&app, Method::POST, "/api/v1/services/web/instances", r#"{"address":"10.0.0.1","port":80}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _, body) = call(&app, Method::GET, "/api/v1/services/web/instances", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("10.0.0.1"), "{body}");
    // Bad input: problem+json naming the field, nothing written.
    let (status, ct, body) = call(&app, Method::POST, "/api/v1/services/web/instances", r#"{"address":"10.0.0.2","port":"eighty"}"#).await;
    assert_eq!((status, ct.as_str()), (StatusCode::BAD_REQUEST, "application/problem+json"));
    assert!(body.contains("port"), "{body}");
    let (_, _, body) = call(&app, Method::GET, "/api/v1/services/web/instances", "").await;
    assert!(!body.contains("10.0.0.2"), "{body}");
    let (status, ct, body) = call(&app, Method::GET, "/nowhere", "").await;
    assert_eq!((status, ct.as_str()), (StatusCode::NOT_FOUND, "application/problem+json"));
    assert!(body.contains("/nowhere"), "{body}");
    // Oversized bodies are refused from the announced length, before a byte is read.
    let announced = |method: Method, uri: &str, length: usize| {
        let req = Request::builder().method(method).uri(uri).header(header::CONTENT_LENGTH, length.to_string()).body(Body::empty()).unwrap();
        async { app.clone().oneshot(req).await.unwrap().status() }
    };
    assert_eq!(announced(Method::PUT, "/api/v1/kv/big", 10_000_000).await, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(announced(Method::PUT, "/api/v1/kv/big", zhili_api::MAX_BODY + 1).await, StatusCode::PAYLOAD_TOO_LARGE);
    // Event batches may be larger than other bodies, up to their own limit.
    let batch = zhili_model::event::MAX_BATCH_BYTES;
    assert!(batch > zhili_api::MAX_BODY);
    assert_ne!(announced(Method::POST, "/api/v1/streams/orders", zhili_api::MAX_BODY + 1).await, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(announced(Method::POST, "/api/v1/streams/orders", batch + 1).await, StatusCode::PAYLOAD_TOO_LARGE);
    // A body sent without a length (chunked) is held to the same limits as it is read.
    let unannounced = |method: Method, uri: &str, length: usize| {
        let req = Request::builder().method(method).uri(uri).body(Body::from(vec![b'a'; length])).unwrap();
        assert!(req.headers().get(header::CONTENT_LENGTH).is_none());
        async { app.clone().oneshot(req).await.unwrap().status() }
    };
    assert_eq!(unannounced(Method::PUT, "/api/v1/kv/big", zhili_api::MAX_BODY + 1).await, StatusCode::PAYLOAD_TOO_LARGE);
    assert_ne!(unannounced(Method::POST, "/api/v1/streams/orders", zhili_api::MAX_BODY + 1).await, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn request_metrics_label_routes_and_bound_methods() {
    let app = zhili_api::router(state(false), []);
    call(&app, Method::GET, "/api/v1/kv/a/b", "").await;
    // Methods are the client's to invent: each must not become a label of its own.
    for invented in ["FOO1", "FOO2"] {
        let (status, _, _) = call(&app, Method::from_bytes(invented.as_bytes()).unwrap(), "/api/v1/kv/a", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
    let (_, _, metrics) = call(&app, Method::GET, "/metrics", "").await;
    let lines: Vec<&str> = metrics.lines().filter(|l| l.starts_with("zhili_http_request_duration_seconds_count")).collect();
    assert!(lines.iter().any(|l| l.contains(r#"method="GET""#) && l.contains(r#"route="/api/v1/kv/{*key}""#) && l.contains(r#"status="404""#)), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains(r#"method="OTHER""#) && l.contains(r#"status="405""#) && l.ends_with(" 2")), "{lines:?}");
    assert!(!metrics.contains("FOO"), "{metrics}");
}

#[tokio::test]
async fn other_surfaces_share_the_one_authorization_layer() {
    let s = state(true);
    // A stand-in surface: it answers 200 to whoever the layer let through with a caller.
    let surface = Router::new().route("/v1/probe", axum::routing::get(|caller: zhili_api::auth::Caller| async move { format!("{}", caller.token.is_some()) }));
    let app = zhili_api::router(s, [surface]);
    let (status, _, body) = call(&app, Method::GET, "/v1/probe", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "false"), "anonymous callers get a caller with no token");
    let (status, _, _) = call(&app, Method::GET, "/v1/probe?token=unknown", "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "an unknown token is refused before the surface runs");
    let (status, _, _) = call(&app, Method::GET, "/api/v1/kv/x", "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "ACLs on: anonymous may not read");
}

//! Server-sent event streams of registry and KV changes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use tokio::sync::broadcast::error::RecvError;
use zhili_model::acl::{Access, Resource};
use zhili_model::validate;
use zhili_store::EventKind;

use super::kv::KvEntry;
use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::QueryPairs;
use crate::{AppState, KV_PREFIX};

const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/events/registry", get(registry_events)).route("/api/v1/events/kv", get(kv_events))
}

/// `GET /api/v1/events/registry?namespace=&service=`: one SSE event per registry change. A
/// subscriber that falls behind gets a `lagged` event and should re-read the state it needs.
async fn registry_events(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    let ns = q.namespace()?;
    let service = q.get("service").map(str::to_string);
    if let Some(svc) = &service {
        validate::name("service", svc)?;
        caller.require(Resource::Service, svc, Access::Read)?;
    }
    let rx = s.registry.subscribe_events();
    let guard = zhili_telemetry::WatcherGuard::new(&s.metrics);
    let stream = stream::unfold((rx, caller, guard), move |(mut rx, caller, guard)| {
        let ns = ns.clone();
        let service = service.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if ev.namespace != ns || service.as_ref().is_some_and(|s| *s != ev.service) || !caller.can(Resource::Service, &ev.service, Access::Read)
                        {
                            continue;
                        }
                        let data = serde_json::to_string(&*ev).unwrap_or_default();
                        let event = Event::default().event("registry").id(ev.index.to_string()).data(data);
                        return Some((Ok::<_, Infallible>(event), (rx, caller, guard)));
                    }
                    Err(RecvError::Lagged(n)) => {
                        let event = Event::default().event("lagged").data(format!("{{\"missed\":{n}}}"));
                        return Some((Ok(event), (rx, caller, guard)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(sse(stream))
}

/// `GET /api/v1/events/kv?prefix=P&index=N`: KV changes under a prefix, resuming after index N
/// from the store's retained history when given.
async fn kv_events(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    let prefix = q.get("prefix").unwrap_or("").to_string();
    validate::kv_prefix("prefix", &prefix)?;
    let from = q.u64("index")?.map_or(0, |i| i + 1);
    let watcher = s.store.watch(&format!("{KV_PREFIX}{prefix}"), from)?;
    let guard = zhili_telemetry::WatcherGuard::new(&s.metrics);
    // State: the watcher while the stream is healthy; None once a final `lagged` event was sent.
    let stream = stream::unfold((Some(watcher), caller, guard), |(w, caller, guard)| async move {
        let mut w = w?;
        loop {
            match w.next().await {
                Ok(ev) => {
                    let key = &ev.kv.key[KV_PREFIX.len()..];
                    if !caller.can(Resource::Kv, key, Access::Read) {
                        continue;
                    }
                    let kind = match ev.kind {
                        EventKind::Put => "put",
                        EventKind::Delete => "delete",
                    };
                    let mut body = serde_json::to_value(KvEntry::from_kv(&ev.kv)).unwrap_or_default();
                    if let Some(o) = body.as_object_mut() {
                        o.insert("kind".into(), kind.into());
                    }
                    let event = Event::default().event("kv").id(ev.revision.to_string()).data(body.to_string());
                    return Some((Ok::<_, Infallible>(event), (Some(w), caller, guard)));
                }
                Err(e) => {
                    // Fell behind the retained history: say so, then end; the client re-reads.
                    let event = Event::default().event("lagged").data(serde_json::json!({ "error": e.to_string() }).to_string());
                    return Some((Ok(event), (None, caller, guard)));
                }
            }
        }
    });
    Ok(sse(stream))
}

fn sse<S: Stream<Item = Result<Event, Infallible>> + Send + 'static>(stream: S) -> Response {
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}

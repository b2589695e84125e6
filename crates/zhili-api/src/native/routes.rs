//! Gateway routes as a resource: `PUT/GET/DELETE /api/v1/routes/{route}`, `GET /api/v1/routes`
//! (blocking with `index`/`wait`, which is how gateways follow them). Stored under `routes/`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use zhili_model::acl::{Access, Resource};
use zhili_model::route::RouteSpec;
use zhili_store::Store;

use super::indexed;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryPairs};
use crate::AppState;

pub const ROUTES_PREFIX: &str = "routes/";

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/routes", get(list)).route("/api/v1/routes/{route}", get(get_route).put(put_route).delete(delete_route))
}

/// Every stored route, in name order, with the store revision they reflect.
pub fn load_routes(store: &dyn Store) -> Result<(u64, Vec<(String, RouteSpec)>), zhili_store::StoreError> {
    let revision = store.revision();
    let mut out = vec![];
    for kv in store.range(ROUTES_PREFIX, None)? {
        let name = kv.key.trim_start_matches(ROUTES_PREFIX).to_string();
        match serde_json::from_slice::<RouteSpec>(&kv.value) {
            Ok(spec) => out.push((name, spec)),
            Err(e) => tracing::warn!(route = %name, error = %e, "stored route is unreadable; skipped"),
        }
    }
    Ok((revision, out))
}

/// Waits until a route changes after store revision `index` (or `wait` passes).
pub async fn wait_routes(store: &dyn Store, index: u64, wait: Duration) {
    super::wait_store(store, ROUTES_PREFIX, true, index, wait).await
}

async fn list(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        wait_routes(&*s.store, index, wait).await;
    }
    let (index, routes) = load_routes(&*s.store)?;
    let visible: Vec<_> = routes
        .into_iter()
        .filter(|(name, _)| caller.can(Resource::Route, name, Access::Read))
        .map(|(name, route)| json!({"name": name, "route": route}))
        .collect();
    Ok(indexed(index, Json(json!({"index": index, "routes": visible}))))
}

fn route_key(name: &str) -> ApiResult<String> {
    zhili_model::validate::name("route", name)?;
    Ok(format!("{ROUTES_PREFIX}{name}"))
}

async fn get_route(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    let key = route_key(&name)?;
    caller.require(Resource::Route, &name, Access::Read)?;
    let kv = s.store.get(&key)?.ok_or_else(|| ApiError::NotFound(format!("route {name:?} not found")))?;
    let spec: RouteSpec = serde_json::from_slice(&kv.value).map_err(|e| ApiError::Internal(format!("stored route {name:?}: {e}")))?;
    Ok(indexed(kv.mod_revision, Json(spec)))
}

async fn put_route(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(spec): JsonBody<RouteSpec>) -> ApiResult<Response> {
    let key = route_key(&name)?;
    caller.require(Resource::Route, &name, Access::Write)?;
    // Compiling is the validation: whatever is stored, the gateway can run.
    zhili_gateway::compile(&name, &spec)?;
    let value = serde_json::to_vec(&spec).expect("route serializes");
    let revision = zhili_store::put(&*s.store, &key, value).await?;
    Ok(indexed(revision, Json(json!({"name": name, "index": revision}))))
}

async fn delete_route(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    let key = route_key(&name)?;
    caller.require(Resource::Route, &name, Access::Write)?;
    if s.store.get(&key)?.is_none() {
        return Err(ApiError::NotFound(format!("route {name:?} not found")));
    }
    let r = zhili_store::delete(&*s.store, &key).await?;
    Ok(indexed(r.revision, StatusCode::NO_CONTENT.into_response()))
}

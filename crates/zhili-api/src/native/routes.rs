//! The gateway's resources: routes (`/api/v1/routes[/{route}]`, stored under `routes/`) and
//! consumers (`/api/v1/consumers[/{consumer}]`, under `consumers/`, API keys only as digests).
//! Both lists block with `index`/`wait`, which is how gateways follow them.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use zhili_model::acl::{Access, Resource};
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;
use zhili_store::Store;

use super::indexed;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryPairs};
use crate::AppState;

pub const ROUTES_PREFIX: &str = "routes/";
pub const CONSUMERS_PREFIX: &str = "consumers/";

/// One kind of named gateway resource stored as JSON under a prefix.
trait Kind: Serialize + DeserializeOwned + Send + 'static {
    const PREFIX: &'static str;
    /// Singular, as in paths and messages.
    const WHAT: &'static str;
    /// The list's key in `{index, <plural>: [{name, <what>}]}`.
    const PLURAL: &'static str;
    const RESOURCE: Resource;
    /// Checks `self` and returns the form to store.
    fn admit(self, name: &str) -> ApiResult<Self>;
}

impl Kind for RouteSpec {
    const PREFIX: &'static str = ROUTES_PREFIX;
    const WHAT: &'static str = "route";
    const PLURAL: &'static str = "routes";
    const RESOURCE: Resource = Resource::Route;
    fn admit(self, name: &str) -> ApiResult<Self> {
        // Compiling is the validation: whatever is stored, the gateway can run.
        zhili_gateway::compile(name, &self)?;
        Ok(self)
    }
}

impl Kind for ConsumerSpec {
    const PREFIX: &'static str = CONSUMERS_PREFIX;
    const WHAT: &'static str = "consumer";
    const PLURAL: &'static str = "consumers";
    const RESOURCE: Resource = Resource::Consumer;
    fn admit(self, name: &str) -> ApiResult<Self> {
        self.validate(name)?;
        Ok(self.hashed())
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/routes", get(list::<RouteSpec>))
        .route("/api/v1/routes/{route}", get(get_one::<RouteSpec>).put(put_one::<RouteSpec>).delete(delete_one::<RouteSpec>))
        .route("/api/v1/consumers", get(list::<ConsumerSpec>))
        .route("/api/v1/consumers/{consumer}", get(get_one::<ConsumerSpec>).put(put_one::<ConsumerSpec>).delete(delete_one::<ConsumerSpec>))
}

fn load_all<T: Kind>(store: &dyn Store) -> Result<(u64, Vec<(String, T)>), zhili_store::StoreError> {
    let revision = store.revision();
    let mut out = vec![];
    for kv in store.range(T::PREFIX, None)? {
        let name = kv.key.trim_start_matches(T::PREFIX).to_string();
        match serde_json::from_slice::<T>(&kv.value) {
            Ok(spec) => out.push((name, spec)),
            Err(e) => tracing::warn!(name = %name, kind = T::WHAT, error = %e, "stored gateway resource is unreadable; skipped"),
        }
    }
    Ok((revision, out))
}

/// Every stored route, in name order, with the store revision they reflect.
pub fn load_routes(store: &dyn Store) -> Result<(u64, Vec<(String, RouteSpec)>), zhili_store::StoreError> {
    load_all(store)
}

pub fn load_consumers(store: &dyn Store) -> Result<(u64, Vec<(String, ConsumerSpec)>), zhili_store::StoreError> {
    load_all(store)
}

/// Waits until a route changes after store revision `index` (or `wait` passes).
pub async fn wait_routes(store: &dyn Store, index: u64, wait: Duration) {
    super::wait_store(store, ROUTES_PREFIX, true, index, wait).await
}

pub async fn wait_consumers(store: &dyn Store, index: u64, wait: Duration) {
    super::wait_store(store, CONSUMERS_PREFIX, true, index, wait).await
}

async fn list<T: Kind>(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        super::wait_store(&*s.store, T::PREFIX, true, index, wait).await;
    }
    let (index, all) = load_all::<T>(&*s.store)?;
    let visible: Vec<_> =
        all.into_iter().filter(|(name, _)| caller.can(T::RESOURCE, name, Access::Read)).map(|(name, spec)| json!({"name": name, T::WHAT: spec})).collect();
    Ok(indexed(index, Json(json!({"index": index, T::PLURAL: visible}))))
}

fn key<T: Kind>(name: &str) -> ApiResult<String> {
    zhili_model::validate::name(T::WHAT, name)?;
    Ok(format!("{}{name}", T::PREFIX))
}

async fn get_one<T: Kind>(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    let key = key::<T>(&name)?;
    caller.require(T::RESOURCE, &name, Access::Read)?;
    let kv = s.store.get(&key)?.ok_or_else(|| ApiError::NotFound(format!("{} {name:?} not found", T::WHAT)))?;
    let spec: T = serde_json::from_slice(&kv.value).map_err(|e| ApiError::Internal(format!("stored {} {name:?}: {e}", T::WHAT)))?;
    Ok(indexed(kv.mod_revision, Json(spec)))
}

async fn put_one<T: Kind>(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(spec): JsonBody<T>) -> ApiResult<Response> {
    let key = key::<T>(&name)?;
    caller.require(T::RESOURCE, &name, Access::Write)?;
    let stored = spec.admit(&name)?;
    let value = serde_json::to_vec(&stored).expect("gateway resources serialize");
    let revision = zhili_store::put(&*s.store, &key, value).await?;
    Ok(indexed(revision, Json(super::Stored { name, index: revision })))
}

async fn delete_one<T: Kind>(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    let key = key::<T>(&name)?;
    caller.require(T::RESOURCE, &name, Access::Write)?;
    if s.store.get(&key)?.is_none() {
        return Err(ApiError::NotFound(format!("{} {name:?} not found", T::WHAT)));
    }
    let r = zhili_store::delete(&*s.store, &key).await?;
    Ok(indexed(r.revision, StatusCode::NO_CONTENT.into_response()))
}

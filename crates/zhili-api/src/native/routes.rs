//! The gateway's resources: routes (`/api/v1/routes[/{route}]`, stored under `routes/`) and
//! consumers (`/api/v1/consumers[/{consumer}]`, under `consumers/`, API keys only as digests).
//! Both lists block with `index`/`wait`, which is how gateways follow them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use zhili_model::acl::{Access, Resource};
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;
use zhili_routes::Stored;

use super::indexed;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryPairs};
use crate::AppState;

/// One kind of gateway resource as the API serves it (storage is zhili-routes').
trait Kind: Stored + Send + 'static {
    /// The list's key in `{index, <plural>: [{name, <what>}]}`.
    const PLURAL: &'static str;
    const RESOURCE: Resource;
    /// Checks `self` and returns the form to store.
    fn admit(self, name: &str) -> ApiResult<Self>;
}

impl Kind for RouteSpec {
    const PLURAL: &'static str = "routes";
    const RESOURCE: Resource = Resource::Route;
    fn admit(self, name: &str) -> ApiResult<Self> {
        // Compiling is the validation: whatever is stored, the gateway can run.
        zhili_gateway::compile(name, &self)?;
        Ok(self)
    }
}

impl Kind for ConsumerSpec {
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

async fn list<T: Kind>(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        zhili_routes::wait::<T>(&*s.store, index, wait).await;
    }
    let (index, all) = zhili_routes::load_all::<T>(&*s.store)?;
    let visible: Vec<_> =
        all.into_iter().filter(|(name, _)| caller.can(T::RESOURCE, name, Access::Read)).map(|(name, spec)| json!({"name": name, T::WHAT: spec})).collect();
    Ok(indexed(index, Json(json!({"index": index, T::PLURAL: visible}))))
}

async fn get_one<T: Kind>(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    zhili_model::validate::name(T::WHAT, &name)?;
    caller.require(T::RESOURCE, &name, Access::Read)?;
    let (revision, spec) = zhili_routes::get::<T>(&*s.store, &name)?.ok_or_else(|| ApiError::NotFound(format!("{} {name:?} not found", T::WHAT)))?;
    Ok(indexed(revision, Json(spec)))
}

async fn put_one<T: Kind>(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(spec): JsonBody<T>) -> ApiResult<Response> {
    zhili_model::validate::name(T::WHAT, &name)?;
    caller.require(T::RESOURCE, &name, Access::Write)?;
    let stored = spec.admit(&name)?;
    let revision = zhili_routes::put(&*s.store, &name, &stored).await?;
    Ok(indexed(revision, Json(super::Stored { name, index: revision })))
}

async fn delete_one<T: Kind>(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    zhili_model::validate::name(T::WHAT, &name)?;
    caller.require(T::RESOURCE, &name, Access::Write)?;
    let revision = zhili_routes::delete::<T>(&*s.store, &name).await?.ok_or_else(|| ApiError::NotFound(format!("{} {name:?} not found", T::WHAT)))?;
    Ok(indexed(revision, StatusCode::NO_CONTENT.into_response()))
}

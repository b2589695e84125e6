//! The native REST API, `/api/v1`.

mod acl;
mod events;
pub mod kv;
pub mod registry;
mod routes;
pub mod sd;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().merge(registry::routes()).merge(kv::routes()).merge(acl::routes()).merge(events::routes()).merge(sd::routes()).merge(routes::routes())
}

/// The answer to a write: the index it produced.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Written {
    pub index: u64,
}

/// The answer to a registration: the instance's id and the index it produced.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Registered {
    pub id: String,
    pub index: u64,
}

/// The answer to storing a named resource (a route, a consumer).
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Stored {
    pub name: String,
    pub index: u64,
}

/// Every read carries the index it reflects, for blocking reads to continue from.
pub(crate) fn indexed(index: u64, body: impl IntoResponse) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut().insert("x-zhili-index", HeaderValue::from(index));
    resp
}

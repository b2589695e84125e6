//! The native REST API, `/api/v1`.

mod acl;
mod events;
mod kv;
mod registry;
pub mod routes;
mod sd;

pub(crate) use kv::wait_kv;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().merge(registry::routes()).merge(kv::routes()).merge(acl::routes()).merge(events::routes()).merge(sd::routes()).merge(routes::routes())
}

/// Every read carries the index it reflects, for blocking reads to continue from.
pub(crate) fn indexed(index: u64, body: impl IntoResponse) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut().insert("x-zhili-index", HeaderValue::from(index));
    resp
}

//! The native REST API, `/api/v1`.

pub mod acl;
mod events;
pub mod kv;
mod plans;
pub mod registry;
mod routes;
pub mod sd;
pub mod streams;
mod subscriptions;
mod topology;
mod transactions;

use axum::Router;

use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(registry::routes())
        .merge(kv::routes())
        .merge(acl::routes())
        .merge(events::routes())
        .merge(sd::routes())
        .merge(routes::routes())
        .merge(subscriptions::routes())
        .merge(transactions::routes())
        .merge(plans::routes())
        .merge(topology::routes())
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

pub(crate) use zhili_http::indexed;

//! The native HTTP API of the API listener (`/api/v1`), the operational endpoints (`/metrics`,
//! `/health/*`, `/api/openapi.json`), and the assembly of the API listener: the other surfaces
//! served on the same port (Consul's `/v1`) are handed in as routers and share one authorization
//! layer and one problem+json fallback.

mod console;
pub mod native;
pub mod openapi;
mod ops;

use axum::Router;
pub use zhili_http::{auth, error, extract, AppState, Services, MAX_BODY};
pub use zhili_kv::KV_PREFIX;

/// The API listener's router, layers applied outermost-last:
/// - metrics: outermost, so it times everything including auth rejections;
/// - authorize: resolves the token once per request for every route, `others` included;
/// - audit: successful writes go to `$audit` with the caller's accessor id;
/// - body limits, per surface: before any handler reads a body.
pub fn router(state: AppState, others: impl IntoIterator<Item = Router>) -> Router {
    let own = zhili_http::limit_bodies(Router::new().merge(native::routes()).merge(ops::routes()).merge(console::routes()), MAX_BODY).with_state(state.clone());
    // Event batches are larger than any other body.
    let streams = zhili_http::limit_bodies(native::streams::routes(), zhili_model::event::MAX_BATCH_BYTES).with_state(state.clone());
    let app = others.into_iter().map(|r| zhili_http::limit_bodies(r, MAX_BODY)).fold(own.merge(streams), Router::merge).fallback(fallback);
    // One `layer` call for the three: axum boxes every route's future once per call.
    app.layer(
        tower::ServiceBuilder::new().layer(zhili_http::record_metrics(&state)).layer(auth::authorize(&state)).layer(zhili_http::audit_writes(&state, "api")),
    )
}

async fn fallback(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NotFound(format!("no route for {}", uri.path()))
}

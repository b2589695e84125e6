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

/// The API listener's router, layers applied outermost-last, all in one `Router::layer` call
/// (axum boxes every route's future and clones its service once per call and request):
/// - metrics: outermost, so it times everything including auth rejections;
/// - authorize: resolves the token once per request for every route, `others` included;
/// - audit: successful writes go to `$audit` with the caller's accessor id;
/// - body limits, before any handler reads a body: [`MAX_BODY`], event batches larger.
pub fn router(state: AppState, others: impl IntoIterator<Item = Router>) -> Router {
    let own = Router::new().merge(native::routes()).merge(ops::routes()).merge(console::routes()).merge(native::streams::routes()).with_state(state.clone());
    let app = others.into_iter().fold(own, Router::merge).fallback(fallback);
    app.layer(
        tower::ServiceBuilder::new()
            .layer(zhili_http::record_metrics(&state))
            .layer(auth::authorize(&state))
            .layer(zhili_http::audit_writes(&state, "api"))
            .layer(zhili_http::limit_bodies(MAX_BODY, Some((native::streams::ROUTES, zhili_model::event::MAX_BATCH_BYTES)))),
    )
}

async fn fallback(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NotFound(format!("no route for {}", uri.path()))
}

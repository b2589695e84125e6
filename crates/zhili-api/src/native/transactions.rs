//! Transactions of the DTM-compatible coordinator, the native way (`/api/v1/transactions`): the
//! list (by status, mode, after a gid), one with its branches, and force-stop. The same
//! `transaction` ACL rules as the DTM listener, by gid.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use zhili_model::acl::{Access, Resource};
use zhili_txn::{Coordinator, TxnError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryPairs;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/transactions", get(list))
        .route("/api/v1/transactions/{gid}", get(show))
        .route("/api/v1/transactions/{gid}/force-stop", post(force_stop))
}

fn coordinator(s: &AppState) -> ApiResult<&Arc<Coordinator>> {
    s.transactions.as_ref().ok_or_else(|| ApiError::NotFound("the transaction coordinator is off (--dtm-addr off)".into()))
}

fn txn_error(e: TxnError) -> ApiError {
    match e {
        TxnError::Failure(why) => ApiError::Conflict(why),
        TxnError::Invalid(v) => ApiError::BadRequest(v.to_string()),
        TxnError::NotFound(why) => ApiError::NotFound(why),
        e => ApiError::Internal(e.to_string()),
    }
}

/// `GET /api/v1/transactions?status=&mode=&after=&limit=` → `{"transactions", "next"}`.
async fn list(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    let c = coordinator(&s)?;
    let limit = q.u64("limit")?.map_or(100, |l| (l as usize).clamp(1, 1000));
    let (page, next) = c.all(q.get("after").unwrap_or(""), limit, q.get("status"), q.get("mode")).map_err(txn_error)?;
    let visible: Vec<_> = page.into_iter().filter(|t| caller.can(Resource::Transaction, &t.gid, Access::Read)).collect();
    Ok(Json(json!({"transactions": visible, "next": Some(next).filter(|n| !n.is_empty())})).into_response())
}

/// `GET /api/v1/transactions/{gid}` → `{"transaction", "branches"}`.
async fn show(State(s): State<AppState>, caller: Caller, Path(gid): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Transaction, &gid, Access::Read)?;
    let rec = coordinator(&s)?.query(&gid).await.map_err(txn_error)?.ok_or_else(|| ApiError::NotFound(format!("transaction {gid:?} not found")))?;
    Ok(Json(json!({"transaction": rec.trans, "branches": rec.branches})).into_response())
}

/// `POST /api/v1/transactions/{gid}/force-stop`: marks an unfinished transaction failed; nothing
/// more runs for it (no compensation either: use with care, as with DTM).
async fn force_stop(State(s): State<AppState>, caller: Caller, Path(gid): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Transaction, &gid, Access::Write)?;
    coordinator(&s)?.force_stop(&gid).await.map_err(txn_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

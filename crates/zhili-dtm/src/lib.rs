//! DTM's HTTP API under `/api/dtmsvr`, so DTM's SDKs (dtmcli for Python, Go, Java, ...) work
//! against Zhili by changing only the address: `newGid`, `prepare`, `submit`, `abort`,
//! `registerBranch` (and the legacy `registerTccBranch`/`registerXaBranch`), `query`, `all`,
//! `forceStop`, `subscribe`/`unsubscribe`/`topic/{name}`. Answers as DTM's: 200 with
//! `{"dtm_result": "SUCCESS"}`, 409 with `"FAILURE"` and a message when the transaction's state
//! refuses the request; bad input is 400 problem+json naming the field (with DTM's `message`).
//!
//! DTM clients send no token: with ACLs on, a request carries the rights of the token in
//! `Authorization: Bearer` or `X-Zhili-Token` if it has one, else the anonymous token's; the
//! `transaction` rules decide by gid (read for `query` and `all`, write for the rest).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use zhili_acl::Acl;
use zhili_http::extract::{JsonBody, QueryPairs};
use zhili_model::acl::{Access, Authority, Resource};
use zhili_txn::{Coordinator, TransRequest, TxnError};

/// Largest request body (a transaction's payloads are bounded below this).
const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct DtmState {
    pub coordinator: Arc<Coordinator>,
    pub acl: Arc<Acl>,
}

pub fn router(state: DtmState) -> Router {
    let routes = Router::new()
        .route("/api/dtmsvr/version", get(version))
        .route("/api/dtmsvr/newGid", get(new_gid))
        .route("/api/dtmsvr/prepare", post(prepare))
        .route("/api/dtmsvr/submit", post(submit))
        .route("/api/dtmsvr/abort", post(abort))
        .route("/api/dtmsvr/forceStop", post(force_stop))
        .route("/api/dtmsvr/registerBranch", post(register_branch))
        .route("/api/dtmsvr/registerTccBranch", post(register_branch))
        .route("/api/dtmsvr/registerXaBranch", post(register_branch))
        .route("/api/dtmsvr/query", get(query))
        .route("/api/dtmsvr/all", get(all))
        .route("/api/dtmsvr/subscribe", get(subscribe))
        .route("/api/dtmsvr/unsubscribe", get(unsubscribe))
        .route("/api/dtmsvr/topic/{name}", delete(delete_topic))
        .with_state(state);
    routes.layer(zhili_http::limit_bodies(MAX_BODY, None))
}

/// An answer in DTM's shapes.
struct Dtm(Result<Value, DtmError>);

enum DtmError {
    Txn(TxnError),
    Forbidden(String),
    Invalid(String),
}

impl From<TxnError> for DtmError {
    fn from(e: TxnError) -> Self {
        Self::Txn(e)
    }
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({"type": "about:blank", "title": status.canonical_reason().unwrap_or(""), "status": status.as_u16(), "detail": detail, "message": detail});
    (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

impl IntoResponse for Dtm {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(v) => Json(v).into_response(),
            Err(DtmError::Forbidden(why)) => problem(StatusCode::FORBIDDEN, &why),
            Err(DtmError::Invalid(why)) => problem(StatusCode::BAD_REQUEST, &why),
            Err(DtmError::Txn(e)) => match e {
                TxnError::Failure(why) => (StatusCode::CONFLICT, Json(json!({"dtm_result": "FAILURE", "message": why}))).into_response(),
                TxnError::Invalid(v) => problem(StatusCode::BAD_REQUEST, &v.to_string()),
                TxnError::NotFound(why) => problem(StatusCode::NOT_FOUND, &why),
                TxnError::Store(_) | TxnError::Corrupt(..) => {
                    tracing::error!(error = %e, "transaction coordinator failed");
                    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"message": e.to_string()}))).into_response()
                }
            },
        }
    }
}

fn success() -> Value {
    json!({"dtm_result": "SUCCESS"})
}

/// The caller's rights: the token in `Authorization: Bearer` or `X-Zhili-Token`, else anonymous.
fn authority(s: &DtmState, headers: &HeaderMap) -> Result<Authority, DtmError> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let token = bearer.or_else(|| headers.get("x-zhili-token").and_then(|v| v.to_str().ok())).filter(|t| !t.is_empty());
    s.acl.resolve(token).map_err(|_| DtmError::Forbidden("permission denied: unknown token".into()))
}

fn require(s: &DtmState, headers: &HeaderMap, gid: &str, access: Access) -> Result<(), DtmError> {
    if authority(s, headers)?.allows(Resource::Transaction, gid, access) {
        return Ok(());
    }
    let verb = if access == Access::Read { "read" } else { "write" };
    Err(DtmError::Forbidden(format!("permission denied: this token may not {verb} transaction {gid:?}")))
}

async fn version() -> Json<Value> {
    Json(json!({"version": format!("zhili-{}", env!("CARGO_PKG_VERSION"))}))
}

/// A random gid: handing one out touches nothing, so it needs no rights (using it does).
async fn new_gid(State(s): State<DtmState>) -> Dtm {
    Dtm(Ok(json!({"gid": s.coordinator.new_gid(), "dtm_result": "SUCCESS"})))
}

fn gid_of(req: &TransRequest) -> &str {
    req.gid.as_deref().unwrap_or("")
}

async fn prepare(State(s): State<DtmState>, headers: HeaderMap, JsonBody(req): JsonBody<TransRequest>) -> Dtm {
    Dtm(async {
        require(&s, &headers, gid_of(&req), Access::Write)?;
        s.coordinator.prepare(req).await?;
        Ok(success())
    }
    .await)
}

async fn submit(State(s): State<DtmState>, headers: HeaderMap, JsonBody(req): JsonBody<TransRequest>) -> Dtm {
    Dtm(async {
        require(&s, &headers, gid_of(&req), Access::Write)?;
        s.coordinator.submit(req).await?;
        Ok(success())
    }
    .await)
}

async fn abort(State(s): State<DtmState>, headers: HeaderMap, JsonBody(req): JsonBody<TransRequest>) -> Dtm {
    Dtm(async {
        require(&s, &headers, gid_of(&req), Access::Write)?;
        s.coordinator.abort(req).await?;
        Ok(success())
    }
    .await)
}

async fn force_stop(State(s): State<DtmState>, headers: HeaderMap, JsonBody(req): JsonBody<TransRequest>) -> Dtm {
    Dtm(async {
        require(&s, &headers, gid_of(&req), Access::Write)?;
        s.coordinator.force_stop(gid_of(&req)).await?;
        Ok(success())
    }
    .await)
}

async fn register_branch(State(s): State<DtmState>, headers: HeaderMap, JsonBody(data): JsonBody<BTreeMap<String, String>>) -> Dtm {
    Dtm(async {
        require(&s, &headers, data.get("gid").map(String::as_str).unwrap_or(""), Access::Write)?;
        s.coordinator.register_branch(&data).await?;
        Ok(success())
    }
    .await)
}

/// `query?gid=`: `{"transaction", "branches"}` (null and empty for an unknown gid, as DTM).
async fn query(State(s): State<DtmState>, headers: HeaderMap, q: QueryPairs) -> Dtm {
    Dtm(async {
        let gid = q.get("gid").unwrap_or("");
        if gid.is_empty() {
            return Err(DtmError::Invalid("gid: no gid specified".into()));
        }
        require(&s, &headers, gid, Access::Read)?;
        Ok(match s.coordinator.query(gid).await? {
            Some(rec) => json!({"transaction": rec.trans, "branches": rec.branches}),
            None => json!({"transaction": null, "branches": []}),
        })
    }
    .await)
}

/// `all?position=&limit=&status=&transType=`: transactions the caller may read, in gid order.
async fn all(State(s): State<DtmState>, headers: HeaderMap, q: QueryPairs) -> Dtm {
    Dtm(async {
        let authority = authority(&s, &headers)?;
        let limit = match q.get("limit") {
            Some(l) => l.parse::<usize>().ok().filter(|l| (1..=1000).contains(l)).ok_or_else(|| DtmError::Invalid("limit: 1 to 1000".into()))?,
            None => 100,
        };
        if let Some(gid) = q.get("gid").filter(|g| !g.is_empty()) {
            if !authority.allows(Resource::Transaction, gid, Access::Read) {
                return Err(DtmError::Forbidden(format!("permission denied: this token may not read transaction {gid:?}")));
            }
            let found: Vec<Value> = s.coordinator.query(gid).await?.map(|r| json!(r.trans)).into_iter().collect();
            return Ok(json!({"transactions": found, "next_position": ""}));
        }
        let (list, next) = s.coordinator.all(
            q.get("position").unwrap_or(""),
            limit,
            q.get("status").filter(|v| !v.is_empty()),
            q.get("transType").filter(|v| !v.is_empty()),
        )?;
        let visible: Vec<Value> = list.into_iter().filter(|t| authority.allows(Resource::Transaction, &t.gid, Access::Read)).map(|t| json!(t)).collect();
        Ok(json!({"transactions": visible, "next_position": next}))
    }
    .await)
}

/// Topics are shared by every transaction: managing them needs write on every gid ("").
async fn subscribe(State(s): State<DtmState>, headers: HeaderMap, q: QueryPairs) -> Dtm {
    Dtm(async {
        require(&s, &headers, "", Access::Write)?;
        s.coordinator.subscribe(q.get("topic").unwrap_or(""), q.get("url").unwrap_or(""), q.get("remark").unwrap_or("")).await?;
        Ok(success())
    }
    .await)
}

async fn unsubscribe(State(s): State<DtmState>, headers: HeaderMap, q: QueryPairs) -> Dtm {
    Dtm(async {
        require(&s, &headers, "", Access::Write)?;
        s.coordinator.unsubscribe(q.get("topic").unwrap_or(""), q.get("url").unwrap_or("")).await?;
        Ok(success())
    }
    .await)
}

async fn delete_topic(State(s): State<DtmState>, headers: HeaderMap, Path(name): Path<String>) -> Dtm {
    Dtm(async {
        require(&s, &headers, "", Access::Write)?;
        s.coordinator.delete_topic(&name).await?;
        Ok(success())
    }
    .await)
}

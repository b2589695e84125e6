//! Persistent subscriptions (`/api/v1/subscriptions`): consumer groups pulled over HTTP with
//! ack/nack, or pushed to a webhook. The logic is [`zhili_events::Subscriptions`]; this is its
//! HTTP face and its ACLs: `subscription` rules by name, plus read on the stream it follows.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use zhili_events::Nack;
use zhili_model::acl::{Access, Resource};
use zhili_model::subscription::SubscriptionSpec;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryPairs};
use crate::AppState;

/// Events one pull returns at most.
const MAX_PULL: usize = 1000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/subscriptions", get(list))
        .route("/api/v1/subscriptions/{name}", get(status).put(put).delete(delete))
        .route("/api/v1/subscriptions/{name}/next", get(next))
        .route("/api/v1/subscriptions/{name}/ack", post(ack))
        .route("/api/v1/subscriptions/{name}/nack", post(nack))
        .route("/api/v1/subscriptions/{name}/replay-parked", post(replay_parked))
}

fn named(caller: &Caller, name: &str, access: Access) -> ApiResult<()> {
    zhili_model::validate::name("name", name)?;
    caller.require(Resource::Subscription, name, access)
}

/// `PUT /api/v1/subscriptions/{name}` → 201, with `secret` (shown once) for a new webhook.
async fn put(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(spec): JsonBody<SubscriptionSpec>) -> ApiResult<Response> {
    named(&caller, &name, Access::Write)?;
    spec.validate()?;
    // Following a stream is reading it.
    super::streams::require(&s, &caller, &spec.stream, Access::Read)?;
    let secret = s.subscriptions.put(&name, spec).await?;
    let body = match secret {
        Some(secret) => json!({"name": name, "secret": secret}),
        None => json!({"name": name}),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn status(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    named(&caller, &name, Access::Read)?;
    Ok(Json(s.subscriptions.status(&name)?).into_response())
}

async fn list(State(s): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let visible: Vec<Value> = s
        .subscriptions
        .names()
        .into_iter()
        .filter(|n| caller.can(Resource::Subscription, n, Access::Read))
        .filter_map(|n| s.subscriptions.status(&n).ok())
        .map(|st| json!({"name": st.name, "stream": st.spec.stream, "checkpoint": st.checkpoint, "lag": st.lag, "in_flight": st.in_flight, "parked": st.parked, "disabled": st.disabled}))
        .collect();
    Ok(Json(json!({"subscriptions": visible})).into_response())
}

async fn delete(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    named(&caller, &name, Access::Write)?;
    s.subscriptions.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/subscriptions/{name}/next?max=N&wait=D`: a consumer's pull (long-poll).
async fn next(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    // Consuming moves the group's position: a write on the subscription; and it reads the
    // stream, so read on the stream is checked on every pull (a narrowed token stops here).
    named(&caller, &name, Access::Write)?;
    let spec = s.subscriptions.spec(&name)?;
    super::streams::require(&s, &caller, &spec.stream, Access::Read)?;
    let max = q.u64("max")?.map_or(1, |m| (m as usize).clamp(1, MAX_PULL));
    let wait = match q.get("wait") {
        Some(w) => zhili_model::parse_duration("wait", w)?.min(crate::extract::MAX_WAIT),
        None => Duration::ZERO,
    };
    let deliveries = s.subscriptions.next(&name, max, wait).await?;
    #[derive(serde::Serialize)]
    struct Shown<'a> {
        ack_id: &'a str,
        revision: u64,
        position: u64,
        stream: &'a str,
        deliveries: u32,
    }
    let mut out = super::streams::json_list("events", &deliveries, |out, d| {
        let head = Shown { ack_id: &d.ack_id, revision: d.number, position: d.position, stream: &d.stream, deliveries: d.deliveries };
        super::streams::push_with_event(out, &head, &d.body)
    });
    out.push(b'}');
    Ok(super::streams::json_response(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Acks {
    ack_ids: Vec<String>,
    #[serde(default)]
    action: Option<String>,
}

fn checked(a: &Acks) -> ApiResult<()> {
    if a.ack_ids.len() > MAX_PULL * 10 {
        return Err(ApiError::field("ack_ids", format!("at most {} per call", MAX_PULL * 10)));
    }
    Ok(())
}

async fn ack(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(a): JsonBody<Acks>) -> ApiResult<Response> {
    named(&caller, &name, Access::Write)?;
    checked(&a)?;
    if a.action.is_some() {
        return Err(ApiError::field("action", "only nack takes an action"));
    }
    let n = s.subscriptions.ack(&name, &a.ack_ids).await?;
    Ok(Json(json!({"acknowledged": n})).into_response())
}

async fn nack(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(a): JsonBody<Acks>) -> ApiResult<Response> {
    named(&caller, &name, Access::Write)?;
    checked(&a)?;
    let action = match a.action.as_deref() {
        None | Some("retry") => Nack::Retry,
        Some("park") => Nack::Park,
        Some("skip") => Nack::Skip,
        Some(other) => return Err(ApiError::field("action", format!("{other:?} is not retry, park or skip"))),
    };
    let n = s.subscriptions.nack(&name, &a.ack_ids, action).await?;
    Ok(Json(json!({"returned": n})).into_response())
}

async fn replay_parked(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    named(&caller, &name, Access::Write)?;
    let n = s.subscriptions.replay_parked(&name).await?;
    Ok(Json(json!({"replayed": n})).into_response())
}

//! Plans (`/api/v1/plans`): apply (validated in full against live state, refused when another
//! active plan touches the same route, service or key), read (definition, status, step, every
//! decision with its reason), pause, resume, abort, approve, delete. `plan` ACL rules by name.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use zhili_model::acl::{Access, Resource};
use zhili_model::plan::PlanSpec;
use zhili_plans::{Control, Plan, PlanError};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/plans", get(list))
        .route("/api/v1/plans/{name}", put(apply).get(show).delete(delete))
        .route("/api/v1/plans/{name}/{action}", post(control))
}

fn plan_error(e: PlanError) -> ApiError {
    match e {
        PlanError::Invalid(v) => v.into(),
        PlanError::Conflict(why) => ApiError::Conflict(why),
        PlanError::NotFound(name) => ApiError::NotFound(format!("plan {name:?} not found")),
        e => ApiError::Internal(e.to_string()),
    }
}

/// The definition and where the plan is, in the contract's shape.
pub fn view(p: &Plan) -> Value {
    let mut v = serde_json::to_value(&p.spec).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("name".into(), json!(p.name));
        o.insert("status".into(), json!(p.status));
        o.insert("step".into(), json!(p.step));
        o.insert("phase".into(), json!(p.phase));
        o.insert(
            "waiting_for_approval".into(),
            json!(p.applied && !p.approved && matches!(p.spec.steps.get(p.step), Some(zhili_model::plan::Step::Approve { .. }))),
        );
        o.insert("changes".into(), json!(p.undo));
        o.insert("history".into(), json!(p.history));
        o.insert("created".into(), json!(zhili_model::event::timestamp(p.created_ms)));
    }
    v
}

async fn apply(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(spec): JsonBody<PlanSpec>) -> ApiResult<Response> {
    caller.require(Resource::Plan, &name, Access::Write)?;
    let p = s.plans.apply(&name, spec).await.map_err(plan_error)?;
    Ok((StatusCode::CREATED, Json(view(&p))).into_response())
}

async fn list(State(s): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let all = s.plans.list().await.map_err(plan_error)?;
    let visible: Vec<Value> = all
        .iter()
        .filter(|p| caller.can(Resource::Plan, &p.name, Access::Read))
        .map(|p| json!({"name": p.name, "status": p.status, "step": p.step, "steps": p.spec.steps.len(), "description": p.spec.description}))
        .collect();
    Ok(Json(json!({"plans": visible})).into_response())
}

async fn show(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Plan, &name, Access::Read)?;
    let p = s.plans.get(&name).await.map_err(plan_error)?.ok_or_else(|| ApiError::NotFound(format!("plan {name:?} not found")))?;
    Ok(Json(view(&p)).into_response())
}

async fn delete(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Plan, &name, Access::Write)?;
    s.plans.delete(&name).await.map_err(plan_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/plans/{plan}/pause|resume|abort|approve`.
async fn control(State(s): State<AppState>, caller: Caller, Path((name, action)): Path<(String, String)>) -> ApiResult<Response> {
    let action = Control::parse(&action).ok_or_else(|| ApiError::NotFound(format!("no plan action {action:?} (pause, resume, abort, approve)")))?;
    caller.require(Resource::Plan, &name, Access::Write)?;
    let p = s.plans.control(&name, action).await.map_err(plan_error)?;
    Ok(Json(view(&p)).into_response())
}

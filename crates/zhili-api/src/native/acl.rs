//! ACL bootstrap, policies and tokens.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use zhili_model::acl::{Access, PolicySpec, Resource, Token, TokenSpec};
use zhili_model::validate;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/acl/bootstrap", post(bootstrap))
        .route("/api/v1/acl/policies", get(list_policies).post(create_policy))
        .route("/api/v1/acl/policies/{name}", get(get_policy).put(put_policy).delete(delete_policy))
        .route("/api/v1/acl/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/acl/tokens/{accessor}", get(get_token).delete(delete_token))
        .route("/api/v1/acl/token/self", get(token_self))
        .route("/api/v1/acl/authorize", post(authorize))
}

/// Secrets are shown only to callers who may write ACLs (as Consul does).
fn redact(mut t: Token, caller: &Caller) -> Token {
    if !caller.can(Resource::Acl, "", Access::Write) {
        t.secret_id = "<hidden>".into();
    }
    t
}

async fn bootstrap(State(s): State<AppState>) -> ApiResult<Response> {
    if !s.acl.enabled() {
        return Err(ApiError::Conflict("ACLs are disabled (--dev); there is nothing to bootstrap".into()));
    }
    Ok(Json(s.acl.bootstrap().await?).into_response())
}

async fn list_policies(State(s): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Read)?;
    Ok(Json(s.acl.policies()).into_response())
}

async fn create_policy(State(s): State<AppState>, caller: Caller, JsonBody(spec): JsonBody<PolicySpec>) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Write)?;
    s.acl.put_policy(spec.clone()).await?;
    Ok((StatusCode::CREATED, Json(spec)).into_response())
}

async fn get_policy(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Read)?;
    s.acl.policy(&name).map(|p| Json(p).into_response()).ok_or_else(|| ApiError::NotFound(format!("policy {name:?} not found")))
}

async fn put_policy(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, JsonBody(spec): JsonBody<PolicySpec>) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Write)?;
    validate::name("name", &name)?;
    if spec.name != name {
        return Err(ApiError::field("name", format!("{:?} does not match the path's {name:?}", spec.name)));
    }
    s.acl.put_policy(spec.clone()).await?;
    Ok(Json(spec).into_response())
}

async fn delete_policy(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Write)?;
    s.acl.delete_policy(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_tokens(State(s): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Read)?;
    Ok(Json(s.acl.tokens().into_iter().map(|t| redact(t, &caller)).collect::<Vec<_>>()).into_response())
}

async fn create_token(State(s): State<AppState>, caller: Caller, JsonBody(spec): JsonBody<TokenSpec>) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Write)?;
    Ok((StatusCode::CREATED, Json(s.acl.create_token(spec).await?)).into_response())
}

async fn get_token(State(s): State<AppState>, caller: Caller, Path(accessor): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Read)?;
    s.acl.token(&accessor).map(|t| Json(redact(t, &caller)).into_response()).ok_or_else(|| ApiError::NotFound(format!("token {accessor:?} not found")))
}

async fn delete_token(State(s): State<AppState>, caller: Caller, Path(accessor): Path<String>) -> ApiResult<Response> {
    caller.require(Resource::Acl, "", Access::Write)?;
    s.acl.delete_token(&accessor).await.map_err(|e| match e {
        zhili_acl::AclError::TokenNotFound => ApiError::NotFound(format!("token {accessor:?} not found")),
        e => e.into(),
    })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One question for `POST /api/v1/acl/authorize`: may the caller do `access` on `name`?
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeCheck {
    resource: Resource,
    #[serde(default)]
    name: String,
    access: Access,
}

/// The answer to one [`AuthorizeCheck`].
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct AuthorizeAnswer {
    resource: Resource,
    name: String,
    access: Access,
    allow: bool,
}

/// Most questions in one call.
const MAX_CHECKS: usize = 256;

/// What the caller's own token may do (as Consul's `/v1/internal/acl/authorize`): the console
/// asks before it offers a button. Answers only about the caller, so it needs no rights.
async fn authorize(caller: Caller, JsonBody(checks): JsonBody<Vec<AuthorizeCheck>>) -> ApiResult<Response> {
    if checks.len() > MAX_CHECKS {
        return Err(ApiError::field("body", format!("at most {MAX_CHECKS} checks")));
    }
    let answers: Vec<AuthorizeAnswer> = checks
        .into_iter()
        .map(|c| AuthorizeAnswer { allow: caller.can(c.resource, &c.name, c.access), resource: c.resource, name: c.name, access: c.access })
        .collect();
    Ok(Json(answers).into_response())
}

async fn token_self(State(s): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let secret = caller.token.as_deref().ok_or_else(|| ApiError::Unauthorized("no token given".into()))?;
    s.acl.token_by_secret(secret).map(|t| Json(t).into_response()).ok_or_else(|| ApiError::Forbidden("ACL token not found".into()))
}

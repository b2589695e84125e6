//! Services, instances, heartbeats, checks and maintenance.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use zhili_model::acl::{Access, Resource};
use zhili_model::report::{InstanceReport, ReportSpec};
use zhili_model::{validate, HealthStatus, InstanceList, InstanceSpec, ServiceSpec};
use zhili_registry::InstanceFilter;

use super::indexed;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryPairs};
use crate::AppState;

pub fn routes() -> axum::Router<AppState> {
    Router::new()
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/services", get(list_services))
        .route("/api/v1/services/{service}", put(put_service).get(get_service).delete(delete_service))
        .route("/api/v1/services/{service}/instances", get(list_instances).post(register))
        .route("/api/v1/services/{service}/instances/{id}", get(get_instance).delete(deregister))
        .route("/api/v1/services/{service}/instances/{id}/heartbeat", put(heartbeat))
        .route("/api/v1/services/{service}/instances/{id}/checks/{check}", put(update_check))
        .route("/api/v1/services/{service}/instances/{id}/maintenance", put(maintenance))
        .route("/api/v1/services/{service}/instances/{id}/passive", put(passive))
        .route("/api/v1/services/{service}/instances/{id}/report", put(report))
        .route("/api/v1/services/{service}/reports", get(reports))
        .route("/api/v1/services/{service}/breaker", put(breaker))
}

fn service_name(name: &str) -> ApiResult<()> {
    validate::name("service", name).map_err(Into::into)
}

async fn namespaces(State(s): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(Resource::Service, "", Access::Read)?;
    Ok(indexed(s.registry.index(), Json(s.registry.namespaces())))
}

async fn list_services(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    let ns = q.namespace()?;
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        s.registry.wait_for(index, wait, || s.registry.index()).await;
    }
    let (index, mut list) = s.registry.list_services(&ns);
    list.retain(|svc| caller.can(Resource::Service, &svc.name, Access::Read));
    Ok(indexed(index, Json(list)))
}

async fn put_service(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    q: QueryPairs,
    JsonBody(spec): JsonBody<ServiceSpec>,
) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    let svc = spec.validate(&q.namespace()?, &name)?;
    let index = s.registry.put_service(svc.clone()).await?;
    Ok(indexed(index, Json(svc)))
}

async fn get_service(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Read)?;
    let ns = q.namespace()?;
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        s.registry.wait_for(index, wait, || s.registry.service_index(&ns, &name)).await;
    }
    let detail = s.registry.service(&ns, &name).ok_or_else(|| ApiError::NotFound(format!("service {name:?} not found in namespace {ns:?}")))?;
    Ok(indexed(detail.index, Json(detail)))
}

async fn delete_service(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    let index = s.registry.delete_service(&q.namespace()?, &name).await?;
    Ok(indexed(index, StatusCode::NO_CONTENT))
}

async fn register(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    q: QueryPairs,
    JsonBody(spec): JsonBody<InstanceSpec>,
) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    let ns = q.namespace()?;
    let reg = spec.validate()?;
    let id = reg.id.clone();
    let index = s.registry.register(&ns, &name, reg).await?;
    Ok(indexed(index, (StatusCode::CREATED, Json(super::Registered { id, index }))))
}

async fn list_instances(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Read)?;
    let ns = q.namespace()?;
    let zone = q.get("zone").map(str::to_string);
    if let Some(z) = &zone {
        validate::name("zone", z)?;
    }
    let filter =
        InstanceFilter { healthy_only: q.flag("healthy")?.unwrap_or(true), tags: q.all("tag").map(str::to_string).collect(), metadata: q.metadata(), zone };
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        s.registry.wait_for(index, wait, || s.registry.service_index(&ns, &name)).await;
    }
    let render = |list: &InstanceList| axum::body::Bytes::from(serde_json::to_vec(list).unwrap_or_default());
    let (index, body) = s.registry.instances_rendered(&ns, &name, &filter, render).unwrap_or_else(|| {
        // Unknown service: an empty answer that can still be watched for its first instance.
        let index = s.registry.service_index(&ns, &name);
        (index, render(&InstanceList { namespace: ns.clone(), service: name.clone(), index, protection_triggered: false, instances: vec![] }))
    });
    Ok(indexed(index, ([(axum::http::header::CONTENT_TYPE, "application/json")], body)))
}

async fn get_instance(State(s): State<AppState>, caller: Caller, Path((name, id)): Path<(String, String)>, q: QueryPairs) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Read)?;
    let ns = q.namespace()?;
    let inst = s.registry.instance(&ns, &name, &id).ok_or_else(|| ApiError::NotFound(format!("instance {id:?} of service {name:?} not found")))?;
    Ok(indexed(inst.modify_index, Json(inst)))
}

async fn deregister(State(s): State<AppState>, caller: Caller, Path((name, id)): Path<(String, String)>, q: QueryPairs) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    let index = s.registry.deregister(&q.namespace()?, &name, &id).await?;
    Ok(indexed(index, StatusCode::NO_CONTENT))
}

async fn heartbeat(State(s): State<AppState>, caller: Caller, Path((name, id)): Path<(String, String)>, q: QueryPairs) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    s.registry.heartbeat(&q.namespace()?, &name, &id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckUpdate {
    status: String,
    #[serde(default)]
    output: String,
}

async fn update_check(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, id, check)): Path<(String, String, String)>,
    q: QueryPairs,
    JsonBody(body): JsonBody<CheckUpdate>,
) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    let status = HealthStatus::parse("status", &body.status)?;
    if body.output.len() > 4096 {
        return Err(ApiError::field("output", "must be at most 4096 bytes"));
    }
    let index = s.registry.update_ttl_check(&q.namespace()?, &name, &id, &check, status, &body.output)?;
    Ok(indexed(index, StatusCode::NO_CONTENT))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceBody {
    enabled: bool,
    #[serde(default)]
    reason: String,
}

async fn maintenance(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    q: QueryPairs,
    JsonBody(body): JsonBody<MaintenanceBody>,
) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    validate::text("reason", &body.reason)?;
    let index = s.registry.set_maintenance(&q.namespace()?, &name, &id, body.enabled, &body.reason).await?;
    Ok(indexed(index, StatusCode::NO_CONTENT))
}

/// An instance reports its own state, tasks and planned work (`report` write on the service).
async fn report(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    q: QueryPairs,
    JsonBody(spec): JsonBody<ReportSpec>,
) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Report, &name, Access::Write)?;
    spec.validate()?;
    let index = s.registry.set_report(&q.namespace()?, &name, &id, spec).await?;
    Ok(indexed(index, StatusCode::NO_CONTENT))
}

/// The reports of a service's instances (`report` read), with blocking reads (`index`, `wait`).
async fn reports(State(s): State<AppState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Report, &name, Access::Read)?;
    let ns = q.namespace()?;
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        s.registry.wait_for(index, wait, || s.registry.service_index(&ns, &name)).await;
    }
    let all = InstanceFilter { healthy_only: false, ..Default::default() };
    let list = s.registry.instances(&ns, &name, &all);
    let index = list.as_ref().map_or_else(|| s.registry.service_index(&ns, &name), |l| l.index);
    let reports: Vec<InstanceReportView> = list
        .into_iter()
        .flat_map(|l| l.instances)
        .filter_map(|i| Some(InstanceReportView { report: i.report?, id: i.id, health: i.health, version: i.version, zone: i.zone }))
        .collect();
    Ok(indexed(index, Json(ReportList { namespace: ns, service: name, index, reports })))
}

#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct ReportList {
    namespace: String,
    service: String,
    index: u64,
    reports: Vec<InstanceReportView>,
}

#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct InstanceReportView {
    id: String,
    health: HealthStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    report: InstanceReport,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PassiveBody {
    ejected_for: String,
    #[serde(default)]
    reason: String,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerBody {
    state: String,
    #[serde(default)]
    reason: String,
}

/// A gateway reports a circuit-breaker transition; shown with the service.
async fn breaker(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    q: QueryPairs,
    JsonBody(body): JsonBody<BreakerBody>,
) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    if !["open", "half_open", "closed"].contains(&body.state.as_str()) {
        return Err(zhili_model::ValidationError::new("state", format!("{:?} is not open, half_open or closed", body.state)).into());
    }
    validate::text("reason", &body.reason)?;
    let ns = q.namespace()?;
    s.registry.report_breaker(&ns, &name, &body.state, &body.reason)?;
    zhili_events::publish_gateway(&*s.events, &ns, &name, zhili_events::GatewayChange::Breaker(&body.state), &body.reason)
        .await
        .map_err(super::streams::log_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A gateway reports an outlier ejection; shown on the instance, not acted on by discovery.
async fn passive(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    q: QueryPairs,
    JsonBody(body): JsonBody<PassiveBody>,
) -> ApiResult<Response> {
    service_name(&name)?;
    caller.require(Resource::Service, &name, Access::Write)?;
    validate::text("reason", &body.reason)?;
    let d = zhili_model::parse_duration("ejected_for", &body.ejected_for)?;
    let ns = q.namespace()?;
    let index = s.registry.report_passive(&ns, &name, &id, d, &body.reason)?;
    let change = zhili_events::GatewayChange::Ejected { instance: &id, for_: d };
    zhili_events::publish_gateway(&*s.events, &ns, &name, change, &body.reason).await.map_err(super::streams::log_error)?;
    Ok(indexed(index, StatusCode::NO_CONTENT))
}

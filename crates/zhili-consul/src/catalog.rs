//! `/v1/catalog/*`, `/v1/health/*` and `/v1/status/*`: the cluster-wide views, with blocking
//! queries on the registry index (per service where the query names one).

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use zhili_model::acl::{Access, Resource};
use zhili_model::{Instance, NodeRef};

use super::agent::{apply, convert};
use super::{aggregate, apply_filter, bad, boolean, canon, check_dc, checks_json, decode, namespace, node_json, node_meta_filter, node_of, object, reply};
use super::{at, serf_check, service_json, take, weights, CResult};
use crate::ConsulState;
use zhili_http::auth::Caller;
use zhili_http::error::ApiError;
use zhili_http::extract::QueryPairs;

pub fn routes() -> Router<ConsulState> {
    Router::new()
        .route("/v1/catalog/register", put(register))
        .route("/v1/catalog/deregister", put(deregister))
        .route("/v1/catalog/datacenters", get(datacenters))
        .route("/v1/catalog/services", get(services))
        .route("/v1/catalog/service/{name}", get(service))
        .route("/v1/catalog/nodes", get(nodes))
        .route("/v1/catalog/node/{node}", get(node))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/health/checks/{name}", get(health_checks))
        .route("/v1/health/state/{state}", get(health_state))
        .route("/v1/health/node/{node}", get(health_node))
        .route("/v1/status/leader", get(leader))
        .route("/v1/status/peers", get(peers))
}

/// Waits for a blocking query, on one service's index or the whole registry's.
async fn block(s: &ConsulState, q: &QueryPairs, ns: &str, service: Option<&str>) -> CResult<()> {
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        match service {
            Some(name) => s.registry.wait_for(index, wait, || s.registry.service_index(ns, name)).await,
            None => s.registry.wait_for(index, wait, || s.registry.index()).await,
        }
    }
    Ok(())
}

fn readable(caller: &Caller, list: Vec<Instance>) -> Vec<Instance> {
    list.into_iter().filter(|i| caller.can(Resource::Service, &i.service, Access::Read)).collect()
}

/// Instances of one service, all of them (Consul's health endpoint filters by check status,
/// not by the registry's serving rules), after `tag` filters.
fn service_instances(s: &ConsulState, q: &QueryPairs, ns: &str, name: &str) -> CResult<(u64, Vec<Instance>)> {
    let index = s.registry.service_index(ns, name);
    // Nodes carry no metadata here, so any node-meta filter matches nothing.
    if !node_meta_filter(q)?.is_empty() {
        return Ok((index, Vec::new()));
    }
    let Some(detail) = s.registry.service(ns, name) else { return Ok((index, Vec::new())) };
    let tags: Vec<&str> = q.all("tag").collect();
    let mut list: Vec<Instance> = detail.instances.into_iter().filter(|i| tags.iter().all(|t| i.tags.iter().any(|x| x == t))).collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((index, list))
}

async fn register(State(s): State<ConsulState>, caller: Caller, q: QueryPairs, body: Bytes) -> CResult<Response> {
    let ns = namespace(&q)?;
    let mut v = decode(&body)?;
    canon(&mut v, &["Node", "Address", "Datacenter", "Service", "Check", "Checks", "NodeMeta", "TaggedAddresses", "SkipNodeUpdate", "ID"]);
    let node = at(&v, "Node").as_str().filter(|n| !n.is_empty()).ok_or_else(|| bad("Node", "Must provide node"))?.to_string();
    zhili_model::validate::name("Node", &node)?;
    let address = at(&v, "Address").as_str().filter(|a| !a.is_empty()).ok_or_else(|| bad("Address", "Must provide address"))?.to_string();
    zhili_model::validate::address("Address", &address)?;
    let mut svc = take(&mut v, "Service");
    if svc.is_null() {
        return Err(bad("Service", "registering a node without a service is not supported; nodes exist through their services"));
    }
    // Node-level checks have no place in this model; service checks move into the service.
    let mut checks: Vec<Value> = Vec::new();
    if !at(&v, "Check").is_null() {
        checks.push(take(&mut v, "Check"));
    }
    if let Value::Array(cs) = take(&mut v, "Checks") {
        checks.extend(cs);
    }
    for c in &mut checks {
        canon(c, &["ServiceID", "CheckID"]);
    }
    if let Some(c) = checks.iter().find(|c| at(c, "ServiceID").as_str().is_none_or(str::is_empty)) {
        return Err(bad("Checks", format!("node-level check {} is not supported; give it a ServiceID", at(c, "CheckID"))));
    }
    if let Value::Object(m) = &mut svc {
        m.remove("Check");
        m.insert("Checks".into(), Value::Array(checks));
    }
    let c = convert(svc, NodeRef { name: node, address }, true)?;
    apply(&s, &caller, &ns, c).await?;
    Ok(boolean(true))
}

async fn deregister(State(s): State<ConsulState>, caller: Caller, q: QueryPairs, body: Bytes) -> CResult<Response> {
    let ns = namespace(&q)?;
    let mut v = decode(&body)?;
    canon(&mut v, &["Node", "ServiceID", "CheckID", "Datacenter"]);
    let node = at(&v, "Node").as_str().filter(|n| !n.is_empty()).ok_or_else(|| bad("Node", "Must provide node"))?.to_string();
    let on_node = |i: &Instance| node_of(&s, i).name == node;
    let targets: Vec<Instance> = match at(&v, "ServiceID").as_str().filter(|x| !x.is_empty()) {
        Some(id) => s.registry.find_instances(&ns, id).into_iter().filter(on_node).collect(),
        None if !at(&v, "CheckID").is_null() => return Err(bad("CheckID", "deregistering a single check is not supported; re-register the service")),
        None => s.registry.all_instances(Some(&ns)).1.into_iter().filter(on_node).collect(),
    };
    if targets.is_empty() && at(&v, "ServiceID").as_str().is_some_and(|x| !x.is_empty()) {
        // Nothing to remove: say so only to a caller who may write every service, so that the
        // answer does not tell others which ids exist.
        caller.require_all(Resource::Service, "", Access::Write)?;
    }
    for i in &targets {
        caller.require(Resource::Service, &i.service, Access::Write)?;
    }
    for i in targets {
        match s.registry.deregister(&ns, &i.service, &i.id).await {
            Ok(_) | Err(zhili_registry::RegistryError::InstanceNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(boolean(true))
}

async fn datacenters(State(s): State<ConsulState>) -> Response {
    Json(vec![s.consul.datacenter.clone()]).into_response()
}

async fn services(State(s): State<ConsulState>, caller: Caller, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let ns = namespace(&q)?;
    block(&s, &q, &ns, None).await?;
    let nm = node_meta_filter(&q)?;
    let (index, all) = s.registry.all_instances(Some(&ns));
    let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if nm.is_empty() {
        for i in readable(&caller, all) {
            tags.entry(i.service).or_default().extend(i.tags);
        }
    }
    Ok(reply(index, Json(tags)))
}

/// The flat record `/v1/catalog/service/:name` returns per instance: the node's fields (its
/// `Meta` named `NodeMeta`) followed by the service's, prefixed `Service`.
fn catalog_entry(s: &ConsulState, i: &Instance) -> Value {
    let mut entry = node_json(s, &node_of(s, i));
    let service = json!({
        "ServiceKind": "",
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
        "ServiceAddress": i.address,
        "ServiceWeights": weights(i),
        "ServiceMeta": i.metadata,
        "ServicePort": i.port,
        "ServiceEnableTagOverride": false,
        "Namespace": i.namespace,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    });
    if let (Some(out), Value::Object(fields)) = (entry.as_object_mut(), service) {
        let node_meta = out.remove("Meta").unwrap_or_else(|| json!({}));
        out.insert("NodeMeta".into(), node_meta);
        out.extend(fields);
    }
    entry
}

async fn service(State(s): State<ConsulState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let ns = namespace(&q)?;
    caller.require(Resource::Service, &name, Access::Read)?;
    block(&s, &q, &ns, Some(&name)).await?;
    let (index, list) = service_instances(&s, &q, &ns, &name)?;
    let out = apply_filter(&q, list.iter().map(|i| catalog_entry(&s, i)).collect())?;
    Ok(reply(index, Json(out)))
}

/// Every node: this server's own, plus those named by catalog registrations.
fn all_nodes(s: &ConsulState, instances: &[Instance]) -> Vec<NodeRef> {
    let mut nodes: BTreeMap<String, NodeRef> = BTreeMap::new();
    nodes.insert(s.consul.node.clone(), s.consul.node_ref());
    for i in instances {
        let n = node_of(s, i);
        nodes.entry(n.name.clone()).or_insert(n);
    }
    nodes.into_values().collect()
}

async fn nodes(State(s): State<ConsulState>, caller: Caller, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let ns = namespace(&q)?;
    block(&s, &q, &ns, None).await?;
    let (index, all) = s.registry.all_instances(Some(&ns));
    let mut nodes = if node_meta_filter(&q)?.is_empty() { all_nodes(&s, &all) } else { Vec::new() };
    nodes.retain(|n| caller.can(Resource::Node, &n.name, Access::Read));
    let out = apply_filter(&q, nodes.iter().map(|n| node_json(&s, n)).collect())?;
    Ok(reply(index, Json(out)))
}

async fn node(State(s): State<ConsulState>, caller: Caller, Path(node): Path<String>, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let ns = namespace(&q)?;
    // Refused whether or not the node exists, so node names cannot be probed.
    caller.require(Resource::Node, &node, Access::Read)?;
    block(&s, &q, &ns, None).await?;
    let (index, all) = s.registry.all_instances(Some(&ns));
    let Some(n) = all_nodes(&s, &all).into_iter().find(|n| n.name == node) else {
        return Ok(reply(index, Json(Value::Null)));
    };
    let services = readable(&caller, all).into_iter().filter(|i| node_of(&s, i).name == node).map(|i| (i.id.clone(), service_json(&s, &i)));
    Ok(reply(index, Json(json!({ "Node": node_json(&s, &n), "Services": object(services) }))))
}

async fn health_service(State(s): State<ConsulState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let ns = namespace(&q)?;
    caller.require(Resource::Service, &name, Access::Read)?;
    let passing = q.flag("passing")?.unwrap_or(false);
    block(&s, &q, &ns, Some(&name)).await?;
    // Unfiltered answers are cached per service index (the index covers every field shown).
    let cacheable = q.get("tag").is_none() && q.get("node-meta").is_none() && q.get("filter").is_none_or(|f| f.trim().is_empty());
    let key = (ns.clone(), name.clone(), passing);
    if cacheable {
        let index = s.registry.service_index(&ns, &name);
        if let Some(body) = s.consul_health.get(&key, index) {
            return Ok(reply(index, ([(header::CONTENT_TYPE, "application/json")], body)));
        }
    }
    let (index, list) = service_instances(&s, &q, &ns, &name)?;
    let mut out = Vec::with_capacity(list.len());
    for i in &list {
        let checks = checks_json(&s, i);
        if passing && aggregate(&checks) != "passing" {
            continue;
        }
        out.push(json!({ "Node": node_json(&s, &node_of(&s, i)), "Service": service_json(&s, i), "Checks": checks }));
    }
    let body = bytes::Bytes::from(serde_json::to_vec(&apply_filter(&q, out)?).map_err(|e| ApiError::Internal(e.to_string()))?);
    if cacheable {
        s.consul_health.put(key, index, body.clone());
    }
    Ok(reply(index, ([(header::CONTENT_TYPE, "application/json")], body)))
}

async fn health_checks(State(s): State<ConsulState>, caller: Caller, Path(name): Path<String>, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let ns = namespace(&q)?;
    caller.require(Resource::Service, &name, Access::Read)?;
    block(&s, &q, &ns, Some(&name)).await?;
    let (index, list) = service_instances(&s, &q, &ns, &name)?;
    let checks: Vec<Value> = list.iter().flat_map(|i| checks_json(&s, i).into_iter().skip(1)).collect();
    Ok(reply(index, Json(apply_filter(&q, checks)?)))
}

async fn health_state(State(s): State<ConsulState>, caller: Caller, Path(state): Path<String>, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    if !matches!(state.as_str(), "any" | "passing" | "warning" | "critical") {
        return Err(bad("state", format!("{state:?} is not any, passing, warning or critical")));
    }
    let ns = namespace(&q)?;
    block(&s, &q, &ns, None).await?;
    let (index, all) = s.registry.all_instances(Some(&ns));
    let mut checks: Vec<Value> = Vec::new();
    // Each node's serfHealth once, then every service check.
    for n in all_nodes(&s, &all).into_iter().filter(|n| caller.can(Resource::Node, &n.name, Access::Read)) {
        checks.push(serf_check(&n.name));
    }
    for i in readable(&caller, all) {
        checks.extend(checks_json(&s, &i).into_iter().skip(1));
    }
    checks.retain(|c| state == "any" || at(c, "Status") == state.as_str());
    Ok(reply(index, Json(apply_filter(&q, checks)?)))
}

async fn health_node(State(s): State<ConsulState>, caller: Caller, Path(node): Path<String>, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let ns = namespace(&q)?;
    caller.require(Resource::Node, &node, Access::Read)?;
    block(&s, &q, &ns, None).await?;
    let (index, all) = s.registry.all_instances(Some(&ns));
    let mine: Vec<Instance> = readable(&caller, all).into_iter().filter(|i| node_of(&s, i).name == node).collect();
    let mut checks: Vec<Value> = Vec::new();
    for (n, i) in mine.iter().enumerate() {
        checks.extend(checks_json(&s, i).into_iter().skip(usize::from(n > 0)));
    }
    if checks.is_empty() && node == s.consul.node {
        checks.push(serf_check(&node));
    }
    Ok(reply(index, Json(apply_filter(&q, checks)?)))
}

/// Consul's Raft address of the leader; this server is the only (and so leading) one.
fn raft_addr(s: &ConsulState) -> String {
    format!("{}:8300", s.consul.address)
}

async fn leader(State(s): State<ConsulState>) -> Response {
    Json(raft_addr(&s)).into_response()
}

async fn peers(State(s): State<ConsulState>) -> Response {
    Json(vec![raft_addr(&s)]).into_response()
}

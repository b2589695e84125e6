//! Consul's HTTP API (`/v1`) over the same registry, KV store and ACLs as the native API, with
//! Consul's field names, status codes and blocking queries, so Consul clients work unchanged.
//!
//! Mapping: this server is one Consul node (`node_name`, default `zhili`) in one datacenter.
//! A Consul service instance is a registry instance in namespace `default` (or `?ns=`); services
//! registered through the agent API are persistent (the agent keeps them, as Consul does) and
//! checked by the health engine. Instances registered through other APIs appear with one check
//! per registry check plus synthetic ones for what Consul has no field for: heartbeat expiry,
//! maintenance (`_service_maintenance:<id>`, as Consul names it) and `enabled=false`.

mod agent;
mod catalog;
pub mod filter;
mod kv;

use std::collections::BTreeMap;

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Map, Value};
use zhili_model::{HealthStatus, Instance, NodeRef, DEFAULT_NAMESPACE};

use zhili_http::error::ApiError;
use zhili_http::extract::QueryPairs;
use zhili_http::AppState;

/// Who this server is to Consul clients.
#[derive(Debug, Clone)]
pub struct ConsulIdentity {
    pub node: String,
    pub datacenter: String,
    /// The node's address (the API listener's IP).
    pub address: String,
}

/// Rendered `/v1/health/service/:name` answers of the unfiltered queries, per service index:
/// the hot read of Consul clients and Prometheus, served without re-rendering JSON.
pub type HealthCache = zhili_http::rendered::RenderCache<HealthKey>;

/// (namespace, service, passing only).
type HealthKey = (String, String, bool);

impl ConsulIdentity {
    fn node_ref(&self) -> NodeRef {
        NodeRef { name: self.node.clone(), address: self.address.clone() }
    }
}

/// What Consul handlers see: the shared services plus who this node is and the rendered-answer
/// cache. Field access reaches the shared [`zhili_http::Services`] through `Deref`.
#[derive(Clone)]
pub struct ConsulState(std::sync::Arc<Consul>);

pub struct Consul {
    core: AppState,
    pub consul: ConsulIdentity,
    pub consul_health: HealthCache,
}

impl std::ops::Deref for ConsulState {
    type Target = Consul;
    fn deref(&self) -> &Consul {
        &self.0
    }
}

impl std::ops::Deref for Consul {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.core
    }
}

/// Consul's `/v1` routes, with their state; the API listener merges them under its one
/// authorization layer (Consul clients share the API port, as they would a Consul agent's).
pub fn router(core: AppState, identity: ConsulIdentity) -> Router {
    let state = ConsulState(std::sync::Arc::new(Consul { core, consul: identity, consul_health: HealthCache::default() }));
    Router::new().merge(agent::routes()).merge(catalog::routes()).merge(kv::routes()).with_state(state)
}

/// Errors on `/v1` are plain text, as Consul answers them; the status codes are Consul's.
#[derive(Debug)]
pub struct ConsulError(pub ApiError);

impl IntoResponse for ConsulError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self.0 {
            tracing::error!(%cause, "consul request failed");
        }
        (self.0.status(), [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.0.detail().to_string()).into_response()
    }
}

macro_rules! into_consul_error {
    ($($t:ty),*) => {$(
        impl From<$t> for ConsulError {
            fn from(e: $t) -> Self {
                Self(e.into())
            }
        }
    )*};
}
into_consul_error!(ApiError, zhili_model::ValidationError, zhili_registry::RegistryError, zhili_kv::KvError, zhili_store::StoreError);

pub type CResult<T> = Result<T, ConsulError>;

fn bad(field: &str, message: impl std::fmt::Display) -> ConsulError {
    ConsulError(ApiError::field(field, message))
}

/// Consul's read headers: the index (never 0, which clients treat as "no blocking"), and the
/// leader-contact headers clients check for consistency.
pub(crate) fn reply(index: u64, body: impl IntoResponse) -> Response {
    // Names made at compile time: a name given as a string is parsed again on every insert.
    static INDEX: HeaderName = HeaderName::from_static("x-consul-index");
    static KNOWN_LEADER: HeaderName = HeaderName::from_static("x-consul-knownleader");
    static LAST_CONTACT: HeaderName = HeaderName::from_static("x-consul-lastcontact");
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(INDEX.clone(), HeaderValue::from(index.max(1)));
    h.insert(KNOWN_LEADER.clone(), HeaderValue::from_static("true"));
    h.insert(LAST_CONTACT.clone(), HeaderValue::from_static("0"));
    resp
}

/// Consul's write answers: a JSON `true` or `false`.
fn boolean(ok: bool) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], if ok { "true" } else { "false" }).into_response()
}

/// The registry namespace a Consul request addresses (`?ns=`, Consul Enterprise's parameter).
fn namespace(q: &QueryPairs) -> CResult<String> {
    let ns = q.get("ns").filter(|s| !s.is_empty()).unwrap_or(DEFAULT_NAMESPACE);
    zhili_model::validate::name("ns", ns)?;
    Ok(ns.to_string())
}

/// `?dc=` must name our datacenter when given.
fn check_dc(s: &ConsulState, q: &QueryPairs) -> CResult<()> {
    match q.get("dc") {
        Some(dc) if !dc.is_empty() && dc != s.consul.datacenter => Err(ConsulError(ApiError::NotFound(format!("No path to datacenter {dc:?}")))),
        _ => Ok(()),
    }
}

/// Parses a JSON body that must be an object. Handlers then rename keys to Consul's canonical
/// spelling ([`canon`]) and read fields by name: reading a missing field of an object gives
/// `null`, and only objects are ever written into, so no body shape can panic a handler.
fn decode(bytes: &[u8]) -> CResult<Value> {
    match decode_any(bytes)? {
        v @ Value::Object(_) => Ok(v),
        _ => Err(bad("body", "must be a JSON object")),
    }
}

/// Parses a JSON body of any shape (the transaction endpoint takes a list).
fn decode_any(bytes: &[u8]) -> CResult<Value> {
    if bytes.is_empty() {
        return Err(bad("body", "a JSON object is required"));
    }
    serde_json::from_slice(bytes).map_err(|e| ConsulError(ApiError::BadRequest(format!("Request decode failed: {e}"))))
}

/// A field of a JSON object, or null: reading a body this way never panics, whatever its shape.
fn at<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&Value::Null)
}

/// Takes a field out of a JSON object (null when absent, or when `v` is not an object).
fn take(v: &mut Value, key: &str) -> Value {
    v.as_object_mut().and_then(|m| m.remove(key)).unwrap_or(Value::Null)
}

/// Sets a field of a JSON object; does nothing to other values.
fn set(v: &mut Value, key: &str, x: Value) {
    if let Some(m) = v.as_object_mut() {
        m.insert(key.to_string(), x);
    }
}

/// Renames keys of `v` (an object) that match one of `names` ignoring case and underscores.
fn canon(v: &mut Value, names: &[&str]) {
    let Value::Object(m) = v else { return };
    let fold = |s: &str| s.to_ascii_lowercase().replace('_', "");
    let renames: Vec<(String, &str)> =
        m.keys().filter_map(|k| names.iter().find(|n| fold(n) == fold(k) && **n != k.as_str()).map(|n| (k.clone(), *n))).collect();
    for (from, to) in renames {
        if let Some(x) = m.remove(&from) {
            m.insert(to.to_string(), x);
        }
    }
}

fn tagged(address: &str) -> Value {
    json!({ "lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address })
}

/// The node an instance lives on.
fn node_of(s: &ConsulState, i: &Instance) -> NodeRef {
    i.node.clone().unwrap_or_else(|| s.consul.node_ref())
}

fn node_json(s: &ConsulState, node: &NodeRef) -> Value {
    json!({
        "ID": "",
        "Node": node.name,
        "Address": node.address,
        "Datacenter": s.consul.datacenter,
        "TaggedAddresses": tagged(&node.address),
        "Meta": {},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    })
}

fn weights(i: &Instance) -> Value {
    json!({ "Passing": i.weight, "Warning": 1 })
}

/// A service instance as the agent and health endpoints show it.
fn service_json(s: &ConsulState, i: &Instance) -> Value {
    json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": i.tags,
        "Address": i.address,
        "TaggedAddresses": { "lan_ipv4": { "Address": i.address, "Port": i.port }, "wan_ipv4": { "Address": i.address, "Port": i.port } },
        "Meta": i.metadata,
        "Port": i.port,
        "Weights": weights(i),
        "EnableTagOverride": false,
        "Datacenter": s.consul.datacenter,
        "Namespace": i.namespace,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

/// The instance's checks in Consul's shape, synthetic ones included, so that "every check
/// passing" means exactly "the registry would serve this instance".
fn checks_json(s: &ConsulState, i: &Instance) -> Vec<Value> {
    let node = node_of(s, i);
    let check = |id: &str, name: &str, status: &str, notes: &str, output: &str, kind: &str, service: bool| {
        json!({
            "Node": node.name,
            "CheckID": id,
            "Name": name,
            "Status": status,
            "Notes": notes,
            "Output": output,
            "ServiceID": if service { i.id.as_str() } else { "" },
            "ServiceName": if service { i.service.as_str() } else { "" },
            "ServiceTags": if service { i.tags.clone() } else { Vec::new() },
            "Type": kind,
            "Namespace": i.namespace,
            "CreateIndex": i.create_index,
            "ModifyIndex": i.modify_index,
        })
    };
    let mut out = vec![serf_check(&node.name)];
    for c in &i.checks {
        out.push(check(&c.id, &c.name, c.status.as_str(), "", &c.output, &c.kind, true));
    }
    let worst_check = i.checks.iter().map(|c| c.status).max().unwrap_or(HealthStatus::Passing);
    if i.health > worst_check {
        out.push(check(&format!("zhili:heartbeat:{}", i.id), "Heartbeat", i.health.as_str(), "", "heartbeats stopped arriving", "ttl", true));
    }
    if let Some(m) = &i.maintenance {
        out.push(check(&format!("_service_maintenance:{}", i.id), "Service Maintenance Mode", "critical", &m.reason, "", "maintenance", true));
    }
    if !i.enabled {
        out.push(check(&format!("zhili:disabled:{}", i.id), "Instance disabled", "critical", "", "the instance is disabled", "", true));
    }
    out
}

/// The node-level check Consul agents report; nodes here are always alive.
fn serf_check(node: &str) -> Value {
    json!({
        "Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing", "Notes": "",
        "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
        "CreateIndex": 1, "ModifyIndex": 1,
    })
}

/// The worst status among an instance's Consul checks.
fn aggregate(checks: &[Value]) -> &'static str {
    let rank = |s: &str| match s {
        "passing" => 0,
        "warning" => 1,
        _ => 2,
    };
    let worst = checks.iter().filter_map(|c| at(c, "Status").as_str()).map(rank).max().unwrap_or(0);
    match worst {
        0 => "passing",
        1 => "warning",
        _ => "critical",
    }
}

/// Applies `?filter=` to a list of rendered results.
fn apply_filter(q: &QueryPairs, items: Vec<Value>) -> CResult<Vec<Value>> {
    match q.get("filter").filter(|f| !f.trim().is_empty()) {
        None => Ok(items),
        Some(f) => {
            let f = filter::Filter::parse(f).map_err(|e| bad("filter", e))?;
            Ok(items.into_iter().filter(|v| f.matches(v)).collect())
        }
    }
}

/// `node-meta=k:v` filters (repeatable). Nodes carry no metadata here, so any filter excludes.
fn node_meta_filter(q: &QueryPairs) -> CResult<BTreeMap<String, String>> {
    q.all("node-meta")
        .map(|kv| kv.split_once(':').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| bad("node-meta", format!("{kv:?} is not key:value"))))
        .collect()
}

fn object(entries: impl IntoIterator<Item = (String, Value)>) -> Value {
    Value::Object(entries.into_iter().collect::<Map<String, Value>>())
}

//! `/v1/agent/*`: service and check registration on "this agent" (the server's own node),
//! TTL check updates, maintenance, and the agent's views of its services and checks.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use zhili_model::acl::{Access, Resource};
use zhili_model::{CheckSpec, HealthStatus, InstanceRegistration, InstanceSpec, NodeRef};

use super::{apply_filter, at, bad, canon, checks_json, decode, namespace, object, reply, service_json, set, CResult, ConsulError};
use crate::ConsulState;
use zhili_http::auth::Caller;
use zhili_http::error::ApiError;
use zhili_http::extract::QueryPairs;

pub fn routes() -> Router<ConsulState> {
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/services", get(services))
        .route("/v1/agent/service/{*id}", get(service))
        .route("/v1/agent/checks", get(checks))
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{*id}", put(deregister))
        .route("/v1/agent/service/maintenance/{*id}", put(maintenance))
        .route("/v1/agent/check/pass/{*id}", put(pass))
        .route("/v1/agent/check/warn/{*id}", put(warn))
        .route("/v1/agent/check/fail/{*id}", put(fail))
        .route("/v1/agent/check/update/{*id}", put(update))
        .route("/v1/agent/token/dns", put(dns_token))
}

/// `PUT /v1/agent/token/dns {"Token"}`: the token whose rights DNS answers with (kept across
/// restarts; `--dns-token` wins for the run it is given to). Needs `acl` write.
async fn dns_token(State(s): State<ConsulState>, caller: Caller, body: Bytes) -> CResult<Response> {
    caller.require(Resource::Acl, "", Access::Write)?;
    let mut v = decode(&body)?;
    canon(&mut v, &["Token"]);
    let token = str_field(at(&v, "Token"), "Token")?.map(str::to_string);
    if let Some(t) = &token {
        s.acl.resolve(Some(t)).map_err(|_| bad("Token", "is not the secret of an existing token"))?;
    }
    s.acl.set_dns_token(token).await.map_err(ApiError::from)?;
    Ok(().into_response())
}

const SERVICE_FIELDS: &[&str] =
    &["ID", "Name", "Tags", "Address", "Port", "Meta", "Weights", "Check", "Checks", "EnableTagOverride", "Kind", "TaggedAddresses", "Namespace"];
const CHECK_FIELDS: &[&str] = &[
    "CheckID",
    "ID",
    "Name",
    "Notes",
    "Status",
    "Output",
    "TTL",
    "HTTP",
    "Method",
    "Header",
    "TCP",
    "GRPC",
    "GRPCUseTLS",
    "TLSSkipVerify",
    "Interval",
    "Timeout",
    "DeregisterCriticalServiceAfter",
    "SuccessBeforePassing",
    "FailuresBeforeCritical",
    "ServiceID",
    "Args",
    "ScriptArgs",
    "DockerContainerID",
    "H2PING",
    "AliasService",
    "AliasNode",
    "Definition",
];

/// A Go duration: a string ("10s"), or a number of nanoseconds.
fn duration_field(v: &Value, field: &str) -> CResult<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => n.as_u64().map(|ns| Some(format!("{}ms", ns / 1_000_000))).ok_or_else(|| bad(field, "must be a duration")),
        _ => Err(bad(field, "must be a duration such as \"10s\"")),
    }
}

fn str_field<'a>(v: &'a Value, field: &str) -> CResult<Option<&'a str>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(bad(field, "must be a string")),
    }
}

/// One Consul check definition → a registry check, plus its initial status if one was given.
/// `status_only` (catalog registrations) turns any check into an externally-set status.
fn check_spec(mut c: Value, field: &str, default_id: String, service_name: &str, status_only: bool) -> CResult<(CheckSpec, Option<HealthStatus>)> {
    canon(&mut c, CHECK_FIELDS);
    for unsupported in ["Args", "ScriptArgs", "DockerContainerID", "H2PING", "AliasService", "AliasNode"] {
        if !at(&c, unsupported).is_null() {
            return Err(bad(&format!("{field}.{unsupported}"), "this check type is not supported (use TTL, HTTP, TCP or GRPC)"));
        }
    }
    let f = |n: &str| format!("{field}.{n}");
    let status = match str_field(at(&c, "Status"), &f("Status"))? {
        Some(s) => Some(HealthStatus::parse(&f("Status"), s)?),
        None => None,
    };
    let id = str_field(at(&c, "CheckID"), &f("CheckID"))?.or(str_field(at(&c, "ID"), &f("ID"))?).map_or(default_id, str::to_string);
    let name = str_field(at(&c, "Name"), &f("Name"))?.map_or_else(|| format!("Service '{service_name}' check"), str::to_string);
    let mut spec = CheckSpec {
        id: Some(id),
        name: Some(name),
        interval: duration_field(at(&c, "Interval"), &f("Interval"))?,
        timeout: duration_field(at(&c, "Timeout"), &f("Timeout"))?,
        deregister_critical_after: duration_field(at(&c, "DeregisterCriticalServiceAfter"), &f("DeregisterCriticalServiceAfter"))?,
        success_before_passing: at(&c, "SuccessBeforePassing").as_u64().map(|n| n.min(1000) as u32),
        failures_before_critical: at(&c, "FailuresBeforeCritical").as_u64().map(|n| n.min(1000) as u32),
        ..Default::default()
    };
    if status_only {
        // A catalog check's status is whatever the registrant says; nothing probes it.
        spec.kind = "manual".into();
        return Ok((spec, Some(status.unwrap_or(HealthStatus::Critical))));
    }
    if let Some(ttl) = duration_field(at(&c, "TTL"), &f("TTL"))? {
        spec.kind = "ttl".into();
        spec.ttl = Some(ttl);
    } else if let Some(url) = str_field(at(&c, "HTTP"), &f("HTTP"))? {
        spec.kind = "http".into();
        spec.url = Some(url.into());
        spec.method = str_field(at(&c, "Method"), &f("Method"))?.map(str::to_string);
        if let Value::Object(h) = &at(&c, "Header") {
            for (k, v) in h {
                let joined = match v {
                    Value::Array(vs) => vs.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
                    Value::String(s) => s.clone(),
                    _ => return Err(bad(&f(&format!("Header.{k}")), "must be a list of strings")),
                };
                spec.headers.insert(k.clone(), joined);
            }
        }
    } else if let Some(addr) = str_field(at(&c, "TCP"), &f("TCP"))? {
        spec.kind = "tcp".into();
        spec.address = Some(addr.into());
    } else if let Some(target) = str_field(at(&c, "GRPC"), &f("GRPC"))? {
        if at(&c, "GRPCUseTLS").as_bool() == Some(true) {
            return Err(bad(&f("GRPCUseTLS"), "gRPC checks over TLS are not supported yet"));
        }
        let (addr, svc) = target.split_once('/').unwrap_or((target, ""));
        spec.kind = "grpc".into();
        spec.address = Some(addr.into());
        spec.grpc_service = Some(svc.into());
    } else {
        return Err(bad(field, "a check needs one of TTL, HTTP, TCP or GRPC"));
    }
    Ok((spec, status))
}

/// A service definition (agent or catalog) → a registration of the named service, plus the
/// initial statuses of checks that gave one.
pub(super) struct Converted {
    pub service: String,
    pub reg: InstanceRegistration,
    pub statuses: Vec<(String, HealthStatus)>,
}

pub(super) fn convert(mut svc: Value, node: NodeRef, status_only: bool) -> CResult<Converted> {
    canon(&mut svc, SERVICE_FIELDS);
    let name =
        str_field(at(&svc, "Name"), "Name")?.or(str_field(at(&svc, "Service"), "Service")?).ok_or_else(|| bad("Name", "missing service name"))?.to_string();
    zhili_model::validate::name("Name", &name)?;
    let id = str_field(at(&svc, "ID"), "ID")?.map_or_else(|| name.clone(), str::to_string);
    let port = match &at(&svc, "Port") {
        Value::Null => 0,
        v => v.as_u64().filter(|p| *p <= 65535).ok_or_else(|| bad("Port", "must be 0..=65535"))? as u32,
    };
    let address = str_field(at(&svc, "Address"), "Address")?.map_or_else(|| node.address.clone(), str::to_string);
    let tags: Vec<String> = match at(&svc, "Tags") {
        Value::Null => vec![],
        v => serde_json::from_value(v.clone()).map_err(|_| bad("Tags", "must be a list of strings"))?,
    };
    let metadata: BTreeMap<String, String> = match at(&svc, "Meta") {
        Value::Null => BTreeMap::new(),
        v => serde_json::from_value(v.clone()).map_err(|_| bad("Meta", "must be an object of strings"))?,
    };
    let weight = match at(&svc, "Weights") {
        Value::Null => None,
        w => {
            let mut w = w.clone();
            canon(&mut w, &["Passing", "Warning"]);
            Some(at(&w, "Passing").as_u64().filter(|p| (1..=10_000).contains(p)).ok_or_else(|| bad("Weights.Passing", "must be 1..=10000"))? as u32)
        }
    };
    let mut raw_checks: Vec<(Value, String)> = Vec::new();
    if !at(&svc, "Check").is_null() {
        raw_checks.push((at(&svc, "Check").clone(), "Check".into()));
    }
    if let Value::Array(cs) = &at(&svc, "Checks") {
        raw_checks.extend(cs.iter().enumerate().map(|(i, c)| (c.clone(), format!("Checks[{i}]"))));
    }
    let single = raw_checks.len() == 1;
    let mut checks = Vec::new();
    let mut statuses = Vec::new();
    for (i, (c, field)) in raw_checks.into_iter().enumerate() {
        // Consul's ids: `service:<id>` for one check, `service:<id>:<n>` (from 1) for several.
        let default_id = if single { format!("service:{id}") } else { format!("service:{id}:{}", i + 1) };
        let (spec, status) = check_spec(c, &field, default_id, &name, status_only)?;
        // Validate here too, so an error names the Consul field ("Checks[1].interval").
        spec.clone().validate(&field, i)?;
        if let (Some(st), Some(cid)) = (status, &spec.id) {
            if spec.kind == "ttl" || spec.kind == "manual" {
                statuses.push((cid.clone(), st));
            }
        }
        checks.push(spec);
    }
    let spec = InstanceSpec {
        id: Some(id),
        address,
        // Consul allows port 0 ("no port"); the registry requires one, so validate with 1 and
        // put the 0 back afterwards.
        port: port.max(1),
        weight,
        tags,
        metadata,
        ephemeral: Some(false),
        checks,
        ..Default::default()
    };
    let mut reg = spec.validate()?;
    reg.port = port as u16;
    reg.node = Some(Box::new(node));
    Ok(Converted { service: name, reg, statuses })
}

/// Registers a converted definition: an id that moved to another service name replaces the old
/// one (Consul keys instances by id alone), then initial TTL statuses apply. Replacing needs
/// write on every service that holds the id now, not only on the new one: otherwise a token
/// for one service could take over another's instance by registering its id.
pub(super) async fn apply(s: &ConsulState, caller: &Caller, ns: &str, c: Converted) -> CResult<u64> {
    caller.require(Resource::Service, &c.service, Access::Write)?;
    let holders = s.registry.find_instances(ns, &c.reg.id);
    for old in &holders {
        caller.require(Resource::Service, &old.service, Access::Write)?;
    }
    for old in holders.iter().filter(|old| old.service != c.service) {
        s.registry.deregister(ns, &old.service, &old.id).await?;
    }
    let id = c.reg.id.clone();
    let mut index = s.registry.register(ns, &c.service, c.reg).await?;
    for (check, status) in c.statuses {
        index = s.registry.update_ttl_check(ns, &c.service, &id, &check, status, "")?;
    }
    Ok(index)
}

async fn register(State(s): State<ConsulState>, caller: Caller, q: QueryPairs, body: Bytes) -> CResult<Response> {
    let ns = namespace(&q)?;
    let c = convert(decode(&body)?, s.consul.node_ref(), false)?;
    apply(&s, &caller, &ns, c).await?;
    Ok(().into_response())
}

/// The instances an id names, each of which the caller must have `access` to. An id nobody
/// holds is 404 only to a caller who may `access` every service; anyone else gets 403, so
/// answers never tell a caller which ids exist outside its rights.
pub(super) fn owned(s: &ConsulState, caller: &Caller, ns: &str, id: &str, access: Access) -> CResult<Vec<zhili_model::Instance>> {
    let found = s.registry.find_instances(ns, id);
    if found.is_empty() {
        return Err(unknown(caller, access, format!("Unknown service ID {id:?}")));
    }
    for inst in &found {
        caller.require(Resource::Service, &inst.service, access)?;
    }
    Ok(found)
}

/// 404 for a caller entitled to know, 403 for anyone else.
fn unknown(caller: &Caller, access: Access, not_found: String) -> ConsulError {
    match caller.require_all(Resource::Service, "", access) {
        Ok(()) => ConsulError(ApiError::NotFound(not_found)),
        Err(denied) => ConsulError(denied),
    }
}

fn own(s: &ConsulState, caller: &Caller, ns: &str, id: &str, access: Access) -> CResult<zhili_model::Instance> {
    let mut found = owned(s, caller, ns, id, access)?;
    Ok(found.swap_remove(0))
}

async fn deregister(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>, q: QueryPairs) -> CResult<Response> {
    let ns = namespace(&q)?;
    for inst in owned(&s, &caller, &ns, &id, Access::Write)? {
        s.registry.deregister(&ns, &inst.service, &id).await?;
    }
    Ok(().into_response())
}

async fn maintenance(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>, q: QueryPairs) -> CResult<Response> {
    let ns = namespace(&q)?;
    let enable = q.flag("enable")?.ok_or_else(|| bad("enable", "missing value for enable"))?;
    let inst = own(&s, &caller, &ns, &id, Access::Write)?;
    let reason = q.get("reason").unwrap_or("Maintenance mode is enabled for this service");
    zhili_model::validate::text("reason", reason)?;
    s.registry.set_maintenance(&ns, &inst.service, &id, enable, reason).await?;
    Ok(().into_response())
}

async fn set_check(s: &ConsulState, caller: &Caller, ns: &str, check: &str, status: HealthStatus, output: &str) -> CResult<Response> {
    zhili_model::validate::text("output", output)?;
    let (service, id) = s.registry.find_check(ns, check).ok_or_else(|| unknown(caller, Access::Write, format!("Unknown check ID {check:?}")))?;
    caller.require(Resource::Service, &service, Access::Write)?;
    s.registry.update_ttl_check(ns, &service, &id, check, status, output)?;
    Ok(().into_response())
}

async fn pass(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>, q: QueryPairs) -> CResult<Response> {
    set_check(&s, &caller, &namespace(&q)?, &id, HealthStatus::Passing, q.get("note").unwrap_or("")).await
}

async fn warn(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>, q: QueryPairs) -> CResult<Response> {
    set_check(&s, &caller, &namespace(&q)?, &id, HealthStatus::Warning, q.get("note").unwrap_or("")).await
}

async fn fail(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>, q: QueryPairs) -> CResult<Response> {
    set_check(&s, &caller, &namespace(&q)?, &id, HealthStatus::Critical, q.get("note").unwrap_or("")).await
}

async fn update(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>, q: QueryPairs, body: Bytes) -> CResult<Response> {
    let mut v = decode(&body)?;
    canon(&mut v, &["Status", "Output"]);
    let status = str_field(at(&v, "Status"), "Status")?.ok_or_else(|| bad("Status", "must be passing, warning or critical"))?;
    let status = HealthStatus::parse("Status", status)?;
    set_check(&s, &caller, &namespace(&q)?, &id, status, str_field(at(&v, "Output"), "Output")?.unwrap_or("")).await
}

/// Instances registered on this agent's node, readable by the caller.
fn local_instances(s: &ConsulState, caller: &Caller, ns: &str) -> (u64, Vec<zhili_model::Instance>) {
    let (index, all) = s.registry.all_instances(Some(ns));
    let mine = all
        .into_iter()
        .filter(|i| i.node.as_ref().is_none_or(|n| n.name == s.consul.node) && caller.can(Resource::Service, &i.service, Access::Read))
        .collect();
    (index, mine)
}

async fn services(State(s): State<ConsulState>, caller: Caller, q: QueryPairs) -> CResult<Response> {
    let ns = namespace(&q)?;
    let (index, list) = local_instances(&s, &caller, &ns);
    let rendered = apply_filter(&q, list.iter().map(|i| service_json(&s, i)).collect())?;
    Ok(reply(index, Json(object(rendered.into_iter().map(|v| (at(&v, "ID").as_str().unwrap_or_default().to_string(), v))))))
}

async fn service(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>, q: QueryPairs) -> CResult<Response> {
    let ns = namespace(&q)?;
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        s.registry.wait_for(index, wait, || s.registry.find_instance(&ns, &id).map_or_else(|| s.registry.index(), |i| i.modify_index)).await;
    }
    let inst = own(&s, &caller, &ns, &id, Access::Read)?;
    let mut v = service_json(&s, &inst);
    set(&mut v, "ContentHash", json!(format!("{:016x}", inst.modify_index)));
    Ok(reply(inst.modify_index, Json(v)))
}

async fn checks(State(s): State<ConsulState>, caller: Caller, q: QueryPairs) -> CResult<Response> {
    let ns = namespace(&q)?;
    let (index, list) = local_instances(&s, &caller, &ns);
    let all: Vec<Value> = list.iter().flat_map(|i| checks_json(&s, i).into_iter().skip(1)).collect();
    let rendered = apply_filter(&q, all)?;
    Ok(reply(index, Json(object(rendered.into_iter().map(|v| (at(&v, "CheckID").as_str().unwrap_or_default().to_string(), v))))))
}

async fn agent_self(State(s): State<ConsulState>, caller: Caller) -> CResult<Response> {
    caller.require(Resource::Operator, "", Access::Read)?;
    let c = &s.consul;
    let body = json!({
        "Config": {
            "Datacenter": c.datacenter,
            "PrimaryDatacenter": c.datacenter,
            "NodeName": c.node,
            "NodeID": "",
            "Server": true,
            "Revision": "zhili",
            "Version": "1.17.0",
        },
        "Member": { "Name": c.node, "Addr": c.address, "Port": 8301, "Tags": { "dc": c.datacenter, "role": "consul", "build": "1.17.0:zhili" }, "Status": 1 },
        "Meta": {},
        "xDS": null,
    });
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhili_model::CheckKind;

    /// Consul's field names (and some snake_case spellings), so generated bodies reach past the
    /// top level.
    static CONSUL_KEYS: std::sync::LazyLock<Vec<&'static str>> =
        std::sync::LazyLock::new(|| [SERVICE_FIELDS, CHECK_FIELDS, &["Service", "Passing", "Warning", "name", "check", "ttl", "service_id"]].concat());

    proptest::proptest! {
        /// Any JSON as a service definition (agent or catalog): converted, or a 400 naming the
        /// field; never a panic, whatever the shape.
        #[test]
        fn arbitrary_service_definitions_never_panic(v in zhili_test_support::json::arbitrary_json(CONSUL_KEYS.as_slice()), catalog in proptest::bool::ANY) {
            if let Err(e) = convert(v, node(), catalog) {
                proptest::prop_assert_eq!(e.0.status(), axum::http::StatusCode::BAD_REQUEST);
            }
        }
    }

    fn node() -> NodeRef {
        NodeRef { name: "zhili".into(), address: "127.0.0.1".into() }
    }

    #[test]
    fn consul_check_ids_and_kinds() {
        let c = convert(json!({"name": "web", "ID": "web1", "Port": 80, "check": {"ttl": "10s", "status": "passing"}}), node(), false).unwrap();
        assert_eq!((c.service.as_str(), c.reg.id.as_str(), c.reg.port), ("web", "web1", 80));
        assert_eq!(c.reg.checks[0].id, "service:web1");
        assert_eq!(c.statuses, vec![("service:web1".to_string(), HealthStatus::Passing)]);
        let c = convert(
            json!({"Name": "web", "Checks": [{"HTTP": "http://127.0.0.1:1/h", "Interval": "5s", "Header": {"X-A": ["1", "2"]}}, {"TCP": "127.0.0.1:1", "Interval": "5s"}, {"GRPC": "127.0.0.1:1/svc", "Interval": "5s"}]}),
            node(),
            false,
        )
        .unwrap();
        let ids: Vec<&str> = c.reg.checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["service:web:1", "service:web:2", "service:web:3"]);
        assert!(matches!(&c.reg.checks[0].kind, CheckKind::Http { headers, .. } if headers["X-A"] == "1, 2"));
        assert!(matches!(&c.reg.checks[2].kind, CheckKind::Grpc { grpc_service, .. } if grpc_service == "svc"));
        assert_eq!(c.reg.address, "127.0.0.1", "no address means the node's");
        assert_eq!(c.reg.port, 0, "Consul allows port 0");
        let c = convert(json!({"Service": "db", "Check": {"CheckID": "db-up", "Status": "warning"}}), node(), true).unwrap();
        assert_eq!(c.reg.checks[0].kind, CheckKind::Manual);
        assert_eq!(c.statuses, vec![("db-up".to_string(), HealthStatus::Warning)]);
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let detail = |v: Value| convert(v, node(), false).err().map(|e| e.0.detail().to_string()).unwrap_or_default();
        assert!(detail(json!({"Port": 1})).starts_with("Name:"));
        assert!(detail(json!({"Name": "a/b"})).starts_with("Name:"));
        assert!(detail(json!({"Name": "a", "Port": 70000})).starts_with("Port:"));
        assert!(detail(json!({"Name": "a", "Check": {"Args": ["/bin/true"]}})).starts_with("Check.Args:"));
        assert!(detail(json!({"Name": "a", "Checks": [{"Interval": "1s"}]})).starts_with("Checks[0]:"));
        assert!(detail(json!({"Name": "a", "Check": {"TTL": "soon"}})).starts_with("Check.ttl:"));
        assert!(detail(json!({"Name": "a", "Weights": {"Passing": 0}})).starts_with("Weights.Passing:"));
        assert!(detail(json!({"Name": "a", "Tags": "x"})).starts_with("Tags:"));
    }
}

//! Nacos naming over HTTP: `/nacos/v1/ns/...` (plain `ok` / JSON answers) and `/nacos/v2/ns/...`
//! (the same operations wrapped in `{code, message, data}`), plus namespaces and login.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use zhili_model::acl::{Access, Resource};
use zhili_model::{Instance, DEFAULT_NAMESPACE};

use super::{
    cluster_of, instance_json, instances_of, nacos_namespace, service_info, text, v2_ok, NResult, NacosError, NacosInstance, Params, ServiceRef,
    BEAT_INTERVAL_MS,
};
use crate::NacosState;
use zhili_http::auth::Caller;
use zhili_http::error::ApiError;

/// What an operation answers: v1 says `ok` or sends the JSON; v2 wraps either in `data`.
enum Reply {
    Ok,
    Json(Value),
    /// JSON already rendered, envelope included.
    Rendered(bytes::Bytes),
}

fn render(v2: bool, r: NResult<Reply>) -> Response {
    match (r, v2) {
        (Ok(Reply::Ok), false) => text("ok"),
        (Ok(Reply::Json(v)), false) => axum::Json(v).into_response(),
        (Ok(Reply::Ok), true) => v2_ok(json!("ok")),
        (Ok(Reply::Json(v)), true) => v2_ok(v),
        (Ok(Reply::Rendered(b)), _) => ([(axum::http::header::CONTENT_TYPE, "application/json")], b).into_response(),
        (Err(e), v2) => NacosError { v2, ..e }.into_response(),
    }
}

/// Declares the v1 and v2 handlers of one operation.
macro_rules! both {
    ($($v1:ident, $v2:ident => $op:ident;)*) => {$(
        async fn $v1(State(s): State<NacosState>, caller: Caller, p: Params) -> Response {
            render(false, $op(&s, &caller, &p).await)
        }
        async fn $v2(State(s): State<NacosState>, caller: Caller, p: Params) -> Response {
            render(true, $op(&s, &caller, &p).await)
        }
    )*};
}

async fn list_v1(State(s): State<NacosState>, caller: Caller, p: Params) -> Response {
    render(false, list(&s, &caller, &p, false))
}

async fn list_v2(State(s): State<NacosState>, caller: Caller, p: Params) -> Response {
    render(true, list(&s, &caller, &p, true))
}

both! {
    register_v1, register_v2 => register;
    deregister_v1, deregister_v2 => deregister;
    modify_v1, modify_v2 => modify;
    detail_v1, detail_v2 => detail;
    beat_v1, beat_v2 => beat;
    create_service_v1, create_service_v2 => create_service;
    update_service_v1, update_service_v2 => update_service;
    delete_service_v1, delete_service_v2 => delete_service;
    get_service_v1, get_service_v2 => get_service;
    service_list_v1, service_list_v2 => service_list;
}

pub(super) fn routes() -> Router<NacosState> {
    Router::new()
        .route("/nacos/v1/ns/instance", get(detail_v1).post(register_v1).delete(deregister_v1).put(modify_v1))
        .route("/nacos/v1/ns/instance/list", get(list_v1))
        .route("/nacos/v1/ns/instance/beat", axum::routing::put(beat_v1))
        .route("/nacos/v1/ns/service", get(get_service_v1).post(create_service_v1).delete(delete_service_v1).put(update_service_v1))
        .route("/nacos/v1/ns/service/list", get(service_list_v1))
        .route("/nacos/v2/ns/instance", get(detail_v2).post(register_v2).delete(deregister_v2).put(modify_v2))
        .route("/nacos/v2/ns/instance/list", get(list_v2))
        .route("/nacos/v2/ns/instance/beat", axum::routing::put(beat_v2))
        .route("/nacos/v2/ns/service", get(get_service_v2).post(create_service_v2).delete(delete_service_v2).put(update_service_v2))
        .route("/nacos/v2/ns/service/list", get(service_list_v2))
        .route("/nacos/v1/console/namespaces", get(namespaces).post(create_namespace))
        .route("/nacos/v1/auth/login", post(login))
        .route("/nacos/v1/auth/users/login", post(login))
}

fn target(p: &Params) -> NResult<(String, ServiceRef)> {
    Ok((p.namespace()?, ServiceRef::parse(p.required("serviceName")?, p.get("groupName"))?))
}

/// Metadata as Nacos accepts it: a JSON object, or `k=v,k2=v2`.
fn metadata(raw: &str) -> NResult<BTreeMap<String, String>> {
    if raw.trim_start().starts_with('{') {
        let v: BTreeMap<String, Value> = serde_json::from_str(raw).map_err(|e| super::bad("metadata", format!("is not a JSON object: {e}")))?;
        return Ok(v.into_iter().map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect());
    }
    raw.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| super::bad("metadata", format!("entry {kv:?} is not key=value")))
        })
        .collect()
}

fn number<T: std::str::FromStr>(p: &Params, key: &str) -> NResult<Option<T>> {
    p.get(key).map(|v| v.trim().parse::<T>().map_err(|_| super::bad(key, format!("is not a number: {v:?}")))).transpose()
}

fn instance_params(p: &Params) -> NResult<NacosInstance> {
    Ok(NacosInstance {
        ip: p.required("ip")?.to_string(),
        port: number(p, "port")?.ok_or_else(|| super::bad("port", "is required"))?,
        weight: number(p, "weight")?,
        enabled: match p.flag("enabled")? {
            Some(v) => Some(v),
            None => p.flag("enable")?,
        },
        ephemeral: p.flag("ephemeral")?,
        cluster: p.get("clusterName").or_else(|| p.get("cluster")).map(str::to_string),
        metadata: p.get("metadata").map(metadata).transpose()?.unwrap_or_default(),
    })
}

async fn register(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    p.flag("healthy")?;
    super::register(s, caller, &ns, &svc, &instance_params(p)?, None).await?;
    Ok(Reply::Ok)
}

/// Removing an instance that is not there is not an error, as in Nacos.
async fn deregister(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Write)?;
    let id = NacosInstance {
        ip: p.required("ip")?.into(),
        port: number(p, "port")?.ok_or_else(|| super::bad("port", "is required"))?,
        cluster: p.get("clusterName").map(str::to_string),
        ..Default::default()
    }
    .id();
    if s.registry.instance(&ns, &svc.name, &id).is_some() {
        s.registry.deregister(&ns, &svc.name, &id).await?;
    }
    Ok(Reply::Ok)
}

fn find(s: &NacosState, ns: &str, svc: &ServiceRef, ip: &str, port: i64, cluster: Option<&str>) -> NResult<Instance> {
    let id = NacosInstance { ip: ip.into(), port, cluster: cluster.map(str::to_string), ..Default::default() }.id();
    instances_of(s, ns, svc)
        .into_iter()
        .find(|i| i.id == id || (i.address == ip && i64::from(i.port) == port && cluster.is_none_or(|c| cluster_of(i) == c)))
        .ok_or_else(|| NacosError::v1(ApiError::NotFound(format!("no matched ip found: {ip}:{port} in {}", svc.grouped()))))
}

async fn modify(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Write)?;
    let port = number(p, "port")?.ok_or_else(|| super::bad("port", "is required"))?;
    let current = find(s, &ns, &svc, p.required("ip")?, port, p.get("clusterName"))?;
    let mut reg =
        s.registry.registration(&ns, &svc.name, &current.id).ok_or_else(|| NacosError::v1(ApiError::NotFound(format!("instance {} is gone", current.id))))?;
    let asked = instance_params(p)?;
    if let Some(w) = asked.weight {
        reg.weight = NacosInstance { weight: Some(w), ..asked.clone() }.registration()?.weight;
    }
    if let Some(e) = asked.enabled {
        reg.enabled = e;
    }
    if p.get("metadata").is_some() {
        zhili_model::validate::metadata("metadata", &asked.metadata)?;
        reg.metadata = asked.metadata.into();
    }
    s.registry.register(&ns, &svc.name, reg).await?;
    Ok(Reply::Ok)
}

async fn detail(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Read)?;
    let port = number(p, "port")?.ok_or_else(|| super::bad("port", "is required"))?;
    let i = find(s, &ns, &svc, p.required("ip")?, port, p.get("clusterName").or_else(|| p.get("cluster")))?;
    let mut v = instance_json(&i, &svc);
    if let Some(o) = v.as_object_mut() {
        o.insert("service".into(), json!(svc.grouped()));
    }
    Ok(Reply::Json(v))
}

/// `GET instance/list`, rendered once per service index and query (the index covers every
/// field shown; `lastRefTime` is then the time of that rendering).
fn list(s: &NacosState, caller: &Caller, p: &Params, v2: bool) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Read)?;
    let healthy_only = p.flag("healthyOnly")?.unwrap_or(false);
    let clusters = p.get("clusters").unwrap_or("");
    let index = s.registry.service_index(&ns, &svc.name);
    let key = (ns, svc.grouped(), clusters.to_string(), healthy_only, v2);
    if let Some(body) = s.lists.get(&key, index) {
        return Ok(Reply::Rendered(body));
    }
    let mut instances = instances_of(s, &key.0, &svc);
    instances.retain(|i| i.enabled && (!healthy_only || i.is_serving()));
    let mut info = service_info(&instances, &svc, clusters, true, s.nacos.ref_time());
    if let Some(o) = info.as_object_mut() {
        o.insert("dom".into(), json!(svc.grouped()));
    }
    let info = if v2 { json!({"code": 0, "message": "success", "data": info}) } else { info };
    let body = bytes::Bytes::from(serde_json::to_vec(&info).map_err(|e| ApiError::Internal(e.to_string()))?);
    s.lists.put(key, index, body.clone());
    Ok(Reply::Rendered(body))
}

/// `PUT instance/beat`: `code` 10200 when the instance is known, 20404 so the client re-registers.
async fn beat(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Beat {
        #[serde(rename = "serviceName")]
        service_name: Option<String>,
        ip: Option<String>,
        port: Option<i64>,
        cluster: Option<String>,
    }
    let beat: Beat = match p.get("beat") {
        Some(raw) => serde_json::from_str(raw).map_err(|e| super::bad("beat", format!("is not a beat JSON object: {e}")))?,
        None => Beat::default(),
    };
    let ns = p.namespace()?;
    let name = p.get("serviceName").map(str::to_string).or(beat.service_name).ok_or_else(|| super::bad("serviceName", "is required"))?;
    let svc = ServiceRef::parse(&name, p.get("groupName"))?;
    caller.require(Resource::Service, &svc.name, Access::Write)?;
    let ip = p.get("ip").map(str::to_string).or(beat.ip).ok_or_else(|| super::bad("ip", "is required (or in beat)"))?;
    let port = number::<i64>(p, "port")?.or(beat.port).ok_or_else(|| super::bad("port", "is required (or in beat)"))?;
    let cluster = p.get("clusterName").map(str::to_string).or(beat.cluster);
    // The hot path: the id a Nacos registration gets, without copying the service's instances;
    // instances registered under other ids (native, Consul) are looked up by address.
    let in_group = s.registry.service_definition(&ns, &svc.name).is_some_and(|d| d.group == svc.group);
    let id = NacosInstance { ip: ip.clone(), port, cluster: cluster.clone(), ..Default::default() }.id();
    let beat_ok = in_group
        && (s.registry.heartbeat(&ns, &svc.name, &id).is_ok()
            || find(s, &ns, &svc, &ip, port, cluster.as_deref()).is_ok_and(|i| s.registry.heartbeat(&ns, &svc.name, &i.id).is_ok()));
    let code = if beat_ok { 10200 } else { 20404 };
    Ok(Reply::Json(json!({"clientBeatInterval": BEAT_INTERVAL_MS, "code": code, "lightBeatEnabled": true})))
}

fn threshold(p: &Params) -> NResult<Option<f64>> {
    number::<f64>(p, "protectThreshold")
}

async fn create_service(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Write)?;
    if s.registry.service(&ns, &svc.name).is_some_and(|d| d.service.defined) {
        return Err(NacosError::v1(ApiError::BadRequest(format!("specified service already exists, serviceName : {}", svc.grouped()))));
    }
    let spec = zhili_model::ServiceSpec {
        group: Some(svc.group.clone()),
        protection_threshold: threshold(p)?,
        metadata: p.get("metadata").map(metadata).transpose()?.unwrap_or_default(),
        ..Default::default()
    };
    s.registry.put_service(spec.validate(&ns, &svc.name)?).await?;
    Ok(Reply::Ok)
}

async fn update_service(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Write)?;
    let mut def = match s.registry.service(&ns, &svc.name) {
        Some(d) if d.service.group == svc.group => d.service,
        _ => return Err(NacosError::v1(ApiError::NotFound(format!("service {} not found", svc.grouped())))),
    };
    if let Some(t) = threshold(p)? {
        if !(0.0..=1.0).contains(&t) {
            return Err(super::bad("protectThreshold", "must be between 0 and 1"));
        }
        def.protection_threshold = t;
    }
    if let Some(raw) = p.get("metadata") {
        let m = metadata(raw)?;
        zhili_model::validate::metadata("metadata", &m)?;
        def.metadata = m;
    }
    def.defined = true;
    s.registry.put_service(def).await?;
    Ok(Reply::Ok)
}

async fn delete_service(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Write)?;
    match s.registry.service(&ns, &svc.name) {
        Some(d) if d.service.group == svc.group => {
            if !d.instances.is_empty() {
                return Err(NacosError::v1(ApiError::BadRequest(format!(
                    "service {} is not empty, can't be delete. Please unregister instance first",
                    svc.grouped()
                ))));
            }
        }
        _ => return Err(NacosError::v1(ApiError::NotFound(format!("service {} not found", svc.grouped())))),
    }
    s.registry.delete_service(&ns, &svc.name).await?;
    Ok(Reply::Ok)
}

async fn get_service(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let (ns, svc) = target(p)?;
    caller.require(Resource::Service, &svc.name, Access::Read)?;
    let d = match s.registry.service(&ns, &svc.name) {
        Some(d) if d.service.group == svc.group => d,
        _ => return Err(NacosError::v1(ApiError::NotFound(format!("service {} not found", svc.grouped())))),
    };
    let mut clusters: Vec<&str> = d.instances.iter().map(cluster_of).collect();
    clusters.sort_unstable();
    clusters.dedup();
    Ok(Reply::Json(json!({
        "namespaceId": nacos_namespace(&ns),
        "groupName": svc.group,
        "name": svc.name,
        "protectThreshold": d.service.protection_threshold,
        "metadata": d.service.metadata,
        "selector": {"type": "none"},
        "clusters": clusters.iter().map(|c| json!({"name": c, "healthChecker": {"type": "NONE"}, "metadata": {}})).collect::<Vec<_>>(),
    })))
}

/// The names of the services of `group` the caller may read, sorted.
pub(super) fn service_names(s: &NacosState, caller: &Caller, ns: &str, group: &str) -> Vec<String> {
    let (_, services) = s.registry.list_services(ns);
    let mut names: Vec<String> =
        services.into_iter().filter(|x| x.group == group && caller.can(Resource::Service, &x.name, Access::Read)).map(|x| x.name).collect();
    names.sort();
    names
}

async fn service_list(s: &NacosState, caller: &Caller, p: &Params) -> NResult<Reply> {
    let ns = p.namespace()?;
    let group = p.get("groupName").unwrap_or(zhili_model::DEFAULT_GROUP);
    let page_no = number::<u64>(p, "pageNo")?.unwrap_or(1).max(1);
    let page_size = number::<u64>(p, "pageSize")?.unwrap_or(10).clamp(1, 1000);
    let names = service_names(s, caller, &ns, group);
    let page: Vec<&String> = names.iter().skip(((page_no - 1) * page_size) as usize).take(page_size as usize).collect();
    Ok(Reply::Json(json!({"count": names.len(), "doms": page, "services": page})))
}

/// Zhili namespaces are implicit: every namespace with a service or a config is listed, as far
/// as the caller may read one of them (the public namespace always); counts are of readable
/// configs only.
async fn namespaces(State(s): State<NacosState>, caller: Caller) -> Response {
    let mut names: Vec<String> = s
        .registry
        .namespaces()
        .into_iter()
        .filter(|ns| s.registry.list_services(ns).1.iter().any(|x| caller.can(Resource::Service, &x.name, Access::Read)))
        .collect();
    let mut configs = s.kv.list(super::CONFIG_PREFIX).unwrap_or_default();
    configs.retain(|e| caller.can(Resource::Kv, &e.key, Access::Read));
    for e in &configs {
        if let Some((tenant, _, _)) = super::config_ref(&e.key) {
            let ns = if tenant == super::PUBLIC { DEFAULT_NAMESPACE.to_string() } else { tenant };
            names.push(ns);
        }
    }
    names.push(DEFAULT_NAMESPACE.into());
    names.sort();
    names.dedup();
    let data: Vec<Value> = names
        .iter()
        .map(|ns| {
            let id = nacos_namespace(ns);
            let prefix = format!("{}{}/", super::CONFIG_PREFIX, id);
            let count = configs.iter().filter(|e| e.key.starts_with(&prefix)).count();
            let public = ns == DEFAULT_NAMESPACE;
            json!({
                "namespace": if public { "" } else { id },
                "namespaceShowName": id,
                "namespaceDesc": if public { "Public Namespace" } else { "" },
                "quota": 200,
                "configCount": count,
                "type": if public { 0 } else { 2 },
            })
        })
        .collect();
    axum::Json(json!({"code": 200, "message": null, "data": data})).into_response()
}

/// Namespaces come into being with their first service or config; creating one validates the id.
async fn create_namespace(p: Params) -> NResult<Response> {
    let id = p.get("customNamespaceId").or_else(|| p.get("namespaceId")).ok_or_else(|| super::bad("customNamespaceId", "is required"))?;
    super::zhili_namespace(id)?;
    Ok(text("true"))
}

async fn login(State(s): State<NacosState>, p: Params) -> NResult<Response> {
    let v = super::login(&s, p.get("username").unwrap_or(""), p.get("password").unwrap_or(""))?;
    Ok(axum::Json(v).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Form fields as Nacos clients send them: metadata in either form, `group@@name`
        /// service names, numbers; any text parses or fails naming the field.
        #[test]
        fn arbitrary_form_fields_never_panic(raw in "\\PC{0,64}|[{}\"a-z=,:@ 0-9.-]{0,40}", group in proptest::option::of("\\PC{0,16}")) {
            if let Err(e) = metadata(&raw) {
                proptest::prop_assert!(e.err.detail().contains("metadata"), "{}", e.err.detail());
            }
            let _ = ServiceRef::parse(&raw, group.as_deref());
            let p = Params(vec![("port".into(), raw.clone()), ("weight".into(), raw.clone()), ("enabled".into(), raw.clone())]);
            let _ = number::<i64>(&p, "port");
            let _ = number::<f64>(&p, "weight");
            let _ = p.flag("enabled");
        }
    }

    #[test]
    fn metadata_forms() {
        let m = metadata(r#"{"a":"1","b":2}"#).unwrap();
        assert_eq!(m.get("a").map(String::as_str), Some("1"));
        assert_eq!(m.get("b").map(String::as_str), Some("2"));
        let m = metadata("a=1, b=x").unwrap();
        assert_eq!(m.get("b").map(String::as_str), Some("x"));
        assert!(metadata("novalue").is_err());
        assert!(metadata("{not json").is_err());
    }
}

//! Nacos compatibility: the open API (`/nacos/v1`, `/nacos/v2`) on the Nacos HTTP listener and the
//! Nacos 2.x gRPC `Payload` protocol on the gRPC listener. Both are views of the same registry and
//! KV store as the native and Consul APIs.
//!
//! Mapping (see docs/ARCHITECTURE.md):
//! - namespace: Nacos `public` (or empty) is Zhili's `default`; other namespace ids map as they are;
//! - service: Nacos `group@@name` is the Zhili service `name` whose `group` attribute is `group`;
//!   a request naming another group than the service's sees no instances;
//! - instance: id `ip:port` (the native default), or `ip:port:cluster` outside cluster `DEFAULT`;
//!   cluster ↔ zone; weight × 100 (capped at Zhili's maximum); healthy = serving;
//! - config `(tenant, group, dataId)` is the KV key `config/<tenant|public>/<group>/<dataId>`.

mod config;
pub mod grpc;
mod hub;
mod naming;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use zhili_model::acl::{Access, Resource};
use zhili_model::{Instance, InstanceRegistration, InstanceSpec, ValidationError, DEFAULT_GROUP, DEFAULT_NAMESPACE, MAX_WEIGHT};

use zhili_http::auth::{Authorize, Caller};
use zhili_http::error::ApiError;
use zhili_http::layer::GateLayer;
use zhili_http::AppState;

pub use hub::NacosHub;

/// Nacos's name for the default namespace.
pub const PUBLIC: &str = "public";
pub const DEFAULT_CLUSTER: &str = "DEFAULT";
/// KV prefix under which Nacos configs live.
pub const CONFIG_PREFIX: &str = "config/";
/// Heartbeat interval Nacos clients are told to use (ms).
const BEAT_INTERVAL_MS: u64 = 5000;

/// The Nacos subsystem: its two listeners' routers share this state, and its connection hub
/// (gRPC connections, pushes, long-poll wake-ups) runs under the binary's supervisor: started
/// with [`Self::run`], stopped with [`Self::close_all`]. Field access reaches the shared
/// [`zhili_http::Services`] through `Deref`.
#[derive(Clone)]
pub struct NacosState(Arc<Nacos>);

pub struct Nacos {
    core: AppState,
    pub nacos: NacosHub,
    /// Rendered `instance/list` answers per service index (the call every v1 client polls).
    pub lists: zhili_http::rendered::RenderCache<ListKey>,
    /// Rendered gRPC `serviceInfo` answers per service index (query and subscribe).
    pub service_infos: zhili_http::rendered::RenderCache<InfoKey>,
    /// Config md5s by key, per modify index (a config get answers it on every call).
    pub config_md5s: zhili_http::rendered::RenderCache<String>,
}

/// (namespace, grouped service name, clusters, healthy only, v2 envelope).
pub type ListKey = (String, String, String, bool, bool);
/// (namespace, grouped service name, clusters, healthy only).
pub type InfoKey = (String, String, String, bool);

impl std::ops::Deref for NacosState {
    type Target = Nacos;
    fn deref(&self) -> &Nacos {
        &self.0
    }
}

impl std::ops::Deref for Nacos {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.core
    }
}

impl NacosState {
    pub fn new(core: AppState) -> Self {
        Self(Arc::new(Nacos { core, nacos: NacosHub::new(), lists: Default::default(), service_infos: Default::default(), config_md5s: Default::default() }))
    }

    /// The hub's work, until the server stops: pushes registry and config changes to clients,
    /// wakes HTTP long-polls, and re-authorizes open connections when ACLs change.
    pub async fn run(self) {
        tokio::join!(hub::naming_dispatcher(self.clone()), hub::config_dispatcher(self.clone()), hub::reauthorize(self));
    }

    /// Ends every open gRPC stream (the server is stopping).
    pub fn close_all(&self) {
        self.nacos.close_all();
    }

    /// The Nacos HTTP listener's router.
    pub fn http_router(&self) -> Router {
        let routes = Router::new()
            .merge(naming::routes())
            .merge(config::routes())
            .fallback(|uri: axum::http::Uri| async move { NacosError::v1(ApiError::NotFound(format!("no route for {}", uri.path()))) });
        // One `layer` call for the three: axum boxes every route's future once per call.
        routes
            .layer(
                tower::ServiceBuilder::new()
                    .layer(authorize(self.acl.clone()))
                    .layer(zhili_http::audit_writes(&self.core, "nacos"))
                    .layer(zhili_http::limit_bodies(zhili_http::MAX_BODY, None)),
            )
            .with_state(self.clone())
    }

    /// The Nacos gRPC listener's router: the two methods of the `Payload` protocol.
    pub fn grpc_router(&self) -> Router {
        Router::new()
            .route_service("/Request/request", grpc::GrpcMethod { state: self.clone(), bidirectional: false })
            .route_service("/BiRequestStream/requestBiStream", grpc::GrpcMethod { state: self.clone(), bidirectional: true })
            .fallback(|| async { ([(header::CONTENT_TYPE, "application/grpc"), (header::HeaderName::from_static("grpc-status"), "12")], ()) })
    }
}

/// Nacos clients send the token from `auth/login` as `accessToken` (query parameter or header);
/// every refusal is Nacos's `403 token invalid!`.
fn authorize(acl: Arc<zhili_acl::Acl>) -> GateLayer<Authorize> {
    GateLayer(Authorize {
        acl,
        token: |req| {
            req.uri()
                .query()
                .and_then(|q| zhili_http::auth::query_param(q, "accessToken"))
                .or_else(|| req.headers().get("accesstoken").and_then(|v| v.to_str().ok()).map(str::to_string))
                .or_else(|| zhili_http::auth::token_from(req.headers()))
                .filter(|t| !t.is_empty())
        },
        refused: |_| (StatusCode::FORBIDDEN, "token invalid!").into_response(),
    })
}

/// A Nacos error: v1 answers `caused: <detail>` as text, v2 a `{code, message, data}` body.
#[derive(Debug)]
pub struct NacosError {
    pub err: ApiError,
    pub v2: bool,
}

impl NacosError {
    pub fn v1(err: impl Into<ApiError>) -> Self {
        Self { err: err.into(), v2: false }
    }
}

impl<E: Into<ApiError>> From<E> for NacosError {
    fn from(e: E) -> Self {
        Self::v1(e)
    }
}

impl IntoResponse for NacosError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self.err {
            tracing::error!(%cause, "nacos request failed");
        }
        let status = self.err.status();
        if self.v2 {
            let code = match status {
                StatusCode::NOT_FOUND => 20004,
                StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => 403,
                s if s.is_server_error() => 30000,
                _ => 10000,
            };
            let body = json!({"code": code, "message": status.canonical_reason().unwrap_or("error"), "data": self.err.detail()});
            return (status, axum::Json(body)).into_response();
        }
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("caused: {}", self.err.detail())).into_response()
    }
}

pub type NResult<T> = Result<T, NacosError>;

pub fn bad(field: &str, message: impl std::fmt::Display) -> NacosError {
    NacosError::v1(ApiError::BadRequest(format!("Param '{field}' {message}")))
}

/// Request parameters from the query string and a form body together, as Nacos (Spring) reads them.
pub struct Params(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = NacosError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // form_urlencoded decodes leniently (bad escapes stay as they are, invalid UTF-8 becomes
        // U+FFFD), as serde_urlencoded did on top of it: no query string is refused.
        let decode = |raw: &[u8]| form_urlencoded::parse(raw).map(|(k, v)| (k.into_owned(), v.into_owned())).collect::<Vec<_>>();
        let mut pairs = req.uri().query().map(|q| decode(q.as_bytes())).unwrap_or_default();
        let form = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
        if form {
            let body = Bytes::from_request(req, state).await.map_err(|e| NacosError::v1(ApiError::PayloadTooLarge(e.body_text())))?;
            pairs.extend(decode(&body));
        }
        Ok(Self(pairs))
    }
}

impl Params {
    /// A parameter's value; empty values and Python's `None` (what the Python SDK sends for an
    /// unset argument) count as absent.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, v)| k == key && !v.is_empty() && v != "None").map(|(_, v)| v.as_str())
    }

    pub fn required(&self, key: &str) -> NResult<&str> {
        self.get(key).ok_or_else(|| bad(key, "is required"))
    }

    /// Java and Python-style booleans (`true`, `True`, `1`).
    pub fn flag(&self, key: &str) -> NResult<Option<bool>> {
        self.get(key).map(|v| parse_bool(v).ok_or_else(|| bad(key, format!("must be true or false, got {v:?}")))).transpose()
    }

    pub fn namespace(&self) -> NResult<String> {
        zhili_namespace(self.get("namespaceId").or_else(|| self.get("tenant")).or_else(|| self.get("namespace")).unwrap_or(""))
    }
}

pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// Nacos namespace id → Zhili namespace.
pub fn zhili_namespace(id: &str) -> NResult<String> {
    if id.is_empty() || id == PUBLIC {
        return Ok(DEFAULT_NAMESPACE.into());
    }
    zhili_model::validate::name("namespaceId", id)?;
    Ok(id.into())
}

/// Zhili namespace → Nacos namespace id.
pub fn nacos_namespace(ns: &str) -> &str {
    if ns == DEFAULT_NAMESPACE {
        PUBLIC
    } else {
        ns
    }
}

/// A Nacos service reference: `group@@name` or a name with a separate group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub group: String,
    pub name: String,
}

impl ServiceRef {
    pub fn parse(service_name: &str, group: Option<&str>) -> NResult<Self> {
        let (group, name) = match service_name.split_once("@@") {
            Some((g, n)) => (g.to_string(), n.to_string()),
            None => (group.filter(|g| !g.is_empty()).unwrap_or(DEFAULT_GROUP).to_string(), service_name.to_string()),
        };
        zhili_model::validate::name("serviceName", &name)?;
        zhili_model::validate::name("groupName", &group)?;
        Ok(Self { group, name })
    }

    pub fn grouped(&self) -> String {
        format!("{}@@{}", self.group, self.name)
    }
}

/// The Zhili service `name` as a Nacos client sees it under `group`: its instances, or none when
/// the service belongs to another group. Also the service index for change detection.
pub fn instances_of(s: &NacosState, ns: &str, svc: &ServiceRef) -> Vec<Instance> {
    match s.registry.service(ns, &svc.name) {
        Some(d) if d.service.group == svc.group => d.instances,
        _ => vec![],
    }
}

pub fn cluster_of(i: &Instance) -> &str {
    i.zone.as_deref().unwrap_or(DEFAULT_CLUSTER)
}

/// An instance as Nacos clients read it (`Instance` in every SDK).
pub fn instance_json(i: &Instance, svc: &ServiceRef) -> Value {
    let cluster = cluster_of(i);
    json!({
        "instanceId": format!("{}#{}#{}#{}", i.address, i.port, cluster, svc.grouped()),
        "ip": i.address,
        "port": i.port,
        "weight": f64::from(i.weight) / 100.0,
        "healthy": i.maintenance.is_none() && i.health == zhili_model::HealthStatus::Passing,
        "enabled": i.enabled,
        "ephemeral": i.ephemeral,
        "clusterName": cluster,
        "serviceName": svc.grouped(),
        "metadata": i.metadata,
        "instanceHeartBeatInterval": BEAT_INTERVAL_MS,
        "instanceHeartBeatTimeOut": 15000,
        "ipDeleteTimeout": 30000,
    })
}

/// Nacos `ServiceInfo`: the instances of a service (optionally of some clusters) at a point in time.
pub fn service_info(instances: &[Instance], svc: &ServiceRef, clusters: &str, grouped_name: bool, ref_time: u64) -> Value {
    let wanted: Vec<&str> = clusters.split(',').map(str::trim).filter(|c| !c.is_empty()).collect();
    let hosts: Vec<Value> = instances.iter().filter(|i| wanted.is_empty() || wanted.contains(&cluster_of(i))).map(|i| instance_json(i, svc)).collect();
    json!({
        "name": if grouped_name { svc.grouped() } else { svc.name.clone() },
        "groupName": svc.group,
        "clusters": clusters,
        "cacheMillis": 10000,
        "hosts": hosts,
        "lastRefTime": ref_time,
        "checksum": "",
        "allIps": false,
        "reachProtectionThreshold": false,
        "valid": true,
    })
}

/// What a Nacos client asked to register, before mapping onto a Zhili registration.
#[derive(Debug, Clone, Default)]
pub struct NacosInstance {
    pub ip: String,
    pub port: i64,
    pub weight: Option<f64>,
    pub enabled: Option<bool>,
    pub ephemeral: Option<bool>,
    pub cluster: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl NacosInstance {
    pub fn id(&self) -> String {
        match self.cluster.as_deref() {
            None | Some("") | Some(DEFAULT_CLUSTER) => format!("{}:{}", self.ip, self.port),
            Some(c) => format!("{}:{}:{c}", self.ip, self.port),
        }
    }

    pub fn registration(&self) -> Result<InstanceRegistration, ValidationError> {
        let weight = match self.weight {
            None => None,
            Some(w) if !(0.0..=10000.0).contains(&w) || w.is_nan() => return Err(ValidationError::new("weight", format!("must be 0..=10000, got {w}"))),
            Some(w) => Some(((w * 100.0).round() as u32).min(MAX_WEIGHT)),
        };
        if !(0..=65535).contains(&self.port) {
            return Err(ValidationError::new("port", format!("must be 0..=65535, got {}", self.port)));
        }
        let zone = self.cluster.clone().filter(|c| !c.is_empty() && c != DEFAULT_CLUSTER);
        let spec = InstanceSpec {
            id: Some(self.id()),
            address: self.ip.clone(),
            port: self.port as u32,
            weight,
            tags: vec![],
            metadata: self.metadata.clone(),
            zone,
            version: None,
            ephemeral: Some(self.ephemeral.unwrap_or(true)),
            enabled: self.enabled,
            checks: vec![],
        };
        spec.validate().map_err(|e| if e.field == "address" { ValidationError::new("ip", e.message) } else { e })
    }
}

/// Registers `inst` into `svc`, creating the service in its Nacos group when it does not exist yet;
/// an ephemeral instance registered over a gRPC connection is kept alive by that connection (`owner`).
pub async fn register(
    s: &NacosState,
    caller: &Caller,
    ns: &str,
    svc: &ServiceRef,
    inst: &NacosInstance,
    owner: Option<&Arc<zhili_registry::Owner>>,
) -> Result<InstanceRegistration, ApiError> {
    caller.require(Resource::Service, &svc.name, Access::Write)?;
    let reg = inst.registration()?;
    ensure_service(s, ns, svc).await?;
    s.registry.register_owned(ns, &svc.name, reg.clone(), owner.cloned()).await?;
    Ok(reg)
}

/// Makes sure `svc` exists in its group: a group other than the default needs an explicit service.
pub async fn ensure_service(s: &NacosState, ns: &str, svc: &ServiceRef) -> Result<(), ApiError> {
    match s.registry.service_definition(ns, &svc.name) {
        Some(d) if d.group != svc.group => Err(ApiError::Conflict(format!("service {:?} belongs to group {:?}, not {:?}", svc.name, d.group, svc.group))),
        Some(_) => Ok(()),
        None if svc.group == DEFAULT_GROUP => Ok(()),
        None => {
            let spec = zhili_model::ServiceSpec { group: Some(svc.group.clone()), ..Default::default() };
            s.registry.put_service(spec.validate(ns, &svc.name)?).await?;
            Ok(())
        }
    }
}

/// The KV key of a Nacos config.
pub fn config_key(tenant: &str, group: &str, data_id: &str) -> NResult<String> {
    let tenant = if tenant.is_empty() { PUBLIC } else { tenant };
    let group = if group.is_empty() { DEFAULT_GROUP } else { group };
    for (field, v) in [("tenant", tenant), ("group", group), ("dataId", data_id)] {
        let ok = !v.is_empty() && v.len() <= 256 && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !ok {
            return Err(bad(field, format!("{v:?} is illegal: use 1..=256 letters, digits, '-', '_', '.', ':'")));
        }
    }
    Ok(format!("{CONFIG_PREFIX}{tenant}/{group}/{data_id}"))
}

/// Splits a config KV key back into (tenant, group, dataId); `None` for keys Nacos cannot name.
pub fn config_ref(key: &str) -> Option<(String, String, String)> {
    let rest = key.strip_prefix(CONFIG_PREFIX)?;
    let mut parts = rest.splitn(3, '/');
    let (t, g, d) = (parts.next()?, parts.next()?, parts.next()?);
    (!d.contains('/')).then(|| (t.to_string(), g.to_string(), d.to_string()))
}

pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    zhili_model::hex(&md5::Md5::digest(data))
}

/// The Nacos client-facing login answer: the password is a Zhili ACL token secret.
pub fn login(s: &NacosState, username: &str, password: &str) -> Result<Value, ApiError> {
    if username.is_empty() {
        return Err(ApiError::BadRequest("Param 'username' is required".into()));
    }
    // An empty password is no credential (Nacos refuses it too): never hand out an empty token.
    if password.is_empty() {
        return Err(ApiError::Forbidden("unknown user!".into()));
    }
    let global_admin = if s.acl.enabled() {
        let authority = s.acl.resolve(Some(password)).map_err(|_| ApiError::Forbidden("unknown user!".into()))?;
        authority.allows(Resource::Acl, "", Access::Write)
    } else {
        true
    };
    Ok(json!({"accessToken": password, "tokenTtl": 18000, "globalAdmin": global_admin, "username": username}))
}

fn text(body: impl Into<String>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

fn v2_ok(data: Value) -> Response {
    axum::Json(json!({"code": 0, "message": "success", "data": data})).into_response()
}

pub fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn params_join_query_and_form_body_and_decode_leniently() {
        let req = Request::builder()
            .uri("/nacos/v1/ns/instance?serviceName=a%40%40b&bad=%ZZ&ip=&x=None")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded; charset=utf-8")
            .body(axum::body::Body::from("port=8080&metadata=%7B%22k%22%3A%22v+w%22%7D&serviceName=second"))
            .unwrap();
        let p = Params::from_request(req, &()).await.unwrap();
        assert_eq!(p.get("serviceName"), Some("a@@b"), "the query's value comes first");
        assert_eq!(p.get("bad"), Some("%ZZ"));
        assert_eq!((p.get("ip"), p.get("x")), (None, None), "empty and None count as absent");
        assert_eq!(p.get("port"), Some("8080"));
        assert_eq!(p.get("metadata"), Some(r#"{"k":"v w"}"#));
    }

    #[test]
    fn service_refs() {
        assert_eq!(ServiceRef::parse("g1@@svc", None).unwrap(), ServiceRef { group: "g1".into(), name: "svc".into() });
        assert_eq!(ServiceRef::parse("svc", Some("")).unwrap().group, DEFAULT_GROUP);
        assert_eq!(ServiceRef::parse("svc", Some("G")).unwrap().grouped(), "G@@svc");
        assert!(ServiceRef::parse("", None).is_err());
        assert!(ServiceRef::parse("a b", None).is_err());
    }

    #[test]
    fn config_keys_round_trip() {
        let k = config_key("", "", "app.yaml").unwrap();
        assert_eq!(k, "config/public/DEFAULT_GROUP/app.yaml");
        assert_eq!(config_ref(&k), Some(("public".into(), "DEFAULT_GROUP".into(), "app.yaml".into())));
        assert!(config_key("t", "g", "a/b").is_err());
        assert!(config_key("t", "g", "").is_err());
        assert_eq!(config_ref("config/x/y"), None);
    }

    #[test]
    fn weights_and_ids() {
        let mut i = NacosInstance { ip: "10.0.0.1".into(), port: 80, weight: Some(2.5), ..Default::default() };
        let r = i.registration().unwrap();
        assert_eq!((r.id.as_str(), r.weight, r.ephemeral), ("10.0.0.1:80", 250, true));
        i.cluster = Some("c1".into());
        assert_eq!(i.registration().unwrap().zone.as_deref(), Some("c1"));
        assert_eq!(i.id(), "10.0.0.1:80:c1");
        i.weight = Some(-1.0);
        assert_eq!(i.registration().unwrap_err().field, "weight");
        i.weight = None;
        i.port = 70000;
        assert_eq!(i.registration().unwrap_err().field, "port");
        i.port = 1;
        i.ip = "bad host!".into();
        assert_eq!(i.registration().unwrap_err().field, "ip");
    }

    #[test]
    fn md5_matches_nacos() {
        assert_eq!(md5_hex(b"hello"), "5d41402abc4b2a76b9719d911017c592");
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("FALSE"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }
}

//! The Nacos 2.x gRPC protocol: every call carries a `Payload` whose metadata names the request
//! type (`InstanceRequest`, `ConfigQueryRequest`, ...) and whose body is that request as JSON.
//! Unary requests go to `/Request/request`; `/BiRequestStream/requestBiStream` carries the
//! connection setup from the client and the server's pushes. A client is one TCP connection: its
//! id comes from the peer address, and its ephemeral instances live as long as it does.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use zhili_model::acl::{Access, Resource};

use super::hub::{Conn, Subscription, PUSH_QUEUE};
use super::{instances_of, service_info, zhili_namespace, NacosInstance, ServiceRef};
use crate::NacosState;
use zhili_http::auth::Caller;
use zhili_http::error::ApiError;

/// Largest gRPC message accepted or sent.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// A stream that has not sent `ConnectionSetupRequest` by then is closed.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a connection's instances are marked alive while it is open.
const KEEPALIVE_BEAT: Duration = Duration::from_secs(2);

// Nacos error codes the SDKs act on.
const UN_REGISTER: i64 = 301;
const NO_HANDLER: i64 = 302;
const CONFIG_NOT_FOUND: i64 = 300;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(string, tag = "3")]
    pub r#type: String,
    #[prost(string, tag = "8")]
    pub client_ip: String,
    #[prost(map = "string, string", tag = "7")]
    pub headers: HashMap<String, String>,
}

/// `google.protobuf.Any`, written out so no well-known-types crate is needed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    /// Bytes rather than a vector: one server push body is shared by every connection it goes to.
    #[prost(bytes = "bytes", tag = "2")]
    pub value: bytes::Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<Metadata>,
    #[prost(message, optional, tag = "3")]
    pub body: Option<Any>,
}

pub fn payload(kind: &str, body: &Value) -> Payload {
    payload_json(kind, serde_json::to_vec(body).expect("json serializes").into())
}

/// A payload around a body already serialized as JSON.
pub fn payload_json(kind: &str, body: bytes::Bytes) -> Payload {
    Payload { metadata: Some(Metadata { r#type: kind.into(), ..Default::default() }), body: Some(Any { type_url: String::new(), value: body }) }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The two methods of the protocol, as one tower service for the router.
#[derive(Clone)]
pub struct GrpcMethod {
    pub state: NacosState,
    /// `/BiRequestStream/requestBiStream` when true, `/Request/request` otherwise.
    pub bidirectional: bool,
}

fn codec() -> tonic::server::Grpc<tonic_prost::ProstCodec<Payload, Payload>> {
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default()).apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE))
}

impl tower::Service<http::Request<axum::body::Body>> for GrpcMethod {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<axum::body::Body>) -> Self::Future {
        let s = self.state.clone();
        let bidirectional = self.bidirectional;
        Box::pin(async move { Ok(if bidirectional { codec().streaming(Bi(s), req).await } else { codec().unary(Unary(s), req).await }) })
    }
}

fn peer<T>(req: &tonic::Request<T>) -> Result<SocketAddr, tonic::Status> {
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0).ok_or_else(|| tonic::Status::internal("peer address unknown"))
}

struct Unary(NacosState);

impl tonic::server::UnaryService<Payload> for Unary {
    type Response = Payload;
    type Future = BoxFuture<Result<tonic::Response<Payload>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<Payload>) -> Self::Future {
        let s = self.0.clone();
        Box::pin(async move {
            let addr = peer(&req)?;
            let (kind, resp) = handle(&s, addr, req.into_inner()).await;
            Ok(tonic::Response::new(payload_json(&kind, resp)))
        })
    }
}

struct Bi(NacosState);

impl tonic::server::StreamingService<Payload> for Bi {
    type Response = Payload;
    type ResponseStream = ReceiverStream<Result<Payload, tonic::Status>>;
    type Future = BoxFuture<Result<tonic::Response<Self::ResponseStream>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Payload>>) -> Self::Future {
        let s = self.0.clone();
        Box::pin(async move {
            let addr = peer(&req)?;
            // After its setup a client sends on this stream only to answer pushes, so it may
            // rightly stay silent for hours: no read deadline on it. A dead client is found by
            // the connection's keep-alive pings; its stream then ends and its instances go.
            if let Some(quiet) = req.extensions().get::<zhili_net::QuietAllowed>() {
                quiet.allow();
            }
            let (tx, rx) = mpsc::channel(PUSH_QUEUE);
            let conn = Arc::new(Conn::new(s.nacos.conn_id(addr), addr, tx, s.registry.owner()));
            tokio::spawn(run_connection(s, conn, req.into_inner()));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// Serves one client's bidirectional stream until it ends, then removes what the client owned.
async fn run_connection(s: NacosState, conn: Arc<Conn>, mut incoming: tonic::Streaming<Payload>) {
    let mut registered = false;
    let setup_deadline = tokio::time::sleep(SETUP_TIMEOUT);
    tokio::pin!(setup_deadline);
    let mut beat = tokio::time::interval(KEEPALIVE_BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = incoming.message() => match msg {
                Ok(Some(p)) => {
                    let kind = p.metadata.as_ref().map_or("", |m| m.r#type.as_str());
                    if kind == "ConnectionSetupRequest" && !registered {
                        s.nacos.add(conn.clone());
                        registered = true;
                        tracing::debug!(conn = %conn.id, "nacos connection set up");
                    }
                    // Anything else on this stream answers one of our pushes; nothing to do.
                }
                Ok(None) | Err(_) => break,
            },
            _ = beat.tick() => s.registry.beat_owner(&conn.owner),
            _ = conn.kill.notified() => break,
            _ = &mut setup_deadline, if !registered => break,
        }
    }
    s.nacos.close(&s, &conn).await;
}

/// Answers one unary request: returns the response type and its JSON body.
async fn handle(s: &NacosState, addr: SocketAddr, p: Payload) -> (String, Bytes) {
    let meta = p.metadata.unwrap_or_default();
    // The body stays bytes: each request type reads its own fields from it, and the envelope only
    // what every request has. No JSON tree is built and dropped per request.
    let body = p.body.map(|b| b.value).unwrap_or_default();
    let envelope = match Envelope::read(&body) {
        Ok(envelope) => envelope,
        Err(why) => return error("ErrorResponse", 400, format!("body of {} {why}", meta.r#type), ""),
    };
    let request_id = envelope.request_id.as_str();
    let kind = meta.r#type.as_str();
    if kind == "ServerCheckRequest" {
        return ok("ServerCheckResponse", Answer::Fields(json!({"connectionId": s.nacos.conn_id(addr), "supportAbilityNegotiation": false})), request_id);
    }
    let Some(conn) = s.nacos.conn(addr) else {
        return error("ErrorResponse", UN_REGISTER, "Connection is unregistered.".into(), request_id);
    };
    let token = meta.headers.get("accessToken").filter(|t| !t.is_empty()).cloned();
    let caller = match s.acl.resolve(token.as_deref()) {
        Ok(authority) => Caller { authority, token },
        Err(_) => return error("ErrorResponse", 403, "token invalid!".into(), request_id),
    };
    if conn.token.lock().as_deref() != caller.token.as_deref() {
        *conn.token.lock() = caller.token.clone();
    }
    let ctx = Ctx { s, caller, conn };
    let resp_kind = response_kind(kind);
    let result: Result<Answer, ApiError> = match kind {
        "HealthCheckRequest" => Ok(Answer::Fields(json!({}))),
        "InstanceRequest" => ctx.instance(&body, true).await.map(Answer::Fields),
        "PersistentInstanceRequest" => ctx.instance(&body, false).await.map(Answer::Fields),
        "BatchInstanceRequest" => ctx.batch(&body).await.map(Answer::Fields),
        "ServiceQueryRequest" => ctx.query(&body).map(Answer::ServiceInfo),
        "SubscribeServiceRequest" => ctx.subscribe(&body).map(Answer::ServiceInfo),
        "ServiceListRequest" => ctx.list(&body).map(Answer::Fields),
        "ConfigQueryRequest" => match ctx.config_query(&body) {
            Ok(Some(v)) => Ok(Answer::Fields(v)),
            Ok(None) => return error(&resp_kind, CONFIG_NOT_FOUND, "config data not exist".into(), request_id),
            Err(e) => Err(e),
        },
        "ConfigPublishRequest" => match ctx.config_publish(&body).await {
            Ok(true) => Ok(Answer::Fields(json!({}))),
            Ok(false) => return error(&resp_kind, 500, "publish fail: casMd5 does not match the current content".into(), request_id),
            Err(e) => Err(e),
        },
        "ConfigRemoveRequest" => ctx.config_remove(&body).await.map(Answer::Fields),
        "ConfigBatchListenRequest" => ctx.config_listen(&body).map(Answer::Fields),
        _ => return error("ErrorResponse", NO_HANDLER, format!("RequestHandler Not Found: {kind:?}"), request_id),
    };
    if result.is_ok() {
        audit(s, kind, &envelope, ctx.caller.token.as_deref());
    }
    match result {
        Ok(v) => ok(&resp_kind, v, request_id),
        Err(e) => {
            let code = match &e {
                ApiError::Forbidden(_) | ApiError::Unauthorized(_) => 403,
                ApiError::Internal(cause) => {
                    tracing::error!(%cause, kind, "nacos grpc request failed");
                    500
                }
                ApiError::Unavailable(_) => 503,
                _ => 400,
            };
            error("ErrorResponse", code, e.detail().to_string(), request_id)
        }
    }
}

/// Successful writes go to `$audit` like those of the HTTP surfaces: the request type (and
/// its operation) as the method, what it touched as the path, and the token's accessor id.
fn audit(s: &NacosState, kind: &str, e: &Envelope, token: Option<&str>) {
    let path = match kind {
        "InstanceRequest" | "PersistentInstanceRequest" | "BatchInstanceRequest" => format!("naming/{}/{}/{}", e.namespace, e.group_name, e.service_name),
        "ConfigPublishRequest" | "ConfigRemoveRequest" => format!("config/{}/{}/{}", e.tenant, e.group, e.data_id),
        _ => return,
    };
    let method = match e.kind.as_str() {
        "" => kind.to_string(),
        op => format!("{kind}.{op}"),
    };
    let accessor = token.and_then(|t| s.acl.token_by_secret(t)).map(|t| t.accessor_id);
    s.audit.record(zhili_events::AuditRecord { surface: "nacos-grpc", method, path, status: 200, accessor });
}

fn response_kind(request: &str) -> String {
    match request {
        "ServiceQueryRequest" => "QueryServiceResponse".into(),
        "PersistentInstanceRequest" => "InstanceResponse".into(),
        "ConfigBatchListenRequest" => "ConfigChangeBatchListenResponse".into(),
        other => other.strip_suffix("Request").map_or_else(|| "ErrorResponse".into(), |base| format!("{base}Response")),
    }
}

/// What a request answers when it succeeds: its own fields, or a service's info already
/// rendered (cached per service index, [`Ctx::info`]).
enum Answer {
    Fields(Value),
    ServiceInfo(Bytes),
}

fn ok(kind: &str, answer: Answer, request_id: &str) -> (String, Bytes) {
    let body = match answer {
        Answer::Fields(mut body) => {
            if let Some(o) = body.as_object_mut() {
                o.insert("resultCode".into(), 200.into());
                o.insert("errorCode".into(), 0.into());
                o.insert("success".into(), true.into());
                o.insert("message".into(), "".into());
                o.insert("requestId".into(), request_id.into());
            }
            serde_json::to_vec(&body).expect("json serializes")
        }
        Answer::ServiceInfo(info) => {
            let mut body = Vec::with_capacity(info.len() + 128);
            body.extend_from_slice(b"{\"serviceInfo\":");
            body.extend_from_slice(&info);
            body.extend_from_slice(b",\"resultCode\":200,\"errorCode\":0,\"success\":true,\"message\":\"\",\"requestId\":");
            serde_json::to_writer(&mut body, request_id).expect("json serializes");
            body.push(b'}');
            body
        }
    };
    (kind.into(), body.into())
}

fn error(kind: &str, code: i64, message: String, request_id: &str) -> (String, Bytes) {
    tracing::debug!(kind, code, %message, "nacos grpc request refused");
    let body = json!({"resultCode": 500, "errorCode": code, "success": false, "message": message, "requestId": request_id});
    (kind.into(), serde_json::to_vec(&body).expect("json serializes").into())
}

/// SDKs send `null` for unset fields (nacos-sdk-rust does for every `Option`): read it as the default.
fn nullable<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct NamingBody {
    namespace: Option<String>,
    #[serde(deserialize_with = "nullable")]
    service_name: String,
    group_name: Option<String>,
    #[serde(rename = "type")]
    #[serde(deserialize_with = "nullable")]
    kind: String,
    instance: Option<WireInstance>,
    #[serde(deserialize_with = "nullable")]
    instances: Vec<WireInstance>,
    clusters: Option<String>,
    cluster: Option<String>,
    health_only: Option<bool>,
    subscribe: Option<bool>,
    page_no: Option<u64>,
    page_size: Option<u64>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
struct WireInstance {
    #[serde(deserialize_with = "nullable")]
    ip: String,
    #[serde(deserialize_with = "nullable")]
    port: i64,
    weight: Option<f64>,
    enabled: Option<bool>,
    ephemeral: Option<bool>,
    cluster_name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    metadata: HashMap<String, String>,
}

impl WireInstance {
    fn nacos(&self, ephemeral: bool) -> NacosInstance {
        NacosInstance {
            ip: self.ip.clone(),
            port: self.port,
            weight: self.weight,
            enabled: self.enabled,
            ephemeral: Some(ephemeral),
            cluster: self.cluster_name.clone(),
            metadata: self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ConfigBody {
    #[serde(deserialize_with = "nullable")]
    data_id: String,
    #[serde(deserialize_with = "nullable")]
    group: String,
    #[serde(deserialize_with = "nullable")]
    tenant: String,
    content: Option<String>,
    cas_md5: Option<String>,
    listen: Option<bool>,
    #[serde(deserialize_with = "nullable")]
    config_listen_contexts: Vec<ListenContext>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ListenContext {
    #[serde(deserialize_with = "nullable")]
    data_id: String,
    #[serde(deserialize_with = "nullable")]
    group: String,
    #[serde(deserialize_with = "nullable")]
    tenant: String,
    #[serde(deserialize_with = "nullable")]
    md5: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("request body: {e}")))
}

/// What the handler reads of every request body: its id, and the names the audit records. A
/// field of another type than text reads as empty, as it did when these were looked up in a
/// parsed tree; the request's own type still refuses it where it matters.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Envelope {
    #[serde(deserialize_with = "text")]
    request_id: String,
    #[serde(deserialize_with = "text")]
    namespace: String,
    #[serde(deserialize_with = "text")]
    group_name: String,
    #[serde(deserialize_with = "text")]
    service_name: String,
    #[serde(rename = "type", deserialize_with = "text")]
    kind: String,
    #[serde(deserialize_with = "text")]
    tenant: String,
    #[serde(deserialize_with = "text")]
    group: String,
    #[serde(deserialize_with = "text")]
    data_id: String,
}

impl Envelope {
    /// Why not, unless `body` is one JSON object (a struct alone would also take an array).
    fn read(body: &[u8]) -> Result<Self, String> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("is not a JSON object".into());
        }
        serde_json::from_slice(body).map_err(|e| format!("is not valid JSON: {e}"))
    }
}

/// A string as itself, any other JSON value as empty.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        _ => String::new(),
    })
}

struct Ctx<'a> {
    s: &'a NacosState,
    caller: Caller,
    conn: Arc<Conn>,
}

impl Ctx<'_> {
    fn target(&self, b: &NamingBody) -> Result<(String, ServiceRef), ApiError> {
        let ns = zhili_namespace(b.namespace.as_deref().unwrap_or("")).map_err(|e| e.err)?;
        let svc = ServiceRef::parse(&b.service_name, b.group_name.as_deref()).map_err(|e| e.err)?;
        Ok((ns, svc))
    }

    async fn instance(&self, body: &[u8], ephemeral: bool) -> Result<Value, ApiError> {
        let b: NamingBody = parse(body)?;
        let (ns, svc) = self.target(&b)?;
        let inst = b.instance.as_ref().ok_or_else(|| ApiError::BadRequest("Param 'instance' is required".into()))?.nacos(ephemeral);
        match b.kind.as_str() {
            "registerInstance" => {
                let reg = super::register(self.s, &self.caller, &ns, &svc, &inst, ephemeral.then_some(&self.conn.owner)).await?;
                if ephemeral {
                    self.s.nacos.own(&self.conn, &ns, &svc.name, &reg.id);
                }
            }
            "deregisterInstance" => {
                self.caller.require(Resource::Service, &svc.name, Access::Write)?;
                let id = inst.id();
                if self.s.registry.instance(&ns, &svc.name, &id).is_some() {
                    self.s.registry.deregister(&ns, &svc.name, &id).await?;
                }
                self.s.nacos.disown(&self.conn, &ns, &svc.name, &id);
            }
            other => return Err(ApiError::BadRequest(format!("Param 'type' {other:?} is not registerInstance or deregisterInstance"))),
        }
        Ok(json!({"type": b.kind}))
    }

    /// `batchRegisterInstance`: the connection's instances of the service become exactly these.
    async fn batch(&self, body: &[u8]) -> Result<Value, ApiError> {
        let b: NamingBody = parse(body)?;
        let (ns, svc) = self.target(&b)?;
        self.caller.require(Resource::Service, &svc.name, Access::Write)?;
        let wanted: Vec<NacosInstance> = b.instances.iter().map(|i| i.nacos(true)).collect();
        // Validate all before applying any, so a bad entry leaves nothing half-registered.
        for (n, i) in wanted.iter().enumerate() {
            i.registration().map_err(|e| ApiError::BadRequest(format!("instances[{n}].{}: {}", e.field, e.message)))?;
        }
        let mut keep = HashSet::new();
        for i in &wanted {
            let reg = super::register(self.s, &self.caller, &ns, &svc, i, Some(&self.conn.owner)).await?;
            self.s.nacos.own(&self.conn, &ns, &svc.name, &reg.id);
            keep.insert(reg.id);
        }
        let before = self.conn.instances.lock().ids(&ns, &svc.name);
        for id in before.into_iter().filter(|id| !keep.contains(id)) {
            if self.s.registry.instance(&ns, &svc.name, &id).is_some() {
                self.s.registry.deregister(&ns, &svc.name, &id).await?;
            }
            self.s.nacos.disown(&self.conn, &ns, &svc.name, &id);
        }
        Ok(json!({"type": b.kind}))
    }

    /// A service's info as JSON, rendered once per service index and query like the HTTP
    /// instance list (the index covers every field shown; `lastRefTime` is the rendering's).
    fn info(&self, ns: &str, svc: &ServiceRef, clusters: &str, healthy_only: bool) -> Result<Bytes, ApiError> {
        let index = self.s.registry.service_index(ns, &svc.name);
        let key = (ns.to_string(), svc.grouped(), clusters.to_string(), healthy_only);
        if let Some(body) = self.s.service_infos.get(&key, index) {
            return Ok(body);
        }
        let mut instances = instances_of(self.s, ns, svc);
        if healthy_only {
            instances.retain(|i| i.is_serving());
        }
        let info = service_info(&instances, svc, clusters, false, self.s.nacos.ref_time());
        let body = Bytes::from(serde_json::to_vec(&info).map_err(|e| ApiError::Internal(e.to_string()))?);
        self.s.service_infos.put(key, index, body.clone());
        Ok(body)
    }

    fn query(&self, body: &[u8]) -> Result<Bytes, ApiError> {
        let b: NamingBody = parse(body)?;
        let (ns, svc) = self.target(&b)?;
        self.caller.require(Resource::Service, &svc.name, Access::Read)?;
        let clusters = b.cluster.or(b.clusters).unwrap_or_default();
        self.info(&ns, &svc, &clusters, b.health_only.unwrap_or(false))
    }

    fn subscribe(&self, body: &[u8]) -> Result<Bytes, ApiError> {
        let b: NamingBody = parse(body)?;
        let (ns, svc) = self.target(&b)?;
        self.caller.require(Resource::Service, &svc.name, Access::Read)?;
        let clusters = b.clusters.unwrap_or_default();
        let sub = Subscription { namespace: ns.clone(), service: svc.clone(), clusters: clusters.clone() };
        if b.subscribe.unwrap_or(true) {
            self.conn.subscriptions.lock().insert(sub);
        } else {
            self.conn.subscriptions.lock().remove(&sub);
        }
        self.info(&ns, &svc, &clusters, false)
    }

    fn list(&self, body: &[u8]) -> Result<Value, ApiError> {
        let b: NamingBody = parse(body)?;
        let ns = zhili_namespace(b.namespace.as_deref().unwrap_or("")).map_err(|e| e.err)?;
        let group = b.group_name.filter(|g| !g.is_empty()).unwrap_or_else(|| zhili_model::DEFAULT_GROUP.into());
        let (page_no, page_size) = (b.page_no.unwrap_or(1).max(1), b.page_size.unwrap_or(10).clamp(1, 1000));
        let names = super::naming::service_names(self.s, &self.caller, &ns, &group);
        let page: Vec<&String> = names.iter().skip(((page_no - 1) * page_size) as usize).take(page_size as usize).collect();
        Ok(json!({"count": names.len(), "serviceNames": page}))
    }

    fn config_query(&self, body: &[u8]) -> Result<Option<Value>, ApiError> {
        let b: ConfigBody = parse(body)?;
        let key = super::config_key(&b.tenant, &b.group, &b.data_id).map_err(|e| e.err)?;
        Ok(super::config::read(self.s, &self.caller, &key)?.map(|c| {
            json!({"content": c.content(), "md5": c.md5(), "lastModified": c.last_modified, "contentType": "text", "encryptedDataKey": "", "beta": false, "isBeta": false})
        }))
    }

    async fn config_publish(&self, body: &[u8]) -> Result<bool, ApiError> {
        let b: ConfigBody = parse(body)?;
        let key = super::config_key(&b.tenant, &b.group, &b.data_id).map_err(|e| e.err)?;
        let content = b.content.ok_or_else(|| ApiError::BadRequest("Param 'content' is required".into()))?;
        super::config::publish(self.s, &self.caller, &key, &content, b.cas_md5.as_deref().filter(|m| !m.is_empty())).await
    }

    async fn config_remove(&self, body: &[u8]) -> Result<Value, ApiError> {
        let b: ConfigBody = parse(body)?;
        let key = super::config_key(&b.tenant, &b.group, &b.data_id).map_err(|e| e.err)?;
        super::config::remove(self.s, &self.caller, &key).await?;
        Ok(json!({}))
    }

    /// Starts (or stops) listening on configs; answers those already different from the client's md5.
    fn config_listen(&self, body: &[u8]) -> Result<Value, ApiError> {
        let b: ConfigBody = parse(body)?;
        let listen = b.listen.unwrap_or(true);
        let mut changed = vec![];
        for c in &b.config_listen_contexts {
            let key = super::config_key(&c.tenant, &c.group, &c.data_id).map_err(|e| e.err)?;
            if !listen {
                self.conn.listening.lock().remove(&key);
                continue;
            }
            let current = super::config::read(self.s, &self.caller, &key)?;
            self.conn.listening.lock().insert(key);
            if current.as_ref().map_or("", super::config::ConfigItem::md5) != c.md5 {
                changed.push(json!({"dataId": c.data_id, "group": c.group, "tenant": c.tenant}));
            }
        }
        // Also pushed: some SDKs (nacos-sdk-rust) send this request without reading the answer,
        // and a change between their read and this request would otherwise wait for their
        // periodic full sync.
        for c in &changed {
            if !self.conn.send(&self.s.nacos, "ConfigChangeNotifyRequest", c.clone()) {
                self.conn.kill.notify_one();
            }
        }
        Ok(json!({"changedConfigs": changed}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_kinds() {
        assert_eq!(response_kind("InstanceRequest"), "InstanceResponse");
        assert_eq!(response_kind("ServiceQueryRequest"), "QueryServiceResponse");
        assert_eq!(response_kind("ConfigBatchListenRequest"), "ConfigChangeBatchListenResponse");
        assert_eq!(response_kind("Nonsense"), "ErrorResponse");
    }

    #[test]
    fn the_envelope_is_read_from_any_object_and_only_an_object() {
        let e = Envelope::read(br#" {"requestId": "7", "namespace": 5, "groupName": null, "serviceName": "s", "instance": {"ip": "x"}}"#).unwrap();
        assert_eq!((e.request_id.as_str(), e.namespace.as_str(), e.group_name.as_str(), e.service_name.as_str()), ("7", "", "", "s"));
        for refused in [&b"[\"7\"]"[..], b"\"x\"", b"", b"{\"requestId\": 1", b"{} {}"] {
            assert!(Envelope::read(refused).is_err(), "{:?}", String::from_utf8_lossy(refused));
        }
    }

    #[test]
    fn nulls_read_as_defaults() {
        let b: ConfigBody = parse(br#"{"dataId": null, "group": "G", "tenant": null, "configListenContexts": null}"#).unwrap();
        assert_eq!((b.data_id.as_str(), b.group.as_str(), b.tenant.as_str()), ("", "G", ""));
        let b: NamingBody = parse(br#"{"serviceName": "s", "instance": {"ip": "1.2.3.4", "port": 1, "metadata": null}}"#).unwrap();
        assert!(b.instance.unwrap().metadata.is_empty());
        assert!(parse::<NamingBody>(br#"{"serviceName": 5}"#).is_err());
    }

    const NACOS_KEYS: &[&str] = &[
        "namespace",
        "serviceName",
        "groupName",
        "type",
        "instance",
        "instances",
        "clusters",
        "cluster",
        "healthOnly",
        "subscribe",
        "pageNo",
        "pageSize",
        "ip",
        "port",
        "weight",
        "enabled",
        "ephemeral",
        "clusterName",
        "metadata",
        "dataId",
        "group",
        "tenant",
        "content",
        "casMd5",
        "listen",
        "configListenContexts",
        "md5",
        "requestId",
    ];

    proptest::proptest! {
        /// Any bytes on the wire decode to a payload or an error, never a panic.
        #[test]
        fn arbitrary_payload_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            use prost::Message;
            if let Ok(p) = Payload::decode(bytes.as_slice()) {
                let _ = p.body.map(|b| serde_json::from_slice::<Value>(&b.value));
            }
        }

        /// Any JSON body: the typed request bodies, the instance they carry, the service and
        /// config names they name parse or fail with a message, never panic.
        #[test]
        fn arbitrary_bodies_never_panic(v in zhili_test_support::json::arbitrary_json(NACOS_KEYS)) {
            let v = serde_json::to_vec(&v).unwrap();
            let _ = Envelope::read(&v);
            if let Ok(b) = parse::<NamingBody>(&v) {
                let _ = crate::ServiceRef::parse(&b.service_name, b.group_name.as_deref());
                let _ = crate::zhili_namespace(b.namespace.as_deref().unwrap_or(""));
                for i in b.instance.iter().chain(b.instances.iter()) {
                    let _ = i.nacos(true).registration();
                }
            }
            if let Ok(b) = parse::<ConfigBody>(&v) {
                let _ = crate::config_key(&b.tenant, &b.group, &b.data_id);
                for c in &b.config_listen_contexts {
                    if let Ok(key) = crate::config_key(&c.tenant, &c.group, &c.data_id) {
                        proptest::prop_assert!(crate::config_ref(&key).is_some(), "{key}");
                    }
                }
            }
        }
    }

    #[test]
    fn payload_round_trips_through_protobuf() {
        use prost::Message;
        let p = payload("HealthCheckRequest", &json!({"requestId": "1"}));
        let bytes = p.encode_to_vec();
        let back = Payload::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, p);
        assert!(Payload::decode(&b"\xff\xff\xff"[..]).is_err());
    }

    #[test]
    fn a_cached_service_info_answer_is_one_valid_reply() {
        let info = Bytes::from_static(br#"{"name":"a","hosts":[{"ip":"10.0.0.1"}]}"#);
        let (kind, body) = ok("QueryServiceResponse", Answer::ServiceInfo(info), "7\"x");
        assert_eq!(kind, "QueryServiceResponse");
        let v: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(v["serviceInfo"]["hosts"][0]["ip"], "10.0.0.1");
        assert_eq!((v["resultCode"].as_i64(), v["success"].as_bool()), (Some(200), Some(true)));
        assert_eq!(v["requestId"], "7\"x", "the request id is escaped, not spliced raw");
        let (_, fields) = ok("HealthCheckResponse", Answer::Fields(json!({})), "8");
        let v: Value = serde_json::from_slice(&fields).unwrap();
        assert_eq!((v["requestId"].as_str(), v["errorCode"].as_i64()), (Some("8"), Some(0)));
    }
}

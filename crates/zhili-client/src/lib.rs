//! Zhili's Rust SDK: the native HTTP API as typed calls, plus the pieces a service needs to live
//! in the registry: a [`Registration`] that heartbeats and re-registers when the server forgets
//! it, a [`ServiceCache`] kept fresh by blocking reads, and client-side [`Balancer`]s; DTM-protocol
//! transactions ([`dtm`]) with the sub-transaction barrier for branch handlers ([`barrier`]).

mod balance;
pub mod barrier;
pub mod dtm;
pub mod events;
mod registration;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
pub use zhili_model::report::{InstanceReport, PlannedWork, ReportSpec, ReportTask};
pub use zhili_model::{Instance, InstanceList, InstanceSpec, ServiceDetail, ServiceSpec, ServiceSummary};

pub use balance::{Balancer, RoundRobin, SmoothWeighted};
pub use events::{Appended, Expected, GroupEvent, NackAction, PublishAck, Publisher, ReadEvent, ReadPage, Subscription};
pub use registration::{Registration, RegistrationOptions, ServiceCache};

/// A response larger than this is refused rather than buffered without bound.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// Added to a blocking read's wait before the client gives up on the server.
const WAIT_SLACK: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error; `detail` is its problem+json detail.
    #[error("{status}: {detail}")]
    Api { status: StatusCode, detail: String },
    #[error("cannot reach the server: {0}")]
    Transport(String),
    #[error("unexpected response: {0}")]
    Decode(String),
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A raw response: status, the `X-Zhili-Index` header, and the body.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub index: u64,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPair {
    pub key: String,
    pub value: String,
    pub create_index: u64,
    pub modify_index: u64,
    pub version: u64,
    #[serde(default)]
    pub lease: Option<u64>,
}

impl KvPair {
    /// The decoded value bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, ClientError> {
        base64::engine::general_purpose::STANDARD.decode(&self.value).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

/// Discovery filters.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Include instances that are not serving (default: healthy only).
    pub all: bool,
    pub tags: Vec<String>,
    pub metadata: Vec<(String, String)>,
    pub zone: Option<String>,
    pub namespace: Option<String>,
}

impl Query {
    fn to_query_string(&self) -> String {
        let mut pairs: Vec<(String, String)> = Vec::new();
        if self.all {
            pairs.push(("healthy".into(), "false".into()));
        }
        for t in &self.tags {
            pairs.push(("tag".into(), t.clone()));
        }
        for (k, v) in &self.metadata {
            pairs.push((format!("meta.{k}"), v.clone()));
        }
        if let Some(z) = &self.zone {
            pairs.push(("zone".into(), z.clone()));
        }
        if let Some(ns) = &self.namespace {
            pairs.push(("namespace".into(), ns.clone()));
        }
        encode_pairs(&pairs)
    }
}

fn encode_pairs(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

/// Percent-encodes everything but unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Encodes a KV key for a URL path, keeping its slashes.
fn encode_key(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

#[derive(Deserialize)]
struct Problem {
    detail: String,
}

/// A non-2xx answer as [`ClientError::Api`] with its problem detail.
pub(crate) fn check(resp: RawResponse) -> Result<RawResponse, ClientError> {
    if !resp.status.is_success() {
        let detail = serde_json::from_slice::<Problem>(&resp.body).map(|p| p.detail).unwrap_or_else(|_| String::from_utf8_lossy(&resp.body).into_owned());
        return Err(ClientError::Api { status: resp.status, detail });
    }
    Ok(resp)
}

/// A handle to one Zhili server. Cheap to clone; connections are pooled.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// `addr` is `http://host:port` (or `host:port`).
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::build(addr, token, false)
    }

    /// Like [`Client::new`], speaking HTTP/2 without TLS from the first byte (h2c with prior
    /// knowledge), as gRPC clients do.
    pub fn new_h2c(addr: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::build(addr, token, true)
    }

    fn build(addr: &str, token: Option<String>, h2c: bool) -> Result<Self, ClientError> {
        let base = if addr.contains("://") { addr.trim_end_matches('/').to_string() } else { format!("http://{}", addr.trim_end_matches('/')) };
        if base.starts_with("https://") {
            return Err(ClientError::Config("https is not supported by this client yet; use http:// or a local TLS terminator".into()));
        }
        if !base.starts_with("http://") {
            return Err(ClientError::Config(format!("{addr:?} is not an http:// address")));
        }
        base.parse::<http::Uri>().map_err(|e| ClientError::Config(format!("{addr:?}: {e}")))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).http2_only(h2c).build(connector);
        Ok(Self { base, token: token.filter(|t| !t.is_empty()), http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The ACL token this client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Sends one request and returns the response whatever its status. `timeout` bounds the
    /// whole exchange.
    pub async fn send(&self, method: Method, path_and_query: &str, body: Option<Bytes>, timeout: Duration) -> Result<RawResponse, ClientError> {
        let mut req = Request::builder().method(method).uri(path_and_query);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(body.unwrap_or_default()).map_err(|e| ClientError::Config(e.to_string()))?;
        self.send_request(req, timeout).await
    }

    /// Sends a request built by the caller (its URI is a path and query on this server; its
    /// headers are kept) and returns the response whatever its status.
    pub async fn send_request(&self, req: Request<Bytes>, timeout: Duration) -> Result<RawResponse, ClientError> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = format!("{}{}", self.base, path).parse().map_err(|e: http::uri::InvalidUri| ClientError::Config(e.to_string()))?;
        if let Some(t) = &self.token {
            if !parts.headers.contains_key("authorization") {
                parts
                    .headers
                    .insert("authorization", format!("Bearer {t}").parse().map_err(|_| ClientError::Config("token is not a valid header value".into()))?);
            }
        }
        let req = Request::from_parts(parts, Full::new(body));
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| ClientError::Transport(zhili_model::error_chain(&e)))?;
            let status = resp.status();
            let index = resp.headers().get("x-zhili-index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
            let headers = resp.headers().clone();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await.map_err(|e| ClientError::Transport(e.to_string()))?.to_bytes();
            Ok::<_, ClientError>(RawResponse { status, headers, index, body })
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| ClientError::Transport(format!("no answer within {timeout:?}")))?
    }

    /// Like [`Client::send`], but a non-2xx answer becomes [`ClientError::Api`] with its detail.
    pub async fn raw(&self, method: Method, path_and_query: &str, body: Option<Bytes>, timeout: Duration) -> Result<RawResponse, ClientError> {
        check(self.send(method, path_and_query, body, timeout).await?)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<RawResponse, ClientError> {
        self.raw(method, path, body, REQUEST_TIMEOUT).await
    }

    async fn json<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<(u64, T), ClientError> {
        let r = self.call(method, path, body).await?;
        let v = serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((r.index, v))
    }

    fn body<T: Serialize>(v: &T) -> Option<Bytes> {
        Some(Bytes::from(serde_json::to_vec(v).expect("request serializes")))
    }

    // ---- registry ----

    pub async fn put_service(&self, name: &str, spec: &ServiceSpec) -> Result<(), ClientError> {
        self.call(Method::PUT, &format!("/api/v1/services/{}", encode(name)), Self::body(spec)).await.map(|_| ())
    }

    pub async fn service(&self, name: &str) -> Result<ServiceDetail, ClientError> {
        Ok(self.json(Method::GET, &format!("/api/v1/services/{}", encode(name)), None).await?.1)
    }

    pub async fn services(&self) -> Result<Vec<ServiceSummary>, ClientError> {
        Ok(self.json(Method::GET, "/api/v1/services", None).await?.1)
    }

    pub async fn delete_service(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/api/v1/services/{}", encode(name)), None).await.map(|_| ())
    }

    /// Registers an instance and returns its id.
    pub async fn register(&self, service: &str, spec: &InstanceSpec) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct Created {
            id: String,
        }
        let (_, c): (u64, Created) = self.json(Method::POST, &format!("/api/v1/services/{}/instances", encode(service)), Self::body(spec)).await?;
        Ok(c.id)
    }

    pub async fn deregister(&self, service: &str, id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/api/v1/services/{}/instances/{}", encode(service), encode(id)), None).await.map(|_| ())
    }

    pub async fn heartbeat(&self, service: &str, id: &str) -> Result<(), ClientError> {
        self.call(Method::PUT, &format!("/api/v1/services/{}/instances/{}/heartbeat", encode(service), encode(id)), None).await.map(|_| ())
    }

    pub async fn set_check(&self, service: &str, id: &str, check: &str, status: &str, output: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "status": status, "output": output });
        self.call(Method::PUT, &format!("/api/v1/services/{}/instances/{}/checks/{}", encode(service), encode(id), encode(check)), Self::body(&body))
            .await
            .map(|_| ())
    }

    pub async fn maintenance(&self, service: &str, id: &str, enabled: bool, reason: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "enabled": enabled, "reason": reason });
        self.call(Method::PUT, &format!("/api/v1/services/{}/instances/{}/maintenance", encode(service), encode(id)), Self::body(&body)).await.map(|_| ())
    }

    /// Reports the instance's own state, tasks and planned work; the server validates it and
    /// keeps the latest (durably for persistent instances).
    pub async fn report(&self, service: &str, id: &str, report: &ReportSpec) -> Result<(), ClientError> {
        self.call(Method::PUT, &format!("/api/v1/services/{}/instances/{}/report", encode(service), encode(id)), Self::body(report)).await.map(|_| ())
    }

    /// Discovery. With `block = Some((index, wait))` the call returns once the service changes
    /// past `index`, or after `wait`.
    pub async fn instances(&self, service: &str, q: &Query, block: Option<(u64, Duration)>) -> Result<InstanceList, ClientError> {
        let mut path = format!("/api/v1/services/{}/instances?{}", encode(service), q.to_query_string());
        let mut timeout = REQUEST_TIMEOUT;
        if let Some((index, wait)) = block {
            path.push_str(&format!("&index={index}&wait={}ms", wait.as_millis()));
            timeout = wait + wait / 16 + WAIT_SLACK;
        }
        let r = self.raw(Method::GET, &path, None, timeout).await?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    // ---- kv ----

    pub async fn kv_get(&self, key: &str) -> Result<Option<KvPair>, ClientError> {
        match self.json(Method::GET, &format!("/api/v1/kv/{}", encode_key(key)), None).await {
            Ok((_, kv)) => Ok(Some(kv)),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Blocks until the key changes after `index` (or `wait` passes); returns the value and the
    /// index to continue from.
    pub async fn kv_watch(&self, key: &str, index: u64, wait: Duration) -> Result<(u64, Option<KvPair>), ClientError> {
        let path = format!("/api/v1/kv/{}?index={index}&wait={}ms", encode_key(key), wait.as_millis());
        let r = self.send(Method::GET, &path, None, wait + wait / 16 + WAIT_SLACK).await?;
        // A missing key is an answer too: its index says where to continue watching from.
        if r.status == StatusCode::NOT_FOUND {
            return Ok((r.index, None));
        }
        if !r.status.is_success() {
            return Err(ClientError::Api { status: r.status, detail: String::from_utf8_lossy(&r.body).into_owned() });
        }
        Ok((r.index, Some(serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))?)))
    }

    pub async fn kv_list(&self, prefix: &str) -> Result<Vec<KvPair>, ClientError> {
        let path = if prefix.is_empty() { "/api/v1/kv?recurse".to_string() } else { format!("/api/v1/kv/{}?recurse", encode_key(prefix)) };
        Ok(self.json(Method::GET, &path, None).await?.1)
    }

    pub async fn kv_keys(&self, prefix: &str, separator: Option<&str>) -> Result<Vec<String>, ClientError> {
        let sep = separator.map(|s| format!("&separator={}", encode(s))).unwrap_or_default();
        let path = if prefix.is_empty() { format!("/api/v1/kv?keys{sep}") } else { format!("/api/v1/kv/{}?keys{sep}", encode_key(prefix)) };
        Ok(self.json(Method::GET, &path, None).await?.1)
    }

    /// Writes a value; `cas = Some(i)` writes only if the key's modify index is `i` (0: absent).
    /// Returns the new index.
    pub async fn kv_put(&self, key: &str, value: impl Into<Bytes>, cas: Option<u64>) -> Result<u64, ClientError> {
        let q = cas.map(|c| format!("?cas={c}")).unwrap_or_default();
        Ok(self.call(Method::PUT, &format!("/api/v1/kv/{}{q}", encode_key(key)), Some(value.into())).await?.index)
    }

    pub async fn kv_delete(&self, key: &str, recurse: bool) -> Result<u64, ClientError> {
        let q = if recurse { "?recurse" } else { "" };
        Ok(self.call(Method::DELETE, &format!("/api/v1/kv/{}{q}", encode_key(key)), None).await?.index)
    }

    // ---- acl ----

    pub async fn acl_bootstrap(&self) -> Result<serde_json::Value, ClientError> {
        Ok(self.json(Method::POST, "/api/v1/acl/bootstrap", None).await?.1)
    }

    /// Any JSON call by path, for the CLI's less common commands.
    pub async fn json_call(&self, method: Method, path: &str, body: Option<&serde_json::Value>) -> Result<serde_json::Value, ClientError> {
        let r = self.call(method, path, body.and_then(Self::body)).await?;
        if r.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

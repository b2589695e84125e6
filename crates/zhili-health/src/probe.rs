//! The probes themselves. Each returns a status and a human-readable output; none can hang past
//! its timeout.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use zhili_model::{CheckKind, HealthStatus};

/// Bytes of an HTTP check's response body kept as its output (as Consul does).
const MAX_OUTPUT: usize = 4096;

pub struct ProbeResult {
    pub status: HealthStatus,
    pub output: String,
}

impl ProbeResult {
    fn new(status: HealthStatus, output: impl Into<String>) -> Self {
        Self { status, output: output.into() }
    }
}

/// Shared HTTP clients, so repeated checks of one target reuse a pooled connection.
pub struct Probe {
    http: Client<HttpConnector, Empty<Bytes>>,
    grpc: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let http = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).pool_max_idle_per_host(1).build(connector.clone());
        let grpc = Client::builder(TokioExecutor::new()).http2_only(true).pool_idle_timeout(Duration::from_secs(90)).build(connector);
        Self { http, grpc }
    }

    pub async fn run(&self, kind: &CheckKind, timeout: Duration) -> ProbeResult {
        let fut = async {
            match kind {
                CheckKind::Http { url, method, headers } => self.http_check(url, method, headers).await,
                CheckKind::Tcp { address } => tcp_check(address).await,
                CheckKind::Grpc { address, grpc_service } => self.grpc_check(address, grpc_service).await,
                CheckKind::Ttl { .. } | CheckKind::Manual => ProbeResult::new(HealthStatus::Critical, "ttl and manual checks are not probed"),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => ProbeResult::new(HealthStatus::Critical, format!("timed out after {}", zhili_model::format_duration(timeout))),
        }
    }

    async fn http_check(&self, url: &str, method: &str, headers: &std::collections::BTreeMap<String, String>) -> ProbeResult {
        let mut req = http::Request::builder().method(method).uri(url).header("user-agent", "zhili-health-check/1");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = match req.body(Empty::new()) {
            Ok(r) => r,
            Err(e) => return ProbeResult::new(HealthStatus::Critical, format!("invalid request: {e}")),
        };
        let resp = match self.http.request(req).await {
            Ok(r) => r,
            Err(e) => return ProbeResult::new(HealthStatus::Critical, format!("{method} {url}: {}", zhili_model::error_chain(&e))),
        };
        let code = resp.status();
        let status = if code.is_success() {
            HealthStatus::Passing
        } else if code.as_u16() == 429 {
            HealthStatus::Warning
        } else {
            HealthStatus::Critical
        };
        let mut body = BytesMut::new();
        let mut stream = resp.into_body();
        while body.len() < MAX_OUTPUT {
            match stream.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        body.extend_from_slice(d.get(..d.len().min(MAX_OUTPUT - body.len())).unwrap_or_default());
                    }
                }
                _ => break,
            }
        }
        ProbeResult::new(status, format!("HTTP {method} {url}: {code} Output: {}", String::from_utf8_lossy(&body)))
    }

    async fn grpc_check(&self, address: &str, service: &str) -> ProbeResult {
        let uri = format!("http://{address}/grpc.health.v1.Health/Check");
        let req = http::Request::builder()
            .method("POST")
            .uri(&uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", "zhili-health-check/1")
            .body(Full::new(grpc_frame(&encode_health_request(service))));
        let req = match req {
            Ok(r) => r,
            Err(e) => return ProbeResult::new(HealthStatus::Critical, format!("invalid request: {e}")),
        };
        let resp = match self.grpc.request(req).await {
            Ok(r) => r,
            Err(e) => return ProbeResult::new(HealthStatus::Critical, format!("gRPC {address}: {}", zhili_model::error_chain(&e))),
        };
        if !resp.status().is_success() {
            return ProbeResult::new(HealthStatus::Critical, format!("gRPC {address}: HTTP {}", resp.status()));
        }
        let header_status = grpc_status(resp.headers());
        let collected = match Limited::new(resp.into_body(), 64 * 1024).collect().await {
            Ok(c) => c,
            Err(e) => return ProbeResult::new(HealthStatus::Critical, format!("gRPC {address}: reading response: {e}")),
        };
        let trailer_status = collected.trailers().and_then(grpc_status);
        if let Some((code, msg)) = trailer_status.or(header_status).filter(|(c, _)| *c != 0) {
            return ProbeResult::new(HealthStatus::Critical, format!("gRPC {address} service {service:?}: grpc-status {code} {msg}"));
        }
        let mut body = collected.to_bytes();
        if body.len() < 5 {
            return ProbeResult::new(HealthStatus::Critical, format!("gRPC {address}: empty response"));
        }
        body.advance(1);
        let len = body.get_u32() as usize;
        let status = decode_health_status(body.get(..len.min(body.len())).unwrap_or_default());
        match status {
            Some(1) => ProbeResult::new(HealthStatus::Passing, format!("gRPC {address} service {service:?}: SERVING")),
            Some(s) => ProbeResult::new(HealthStatus::Critical, format!("gRPC {address} service {service:?}: {}", serving_status_name(s))),
            None => ProbeResult::new(HealthStatus::Critical, format!("gRPC {address}: malformed HealthCheckResponse")),
        }
    }
}

async fn tcp_check(address: &str) -> ProbeResult {
    match tokio::net::TcpStream::connect(address).await {
        Ok(_) => ProbeResult::new(HealthStatus::Passing, format!("TCP connect {address}: Success")),
        Err(e) => ProbeResult::new(HealthStatus::Critical, format!("TCP connect {address}: {e}")),
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<(u32, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let msg = h.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("").to_string();
    Some((code, msg))
}

/// A length-prefixed gRPC message (uncompressed).
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

/// `HealthCheckRequest { string service = 1; }` in protobuf wire format.
pub fn encode_health_request(service: &str) -> Vec<u8> {
    if service.is_empty() {
        return vec![];
    }
    let mut out = vec![0x0a];
    let mut len = service.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(service.as_bytes());
    out
}

fn read_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Reads field 1 (`ServingStatus status`) of a `HealthCheckResponse`; absent means UNKNOWN (0).
pub fn decode_health_status(mut b: &[u8]) -> Option<u64> {
    let mut status = 0;
    while !b.is_empty() {
        let tag = read_varint(&mut b)?;
        match (tag >> 3, tag & 7) {
            (1, 0) => status = read_varint(&mut b)?,
            (_, 0) => {
                read_varint(&mut b)?;
            }
            (_, 2) => {
                let len = read_varint(&mut b)? as usize;
                b = b.get(len..)?;
            }
            (_, 5) => b = b.get(4..)?,
            (_, 1) => b = b.get(8..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn serving_status_name(s: u64) -> &'static str {
    match s {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "unrecognised status",
    }
}

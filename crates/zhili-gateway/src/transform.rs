//! The transform phase: the request the upstream gets. Hop-by-hop headers go, the forwarding
//! headers (`x-forwarded-*`, `x-request-id`, `traceparent`) and the route's header operations
//! are applied, and what route auth asserts about the caller replaces anything the client sent.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Uri;
use rand::Rng;
use zhili_model::route::HeaderOps;

use crate::auth::Identity;
use crate::table::Route;

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = crate::body::connection_tokens(h).filter_map(|n| HeaderName::from_bytes(n).ok()).collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
}

pub fn apply_ops(h: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            h.remove(n);
        }
    }
    for (k, v) in &ops.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            h.insert(n, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            h.append(n, v);
        }
    }
}

/// Writes `v` as `out.len()` lower-case hex digits.
fn hex(mut v: u128, out: &mut [u8]) {
    for b in out.iter_mut().rev() {
        let d = (v & 0xf) as u8;
        *b = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        v >>= 4;
    }
}

/// A random request id of 32 hex digits.
// Header names the request path sets on every request, parsed once.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

pub fn request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    hex(rand::rng().random::<u128>(), &mut buf);
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

/// W3C trace context: keep the caller's trace id with a new parent id (this hop), or start one.
fn traceparent(h: &HeaderMap) -> HeaderValue {
    // 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>
    let incoming = h
        .get(&TRACEPARENT)
        .and_then(|v| <&[u8; 55]>::try_from(v.as_bytes()).ok())
        .filter(|v| v[2] == b'-' && v[35] == b'-' && v[52] == b'-' && v.iter().enumerate().all(|(i, b)| matches!(i, 2 | 35 | 52) || b.is_ascii_hexdigit()));
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let mut rng = rand::rng();
    match incoming {
        Some(v) => {
            out[3..35].copy_from_slice(&v[3..35]);
            out[53..55].copy_from_slice(&v[53..55]);
        }
        None => hex(rng.random::<u128>(), &mut out[3..35]),
    }
    hex(u128::from(rng.random::<u64>()), &mut out[36..52]);
    HeaderValue::from_bytes(&out).expect("hex is a valid header value")
}

/// What the upstream is told about where the request came from.
pub struct Forwarded<'a> {
    /// The normalized authority routing matched: the upstream's Host.
    pub authority: &'a str,
    pub client_ip: &'a str,
    pub tls: bool,
    pub request_id: &'a HeaderValue,
    pub grpc: bool,
    /// A WebSocket upgrade: its Connection and Upgrade headers are kept.
    pub websocket: bool,
}

/// The headers the upstream gets for a request that came with `headers` and `uri`, and the
/// query string to send instead of the client's when route auth hid a credential in it.
pub fn upstream_headers(mut headers: HeaderMap, uri: &Uri, route: &Route, identity: Option<&Identity>, f: &Forwarded<'_>) -> (HeaderMap, Option<String>) {
    let trace = traceparent(&headers);
    let upgrade = f.websocket.then(|| (headers.get(header::CONNECTION).cloned(), headers.get(header::UPGRADE).cloned()));
    strip_hop_by_hop(&mut headers);
    if let Some((Some(c), Some(u))) = upgrade {
        headers.insert(header::CONNECTION, c);
        headers.insert(header::UPGRADE, u);
    }
    if f.grpc {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", f.client_ip),
        None => f.client_ip.to_string(),
    };
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(if f.tls { "https" } else { "http" }));
    // The authority routing matched is the one the upstream sees (never a second Host header or
    // a different :authority); `Connection: host` cannot remove it.
    headers.remove(header::HOST);
    if let Some(h) = Some(f.authority).filter(|a| !a.is_empty()).and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        headers.insert(header::HOST, h);
    }
    // The gateway answers `100-continue` itself (when it reads the body); the identity header
    // is the gateway's to assert, on every route.
    headers.remove(header::EXPECT);
    headers.remove(&crate::auth::CONSUMER_HEADER);
    headers.insert(X_REQUEST_ID.clone(), f.request_id.clone());
    headers.insert(TRACEPARENT.clone(), trace);
    apply_ops(&mut headers, &route.spec.request_headers);
    let mut hidden_query = None;
    if let Some(auth) = &route.auth {
        // What the gateway asserts about the caller replaces anything the client sent.
        for h in auth.identity_headers() {
            headers.remove(h);
        }
        if auth.hide_credentials {
            hidden_query = auth.hide(uri.query(), &mut headers);
        }
        if let Some(id) = identity {
            if let Some(v) = id.consumer.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
                headers.insert(crate::auth::CONSUMER_HEADER.clone(), v);
            }
            for (h, v) in &id.headers {
                headers.insert(h.clone(), v.clone());
            }
        }
    }
    (headers, hidden_query)
}

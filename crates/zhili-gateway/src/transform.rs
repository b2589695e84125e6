//! The transform phase: the request the upstream gets. Hop-by-hop headers go, the forwarding
//! headers (`x-forwarded-*`, `x-request-id`, `traceparent`) and the route's header operations
//! are applied, and what route auth asserts about the caller replaces anything the client sent.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Uri;
use rand::Rng;
use zhili_model::route::HeaderOps;

use crate::auth::Identity;
use crate::table::Route;

// A static, not a const: a const array of header names is built (and dropped) at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
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
    // One look over the names first: a removal by name hashes it, and most messages carry none
    // of these or one (an upstream's `Connection: keep-alive`).
    let mut found = [false; HOP_BY_HOP.len()];
    for n in h.keys() {
        if let Some(f) = HOP_BY_HOP.iter().position(|x| x == n).and_then(|i| found.get_mut(i)) {
            *f = true;
        }
    }
    if !found.iter().any(|f| *f) {
        return;
    }
    // Headers named in Connection are hop-by-hop too (copied out: rare besides the above).
    let named: Vec<HeaderName> = crate::body::connection_tokens(h)
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !HOP_BY_HOP.iter().any(|x| t.eq_ignore_ascii_case(x.as_str().as_bytes())))
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        .collect();
    for n in &named {
        h.remove(n);
    }
    for (n, _) in HOP_BY_HOP.iter().zip(found).filter(|(_, f)| *f) {
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
    minted(&buf)
}

/// Header values the gateway makes per request (request ids, trace parents) are cut from one
/// per-thread chunk of memory, so each costs no allocation of its own (nor does its clone: the
/// chunk is shared, a clone counts a reference). A chunk is freed when its last value is.
const MINT_CHUNK: usize = 8 * 1024;

thread_local! {
    static MINT: std::cell::RefCell<bytes::BytesMut> = std::cell::RefCell::new(bytes::BytesMut::new());
}

/// `v` (hex digits and dashes) as a header value cut from this thread's chunk.
fn minted(v: &[u8]) -> HeaderValue {
    let cut = MINT.try_with(|m| {
        let mut m = m.borrow_mut();
        if m.capacity() - m.len() < v.len() {
            *m = bytes::BytesMut::with_capacity(MINT_CHUNK.max(v.len()));
        }
        m.extend_from_slice(v);
        m.split().freeze()
    });
    let bytes = cut.unwrap_or_else(|_| bytes::Bytes::copy_from_slice(v));
    HeaderValue::from_maybe_shared(bytes).expect("hex is a valid header value")
}

/// W3C trace context: keep the caller's trace id with a new parent id (this hop), or start one.
fn traceparent(incoming: Option<&HeaderValue>) -> HeaderValue {
    // 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>
    let incoming = incoming
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
    minted(&out)
}

/// What the upstream is told about where the request came from.
pub struct Forwarded<'a> {
    /// The normalized authority routing matched: the upstream's Host.
    pub authority: &'a crate::target::Authority,
    pub client_ip: &'a HeaderValue,
    pub tls: bool,
    pub request_id: &'a HeaderValue,
    pub grpc: bool,
    /// A WebSocket upgrade: its Connection and Upgrade headers are kept.
    pub websocket: bool,
}

/// Which of the headers the transform reads or removes a request carries, found in one look
/// over its names: a lookup or removal by name hashes the name, and most requests carry none.
#[derive(Default)]
struct Present {
    hop_by_hop: bool,
    expect: bool,
    consumer: bool,
    forwarded_for: bool,
    traceparent: bool,
}

impl Present {
    fn of(h: &HeaderMap) -> Self {
        let mut p = Self::default();
        for n in h.keys() {
            p.hop_by_hop |= HOP_BY_HOP.contains(n);
            p.expect |= *n == header::EXPECT;
            p.consumer |= *n == crate::auth::CONSUMER_HEADER;
            p.forwarded_for |= *n == X_FORWARDED_FOR;
            p.traceparent |= *n == TRACEPARENT;
        }
        p
    }
}

/// The headers the upstream gets for a request that came with `headers` and `uri`, and the
/// query string to send instead of the client's when route auth hid a credential in it.
pub fn upstream_headers(mut headers: HeaderMap, uri: &Uri, route: &Route, identity: Option<&Identity>, f: &Forwarded<'_>) -> (HeaderMap, Option<String>) {
    let present = Present::of(&headers);
    let trace = traceparent(present.traceparent.then(|| headers.get(&TRACEPARENT)).flatten());
    let upgrade = f.websocket.then(|| (headers.get(header::CONNECTION).cloned(), headers.get(header::UPGRADE).cloned()));
    if present.hop_by_hop {
        strip_hop_by_hop(&mut headers);
    }
    if let Some((Some(c), Some(u))) = upgrade {
        headers.insert(header::CONNECTION, c);
        headers.insert(header::UPGRADE, u);
    }
    if f.grpc {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let xff = match present.forwarded_for.then(|| headers.get(&X_FORWARDED_FOR)).flatten().and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::try_from(format!("{prev}, {}", f.client_ip.to_str().unwrap_or_default())).ok(),
        None => Some(f.client_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(if f.tls { "https" } else { "http" }));
    // The authority routing matched is the one the upstream sees (never a second Host header or
    // a different :authority); `Connection: host` cannot remove it. An insert replaces every
    // value the client sent.
    if let Some(h) = f.authority.value.clone() {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        headers.insert(header::HOST, h);
    } else {
        headers.remove(header::HOST);
    }
    // The gateway answers `100-continue` itself (when it reads the body); the identity header
    // is the gateway's to assert, on every route.
    if present.expect {
        headers.remove(header::EXPECT);
    }
    if present.consumer {
        headers.remove(&crate::auth::CONSUMER_HEADER);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap())).collect()
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    /// The hop-by-hop headers go, and so does every header a Connection header names (in any
    /// case, among several Connection headers); everything else stays.
    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "close,x-other"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-keep", "3"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "x-keep"]);
        let mut plain = map(&[("x-keep", "1"), ("content-length", "5")]);
        strip_hop_by_hop(&mut plain);
        assert_eq!(names(&plain), ["content-length", "x-keep"]);
        let mut named_only = map(&[("proxy-authorization", "Basic eA=="), ("x-keep", "1")]);
        strip_hop_by_hop(&mut named_only);
        assert_eq!(names(&named_only), ["x-keep"]);
    }
}

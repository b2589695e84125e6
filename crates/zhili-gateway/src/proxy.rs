//! The request path: accept (HTTP/1.1 and HTTP/2, optionally TLS), match a route, pick an
//! endpoint, forward with timeouts and budgeted retries, stream the answer back. WebSocket
//! upgrades are tunnelled; gRPC (HTTP/2 with `application/grpc`) goes upstream over h2c.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use zhili_model::route::HeaderOps;

use crate::balance::EndpointState;
use crate::table::{Action, Route, Target};
use crate::Gateway;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The pooled h2c client for gRPC upstreams (HTTP/1.1 connections are pooled per endpoint).
pub struct Upstreams {
    h2c: Client<HttpConnector, Body>,
}

impl Upstreams {
    pub fn new(o: &crate::Options) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(o.connect_timeout));
        let mut b = Client::builder(TokioExecutor::new());
        b.http2_only(true).pool_idle_timeout(Duration::from_secs(90)).pool_timer(TokioTimer::new()).timer(TokioTimer::new());
        Self { h2c: b.build(connector) }
    }
}

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"status": status.as_u16(), "error": status.canonical_reason().unwrap_or("error"), "detail": message}).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Where a request came from: the client's address, whether it came over TLS, and the subject
/// common name of its verified client certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client's IP as text (X-Forwarded-For, rate-limit keys), formatted once per connection.
    pub ip: Arc<str>,
    pub tls: bool,
    pub client_cn: Option<Arc<str>>,
}

/// Serves the gateway on `listener` until `stop` turns true; then stops accepting and returns
/// once every connection has finished what it had in flight. `gate` caps the connections and
/// holds the idle, read and write deadlines every client connection is held to.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    gate: Arc<zhili_net::Admission>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    while let Some((stream, addr)) = zhili_net::accept(&listener, &mut stop, "gateway").await {
        let Some((stream, conn)) = gate.admit(stream, tls.is_none()) else { continue };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            match tls {
                None => connection(conn.wrap(stream), Peer { addr, ip: addr.ip().to_string().into(), tls: false, client_cn: None }, gw, conn, watcher).await,
                Some(acceptor) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(conn.limits().handshake_timeout, acceptor.accept(stream)).await {
                        let client_cn = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::auth::common_name(c)).map(Arc::from);
                        connection(conn.wrap(s), Peer { addr, ip: addr.ip().to_string().into(), tls: true, client_cn }, gw, conn, watcher).await;
                    }
                }
            }
        });
    }
    // New connections are refused from here; the ones we have finish their requests.
    drop(listener);
    graceful.shutdown().await;
}

async fn connection<I>(io: I, peer: Peer, gw: Arc<Gateway>, conn: Arc<zhili_net::Conn>, watcher: hyper_util::server::graceful::Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let o = gw.options.clone();
    let svc = hyper::service::service_fn(move |req| {
        let gw = gw.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(gw, req, &peer).await) }
    });
    let read_timeout = o.header_read_timeout.min(conn.limits().read_timeout);
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(read_timeout).max_buf_size(o.max_header_bytes.max(8192));
    b.http2().timer(TokioTimer::new()).max_header_list_size(o.max_header_bytes as u32).keep_alive_interval(Duration::from_secs(30));
    // Boxed as `Send` here, where the body's error type is concrete: proving `Send` through the
    // spawned future instead trips the compiler's higher-ranked lifetime check.
    let serving: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(watcher.watch(b.serve_connection_with_upgrades(TokioIo::new(io), conn.service(svc))));
    conn.run(serving).await;
}

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

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
}

fn apply_ops(h: &mut HeaderMap, ops: &HeaderOps) {
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

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
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
fn request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    hex(rand::rng().random::<u128>(), &mut buf);
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

/// W3C trace context: keep the caller's trace id with a new parent id (this hop), or start one.
fn traceparent(h: &HeaderMap) -> HeaderValue {
    // 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>
    let incoming = h
        .get("traceparent")
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

fn pick_target(targets: &[(Target, u32)]) -> &Target {
    let ((first, _), rest) = targets.split_first().expect("a compiled route forwards to at least one target");
    if rest.is_empty() {
        return first;
    }
    let total: u64 = targets.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut n = rand::rng().random_range(0..total.max(1));
    for (t, w) in targets {
        if n < u64::from(*w) {
            return t;
        }
        n -= u64::from(*w);
    }
    first
}

fn hash_key(route: &Route, req: &Request<Incoming>, peer: SocketAddr) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match route.hash_on.as_ref()? {
        zhili_model::route::HashOn::Header(name) => req.headers().get(name.as_str())?.as_bytes().hash(&mut h),
        zhili_model::route::HashOn::Cookie(name) => crate::auth::cookie(req.headers(), name)?.hash(&mut h),
        zhili_model::route::HashOn::ClientIp(_) => peer.ip().hash(&mut h),
    }
    Some(h.finish())
}

/// A redirect; unless the route names them, the host and path are the request's normalized ones
/// (what routing matched), never a raw Host header that disagreed with the request target.
fn redirect(r: &zhili_model::route::Redirect, req: &Request<Incoming>, authority: &str, path: &str, tls: bool) -> Response<Body> {
    let location = match &r.location {
        Some(l) => l.clone(),
        None => {
            let scheme = r.scheme.clone().unwrap_or_else(|| if tls { "https".into() } else { "http".into() });
            let host = r.host.clone().unwrap_or_else(|| authority.to_string());
            let path = r.path.clone().unwrap_or_else(|| path.to_string());
            let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
            format!("{scheme}://{host}{path}{query}")
        }
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::from_u16(r.status.unwrap_or(302)).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The request body as it will be sent upstream: replayable bytes, or a one-shot stream.
enum Outgoing {
    Replayable(Bytes),
    Stream(Option<Body>),
}

impl Outgoing {
    fn take(&mut self) -> Option<Body> {
        match self {
            Outgoing::Replayable(b) => Some(if b.is_empty() { empty() } else { full(b.clone()) }),
            Outgoing::Stream(s) => s.take(),
        }
    }
}

fn has_body(parts: &http::request::Parts, body: &Incoming) -> bool {
    let h = &parts.headers;
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
        || (parts.version == Version::HTTP_2 && !hyper::body::Body::is_end_stream(body))
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// 401 or 403 for a request the route's auth refuses.
fn denied(auth: &crate::auth::Auth, d: crate::auth::Denied) -> Response<Body> {
    match d {
        crate::auth::Denied::Unauthorized(m) => {
            let mut r = error_response(StatusCode::UNAUTHORIZED, &m);
            if auth.bearer() {
                let v = format!("Bearer realm=\"zhili\", error=\"invalid_token\", error_description=\"{}\"", m.replace(['"', '\\'], "'"));
                if let Ok(v) = HeaderValue::from_str(&v) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            r
        }
        crate::auth::Denied::Forbidden(m) => error_response(StatusCode::FORBIDDEN, &m),
    }
}

/// Preflights are matched as the request they announce (a route may allow only GET). `path` is
/// the normalized path.
fn find_route(table: &crate::Table, host: &str, path: &str, req: &Request<Incoming>) -> Option<Arc<Route>> {
    let (m, u, h) = (req.method(), req.uri(), req.headers());
    table.find(host, m, path, u.query(), h).cloned().or_else(|| {
        let announced = (m == Method::OPTIONS).then(|| h.get(header::ACCESS_CONTROL_REQUEST_METHOD)).flatten()?;
        let announced = Method::from_bytes(announced.as_bytes()).ok()?;
        table.find(host, &announced, path, u.query(), h).filter(|r| r.cors.is_some()).cloned()
    })
}

pub async fn handle(gw: Arc<Gateway>, mut req: Request<Incoming>, peer: &Peer) -> Response<Body> {
    let start = Instant::now();
    gw.stats.requests.fetch_add(1, Ordering::Relaxed);
    let authority = match crate::target::authority(req.version(), req.uri(), req.headers()) {
        Ok(a) => a,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, why),
    };
    if req.method() == Method::CONNECT {
        let mut r = error_response(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not forwarded");
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
        return r;
    }
    let host: &str = &authority.host;
    let table = gw.table();
    // Routes match the normalized path. What normalization refuses (encoded slashes or
    // dot-segments) only a route that asks for raw paths may take, matched on the path with
    // those escapes kept as data.
    let (route, normalized) = match crate::target::path(req.uri().path(), false) {
        Ok(p) => (find_route(&table, host, &p, &req), p),
        Err(why) => {
            let lenient = crate::target::path(req.uri().path(), true).unwrap_or_else(|_| "/".into());
            match find_route(&table, host, &lenient, &req).filter(|r| r.spec.raw_path) {
                Some(r) => (Some(r), lenient),
                None => return error_response(StatusCode::BAD_REQUEST, &format!("refused: {why}")),
            }
        }
    };
    // What the upstream gets: the normalized path, or the path as sent on raw-path routes.
    let forward_path = match &route {
        Some(r) if r.spec.raw_path => req.uri().path().to_string(),
        _ => normalized,
    };
    let origin = route.as_ref().and_then(|r| r.cors.as_ref()).and_then(|_| req.headers().get(header::ORIGIN).cloned());
    let matched = route.clone();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let (resp, upstream) = match route {
        None => {
            gw.stats.no_route.fetch_add(1, Ordering::Relaxed);
            (error_response(StatusCode::NOT_FOUND, &format!("no route for {host}{forward_path}")), None)
        }
        Some(route) => 'answer: {
            if let Some(pre) = route.cors.as_ref().and_then(|c| c.preflight(&method, req.headers())) {
                let r = match pre {
                    Ok(h) => {
                        let mut r = Response::new(empty());
                        *r.status_mut() = StatusCode::NO_CONTENT;
                        *r.headers_mut() = h;
                        r
                    }
                    Err((status, m)) => error_response(status, &m),
                };
                break 'answer (r, None);
            }
            let identity = match &route.auth {
                None => None,
                Some(auth) => {
                    let consumers = gw.consumers.load();
                    let presented = crate::auth::Presented { headers: req.headers(), uri: req.uri(), client_cn: peer.client_cn.as_deref() };
                    match auth.check(&presented, &consumers).await {
                        Ok(id) => Some(id),
                        Err(d) => {
                            gw.stats.auth_denied.fetch_add(1, Ordering::Relaxed);
                            break 'answer (denied(auth, d), None);
                        }
                    }
                }
            };
            if let Some(mut r) = limited(&gw, &route, &req, peer, identity.as_deref()) {
                apply_ops(r.headers_mut(), &route.spec.response_headers);
                break 'answer (r, None);
            }
            match &route.action {
                Action::Direct { status, body, content_type } => {
                    let mut r = Response::new(full(body.clone()));
                    *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                    if let Some(ct) = content_type.as_ref().and_then(|c| HeaderValue::from_str(c).ok()) {
                        r.headers_mut().insert(header::CONTENT_TYPE, ct);
                    }
                    apply_ops(r.headers_mut(), &route.spec.response_headers);
                    (r, None)
                }
                Action::Redirect(r) => (redirect(r, &req, &authority.authority, &forward_path, peer.tls), None),
                Action::Forward(targets) => {
                    let target = pick_target(targets);
                    let key = hash_key(&route, &req, peer.addr);
                    let request_id = req.headers().get("x-request-id").cloned().unwrap_or_else(request_id);
                    let upgrade = crate::target::websocket_upgrade(&method, req.headers());
                    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
                    let call = Call {
                        gw: &gw,
                        route: &route,
                        target,
                        authority: &authority.authority,
                        path: &forward_path,
                        client_ip: &peer.ip,
                        tls: peer.tls,
                        hash_key: key,
                        request_id: &request_id,
                        identity: identity.as_deref(),
                    };
                    let (mut resp, used) = forward(call, req, on_upgrade).await;
                    resp.headers_mut().insert("x-request-id", request_id);
                    apply_ops(resp.headers_mut(), &route.spec.response_headers);
                    (resp, used.map(|e| (target.service.clone(), e)))
                }
            }
        }
    };
    let mut resp = resp;
    if let Some(cors) = matched.as_ref().and_then(|r| r.cors.as_ref()) {
        if resp.status() != StatusCode::NO_CONTENT || method != Method::OPTIONS {
            cors.decorate(origin.as_ref(), resp.headers_mut());
        }
    }
    let peer = peer.addr;
    let (class, class_name) = match resp.status().as_u16() {
        200..=299 => (&gw.stats.responses_2xx, "2xx"),
        300..=399 => (&gw.stats.responses_3xx, "3xx"),
        400..=499 => (&gw.stats.responses_4xx, "4xx"),
        _ => (&gw.stats.responses_5xx, "5xx"),
    };
    class.fetch_add(1, Ordering::Relaxed);
    if let Some(route) = &matched {
        let service = upstream.as_ref().map_or("", |(s, _)| s.as_str());
        route.latency(&gw.latencies, service, class_name).observe(start.elapsed().as_secs_f64());
    }
    if gw.options.access_log {
        let route = matched.as_ref().map_or("", |r| r.name.as_str());
        let (service, endpoint) = upstream.map_or((String::new(), String::new()), |(s, e)| (s, e));
        tracing::info!(
            target: "zhili::access",
            client = %peer,
            method = %method,
            host = %host,
            path = %uri.path(),
            status = resp.status().as_u16(),
            route = %route,
            service = %service,
            upstream = %endpoint,
            micros = start.elapsed().as_micros() as u64,
        );
    }
    resp
}

/// The 429 answer when the route's rate limit is exhausted for this request's key.
fn limited(gw: &Gateway, route: &Route, req: &Request<Incoming>, peer: &Peer, identity: Option<&crate::auth::Identity>) -> Option<Response<Body>> {
    let limiter = route.limiter.as_ref()?;
    let key: Option<&[u8]> = match &limiter.key {
        None => None,
        Some(zhili_model::route::RateLimitKey::ClientIp(_)) => Some(peer.ip.as_bytes()),
        Some(zhili_model::route::RateLimitKey::Header(h)) => Some(req.headers().get(h.as_str()).map_or(&b""[..], |v| v.as_bytes())),
        Some(zhili_model::route::RateLimitKey::Consumer(_)) => Some(identity.and_then(|i| i.consumer.as_deref()).unwrap_or("").as_bytes()),
    };
    match limiter.check(key, Instant::now()) {
        crate::limit::Decision::Allow { .. } => None,
        crate::limit::Decision::Deny { retry_after } => {
            gw.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("rate limit of route {:?} exceeded ({} requests/s); retry in {secs}s", route.name, limiter.rate),
            );
            let h = r.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            h.insert("ratelimit-limit", HeaderValue::from(limiter.burst as u64));
            h.insert("ratelimit-remaining", HeaderValue::from(0));
            h.insert("ratelimit-reset", HeaderValue::from(secs));
            h.insert("ratelimit-policy", HeaderValue::from_str(&format!("{};w=1", limiter.rate)).unwrap_or(HeaderValue::from_static("1")));
            Some(r)
        }
    }
}

/// Decrements the service's in-flight count when the request is done.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request being forwarded: where it came from and where it goes.
#[derive(Clone, Copy)]
struct Call<'a> {
    gw: &'a Gateway,
    route: &'a Route,
    target: &'a Target,
    /// The normalized authority routing matched: the upstream's Host.
    authority: &'a str,
    /// The path the upstream gets (normalized, or as sent on raw-path routes).
    path: &'a str,
    client_ip: &'a str,
    tls: bool,
    hash_key: Option<u64>,
    request_id: &'a HeaderValue,
    identity: Option<&'a crate::auth::Identity>,
}

/// Forwards under the route's circuit breaker and concurrency limit.
async fn forward(call: Call<'_>, req: Request<Incoming>, on_upgrade: Option<hyper::upgrade::OnUpgrade>) -> (Response<Body>, Option<String>) {
    let Call { gw, route, target, .. } = call;
    let Some(pool) = target.pool.get() else {
        return (error_response(StatusCode::SERVICE_UNAVAILABLE, &format!("service {:?} is not known to the gateway yet", target.service)), None);
    };
    let Some(cfg) = route.breaker else {
        return forward_inner(call, pool, req, on_upgrade).await;
    };
    let _in_flight = InFlight(&pool.in_flight);
    let now_in_flight = pool.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    if cfg.max_concurrent.is_some_and(|max| now_in_flight > max) {
        gw.stats.concurrency_rejected.fetch_add(1, Ordering::Relaxed);
        let detail = format!("service {:?} has {} requests in flight, its limit; try again shortly", target.service, now_in_flight - 1);
        return (error_response(StatusCode::SERVICE_UNAVAILABLE, &detail), None);
    }
    let started = Instant::now();
    let admission = match pool.breaker.admit(&cfg, started) {
        Ok((a, transition)) => {
            if let Some(t) = transition {
                gw.breaker_transition(pool, t);
            }
            a
        }
        Err(wait) => {
            gw.stats.breaker_rejected.fetch_add(1, Ordering::Relaxed);
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, &format!("circuit breaker for service {:?} is open; retry in {secs}s", target.service));
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return (r, None);
        }
    };
    let out = forward_inner(call, pool, req, on_upgrade).await;
    let failed = out.0.status().is_server_error();
    if let Some(t) = pool.breaker.record(&cfg, admission, failed, started.elapsed(), Instant::now()) {
        gw.breaker_transition(pool, t);
    }
    out
}

async fn forward_inner(
    call: Call<'_>,
    pool: &crate::balance::Pool,
    req: Request<Incoming>,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> (Response<Body>, Option<String>) {
    let Call { gw, route, target, authority, path, client_ip, tls, hash_key, request_id, identity } = call;
    let r = route.resilience;
    let deadline = Instant::now() + r.total;
    let grpc = req.version() == Version::HTTP_2 && req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (mut parts, body) = req.into_parts();
    let declared = content_length(&parts.headers);
    let body_present = has_body(&parts, &body);
    let trace = traceparent(&parts.headers);
    let upgrade_headers = on_upgrade.as_ref().map(|_| (parts.headers.get(header::CONNECTION).cloned(), parts.headers.get(header::UPGRADE).cloned()));
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    if let Some((conn, up)) = upgrade_headers {
        if let (Some(c), Some(u)) = (conn, up) {
            headers.insert(header::CONNECTION, c);
            headers.insert(header::UPGRADE, u);
        }
    }
    if grpc {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.to_string(),
    };
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(if tls { "https" } else { "http" }));
    // The authority routing matched is the one the upstream sees (never a second Host header or
    // a different :authority); `Connection: host` cannot remove it.
    headers.remove(header::HOST);
    if let Some(h) = Some(authority).filter(|a| !a.is_empty()).and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert("x-forwarded-host", h.clone());
        headers.insert(header::HOST, h);
    }
    // The gateway answers `100-continue` itself (when it reads the body); the identity header
    // is the gateway's to assert, on every route.
    headers.remove(header::EXPECT);
    headers.remove(&crate::auth::CONSUMER_HEADER);
    headers.insert("x-request-id", request_id.clone());
    headers.insert("traceparent", trace);
    apply_ops(&mut headers, &route.spec.request_headers);
    let mut hidden_query = None;
    if let Some(auth) = &route.auth {
        // What the gateway asserts about the caller replaces anything the client sent.
        for h in auth.identity_headers() {
            headers.remove(h);
        }
        if auth.hide_credentials {
            hidden_query = auth.hide(parts.uri.query(), &mut headers);
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

    let retry_allowed = r.attempts > 0 && (idempotent(&parts.method) || r.non_idempotent) && on_upgrade.is_none();
    // Set when the client's streamed body fails: the failure is then the client's, not the upstream's.
    let client_broke = Arc::new(std::sync::Mutex::new(None::<String>));
    // Bodies with a small declared length are read first (so they can be retried, and the
    // request goes upstream in one write); others stream.
    let mut outgoing = if !body_present {
        Outgoing::Replayable(Bytes::new())
    } else if declared.is_some_and(|n| n > gw.options.max_body as u64) {
        return (error_response(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body over {} bytes", gw.options.max_body)), None);
    } else if declared.is_some_and(|n| n <= gw.options.max_replay_body as u64) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, Limited::new(body, gw.options.max_replay_body).collect()).await {
            Ok(Ok(c)) => Outgoing::Replayable(c.to_bytes()),
            Ok(Err(e)) => return (error_response(StatusCode::BAD_REQUEST, &format!("could not read the request body: {e}")), None),
            Err(_) => return (error_response(StatusCode::REQUEST_TIMEOUT, "request body not received in time"), None),
        }
    } else {
        Outgoing::Stream(Some(ClientBody { inner: Limited::new(body, gw.options.max_body).boxed_unsync(), broken: client_broke.clone() }.boxed_unsync()))
    };
    route.budget.deposit();
    let path_q = {
        let p = route.upstream_path(path);
        match hidden_query.as_deref().or(parts.uri.query()) {
            Some(q) if !q.is_empty() => format!("{p}?{q}"),
            _ => p,
        }
    };
    // The common case goes through our own HTTP/1.1 client, encoded once for every try.
    let encoded = match (&outgoing, grpc, &on_upgrade) {
        (Outgoing::Replayable(b), false, None) => Some(crate::h1::encode(&parts.method, &path_q, &headers, b)),
        _ => None,
    };
    let head_request = parts.method == Method::HEAD;
    let mut on_upgrade = on_upgrade;
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    let mut last_error = (StatusCode::SERVICE_UNAVAILABLE, format!("no healthy endpoint for service {:?}", target.service));
    let mut attempt = 0;
    // Whether another try may follow this one; sleeps the backoff when it may.
    let may_retry = |attempt: u32, outgoing: &Outgoing| {
        let allowed = attempt < r.attempts && retry_allowed && matches!(outgoing, Outgoing::Replayable(_));
        async move {
            if !allowed {
                return false;
            }
            let jitter = rand::rng().random_range(0.5..1.5);
            let backoff = r.backoff.mul_f64(f64::from(1u32 << attempt.min(6)) * jitter);
            if Instant::now() + backoff >= deadline {
                return false;
            }
            if !route.budget.withdraw() {
                gw.stats.retries_denied_by_budget.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            gw.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            true
        }
    };
    while let Some(ep) = pool.pick(route.balancer, target.subset.as_ref(), hash_key, &tried) {
        tried.push(ep.clone());
        let per_try = r.per_try.min(deadline.saturating_duration_since(Instant::now()));
        ep.pending.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let result = match &encoded {
            Some(request) => {
                let x = crate::h1::Exchange {
                    request,
                    head_request,
                    idempotent: idempotent(&parts.method),
                    connect_timeout: gw.options.connect_timeout,
                    max_connections: gw.options.max_upstream_connections,
                };
                tokio::time::timeout(per_try, crate::h1::send(&ep, &x, &gw.stats.upstream_connections)).await
            }
            None => {
                let Some(body) = outgoing.take() else {
                    ep.pending.fetch_sub(1, Ordering::Relaxed);
                    break;
                };
                let mut up = Request::new(body);
                *up.method_mut() = parts.method.clone();
                *up.headers_mut() = headers.clone();
                let call = async {
                    if grpc {
                        *up.version_mut() = Version::HTTP_2;
                        *up.uri_mut() = format!("http://{}{}", ep.authority, path_q).parse::<Uri>().map_err(|e| UpstreamError::Failed(e.to_string()))?;
                        let resp = gw.client.h2c.request(up).await.map_err(|e| {
                            if e.is_connect() {
                                UpstreamError::Connect(e.to_string())
                            } else {
                                UpstreamError::Failed(e.to_string())
                            }
                        })?;
                        return finish(resp).await;
                    }
                    *up.uri_mut() = path_q.parse::<Uri>().map_err(|e| UpstreamError::Failed(e.to_string()))?;
                    gw.stats.upstream_connections.fetch_add(1, Ordering::Relaxed);
                    let mut resp = send_hyper(&ep, up, gw.options.connect_timeout).await?;
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(downstream) = on_upgrade.take() {
                            let upstream = hyper::upgrade::on(&mut resp);
                            tokio::spawn(async move {
                                if let (Ok(d), Ok(u)) = (downstream.await, upstream.await) {
                                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
                                }
                            });
                            let (mut p, _) = resp.into_parts();
                            p.headers.remove(header::CONTENT_LENGTH);
                            return Ok(Response::from_parts(p, empty()));
                        }
                    }
                    finish(resp).await
                };
                tokio::time::timeout(per_try, call).await
            }
        };
        ep.pending.fetch_sub(1, Ordering::Relaxed);
        // A broken client body shows up as a failed send: it is the client's fault.
        let result = match (result, client_broke.lock().ok().and_then(|b| b.clone())) {
            (Ok(Err(_)), Some(why)) => Ok(Err(UpstreamError::Client(why))),
            (r, _) => r,
        };
        // Only the upstream's own failures count against it (outlier ejection, and through the
        // status, the circuit breaker).
        let failed = match &result {
            Ok(Ok(resp)) => Some(resp.status().is_server_error()),
            Ok(Err(e)) => (e.side() == Side::Upstream).then_some(true),
            Err(_) => Some(true),
        };
        if let Some(e) = failed.and_then(|failed| pool.record(&ep, failed)) {
            gw.report(pool, e);
        }
        match result {
            Ok(Ok(mut resp)) => {
                let took = sent.elapsed();
                ep.observe_latency(took);
                pool.upstream_latency
                    .get_or_init(|| gw.latencies.upstream.get_or_create(&crate::ServiceLabels { service: target.service.clone() }).clone())
                    .observe(took.as_secs_f64());
                let status = resp.status();
                if matches!(status.as_u16(), 502..=504) && may_retry(attempt, &outgoing).await {
                    attempt += 1;
                    continue;
                }
                strip_hop_by_hop(resp.headers_mut());
                return (resp, Some(ep.authority.clone()));
            }
            Ok(Err(e)) if e.side() == Side::Client => return (error_response(e.status(), &format!("the request {e}")), None),
            Ok(Err(e)) => {
                if e.side() == Side::Upstream {
                    gw.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                }
                last_error = (e.status(), format!("upstream {} {e}", ep.endpoint.id));
                // Nothing reached the upstream: another endpoint may be tried for any method.
                if e.nothing_sent() && matches!(outgoing, Outgoing::Replayable(_)) && attempt < r.attempts.max(1) && Instant::now() < deadline {
                    attempt += 1;
                    continue;
                }
            }
            Err(_) => {
                gw.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                last_error = (StatusCode::GATEWAY_TIMEOUT, format!("upstream {} did not answer within {per_try:?}", ep.endpoint.id));
            }
        }
        if !may_retry(attempt, &outgoing).await {
            break;
        }
        attempt += 1;
    }
    (error_response(last_error.0, &last_error.1), tried.last().map(|e| e.authority.clone()))
}

/// The answer to send downstream; small bodies (with a Content-Length) are read whole so head
/// and body leave in one write, and a body that breaks off is a failed try. gRPC answers keep
/// their trailers: always streamed.
async fn finish(resp: Response<Incoming>) -> Result<Response<Body>, UpstreamError> {
    let (mut parts, body) = resp.into_parts();
    let grpc = parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let small = content_length(&parts.headers).is_some_and(|n| n <= crate::h1::COLLECT_BELOW);
    // Re-framed from what is read: the body's own length (or chunks) decides, not the header.
    parts.headers.remove(header::CONTENT_LENGTH);
    if !grpc && small {
        let c = body.collect().await.map_err(|e| UpstreamError::Failed(format!("broke off its answer: {e}")))?;
        return Ok(Response::from_parts(parts, full(c.to_bytes())));
    }
    Ok(Response::from_parts(parts, body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()))
}

/// Why a try failed: which side caused it and whether any of the request may have reached the
/// upstream. Retries, the circuit breaker and outlier ejection read exactly this: only the
/// upstream's failures count against it, and a request is sent again only when it provably was
/// not sent (or the route allows retrying it).
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection was made: nothing was sent (safe to retry for any method).
    Connect(String),
    /// The upstream failed after the request (or part of it) went out.
    Failed(String),
    /// The gateway's own limit on connections to the endpoint: nothing was sent.
    Saturated(String),
    /// The client's own request could not be read (bad chunking, an abandoned upload).
    Client(String),
}

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Gateway,
    Upstream,
}

impl UpstreamError {
    pub(crate) fn side(&self) -> Side {
        match self {
            Self::Connect(_) | Self::Failed(_) => Side::Upstream,
            Self::Saturated(_) => Side::Gateway,
            Self::Client(_) => Side::Client,
        }
    }

    /// Whether the upstream provably received nothing of the request.
    pub(crate) fn nothing_sent(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Saturated(_))
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self.side() {
            Side::Client => StatusCode::BAD_REQUEST,
            Side::Gateway => StatusCode::SERVICE_UNAVAILABLE,
            Side::Upstream => StatusCode::BAD_GATEWAY,
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "refused the connection: {e}"),
            UpstreamError::Failed(e) => write!(f, "failed: {e}"),
            UpstreamError::Saturated(e) => write!(f, "{e}"),
            UpstreamError::Client(e) => write!(f, "could not be sent: the request body is broken: {e}"),
        }
    }
}

/// A streamed client body that notes why it broke (malformed chunking, an abandoned upload), so
/// the failed send is put down to the client.
struct ClientBody {
    inner: Body,
    broken: Arc<std::sync::Mutex<Option<String>>>,
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &r {
            if let Ok(mut b) = self.broken.lock() {
                *b = Some(e.to_string());
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Through hyper on a new connection: upgrades (WebSocket) and streamed request bodies.
async fn send_hyper(ep: &EndpointState, req: Request<Body>, connect_timeout: Duration) -> Result<Response<Incoming>, UpstreamError> {
    let stream = crate::h1::connect_tcp(&ep.authority, connect_timeout).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| UpstreamError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await.map_err(|e| UpstreamError::Failed(e.to_string()))
}

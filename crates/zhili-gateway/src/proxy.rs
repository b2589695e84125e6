//! The request path in phases, each a function: [`route`] (authority, path normalization, the
//! route table) → [`authenticate`] (the route's auth) → [`limit`] (its rate limit) → [`act`]
//! (answer directly, redirect, or [`crate::forward`]) → [`observe`] (counters, latency, access
//! log). A phase that refuses the request answers it; the rest are skipped.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::auth::{Identity, Presented};
use crate::balance::EndpointState;
use crate::body::{empty, full, Body, RequestBody};
use crate::error::{problem, Refused};
use crate::forward::{forward, hash_key, pick_target, Call};
use crate::gateway::Gateway;
use crate::table::{Action, Route, Table};
use crate::target::Authority;
use crate::transform::{apply_ops, request_id, X_REQUEST_ID};

/// Where a request came from: the client's address, whether it came over TLS, and the subject
/// common name of its verified client certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client's IP as text (X-Forwarded-For, rate-limit keys), formatted once per connection,
    /// as a header value: a request without X-Forwarded-For forwards it as it is.
    pub ip: HeaderValue,
    pub tls: bool,
    pub client_cn: Option<Arc<str>>,
}

/// What routing found: the normalized authority, the route (if any) and the path the upstream gets.
struct Routed {
    authority: Arc<Authority>,
    route: Option<Arc<Route>>,
    /// The normalized path, or the path as sent on raw-path routes.
    forward_path: ForwardPath,
}

/// The path routing matched and the upstream gets: the request's own (already normal, or a
/// raw-path route's; the target shares the request head's memory, so keeping it copies
/// nothing), or the normalized one.
enum ForwardPath {
    AsSent(http::Uri),
    Normalized(String),
}

impl ForwardPath {
    fn as_str(&self) -> &str {
        match self {
            ForwardPath::AsSent(u) => u.path(),
            ForwardPath::Normalized(p) => p,
        }
    }
}

pub async fn handle(gw: Arc<Gateway>, req: Request<RequestBody>, peer: &Peer) -> Response<Body> {
    let start = Instant::now();
    gw.stats.requests.fetch_add(1, Ordering::Relaxed);
    let routed = match route(&gw, &req) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let method = req.method().clone();
    let origin = routed.route.as_ref().and_then(|r| r.cors.as_ref()).and_then(|_| req.headers().get(header::ORIGIN).cloned());
    // For the access log line only (the target shares the request head's memory: no copy).
    let target = gw.options.access_log.then(|| req.uri().clone());
    let (mut resp, upstream) = match &routed.route {
        None => {
            gw.stats.no_route.fetch_add(1, Ordering::Relaxed);
            (problem(StatusCode::NOT_FOUND, &format!("no route for {}{}", routed.authority.host, routed.forward_path.as_str())), None)
        }
        Some(route) => phases(&gw, route, &routed, req, peer).await,
    };
    if let Some(cors) = routed.route.as_ref().and_then(|r| r.cors.as_ref()) {
        if resp.status() != StatusCode::NO_CONTENT || method != Method::OPTIONS {
            cors.decorate(origin.as_ref(), resp.headers_mut());
        }
    }
    observe(&gw, &routed, &resp, upstream, Seen { start, peer, method: &method, path: target.as_ref().map_or("", http::Uri::path) });
    resp
}

/// The phases after routing, for a request a route matched; the answer and, when it was
/// forwarded, (service, endpoint).
async fn phases<'r>(
    gw: &Gateway,
    route: &'r Route,
    routed: &Routed,
    req: Request<RequestBody>,
    peer: &Peer,
) -> (Response<Body>, Option<(&'r str, Arc<EndpointState>)>) {
    if let Some(pre) = route.cors.as_ref().and_then(|c| c.preflight(req.method(), req.headers())) {
        let r = match pre {
            Ok(h) => {
                let mut r = Response::new(empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                *r.headers_mut() = h;
                r
            }
            Err((status, m)) => problem(status, &m),
        };
        return (r, None);
    }
    let identity = match authenticate(gw, route, &req, peer).await {
        Ok(identity) => identity,
        Err(denied) => return (denied, None),
    };
    if let Some(mut r) = limit(gw, route, &req, peer, identity.as_deref()) {
        apply_ops(r.headers_mut(), &route.spec.response_headers);
        return (r, None);
    }
    act(gw, route, routed, req, peer, identity.as_deref()).await
}

/// Route: the normalized authority and path, and the route they match. Routes match the
/// normalized path; what normalization refuses (encoded slashes or dot-segments) only a route
/// that asks for raw paths may take, matched on the path with those escapes kept as data.
fn route(gw: &Gateway, req: &Request<RequestBody>) -> Result<Routed, Refused> {
    let authority = crate::target::authority(req.version(), req.uri(), req.headers()).map_err(Refused::bad_request)?;
    if req.method() == Method::CONNECT {
        return Err(Refused { status: StatusCode::METHOD_NOT_ALLOWED, detail: "CONNECT is not forwarded".into() });
    }
    let table = gw.table();
    let host = authority.host.as_str();
    let (route, normalized) = match crate::target::path(req.uri().path(), false) {
        Ok(p) => (find_route(&table, host, &p, req), p),
        Err(why) => {
            let lenient = crate::target::path(req.uri().path(), true).unwrap_or(Cow::Borrowed("/"));
            match find_route(&table, host, &lenient, req).filter(|r| r.spec.raw_path) {
                Some(r) => (Some(r), lenient),
                None => return Err(Refused::bad_request(format!("refused: {why}"))),
            }
        }
    };
    let as_sent = req.uri().path();
    let forward_path = match (&route, normalized) {
        (Some(r), _) if r.spec.raw_path => ForwardPath::AsSent(req.uri().clone()),
        (_, Cow::Borrowed(p)) if p == as_sent => ForwardPath::AsSent(req.uri().clone()),
        (_, p) => ForwardPath::Normalized(p.into_owned()),
    };
    Ok(Routed { authority, route, forward_path })
}

/// Preflights are matched as the request they announce (a route may allow only GET). `path` is
/// the normalized path.
fn find_route(table: &Table, host: &str, path: &str, req: &Request<RequestBody>) -> Option<Arc<Route>> {
    let (m, u, h) = (req.method(), req.uri(), req.headers());
    table.find(host, m, path, u.query(), h).cloned().or_else(|| {
        let announced = (m == Method::OPTIONS).then(|| h.get(header::ACCESS_CONTROL_REQUEST_METHOD)).flatten()?;
        let announced = Method::from_bytes(announced.as_bytes()).ok()?;
        table.find(host, &announced, path, u.query(), h).filter(|r| r.cors.is_some()).cloned()
    })
}

/// Authenticate: who the caller is under the route's auth (none without auth), or 401/403.
async fn authenticate(gw: &Gateway, route: &Route, req: &Request<RequestBody>, peer: &Peer) -> Result<Option<Arc<Identity>>, Response<Body>> {
    let Some(auth) = &route.auth else { return Ok(None) };
    let consumers = gw.consumers.load();
    let presented = Presented { headers: req.headers(), uri: req.uri(), client_cn: peer.client_cn.as_deref() };
    match auth.check(&presented, &consumers).await {
        Ok(id) => Ok(Some(id)),
        Err(d) => {
            gw.stats.auth_denied.fetch_add(1, Ordering::Relaxed);
            Err(denied(auth, d))
        }
    }
}

/// 401 or 403 for a request the route's auth refuses.
fn denied(auth: &crate::auth::Auth, d: crate::auth::Denied) -> Response<Body> {
    match d {
        crate::auth::Denied::Unauthorized(m) => {
            let mut r = problem(StatusCode::UNAUTHORIZED, &m);
            if auth.bearer() {
                let v = format!("Bearer realm=\"zhili\", error=\"invalid_token\", error_description=\"{}\"", m.replace(['"', '\\'], "'"));
                if let Ok(v) = HeaderValue::from_str(&v) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            r
        }
        crate::auth::Denied::Forbidden(m) => problem(StatusCode::FORBIDDEN, &m),
    }
}

/// Limit: the 429 answer when the route's rate limit is exhausted for this request's key.
fn limit(gw: &Gateway, route: &Route, req: &Request<RequestBody>, peer: &Peer, identity: Option<&Identity>) -> Option<Response<Body>> {
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
            let mut r = problem(
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

/// Act: what the route does with an admitted request.
async fn act<'r>(
    gw: &Gateway,
    route: &'r Route,
    routed: &Routed,
    mut req: Request<RequestBody>,
    peer: &Peer,
    identity: Option<&Identity>,
) -> (Response<Body>, Option<(&'r str, Arc<EndpointState>)>) {
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
        Action::Redirect(r) => (redirect(r, &req, &routed.authority.authority, routed.forward_path.as_str(), peer.tls), None),
        Action::Forward(targets) => {
            let started = Instant::now();
            let target = pick_target(targets);
            let key = hash_key(route, &req, peer.addr);
            let request_id = req.headers().get(&X_REQUEST_ID).cloned().unwrap_or_else(request_id);
            let on_upgrade = crate::target::websocket_upgrade(req.method(), req.headers()).then(|| hyper::upgrade::on(&mut req));
            let call = Call {
                gw,
                route,
                target,
                authority: &routed.authority,
                path: routed.forward_path.as_str(),
                client_ip: &peer.ip,
                tls: peer.tls,
                hash_key: key,
                request_id: &request_id,
                identity,
            };
            let (mut resp, used) = forward(call, req, on_upgrade).await;
            if let Some(w) = target.window.get() {
                let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                let (latency_ms, error) = (started.elapsed().as_secs_f64() * 1000.0, resp.status().is_server_error());
                w.record(now_ms, latency_ms, error);
                if let Some(consumer) = identity.and_then(|i| i.consumer.as_deref()) {
                    gw.record_caller(consumer, &target.namespace, &target.service, now_ms, latency_ms, error);
                }
            }
            resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
            apply_ops(resp.headers_mut(), &route.spec.response_headers);
            (resp, used.map(|e| (target.service.as_str(), e)))
        }
    }
}

/// A redirect; unless the route names them, the host and path are the request's normalized ones
/// (what routing matched), never a raw Host header that disagreed with the request target.
fn redirect(r: &zhili_model::route::Redirect, req: &Request<RequestBody>, authority: &str, path: &str, tls: bool) -> Response<Body> {
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

/// What [`observe`] records about a request besides its route and answer.
struct Seen<'a> {
    start: Instant,
    peer: &'a Peer,
    method: &'a Method,
    path: &'a str,
}

/// Observe: response counters, the route's latency histogram and the access log line.
fn observe(gw: &Gateway, routed: &Routed, resp: &Response<Body>, upstream: Option<(&str, Arc<EndpointState>)>, seen: Seen<'_>) {
    let (class, class_name) = match resp.status().as_u16() {
        200..=299 => (&gw.stats.responses_2xx, "2xx"),
        300..=399 => (&gw.stats.responses_3xx, "3xx"),
        400..=499 => (&gw.stats.responses_4xx, "4xx"),
        _ => (&gw.stats.responses_5xx, "5xx"),
    };
    class.fetch_add(1, Ordering::Relaxed);
    if let Some(route) = &routed.route {
        let service = upstream.as_ref().map_or("", |(s, _)| *s);
        route.latency(&gw.latencies, service, class_name).observe(seen.start.elapsed().as_secs_f64());
    }
    if gw.options.access_log {
        let route = routed.route.as_ref().map_or("", |r| r.name.as_str());
        let (service, endpoint) = upstream.as_ref().map_or(("", ""), |(s, e)| (*s, e.authority.as_str()));
        tracing::info!(
            target: "zhili::access",
            client = %seen.peer.addr,
            method = %seen.method,
            host = %routed.authority.host,
            path = %seen.path,
            status = resp.status().as_u16(),
            route = %route,
            service = %service,
            upstream = %endpoint,
            micros = seen.start.elapsed().as_micros() as u64,
        );
    }
}

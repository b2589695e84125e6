//! The forward phase: under the route's circuit breaker and concurrency limit, transform the
//! request ([`crate::transform`]), then balance (pick an endpoint) and send, with the retry loop
//! around one send. Failures are typed by side ([`UpstreamError`]): retries, the breaker and
//! outlier ejection read that, never the status alone.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rand::Rng;

use crate::balance::{EndpointState, Pool};
use crate::body::{content_length, empty, has_body, Body, Broken, ClientBody, Outgoing, RequestBody};
use crate::error::{problem, Side, UpstreamError};
use crate::gateway::Gateway;
use crate::stats::ServiceLabels;
use crate::table::{Route, Target};
use crate::transform::{strip_hop_by_hop, upstream_headers, Forwarded};
use crate::upstream::{finish, send_hyper};

pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

pub fn pick_target(targets: &[(Target, u32)]) -> &Target {
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

pub fn hash_key(route: &Route, req: &Request<RequestBody>, peer: SocketAddr) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match route.hash_on.as_ref()? {
        zhili_model::route::HashOn::Header(name) => req.headers().get(name.as_str())?.as_bytes().hash(&mut h),
        zhili_model::route::HashOn::Cookie(name) => crate::auth::cookie(req.headers(), name)?.hash(&mut h),
        zhili_model::route::HashOn::ClientIp(_) => peer.ip().hash(&mut h),
    }
    Some(h.finish())
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
pub struct Call<'a> {
    pub gw: &'a Gateway,
    pub route: &'a Route,
    pub target: &'a Target,
    /// The normalized authority routing matched: the upstream's Host.
    pub authority: &'a crate::target::Authority,
    /// The path the upstream gets (normalized, or as sent on raw-path routes).
    pub path: &'a str,
    pub client_ip: &'a HeaderValue,
    pub tls: bool,
    pub hash_key: Option<u64>,
    pub request_id: &'a HeaderValue,
    pub identity: Option<&'a crate::auth::Identity>,
}

/// Forwards under the route's circuit breaker and concurrency limit.
pub async fn forward(call: Call<'_>, req: Request<RequestBody>, on_upgrade: Option<hyper::upgrade::OnUpgrade>) -> (Response<Body>, Option<Arc<EndpointState>>) {
    let Call { gw, route, target, .. } = call;
    let Some(pool) = target.pool.get() else {
        return (problem(StatusCode::SERVICE_UNAVAILABLE, &format!("service {:?} is not known to the gateway yet", target.service)), None);
    };
    let Some(cfg) = route.breaker else {
        return forward_inner(call, pool, req, on_upgrade).await;
    };
    let _in_flight = InFlight(&pool.in_flight);
    let now_in_flight = pool.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    if cfg.max_concurrent.is_some_and(|max| now_in_flight > max) {
        gw.stats.concurrency_rejected.fetch_add(1, Ordering::Relaxed);
        let detail = format!("service {:?} has {} requests in flight, its limit; try again shortly", target.service, now_in_flight - 1);
        return (problem(StatusCode::SERVICE_UNAVAILABLE, &detail), None);
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
            let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, &format!("circuit breaker for service {:?} is open; retry in {secs}s", target.service));
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

/// The request as it goes upstream, built once for all tries.
struct Prepared {
    method: Method,
    wire: Wire,
    outgoing: Outgoing,
    grpc: bool,
    /// Set when the client's streamed body fails: the failure is then the client's.
    broken: Option<Broken>,
    /// Whether sending it twice is safe: an idempotent method, or a route that says so.
    repeatable: bool,
}

/// How a prepared request goes out.
enum Wire {
    /// The whole request, encoded for the gateway's own HTTP/1.1 client (the common case).
    Encoded(zhili_net::reuse::Pooled),
    /// Through hyper or the h2c client: the path and query the upstream gets, and the headers.
    Parts { path_q: String, headers: HeaderMap },
}

/// Transform, then balance and send with the retry loop around one send.
async fn forward_inner(
    call: Call<'_>,
    pool: &Pool,
    req: Request<RequestBody>,
    mut on_upgrade: Option<OnUpgrade>,
) -> (Response<Body>, Option<Arc<EndpointState>>) {
    let Call { gw, route, target, hash_key, .. } = call;
    let r = route.resilience;
    let deadline = Instant::now() + r.total;
    let mut p = match prepare(call, req, on_upgrade.is_some(), deadline).await {
        Ok(p) => p,
        Err(resp) => return (resp, None),
    };
    route.budget.deposit();
    let retry_allowed = r.attempts > 0 && p.repeatable && on_upgrade.is_none();
    let mut tried: smallvec::SmallVec<[Arc<EndpointState>; 4]> = smallvec::SmallVec::new();
    // The answer when no try succeeds (formatted only then).
    let mut last_error: Option<(StatusCode, String)> = None;
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
    // Balance: the route's balancer picks among endpoints not tried yet.
    while let Some(ep) = pool.pick(route.balancer, target.subset.as_ref(), hash_key, &tried) {
        tried.push(ep.clone());
        let per_try = r.per_try.min(deadline.saturating_duration_since(Instant::now()));
        ep.pending.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let result = send(gw, &mut p, &ep, per_try, &mut on_upgrade).await;
        ep.pending.fetch_sub(1, Ordering::Relaxed);
        let Some(result) = result else { break };
        // Only the upstream's own failures count against it (outlier ejection, and through the
        // status, the circuit breaker).
        let failed = match &result {
            Ok(resp) => Some(resp.status().is_server_error()),
            Err(e) => (e.side() == Side::Upstream).then_some(true),
        };
        if let Some(e) = failed.and_then(|failed| pool.record(&ep, failed)) {
            gw.report(pool, e);
        }
        match result {
            Ok(mut resp) => {
                let took = sent.elapsed();
                ep.observe_latency(took);
                pool.upstream_latency
                    .get_or_init(|| gw.latencies.upstream.get_or_create(&ServiceLabels { service: target.service.clone() }).clone())
                    .observe(took.as_secs_f64());
                if matches!(resp.status().as_u16(), 502..=504) && may_retry(attempt, &p.outgoing).await {
                    attempt += 1;
                    continue;
                }
                strip_hop_by_hop(resp.headers_mut());
                return (resp, Some(ep));
            }
            Err(e) if e.side() == Side::Client => return (problem(e.status(), &format!("the request {e}")), None),
            Err(e) => {
                if e.side() == Side::Upstream {
                    gw.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                }
                last_error = Some((e.status(), format!("upstream {} {e}", ep.endpoint.id)));
                // Nothing reached the upstream: another endpoint may be tried for any method,
                // within the route's attempts (at least one).
                if e.nothing_sent() && matches!(p.outgoing, Outgoing::Replayable(_)) && attempt < r.attempts.max(1) && Instant::now() < deadline {
                    attempt += 1;
                    continue;
                }
                if !e.retry_safe(p.repeatable) {
                    break;
                }
            }
        }
        if !may_retry(attempt, &p.outgoing).await {
            break;
        }
        attempt += 1;
    }
    let (status, detail) = last_error.unwrap_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, format!("no healthy endpoint for service {:?}", target.service)));
    (problem(status, &detail), tried.pop())
}

/// Transform: the upstream request's headers, path and body (small bodies are read first, so
/// they can be retried and the request leaves in one write; others stream).
async fn prepare(call: Call<'_>, req: Request<RequestBody>, websocket: bool, deadline: Instant) -> Result<Prepared, Response<Body>> {
    let Call { gw, route, authority, path, client_ip, tls, request_id, identity, .. } = call;
    let grpc = req.version() == Version::HTTP_2 && req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (mut parts, body) = req.into_parts();
    let declared = content_length(&parts.headers);
    let body_present = has_body(&parts, &body);
    let forwarded = Forwarded { authority, client_ip, tls, request_id, grpc, websocket };
    let (headers, hidden_query) = upstream_headers(std::mem::take(&mut parts.headers), &parts.uri, route, identity, &forwarded);
    let mut broken = None;
    let outgoing = if !body_present {
        Outgoing::Replayable(Bytes::new())
    } else if declared.is_some_and(|n| n > gw.options.max_body as u64) {
        let mut r = problem(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body over {} bytes", gw.options.max_body));
        // The body stays unread: the connection cannot carry another request, and says so.
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(r);
    } else if declared.is_some_and(|n| n <= gw.options.max_replay_body as u64) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, Limited::new(body, gw.options.max_replay_body).collect()).await {
            Ok(Ok(c)) => Outgoing::Replayable(c.to_bytes()),
            Ok(Err(e)) => return Err(problem(StatusCode::BAD_REQUEST, &format!("could not read the request body: {e}"))),
            Err(_) => return Err(problem(StatusCode::REQUEST_TIMEOUT, "request body not received in time")),
        }
    } else {
        let (stream, cell) = ClientBody::watch(Body::new(Limited::new(body, gw.options.max_body)));
        broken = Some(cell);
        Outgoing::Stream(Some(stream))
    };
    let query = hidden_query.as_deref().or(parts.uri.query());
    // The common case goes through our own HTTP/1.1 client, encoded once for every try; its
    // header map is done with then and serves the worker's next request.
    let wire = match (&outgoing, grpc, websocket) {
        (Outgoing::Replayable(b), false, false) => {
            let encoded = crate::h1::encode(&parts.method, |out| route.write_upstream_path(path, query, out), &headers, b);
            zhili_net::reuse::give_back_map(headers);
            Wire::Encoded(encoded)
        }
        _ => Wire::Parts { path_q: route.upstream_path(path, query), headers },
    };
    let repeatable = idempotent(&parts.method) || route.resilience.non_idempotent;
    Ok(Prepared { method: parts.method, wire, outgoing, grpc, broken, repeatable })
}

/// Send: one try of the prepared request to `ep`, within `per_try`. `None` when there is
/// nothing left to send (a streamed body went with an earlier try).
async fn send(
    gw: &Gateway,
    p: &mut Prepared,
    ep: &EndpointState,
    per_try: Duration,
    on_upgrade: &mut Option<OnUpgrade>,
) -> Option<Result<Response<Body>, UpstreamError>> {
    let result = match &p.wire {
        Wire::Encoded(request) => {
            let x = crate::h1::Exchange {
                request,
                head_request: p.method == Method::HEAD,
                idempotent: idempotent(&p.method),
                connect_timeout: gw.options.connect_timeout,
                max_connections: gw.options.max_upstream_connections,
            };
            tokio::time::timeout(per_try, crate::h1::send(&ep.conns, &x, &gw.stats.upstream_connections)).await
        }
        Wire::Parts { path_q, headers } => {
            let body = p.outgoing.take()?;
            let mut up = Request::new(body);
            *up.method_mut() = p.method.clone();
            *up.headers_mut() = headers.clone();
            // Boxed: hyper's state is large, and inline it would be part of every request's
            // future, though only gRPC, upgrades and streamed bodies take this way.
            tokio::time::timeout(per_try, Box::pin(send_other(gw, up, p.grpc, path_q, ep, on_upgrade))).await
        }
    };
    let result = result.unwrap_or_else(|_| Err(UpstreamError::Timeout(format!("did not answer within {per_try:?}"))));
    // A broken client body shows up as a failed send: it is the client's fault.
    Some(match (result, p.broken.as_ref().and_then(ClientBody::why)) {
        (Err(_), Some(why)) => Err(UpstreamError::Client(why)),
        (r, _) => r,
    })
}

/// gRPC over the pooled h2c client; upgrades and streamed bodies through hyper on a new
/// connection (a 101 answer joins the two upgraded connections).
async fn send_other(
    gw: &Gateway,
    mut up: Request<Body>,
    grpc: bool,
    path_q: &str,
    ep: &EndpointState,
    on_upgrade: &mut Option<OnUpgrade>,
) -> Result<Response<Body>, UpstreamError> {
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
    let mut resp = send_hyper(&ep.authority, up, gw.options.connect_timeout).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = on_upgrade.take() {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(d), Ok(u)) = (downstream.await, upstream.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
                }
            });
            let (mut parts, _) = resp.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            return Ok(Response::from_parts(parts, empty()));
        }
    }
    finish(resp).await
}

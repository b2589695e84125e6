//! The gateway through the real binary on real sockets: routing, transforms, direct answers and
//! redirects, failover when an upstream dies under load, hot route changes under load, the retry
//! budget, WebSockets across a route change, and a standalone gateway outliving its server.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zhili_test_support::Upstream;

/// Waits until `path` answers `want` through the gateway.
async fn until_body(gw: &zhili_client::Client, path: &str, want: &str) {
    until_body_with(gw, path, &[], want).await
}

async fn until_body_with(gw: &zhili_client::Client, path: &str, headers: &[(&str, &str)], want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, body) = get(gw, path, headers).await;
        if body == want {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never answered {want:?} (last {body:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `path` answers 200 through the gateway.
async fn until_ok(gw: &zhili_client::Client, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(gw, path, &[]).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "{path} never answered 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_match_forward_transform_redirect_and_answer_directly() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    for (up, tag) in ups.iter().zip(["v1", "v1", "v2"]) {
        register(&api, "web", up, &[tag]).await;
    }
    put_route(
        &api,
        "demo",
        r#"{"path_prefix": "/demo/", "service": "web", "strip_prefix": true, "load_balancer": "round_robin",
            "request_headers": {"set": {"x-added": "yes"}, "remove": ["x-secret"]},
            "response_headers": {"set": {"x-gw": "zhili"}}}"#,
    )
    .await;
    // The issue's minimal shape works as written.
    put_route(&api, "minimal", r#"{"path_prefix": "/minimal/", "service": "web", "strip_prefix": true}"#).await;
    until_ok(&gw, "/demo/hello").await;
    let before: Vec<u64> = ups.iter().map(|u| u.hits.load(Ordering::Relaxed)).collect();
    for _ in 0..30 {
        let (st, h, body) = get(&gw, "/demo/hello?x=1", &[("x-secret", "s"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]).await;
        assert_eq!(st, StatusCode::OK);
        assert!(body.ends_with(" /hello"), "{body}");
        assert_eq!(h.get("x-gw").unwrap(), "zhili");
        assert!(h.contains_key("x-request-id"));
    }
    let spread: Vec<u64> = ups.iter().zip(&before).map(|(u, b)| u.hits.load(Ordering::Relaxed) - b).collect();
    assert_eq!(spread, [10, 10, 10], "round robin over three endpoints");
    let seen = ups[0].last_headers.lock().unwrap().clone();
    assert_eq!(seen.get("x-added").unwrap(), "yes");
    assert!(!seen.contains_key("x-secret"));
    assert_eq!(seen.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert!(seen.contains_key("x-request-id"));
    let tp = seen.get("traceparent").unwrap().to_str().unwrap().to_string();
    assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && !tp.contains("b7ad6b7169203331"), "same trace, new parent: {tp}");
    assert_eq!(get(&gw, "/minimal/x", &[]).await.0, StatusCode::OK);
    // Per-route latency histograms in the server's metrics.
    let (_, r, _) = call(&api, Method::GET, "/metrics", None).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let count = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    assert!(count("zhili_gateway_request_duration_seconds_count{route=\"demo\",service=\"web\",class=\"2xx\"}") >= 30, "{text}");
    assert!(count("zhili_gateway_upstream_duration_seconds_count{service=\"web\"}") >= 30, "{text}");

    // Header-based canary to a subset.
    put_route(&api, "canary", r#"{"path_prefix": "/demo/", "headers": [{"name": "x-canary", "value": "1"}], "service": "web", "subset": {"tags": ["v2"]}}"#)
        .await;
    // (Not stripped: the canary route has no strip_prefix.)
    until_body_with(&gw, "/demo/c", &[("x-canary", "1")], "c /demo/c").await;
    for _ in 0..10 {
        let (_, _, body) = get(&gw, "/demo/c", &[("x-canary", "1")]).await;
        assert_eq!(body, "c /demo/c");
    }

    // Direct response, redirect, no route, a service with no endpoints.
    put_route(&api, "ping", r#"{"path": "/ping", "direct_response": {"status": 200, "body": "pong", "content_type": "text/plain"}}"#).await;
    until_body(&gw, "/ping", "pong").await;
    put_route(&api, "old", r#"{"path_prefix": "/old/", "redirect": {"path": "/new/", "status": 301}}"#).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // Over HTTP/2 the authority is the client's `:authority` (a Host header that disagrees is
    // refused), so the redirect keeps the gateway's address there.
    let (host, want) = if std::env::var_os("ZHILI_TEST_GATEWAY_HTTP2").is_some() {
        (vec![], format!("http://{}/new/?q=1", s.gateway.unwrap()))
    } else {
        (vec![("host", "example.test")], "http://example.test/new/?q=1".to_string())
    };
    loop {
        let (st, h, _) = get(&gw, "/old/x?q=1", &host).await;
        if st == StatusCode::MOVED_PERMANENTLY {
            assert_eq!(h.get("location").unwrap(), want.as_str());
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, h, body) = get(&gw, "/nowhere", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
    // The gateway's own errors are problem+json, like the API's.
    assert_eq!(h.get("content-type").unwrap(), "application/problem+json");
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((problem["status"].as_u64(), problem["title"].as_str()), (Some(404), Some("Not Found")));
    assert!(problem["detail"].as_str().unwrap().contains("no route"), "{body}");
    put_route(&api, "empty", r#"{"path_prefix": "/empty/", "service": "nobody"}"#).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, _, body) = get(&gw, "/empty/x", &[]).await;
        if st == StatusCode::SERVICE_UNAVAILABLE {
            assert!(body.contains("nobody"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{st} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A route change applies fast (measured from the API's answer to the first changed response).
    let t = Instant::now();
    put_route(&api, "ping", r#"{"path": "/ping", "direct_response": {"status": 200, "body": "pong2"}}"#).await;
    until_body(&gw, "/ping", "pong2").await;
    assert!(t.elapsed() < Duration::from_secs(1), "route change took {:?}", t.elapsed());

    // Bad routes are refused with the field named; deleting works.
    expect_problem(&api, Method::PUT, "/api/v1/routes/bad", Some(r#"{"path_regex": "(", "service": "web"}"#), StatusCode::BAD_REQUEST, "path_regex").await;
    expect_problem(&api, Method::PUT, "/api/v1/routes/bad", Some(r#"{"path_prefix": "/x/"}"#), StatusCode::BAD_REQUEST, "service").await;
    let (st, _, _) = call(&api, Method::DELETE, "/api/v1/routes/ping", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&gw, "/ping", &[]).await.0 != StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "deleted route still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bounded closed-loop load through the gateway; counts non-200 answers.
fn load(
    gw: zhili_client::Client,
    path: &'static str,
    workers: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = (0..workers)
        .map(|_| {
            let (gw, stop, ok, failed) = (gw.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                // Bounded: at most 20 s or 100k requests per worker.
                let deadline = Instant::now() + Duration::from_secs(20);
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    match gw.send(Method::GET, path, None, Duration::from_secs(10)).await {
                        Ok(r) if r.status == StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            let what = match other {
                                Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
                                Err(e) => e.to_string(),
                            };
                            eprintln!("failed request: {what}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_and_hot_route_change_under_load_fail_no_request() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    for up in &ups {
        register(&api, "web", up, &[]).await;
    }
    let green = Upstream::start("green").await;
    register(&api, "web-green", &green, &[]).await;
    put_route(&api, "app", r#"{"path_prefix": "/app/", "service": "web", "strip_prefix": true}"#).await;
    until_ok(&gw, "/app/").await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed, tasks) = load(gw.clone(), "/app/x", 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Kill one of three upstreams under load.
    ups[0].stop();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (b, c) = (ups[1].hits.load(Ordering::Relaxed), ups[2].hits.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ups[1].hits.load(Ordering::Relaxed) > b && ups[2].hits.load(Ordering::Relaxed) > c, "survivors keep serving");
    // Switch the route to another service under load.
    put_route(&api, "app", r#"{"path_prefix": "/app/", "service": "web-green", "strip_prefix": true}"#).await;
    let switched = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while green.hits.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "route change never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let applied = switched.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "only {ok} requests went through");
    assert_eq!(failed, 0, "{failed} of {} requests failed (upstream killed {:?} in, route switched in {applied:?})", ok + failed, killed_at.elapsed());
    // The ejection of the dead upstream is reported to the registry as passive health.
    let (st, _, v) = call(&api, Method::GET, "/api/v1/services/web/instances/a", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let until = v["passive_health"]["ejected_until_ms"].as_u64().unwrap_or_else(|| panic!("no passive health on the dead upstream: {v}"));
    assert!(until > unix_ms(), "{v}");
    let (_, _, v) = call(&api, Method::GET, "/api/v1/services/web/instances/b", None).await;
    assert!(v.get("passive_health").is_none(), "a live upstream was reported: {v}");
    // ... and appended to $gateway for subscribers.
    let (_, _, v) = call(&api, Method::GET, "/api/v1/streams/$gateway", None).await;
    let ejected: Vec<&serde_json::Value> =
        v["events"].as_array().unwrap().iter().map(|e| &e["event"]).filter(|e| e["type"] == "io.zhili.gateway.endpoint.ejected").collect();
    assert!(ejected.iter().any(|e| e["subject"] == "default/web/a"), "{v}");
    assert!(ejected.iter().all(|e| e["subject"] != "default/web/b"), "{v}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_budget_bounds_retries_to_a_failing_service() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    for up in &ups {
        register(&api, "flaky", up, &[]).await;
    }
    put_route(&api, "flaky", r#"{"path_prefix": "/flaky/", "service": "flaky", "retries": {"attempts": 3, "backoff": "1ms"}}"#).await;
    until_ok(&gw, "/flaky/").await;
    for up in &ups {
        up.status.store(503, Ordering::Relaxed);
    }
    let before: u64 = ups.iter().map(|u| u.hits.load(Ordering::Relaxed)).sum();
    let started = Instant::now();
    let n = 300;
    for _ in 0..n {
        let (st, _, _) = get(&gw, "/flaky/x", &[]).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    }
    let tries = ups.iter().map(|u| u.hits.load(Ordering::Relaxed)).sum::<u64>() - before;
    let secs = started.elapsed().as_secs_f64();
    // 20% of requests plus 3/s, plus the budget's starting allowance of 3.
    let bound = (n as f64 * 1.2 + 3.0 * secs + 3.0).ceil() as u64;
    assert!(tries >= n && tries <= bound, "{tries} upstream tries for {n} requests in {secs:.1}s (bound {bound}); without a budget it would be {}", n * 4);
}

async fn echo(tcp: &mut tokio::net::TcpStream, msg: &[u8]) {
    tcp.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_tunnel_survives_a_route_change() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    let ws = Upstream::start("ws").await;
    register(&api, "chat", &ws, &[]).await;
    let other = Upstream::start("other").await;
    register(&api, "other", &other, &[]).await;
    put_route(&api, "chat", r#"{"path_prefix": "/chat", "service": "chat"}"#).await;
    until_body(&gw, "/chat", "ws /chat").await;

    let mut tcp = tokio::net::TcpStream::connect(s.gateway.unwrap()).await.unwrap();
    tcp.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut byte)).await.unwrap().unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    echo(&mut tcp, b"hello").await;
    // Move the route elsewhere: new requests go there, the open tunnel stays.
    put_route(&api, "chat", r#"{"path_prefix": "/chat", "service": "other"}"#).await;
    until_body(&gw, "/chat", "other /chat").await;
    echo(&mut tcp, b"still here").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_gateway_follows_its_server_and_outlives_it() {
    let mut s = ServerProcess::start(bin(), &["--gateway-addr", "off"]);
    let token = bootstrap(&s).await;
    let api = client(&s, Some(&token));
    let up = Upstream::start("solo").await;
    register(&api, "solo", &up, &[]).await;
    put_route(&api, "solo", r#"{"path_prefix": "/solo/", "service": "solo", "strip_prefix": true}"#).await;

    let mut child = tokio::process::Command::new(bin())
        .args([
            "gateway",
            "--server",
            &format!("http://{}", s.api),
            "--addr",
            "127.0.0.1:0",
            "--token",
            &token,
            "--log-level",
            "warn",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut metrics_line = String::new();
    tokio::time::timeout(Duration::from_secs(30), tokio::io::AsyncBufReadExt::read_line(&mut out, &mut metrics_line)).await.unwrap().unwrap();
    let metrics_url = metrics_line.trim().strip_prefix("zhili gateway metrics on ").unwrap_or_else(|| panic!("{metrics_line}")).to_string();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)).await.unwrap().unwrap();
    let addr = line.trim().strip_prefix("zhili gateway listening on http://").unwrap_or_else(|| panic!("{line}")).to_string();
    let gw = zhili_client::Client::new(&format!("http://{addr}"), None).unwrap();
    until_body(&gw, "/solo/x", "solo /x").await;

    // A route change reaches the standalone gateway by watch.
    put_route(&api, "solo", r#"{"path_prefix": "/solo/", "service": "solo"}"#).await;
    until_body(&gw, "/solo/x", "solo /solo/x").await;
    // So do consumers: an API-key route works with a key stored on the server.
    let (st, _, v) = call(&api, Method::PUT, "/api/v1/consumers/ci", Some(r#"{"api_keys": ["ci-key-0123456789abcdef"]}"#)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    put_route(&api, "keyed", r#"{"path_prefix": "/keyed/", "service": "solo", "auth": {"api_key": {}}}"#).await;
    until_body_with(&gw, "/keyed/x", &[("x-api-key", "ci-key-0123456789abcdef")], "solo /keyed/x").await;
    assert_eq!(get(&gw, "/keyed/x", &[]).await.0, StatusCode::UNAUTHORIZED);

    // Its own metrics endpoint counts what it served.
    let m = zhili_client::Client::new(metrics_url.trim_end_matches("/metrics"), None).unwrap();
    let (st, r, _) = call(&m, Method::GET, "/metrics", None).await;
    assert_eq!(st, StatusCode::OK);
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.lines().any(|l| l.starts_with("zhili_gateway_requests_total ") && !l.ends_with(" 0")), "{text}");

    // The server dies; the gateway keeps serving its last snapshot.
    s.kill9();
    for _ in 0..20 {
        let (st, _, body) = get(&gw, "/solo/x", &[]).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "solo /solo/x"));
        assert_eq!(get(&gw, "/keyed/x", &[("x-api-key", "ci-key-0123456789abcdef")]).await.0, StatusCode::OK);
    }
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_answer_429_with_retry_after_per_route_and_per_key() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    put_route(&api, "rl", r#"{"path_prefix": "/rl/", "direct_response": {"status": 200, "body": "ok"}, "rate_limit": {"rate": 0.01, "burst": 5}}"#).await;
    put_route(
        &api,
        "rk",
        r#"{"path_prefix": "/rk/", "direct_response": {"status": 200, "body": "ok"}, "rate_limit": {"rate": 0.01, "burst": 2, "key": {"header": "x-user"}}}"#,
    )
    .await;
    until_body(&gw, "/rk/", "ok").await; // uses the empty-key bucket of /rk/, not users a or b
    until_body(&gw, "/rl/", "ok").await;
    // The route's bucket of 5 (one spent above; a refill takes 100 s), then 429s.
    let mut ok = 0;
    let mut limited = None;
    for _ in 0..20 {
        let (st, h, _) = get(&gw, "/rl/x", &[]).await;
        match st {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited = Some(h),
            other => panic!("{other}"),
        }
    }
    assert_eq!(ok, 4, "allowed of 20 with burst 5, one spent before");
    let h = limited.expect("some requests were limited");
    assert!(h.get("retry-after").unwrap().to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(h.get("ratelimit-limit").unwrap(), "5");
    assert_eq!(h.get("ratelimit-remaining").unwrap(), "0");
    // Per key: each user has its own bucket of 2.
    for user in ["alice", "bob"] {
        let headers = [("x-user", user)];
        let statuses: Vec<StatusCode> =
            futures_util::future::join_all((0..3).map(|_| get(&gw, "/rk/x", &headers))).await.into_iter().map(|(st, _, _)| st).collect();
        assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 2, "{user}: {statuses:?}");
        assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{user}: {statuses:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn circuit_breaker_opens_then_closes_through_half_open_and_limits_concurrency() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    let up = Upstream::start("fragile").await;
    register(&api, "fragile", &up, &[]).await;
    put_route(
        &api,
        "fragile",
        r#"{"path_prefix": "/fragile/", "service": "fragile", "retries": {"attempts": 0},
            "circuit_breaker": {"min_calls": 5, "error_ratio": 0.5, "open_for": "1s", "half_open_probes": 2}}"#,
    )
    .await;
    until_ok(&gw, "/fragile/").await;
    up.status.store(500, Ordering::Relaxed);
    let mut statuses = vec![];
    for _ in 0..4 {
        statuses.push(get(&gw, "/fragile/x", &[]).await.0);
    }
    assert!(statuses.iter().all(|s| *s == StatusCode::INTERNAL_SERVER_ERROR), "{statuses:?}");
    // Open: fast 503s with Retry-After, and the upstream sees nothing.
    let hits = up.hits.load(Ordering::Relaxed);
    for _ in 0..5 {
        let (st, h, body) = get(&gw, "/fragile/x", &[]).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("circuit breaker"), "{body}");
        assert_eq!(h.get("retry-after").unwrap(), "1");
    }
    assert_eq!(up.hits.load(Ordering::Relaxed), hits, "an open breaker sends nothing upstream");
    // The registry shows the transition with the service.
    let breaker_state = || async {
        let (_, _, v) = call(&api, Method::GET, "/api/v1/services/fragile", None).await;
        v["circuit_breaker"]["state"].as_str().unwrap_or_default().to_string()
    };
    assert_eventually(Duration::from_secs(5), "breaker reported open", || async { breaker_state().await == "open" }).await;
    // Half-open after open_for: probes succeed, the breaker closes.
    up.status.store(200, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..4 {
        assert_eq!(get(&gw, "/fragile/x", &[]).await.0, StatusCode::OK);
    }
    assert_eventually(Duration::from_secs(5), "breaker reported closed", || async { breaker_state().await == "closed" }).await;
    // The endpoint standalone gateways report through.
    let (st, _, _) = call(&api, Method::PUT, "/api/v1/services/fragile/breaker", Some(r#"{"state": "half_open", "reason": "probe"}"#)).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(breaker_state().await, "half_open");
    // Every transition is also an event on $gateway: the embedded gateway's and the reported one.
    let (_, _, v) = call(&api, Method::GET, "/api/v1/streams/$gateway?limit=100", None).await;
    let seen: Vec<(&str, &str)> =
        v["events"].as_array().unwrap().iter().map(|e| (e["event"]["type"].as_str().unwrap(), e["event"]["subject"].as_str().unwrap())).collect();
    for kind in ["io.zhili.gateway.breaker.opened", "io.zhili.gateway.breaker.half_opened", "io.zhili.gateway.breaker.closed"] {
        assert!(seen.contains(&(kind, "default/fragile")), "{kind} missing from {seen:?}");
    }
    expect_problem(&api, Method::PUT, "/api/v1/services/fragile/breaker", Some(r#"{"state": "ajar"}"#), StatusCode::BAD_REQUEST, "state").await;
    let (st, _, _) = call(&api, Method::PUT, "/api/v1/services/nobody/breaker", Some(r#"{"state": "open"}"#)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Concurrency limit: with 2 in flight, the third is turned away at once.
    put_route(&api, "slow", r#"{"path_prefix": "/slow/", "service": "fragile", "circuit_breaker": {"max_concurrent": 2}}"#).await;
    until_ok(&gw, "/slow/").await;
    up.delay_ms.store(500, Ordering::Relaxed);
    let started = Instant::now();
    let answers = futures_util::future::join_all((0..5).map(|_| get(&gw, "/slow/x", &[]))).await;
    let ok = answers.iter().filter(|(st, _, _)| *st == StatusCode::OK).count();
    let limited: Vec<&String> = answers.iter().filter(|(st, _, _)| *st == StatusCode::SERVICE_UNAVAILABLE).map(|(_, _, b)| b).collect();
    assert_eq!((ok, limited.len()), (2, 3), "{answers:?}");
    assert!(limited.iter().all(|b| b.contains("in flight")), "{limited:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // All of it shows in the server's metrics.
    let (_, r, _) = call(&api, Method::GET, "/metrics", None).await;
    let text = String::from_utf8_lossy(&r.body);
    for line in [
        "zhili_gateway_breaker_opened_total 1",
        "zhili_gateway_breaker_rejected_total 5",
        "zhili_gateway_concurrency_rejected_total 3",
        "zhili_gateway_breaker_open{namespace=\"default\",service=\"fragile\"} 0",
        "zhili_gateway_endpoints{namespace=\"default\",service=\"fragile\",state=\"available\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_applies_a_routes_file_declaratively() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    put_route(&api, "stale", r#"{"path": "/stale", "direct_response": {"status": 200, "body": "stale"}}"#).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.json");
    std::fs::write(
        &file,
        r#"{"routes": {
            "hello": {"path": "/hello", "direct_response": {"status": 200, "body": "hi"}},
            "home": {"path": "/", "redirect": {"path": "/hello"}}
        }}"#,
    )
    .unwrap();
    let zhili = |args: &[&str]| {
        let out = std::process::Command::new(bin()).args(args).env("ZHILI_ADDR", format!("http://{}", s.api)).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = zhili(&["route", "apply", "--file", file.to_str().unwrap(), "--prune", "-o", "json"]);
    assert!(out.contains("\"stale\""), "pruned: {out}");
    until_body(&gw, "/hello", "hi").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&gw, "/stale", &[]).await.0 != StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "pruned route still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = zhili(&["route", "list", "-o", "json"]);
    assert!(list.contains("\"hello\"") && list.contains("\"home\"") && !list.contains("\"stale\""), "{list}");
    zhili(&["route", "put", "hello", r#"{"path": "/hello", "direct_response": {"status": 200, "body": "hi again"}}"#]);
    until_body(&gw, "/hello", "hi again").await;
    zhili(&["route", "delete", "home"]);
    // A bad route is refused with the field named.
    let bad = std::process::Command::new(bin())
        .args(["route", "put", "bad", r#"{"path": "x", "service": "s"}"#])
        .env("ZHILI_ADDR", format!("http://{}", s.api))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("path"), "{}", String::from_utf8_lossy(&bad.stderr));

    // Consumers the same way: the key works through the gateway, the listing shows only digests.
    let consumers = dir.path().join("consumers.json");
    std::fs::write(&consumers, r#"{"consumers": {"ops": {"api_keys": ["ops-key-0123456789abcdef"], "scopes": ["admin"]}}}"#).unwrap();
    zhili(&["consumer", "apply", "--file", consumers.to_str().unwrap()]);
    zhili(&[
        "route",
        "put",
        "guarded",
        r#"{"path": "/guarded", "direct_response": {"status": 200, "body": "in"}, "auth": {"api_key": {}, "scopes": ["admin"]}}"#,
    ]);
    until_body_with(&gw, "/guarded", &[("x-api-key", "ops-key-0123456789abcdef")], "in").await;
    let list = zhili(&["consumer", "list", "-o", "json"]);
    assert!(list.contains("\"ops\"") && list.contains("sha256:") && !list.contains("ops-key-0123456789abcdef"), "{list}");
    zhili(&["consumer", "delete", "ops"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&gw, "/guarded", &[("x-api-key", "ops-key-0123456789abcdef")]).await.0 != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "a deleted consumer's key kept working");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_passes_through_over_h2c() {
    use http_body_util::{BodyExt, Full};
    let s = dev_server();
    let api = client(&s, None);
    let status = Arc::new(std::sync::atomic::AtomicU8::new(1));
    let target = zhili_test_support::grpc_health_target(status.clone()).await;
    let body = serde_json::json!({"id": "g1", "address": "127.0.0.1", "port": target.port(), "ephemeral": false}).to_string();
    let (st, _, v) = call(&api, Method::POST, "/api/v1/services/grpc-health/instances", Some(&body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    put_route(&api, "grpc", r#"{"path_prefix": "/grpc.health.v1.Health/", "service": "grpc-health"}"#).await;

    // One gRPC call over h2c (prior knowledge) through the gateway: HealthCheckRequest{} → status.
    let check = |addr: std::net::SocketAddr| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        // A trailers-only answer carries grpc-status in the head; otherwise it is a trailer.
        let in_head = resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
        let collected = resp.into_body().collect().await.unwrap();
        let grpc_status = in_head.or_else(|| collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.to_str().unwrap().to_string()));
        (grpc_status, collected.to_bytes())
    };
    let gw = s.gateway.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (grpc_status, body) = check(gw).await;
        if grpc_status.as_deref() == Some("0") {
            assert_eq!(&body[..], &[0, 0, 0, 0, 2, 8, 1], "SERVING, framed");
            break;
        }
        assert!(Instant::now() < deadline, "no gRPC answer through the gateway: {grpc_status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status.store(2, Ordering::Relaxed);
    let (grpc_status, body) = check(gw).await;
    assert_eq!((grpc_status.as_deref(), &body[..]), (Some("0"), &[0u8, 0, 0, 0, 2, 8, 2][..]), "NOT_SERVING passes through");
}

/// Sends raw bytes to the gateway and returns the status line of the answer.
async fn raw_status(s: &ServerProcess, request: &[u8]) -> String {
    raw_answer(s, request).await.lines().next().unwrap_or_default().to_string()
}

/// The first read of the answer to `request` sent on a raw socket (its head, for small answers).
async fn raw_answer(s: &ServerProcess, request: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(s.gateway.unwrap()).await.unwrap();
    let _ = tcp.write_all(request).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_and_heads_are_refused() {
    let s = dev_server();
    let api = client(&s, None);
    let up = Upstream::start("big").await;
    register(&api, "big", &up, &[]).await;
    put_route(&api, "big", r#"{"path_prefix": "/big/", "service": "big"}"#).await;
    until_ok(&gw_client(&s), "/big/").await;
    let hits = up.hits.load(Ordering::Relaxed);
    // A declared body over 16 MiB: 413 before a byte of it is read, and nothing upstream.
    let answer = raw_answer(&s, b"POST /big/x HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "the unread body ends the connection: {answer}");
    // A request head over 64 KiB.
    let mut head = b"GET /big/x HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 100 * 1024));
    head.extend_from_slice(b"\r\n\r\n");
    let status = raw_status(&s, &head).await;
    assert!(status.starts_with("HTTP/1.1 431") || status.is_empty(), "{status}");
    assert_eq!(up.hits.load(Ordering::Relaxed), hits);
    // Still serving.
    assert_eq!(get(&gw_client(&s), "/big/x", &[]).await.0, StatusCode::OK);

    // Bodies arrive whole: a small one (read first, sent with the head in one write), a large
    // one (streamed), and one without a length (chunked).
    let gw = gw_client(&s);
    for size in [10usize, 60 * 1024, 300 * 1024] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let sum: u64 = body.iter().map(|b| u64::from(*b)).sum();
        let req = http::Request::post("/big/upload").body(bytes::Bytes::from(body)).unwrap();
        let r = gw.send_request(req, Duration::from_secs(10)).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&r.body), format!("big /big/upload {size} {sum}"));
    }
    let mut tcp = tokio::net::TcpStream::connect(s.gateway.unwrap()).await.unwrap();
    tcp.write_all(b"POST /big/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await.unwrap();
    let sum: u64 = b"hello world".iter().map(|b| u64::from(*b)).sum();
    assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with(&format!("big /big/chunked 11 {sum}")), "{resp}");
}

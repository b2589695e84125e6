//! The gateway attacked by a hostile client and a hostile (or buggy) upstream, through the real
//! binary with raw sockets on both sides. Each test is a regression test for a finding of the
//! gateway review: it failed before the fix it names.

// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw upstream does with one request: answer (then maybe write more after a delay), or
/// read it and close without a word.
#[derive(Clone)]
enum Step {
    Answer(Vec<u8>),
    AnswerThen(Vec<u8>, Duration, Vec<u8>),
    Close,
}

/// A hand-written HTTP/1.1 upstream: `script(connection's request number, request line)` says
/// what to do; every request line seen is kept.
struct Raw {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    /// Connections whose handling ended (closed by the gateway, or by the script).
    ended: Arc<AtomicUsize>,
}

async fn raw_upstream(script: impl Fn(usize, &str) -> Step + Send + Sync + 'static) -> Raw {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let (s2, e2) = (seen.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let (seen, script, ended) = (s2.clone(), script.clone(), e2.clone());
            tokio::spawn(async move {
                // Counted when this connection's handling returns, however it returns.
                struct Ended(Arc<AtomicUsize>);
                impl Drop for Ended {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let _ended = Ended(ended);
                let mut buf = Vec::new();
                for n in 0.. {
                    // One request: the head, then a Content-Length body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match tokio::time::timeout(Duration::from_secs(20), sock.read(&mut chunk)).await {
                            Ok(Ok(k)) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(k) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                            _ => return,
                        }
                    }
                    buf.drain(..head_end + len);
                    let line = head.lines().next().unwrap_or_default().to_string();
                    seen.lock().unwrap().push(format!("{line}\n{}", head.to_ascii_lowercase()));
                    match script(n, &line) {
                        Step::Answer(b) => {
                            if sock.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        Step::AnswerThen(b, after, more) => {
                            let _ = sock.write_all(&b).await;
                            tokio::time::sleep(after).await;
                            let _ = sock.write_all(&more).await;
                        }
                        Step::Close => return,
                    }
                }
            });
        }
    });
    Raw { addr, seen, ended }
}

/// A dev server with a catch-all route to service `up` at `addr`; returns once the gateway
/// forwards to it.
async fn gateway_to(addr: SocketAddr, route: serde_json::Value) -> (ServerProcess, zhili_client::Client) {
    let s = dev_server();
    let api = client(&s, None);
    let body = json!({"id": "u1", "address": "127.0.0.1", "port": addr.port(), "ephemeral": false}).to_string();
    assert_eq!(call(&api, Method::POST, "/api/v1/services/up/instances", Some(&body)).await.0, StatusCode::CREATED);
    put_route(&api, "all", &route.to_string()).await;
    (s, api)
}

/// One raw request to the gateway (`Connection: close` is added); the whole answer as text.
async fn raw(gw: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(gw).await.unwrap();
    let req = request.replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn until_forwarding(gw: SocketAddr, path: &str) {
    assert_eventually(Duration::from_secs(10), "the gateway forwards", || async move {
        raw(gw, &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")).await.starts_with("HTTP/1.1 200")
    })
    .await;
}

const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\nSMUGGLED-FOR-SOMEONE-ELSE";
const CLEAN: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean";

/// Finding 1: bytes an upstream sends past its framed answer never reach another client; any
/// framing anomaly closes the connection instead of pooling it.
#[tokio::test(flavor = "multi_thread")]
async fn no_answer_ever_reaches_the_wrong_client() {
    let up = raw_upstream(|_, line| {
        let then = |first: &[u8]| Step::AnswerThen(first.to_vec(), Duration::from_millis(150), SMUGGLED.to_vec());
        let with = |first: &[u8]| Step::Answer([first, SMUGGLED].concat());
        match line.split(' ').nth(1).unwrap_or("") {
            "/late" => then(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            "/head" => then(b"HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\n"),
            "/nocontent" => with(b"HTTP/1.1 204 No Content\r\n\r\n"),
            "/chunked" => with(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            "/xchunked" => with(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello"),
            "/gzip" => with(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\nContent-Length: 5\r\n\r\nhello"),
            _ => Step::Answer(CLEAN.to_vec()),
        }
    })
    .await;
    let (s, _api) = gateway_to(up.addr, json!({"path_prefix": "/", "service": "up"})).await;
    let gw = s.gateway.unwrap();
    until_forwarding(gw, "/clean").await;
    for (method, path) in [("GET", "/late"), ("HEAD", "/head"), ("GET", "/nocontent"), ("GET", "/chunked"), ("GET", "/xchunked"), ("GET", "/gzip")] {
        let first = raw(gw, &format!("{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n")).await;
        assert!(first.starts_with("HTTP/1.1 2"), "{path}: {first}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Other clients, on other connections: each gets its own answer, never the leftover.
        for _ in 0..3 {
            let next = raw(gw, "GET /clean HTTP/1.1\r\nHost: t\r\n\r\n").await;
            assert!(!next.contains("SMUGGLED"), "after {path}: another client got {next:?}");
            assert!(next.ends_with("clean"), "after {path}: {next:?}");
        }
    }
    // Read until close (RFC 9112): with an unknown final coding the whole rest is the body.
    let first = raw(gw, "GET /xchunked HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(first.contains("helloHTTP/1.1 200 OK"), "{first}");
}

/// Finding 7: answers are re-framed from what was read; upstream framing headers do not pass.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_framing_is_not_passed_through() {
    let up = raw_upstream(|_, line| match line.split(' ').nth(1).unwrap_or("") {
        "/both" => Step::Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n".to_vec()),
        "/plus" => Step::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello".to_vec()),
        _ => Step::Answer(CLEAN.to_vec()),
    })
    .await;
    let (s, _api) = gateway_to(up.addr, json!({"path_prefix": "/", "service": "up"})).await;
    let gw = s.gateway.unwrap();
    until_forwarding(gw, "/clean").await;
    let both = raw(gw, "GET /both HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(both.starts_with("HTTP/1.1 200"), "{both}");
    assert!(!both.to_ascii_lowercase().contains("content-length: 3"), "{both}");
    assert!(both.contains("abcdef"), "the whole body: {both}");
    let plus = raw(gw, "GET /plus HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(plus.starts_with("HTTP/1.1 502"), "an invalid Content-Length is the upstream's failure: {plus}");
    assert!(!plus.contains("+5"), "{plus}");
}

/// Finding 3: a POST the upstream read and then dropped is not sent again; a connect failure
/// (nothing sent) is retried on another endpoint, for any method.
#[tokio::test(flavor = "multi_thread")]
async fn a_post_is_never_replayed() {
    // Answers the first request on each connection; reads any later one and closes.
    let up = raw_upstream(|n, _| if n == 0 { Step::Answer(CLEAN.to_vec()) } else { Step::Close }).await;
    let (s, api) = gateway_to(up.addr, json!({"path_prefix": "/", "service": "up", "retries": {"attempts": 3, "backoff": "1ms"}})).await;
    let gw = s.gateway.unwrap();
    until_forwarding(gw, "/warm").await;
    let posts = || up.seen.lock().unwrap().iter().filter(|l| l.starts_with("POST")).count();
    let before = posts();
    let answer = raw(gw, "POST /order HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello").await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(posts() - before, 1, "the POST reached the upstream exactly once: {:?}", up.seen.lock().unwrap());

    // A dead endpoint next to a live one: POSTs that hit the dead one are retried (nothing was sent).
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let live = zhili_test_support::Upstream::start("live").await;
    for (id, port) in [("dead", dead.port()), ("live", live.addr.port())] {
        let body = json!({"id": id, "address": "127.0.0.1", "port": port, "ephemeral": false}).to_string();
        assert_eq!(call(&api, Method::POST, "/api/v1/services/pay/instances", Some(&body)).await.0, StatusCode::CREATED);
    }
    put_route(&api, "pay", r#"{"path_prefix": "/pay/", "service": "pay", "retries": {"attempts": 0}}"#).await;
    assert_eventually(Duration::from_secs(10), "pay routed", || async move { raw(gw, "GET /pay/x HTTP/1.1\r\nHost: t\r\n\r\n").await.contains("live") }).await;
    for i in 0..10 {
        let r = raw(gw, "POST /pay/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi").await;
        assert!(r.starts_with("HTTP/1.1 200"), "POST {i}: {r}");
    }
}

/// Finding 2: faults of the client's own request are answered 400 and never count against the
/// upstream: no breaker opens, no endpoint is ejected.
#[tokio::test(flavor = "multi_thread")]
async fn clients_cannot_cut_a_healthy_service_off() {
    let (a, b) = (zhili_test_support::Upstream::start("a").await, zhili_test_support::Upstream::start("b").await);
    let s = dev_server();
    let api = client(&s, None);
    register(&api, "web", &a, &[]).await;
    register(&api, "web", &b, &[]).await;
    put_route(&api, "web", r#"{"path_prefix": "/", "service": "web", "circuit_breaker": {"min_calls": 5, "error_ratio": 0.5}}"#).await;
    let gw = s.gateway.unwrap();
    until_forwarding(gw, "/x").await;
    for i in 0..25 {
        let r = raw(gw, "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n").await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "bad chunk {i}: {r}");
    }
    // Uploads abandoned mid-body.
    for _ in 0..12 {
        let mut sock = TcpStream::connect(gw).await.unwrap();
        sock.write_all(b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n100\r\npartial").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(sock);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        let r = raw(gw, "GET /x HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200"), "normal request {i} after client faults: {r}");
    }
    let (_, _, v) = call(&api, Method::GET, "/api/v1/services/web", None).await;
    assert!(v["instances"].as_array().unwrap().iter().all(|i| i.get("passive_health").is_none()), "no endpoint was ejected: {v}");
    assert!(v.get("circuit_breaker").is_none_or(|c| c["state"] != "open"), "{v}");
}

/// Findings 4, 5, 9, 12: routing and forwarding see one normalized authority and path; paths
/// that could slip past a route's auth are refused; identity headers are the gateway's.
#[tokio::test(flavor = "multi_thread")]
async fn routing_sees_exactly_what_the_upstream_sees() {
    let up = zhili_test_support::Upstream::start("up").await;
    let s = dev_server();
    let api = client(&s, None);
    register(&api, "up", &up, &[]).await;
    let (st, _, v) = call(&api, Method::PUT, "/api/v1/consumers/ops", Some(r#"{"api_keys": ["k-0123456789abcdef0123"]}"#)).await;
    assert!(st.is_success(), "{v}");
    put_route(&api, "admin", r#"{"path_prefix": "/admin/", "service": "up", "priority": 10, "auth": {"api_key": {}}}"#).await;
    put_route(&api, "internal", r#"{"hosts": ["admin.internal"], "path_prefix": "/", "service": "up", "priority": 5, "auth": {"api_key": {}}}"#).await;
    put_route(&api, "public", r#"{"path_prefix": "/", "service": "up"}"#).await;
    let gw = s.gateway.unwrap();
    until_forwarding(gw, "/pub").await;

    // Absolute-form wins, and is what the upstream gets as Host.
    let r = raw(gw, "GET http://public.example/x HTTP/1.1\r\nHost: admin.internal\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let got = up.last_headers.lock().unwrap().clone();
    assert_eq!(got.get("host").unwrap(), "public.example");
    assert_eq!(got.get("x-forwarded-host").unwrap(), "public.example");
    // A trailing dot and upper case still reach the authenticated host route.
    assert!(raw(gw, "GET /x HTTP/1.1\r\nHost: Admin.Internal.\r\n\r\n").await.starts_with("HTTP/1.1 401"));
    for bad in [
        "GET /x HTTP/1.1\r\nHost: x@admin.internal\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: admin.internal\r\n\r\n",
        "GET /x HTTP/1.1\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: bad host\r\n\r\n",
    ] {
        let r = raw(gw, bad).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{bad:?}: {r}");
    }

    // HTTP/2: :authority and a host header that disagree are refused; agreeing ones route.
    let h2 = |authority: &'static str, host: &'static str| async move {
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(gw).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://{authority}/x")).header("host", host).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
        send.send_request(req).await.unwrap().status()
    };
    assert_eq!(h2("public.example", "admin.internal").await, StatusCode::BAD_REQUEST);
    assert_eq!(h2("public.example", "Public.Example.").await, StatusCode::OK);
    assert_eq!(h2("admin.internal", "admin.internal").await, StatusCode::UNAUTHORIZED);

    // Paths: normalized before matching (so the admin route's auth applies), or refused.
    for sneaky in ["/pub/../admin/secret", "/./admin/x", "/%61dmin/x", "//admin/secret"] {
        let r = raw(gw, &format!("GET {sneaky} HTTP/1.1\r\nHost: t\r\n\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{sneaky}: {r}");
    }
    for refused in ["/admin%2fsecret", "/pub/%2e%2e/admin/secret", "/pub/..%2fadmin/secret", "/pub/..;/admin/secret"] {
        let r = raw(gw, &format!("GET {refused} HTTP/1.1\r\nHost: t\r\n\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{refused}: {r}");
    }
    // The upstream gets the normalized path.
    let r = raw(gw, "GET /pub/./a//b/../c HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(r.ends_with("up /pub/a/c"), "{r}");
    let r = raw(gw, "GET /admin/../admin/ok HTTP/1.1\r\nHost: t\r\nx-api-key: k-0123456789abcdef0123\r\n\r\n").await;
    assert!(r.ends_with("up /admin/ok"), "{r}");

    // Identity and framing headers: a client's x-consumer never reaches the upstream; Connection
    // cannot remove Host; Expect is not forwarded after the body was read; CONNECT is refused.
    let r = raw(gw, "GET /pub HTTP/1.1\r\nHost: t\r\nx-consumer: admin\r\nConnection: host\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let got = up.last_headers.lock().unwrap().clone();
    assert!(got.get("x-consumer").is_none(), "spoofed identity forwarded: {got:?}");
    assert_eq!(got.get("host").unwrap(), "t");
    let r = raw(gw, "POST /pub HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi").await;
    assert!(r.contains("200 OK"), "{r}");
    assert!(up.last_headers.lock().unwrap().get("expect").is_none());
    let r = raw(gw, "CONNECT admin.internal:443 HTTP/1.1\r\nHost: admin.internal:443\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
}

/// Finding 8: an h2c upgrade is not forwarded as a tunnel (only WebSocket upgrades are).
#[tokio::test(flavor = "multi_thread")]
async fn h2c_upgrades_do_not_tunnel_past_routing() {
    // An upstream that would happily switch to h2c and echo whatever follows.
    let up = raw_upstream(|_, line| {
        if line.starts_with("GET /up") {
            Step::Answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_vec())
        } else {
            Step::Answer(CLEAN.to_vec())
        }
    })
    .await;
    let (s, _api) = gateway_to(up.addr, json!({"path_prefix": "/", "service": "up"})).await;
    let gw = s.gateway.unwrap();
    until_forwarding(gw, "/clean").await;
    let r = raw(gw, "GET /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n").await;
    assert!(!r.starts_with("HTTP/1.1 101"), "{r}");
    let seen = up.seen.lock().unwrap().clone();
    let forwarded = seen.iter().find(|l| l.starts_with("GET /up")).unwrap();
    assert!(!forwarded.contains("upgrade: h2c") && !forwarded.contains("http2-settings"), "{forwarded}");
}

/// Finding 6: routes may not set framing or hop-by-hop headers (400 naming the field).
#[tokio::test]
async fn routes_cannot_frame_messages() {
    let s = dev_server();
    let api = client(&s, None);
    for (route, field) in [
        (r#"{"path_prefix": "/", "service": "up", "request_headers": {"set": {"transfer-encoding": "chunked"}}}"#, "request_headers.transfer-encoding"),
        (r#"{"path_prefix": "/", "service": "up", "response_headers": {"set": {"content-length": "2"}}}"#, "response_headers.content-length"),
        (r#"{"path_prefix": "/", "service": "up", "request_headers": {"remove": ["Host"]}}"#, "request_headers.remove"),
        (r#"{"direct_response": {"status": 200, "body": "x"}, "response_headers": {"add": {"Connection": "close"}}}"#, "response_headers.Connection"),
    ] {
        expect_problem(&api, Method::PUT, "/api/v1/routes/r", Some(route), StatusCode::BAD_REQUEST, field).await;
    }
}

/// Finding 11: a client that never reads a large answer does not hold the upstream connection.
#[tokio::test(flavor = "multi_thread")]
async fn slow_readers_do_not_pin_upstream_connections() {
    let big = vec![b'x'; 4 * 1024 * 1024];
    let answer = [format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes(), big].concat();
    let up = raw_upstream(move |_, _| Step::Answer(answer.clone())).await;
    let s = ServerProcess::start(bin(), &["--dev", "--write-timeout", "1s"]);
    let api = client(&s, None);
    let body = json!({"id": "u1", "address": "127.0.0.1", "port": up.addr.port(), "ephemeral": false}).to_string();
    assert_eq!(call(&api, Method::POST, "/api/v1/services/up/instances", Some(&body)).await.0, StatusCode::CREATED);
    put_route(&api, "all", r#"{"path_prefix": "/", "service": "up"}"#).await;
    let gw = s.gateway.unwrap();
    assert_eventually(Duration::from_secs(10), "routed", || async move { raw(gw, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.len() > 4_000_000 }).await;
    // A client that asks and never reads: the gateway gives up on it (write timeout 1 s), and
    // with it the upstream connection that was feeding it.
    let ended_before = up.ended.load(Ordering::SeqCst);
    let mut stuck = TcpStream::connect(gw).await.unwrap();
    stuck.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let ended = &up.ended;
    assert_eventually(Duration::from_secs(15), "the upstream connection feeding a client that never reads is released", || async move {
        ended.load(Ordering::SeqCst) > ended_before
    })
    .await;
    drop(stuck);
    // Others are served meanwhile.
    let r = raw(gw, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{}", &r[..r.len().min(200)]);
}

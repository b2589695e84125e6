//! Zhili's own HTTP/1.1 server side (`zhili_net::h1_server`), through the real binary on raw
//! sockets, on the gateway and on the API listener: pipelined requests answered in order (on
//! two gateway workers), a request split at every byte boundary, slowloris and idle clients cut
//! off, oversized and malformed heads refused, HTTP/1.0 and HEAD, the hand-over to hyper in the
//! middle of a connection (a chunked body), a blocking query held and answered on a keep-alive
//! connection, and the same answers over HTTP/1.1 (the fast path) and HTTP/2 (hyper).
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zhili_test_support::Upstream;

/// A server (dev mode, `extra` flags) with route `/p/` to an upstream named `p` that answers
/// "p {path}" (and " {len} {byte sum}" of a request body).
async fn serving(extra: &[&str]) -> (ServerProcess, Upstream) {
    let mut args = vec!["--dev"];
    args.extend_from_slice(extra);
    let s = ServerProcess::start(bin(), &args);
    let api = client(&s, None);
    let up = Upstream::start("p").await;
    register(&api, "p", &up, &[]).await;
    put_route(&api, "p", r#"{"path_prefix": "/p/", "service": "p"}"#).await;
    let gw = gw_client(&s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&gw, "/p/", &[]).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "the route never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (s, up)
}

/// One answer read off a raw connection: status, head (lowercase) and body. Bodies must be
/// framed by Content-Length (or absent: `no_body` for HEAD answers).
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Reads one answer from `tcp`, keeping what was read past it in `buf`.
async fn answer(tcp: &mut TcpStream, buf: &mut Vec<u8>, no_body: bool) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(tcp, buf, deadline).await;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let length = head.lines().find_map(|l| l.strip_prefix("content-length: ")).map(|v| v.trim().parse::<usize>().unwrap()).unwrap_or_else(|| {
        if no_body || status == 204 || status == 304 {
            0
        } else {
            panic!("answer without content-length: {head}")
        }
    });
    let length = if no_body { 0 } else { length };
    while buf.len() < end + length {
        fill(tcp, buf, deadline).await;
    }
    let body = String::from_utf8_lossy(&buf[end..end + length]).into_owned();
    buf.drain(..end + length);
    Answer { status, head, body }
}

/// Reads what arrives next into `buf`; the connection must stay open and answer by `deadline`.
async fn fill(tcp: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout_at(deadline.into(), tcp.read(&mut chunk)).await.expect("answer in time").unwrap();
    assert!(n > 0, "connection closed mid-answer: {:?}", String::from_utf8_lossy(buf));
    buf.extend_from_slice(&chunk[..n]);
}

fn sum(b: &[u8]) -> u64 {
    b.iter().map(|b| u64::from(*b)).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order_on_every_worker() {
    let (s, up) = serving(&["--gateway-workers", "2"]).await;
    // Several connections, so both workers (SO_REUSEPORT spreads them) serve some.
    for conn in 0..6 {
        let mut tcp = TcpStream::connect(s.gateway.unwrap()).await.unwrap();
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for i in 0..30 {
            match i % 3 {
                0 => {
                    wire.extend_from_slice(format!("GET /p/{conn}/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
                    want.push((false, format!("p /p/{conn}/{i}")));
                }
                1 => {
                    let body = "y".repeat(i * 7);
                    wire.extend_from_slice(format!("POST /p/{conn}/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
                    want.push((false, format!("p /p/{conn}/{i} {} {}", body.len(), sum(body.as_bytes()))));
                }
                _ => {
                    wire.extend_from_slice(format!("HEAD /p/{conn}/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
                    want.push((true, String::new()));
                }
            }
        }
        // All at once: the server reads many requests in one buffer and answers one by one.
        tcp.write_all(&wire).await.unwrap();
        let mut buf = Vec::new();
        for (i, (head, body)) in want.iter().enumerate() {
            let a = answer(&mut tcp, &mut buf, *head).await;
            assert_eq!(a.status, 200, "answer {i}: {}", a.head);
            assert_eq!(&a.body, body, "answer {i} in order");
            assert!(a.head.contains("\r\ndate: "), "{}", a.head);
            assert!(a.head.contains("\r\nx-request-id: "), "{}", a.head);
        }
        assert!(buf.is_empty(), "nothing after the last answer: {:?}", String::from_utf8_lossy(&buf));
        // A request that says close is answered, then the connection ends.
        tcp.write_all(b"GET /p/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let a = answer(&mut tcp, &mut buf, false).await;
        assert_eq!((a.status, a.body.as_str()), (200, "p /p/last"));
        assert!(a.head.contains("\r\nconnection: close\r\n"), "{}", a.head);
        assert!(closed_within(&mut tcp, Duration::from_secs(5)).await.is_some(), "closed after a Connection: close request");
    }
    assert!(up.hits.load(std::sync::atomic::Ordering::Relaxed) >= 6 * 30);

    // HTTP/1.0: closes after the answer unless asked to keep the connection.
    let mut tcp = TcpStream::connect(s.gateway.unwrap()).await.unwrap();
    tcp.write_all(b"GET /p/old HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let a = answer(&mut tcp, &mut buf, false).await;
    assert_eq!((a.status, a.body.as_str()), (200, "p /p/old"));
    assert!(a.head.contains("\r\nconnection: keep-alive\r\n"), "{}", a.head);
    tcp.write_all(b"GET /p/older HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let a = answer(&mut tcp, &mut buf, false).await;
    assert_eq!((a.status, a.body.as_str()), (200, "p /p/older"));
    assert!(closed_within(&mut tcp, Duration::from_secs(5)).await.is_some(), "HTTP/1.0 without keep-alive closes");

    // Odd but valid heads, twice on one connection (the second Host from the worker's recent
    // hosts): an empty header value, a header the Connection header names, a Host to normalize.
    let mut tcp = TcpStream::connect(s.gateway.unwrap()).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(b"GET /p/odd HTTP/1.1\r\nHost: X.\r\nX-Empty:\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\n\r\n").await.unwrap();
        let a = answer(&mut tcp, &mut buf, false).await;
        assert_eq!((a.status, a.body.as_str()), (200, "p /p/odd"), "{}", a.head);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_split_at_every_byte_boundary_is_read_whole() {
    let (s, _up) = serving(&[]).await;
    let request =
        b"POST /p/split?q=1 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: split-test\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world";
    let want = format!("p /p/split 11 {}", sum(b"hello world"));
    let mut tcp = TcpStream::connect(s.gateway.unwrap()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    for cut in 1..request.len() {
        tcp.write_all(&request[..cut]).await.unwrap();
        tcp.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        tcp.write_all(&request[cut..]).await.unwrap();
        let a = answer(&mut tcp, &mut buf, false).await;
        assert_eq!((a.status, a.body.as_str()), (200, want.as_str()), "split at byte {cut}");
    }
    // And one byte at a time, all on the same connection.
    for b in request {
        tcp.write_all(std::slice::from_ref(b)).await.unwrap();
        tcp.flush().await.unwrap();
    }
    let a = answer(&mut tcp, &mut buf, false).await;
    assert_eq!((a.status, a.body.as_str()), (200, want.as_str()), "byte by byte");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_idle_oversized_and_malformed_heads_are_refused() {
    let (s, up) = serving(&["--read-timeout", "1s", "--idle-timeout", "2s"]).await;
    let addr = s.gateway.unwrap();
    let hits = up.hits.load(std::sync::atomic::Ordering::Relaxed);

    // Slowloris: a head that trickles in one byte every 200 ms is cut off about a second after
    // its first byte, long before it could finish.
    trickling_head_is_cut_off(addr, "/p/slow").await;

    // A connection that sends nothing is closed after the idle timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(6)).await.is_some(), "an idle connection stays open");
    assert!(started.elapsed() >= Duration::from_millis(1500), "closed too early: {:?}", started.elapsed());

    // A keep-alive connection that goes idle after an answer is closed too.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /p/once HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let a = answer(&mut tcp, &mut Vec::new(), false).await;
    assert_eq!(a.status, 200);
    assert!(closed_within(&mut tcp, Duration::from_secs(6)).await.is_some(), "an idle keep-alive connection stays open");

    let refused = |request: Vec<u8>, want: &'static str| refused_with(addr, request, want);
    // A head over 64 KiB: in one piece, and one that stops short of its end.
    let mut big = b"GET /p/big HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    refused([big.as_slice(), b"\r\n\r\n"].concat(), "HTTP/1.1 431").await;
    refused(big.clone(), "HTTP/1.1 431").await;
    // More header lines than the server takes.
    let mut many = b"GET /p/many HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    refused(many, "HTTP/1.1 431").await;
    // Malformed heads and framing.
    refused(b"GET /p/x HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), "HTTP/1.1 400").await;
    refused(b"GET /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(), "HTTP/1.1 400").await;
    refused(b"GET /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(), "HTTP/1.1 400").await;
    refused(b"GET /p/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\na".to_vec(), "HTTP/1.1 400").await;
    refused(b"GET /p/\x01x HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "HTTP/1.1 400").await;
    refused(b"\r\n\r\nGARBAGE\r\n\r\n".to_vec(), "HTTP/1.1 400").await;
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::Relaxed), hits + 1, "only the well-formed request reached the upstream");

    // Still serving.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /p/after HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let a = answer(&mut tcp, &mut Vec::new(), false).await;
    assert_eq!((a.status, a.body.as_str()), (200, "p /p/after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_the_same_over_http1_and_http2() {
    let (s, _up) = serving(&[]).await;
    let api = client(&s, None);
    put_route(&api, "direct", r#"{"path_prefix": "/direct/", "direct_response": {"status": 418, "body": "teapot", "content_type": "text/plain"}}"#).await;
    put_route(&api, "moved", r#"{"path_prefix": "/old/", "redirect": {"status": 301, "path": "/new/"}}"#).await;
    put_route(&api, "headers", r#"{"path_prefix": "/h/", "service": "p", "response_headers": {"set": {"x-gw": "yes"}, "remove": ["x-none"]}}"#).await;
    let addr = s.gateway.unwrap();
    let cases: [(&str, &str, &str); 6] =
        [("GET", "/p/a?x=1", ""), ("POST", "/p/b", "some body"), ("GET", "/direct/x", ""), ("GET", "/old/x", ""), ("GET", "/h/x", ""), ("GET", "/nowhere", "")];
    // HTTP/2 with prior knowledge: hyper's side of the gateway.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut h1 = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for (method, path, body) in cases {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://x{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
            .unwrap();
        let r2 = h2.send_request(req).await.unwrap();
        let (p2, b2) = r2.into_parts();
        let b2 = http_body_util::BodyExt::collect(b2).await.unwrap().to_bytes();
        h1.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await.unwrap();
        let a = answer(&mut h1, &mut buf, false).await;
        assert_eq!(a.status, p2.status.as_u16(), "{method} {path}");
        assert_eq!(a.body.as_bytes(), &b2[..], "{method} {path}");
        for name in ["content-type", "location", "x-gw", "x-none"] {
            let v1 = a.head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string));
            let v2 = p2.headers.get(name).map(|v| v.to_str().unwrap().to_ascii_lowercase());
            assert_eq!(v1, v2, "{method} {path}: header {name}");
        }
    }
}

/// Slowloris: a head to `path` that trickles in one byte every 200 ms must be cut off about a
/// second (the servers' `--read-timeout 1s`) after its first byte, long before it could finish.
async fn trickling_head_is_cut_off(addr: std::net::SocketAddr, path: &str) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\n").as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut cut_off = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if tcp.write_all(b"X").await.is_err() || closed_within(&mut tcp, Duration::from_millis(1)).await.is_some() {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "a trickling head was never cut off");
    assert!(started.elapsed() < Duration::from_secs(5), "cut off after {:?}", started.elapsed());
}

/// Sends `request` on a fresh connection to `addr` and expects the answer to start with `want`.
async fn refused_with(addr: std::net::SocketAddr, request: Vec<u8>, want: &str) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(&request).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with(want), "wanted {want}, got {:?}", got.chars().take(300).collect::<String>());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_listener_serves_pipelined_split_and_handed_over_requests() {
    let s = ServerProcess::start(bin(), &["--dev"]);
    let mut tcp = TcpStream::connect(s.api).await.unwrap();
    let mut buf = Vec::new();

    // Pipelined writes and reads, all in one send, answered in order.
    let mut wire = Vec::new();
    for i in 0..20 {
        let value = format!("value-{i}-{}", "v".repeat(i * 13));
        wire.extend_from_slice(format!("PUT /v1/kv/h1/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{value}", value.len()).as_bytes());
        wire.extend_from_slice(format!("GET /v1/kv/h1/{i}?raw HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    wire.extend_from_slice(b"HEAD /v1/kv/h1/0?raw HTTP/1.1\r\nHost: x\r\n\r\n");
    tcp.write_all(&wire).await.unwrap();
    for i in 0..20 {
        let put = answer(&mut tcp, &mut buf, false).await;
        assert_eq!((put.status, put.body.as_str()), (200, "true"), "put {i}: {}", put.head);
        let got = answer(&mut tcp, &mut buf, false).await;
        assert_eq!((got.status, got.body), (200, format!("value-{i}-{}", "v".repeat(i * 13))), "get {i} in order");
        assert!(got.head.contains("\r\nx-consul-index: "), "{}", got.head);
        assert!(got.head.contains("\r\ndate: "), "{}", got.head);
    }
    let head = answer(&mut tcp, &mut buf, true).await;
    assert_eq!(head.status, 200);
    assert!(head.head.contains("\r\ncontent-length: 8\r\n"), "HEAD tells the length a GET would have: {}", head.head);

    // A request split at every byte boundary, on the same connection.
    let request = b"PUT /v1/kv/h1/split HTTP/1.1\r\nHost: example.test\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world";
    tcp.set_nodelay(true).unwrap();
    for cut in 1..request.len() {
        tcp.write_all(&request[..cut]).await.unwrap();
        tcp.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        tcp.write_all(&request[cut..]).await.unwrap();
        let a = answer(&mut tcp, &mut buf, false).await;
        assert_eq!((a.status, a.body.as_str()), (200, "true"), "split at byte {cut}");
    }

    // A blocking query held on this keep-alive connection, woken by a write from another one.
    tcp.write_all(b"GET /v1/kv/h1/split HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let now = answer(&mut tcp, &mut buf, false).await;
    let index: u64 = now.head.lines().find_map(|l| l.strip_prefix("x-consul-index: ")).unwrap().trim().parse().unwrap();
    tcp.write_all(format!("GET /v1/kv/h1/split?raw&index={index}&wait=20s HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut other = TcpStream::connect(s.api).await.unwrap();
    other.write_all(b"PUT /v1/kv/h1/split HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\nchanged").await.unwrap();
    assert_eq!(answer(&mut other, &mut Vec::new(), false).await.body, "true");
    let woken = answer(&mut tcp, &mut buf, false).await;
    assert_eq!((woken.status, woken.body.as_str()), (200, "changed"), "the held query answers with the change");

    // A chunked body goes to hyper mid-connection; the connection keeps serving after it.
    tcp.write_all(b"PUT /v1/kv/h1/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await.unwrap();
    assert_eq!(answer(&mut tcp, &mut buf, false).await.body, "true");
    tcp.write_all(b"GET /v1/kv/h1/chunked?raw HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(answer(&mut tcp, &mut buf, false).await.body, "hello world");
    assert!(buf.is_empty(), "nothing after the last answer: {:?}", String::from_utf8_lossy(&buf));

    // A body over the fast path's limit is streamed by hyper and stored whole.
    let big = "b".repeat(200 * 1024);
    let mut tcp = TcpStream::connect(s.api).await.unwrap();
    tcp.write_all(format!("PUT /v1/kv/h1/big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{big}", big.len()).as_bytes()).await.unwrap();
    assert_eq!(answer(&mut tcp, &mut buf, false).await.body, "true");
    tcp.write_all(b"GET /v1/kv/h1/big?raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let a = answer(&mut tcp, &mut buf, false).await;
    assert_eq!(a.body.len(), big.len());
    assert!(closed_within(&mut tcp, Duration::from_secs(5)).await.is_some(), "closed after a Connection: close request");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_listener_cuts_off_slow_idle_oversized_and_malformed_clients() {
    let s = ServerProcess::start(bin(), &["--dev", "--read-timeout", "1s", "--idle-timeout", "2s"]);
    let addr = s.api;
    // Slowloris: a trickling head is cut off about a second after its first byte.
    trickling_head_is_cut_off(addr, "/v1/kv/slow").await;
    // Idle after an answer: closed after the idle timeout, not before.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(answer(&mut tcp, &mut Vec::new(), false).await.status, 200);
    let started = Instant::now();
    assert!(closed_within(&mut tcp, Duration::from_secs(6)).await.is_some(), "an idle keep-alive connection stays open");
    assert!(started.elapsed() >= Duration::from_millis(1500), "closed too early: {:?}", started.elapsed());
    // A body that stops short of its length is cut off at the read deadline too.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PUT /v1/kv/short HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this").await.unwrap();
    assert!(closed_within(&mut tcp, Duration::from_secs(5)).await.is_some(), "a short body holds the connection forever");

    let mut big = b"GET /v1/kv/big HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 600 * 1024));
    refused_with(addr, [big.as_slice(), b"\r\n\r\n"].concat(), "HTTP/1.1 431").await;
    let mut many = b"GET /v1/kv/many HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    refused_with(addr, many, "HTTP/1.1 431").await;
    refused_with(addr, b"GET /v1/kv/x HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), "HTTP/1.1 400").await;
    refused_with(addr, b"PUT /v1/kv/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(), "HTTP/1.1 400").await;
    refused_with(addr, b"\r\n\r\nGARBAGE\r\n\r\n".to_vec(), "HTTP/1.1 400").await;
    // Nothing of the refused writes was stored.
    let api = client(&s, None);
    let (status, _, _) = call(&api, http::Method::GET, "/v1/kv/x", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

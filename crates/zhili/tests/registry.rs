//! Registry, discovery, health and watches through the real binary on real sockets.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::Value;
use zhili_test_support::{grpc_health_target, http_target};

#[tokio::test]
async fn register_discover_watch_health_deregister() {
    let s = dev_server();
    let c = client(&s, None);
    let (st, r, v) = call(
        &c,
        Method::POST,
        "/api/v1/services/web/instances",
        Some(r#"{"address":"10.0.0.1","port":8080,"tags":["v1"],"zone":"z1","metadata":{"env":"prod"},"checks":[{"kind":"ttl","id":"alive","ttl":"30s"}]}"#),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "10.0.0.1:8080");
    assert!(r.index > 0);

    // A TTL check starts critical, so healthy discovery is empty until it passes.
    let (_, r, v) = call(&c, Method::GET, "/api/v1/services/web/instances", None).await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 0);
    let (_, _, all) = call(&c, Method::GET, "/api/v1/services/web/instances?healthy=false", None).await;
    assert_eq!(all["instances"][0]["health"], "critical");
    let index = r.index;

    // A blocking read wakes as soon as the check passes.
    let c2 = c.clone();
    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        let (_, r, v) = call(&c2, Method::GET, &format!("/api/v1/services/web/instances?index={index}&wait=20s"), None).await;
        (start.elapsed(), r.index, v)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (st, _, _) = call(&c, Method::PUT, "/api/v1/services/web/instances/10.0.0.1:8080/checks/alive", Some(r#"{"status":"passing","output":"ok"}"#)).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (elapsed, new_index, v) = waiter.await.unwrap();
    assert!(elapsed < Duration::from_secs(10), "woke on change, not at wait: {elapsed:?}");
    assert!(new_index > index);
    assert_eq!(v["instances"][0]["health"], "passing");
    assert_eq!(v["instances"][0]["checks"][0]["output"], "ok");

    // Filters.
    for (q, n) in [("tag=v1", 1), ("tag=v2", 0), ("meta.env=prod", 1), ("meta.env=dev", 0), ("zone=z1", 1), ("zone=z2", 0)] {
        let (_, _, v) = call(&c, Method::GET, &format!("/api/v1/services/web/instances?{q}"), None).await;
        assert_eq!(v["instances"].as_array().unwrap().len(), n, "{q}");
    }

    // A blocking read with nothing changing answers at `wait` (within wait + wait/16).
    let (_, r, _) = call(&c, Method::GET, "/api/v1/services/web/instances", None).await;
    let start = Instant::now();
    call(&c, Method::GET, &format!("/api/v1/services/web/instances?index={}&wait=500ms", r.index), None).await;
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(480) && took < Duration::from_millis(500 + 500 / 16 + 400), "{took:?}");

    // Maintenance drains without deregistering.
    call(&c, Method::PUT, "/api/v1/services/web/instances/10.0.0.1:8080/maintenance", Some(r#"{"enabled":true,"reason":"deploy"}"#)).await;
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services/web/instances", None).await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 0);
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services/web/instances/10.0.0.1:8080", None).await;
    assert_eq!(v["maintenance"]["reason"], "deploy");
    call(&c, Method::PUT, "/api/v1/services/web/instances/10.0.0.1:8080/maintenance", Some(r#"{"enabled":false}"#)).await;

    let (_, _, v) = call(&c, Method::GET, "/api/v1/services", None).await;
    assert_eq!(v[0]["name"], "web");
    assert_eq!(v[0]["passing"], 1);

    let (st, _, _) = call(&c, Method::DELETE, "/api/v1/services/web/instances/10.0.0.1:8080", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services/web/instances?healthy=false", None).await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 0);
    let (st, _, _) = call(&c, Method::PUT, "/api/v1/services/web/instances/10.0.0.1:8080/heartbeat", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "heartbeat of an unknown instance says 404 so clients re-register");
}

#[tokio::test]
async fn heartbeats_expire_and_remove_ephemeral_instances() {
    let s = dev_server();
    let c = client(&s, None);
    let (st, _, v) =
        call(&c, Method::PUT, "/api/v1/services/hb", Some(r#"{"health":{"heartbeat_interval":"200ms","unhealthy_after":"600ms","remove_after":"1500ms"}}"#))
            .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    call(&c, Method::POST, "/api/v1/services/hb/instances", Some(r#"{"address":"10.0.0.1","port":1}"#)).await;
    call(&c, Method::POST, "/api/v1/services/hb/instances", Some(r#"{"address":"10.0.0.2","port":1}"#)).await;
    let beat = c.clone();
    let beating = tokio::spawn(async move {
        for _ in 0..40 {
            call(&beat, Method::PUT, "/api/v1/services/hb/instances/10.0.0.1:1/heartbeat", None).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_eventually(Duration::from_secs(5), "silent instance turns critical", || {
        let c = c.clone();
        async move { call(&c, Method::GET, "/api/v1/services/hb/instances/10.0.0.2:1", None).await.2["health"] == "critical" }
    })
    .await;
    assert_eventually(Duration::from_secs(5), "silent instance is removed", || {
        let c = c.clone();
        async move { call(&c, Method::GET, "/api/v1/services/hb/instances/10.0.0.2:1", None).await.0 == StatusCode::NOT_FOUND }
    })
    .await;
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services/hb/instances/10.0.0.1:1", None).await;
    assert_eq!(v["health"], "passing", "the beating instance stays healthy");
    beating.abort();
}

#[tokio::test]
async fn active_http_tcp_and_grpc_checks_drive_health() {
    let s = dev_server();
    let c = client(&s, None);
    let code = Arc::new(AtomicU16::new(200));
    let http_addr = http_target(code.clone()).await;
    let serving = Arc::new(AtomicU8::new(1));
    let grpc_addr = grpc_health_target(serving.clone()).await;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let body = format!(
        r#"{{"address":"127.0.0.1","port":{},"checks":[
            {{"kind":"http","id":"http","url":"http://{http_addr}/health","interval":"200ms","timeout":"1s"}},
            {{"kind":"tcp","id":"tcp","address":"{tcp_addr}","interval":"200ms"}},
            {{"kind":"grpc","id":"grpc","address":"{grpc_addr}","interval":"200ms"}}]}}"#,
        http_addr.port()
    );
    let (st, _, v) = call(&c, Method::POST, "/api/v1/services/api/instances", Some(&body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/services/api/instances/{id}");
    let health = |c: zhili_client::Client, path: String| async move { call(&c, Method::GET, &path, None).await.2 };

    assert_eventually(Duration::from_secs(10), "all three checks pass", || {
        let f = health(c.clone(), path.clone());
        async move { f.await["health"] == "passing" }
    })
    .await;

    code.store(429, Ordering::Relaxed);
    assert_eventually(Duration::from_secs(10), "429 is a warning", || {
        let f = health(c.clone(), path.clone());
        async move { f.await["health"] == "warning" }
    })
    .await;
    code.store(200, Ordering::Relaxed);
    serving.store(2, Ordering::Relaxed);
    assert_eventually(Duration::from_secs(10), "NOT_SERVING is critical", || {
        let f = health(c.clone(), path.clone());
        async move {
            let v = f.await;
            v["health"] == "critical"
                && v["checks"].as_array().unwrap().iter().any(|c| c["id"] == "grpc" && c["output"].as_str().unwrap().contains("NOT_SERVING"))
        }
    })
    .await;
    serving.store(1, Ordering::Relaxed);
    drop(tcp);
    assert_eventually(Duration::from_secs(10), "closed port is critical", || {
        let f = health(c.clone(), path.clone());
        async move {
            let v = f.await;
            v["checks"].as_array().unwrap().iter().any(|c| c["id"] == "tcp" && c["status"] == "critical")
                && v["checks"].as_array().unwrap().iter().any(|c| c["id"] == "grpc" && c["status"] == "passing")
        }
    })
    .await;
    let metrics = String::from_utf8(call(&c, Method::GET, "/metrics", None).await.1.body.to_vec()).unwrap();
    assert!(metrics.contains("zhili_check_results_total{kind=\"http\",status=\"passing\"}"), "{metrics}");
    assert!(metrics.contains("zhili_check_duration_seconds_count{kind=\"grpc\"}"));
}

#[tokio::test]
async fn protection_threshold_and_sse_events() {
    let s = dev_server();
    let c = client(&s, None);
    call(&c, Method::PUT, "/api/v1/services/p", Some(r#"{"protection_threshold":0.6}"#)).await;
    // Start streaming before the changes.
    let url = format!("http://{}/api/v1/events/registry?service=p", s.api);
    let events = tokio::spawn(async move { read_sse(&url, 3).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 1..=3 {
        call(
            &c,
            Method::POST,
            "/api/v1/services/p/instances",
            Some(&format!(r#"{{"address":"10.0.0.{i}","port":1,"checks":[{{"kind":"ttl","id":"t","ttl":"1m"}}]}}"#)),
        )
        .await;
    }
    call(&c, Method::PUT, "/api/v1/services/p/instances/10.0.0.1:1/checks/t", Some(r#"{"status":"pass"}"#)).await;
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services/p/instances", None).await;
    assert_eq!(v["protection_triggered"], true, "1 of 3 healthy is below 0.6");
    assert_eq!(v["instances"].as_array().unwrap().len(), 3);
    call(&c, Method::PUT, "/api/v1/services/p/instances/10.0.0.2:1/checks/t", Some(r#"{"status":"passing"}"#)).await;
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services/p/instances", None).await;
    assert_eq!(v["protection_triggered"], false);
    assert_eq!(v["instances"].as_array().unwrap().len(), 2);

    let got = tokio::time::timeout(Duration::from_secs(10), events).await.unwrap().unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|e| e["kind"] == "instance_registered" && e["service"] == "p"), "{got:?}");
}

/// Reads `n` `registry` events from an SSE stream with a raw HTTP/1.1 request.
async fn read_sse(url: &str, n: usize) -> Vec<Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n").as_bytes()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut out = vec![];
    while out.len() < n {
        let Some(line) = lines.next_line().await.unwrap() else { break };
        if let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                out.push(v);
            }
        }
    }
    out
}

#[tokio::test]
async fn bad_input_is_rejected_naming_the_field_and_changes_nothing() {
    let s = dev_server();
    let c = client(&s, None);
    let cases: &[(&str, &str, &str)] = &[
        ("/api/v1/services/web/instances", r#"{"address":"10.0.0.1","port":0}"#, "port"),
        ("/api/v1/services/web/instances", r#"{"address":"not a host","port":80}"#, "address"),
        ("/api/v1/services/web/instances", r#"{"address":"10.0.0.1","port":80,"weight":20000}"#, "weight"),
        ("/api/v1/services/web/instances", r#"{"address":"10.0.0.1","port":80,"wieght":1}"#, "wieght"),
        (
            "/api/v1/services/web/instances",
            r#"{"address":"10.0.0.1","port":80,"checks":[{"kind":"http","url":"http://x/","interval":"soon"}]}"#,
            "checks[0].interval",
        ),
        ("/api/v1/services/web/instances", r#"{"address":"10.0.0.1","port":80,"checks":[{"kind":"tcp","interval":"1s"}]}"#, "checks[0].address"),
        ("/api/v1/services/bad%20name/instances", r#"{"address":"10.0.0.1","port":80}"#, "service"),
        ("/api/v1/services/web/instances", r#"not json"#, "body"),
        ("/api/v1/services/web/instances", "", "body"),
    ];
    for (path, body, field) in cases {
        expect_problem(&c, Method::POST, path, Some(body), StatusCode::BAD_REQUEST, field).await;
    }
    let mut meta = String::from("{");
    for i in 0..65 {
        meta.push_str(&format!("\"k{i}\":\"v\","));
    }
    meta.pop();
    meta.push('}');
    expect_problem(
        &c,
        Method::POST,
        "/api/v1/services/web/instances",
        Some(&format!(r#"{{"address":"10.0.0.1","port":80,"metadata":{meta}}}"#)),
        StatusCode::BAD_REQUEST,
        "metadata",
    )
    .await;
    expect_problem(&c, Method::PUT, "/api/v1/services/web", Some(r#"{"protection_threshold":2}"#), StatusCode::BAD_REQUEST, "protection_threshold").await;
    expect_problem(&c, Method::GET, "/api/v1/services/web/instances?index=abc", None, StatusCode::BAD_REQUEST, "index").await;
    expect_problem(&c, Method::GET, "/api/v1/services/web/instances?index=1&wait=forever", None, StatusCode::BAD_REQUEST, "wait").await;
    expect_problem(&c, Method::GET, "/api/v1/services/web/instances?namespace=no/pe", None, StatusCode::BAD_REQUEST, "namespace").await;
    expect_problem(&c, Method::GET, "/api/v1/services/web/instances?healthy=maybe", None, StatusCode::BAD_REQUEST, "healthy").await;
    let huge = format!(r#"{{"address":"10.0.0.1","port":80,"description":"{}"}}"#, "x".repeat(800 * 1024));
    expect_problem(&c, Method::POST, "/api/v1/services/web/instances", Some(&huge), StatusCode::PAYLOAD_TOO_LARGE, "body").await;
    // The unread rest of the body makes the connection unusable: the answer says so, and the
    // client's next request (below) goes on a fresh connection instead of a closed one.
    let (_, r, _) = call(&c, Method::POST, "/api/v1/services/web/instances", Some(&huge)).await;
    assert_eq!(r.headers.get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    // Nothing was written.
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services", None).await;
    assert_eq!(v, serde_json::json!([]), "no service was half-created");
    expect_problem(&c, Method::GET, "/api/v1/nope", None, StatusCode::NOT_FOUND, "/api/v1/nope").await;
}

#[tokio::test]
async fn ops_endpoints_and_openapi() {
    let s = dev_server();
    let c = client(&s, None);
    assert_eq!(call(&c, Method::GET, "/health/live", None).await.0, StatusCode::OK);
    assert_eq!(call(&c, Method::GET, "/health/ready", None).await.0, StatusCode::OK);
    let (_, _, doc) = call(&c, Method::GET, "/api/openapi.json", None).await;
    assert_eq!(doc["openapi"], "3.1.0");
    // Every documented route is served: none answers 404 "no route" or 405.
    for op in zhili_api::openapi::OPERATIONS {
        let (method, path) = (op.method, op.path);
        let concrete = path
            .replace("{service}", "svc")
            .replace("{id}", "i")
            .replace("{check}", "c")
            .replace("{key}", "k")
            .replace("{name}", "n")
            .replace("{accessor}", "a")
            .replace("{route}", "r")
            .replace("{consumer}", "c");
        assert!(doc["paths"][path][method].is_object(), "{method} {path} missing from the document");
        if path.contains("events") {
            continue; // streams never end; routing is covered by the SSE tests
        }
        let m: Method = method.to_uppercase().parse().unwrap();
        let (st, _, v) = call(&c, m, &concrete, Some("{}")).await;
        assert_ne!(st, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(!(st == StatusCode::NOT_FOUND && v["detail"].as_str().unwrap_or("").starts_with("no route")), "{method} {path} is not routed");
    }
}

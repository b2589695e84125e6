//! Attacks with a narrowly scoped token, and hostile clients, against the real binary with ACLs
//! on. Each test is a regression test for a finding of the security review: it failed before
//! the fix it names.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Creates a policy with `rules` and a token holding it; returns the token's (accessor, secret).
async fn token_with(api: &zhili_client::Client, name: &str, rules: Value) -> (String, String) {
    let (st, _, v) = call(api, Method::POST, "/api/v1/acl/policies", Some(&json!({"name": name, "rules": rules}).to_string())).await;
    assert!(st.is_success(), "policy {name}: {v}");
    let (st, _, v) = call(api, Method::POST, "/api/v1/acl/tokens", Some(&json!({"description": name, "policies": [name]}).to_string())).await;
    assert!(st.is_success(), "token {name}: {v}");
    (v["accessor_id"].as_str().unwrap().to_string(), v["secret_id"].as_str().unwrap().to_string())
}

async fn acl_server() -> (ServerProcess, zhili_client::Client) {
    let s = ServerProcess::start(bin(), &[]);
    let root = bootstrap(&s).await;
    let api = client(&s, Some(&root));
    (s, api)
}

async fn status(c: &zhili_client::Client, method: Method, path: &str, body: Option<&str>) -> StatusCode {
    call(c, method, path, body).await.0
}

/// Finding 1: a token for service `evil` cannot take over, replace or remove `web`'s instance
/// on any API, and cannot learn which ids exist outside its rights.
#[tokio::test]
async fn scoped_token_cannot_take_over_another_services_instance() {
    let (s, api) = acl_server().await;
    let (_, evil) = token_with(&api, "evil", json!([{"resource": "service", "prefix": "evil", "access": "write"}])).await;
    let evil = client(&s, Some(&evil));
    let web = r#"{"Name":"web","ID":"10.0.0.1:8080","Address":"10.0.0.1","Port":8080,"Check":{"TTL":"30s"}}"#;
    assert_eq!(status(&api, Method::PUT, "/v1/agent/service/register", Some(web)).await, StatusCode::OK);

    let takeover = r#"{"Name":"evil","ID":"10.0.0.1:8080","Address":"10.66.6.6","Port":8080}"#;
    assert_eq!(status(&evil, Method::PUT, "/v1/agent/service/register", Some(takeover)).await, StatusCode::FORBIDDEN);
    let catalog = r#"{"Node":"n1","Address":"10.66.6.6","Service":{"Service":"evil","ID":"10.0.0.1:8080","Address":"10.66.6.6","Port":8080}}"#;
    assert_eq!(status(&evil, Method::PUT, "/v1/catalog/register", Some(catalog)).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&evil, Method::PUT, "/v1/agent/service/deregister/10.0.0.1:8080", None).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&evil, Method::PUT, "/v1/agent/service/maintenance/10.0.0.1:8080?enable=true", None).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&evil, Method::PUT, "/v1/agent/check/pass/service:10.0.0.1:8080", None).await, StatusCode::FORBIDDEN);
    let dereg = r#"{"Node":"zhili","ServiceID":"10.0.0.1:8080"}"#;
    assert_eq!(status(&evil, Method::PUT, "/v1/catalog/deregister", Some(dereg)).await, StatusCode::FORBIDDEN);
    // Nacos HTTP: the service named in the request is the one authorized.
    let nacos = zhili_client::Client::new(&format!("http://{}", s.nacos.unwrap()), None).unwrap();
    let evil_secret = evil_token(&evil);
    let path = format!("/nacos/v1/ns/instance?serviceName=web&ip=10.66.6.6&port=8080&accessToken={evil_secret}");
    assert_eq!(status(&nacos, Method::POST, &path, None).await, StatusCode::FORBIDDEN);
    let path = format!("/nacos/v1/ns/instance?serviceName=web&ip=10.0.0.1&port=8080&accessToken={evil_secret}");
    assert_eq!(status(&nacos, Method::DELETE, &path, None).await, StatusCode::FORBIDDEN);

    // The instance is untouched.
    let (st, _, v) = call(&api, Method::GET, "/v1/agent/service/10.0.0.1:8080", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!((v["Service"].as_str(), v["Address"].as_str()), (Some("web"), Some("10.0.0.1")));

    // Its own service is fine; the same id under it does not disturb web's, and an id held by
    // both may only be removed by a caller who may write both.
    let own = r#"{"id":"10.0.0.1:8080","address":"10.66.6.6","port":8080,"ephemeral":false}"#;
    assert_eq!(status(&evil, Method::POST, "/api/v1/services/evil/instances", Some(own)).await, StatusCode::CREATED);
    assert_eq!(status(&evil, Method::PUT, "/v1/agent/service/deregister/10.0.0.1:8080", None).await, StatusCode::FORBIDDEN);
    let (_, _, v) = call(&api, Method::GET, "/api/v1/services/web/instances/10.0.0.1:8080", None).await;
    assert_eq!(v["address"], "10.0.0.1", "web's instance is untouched: {v}");

    // Unknown ids: 403 to a scoped caller (no enumeration), 404 to one who may write everything.
    assert_eq!(status(&evil, Method::PUT, "/v1/agent/service/deregister/nope", None).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&evil, Method::PUT, "/v1/agent/check/pass/nope", None).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&evil, Method::PUT, "/v1/catalog/deregister", Some(r#"{"Node":"zhili","ServiceID":"nope"}"#)).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&api, Method::PUT, "/v1/agent/service/deregister/nope", None).await, StatusCode::NOT_FOUND);
    assert_eq!(status(&api, Method::PUT, "/v1/agent/check/pass/nope", None).await, StatusCode::NOT_FOUND);
}

/// The secret a client sends (tests build clients with one).
fn evil_token(c: &zhili_client::Client) -> String {
    c.token().expect("token").to_string()
}

/// Finding 2: a deny rule inside a writable prefix holds for every multi-key operation.
#[tokio::test]
async fn deny_rules_hold_for_multi_key_operations() {
    let (s, api) = acl_server().await;
    let (_, app) = token_with(
        &api,
        "app",
        json!([{"resource": "kv", "prefix": "app/", "access": "write"}, {"resource": "kv", "prefix": "app/secret/", "access": "deny"}]),
    )
    .await;
    let app = client(&s, Some(&app));
    api.kv_put("app/public", "p", None).await.unwrap();
    api.kv_put("app/secret/pw", "hunter2", None).await.unwrap();
    assert_eq!(status(&app, Method::GET, "/api/v1/kv/app/secret/pw", None).await, StatusCode::FORBIDDEN);

    assert_eq!(status(&app, Method::DELETE, "/api/v1/kv/app/?recurse=true", None).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&app, Method::DELETE, "/v1/kv/app/?recurse", None).await, StatusCode::FORBIDDEN);
    let tree = r#"[{"KV":{"Verb":"delete-tree","Key":"app/"}}]"#;
    assert_eq!(status(&app, Method::PUT, "/v1/txn", Some(tree)).await, StatusCode::FORBIDDEN);
    assert!(api.kv_get("app/secret/pw").await.unwrap().is_some(), "nothing was deleted");
    assert!(api.kv_get("app/public").await.unwrap().is_some(), "refused whole, not half-done");

    // Reads of a tree leave out what the policy denies.
    let (st, _, v) = call(&app, Method::PUT, "/v1/txn", Some(r#"[{"KV":{"Verb":"get-tree","Key":"app/"}}]"#)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let keys: Vec<&str> = v["Results"].as_array().unwrap().iter().map(|r| r["KV"]["Key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["app/public"]);
    let (_, _, v) = call(&app, Method::GET, "/v1/kv/app/?recurse", None).await;
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let (_, _, v) = call(&app, Method::GET, "/api/v1/kv/app/?keys=true", None).await;
    assert_eq!(v, json!(["app/public"]));
    let (_, _, v) = call(&app, Method::GET, "/v1/kv/app/?keys", None).await;
    assert_eq!(v, json!(["app/public"]));

    // A subtree wholly inside the grant can still be deleted recursively.
    api.kv_put("app/tmp/a", "1", None).await.unwrap();
    assert_eq!(status(&app, Method::DELETE, "/api/v1/kv/app/tmp/?recurse=true", None).await, StatusCode::OK);
    assert!(api.kv_get("app/tmp/a").await.unwrap().is_none());
}

/// Finding 3: DNS answers with the rights of `--dns-token`, and nothing beyond anonymous without.
#[tokio::test]
async fn dns_answers_with_the_rights_of_the_dns_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = ServerProcess::start_in(bin(), &data, &[]);
    let root = bootstrap(&first).await;
    let api = client(&first, Some(&root));
    for (svc, port) in [("web", 80), ("db", 5432)] {
        let body = json!({"id": svc, "address": "10.1.0.1", "port": port, "ephemeral": false}).to_string();
        assert_eq!(status(&api, Method::POST, &format!("/api/v1/services/{svc}/instances"), Some(&body)).await, StatusCode::CREATED);
    }
    // No DNS token: anonymous rights, which are nothing while ACLs are on.
    assert!(dig_short(&first, &["web.service.consul", "A"]).is_empty());
    assert!(dig(&first, &["web.service.consul", "SRV"]).contains("NXDOMAIN"));
    assert!(dig_short(&first, &["zhili.node.consul", "A"]).is_empty());
    let (_, dns) =
        token_with(&api, "dns", json!([{"resource": "service", "prefix": "web", "access": "read"}, {"resource": "node", "prefix": "", "access": "read"}]))
            .await;
    first.terminate();

    let s = ServerProcess::start_in(bin(), &data, &["--dns-token", &dns]);
    assert_eq!(dig_short(&s, &["web.service.consul", "A"]), ["10.1.0.1"]);
    assert_eq!(dig_short(&s, &["zhili.node.consul", "A"]), ["127.0.0.1"]);
    assert!(dig_short(&s, &["db.service.consul", "A"]).is_empty(), "db is outside the DNS token's rights");
    assert!(dig(&s, &["db.service.consul", "SRV"]).contains("NXDOMAIN"), "denied looks like unknown");

    // Through the API (Consul's agent token endpoint): needs acl write, names an existing token,
    // takes effect at once and survives a restart; deleting the token stops the answers.
    let root_api = client(&s, Some(&root));
    let (acc, scoped) = token_with(&root_api, "dns-db", json!([{"resource": "service", "prefix": "db", "access": "read"}])).await;
    let body = json!({ "Token": scoped }).to_string();
    assert_eq!(status(&client(&s, Some(&scoped)), Method::PUT, "/v1/agent/token/dns", Some(&body)).await, StatusCode::FORBIDDEN);
    assert_eq!(status(&root_api, Method::PUT, "/v1/agent/token/dns", Some(r#"{"Token":"no-such-secret"}"#)).await, StatusCode::BAD_REQUEST);
    set_dns_token(&s, &root).await;
    assert_eq!(status(&root_api, Method::PUT, "/v1/agent/token/dns", Some(&body)).await, StatusCode::OK);
    assert_eq!(dig_short(&s, &["db.service.consul", "A"]), ["10.1.0.1"]);
    assert!(dig_short(&s, &["web.service.consul", "A"]).is_empty());
    drop(s);
    let s = ServerProcess::start_in(bin(), &data, &[]);
    assert_eq!(dig_short(&s, &["db.service.consul", "A"]), ["10.1.0.1"], "the stored DNS token survives a restart");
    assert!(status(&client(&s, Some(&root)), Method::DELETE, &format!("/api/v1/acl/tokens/{acc}"), None).await.is_success());
    assert!(dig_short(&s, &["db.service.consul", "A"]).is_empty(), "a deleted DNS token answers nothing");
}

/// Finding 4: odd JSON shapes get 400 and never drop the connection or panic a handler.
#[tokio::test]
async fn odd_json_shapes_are_answered_not_panicked() {
    let (s, api) = acl_server().await;
    let anon = client(&s, None);
    for body in ["[1]", "[\"x\"]", "[true]", "[[]]", "[null]"] {
        for c in [&anon, &api] {
            let (st, r, _) = call(c, Method::PUT, "/v1/txn", Some(body)).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "txn {body}: {}", String::from_utf8_lossy(&r.body));
        }
    }
    for (path, body) in [
        ("/v1/agent/service/register", "[1]"),
        ("/v1/agent/service/register", "1"),
        ("/v1/catalog/register", "[1]"),
        ("/v1/catalog/register", r#"{"Node":"n","Address":"10.0.0.1","Service":7}"#),
        ("/v1/catalog/deregister", "\"x\""),
        ("/v1/agent/check/update/x", "[]"),
        ("/v1/session/create", "[1]"),
    ] {
        let (st, r, _) = call(&api, Method::PUT, path, Some(body)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path} {body}: {}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(status(&api, Method::GET, "/v1/status/leader", None).await, StatusCode::OK, "the server is still up");
}

/// Opens `GET path` with `token` and returns the socket after the response head.
async fn open_stream(addr: std::net::SocketAddr, path: &str, token: &str) -> (TcpStream, String) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), sock.read(&mut b)).await.unwrap().unwrap(), 1, "head cut short");
        head.push(b[0]);
    }
    (sock, String::from_utf8_lossy(&head).into_owned())
}

/// Reads from `sock` until `want` appears (true) or the stream ends (false): the socket closes
/// or the chunked body's last chunk arrives. Panics if neither happens within `limit`.
async fn read_until(sock: &mut TcpStream, want: &str, limit: Duration) -> (bool, String) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        if String::from_utf8_lossy(&seen).contains(want) {
            return (true, String::from_utf8_lossy(&seen).into_owned());
        }
        if seen.ends_with(b"\r\n0\r\n\r\n") || seen == b"0\r\n\r\n" {
            return (false, String::from_utf8_lossy(&seen).into_owned());
        }
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (false, String::from_utf8_lossy(&seen).into_owned()),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("neither {want:?} nor the end within {limit:?}: {}", String::from_utf8_lossy(&seen)),
        }
    }
}

/// Finding 5: deleting a token (or narrowing its policy) ends its SSE streams, answers its held
/// blocking queries 403, and stops Nacos gRPC pushes, within a second or two.
#[tokio::test(flavor = "multi_thread")]
async fn revoked_tokens_lose_their_streams() {
    let (s, api) = acl_server().await;
    let (accessor, secret) =
        token_with(&api, "reader", json!([{"resource": "kv", "prefix": "", "access": "read"}, {"resource": "service", "prefix": "", "access": "read"}])).await;
    let reader = client(&s, Some(&secret));

    let (mut sse, head) = open_stream(s.api, "/api/v1/events/kv?prefix=", &secret).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    api.kv_put("k1", "v", None).await.unwrap();
    assert!(read_until(&mut sse, "\"key\":\"k1\"", Duration::from_secs(10)).await.0, "the stream works before revocation");

    let index = api.kv_put("k2", "v", None).await.unwrap();
    let held = {
        let reader = reader.clone();
        tokio::spawn(async move { call(&reader, Method::GET, &format!("/v1/kv/k2?index={index}&wait=60s"), None).await.0 })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let revoked_at = Instant::now();
    assert!(status(&api, Method::DELETE, &format!("/api/v1/acl/tokens/{accessor}"), None).await.is_success());
    let (saw, text) = read_until(&mut sse, "\u{0}never", Duration::from_secs(5)).await;
    assert!(!saw, "{text}");
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), held).await.expect("held query answered").unwrap(), StatusCode::FORBIDDEN);
    assert!(revoked_at.elapsed() < Duration::from_secs(3), "took {:?}", revoked_at.elapsed());
    api.kv_put("k3", "after", None).await.unwrap();
    assert_eq!(status(&reader, Method::GET, "/api/v1/kv/k3", None).await, StatusCode::FORBIDDEN);

    // A narrowed policy ends the stream too; a change that leaves the rights alone does not.
    let (_, other) = token_with(&api, "narrow", json!([{"resource": "kv", "prefix": "", "access": "read"}])).await;
    let (mut sse, _) = open_stream(s.api, "/api/v1/events/kv?prefix=", &other).await;
    assert!(status(&api, Method::POST, "/api/v1/acl/policies", Some(r#"{"name":"unrelated","rules":[]}"#)).await.is_success());
    api.kv_put("k4", "v", None).await.unwrap();
    assert!(read_until(&mut sse, "\"key\":\"k4\"", Duration::from_secs(10)).await.0, "an unrelated ACL change keeps the stream");
    let narrowed = r#"{"name":"narrow","rules":[{"resource":"kv","prefix":"other/","access":"read"}]}"#;
    assert!(status(&api, Method::POST, "/api/v1/acl/policies", Some(narrowed)).await.is_success());
    let (saw, text) = read_until(&mut sse, "\u{0}never", Duration::from_secs(5)).await;
    assert!(!saw, "{text}");
}

/// Finding 5, Nacos gRPC: a subscription made with a token stops receiving pushes once the
/// token is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn revoked_token_stops_nacos_grpc_pushes() {
    use nacos_sdk::api::naming::{NamingChangeEvent, NamingEventListener, NamingServiceBuilder};

    struct Events(tokio::sync::mpsc::UnboundedSender<usize>);
    impl NamingEventListener for Events {
        fn event(&self, event: Arc<NamingChangeEvent>) {
            let _ = self.0.send(event.instances.as_ref().map_or(0, Vec::len));
        }
    }

    let (s, api) = acl_server().await;
    let (accessor, secret) = token_with(&api, "sub", json!([{"resource": "service", "prefix": "", "access": "read"}])).await;
    let cache = tempfile::tempdir().unwrap();
    let props = nacos_props(&s, "zhili-security", cache.path(), Some(&secret));
    let naming = NamingServiceBuilder::new(props).enable_auth_plugin_http().build().await.expect("naming service");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    naming.subscribe("pushed".into(), None, vec![], Arc::new(Events(tx))).await.expect("subscribe");
    let reg = |ip: &str| json!({"id": ip, "address": ip, "port": 80, "ephemeral": false}).to_string();
    assert_eq!(status(&api, Method::POST, "/api/v1/services/pushed/instances", Some(&reg("10.9.0.1"))).await, StatusCode::CREATED);
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if rx.recv().await == Some(1) {
                return;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "the push arrives while the token is valid");

    assert!(status(&api, Method::DELETE, &format!("/api/v1/acl/tokens/{accessor}"), None).await.is_success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    while rx.try_recv().is_ok() {}
    assert_eq!(status(&api, Method::POST, "/api/v1/services/pushed/instances", Some(&reg("10.9.0.2"))).await, StatusCode::CREATED);
    let late = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match rx.recv().await {
                Some(2) | None => return,
                Some(_) => continue,
            }
        }
    })
    .await;
    assert!(late.is_err(), "no push of the second instance reaches a revoked subscriber");
}

/// Finding 6: every TCP listener closes idle, slow and silent clients, answers an oversized
/// body at once, and refuses connections past its cap with a clear 503.
#[tokio::test(flavor = "multi_thread")]
async fn listeners_time_out_hostile_clients() {
    let s = ServerProcess::start(bin(), &["--dev", "--idle-timeout", "1s", "--read-timeout", "1s", "--write-timeout", "2s", "--max-connections", "24"]);
    let listeners = [("api", s.api), ("nacos", s.nacos.unwrap()), ("nacos-grpc", s.nacos_grpc.unwrap()), ("gateway", s.gateway.unwrap())];
    // A connection that never sends a byte, or only the HTTP/2 preface.
    for (name, addr) in listeners {
        for preface in [&b""[..], &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]] {
            let mut sock = TcpStream::connect(addr).await.unwrap();
            sock.write_all(preface).await.unwrap();
            assert!(closed_within(&mut sock, Duration::from_secs(5)).await.is_some(), "{name}: silent connection still open");
        }
    }
    // Slowloris: one header line every 300 ms is cut at the read timeout.
    for (name, addr) in [("api", s.api), ("nacos", s.nacos.unwrap()), ("gateway", s.gateway.unwrap())] {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let start = Instant::now();
        let mut closed = false;
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if sock.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                closed = true;
                break;
            }
        }
        closed = closed || closed_within(&mut sock, Duration::from_millis(500)).await.is_some();
        assert!(closed, "{name}: slowloris connection still open after {:?}", start.elapsed());
    }
    // Keep-alive idle: one request, then silence.
    let mut sock = TcpStream::connect(s.api).await.unwrap();
    sock.write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let got = closed_within(&mut sock, Duration::from_secs(5)).await.expect("idle keep-alive connection closed");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    // An announced 100 MB body: 413 at once. A small body that never comes: the request fails.
    let mut sock = TcpStream::connect(s.api).await.unwrap();
    sock.write_all(b"PUT /api/v1/kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n").await.unwrap();
    let got = read_until(&mut sock, "\r\n\r\n", Duration::from_secs(3)).await.1;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    let mut sock = TcpStream::connect(s.api).await.unwrap();
    sock.write_all(b"PUT /api/v1/kv/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc").await.unwrap();
    let got = closed_within(&mut sock, Duration::from_secs(5)).await.expect("stalled body: connection ended");
    assert!(!got.starts_with(b"HTTP/1.1 2"), "{}", String::from_utf8_lossy(&got));
    assert_eq!(status(&client(&s, None), Method::GET, "/api/v1/kv/stalled", None).await, StatusCode::NOT_FOUND, "nothing half-written");

    // The cap: 24 connections held open, the next one is refused with a 503 and closed.
    let mut held = Vec::new();
    for _ in 0..24 {
        let mut sock = TcpStream::connect(s.api).await.unwrap();
        sock.write_all(b"GET /api/v1/kv/x?index=1000000&wait=5s HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        held.push(sock);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(s.api).await.unwrap();
    let got = closed_within(&mut extra, Duration::from_secs(3)).await.expect("refused connection closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503") && text.contains("too many connections"), "{text}");
    drop(held);
    // The server frees a slot when it sees the connection gone; until then a new one may still
    // be refused (its 503 arrives before the request is sent).
    assert_eventually(Duration::from_secs(5), "slots come back", || async {
        let r = client(&s, None).send(Method::GET, "/v1/status/leader", None, Duration::from_secs(5)).await;
        r.is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
}

/// Finding 7: anonymous callers learn no node names, namespaces or ids; an empty password is
/// no login.
#[tokio::test]
async fn anonymous_callers_learn_nothing() {
    let (s, api) = acl_server().await;
    let anon = client(&s, None);
    let catalog = r#"{"Node":"db-host","Address":"10.2.0.9","Service":{"Service":"db","ID":"db1","Port":5432}}"#;
    assert_eq!(status(&api, Method::PUT, "/v1/catalog/register", Some(catalog)).await, StatusCode::OK);
    api.kv_put("config/tenant-x/DEFAULT_GROUP/app.yaml", "a: 1", None).await.unwrap();

    for node in ["db-host", "zhili", "no-such-node"] {
        assert_eq!(status(&anon, Method::GET, &format!("/v1/catalog/node/{node}"), None).await, StatusCode::FORBIDDEN, "{node}");
        assert_eq!(status(&anon, Method::GET, &format!("/v1/health/node/{node}"), None).await, StatusCode::FORBIDDEN, "{node}");
    }
    let (_, r, v) = call(&anon, Method::GET, "/v1/health/state/any", None).await;
    assert_eq!(v, json!([]), "{}", String::from_utf8_lossy(&r.body));
    let (_, _, v) = call(&anon, Method::GET, "/v1/catalog/nodes", None).await;
    assert_eq!(v, json!([]));
    let (_, _, v) = call(&api, Method::GET, "/v1/catalog/nodes", None).await;
    assert_eq!(v.as_array().unwrap().len(), 2, "management sees both nodes: {v}");

    let nacos = zhili_client::Client::new(&format!("http://{}", s.nacos.unwrap()), None).unwrap();
    let (_, _, v) = call(&nacos, Method::GET, "/nacos/v1/console/namespaces", None).await;
    let shown: Vec<(&str, u64)> =
        v["data"].as_array().unwrap().iter().map(|n| (n["namespaceShowName"].as_str().unwrap(), n["configCount"].as_u64().unwrap())).collect();
    assert_eq!(shown, [("public", 0)], "{v}");
    let root = api.token().unwrap().to_string();
    let (_, _, v) = call(&nacos, Method::GET, &format!("/nacos/v1/console/namespaces?accessToken={root}"), None).await;
    assert!(v["data"].as_array().unwrap().iter().any(|n| n["namespaceShowName"] == "tenant-x" && n["configCount"] == 1), "{v}");

    for body in ["username=nacos&password=", "username=nacos"] {
        let r = nacos.send_request(
            http::Request::post("/nacos/v1/auth/login").header("content-type", "application/x-www-form-urlencoded").body(bytes::Bytes::from(body)).unwrap(),
            Duration::from_secs(10),
        );
        let r = r.await.unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{body}: {}", String::from_utf8_lossy(&r.body));
    }
}

/// Consul ids as HA tools send them (with '/'), on register, read, check, maintenance and
/// deregister routes; a session TTL out of range gets Consul's own answer.
#[tokio::test]
async fn consul_ids_with_slashes_and_session_ttl_answers() {
    let s = dev_server();
    let api = client(&s, None);
    let reg = r#"{"Name":"web","ID":"ha/web-1","Port":80,"Check":{"CheckID":"ha/web-1/ttl","TTL":"30s"}}"#;
    assert_eq!(status(&api, Method::PUT, "/v1/agent/service/register", Some(reg)).await, StatusCode::OK);
    let (st, _, v) = call(&api, Method::GET, "/v1/agent/service/ha/web-1", None).await;
    assert_eq!((st, v["ID"].as_str()), (StatusCode::OK, Some("ha/web-1")), "{v}");
    assert_eq!(status(&api, Method::PUT, "/v1/agent/check/pass/ha/web-1/ttl", None).await, StatusCode::OK);
    let (_, _, v) = call(&api, Method::GET, "/v1/health/service/web?passing=true", None).await;
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(status(&api, Method::PUT, "/v1/agent/service/maintenance/ha/web-1?enable=true", None).await, StatusCode::OK);
    let (_, _, v) = call(&api, Method::GET, "/api/v1/services/web/instances/ha%2Fweb-1", None).await;
    assert!(v["maintenance"].is_object(), "native API reaches the id percent-encoded: {v}");
    assert_eq!(status(&api, Method::PUT, "/v1/agent/service/deregister/ha/web-1", None).await, StatusCode::OK);
    assert_eq!(status(&api, Method::GET, "/v1/agent/service/ha/web-1", None).await, StatusCode::NOT_FOUND);

    let (st, r, _) = call(&api, Method::PUT, "/v1/session/create", Some(r#"{"TTL":"5s"}"#)).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(String::from_utf8_lossy(&r.body), "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]");
    let (st, _, v) = call(&api, Method::PUT, "/v1/session/create", Some(r#"{"TTL":"15s"}"#)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

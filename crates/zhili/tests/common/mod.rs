//! Helpers shared by the integration tests: they all start the real `zhili` binary.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;
use zhili_client::{Client, RawResponse};
pub use zhili_test_support::{assert_eventually, ServerProcess};

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_zhili"))
}

pub fn dev_server() -> ServerProcess {
    ServerProcess::start(bin(), &["--dev"])
}

pub fn client(s: &ServerProcess, token: Option<&str>) -> Client {
    Client::new(&format!("http://{}", s.api), token.map(str::to_string)).unwrap()
}

/// One request; returns status, the raw response and the body as JSON (Null if not JSON).
pub async fn call(c: &Client, method: Method, path: &str, body: Option<&str>) -> (StatusCode, RawResponse, Value) {
    let r = c.send(method, path, body.map(|b| Bytes::from(b.to_string())), Duration::from_secs(30)).await.unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, r, v)
}

/// Asserts a problem+json 400 (or other status) whose detail mentions `field`.
pub async fn expect_problem(c: &Client, method: Method, path: &str, body: Option<&str>, status: StatusCode, field: &str) {
    let (s, r, v) = call(c, method.clone(), path, body).await;
    assert_eq!(s, status, "{method} {path}: {v}");
    assert_eq!(r.headers.get("content-type").unwrap(), "application/problem+json", "{method} {path}");
    let detail = v["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(field), "{method} {path}: detail {detail:?} should name {field:?}");
}

/// The Python of the interop venv that `scripts/test` builds (real Consul/Nacos client libraries).
/// Interop tests fail, rather than skip, when it is missing: they are part of the suite.
pub fn interop_python() -> std::path::PathBuf {
    venv_python("ZHILI_INTEROP_PYTHON", "interop-venv")
}

/// The venv with the legacy Nacos client (nacos-sdk-python 2.0.x).
pub fn interop_python_nacos2() -> std::path::PathBuf {
    venv_python("ZHILI_INTEROP_PYTHON_NACOS2", "interop-venv-nacos2")
}

fn venv_python(env: &str, venv: &str) -> std::path::PathBuf {
    let path = std::env::var_os(env)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target").join(venv).join("bin/python"));
    assert!(path.exists(), "{} is missing: run ./scripts/test, which installs the interop clients", path.display());
    path
}

/// Runs `crates/zhili/tests/interop/<script>` with `args`, bounded by `timeout`; panics with its
/// output unless it exits 0.
pub fn run_interop(script: &str, args: &[&str], timeout: Duration) -> String {
    run_interop_with(&interop_python(), script, args, timeout)
}

pub fn run_interop_with(python: &Path, script: &str, args: &[&str], timeout: Duration) -> String {
    use std::io::Read;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
    let mut child = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python");
    // Drained while the script runs: a script writing more than a pipe holds would otherwise
    // block on its own output until the timeout.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // After a timeout a process the script started may still hold the pipes: not waited for.
    let Some(status) = status else { panic!("{} timed out after {timeout:?}", script.display()) };
    let (out, err) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    let text = format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    assert!(status.success(), "{} failed:\n{text}", script.display());
    text
}

/// Bootstraps ACLs on a server started without --dev; returns the management token's secret.
pub async fn bootstrap(s: &ServerProcess) -> String {
    let (st, _, root) = call(&client(s, None), Method::POST, "/api/v1/acl/bootstrap", None).await;
    assert_eq!(st, StatusCode::OK, "{root}");
    root["secret_id"].as_str().expect("secret_id").to_string()
}

/// Client settings for the `nacos-sdk` crate against `s`: its HTTP and gRPC ports, a cache dir
/// of its own, nothing loaded from cache; with a token, logged in with it as the password.
pub fn nacos_props(s: &ServerProcess, app: &str, cache: &Path, token: Option<&str>) -> nacos_sdk::api::props::ClientProps {
    let props = nacos_sdk::api::props::ClientProps::new()
        .server_addr(format!("127.0.0.1:{}", s.nacos.expect("nacos listener").port()))
        .remote_grpc_port(s.nacos_grpc.expect("nacos grpc listener").port())
        .namespace("")
        .app_name(app)
        .cache_dir(cache.to_path_buf())
        .load_cache_at_start(false)
        .env_first(false);
    match token {
        Some(t) => props.auth_username("zhili").auth_password(t),
        None => props,
    }
}

/// Makes `token` the one DNS answers with (Consul's `PUT /v1/agent/token/dns`).
pub async fn set_dns_token(s: &ServerProcess, token: &str) {
    let body = serde_json::json!({ "Token": token }).to_string();
    let (st, r, _) = call(&client(s, Some(token)), Method::PUT, "/v1/agent/token/dns", Some(&body)).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
}

/// `dig` (Debian dnsutils, installed by scripts/test) against the server's DNS listener.
pub fn dig(s: &ServerProcess, args: &[&str]) -> String {
    let dns = s.dns.expect("dns listener");
    let out = std::process::Command::new("dig")
        .args(["@127.0.0.1", "-p", &dns.port().to_string(), "+tries=1", "+time=5"])
        .args(args)
        .output()
        .expect("dig (Debian dnsutils) is installed by scripts/test");
    assert!(out.status.success(), "dig {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sorted answer lines of `dig +short`.
pub fn dig_short(s: &ServerProcess, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = dig(s, &[args, &["+short"]].concat()).lines().map(str::to_string).collect();
    v.sort();
    v
}

// Gateway helpers.

/// A client of the gateway: HTTP/1.1 (the gateway's own server side), or HTTP/2 with prior
/// knowledge (hyper's side) when `ZHILI_TEST_GATEWAY_HTTP2` is set — scripts/test runs the
/// gateway suites both ways.
pub fn gw_client(s: &ServerProcess) -> zhili_client::Client {
    let addr = format!("http://{}", s.gateway.expect("gateway listener"));
    if std::env::var_os("ZHILI_TEST_GATEWAY_HTTP2").is_some() {
        zhili_client::Client::new_h2c(&addr, None).unwrap()
    } else {
        zhili_client::Client::new(&addr, None).unwrap()
    }
}

pub async fn register(api: &zhili_client::Client, service: &str, up: &zhili_test_support::Upstream, tags: &[&str]) {
    let body = serde_json::json!({"id": up.name, "address": "127.0.0.1", "port": up.addr.port(), "ephemeral": false, "tags": tags}).to_string();
    let (st, _, v) = call(api, Method::POST, &format!("/api/v1/services/{service}/instances"), Some(&body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

pub async fn put_route(api: &zhili_client::Client, name: &str, route: &str) {
    let (st, _, v) = call(api, Method::PUT, &format!("/api/v1/routes/{name}"), Some(route)).await;
    assert_eq!(st, StatusCode::OK, "{route}: {v}");
}

/// A request through the gateway: status, headers, body.
pub async fn gw_send(gw: &zhili_client::Client, method: Method, path: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, String) {
    let mut req = http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = gw.send_request(req.body(bytes::Bytes::new()).unwrap(), Duration::from_secs(10)).await.unwrap();
    (r.status, r.headers, String::from_utf8_lossy(&r.body).into_owned())
}

pub async fn get(gw: &zhili_client::Client, path: &str, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, String) {
    gw_send(gw, Method::GET, path, headers).await
}

/// Reads until the peer closes; returns what it sent, or None if still open after `limit`.
pub async fn closed_within(sock: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(sock, &mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

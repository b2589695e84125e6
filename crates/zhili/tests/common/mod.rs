//! Helpers shared by the integration tests: they all start the real `zhili` binary.
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

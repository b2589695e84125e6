//! Real Consul clients against the real binary: py-consul (PyPI), driven by a Python scenario.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn py_consul_register_discover_watch_health_kv_sessions_acl() {
    let s = ServerProcess::start(bin(), &[]);
    let token = bootstrap(&s).await;
    let port = s.api.port().to_string();
    let out = tokio::task::spawn_blocking(move || run_interop("consul_scenario.py", &["127.0.0.1", &port, &token], Duration::from_secs(120))).await.unwrap();
    assert!(out.contains("consul scenario passed"), "{out}");
}

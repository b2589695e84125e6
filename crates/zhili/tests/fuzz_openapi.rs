//! Schemathesis (from PyPI, in the interop venv) fuzzes the native API from `/api/openapi.json`
//! with all its checks, against the real binary with ACLs off and on. The gate is in
//! `tests/interop/schemathesis_run.py`: no server errors, no response that breaks its documented
//! status, content type or schema, no network errors, and (ACLs on) no operation that works
//! without a token.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_errors_or_schema_violations() {
    let dev = dev_server();
    let url = format!("http://{}", dev.api);
    tokio::task::spawn_blocking(move || run_interop("schemathesis_run.py", &[&url], Duration::from_secs(600))).await.unwrap();

    let acl = ServerProcess::start(bin(), &[]);
    let token = bootstrap(&acl).await;
    let url = format!("http://{}", acl.api);
    tokio::task::spawn_blocking(move || run_interop("schemathesis_run.py", &[&url, &token], Duration::from_secs(600))).await.unwrap();
}

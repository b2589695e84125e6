//! Plans through the binary: a rollout through the real gateway that completes when v2 is
//! healthy and rolls itself back when v2 fails (gated on the gateway's own counters), a
//! maintenance window that drains and returns instances on time, a plan that survives kill -9,
//! and bad, conflicting or unauthorized plans refused.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use zhili_test_support::Upstream;

async fn instance(api: &zhili_client::Client, id: &str, port: u16, version: &str) {
    let body = json!({"id": id, "address": "127.0.0.1", "port": port, "ephemeral": false, "version": version}).to_string();
    let (st, _, v) = call(api, Method::POST, "/api/v1/services/web/instances", Some(&body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

async fn plan(api: &zhili_client::Client, name: &str) -> Value {
    call(api, Method::GET, &format!("/api/v1/plans/{name}"), None).await.2
}

fn decisions(p: &Value) -> Vec<String> {
    p["history"].as_array().unwrap().iter().map(|d| d["decision"].as_str().unwrap().to_string()).collect()
}

/// Sends requests through the gateway until the plan finishes: (answers by body prefix, errors).
async fn traffic_until_done(api: &zhili_client::Client, gw: &zhili_client::Client, name: &str) -> (Value, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut total, mut errors) = (0u64, 0u64);
    loop {
        for _ in 0..20 {
            let (st, _, _) = get(gw, "/", &[]).await;
            total += 1;
            errors += u64::from(st.is_server_error());
        }
        let p = plan(api, name).await;
        if matches!(p["status"].as_str(), Some("succeeded" | "rolled_back" | "aborted" | "paused")) {
            return (p, total, errors);
        }
        assert!(Instant::now() < deadline, "plan {name} did not finish: {p}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn answers(gw: &zhili_client::Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (st, _, body) = get(gw, "/", &[]).await;
        out.push(format!("{} {}", st.as_u16(), body.split(' ').next().unwrap_or("")));
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_completes_on_a_healthy_v2_and_rolls_back_on_a_failing_one() {
    let s = dev_server();
    let (api, gw) = (client(&s, None), gw_client(&s));
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    instance(&api, "web-v1", v1.addr.port(), "v1").await;
    instance(&api, "web-v2", v2.addr.port(), "v2").await;
    let original = r#"{"path_prefix": "/", "service": "web", "subset": {"version": "v1"}}"#;
    put_route(&api, "web", original).await;
    assert_eventually(Duration::from_secs(10), "the gateway serves v1", || async { answers(&gw, 3).await == ["200 v1"] }).await;

    let rollout = |steps: &[u32], bake: &str| {
        json!({"on_gate_failure": "rollback", "steps": [{"kind": "rollout", "route": "web", "from": {"version": "v1"}, "to": {"version": "v2"},
            "steps": steps, "bake": bake, "gates": [{"metric": "error_ratio", "max": 0.05}]}]})
        .to_string()
    };
    // v2 healthy: every step, then all traffic on v2.
    let (st, _, v) = call(&api, Method::PUT, "/api/v1/plans/release", Some(&rollout(&[10, 50, 100], "1500ms"))).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (done, total, errors) = traffic_until_done(&api, &gw, "release").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(errors, 0, "{total} requests");
    let d = decisions(&done);
    assert_eq!(d.iter().filter(|x| *x == "weight_set").count(), 3, "{d:?}");
    assert!(d.contains(&"rolled_out".to_string()), "{d:?}");
    assert_eq!(answers(&gw, 20).await, ["200 v2"]);

    // v2 answers 500: the error-ratio gate trips in the first bake and the split goes back.
    put_route(&api, "web", original).await;
    assert_eventually(Duration::from_secs(10), "the gateway serves v1 again", || async { answers(&gw, 3).await == ["200 v1"] }).await;
    v2.status.store(500, Ordering::Relaxed);
    let v2_hits = v2.hits.load(Ordering::Relaxed);
    let (st, _, v) = call(&api, Method::PUT, "/api/v1/plans/canary", Some(&rollout(&[10, 100], "4s"))).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (done, total, errors) = traffic_until_done(&api, &gw, "canary").await;
    assert_eq!(done["status"], "rolled_back", "{done}");
    let last = done["history"].as_array().unwrap().iter().rev().find(|h| h["decision"] == "rolled_back").unwrap();
    assert!(last["reason"].as_str().unwrap().contains("error_ratio"), "{last}");
    assert!(!decisions(&done).iter().any(|d| d == "rolled_out"), "it never went past the first step");
    // Client errors stayed within the canary's share (10 %), with room for chance.
    assert!(errors > 0 && (errors as f64) < 0.25 * total as f64, "{errors} errors of {total}");
    assert!(v2.hits.load(Ordering::Relaxed) > v2_hits, "the canary got traffic");
    let (_, _, route) = call(&api, Method::GET, "/api/v1/routes/web", None).await;
    assert_eq!(route["subset"]["version"], "v1", "{route}");
    assert!(route.get("split").is_none(), "{route}");
    assert_eventually(Duration::from_secs(10), "all traffic back on v1", || async { answers(&gw, 10).await == ["200 v1"] }).await;
    // Every decision is on $plans too.
    let (_, _, events) = call(&api, Method::GET, "/api/v1/streams/$plans?limit=1000", None).await;
    let types: Vec<&str> = events["events"].as_array().unwrap().iter().map(|e| e["event"]["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"io.zhili.plan.rolled_back") && types.contains(&"io.zhili.plan.succeeded"), "{types:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_maintenance_window_drains_and_returns_instances_on_time() {
    let s = ServerProcess::start(bin(), &[]);
    let root = bootstrap(&s).await;
    let api = client(&s, Some(&root));
    for (id, version) in [("web-a", "v1"), ("web-b", "v1"), ("web-c", "v2")] {
        instance(&api, id, 9, version).await;
    }
    // Refused, naming the field, storing nothing.
    for (body, field) in [
        (json!({"steps": [{"kind": "maintenance", "service": "nobody", "duration": "2s"}]}), "steps[0].service"),
        (json!({"steps": [{"kind": "maintenance", "service": "web", "selector": {"version": "v9"}, "duration": "2s"}]}), "steps[0].selector"),
        (json!({"steps": [{"kind": "rollout", "route": "missing", "from": {}, "to": {"version": "v2"}, "steps": [100], "bake": "1s"}]}), "steps[0].route"),
        (json!({"steps": [{"kind": "wait", "duration": "soon"}]}), "steps[0].duration"),
        (json!({"steps": [{"kind": "teleport"}]}), "steps[0].kind"),
    ] {
        expect_problem(&api, Method::PUT, "/api/v1/plans/bad", Some(&body.to_string()), StatusCode::BAD_REQUEST, field).await;
    }
    assert_eq!(call(&api, Method::GET, "/api/v1/plans/bad", None).await.0, StatusCode::NOT_FOUND);
    // Plans need `plan` rules: a token for other plans may neither apply nor read this one.
    let policy = json!({"name": "ops-plans", "rules": [{"resource": "plan", "prefix": "ops-", "access": "write"}]});
    assert!(call(&api, Method::POST, "/api/v1/acl/policies", Some(&policy.to_string())).await.0.is_success());
    let (_, _, t) = call(&api, Method::POST, "/api/v1/acl/tokens", Some(r#"{"policies": ["ops-plans"]}"#)).await;
    let ops = client(&s, Some(t["secret_id"].as_str().unwrap()));

    let window = json!({"steps": [{"kind": "maintenance", "service": "web", "selector": {"version": "v1"}, "duration": "2s"}]}).to_string();
    assert_eq!(call(&ops, Method::PUT, "/api/v1/plans/window", Some(&window)).await.0, StatusCode::FORBIDDEN);
    let started = Instant::now();
    let (st, _, v) = call(&api, Method::PUT, "/api/v1/plans/window", Some(&window)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(call(&ops, Method::GET, "/api/v1/plans/window", None).await.0, StatusCode::FORBIDDEN);
    let (_, _, listed) = call(&ops, Method::GET, "/api/v1/plans", None).await;
    assert_eq!(listed["plans"], json!([]), "{listed}");
    // A second plan on the same service is refused while this one runs.
    let clash = json!({"steps": [{"kind": "maintenance", "service": "web", "duration": "1s"}]}).to_string();
    let (st, _, v) = call(&api, Method::PUT, "/api/v1/plans/ops-clash", Some(&clash)).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("window"), "{v}");

    let maintenance = |id: &'static str| {
        let api = api.clone();
        async move { !call(&api, Method::GET, &format!("/api/v1/services/web/instances/{id}"), None).await.2["maintenance"].is_null() }
    };
    assert_eventually(Duration::from_secs(5), "v1 instances drained", || async { maintenance("web-a").await && maintenance("web-b").await }).await;
    assert!(!maintenance("web-c").await, "v2 untouched");
    let (_, _, healthy) = call(&api, Method::GET, "/api/v1/services/web/instances", None).await;
    let serving: Vec<&str> = healthy["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(serving, ["web-c"], "drained instances leave discovery");
    assert_eventually(Duration::from_secs(10), "the window ends", || async { plan(&api, "window").await["status"] == "succeeded" }).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "returned after {took:?}, before the 2 s window");
    assert!(!maintenance("web-a").await && !maintenance("web-b").await, "instances returned");
    assert_eq!(decisions(&plan(&api, "window").await), ["applied", "drained", "returned", "succeeded"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_survives_kill_9_and_continues_where_it_was() {
    let mut s = ServerProcess::start(bin(), &["--dev"]);
    let api = client(&s, None);
    instance(&api, "web-a", 9, "v1").await;
    instance(&api, "web-b", 9, "v1").await;
    let p = json!({"steps": [
        {"kind": "maintenance", "service": "web", "selector": {"ids": ["web-a"]}, "duration": "3s"},
        {"kind": "approve", "message": "look at the dashboards"},
        {"kind": "config", "key": "release/web", "value": "done"}]});
    assert_eq!(call(&api, Method::PUT, "/api/v1/plans/nightly", Some(&p.to_string())).await.0, StatusCode::CREATED);
    assert_eventually(Duration::from_secs(5), "web-a drained", || async {
        !call(&api, Method::GET, "/api/v1/services/web/instances/web-a", None).await.2["maintenance"].is_null()
    })
    .await;
    s.restart_after_kill9();
    let api = client(&s, None);
    assert_eventually(Duration::from_secs(15), "the window ends after the restart and the plan waits for approval", || async {
        plan(&api, "nightly").await["waiting_for_approval"] == true
    })
    .await;
    let (_, _, a) = call(&api, Method::GET, "/api/v1/services/web/instances/web-a", None).await;
    assert!(a["maintenance"].is_null(), "web-a came back: {a}");
    let (_, _, kv) = call(&api, Method::GET, "/api/v1/kv/release/web", None).await;
    assert!(kv.is_null() || kv.get("value").is_none(), "nothing past the approve step yet: {kv}");
    // The CLI approves; the last step runs.
    let out = std::process::Command::new(bin()).args(["plan", "approve", "nightly"]).env("ZHILI_ADDR", format!("http://{}", s.api)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eventually(Duration::from_secs(10), "the plan finishes", || async { plan(&api, "nightly").await["status"] == "succeeded" }).await;
    let (st, raw, _) = call(&api, Method::GET, "/api/v1/kv/release/web?raw=true", None).await;
    assert_eq!((st, &raw.body[..]), (StatusCode::OK, &b"done"[..]));
    let d = decisions(&plan(&api, "nightly").await);
    assert_eq!(d, ["applied", "drained", "returned", "waiting_for_approval", "approved", "config_written", "succeeded"]);
}

//! The web console: served from the binary at /ui (every view's URL answers the page, assets
//! with a strict content security policy), then driven in headless Chromium by
//! `interop/console_browser.py` (login, live health, a KV CAS conflict, a topology edge after
//! gateway traffic, a plan approved and followed), with screenshots under
//! `target/console-screenshots` and no browser console errors allowed.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::json;
use zhili_test_support::Upstream;

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_served_and_works_in_a_real_browser() {
    let s = ServerProcess::start(bin(), &[]);
    let root = bootstrap(&s).await;
    let api = client(&s, Some(&root));
    let anonymous = client(&s, None);

    // Served without a token (the data needs one), every view's URL answers the page.
    for path in ["/ui", "/ui/", "/ui/services/web", "/ui/kv/config/web/db", "/ui/plans/nightly"] {
        let (st, r, _) = call(&anonymous, Method::GET, path, None).await;
        assert_eq!(st, StatusCode::OK, "{path}");
        let csp = r.headers.get("content-security-policy").unwrap().to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(String::from_utf8_lossy(&r.body).contains("/ui/assets/app.js"));
    }
    let (st, r, _) = call(&anonymous, Method::GET, "/ui/assets/app.js", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(r.headers.get("content-type").unwrap().to_str().unwrap().starts_with("text/javascript"));
    assert!(!String::from_utf8_lossy(&r.body).contains("http://") || !String::from_utf8_lossy(&r.body).contains("cdn"), "no CDN");
    // The data is not: anonymous callers see nothing while ACLs are on.
    let (_, _, services) = call(&anonymous, Method::GET, "/api/v1/services", None).await;
    assert_eq!(services, json!([]));

    // What the browser will look at.
    let up = Upstream::start("web-up").await;
    let (st, _, v) = call(
        &api,
        Method::POST,
        "/api/v1/services/web/instances",
        Some(r#"{"id": "web-1", "address": "127.0.0.1", "port": 9, "ephemeral": false, "checks": [{"kind": "ttl", "id": "alive", "ttl": "10m"}]}"#),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, _, _) = call(&api, Method::PUT, "/api/v1/services/web/instances/web-1/checks/alive", Some(r#"{"status": "passing", "output": "ok"}"#)).await;
    assert!(st.is_success());
    register(&api, "web", &up, &[]).await;
    put_route(&api, "web", r#"{"path_prefix": "/", "service": "web"}"#).await;
    assert_eq!(call(&api, Method::PUT, "/api/v1/kv/config/web/db", Some("postgres://v1")).await.0, StatusCode::OK);
    let gw = gw_client(&s);
    assert_eventually(Duration::from_secs(10), "the gateway reaches web", || async { get(&gw, "/", &[]).await.0 == StatusCode::OK }).await;
    // Callers known by name: a consumer's calls draw an edge of their own in the topology.
    let key = "frontend-key-0123456789abcdef0123";
    assert!(call(&api, Method::PUT, "/api/v1/consumers/frontend", Some(&json!({"api_keys": [key]}).to_string())).await.0.is_success());
    put_route(&api, "keyed", &json!({"path_prefix": "/keyed/", "service": "web", "auth": {"api_key": {"query": "apikey"}}}).to_string()).await;
    assert_eventually(Duration::from_secs(10), "the keyed route answers the consumer", || async {
        get(&gw, &format!("/keyed/x?apikey={key}"), &[]).await.0 == StatusCode::OK
    })
    .await;
    // The gateway counts a call as it finishes, which can be a moment after the client has the
    // answer.
    let consumer_edge = |topo: &serde_json::Value| topo["edges"].as_array().and_then(|e| e.iter().find(|e| e["from"] == "consumer/frontend").cloned());
    assert_eventually(Duration::from_secs(10), "the consumer's calls in the topology", || async {
        consumer_edge(&call(&api, Method::GET, "/api/v1/topology", None).await.2).is_some()
    })
    .await;
    let (_, _, topo) = call(&api, Method::GET, "/api/v1/topology", None).await;
    let edge = consumer_edge(&topo).unwrap_or_else(|| panic!("{topo}"));
    assert_eq!(edge["to"], "default/web", "{topo}");
    assert!(edge["requests"].as_u64().unwrap() >= 1 && edge["p99_ms"].as_f64().is_some(), "{edge}");
    assert!(topo["nodes"].as_array().unwrap().iter().any(|n| n["id"] == "consumer/frontend" && n["kind"] == "consumer"), "{topo}");
    // Nodes and edges follow the token's rights: an anonymous caller sees none of them.
    let (_, _, hidden) = call(&anonymous, Method::GET, "/api/v1/topology", None).await;
    assert!(hidden["edges"].as_array().unwrap().is_empty(), "{hidden}");
    let plan = json!({"description": "flip the flag after a look", "steps": [{"kind": "approve", "message": "check the dashboards"},
        {"kind": "config", "key": "config/web/flag", "value": "on"}]});
    assert_eq!(call(&api, Method::PUT, "/api/v1/plans/nightly", Some(&plan.to_string())).await.0, StatusCode::CREATED);

    let reader =
        json!({"name": "reader", "rules": [{"resource": "service", "prefix": "", "access": "read"}, {"resource": "stream", "prefix": "$", "access": "read"}]});
    assert!(call(&api, Method::POST, "/api/v1/acl/policies", Some(&reader.to_string())).await.0.is_success());
    let (_, _, t) = call(&api, Method::POST, "/api/v1/acl/tokens", Some(r#"{"description": "read-only", "policies": ["reader"]}"#)).await;
    let reader = t["secret_id"].as_str().unwrap().to_string();
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
    let out = run_interop(
        "console_browser.py",
        &[&format!("http://{}", s.api), &format!("http://{}", s.gateway.unwrap()), &root, shots.to_str().unwrap(), &reader],
        Duration::from_secs(240),
    );
    assert!(out.contains("console ok"), "{out}");
    for view in
        ["overview", "services", "service-web-critical", "kv-conflict", "topology", "plan-done", "routes", "streams", "transactions", "acl", "phone-service"]
    {
        assert!(shots.join(format!("{view}.png")).exists(), "no screenshot of {view}");
    }
}

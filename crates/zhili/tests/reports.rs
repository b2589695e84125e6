//! Service reports through the binary: an instance reports its state, tasks and planned work;
//! the report shows on the instance and in the service's report list (blocking reads wake on
//! it), bad reports are refused naming the field and change nothing, `report` rules decide who
//! may report for which service, a persistent instance's report survives kill -9, and the CLI
//! writes and reads reports.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

async fn token(admin: &zhili_client::Client, name: &str, rules: Value) -> String {
    let policy = json!({"name": name, "rules": rules});
    let (st, _, v) = call(admin, Method::POST, "/api/v1/acl/policies", Some(&policy.to_string())).await;
    assert!(st.is_success(), "{v}");
    let (_, _, t) = call(admin, Method::POST, "/api/v1/acl/tokens", Some(&json!({"policies": [name]}).to_string())).await;
    t["secret_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_report_state_tasks_and_plans() {
    let mut s = ServerProcess::start(bin(), &[]);
    let root = bootstrap(&s).await;
    let admin = client(&s, Some(&root));
    for (id, ephemeral) in [("web-1", false), ("web-2", true)] {
        let spec = json!({"id": id, "address": "127.0.0.1", "port": 8081, "ephemeral": ephemeral});
        let (st, _, v) = call(&admin, Method::POST, "/api/v1/services/web/instances", Some(&spec.to_string())).await;
        assert!(st.is_success(), "{v}");
    }
    let web = client(&s, Some(&token(&admin, "web-reports", json!([{"resource": "report", "prefix": "web", "access": "write"}])).await));
    let no_report = client(&s, Some(&token(&admin, "web-service", json!([{"resource": "service", "prefix": "web", "access": "write"}])).await));
    let other = client(&s, Some(&token(&admin, "api-reports", json!([{"resource": "report", "prefix": "api", "access": "write"}])).await));

    let report = json!({"state": "busy", "message": "reindexing", "tasks": [{"name": "reindex", "progress": 40}],
        "planned": [{"name": "migrate", "at": "2026-12-01T02:00:00Z", "until": "2026-12-01T03:00:00Z"}]});
    let path = "/api/v1/services/web/instances/web-1/report";
    // Who may report: `report` write on the service, nothing less, nothing else.
    for (c, who) in [(&no_report, "service write only"), (&other, "another service's reports"), (&client(&s, None), "anonymous")] {
        assert_eq!(call(c, Method::PUT, path, Some(&report.to_string())).await.0, StatusCode::FORBIDDEN, "{who}");
    }
    // Readers of the list need `report` read: the service writer without report rules cannot.
    let (_, _, before) = call(&admin, Method::GET, "/api/v1/services/web/reports", None).await;
    assert_eq!(before["reports"], json!([]), "{before}");
    let index = before["index"].as_u64().unwrap();
    let waiter = {
        let admin = admin.clone();
        tokio::spawn(async move { call(&admin, Method::GET, &format!("/api/v1/services/web/reports?index={index}&wait=10s"), None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, _, v) = call(&web, Method::PUT, path, Some(&report.to_string())).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (_, _, woken) = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("the blocking read woke").unwrap();
    assert_eq!(woken["reports"][0]["id"], "web-1", "{woken}");
    assert_eq!(woken["reports"][0]["report"]["tasks"][0]["progress"], 40, "{woken}");
    assert_eq!(call(&no_report, Method::GET, "/api/v1/services/web/reports", None).await.0, StatusCode::FORBIDDEN);
    let (_, _, inst) = call(&admin, Method::GET, "/api/v1/services/web/instances/web-1", None).await;
    assert_eq!(inst["report"]["state"], "busy", "{inst}");
    assert!(inst["report"]["reported_ms"].as_u64().unwrap() > 0, "{inst}");

    // Bad reports name the field and change nothing.
    for (body, field) in [
        (json!({"state": "Not OK"}), "state"),
        (json!({"state": "ok", "tasks": [{"name": "a", "progress": 101}]}), "tasks[0].progress"),
        (json!({"state": "ok", "planned": [{"name": "x", "at": "soon"}]}), "planned[0].at"),
        (json!({"state": "ok", "colour": "red"}), "colour"),
    ] {
        expect_problem(&web, Method::PUT, path, Some(&body.to_string()), StatusCode::BAD_REQUEST, field).await;
    }
    let (st, _, _) = call(&web, Method::PUT, "/api/v1/services/web/instances/nobody/report", Some(r#"{"state": "ok"}"#)).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, _, inst) = call(&admin, Method::GET, "/api/v1/services/web/instances/web-1", None).await;
    assert_eq!(inst["report"]["state"], "busy", "a refused report changed the stored one: {inst}");

    // The CLI writes and lists reports.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .args(["-o", "json"])
            .env("ZHILI_ADDR", format!("http://{}", s.api))
            .env("ZHILI_TOKEN", &root)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["instance", "report", "web", "web-2", "--state", "draining", "--task", "flush=90", "--planned", "deploy@2026-12-02T10:00:00Z"]);
    let listed: Value = serde_json::from_str(&cli(&["instance", "reports", "web"])).unwrap();
    let states: Vec<(&str, &str)> =
        listed["reports"].as_array().unwrap().iter().map(|r| (r["id"].as_str().unwrap(), r["report"]["state"].as_str().unwrap())).collect();
    assert_eq!(states, [("web-1", "busy"), ("web-2", "draining")], "{listed}");
    assert_eq!(listed["reports"][1]["report"]["planned"][0]["at"], "2026-12-02T10:00:00Z");

    // Acknowledged means durable: the persistent instance's report survives kill -9.
    s.restart_after_kill9();
    let admin = client(&s, Some(&root));
    let (_, _, inst) = call(&admin, Method::GET, "/api/v1/services/web/instances/web-1", None).await;
    assert_eq!(inst["report"]["state"], "busy", "{inst}");
    assert_eq!(inst["report"]["tasks"][0]["name"], "reindex", "{inst}");
}

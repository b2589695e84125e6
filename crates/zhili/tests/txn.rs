//! The DTM-compatible coordinator through the binary: saga, TCC, 2-phase message and XA driven
//! over DTM's HTTP API against a branch server here that answers what each test scripts
//! (200, 409, 425, slow, 500) and records every call in order.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use common::*;
use http::Method;
use serde_json::{json, Value};

/// One scripted answer: a status, after a delay.
#[derive(Clone, Copy)]
struct Answer(u16, u64);

/// A call a branch received: (gid, path, op, branch_id, body).
type Received = (String, String, String, String, String);

#[derive(Default)]
struct Branches {
    /// Per path, answers to give in turn (then 200).
    script: Mutex<HashMap<String, VecDeque<Answer>>>,
    /// Every call, in order.
    calls: Mutex<Vec<Received>>,
}

impl Branches {
    fn script(&self, path: &str, answers: &[Answer]) {
        self.script.lock().unwrap().insert(path.to_string(), answers.iter().copied().collect());
    }

    /// The calls of one transaction: "path op" in order.
    fn of(&self, gid: &str) -> Vec<String> {
        self.calls.lock().unwrap().iter().filter(|c| c.0 == gid).map(|c| format!("{} {}", c.1, c.2)).collect()
    }
}

async fn branch(State(b): State<Arc<Branches>>, uri: Uri, Query(q): Query<HashMap<String, String>>, body: String) -> impl IntoResponse {
    let path = uri.path().to_string();
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    b.calls.lock().unwrap().push((get("gid"), path.clone(), get("op"), get("branch_id"), body));
    let answer = b.script.lock().unwrap().get_mut(&path).and_then(|q| q.pop_front()).unwrap_or(Answer(200, 0));
    if answer.1 > 0 {
        tokio::time::sleep(Duration::from_millis(answer.1)).await;
    }
    let status = StatusCode::from_u16(answer.0).unwrap();
    let text = match answer.0 {
        200 => r#"{"dtm_result":"SUCCESS"}"#,
        409 => r#"{"dtm_result":"FAILURE"}"#,
        425 => r#"{"dtm_result":"ONGOING"}"#,
        _ => "oops",
    };
    (status, text)
}

async fn branch_server() -> (SocketAddr, Arc<Branches>) {
    let b = Arc::new(Branches::default());
    let app = axum::Router::new().fallback(branch).with_state(b.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, b)
}

fn dtm(s: &ServerProcess) -> zhili_client::Client {
    zhili_client::Client::new(&format!("http://{}/api/dtmsvr", s.dtm.expect("dtm listener")), None).unwrap()
}

async fn post(c: &zhili_client::Client, path: &str, body: &Value) -> (StatusCode, Value) {
    let (st, _, v) = call(c, Method::POST, path, Some(&body.to_string())).await;
    (st, v)
}

/// Polls `query` until the transaction reaches a final status (or 20 s pass).
async fn final_status(c: &zhili_client::Client, gid: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, v) = call(c, Method::GET, &format!("/query?gid={gid}"), None).await;
        let st = v["transaction"]["status"].as_str().unwrap_or("").to_string();
        if st == "succeed" || st == "failed" || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn saga(gid: &str, base: &str, steps: &[(&str, &str)], options: Value) -> Value {
    let mut body = json!({
        "gid": gid, "trans_type": "saga",
        "steps": steps.iter().map(|(a, c)| json!({"action": format!("{base}{a}"), "compensate": format!("{base}{c}")})).collect::<Vec<_>>(),
        "payloads": steps.iter().map(|_| r#"{"amount":30}"#).collect::<Vec<_>>(),
        "custom_data": null, "query_prepared": null, "protocol": null, "passthrough_headers": [], "branch_headers": {},
    });
    for (k, v) in options.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn sagas_commit_compensate_and_retry_by_dtm_results() {
    let s = dev_server();
    let c = dtm(&s);
    let (addr, b) = branch_server().await;
    let base = format!("http://{addr}");
    let (st, _, v) = call(&c, Method::GET, "/newGid", None).await;
    assert_eq!((st, v["dtm_result"].as_str()), (StatusCode::OK, Some("SUCCESS")), "{v}");
    assert!(v["gid"].as_str().is_some_and(|g| !g.is_empty()));

    // All actions succeed: each called once, in order, with DTM's query parameters and body.
    let steps = [("/out", "/out-revert"), ("/in", "/in-revert")];
    let (st, v) = post(&c, "/submit", &saga("ok-1", &base, &steps, json!({}))).await;
    assert_eq!((st, v["dtm_result"].as_str()), (StatusCode::OK, Some("SUCCESS")), "{v}");
    let q = final_status(&c, "ok-1").await;
    assert_eq!(q["transaction"]["status"], "succeed", "{q}");
    assert_eq!(b.of("ok-1"), ["/out action", "/in action"]);
    let first = b.calls.lock().unwrap().iter().find(|c| c.0 == "ok-1").cloned().unwrap();
    assert_eq!((first.3.as_str(), first.4.as_str()), ("01", r#"{"amount":30}"#));
    // Submitting the same gid again is idempotent and runs nothing again.
    assert_eq!(post(&c, "/submit", &saga("ok-1", &base, &steps, json!({}))).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.of("ok-1").len(), 2);

    // 409 from the second action: compensated in reverse, the failed step included; steps
    // never attempted are not compensated.
    b.script("/in-409", &[Answer(409, 0)]);
    let steps3 = [("/out", "/out-revert"), ("/in-409", "/in-revert"), ("/never", "/never-revert")];
    assert_eq!(post(&c, "/submit", &saga("fail-1", &base, &steps3, json!({}))).await.0, StatusCode::OK);
    let q = final_status(&c, "fail-1").await;
    assert_eq!(q["transaction"]["status"], "failed", "{q}");
    assert_eq!(b.of("fail-1"), ["/out action", "/in-409 action", "/in-revert compensate", "/out-revert compensate"]);
    assert!(q["transaction"]["rollback_reason"].as_str().unwrap().contains("409"), "{q}");

    // 425 (ongoing) then 200, and a 500 then 200: retried after the retry interval.
    b.script("/slow-start", &[Answer(425, 0)]);
    b.script("/flaky", &[Answer(500, 0)]);
    let steps = [("/slow-start", "/r1"), ("/flaky", "/r2")];
    assert_eq!(post(&c, "/submit", &saga("retry-1", &base, &steps, json!({"retry_interval": 1}))).await.0, StatusCode::OK);
    let q = final_status(&c, "retry-1").await;
    assert_eq!(q["transaction"]["status"], "succeed", "{q}");
    assert_eq!(b.of("retry-1"), ["/slow-start action", "/slow-start action", "/flaky action", "/flaky action"]);

    // A branch slower than request_timeout: the call times out and is made again.
    b.script("/hang", &[Answer(200, 2500)]);
    let steps = [("/hang", "/r")];
    assert_eq!(post(&c, "/submit", &saga("timeout-1", &base, &steps, json!({"retry_interval": 1, "request_timeout": 1}))).await.0, StatusCode::OK);
    let q = final_status(&c, "timeout-1").await;
    assert_eq!(q["transaction"]["status"], "succeed", "{q}");
    assert_eq!(b.of("timeout-1"), ["/hang action", "/hang action"]);

    // wait_result: the answer says how it ended.
    b.script("/no", &[Answer(409, 0)]);
    let (st, v) = post(&c, "/submit", &saga("wait-ok", &base, &[("/a", "/ra")], json!({"wait_result": true}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, _, q) = call(&c, Method::GET, "/query?gid=wait-ok", None).await;
    assert_eq!(q["transaction"]["status"], "succeed", "already done when submit answered: {q}");
    let (st, v) = post(&c, "/submit", &saga("wait-no", &base, &[("/no", "/rno")], json!({"wait_result": true}))).await;
    assert_eq!((st, v["dtm_result"].as_str()), (StatusCode::CONFLICT, Some("FAILURE")), "{v}");

    // retry_limit: a branch that keeps failing ends the saga after that many retries.
    b.script("/down", &[Answer(503, 0); 10]);
    let steps = [("/ok-first", "/rv1"), ("/down", "/rv2")];
    assert_eq!(post(&c, "/submit", &saga("limit-1", &base, &steps, json!({"retry_interval": 1, "retry_limit": 1}))).await.0, StatusCode::OK);
    let q = final_status(&c, "limit-1").await;
    assert_eq!(q["transaction"]["status"], "failed", "{q}");
    assert_eq!(b.of("limit-1"), ["/ok-first action", "/down action", "/down action", "/rv2 compensate", "/rv1 compensate"]);

    // Concurrent steps with orders: step 2 waits for 0 and 1.
    let mut body = saga("conc-1", &base, &[("/c0", "/r0"), ("/c1", "/r1"), ("/c2", "/r2")], json!({"concurrent": true}));
    body["custom_data"] = json!(json!({"orders": {"2": [0, 1]}, "concurrent": true}).to_string());
    assert_eq!(post(&c, "/submit", &body).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "conc-1").await["transaction"]["status"], "succeed");
    assert_eq!(b.of("conc-1").last().map(String::as_str), Some("/c2 action"));

    // $txn carries the transitions.
    let api = client(&s, None);
    let (_, _, v) = call(&api, Method::GET, "/api/v1/streams/$txn?limit=1000", None).await;
    let types: Vec<&str> =
        v["events"].as_array().unwrap().iter().filter(|e| e["event"]["subject"] == "fail-1").filter_map(|e| e["event"]["type"].as_str()).collect();
    for want in ["io.zhili.txn.submitted", "io.zhili.txn.branch.failed", "io.zhili.txn.aborting", "io.zhili.txn.failed"] {
        assert!(types.contains(&want), "{want} in {types:?}");
    }
    // And /metrics counts them.
    let (_, raw, _) = call(&api, Method::GET, "/metrics", None).await;
    let text = String::from_utf8_lossy(&raw.body).to_string();
    for want in [
        r#"transactions_finished_total{mode="saga",outcome="succeed"} 5"#,
        r#"transactions_finished_total{mode="saga",outcome="failed"} 3"#,
        "transaction_branch_seconds_bucket",
        "transaction_branch_retries_total",
        "transactions_in_flight",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tcc_xa_and_messages() {
    let s = dev_server();
    let c = dtm(&s);
    let (addr, b) = branch_server().await;
    let base = format!("http://{addr}");

    // TCC: the application tries; submit confirms every registered branch, last first.
    for gid in ["tcc-ok", "tcc-no"] {
        assert_eq!(post(&c, "/prepare", &json!({"gid": gid, "trans_type": "tcc"})).await.0, StatusCode::OK);
        for id in ["01", "02"] {
            let reg = json!({"gid": gid, "branch_id": id, "trans_type": "tcc", "status": "prepared", "data": "{}",
                "confirm": format!("{base}/confirm{id}"), "cancel": format!("{base}/cancel{id}")});
            let (st, v) = post(&c, "/registerBranch", &reg).await;
            assert_eq!(st, StatusCode::OK, "{v}");
        }
    }
    assert_eq!(post(&c, "/submit", &json!({"gid": "tcc-ok", "trans_type": "tcc"})).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "tcc-ok").await["transaction"]["status"], "succeed");
    assert_eq!(b.of("tcc-ok"), ["/confirm02 confirm", "/confirm01 confirm"]);
    // A try failed: the application aborts, every registered branch is cancelled.
    assert_eq!(post(&c, "/abort", &json!({"gid": "tcc-no", "trans_type": "tcc"})).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "tcc-no").await["transaction"]["status"], "failed");
    assert_eq!(b.of("tcc-no"), ["/cancel02 cancel", "/cancel01 cancel"]);
    // Registering on a finished transaction is DTM's FAILURE.
    let reg = json!({"gid": "tcc-ok", "branch_id": "03", "trans_type": "tcc", "confirm": format!("{base}/c"), "cancel": format!("{base}/x")});
    assert_eq!(post(&c, "/registerBranch", &reg).await.0, StatusCode::CONFLICT);

    // XA: all committed, or (one prepare failed) all rolled back.
    for gid in ["xa-ok", "xa-no"] {
        assert_eq!(post(&c, "/prepare", &json!({"gid": gid, "trans_type": "xa"})).await.0, StatusCode::OK);
        for id in ["01", "02"] {
            let reg = json!({"gid": gid, "branch_id": id, "trans_type": "xa", "url": format!("{base}/xa{id}")});
            assert_eq!(post(&c, "/registerBranch", &reg).await.0, StatusCode::OK);
        }
    }
    assert_eq!(post(&c, "/submit", &json!({"gid": "xa-ok", "trans_type": "xa"})).await.0, StatusCode::OK);
    assert_eq!(post(&c, "/abort", &json!({"gid": "xa-no", "trans_type": "xa"})).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "xa-ok").await["transaction"]["status"], "succeed");
    assert_eq!(final_status(&c, "xa-no").await["transaction"]["status"], "failed");
    assert_eq!(b.of("xa-ok"), ["/xa01 commit", "/xa02 commit"]);
    assert_eq!(b.of("xa-no"), ["/xa01 rollback", "/xa02 rollback"]);

    // 2-phase message: prepared, then the application disappears; after the timeout the
    // coordinator asks query_prepared: 200 commits (the steps run), 409 fails (they never do).
    for (gid, answer) in [("msg-yes", 200), ("msg-no", 409)] {
        b.script(&format!("/qp-{gid}"), &[Answer(answer, 0)]);
        let body = json!({"gid": gid, "trans_type": "msg", "steps": [{"action": format!("{base}/deliver-{gid}")}], "payloads": ["{\"n\":1}"],
            "query_prepared": format!("{base}/qp-{gid}"), "timeout_to_fail": 1, "retry_interval": 1});
        assert_eq!(post(&c, "/prepare", &body).await.0, StatusCode::OK);
    }
    assert_eq!(final_status(&c, "msg-yes").await["transaction"]["status"], "succeed");
    assert_eq!(final_status(&c, "msg-no").await["transaction"]["status"], "failed");
    assert_eq!(b.of("msg-yes"), ["/qp-msg-yes msg", "/deliver-msg-yes action"]);
    assert_eq!(b.of("msg-no"), ["/qp-msg-no msg"]);
    // Submitted directly, with a topic fanning out to its subscribers.
    for url in ["/sub-a", "/sub-b"] {
        let (st, _, v) = call(&c, Method::GET, &format!("/subscribe?topic=invoices&url={base}{url}&remark=x"), None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let body = json!({"gid": "msg-topic", "trans_type": "msg", "steps": [{"action": "topic://invoices"}], "payloads": ["{}"]});
    assert_eq!(post(&c, "/prepare", &body).await.0, StatusCode::OK);
    assert_eq!(post(&c, "/submit", &json!({"gid": "msg-topic", "trans_type": "msg"})).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "msg-topic").await["transaction"]["status"], "succeed");
    assert_eq!(b.of("msg-topic"), ["/sub-a action", "/sub-b action"]);
    let (_, _, all) = call(&c, Method::GET, "/all?limit=100", None).await;
    let every: Vec<String> = all["transactions"].as_array().unwrap().iter().map(|t| t["gid"].as_str().unwrap().to_string()).collect();
    assert!(every.len() >= 7, "{all}");
    // Paged by position: the same transactions, in gid order, each once.
    let mut paged = Vec::new();
    let mut position = String::new();
    loop {
        let (_, _, page) = call(&c, Method::GET, &format!("/all?limit=3&position={position}"), None).await;
        paged.extend(page["transactions"].as_array().unwrap().iter().map(|t| t["gid"].as_str().unwrap().to_string()));
        position = page["next_position"].as_str().unwrap().to_string();
        if position.is_empty() {
            break;
        }
    }
    assert_eq!(paged, every);
    let mut sorted = every.clone();
    sorted.sort();
    assert_eq!(sorted, every);
    let (_, _, failed) = call(&c, Method::GET, "/all?status=failed", None).await;
    let failed: Vec<&str> = failed["transactions"].as_array().unwrap().iter().map(|t| t["gid"].as_str().unwrap()).collect();
    assert_eq!(failed, ["msg-no", "tcc-no", "xa-no"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_discovery_urls_reach_registered_instances() {
    let s = dev_server();
    let c = dtm(&s);
    let (addr, b) = branch_server().await;
    let base = format!("http://{addr}");
    for (body, field) in [
        (json!({"gid": "x1", "trans_type": "sagax", "steps": []}), "trans_type"),
        (json!({"gid": "bad gid", "trans_type": "saga"}), "gid"),
        (json!({"gid": "x2", "trans_type": "saga", "steps": [{"action": "ftp://x"}], "payloads": ["{}"]}), "steps[0].action"),
        (json!({"gid": "x3", "trans_type": "saga", "steps": [{"action": format!("{base}/a")}], "payloads": ["{}", "{}"]}), "payloads"),
        (json!({"gid": "x4", "trans_type": "saga", "steps": [{"action": format!("{base}/a"), "bogus": "y"}], "payloads": ["{}"]}), "steps[0].bogus"),
        (json!({"gid": "x5", "trans_type": "saga", "steps": [{"action": format!("{base}/a")}], "payloads": ["{}"], "timeout_to_fail": -1}), "timeout_to_fail"),
        (json!({"gid": "x6", "trans_type": "saga", "steps": [{"action": format!("{base}/a")}], "payloads": ["{}"], "retry_limit": "x"}), "retry_limit"),
    ] {
        let (st, v) = post(&c, "/submit", &body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["detail"].as_str().unwrap().starts_with(field), "{field}: {v}");
    }
    let (st, _, _) = call(&c, Method::POST, "/submit", Some("{not json")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (_, _, v) = call(&c, Method::GET, "/all", None).await;
    assert_eq!(v["transactions"], json!([]), "nothing was created: {v}");
    // A saga cannot be prepared; a prepared TCC cannot be prepared as something else.
    assert_eq!(post(&c, "/prepare", &json!({"gid": "p1", "trans_type": "tcc"})).await.0, StatusCode::OK);
    assert_eq!(post(&c, "/prepare", &json!({"gid": "p1", "trans_type": "tcc"})).await.0, StatusCode::OK, "idempotent");
    assert_eq!(post(&c, "/submit", &saga("p1", &base, &[("/a", "/b")], json!({}))).await.0, StatusCode::OK, "submits the prepared TCC");
    assert_eq!(post(&c, "/abort", &json!({"gid": "p1", "trans_type": "tcc"})).await.0, StatusCode::CONFLICT);
    assert_eq!(post(&c, "/forceStop", &json!({"gid": "nope"})).await.0, StatusCode::CONFLICT);

    // discovery://inv/... goes to a serving instance of "inv".
    let api = client(&s, None);
    let inst = json!({"address": "127.0.0.1", "port": addr.port()}).to_string();
    let (st, _, v) = call(&api, Method::POST, "/api/v1/services/inv/instances", Some(&inst)).await;
    assert!(st.is_success(), "{v}");
    let body = saga("disc-1", "discovery://inv", &[("/reserve", "/release")], json!({}));
    assert_eq!(post(&c, "/submit", &body).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "disc-1").await["transaction"]["status"], "succeed");
    assert_eq!(b.of("disc-1"), ["/reserve action"]);
    // No instance: a temporary failure, retried (the saga stays submitted).
    let body = saga("disc-2", "discovery://nobody", &[("/reserve", "/release")], json!({"retry_interval": 1}));
    assert_eq!(post(&c, "/submit", &body).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, q) = call(&c, Method::GET, "/query?gid=disc-2", None).await;
    assert_eq!(q["transaction"]["status"], "submitted", "{q}");
    assert!(q["branches"][1]["error"].as_str().unwrap().contains("no serving instance"), "{q}");

    // The CLI: list by status, show one with its branches, force-stop the stuck one.
    let zhili = |args: &[&str]| {
        let out = std::process::Command::new(bin()).args(args).env("ZHILI_ADDR", format!("http://{}", s.api)).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, out, err) = zhili(&["txn", "list", "--status", "submitted", "-o", "json"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().iter().map(|t| t["gid"].as_str().unwrap()).collect::<Vec<_>>(), ["disc-2"], "{listed}");
    let (ok, out, err) = zhili(&["txn", "show", "disc-1", "-o", "json"]);
    assert!(ok, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((shown["transaction"]["status"].as_str(), shown["branches"].as_array().map(Vec::len)), (Some("succeed"), Some(2)), "{shown}");
    let (ok, _, err) = zhili(&["txn", "force-stop", "disc-2"]);
    assert!(ok, "{err}");
    assert_eq!(final_status(&c, "disc-2").await["transaction"]["status"], "failed");
    let (ok, _, err) = zhili(&["txn", "force-stop", "disc-2"]);
    assert!(!ok && err.contains("409"), "a finished one cannot be stopped: {err}");
    let (ok, _, err) = zhili(&["txn", "show", "nope"]);
    assert!(!ok && err.contains("404"), "{err}");
}

/// SIGKILL in the middle of 100 concurrent sagas (half of them failing at their second step):
/// after a restart every saga ends succeeded or fully compensated; no forward step runs after
/// its saga failed, no compensation is skipped.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_100_sagas_then_all_finish_consistently() {
    let (addr, b) = branch_server().await;
    let base = format!("http://{addr}");
    // Slow branches, so the kill lands with sagas in flight.
    for i in 0..100 {
        b.script(&format!("/s{i}/a1"), &[Answer(200, 300)]);
        // A branch answers the same when asked again (a retry after the restart).
        b.script(&format!("/s{i}/a2"), &[Answer(if i % 2 == 0 { 200 } else { 409 }, 300); 3]);
    }
    let mut s = dev_server();
    let c = dtm(&s);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let c = c.clone();
        let body = saga(&format!("k-{i}"), &format!("{base}/s{i}"), &[("/a1", "/c1"), ("/a2", "/c2"), ("/a3", "/c3")], json!({"retry_interval": 1}));
        tasks.push(tokio::spawn(async move { post(&c, "/submit", &body).await.0 }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.restart_after_kill9();
    let c = dtm(&s);
    for i in 0..100 {
        let gid = format!("k-{i}");
        let q = final_status(&c, &gid).await;
        let calls = b.of(&gid);
        let p = |x: &str| format!("/s{i}{x}");
        if i % 2 == 0 {
            assert_eq!(q["transaction"]["status"], "succeed", "{gid}: {q}");
            assert!(calls.contains(&format!("{} action", p("/a3"))), "{gid}: {calls:?}");
            assert!(!calls.iter().any(|c| c.ends_with("compensate")), "{gid}: {calls:?}");
        } else {
            assert_eq!(q["transaction"]["status"], "failed", "{gid}: {q}");
            assert!(!calls.contains(&format!("{} action", p("/a3"))), "no forward step after the failure: {gid}: {calls:?}");
            let c2 = calls.iter().position(|c| *c == format!("{} compensate", p("/c2"))).expect("c2 compensated");
            let c1 = calls.iter().position(|c| *c == format!("{} compensate", p("/c1"))).expect("c1 compensated");
            assert!(c2 < c1, "in reverse: {gid}: {calls:?}");
            assert!(!calls.contains(&format!("{} compensate", p("/c3"))), "never attempted, never compensated: {calls:?}");
        }
    }
}

/// DTM's own Python SDK (PyPI dtmcli) drives saga, TCC and a 2-phase message against Zhili.
#[tokio::test(flavor = "multi_thread")]
async fn dtmcli_python_saga_tcc_and_message() {
    let s = dev_server();
    let url = format!("http://{}/api/dtmsvr", s.dtm.expect("dtm listener"));
    let out = tokio::task::spawn_blocking(move || run_interop("dtm_scenario.py", &[&url], Duration::from_secs(120))).await.unwrap();
    assert!(out.contains("dtm scenario passed"), "{out}");
}

/// With ACLs on, the DTM listener answers with the rights of the caller's token (Bearer or
/// X-Zhili-Token), else the anonymous token's: `transaction` rules by gid prefix.
#[tokio::test(flavor = "multi_thread")]
async fn a_narrow_token_reaches_only_its_own_transactions() {
    let s = ServerProcess::start(bin(), &[]);
    let root = bootstrap(&s).await;
    let admin = client(&s, Some(&root));
    let policy = json!({"name": "orders-txn", "rules": [{"resource": "transaction", "prefix": "order-", "access": "write"}]});
    let (st, _, v) = call(&admin, Method::POST, "/api/v1/acl/policies", Some(&policy.to_string())).await;
    assert!(st.is_success(), "{v}");
    let (_, _, t) = call(&admin, Method::POST, "/api/v1/acl/tokens", Some(r#"{"policies": ["orders-txn"]}"#)).await;
    let url = format!("http://{}/api/dtmsvr", s.dtm.unwrap());
    let orders = zhili_client::Client::new(&url, Some(t["secret_id"].as_str().unwrap().to_string())).unwrap();
    let anonymous = zhili_client::Client::new(&url, None).unwrap();
    let root_dtm = zhili_client::Client::new(&url, Some(root.clone())).unwrap();
    let (addr, b) = branch_server().await;
    let base = format!("http://{addr}");

    assert_eq!(call(&anonymous, Method::GET, "/newGid", None).await.0, StatusCode::OK, "a gid costs nothing");
    assert_eq!(post(&anonymous, "/submit", &saga("order-1", &base, &[("/a", "/b")], json!({}))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(post(&orders, "/submit", &saga("pay-1", &base, &[("/a", "/b")], json!({}))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(post(&root_dtm, "/submit", &saga("pay-1", &base, &[("/p", "/q")], json!({}))).await.0, StatusCode::OK);
    let (st, v) = post(&orders, "/submit", &saga("order-1", &base, &[("/a", "/b")], json!({}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(final_status(&orders, "order-1").await["transaction"]["status"], "succeed");
    // Another's transaction: not readable, not stoppable, not in listings.
    assert_eq!(call(&orders, Method::GET, "/query?gid=pay-1", None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(post(&orders, "/forceStop", &json!({"gid": "pay-1"})).await.0, StatusCode::FORBIDDEN);
    let (_, _, all) = call(&orders, Method::GET, "/all", None).await;
    let gids: Vec<&str> = all["transactions"].as_array().unwrap().iter().map(|t| t["gid"].as_str().unwrap()).collect();
    assert_eq!(gids, ["order-1"]);
    // Topics serve every transaction: they need rights on all of them.
    assert_eq!(call(&orders, Method::GET, &format!("/subscribe?topic=t&url={base}/x"), None).await.0, StatusCode::FORBIDDEN);
    // A branch registered under someone else's gid is refused too.
    let reg = json!({"gid": "pay-2", "branch_id": "01", "trans_type": "tcc", "confirm": format!("{base}/c"), "cancel": format!("{base}/x")});
    assert_eq!(post(&orders, "/registerBranch", &reg).await.0, StatusCode::FORBIDDEN);
    let bogus = zhili_client::Client::new(&url, Some("not-a-token".into())).unwrap();
    assert_eq!(call(&bogus, Method::GET, "/query?gid=order-1", None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(b.of("order-1"), ["/a action"]);
}

/// Discovery-aware branches: a temporary failure is retried on another instance, and an
/// instance in maintenance gets no calls.
#[tokio::test(flavor = "multi_thread")]
async fn discovery_branches_retry_elsewhere_and_skip_maintenance() {
    let s = dev_server();
    let c = dtm(&s);
    let api = client(&s, None);
    let (bad_addr, bad) = branch_server().await;
    let (good_addr, good) = branch_server().await;
    let (idle_addr, idle) = branch_server().await;
    bad.script("/reserve", &[Answer(503, 0); 20]);
    let mut ids = HashMap::new();
    for (name, addr) in [("bad", bad_addr), ("good", good_addr), ("idle", idle_addr)] {
        let inst = json!({"address": "127.0.0.1", "port": addr.port()}).to_string();
        let (st, _, v) = call(&api, Method::POST, "/api/v1/services/stock/instances", Some(&inst)).await;
        assert!(st.is_success(), "{v}");
        ids.insert(name, v["id"].as_str().unwrap().to_string());
    }
    let (st, _, v) =
        call(&api, Method::PUT, &format!("/api/v1/services/stock/instances/{}/maintenance", ids["idle"]), Some(r#"{"enabled": true, "reason": "drain"}"#))
            .await;
    assert!(st.is_success(), "{v}");
    for i in 0..6 {
        let gid = format!("d-{i}");
        let body = saga(&gid, "discovery://stock", &[("/reserve", "/release")], json!({"retry_interval": 1}));
        assert_eq!(post(&c, "/submit", &body).await.0, StatusCode::OK);
        assert_eq!(final_status(&c, &gid).await["transaction"]["status"], "succeed", "{gid}");
        // Served by the good instance; the failing one was tried at most once per saga.
        assert_eq!(good.of(&gid), ["/reserve action"], "{gid}");
        assert!(bad.of(&gid).len() <= 1, "{gid}: {:?}", bad.of(&gid));
    }
    assert!(!bad.calls.lock().unwrap().is_empty(), "round robin reached the failing instance at least once");
    assert!(idle.calls.lock().unwrap().is_empty(), "no calls to an instance in maintenance");
}

/// A transaction failing again and again raises an alert: an `io.zhili.txn.alert` event and a
/// POST in DTM's shape to `--txn-alert-webhook`.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_failures_raise_an_alert() {
    let (addr, b) = branch_server().await;
    let base = format!("http://{addr}");
    let hook = format!("{base}/alert");
    let s = ServerProcess::start(bin(), &["--dev", "--txn-alert-webhook", &hook]);
    let c = dtm(&s);
    b.script("/broken", &[Answer(503, 0); 50]);
    assert_eq!(post(&c, "/submit", &saga("alarm-1", &base, &[("/broken", "/undo")], json!({"retry_interval": 1}))).await.0, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let alert = loop {
        let found = b.calls.lock().unwrap().iter().find(|c| c.1 == "/alert").cloned();
        if let Some(a) = found {
            break a;
        }
        assert!(tokio::time::Instant::now() < deadline, "no alert: {:?}", b.of("alarm-1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let body: Value = serde_json::from_str(&alert.4).unwrap();
    assert_eq!((body["gid"].as_str(), body["retry_count"].as_u64()), (Some("alarm-1"), Some(3)), "{body}");
    assert!(body["branch"].as_str().unwrap().ends_with("/broken") && body["error"].as_str().unwrap().contains("503"), "{body}");
    assert_eq!(b.of("alarm-1").iter().filter(|c| c.starts_with("/broken")).count(), 3);
    let api = client(&s, None);
    let (_, _, v) = call(&api, Method::GET, "/api/v1/streams/$txn?limit=1000", None).await;
    assert!(v["events"].as_array().unwrap().iter().any(|e| e["event"]["type"] == "io.zhili.txn.alert" && e["event"]["subject"] == "alarm-1"), "{v}");
    assert_eq!(post(&c, "/forceStop", &json!({"gid": "alarm-1"})).await.0, StatusCode::OK);
}

/// `--txn-retention`: a finished transaction is removed once it is older than the retention
/// (query answers null, `all` no longer lists it), an unfinished one stays, and the removal
/// survives a restart. A message's `delay` (DTM's `custom_data`) holds its steps back.
#[tokio::test(flavor = "multi_thread")]
async fn finished_transactions_expire_and_delayed_messages_wait() {
    let (addr, b) = branch_server().await;
    let base = format!("http://{addr}");
    let mut s = ServerProcess::start(bin(), &["--dev", "--txn-retention", "3s"]);
    let c = dtm(&s);
    assert_eq!(post(&c, "/submit", &saga("old-1", &base, &[("/a", "/undo")], json!({}))).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "old-1").await["transaction"]["status"], "succeed", "kept until the retention passes");
    // Prepared with a long timeout: unfinished, so never expired.
    let open = json!({"gid": "open-1", "trans_type": "msg", "query_prepared": format!("{base}/qp"), "timeout_to_fail": 600});
    assert_eq!(post(&c, "/prepare", &open).await.0, StatusCode::OK);

    let submitted = std::time::Instant::now();
    let delayed = json!({"gid": "late-1", "trans_type": "msg", "steps": [{"action": format!("{base}/late")}], "payloads": ["{}"],
        "custom_data": "{\"delay\":2}"});
    assert_eq!(post(&c, "/submit", &delayed).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(b.of("late-1").is_empty(), "a message delayed by 2 s ran after 1.2 s");
    assert_eq!(final_status(&c, "late-1").await["transaction"]["status"], "succeed");
    assert!(submitted.elapsed() >= Duration::from_secs(2), "{:?}", submitted.elapsed());
    assert_eq!(b.of("late-1"), ["/late action"]);

    assert_eventually(Duration::from_secs(15), "old-1 removed after 3 s", || async {
        let (_, _, q) = call(&c, Method::GET, "/query?gid=old-1", None).await;
        q["transaction"].is_null()
    })
    .await;
    let (_, _, all) = call(&c, Method::GET, "/all?limit=100", None).await;
    let gids: Vec<&str> = all["transactions"].as_array().unwrap().iter().map(|t| t["gid"].as_str().unwrap()).collect();
    assert!(!gids.contains(&"old-1") && gids.contains(&"open-1"), "{all}");
    // The same gid can start again once its old record is gone.
    assert_eq!(post(&c, "/submit", &saga("old-1", &base, &[("/a", "/undo")], json!({}))).await.0, StatusCode::OK);
    assert_eq!(final_status(&c, "old-1").await["transaction"]["status"], "succeed");
    s.restart_after_kill9();
    let c = dtm(&s);
    let (_, _, q) = call(&c, Method::GET, "/query?gid=open-1", None).await;
    assert_eq!(q["transaction"]["status"], "prepared", "{q}");
    assert_eventually(Duration::from_secs(15), "late-1 removed after the restart", || async {
        let (_, _, q) = call(&c, Method::GET, "/query?gid=late-1", None).await;
        q["transaction"].is_null()
    })
    .await;
}

//! The event store through the binary: appends with expected revisions and idempotent ids,
//! CloudEvents in structured, batch and binary mode, reads of a stream, `$all` and a category,
//! SSE subscriptions (catch-up, live, Last-Event-ID), soft delete, `$registry`, stream ACLs,
//! and acknowledged appends surviving kill -9.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "order.paid", "subject": "17", "myext": "kept", "data": {"n": id}})
}

async fn post(c: &zhili_client::Client, path: &str, body: &Value) -> (StatusCode, Value) {
    let (st, _, v) = call(c, Method::POST, path, Some(&body.to_string())).await;
    (st, v)
}

/// One HTTP/1.1 request on its own connection, for what the SDK does not send (custom
/// content types, ce-* headers); returns the status and body.
async fn raw(s: &ServerProcess, head: &str, body: &[u8]) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(s.api).await.unwrap();
    let req = format!("{head}\r\nHost: zhili\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    conn.write_all(req.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn ids(v: &Value) -> Vec<String> {
    v["events"].as_array().unwrap().iter().map(|e| e["event"]["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn append_read_and_expected_revisions() {
    let s = dev_server();
    let c = client(&s, None);
    let (st, a) = post(&c, "/api/v1/streams/order-17?expected_revision=no_stream", &event("e1")).await;
    assert_eq!(st, StatusCode::CREATED, "{a}");
    assert_eq!((a["revision"].as_u64(), a["position"].as_u64()), (Some(0), Some(0)));
    // A wrong expected revision: 409 with the actual one, nothing written.
    let (st, v) = post(&c, "/api/v1/streams/order-17?expected_revision=5", &event("e2")).await;
    assert_eq!((st, v["actual_revision"].as_u64()), (StatusCode::CONFLICT, Some(0)), "{v}");
    let (st, v) = post(&c, "/api/v1/streams/order-new?expected_revision=exists", &event("e2")).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert!(v["actual_revision"].is_null(), "{v}");
    // The same id again: the original answer, nothing written.
    let (st, again) = post(&c, "/api/v1/streams/order-17?expected_revision=no_stream", &event("e1")).await;
    assert_eq!((st, &again), (StatusCode::CREATED, &a));
    // A batch is all or nothing: one bad event and none is appended.
    let mut bad = event("e3");
    bad["time"] = json!("noon");
    expect_problem(&c, Method::POST, "/api/v1/streams/order-17", Some(&json!([event("e2"), bad]).to_string()), StatusCode::BAD_REQUEST, "events[1].time").await;
    let (st, b) = post(&c, "/api/v1/streams/order-17?expected_revision=0", &json!([event("e2"), event("e3")])).await;
    assert_eq!((st, b["revision"].as_u64(), b["last_revision"].as_u64()), (StatusCode::CREATED, Some(1), Some(2)), "{b}");
    for (body, field) in [
        (json!({"specversion": "1.0", "id": "x", "type": "t"}), "event.source"),
        (json!({"specversion": "2.0", "id": "x", "source": "/", "type": "t"}), "event.specversion"),
        (json!([event("d"), event("d")]), "events[1].id"),
        (json!([]), "body"),
        (json!({"specversion": "1.0", "id": "x", "source": "/", "type": "t", "Bad": 1}), "event.Bad"),
    ] {
        expect_problem(&c, Method::POST, "/api/v1/streams/order-17", Some(&body.to_string()), StatusCode::BAD_REQUEST, field).await;
    }
    expect_problem(
        &c,
        Method::POST,
        "/api/v1/streams/order-17?expected_revision=soon",
        Some(&event("z").to_string()),
        StatusCode::BAD_REQUEST,
        "expected_revision",
    )
    .await;
    expect_problem(&c, Method::POST, "/api/v1/streams/$registry", Some(&event("z").to_string()), StatusCode::BAD_REQUEST, "stream").await;
    expect_problem(&c, Method::POST, "/api/v1/streams/a%2Fb", Some(&event("z").to_string()), StatusCode::BAD_REQUEST, "stream").await;

    // Reads: forwards, backwards, paging; the CloudEvent comes back with every attribute.
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/order-17", None).await;
    assert_eq!(ids(&v), ["e1", "e2", "e3"]);
    assert_eq!(v["events"][0]["event"], event("e1"), "attributes and extensions kept");
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/order-17?direction=backwards&limit=2", None).await;
    assert_eq!((ids(&v), v["next"].as_u64()), (vec!["e3".to_string(), "e2".into()], Some(0)));
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/order-17?from=1&limit=1", None).await;
    assert_eq!((ids(&v), v["next"].as_u64()), (vec!["e2".to_string()], Some(2)));

    // Binary mode, into another stream of the same category.
    let (st, binary) = raw(&s, "POST /api/v1/streams/order-18 HTTP/1.1\r\nce-specversion: 1.0\r\nce-id: b1\r\nce-source: /pos\r\nce-type: order.placed\r\nce-traceparent: 00-abc\r\ncontent-type: application/json", br#"{"total": 12}"#).await;
    assert_eq!(st, 201, "{binary}");
    let b1_position = serde_json::from_str::<Value>(&binary).unwrap()["position"].as_u64().unwrap();
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/order-18", None).await;
    let e = &v["events"][0]["event"];
    assert_eq!((e["data"]["total"].as_u64(), e["traceparent"].as_str(), e["datacontenttype"].as_str()), (Some(12), Some("00-abc"), Some("application/json")));
    let (st, _) =
        raw(&s, "POST /api/v1/streams/order-18 HTTP/1.1\r\ncontent-type: application/cloudevents-batch+json", event("q").to_string().as_bytes()).await;
    assert_eq!(st, 400, "a batch must be an array");
    let (st, _) = raw(&s, "POST /api/v1/streams/order-18 HTTP/1.1\r\ncontent-type: text/plain", b"hi").await;
    assert_eq!(st, 400);

    // $ce-order reads both streams in append order; $all has everything with positions.
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/$ce-order", None).await;
    assert_eq!(ids(&v), ["e1", "e2", "e3", "b1"]);
    // ($audit records of these writes are in $all too.)
    let (_, _, v) = call(&c, Method::GET, &format!("/api/v1/streams/$all?from={b1_position}&limit=1"), None).await;
    assert_eq!((v["events"][0]["event"]["id"].as_str(), v["events"][0]["stream"].as_str()), (Some("b1"), Some("order-18")));
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams?prefix=order-", None).await;
    let names: Vec<&str> = v["streams"].as_array().unwrap().iter().map(|s| s["stream"].as_str().unwrap()).collect();
    assert_eq!(names, ["order-17", "order-18"]);

    // Soft delete: 404 until appended to again, which continues the revisions.
    let (st, _, _) = call(&c, Method::DELETE, "/api/v1/streams/order-18", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _, _) = call(&c, Method::GET, "/api/v1/streams/order-18", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = post(&c, "/api/v1/streams/order-18?expected_revision=no_stream", &event("b2")).await;
    assert_eq!((st, v["revision"].as_u64()), (StatusCode::CREATED, Some(1)), "{v}");
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/order-18", None).await;
    assert_eq!(ids(&v), ["b2"]);
    let (st, _, _) = call(&c, Method::GET, "/api/v1/streams/never", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Retention: reads honour it at once.
    for i in 0..5 {
        post(&c, "/api/v1/streams/ret-1", &event(&format!("r{i}"))).await;
    }
    let (st, _, m) = call(&c, Method::PUT, "/api/v1/streams/ret-1/metadata", Some(r#"{"max_count": 2, "max_age": "7d"}"#)).await;
    assert_eq!((st, m["max_count"].as_u64(), m["max_age"].as_str()), (StatusCode::OK, Some(2), Some("168h")), "{m}");
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/ret-1", None).await;
    assert_eq!(ids(&v), ["r3", "r4"]);
    let (_, _, v) = call(&c, Method::PUT, "/api/v1/streams/ret-1/metadata", Some(r#"{"truncate_before": 4}"#)).await;
    assert_eq!(v["max_count"], Value::Null, "a PUT replaces the limits: {v}");
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/ret-1", None).await;
    assert_eq!(ids(&v), ["r4"]);
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/ret-1/metadata", None).await;
    assert_eq!((v["truncate_before"].as_u64(), v["last_revision"].as_u64()), (Some(4), Some(4)));
    expect_problem(&c, Method::PUT, "/api/v1/streams/ret-1/metadata", Some(r#"{"max_count": 0}"#), StatusCode::BAD_REQUEST, "max_count").await;
    expect_problem(&c, Method::PUT, "/api/v1/streams/ret-1/metadata", Some(r#"{"max_age": "soon"}"#), StatusCode::BAD_REQUEST, "max_age").await;
    expect_problem(&c, Method::PUT, "/api/v1/streams/ret-1/metadata", Some(r#"{"keep": 1}"#), StatusCode::BAD_REQUEST, "keep").await;
    let (st, _, _) = call(&c, Method::PUT, "/api/v1/streams/nope/metadata", Some("{}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Reads SSE messages until `n` events arrived; returns their (id, CloudEvent id). Zhili's own
/// `$audit` records (of the test's writes) are passed over.
async fn sse(s: &ServerProcess, path: &str, last_event_id: Option<u64>, n: usize, during: impl std::future::Future<Output = ()>) -> Vec<(u64, String)> {
    let mut conn = tokio::net::TcpStream::connect(s.api).await.unwrap();
    let resume = last_event_id.map(|i| format!("Last-Event-ID: {i}\r\n")).unwrap_or_default();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: zhili\r\nAccept: text/event-stream\r\n{resume}\r\n").as_bytes()).await.unwrap();
    let reader = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let got: Vec<(u64, String)> = text
                .split("\n\n")
                .filter_map(|m| {
                    let id = m.lines().find_map(|l| l.strip_prefix("id: "))?.parse().ok()?;
                    let data: Value = serde_json::from_str(m.lines().find_map(|l| l.strip_prefix("data: "))?).ok()?;
                    Some((id, data["id"].as_str()?.to_string()))
                })
                .filter(|(_, e)| !e.starts_with("audit-"))
                .collect();
            if got.len() >= n {
                return got;
            }
            let k = conn.read(&mut chunk).await.unwrap();
            assert!(k > 0, "stream ended early: {text}");
            buf.extend_from_slice(&chunk[..k]);
        }
    };
    let (got, ()) = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(reader, during) }).await.expect("subscription delivered in time");
    got
}

#[tokio::test]
async fn subscriptions_catch_up_then_follow_and_resume() {
    let s = dev_server();
    let c = client(&s, None);
    for i in 0..3 {
        post(&c, "/api/v1/streams/cart-1", &event(&format!("c{i}"))).await;
    }
    // Catch-up (3 stored) then live (2 appended while subscribed).
    let live = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        post(&c, "/api/v1/streams/other", &event("o1")).await;
        post(&c, "/api/v1/streams/cart-1", &json!([event("c3"), event("c4")])).await;
    };
    let got = sse(&s, "/api/v1/streams/cart-1/subscribe?from=0", None, 5, live).await;
    assert_eq!(got.iter().map(|(i, e)| (*i, e.as_str())).collect::<Vec<_>>(), [(0, "c0"), (1, "c1"), (2, "c2"), (3, "c3"), (4, "c4")]);
    // Last-Event-ID resumes after the given revision.
    let got = sse(&s, "/api/v1/streams/cart-1/subscribe", Some(2), 2, async {}).await;
    assert_eq!(got.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(), ["c3", "c4"]);
    // $all by position (skipping the $audit records of these writes).
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/other", None).await;
    let o1 = v["events"][0]["position"].as_u64().unwrap();
    let got = sse(&s, &format!("/api/v1/streams/$all/subscribe?from={o1}"), None, 3, async {}).await;
    let mine: Vec<(u64, &str)> = got.iter().map(|(i, e)| (*i, e.as_str())).take(3).collect();
    assert_eq!(mine.iter().map(|(_, e)| *e).collect::<Vec<_>>(), ["o1", "c3", "c4"]);
    assert!(mine[0].0 == o1 && mine.windows(2).all(|w| w[0].0 < w[1].0), "by position: {mine:?}");
}

#[tokio::test]
async fn registry_changes_are_events_and_system_streams_need_their_own_grant() {
    let s = ServerProcess::start(bin(), &[]);
    let root = bootstrap(&s).await;
    let admin = client(&s, Some(&root));
    let rules = |name: &str, rules: Value| json!({"name": name, "rules": rules}).to_string();
    for (name, body) in [
        ("streams-all", rules("streams-all", json!([{"resource": "stream", "prefix": "", "access": "write"}]))),
        ("registry-feed", rules("registry-feed", json!([{"resource": "stream", "prefix": "$registry", "access": "read"}]))),
    ] {
        let (st, _, v) = call(&admin, Method::POST, "/api/v1/acl/policies", Some(&body)).await;
        assert!(st.is_success(), "{name}: {v}");
    }
    let token = |policy: &'static str| {
        let admin = admin.clone();
        let policy = policy.to_string();
        async move {
            let (_, _, v) = call(&admin, Method::POST, "/api/v1/acl/tokens", Some(&json!({"policies": [policy]}).to_string())).await;
            v["secret_id"].as_str().unwrap().to_string()
        }
    };
    let (_, _, created) = call(&admin, Method::POST, "/api/v1/acl/tokens", Some(&json!({"policies": ["streams-all"]}).to_string())).await;
    let writer_accessor = created["accessor_id"].as_str().unwrap().to_string();
    let writer = client(&s, Some(created["secret_id"].as_str().unwrap()));
    let feed = client(&s, Some(&token("registry-feed").await));
    let (st, _) = post(&writer, "/api/v1/streams/order-1", &event("a")).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = post(&client(&s, None), "/api/v1/streams/order-1", &event("b")).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "anonymous may not append");
    let (st, _) = post(&feed, "/api/v1/streams/order-1", &event("b")).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "a read grant on $registry does not write other streams");

    let (st, _, _) = call(&admin, Method::POST, "/api/v1/services/web/instances", Some(r#"{"address":"10.0.0.1","port":80}"#)).await;
    assert_eq!(st, StatusCode::CREATED);
    let registered = Arc::new(Mutex::new(Value::Null));
    assert_eventually(Duration::from_secs(10), "the registration reaches $registry", || {
        let feed = feed.clone();
        let found = registered.clone();
        async move {
            let (st, _, v) = call(&feed, Method::GET, "/api/v1/streams/$registry", None).await;
            // 404 until the publisher's first append lands.
            assert!(st == StatusCode::OK || st == StatusCode::NOT_FOUND, "{v}");
            let hit = v["events"].as_array().into_iter().flatten().find(|e| e["event"]["type"] == "io.zhili.registry.instance.registered").cloned();
            let ok = hit.is_some();
            *found.lock().unwrap() = hit.unwrap_or(Value::Null);
            ok
        }
    })
    .await;
    let registered = registered.lock().unwrap().clone();
    let e = &registered["event"];
    assert_eq!(
        (e["subject"].as_str(), e["source"].as_str(), e["data"]["service"].as_str()),
        (Some("default/web/10.0.0.1:80"), Some("zhili://zhili/registry"), Some("web"))
    );
    assert!(zhili_model::event::cloudevent("event", e).is_ok(), "a valid CloudEvent: {e}");
    // A grant on every name does not reach system streams; $all is a system stream too.
    for path in ["/api/v1/streams/$registry", "/api/v1/streams/$all", "/api/v1/streams/$registry/subscribe"] {
        let (st, _, _) = call(&writer, Method::GET, path, None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path}");
    }
    let (st, _, _) = call(&feed, Method::GET, "/api/v1/streams/order-1", None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (_, _, v) = call(&writer, Method::GET, "/api/v1/streams", None).await;
    let names: Vec<&str> = v["streams"].as_array().unwrap().iter().map(|s| s["stream"].as_str().unwrap()).collect();
    assert_eq!(names, ["order-1"], "listings show only readable streams");

    // Subscriptions as a narrowly scoped caller: subscription rights by name, and following a
    // stream needs read on it (a system stream needs a `$` grant of its own).
    let body = rules(
        "team-subs",
        json!([{"resource": "subscription", "prefix": "team-", "access": "write"}, {"resource": "stream", "prefix": "order-", "access": "read"}]),
    );
    let (st, _, v) = call(&admin, Method::POST, "/api/v1/acl/policies", Some(&body)).await;
    assert!(st.is_success(), "{v}");
    let team = client(&s, Some(&token("team-subs").await));
    for (who, name, spec, want) in [
        (&writer, "team-a", json!({"stream": "order-1"}), StatusCode::FORBIDDEN),
        (&team, "team-a", json!({"stream": "$registry"}), StatusCode::FORBIDDEN),
        (&team, "team-a", json!({"stream": "$all"}), StatusCode::FORBIDDEN),
        (&team, "other", json!({"stream": "order-1"}), StatusCode::FORBIDDEN),
        (&team, "team-a", json!({"stream": "order-1"}), StatusCode::CREATED),
    ] {
        let (st, _, v) = call(who, Method::PUT, &format!("/api/v1/subscriptions/{name}"), Some(&spec.to_string())).await;
        assert_eq!(st, want, "{name} {spec}: {v}");
    }
    let (st, _, v) = call(&team, Method::GET, "/api/v1/subscriptions/team-a/next?max=10", None).await;
    assert_eq!((st, v["events"][0]["event"]["id"].as_str()), (StatusCode::OK, Some("a")), "{v}");
    // Rights on the subscription alone do not read the stream it follows: checked on every pull.
    let body = rules("subs-only", json!([{"resource": "subscription", "prefix": "team-", "access": "write"}]));
    let (st, _, v) = call(&admin, Method::POST, "/api/v1/acl/policies", Some(&body)).await;
    assert!(st.is_success(), "{v}");
    let subs_only = client(&s, Some(&token("subs-only").await));
    let (st, _, v) = call(&subs_only, Method::GET, "/api/v1/subscriptions/team-a/next?max=10", None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    for path in ["/api/v1/subscriptions/team-a/next", "/api/v1/subscriptions/team-a"] {
        let (st, _, _) = call(&writer, Method::GET, path, None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path} without subscription rights");
    }
    let (st, _, _) = call(&writer, Method::POST, "/api/v1/subscriptions/team-a/ack", Some(r#"{"ack_ids": ["team-a:0"]}"#)).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (_, _, v) = call(&writer, Method::GET, "/api/v1/subscriptions", None).await;
    assert_eq!(v["subscriptions"], json!([]), "listings show only readable subscriptions");
    // The streaming append is a write like any other.
    let (st, _, _) = call(&feed, Method::POST, "/api/v1/streams/order-1/publish", Some(&event("p").to_string())).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, _) = call(&writer, Method::POST, "/api/v1/streams/$registry/publish", Some(&event("p").to_string())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "system streams take no client appends");

    // $audit: every successful write, with the caller's accessor id and no query string; the
    // event data traffic (appends, acks) is not audited, the events being their own record.
    let (st, _, _) = call(&writer, Method::POST, "/api/v1/streams/order-1?expected_revision=any&token=not-logged", Some(&event("c").to_string())).await;
    assert_eq!(st, StatusCode::CREATED);
    for limit in [r#"{"max_count": 1000}"#, r#"{"max_count": 2000}"#] {
        let (st, _, _) = call(&writer, Method::PUT, "/api/v1/streams/order-1/metadata?token=not-logged", Some(limit)).await;
        assert_eq!(st, StatusCode::OK);
    }
    let audit = Arc::new(Mutex::new(Value::Null));
    assert_eventually(Duration::from_secs(10), "the writes reach $audit", || {
        let admin = admin.clone();
        let audit = audit.clone();
        let writer_accessor = writer_accessor.clone();
        async move {
            let (st, _, v) = call(&admin, Method::GET, "/api/v1/streams/$audit?limit=1000", None).await;
            *audit.lock().unwrap() = v.clone();
            st == StatusCode::OK && v["events"].as_array().unwrap().iter().filter(|e| e["event"]["data"]["accessor"] == writer_accessor.as_str()).count() >= 2
        }
    })
    .await;
    let audit = audit.lock().unwrap().clone();
    let records: Vec<&Value> = audit["events"].as_array().unwrap().iter().map(|e| &e["event"]["data"]).collect();
    let mine: Vec<&&Value> = records.iter().filter(|r| r["accessor"] == writer_accessor.as_str()).collect();
    assert!(mine.iter().all(|r| r["path"] == "/api/v1/streams/order-1/metadata" && r["method"] == "PUT" && r["status"] == 200), "{mine:?}");
    assert!(records.iter().any(|r| r["path"] == "/api/v1/services/web/instances" && r["accessor"].is_string()), "the admin's registration");
    assert!(records.iter().all(|r| r["method"] != "GET"), "reads are not audited");
    assert!(!audit.to_string().contains("not-logged") && !audit.to_string().contains(&root), "no query strings, no secrets");
}

/// Per stream, the events acknowledged: (revision, id).
type Acked = HashMap<String, Vec<(u64, String)>>;

#[tokio::test]
async fn acknowledged_appends_survive_kill_9_exactly_once_in_order() {
    let mut s = dev_server();
    let c = client(&s, None);
    // A consumer group in flight too: 10,000 events, one consumer pulling 50 and acking each
    // pull, paced so that it is still at work when the kill comes.
    const GROUP_EVENTS: usize = 10_000;
    for start in (0..GROUP_EVENTS).step_by(500) {
        let batch: Vec<Value> = (start..start + 500).map(|i| event(&format!("g{i}"))).collect();
        assert_eq!(post(&c, "/api/v1/streams/jobs-crash", &json!(batch)).await.0, StatusCode::CREATED);
    }
    let (st, _, v) = call(&c, Method::PUT, "/api/v1/subscriptions/crash-group", Some(r#"{"stream": "jobs-crash"}"#)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let group_acked: Arc<Mutex<Vec<String>>> = Arc::default();
    // An ack the kill cut off may or may not have been applied: its events may stay done.
    let ack_unanswered: Arc<Mutex<Vec<String>>> = Arc::default();
    let consumer = {
        let (c, group_acked, ack_unanswered) = (c.clone(), group_acked.clone(), ack_unanswered.clone());
        tokio::spawn(async move {
            loop {
                let Ok(r) = c.send(Method::GET, "/api/v1/subscriptions/crash-group/next?max=50", None, Duration::from_secs(10)).await else { return };
                let Ok(v) = serde_json::from_slice::<Value>(&r.body) else { return };
                let got: Vec<(String, String)> = v["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| (e["ack_id"].as_str().unwrap().to_string(), e["event"]["id"].as_str().unwrap().to_string()))
                    .collect();
                if got.is_empty() {
                    return;
                }
                let body = json!({"ack_ids": got.iter().map(|g| &g.0).collect::<Vec<_>>()}).to_string();
                let r = c.send(Method::POST, "/api/v1/subscriptions/crash-group/ack", Some(body.into()), Duration::from_secs(10)).await;
                if !r.as_ref().is_ok_and(|r| r.status == StatusCode::OK) {
                    ack_unanswered.lock().unwrap().extend(got.into_iter().map(|g| g.1));
                    return;
                }
                group_acked.lock().unwrap().extend(got.into_iter().map(|g| g.1));
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let mut appenders = vec![];
    for w in 0..32 {
        let c = c.clone();
        let acked = acked.clone();
        appenders.push(tokio::spawn(async move {
            let stream = format!("crash-{}", w % 8);
            // Bounded: at most 2,000 appends each, ended early by the kill.
            for i in 0..2_000 {
                let id = format!("w{w}-{i}");
                let batch = if i % 4 == 0 { json!([event(&id), event(&format!("{id}-b"))]) } else { event(&id) };
                let r = c.send(Method::POST, &format!("/api/v1/streams/{stream}"), Some(batch.to_string().into()), Duration::from_secs(10)).await;
                let Ok(r) = r else { return };
                if r.status != StatusCode::CREATED {
                    return;
                }
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                let mut a = acked.lock().unwrap();
                let list = a.entry(stream.clone()).or_default();
                list.push((v["revision"].as_u64().unwrap(), id.clone()));
                if i % 4 == 0 {
                    list.push((v["last_revision"].as_u64().unwrap(), format!("{id}-b")));
                }
            }
        }));
    }
    assert_eventually(Duration::from_secs(30), "appends and group acks were acknowledged", || {
        let n: usize = acked.lock().unwrap().values().map(Vec::len).sum();
        let g = group_acked.lock().unwrap().len();
        async move { n >= 2_000 && g >= 100 }
    })
    .await;
    s.kill9();
    for a in appenders {
        let _ = a.await;
    }
    let _ = consumer.await;
    s.restart_after_kill9();
    let c = client(&s, None);
    // The group resumes from its last ack: everything not acknowledged comes (at least once),
    // and of what was acknowledged at most the last pulls come again.
    let group_acked: std::collections::HashSet<String> = group_acked.lock().unwrap().iter().cloned().collect();
    assert!(!group_acked.is_empty() && group_acked.len() < GROUP_EVENTS, "the kill landed mid-group: {} acked", group_acked.len());
    let mut after: Vec<String> = Vec::new();
    loop {
        let (st, _, v) = call(&c, Method::GET, "/api/v1/subscriptions/crash-group/next?max=1000", None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let page: Vec<(String, String)> = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["ack_id"].as_str().unwrap().to_string(), e["event"]["id"].as_str().unwrap().to_string()))
            .collect();
        if page.is_empty() {
            break;
        }
        let ack = json!({"ack_ids": page.iter().map(|p| &p.0).collect::<Vec<_>>()}).to_string();
        assert_eq!(call(&c, Method::POST, "/api/v1/subscriptions/crash-group/ack", Some(&ack)).await.0, StatusCode::OK);
        after.extend(page.into_iter().map(|p| p.1));
    }
    let after_set: std::collections::HashSet<&String> = after.iter().collect();
    let unanswered = ack_unanswered.lock().unwrap().clone();
    assert!(unanswered.len() <= 50, "one ack at most was cut off: {}", unanswered.len());
    for i in 0..GROUP_EVENTS {
        let id = format!("g{i}");
        assert!(group_acked.contains(&id) || after_set.contains(&id) || unanswered.contains(&id), "{id} was never acknowledged and never came back");
    }
    let again = after.iter().filter(|id| group_acked.contains(*id)).count();
    assert!(again <= 100, "{again} acknowledged events redelivered: more than the last two pulls");
    let acked = acked.lock().unwrap().clone();
    let mut total = 0;
    for (stream, list) in &acked {
        let mut stored: Vec<(u64, String)> = Vec::new();
        let mut from = 0;
        loop {
            let (st, _, v) = call(&c, Method::GET, &format!("/api/v1/streams/{stream}?from={from}&limit=4096"), None).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            stored.extend(v["events"].as_array().unwrap().iter().map(|e| (e["revision"].as_u64().unwrap(), e["event"]["id"].as_str().unwrap().to_string())));
            match v["next"].as_u64() {
                Some(n) => from = n,
                None => break,
            }
        }
        // Gapless revisions from 0, each id once.
        assert!(stored.iter().enumerate().all(|(i, (r, _))| *r == i as u64), "{stream}: revisions have gaps");
        let unique: std::collections::HashSet<&String> = stored.iter().map(|(_, id)| id).collect();
        assert_eq!(unique.len(), stored.len(), "{stream}: an event is stored twice");
        let by_revision: HashMap<u64, &String> = stored.iter().map(|(r, id)| (*r, id)).collect();
        for (rev, id) in list {
            assert_eq!(by_revision.get(rev), Some(&id), "{stream}: acknowledged {id} at revision {rev} lost");
        }
        total += list.len();
    }
    assert!(total >= 2_000);
    // $all positions are gapless too, and a new append continues after them.
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/$all?direction=backwards&limit=1", None).await;
    let last = v["events"][0]["position"].as_u64().unwrap();
    let (st, a) = post(&c, "/api/v1/streams/after-crash", &event("after")).await;
    assert_eq!((st, a["position"].as_u64()), (StatusCode::CREATED, Some(last + 1)));
}

/// The PyPI `cloudevents` SDK and `standardwebhooks` library against the binary, and a consumer
/// group of two competing consumers over 10,000 events (`tests/interop/events_clients.py`).
#[test]
fn cloudevents_sdk_standard_webhooks_and_competing_consumers() {
    let s = dev_server();
    let out = run_interop("events_clients.py", &[&format!("http://{}", s.api), "10000"], Duration::from_secs(240));
    assert!(out.contains("ok: 4 signed webhook deliveries verified; 200 through a window of 8"), "{out}");
    assert!(out.contains("10000 events"), "{out}");
}

/// The Rust SDK (append, read, catch-up + live subscription, a consumer group) and the CLI
/// (`zhili stream ...`, `zhili subscription ...`) against the binary.
#[tokio::test]
async fn sdk_and_cli() {
    use zhili_client::Expected;
    let s = dev_server();
    let c = client(&s, None);
    let a = c.append("inv-1", Expected::NoStream, &[event("i1"), event("i2")]).await.unwrap();
    assert_eq!((a.revision, a.last_revision), (0, 1));
    let err = c.append("inv-1", Expected::NoStream, &[event("i3")]).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT));
    let page = c.read_stream("inv-1", None, true, 1).await.unwrap();
    assert_eq!((page.events[0].event["id"].as_str(), page.next), (Some("i2"), Some(0)));
    // Catch-up, then live.
    let mut sub = c.subscribe("inv-1", 1);
    assert_eq!(sub.next().await.unwrap().1["id"], "i2");
    let live = tokio::spawn(async move { sub.next().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.append("inv-1", Expected::Revision(1), &[event("i3")]).await.unwrap();
    let (n, e) = tokio::time::timeout(Duration::from_secs(10), live).await.unwrap().unwrap();
    assert_eq!((n, e["id"].as_str()), (2, Some("i3")));
    // A consumer group: pull, nack one (it comes back), ack all.
    assert_eq!(c.put_subscription("inv", &json!({"stream": "inv-1"})).await.unwrap(), None, "no webhook, no secret");
    let got = c.next_events("inv", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.len(), 3);
    c.nack("inv", &[got[0].ack_id.clone()], zhili_client::NackAction::Retry).await.unwrap();
    c.ack("inv", &got[1..].iter().map(|g| g.ack_id.clone()).collect::<Vec<_>>()).await.unwrap();
    let again = c.next_events("inv", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!((again.len(), again[0].deliveries, again[0].event["id"].as_str()), (1, 2, Some("i1")));
    c.ack("inv", &[again[0].ack_id.clone()]).await.unwrap();
    assert_eq!(c.subscription("inv").await.unwrap()["checkpoint"], 3);
    // Metrics: appends, fsyncs, group sizes and the group's lag.
    let (_, r, _) = call(&c, Method::GET, "/metrics", None).await;
    let metrics = String::from_utf8_lossy(&r.body).into_owned();
    let value = |prefix: &str| metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(value("zhili_events_appended_total").is_some_and(|v| v >= 3.0), "{metrics}");
    assert!(value("zhili_event_log_fsync_seconds_count").is_some_and(|v| v >= 1.0));
    assert!(value("zhili_event_log_group_appends_count").is_some_and(|v| v >= 1.0));
    assert_eq!(value("zhili_subscription_lag{subscription=\"inv\"}"), Some(0.0));

    let zhili = |args: &[&str]| {
        let out = std::process::Command::new(bin()).args(args).env("ZHILI_ADDR", format!("http://{}", s.api)).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    zhili(&["stream", "append", "cli-1", "--type", "demo.created", "--source", "/cli", "--data", r#"{"x": 1}"#, "--expected-revision", "no_stream"]);
    let read: Value = serde_json::from_str(&zhili(&["stream", "read", "cli-1", "-o", "json"])).unwrap();
    assert_eq!((read[0]["event"]["type"].as_str(), read[0]["event"]["data"]["x"].as_u64()), (Some("demo.created"), Some(1)));
    let listed = zhili(&["stream", "list", "cli-", "-o", "json"]);
    assert!(listed.contains("cli-1"), "{listed}");
    let created: Value =
        serde_json::from_str(&zhili(&["subscription", "create", "hook", r#"{"stream": "cli-1", "webhook": {"url": "http://127.0.0.1:9/x"}}"#, "-o", "json"]))
            .unwrap();
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"), "{created}");
    assert!(zhili(&["subscription", "list", "-o", "json"]).contains("hook"));
    zhili(&["subscription", "delete", "hook"]);
    zhili(&["stream", "delete", "cli-1"]);
    let (st, _, _) = call(&c, Method::GET, "/api/v1/streams/cli-1", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// The streaming append: one connection, events pipelined, each acknowledged with its
/// revision and position once durable; a bad line is refused without ending the stream.
#[tokio::test]
async fn publisher_pipelines_and_acknowledges_each_event() {
    let s = dev_server();
    let c = client(&s, None);
    let mut p = c.publisher("fast-1").await.unwrap();
    const N: usize = 5_000;
    let sender = {
        let events: Vec<Value> = (0..N).map(|i| event(&format!("p{i}"))).collect();
        async move {
            for (i, e) in events.iter().enumerate() {
                p.send(e).await.unwrap();
                if i == 10 {
                    p.send(&json!({"specversion": "1.0", "id": "broken"})).await.unwrap();
                }
            }
            p.finish();
            p
        }
    };
    let mut p = sender.await;
    let mut acked: HashMap<String, (u64, u64)> = HashMap::new();
    let mut refused = Vec::new();
    while let Some(ack) = tokio::time::timeout(Duration::from_secs(30), p.ack()).await.expect("acks keep coming") {
        let ack = ack.unwrap();
        match (ack.error, ack.revision, ack.position) {
            (Some(e), _, _) => refused.push(e),
            (None, Some(r), Some(pos)) => {
                acked.insert(ack.id.unwrap(), (r, pos));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(acked.len(), N, "every event acknowledged");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("event.source"), "{refused:?}");
    let mut revisions: Vec<u64> = acked.values().map(|(r, _)| *r).collect();
    revisions.sort_unstable();
    assert_eq!(revisions, (0..N as u64).collect::<Vec<_>>(), "gapless revisions");
    assert_eq!(acked["p0"].0, 0);
    // What was acknowledged is what the stream holds, in order.
    let page = c.read_stream("fast-1", Some(0), false, 4096).await.unwrap();
    for e in &page.events {
        let id = e.event["id"].as_str().unwrap();
        assert_eq!(acked[id], (e.revision, e.position), "{id}");
    }
    assert_eq!(page.events[0].event["id"], "p0");
}

/// `--publish-kv app/`: changes under the prefix become `$kv` events; others do not.
#[tokio::test]
async fn kv_changes_under_published_prefixes_are_events() {
    let s = ServerProcess::start(bin(), &["--dev", "--publish-kv", "app/"]);
    let c = client(&s, None);
    c.kv_put("app/db", "postgres://db", None).await.unwrap();
    c.kv_put("other/x", "1", None).await.unwrap();
    c.kv_delete("app/db", false).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    assert_eventually(Duration::from_secs(10), "$kv has the put and the delete", || {
        let c = c.clone();
        let seen = seen.clone();
        async move {
            let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/$kv", None).await;
            let got: Vec<(String, String)> = v["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| (e["event"]["type"].as_str().unwrap_or_default().to_string(), e["event"]["subject"].as_str().unwrap_or_default().to_string()))
                .collect();
            let done = got.len() >= 2;
            *seen.lock().unwrap() = got;
            done
        }
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, [("io.zhili.kv.put".to_string(), "app/db".to_string()), ("io.zhili.kv.deleted".to_string(), "app/db".to_string())]);
    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/$kv?limit=1", None).await;
    assert_eq!(v["events"][0]["event"]["data"]["value_base64"], "cG9zdGdyZXM6Ly9kYg==");
}

/// A publisher that goes quiet for longer than the server's stalled-body timeout keeps its
/// connection: the SDK sends an empty line now and then, which the server ignores.
#[tokio::test]
async fn an_idle_publisher_keeps_its_connection() {
    let s = ServerProcess::start(bin(), &["--dev", "--read-timeout", "5s"]);
    let c = client(&s, None);
    let mut p = c.publisher("quiet-1").await.unwrap();
    p.send(&event("q0")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), p.ack()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.revision, Some(0));
    // Twice the server's timeout without an event.
    tokio::time::sleep(Duration::from_secs(10)).await;
    p.send(&event("q1")).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), p.ack()).await.expect("an ack after the pause").expect("the connection is open").unwrap();
    assert_eq!((second.id.as_deref(), second.revision), (Some("q1"), Some(1)));
}

/// A stream's own ACL in its metadata: an owner policy alone writes it, reader policies alone
/// read it, on top of what the policy rules on its name allow; unknown policies are refused.
#[tokio::test]
async fn a_stream_acl_narrows_writers_and_readers() {
    let s = ServerProcess::start(bin(), &[]);
    let root = bootstrap(&s).await;
    let admin = client(&s, Some(&root));
    let mut tokens = HashMap::new();
    for (name, rules) in [
        ("order-team", json!([{"resource": "stream", "prefix": "order-", "access": "write"}])),
        ("streams-all", json!([{"resource": "stream", "prefix": "", "access": "write"}])),
        ("auditors", json!([{"resource": "stream", "prefix": "order-", "access": "read"}])),
    ] {
        let (st, _, v) = call(&admin, Method::POST, "/api/v1/acl/policies", Some(&json!({"name": name, "rules": rules}).to_string())).await;
        assert!(st.is_success(), "{name}: {v}");
        let (_, _, t) = call(&admin, Method::POST, "/api/v1/acl/tokens", Some(&json!({"policies": [name]}).to_string())).await;
        tokens.insert(name, client(&s, Some(t["secret_id"].as_str().unwrap())));
    }
    let (alice, bob, carol) = (&tokens["order-team"], &tokens["streams-all"], &tokens["auditors"]);
    assert_eq!(post(alice, "/api/v1/streams/order-9", &event("a")).await.0, StatusCode::CREATED);
    assert_eq!(post(bob, "/api/v1/streams/order-9", &event("b")).await.0, StatusCode::CREATED, "no stream ACL yet");
    for (body, field) in [(r#"{"owner": "nope"}"#, "owner"), (r#"{"readers": ["auditors", "x"]}"#, "readers[1]")] {
        let (st, _, v) = call(alice, Method::PUT, "/api/v1/streams/order-9/metadata", Some(body)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["detail"].as_str().unwrap().starts_with(field), "{v}");
    }
    let (st, _, v) = call(alice, Method::PUT, "/api/v1/streams/order-9/metadata", Some(r#"{"owner": "order-team", "readers": ["auditors"]}"#)).await;
    assert_eq!((st, v["owner"].as_str(), v["readers"].clone()), (StatusCode::OK, Some("order-team"), json!(["auditors"])), "{v}");
    // Bob's rules cover every stream, but he is neither owner nor reader now.
    assert_eq!(post(bob, "/api/v1/streams/order-9", &event("c")).await.0, StatusCode::FORBIDDEN);
    for (method, path, body) in [
        (Method::GET, "/api/v1/streams/order-9", None),
        (Method::GET, "/api/v1/streams/order-9/subscribe", None),
        (Method::PUT, "/api/v1/streams/order-9/metadata", Some(r#"{"owner": "streams-all"}"#)),
        (Method::DELETE, "/api/v1/streams/order-9", None),
    ] {
        let (st, _, v) = call(bob, method.clone(), path, body).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{method} {path}: {v}");
    }
    // Carol reads as a reader (her rules allow no writes anyway); Alice owns it.
    let (st, _, v) = call(carol, Method::GET, "/api/v1/streams/order-9", None).await;
    assert_eq!((st, v["events"].as_array().map(Vec::len)), (StatusCode::OK, Some(2)), "{v}");
    assert_eq!(post(carol, "/api/v1/streams/order-9", &event("d")).await.0, StatusCode::FORBIDDEN);
    assert_eq!(post(alice, "/api/v1/streams/order-9", &event("e")).await.0, StatusCode::CREATED);
    assert_eq!(call(alice, Method::GET, "/api/v1/streams/order-9", None).await.0, StatusCode::OK);
    // Management tokens pass; system streams take no ACL of their own.
    assert_eq!(post(&admin, "/api/v1/streams/order-9", &event("f")).await.0, StatusCode::CREATED);
    let (st, _, v) = call(&admin, Method::PUT, "/api/v1/streams/$audit/metadata", Some(r#"{"owner": "auditors"}"#)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    // Other streams are untouched; an empty owner removes the ACL's owner.
    assert_eq!(post(bob, "/api/v1/streams/order-10", &event("g")).await.0, StatusCode::CREATED);
    let (st, _, v) = call(alice, Method::PUT, "/api/v1/streams/order-9/metadata", Some(r#"{"owner": "", "readers": []}"#)).await;
    assert_eq!((st, v["owner"].clone()), (StatusCode::OK, Value::Null), "{v}");
    assert_eq!(post(bob, "/api/v1/streams/order-9", &event("h")).await.0, StatusCode::CREATED);
}

/// Ephemeral registrations do not persist the registry index, so a restarted node hands out the
/// indexes of before again: its `$registry` events must still be appended (they were dropped as
/// duplicates of the first run's events when ids were made of the index alone), and ids stay
/// unique across runs.
#[tokio::test]
async fn registry_events_keep_flowing_after_a_restart() {
    let mut s = dev_server();
    let registered_in_stream = |s: &zhili_test_support::ServerProcess, id: &'static str| {
        let c = client(s, None);
        async move {
            assert_eventually(Duration::from_secs(10), "the registration reaches $registry", || {
                let c = c.clone();
                async move {
                    let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/$registry?limit=1000", None).await;
                    v["events"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["event"]["type"] == "io.zhili.registry.instance.registered" && e["event"]["subject"] == format!("default/feed/{id}"))
                }
            })
            .await;
            let (_, _, v) = call(&c, Method::GET, "/api/v1/streams/$registry?limit=1000", None).await;
            v["events"].as_array().unwrap().iter().map(|e| e["event"]["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    let (st, _, _) = call(&client(&s, None), Method::POST, "/api/v1/services/feed/instances", Some(r#"{"id":"before","address":"10.0.0.1","port":80}"#)).await;
    assert_eq!(st, StatusCode::CREATED);
    registered_in_stream(&s, "before").await;
    s.restart_after_kill9();
    let (st, _, _) = call(&client(&s, None), Method::POST, "/api/v1/services/feed/instances", Some(r#"{"id":"after","address":"10.0.0.2","port":80}"#)).await;
    assert_eq!(st, StatusCode::CREATED);
    let ids = registered_in_stream(&s, "after").await;
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "event ids repeat across runs: {ids:?}");
}

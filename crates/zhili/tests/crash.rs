//! Crash safety: SIGKILL the server in the middle of a stream of acknowledged writes; after a
//! restart every acknowledged KV write and persistent registration is there.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use std::sync::Mutex;

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let mut s = dev_server();
    let c = client(&s, None);
    let acked_kv: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let acked_inst: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers = vec![];
    for w in 0..4 {
        let c = c.clone();
        let acked_kv = acked_kv.clone();
        let acked_inst = acked_inst.clone();
        writers.push(tokio::spawn(async move {
            // Bounded: at most 5,000 writes per writer, ended early by the kill.
            for i in 0..5_000 {
                let key = format!("crash/{w}/{i}");
                let value = format!("v{w}-{i}");
                match c.kv_put(&key, value.clone(), None).await {
                    Ok(_) => acked_kv.lock().unwrap().push((key, value)),
                    Err(_) => return,
                }
                if i % 5 == 0 {
                    let body = format!(r#"{{"address":"10.1.{w}.{}","port":{},"ephemeral":false}}"#, i % 250, 1000 + i);
                    let r = c.send(Method::POST, "/api/v1/services/durable/instances", Some(body.into()), Duration::from_secs(10)).await;
                    match r {
                        Ok(r) if r.status == StatusCode::CREATED => {
                            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                            acked_inst.lock().unwrap().push(v["id"].as_str().unwrap().to_string());
                        }
                        _ => return,
                    }
                }
            }
        }));
    }
    // Let writes flow, then kill mid-stream.
    assert_eventually(Duration::from_secs(30), "some writes were acknowledged", || {
        let n = acked_kv.lock().unwrap().len();
        async move { n >= 300 }
    })
    .await;
    s.kill9();
    for w in writers {
        let _ = w.await;
    }
    let kv = acked_kv.lock().unwrap().clone();
    let inst = acked_inst.lock().unwrap().clone();
    assert!(!inst.is_empty());

    s.restart_after_kill9();
    let c = client(&s, None);
    let stored = c.kv_list("crash/").await.unwrap();
    let newest = stored.iter().map(|kv| kv.modify_index).max().unwrap_or(0);
    let stored: std::collections::HashMap<String, Vec<u8>> = stored.into_iter().map(|kv| (kv.key.clone(), kv.bytes().unwrap())).collect();
    for (k, v) in &kv {
        assert_eq!(stored.get(k).map(Vec::as_slice), Some(v.as_bytes()), "acknowledged write {k} lost");
    }
    let (_, _, v) = call(&c, Method::GET, "/api/v1/services/durable/instances?healthy=false", None).await;
    let ids: std::collections::HashSet<String> = v["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    for id in &inst {
        assert!(ids.contains(id), "acknowledged persistent registration {id} lost");
    }
    // The restarted server keeps ordering: a new write gets a higher index than anything stored.
    let idx = c.kv_put("crash/after", "1", None).await.unwrap();
    assert!(idx > newest, "index went backwards after restart: {idx} <= {newest}");
}

/// Nacos writes go to the same durable store: a persistent instance and a config acknowledged
/// through the Nacos open API are there after kill -9; an ephemeral instance is not (as in Nacos).
#[tokio::test(flavor = "multi_thread")]
async fn nacos_acknowledged_writes_survive_kill_9() {
    let mut s = dev_server();
    let nacos = |s: &ServerProcess| zhili_client::Client::new(&format!("http://{}", s.nacos.unwrap()), None).unwrap();
    let n = nacos(&s);
    for (path, want) in [
        ("/nacos/v1/ns/instance?serviceName=durable&ip=10.0.0.1&port=80&ephemeral=false", "ok"),
        ("/nacos/v1/ns/instance?serviceName=durable&ip=10.0.0.2&port=80&ephemeral=true", "ok"),
        ("/nacos/v1/cs/configs?dataId=app.yaml&group=DEFAULT_GROUP&content=durable%3A%20yes", "true"),
    ] {
        let (st, r, _) = call(&n, Method::POST, path, None).await;
        assert_eq!((st, String::from_utf8_lossy(&r.body).as_ref()), (StatusCode::OK, want), "{path}");
    }
    s.restart_after_kill9();
    let n = nacos(&s);
    let (st, _, v) = call(&n, Method::GET, "/nacos/v1/ns/instance/list?serviceName=durable", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let ips: Vec<&str> = v["hosts"].as_array().unwrap().iter().map(|h| h["ip"].as_str().unwrap()).collect();
    assert_eq!(ips, ["10.0.0.1"], "{v}");
    let (st, r, _) = call(&n, Method::GET, "/nacos/v1/cs/configs?dataId=app.yaml&group=DEFAULT_GROUP", None).await;
    assert_eq!((st, String::from_utf8_lossy(&r.body).as_ref()), (StatusCode::OK, "durable: yes"));
}

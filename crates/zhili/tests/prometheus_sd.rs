//! A real Prometheus (Debian package) discovers the registered targets through Zhili, scrapes
//! them, and drops a target once it is deregistered. Debian's build (2.42.0+ds) has no
//! `consul_sd_configs` (Debian strips the Consul plugin: "field consul_sd_configs not found"),
//! so it uses `http_sd_configs` against `/api/v1/sd/prometheus`; the Consul endpoints that
//! Consul SD calls are covered by the py-consul test.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::Value;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn targets(prom: &zhili_client::Client) -> Vec<Value> {
    match prom.send(Method::GET, "/api/v1/targets", None, Duration::from_secs(5)).await {
        Ok(r) if r.status == StatusCode::OK => {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            v["data"]["activeTargets"].as_array().cloned().unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_http_sd_discovers_and_scrapes_targets() {
    let s = dev_server();
    let c = client(&s, None);
    // The target: Zhili's own /metrics, registered through the Consul agent API.
    let body = format!(r#"{{"Name":"zhili-self","ID":"self1","Address":"127.0.0.1","Port":{},"Tags":["metrics"],"Meta":{{"team":"core"}}}}"#, s.api.port());
    let (st, _, v) = call(&c, Method::PUT, "/v1/agent/service/register", Some(&body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: zhili\n    http_sd_configs:\n      - url: 'http://{}/api/v1/sd/prometheus'\n        refresh_interval: 1s\n    relabel_configs:\n      - source_labels: [__meta_zhili_service]\n        target_label: service\n      - source_labels: [__meta_zhili_metadata_team]\n        target_label: team\n",
        s.api
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package) is installed by scripts/test");
    let _prom_process = KillOnDrop(child);
    let prom = zhili_client::Client::new(&format!("http://127.0.0.1:{port}"), None).unwrap();

    assert_eventually(Duration::from_secs(60), "prometheus discovers and scrapes the target", || {
        let prom = prom.clone();
        async move {
            targets(&prom).await.iter().any(|t| {
                t["labels"]["service"] == "zhili-self"
                    && t["labels"]["team"] == "core"
                    && t["health"] == "up"
                    && t["scrapeUrl"].as_str().is_some_and(|u| u.contains("/metrics"))
            })
        }
    })
    .await;

    let (st, _, _) = call(&c, Method::PUT, "/v1/agent/service/deregister/self1", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eventually(Duration::from_secs(30), "prometheus drops the deregistered target", || {
        let prom = prom.clone();
        async move { !targets(&prom).await.iter().any(|t| t["labels"]["service"] == "zhili-self") }
    })
    .await;
}

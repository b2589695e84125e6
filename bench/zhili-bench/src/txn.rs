//! Transactions through DTM's HTTP API: two-branch sagas, TCC (two registered branches, tries
//! called by the generator as an application would) and 2-phase messages, each submitted with
//! `wait_result` so an answer means the transaction finished; against a branch server here that
//! answers 200 at once. Closed loop (`rate` 0) or open loop at `rate` per second (latency from
//! when each was due).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::{percentile, Conn};

/// A branch server answering `{"dtm_result":"SUCCESS"}` to everything, on keep-alive connections.
async fn branches() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from_static(br#"{"dtm_result":"SUCCESS"}"#))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    Ok(addr)
}

/// One transaction of `mode`, start to finish; true when it succeeded.
async fn send(c: &mut Conn, path: &str, body: serde_json::Value) -> anyhow::Result<(u16, Bytes)> {
    c.send(Method::POST, &format!("/api/dtmsvr/{path}"), Some(Bytes::from(body.to_string()))).await
}

async fn one(c: &mut Conn, busi: &mut Conn, base: &str, mode: &str, gid: &str) -> anyhow::Result<bool> {
    let ok = |r: (u16, Bytes)| r.0 == 200;
    match mode {
        "saga" => {
            let body = json!({"gid": gid, "trans_type": "saga", "wait_result": true,
                "steps": [{"action": format!("{base}/out"), "compensate": format!("{base}/out-revert")}, {"action": format!("{base}/in"), "compensate": format!("{base}/in-revert")}],
                "payloads": ["{\"amount\":30}", "{\"amount\":30}"]});
            Ok(ok(send(c, "submit", body).await?))
        }
        "tcc" => {
            if !ok(send(c, "prepare", json!({"gid": gid, "trans_type": "tcc"})).await?) {
                return Ok(false);
            }
            for id in ["01", "02"] {
                let reg = json!({"gid": gid, "branch_id": id, "trans_type": "tcc", "data": "{}", "confirm": format!("{base}/confirm"), "cancel": format!("{base}/cancel")});
                if !ok(send(c, "registerBranch", reg).await?) {
                    return Ok(false);
                }
                // The application's try.
                busi.send(Method::POST, &format!("/try?gid={gid}&branch_id={id}&op=try&trans_type=tcc"), Some(Bytes::from_static(b"{}"))).await?;
            }
            Ok(ok(send(c, "submit", json!({"gid": gid, "trans_type": "tcc", "wait_result": true})).await?))
        }
        "msg" => {
            let body = json!({"gid": gid, "trans_type": "msg", "steps": [{"action": format!("{base}/deliver")}], "payloads": ["{\"n\":1}"], "query_prepared": format!("{base}/qp")});
            if !ok(send(c, "prepare", body.clone()).await?) {
                return Ok(false);
            }
            let mut submit = body;
            submit["wait_result"] = json!(true);
            Ok(ok(send(c, "submit", submit).await?))
        }
        other => bail!("unknown mode {other:?}: saga, tcc or msg"),
    }
}

pub async fn run(target: SocketAddr, mode: &str, concurrency: usize, rate: f64, duration: Duration) -> anyhow::Result<()> {
    let busi_addr = branches().await?;
    let base = format!("http://{busi_addr}");
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let start = Instant::now();
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (stop, errors, next, base, mode) = (stop.clone(), errors.clone(), next.clone(), base.clone(), mode.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (Ok(mut c), Ok(mut busi)) = (Conn::open(target).await, Conn::open(busi_addr).await) else { return lat };
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                // Open loop: the next slot of the global schedule, latency from when it was due.
                let due = if rate > 0.0 {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    let due = t0 + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    due.into_std()
                } else {
                    Instant::now()
                };
                let gid = format!("b{run_id:x}-{w}-{n}");
                n += 1;
                match one(&mut c, &mut busi, &base, &mode, &gid).await {
                    Ok(true) => lat.push(due.elapsed().as_micros() as u64),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let out = json!({
        "scenario": format!("txn-{mode}"), "concurrency": concurrency, "rate": rate, "transactions": all.len(), "errors": errors.load(Ordering::Relaxed),
        "seconds": (secs * 100.0).round() / 100.0, "per_second": (all.len() as f64 / secs).round(),
        "p50_us": percentile(&all, 0.5), "p99_us": percentile(&all, 0.99),
    });
    println!("{out}");
    Ok(())
}

//! SIGTERM through the real binary: the server stops accepting at once, lets every request in
//! flight finish (up to `--shutdown-timeout`), and exits 0.

// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_completes_every_accepted_request() {
    let mut s = ServerProcess::start(bin(), &["--dev", "--shutdown-timeout", "8s"]);
    let api = s.api;
    let c = client(&s, None);
    let index = c.kv_put("held", "v", None).await.unwrap();

    // Twenty blocking reads in flight (each answers when its 1.5 s wait runs out), and a stream
    // of writes on keep-alive connections.
    let mut held = Vec::new();
    for _ in 0..20 {
        let c = client(&s, None);
        held.push(tokio::spawn(async move { call(&c, Method::GET, &format!("/api/v1/kv/held?index={index}&wait=1500ms"), None).await.0 }));
    }
    let writer = {
        let c = client(&s, None);
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..10_000 {
                match c.send(Method::PUT, &format!("/api/v1/kv/w/{i}"), Some(bytes::Bytes::from_static(b"x")), Duration::from_secs(10)).await {
                    Ok(r) => {
                        assert!(r.status.is_success(), "an accepted write failed: {}", r.status);
                        ok += 1;
                    }
                    // Once the listener is closed, new requests are refused: the load ends.
                    Err(_) => break,
                }
            }
            ok
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let code = s.terminate();
        (s, code)
    });
    // New connections are refused soon after the signal.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(tokio::net::TcpStream::connect(api).await.is_err(), "the listener still accepts during the drain");

    for h in held {
        assert_eq!(h.await.unwrap(), StatusCode::OK, "a request in flight was cut off by the shutdown");
    }
    let written = writer.await.unwrap();
    assert!(written > 0, "the write load ran");
    let (_s, code) = exit.await.unwrap();
    assert_eq!(code, Some(0), "clean exit");
    assert!(started.elapsed() < Duration::from_secs(8), "drained well within the deadline: {:?}", started.elapsed());
}

/// A client that leaves while its blocking read is held frees it at once (as hyper does on
/// HTTP/1.1): the handler is dropped, so neither memory nor the shutdown drain waits out the
/// read's wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_blocking_read_whose_client_left_does_not_hold_the_drain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = ServerProcess::start(bin(), &["--dev", "--shutdown-timeout", "30s"]);
    let c = client(&s, None);
    let index = c.kv_put("held", "v", None).await.unwrap();
    for _ in 0..5 {
        let mut tcp = tokio::net::TcpStream::connect(s.api).await.unwrap();
        tcp.write_all(format!("GET /api/v1/kv/held?index={index}&wait=10m HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut byte)).await;
        assert!(read.is_err(), "the read is held, not answered: {read:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let code = tokio::task::spawn_blocking(move || s.terminate()).await.unwrap();
    assert_eq!(code, Some(0), "clean exit");
    assert!(started.elapsed() < Duration::from_secs(10), "the drain waited on abandoned reads: {:?}", started.elapsed());
}

/// A connected Nacos gRPC client holds a bidirectional stream that never ends by itself; on
/// SIGTERM the server ends it, so the drain does not sit out the whole deadline.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_nacos_grpc_streams() {
    use nacos_sdk::api::naming::NamingServiceBuilder;

    let mut s = ServerProcess::start(bin(), &["--dev", "--shutdown-timeout", "20s"]);
    let cache = tempfile::tempdir().unwrap();
    let props = nacos_props(&s, "zhili-shutdown", cache.path(), None);
    let naming = NamingServiceBuilder::new(props).build().await.expect("naming service");
    let instance = nacos_sdk::api::naming::ServiceInstance { ip: "10.7.0.1".into(), port: 80, ..Default::default() };
    naming.register_instance("held".into(), None, instance).await.expect("register over gRPC");

    let started = Instant::now();
    let code = tokio::task::spawn_blocking(move || s.terminate()).await.unwrap();
    assert_eq!(code, Some(0));
    assert!(started.elapsed() < Duration::from_secs(5), "the open gRPC stream held the drain for {:?}", started.elapsed());
    drop(naming);
}

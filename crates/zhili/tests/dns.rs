//! DNS through the real binary, queried with `dig` (Debian dnsutils): instances registered over
//! the native and Consul APIs answer as A and SRV records, health changes show, unknown names
//! get NXDOMAIN, big answers truncate over UDP and come whole over TCP, and garbage packets do
//! not hurt the listener.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread")]
async fn dig_a_srv_health_nxdomain_truncation_and_garbage() {
    let s = dev_server();
    let c = client(&s, None);
    // One instance through the native API, one through Consul's agent API.
    let (st, _, v) =
        call(&c, Method::POST, "/api/v1/services/web/instances", Some(r#"{"id":"w1","address":"10.0.0.1","port":8080,"tags":["v1"],"ephemeral":false}"#)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, _, v) =
        call(&c, Method::PUT, "/v1/agent/service/register", Some(r#"{"Name":"web","ID":"w2","Address":"10.0.0.2","Port":8081,"Tags":["v2"]}"#)).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    assert_eq!(dig_short(&s, &["web.service.consul", "A"]), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(dig_short(&s, &["v2.web.service.dc1.zhili", "A"]), ["10.0.0.2"]);
    let srv = dig_short(&s, &["_web._tcp.service.consul", "SRV"]);
    assert_eq!(srv, ["1 1 8080 0a000001.addr.dc1.consul.", "1 1 8081 0a000002.addr.dc1.consul."]);
    let full = dig(&s, &["web.service.consul", "SRV"]);
    assert!(full.contains("flags: qr aa"), "authoritative: {full}");
    assert!(full.contains("0a000001.addr.dc1.consul. 5 IN A\t10.0.0.1") || full.contains("0a000001.addr.dc1.consul. 5\tIN\tA\t10.0.0.1"), "{full}");
    assert_eq!(dig_short(&s, &["zhili.node.consul", "A"]), ["127.0.0.1"]);

    // Maintenance takes an instance out of DNS; ending it brings it back.
    let (st, _, _) = call(&c, Method::PUT, "/v1/agent/service/maintenance/w1?enable=true&reason=deploy", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(dig_short(&s, &["web.service.consul", "A"]), ["10.0.0.2"]);
    call(&c, Method::PUT, "/v1/agent/service/maintenance/w1?enable=false", None).await;
    assert_eq!(dig_short(&s, &["web.service.consul", "A"]), ["10.0.0.1", "10.0.0.2"]);

    let nx = dig(&s, &["nope.service.consul", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("SOA"), "NXDOMAIN carries the SOA: {nx}");

    // 60 instances do not fit in 512 bytes: TC over UDP, everything over TCP.
    for i in 0..60 {
        let body = format!(r#"{{"id":"b{i}","address":"10.1.0.{}","port":80,"ephemeral":false}}"#, i + 1);
        let (st, _, v) = call(&c, Method::POST, "/api/v1/services/big/instances", Some(&body)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let udp = dig(&s, &["big.service.consul", "A", "+noedns", "+ignore"]);
    assert!(udp.contains(" tc"), "truncated over UDP: {udp}");
    assert_eq!(dig_short(&s, &["big.service.consul", "A", "+tcp"]).len(), 60);

    // Garbage does not hurt the listener.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 60)).map(|j| (i * 31 + j * 7) as u8).collect();
        sock.send_to(&junk, s.dns.unwrap()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dig_short(&s, &["web.service.consul", "A"]).len(), 2, "still answering after garbage");
}

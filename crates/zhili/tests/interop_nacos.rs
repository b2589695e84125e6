//! Real Nacos clients against the real binary: nacos-sdk-python 3.x over the 2.x gRPC protocol and
//! the legacy 2.0.x client over the v1 open API, each driven by a Python scenario with ACLs on;
//! plus bad input on both Nacos listeners and cross-protocol visibility down to DNS.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};

#[tokio::test(flavor = "multi_thread")]
async fn nacos_sdk_python3_grpc_register_discover_push_health_config_acl() {
    // A short read timeout: the scenario stays quiet past it and must keep its connection.
    let s = ServerProcess::start(bin(), &["--read-timeout", "2s"]);
    let token = bootstrap(&s).await;
    let args = [s.nacos.expect("nacos").port().to_string(), s.nacos_grpc.expect("nacos grpc").port().to_string(), s.api.port().to_string(), token.clone()];
    let out = tokio::task::spawn_blocking(move || {
        run_interop("nacos_grpc_scenario.py", &["127.0.0.1", &args[0], &args[1], &args[2], &args[3]], Duration::from_secs(150))
    })
    .await
    .unwrap();
    assert!(out.contains("nacos grpc scenario passed"), "{out}");
    // The gRPC writes are audited like the HTTP ones: operation, target and accessor id.
    let admin = client(&s, Some(&token));
    let kinds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    assert_eventually(Duration::from_secs(10), "nacos gRPC writes reach $audit", || {
        let (admin, kinds) = (admin.clone(), kinds.clone());
        async move {
            let (_, _, v) = call(&admin, Method::GET, "/api/v1/streams/$audit?limit=4096", None).await;
            let found: Vec<String> = v["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| &e["event"]["data"])
                .filter(|d| d["surface"] == "nacos-grpc" && d["accessor"].is_string() && d["path"].as_str().is_some_and(|p| p.contains('/')))
                .map(|d| d["method"].as_str().unwrap_or("").to_string())
                .collect();
            let done = found.iter().any(|m| m.starts_with("InstanceRequest.registerInstance")) && found.iter().any(|m| m == "ConfigPublishRequest");
            *kinds.lock().unwrap() = found;
            done
        }
    })
    .await;
    assert!(!kinds.lock().unwrap().iter().any(|m| m.contains("Query")), "reads are not audited: {:?}", kinds.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn nacos_sdk_python_legacy_v1_register_beat_health_config_watch_acl() {
    let s = ServerProcess::start(bin(), &[]);
    let token = bootstrap(&s).await;
    let args = [s.nacos.expect("nacos").port().to_string(), s.api.port().to_string(), token];
    let out = tokio::task::spawn_blocking(move || {
        run_interop_with(&interop_python_nacos2(), "nacos_v1_scenario.py", &["127.0.0.1", &args[0], &args[1], &args[2]], Duration::from_secs(150))
    })
    .await
    .unwrap();
    assert!(out.contains("nacos v1 scenario passed"), "{out}");
}

fn nacos_client(s: &ServerProcess) -> zhili_client::Client {
    zhili_client::Client::new(&format!("http://{}", s.nacos.expect("nacos listener")), None).unwrap()
}

async fn text(c: &zhili_client::Client, method: Method, path: &str) -> (StatusCode, String) {
    let (st, r, _) = call(c, method, path, None).await;
    (st, String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn nacos_http_bad_input_v2_wrapping_and_dns_visibility() {
    let s = dev_server();
    let n = nacos_client(&s);
    let api = client(&s, None);

    // Bad input: 400 naming the field, and nothing registered.
    for (path, field) in [
        ("/nacos/v1/ns/instance?serviceName=web&ip=10.0.0.1&port=abc", "port"),
        ("/nacos/v1/ns/instance?ip=10.0.0.1&port=80", "serviceName"),
        ("/nacos/v1/ns/instance?serviceName=web&ip=10.0.0.1&port=70000", "port"),
        ("/nacos/v1/ns/instance?serviceName=web&ip=10.0.0.1&port=80&metadata=%7Bbad", "metadata"),
        ("/nacos/v1/ns/instance?serviceName=web&ip=10.0.0.1&port=80&ephemeral=maybe", "ephemeral"),
        ("/nacos/v1/ns/instance?serviceName=a%20b&ip=10.0.0.1&port=80", "serviceName"),
        ("/nacos/v1/ns/instance?serviceName=web&ip=not%20an%20ip&port=80", "ip"),
    ] {
        let (st, body) = text(&n, Method::POST, path).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.starts_with("caused: ") && body.contains(field), "{path}: {body:?} should name {field}");
    }
    let (st, _, _) = call(&api, Method::GET, "/api/v1/services/web", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Python-style booleans; v2 wraps answers in {code, message, data}.
    let (st, _, v) = call(&n, Method::POST, "/nacos/v2/ns/instance?serviceName=web&ip=10.0.0.1&port=80&ephemeral=False&enabled=True", None).await;
    assert_eq!((st, v["code"].as_i64(), v["data"].as_str()), (StatusCode::OK, Some(0), Some("ok")), "{v}");
    let (st, _, v) = call(&n, Method::GET, "/nacos/v2/ns/instance/list?serviceName=web", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["hosts"][0]["ip"], "10.0.0.1", "{v}");
    assert_eq!(v["data"]["hosts"][0]["ephemeral"], false, "{v}");
    // Lists are served from a rendering cached per service index: every change shows at once,
    // in v1 and v2 alike, and queries differing in a parameter never share an answer.
    for round in 0..3 {
        let (_, _, v1) = call(&n, Method::GET, "/nacos/v1/ns/instance/list?serviceName=web", None).await;
        let (_, _, v2) = call(&n, Method::GET, "/nacos/v2/ns/instance/list?serviceName=web", None).await;
        let (_, _, healthy) = call(&n, Method::GET, "/nacos/v1/ns/instance/list?serviceName=web&healthyOnly=true", None).await;
        let (_, _, other) = call(&n, Method::GET, "/nacos/v1/ns/instance/list?serviceName=web&clusters=elsewhere", None).await;
        assert_eq!(v1["hosts"].as_array().unwrap().len(), round + 1, "round {round}: {v1}");
        assert_eq!(v2["data"]["hosts"], v1["hosts"], "round {round}");
        assert_eq!(healthy["hosts"], v1["hosts"], "round {round}");
        assert_eq!(other["hosts"].as_array().unwrap().len(), 0, "round {round}: {other}");
        let ip = format!("10.0.1.{round}");
        let (st, _, _) = call(&n, Method::POST, &format!("/nacos/v1/ns/instance?serviceName=web&ip={ip}&port=80&ephemeral=false"), None).await;
        assert_eq!(st, StatusCode::OK);
    }
    let (st, _, _) = call(&n, Method::PUT, "/nacos/v1/ns/instance?serviceName=web&ip=10.0.1.0&port=80&ephemeral=false&enabled=false", None).await;
    assert_eq!(st, StatusCode::OK);
    let (_, _, v) = call(&n, Method::GET, "/nacos/v1/ns/instance/list?serviceName=web", None).await;
    assert_eq!(v["hosts"].as_array().unwrap().len(), 3, "a disabled instance leaves the list: {v}");
    for round in 0..3 {
        let (st, _, _) = call(&n, Method::DELETE, &format!("/nacos/v1/ns/instance?serviceName=web&ip=10.0.1.{round}&port=80&ephemeral=false"), None).await;
        assert_eq!(st, StatusCode::OK);
    }
    let (_, _, v) = call(&n, Method::GET, "/nacos/v1/ns/instance/list?serviceName=web", None).await;
    assert_eq!(v["hosts"].as_array().unwrap().len(), 1, "{v}");
    let (st, _, v) = call(&n, Method::GET, "/nacos/v2/cs/config?dataId=missing.yaml&group=DEFAULT_GROUP", None).await;
    assert_eq!((st, v["code"].as_i64()), (StatusCode::NOT_FOUND, Some(20004)), "{v}");

    // Registered through Nacos, discovered through DNS and Consul.
    assert_eq!(dig_short(&s, &["web.service.consul", "A"]), ["10.0.0.1"]);
    let (st, _, v) = call(&api, Method::GET, "/v1/catalog/service/web", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v[0]["ServiceAddress"], "10.0.0.1", "{v}");

    // Listener: a malformed Listening-Configs is a 400; a stale md5 answers at once with the key.
    let (st, _, _) = call(&n, Method::POST, "/nacos/v1/cs/configs?dataId=a.yaml&group=G&content=x", None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = text(&n, Method::POST, "/nacos/v1/cs/configs/listener?Listening-Configs=junk").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    let (st, body) = text(&n, Method::POST, "/nacos/v1/cs/configs/listener?Listening-Configs=a.yaml%02G%02stale%01").await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "a.yaml%02G%01"));
}

/// One gRPC call over h2c with a raw request message; returns grpc-status and the reply bytes.
async fn grpc_call(addr: std::net::SocketAddr, path: &str, message: &[u8]) -> (String, Bytes) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_frame(message)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req)).await.unwrap().unwrap();
    let head_status = resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    let collected = resp.into_body().collect().await.unwrap();
    let status = head_status.or_else(|| collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.to_str().unwrap().to_string())).unwrap_or_default();
    (status, collected.to_bytes())
}

/// A protobuf `Payload { metadata { type }, body { value } }`, encoded by hand.
fn payload(kind: &str, json: &str) -> Vec<u8> {
    // A length-delimited field: its tag byte, the length as a varint, the bytes.
    fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
        out.push(tag);
        let mut n = bytes.len();
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(bytes);
    }
    let (mut metadata, mut any, mut out) = (vec![], vec![], vec![]);
    field(0x1a, kind.as_bytes(), &mut metadata);
    field(0x12, json.as_bytes(), &mut any);
    field(0x12, &metadata, &mut out);
    field(0x1a, &any, &mut out);
    out
}

/// A gRPC message frame: uncompressed, its length, the message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

type GrpcBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A Nacos 2.x client connection by hand: h2c, its bidirectional stream set up and then left
/// silent (a client sends there only to answer pushes).
struct NacosGrpc {
    addr: std::net::SocketAddr,
    send: hyper::client::conn::http2::SendRequest<GrpcBody>,
    /// The socket, to cut the connection: hyper's client keeps it open while a stream lives.
    cut: std::net::TcpStream,
    stream: tokio::task::JoinHandle<()>,
}

impl NacosGrpc {
    async fn open(addr: std::net::SocketAddr) -> Self {
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let cut = tcp.try_clone().unwrap();
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(tcp).unwrap());
        let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        let stream = Self::bidi(&mut send, addr);
        let mut c = Self { addr, send, cut, stream };
        // The server sets the connection up asynchronously.
        for _ in 0..200 {
            if c.unary("HealthCheckRequest", "{}").await.contains("HealthCheckResponse") {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the connection was never set up");
    }

    /// A bidirectional stream: the setup request, then silence (never closed from this side).
    /// The task ends when the server ends the stream.
    fn bidi(send: &mut hyper::client::conn::http2::SendRequest<GrpcBody>, addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
        let setup = grpc_frame(&payload("ConnectionSetupRequest", r#"{"clientVersion":"test","labels":{}}"#));
        let frames = futures_util::StreamExt::chain(
            futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(setup)) }),
            futures_util::stream::pending(),
        );
        let req = http::Request::post(format!("http://{addr}/BiRequestStream/requestBiStream"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(GrpcBody::new(http_body_util::StreamBody::new(frames)))
            .unwrap();
        let stream = send.send_request(req);
        tokio::spawn(async move {
            let mut body = stream.await.unwrap().into_body();
            while let Some(Ok(_)) = body.frame().await {}
        })
    }

    /// One unary request on the connection; the reply message as text.
    async fn unary(&mut self, kind: &str, json: &str) -> String {
        let req = http::Request::post(format!("http://{}/Request/request", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(GrpcBody::new(Full::new(grpc_frame(&payload(kind, json)))))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), self.send.send_request(req)).await.unwrap().unwrap();
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
    }

    async fn register(&mut self, service: &str, ip: &str) {
        let body = format!(
            r#"{{"namespace":"","serviceName":"{service}","groupName":"DEFAULT_GROUP","type":"registerInstance","instance":{{"ip":"{ip}","port":80,"weight":1.0,"healthy":true,"enabled":true,"ephemeral":true,"clusterName":"DEFAULT","metadata":{{}}}}}}"#
        );
        let reply = self.unary("InstanceRequest", &body).await;
        assert!(reply.contains("\"resultCode\":200"), "{reply}");
    }

    fn cut(&self) {
        self.cut.shutdown(std::net::Shutdown::Both).unwrap();
    }
}

/// A Nacos 2.x client sends on its bidirectional stream only to answer pushes, so a quiet one
/// keeps its connection and its ephemeral instances however long it stays quiet there (they went
/// after every `--read-timeout` of quiet before: the stream was held to a request body's read
/// deadline); once it disconnects, they go, unless the client re-registered them through a new
/// connection first.
#[tokio::test(flavor = "multi_thread")]
async fn nacos_grpc_quiet_client_keeps_its_instances_until_it_leaves() {
    let s = ServerProcess::start(bin(), &["--dev", "--read-timeout", "1s"]);
    let (grpc, n) = (s.nacos_grpc.expect("nacos grpc listener"), nacos_client(&s));
    let mut first = NacosGrpc::open(grpc).await;
    first.register("quiet", "10.9.0.1").await;
    first.register("quiet", "10.9.0.2").await;
    let listed = || async {
        let (_, _, v) = call(&n, Method::GET, "/nacos/v1/ns/instance/list?serviceName=quiet", None).await;
        let mut ips: Vec<String> = v["hosts"].as_array().unwrap().iter().map(|h| h["ip"].as_str().unwrap().to_string()).collect();
        ips.sort();
        ips
    };
    assert_eq!(listed().await, ["10.9.0.1", "10.9.0.2"]);

    // Three read timeouts with nothing on the stream and no request on the connection.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(!first.stream.is_finished(), "the server ended the quiet client's stream");
    let reply = first.unary("HealthCheckRequest", "{}").await;
    assert!(reply.contains("HealthCheckResponse"), "the quiet client's connection was dropped: {reply}");
    assert_eq!(listed().await, ["10.9.0.1", "10.9.0.2"], "the quiet client's instances were removed");

    // Quiet streams have no read deadline, so a connection keeps only one: a second stream set up
    // on it ends the first (as an attacker would stack them to hold server tasks forever).
    let extra = NacosGrpc::bidi(&mut first.send, grpc);
    assert_eventually(Duration::from_secs(10), "the replaced stream is ended", || async { first.stream.is_finished() }).await;
    first.stream = extra;
    first.register("quiet", "10.9.0.1").await;
    first.register("quiet", "10.9.0.2").await;
    assert_eq!(listed().await, ["10.9.0.1", "10.9.0.2"]);

    // The client moves one instance to a new connection, then the old connection goes away:
    // only what it still owned goes with it.
    let mut second = NacosGrpc::open(grpc).await;
    second.register("quiet", "10.9.0.2").await;
    first.cut();
    assert_eventually(Duration::from_secs(10), "the departed connection's instance is removed", || async { listed().await == ["10.9.0.2"] }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listed().await, ["10.9.0.2"], "the instance re-registered through the new connection stays");
    second.cut();
    assert_eventually(Duration::from_secs(10), "the last connection's instance is removed", || async { listed().await.is_empty() }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nacos_grpc_garbage_is_answered_and_harmless() {
    let s = dev_server();
    let grpc = s.nacos_grpc.expect("nacos grpc listener");

    let (status, reply) = grpc_call(grpc, "/Request/request", &payload("ServerCheckRequest", "{}")).await;
    assert_eq!(status, "0");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("ServerCheckResponse") && text.contains("connectionId"), "{text}");

    // Not protobuf: an INTERNAL gRPC status, no crash.
    let (status, _) = grpc_call(grpc, "/Request/request", b"\xff\xff\xff\xff").await;
    assert_eq!(status, "13");
    // Protobuf, but the body is not JSON: an ErrorResponse.
    let (status, reply) = grpc_call(grpc, "/Request/request", &payload("InstanceRequest", "not json")).await;
    assert_eq!(status, "0");
    assert!(String::from_utf8_lossy(&reply).contains("ErrorResponse"));
    // A request before connection setup: Nacos's "unregistered" error, so clients reconnect.
    let (_, reply) = grpc_call(grpc, "/Request/request", &payload("InstanceRequest", "{}")).await;
    assert!(String::from_utf8_lossy(&reply).contains("\"errorCode\":301"), "{}", String::from_utf8_lossy(&reply));
    // Unknown method: UNIMPLEMENTED.
    let (status, _) = grpc_call(grpc, "/Nope/nope", b"").await;
    assert_eq!(status, "12");
    // Raw junk on the socket.
    let mut tcp = tokio::net::TcpStream::connect(grpc).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GARBAGE\r\n\r\n\x00\x01\x02").await.unwrap();
    drop(tcp);

    let (status, _) = grpc_call(grpc, "/Request/request", &payload("ServerCheckRequest", "{}")).await;
    assert_eq!(status, "0", "still serving after garbage");
}

//! Real Rust clients against the real binary, ACLs on: the `nacos-sdk` crate (Nacos 2.x gRPC) and
//! `rs-consul` (Consul HTTP), each discovering what the other protocols registered.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use nacos_sdk::api::config::{ConfigChangeListener, ConfigResponse, ConfigServiceBuilder};
use nacos_sdk::api::naming::{NamingChangeEvent, NamingEventListener, NamingServiceBuilder, ServiceInstance};
use nacos_sdk::api::props::ClientProps;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

struct Events(mpsc::UnboundedSender<Vec<(String, i32, bool)>>);

impl NamingEventListener for Events {
    fn event(&self, event: Arc<NamingChangeEvent>) {
        let mut hosts: Vec<(String, i32, bool)> = event.instances.iter().flatten().map(|i| (i.ip.clone(), i.port, i.healthy)).collect();
        hosts.sort();
        let _ = self.0.send(hosts);
    }
}

struct Configs(mpsc::UnboundedSender<String>);

impl ConfigChangeListener for Configs {
    fn notify(&self, config: ConfigResponse) {
        let _ = self.0.send(config.content().clone());
    }
}

/// Waits for a value from `rx` that satisfies `want`.
async fn until<T: std::fmt::Debug>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str, want: impl Fn(&T) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(v)) if want(&v) => return,
            Ok(Some(_)) => continue,
            _ => panic!("not within {WAIT:?}: {what}"),
        }
    }
}

fn instance(ip: &str, port: i32) -> ServiceInstance {
    ServiceInstance { ip: ip.into(), port, metadata: HashMap::from([("from".to_string(), "rust".to_string())]), ..Default::default() }
}

async fn consul_passing(api: &zhili_client::Client, service: &str) -> Vec<String> {
    let (st, _, v) = call(api, Method::GET, &format!("/v1/health/service/{service}?passing=true"), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut out: Vec<String> =
        v.as_array().unwrap().iter().map(|e| format!("{}:{}", e["Service"]["Address"].as_str().unwrap(), e["Service"]["Port"])).collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn nacos_sdk_rust_grpc_register_discover_push_config() {
    let s = ServerProcess::start(bin(), &[]);
    let token = bootstrap(&s).await;
    let api = client(&s, Some(&token));
    let cache = tempfile::tempdir().unwrap();
    let props = nacos_props(&s, "zhili-interop", cache.path(), Some(&token));
    let naming = NamingServiceBuilder::new(props.clone()).enable_auth_plugin_http().build().await.expect("naming service");

    naming.register_instance("rust-demo".into(), None, instance("10.6.0.1", 8080)).await.expect("register");
    let found = naming.select_instances("rust-demo".into(), None, vec![], false, true).await.expect("select");
    assert_eq!(
        found.iter().map(|i| (i.ip.as_str(), i.port, i.metadata.get("from").map(String::as_str))).collect::<Vec<_>>(),
        [("10.6.0.1", 8080, Some("rust"))]
    );
    assert_eq!(consul_passing(&api, "rust-demo").await, ["10.6.0.1:8080"]);

    // Subscribe; a registration through Consul's agent API is pushed.
    let (tx, mut rx) = mpsc::unbounded_channel();
    naming.subscribe("rust-demo".into(), None, vec![], Arc::new(Events(tx))).await.expect("subscribe");
    let (st, _, v) = call(&api, Method::PUT, "/v1/agent/service/register", Some(r#"{"Name":"rust-demo","ID":"c1","Address":"10.6.0.2","Port":8080}"#)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    until(&mut rx, "push of the Consul registration", |h| h.len() == 2 && h.iter().all(|x| x.2)).await;
    // Health change: maintenance through Consul is pushed as unhealthy.
    let (st, _, _) = call(&api, Method::PUT, "/v1/agent/service/maintenance/c1?enable=true", None).await;
    assert_eq!(st, StatusCode::OK);
    until(&mut rx, "push of the health change", |h| h.contains(&("10.6.0.2".into(), 8080, false))).await;
    // (The SDK ignores pushes with no healthy host, so bring c1 back before removing the other.)
    let (st, _, _) = call(&api, Method::PUT, "/v1/agent/service/maintenance/c1?enable=false", None).await;
    assert_eq!(st, StatusCode::OK);
    until(&mut rx, "push of the recovery", |h| h.len() == 2 && h.iter().all(|x| x.2)).await;
    naming.deregister_instance("rust-demo".into(), None, instance("10.6.0.1", 8080)).await.expect("deregister");
    until(&mut rx, "push of the deregistration", |h| h == &[("10.6.0.2".to_string(), 8080, true)]).await;
    assert_eq!(consul_passing(&api, "rust-demo").await, ["10.6.0.2:8080"]);

    // Config: publish, read, a listener woken by a Consul KV write.
    let config = ConfigServiceBuilder::new(props).enable_auth_plugin_http().build().await.expect("config service");
    assert!(config.publish_config("rust.toml".into(), "DEFAULT_GROUP".into(), "a = 1".into(), None).await.expect("publish"));
    assert_eq!(config.get_config("rust.toml".into(), "DEFAULT_GROUP".into()).await.expect("get").content(), "a = 1");
    let (tx, mut rx) = mpsc::unbounded_channel();
    config.add_listener("rust.toml".into(), "DEFAULT_GROUP".into(), Arc::new(Configs(tx))).await.expect("listen");
    let (st, _, _) = call(&api, Method::PUT, "/v1/kv/config/public/DEFAULT_GROUP/rust.toml", Some("a = 2")).await;
    assert_eq!(st, StatusCode::OK);
    until(&mut rx, "config change pushed", |c| c == "a = 2").await;
    assert!(config.remove_config("rust.toml".into(), "DEFAULT_GROUP".into()).await.expect("remove"));
    let (st, _, _) = call(&api, Method::GET, "/v1/kv/config/public/DEFAULT_GROUP/rust.toml", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn rs_consul_catalog_health_blocking_kv_and_nacos_view() {
    use rs_consul::types::*;
    let s = ServerProcess::start(bin(), &[]);
    let token = bootstrap(&s).await;
    // DNS carries no token: it answers with the DNS token's rights (here the management token).
    set_dns_token(&s, &token).await;
    let consul = Arc::new(rs_consul::Consul::new(rs_consul::Config {
        address: format!("http://{}", s.api),
        token: Some(token.clone()),
        hyper_builder: hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new()),
    }));
    let register = |id: &str, port: u16| RegisterEntityPayload {
        ID: None,
        Node: "rust-node".into(),
        Address: "10.8.0.1".into(),
        Datacenter: None,
        TaggedAddresses: HashMap::new(),
        NodeMeta: HashMap::new(),
        Service: Some(RegisterEntityService {
            ID: Some(id.into()),
            Service: "rs-web".into(),
            Tags: vec!["v1".into()],
            TaggedAddresses: HashMap::new(),
            Meta: HashMap::new(),
            Port: Some(port),
            Namespace: None,
        }),
        Checks: vec![],
        SkipNodeUpdate: None,
    };
    consul.register_entity(&register("rs1", 80)).await.expect("register");
    let nodes = |passing| GetServiceNodesRequest { service: "rs-web", near: None, passing, filter: None };
    let first = consul.get_service_nodes(nodes(true), None).await.expect("nodes");
    assert_eq!(first.response.iter().map(|n| (n.node.node.as_str(), n.service.port)).collect::<Vec<_>>(), [("rust-node", 80)]);

    // A blocking query wakes on the next registration.
    let index = first.index;
    let waiter = {
        let consul = consul.clone();
        tokio::spawn(async move {
            let opts = QueryOptions { index: Some(index), wait: Some(Duration::from_secs(20)), ..Default::default() };
            consul.get_service_nodes(GetServiceNodesRequest { service: "rs-web", near: None, passing: false, filter: None }, Some(opts)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    consul.register_entity(&register("rs2", 81)).await.expect("register second");
    let woke = tokio::time::timeout(WAIT, waiter).await.expect("blocking query woke").unwrap().expect("nodes");
    assert!(woke.index > index);
    assert_eq!(woke.response.len(), 2);

    // The same service through Nacos and DNS.
    let n = zhili_client::Client::new(&format!("http://{}", s.nacos.unwrap()), Some(token.clone())).unwrap();
    let (st, _, v) = call(&n, Method::GET, &format!("/nacos/v1/ns/instance/list?serviceName=rs-web&accessToken={token}"), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["hosts"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(dig_short(&s, &["rs-web.service.consul", "A"]), ["10.8.0.1", "10.8.0.1"]);

    consul
        .deregister_entity(&DeregisterEntityPayload {
            Node: Some("rust-node".into()),
            Datacenter: None,
            CheckID: None,
            ServiceID: Some("rs1".into()),
            Namespace: None,
        })
        .await
        .expect("deregister");
    assert_eq!(consul.get_service_nodes(nodes(false), None).await.unwrap().response.len(), 1);

    // KV: write, read, CAS, delete.
    let put = |cas: Option<i64>| CreateOrUpdateKeyRequest { key: "rs/key", check_and_set: cas, ..Default::default() };
    let (ok, _) = consul.create_or_update_key(put(None), b"one".to_vec()).await.expect("put");
    assert!(ok);
    let read = consul.read_key(ReadKeyRequest { key: "rs/key", ..Default::default() }).await.expect("read").response;
    assert_eq!(read[0].value.as_deref(), Some("one"));
    let (ok, _) = consul.create_or_update_key(put(Some(read[0].modify_index + 100)), b"two".to_vec()).await.expect("cas put");
    assert!(!ok, "a stale CAS must not apply");
    let (ok, _) = consul.create_or_update_key(put(Some(read[0].modify_index)), b"two".to_vec()).await.expect("cas put");
    assert!(ok);
    assert!(consul.delete_key(DeleteKeyRequest { key: "rs/key", ..Default::default() }).await.expect("delete"));
    assert!(consul.read_key(ReadKeyRequest { key: "rs/key", ..Default::default() }).await.is_err(), "deleted key reads as not found");

    // A wrong token is refused.
    let anonymous = rs_consul::Consul::new(rs_consul::Config {
        address: format!("http://{}", s.api),
        token: Some("nope".into()),
        hyper_builder: hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new()),
    });
    assert!(anonymous.register_entity(&register("rs3", 82)).await.is_err());
}

/// One service, one instance written through each protocol (native API, Consul agent, Consul
/// catalog via rs-consul, Nacos v1 HTTP, Nacos gRPC via nacos-sdk); every reader (native, Consul
/// health, Nacos v1 list, Nacos gRPC query, DNS, Prometheus SD) sees all five.
#[tokio::test(flavor = "multi_thread")]
async fn every_protocol_sees_what_every_other_registered() {
    let s = ServerProcess::start(bin(), &[]);
    let token = bootstrap(&s).await;
    // DNS carries no token: it answers with the DNS token's rights (here the management token).
    set_dns_token(&s, &token).await;
    let api = client(&s, Some(&token));
    let n = zhili_client::Client::new(&format!("http://{}", s.nacos.unwrap()), Some(token.clone())).unwrap();
    let want: Vec<String> = (1..=5).map(|i| format!("10.20.0.{i}")).collect();

    let (st, _, v) = call(&api, Method::POST, "/api/v1/services/matrix/instances", Some(r#"{"address":"10.20.0.1","port":80}"#)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, _, v) = call(&api, Method::PUT, "/v1/agent/service/register", Some(r#"{"Name":"matrix","ID":"m2","Address":"10.20.0.2","Port":80}"#)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let consul = rs_consul::Consul::new(rs_consul::Config {
        address: format!("http://{}", s.api),
        token: Some(token.clone()),
        hyper_builder: hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new()),
    });
    let service = rs_consul::types::RegisterEntityService {
        ID: Some("m3".into()),
        Service: "matrix".into(),
        Tags: vec![],
        TaggedAddresses: HashMap::new(),
        Meta: HashMap::new(),
        Port: Some(80),
        Namespace: None,
    };
    let entity = rs_consul::types::RegisterEntityPayload {
        ID: None,
        Node: "matrix-node".into(),
        Address: "10.20.0.3".into(),
        Datacenter: None,
        TaggedAddresses: HashMap::new(),
        NodeMeta: HashMap::new(),
        Service: Some(service),
        Checks: vec![],
        SkipNodeUpdate: None,
    };
    consul.register_entity(&entity).await.expect("rs-consul register");
    let (st, r, _) = call(&n, Method::POST, &format!("/nacos/v1/ns/instance?serviceName=matrix&ip=10.20.0.4&port=80&accessToken={token}"), None).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let cache = tempfile::tempdir().unwrap();
    let props = ClientProps::new()
        .server_addr(format!("127.0.0.1:{}", s.nacos.unwrap().port()))
        .remote_grpc_port(s.nacos_grpc.unwrap().port())
        .cache_dir(cache.path().to_path_buf())
        .env_first(false)
        .auth_username("zhili")
        .auth_password(token.clone());
    let naming = NamingServiceBuilder::new(props).enable_auth_plugin_http().build().await.expect("naming service");
    naming.register_instance("matrix".into(), None, instance("10.20.0.5", 80)).await.expect("nacos-sdk register");

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // Native.
    let (_, _, v) = call(&api, Method::GET, "/api/v1/services/matrix/instances", None).await;
    assert_eq!(sorted(v["instances"].as_array().unwrap().iter().map(|i| i["address"].as_str().unwrap().to_string()).collect()), want, "native: {v}");
    // Consul health, passing only.
    let (_, _, v) = call(&api, Method::GET, "/v1/health/service/matrix?passing", None).await;
    // (An empty service address means the node's, as for every Consul client.)
    let consul_addresses =
        v.as_array().unwrap().iter().map(|e| e["Service"]["Address"].as_str().filter(|a| !a.is_empty()).or(e["Node"]["Address"].as_str()).unwrap().to_string());
    assert_eq!(sorted(consul_addresses.collect()), want, "consul: {v}");
    // Nacos v1, healthy only.
    let (_, _, v) = call(&n, Method::GET, &format!("/nacos/v1/ns/instance/list?serviceName=matrix&healthyOnly=true&accessToken={token}"), None).await;
    assert_eq!(sorted(v["hosts"].as_array().unwrap().iter().map(|h| h["ip"].as_str().unwrap().to_string()).collect()), want, "nacos v1: {v}");
    // Nacos gRPC.
    let hosts = naming.select_instances("matrix".into(), None, vec![], false, true).await.expect("select");
    assert_eq!(sorted(hosts.into_iter().map(|h| h.ip).collect()), want, "nacos grpc");
    // DNS.
    assert_eq!(dig_short(&s, &["matrix.service.consul", "A"]), want);
    // Prometheus HTTP SD.
    let (_, _, v) = call(&api, Method::GET, "/api/v1/sd/prometheus", None).await;
    let targets: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["labels"]["__meta_zhili_service"] == "matrix")
        .flat_map(|g| g["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().trim_end_matches(":80").to_string()))
        .collect();
    assert_eq!(sorted(targets), want, "prometheus sd: {v}");
}

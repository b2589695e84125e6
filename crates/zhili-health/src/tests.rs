use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};

use zhili_model::{CheckKind, CheckSpec};
use zhili_test_support::{grpc_health_target, http_target};

use super::probe::{decode_health_status, encode_health_request};
use super::*;

fn def(json: &str) -> CheckDefinition {
    serde_json::from_str::<CheckSpec>(json).unwrap().validate("check", 0).unwrap()
}

#[test]
fn thresholds_need_consecutive_results() {
    let mut t = Thresholds::new(&def(r#"{"kind":"tcp","address":"127.0.0.1:1","success_before_passing":2,"failures_before_critical":3}"#));
    assert_eq!(t.observe(HealthStatus::Passing), None);
    assert_eq!(t.observe(HealthStatus::Passing), Some(HealthStatus::Passing));
    assert_eq!(t.observe(HealthStatus::Critical), None);
    assert_eq!(t.observe(HealthStatus::Critical), None);
    assert_eq!(t.observe(HealthStatus::Passing), None, "a success resets the failure count");
    assert_eq!(t.observe(HealthStatus::Critical), None);
    assert_eq!(t.observe(HealthStatus::Critical), None);
    assert_eq!(t.observe(HealthStatus::Critical), Some(HealthStatus::Critical));
    assert_eq!(t.observe(HealthStatus::Warning), Some(HealthStatus::Warning));
}

#[test]
fn first_failure_is_reported_at_once() {
    // A restarted check does not know what the registry shows, so it reports its first failure.
    let mut t = Thresholds::new(&def(r#"{"kind":"tcp","address":"127.0.0.1:1","failures_before_critical":3}"#));
    assert_eq!(t.observe(HealthStatus::Critical), Some(HealthStatus::Critical));
    assert_eq!(t.observe(HealthStatus::Critical), None);
}

#[test]
fn health_protobuf_round_trip() {
    assert_eq!(encode_health_request(""), Vec::<u8>::new());
    assert_eq!(encode_health_request("ab"), vec![0x0a, 2, b'a', b'b']);
    assert_eq!(decode_health_status(&[0x08, 1]), Some(1));
    assert_eq!(decode_health_status(&[]), Some(0));
    assert_eq!(decode_health_status(&[0x12, 1, b'x', 0x08, 2]), Some(2), "unknown fields are skipped");
    assert_eq!(decode_health_status(&[0x08]), None);
}

#[tokio::test]
async fn http_probe_maps_status_codes() {
    let code = Arc::new(AtomicU16::new(200));
    let addr = http_target(code.clone()).await;
    let probe = Probe::new();
    let kind = def(&format!(r#"{{"kind":"http","url":"http://{addr}/health"}}"#)).kind;
    let r = probe.run(&kind, Duration::from_secs(2)).await;
    assert_eq!(r.status, HealthStatus::Passing, "{}", r.output);
    assert!(r.output.contains("200"), "{}", r.output);
    code.store(429, Ordering::Relaxed);
    assert_eq!(probe.run(&kind, Duration::from_secs(2)).await.status, HealthStatus::Warning);
    code.store(503, Ordering::Relaxed);
    assert_eq!(probe.run(&kind, Duration::from_secs(2)).await.status, HealthStatus::Critical);
}

#[tokio::test]
async fn tcp_and_grpc_probes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap();
    let probe = Probe::new();
    let r = probe.run(&CheckKind::Tcp { address: open.to_string() }, Duration::from_secs(2)).await;
    assert_eq!(r.status, HealthStatus::Passing, "{}", r.output);
    drop(listener);
    let r = probe.run(&CheckKind::Tcp { address: open.to_string() }, Duration::from_secs(2)).await;
    assert_eq!(r.status, HealthStatus::Critical);

    let serving = Arc::new(AtomicU8::new(1));
    let addr = grpc_health_target(serving.clone()).await;
    let kind = CheckKind::Grpc { address: addr.to_string(), grpc_service: "orders".into() };
    let r = probe.run(&kind, Duration::from_secs(2)).await;
    assert_eq!(r.status, HealthStatus::Passing, "{}", r.output);
    serving.store(2, Ordering::Relaxed);
    let r = probe.run(&kind, Duration::from_secs(2)).await;
    assert_eq!(r.status, HealthStatus::Critical);
    assert!(r.output.contains("NOT_SERVING"), "{}", r.output);
}

#[tokio::test]
async fn a_hung_target_does_not_delay_others() {
    // Accepts connections but never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let code = Arc::new(AtomicU16::new(200));
    let good = http_target(code).await;
    let (tx, mut rx) = mpsc::channel(16);
    let engine = HealthEngine::new(tx, 4, Metrics::new());
    let key = |c: &str| CheckKey { namespace: "default".into(), service: "s".into(), instance: "i".into(), check: c.into() };
    engine.schedule(key("hung"), def(&format!(r#"{{"kind":"http","url":"http://{hung_addr}/","interval":"10s","timeout":"10s"}}"#)));
    engine.schedule(key("good"), def(&format!(r#"{{"kind":"http","url":"http://{good}/","interval":"200ms","timeout":"1s"}}"#)));
    let t = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("the good check reports while the hung one waits").unwrap();
    assert_eq!(t.key.check, "good");
    assert_eq!(t.status, HealthStatus::Passing);
    assert_eq!(engine.running(), 2);
    engine.cancel(&key("hung"));
    assert_eq!(engine.running(), 1);
    drop(hung);
}

//! KV and ACLs through the real binary.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};

#[tokio::test]
async fn kv_round_trip_cas_recurse_keys_and_blocking() {
    let s = dev_server();
    let c = client(&s, None);
    let idx = c.kv_put("config/app/db", "postgres://a", None).await.unwrap();
    c.kv_put("config/app/cache", "redis://b", None).await.unwrap();
    c.kv_put("config/other", "x", None).await.unwrap();
    let kv = c.kv_get("config/app/db").await.unwrap().unwrap();
    assert_eq!(kv.bytes().unwrap(), b"postgres://a");
    assert_eq!(kv.modify_index, idx);
    let (_, r, _) = call(&c, Method::GET, "/api/v1/kv/config/app/db?raw", None).await;
    assert_eq!(&r.body[..], b"postgres://a");
    assert!(r.index >= idx);

    // CAS: 0 = create only; mismatch is 409 and writes nothing.
    expect_problem(&c, Method::PUT, "/api/v1/kv/config/app/db?cas=0", Some("y"), StatusCode::CONFLICT, "cas").await;
    expect_problem(&c, Method::PUT, &format!("/api/v1/kv/config/app/db?cas={}", idx + 1000), Some("y"), StatusCode::CONFLICT, "cas").await;
    let idx2 = c.kv_put("config/app/db", "postgres://c", Some(idx)).await.unwrap();
    assert!(idx2 > idx);
    assert_eq!(c.kv_get("config/app/db").await.unwrap().unwrap().version, 2);

    let all = c.kv_list("config/").await.unwrap();
    assert_eq!(all.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["config/app/cache", "config/app/db", "config/other"]);
    assert_eq!(c.kv_keys("config/", Some("/")).await.unwrap(), ["config/app/", "config/other"]);
    assert_eq!(c.kv_keys("", None).await.unwrap().len(), 3);

    // Blocking: an unrelated write does not wake the reader; a write to the key does.
    let c2 = c.clone();
    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        let (index, kv) = c2.kv_watch("config/app/db", idx2, Duration::from_secs(20)).await.unwrap();
        (start.elapsed(), index, kv)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.kv_put("config/unrelated", "z", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "an unrelated key does not wake a key watch");
    c.kv_put("config/app/db", "postgres://d", None).await.unwrap();
    let (elapsed, index, kv) = waiter.await.unwrap();
    assert!(elapsed < Duration::from_secs(10));
    assert!(index > idx2);
    assert_eq!(kv.unwrap().bytes().unwrap(), b"postgres://d");

    // Values are bounded at 512 KiB.
    let big = "v".repeat(512 * 1024 + 1);
    expect_problem(&c, Method::PUT, "/api/v1/kv/big", Some(&big), StatusCode::PAYLOAD_TOO_LARGE, "value").await;
    c.kv_put("big", "v".repeat(512 * 1024), None).await.unwrap();
    expect_problem(&c, Method::PUT, "/api/v1/kv/a/../b", Some("x"), StatusCode::BAD_REQUEST, "key").await;

    // Deletes.
    c.kv_delete("config/app/", true).await.unwrap();
    assert!(c.kv_get("config/app/db").await.unwrap().is_none());
    assert!(c.kv_get("config/other").await.unwrap().is_some());
    let (st, _, v) = call(&c, Method::DELETE, "/api/v1/kv/config/other?cas=1", None).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    c.kv_delete("config/other", false).await.unwrap();
    assert!(c.kv_get("config/other").await.unwrap().is_none());
}

#[tokio::test]
async fn acls_default_deny_bootstrap_once_and_scoped_tokens() {
    let s = ServerProcess::start(bin(), &[]);
    let anon = client(&s, None);
    expect_problem(&anon, Method::GET, "/api/v1/services/web/instances", None, StatusCode::FORBIDDEN, "permission denied").await;
    // Listings are filtered to what the caller may read (as Consul does): nothing, for anonymous.
    c_services_empty(&anon).await;
    expect_problem(&anon, Method::PUT, "/api/v1/kv/x", Some("1"), StatusCode::FORBIDDEN, "kv").await;
    expect_problem(&client(&s, Some("made-up")), Method::GET, "/api/v1/kv/x", None, StatusCode::FORBIDDEN, "token not found").await;
    // Health and metrics stay open to monitoring.
    assert_eq!(call(&anon, Method::GET, "/health/ready", None).await.0, StatusCode::OK);

    let (st, _, root) = call(&anon, Method::POST, "/api/v1/acl/bootstrap", None).await;
    assert_eq!(st, StatusCode::OK, "{root}");
    let secret = root["secret_id"].as_str().unwrap().to_string();
    expect_problem(&anon, Method::POST, "/api/v1/acl/bootstrap", None, StatusCode::FORBIDDEN, "already").await;

    let admin = client(&s, Some(&secret));
    let (st, _, v) = call(
        &admin,
        Method::PUT,
        "/api/v1/acl/policies/app",
        Some(r#"{"name":"app","rules":[{"resource":"kv","prefix":"app/","access":"write"},{"resource":"service","prefix":"web","access":"read"}]}"#),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    expect_problem(&admin, Method::POST, "/api/v1/acl/tokens", Some(r#"{"policies":["nope"]}"#), StatusCode::BAD_REQUEST, "policies[0]").await;
    let (st, _, tok) = call(&admin, Method::POST, "/api/v1/acl/tokens", Some(r#"{"description":"app","policies":["app"]}"#)).await;
    assert_eq!(st, StatusCode::CREATED, "{tok}");
    let app = client(&s, Some(tok["secret_id"].as_str().unwrap()));
    app.kv_put("app/db", "x", None).await.unwrap();
    expect_problem(&app, Method::PUT, "/api/v1/kv/other", Some("x"), StatusCode::FORBIDDEN, "other").await;
    expect_problem(&app, Method::POST, "/api/v1/services/web/instances", Some(r#"{"address":"10.0.0.1","port":1}"#), StatusCode::FORBIDDEN, "web").await;
    assert_eq!(call(&app, Method::GET, "/api/v1/services/web/instances", None).await.0, StatusCode::OK);
    expect_problem(&app, Method::GET, "/api/v1/acl/tokens", None, StatusCode::FORBIDDEN, "acl").await;
    // A recursive read only returns what the token may see.
    admin.kv_put("secret/x", "s", None).await.unwrap();
    let visible = app.kv_list("").await.unwrap();
    assert_eq!(visible.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["app/db"]);
    let (_, _, me) = call(&app, Method::GET, "/api/v1/acl/token/self", None).await;
    assert_eq!(me["description"], "app");

    // The CLI prints the server's detail and exits non-zero.
    let out = std::process::Command::new(bin())
        .args(["kv", "put", "other", "v"])
        .env("ZHILI_ADDR", format!("http://{}", s.api))
        .env("ZHILI_TOKEN", tok["secret_id"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied") && err.contains("other"), "{err}");
    let out = std::process::Command::new(bin())
        .args(["kv", "get", "app/db", "--raw"])
        .env("ZHILI_ADDR", format!("http://{}", s.api))
        .env("ZHILI_TOKEN", tok["secret_id"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"x");
}

async fn c_services_empty(c: &zhili_client::Client) {
    let (st, _, v) = call(c, Method::GET, "/api/v1/services", None).await;
    assert_eq!((st, v), (StatusCode::OK, serde_json::json!([])));
}

#[tokio::test]
async fn config_errors_exit_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("zhili.toml");
    std::fs::write(&cfg, "data_dir = \"x\"\napi_adr = \"127.0.0.1:1\"\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--config".into(), cfg.display().to_string()], "api_adr"),
        (vec!["--api-addr".into(), "nowhere".into()], "api_addr"),
        (vec!["--log-format".into(), "xml".into()], "log_format"),
        (vec!["--check-concurrency".into(), "0".into()], "check_concurrency"),
        (vec!["--tls-cert".into(), "c.pem".into()], "tls_key"),
        (vec!["--dtm-addr".into(), "nowhere".into()], "dtm_addr"),
        (vec!["--txn-alert-webhook".into(), "ftp://x".into()], "txn_alert_webhook"),
        (vec!["--txn-retention".into(), "7 days".into()], "txn_retention"),
    ];
    for (args, field) in cases {
        let out = std::process::Command::new(bin()).arg("server").args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{args:?}: {err}");
    }
    let out = std::process::Command::new(bin()).arg("server").env("ZHILI_API_ADDR", "bad").output().unwrap();
    assert_eq!(out.status.code(), Some(64), "env values are validated too");
    let out = std::process::Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["server", "service", "instance", "kv", "acl"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[tokio::test]
async fn tls_on_the_api_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let s = ServerProcess::start(bin(), &["--dev", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(&cert).unwrap())) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(s.api).await.unwrap();
    let mut tls = connector.connect(rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(), tcp).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET /health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Plain HTTP on the TLS port gets nowhere.
    let plain = client(&s, None);
    assert!(plain.send(Method::GET, "/health/ready", None, Duration::from_secs(5)).await.is_err());
}

//! Gateway authentication and authorization through the real binary: JWT against a JWKS URL
//! (ES256 and RS256, key rotation) and static keys (HS256, RS256 PEM), claims to headers, scopes
//! and consumers; consumers' API keys with per-consumer rate limits; CORS; TLS with certificates
//! chosen by SNI, HTTP/2 over TLS, and mTLS client certificates. Keys and certificates are made
//! with openssl for each run.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use zhili_test_support::{Document, Upstream};

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its public half as a JWK.
struct SigningKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
    public_pem: String,
}

fn es256_key(dir: &Path, kid: &str) -> SigningKey {
    let (private, der) = (format!("{kid}.pem"), format!("{kid}.pub.der"));
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &private]);
    openssl(dir, &["pkey", "-in", &private, "-pubout", "-outform", "DER", "-out", &der]);
    let spki = std::fs::read(dir.join(&der)).unwrap();
    // The SubjectPublicKeyInfo of a P-256 key ends with the point 04 || X || Y.
    let point = &spki[spki.len() - 64..];
    let pem = std::fs::read(dir.join(&private)).unwrap();
    SigningKey {
        alg: Algorithm::ES256,
        kid: kid.into(),
        key: EncodingKey::from_ec_pem(&pem).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "x": b64url(&point[..32]), "y": b64url(&point[32..])}),
        public_pem: openssl(dir, &["pkey", "-in", &private, "-pubout"]),
    }
}

fn rs256_key(dir: &Path, kid: &str) -> SigningKey {
    let private = format!("{kid}.pem");
    openssl(dir, &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &private]);
    let modulus = openssl(dir, &["rsa", "-in", &private, "-noout", "-modulus"]);
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let pem = std::fs::read(dir.join(&private)).unwrap();
    SigningKey {
        alg: Algorithm::RS256,
        kid: kid.into(),
        key: EncodingKey::from_rsa_pem(&pem).unwrap(),
        jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64url(&n), "e": "AQAB"}),
        public_pem: openssl(dir, &["pkey", "-in", &private, "-pubout"]),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn sign(k: &SigningKey, claims: Value) -> String {
    let mut h = Header::new(k.alg);
    h.kid = Some(k.kid.clone());
    jsonwebtoken::encode(&h, &claims, &k.key).unwrap()
}

fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({"sub": sub, "iss": "https://issuer.test", "aud": "orders", "exp": now() + 300, "iat": now()});
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

async fn bearer(gw: &zhili_client::Client, path: &str, token: &str) -> (StatusCode, http::HeaderMap, String) {
    get(gw, path, &[("authorization", &format!("Bearer {token}"))]).await
}

/// Waits until `path` answers `want` with this token.
async fn until_bearer(gw: &zhili_client::Client, path: &str, token: &str, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, _, body) = bearer(gw, path, token).await;
        if st == want {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never answered {want} (last {st} {body})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_with_jwks_rotation_static_keys_claims_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, r1, k2) = (es256_key(dir.path(), "k1"), rs256_key(dir.path(), "r1"), es256_key(dir.path(), "k2"));
    let rs_static = rs256_key(dir.path(), "static-rs");
    let doc = Document::start(&jwks(&[&k1, &r1])).await;
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    let up = Upstream::start("api-1").await;
    register(&api, "orders", &up, &[]).await;
    let jwt = json!({"jwks_url": doc.url("/.well-known/jwks.json"), "issuer": "https://issuer.test", "audiences": ["orders"],
                     "claims_to_headers": {"sub": "x-user", "tenant": "x-tenant"}});
    put_route(&api, "jwt", &json!({"path_prefix": "/jwt/", "service": "orders", "auth": {"jwt": jwt}}).to_string()).await;
    put_route(&api, "admin", &json!({"path_prefix": "/admin/", "service": "orders", "auth": {"jwt": jwt, "scopes": ["orders:admin"]}}).to_string()).await;
    let secret = "hs256-secret-of-at-least-32-bytes!!";
    put_route(&api, "hs", &json!({"path_prefix": "/hs/", "service": "orders", "auth": {"jwt": {"keys": [{"alg": "HS256", "secret": secret}]}}}).to_string())
        .await;
    put_route(
        &api,
        "rs",
        &json!({"path_prefix": "/rs/", "service": "orders", "auth": {"jwt": {"keys": [{"alg": "RS256", "kid": "static-rs", "public_key": rs_static.public_pem}]}}})
            .to_string(),
    )
    .await;
    // Bad auth settings are refused at the API with the field named.
    for (route, field) in [
        (
            json!({"service": "orders", "auth": {"jwt": {"keys": [{"alg": "RS256", "public_key": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"}]}}}),
            "auth.jwt.keys[0].public_key",
        ),
        (json!({"service": "orders", "auth": {"jwt": {"keys": [{"alg": "HS256", "secret": "short"}]}}}), "auth.jwt.keys[0].secret"),
        (json!({"service": "orders", "auth": {"jwt": {"jwks_url": "file:///etc/passwd"}}}), "auth.jwt.jwks_url"),
    ] {
        expect_problem(&api, Method::PUT, "/api/v1/routes/bad", Some(&route.to_string()), StatusCode::BAD_REQUEST, field).await;
    }

    let alice = sign(&k1, claims("alice", json!({"tenant": "t1", "scope": "orders:read"})));
    until_bearer(&gw, "/jwt/list", &alice, StatusCode::OK).await;
    // The upstream sees who called, and nothing the client claimed for itself.
    let (st, _, body) = get(&gw, "/jwt/list", &[("authorization", &format!("Bearer {alice}")), ("x-user", "mallory"), ("x-consumer", "root")]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "api-1 /jwt/list"));
    {
        let seen = up.last_headers.lock().unwrap();
        assert_eq!(seen.get("x-user").unwrap(), "alice");
        assert_eq!(seen.get("x-tenant").unwrap(), "t1");
        assert_eq!(seen.get("x-consumer").unwrap(), "alice");
    }
    // RS256 from the same JWKS.
    assert_eq!(bearer(&gw, "/jwt/x", &sign(&r1, claims("bob", json!({})))).await.0, StatusCode::OK);

    // Every way a token can be wrong: 401 with the reason, and the upstream never hears of it.
    let hits = up.hits.load(Ordering::Relaxed);
    let (st, h, body) = get(&gw, "/jwt/x", &[]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("credentials required"), "{body}");
    assert!(h.get("www-authenticate").unwrap().to_str().unwrap().starts_with("Bearer realm=\"zhili\""));
    let mut tampered = alice.clone();
    tampered.replace_range(tampered.len() - 6.., "AAAAAA");
    let hs_on_jwks = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims("eve", json!({})), &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    for (token, reason) in [
        (sign(&k1, claims("a", json!({"exp": now() - 3600}))), "expired"),
        (sign(&k1, claims("a", json!({"aud": "billing"}))), "audience"),
        (sign(&k1, claims("a", json!({"iss": "https://evil.test"}))), "issuer"),
        (sign(&k1, claims("a", json!({"nbf": now() + 3600}))), "not valid yet"),
        (tampered, "signature"),
        (hs_on_jwks, "no HS256 key"),
        ("garbage".to_string(), "malformed"),
    ] {
        let (st, _, body) = bearer(&gw, "/jwt/x", &token).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{reason}: {body}");
        assert!(body.contains(reason), "{body} should say {reason}");
    }
    // Scopes: 403 without, 200 with.
    let (st, _, body) = bearer(&gw, "/admin/x", &alice).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("orders:admin"), "{body}");
    assert_eq!(up.hits.load(Ordering::Relaxed), hits, "refused requests reached the upstream");
    let admin = sign(&k1, claims("carol", json!({"scope": "orders:read orders:admin"})));
    assert_eq!(bearer(&gw, "/admin/x", &admin).await.0, StatusCode::OK);

    // Static keys: HS256 and an RS256 PEM.
    let hs = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims("dave", json!({})), &EncodingKey::from_secret(secret.as_bytes())).unwrap();
    until_bearer(&gw, "/hs/x", &hs, StatusCode::OK).await;
    until_bearer(&gw, "/rs/x", &sign(&rs_static, claims("erin", json!({}))), StatusCode::OK).await;
    assert_eq!(bearer(&gw, "/rs/x", &sign(&r1, claims("erin", json!({})))).await.0, StatusCode::UNAUTHORIZED, "another RSA key");

    // Rotation: a token signed with a key the JWKS does not hold yet is refused, and unknown kids
    // cannot make the gateway hammer the JWKS endpoint.
    let new_token = sign(&k2, claims("frank", json!({})));
    let fetches = doc.hits.load(Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(bearer(&gw, "/jwt/x", &new_token).await.0, StatusCode::UNAUTHORIZED);
    }
    let refetches = doc.hits.load(Ordering::Relaxed) - fetches;
    assert!(refetches <= 3, "20 unknown-kid tokens made {refetches} JWKS fetches");
    // The issuer rotates k1 out and k2 in: new tokens work within a second or so, old ones stop.
    doc.set(&jwks(&[&k2, &r1]));
    until_bearer(&gw, "/jwt/x", &new_token, StatusCode::OK).await;
    let (st, _, body) = bearer(&gw, "/jwt/x", &alice).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "a token of the retired key: {body}");

    // The denials are counted.
    let (_, r, _) = call(&api, Method::GET, "/metrics", None).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let denied = text.lines().find_map(|l| l.strip_prefix("zhili_gateway_auth_denied_total ")).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    assert!(denied >= 30, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_api_keys_rate_limits_per_consumer_and_cors() {
    let s = dev_server();
    let api = client(&s, None);
    let gw = gw_client(&s);
    let up = Upstream::start("api-1").await;
    register(&api, "orders", &up, &[]).await;
    let (key_a, key_b) = ("alice-key-0123456789abcdef", "bob-key-0123456789abcdef00");
    for (name, key) in [("alice", key_a), ("bob", key_b)] {
        let (st, _, v) =
            call(&api, Method::PUT, &format!("/api/v1/consumers/{name}"), Some(&json!({"api_keys": [key], "scopes": ["orders:read"]}).to_string())).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    // Keys are stored as digests only; bad consumers are refused with the field named.
    let (_, _, v) = call(&api, Method::GET, "/api/v1/consumers/alice", None).await;
    let stored = v["api_keys"][0].as_str().unwrap();
    assert!(stored.starts_with("sha256:") && !stored.contains(key_a), "{v}");
    expect_problem(&api, Method::PUT, "/api/v1/consumers/x", Some(r#"{"api_keys": ["short"]}"#), StatusCode::BAD_REQUEST, "api_keys[0]").await;
    expect_problem(&api, Method::PUT, "/api/v1/consumers/x", Some(r#"{"api_keys": [], "bogus": 1}"#), StatusCode::BAD_REQUEST, "bogus").await;
    let (_, _, v) = call(&api, Method::GET, "/api/v1/consumers", None).await;
    assert_eq!(v["consumers"].as_array().unwrap().len(), 2, "{v}");

    put_route(
        &api,
        "keys",
        &json!({"path_prefix": "/k/", "service": "orders", "auth": {"api_key": {}, "hide_credentials": true, "scopes": ["orders:read"]},
                "rate_limit": {"rate": 0.5, "burst": 2, "key": {"consumer": true}},
                "cors": {"allow_origins": ["https://app.test"], "expose_headers": ["x-request-id"], "max_age": 60}})
        .to_string(),
    )
    .await;
    put_route(
        &api,
        "alice-only",
        &json!({"path_prefix": "/a/", "service": "orders", "auth": {"api_key": {"query": "apikey"}, "consumers": ["alice"]}}).to_string(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&gw, "/k/x", &[("x-api-key", key_a)]).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "the consumer's key never worked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let seen = up.last_headers.lock().unwrap();
        assert_eq!(seen.get("x-consumer").unwrap(), "alice");
        assert!(!seen.contains_key("x-api-key"), "hide_credentials");
    }
    // Unknown keys: 401; a known consumer not on the route's list: 403; a query-string key.
    let hits = up.hits.load(Ordering::Relaxed);
    let (st, _, body) = get(&gw, "/k/x", &[("x-api-key", "not-a-key-of-anybody-at-all")]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("API key"), "{body}");
    let (st, _, body) = get(&gw, "/a/x", &[("x-api-key", key_b)]).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("bob"), "{body}");
    assert_eq!(up.hits.load(Ordering::Relaxed), hits);
    assert_eq!(get(&gw, &format!("/a/x?apikey={key_a}"), &[]).await.0, StatusCode::OK);

    // Rate limit per consumer: alice spends her burst (one was spent above), bob still has his.
    let mut alice_codes = vec![];
    for _ in 0..3 {
        alice_codes.push(get(&gw, "/k/x", &[("x-api-key", key_a)]).await.0);
    }
    assert!(alice_codes.contains(&StatusCode::TOO_MANY_REQUESTS), "{alice_codes:?}");
    assert_eq!(get(&gw, "/k/x", &[("x-api-key", key_b)]).await.0, StatusCode::OK);

    // CORS: the gateway answers preflights itself; answers carry the allowance for allowed origins.
    let preflight = [("origin", "https://app.test"), ("access-control-request-method", "GET"), ("access-control-request-headers", "x-api-key")];
    let (st, h, _) = gw_send(&gw, Method::OPTIONS, "/k/x", &preflight).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(h.get("access-control-allow-origin").unwrap(), "https://app.test");
    assert!(h.get("access-control-allow-methods").unwrap().to_str().unwrap().contains("GET"));
    assert_eq!(h.get("access-control-allow-headers").unwrap(), "x-api-key");
    assert_eq!(h.get("access-control-max-age").unwrap(), "60");
    let (st, _, body) = gw_send(&gw, Method::OPTIONS, "/k/x", &[("origin", "https://evil.test"), ("access-control-request-method", "GET")]).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let (st, h, _) = get(&gw, "/k/x", &[("origin", "https://app.test"), ("x-api-key", key_b)]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h.get("access-control-allow-origin").unwrap(), "https://app.test");
    assert_eq!(h.get("access-control-expose-headers").unwrap(), "x-request-id");
    let (st, h, _) = get(&gw, "/k/x", &[("origin", "https://app.test")]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("access-control-allow-origin"), "a browser can read why it was refused");
    let (_, h, _) = get(&gw, "/k/x", &[("origin", "https://evil.test"), ("x-api-key", key_b)]).await;
    assert!(!h.contains_key("access-control-allow-origin"));

    // Deleting a consumer revokes its key.
    let (st, _, _) = call(&api, Method::DELETE, "/api/v1/consumers/bob", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&gw, "/a/x", &[("x-api-key", key_b)]).await.0 != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "a deleted consumer's key kept working");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A test CA and certificates it signs.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let pki = Self { dir: dir.to_path_buf() };
        let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
        openssl(
            dir,
            &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", &format!("/CN={name}")]
                .iter()
                .copied()
                .chain(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", "-keyout", &key, "-out", &cert])
                .collect::<Vec<_>>(),
        );
        pki
    }

    /// A leaf for `cn` signed by CA `ca`: (cert path, key path).
    fn leaf(&self, ca: &str, cn: &str, ext: &str) -> (PathBuf, PathBuf) {
        let (key, csr, cert, extfile) = (format!("{cn}.key"), format!("{cn}.csr"), format!("{cn}.pem"), format!("{cn}.ext"));
        std::fs::write(self.dir.join(&extfile), format!("basicConstraints=CA:FALSE\n{ext}\n")).unwrap();
        openssl(
            &self.dir,
            &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", &format!("/CN={cn}"), "-keyout", &key, "-out", &csr],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &extfile,
                "-out",
                &cert,
            ],
        );
        (self.dir.join(cert), self.dir.join(key))
    }
}

fn tls_client(ca: &Path, alpn: &[&[u8]], client: Option<&(PathBuf, PathBuf)>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in zhili_gateway::tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => b.with_client_auth_cert(zhili_gateway::tls::load_certs(cert).unwrap(), zhili_gateway::tls::load_key(key).unwrap()).unwrap(),
        None => b.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS to the gateway: the status line and body, and the server
/// certificate's common name.
async fn https_get(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    sni: &str,
    path: &str,
) -> Result<(String, Option<String>), std::io::Error> {
    https_get_with(addr, connector, sni, path, "").await
}

/// The same with a bearer token (none when empty).
async fn https_get_with(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    sni: &str,
    path: &str,
    token: &str,
) -> Result<(String, Option<String>), std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector.connect(rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap(), tcp).await?;
    let cn = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| zhili_gateway::auth::common_name(c));
    let auth = if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\n{auth}Connection: close\r\n\r\n").as_bytes()).await?;
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await?;
    Ok((resp, cn))
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_certificates_by_sni_h2_over_tls_and_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "ca");
    let _rogue = Pki::new(dir.path(), "rogue-ca");
    let a = pki.leaf("ca", "a.test", "subjectAltName=DNS:a.test\nextendedKeyUsage=serverAuth");
    let b = pki.leaf("ca", "b.test", "subjectAltName=DNS:b.test\nextendedKeyUsage=serverAuth");
    let svc = pki.leaf("ca", "svc-a", "extendedKeyUsage=clientAuth");
    let rogue = pki.leaf("rogue-ca", "svc-rogue", "extendedKeyUsage=clientAuth");
    let ca = dir.path().join("ca.pem");
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let certs = format!("{},{}", path(&a.0), path(&b.0));
    let keys = format!("{},{}", path(&a.1), path(&b.1));
    // The server trusts the test CA for outgoing HTTPS (the JWKS below), as it would a company CA.
    let s = ServerProcess::start_with_env(
        bin(),
        &["--dev", "--gateway-tls-cert", &certs, "--gateway-tls-key", &keys, "--gateway-client-ca", ca.to_str().unwrap()],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    let api = client(&s, None);
    let up = Upstream::start("api-1").await;
    register(&api, "orders", &up, &[]).await;
    put_route(&api, "open", r#"{"path_prefix": "/o/", "service": "orders"}"#).await;
    put_route(&api, "mtls", r#"{"path_prefix": "/m/", "service": "orders", "auth": {"mtls": true, "consumers": ["svc-a"]}}"#).await;
    let addr = s.gateway.unwrap();
    let plain = tls_client(&ca, &[b"http/1.1"], None);

    // The certificate follows the SNI name.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (resp, cn) = https_get(addr, &plain, "a.test", "/o/x").await.unwrap();
        assert_eq!(cn.as_deref(), Some("a.test"));
        if resp.starts_with("HTTP/1.1 200") {
            assert!(resp.ends_with("api-1 /o/x"), "{resp}");
            break;
        }
        assert!(Instant::now() < deadline, "{resp}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, cn) = https_get(addr, &plain, "b.test", "/o/x").await.unwrap();
    assert_eq!(cn.as_deref(), Some("b.test"));
    assert!(up.last_headers.lock().unwrap().get("x-forwarded-proto").is_some_and(|v| v == "https"));

    // HTTP/2 over TLS (ALPN h2).
    let h2 = tls_client(&ca, &[b"h2"], None);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = h2.connect(rustls::pki_types::ServerName::try_from("a.test").unwrap(), tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = http::Request::get(format!("https://a.test/o/h2-{i}")).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!((resp.status(), resp.version()), (StatusCode::OK, http::Version::HTTP_2));
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        assert_eq!(body, format!("api-1 /o/h2-{i}").as_bytes());
    }

    // mTLS: no certificate → 401; the CA's client certificate → the consumer is its CN;
    // a certificate from another CA does not get through the handshake.
    let (resp, _) = https_get(addr, &plain, "a.test", "/m/x").await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    assert!(resp.contains("client certificate"), "{resp}");
    let with_cert = tls_client(&ca, &[b"http/1.1"], Some(&svc));
    let (resp, _) = https_get(addr, &with_cert, "a.test", "/m/x").await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(up.last_headers.lock().unwrap().get("x-consumer").unwrap(), "svc-a");
    let with_rogue = tls_client(&ca, &[b"http/1.1"], Some(&rogue));
    match https_get(addr, &with_rogue, "a.test", "/m/x").await {
        Err(_) => {}
        Ok((resp, _)) => assert!(resp.is_empty(), "a certificate of an unknown CA was accepted: {resp}"),
    }

    // A JWKS served over HTTPS: fetched when its certificate chains to a trusted CA, refused
    // (and so are the tokens) when it does not.
    let key = es256_key(dir.path(), "tls-k1");
    let good = https_document(pki.leaf("ca", "localhost", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth"), jwks(&[&key])).await;
    let bad = https_document(pki.leaf("rogue-ca", "jwks-rogue", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth"), jwks(&[&key])).await;
    for (name, port) in [("j", good), ("r", bad)] {
        let route = json!({"path_prefix": format!("/{name}/"), "service": "orders", "auth": {"jwt": {"jwks_url": format!("https://localhost:{port}/jwks")}}});
        put_route(&api, name, &route.to_string()).await;
    }
    let token = sign(&key, json!({"sub": "tls-user", "exp": now() + 300}));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (resp, _) = https_get_with(addr, &plain, "a.test", "/j/x", &token).await.unwrap();
        if resp.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "{resp}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (resp, _) = https_get_with(addr, &plain, "a.test", "/r/x", &token).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 401") && resp.contains("no ES256 key"), "{resp}");
}

/// A JWKS document served over HTTPS on 127.0.0.1 with the given certificate; returns the port.
async fn https_document((cert, key): (PathBuf, PathBuf), body: String) -> u16 {
    let acceptor = zhili_gateway::tls::acceptor(&[(cert, key)], None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await;
            });
        }
    });
    port
}

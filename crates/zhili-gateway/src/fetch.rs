//! A small HTTP(S) GET for documents the gateway needs from elsewhere (JWKS). HTTPS trusts the
//! system's CA bundle (`SSL_CERT_FILE`, else `/etc/ssl/certs/ca-certificates.crt`).

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

fn roots() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let path = std::env::var_os("SSL_CERT_FILE").unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
            let mut roots = rustls::RootCertStore::empty();
            match std::fs::File::open(&path) {
                Ok(f) => {
                    let mut reader = std::io::BufReader::new(f);
                    let certs = rustls_pemfile::certs(&mut reader).filter_map(Result::ok);
                    let (added, _) = roots.add_parsable_certificates(certs);
                    tracing::debug!(path = ?path, added, "CA bundle loaded");
                }
                Err(e) => tracing::warn!(path = ?path, error = %e, "no CA bundle: HTTPS fetches will fail"),
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

async fn exchange<S>(io: S, uri: &Uri, limit: usize) -> Result<Bytes, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let host = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "zhili-gateway")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    Limited::new(resp.into_body(), limit).collect().await.map(|c| c.to_bytes()).map_err(|e| format!("reading the body (limit {limit} bytes): {e}"))
}

/// GETs `url` (http or https) and returns a 2xx body of at most `limit` bytes.
pub async fn get(url: &str, limit: usize) -> Result<Bytes, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.trim_start_matches('[').trim_end_matches(']').to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    if !https {
        return exchange(tcp, &uri, limit).await;
    }
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(roots()).connect(name, tcp).await.map_err(|e| format!("TLS with {host}: {e}"))?;
    exchange(tls, &uri, limit).await
}

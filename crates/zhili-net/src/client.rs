//! A small HTTP(S) client for Zhili's own outbound calls: the gateway's JWKS fetches and
//! webhook deliveries. One request per connection (these calls are rare or already paced);
//! HTTPS trusts the system's CA bundle (`SSL_CERT_FILE`, else
//! `/etc/ssl/certs/ca-certificates.crt`).

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
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

/// What comes back: the status and at most `limit` bytes of the body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

async fn exchange<S>(io: S, uri: &Uri, method: Method, headers: HeaderMap, body: Bytes, limit: usize) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let host = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = Request::builder().method(method).uri(path).body(Full::new(body)).map_err(|e| e.to_string())?;
    *req.headers_mut() = headers;
    let h = req.headers_mut();
    h.insert(http::header::HOST, http::HeaderValue::from_str(&host).map_err(|e| e.to_string())?);
    h.entry(http::header::USER_AGENT).or_insert(http::HeaderValue::from_static("zhili"));
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body =
        Limited::new(resp.into_body(), limit).collect().await.map(|c| c.to_bytes()).map_err(|e| format!("reading the body (limit {limit} bytes): {e}"))?;
    Ok(Answer { status, body })
}

/// GETs `url` (http or https) and returns a 2xx body of at most `limit` bytes.
pub async fn get(url: &str, limit: usize) -> Result<Bytes, String> {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::ACCEPT, http::HeaderValue::from_static("application/json"));
    let a = request(Method::GET, url, headers, Bytes::new(), limit).await?;
    if !a.status.is_success() {
        return Err(format!("answered {}", a.status));
    }
    Ok(a.body)
}

/// Sends one request to `url` (http or https) and returns whatever status came back.
pub async fn request(method: Method, url: &str, headers: HeaderMap, body: Bytes, limit: usize) -> Result<Answer, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.trim_start_matches('[').trim_end_matches(']').to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if !https {
        return exchange(tcp, &uri, method, headers, body, limit).await;
    }
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(roots()).connect(name, tcp).await.map_err(|e| format!("TLS with {host}: {e}"))?;
    exchange(tls, &uri, method, headers, body, limit).await
}

//! A small HTTP(S) client for Zhili's own outbound calls: the gateway's JWKS fetches and
//! webhook deliveries. [`request`] makes one call on a connection of its own; a
//! [`Connection`] keeps one alive for repeated calls to the same origin. HTTPS trusts the system's CA bundle (`SSL_CERT_FILE`, else
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

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Where a URL points: its parsed form, host, port and whether it is HTTPS.
struct Target {
    uri: Uri,
    host: String,
    port: u16,
    https: bool,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.trim_start_matches('[').trim_end_matches(']').to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self { uri, host, port, https })
    }

    fn origin(&self) -> (bool, &str, u16) {
        (self.https, &self.host, self.port)
    }

    /// A new HTTP/1.1 connection (TLS for https), its driver spawned.
    async fn connect(&self) -> Result<Sender, String> {
        let (host, port) = (self.host.as_str(), self.port);
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if !self.https {
            return handshake(tcp).await;
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(roots()).connect(name, tcp).await.map_err(|e| format!("TLS with {host}: {e}"))?;
        handshake(tls).await
    }
}

async fn handshake<S>(io: S) -> Result<Sender, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn exchange(sender: &mut Sender, target: &Target, method: Method, headers: HeaderMap, body: Bytes, limit: usize) -> Result<Answer, String> {
    let host = target.uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let path = target.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = Request::builder().method(method).uri(path).body(Full::new(body)).map_err(|e| e.to_string())?;
    *req.headers_mut() = headers;
    let h = req.headers_mut();
    h.insert(http::header::HOST, http::HeaderValue::from_str(&host).map_err(|e| e.to_string())?);
    h.entry(http::header::USER_AGENT).or_insert(http::HeaderValue::from_static("zhili"));
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body =
        Limited::new(resp.into_body(), limit).collect().await.map(|c| c.to_bytes()).map_err(|e| format!("reading the body (limit {limit} bytes): {e}"))?;
    Ok(Answer { status, body })
}

/// A kept-alive connection for repeated calls to one origin (a webhook receiver): opened on
/// first use, reopened when the origin changes or the peer closed it. A call on a reused
/// connection that fails is made once more on a fresh one (the peer may have closed it while
/// idle), so callers must tolerate a repeated request, as at-least-once delivery does.
#[derive(Default)]
pub struct Connection {
    open: Option<((bool, String, u16), Sender)>,
}

impl Connection {
    pub async fn request(&mut self, method: Method, url: &str, headers: HeaderMap, body: Bytes, limit: usize) -> Result<Answer, String> {
        let target = Target::parse(url)?;
        let (https, host, port) = target.origin();
        let reusable = self.open.take().filter(|((s, h, p), sender)| (*s, h.as_str(), *p) == (https, host, port) && !sender.is_closed());
        let origin = (https, host.to_string(), port);
        if let Some((_, mut sender)) = reusable {
            if let Ok(a) = exchange(&mut sender, &target, method.clone(), headers.clone(), body.clone(), limit).await {
                self.open = Some((origin, sender));
                return Ok(a);
            }
        }
        let mut sender = target.connect().await?;
        let a = exchange(&mut sender, &target, method, headers, body, limit).await?;
        self.open = Some((origin, sender));
        Ok(a)
    }
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

/// Kept-alive connections shared by many callers (the transaction coordinator's branch calls):
/// a request takes an idle connection to its origin or opens one, and gives it back once the
/// answer is read; at most [`Pool::IDLE_PER_ORIGIN`] idle ones are kept per origin. A call on a
/// reused connection that fails is made once more on a fresh one (the peer may have closed it
/// while idle), so callers must tolerate a repeated request.
#[derive(Default)]
pub struct Pool {
    idle: std::sync::Mutex<std::collections::HashMap<(bool, String, u16), Vec<Sender>>>,
}

impl Pool {
    pub const IDLE_PER_ORIGIN: usize = 64;

    fn take(&self, origin: &(bool, String, u16)) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = idle.get_mut(origin)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn give_back(&self, origin: (bool, String, u16), sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = idle.entry(origin).or_default();
        if list.len() < Self::IDLE_PER_ORIGIN && !sender.is_closed() {
            list.push(sender);
        }
    }

    pub async fn request(&self, method: Method, url: &str, headers: HeaderMap, body: Bytes, limit: usize) -> Result<Answer, String> {
        let target = Target::parse(url)?;
        let (https, host, port) = target.origin();
        let origin = (https, host.to_string(), port);
        if let Some(mut sender) = self.take(&origin) {
            if let Ok(a) = exchange(&mut sender, &target, method.clone(), headers.clone(), body.clone(), limit).await {
                self.give_back(origin, sender);
                return Ok(a);
            }
        }
        let mut sender = target.connect().await?;
        let a = exchange(&mut sender, &target, method, headers, body, limit).await?;
        self.give_back(origin, sender);
        Ok(a)
    }
}

/// Sends one request to `url` (http or https) on a connection of its own and returns
/// whatever status came back.
pub async fn request(method: Method, url: &str, headers: HeaderMap, body: Bytes, limit: usize) -> Result<Answer, String> {
    let target = Target::parse(url)?;
    let mut sender = target.connect().await?;
    exchange(&mut sender, &target, method, headers, body, limit).await
}

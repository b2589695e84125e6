//! Test helpers: start the real `zhili` binary on 127.0.0.1 port 0 with a temp data dir, kill it
//! with SIGKILL, wait for conditions, and run real HTTP and gRPC-health targets for checks.

pub mod json;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How long a started server may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `zhili server` child process.
pub struct ServerProcess {
    child: Child,
    pub api: SocketAddr,
    /// The DNS listener (UDP and TCP on one port), when on.
    pub dns: Option<SocketAddr>,
    /// The Nacos HTTP and gRPC listeners, when on.
    pub nacos: Option<SocketAddr>,
    pub nacos_grpc: Option<SocketAddr>,
    /// The gateway listener, when on.
    pub gateway: Option<SocketAddr>,
    /// The DTM-compatible coordinator's listener, when on.
    pub dtm: Option<SocketAddr>,
    pub data_dir: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
    /// Lines the server printed on stdout after the address line (drained by a thread).
    pub output: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts `bin server --data-dir <tmp> --api-addr 127.0.0.1:0 <extra...>`.
    pub fn start(bin: &Path, extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let mut s = Self::start_in(bin, &data_dir, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Like [`Self::start`], with extra environment variables for the server process.
    pub fn start_with_env(bin: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Self::launch(bin, &data_dir, "127.0.0.1:0", extra, env);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on an existing data dir (for restart tests).
    pub fn start_in(bin: &Path, data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_at(bin, data_dir, "127.0.0.1:0", extra)
    }

    /// Starts a server on a fixed API address, so a restart comes back where clients expect it.
    /// DNS and the Nacos listeners take free ports too (`127.0.0.1:0`) unless `extra` names them.
    pub fn start_at(bin: &Path, data_dir: &Path, api_addr: &str, extra: &[&str]) -> Self {
        Self::launch(bin, data_dir, api_addr, extra, vec![])
    }

    fn launch(bin: &Path, data_dir: &Path, api_addr: &str, extra: &[&str], env: Vec<(String, String)>) -> Self {
        let mut args: Vec<String> = vec!["--api-addr".into(), api_addr.into()];
        for flag in LISTENER_FLAGS {
            if !extra.contains(&flag) {
                args.extend([flag.into(), "127.0.0.1:0".into()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, addrs, output) = spawn(bin, data_dir, &args, &env);
        Self {
            child,
            api: addrs.api.expect("api address"),
            dns: addrs.dns,
            nacos: addrs.nacos,
            nacos_grpc: addrs.nacos_grpc,
            gateway: addrs.gateway,
            dtm: addrs.dtm,
            data_dir: data_dir.to_path_buf(),
            bin: bin.to_path_buf(),
            args,
            env,
            _tmp: None,
            output,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown hooks, no flushing. What was acknowledged must already be on disk.
    pub fn kill9(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: as above.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Kills the process and starts a new one on the same data dir, arguments and API address.
    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        // Restart on the same address the first start got, even if that was port 0.
        if let Some(pos) = self.args.iter().position(|a| a == "--api-addr") {
            self.args[pos + 1] = self.api.to_string();
        }
        for (flag, addr) in LISTENER_FLAGS.iter().zip([self.dns, self.nacos, self.nacos_grpc, self.gateway, self.dtm]) {
            if let (Some(pos), Some(addr)) = (self.args.iter().position(|a| a == flag), addr) {
                self.args[pos + 1] = addr.to_string();
            }
        }
        let (child, addrs, output) = spawn(&self.bin, &self.data_dir, &self.args, &self.env);
        self.child = child;
        self.api = addrs.api.expect("api address");
        self.dns = addrs.dns;
        self.nacos = addrs.nacos;
        self.nacos_grpc = addrs.nacos_grpc;
        self.gateway = addrs.gateway;
        self.dtm = addrs.dtm;
        self.output = output;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Listeners besides the API that tests put on free ports, in the order of [`Addrs`]' options.
const LISTENER_FLAGS: [&str; 5] = ["--dns-addr", "--nacos-addr", "--nacos-grpc-addr", "--gateway-addr", "--dtm-addr"];

/// Where a started server listens, as it printed.
#[derive(Debug, Default, Clone, Copy)]
struct Addrs {
    api: Option<SocketAddr>,
    dns: Option<SocketAddr>,
    nacos: Option<SocketAddr>,
    nacos_grpc: Option<SocketAddr>,
    gateway: Option<SocketAddr>,
    dtm: Option<SocketAddr>,
}

type Spawned = (Child, Addrs, Arc<std::sync::Mutex<Vec<String>>>);

/// Parses one "zhili <listener> listening on <addr>" line into `addrs`; false for other lines.
fn listening_line(line: &str, addrs: &mut Addrs) -> bool {
    let Some((name, addr)) = line.strip_prefix("zhili ").and_then(|l| l.split_once(" listening on ")) else { return false };
    let addr = addr.trim().trim_start_matches("http://").trim_start_matches("https://").parse::<SocketAddr>().ok();
    let slot = match name {
        "api" => &mut addrs.api,
        "dns" => &mut addrs.dns,
        "nacos" => &mut addrs.nacos,
        "nacos-grpc" => &mut addrs.nacos_grpc,
        "gateway" => &mut addrs.gateway,
        "dtm" => &mut addrs.dtm,
        _ => return false,
    };
    *slot = addr;
    true
}

fn spawn(bin: &Path, data_dir: &Path, extra: &[String], env: &[(String, String)]) -> Spawned {
    let mut child = Command::new(bin)
        .arg("server")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("ZHILI_LOG_LEVEL", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn zhili");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let output = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = output.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        let mut addrs = Addrs::default();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The API line comes last, so every listener is known once it arrives.
            if !sent && listening_line(&line, &mut addrs) {
                if addrs.api.is_some() {
                    let _ = tx.send(addrs);
                    sent = true;
                }
                continue;
            }
            out.lock().unwrap().push(line);
        }
    });
    let addrs = rx.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("zhili did not report its API address within {START_TIMEOUT:?}");
    });
    (child, addrs, output)
}

/// Polls `f` until it returns true or `timeout` passes; panics with `what` on timeout.
pub async fn assert_eventually<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(timeout: Duration, what: &str, mut f: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An HTTP target answering every request with the status in `status` (change it at will).
pub async fn http_target(status: Arc<AtomicU16>) -> SocketAddr {
    serve(false, move |_req| {
        let code = status.load(Ordering::Relaxed);
        Response::builder().status(code).body(Full::new(Bytes::from(format!("status {code}")))).expect("response")
    })
    .await
}

/// A gRPC server implementing grpc.health.v1.Health/Check over h2c, answering with the serving
/// status in `status` (1 = SERVING, 2 = NOT_SERVING) for any service name.
pub async fn grpc_health_target(status: Arc<AtomicU8>) -> SocketAddr {
    serve(true, move |req| {
        if req.uri().path() != "/grpc.health.v1.Health/Check" {
            return Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("grpc-status", "12")
                .body(Full::new(Bytes::new()))
                .expect("response");
        }
        let s = status.load(Ordering::Relaxed);
        // HealthCheckResponse { status = 1 (varint) }, as a length-prefixed gRPC message.
        let msg = [0x08, s];
        let mut body = vec![0u8];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(Full::new(Bytes::from(body)))
            .expect("response")
    })
    .await
}

async fn serve<F>(h2_only: bool, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req)) }
                });
                let io = TokioIo::new(stream);
                if h2_only {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                }
            });
        }
    });
    addr
}

/// An upstream for gateway tests: answers `"{name} {path}"` (plus `" {length} {byte sum}"` of a
/// request body) with the status in `status` (after
/// `delay_ms`), counts hits, keeps the last request's headers, echoes bytes after a WebSocket
/// upgrade, and can be stopped like a killed process (listener and open connections closed).
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub status: Arc<AtomicU16>,
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    pub hits: Arc<std::sync::atomic::AtomicU64>,
    pub last_headers: Arc<std::sync::Mutex<http::HeaderMap>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let up = Self {
            addr,
            name: name.to_string(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::default(),
            hits: Arc::default(),
            last_headers: Arc::default(),
            stop,
        };
        let (name, status, delay, hits, last) = (up.name.clone(), up.status.clone(), up.delay_ms.clone(), up.hits.clone(), up.last_headers.clone());
        let mut accept_stop = stopped.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => return },
                    _ = accept_stop.changed() => return,
                };
                let (name, status, delay, hits, last) = (name.clone(), status.clone(), delay.clone(), hits.clone(), last.clone());
                let mut conn_stop = stopped.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        let (name, status, delay, hits, last) = (name.clone(), status.clone(), delay.clone(), hits.clone(), last.clone());
                        async move {
                            hits.fetch_add(1, Ordering::Relaxed);
                            *last.lock().unwrap() = req.headers().clone();
                            let d = delay.load(Ordering::Relaxed);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_millis(d)).await;
                            }
                            if req.headers().get("upgrade").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket")) {
                                let upgrade = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(up) = upgrade.await {
                                        let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                    }
                                });
                                return Ok::<_, Infallible>(
                                    Response::builder()
                                        .status(101)
                                        .header("connection", "upgrade")
                                        .header("upgrade", "websocket")
                                        .body(Full::new(Bytes::new()))
                                        .expect("response"),
                                );
                            }
                            let path = req.uri().path().to_string();
                            // A request body is acknowledged by its length and byte sum.
                            let got = http_body_util::BodyExt::collect(req.into_body()).await.map(|c| c.to_bytes()).unwrap_or_default();
                            let body = if got.is_empty() {
                                format!("{name} {path}")
                            } else {
                                format!("{name} {path} {} {}", got.len(), got.iter().map(|b| u64::from(*b)).sum::<u64>())
                            };
                            Ok(Response::builder().status(status.load(Ordering::Relaxed)).body(Full::new(Bytes::from(body))).expect("response"))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_stop.changed() => {}
                    }
                });
            }
        });
        up
    }

    /// Closes the listener and every open connection, as if the process died.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// A document served over HTTP at every path (a JWKS endpoint, say); `body` can be swapped and
/// `hits` counts requests.
pub struct Document {
    pub addr: SocketAddr,
    pub body: Arc<std::sync::Mutex<String>>,
    pub hits: Arc<std::sync::atomic::AtomicU64>,
}

impl Document {
    pub async fn start(body: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let doc = Self { addr, body: Arc::new(std::sync::Mutex::new(body.to_string())), hits: Arc::default() };
        let (body, hits) = (doc.body.clone(), doc.hits.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (body, hits) = (body.clone(), hits.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        let b = body.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(b))).expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        doc
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_string();
    }
}

//! The gateway's listener: accepts connections (HTTP/1.1 and HTTP/2, optionally TLS) under
//! zhili-net's admission cap and deadlines, and hands each request to [`crate::proxy::handle`]:
//! HTTP/1.1 through zhili-net's own server side ([`zhili_net::h1_server`]), which passes what it
//! does not serve (HTTP/2, upgrades, streamed bodies, malformed requests) on to hyper.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;
use zhili_net::h1_server::{Outcome, Replay};

use crate::body::request_bytes;
use crate::proxy::{handle, Peer};

/// Serves the gateway on `listener` until `stop` turns true; then stops accepting and returns
/// once every connection has finished what it had in flight. `gate` caps the connections and
/// holds the idle, read and write deadlines every client connection is held to.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    gate: Arc<zhili_net::Admission>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Every connection task holds a sender; all are gone when the last connection has closed.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    while let Some((stream, addr)) = zhili_net::accept(&listener, &mut stop, "gateway").await {
        let Some((stream, conn)) = gate.admit(stream, tls.is_none()) else { continue };
        let _ = stream.set_nodelay(true);
        let (gw, tls, watcher, stop, alive) = (gw.clone(), tls.clone(), graceful.watcher(), stop.clone(), alive.clone());
        tokio::spawn(async move {
            let _alive = alive;
            let peer = |tls: bool, client_cn| Peer {
                addr,
                ip: HeaderValue::from_str(&addr.ip().to_string()).expect("an IP address is a valid header value"),
                tls,
                client_cn,
            };
            match tls {
                None => connection(conn.wrap(stream), peer(false, None), true, gw, conn, watcher, stop).await,
                Some(acceptor) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(conn.limits().handshake_timeout, acceptor.accept(stream)).await {
                        let client_cn = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::auth::common_name(c)).map(Arc::from);
                        let h1 = s.get_ref().1.alpn_protocol() != Some(b"h2");
                        connection(conn.wrap(s), peer(true, client_cn), h1, gw, conn, watcher, stop).await;
                    }
                }
            }
        });
    }
    // New connections are refused from here; the ones we have finish their requests.
    drop(listener);
    drop(alive);
    tokio::join!(graceful.shutdown(), all_closed.recv());
}

/// One client connection until it closes or one of its deadlines passes: HTTP/1.1 on the fast
/// path first (when `h1`), then hyper for whatever the fast path hands over.
async fn connection<I>(
    mut io: I,
    peer: Peer,
    h1: bool,
    gw: Arc<Gateway>,
    conn: Arc<zhili_net::Conn>,
    watcher: hyper_util::server::graceful::Watcher,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    conn.clone()
        .run(async move {
            let read = if h1 {
                // Room for what the forward phase adds (x-forwarded-*, x-request-id, traceparent).
                let options =
                    zhili_net::h1_server::Options { max_head: gw.options.max_header_bytes, max_body: gw.options.max_replay_body as u64, added_headers: 8 };
                let peer = &peer;
                let handler = |req: http::Request<Bytes>| handle(gw.clone(), req.map(request_bytes), peer);
                match zhili_net::h1_server::serve(&mut io, options, &conn, &mut stop, handler).await {
                    Outcome::Closed => return,
                    Outcome::Hyper(read) => read,
                }
            } else {
                Bytes::new()
            };
            // Boxed: hyper's connection state is large, and inline it would make every
            // connection's task that large, hyper or not.
            Box::pin(with_hyper(Replay::new(read, io), peer, gw, conn, watcher)).await;
        })
        .await;
}

/// The connection through hyper (HTTP/1.1 or HTTP/2 by what the client speaks, upgrades).
async fn with_hyper<I>(io: I, peer: Peer, gw: Arc<Gateway>, conn: Arc<zhili_net::Conn>, watcher: hyper_util::server::graceful::Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let o = gw.options.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let gw = gw.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(gw, req.map(BodyExt::boxed), &peer).await) }
    });
    let read_timeout = o.header_read_timeout.min(conn.limits().read_timeout);
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(read_timeout).max_buf_size(o.max_header_bytes.max(8192));
    b.http2().timer(TokioTimer::new()).max_header_list_size(o.max_header_bytes as u32).keep_alive_interval(Duration::from_secs(30));
    // Boxed as `Send` here, where the body's error type is concrete: proving `Send` through the
    // spawned future instead trips the compiler's higher-ranked lifetime check.
    let serving: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(watcher.watch(b.serve_connection_with_upgrades(TokioIo::new(io), conn.service(svc))));
    let _ = serving.await;
}

//! The gateway's listener: accepts connections (HTTP/1.1 and HTTP/2, optionally TLS) under
//! zhili-net's admission cap and deadlines, and hands each request to [`crate::proxy::handle`].

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;
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
    while let Some((stream, addr)) = zhili_net::accept(&listener, &mut stop, "gateway").await {
        let Some((stream, conn)) = gate.admit(stream, tls.is_none()) else { continue };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            match tls {
                None => connection(conn.wrap(stream), Peer { addr, ip: addr.ip().to_string().into(), tls: false, client_cn: None }, gw, conn, watcher).await,
                Some(acceptor) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(conn.limits().handshake_timeout, acceptor.accept(stream)).await {
                        let client_cn = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::auth::common_name(c)).map(Arc::from);
                        connection(conn.wrap(s), Peer { addr, ip: addr.ip().to_string().into(), tls: true, client_cn }, gw, conn, watcher).await;
                    }
                }
            }
        });
    }
    // New connections are refused from here; the ones we have finish their requests.
    drop(listener);
    graceful.shutdown().await;
}

async fn connection<I>(io: I, peer: Peer, gw: Arc<Gateway>, conn: Arc<zhili_net::Conn>, watcher: hyper_util::server::graceful::Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let o = gw.options.clone();
    let svc = hyper::service::service_fn(move |req| {
        let gw = gw.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(gw, req, &peer).await) }
    });
    let read_timeout = o.header_read_timeout.min(conn.limits().read_timeout);
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(read_timeout).max_buf_size(o.max_header_bytes.max(8192));
    b.http2().timer(TokioTimer::new()).max_header_list_size(o.max_header_bytes as u32).keep_alive_interval(Duration::from_secs(30));
    // Boxed as `Send` here, where the body's error type is concrete: proving `Send` through the
    // spawned future instead trips the compiler's higher-ranked lifetime check.
    let serving: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(watcher.watch(b.serve_connection_with_upgrades(TokioIo::new(io), conn.service(svc))));
    conn.run(serving).await;
}

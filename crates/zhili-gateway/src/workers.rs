//! Gateway workers: one thread per worker, each running a single-threaded runtime with its own
//! listening socket on the gateway's address (`SO_REUSEPORT`: the kernel spreads new
//! connections across them), like nginx's worker processes. A connection lives on one worker
//! from accept to close, with no work stealing or cross-thread wake-ups on its path; each
//! worker keeps its own idle upstream connections (a socket stays with the runtime whose
//! reactor it is registered with). Routes, endpoints, counters and limits are shared.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;

/// `n` listening sockets on `addr` (a port of 0 is chosen once and shared), ready to hand to
/// [`serve_workers`]. Must be called within a tokio runtime.
pub fn bind_workers(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(n.max(1));
    let mut at = addr;
    for _ in 0..n.max(1) {
        let socket = if at.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(at)?;
        let listener = socket.listen(zhili_net::BACKLOG)?;
        at = listener.local_addr()?;
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// Serves the gateway with one worker thread per listener from [`bind_workers`] until `stop` turns
/// true; returns once every worker has finished its connections.
pub async fn serve_workers(
    listeners: Vec<std::net::TcpListener>,
    gw: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    gate: Arc<zhili_net::Admission>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut done = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let (gw, tls, gate, stop) = (gw.clone(), tls.clone(), gate.clone(), stop.clone());
        let (finished, finish) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new().name(format!("zhili-gw-{i}")).spawn(move || {
            crate::h1::set_worker(i);
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => return tracing::error!(worker = i, error = %e, "gateway worker could not start its runtime"),
            };
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => crate::serve::serve(l, gw, tls, gate, stop).await,
                    Err(e) => tracing::error!(worker = i, error = %e, "gateway worker could not take its listener"),
                }
            });
            let _ = finished.send(());
        });
        match spawned {
            Ok(_) => done.push(finish),
            Err(e) => tracing::error!(worker = i, error = %e, "gateway worker thread could not start"),
        }
    }
    for d in done {
        let _ = d.await;
    }
}

/// The default number of workers: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

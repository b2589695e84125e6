//! Listening sockets with a backlog sized for bursts of connections.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Pending connections a listener queues before the kernel drops SYNs (capped by
/// `net.core.somaxconn`). tokio's `TcpListener::bind` queues 1,024: thousands of watchers or
/// clients connecting at once (a restart, a deploy) then wait out SYN retransmissions of 1, 3,
/// 7 s before they are even accepted.
pub const BACKLOG: u32 = 4096;

/// Binds `addr` (address reuse on, as tokio's `bind`) with a [`BACKLOG`]-deep accept queue.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn binds_and_accepts() {
        let l = super::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        assert_eq!(client.unwrap().local_addr().unwrap(), accepted.unwrap().1);
        assert!(super::bind(addr).await.is_err(), "the port is taken");
    }
}

//! Listener hygiene shared by every TCP listener (API, Nacos HTTP and gRPC, gateway): a cap on
//! connections with a clear refusal, timeouts for idle, slow-header, slow-body and slow-reading
//! clients, a handler panic answered as a 500 instead of a dropped connection, and the
//! process's open-file limit raised at start.
//!
//! The pieces, in the order a connection meets them:
//! [`Admission::admit`] (cap) → TLS handshake under [`Limits::handshake_timeout`] →
//! [`Conn::wrap`] (the socket reports reads and blocked writes) → [`Conn::service`] (counts
//! requests in flight, catches panics) → [`TimedBody`] (a request body that stalls errors out)
//! → [`Conn::watch`] (closes the connection when a deadline passes).

mod body;
pub mod client;
mod conn;
mod fd;
pub mod h1_server;
mod listen;
pub mod reuse;

pub use body::{QuietAllowed, TimedBody};
pub use conn::{accept, panic_message, Admission, Conn, ConnIo, GuardedBody, RequestGuard, Tracked};
pub use fd::raise_open_file_limit;
pub use listen::{bind, BACKLOG};

use std::time::Duration;

/// How long a client may take at each stage, and how many may connect at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once on one listener; past this a new one is refused.
    pub max_connections: usize,
    /// A TLS handshake that takes longer is dropped.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight is closed after this long (keep-alive idle, or a
    /// client that connected and never sent a byte, or only an HTTP/2 preface).
    pub idle_timeout: Duration,
    /// A request head must arrive whole within this long of its first byte (slowloris); a
    /// request body that sends nothing for this long fails the request.
    pub read_timeout: Duration,
    /// An answer the client does not read for this long closes the connection.
    pub write_timeout: Duration,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// Milliseconds since the first call in this process, never 0 (0 means "not set" in the
/// connection's atomics).
fn now_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

//! One connection's life: admitted under the listener's cap, its socket reporting reads and
//! blocked writes, its requests counted while in flight, and a watchdog that closes it when a
//! deadline passes. The deadlines:
//! - no request in flight for `idle_timeout` (keep-alive idle, or nothing ever sent);
//! - a request head begun but not finished within `read_timeout` of its first byte;
//! - a write the client has not taken for `write_timeout`, even with a request in flight.

use std::any::Any;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{now_ms, Limits};

/// What an HTTP client is told when the listener is full, before the socket closes.
const HTTP_REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 114\r\n\r\n{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,\"detail\":\"too many connections; try again later\"}";
/// The body of the answer to a request whose handler panicked.
pub(crate) const PANIC_BODY: &str = r#"{"type":"about:blank","title":"Internal Server Error","status":500,"detail":"internal error; see the server log"}"#;
/// How long a refused client gets to take its 503.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The listener's next connection, or None once `stop` turns true (the listener then stops
/// accepting). Accept errors (out of descriptors, say) are logged and retried after a pause
/// rather than ending the listener.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    name: &'static str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return None;
                }
            }
        }
    }
}

/// Pause after a failed accept (typically EMFILE), so a full descriptor table is not spun on.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A listener's gate: at most `max_connections` served at once.
pub struct Admission {
    name: &'static str,
    limits: Limits,
    /// One permit per live connection; a connection returns its permit when dropped.
    slots: Arc<Semaphore>,
    /// Connections every listener of the process may hold together (its open-file budget), so
    /// one busy listener can use what the quiet ones leave.
    shared: Option<Arc<Semaphore>>,
    refused: AtomicU64,
}

impl Admission {
    pub fn new(name: &'static str, limits: Limits) -> Arc<Self> {
        Self::within(name, limits, None)
    }

    /// A listener held to its own cap and also to `shared`, a budget of connections it shares
    /// with the process's other listeners.
    pub fn within(name: &'static str, limits: Limits, shared: Option<Arc<Semaphore>>) -> Arc<Self> {
        Arc::new(Self { name, limits, slots: Arc::new(Semaphore::new(limits.max_connections.max(1))), shared, refused: AtomicU64::new(0) })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Connections refused so far because the listener was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes a slot for a new connection. When the listener is full the client is refused:
    /// `http` listeners first write a 503 (plain HTTP only; a TLS client is simply closed).
    pub fn admit(&self, stream: TcpStream, http: bool) -> Option<(TcpStream, Arc<Conn>)> {
        let shared = match &self.shared {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some),
        };
        match (self.slots.clone().try_acquire_owned(), shared) {
            (Ok(permit), Ok(shared)) => Some((stream, Arc::new(Conn::new(self.limits, [Some(permit), shared])))),
            _ => {
                let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged at powers of two, so a flood cannot flood the log too.
                if n.is_power_of_two() {
                    tracing::warn!(listener = self.name, max = self.limits.max_connections, refused = n, "connection refused: listener full");
                }
                if http {
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, stream.write_all(HTTP_REFUSAL)).await;
                    });
                }
                None
            }
        }
    }
}

/// The live state of one connection, shared by its socket wrapper, its service and its watchdog.
pub struct Conn {
    limits: Limits,
    /// Requests (HTTP/2: streams) whose answer has not been fully sent.
    inflight: AtomicU32,
    /// When the last request finished (or the connection opened), in [`now_ms`].
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived; 0 while none is pending.
    head_started: AtomicU64,
    /// When a write started waiting on the client; 0 while writes go through.
    write_blocked: AtomicU64,
    /// The listener's slot and, when it shares one, the process-wide one.
    _permits: [Option<OwnedSemaphorePermit>; 2],
}

impl Conn {
    fn new(limits: Limits, permits: [Option<OwnedSemaphorePermit>; 2]) -> Self {
        Self {
            limits,
            inflight: AtomicU32::new(0),
            idle_since: AtomicU64::new(now_ms()),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            _permits: permits,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The socket (or TLS stream) of this connection, reporting to it.
    pub fn wrap<T>(self: &Arc<Self>, io: T) -> ConnIo<T> {
        ConnIo { inner: io, conn: self.clone() }
    }

    /// Marks one request in flight until the guard is dropped, for a server that reads requests
    /// itself instead of through [`Conn::service`] (the idle and head deadlines pause meanwhile).
    pub fn begin_request(self: &Arc<Self>) -> RequestGuard {
        RequestGuard { _in_flight: InFlight::new(self.clone()) }
    }

    /// The connection's service, counting requests in flight and answering panics with 500.
    pub fn service<S>(self: &Arc<Self>, inner: S) -> Tracked<S> {
        Tracked { inner, conn: self.clone() }
    }

    /// Runs the protocol's connection future until it ends or a deadline passes (then it is
    /// dropped, which closes the socket). A hand-written future rather than an `async fn`: the
    /// connection's state is laid out once in it, not copied into a second slot (this is most
    /// of the memory a waiting connection holds).
    pub fn run<F: Future>(&self, connection: F) -> Run<'_, F> {
        Run { conn: self, connection, watchdog: tokio::time::sleep(Duration::ZERO) }
    }

    /// Ok(milliseconds until the next look) while every deadline holds, or which one has passed.
    fn deadlines(&self) -> Result<u64, &'static str> {
        let ms = |d: Duration| d.as_millis() as u64;
        let now = now_ms();
        let mut next = now + ms(self.limits.write_timeout).clamp(100, 5_000);
        let blocked = self.write_blocked.load(Ordering::Relaxed);
        if blocked != 0 {
            let due = blocked + ms(self.limits.write_timeout);
            if now >= due {
                return Err("client stopped reading (write timeout)");
            }
            next = next.min(due);
        }
        if self.inflight.load(Ordering::Acquire) == 0 {
            let due = self.idle_since.load(Ordering::Acquire) + ms(self.limits.idle_timeout);
            if now >= due {
                return Err("idle timeout");
            }
            next = next.min(due);
            let head = self.head_started.load(Ordering::Relaxed);
            if head != 0 {
                let due = head + ms(self.limits.read_timeout);
                if now >= due {
                    return Err("request head too slow (read timeout)");
                }
                next = next.min(due);
            }
        }
        Ok(next.saturating_sub(now).max(1))
    }

    fn read_progress(&self) {
        if self.inflight.load(Ordering::Relaxed) == 0 && self.head_started.load(Ordering::Relaxed) == 0 {
            self.head_started.store(now_ms(), Ordering::Relaxed);
        }
    }

    fn write_result<T>(&self, r: &Poll<io::Result<T>>) {
        match r {
            Poll::Pending => {
                if self.write_blocked.load(Ordering::Relaxed) == 0 {
                    self.write_blocked.store(now_ms(), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {
                if self.write_blocked.load(Ordering::Relaxed) != 0 {
                    self.write_blocked.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection under its watchdog: see [`Conn::run`].
    pub struct Run<'a, F> {
        conn: &'a Conn,
        #[pin]
        connection: F,
        #[pin]
        watchdog: tokio::time::Sleep,
    }
}

impl<F: Future> Future for Run<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.connection.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // The deadlines are looked at only when the watchdog's timer fires, not on every poll.
        while this.watchdog.as_mut().poll(cx).is_ready() {
            match this.conn.deadlines() {
                Ok(wait) => this.watchdog.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(wait)),
                Err(reason) => {
                    tracing::debug!(reason, "connection closed by the server");
                    return Poll::Ready(());
                }
            }
        }
        Poll::Pending
    }
}

/// Marks one request in flight until dropped (with the answer's body, or the answer itself).
struct InFlight(Arc<Conn>);

/// One request in flight on a [`Conn`], from [`Conn::begin_request`] until dropped.
pub struct RequestGuard {
    _in_flight: InFlight,
}

impl InFlight {
    fn new(conn: Arc<Conn>) -> Self {
        conn.inflight.fetch_add(1, Ordering::AcqRel);
        conn.head_started.store(0, Ordering::Relaxed);
        Self(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Idle time is stamped before the count drops, so the watchdog never pairs "nothing in
        // flight" with a stale idle time.
        self.0.idle_since.store(now_ms(), Ordering::Release);
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that tells its [`Conn`] when request bytes arrive and when writes block.
pub struct ConnIo<T> {
    inner: T,
    conn: Arc<Conn>,
}

impl<T> ConnIo<T> {
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.read_progress();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.conn.write_result(&r);
        r
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.conn.write_result(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.conn.write_result(&r);
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A hyper service counted while its requests are in flight; a panic in it is answered with a
/// 500 problem+json and one log line instead of a dropped connection.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, R, B> hyper::service::Service<Request<R>> for Tracked<S>
where
    S: hyper::service::Service<Request<R>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<GuardedBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn call(&self, req: Request<R>) -> Self::Future {
        let guard = InFlight::new(self.conn.clone());
        // Kept for the log line of a panic: clones that share the request's memory.
        let method = req.method().clone();
        let uri = req.uri().clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(resp)) => Ok(resp.map(|body| GuardedBody { kind: Kind::Inner(body), _guard: guard })),
                Ok(Err(e)) => Err(e),
                Err(panic) => {
                    let path: String = uri.path().chars().take(256).collect();
                    tracing::error!(%method, %path, cause = panic_message(&*panic), "handler panicked; answered 500");
                    let mut resp = Response::new(GuardedBody { kind: Kind::Fixed(Some(Bytes::from_static(PANIC_BODY.as_bytes()))), _guard: guard });
                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/problem+json"));
                    Ok(resp)
                }
            }
        })
    }
}

/// What a caught panic said, for the log line.
pub fn panic_message(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>().copied().or_else(|| p.downcast_ref::<String>().map(String::as_str)).unwrap_or("(no message)")
}

/// An answer body that keeps its request counted in flight until it is sent or dropped.
pub struct GuardedBody<B> {
    kind: Kind<B>,
    _guard: InFlight,
}

enum Kind<B> {
    Inner(B),
    Fixed(Option<Bytes>),
}

impl<B: Body<Data = Bytes> + Unpin> Body for GuardedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.kind {
            Kind::Inner(b) => Pin::new(b).poll_frame(cx),
            Kind::Fixed(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner(b) => b.is_end_stream(),
            Kind::Fixed(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner(b) => b.size_hint(),
            Kind::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(limits: Limits) -> Arc<Conn> {
        let sem = Arc::new(Semaphore::new(1));
        Arc::new(Conn::new(limits, [Some(sem.try_acquire_owned().expect("permit")), None]))
    }

    fn limits() -> Limits {
        Limits { idle_timeout: Duration::from_secs(30), read_timeout: Duration::from_secs(10), write_timeout: Duration::from_secs(20), ..Limits::default() }
    }

    /// Which deadline passes first, waiting as [`Run`] does.
    async fn expired(c: &Conn) -> &'static str {
        loop {
            match c.deadlines() {
                Ok(wait) => tokio::time::sleep(Duration::from_millis(wait)).await,
                Err(reason) => return reason,
            }
        }
    }

    // These tests run in real time on short timeouts: `now_ms` reads the std clock, which tokio's
    // paused time does not move.
    #[tokio::test]
    async fn idle_connection_expires() {
        let c = conn(Limits { idle_timeout: Duration::from_millis(150), ..limits() });
        let t = std::time::Instant::now();
        assert_eq!(expired(&c).await, "idle timeout");
        assert!(t.elapsed() >= Duration::from_millis(140));
    }

    #[tokio::test]
    async fn a_run_ends_with_its_connection_or_at_a_deadline() {
        let c = conn(Limits { idle_timeout: Duration::from_millis(150), ..limits() });
        let t = std::time::Instant::now();
        c.run(tokio::time::sleep(Duration::from_millis(20))).await;
        assert!(t.elapsed() < Duration::from_millis(140), "ended with its connection: {:?}", t.elapsed());
        c.run(std::future::pending::<()>()).await;
        assert!(t.elapsed() >= Duration::from_millis(140), "ended by the idle deadline: {:?}", t.elapsed());
        let c = conn(Limits { idle_timeout: Duration::from_millis(100), ..limits() });
        let g = InFlight::new(c.clone());
        assert!(tokio::time::timeout(Duration::from_millis(300), c.run(std::future::pending::<()>())).await.is_err(), "a request in flight keeps it open");
        drop(g);
    }

    #[tokio::test]
    async fn request_in_flight_is_not_idle_but_a_blocked_write_is_cut() {
        let c = conn(Limits { idle_timeout: Duration::from_millis(50), write_timeout: Duration::from_millis(200), ..limits() });
        let g = InFlight::new(c.clone());
        assert!(tokio::time::timeout(Duration::from_millis(300), expired(&c)).await.is_err(), "a request in flight keeps it open");
        c.write_result::<usize>(&Poll::Pending);
        assert_eq!(expired(&c).await, "client stopped reading (write timeout)");
        drop(g);
    }

    #[tokio::test]
    async fn slow_head_is_cut_before_idle() {
        let c = conn(Limits { idle_timeout: Duration::from_secs(30), read_timeout: Duration::from_millis(100), ..limits() });
        c.read_progress();
        assert_eq!(expired(&c).await, "request head too slow (read timeout)");
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_500_and_the_request_leaves_flight() {
        use http_body_util::BodyExt;
        use hyper::service::Service;
        let c = conn(limits());
        let svc = c.service(hyper::service::service_fn(|req: Request<http_body_util::Empty<Bytes>>| async move {
            if req.uri().path() == "/boom" {
                panic!("boom");
            }
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from_static(b"fine"))))
        }));
        let resp = svc.call(Request::get("/boom").body(http_body_util::Empty::new()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()[http::header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(c.inflight.load(Ordering::Relaxed), 1, "in flight until the answer is sent");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(std::str::from_utf8(&body).unwrap().contains("\"status\":500"));
        assert_eq!(c.inflight.load(Ordering::Relaxed), 0);
        let resp = svc.call(Request::get("/ok").body(http_body_util::Empty::new()).unwrap()).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "fine", "the service keeps serving");
    }

    #[tokio::test]
    async fn admission_refuses_past_the_cap() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let gate = Admission::new("test", Limits { max_connections: 1, ..limits() });
        let _c1 = TcpStream::connect(addr).await.expect("connect");
        let (s1, _) = l.accept().await.expect("accept");
        let first = gate.admit(s1, true);
        assert!(first.is_some());
        let mut c2 = TcpStream::connect(addr).await.expect("connect");
        let (s2, _) = l.accept().await.expect("accept");
        assert!(gate.admit(s2, true).is_none());
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut c2, &mut got).await.expect("read");
        assert!(got.starts_with(b"HTTP/1.1 503"), "{}", String::from_utf8_lossy(&got));
        let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").expect("head end") + 4..];
        assert_eq!(body.len(), 114, "content-length matches");
        assert_eq!(gate.refused(), 1);
        drop(first);
        let _c3 = TcpStream::connect(addr).await.expect("connect");
        let (s3, _) = l.accept().await.expect("accept");
        assert!(gate.admit(s3, true).is_some(), "a freed slot admits again");
    }

    #[tokio::test]
    async fn listeners_share_one_budget() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let budget = Arc::new(Semaphore::new(2));
        let (a, b) = (Admission::within("a", limits(), Some(budget.clone())), Admission::within("b", limits(), Some(budget.clone())));
        let mut clients = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            accepted.push(l.accept().await.expect("accept").0);
        }
        let mut next = accepted.into_iter();
        let mut next = move || next.next().expect("four accepted");
        let first = a.admit(next(), false).expect("within budget");
        let second = a.admit(next(), false).expect("one listener may take the whole budget");
        assert!(b.admit(next(), false).is_none(), "the other listener is refused once the budget is spent");
        assert_eq!((a.refused(), b.refused()), (0, 1));
        drop(first);
        assert!(b.admit(next(), false).is_some(), "a slot freed on one listener serves another");
        drop(second);
    }
}

//! The gateway's own HTTP/1.1 client for the common case: a request whose body is in memory, on
//! a pooled keep-alive connection, written in one `write` and answered on the same task (no
//! connection task, no channel hop). Answers with a small `Content-Length` are read whole; others
//! (chunked, large, close-delimited) stream through a task that returns the connection to the
//! pool when the body ends. Upgrades and streamed request bodies go through hyper instead.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::body::{empty, full, Body, BoxError};
use crate::error::UpstreamError;

/// Largest response head accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Answers with a `Content-Length` up to this are read before answering (head and body leave in
/// one write); larger or open-ended ones stream.
pub const COLLECT_BELOW: u64 = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// A streamed answer body that sends nothing for this long is cut off.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that takes no part of a streamed answer for this long loses it (and the upstream
/// connection is closed), so slow readers cannot pin upstream connections.
pub const CLIENT_TAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// One upstream connection with what was read past the last answer. It holds one of its
/// endpoint's connection slots while it lives.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    _slot: Option<ConnSlot>,
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A failed exchange, and whether any of the answer had arrived (a reused connection that fails
/// before that was most likely closed by the upstream while idle: the request goes again on a
/// fresh one).
struct Failure {
    error: UpstreamError,
    answered: bool,
}

fn failed(e: impl std::fmt::Display, answered: bool) -> Failure {
    Failure { error: UpstreamError::Failed(e.to_string()), answered }
}

/// A TCP connection to an upstream (no Nagle), within `timeout`.
pub async fn connect_tcp(authority: &str, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let io = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::Connect(e.to_string())),
        Err(_) => return Err(UpstreamError::Connect(format!("no connection within {timeout:?}"))),
    };
    let _ = io.set_nodelay(true);
    Ok(io)
}

impl Conn {
    pub async fn connect(authority: &str, timeout: Duration) -> Result<Conn, UpstreamError> {
        Ok(Conn { io: connect_tcp(authority, timeout).await?, buf: BytesMut::with_capacity(READ_CHUNK), _slot: None })
    }

    /// Whether nothing is waiting to be read: no bytes past the last answer and none readable
    /// on the socket (an upstream that sent more than it framed, or closed, fails this). A
    /// connection is reused only when clean, so an answer can never reach another request.
    fn is_clean(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Reads more; `Ok(0)` at end of stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        self.io.read_buf(&mut self.buf).await
    }

    /// Writes the request and reads the answer's head (skipping 1xx interim answers).
    async fn head(&mut self, request: &[u8], head_request: bool) -> Result<(http::response::Parts, Framing, bool), Failure> {
        self.io.write_all(request).await.map_err(|e| failed(e, false))?;
        let mut answered = false;
        loop {
            if let Some((n, head)) = find_head(&self.buf).map_err(|e| failed(e, true))? {
                let bytes = self.buf.split_to(n).freeze();
                let (parts, framing, keep_alive) = parse_head(&head, &bytes, head_request).map_err(|e| failed(e, true))?;
                if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(failed("switched protocols without being asked to", true));
                }
                if parts.status.is_informational() {
                    continue;
                }
                return Ok((parts, framing, keep_alive));
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(failed(format!("sent an answer head over {MAX_HEAD} bytes"), true));
            }
            match self.fill().await {
                Ok(0) => return Err(failed("closed the connection before answering", answered)),
                Ok(_) => answered = true,
                Err(e) => return Err(failed(e, answered)),
            }
        }
    }

    /// Reads more of a streamed body, within [`BODY_IDLE_TIMEOUT`].
    async fn fill_body(&mut self) -> Result<usize, String> {
        match tokio::time::timeout(BODY_IDLE_TIMEOUT, self.fill()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("sent nothing for {BODY_IDLE_TIMEOUT:?} inside a body")),
        }
    }

    /// Exactly `n` body bytes.
    async fn read_exact_body(&mut self, n: usize) -> Result<Bytes, String> {
        while self.buf.len() < n {
            if self.fill().await.map_err(|e| e.to_string())? == 0 {
                return Err(format!("closed the connection {} bytes into a {n}-byte body", self.buf.len()));
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// One CRLF-terminated line (without it), at most 4 KiB.
    async fn line(&mut self) -> Result<Bytes, String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(i).freeze();
                self.buf.advance(2);
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                return Err("sent a chunk line over 4 KiB".into());
            }
            if self.fill_body().await? == 0 {
                return Err("closed the connection inside a chunked body".into());
            }
        }
    }

    /// Up to `max` bytes that are already here or arrive next (within [`BODY_IDLE_TIMEOUT`]);
    /// empty at end of stream.
    async fn some(&mut self, max: usize) -> Result<Bytes, String> {
        if self.buf.is_empty() && self.fill_body().await? == 0 {
            return Ok(Bytes::new());
        }
        let n = self.buf.len().min(max);
        Ok(self.buf.split_to(n).freeze())
    }
}

/// Where one header line's name and value lie in an answer head (offset, length).
struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

/// An answer head as httparse found it (parsed once, before the head is split off the read
/// buffer), its fields as offsets into the head's bytes.
struct Head {
    code: Option<u16>,
    /// HTTP/1.0 (anything but 1.1): closes unless it says keep-alive.
    http10: bool,
    fields: smallvec::SmallVec<[Field; 24]>,
}

/// The answer head at the start of `buf` (its length and fields), or None while it is incomplete.
/// Not async: httparse's header array stays on the stack here, out of the request's future (it
/// would make that future 4 KiB larger across every wait for the upstream's answer).
fn find_head(buf: &[u8]) -> Result<Option<(usize, Head)>, String> {
    // Left uninitialized: httparse fills only as many as the head has (initializing them all
    // costs more than most heads take to parse).
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("sent an invalid answer: {e}")),
    };
    // The head's fields as offsets, so the values can share the frozen head's memory.
    let base = buf.as_ptr() as usize;
    // An empty value need not point into the buffer: it is empty wherever it is.
    let at = |s: &[u8]| if s.is_empty() { (0, 0) } else { (s.as_ptr() as usize - base, s.len()) };
    let fields = resp.headers.iter().map(|h| Field { name: at(h.name.as_bytes()), value: at(h.value) }).collect();
    Ok(Some((n, Head { code: resp.code, http10: resp.version != Some(1), fields })))
}

fn parse_head(resp: &Head, head: &Bytes, head_request: bool) -> Result<(http::response::Parts, Framing, bool), String> {
    let status = StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|_| "sent an invalid status".to_string())?;
    let mut headers = zhili_net::reuse::header_map(resp.fields.len());
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = resp.http10;
    for h in &resp.fields {
        let raw = head.get(h.name.0..h.name.0 + h.name.1).unwrap_or_default();
        let name = HeaderName::from_bytes(raw).map_err(|_| format!("sent an invalid header name {:?}", String::from_utf8_lossy(raw)))?;
        let (at, len) = h.value;
        let value = HeaderValue::from_maybe_shared(head.slice(at..at + len)).map_err(|_| format!("sent an invalid value for {name}"))?;
        if name == header::CONTENT_LENGTH {
            // RFC 9110: 1*DIGIT, nothing else ("+5", "0x5" and lists are framing attacks).
            let digits = value.as_bytes().trim_ascii();
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err("sent an invalid Content-Length".into());
            }
            let n: u64 = std::str::from_utf8(digits).ok().and_then(|v| v.parse().ok()).ok_or("sent an invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("sent conflicting Content-Length headers".into());
            }
            length = Some(n);
            // The gateway frames what it forwards itself.
            continue;
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            chunked = value.as_bytes().rsplit(|b| *b == b',').next().is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            let v = value.as_bytes();
            if v.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")) {
                close = true;
            } else if resp.http10 && v.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"keep-alive")) {
                close = false;
            }
        }
        headers.append(name, value);
    }
    // RFC 9112 6.3: Transfer-Encoding wins over Content-Length, and a message carrying both (or a
    // final coding other than chunked) is read until close and never reused.
    if transfer_encoding && (length.is_some() || !chunked) {
        close = true;
    }
    let framing = if head_request || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // A HEAD answer describes the GET body: its length is kept for the client.
        if let (true, Some(n)) = (head_request, length) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if transfer_encoding {
        Framing::UntilClose
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        close = true;
        Framing::UntilClose
    };
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.headers = headers;
    Ok((parts, framing, !close))
}

/// The request as bytes: request line (its target written by `target`), headers (with the
/// body's `Content-Length`), body; in a buffer from the worker's pool.
pub fn encode(method: &Method, target: impl FnOnce(&mut Vec<u8>), headers: &HeaderMap, body: &[u8]) -> zhili_net::reuse::Pooled {
    let mut out = zhili_net::reuse::Pooled::new();
    out.reserve(256 + headers.len() * 48 + body.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    target(&mut out);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        // Into the buffer itself: writing to a Vec cannot fail.
        let _ = std::io::Write::write_fmt(&mut *out, format_args!("{}", body.len()));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// How one request may be sent: what it is, and what the gateway may do on its own.
pub struct Exchange<'a> {
    /// The request bytes from [`encode`].
    pub request: &'a [u8],
    pub head_request: bool,
    /// An idempotent request that a reused connection lost before any answer may go again on a
    /// fresh one (RFC 9110 9.2.2); any other request is never sent twice by this client.
    pub idempotent: bool,
    pub connect_timeout: Duration,
    /// Live upstream connections an endpoint may have.
    pub max_connections: usize,
}

/// One endpoint's connections: the idle keep-alive ones, and a count of all live ones (pooled
/// or in use) that caps how many the gateway opens to it.
#[derive(Debug)]
pub struct Upstream {
    /// `address:port` to connect to.
    authority: String,
    /// Idle connections per gateway worker: a connection stays with the runtime whose reactor
    /// it is registered with.
    idle: [parking_lot::Mutex<Vec<Conn>>; POOLS],
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// One of an endpoint's connection slots, given back when the connection is dropped.
#[derive(Debug)]
struct ConnSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Idle-connection pools per upstream endpoint; gateway workers beyond this share them round.
pub const POOLS: usize = 16;

thread_local! {
    /// The gateway worker this thread is (0 off the worker threads).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as gateway worker `i`: its upstream connections go to pool `i`.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// Idle upstream connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

impl Upstream {
    pub fn new(authority: String) -> Self {
        Self { authority, idle: std::array::from_fn(|_| parking_lot::Mutex::default()), connections: Arc::default() }
    }

    /// This worker's idle connections.
    fn idle(&self) -> &parking_lot::Mutex<Vec<Conn>> {
        let [first, ..] = &self.idle;
        self.idle.get(WORKER.with(std::cell::Cell::get) % POOLS).unwrap_or(first)
    }

    fn take_idle(&self) -> Option<Conn> {
        self.idle().lock().pop()
    }

    /// A slot for a new connection, or None when the endpoint already has `max`.
    fn connection_slot(&self, max: usize) -> Option<ConnSlot> {
        use std::sync::atomic::Ordering;
        let mut n = self.connections.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self.connections.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(ConnSlot(self.connections.clone())),
                Err(seen) => n = seen,
            }
        }
    }

    /// Pools the connection only when its answer was framed exactly and nothing more is readable.
    fn give_back(&self, mut conn: Conn, keep_alive: bool) {
        if keep_alive && conn.is_clean() {
            let mut idle = self.idle().lock();
            if idle.len() < MAX_IDLE_PER_ENDPOINT {
                idle.push(conn);
            }
        }
    }
}

/// Sends the request to `ep` on a clean idle connection or a new one; the answer with its body
/// read whole (small) or streaming. `connects` counts the new connections.
pub async fn send(ep: &Arc<Upstream>, x: &Exchange<'_>, connects: &std::sync::atomic::AtomicU64) -> Result<Response<Body>, UpstreamError> {
    loop {
        let (mut conn, reused) = match ep.take_idle() {
            Some(mut c) => {
                // Anything readable on an idle connection (bytes past its last answer, or its
                // close) disqualifies it; nothing was sent on it, so another is taken.
                if !c.is_clean() {
                    continue;
                }
                (c, true)
            }
            None => {
                let slot = ep.connection_slot(x.max_connections).ok_or_else(|| {
                    UpstreamError::Saturated(format!("has {} open connections from this gateway, its limit; try again shortly", x.max_connections))
                })?;
                connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut c = Conn::connect(&ep.authority, x.connect_timeout).await?;
                c._slot = Some(slot);
                (c, false)
            }
        };
        let (parts, framing, keep_alive) = match conn.head(x.request, x.head_request).await {
            Ok(h) => h,
            // Lost before any answer on a reused connection: most likely closed while idle.
            Err(f) if reused && !f.answered && x.idempotent => continue,
            Err(f) => return Err(f.error),
        };
        let body = match framing {
            Framing::Empty => {
                ep.give_back(conn, keep_alive);
                empty()
            }
            Framing::Length(n) if n <= COLLECT_BELOW => {
                let b = conn.read_exact_body(n as usize).await.map_err(|e| UpstreamError::Failed(format!("broke off its answer: {e}")))?;
                ep.give_back(conn, keep_alive);
                full(b)
            }
            framing => {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(stream_body(ep.clone(), conn, framing, keep_alive, tx));
                Body::new(ChannelBody(rx))
            }
        };
        return Ok(Response::from_parts(parts, body));
    }
}

async fn stream_body(ep: Arc<Upstream>, mut conn: Conn, framing: Framing, keep_alive: bool, tx: mpsc::Sender<Result<Bytes, BoxError>>) {
    let result: Result<(), String> = async {
        match framing {
            Framing::Empty => {}
            Framing::Length(mut left) => {
                while left > 0 {
                    let b = conn.some(left.min(READ_CHUNK as u64 * 4) as usize).await?;
                    if b.is_empty() {
                        return Err(format!("closed the connection with {left} body bytes to go"));
                    }
                    left -= b.len() as u64;
                    deliver(&tx, b).await?;
                }
            }
            Framing::UntilClose => loop {
                let b = conn.some(READ_CHUNK * 4).await?;
                if b.is_empty() {
                    return Ok(());
                }
                deliver(&tx, b).await?;
            },
            Framing::Chunked => loop {
                let line = conn.line().await?;
                let size = line.split(|b| *b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size).ok().and_then(|s| u64::from_str_radix(s.trim(), 16).ok()).ok_or("sent an invalid chunk size")?;
                if size == 0 {
                    // Trailers are dropped (not forwarded); read up to the blank line.
                    while !conn.line().await?.is_empty() {}
                    return Ok(());
                }
                let mut left = size;
                while left > 0 {
                    let b = conn.some(left.min(READ_CHUNK as u64 * 4) as usize).await?;
                    if b.is_empty() {
                        return Err("closed the connection inside a chunk".into());
                    }
                    left -= b.len() as u64;
                    deliver(&tx, b).await?;
                }
                if !conn.line().await?.is_empty() {
                    return Err("sent a chunk without its CRLF".into());
                }
            },
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ep.give_back(conn, keep_alive),
        Err(e) => {
            let _ = tx.send(Err(format!("upstream {e}").into())).await;
        }
    }
}

/// Hands one chunk to the client's side; a client that takes nothing for [`CLIENT_TAKE_TIMEOUT`]
/// (not reading, or an HTTP/2 window left at zero) gives up the upstream connection.
async fn deliver(tx: &mpsc::Sender<Result<Bytes, BoxError>>, b: Bytes) -> Result<(), String> {
    match tokio::time::timeout(CLIENT_TAKE_TIMEOUT, tx.send(Ok(b))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("the client went away".into()),
        Err(_) => Err(format!("the client took nothing for {CLIENT_TAKE_TIMEOUT:?}")),
    }
}

/// A response body fed by [`stream_body`].
struct ChannelBody(mpsc::Receiver<Result<Bytes, BoxError>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(hyper::body::Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    /// An upstream that answers each request on a connection with the next canned answer.
    async fn canned(answers: Vec<&'static [u8]>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for a in answers {
                        let mut got = vec![];
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        s.write_all(a).await.unwrap();
                    }
                });
            }
        });
        (addr, conns)
    }

    fn endpoint(authority: &str) -> Arc<Upstream> {
        Arc::new(Upstream::new(authority.to_string()))
    }

    fn x(request: &[u8], head_request: bool) -> Exchange<'_> {
        Exchange { request, head_request, idempotent: true, connect_timeout: Duration::from_secs(1), max_connections: 16 }
    }

    async fn body(r: Response<Body>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn framings_and_connection_reuse() {
        let (addr, conns) = canned(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-Empty:\r\nX-B:  two words \r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        ])
        .await;
        let ep = endpoint(&addr);
        let req = encode(&Method::GET, |o| o.extend_from_slice(b"/x"), &HeaderMap::new(), b"");
        let r = send(&ep, &x(&req, false), &Default::default()).await.unwrap();
        assert_eq!(r.headers().get("x-a").unwrap(), "1");
        assert_eq!(r.headers().get("x-empty").unwrap(), "");
        assert_eq!(r.headers().get("x-b").unwrap(), "two words");
        assert_eq!(body(r).await, "hello");
        let r = send(&ep, &x(&req, false), &Default::default()).await.unwrap();
        assert_eq!(body(r).await, "abcde");
        // The chunked body's task hands the connection back when it ends.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(send(&ep, &x(&req, false), &Default::default()).await.unwrap().status(), StatusCode::NO_CONTENT);
        // A HEAD answer has no body even with a Content-Length.
        let head = encode(&Method::HEAD, |o| o.extend_from_slice(b"/x"), &HeaderMap::new(), b"");
        let r = send(&ep, &x(&head, true), &Default::default()).await.unwrap();
        assert_eq!(body(r).await, "");
        assert_eq!(conns.load(std::sync::atomic::Ordering::Relaxed), 1, "one connection for all four");
    }

    #[tokio::test]
    async fn close_delimited_bodies_broken_bodies_and_stale_connections() {
        let (addr, _) = canned(vec![b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"]).await;
        let ep = endpoint(&addr);
        let req = encode(&Method::GET, |o| o.extend_from_slice(b"/"), &HeaderMap::new(), b"");
        let r = send(&ep, &x(&req, false), &Default::default()).await.unwrap();
        assert_eq!(body(r).await, "until the end");
        assert!(ep.take_idle().is_none(), "a closing connection is not pooled");

        let (addr, _) = canned(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]).await;
        let ep = endpoint(&addr);
        // The server task ends after its one answer, so the connection closes mid-body.
        let e = send(&ep, &x(&req, false), &Default::default()).await.unwrap_err();
        assert!(e.to_string().contains("broke off"), "{e}");

        // A pooled connection the upstream closed while idle: the request goes on a fresh one.
        let (addr, conns) = canned(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        let ep = endpoint(&addr);
        assert_eq!(body(send(&ep, &x(&req, false), &Default::default()).await.unwrap()).await, "ok");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(body(send(&ep, &x(&req, false), &Default::default()).await.unwrap()).await, "ok");
        assert_eq!(conns.load(std::sync::atomic::Ordering::Relaxed), 2);

        let (addr, _) = canned(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok"]).await;
        let e = send(&endpoint(&addr), &x(&req, false), &Default::default()).await.unwrap_err();
        assert!(e.to_string().contains("conflicting"), "{e}");
    }

    #[test]
    fn requests_carry_their_body_length() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("svc"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let out = encode(&Method::POST, |o| o.extend_from_slice(b"/a?b=1"), &h, b"xyz");
        assert_eq!(*out, b"POST /a?b=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\nxyz");
    }
}

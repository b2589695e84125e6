//! An HTTP/1.1 server side for the common case, shared by the gateway and the API, Nacos and
//! DTM listeners: request heads are parsed with httparse out of one buffer per connection, the
//! request is built from slices of that buffer (no copies), handed to the listener's handler, and
//! the answer is written by hand (head and a whole body in one write). Keep-alive and pipelining
//! follow RFC 9112: requests are answered in order, one at a time.
//!
//! What this path does not serve it hands over to hyper, with the bytes it has read and not
//! served: anything it cannot parse (hyper then answers 400 or 431 exactly as before, or speaks
//! HTTP/2 to a client that opened with the HTTP/2 preface), heads over the size limit, chunked
//! or large request bodies, `Expect`, and upgrades (WebSocket, h2c). A hand-over happens only
//! between requests, so the connection stays well framed.
//!
//! Deadlines cost no timer per request: the connection's watchdog ([`crate::Conn`]) closes
//! it when the client is idle too long, takes too long over a request head (and the small body
//! read with it), or stops reading an answer.
//!
//! Memory: a connection starts with a small read buffer ([`FIRST_READ`]) that grows only for
//! larger heads or pipelined bursts, and holds no write buffer between answers (they come from a
//! small per-thread pool), so a client blocked in a long poll or idle between requests costs
//! little more than its socket and its handler's future.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::conn::PANIC_BODY;
use crate::Conn;

/// Header lines accepted in one request head, as hyper's server (more: hyper answers 431).
const MAX_HEADERS: usize = 100;
/// Answer bytes gathered before they are written (a larger body frame is written on its own).
const GATHER: usize = 64 * 1024;
/// The read buffer a connection starts with: room for a typical request head, small enough that
/// thousands of long-polling clients cost little.
pub const FIRST_READ: usize = 1024;
/// How much the read buffer grows by when a head or a burst of pipelined requests needs more.
const GROW: usize = 8192;

/// What the fast path takes whole; more goes to hyper.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The longest request head served here (a longer one goes to hyper, which answers 431).
    pub max_head: usize,
    /// The largest request body read with its head (a larger one goes to hyper, streamed).
    pub max_body: u64,
    /// Headers the handler adds to the request on its way on (a proxy's forwarding headers):
    /// room for them is made when the request's header map is, so it is not grown later.
    pub added_headers: usize,
}

/// How a connection left the fast path.
pub enum Outcome {
    /// Closed: the client left, asked to close, broke the framing, or the server is stopping.
    Closed,
    /// The rest of the connection belongs to hyper; these bytes were read and not served.
    Hyper(Bytes),
}

/// Where the parts of a parsed head lie in the connection's buffer.
struct Head {
    len: usize,
    method: Method,
    target: (usize, usize),
    http10: bool,
}

/// Serves requests on `io` with `handler` until the client closes, a request needs hyper, or
/// `stop` turns true. The handler gets the request with its whole body.
pub async fn serve<I, F, Fut, B>(
    io: &mut I,
    options: Options,
    conn: &std::sync::Arc<Conn>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    mut handler: F,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<Bytes>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = BytesMut::new();
    let mut spans: Vec<[usize; 4]> = Vec::new();
    let (max_head, max_body) = (options.max_head.max(1024), options.max_body);
    loop {
        if *stop.borrow() {
            return Outcome::Closed;
        }
        let head = loop {
            if !buf.is_empty() {
                match parse(&buf, &mut spans) {
                    Ok(Some(h)) if h.len <= max_head => break h,
                    Ok(None) if buf.len() <= max_head => {}
                    _ => return Outcome::Hyper(buf.freeze()),
                }
            }
            let spare = buf.capacity() - buf.len();
            if spare < 256 {
                buf.reserve(if buf.capacity() == 0 { FIRST_READ } else { GROW });
            }
            let read = tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => r,
                _ = stop.changed(), if buf.is_empty() => return Outcome::Closed,
            };
            match read {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(_) => {}
            }
        };
        let whole = |head: &Bytes, rest: &BytesMut| {
            let mut all = BytesMut::with_capacity(head.len() + rest.len());
            all.extend_from_slice(head);
            all.extend_from_slice(rest);
            Outcome::Hyper(all.freeze())
        };
        let bytes = buf.split_to(head.len).freeze();
        let Some((uri, headers)) = build(&bytes, &head, &spans, options.added_headers) else { return whole(&bytes, &buf) };
        let Some(framing) = request_framing(&headers, head.http10) else { return whole(&bytes, &buf) };
        if framing.body > max_body {
            return whole(&bytes, &buf);
        }
        // The body (small, by the check above) is read with the head, under the head's deadline.
        while (buf.len() as u64) < framing.body {
            buf.reserve(framing.body as usize - buf.len());
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(_) => {}
            }
        }
        let mut req = Request::new(buf.split_to(framing.body as usize).freeze());
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = if head.http10 { Version::HTTP_10 } else { Version::HTTP_11 };
        *req.headers_mut() = headers;
        drop(bytes);
        let guard = conn.begin_request();
        let mut keep_alive = framing.keep_alive;
        let is_head = head.method == Method::HEAD;
        let answered = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(req))) {
            Ok(fut) => futures_util::future::Either::Left(AssertUnwindSafe(fut).catch_unwind()),
            Err(panic) => futures_util::future::Either::Right(std::future::ready(Err(panic))),
        };
        tokio::pin!(answered);
        // While the answer is awaited the socket is still read, into a small buffer on the
        // stack (a held request must not cost a read buffer): a client that closes its side
        // drops its request (a long poll, typically) rather than leaving it to run out its wait.
        // Bytes sent meanwhile (pipelined requests) are kept, up to `max_head` of them; past
        // that the client is not read until the answer is out.
        let mut probe = [0u8; 256];
        let answered = loop {
            tokio::select! {
                biased;
                done = answered.as_mut() => break done,
                read = io.read(&mut probe), if buf.len() < max_head => match read {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(n) => buf.extend_from_slice(probe.get(..n).unwrap_or_default()),
                },
            }
        };
        let wrote = match answered {
            Ok(resp) => respond(io, resp, is_head, head.http10, &mut keep_alive).await,
            Err(panic) => {
                tracing::error!(method = %head.method, cause = crate::panic_message(&*panic), "request panicked; answered 500");
                let mut out = crate::reuse::buffer();
                out.extend_from_slice(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/problem+json\r\nconnection: close\r\ncontent-length: ");
                decimal(PANIC_BODY.len() as u64, &mut out);
                out.extend_from_slice(b"\r\n\r\n");
                out.extend_from_slice(PANIC_BODY.as_bytes());
                let _ = io.write_all(&out).await;
                crate::reuse::give_back_buffer(out);
                false
            }
        };
        drop(guard);
        if !wrote || !keep_alive {
            let _ = io.shutdown().await;
            return Outcome::Closed;
        }
        // A buffer that grew for a large head or body is not kept while the connection idles.
        if buf.is_empty() && buf.capacity() > 64 * 1024 {
            buf = BytesMut::new();
        }
    }
}

/// Parses one request head from the start of `buf`: None while it is incomplete, Err when it is
/// malformed. Header positions go to `spans` as [name start, name len, value start, value len].
fn parse(buf: &[u8], spans: &mut Vec<[usize; 4]>) -> Result<Option<Head>, ()> {
    // Left uninitialized: httparse fills only as many as the head has.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let base = buf.as_ptr() as usize;
    // An empty value need not point into the buffer: it is empty wherever it is.
    let at = |s: &[u8]| if s.is_empty() { (0, 0) } else { (s.as_ptr() as usize - base, s.len()) };
    spans.clear();
    for h in req.headers.iter() {
        let (n, nl) = at(h.name.as_bytes());
        let (v, vl) = at(h.value);
        spans.push([n, nl, v, vl]);
    }
    let method = Method::from_bytes(req.method.ok_or(())?.as_bytes()).map_err(|_| ())?;
    let target = at(req.path.ok_or(())?.as_bytes());
    Ok(Some(Head { len, method, target, http10: req.version == Some(0) }))
}

/// The request target and headers, sharing the head's memory. None when hyper must judge them.
fn build(bytes: &Bytes, head: &Head, spans: &[[usize; 4]], added: usize) -> Option<(Uri, HeaderMap)> {
    let (t, tl) = head.target;
    let uri = Uri::from_maybe_shared(bytes.slice(t..t + tl)).ok()?;
    let mut headers = crate::reuse::header_map(spans.len() + added);
    for &[n, nl, v, vl] in spans {
        let name = HeaderName::from_bytes(bytes.get(n..n + nl)?).ok()?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(v..v + vl)).ok()?;
        headers.append(name, value);
    }
    Some((uri, headers))
}

/// How a request is framed and whether the connection may carry another.
struct RequestFraming {
    body: u64,
    keep_alive: bool,
}

/// None for what the fast path leaves to hyper: chunked or otherwise encoded bodies, several
/// or malformed lengths, `Expect`, and upgrades.
fn request_framing(headers: &HeaderMap, http10: bool) -> Option<RequestFraming> {
    if headers.contains_key(header::TRANSFER_ENCODING) || headers.contains_key(header::EXPECT) || headers.contains_key(header::UPGRADE) {
        return None;
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let body = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(v), None) => {
            let v = v.as_bytes();
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(v).ok()?.parse().ok()?
        }
        _ => return None,
    };
    let (mut close, mut keep) = (false, false);
    for token in connection_tokens(headers) {
        if token.eq_ignore_ascii_case(b"upgrade") {
            return None;
        }
        close |= token.eq_ignore_ascii_case(b"close");
        keep |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    Some(RequestFraming { body, keep_alive: !close && (!http10 || keep) })
}

/// How an answer's body is framed on the wire.
#[derive(PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes the answer; false when the connection must close (a failed write or a body that broke
/// off). `keep_alive` turns false when the answer ends the connection.
async fn respond<I, B>(io: &mut I, resp: Response<B>, head_request: bool, http10: bool, keep_alive: &mut bool) -> bool
where
    I: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
{
    let mut out = crate::reuse::buffer();
    let wrote = write_answer(io, &mut out, resp, head_request, http10, keep_alive).await;
    crate::reuse::give_back_buffer(out);
    wrote
}

async fn write_answer<I, B>(io: &mut I, out: &mut Vec<u8>, resp: Response<B>, head_request: bool, http10: bool, keep_alive: &mut bool) -> bool
where
    I: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
{
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status;
    if connection_tokens(&parts.headers).any(|t| t.eq_ignore_ascii_case(b"close")) {
        *keep_alive = false;
    }
    let framing = if head_request || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if let Some(n) = content_length(&parts.headers) {
        Framing::Length(n)
    } else if http10 {
        *keep_alive = false;
        Framing::UntilClose
    } else {
        Framing::Chunked
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let ours = framing != Framing::None;
    for (name, value) in &parts.headers {
        if ours && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A HEAD answer tells the length a GET would have had, when the handler left that body in
    // (an empty one says nothing: a proxied HEAD answer is empty whatever the GET's length).
    let bodiless_length = (head_request && !parts.headers.contains_key(header::CONTENT_LENGTH)).then(|| body.size_hint().exact()).flatten().filter(|n| *n > 0);
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            decimal(n, out);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None => {
            if let Some(n) = bodiless_length.filter(|_| !status.is_informational() && status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED) {
                out.extend_from_slice(b"content-length: ");
                decimal(n, out);
                out.extend_from_slice(b"\r\n");
            }
        }
        Framing::UntilClose => {}
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    if !*keep_alive && !parts.headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    } else if *keep_alive && http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // The head is written out: its map serves the next request on this thread.
    crate::reuse::give_back_map(std::mem::take(&mut parts.headers));
    if framing == Framing::None {
        return io.write_all(out).await.is_ok();
    }
    let mut sent: u64 = 0;
    loop {
        // Whatever is ready goes out with the head; the rest as it comes.
        let next = match body.frame().now_or_never() {
            Some(f) => f,
            None => {
                if !out.is_empty() && io.write_all(out).await.is_err() {
                    return false;
                }
                out.clear();
                body.frame().await
            }
        };
        let data = match next {
            None => break,
            Some(Err(_)) => {
                let _ = io.write_all(out).await;
                return false;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Framing::Length(n) = framing {
            if sent > n {
                // The body says more than its length: the extra never goes out.
                let _ = io.write_all(out).await;
                return false;
            }
        }
        if framing == Framing::Chunked {
            hex(data.len(), out);
            out.extend_from_slice(b"\r\n");
        }
        if data.len() > GATHER {
            if io.write_all(out).await.is_err() || io.write_all(&data).await.is_err() {
                return false;
            }
            out.clear();
        } else {
            out.extend_from_slice(&data);
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() > GATHER {
            if io.write_all(out).await.is_err() {
                return false;
            }
            out.clear();
        }
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if io.write_all(out).await.is_err() {
        return false;
    }
    match framing {
        Framing::Length(n) => sent == n,
        Framing::UntilClose => false,
        _ => true,
    }
}

/// The comma-separated tokens of every `Connection` header, trimmed (either direction).
pub fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    h.get_all(header::CONNECTION).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).map(<[u8]>::trim_ascii)
}

/// The `Content-Length` a head declares, when it is one valid number.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Appends `n` in lowercase hexadecimal (a chunk size).
fn hex(n: usize, out: &mut Vec<u8>) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        let d = ((n >> (i * 4)) & 0xf) as u8;
        out.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}

/// Appends `n` in decimal.
fn decimal(n: u64, out: &mut Vec<u8>) {
    let start = out.len();
    let mut n = n;
    loop {
        out.push(b'0' + (n % 10) as u8);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if let Some(digits) = out.get_mut(start..) {
        digits.reverse();
    }
}

/// Appends the current time as an HTTP date, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(c.1.as_bytes());
    });
}

/// A connection's socket with bytes already read from it put back in front, for hyper.
pub struct Replay<I> {
    pre: Bytes,
    io: I,
}

impl<I> Replay<I> {
    pub fn new(pre: Bytes, io: I) -> Self {
        Self { pre, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Replay<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let chunk = self.pre.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Replay<I> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{serve, Options, Outcome};
    use crate::{Admission, Limits};

    /// Counts drops: a handler's future holds one while it runs.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Serves one accepted connection with a handler that answers "{method} {path} {body}", and
    /// never answers `/hold`. Returns the client side, how the server side ended, and the count
    /// of dropped handler futures.
    async fn serving() -> (TcpStream, tokio::task::JoinHandle<Outcome>, Arc<AtomicUsize>, tokio::sync::watch::Sender<bool>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        let (stream, _) = l.accept().await.expect("accept");
        let (stream, conn) = Admission::new("test", Limits::default()).admit(stream, true).expect("admitted");
        let dropped = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let counter = dropped.clone();
        let server = tokio::spawn(async move {
            let mut io = conn.wrap(stream);
            let handler = |req: Request<Bytes>| {
                let guard = Dropped(counter.clone());
                async move {
                    let _guard = guard;
                    if req.uri().path() == "/hold" {
                        std::future::pending::<()>().await;
                    }
                    let text = format!("{} {} {}", req.method(), req.uri().path(), String::from_utf8_lossy(req.body()));
                    Response::new(Full::new(Bytes::from(text)))
                }
            };
            serve(&mut io, Options { max_head: 8192, max_body: 1024, added_headers: 0 }, &conn, &mut stopped, handler).await
        });
        (client, server, dropped, stop)
    }

    async fn read_until(client: &mut TcpStream, got: &mut Vec<u8>, want: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(got).contains(want) {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, client.read(&mut chunk)).await.expect("in time").expect("read");
            assert!(n > 0, "closed before {want:?}: {}", String::from_utf8_lossy(got));
            got.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let (mut client, server, dropped, _stop) = serving().await;
        client.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyzGET /c HTTP/1.1\r\n\r\n").await.expect("write");
        let mut got = Vec::new();
        read_until(&mut client, &mut got, "GET /c ").await;
        let text = String::from_utf8_lossy(&got);
        let (a, b, c) = (text.find("GET /a ").expect("a"), text.find("POST /b xyz").expect("b"), text.find("GET /c ").expect("c"));
        assert!(a < b && b < c, "in order: {text}");
        assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{text}");
        assert_eq!(dropped.load(Ordering::SeqCst), 3);
        drop(client);
        assert!(matches!(server.await.expect("server"), Outcome::Closed));
    }

    #[tokio::test]
    async fn a_client_that_leaves_drops_its_held_request() {
        let (mut client, server, dropped, _stop) = serving().await;
        client.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "the held request is still running");
        drop(client);
        let outcome = tokio::time::timeout(Duration::from_secs(5), server).await.expect("the server side ends").expect("server");
        assert!(matches!(outcome, Outcome::Closed));
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the held request was dropped");
    }

    #[tokio::test]
    async fn what_the_fast_path_does_not_serve_is_handed_over_with_its_bytes() {
        for request in [
            &b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /x HTTP/1.1\r\nContent-Length: 2048\r\n\r\n",
        ] {
            let (mut client, server, _dropped, _stop) = serving().await;
            client.write_all(b"GET /first HTTP/1.1\r\n\r\n").await.expect("write");
            let mut got = Vec::new();
            read_until(&mut client, &mut got, "GET /first ").await;
            client.write_all(request).await.expect("write");
            let outcome = tokio::time::timeout(Duration::from_secs(5), server).await.expect("handed over").expect("server");
            let Outcome::Hyper(read) = outcome else { panic!("not handed over: {}", String::from_utf8_lossy(request)) };
            assert!(request.starts_with(&read), "the bytes read are handed over unchanged: {read:?}");
        }
    }

    #[tokio::test]
    async fn a_stopping_server_closes_idle_connections() {
        let (_client, server, _dropped, stop) = serving().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send_replace(true);
        let outcome = tokio::time::timeout(Duration::from_secs(5), server).await.expect("ends").expect("server");
        assert!(matches!(outcome, Outcome::Closed));
    }
}

//! Body types of the request path: the body both directions use (bytes in hand, or any other
//! body boxed), the outgoing request body (replayable bytes or a one-shot stream), and the client
//! body that notes why it broke.

use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::Version;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body both directions use. A whole body in hand (the common small answer, a problem
/// document) is kept as it is; only a streamed one is boxed, so a plain proxied answer costs no
/// allocation for its body.
pub enum Body {
    /// All of it; `None` when empty or once sent.
    Whole(Option<Bytes>),
    Boxed(http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    /// Any other body, boxed.
    pub fn new<B>(b: B) -> Self
    where
        B: hyper::body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        Body::Boxed(b.boxed_unsync())
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Whole(b) => f.debug_tuple("Whole").field(&b.as_ref().map_or(0, Bytes::len)).finish(),
            Body::Boxed(_) => f.write_str("Boxed"),
        }
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::Whole(None)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Whole(b) => std::task::Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(hyper::body::Frame::data(b)))),
            Body::Boxed(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Whole(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Body::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Whole(b) => hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Boxed(b) => b.size_hint(),
        }
    }
}

/// A client's request body on the request path: hyper's, or bytes the gateway's own HTTP/1.1
/// server read (which cannot fail). `Sync`, since the phases hold the request across awaits,
/// with a concrete error type, which keeps those futures provably `Send`.
pub type RequestBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A request body of bytes already read.
pub fn request_bytes(b: Bytes) -> RequestBody {
    if b.is_empty() {
        Empty::new().map_err(|never| match never {}).boxed()
    } else {
        Full::new(b).map_err(|never| match never {}).boxed()
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Body::Whole(Some(b.into()))
}

pub fn empty() -> Body {
    Body::Whole(None)
}

/// The request body as it will be sent upstream: replayable bytes, or a one-shot stream.
pub enum Outgoing {
    Replayable(Bytes),
    Stream(Option<Body>),
}

impl Outgoing {
    pub fn take(&mut self) -> Option<Body> {
        match self {
            Outgoing::Replayable(b) => Some(if b.is_empty() { empty() } else { full(b.clone()) }),
            Outgoing::Stream(s) => s.take(),
        }
    }
}

pub fn has_body(parts: &http::request::Parts, body: &RequestBody) -> bool {
    let h = &parts.headers;
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
        || (parts.version == Version::HTTP_2 && !hyper::body::Body::is_end_stream(body))
}

pub use zhili_net::h1_server::{connection_tokens, content_length};

/// A streamed client body that notes why it broke (malformed chunking, an abandoned upload), so
/// the failed send is put down to the client.
pub struct ClientBody {
    inner: Body,
    broken: Broken,
}

/// Why a client body broke, once it has.
pub type Broken = Arc<std::sync::Mutex<Option<String>>>;

impl ClientBody {
    /// `inner` as a body to send upstream, and the cell that tells whether (and why) it broke.
    pub fn watch(inner: Body) -> (Body, Broken) {
        let broken = Broken::default();
        (Body::new(Self { inner, broken: broken.clone() }), broken)
    }

    /// Why the client's body broke, if it did.
    pub fn why(broken: &Broken) -> Option<String> {
        broken.lock().ok().and_then(|b| b.clone())
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &r {
            if let Ok(mut b) = self.broken.lock() {
                *b = Some(e.to_string());
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

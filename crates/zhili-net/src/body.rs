//! A request body that fails when the client stops sending: a request announcing a large
//! `Content-Length` and then sending nothing would otherwise hold its handler forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// What a stalled body reports; handlers see it as a body read error.
#[derive(Debug)]
pub struct BodyTimeout(Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body: nothing received for {:?}", self.0)
    }
}

impl std::error::Error for BodyTimeout {}

/// Wraps a body so that waiting longer than `timeout` for its next frame is an error. The timer
/// exists only while a read waits, so bodies that arrive promptly cost no timer.
pub struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    quiet: QuietAllowed,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self { inner, timeout, sleep: None, quiet: QuietAllowed::default() }
    }

    /// The switch that takes this body off its deadline; the server puts it in the request's
    /// extensions for the handler.
    pub fn quiet_switch(&self) -> QuietAllowed {
        self.quiet.clone()
    }
}

/// Found in the extensions of a request whose body has a read deadline: a handler whose request
/// body is a long-lived stream on which silence is normal (a gRPC bidirectional stream that only
/// carries the client's answers to pushes) calls [`QuietAllowed::allow`], and the body then
/// waits for its next frame without a deadline. A dead client is still found: by the
/// connection's keep-alive pings (HTTP/2) and the listener's other deadlines.
#[derive(Clone, Debug, Default)]
pub struct QuietAllowed(Arc<AtomicBool>);

impl QuietAllowed {
    pub fn allow(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn allowed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.sleep = None;
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.quiet.allowed() => {
                this.sleep = None;
                Poll::Pending
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that never yields a frame.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_body_errors_after_the_timeout() {
        let err = TimedBody::new(Stalled, Duration::from_secs(10)).collect().await.expect_err("times out");
        assert!(err.to_string().contains("nothing received"), "{err}");
    }

    /// Allowed quiet before or while a read waits (the timer already running), a stalled body
    /// waits on past its deadline.
    #[tokio::test(start_paused = true)]
    async fn a_body_allowed_quiet_waits_past_the_deadline() {
        for allow_first in [true, false] {
            let body = TimedBody::new(Stalled, Duration::from_secs(10));
            let switch = body.quiet_switch();
            if allow_first {
                switch.allow();
            }
            let mut read = std::pin::pin!(body.collect());
            assert!(futures_util::FutureExt::now_or_never(&mut read).is_none(), "nothing to read yet");
            switch.allow();
            let waited = tokio::time::timeout(Duration::from_secs(3600), read).await;
            assert!(waited.is_err(), "allow_first={allow_first}: the body ended instead of waiting");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn prompt_body_passes() {
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let got = TimedBody::new(body, Duration::from_secs(10)).collect().await.expect("body").to_bytes();
        assert_eq!(&got[..], b"hello");
    }
}

//! Request layers as plain tower services. axum's `middleware::from_fn` clones the boxed inner
//! service, builds a `Next` and boxes a future on every request, for every layer: on a Nacos
//! config get the four such layers (body limit, authorization, audit, metrics) cost more than
//! the handler. A [`Gate`] decides synchronously, before the handler runs, whether to answer
//! at once, pass the request on untouched (the inner service is called directly: no clone, no
//! box), or wrap the handler's future (writes to audit, tokens to watch for revocation).

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use futures_util::future::Either;
use tower::{Layer, Service};

/// A handler's answer, boxed: what a [`Step::Wrap`] wrapper receives and returns.
pub type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Wraps the handler's future in more work (done after it, or raced against it).
pub type Wrapper = Box<dyn FnOnce(Answer) -> Answer + Send>;

/// What a [`Gate`] decides about one request.
pub enum Step {
    /// Answer now; the handler does not run.
    Answer(Response),
    /// Run the handler as it is.
    Pass,
    /// Run the handler inside this wrapper.
    Wrap(Wrapper),
}

/// A synchronous decision in front of a router's handlers (see the module docs).
pub trait Gate: Clone + Send + Sync + 'static {
    /// May change the request (add extensions) before it is passed on.
    fn check(&self, req: &mut Request) -> Step;
}

/// The tower [`Layer`] of a [`Gate`]: `router.layer(GateLayer(gate))`.
#[derive(Clone)]
pub struct GateLayer<G>(pub G);

impl<S, G: Clone> Layer<S> for GateLayer<G> {
    type Service = Gated<S, G>;
    fn layer(&self, inner: S) -> Self::Service {
        Gated { inner, gate: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Gated<S, G> {
    inner: S,
    gate: G,
}

type Immediate = Ready<Result<Response, Infallible>>;
type Wrapped = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S, G> Service<Request> for Gated<S, G>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
    G: Gate,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Immediate, Either<S::Future, Wrapped>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match self.gate.check(&mut req) {
            Step::Answer(resp) => Either::Left(ready(Ok(resp))),
            Step::Pass => Either::Right(Either::Left(self.inner.call(req))),
            Step::Wrap(wrap) => {
                let handler = self.inner.call(req);
                let answer = wrap(Box::pin(async move {
                    match handler.await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    }
                }));
                Either::Right(Either::Right(Box::pin(async move { Ok(answer.await) })))
            }
        }
    }
}

/// Times every request into `http_requests` by method, route template and status, without
/// boxing the handler's future (the metrics layer sees every request).
#[derive(Clone)]
pub struct ObserveLayer(pub crate::AppState);

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, state: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    state: crate::AppState,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let start = Instant::now();
        let method = req.method().to_string();
        // The route template keeps label cardinality bounded; unmatched paths share one label.
        let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
        Observed { inner: self.inner.call(req), done: Some((self.state.clone(), start, method, route)) }
    }
}

pin_project_lite::pin_project! {
    pub struct Observed<F> {
        #[pin]
        inner: F,
        done: Option<(crate::AppState, Instant, String, String)>,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Observed<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let (Ok(resp), Some((state, start, method, route))) = (&out, this.done.take()) {
            let labels = zhili_telemetry::HttpLabels { method, route, status: resp.status().as_u16() };
            state.metrics.http_requests.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
        }
        Poll::Ready(out)
    }
}

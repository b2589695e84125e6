//! Request layers as plain tower services. axum's `middleware::from_fn` clones the boxed inner
//! service, builds a `Next` and boxes a future on every request, for every layer: on a Nacos
//! config get the four such layers (body limit, authorization, audit, metrics) cost about as
//! much as the handler. A [`Gate`] decides synchronously, before the handler runs, whether to answer
//! at once, pass the request on untouched (the inner service is called directly: no clone, no
//! box), or wrap the handler's future (writes to audit, tokens to watch for revocation).

use std::cell::RefCell;
use std::collections::HashSet;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::Response;
use futures_util::future::Either;
use tower::{Layer, Service};
use zhili_telemetry::SharedLabel;

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
        let method = method_label(req.method());
        // The route template keeps label cardinality bounded; unmatched paths share one label.
        let route = route_label(req.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str));
        Observed { inner: self.inner.call(req), done: Some((self.state.clone(), start, method, route)) }
    }
}

/// The standard methods by name, any other as `OTHER`: a label per invented method would let any
/// client grow the metrics without bound.
fn method_label(method: &Method) -> &'static str {
    static STANDARD: [Method; 9] =
        [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::HEAD, Method::OPTIONS, Method::PATCH, Method::CONNECT, Method::TRACE];
    STANDARD.iter().find(|m| *m == method).map_or("OTHER", Method::as_str)
}

/// One shared copy of each route template per thread, so labelling a request copies none. The set
/// is bounded: templates come from the routers' code, not from requests.
fn route_label(template: &str) -> SharedLabel {
    thread_local! {
        static TEMPLATES: RefCell<HashSet<Arc<str>>> = RefCell::default();
    }
    TEMPLATES.with_borrow_mut(|known| {
        if let Some(shared) = known.get(template) {
            return SharedLabel(shared.clone());
        }
        let shared: Arc<str> = template.into();
        known.insert(shared.clone());
        SharedLabel(shared)
    })
}

pin_project_lite::pin_project! {
    pub struct Observed<F> {
        #[pin]
        inner: F,
        done: Option<(crate::AppState, Instant, &'static str, SharedLabel)>,
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::{Extension, Router};
    use tower::ServiceExt;

    use super::*;

    #[derive(Clone)]
    struct Seen(&'static str);

    /// Refuses `/refused`, wraps `/wrapped` (adds a header after the handler), passes the rest
    /// with an extension the handler reads.
    #[derive(Clone)]
    struct Demo;

    impl Gate for Demo {
        fn check(&self, req: &mut Request) -> Step {
            match req.uri().path() {
                "/refused" => Step::Answer(StatusCode::FORBIDDEN.into_response()),
                "/wrapped" => Step::Wrap(Box::new(|handler| {
                    Box::pin(async move {
                        let mut resp = handler.await;
                        resp.headers_mut().insert("x-wrapped", HeaderValue::from_static("yes"));
                        resp
                    })
                })),
                _ => {
                    req.extensions_mut().insert(Seen("passed"));
                    Step::Pass
                }
            }
        }
    }

    async fn call(app: &Router, path: &str) -> (StatusCode, Option<HeaderValue>, String) {
        let resp = app.clone().oneshot(Request::builder().uri(path).body(Body::empty()).unwrap()).await.unwrap();
        let (status, wrapped) = (resp.status(), resp.headers().get("x-wrapped").cloned());
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        (status, wrapped, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_gate_answers_passes_or_wraps() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        let handler = move |seen: Option<Extension<Seen>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { seen.map_or("no extension", |Extension(s)| s.0) }
        };
        let app = Router::new().route("/{p}", get(handler)).layer(GateLayer(Demo));
        assert_eq!(call(&app, "/refused").await, (StatusCode::FORBIDDEN, None, String::new()));
        assert_eq!(runs.load(Ordering::SeqCst), 0, "an answered request never reaches the handler");
        assert_eq!(call(&app, "/plain").await, (StatusCode::OK, None, "passed".into()));
        assert_eq!(call(&app, "/wrapped").await, (StatusCode::OK, Some(HeaderValue::from_static("yes")), "no extension".into()));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}

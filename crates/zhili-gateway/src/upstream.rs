//! Upstream clients other than the gateway's own HTTP/1.1 client ([`crate::h1`]): pooled h2c for
//! gRPC, and hyper on a new connection for upgrades (WebSocket) and streamed request bodies.

use std::time::Duration;

use http::header;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::{content_length, full, Body, BoxError};
use crate::error::UpstreamError;

/// The pooled h2c client for gRPC upstreams (HTTP/1.1 connections are pooled per endpoint).
pub struct Upstreams {
    pub h2c: Client<HttpConnector, Body>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let mut b = Client::builder(TokioExecutor::new());
        b.http2_only(true).pool_idle_timeout(Duration::from_secs(90)).pool_timer(TokioTimer::new()).timer(TokioTimer::new());
        Self { h2c: b.build(connector) }
    }
}

/// The answer to send downstream; small bodies (with a Content-Length) are read whole so head
/// and body leave in one write, and a body that breaks off is a failed try. gRPC answers keep
/// their trailers: always streamed.
pub async fn finish(resp: Response<Incoming>) -> Result<Response<Body>, UpstreamError> {
    let (mut parts, body) = resp.into_parts();
    let grpc = parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let small = content_length(&parts.headers).is_some_and(|n| n <= crate::h1::COLLECT_BELOW);
    // Re-framed from what is read: the body's own length (or chunks) decides, not the header.
    parts.headers.remove(header::CONTENT_LENGTH);
    if !grpc && small {
        let c = body.collect().await.map_err(|e| UpstreamError::Failed(format!("broke off its answer: {e}")))?;
        return Ok(Response::from_parts(parts, full(c.to_bytes())));
    }
    Ok(Response::from_parts(parts, Body::new(body.map_err(|e| -> BoxError { Box::new(e) }))))
}

/// Through hyper on a new connection: upgrades (WebSocket) and streamed request bodies.
pub async fn send_hyper(authority: &str, req: Request<Body>, connect_timeout: Duration) -> Result<Response<Incoming>, UpstreamError> {
    let stream = crate::h1::connect_tcp(authority, connect_timeout).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| UpstreamError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await.map_err(|e| UpstreamError::Failed(e.to_string()))
}

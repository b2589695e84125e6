//! The event log through the SDK: append CloudEvents with an expected revision, read a stream
//! (or `$all`, or a `$ce-` category), subscribe with catch-up then live delivery (resuming by
//! itself after a dropped connection), and consume a persistent subscription with ack/nack.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{encode, Client, ClientError, REQUEST_TIMEOUT};

/// What a stream's current revision must be for an append to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Any,
    NoStream,
    Exists,
    Revision(u64),
}

impl Expected {
    fn query(self) -> String {
        match self {
            Self::Any => "any".into(),
            Self::NoStream => "no_stream".into(),
            Self::Exists => "exists".into(),
            Self::Revision(n) => n.to_string(),
        }
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Appended {
    pub revision: u64,
    pub last_revision: u64,
    pub position: u64,
    pub last_position: u64,
}

/// One event as read: its number in what was read (revision, position or category sequence).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReadEvent {
    pub revision: u64,
    pub position: u64,
    pub stream: String,
    pub event: Value,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReadPage {
    pub events: Vec<ReadEvent>,
    /// Where the next page starts; None at the end.
    pub next: Option<u64>,
}

/// An event handed out by a persistent subscription.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GroupEvent {
    pub ack_id: String,
    pub revision: u64,
    pub position: u64,
    pub stream: String,
    pub deliveries: u32,
    pub event: Value,
}

/// What to do with events given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackAction {
    Retry,
    Park,
    Skip,
}

impl Client {
    /// Appends CloudEvents (structured JSON objects) to `stream`, atomically.
    pub async fn append(&self, stream: &str, expected: Expected, events: &[Value]) -> Result<Appended, ClientError> {
        let path = format!("/api/v1/streams/{}?expected_revision={}", encode(stream), expected.query());
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/cloudevents-batch+json")
            .body(Bytes::from(serde_json::to_vec(events).map_err(|e| ClientError::Config(e.to_string()))?))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let resp = self.send_request(req, REQUEST_TIMEOUT).await?;
        let resp = crate::check(resp)?;
        serde_json::from_slice(&resp.body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Up to `limit` events of `stream` from `from` (None: the start, or the end backwards).
    pub async fn read_stream(&self, stream: &str, from: Option<u64>, backwards: bool, limit: usize) -> Result<ReadPage, ClientError> {
        let from = from.map(|f| format!("&from={f}")).unwrap_or_default();
        let dir = if backwards { "backwards" } else { "forwards" };
        Ok(self.json(Method::GET, &format!("/api/v1/streams/{}?direction={dir}&limit={limit}{from}", encode(stream)), None).await?.1)
    }

    /// Stream names (and last revisions) starting with `prefix`.
    pub async fn list_streams(&self, prefix: &str) -> Result<Value, ClientError> {
        Ok(self.json(Method::GET, &format!("/api/v1/streams?prefix={}&limit=4096", encode(prefix)), None).await?.1)
    }

    /// Soft-deletes a stream.
    pub async fn delete_stream(&self, stream: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/api/v1/streams/{}", encode(stream)), None).await.map(|_| ())
    }

    /// Catch-up then live delivery of `stream` from `from`, over SSE; see [`Subscription`].
    pub fn subscribe(&self, stream: &str, from: u64) -> Subscription {
        Subscription { client: self.clone(), stream: stream.to_string(), next: from, body: None, buf: Vec::new() }
    }

    /// Creates or replaces a persistent subscription; returns the webhook secret of a new webhook.
    pub async fn put_subscription(&self, name: &str, spec: &Value) -> Result<Option<String>, ClientError> {
        let (_, v): (u64, Value) = self.json(Method::PUT, &format!("/api/v1/subscriptions/{}", encode(name)), Some(Bytes::from(spec.to_string()))).await?;
        Ok(v.get("secret").and_then(Value::as_str).map(str::to_string))
    }

    pub async fn subscription(&self, name: &str) -> Result<Value, ClientError> {
        Ok(self.json(Method::GET, &format!("/api/v1/subscriptions/{}", encode(name)), None).await?.1)
    }

    pub async fn subscriptions(&self) -> Result<Value, ClientError> {
        Ok(self.json(Method::GET, "/api/v1/subscriptions", None).await?.1)
    }

    pub async fn delete_subscription(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/api/v1/subscriptions/{}", encode(name)), None).await.map(|_| ())
    }

    /// Moves the events parked by `name` back into its queue; returns how many.
    pub async fn replay_parked(&self, name: &str) -> Result<u64, ClientError> {
        let (_, v): (u64, Value) = self.json(Method::POST, &format!("/api/v1/subscriptions/{}/replay-parked", encode(name)), None).await?;
        Ok(v.get("replayed").and_then(Value::as_u64).unwrap_or(0))
    }

    /// A consumer's pull: up to `max` events of group `name`, waiting up to `wait` for some.
    pub async fn next_events(&self, name: &str, max: usize, wait: Duration) -> Result<Vec<GroupEvent>, ClientError> {
        let path = format!("/api/v1/subscriptions/{}/next?max={max}&wait={}ms", encode(name), wait.as_millis());
        let r = self.raw(Method::GET, &path, None, wait + REQUEST_TIMEOUT).await?;
        #[derive(Deserialize)]
        struct Page {
            events: Vec<GroupEvent>,
        }
        Ok(serde_json::from_slice::<Page>(&r.body).map_err(|e| ClientError::Decode(e.to_string()))?.events)
    }

    pub async fn ack(&self, name: &str, ack_ids: &[String]) -> Result<(), ClientError> {
        self.call(Method::POST, &format!("/api/v1/subscriptions/{}/ack", encode(name)), Some(Bytes::from(json!({ "ack_ids": ack_ids }).to_string())))
            .await
            .map(|_| ())
    }

    pub async fn nack(&self, name: &str, ack_ids: &[String], action: NackAction) -> Result<(), ClientError> {
        let action = match action {
            NackAction::Retry => "retry",
            NackAction::Park => "park",
            NackAction::Skip => "skip",
        };
        let body = json!({ "ack_ids": ack_ids, "action": action }).to_string();
        self.call(Method::POST, &format!("/api/v1/subscriptions/{}/nack", encode(name)), Some(Bytes::from(body))).await.map(|_| ())
    }
}

/// A live subscription to a stream: [`Subscription::next`] yields stored events first, then new
/// ones as they are appended. A dropped connection is reopened after the last event received
/// (`Last-Event-ID`), so nothing is skipped or repeated.
pub struct Subscription {
    client: Client,
    stream: String,
    /// The number of the next event wanted.
    next: u64,
    body: Option<hyper::body::Incoming>,
    buf: Vec<u8>,
}

impl Subscription {
    /// The next event: (its number, the CloudEvent).
    pub async fn next(&mut self) -> Result<(u64, Value), ClientError> {
        loop {
            if let Some(event) = self.take_frame()? {
                return Ok(event);
            }
            let Some(body) = self.body.as_mut() else {
                self.connect().await?;
                continue;
            };
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                // The connection ended or broke: reopen from the last event received.
                _ => {
                    self.body = None;
                    self.buf.clear();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        let mut req =
            Request::builder().method(Method::GET).uri(format!("{}/api/v1/streams/{}/subscribe?from={}", self.client.base, encode(&self.stream), self.next));
        if let Some(t) = &self.client.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.header("accept", "text/event-stream").body(Full::new(Bytes::new())).map_err(|e| ClientError::Config(e.to_string()))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.http.request(req))
            .await
            .map_err(|_| ClientError::Transport("no answer to the subscription".into()))?
            .map_err(|e| ClientError::Transport(zhili_model::error_chain(&e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            return Err(ClientError::Api { status, detail: String::from_utf8_lossy(&body).into_owned() });
        }
        self.body = Some(resp.into_body());
        Ok(())
    }

    /// One complete SSE message from the buffer, if there is one (keep-alive comments skipped).
    fn take_frame(&mut self) -> Result<Option<(u64, Value)>, ClientError> {
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let message: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&message);
            let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
            if field("event:") == Some("error") {
                return Err(ClientError::Api { status: http::StatusCode::INTERNAL_SERVER_ERROR, detail: field("data:").unwrap_or_default().to_string() });
            }
            let (Some(id), Some(data)) = (field("id:"), field("data:")) else { continue };
            let number: u64 = id.parse().map_err(|_| ClientError::Decode(format!("event id {id:?}")))?;
            let event: Value = serde_json::from_str(data).map_err(|e| ClientError::Decode(e.to_string()))?;
            self.next = number + 1;
            return Ok(Some((number, event)));
        }
        Ok(None)
    }
}

/// A durable acknowledgement from a [`Publisher`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PublishAck {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub revision: Option<u64>,
    #[serde(default)]
    pub position: Option<u64>,
    /// Why the event was refused (it was not appended).
    #[serde(default)]
    pub error: Option<String>,
}

type Frames = http_body_util::StreamBody<tokio_stream_shim::Frames>;

/// A streaming append over one connection: [`Publisher::send`] queues CloudEvents without
/// waiting; [`Publisher::ack`] yields each one's durable revision and position as the server
/// confirms them. Events sent together are appended together (one fsync), so a producer that
/// keeps many in flight gets the log's full group-commit rate.
pub struct Publisher {
    lines: tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
    acks: tokio::sync::mpsc::Receiver<Result<PublishAck, ClientError>>,
}

impl Client {
    /// Opens a streaming append to `stream`.
    pub async fn publisher(&self, stream: &str) -> Result<Publisher, ClientError> {
        let (lines, rx) = tokio::sync::mpsc::channel(1024);
        let quiet = Box::pin(tokio::time::sleep(tokio_stream_shim::KEEP_ALIVE));
        let body = http_body_util::StreamBody::new(tokio_stream_shim::Frames { lines: rx, quiet });
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let http: hyper_util::client::legacy::Client<_, Frames> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/api/v1/streams/{}/publish", self.base, encode(stream)))
            .header("content-type", "application/x-ndjson");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(body).map_err(|e| ClientError::Config(e.to_string()))?;
        let (ack_tx, acks) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(async move {
            let resp = match http.request(req).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = ack_tx.send(Err(ClientError::Transport(zhili_model::error_chain(&e)))).await;
                    return;
                }
            };
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                let _ = ack_tx.send(Err(ClientError::Api { status, detail: String::from_utf8_lossy(&body).into_owned() })).await;
                return;
            }
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.map_err(|_| ()).and_then(|f| f.into_data().map_err(|_| ())) else { continue };
                buf.extend_from_slice(&data);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    let ack = serde_json::from_slice::<PublishAck>(&line).map_err(|e| ClientError::Decode(e.to_string()));
                    if ack_tx.send(ack).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Publisher { lines, acks })
    }
}

impl Publisher {
    /// Queues one CloudEvent (a structured JSON object); waits only when 1,024 are queued.
    pub async fn send(&self, event: &Value) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(event).map_err(|e| ClientError::Config(e.to_string()))?;
        line.push(b'\n');
        self.lines.send(Ok(http_body::Frame::data(Bytes::from(line)))).await.map_err(|_| ClientError::Transport("the publishing connection closed".into()))
    }

    /// The next acknowledgement (in the order the server made them durable); None once the
    /// connection is closed and every ack was read.
    pub async fn ack(&mut self) -> Option<Result<PublishAck, ClientError>> {
        self.acks.recv().await
    }

    /// Ends the request body: the server answers what is left, then the acks end.
    pub fn finish(&mut self) {
        let (closed, _) = tokio::sync::mpsc::channel(1);
        self.lines = closed;
    }
}

/// A receiver of body frames as a `Stream`, without another dependency.
mod tokio_stream_shim {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;

    /// A publisher quiet this long sends an empty line (ignored by the server), so the server's
    /// stalled-body timeout (10 s) never cuts a connection that is merely idle.
    pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(3);

    pub struct Frames {
        pub lines: tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
        pub quiet: Pin<Box<tokio::time::Sleep>>,
    }

    impl futures_core::Stream for Frames {
        type Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let next = match self.lines.poll_recv(cx) {
                Poll::Ready(item) => Poll::Ready(item),
                Poll::Pending => match self.quiet.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"\n"))))),
                    Poll::Pending => Poll::Pending,
                },
            };
            if next.is_ready() {
                let at = tokio::time::Instant::now() + KEEP_ALIVE;
                self.quiet.as_mut().reset(at);
            }
            next
        }
    }
}

//! Webhook delivery: each webhook subscription has a worker that takes its group's events in
//! order and POSTs each (up to the webhook's `window` at once, on kept-alive connections) as a
//! CloudEvent (binary mode by default, structured on request), signed per the Standard Webhooks
//! spec: `webhook-id`, `webhook-timestamp` and `webhook-signature` =
//! `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")). A non-2xx answer or a
//! timeout is retried with exponential backoff and jitter; a subscription failing without a
//! success for `disable_after` is disabled, and `$subscriptions` gets an event saying so. Each
//! worker is its own task with its own timeouts, so a hanging receiver delays nobody else.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use serde_json::Value;
use zhili_model::subscription::{Mode, Webhook, DEFAULT_DISABLE_AFTER, DEFAULT_WEBHOOK_TIMEOUT};
use zhili_net::client::Connection;
use zhili_store::events::{ExpectedRevision, NewEvent};

use crate::Subscriptions;

/// Delivery attempts kept per subscription for `GET /api/v1/subscriptions/{name}`.
pub const ATTEMPTS_KEPT: usize = 100;
/// Largest answer body read from a receiver (it is discarded).
const ANSWER_LIMIT: usize = 64 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Where disabled subscriptions are announced.
pub const SUBSCRIPTIONS_STREAM: &str = "$subscriptions";

/// One delivery attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub at: String,
    pub event_id: String,
    pub status: Option<u16>,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A new signing secret, `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The `webhook-signature` value for a message.
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap_or(secret)).ok()?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    Some(format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref())))
}

/// The HTTP request for one event: headers and body in the subscription's mode.
pub fn request(event: &[u8], mode: Mode) -> (HeaderMap, Bytes) {
    let mut h = HeaderMap::new();
    if mode == Mode::Structured {
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/cloudevents+json"));
        return (h, Bytes::copy_from_slice(event));
    }
    let v: Value = serde_json::from_slice(event).unwrap_or_default();
    let Some(o) = v.as_object() else { return (h, Bytes::new()) };
    for (k, val) in o {
        if matches!(k.as_str(), "data" | "data_base64" | "datacontenttype") {
            continue;
        }
        let text = match val {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(format!("ce-{k}").as_bytes()), HeaderValue::from_str(&text)) {
            h.insert(name, value);
        }
    }
    let ct = o.get("datacontenttype").and_then(Value::as_str);
    let body = match (o.get("data"), o.get("data_base64")) {
        (Some(Value::String(s)), _) if !ct.is_some_and(|c| c.contains("json")) => Bytes::from(s.clone()),
        (Some(d), _) => Bytes::from(d.to_string()),
        (None, Some(Value::String(b))) => base64::engine::general_purpose::STANDARD.decode(b).map(Bytes::from).unwrap_or_default(),
        _ => Bytes::new(),
    };
    let ct = ct.unwrap_or(if o.contains_key("data") { "application/json" } else { "application/octet-stream" });
    if let Ok(v) = HeaderValue::from_str(ct) {
        h.insert(http::header::CONTENT_TYPE, v);
    }
    (h, body)
}

/// What a subscription's delivery worker shares between its deliveries in flight.
struct Worker<'a> {
    subs: &'a Arc<Subscriptions>,
    name: &'a str,
    hook: &'a Webhook,
    /// Kept-alive connections to the receiver, one per delivery in flight at most.
    connections: Mutex<Vec<Connection>>,
    /// When the current run of failures began (any delivery's success ends it).
    failing_since: Mutex<Option<Instant>>,
}

impl Worker<'_> {
    /// Delivers one event, retrying with backoff and jitter; its ack id once delivered, None
    /// when the worker must stop (the subscription changed, or was disabled for failing).
    async fn one(&self, d: crate::Delivery) -> Option<String> {
        let mut backoff = FIRST_BACKOFF;
        let mut conn = self.connections.lock().pop().unwrap_or_default();
        loop {
            let result = self.subs.post(self.name, self.hook, &d, &mut conn).await;
            match result {
                Ok(()) => {
                    *self.failing_since.lock() = None;
                    self.connections.lock().push(conn);
                    return Some(d.ack_id);
                }
                Err(why) => {
                    let since = *self.failing_since.lock().get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.hook.disable_after.unwrap_or(DEFAULT_DISABLE_AFTER) {
                        if !self.subs.is_disabled(self.name) {
                            self.subs.disable_announced(self.name, why).await;
                        }
                        return None;
                    }
                    let jitter = rand::rng().random_range(0.5..1.5);
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if self.subs.spec(self.name).ok().and_then(|s| s.webhook).as_ref() != Some(self.hook) {
                        return None;
                    }
                }
            }
        }
    }
}

impl Subscriptions {
    /// Runs a delivery worker for every webhook subscription, starting new ones as they are
    /// created, until the server stops.
    pub async fn run_webhooks(self: Arc<Self>) {
        let mut workers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            workers.retain(|_, w| !w.is_finished());
            for name in self.names() {
                let webhook = self.spec(&name).ok().and_then(|s| s.webhook.is_some().then_some(()));
                if webhook.is_some() && !workers.contains_key(&name) && !self.is_disabled(&name) {
                    workers.insert(name.clone(), tokio::spawn(self.clone().deliver(name)));
                }
            }
        }
    }

    /// One subscription's worker: events taken in order, up to the webhook's `window` in flight
    /// (one by default: strictly in order), each retried until delivered; stops when the
    /// subscription is deleted, changed or disabled (a changed one is restarted by
    /// [`Self::run_webhooks`]).
    async fn deliver(self: Arc<Self>, name: String) {
        let Ok(spec) = self.spec(&name) else { return };
        let Some(hook) = spec.webhook else { return };
        let window = hook.window();
        let worker = Worker { subs: &self, name: &name, hook: &hook, connections: Mutex::new(Vec::new()), failing_since: Mutex::new(None) };
        let mut pending = FuturesUnordered::new();
        let mut head = self.log().head();
        loop {
            if self.spec(&name).ok().and_then(|s| s.webhook).as_ref() != Some(&hook) || self.is_disabled(&name) {
                return;
            }
            head.borrow_and_update();
            if pending.len() < window {
                let Ok(batch) = self.next(&name, window - pending.len(), Duration::ZERO).await else { return };
                pending.extend(batch.into_iter().map(|d| worker.one(d)));
            }
            tokio::select! {
                Some(done) = pending.next() => {
                    let Some(first) = done else { return };
                    let mut acked = vec![first];
                    while let Some(Some(more)) = pending.next().now_or_never() {
                        let Some(id) = more else { return };
                        acked.push(id);
                    }
                    // The checkpoint is saved off the loop, so deliveries in flight keep moving.
                    let subs = self.clone();
                    let name = name.clone();
                    tokio::spawn(async move { subs.ack(&name, &acked).await });
                }
                _ = head.changed(), if pending.len() < window => {}
                // Ack timeouts and replays are due without an append.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn post(&self, name: &str, hook: &Webhook, d: &crate::Delivery, conn: &mut Connection) -> Result<(), String> {
        let (mut headers, body) = request(&d.body, hook.mode.unwrap_or_default());
        let id: String =
            serde_json::from_slice::<Value>(&d.body).ok().and_then(|v| v.get("id")?.as_str().map(str::to_string)).unwrap_or_else(|| d.ack_id.clone());
        let ts = crate::unix_ms() / 1000;
        let secret = self.secret(name).unwrap_or_default();
        for (k, v) in
            [("webhook-id", id.clone()), ("webhook-timestamp", ts.to_string()), ("webhook-signature", sign(&secret, &id, ts, &body).unwrap_or_default())]
        {
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(HeaderName::from_static(k), v);
            }
        }
        let started = Instant::now();
        let timeout = hook.timeout.unwrap_or(DEFAULT_WEBHOOK_TIMEOUT);
        let result = tokio::time::timeout(timeout, conn.request(Method::POST, &hook.url, headers, body, ANSWER_LIMIT)).await;
        let (status, error) = match result {
            Ok(Ok(a)) if a.status.is_success() => (Some(a.status.as_u16()), None),
            Ok(Ok(a)) => (Some(a.status.as_u16()), Some(format!("answered {}", a.status))),
            Ok(Err(e)) => (None, Some(e)),
            Err(_) => (None, Some(format!("no answer within {timeout:?}"))),
        };
        let attempt = Attempt {
            at: zhili_model::event::timestamp(crate::unix_ms()),
            event_id: id,
            status,
            latency_ms: started.elapsed().as_millis() as u64,
            error: error.clone(),
        };
        self.record_attempt(name, attempt);
        error.map_or(Ok(()), Err)
    }

    async fn disable_announced(&self, name: &str, why: String) {
        tracing::warn!(subscription = %name, reason = %why, "webhook subscription disabled after failing too long");
        let reason = format!("disabled after failing: {why}");
        let _ = self.disable(name, reason.clone()).await;
        let id = format!("disabled-{name}-{}", crate::unix_ms());
        let (data, time) = (serde_json::json!({"subscription": name, "reason": reason}), zhili_model::event::timestamp(crate::unix_ms()));
        let body = zhili_model::event::CloudEvent::new(&id, "zhili://subscriptions", "io.zhili.subscription.disabled", name, &time, &data).to_vec();
        let event = NewEvent { id, body: body.into() };
        let _ = self.log().append(SUBSCRIPTIONS_STREAM, ExpectedRevision::Any, vec![event]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks spec.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap(), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(new_secret().starts_with("whsec_"));
        assert_ne!(new_secret(), new_secret());
    }

    #[test]
    fn binary_mode_puts_attributes_in_headers() {
        let e = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"x","seq":5,"datacontenttype":"application/json","data":{"a":1}}"#;
        let (h, body) = request(e, Mode::Binary);
        assert_eq!((h["ce-id"].to_str().unwrap(), h["ce-seq"].to_str().unwrap(), h["content-type"].to_str().unwrap()), ("1", "5", "application/json"));
        assert_eq!(&body[..], br#"{"a":1}"#);
        let (h, body) = request(e, Mode::Structured);
        assert_eq!(h["content-type"], "application/cloudevents+json");
        assert_eq!(&body[..], &e[..]);
        let text = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":"hi"}"#;
        assert_eq!(&request(text, Mode::Binary).1[..], b"hi");
    }
}

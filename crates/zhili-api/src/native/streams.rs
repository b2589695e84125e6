//! The event store API (`/api/v1/streams`): append CloudEvents with an expected revision
//! (structured, batch or binary mode), read a stream, `$all` or a category (`$ce-order`) either
//! way, subscribe (catch-up then live, over SSE, resumable with `Last-Event-ID`), list and
//! soft-delete streams. Semantics follow KurrentDB; the storage is [`zhili_store::events`].

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use futures_util::stream;
use serde_json::{json, Value};
use zhili_events::Source;
use zhili_model::acl::{Access, Resource};
use zhili_model::event::{self as ce, MAX_BATCH_EVENTS, MAX_EVENT_BYTES};
use zhili_store::events::{Direction, EventLogError, ExpectedRevision, NewEvent, RecordedEvent};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryPairs;
use crate::AppState;

/// Events one read returns at most (and the default).
const MAX_READ: usize = 4096;
const DEFAULT_READ: usize = 100;
/// Events a subscription reads per catch-up step.
const SUBSCRIBE_BATCH: usize = 256;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Every route here starts with this, and only these do: their bodies may be event batches.
pub const ROUTES: &str = "/api/v1/streams";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/streams", get(list))
        .route("/api/v1/streams/{stream}", get(read).post(append).delete(delete))
        .route("/api/v1/streams/{stream}/subscribe", get(subscribe))
        .route("/api/v1/streams/{stream}/metadata", get(metadata).put(put_metadata))
        .route("/api/v1/streams/{stream}/publish", axum::routing::post(publish))
}

pub(crate) fn log_error(e: EventLogError) -> ApiError {
    match e {
        EventLogError::WrongExpectedRevision { .. } | EventLogError::PartialDuplicate(_) => ApiError::Conflict(e.to_string()),
        EventLogError::Closed => ApiError::Unavailable(e.to_string()),
        EventLogError::StreamNotFound(_) => ApiError::NotFound(e.to_string()),
        EventLogError::Engine(_) | EventLogError::Corrupt(_) => ApiError::Internal(e.to_string()),
    }
}

/// 409 problem+json carrying the stream's actual revision (null: no stream).
fn wrong_revision(detail: String, actual: Option<u64>) -> Response {
    let body = json!({"type": "about:blank", "title": "Conflict", "status": 409, "detail": detail, "actual_revision": actual});
    (StatusCode::CONFLICT, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

pub(crate) fn expected(q: &QueryPairs) -> ApiResult<ExpectedRevision> {
    Ok(match q.get("expected_revision") {
        None | Some("any") => ExpectedRevision::Any,
        Some("no_stream") => ExpectedRevision::NoStream,
        Some("exists") => ExpectedRevision::Exists,
        Some(n) => ExpectedRevision::Exact(
            n.parse().map_err(|_| ApiError::field("expected_revision", format!("{n:?} is not any, no_stream, exists or a revision number")))?,
        ),
    })
}

/// A stream's own ACL, set in its metadata and kept in the store beside the log: when `owner`
/// (a policy) is set, only tokens holding it write, delete or change the metadata; when
/// `readers` (policies) is set, only tokens holding the owner's policy or one of them read.
/// Both narrow what the policy rules on the stream's name allow; management tokens pass.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct StreamAcl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    readers: Vec<String>,
}

fn acl_key(stream: &str) -> String {
    format!("stream-acl/{stream}")
}

fn stream_acl(s: &AppState, stream: &str) -> ApiResult<StreamAcl> {
    match s.store.get(&acl_key(stream)).map_err(|e| ApiError::Internal(e.to_string()))? {
        Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| ApiError::Internal(format!("stream ACL of {stream:?}: {e}"))),
        None => Ok(StreamAcl::default()),
    }
}

/// Who may read what: a stream by its name (policy rules), then the stream's own ACL; `$all`
/// and `$ce-x` are system names of their own.
pub(crate) fn require(s: &AppState, caller: &Caller, stream: &str, access: Access) -> ApiResult<()> {
    caller.require(Resource::Stream, stream, access)?;
    if caller.authority.is_management() || stream.starts_with('$') {
        return Ok(());
    }
    let acl = stream_acl(s, stream)?;
    if acl.owner.is_none() && acl.readers.is_empty() {
        return Ok(());
    }
    let policies = caller.token.as_deref().and_then(|t| s.acl.token_by_secret(t)).map(|t| t.policies).unwrap_or_default();
    let holds = |p: &String| policies.contains(p);
    let owner = acl.owner.as_ref().is_some_and(holds);
    let allowed = match access {
        Access::Read => owner || acl.readers.is_empty() || acl.readers.iter().any(holds),
        _ => owner || acl.owner.is_none(),
    };
    if allowed {
        return Ok(());
    }
    let role = if access == Access::Read { "a reader or owner policy" } else { "the owner policy" };
    Err(ApiError::Forbidden(format!("permission denied: stream {stream:?} needs {role} of its ACL")))
}

/// The events of an append body, each checked, as (id, structured JSON bytes).
fn parse_events(headers: &HeaderMap, body: &Bytes) -> ApiResult<Vec<NewEvent>> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if headers.contains_key("ce-specversion") {
        // Binary mode: the attributes in ce-* headers, the body is the data.
        if body.len() > MAX_EVENT_BYTES {
            return Err(ApiError::PayloadTooLarge(format!("body: an event is at most {MAX_EVENT_BYTES} bytes")));
        }
        let attrs = headers.iter().filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))).filter(|(k, _)| k.starts_with("ce-"));
        let event = ce::from_binary(attrs, Some(content_type).filter(|c| !c.is_empty()), body, |b| base64::engine::general_purpose::STANDARD.encode(b))?;
        return one(&event, "event").map(|e| vec![e]);
    }
    // Each event is kept as the client's own bytes (attribute order and all), not re-encoded.
    let is_array = body.trim_ascii_start().first() == Some(&b'[');
    match (media.as_str(), is_array) {
        ("application/cloudevents-batch+json" | "application/json", true) => {
            let list: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body).map_err(|e| ApiError::field("body", format!("is not JSON: {e}")))?;
            if list.is_empty() || list.len() > MAX_BATCH_EVENTS {
                return Err(ApiError::field("body", format!("a batch has 1 to {MAX_BATCH_EVENTS} events")));
            }
            let events = list.iter().enumerate().map(|(i, e)| one_raw(e.get().as_bytes(), &format!("events[{i}]"))).collect::<ApiResult<Vec<_>>>()?;
            let mut seen = std::collections::HashSet::new();
            if let Some((i, e)) = events.iter().enumerate().find(|(_, e)| !seen.insert(e.id.as_str())) {
                return Err(ApiError::field(&format!("events[{i}].id"), format!("{:?} appears twice in the batch", e.id)));
            }
            Ok(events)
        }
        ("application/cloudevents-batch+json", false) => Err(ApiError::field("body", "a batch is a JSON array of CloudEvents")),
        ("application/cloudevents+json" | "application/json", false) => Ok(vec![one_raw(body.trim_ascii(), "event")?]),
        (other, _) => Err(ApiError::field(
            "content-type",
            format!("{other:?}: send application/cloudevents+json, application/cloudevents-batch+json, or binary mode (ce-* headers)"),
        )),
    }
}

/// One structured event given as JSON text: checked, and kept as sent.
fn one_raw(bytes: &[u8], field: &str) -> ApiResult<NewEvent> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(ApiError::PayloadTooLarge(format!("{field}: an event is at most {MAX_EVENT_BYTES} bytes")));
    }
    let id = match ce::cloudevent_json(field, bytes) {
        Ok(id) => id,
        Err(Some(invalid)) => return Err(invalid.into()),
        // Not a JSON object: say which, as the full parse does.
        Err(None) => {
            let v: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::field(field, format!("is not JSON: {e}")))?;
            ce::cloudevent(field, &v)?.to_string()
        }
    };
    Ok(NewEvent { id, body: Bytes::copy_from_slice(bytes) })
}

fn one(event: &Value, field: &str) -> ApiResult<NewEvent> {
    let id = ce::cloudevent(field, event)?.to_string();
    let body = serde_json::to_vec(event).map_err(|e| ApiError::Internal(e.to_string()))?;
    if body.len() > MAX_EVENT_BYTES {
        return Err(ApiError::PayloadTooLarge(format!("{field}: an event is at most {MAX_EVENT_BYTES} bytes")));
    }
    Ok(NewEvent { id, body: body.into() })
}

/// `POST /api/v1/streams/{stream}?expected_revision=`: 201 with where the events landed.
async fn append(State(s): State<AppState>, caller: Caller, Path(stream): Path<String>, q: QueryPairs, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    ce::stream_name("stream", &stream, false)?;
    require(&s, &caller, &stream, Access::Write)?;
    let expected = expected(&q)?;
    let events = parse_events(&headers, &body)?;
    match s.events.append(&stream, expected, events).await {
        Ok(a) => Ok((
            StatusCode::CREATED,
            Json(json!({"revision": a.first_revision, "last_revision": a.last_revision, "position": a.first_position, "last_position": a.last_position})),
        )
            .into_response()),
        Err(e @ EventLogError::WrongExpectedRevision { actual, .. }) => Ok(wrong_revision(e.to_string(), actual)),
        Err(e) => Err(log_error(e)),
    }
}

fn direction(q: &QueryPairs) -> ApiResult<Direction> {
    match q.get("direction") {
        None | Some("forwards") => Ok(Direction::Forwards),
        Some("backwards") => Ok(Direction::Backwards),
        Some(d) => Err(ApiError::field("direction", format!("{d:?} is not forwards or backwards"))),
    }
}

/// One event as reads show it; `revision` is what `from` counts in this read (the revision in
/// a stream, the position in `$all`, the sequence in a category).
#[derive(serde::Serialize)]
struct Shown<'a> {
    revision: u64,
    position: u64,
    stream: &'a str,
    stream_revision: u64,
}

/// Writes `head` as a JSON object with `"event": body` added. The body is the stored
/// CloudEvent, checked as JSON when it was appended, so it is copied, not parsed again.
pub(crate) fn push_with_event<T: serde::Serialize>(out: &mut Vec<u8>, head: &T, body: &[u8]) {
    if serde_json::to_writer(&mut *out, head).is_ok() && out.last() == Some(&b'}') {
        out.pop();
        out.extend_from_slice(b",\"event\":");
        out.extend_from_slice(body);
        out.push(b'}');
    }
}

/// `{"<key>": [items...]` with each item written by `item`; the caller closes the object.
pub(crate) fn json_list<I>(key: &str, items: impl IntoIterator<Item = I>, mut item: impl FnMut(&mut Vec<u8>, I)) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(format!("{{\"{key}\":[").as_bytes());
    for (i, x) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(&mut out, x);
    }
    out.push(b']');
    out
}

pub(crate) fn json_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn source(stream: &str) -> ApiResult<Source> {
    Ok(Source::parse(stream)?)
}

fn read_from(s: &AppState, src: &Source, from: u64, dir: Direction, limit: usize) -> ApiResult<Vec<(u64, RecordedEvent)>> {
    src.read(&*s.events, from, dir, limit).map_err(log_error)
}

/// `GET /api/v1/streams/{stream}?from=&direction=&limit=` → `{"events": [...], "next"}`.
async fn read(State(s): State<AppState>, caller: Caller, Path(stream): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    let src = source(&stream)?;
    require(&s, &caller, &stream, Access::Read)?;
    let dir = direction(&q)?;
    let limit = q.u64("limit")?.map_or(DEFAULT_READ, |l| (l as usize).clamp(1, MAX_READ));
    let from = q.u64("from")?.unwrap_or(match dir {
        Direction::Forwards => 0,
        Direction::Backwards => u64::MAX,
    });
    if let Source::Stream(name) = &src {
        let info = s.events.stream_info(name).map_err(log_error)?;
        if info.is_none_or(|i| i.deleted || i.last_revision.is_none()) {
            return Err(ApiError::NotFound(format!("stream {name:?} not found")));
        }
    }
    let events = read_from(&s, &src, from, dir, limit)?;
    // More may follow when the page is full; `next` is where the following read starts.
    let next = match (events.last(), events.len() == limit, dir) {
        (Some((n, _)), true, Direction::Forwards) => Some(n + 1),
        (Some((n, _)), true, Direction::Backwards) => n.checked_sub(1),
        _ => None,
    };
    let mut out = json_list("events", &events, |out, (n, e)| {
        push_with_event(out, &Shown { revision: *n, position: e.position, stream: &e.stream, stream_revision: e.revision }, &e.body)
    });
    out.extend_from_slice(format!(",\"next\":{}}}", next.map_or("null".to_string(), |n| n.to_string())).as_bytes());
    Ok(json_response(out))
}

/// `GET /api/v1/streams/{stream}/subscribe?from=`: SSE, catch-up then live; each message's id
/// is its number (revision, position or sequence), so `Last-Event-ID` resumes after it.
async fn subscribe(State(s): State<AppState>, caller: Caller, Path(stream): Path<String>, q: QueryPairs, headers: HeaderMap) -> ApiResult<Response> {
    source(&stream)?;
    require(&s, &caller, &stream, Access::Read)?;
    let s_metrics = s.metrics.clone();
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().parse::<u64>().map_err(|_| ApiError::field("Last-Event-ID", format!("{v:?} is not an event number"))));
    let from = match resume {
        Some(r) => r?.saturating_add(1),
        None => q.u64("from")?.unwrap_or(0),
    };
    let sub = Subscription {
        head: s.events.head(),
        s,
        name: stream,
        from,
        pending: std::collections::VecDeque::new(),
        done: false,
        _guard: zhili_telemetry::WatcherGuard::new(&s_metrics),
    };
    let stream = stream::unfold(sub, |mut sub| async move {
        let event = sub.next().await?;
        Some((Ok::<_, Infallible>(event), sub))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// One SSE subscriber: where its next read starts, and events read but not yet sent. Reads
/// are bounded (one batch at a time), so a slow subscriber costs the server nothing more.
struct Subscription {
    s: AppState,
    name: String,
    from: u64,
    head: tokio::sync::watch::Receiver<u64>,
    pending: std::collections::VecDeque<(u64, RecordedEvent)>,
    done: bool,
    _guard: zhili_telemetry::WatcherGuard,
}

impl Subscription {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some((n, e)) = self.pending.pop_front() {
                return Some(Event::default().id(n.to_string()).event("event").data(String::from_utf8_lossy(&e.body)));
            }
            if self.done {
                return None;
            }
            self.head.borrow_and_update();
            let src = source(&self.name).ok()?;
            match read_from(&self.s, &src, self.from, Direction::Forwards, SUBSCRIBE_BATCH) {
                Ok(batch) if !batch.is_empty() => {
                    self.from = batch.last().map_or(self.from, |(n, _)| n + 1);
                    self.pending.extend(batch);
                }
                // Caught up: wait for the next durable append anywhere.
                Ok(_) => self.head.changed().await.ok()?,
                Err(e) => {
                    self.done = true;
                    return Some(Event::default().event("error").data(json!({"detail": e.detail()}).to_string()));
                }
            }
        }
    }
}

/// `GET /api/v1/streams?prefix=&after=&limit=`: streams the caller may read.
async fn list(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    let prefix = q.get("prefix").unwrap_or("");
    let limit = q.u64("limit")?.map_or(DEFAULT_READ, |l| (l as usize).clamp(1, MAX_READ));
    let mut out = Vec::new();
    let mut after = q.get("after").map(str::to_string);
    // Reads past names the caller may not see, so a page is full when more visible ones exist.
    loop {
        let page = s.events.list_streams(prefix, after.as_deref(), limit).map_err(log_error)?;
        let done = page.len() < limit;
        after = page.last().map(|(n, _)| n.clone());
        out.extend(
            page.into_iter()
                .filter(|(n, _)| caller.can(Resource::Stream, n, Access::Read))
                .map(|(n, i)| json!({"stream": n, "last_revision": i.last_revision})),
        );
        if done || out.len() >= limit {
            break;
        }
    }
    out.truncate(limit);
    Ok(Json(json!({"streams": out})).into_response())
}

/// `DELETE /api/v1/streams/{stream}?expected_revision=`: soft delete (reads answer 404 until
/// the stream is appended to again, continuing its revisions).
async fn delete(State(s): State<AppState>, caller: Caller, Path(stream): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    ce::stream_name("stream", &stream, false)?;
    require(&s, &caller, &stream, Access::Write)?;
    match s.events.delete_stream(&stream, expected(&q)?).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(EventLogError::WrongExpectedRevision { actual: None, .. }) => Err(ApiError::NotFound(format!("stream {stream:?} not found"))),
        Err(e @ EventLogError::WrongExpectedRevision { actual, .. }) => Ok(wrong_revision(e.to_string(), actual)),
        Err(e) => Err(log_error(e)),
    }
}

/// A stream's retention as `GET/PUT /api/v1/streams/{stream}/metadata` show it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(default)]
    max_count: Option<u64>,
    #[serde(default, with = "zhili_model::duration::serde_opt")]
    max_age: Option<Duration>,
    #[serde(default)]
    truncate_before: Option<u64>,
    /// The stream's own ACL (see [`StreamAcl`]); absent leaves it as it is.
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    readers: Option<Vec<String>>,
}

fn shown_metadata(stream: &str, i: &zhili_store::events::StreamInfo, acl: &StreamAcl) -> Value {
    json!({
        "stream": stream,
        "last_revision": i.last_revision,
        "max_count": i.max_count,
        "max_age": i.max_age_ms.map(|ms| zhili_model::format_duration(Duration::from_millis(ms))),
        "truncate_before": i.truncate_before,
        "owner": acl.owner,
        "readers": acl.readers,
    })
}

async fn metadata(State(s): State<AppState>, caller: Caller, Path(stream): Path<String>) -> ApiResult<Response> {
    ce::stream_name("stream", &stream, true)?;
    require(&s, &caller, &stream, Access::Read)?;
    let info =
        s.events.stream_info(&stream).map_err(log_error)?.filter(|i| !i.deleted).ok_or_else(|| ApiError::NotFound(format!("stream {stream:?} not found")))?;
    let acl = if stream.starts_with('$') { StreamAcl::default() } else { stream_acl(&s, &stream)? };
    Ok(Json(shown_metadata(&stream, &info, &acl)).into_response())
}

/// `PUT /api/v1/streams/{stream}/metadata {"max_count"?, "max_age"?, "truncate_before"?}`:
/// retention, applied to reads at once; the space is reclaimed in the background.
async fn put_metadata(
    State(s): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
    crate::extract::JsonBody(m): crate::extract::JsonBody<Metadata>,
) -> ApiResult<Response> {
    ce::stream_name("stream", &stream, true)?;
    require(&s, &caller, &stream, Access::Write)?;
    if m.max_count == Some(0) {
        return Err(ApiError::field("max_count", "must be at least 1 (delete the stream to drop everything)"));
    }
    if m.max_age.is_some_and(|a| a < Duration::from_secs(1)) {
        return Err(ApiError::field("max_age", "must be at least 1s"));
    }
    let mut acl = if stream.starts_with('$') { StreamAcl::default() } else { stream_acl(&s, &stream)? };
    let changes_acl = m.owner.is_some() || m.readers.is_some();
    if changes_acl {
        if stream.starts_with('$') {
            return Err(ApiError::field("owner", "system streams have no ACL of their own; use policy rules"));
        }
        let known: std::collections::HashSet<String> = s.acl.policies().into_iter().map(|p| p.name).collect();
        let check = |field: String, name: &str| match known.contains(name) {
            true => Ok(()),
            false => Err(ApiError::field(&field, format!("{name:?} is not a policy"))),
        };
        // An empty owner removes it.
        if let Some(o) = m.owner.as_deref().filter(|o| !o.is_empty()) {
            check("owner".into(), o)?;
        }
        for (i, r) in m.readers.iter().flatten().enumerate() {
            check(format!("readers[{i}]"), r)?;
        }
        if let Some(o) = m.owner {
            acl.owner = Some(o).filter(|o| !o.is_empty());
        }
        if let Some(r) = m.readers {
            acl.readers = r;
        }
    }
    // The stream must exist before its ACL is stored.
    let r = zhili_store::events::Retention { max_count: m.max_count, max_age_ms: m.max_age.map(|a| a.as_millis() as u64), truncate_before: m.truncate_before };
    let info = s.events.set_retention(&stream, r).await.map_err(log_error)?;
    if changes_acl {
        let value = serde_json::to_vec(&acl).map_err(|e| ApiError::Internal(e.to_string()))?;
        zhili_store::put(&*s.store, &acl_key(&stream), value).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    Ok(Json(shown_metadata(&stream, &info, &acl)).into_response())
}

/// Lines taken from a publishing connection per append at most.
const PUBLISH_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// `POST /api/v1/streams/{stream}/publish`: a streaming append for high-rate producers. The
/// request body is NDJSON, one CloudEvent per line, sent for as long as the producer likes; the
/// answer streams one NDJSON line per event as soon as it is durable: `{"id", "revision",
/// "position"}`, or `{"id", "error"}` for one that was refused. Lines that arrive together go
/// in one append (one fsync), so throughput grows with the producer's pipelining.
async fn publish(State(s): State<AppState>, caller: Caller, Path(stream): Path<String>, body: axum::body::Body) -> ApiResult<Response> {
    ce::stream_name("stream", &stream, false)?;
    require(&s, &caller, &stream, Access::Write)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        use futures_util::{FutureExt, StreamExt};
        let mut data = body.into_data_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut ended = false;
        while !ended {
            // Wait for some bytes, then take whatever else has already arrived.
            match data.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                _ => ended = true,
            }
            while buf.len() < PUBLISH_BATCH_BYTES {
                match data.next().now_or_never() {
                    Some(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
                    Some(_) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let cut = if ended { buf.len() } else { buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) };
            let lines: Vec<u8> = buf.drain(..cut).collect();
            if buf.len() > MAX_EVENT_BYTES {
                let _ = tx.send(Ok(Bytes::from(json!({"error": format!("a line is over {MAX_EVENT_BYTES} bytes")}).to_string() + "\n"))).await;
                return;
            }
            let mut answers = Vec::new();
            let mut events = Vec::new();
            for line in lines.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
                match one_raw(line.trim_ascii(), "event") {
                    Ok(e) => events.push(e),
                    Err(e) => answers.push(json!({"error": e.detail()})),
                }
            }
            if !events.is_empty() {
                let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
                match s.events.append(&stream, ExpectedRevision::Any, events).await {
                    Ok(a) => answers.extend(
                        ids.iter()
                            .enumerate()
                            .map(|(i, id)| json!({"id": id, "revision": a.first_revision + i as u64, "position": a.first_position + i as u64})),
                    ),
                    Err(e) => answers.extend(ids.iter().map(|id| json!({"id": id, "error": e.to_string()}))),
                }
            }
            if answers.is_empty() {
                continue;
            }
            let mut out = String::new();
            for a in answers {
                out.push_str(&a.to_string());
                out.push('\n');
            }
            if tx.send(Ok(Bytes::from(out))).await.is_err() {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

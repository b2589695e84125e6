//! The event log contract: named streams of immutable events, each with a gapless per-stream
//! revision (0-based) and one global position across all streams (0-based). Appends are atomic
//! per call, checked against an expected revision, idempotent by event id, and acknowledged only
//! once durable. Shaped so that a NATS JetStream backend can implement it later (a stream per
//! Zhili stream subject, the global position as the JetStream sequence of one `$all` stream).

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

/// What the stream's current revision must be for an append to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedRevision {
    Any,
    /// The stream has no events (never written, or soft-deleted).
    NoStream,
    /// The stream has at least one event.
    Exists,
    /// The stream's last event has exactly this revision.
    Exact(u64),
}

/// One event to append: its id (idempotency key within the stream) and its body (the
/// structured CloudEvent, stored and returned byte for byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub body: Bytes,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first_revision: u64,
    pub last_revision: u64,
    pub first_position: u64,
    pub last_position: u64,
    /// The same event ids were appended before: this is the original answer, nothing was written.
    pub duplicate: bool,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub stream: String,
    pub revision: u64,
    pub position: u64,
    pub id: String,
    pub body: Bytes,
    /// When it was appended (Unix ms); retention by age reads it.
    pub appended_ms: u64,
}

/// A stream's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamInfo {
    /// The revision of its last event; None when it has none.
    pub last_revision: Option<u64>,
    /// Reads start here: events below it are gone (soft delete, truncate-before).
    pub truncate_before: u64,
    pub deleted: bool,
    /// Retention: keep at most this many of the newest events.
    pub max_count: Option<u64>,
    /// Retention: events older than this many milliseconds are gone.
    pub max_age_ms: Option<u64>,
}

/// A stream's retention settings (`PUT /api/v1/streams/{stream}/metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub max_count: Option<u64>,
    pub max_age_ms: Option<u64>,
    /// Events below this revision are gone (it only moves forwards).
    pub truncate_before: Option<u64>,
}

impl StreamInfo {
    /// The lowest revision readers may see at `now_ms`, before the age limit (which needs each
    /// event's time): the truncation point, moved up by `max_count`.
    pub fn first_visible(&self) -> u64 {
        let by_count = match (self.last_revision, self.max_count) {
            (Some(last), Some(n)) => (last + 1).saturating_sub(n),
            _ => 0,
        };
        self.truncate_before.max(by_count)
    }

    /// Whether an event appended at `appended_ms` is still kept at `now_ms`.
    pub fn young_enough(&self, appended_ms: u64, now_ms: u64) -> bool {
        self.max_age_ms.is_none_or(|age| appended_ms.saturating_add(age) > now_ms)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Which way a read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forwards,
    Backwards,
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("expected revision {expected} but the stream is at {}", actual.map_or_else(|| "no stream".to_string(), |r| r.to_string()))]
    WrongExpectedRevision { expected: String, actual: Option<u64> },
    #[error("event ids {0}: part of this batch was appended before, part was not; send the events that are new on their own")]
    PartialDuplicate(String),
    #[error("stream {0:?} not found")]
    StreamNotFound(String),
    #[error("event log engine failed: {0}")]
    Engine(String),
    #[error("stored event is corrupt: {0}")]
    Corrupt(String),
    #[error("the event log is shutting down")]
    Closed,
}

#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically (all or none) if `expected` holds. Returns once
    /// durable. The same event ids again (the first one already in the stream) answer the
    /// original revisions and positions with `duplicate: true`, writing nothing.
    async fn append(&self, stream: &str, expected: ExpectedRevision, events: Vec<NewEvent>) -> Result<Appended, EventLogError>;
    /// [`Self::append`] with [`ExpectedRevision::Any`] for events whose ids are new by
    /// construction (minted by the caller, never appended before): the log may skip the
    /// duplicate check and keep no id index entry for them, so the same ids appended again
    /// later are not recognised. The server's own feedback streams (`$registry`, `$audit`, …)
    /// write this way: a busy registry appends an event per change.
    async fn append_unique(&self, stream: &str, events: Vec<NewEvent>) -> Result<Appended, EventLogError> {
        self.append(stream, ExpectedRevision::Any, events).await
    }
    /// Up to `limit` events of `stream` from revision `from` (inclusive) in `direction`
    /// (`from = u64::MAX` backwards means from the end).
    fn read_stream(&self, stream: &str, from: u64, direction: Direction, limit: usize) -> Result<Vec<RecordedEvent>, EventLogError>;
    /// Up to `limit` events of every stream from global position `from` (inclusive).
    fn read_all(&self, from: u64, direction: Direction, limit: usize) -> Result<Vec<RecordedEvent>, EventLogError>;
    /// Up to `limit` events of the category `category` (streams named `category-...`) from its
    /// sequence number `from`; each comes with that sequence number.
    fn read_category(&self, category: &str, from: u64, direction: Direction, limit: usize) -> Result<Vec<(u64, RecordedEvent)>, EventLogError>;
    fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, EventLogError>;
    /// Stream names starting with `prefix`, after `after` (exclusive), at most `limit`.
    fn list_streams(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, StreamInfo)>, EventLogError>;
    /// Soft delete: the stream reads as empty (404) until it is appended to again, which
    /// continues its revisions.
    async fn delete_stream(&self, stream: &str, expected: ExpectedRevision) -> Result<(), EventLogError>;
    /// Sets a stream's retention; reads honour it at once, and space is reclaimed later.
    async fn set_retention(&self, stream: &str, retention: Retention) -> Result<StreamInfo, EventLogError>;
    /// The global position the next append gets (ticks after every durable append).
    fn head(&self) -> watch::Receiver<u64>;
}

/// Appends what arrives on `rx` to `stream` in arrival order, up to `max_batch` events per
/// append, until every sender is gone: the one writer behind a subsystem's feedback stream
/// (`$txn`, `$plans`), so producers never wait on the log. Their ids are minted fresh
/// ([`EventLog::append_unique`]). A failed append is logged and its batch dropped (the
/// producers keep their own record).
pub async fn append_queued(log: std::sync::Arc<dyn EventLog>, stream: &'static str, mut rx: tokio::sync::mpsc::Receiver<NewEvent>, max_batch: usize) {
    let mut batcher = Batcher::new(max_batch);
    while let Some(first) = rx.recv().await {
        let batch = batcher.gather(first, || rx.try_recv().ok()).await;
        if let Err(e) = log.append_unique(stream, batch).await {
            tracing::warn!(%stream, error = %e, "appending failed; this batch of events is dropped");
        }
    }
}

/// Appends the batch `events` makes to `stream` ([`EventLog::append_unique`]) until an append
/// succeeds, a second apart: the publishers of the server's own streams (`$registry`,
/// `$audit`), which retry rather than lose a change. A failed append consumed its batch, so
/// `events` makes it again for each retry (the same ids) instead of every try paying a copy.
/// A failed append wrote nothing: the embedded log refuses every later append after a failed
/// commit, so a retry cannot double.
pub async fn append_retrying(log: &dyn EventLog, stream: &str, mut events: impl FnMut() -> Vec<NewEvent>) {
    while let Err(e) = log.append_unique(stream, events()).await {
        tracing::warn!(%stream, error = %e, "appending failed; retrying");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// How long a busy feedback publisher gathers before its next append.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// Batches a feedback publisher's appends. An idle publisher appends each event at once; a
/// busy one (its previous append began less than [`LINGER`] ago) waits out the rest of the
/// window and takes everything queued meanwhile, so a stream of changes costs one append, and
/// one share of the log's fsync, per window rather than per change or two. A full batch skips
/// the wait: a publisher that falls behind catches up at full speed.
pub struct Batcher {
    max: usize,
    last: Option<tokio::time::Instant>,
    full: bool,
}

impl Batcher {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), last: None, full: false }
    }

    /// The next batch: `first` and what `next` yields (without waiting) up to the batch size.
    pub async fn gather<T>(&mut self, first: T, mut next: impl FnMut() -> Option<T>) -> Vec<T> {
        let mut batch = vec![first];
        batch.extend(std::iter::from_fn(&mut next).take(self.max - batch.len()));
        let busy = self.last.map(|last| last + LINGER).filter(|due| !self.full && batch.len() < self.max && tokio::time::Instant::now() < *due);
        if let Some(due) = busy {
            tokio::time::sleep_until(due).await;
            batch.extend(std::iter::from_fn(&mut next).take(self.max - batch.len()));
        }
        self.full = batch.len() >= self.max;
        self.last = Some(tokio::time::Instant::now());
        batch
    }
}

/// The category of a stream: its name up to the first `-` (`order-17` → `order`).
pub fn category(stream: &str) -> Option<&str> {
    stream.split_once('-').map(|(c, _)| c).filter(|c| !c.is_empty() && !c.starts_with('$'))
}

impl ExpectedRevision {
    /// Whether a stream at `actual` (None: no events) satisfies it.
    pub fn holds(self, actual: Option<u64>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.is_none(),
            Self::Exists => actual.is_some(),
            Self::Exact(n) => actual == Some(n),
        }
    }
}

impl std::fmt::Display for ExpectedRevision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no_stream"),
            Self::Exists => f.write_str("exists"),
            Self::Exact(n) => write!(f, "{n}"),
        }
    }
}

/// Retention, as every [`EventLog`] must apply it to stream reads.
#[doc(hidden)]
pub async fn conformance_retention(log: &dyn EventLog) {
    let ev = |id: &str| NewEvent { id: id.into(), body: Bytes::from(format!("{{\"id\":\"{id}\"}}")) };
    for i in 0..5 {
        log.append("kept", ExpectedRevision::Any, vec![ev(&format!("k{i}"))]).await.expect("conformance");
    }
    let ids = |log: &dyn EventLog| log.read_stream("kept", 0, Direction::Forwards, 10).expect("conformance").into_iter().map(|e| e.id).collect::<Vec<_>>();
    let info = log.set_retention("kept", Retention { max_count: Some(2), ..Retention::default() }).await.expect("conformance");
    assert_eq!(info.max_count, Some(2));
    assert_eq!(ids(log), ["k3", "k4"], "max_count keeps the newest");
    let back: Vec<String> = log.read_stream("kept", u64::MAX, Direction::Backwards, 10).expect("conformance").into_iter().map(|e| e.id).collect();
    assert_eq!(back, ["k4", "k3"]);
    log.set_retention("kept", Retention { max_count: None, truncate_before: Some(4), ..Retention::default() }).await.expect("conformance");
    assert_eq!(ids(log), ["k4"], "truncate-before");
    log.set_retention("kept", Retention { truncate_before: Some(1), ..Retention::default() }).await.expect("conformance");
    assert_eq!(ids(log), ["k4"], "truncation only moves forwards");
    log.set_retention("kept", Retention { max_age_ms: Some(1), ..Retention::default() }).await.expect("conformance");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(ids(log).is_empty(), "max_age: nothing is young enough");
    assert!(log.set_retention("never", Retention::default()).await.is_err(), "a stream must exist");
}

/// The behaviour every [`EventLog`] must show, run by each implementation's tests (embedded and
/// in-memory today; a JetStream backend would run it too).
#[doc(hidden)]
pub async fn conformance(log: &dyn EventLog) {
    let ev = |id: &str| NewEvent { id: id.into(), body: Bytes::from(format!("{{\"id\":\"{id}\"}}")) };
    let a = log.append("order-1", ExpectedRevision::NoStream, vec![ev("a"), ev("b")]).await.expect("conformance");
    assert_eq!((a.first_revision, a.last_revision, a.first_position, a.last_position, a.duplicate), (0, 1, 0, 1, false));
    let again = log.append("order-1", ExpectedRevision::NoStream, vec![ev("a"), ev("b")]).await.expect("conformance");
    assert_eq!((again.first_position, again.last_revision, again.duplicate), (0, 1, true), "same ids: the original answer");
    assert!(matches!(log.append("order-1", ExpectedRevision::Any, vec![ev("b"), ev("c")]).await, Err(EventLogError::PartialDuplicate(_))));
    assert!(
        matches!(log.append("order-1", ExpectedRevision::Any, vec![ev("c"), ev("a")]).await, Err(EventLogError::PartialDuplicate(_))),
        "a known id behind a new one"
    );
    let wrong = log.append("order-1", ExpectedRevision::Exact(0), vec![ev("c")]).await.expect_err("conformance");
    assert!(matches!(wrong, EventLogError::WrongExpectedRevision { actual: Some(1), .. }), "{wrong}");
    log.append("order-2", ExpectedRevision::Any, vec![ev("x")]).await.expect("conformance");
    log.append("order-1", ExpectedRevision::Exact(1), vec![ev("c")]).await.expect("conformance");
    let fwd: Vec<String> = log.read_stream("order-1", 0, Direction::Forwards, 10).expect("conformance").into_iter().map(|e| e.id).collect();
    assert_eq!(fwd, ["a", "b", "c"]);
    let back: Vec<u64> = log.read_stream("order-1", u64::MAX, Direction::Backwards, 2).expect("conformance").into_iter().map(|e| e.revision).collect();
    assert_eq!(back, [2, 1]);
    let all: Vec<(String, u64)> = log.read_all(0, Direction::Forwards, 10).expect("conformance").into_iter().map(|e| (e.stream, e.position)).collect();
    assert_eq!(all, [("order-1".into(), 0), ("order-1".into(), 1), ("order-2".into(), 2), ("order-1".into(), 3)]);
    let cat: Vec<(u64, String)> = log.read_category("order", 0, Direction::Forwards, 10).expect("conformance").into_iter().map(|(s, e)| (s, e.id)).collect();
    assert_eq!(cat, [(0, "a".into()), (1, "b".into()), (2, "x".into()), (3, "c".into())]);
    assert_eq!(*log.head().borrow(), 4);

    log.delete_stream("order-2", ExpectedRevision::Any).await.expect("conformance");
    assert!(log.read_stream("order-2", 0, Direction::Forwards, 10).expect("conformance").is_empty());
    assert!(log.list_streams("order-", None, 10).expect("conformance").iter().all(|(n, _)| n != "order-2"));
    let re = log.append("order-2", ExpectedRevision::NoStream, vec![ev("y")]).await.expect("conformance");
    assert_eq!(re.first_revision, 1, "a recreated stream continues its revisions");
    assert_eq!(log.read_stream("order-2", 0, Direction::Forwards, 10).expect("conformance").len(), 1, "only what came after the delete");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{Duration, Instant};

    #[tokio::test(start_paused = true)]
    async fn a_busy_publisher_gathers_for_a_window_an_idle_one_appends_at_once() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let mut b = Batcher::new(4);
        let start = Instant::now();
        assert_eq!(b.gather(0, || rx.try_recv().ok()).await, [0], "the first batch goes at once");
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Right after an append: what arrives within the window joins the next batch.
        let sender = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            sender.send(2).unwrap();
        });
        assert_eq!(b.gather(1, || rx.try_recv().ok()).await, [1, 2]);
        assert_eq!(start.elapsed(), LINGER);
        // A full batch is not held back, and the batch after a full one goes at once too.
        for i in 4..10 {
            tx.send(i).unwrap();
        }
        assert_eq!(b.gather(3, || rx.try_recv().ok()).await, [3, 4, 5, 6]);
        assert_eq!(start.elapsed(), LINGER);
        let first = rx.try_recv().unwrap();
        assert_eq!(b.gather(first, || rx.try_recv().ok()).await, [7, 8, 9]);
        assert_eq!(start.elapsed(), LINGER);
        // Idle for longer than the window: at once again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let idle = Instant::now();
        assert_eq!(b.gather(10, || rx.try_recv().ok()).await, [10]);
        assert_eq!(idle.elapsed(), Duration::ZERO);
    }

    /// Refuses its first `failures` appends, then passes everything to a memory log.
    struct Flaky {
        failures: std::sync::atomic::AtomicUsize,
        inner: crate::memory::MemoryEventLog,
    }

    #[async_trait]
    impl EventLog for Flaky {
        async fn append(&self, stream: &str, expected: ExpectedRevision, events: Vec<NewEvent>) -> Result<Appended, EventLogError> {
            let left = self.failures.load(std::sync::atomic::Ordering::Relaxed);
            if left > 0 {
                self.failures.store(left - 1, std::sync::atomic::Ordering::Relaxed);
                return Err(EventLogError::Engine("disk full".into()));
            }
            self.inner.append(stream, expected, events).await
        }
        fn read_stream(&self, stream: &str, from: u64, direction: Direction, limit: usize) -> Result<Vec<RecordedEvent>, EventLogError> {
            self.inner.read_stream(stream, from, direction, limit)
        }
        fn read_all(&self, from: u64, direction: Direction, limit: usize) -> Result<Vec<RecordedEvent>, EventLogError> {
            self.inner.read_all(from, direction, limit)
        }
        fn read_category(&self, category: &str, from: u64, direction: Direction, limit: usize) -> Result<Vec<(u64, RecordedEvent)>, EventLogError> {
            self.inner.read_category(category, from, direction, limit)
        }
        fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, EventLogError> {
            self.inner.stream_info(stream)
        }
        fn list_streams(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, StreamInfo)>, EventLogError> {
            self.inner.list_streams(prefix, after, limit)
        }
        async fn delete_stream(&self, stream: &str, expected: ExpectedRevision) -> Result<(), EventLogError> {
            self.inner.delete_stream(stream, expected).await
        }
        async fn set_retention(&self, stream: &str, retention: Retention) -> Result<StreamInfo, EventLogError> {
            self.inner.set_retention(stream, retention).await
        }
        fn head(&self) -> watch::Receiver<u64> {
            self.inner.head()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_append_is_made_again_and_lands_once() {
        let log = Flaky { failures: 2.into(), inner: crate::memory::MemoryEventLog::new() };
        let mut made = 0;
        let start = Instant::now();
        append_retrying(&log, "$feed", || {
            made += 1;
            vec![NewEvent { id: "a".into(), body: Bytes::from_static(b"{}") }, NewEvent { id: "b".into(), body: Bytes::from_static(b"{}") }]
        })
        .await;
        assert_eq!(made, 3, "the batch is made once per try");
        assert_eq!(start.elapsed(), Duration::from_secs(2), "a second between tries");
        let stored: Vec<String> = log.read_stream("$feed", 0, Direction::Forwards, 10).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(stored, ["a", "b"], "the batch landed once, in order");
    }
}

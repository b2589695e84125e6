//! The feedback bus on top of the event log: what a stream name reads ([`Source`]: a stream,
//! `$all` or a category), persistent subscriptions (consumer groups) with at-least-once
//! delivery, ack/nack, ack timeouts, parking after too many deliveries, and webhook delivery
//! signed per Standard Webhooks ([`webhook`]).
//!
//! A group's state: its definition and checkpoint live in the store (`subscriptions/`,
//! `subscription-checkpoints/`), so a restart resumes from the last acknowledged event; what is
//! in flight lives in memory and is handed out again after a restart (at-least-once).

pub mod webhook;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;
use zhili_model::subscription::{Named, StartFrom, SubscriptionSpec, MAX_IN_FLIGHT};
use zhili_store::events::{Direction, EventLog, EventLogError, ExpectedRevision, NewEvent, RecordedEvent};
use zhili_store::{Store, StoreError, Txn};

pub const ALL: &str = "$all";
pub const CATEGORY: &str = "$ce-";
const DEFS: &str = "subscriptions/";
const CHECKPOINTS: &str = "subscription-checkpoints/";
/// A replay of parked events under way: the parked stream's revision it runs up to.
const REPLAYS: &str = "subscription-replays/";
/// Replayed events are numbered from here (plus their revision in the parked stream), far past
/// any source number, so they never hold the checkpoint back.
const REPLAY_BASE: u64 = u64::MAX / 2;
/// Events read from the source per step.
const READ_BATCH: usize = 256;

/// What a stream name reads. Numbers count revisions in a stream, positions in `$all`, and
/// sequence numbers in a category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Stream(String),
    All,
    Category(String),
}

impl Source {
    pub fn parse(name: &str) -> Result<Self, zhili_model::ValidationError> {
        if name == ALL {
            return Ok(Self::All);
        }
        if let Some(c) = name.strip_prefix(CATEGORY) {
            zhili_model::event::stream_name("stream", c, false)?;
            return Ok(Self::Category(c.to_string()));
        }
        zhili_model::event::stream_name("stream", name, true)?;
        Ok(Self::Stream(name.to_string()))
    }

    /// Up to `limit` events from number `from`, each with its number.
    pub fn read(&self, log: &dyn EventLog, from: u64, direction: Direction, limit: usize) -> Result<Vec<(u64, RecordedEvent)>, EventLogError> {
        Ok(match self {
            Self::Stream(name) => log.read_stream(name, from, direction, limit)?.into_iter().map(|e| (e.revision, e)).collect(),
            Self::All => log.read_all(from, direction, limit)?.into_iter().map(|e| (e.position, e)).collect(),
            Self::Category(c) => log.read_category(c, from, direction, limit)?,
        })
    }

    /// The number the next event will get.
    pub fn end(&self, log: &dyn EventLog) -> Result<u64, EventLogError> {
        Ok(self.read(log, u64::MAX, Direction::Backwards, 1)?.first().map_or(0, |(n, _)| n + 1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("subscription {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Invalid(#[from] zhili_model::ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] EventLogError),
    #[error("stored subscription {0} is unreadable: {1}")]
    Corrupt(String, String),
}

/// An event handed to a consumer: acknowledge it by `ack_id`.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub ack_id: String,
    /// Its number in the subscription's source (see [`Source`]).
    pub number: u64,
    pub revision: u64,
    pub position: u64,
    pub stream: String,
    /// How many times it has been handed out, this one included.
    pub deliveries: u32,
    #[serde(skip)]
    pub body: bytes::Bytes,
}

/// What to do with events a consumer gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nack {
    /// Deliver again (counts a delivery).
    Retry,
    /// Move to `$parked-{name}`, out of the way.
    Park,
    /// Drop: as if acknowledged.
    Skip,
}

/// A group's status as `GET /api/v1/subscriptions/{name}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub spec: SubscriptionSpec,
    /// Every event below this number is acknowledged (or passed over by the filter).
    pub checkpoint: u64,
    pub in_flight: usize,
    /// Events in the source not yet handed out.
    pub lag: u64,
    pub parked: u64,
    pub disabled: Option<String>,
    pub deliveries: Vec<webhook::Attempt>,
}

struct InFlight {
    event: RecordedEvent,
    deliveries: u32,
    deadline: Instant,
}

/// One group's live state.
struct Group {
    name: String,
    spec: SubscriptionSpec,
    source: Source,
    /// Next number to read from the source.
    cursor: u64,
    /// Every number below is done (in memory; see `persisted`).
    checkpoint: u64,
    /// The checkpoint last written to the store.
    persisted: u64,
    /// A checkpoint write is under way (it writes again if the checkpoint moved meanwhile).
    saving: bool,
    in_flight: BTreeMap<u64, InFlight>,
    /// Given back or timed out, to hand out again before new ones.
    redeliver: VecDeque<u64>,
    /// A replay of parked events runs up to this revision of the parked stream (exclusive);
    /// the parked stream is truncated behind the replayed events as they are done.
    replay_end: u64,
    disabled: Option<String>,
    attempts: VecDeque<webhook::Attempt>,
}

impl Group {
    /// The smallest number not yet done.
    fn low_water(&self) -> u64 {
        self.in_flight.keys().next().copied().unwrap_or(self.cursor).min(self.cursor)
    }

    fn wanted(&self, e: &RecordedEvent) -> bool {
        let Some(f) = &self.spec.filter else { return true };
        let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap_or_default();
        let starts =
            |attr: &str, p: &Option<String>| p.as_ref().is_none_or(|p| v.get(attr).and_then(|x| x.as_str()).is_some_and(|s| s.starts_with(p.as_str())));
        starts("type", &f.type_prefix) && starts("subject", &f.subject_prefix)
    }
}

/// Every persistent subscription of the server.
pub struct Subscriptions {
    store: Arc<dyn Store>,
    log: Arc<dyn EventLog>,
    groups: Mutex<HashMap<String, Arc<Mutex<Group>>>>,
    metrics: Option<Arc<zhili_telemetry::Metrics>>,
}

fn def_key(name: &str) -> String {
    format!("{DEFS}{name}")
}

fn checkpoint_key(name: &str) -> String {
    format!("{CHECKPOINTS}{name}")
}

fn replay_key(name: &str) -> String {
    format!("{REPLAYS}{name}")
}

fn parked_stream(name: &str) -> String {
    format!("$parked-{name}")
}

/// The stored definition: the spec and, for webhooks, the signing secret.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    spec: SubscriptionSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disabled: Option<String>,
}

impl Subscriptions {
    /// Loads every stored subscription; webhooks are started by [`Self::run_webhooks`].
    pub fn load(store: Arc<dyn Store>, log: Arc<dyn EventLog>) -> Result<Arc<Self>, SubscriptionError> {
        Self::load_with_metrics(store, log, None)
    }

    /// [`Self::load`], counting webhook deliveries and parked events into `metrics`.
    pub fn load_with_metrics(
        store: Arc<dyn Store>,
        log: Arc<dyn EventLog>,
        metrics: Option<Arc<zhili_telemetry::Metrics>>,
    ) -> Result<Arc<Self>, SubscriptionError> {
        let subs = Arc::new(Self { store: store.clone(), log, groups: Mutex::new(HashMap::new()), metrics });
        for kv in store.range(DEFS, None)? {
            let name = kv.key.get(DEFS.len()..).unwrap_or_default().to_string();
            let stored: Stored = serde_json::from_slice(&kv.value).map_err(|e| SubscriptionError::Corrupt(name.clone(), e.to_string()))?;
            let checkpoint = match store.get(&checkpoint_key(&name))? {
                Some(v) => std::str::from_utf8(&v.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| SubscriptionError::Corrupt(name.clone(), "checkpoint".into()))?,
                None => 0,
            };
            let group = subs.group(&name, stored.spec, checkpoint)?;
            group.lock().disabled = stored.disabled;
            // A replay that was under way continues with what it had not finished.
            if let Some(end) = store.get(&replay_key(&name))?.and_then(|v| std::str::from_utf8(&v.value).ok()?.parse().ok()) {
                subs.queue_replay(&group, end)?;
            }
        }
        Ok(subs)
    }

    fn group(&self, name: &str, spec: SubscriptionSpec, checkpoint: u64) -> Result<Arc<Mutex<Group>>, SubscriptionError> {
        let source = Source::parse(&spec.stream)?;
        let group = Arc::new(Mutex::new(Group {
            name: name.to_string(),
            spec,
            source,
            cursor: checkpoint,
            checkpoint,
            persisted: checkpoint,
            saving: false,
            in_flight: BTreeMap::new(),
            redeliver: VecDeque::new(),
            replay_end: 0,
            disabled: None,
            attempts: VecDeque::new(),
        }));
        self.groups.lock().insert(name.to_string(), group.clone());
        Ok(group)
    }

    fn get_group(&self, name: &str) -> Result<Arc<Mutex<Group>>, SubscriptionError> {
        self.groups.lock().get(name).cloned().ok_or_else(|| SubscriptionError::NotFound(name.to_string()))
    }

    /// Creates or replaces a subscription. A new webhook subscription gets a signing secret,
    /// returned once. A replaced one keeps its checkpoint and secret.
    pub async fn put(&self, name: &str, spec: SubscriptionSpec) -> Result<Option<String>, SubscriptionError> {
        spec.validate()?;
        zhili_model::validate::name("name", name)?;
        let existing = self.store.get(&def_key(name))?.and_then(|kv| serde_json::from_slice::<Stored>(&kv.value).ok());
        let fresh_secret = spec.webhook.is_some() && existing.as_ref().is_none_or(|e| e.secret.is_none());
        let secret = match (&existing, fresh_secret) {
            (_, true) => Some(webhook::new_secret()),
            (Some(e), false) => e.secret.clone(),
            (None, false) => None,
        };
        let checkpoint = match (&existing, spec.from) {
            (Some(_), _) => self.get_group(name).map(|g| g.lock().checkpoint).unwrap_or(0),
            (None, Some(StartFrom::Number(n))) => n,
            (None, Some(StartFrom::Named(Named::End))) => Source::parse(&spec.stream)?.end(&*self.log)?,
            (None, _) => 0,
        };
        let stored = Stored { spec: spec.clone(), secret: secret.clone(), disabled: None };
        let value = serde_json::to_vec(&stored).map_err(|e| SubscriptionError::Corrupt(name.into(), e.to_string()))?;
        let mut txn = Txn::put(def_key(name), value);
        txn.success.push(zhili_store::Op::Put { key: checkpoint_key(name), value: checkpoint.to_string().into(), lease: None });
        self.store.txn(txn).await?;
        self.group(name, spec, checkpoint)?;
        Ok(secret.filter(|_| fresh_secret))
    }

    pub async fn delete(&self, name: &str) -> Result<(), SubscriptionError> {
        if self.groups.lock().remove(name).is_none() {
            return Err(SubscriptionError::NotFound(name.to_string()));
        }
        self.store
            .txn(zhili_store::Txn {
                success: vec![
                    zhili_store::Op::Delete { key: def_key(name) },
                    zhili_store::Op::Delete { key: checkpoint_key(name) },
                    zhili_store::Op::Delete { key: replay_key(name) },
                ],
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.groups.lock().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn spec(&self, name: &str) -> Result<SubscriptionSpec, SubscriptionError> {
        Ok(self.get_group(name)?.lock().spec.clone())
    }

    pub fn status(&self, name: &str) -> Result<Status, SubscriptionError> {
        let g = self.get_group(name)?;
        let g = g.lock();
        let end = g.source.end(&*self.log).unwrap_or(g.cursor);
        Ok(Status {
            name: g.name.clone(),
            spec: g.spec.clone(),
            checkpoint: g.checkpoint,
            in_flight: g.in_flight.len(),
            lag: end.saturating_sub(g.cursor) + g.redeliver.len() as u64,
            parked: self.parked_count(&g.name),
            disabled: g.disabled.clone(),
            deliveries: g.attempts.iter().cloned().collect(),
        })
    }

    /// Up to `max` events for a consumer of group `name`, waiting up to `wait` for some: first
    /// those given back or timed out, then new ones. Bounded by [`MAX_IN_FLIGHT`] per group.
    pub async fn next(&self, name: &str, max: usize, wait: Duration) -> Result<Vec<Delivery>, SubscriptionError> {
        let group = self.get_group(name)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut head = self.log.head();
        loop {
            head.borrow_and_update();
            let (out, parked) = self.take(&group, max)?;
            self.park(&group, parked).await?;
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            // Nothing now: wake on a new append, or when the earliest in-flight event times out.
            let timeout_at = group.lock().in_flight.values().map(|f| f.deadline).min();
            let until = timeout_at.map_or(deadline, |t| t.min(deadline));
            let _ = tokio::time::timeout_at(until, head.changed()).await;
        }
    }

    /// Hands out what is due; returns the deliveries and the events that ran out of deliveries.
    fn take(&self, group: &Mutex<Group>, max: usize) -> Result<(Vec<Delivery>, Vec<RecordedEvent>), SubscriptionError> {
        let mut guard = group.lock();
        // Through a plain reference, so its fields can be borrowed apart.
        let g = &mut *guard;
        let now = Instant::now();
        let timeout = g.spec.ack_timeout();
        let max_deliveries = g.spec.max_deliveries();
        let queued: std::collections::HashSet<u64> = g.redeliver.iter().copied().collect();
        let expired: Vec<u64> = g.in_flight.iter().filter(|(n, f)| f.deadline <= now && !queued.contains(n)).map(|(n, _)| *n).collect();
        g.redeliver.extend(expired);
        let mut out = Vec::new();
        let mut parked = Vec::new();
        while out.len() < max {
            let Some(n) = g.redeliver.pop_front() else { break };
            let Some(f) = g.in_flight.get_mut(&n) else { continue };
            if f.deliveries >= max_deliveries {
                if let Some(f) = g.in_flight.remove(&n) {
                    parked.push(f.event);
                }
                continue;
            }
            f.deliveries += 1;
            f.deadline = now + timeout;
            out.push(delivery(&g.name, n, &f.event, f.deliveries));
        }
        while out.len() < max && g.in_flight.len() < MAX_IN_FLIGHT {
            let want = (max - out.len()).min(READ_BATCH).min(MAX_IN_FLIGHT - g.in_flight.len());
            let batch = g.source.read(&*self.log, g.cursor, Direction::Forwards, want)?;
            if batch.is_empty() {
                break;
            }
            for (n, e) in batch {
                g.cursor = n + 1;
                if !g.wanted(&e) {
                    continue;
                }
                out.push(delivery(&g.name, n, &e, 1));
                g.in_flight.insert(n, InFlight { event: e, deliveries: 1, deadline: now + timeout });
            }
        }
        Ok((out, parked))
    }

    /// Moves events that ran out of deliveries to `$parked-{name}`, then records progress.
    async fn park(&self, group: &Mutex<Group>, events: Vec<RecordedEvent>) -> Result<(), SubscriptionError> {
        if events.is_empty() {
            return Ok(());
        }
        let name = group.lock().name.clone();
        let n = events.len() as u64;
        let parked: Vec<NewEvent> = events.into_iter().map(|e| NewEvent { id: e.id, body: e.body }).collect();
        self.log.append(&parked_stream(&name), ExpectedRevision::Any, parked).await?;
        if let Some(m) = &self.metrics {
            m.events_parked.inc_by(n);
        }
        self.save_checkpoint(group).await?;
        self.truncate_replayed(group).await
    }

    /// Moves the checkpoint to the low-water mark and writes it. Writes of one group are
    /// coalesced: while one is under way, others return at once and the writer under way writes
    /// again with the newest value, so a busy group costs one store write at a time.
    async fn save_checkpoint(&self, group: &Mutex<Group>) -> Result<(), SubscriptionError> {
        /// Clears `saving` even when the write is abandoned (its caller went away).
        struct Saving<'a>(&'a Mutex<Group>);
        impl Drop for Saving<'_> {
            fn drop(&mut self) {
                self.0.lock().saving = false;
            }
        }
        loop {
            let (name, low) = {
                let mut g = group.lock();
                let low = g.low_water();
                g.checkpoint = low;
                if low == g.persisted || g.saving {
                    return Ok(());
                }
                g.saving = true;
                (g.name.clone(), low)
            };
            let saving = Saving(group);
            zhili_store::put(&*self.store, &checkpoint_key(&name), low.to_string()).await?;
            group.lock().persisted = low;
            drop(saving);
        }
    }

    /// Acknowledges events; unknown ids (already acknowledged, or from before a restart) are
    /// ignored, as acks are idempotent. Returns how many were in flight.
    pub async fn ack(&self, name: &str, ack_ids: &[String]) -> Result<usize, SubscriptionError> {
        let group = self.get_group(name)?;
        let done = {
            let mut g = group.lock();
            ack_ids.iter().filter_map(|id| parse_ack_id(name, id)).filter(|n| g.in_flight.remove(n).is_some()).count()
        };
        self.save_checkpoint(&group).await?;
        self.truncate_replayed(&group).await?;
        Ok(done)
    }

    pub async fn nack(&self, name: &str, ack_ids: &[String], action: Nack) -> Result<usize, SubscriptionError> {
        let group = self.get_group(name)?;
        let (count, parked) = {
            let mut g = group.lock();
            let numbers: Vec<u64> = ack_ids.iter().filter_map(|id| parse_ack_id(name, id)).filter(|n| g.in_flight.contains_key(n)).collect();
            let mut parked = Vec::new();
            let mut queued: std::collections::HashSet<u64> = g.redeliver.iter().copied().collect();
            for n in &numbers {
                match action {
                    Nack::Retry => {
                        if queued.insert(*n) {
                            g.redeliver.push_back(*n);
                        }
                    }
                    Nack::Park => parked.extend(g.in_flight.remove(n).map(|f| f.event)),
                    Nack::Skip => {
                        g.in_flight.remove(n);
                    }
                }
            }
            (numbers.len(), parked)
        };
        self.park(&group, parked).await?;
        self.save_checkpoint(&group).await?;
        self.truncate_replayed(&group).await?;
        Ok(count)
    }

    /// Hands every event of `$parked-{name}` to the group's consumers again, before new ones.
    /// Durable: the replay's end is stored, and the parked stream is truncated behind the
    /// replayed events as they are acknowledged (or skipped, or parked again at its end), so a
    /// restart continues the replay with what was not done, and nothing is replayed twice.
    /// Returns how many were queued.
    pub async fn replay_parked(&self, name: &str) -> Result<usize, SubscriptionError> {
        let group = self.get_group(name)?;
        let end = self.log.stream_info(&parked_stream(name))?.and_then(|i| i.last_revision).map_or(0, |r| r + 1);
        zhili_store::put(&*self.store, &replay_key(name), end.to_string()).await?;
        self.queue_replay(&group, end)
    }

    /// Queues the parked events below revision `end` that are not out already.
    fn queue_replay(&self, group: &Mutex<Group>, end: u64) -> Result<usize, SubscriptionError> {
        let name = group.lock().name.clone();
        let parked = self.log.read_stream(&parked_stream(&name), 0, Direction::Forwards, MAX_IN_FLIGHT)?;
        let mut g = group.lock();
        g.replay_end = g.replay_end.max(end);
        let now = Instant::now();
        let mut n = 0;
        for e in parked.into_iter().filter(|e| e.revision < end) {
            let number = REPLAY_BASE + e.revision;
            if g.in_flight.contains_key(&number) {
                continue;
            }
            g.in_flight.insert(number, InFlight { event: e, deliveries: 0, deadline: now });
            g.redeliver.push_back(number);
            n += 1;
        }
        Ok(n)
    }

    /// Truncates the parked stream behind the replayed events that are done.
    async fn truncate_replayed(&self, group: &Mutex<Group>) -> Result<(), SubscriptionError> {
        let (name, done) = {
            let g = group.lock();
            if g.replay_end == 0 {
                return Ok(());
            }
            let first_out = g.in_flight.range(REPLAY_BASE..).next().map(|(n, _)| n - REPLAY_BASE);
            (g.name.clone(), first_out.unwrap_or(g.replay_end).min(g.replay_end))
        };
        let stream = parked_stream(&name);
        let Some(info) = self.log.stream_info(&stream)? else { return Ok(()) };
        if done > info.truncate_before {
            let keep = zhili_store::events::Retention { max_count: info.max_count, max_age_ms: info.max_age_ms, truncate_before: Some(done) };
            self.log.set_retention(&stream, keep).await?;
        }
        Ok(())
    }

    /// Events in the group's parked stream (those being replayed included).
    fn parked_count(&self, name: &str) -> u64 {
        match self.log.stream_info(&parked_stream(name)) {
            Ok(Some(i)) if !i.deleted => i.last_revision.map_or(0, |r| r + 1).saturating_sub(i.first_visible()),
            _ => 0,
        }
    }

    pub(crate) fn record_attempt(&self, name: &str, a: webhook::Attempt) {
        if let Some(m) = &self.metrics {
            let outcome = if a.error.is_none() { "delivered" } else { "failed" };
            m.webhook_deliveries.get_or_create(&zhili_telemetry::OutcomeLabel { outcome }).inc();
        }
        if let Ok(g) = self.get_group(name) {
            let mut g = g.lock();
            if g.attempts.len() == webhook::ATTEMPTS_KEPT {
                g.attempts.pop_front();
            }
            g.attempts.push_back(a);
        }
    }

    pub(crate) async fn disable(&self, name: &str, why: String) -> Result<(), SubscriptionError> {
        let g = self.get_group(name)?;
        let spec = {
            let mut g = g.lock();
            g.disabled = Some(why.clone());
            g.spec.clone()
        };
        let secret = self.store.get(&def_key(name))?.and_then(|kv| serde_json::from_slice::<Stored>(&kv.value).ok()).and_then(|s| s.secret);
        let value = serde_json::to_vec(&Stored { spec, secret, disabled: Some(why) }).map_err(|e| SubscriptionError::Corrupt(name.into(), e.to_string()))?;
        zhili_store::put(&*self.store, &def_key(name), value).await?;
        Ok(())
    }

    pub(crate) fn secret(&self, name: &str) -> Option<String> {
        self.store.get(&def_key(name)).ok().flatten().and_then(|kv| serde_json::from_slice::<Stored>(&kv.value).ok()).and_then(|s| s.secret)
    }

    pub(crate) fn is_disabled(&self, name: &str) -> bool {
        self.get_group(name).map(|g| g.lock().disabled.is_some()).unwrap_or(true)
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn delivery(group: &str, number: u64, e: &RecordedEvent, deliveries: u32) -> Delivery {
    Delivery {
        ack_id: format!("{group}:{number}"),
        number,
        revision: e.revision,
        position: e.position,
        stream: e.stream.clone(),
        deliveries,
        body: e.body.clone(),
    }
}

fn parse_ack_id(group: &str, id: &str) -> Option<u64> {
    id.strip_prefix(group)?.strip_prefix(':')?.parse().ok()
}

#[cfg(test)]
mod tests;

/// The `$audit` stream: one CloudEvent per successful write through any HTTP surface, naming
/// the caller by token accessor id (never the secret). Records are queued and appended in
/// batches by [`Audit::run`] after the answer (at once when idle, once per 5 ms window when
/// busy: `zhili_store::events::Batcher`), so auditing adds no fsync to a write; a crash can
/// lose the last few milliseconds of records, and a full queue drops (and counts).
#[derive(Clone)]
pub struct Audit {
    tx: tokio::sync::mpsc::Sender<AuditRecord>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

pub const AUDIT_STREAM: &str = "$audit";
const AUDIT_QUEUE: usize = 65_536;

/// One audited write.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub surface: &'static str,
    pub method: String,
    /// The path only: query strings can carry tokens.
    pub path: String,
    pub status: u16,
    /// The token's accessor id; None for anonymous callers (ACLs off or no token).
    pub accessor: Option<String>,
}

impl Audit {
    /// The handle writers use, and the task that appends what they queue.
    pub fn new(log: Arc<dyn EventLog>) -> (Self, impl std::future::Future<Output = ()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(AUDIT_QUEUE);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        (Self { tx, dropped: dropped.clone() }, Self::run(log, rx, dropped))
    }

    pub fn record(&self, r: AuditRecord) {
        if self.tx.try_send(r).is_err() {
            let n = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "audit queue full; records dropped");
            }
        }
    }

    async fn run(log: Arc<dyn EventLog>, mut rx: tokio::sync::mpsc::Receiver<AuditRecord>, _dropped: Arc<std::sync::atomic::AtomicU64>) {
        let mut seq: u64 = 0;
        let boot = unix_ms();
        let mut batcher = zhili_store::events::Batcher::new(1024);
        while let Some(first) = rx.recv().await {
            let batch = batcher.gather(first, || rx.try_recv().ok()).await;
            // Records queued within a few milliseconds: one timestamp for them.
            let time = zhili_model::event::timestamp(unix_ms());
            let first_seq = seq + 1;
            let events = || {
                (first_seq..)
                    .zip(&batch)
                    .map(|(n, r)| {
                        let id = format!("audit-{boot}-{n}");
                        let source = format!("zhili://{}", r.surface);
                        let body = zhili_model::event::CloudEvent::new(&id, &source, "io.zhili.audit.write", &r.path, &time, r).to_vec();
                        NewEvent { id, body: body.into() }
                    })
                    .collect()
            };
            zhili_store::events::append_retrying(&*log, AUDIT_STREAM, events).await;
            seq += batch.len() as u64;
        }
    }
}

pub const GATEWAY_STREAM: &str = "$gateway";

/// What a gateway observed about a service, for `$gateway`.
#[derive(Debug, Clone, Copy)]
pub enum GatewayChange<'a> {
    /// The service's circuit breaker moved to `open`, `half_open` or `closed`.
    Breaker(&'a str),
    /// Outlier detection ejected an instance.
    Ejected { instance: &'a str, for_: Duration },
}

/// Appends a gateway observation to `$gateway` (`io.zhili.gateway.breaker.opened`,
/// `...half_opened`, `...closed`, `io.zhili.gateway.endpoint.ejected`), subject
/// `{namespace}/{service}[/{instance}]`.
pub async fn publish_gateway(log: &dyn EventLog, namespace: &str, service: &str, change: GatewayChange<'_>, reason: &str) -> Result<(), EventLogError> {
    let now = unix_ms();
    let (kind, subject, data) = match change {
        GatewayChange::Breaker(state) => {
            let kind = match state {
                "open" => "io.zhili.gateway.breaker.opened",
                "half_open" => "io.zhili.gateway.breaker.half_opened",
                _ => "io.zhili.gateway.breaker.closed",
            };
            (kind, format!("{namespace}/{service}"), serde_json::json!({"namespace": namespace, "service": service, "state": state, "reason": reason}))
        }
        GatewayChange::Ejected { instance, for_ } => (
            "io.zhili.gateway.endpoint.ejected",
            format!("{namespace}/{service}/{instance}"),
            serde_json::json!({"namespace": namespace, "service": service, "instance": instance, "ejected_for_ms": for_.as_millis() as u64, "reason": reason}),
        ),
    };
    let id = format!("gateway-{now}-{}", rand_suffix());
    let time = zhili_model::event::timestamp(now);
    let body = zhili_model::event::CloudEvent::new(&id, "zhili://gateway", kind, &subject, &time, &data).to_vec();
    log.append(GATEWAY_STREAM, ExpectedRevision::Any, vec![NewEvent { id, body: body.into() }]).await.map(|_| ())
}

fn rand_suffix() -> u64 {
    use rand::Rng;
    rand::rng().random()
}

/// Each group's lag and in-flight count as Prometheus gauges (registered by whoever serves
/// `/metrics`).
#[derive(Debug)]
pub struct SubscriptionsCollector(pub Arc<Subscriptions>);

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscriptions")
    }
}

impl prometheus_client::collector::Collector for SubscriptionsCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let statuses: Vec<Status> = self.0.names().iter().filter_map(|n| self.0.status(n).ok()).collect();
        for (name, help, value) in [
            ("subscription_lag", "Events of the source not yet handed out, per subscription", (|s: &Status| s.lag) as fn(&Status) -> u64),
            ("subscription_in_flight", "Events handed out and not yet acknowledged, per subscription", |s: &Status| s.in_flight as u64),
        ] {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &statuses {
                ConstGauge::new(value(s) as i64).encode(fam.encode_family(&vec![("subscription".to_string(), s.name.clone())])?)?;
            }
        }
        Ok(())
    }
}

//! The embedded [`EventLog`] on fjall, in its own database (`<data dir>/events`) so that event
//! traffic never queues behind the key-value store's writes. One writer thread takes every
//! queued append, applies the group to one batch and fsyncs once (group commit); only then are
//! the appends acknowledged and made visible to readers (reads are capped at the committed head,
//! so nothing that is not durable is ever served).
//!
//! Layout (all keys big-endian, so key order is numeric order):
//! - `log`: position → record `crc32 | revision | stream len | stream | id len | id | body`; the
//!   checksum covers everything after it and is verified on every read and, at start-up, on the
//!   records at the tail (fjall's journal already drops a torn batch; a record whose checksum
//!   fails is cut, never served);
//! - `streams`: stream `\0` revision → position (reads by stream, either direction);
//! - `ids`: stream `\0` event id → revision, position (idempotent appends; none for events
//!   appended with `append_unique`, whose ids are new by construction);
//! - `heads`: stream → next revision, truncate-before, deleted;
//! - `categories`: category `\0` sequence → position (`$ce-order` reads `order-*`);
//! - `meta`: the next global position and the categories' next sequence numbers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};
use zhili_store::events::{category, now_ms, Appended, Direction, EventLog, EventLogError, ExpectedRevision, NewEvent, RecordedEvent, Retention, StreamInfo};

/// Appends one group commit may take.
const MAX_GROUP: usize = 1024;
const QUEUE_LEN: usize = 8192;
/// Records at the tail whose checksums are verified at start-up.
const TAIL_CHECK: usize = 1024;
const NEXT_POSITION: &[u8] = b"next_position";
const CATEGORY_PREFIX: &[u8] = b"cat\0";
const SCAVENGE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

pub struct FjallEventLog {
    shared: Arc<Shared>,
    requests: mpsc::SyncSender<Request>,
    /// Set on drop: the scavenger thread ends, so the writer (and the database) can close.
    closed: Arc<AtomicBool>,
}

impl Drop for FjallEventLog {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

struct Shared {
    db: Database,
    log: Keyspace,
    streams: Keyspace,
    ids: Keyspace,
    heads: Keyspace,
    categories: Keyspace,
    meta: Keyspace,
    /// What is durable, and therefore what readers may see.
    state: Mutex<State>,
    head: watch::Sender<u64>,
    failed: AtomicBool,
    metrics: Option<Arc<zhili_telemetry::Metrics>>,
}

#[derive(Default, Clone)]
struct State {
    next_position: u64,
    heads: HashMap<String, StreamInfo>,
    categories: HashMap<String, u64>,
}

enum Request {
    Append {
        stream: String,
        expected: ExpectedRevision,
        events: Vec<NewEvent>,
        /// The ids are new by construction: no duplicate check, no id index entries.
        unique: bool,
        reply: oneshot::Sender<Result<Appended, EventLogError>>,
    },
    Delete {
        stream: String,
        expected: ExpectedRevision,
        reply: oneshot::Sender<Result<(), EventLogError>>,
    },
    Retain {
        stream: String,
        retention: Retention,
        reply: oneshot::Sender<Result<StreamInfo, EventLogError>>,
    },
    /// Reclaims the space of events retention or truncation hides.
    Scavenge,
}

fn engine(e: impl std::fmt::Display) -> EventLogError {
    EventLogError::Engine(e.to_string())
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_be_bytes)
}

fn stream_key(stream: &str, revision: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 9);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

fn id_key(stream: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + id.len() + 1);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// `next revision | truncate-before | deleted | flags (bit 0: max count, bit 1: max age) |
/// max count | max age ms`.
fn encode_head(h: &StreamInfo) -> [u8; 34] {
    let mut out = [0u8; 34];
    out[..8].copy_from_slice(&h.last_revision.map_or(0, |r| r + 1).to_be_bytes());
    out[8..16].copy_from_slice(&h.truncate_before.to_be_bytes());
    out[16] = u8::from(h.deleted);
    out[17] = u8::from(h.max_count.is_some()) | (u8::from(h.max_age_ms.is_some()) << 1);
    out[18..26].copy_from_slice(&h.max_count.unwrap_or(0).to_be_bytes());
    out[26..34].copy_from_slice(&h.max_age_ms.unwrap_or(0).to_be_bytes());
    out
}

fn decode_head(v: &[u8]) -> Option<StreamInfo> {
    let next = u64_at(v, 0)?;
    let flags = *v.get(17)?;
    Some(StreamInfo {
        last_revision: next.checked_sub(1),
        truncate_before: u64_at(v, 8)?,
        deleted: *v.get(16)? != 0,
        max_count: (flags & 1 != 0).then(|| u64_at(v, 18)).flatten(),
        max_age_ms: (flags & 2 != 0).then(|| u64_at(v, 26)).flatten(),
    })
}

fn encode_record(stream: &str, revision: u64, appended_ms: u64, e: &NewEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 16 + 2 + stream.len() + 2 + e.id.len() + e.body.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&revision.to_be_bytes());
    out.extend_from_slice(&appended_ms.to_be_bytes());
    out.extend_from_slice(&(stream.len() as u16).to_be_bytes());
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
    out.extend_from_slice(e.id.as_bytes());
    out.extend_from_slice(&e.body);
    let crc = crc32fast::hash(out.get(4..).unwrap_or_default());
    if let Some(head) = out.get_mut(..4) {
        head.copy_from_slice(&crc.to_be_bytes());
    }
    out
}

fn decode_record(position: u64, v: &[u8]) -> Result<RecordedEvent, EventLogError> {
    let corrupt = || EventLogError::Corrupt(format!("record at position {position}"));
    let crc = v.get(..4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(u32::from_be_bytes).ok_or_else(corrupt)?;
    let rest = v.get(4..).ok_or_else(corrupt)?;
    if crc32fast::hash(rest) != crc {
        return Err(EventLogError::Corrupt(format!("record at position {position}: checksum mismatch")));
    }
    let revision = u64_at(rest, 0).ok_or_else(corrupt)?;
    let appended_ms = u64_at(rest, 8).ok_or_else(corrupt)?;
    let len16 = |at: usize| rest.get(at..at + 2).and_then(|s| <[u8; 2]>::try_from(s).ok()).map(|b| usize::from(u16::from_be_bytes(b)));
    let slen = len16(16).ok_or_else(corrupt)?;
    let stream = rest.get(18..18 + slen).and_then(|s| std::str::from_utf8(s).ok()).ok_or_else(corrupt)?;
    let ilen = len16(18 + slen).ok_or_else(corrupt)?;
    let id_at = 20 + slen;
    let id = rest.get(id_at..id_at + ilen).and_then(|s| std::str::from_utf8(s).ok()).ok_or_else(corrupt)?;
    let body = rest.get(id_at + ilen..).ok_or_else(corrupt)?;
    Ok(RecordedEvent { stream: stream.to_string(), revision, position, id: id.to_string(), body: Bytes::copy_from_slice(body), appended_ms })
}

/// Memtable sizes of the event log's keyspaces: the records, and each index.
const LOG_MEMTABLE: u64 = 16 << 20;
const INDEX_MEMTABLE: u64 = 4 << 20;

impl FjallEventLog {
    /// Opens (or creates) the event log in `dir`, cutting any record at the tail that fails its
    /// checksum.
    pub fn open(dir: &Path) -> Result<Self, EventLogError> {
        Self::open_with_metrics(dir, None)
    }

    /// [`Self::open`], counting appends, bytes, fsync time and group sizes into `metrics`.
    pub fn open_with_metrics(dir: &Path, metrics: Option<Arc<zhili_telemetry::Metrics>>) -> Result<Self, EventLogError> {
        std::fs::create_dir_all(dir).map_err(engine)?;
        let db = Database::builder(dir).open().map_err(engine)?;
        // Small memtables: appends only ever add at the end, reads of older events come from
        // segments, so what a memtable holds is only the newest few seconds — and fjall's
        // default (64 MiB per keyspace, plus sealed ones awaiting flush) made the log the
        // largest resident of a busy server. Fixed when a keyspace is created.
        let ks = |name: &str| {
            let memtable = if name == "log" { LOG_MEMTABLE } else { INDEX_MEMTABLE };
            db.keyspace(name, || KeyspaceCreateOptions::default().max_memtable_size(memtable)).map_err(engine)
        };
        let (log, streams, ids, heads, categories, meta) = (ks("log")?, ks("streams")?, ks("ids")?, ks("heads")?, ks("categories")?, ks("meta")?);
        let next_position = match meta.get(NEXT_POSITION).map_err(engine)? {
            Some(v) => u64_at(&v, 0).ok_or_else(|| EventLogError::Corrupt("next position".into()))?,
            None => 0,
        };
        let mut state = State { next_position, ..State::default() };
        for item in heads.iter() {
            let (k, v) = item.into_inner().map_err(engine)?;
            let name = String::from_utf8(k.to_vec()).map_err(|_| EventLogError::Corrupt("stream name".into()))?;
            state.heads.insert(name, decode_head(&v).ok_or_else(|| EventLogError::Corrupt("stream head".into()))?);
        }
        for item in meta.prefix(CATEGORY_PREFIX) {
            let (k, v) = item.into_inner().map_err(engine)?;
            let name = k.get(CATEGORY_PREFIX.len()..).and_then(|b| std::str::from_utf8(b).ok()).ok_or_else(|| EventLogError::Corrupt("category".into()))?;
            state.categories.insert(name.to_string(), u64_at(&v, 0).ok_or_else(|| EventLogError::Corrupt("category head".into()))?);
        }
        let shared = Arc::new(Shared {
            db,
            log,
            streams,
            ids,
            heads,
            categories,
            meta,
            head: watch::Sender::new(state.next_position),
            state: Mutex::new(state),
            failed: AtomicBool::new(false),
            metrics,
        });
        shared.check_tail()?;
        let (requests, rx) = mpsc::sync_channel(QUEUE_LEN);
        let writer = shared.clone();
        std::thread::Builder::new().name("zhili-events-writer".into()).spawn(move || writer.writer_loop(&rx)).map_err(engine)?;
        // Space hidden by retention is reclaimed in the background, in line with appends.
        let scavenger = requests.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let stop = closed.clone();
        std::thread::Builder::new()
            .name("zhili-events-scavenger".into())
            .spawn(move || {
                let tick = std::time::Duration::from_millis(100);
                let mut waited = std::time::Duration::ZERO;
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(tick);
                    waited += tick;
                    if waited >= SCAVENGE_EVERY {
                        waited = std::time::Duration::ZERO;
                        if scavenger.try_send(Request::Scavenge).is_err() {
                            continue;
                        }
                    }
                }
            })
            .map_err(engine)?;
        Ok(Self { shared, requests, closed })
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, EventLogError>>) -> Request) -> Result<T, EventLogError> {
        let (tx, rx) = oneshot::channel();
        crate::enqueue(&self.requests, make(tx)).await.map_err(|()| EventLogError::Closed)?;
        rx.await.map_err(|_| EventLogError::Closed)?
    }
}

impl Shared {
    /// Verifies the checksums of the last records; a failing tail is cut (with everything
    /// after it) so it is never served, and the next position moves back to it.
    fn check_tail(&self) -> Result<(), EventLogError> {
        let mut cut_from = None;
        for item in self.log.iter().rev().take(TAIL_CHECK) {
            let (k, v) = item.into_inner().map_err(engine)?;
            let position = u64_at(&k, 0).ok_or_else(|| EventLogError::Corrupt("log key".into()))?;
            if decode_record(position, &v).is_err() {
                cut_from = Some(position);
            }
        }
        let Some(from) = cut_from else { return Ok(()) };
        tracing::warn!(position = from, "event log tail failed its checksum; cutting it");
        let mut batch = self.db.batch();
        for item in self.log.range(from.to_be_bytes()..) {
            let k = item.key().map_err(engine)?;
            batch.remove(&self.log, k);
        }
        // The indexes may name cut positions: drop those entries and move the heads back (a
        // full scan, but only on this rare path).
        let mut state = self.state.lock();
        // (name, first cut revision or sequence) per stream and per category.
        let mut cut = [HashMap::<String, u64>::new(), HashMap::new()];
        for (ks, cut) in [&self.streams, &self.categories].into_iter().zip(cut.iter_mut()) {
            for item in ks.iter() {
                let (k, v) = item.into_inner().map_err(engine)?;
                if u64_at(&v, 0).is_some_and(|p| p >= from) {
                    let name = k.iter().position(|b| *b == 0).and_then(|i| std::str::from_utf8(k.get(..i)?).ok()).unwrap_or_default().to_string();
                    let n = k.len().checked_sub(8).and_then(|at| u64_at(&k, at)).unwrap_or(0);
                    batch.remove(ks, k);
                    let first = cut.entry(name).or_insert(n);
                    *first = (*first).min(n);
                }
            }
        }
        let [streams, categories] = cut;
        for (name, first) in streams {
            if let Some(h) = state.heads.get_mut(&name) {
                h.last_revision = first.checked_sub(1);
                batch.insert(&self.heads, name.as_bytes(), encode_head(h));
            }
        }
        for (name, first) in categories {
            state.categories.insert(name.clone(), first);
            let mut k = CATEGORY_PREFIX.to_vec();
            k.extend_from_slice(name.as_bytes());
            batch.insert(&self.meta, k, first.to_be_bytes());
        }
        for item in self.ids.iter() {
            let (k, v) = item.into_inner().map_err(engine)?;
            if u64_at(&v, 8).is_some_and(|p| p >= from) {
                batch.remove(&self.ids, k);
            }
        }
        batch.insert(&self.meta, NEXT_POSITION, from.to_be_bytes());
        batch.commit().map_err(engine)?;
        self.db.persist(PersistMode::SyncData).map_err(engine)?;
        state.next_position = from;
        self.head.send_replace(from);
        Ok(())
    }

    fn writer_loop(&self, rx: &mpsc::Receiver<Request>) {
        while let Some(reqs) = crate::next_group(rx, MAX_GROUP) {
            let mut group = Group {
                shared: self,
                batch: self.db.batch(),
                // Only what the group changes: the rest is read through from `shared.state`.
                state: State { next_position: self.state.lock().next_position, ..State::default() },
                ids: HashMap::new(),
                touched: Vec::new(),
                wrote: false,
                events: 0,
                bytes: 0,
            };
            let failed = self.failed.load(Ordering::Acquire);
            let mut appends = Vec::with_capacity(reqs.len());
            let mut deletes = Vec::new();
            let mut retains = Vec::new();
            for req in reqs {
                match req {
                    Request::Append { stream, expected, events, unique, reply } => {
                        appends.push((reply, if failed { Err(engine("event log failed earlier")) } else { group.append(&stream, expected, events, unique) }))
                    }
                    Request::Delete { stream, expected, reply } => {
                        deletes.push((reply, if failed { Err(engine("event log failed earlier")) } else { group.delete(&stream, expected) }))
                    }
                    Request::Retain { stream, retention, reply } => {
                        retains.push((reply, if failed { Err(engine("event log failed earlier")) } else { group.retain(&stream, retention) }))
                    }
                    Request::Scavenge if !failed => {
                        if let Err(e) = group.scavenge() {
                            tracing::warn!(error = %e, "event log scavenge failed");
                        }
                    }
                    Request::Scavenge => {}
                }
            }
            if let Some(m) = &self.metrics {
                m.event_group_size.observe((appends.len() + deletes.len()) as f64);
            }
            let outcome = group.commit();
            if let Err(e) = &outcome {
                tracing::error!(error = %e, "event log commit failed; refusing further appends");
                self.failed.store(true, Ordering::Release);
            }
            let settle = |r| match &outcome {
                Ok(()) => r,
                Err(e) => Err(engine(e)),
            };
            for (reply, r) in appends {
                let _ = reply.send(settle(r));
            }
            for (reply, r) in deletes {
                let _ = reply.send(match &outcome {
                    Ok(()) => r,
                    Err(e) => Err(engine(e)),
                });
            }
            for (reply, r) in retains {
                let _ = reply.send(match &outcome {
                    Ok(()) => r,
                    Err(e) => Err(engine(e)),
                });
            }
        }
    }

    fn read_positions(&self, positions: impl Iterator<Item = Result<u64, EventLogError>>) -> Result<Vec<RecordedEvent>, EventLogError> {
        let mut out = Vec::new();
        for p in positions {
            let p = p?;
            // A position an index still names may have been scavenged (retention): skipped.
            let Some(v) = self.log.get(p.to_be_bytes()).map_err(engine)? else { continue };
            out.push(decode_record(p, &v)?);
        }
        Ok(out)
    }
}

/// One group commit in the making: the state it changes (stream heads and category counts it
/// touched, the next position) on top of the shared state, applied only once durable.
struct Group<'a> {
    shared: &'a Shared,
    batch: fjall::OwnedWriteBatch,
    state: State,
    /// Ids appended earlier in this group: (stream, id) → (revision, position).
    /// Keyed like the `ids` keyspace (`stream \0 id`), so one key serves both lookups.
    ids: HashMap<Vec<u8>, (u64, u64)>,
    touched: Vec<String>,
    wrote: bool,
    events: u64,
    bytes: u64,
}

impl Group<'_> {
    /// A stream's head as this group sees it.
    fn head(&self, stream: &str) -> Option<StreamInfo> {
        self.state.heads.get(stream).copied().or_else(|| self.shared.state.lock().heads.get(stream).copied())
    }

    fn lookup_id(&self, key: &[u8]) -> Result<Option<(u64, u64)>, EventLogError> {
        if let Some(hit) = self.ids.get(key) {
            return Ok(Some(*hit));
        }
        Ok(self.shared.ids.get(key).map_err(engine)?.and_then(|v| Some((u64_at(&v, 0)?, u64_at(&v, 8)?))))
    }

    /// The original answer when these events were appended before; `keys` are their id keys.
    fn duplicate(&self, events: &[NewEvent], keys: &[Vec<u8>]) -> Result<Option<Appended>, EventLogError> {
        let Some(first) = keys.first() else { return Ok(None) };
        let Some((rev, pos)) = self.lookup_id(first)? else {
            if let Some((e, _)) = events.iter().zip(keys).skip(1).find(|(_, k)| matches!(self.lookup_id(k), Ok(Some(_)))) {
                return Err(EventLogError::PartialDuplicate(format!("{:?}", e.id)));
            }
            return Ok(None);
        };
        for (i, (e, k)) in events.iter().zip(keys).enumerate() {
            if self.lookup_id(k)? != Some((rev + i as u64, pos + i as u64)) {
                return Err(EventLogError::PartialDuplicate(format!("{:?}", e.id)));
            }
        }
        let n = events.len() as u64 - 1;
        Ok(Some(Appended { first_revision: rev, last_revision: rev + n, first_position: pos, last_position: pos + n, duplicate: true }))
    }

    fn append(&mut self, stream: &str, expected: ExpectedRevision, events: Vec<NewEvent>, unique: bool) -> Result<Appended, EventLogError> {
        let keys: Vec<Vec<u8>> = if unique { Vec::new() } else { events.iter().map(|e| id_key(stream, &e.id)).collect() };
        if let Some(original) = self.duplicate(&events, &keys)? {
            return Ok(original);
        }
        let mut head = self.head(stream).unwrap_or_default();
        let visible = head.last_revision.filter(|_| !head.deleted);
        if !expected.holds(visible) {
            return Err(EventLogError::WrongExpectedRevision { expected: expected.to_string(), actual: visible });
        }
        if head.deleted {
            // Appending to a deleted stream recreates it; its revisions continue.
            head.deleted = false;
            head.truncate_before = head.last_revision.map_or(0, |r| r + 1);
        }
        let first_revision = head.last_revision.map_or(0, |r| r + 1);
        let first_position = self.state.next_position;
        let now = now_ms();
        let cat = category(stream).map(str::to_string);
        let mut keys = keys.into_iter();
        for (i, e) in events.iter().enumerate() {
            let (revision, position) = (first_revision + i as u64, first_position + i as u64);
            self.batch.insert(&self.shared.log, position.to_be_bytes(), encode_record(stream, revision, now, e));
            self.batch.insert(&self.shared.streams, stream_key(stream, revision), position.to_be_bytes());
            if let Some(key) = keys.next() {
                let mut v = [0u8; 16];
                v[..8].copy_from_slice(&revision.to_be_bytes());
                v[8..].copy_from_slice(&position.to_be_bytes());
                self.batch.insert(&self.shared.ids, key.as_slice(), v);
                self.ids.insert(key, (revision, position));
            }
            if let Some(c) = &cat {
                if !self.state.categories.contains_key(c) {
                    let known = self.shared.state.lock().categories.get(c).copied().unwrap_or(0);
                    self.state.categories.insert(c.clone(), known);
                }
                let seq = self.state.categories.entry(c.clone()).or_insert(0);
                self.batch.insert(&self.shared.categories, stream_key(c, *seq), position.to_be_bytes());
                *seq += 1;
            }
        }
        let n = events.len() as u64;
        self.events += n;
        self.bytes += events.iter().map(|e| e.body.len() as u64).sum::<u64>();
        head.last_revision = Some(first_revision + n - 1);
        self.state.heads.insert(stream.to_string(), head);
        self.state.next_position += n;
        if let Some(c) = cat {
            self.touched.push(c);
        }
        self.batch.insert(&self.shared.heads, stream.as_bytes(), encode_head(&head));
        self.wrote = true;
        Ok(Appended { first_revision, last_revision: first_revision + n - 1, first_position, last_position: first_position + n - 1, duplicate: false })
    }

    fn delete(&mut self, stream: &str, expected: ExpectedRevision) -> Result<(), EventLogError> {
        let Some(mut head) = self.head(stream) else {
            return Err(EventLogError::WrongExpectedRevision { expected: expected.to_string(), actual: None });
        };
        let visible = head.last_revision.filter(|_| !head.deleted);
        if !expected.holds(visible) || visible.is_none() {
            return Err(EventLogError::WrongExpectedRevision { expected: expected.to_string(), actual: visible });
        }
        head.deleted = true;
        head.truncate_before = head.last_revision.map_or(0, |r| r + 1);
        self.state.heads.insert(stream.to_string(), head);
        self.batch.insert(&self.shared.heads, stream.as_bytes(), encode_head(&head));
        self.wrote = true;
        Ok(())
    }

    fn retain(&mut self, stream: &str, r: Retention) -> Result<StreamInfo, EventLogError> {
        let mut head = self.head(stream).ok_or_else(|| EventLogError::StreamNotFound(stream.to_string()))?;
        head.max_count = r.max_count;
        head.max_age_ms = r.max_age_ms;
        head.truncate_before = head.truncate_before.max(r.truncate_before.unwrap_or(0));
        self.state.heads.insert(stream.to_string(), head);
        self.batch.insert(&self.shared.heads, stream.as_bytes(), encode_head(&head));
        self.wrote = true;
        Ok(head)
    }

    /// Deletes what retention hides: for each stream with a limit, its events below the first
    /// visible revision (and, by age, the old ones at the front), from the log and the indexes.
    /// Categories keep no entries for them either: a category read skips missing positions.
    fn scavenge(&mut self) -> Result<(), EventLogError> {
        let now = now_ms();
        let limits = |h: &StreamInfo| h.truncate_before > 0 || h.max_count.is_some() || h.max_age_ms.is_some();
        let mut limited: HashMap<String, StreamInfo> = self.shared.state.lock().heads.iter().filter(|(_, h)| limits(h)).map(|(n, h)| (n.clone(), *h)).collect();
        // This group's changes win over the shared state.
        for (n, h) in &self.state.heads {
            match limits(h) {
                true => limited.insert(n.clone(), *h),
                false => limited.remove(n),
            };
        }
        for (stream, head) in limited {
            let cut = head.first_visible();
            let start = stream_key(&stream, 0);
            for item in self.shared.streams.range(start..stream_key(&stream, u64::MAX)) {
                let (k, v) = item.into_inner().map_err(engine)?;
                let revision = k.len().checked_sub(8).and_then(|at| u64_at(&k, at)).unwrap_or(0);
                let position = u64_at(&v, 0).ok_or_else(|| EventLogError::Corrupt("stream index".into()))?;
                if revision >= cut {
                    // Past the count and truncation limits: only age can still cut, from the front.
                    let young = match self.shared.log.get(position.to_be_bytes()).map_err(engine)? {
                        Some(rec) => head.young_enough(decode_record(position, &rec)?.appended_ms, now),
                        None => true,
                    };
                    if young || head.last_revision == Some(revision) {
                        break;
                    }
                }
                if let Some(rec) = self.shared.log.get(position.to_be_bytes()).map_err(engine)? {
                    if let Ok(e) = decode_record(position, &rec) {
                        self.batch.remove(&self.shared.ids, id_key(&stream, &e.id));
                    }
                }
                self.batch.remove(&self.shared.log, position.to_be_bytes());
                self.batch.remove(&self.shared.streams, k);
                self.wrote = true;
            }
        }
        Ok(())
    }

    /// Makes the group durable, then visible: state, head position, waiters.
    fn commit(self) -> Result<(), EventLogError> {
        if !self.wrote {
            return Ok(());
        }
        let mut batch = self.batch;
        batch.insert(&self.shared.meta, NEXT_POSITION, self.state.next_position.to_be_bytes());
        for c in &self.touched {
            let mut k = CATEGORY_PREFIX.to_vec();
            k.extend_from_slice(c.as_bytes());
            batch.insert(&self.shared.meta, k, self.state.categories.get(c).copied().unwrap_or(0).to_be_bytes());
        }
        batch.commit().map_err(engine)?;
        let started = std::time::Instant::now();
        self.shared.db.persist(PersistMode::SyncData).map_err(engine)?;
        if let Some(m) = &self.shared.metrics {
            m.event_fsync.observe(started.elapsed().as_secs_f64());
            m.events_appended.inc_by(self.events);
            m.events_appended_bytes.inc_by(self.bytes);
        }
        let next = self.state.next_position;
        let mut shared = self.shared.state.lock();
        shared.next_position = next;
        shared.heads.extend(self.state.heads);
        shared.categories.extend(self.state.categories);
        drop(shared);
        self.shared.head.send_replace(next);
        Ok(())
    }
}

#[async_trait]
impl EventLog for FjallEventLog {
    async fn append(&self, stream: &str, expected: ExpectedRevision, events: Vec<NewEvent>) -> Result<Appended, EventLogError> {
        if events.is_empty() {
            return Err(EventLogError::Engine("an append needs at least one event".into()));
        }
        self.call(|reply| Request::Append { stream: stream.to_string(), expected, events, unique: false, reply }).await
    }

    async fn append_unique(&self, stream: &str, events: Vec<NewEvent>) -> Result<Appended, EventLogError> {
        if events.is_empty() {
            return Err(EventLogError::Engine("an append needs at least one event".into()));
        }
        self.call(|reply| Request::Append { stream: stream.to_string(), expected: ExpectedRevision::Any, events, unique: true, reply }).await
    }

    fn read_stream(&self, stream: &str, from: u64, direction: Direction, limit: usize) -> Result<Vec<RecordedEvent>, EventLogError> {
        let Some(head) = self.shared.state.lock().heads.get(stream).copied() else { return Ok(vec![]) };
        let Some(last) = head.last_revision.filter(|_| !head.deleted) else { return Ok(vec![]) };
        let lo = head.first_visible();
        let (a, b) = match direction {
            Direction::Forwards => (from.max(lo), last),
            Direction::Backwards => (lo, from.min(last)),
        };
        if a > b {
            return Ok(vec![]);
        }
        let range = self.shared.streams.range(stream_key(stream, a)..=stream_key(stream, b));
        let now = now_ms();
        let mut out = Vec::new();
        let iter: Box<dyn Iterator<Item = fjall::Guard>> = match direction {
            Direction::Forwards => Box::new(range),
            Direction::Backwards => Box::new(range.rev()),
        };
        for item in iter {
            let v = item.value().map_err(engine)?;
            let p = u64_at(&v, 0).ok_or_else(|| EventLogError::Corrupt("stream index".into()))?;
            let Some(e) = self.shared.read_positions(std::iter::once(Ok(p)))?.pop() else { continue };
            if !head.young_enough(e.appended_ms, now) {
                // Older events come first: forwards, skip them; backwards, nothing older is kept.
                if direction == Direction::Backwards {
                    break;
                }
                continue;
            }
            out.push(e);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    fn read_all(&self, from: u64, direction: Direction, limit: usize) -> Result<Vec<RecordedEvent>, EventLogError> {
        let next = self.shared.state.lock().next_position;
        let Some(last) = next.checked_sub(1) else { return Ok(vec![]) };
        let decode = |item: fjall::Guard| -> Result<RecordedEvent, EventLogError> {
            let (k, v) = item.into_inner().map_err(engine)?;
            decode_record(u64_at(&k, 0).ok_or_else(|| EventLogError::Corrupt("log key".into()))?, &v)
        };
        match direction {
            Direction::Forwards if from <= last => self.shared.log.range(from.to_be_bytes()..=last.to_be_bytes()).take(limit).map(decode).collect(),
            Direction::Backwards => self.shared.log.range(..=from.min(last).to_be_bytes()).rev().take(limit).map(decode).collect(),
            Direction::Forwards => Ok(vec![]),
        }
    }

    fn read_category(&self, category: &str, from: u64, direction: Direction, limit: usize) -> Result<Vec<(u64, RecordedEvent)>, EventLogError> {
        let Some(next) = self.shared.state.lock().categories.get(category).copied() else { return Ok(vec![]) };
        let Some(last) = next.checked_sub(1) else { return Ok(vec![]) };
        let (a, b) = match direction {
            Direction::Forwards => (from, last),
            Direction::Backwards => (0, from.min(last)),
        };
        if a > b {
            return Ok(vec![]);
        }
        let range = self.shared.categories.range(stream_key(category, a)..=stream_key(category, b));
        let entry = |item: fjall::Guard| -> Result<Option<(u64, RecordedEvent)>, EventLogError> {
            let (k, v) = item.into_inner().map_err(engine)?;
            let seq = k.len().checked_sub(8).and_then(|at| u64_at(&k, at)).ok_or_else(|| EventLogError::Corrupt("category key".into()))?;
            let p = u64_at(&v, 0).ok_or_else(|| EventLogError::Corrupt("category index".into()))?;
            Ok(self.shared.read_positions(std::iter::once(Ok(p)))?.pop().map(|event| (seq, event)))
        };
        // Events of deleted streams stay in their category, as in KurrentDB's `$ce-` projections.
        let found: Result<Vec<Option<(u64, RecordedEvent)>>, EventLogError> = match direction {
            Direction::Forwards => range.take(limit).map(entry).collect(),
            Direction::Backwards => range.rev().take(limit).map(entry).collect(),
        };
        Ok(found?.into_iter().flatten().collect())
    }

    fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, EventLogError> {
        Ok(self.shared.state.lock().heads.get(stream).copied())
    }

    fn list_streams(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, StreamInfo)>, EventLogError> {
        let state = self.shared.state.lock();
        let mut names: Vec<(&String, &StreamInfo)> =
            state.heads.iter().filter(|(n, h)| n.starts_with(prefix) && after.is_none_or(|a| n.as_str() > a) && !h.deleted).collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        Ok(names.into_iter().take(limit).map(|(n, h)| (n.clone(), *h)).collect())
    }

    async fn delete_stream(&self, stream: &str, expected: ExpectedRevision) -> Result<(), EventLogError> {
        self.call(|reply| Request::Delete { stream: stream.to_string(), expected, reply }).await
    }

    async fn set_retention(&self, stream: &str, retention: Retention) -> Result<StreamInfo, EventLogError> {
        self.call(|reply| Request::Retain { stream: stream.to_string(), retention, reply }).await
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> NewEvent {
        NewEvent { id: id.into(), body: Bytes::from(format!("{{\"id\":\"{id}\"}}")) }
    }

    #[tokio::test]
    async fn behaves_as_the_contract_says() {
        let dir = tempfile::tempdir().unwrap();
        zhili_store::events::conformance(&FjallEventLog::open(dir.path()).unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        zhili_store::events::conformance_retention(&FjallEventLog::open(dir.path()).unwrap()).await;
    }

    #[tokio::test]
    async fn scavenging_reclaims_what_retention_hides() {
        let dir = tempfile::tempdir().unwrap();
        let log = FjallEventLog::open(dir.path()).unwrap();
        for i in 0..10 {
            log.append("order-1", ExpectedRevision::Any, vec![ev(&format!("e{i}"))]).await.unwrap();
        }
        log.set_retention("order-1", Retention { max_count: Some(3), ..Retention::default() }).await.unwrap();
        let (tx, rx) = oneshot::channel();
        log.requests.send(Request::Scavenge).unwrap();
        // A delete after it in the queue: when it answers, the scavenge is done.
        log.requests.send(Request::Delete { stream: "none".into(), expected: ExpectedRevision::Any, reply: tx }).unwrap();
        let _ = rx.await;
        assert_eq!(log.shared.log.iter().count(), 3, "only the kept events remain on disk");
        assert_eq!(log.read_stream("order-1", 0, Direction::Forwards, 10).unwrap().len(), 3);
        assert_eq!(log.read_all(0, Direction::Forwards, 10).unwrap().len(), 3);
        assert_eq!(log.read_category("order", 0, Direction::Forwards, 10).unwrap().len(), 3, "categories skip what is gone");
        // The ids of scavenged events are forgotten: the same id appends anew.
        assert!(!log.append("order-1", ExpectedRevision::Any, vec![ev("e0")]).await.unwrap().duplicate);
    }

    #[tokio::test]
    async fn unique_appends_skip_the_id_index() {
        let dir = tempfile::tempdir().unwrap();
        let log = FjallEventLog::open(dir.path()).unwrap();
        let first = log.append_unique("$feed", vec![ev("u0"), ev("u1")]).await.unwrap();
        assert_eq!((first.first_revision, first.last_revision, first.duplicate), (0, 1, false));
        assert_eq!(log.shared.ids.iter().count(), 0, "no id index entries");
        // Mixed with ordinary appends on the same stream: revisions and positions continue.
        let plain = log.append("$feed", ExpectedRevision::Exact(1), vec![ev("p")]).await.unwrap();
        assert_eq!((plain.first_revision, plain.first_position), (2, 2));
        assert_eq!(log.shared.ids.iter().count(), 1);
        let next = log.append_unique("$feed", vec![ev("u2")]).await.unwrap();
        assert_eq!((next.first_revision, next.first_position, next.duplicate), (3, 3, false));
        let ids: Vec<String> = log.read_stream("$feed", 0, Direction::Forwards, 10).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["u0", "u1", "p", "u2"]);
        assert!(log.append_unique("$feed", vec![]).await.is_err(), "an append needs an event");
    }

    #[tokio::test]
    async fn reopen_recovers_and_cuts_a_corrupt_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = FjallEventLog::open(dir.path()).unwrap();
            for i in 0..5 {
                log.append("s", ExpectedRevision::Any, vec![ev(&format!("e{i}"))]).await.unwrap();
            }
            // Damage the last record the way a torn write would (its checksum no longer holds).
            let mut bad = log.shared.log.get(4u64.to_be_bytes()).unwrap().unwrap().to_vec();
            if let Some(b) = bad.last_mut() {
                *b ^= 0xff;
            }
            log.shared.log.insert(4u64.to_be_bytes(), bad).unwrap();
            log.shared.db.persist(PersistMode::SyncData).unwrap();
            assert!(matches!(log.read_all(4, Direction::Forwards, 1), Err(EventLogError::Corrupt(_))), "never served");
        }
        let log = loop {
            match FjallEventLog::open(dir.path()) {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        assert_eq!(*log.head().borrow(), 4, "the damaged tail was cut");
        assert_eq!(log.read_all(0, Direction::Forwards, 10).unwrap().len(), 4);
        assert_eq!(log.stream_info("s").unwrap().unwrap().last_revision, Some(3), "the stream's head moved back with it");
        assert_eq!(log.read_stream("s", 0, Direction::Forwards, 10).unwrap().len(), 4);
        let next = log.append("t", ExpectedRevision::Any, vec![ev("n")]).await.unwrap();
        assert_eq!(next.first_position, 4, "positions continue from the cut");
    }
}

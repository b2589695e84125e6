//! The embedded [`Store`] backend on fjall. One writer thread owns every mutation: it drains
//! queued transactions, applies them to one fjall batch, fsyncs once (group commit), and only then
//! acknowledges them, so an acknowledged write survives kill -9. Reads go straight to fjall.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;
use tokio::sync::{broadcast, oneshot, watch};
pub mod events;

pub use events::FjallEventLog;
use zhili_store::{Compare, EventKind, KeyValue, LeaseId, Op, RevisionClock, Store, StoreError, Txn, TxnResponse, WatchEvent, Watcher};

/// How many past events a watcher can resume from; older requests get `Compacted`.
const HISTORY_LEN: usize = 16_384;
/// How many queued requests one group commit may take; bounds the latency of the first in line.
const MAX_GROUP: usize = 1024;
/// Requests waiting for the writer; when full, writers wait (backpressure, never drop).
const QUEUE_LEN: usize = 8192;
const LIVE_EVENTS: usize = 8192;
const HEADER_LEN: usize = 32;
const REVISION_KEY: &str = "revision";
const LEASE_SWEEP: Duration = Duration::from_millis(200);

pub struct FjallStore {
    shared: Arc<Shared>,
    requests: mpsc::SyncSender<Request>,
}

struct Shared {
    db: Database,
    kv: Keyspace,
    meta: Keyspace,
    leases: Keyspace,
    /// (lease id, key) pairs so attached keys are found without scanning the whole keyspace.
    lease_keys: Keyspace,
    clock: Arc<RevisionClock>,
    committed: watch::Sender<u64>,
    history: Mutex<History>,
    /// Lease deadlines and attached keys. Membership is changed only by the writer thread.
    lease_table: Mutex<HashMap<LeaseId, LeaseState>>,
    /// Set after an engine failure: in-memory state may be ahead of disk, so stop writing.
    failed: AtomicBool,
    closed: AtomicBool,
}

struct History {
    events: VecDeque<Arc<WatchEvent>>,
    /// Events at or below this revision are no longer retained.
    compacted_through: u64,
    live: broadcast::Sender<Arc<WatchEvent>>,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

enum Request {
    Txn(Txn, oneshot::Sender<Result<TxnResponse, StoreError>>),
    Grant(Duration, oneshot::Sender<Result<LeaseId, StoreError>>),
    Revoke(LeaseId, Option<oneshot::Sender<Result<(), StoreError>>>),
}

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl FjallStore {
    /// Opens (or creates) the store in `dir` and recovers its revision and leases.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(engine)?;
        let db = Database::builder(dir).open().map_err(engine)?;
        let kv = db.keyspace("kv", KeyspaceCreateOptions::default).map_err(engine)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).map_err(engine)?;
        let leases = db.keyspace("leases", KeyspaceCreateOptions::default).map_err(engine)?;
        let lease_keys = db.keyspace("lease_keys", KeyspaceCreateOptions::default).map_err(engine)?;
        let revision = match meta.get(REVISION_KEY).map_err(engine)? {
            Some(v) => u64_at(&v, 0).ok_or_else(|| StoreError::Corrupt("revision record".into()))?,
            None => 0,
        };
        let now = Instant::now();
        let mut table: HashMap<LeaseId, LeaseState> = HashMap::new();
        for item in leases.iter() {
            let (k, v) = item.into_inner().map_err(engine)?;
            let id = u64_at(&k, 0).ok_or_else(|| StoreError::Corrupt("lease key".into()))?;
            let ttl = Duration::from_millis(u64_at(&v, 0).ok_or_else(|| StoreError::Corrupt("lease ttl".into()))?);
            // As etcd does, a recovered lease gets a fresh TTL: its holder may still be alive.
            table.insert(id, LeaseState { ttl, deadline: now + ttl, keys: HashSet::new() });
        }
        for item in lease_keys.iter() {
            let k = item.key().map_err(engine)?;
            let id = u64_at(&k, 0).ok_or_else(|| StoreError::Corrupt("lease key index".into()))?;
            let key = k.get(8..).and_then(|b| String::from_utf8(b.to_vec()).ok()).ok_or_else(|| StoreError::Corrupt("lease key index".into()))?;
            if let Some(l) = table.get_mut(&id) {
                l.keys.insert(key);
            }
        }
        let clock = Arc::new(RevisionClock::new(revision));
        let (committed, _) = watch::channel(revision);
        let (live, _) = broadcast::channel(LIVE_EVENTS);
        let shared = Arc::new(Shared {
            db,
            kv,
            meta,
            leases,
            lease_keys,
            clock,
            committed,
            history: Mutex::new(History { events: VecDeque::new(), compacted_through: revision, live }),
            lease_table: Mutex::new(table),
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let (requests, rx) = mpsc::sync_channel(QUEUE_LEN);
        let writer_shared = shared.clone();
        std::thread::Builder::new().name("zhili-store-writer".into()).spawn(move || writer_loop(&writer_shared, rx)).map_err(engine)?;
        let sweeper_shared = Arc::downgrade(&shared);
        let sweeper_tx = requests.clone();
        std::thread::Builder::new()
            .name("zhili-lease-sweeper".into())
            .spawn(move || loop {
                std::thread::sleep(LEASE_SWEEP);
                let Some(shared) = sweeper_shared.upgrade() else { return };
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                let now = Instant::now();
                let expired: Vec<LeaseId> = shared.lease_table.lock().iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
                drop(shared);
                for id in expired {
                    if sweeper_tx.send(Request::Revoke(id, None)).is_err() {
                        return;
                    }
                }
            })
            .map_err(engine)?;
        Ok(Self { shared, requests })
    }

    /// Number of live keys (a full scan; for diagnostics and tests).
    pub fn len(&self) -> usize {
        self.shared.kv.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.kv.first_key_value().is_none()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        enqueue(&self.requests, make(tx)).await.map_err(|()| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// A writer thread's next group: waits for one request, then takes what else is already queued,
/// up to `max` (group commit). None once every sender is gone.
pub(crate) fn next_group<R>(rx: &mpsc::Receiver<R>, max: usize) -> Option<Vec<R>> {
    let mut reqs = vec![rx.recv().ok()?];
    while reqs.len() < max {
        match rx.try_recv() {
            Ok(r) => reqs.push(r),
            Err(_) => break,
        }
    }
    Some(reqs)
}

/// Queues `req` for a writer thread. The queue is bounded: when it is full the caller waits
/// for room (backpressure) rather than dropping the write. Fails when the writer is gone.
pub(crate) async fn enqueue<R: Send + 'static>(sender: &mpsc::SyncSender<R>, req: R) -> Result<(), ()> {
    match sender.try_send(req) {
        Ok(()) => Ok(()),
        Err(mpsc::TrySendError::Full(req)) => {
            let sender = sender.clone();
            tokio::task::spawn_blocking(move || sender.send(req)).await.map_err(|_| ())?.map_err(|_| ())
        }
        Err(mpsc::TrySendError::Disconnected(_)) => Err(()),
    }
}

impl Drop for FjallStore {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

#[async_trait]
impl Store for FjallStore {
    fn clock(&self) -> Arc<RevisionClock> {
        self.shared.clock.clone()
    }

    fn revision(&self) -> u64 {
        *self.shared.committed.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self.shared.kv.get(key).map_err(engine)? {
            Some(v) => decode(key.to_string(), &v).map(Some),
            None => Ok(None),
        }
    }

    fn range(&self, prefix: &str, limit: Option<usize>) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for item in self.shared.kv.prefix(prefix).take(limit.unwrap_or(usize::MAX)) {
            let (k, v) = item.into_inner().map_err(engine)?;
            let key = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))?;
            out.push(decode(key, &v)?);
        }
        Ok(out)
    }

    fn range_after(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        use std::ops::Bound;
        let start: Bound<Vec<u8>> = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.as_bytes().to_vec()),
            _ => Bound::Included(prefix.as_bytes().to_vec()),
        };
        let mut out = Vec::new();
        for item in self.shared.kv.range((start, Bound::Unbounded)) {
            let (k, v) = item.into_inner().map_err(engine)?;
            if !k.starts_with(prefix.as_bytes()) || out.len() == limit {
                break;
            }
            let key = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))?;
            out.push(decode(key, &v)?);
        }
        Ok(out)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call(|tx| Request::Txn(txn, tx)).await
    }

    fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watcher, StoreError> {
        let history = self.shared.history.lock();
        let after = if from_revision == 0 { self.revision() } else { from_revision - 1 };
        if after < history.compacted_through {
            return Err(StoreError::Compacted { requested: from_revision, oldest: history.compacted_through + 1 });
        }
        let backlog = history.events.iter().filter(|e| e.revision > after).cloned().collect();
        // Subscribing under the history lock means no event falls between backlog and live.
        let live = history.live.subscribe();
        Ok(Watcher::new(prefix.to_string(), backlog, live, after))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.call(|tx| Request::Grant(ttl, tx)).await
    }

    fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let mut table = self.shared.lease_table.lock();
        let lease = table.get_mut(&id).ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = Instant::now() + lease.ttl;
        Ok(lease.ttl)
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(|tx| Request::Revoke(id, Some(tx))).await
    }
}

/// What one group commit accumulates before it is made durable.
struct Group<'a> {
    shared: &'a Shared,
    batch: fjall::OwnedWriteBatch,
    /// Writes earlier in this group, visible to later transactions' compares.
    overlay: HashMap<String, Option<KeyValue>>,
    events: Vec<Arc<WatchEvent>>,
    last_revision: Option<u64>,
    lease_ops: Vec<LeaseOp>,
}

/// Lease table changes, applied to memory only after the group is durable.
enum LeaseOp {
    Grant(LeaseId, Duration),
    Revoke(LeaseId),
    Attach(LeaseId, String),
    Detach(LeaseId, String),
}

enum Reply {
    Txn(oneshot::Sender<Result<TxnResponse, StoreError>>, Result<TxnResponse, StoreError>),
    Grant(oneshot::Sender<Result<LeaseId, StoreError>>, Result<LeaseId, StoreError>),
    Revoke(Option<oneshot::Sender<Result<(), StoreError>>>, Result<(), StoreError>),
}

fn writer_loop(shared: &Shared, rx: mpsc::Receiver<Request>) {
    while let Some(reqs) = next_group(&rx, MAX_GROUP) {
        let mut group = Group { shared, batch: shared.db.batch(), overlay: HashMap::new(), events: Vec::new(), last_revision: None, lease_ops: Vec::new() };
        let failed = shared.failed.load(Ordering::Acquire);
        let mut replies = Vec::with_capacity(reqs.len());
        for req in reqs {
            replies.push(match req {
                Request::Txn(t, tx) => Reply::Txn(tx, if failed { Err(engine("store failed earlier")) } else { group.apply_txn(t) }),
                Request::Grant(ttl, tx) => Reply::Grant(tx, if failed { Err(engine("store failed earlier")) } else { Ok(group.grant(ttl)) }),
                Request::Revoke(id, tx) => Reply::Revoke(tx, if failed { Err(engine("store failed earlier")) } else { group.revoke(id) }),
            });
        }
        let outcome = group.commit();
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "store commit failed; refusing further writes");
            shared.failed.store(true, Ordering::Release);
        }
        for reply in replies {
            match reply {
                Reply::Txn(tx, r) => answer(tx, &outcome, r),
                Reply::Grant(tx, r) => answer(tx, &outcome, r),
                Reply::Revoke(Some(tx), r) => answer(tx, &outcome, r),
                Reply::Revoke(None, _) => {}
            }
        }
    }
}

/// Acknowledges one request: its own result if the group became durable, else the commit error.
fn answer<T>(tx: oneshot::Sender<Result<T, StoreError>>, outcome: &Result<(), StoreError>, result: Result<T, StoreError>) {
    let _ = tx.send(match outcome {
        Ok(()) => result,
        Err(e) => Err(engine(e)),
    });
}

impl Group<'_> {
    fn lookup(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        match self.shared.kv.get(key).map_err(engine)? {
            Some(v) => decode(key.to_string(), &v).map(Some),
            None => Ok(None),
        }
    }

    fn lease_exists(&self, id: LeaseId) -> bool {
        let mut alive = self.shared.lease_table.lock().contains_key(&id);
        for op in &self.lease_ops {
            match op {
                LeaseOp::Grant(g, _) if *g == id => alive = true,
                LeaseOp::Revoke(r) if *r == id => alive = false,
                _ => {}
            }
        }
        alive
    }

    fn next_revision(&mut self) -> u64 {
        let rev = self.shared.clock.next();
        self.last_revision = Some(rev);
        rev
    }

    fn apply_txn(&mut self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut ok = true;
        for c in &txn.compares {
            let holds = match c {
                Compare::ModRevision(k, rev) => self.lookup(k)?.map_or(0, |kv| kv.mod_revision) == *rev,
                Compare::Exists(k) => self.lookup(k)?.is_some(),
                Compare::Missing(k) => self.lookup(k)?.is_none(),
                Compare::Value(k, v) => self.lookup(k)?.is_some_and(|kv| kv.value == *v),
            };
            if !holds {
                ok = false;
                break;
            }
        }
        let ops = if ok { txn.success } else { txn.failure };
        // Validate every op before writing any, so a failed transaction writes nothing.
        for op in &ops {
            if let Op::Put { lease: Some(id), .. } = op {
                if !self.lease_exists(*id) {
                    return Err(StoreError::LeaseNotFound(*id));
                }
            }
        }
        if ops.is_empty() {
            return Ok(TxnResponse { succeeded: ok, revision: self.last_revision.unwrap_or(*self.shared.committed.borrow()), deleted: vec![] });
        }
        let rev = self.next_revision();
        let mut deleted = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let prev = self.lookup(&key)?;
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease,
                    };
                    let prev_lease = prev.and_then(|p| p.lease);
                    if prev_lease != lease {
                        if let Some(old) = prev_lease {
                            self.batch.remove(&self.shared.lease_keys, lease_key(old, &key));
                            self.lease_ops.push(LeaseOp::Detach(old, key.clone()));
                        }
                        if let Some(new) = lease {
                            self.batch.insert(&self.shared.lease_keys, lease_key(new, &key), b"".as_slice());
                            self.lease_ops.push(LeaseOp::Attach(new, key.clone()));
                        }
                    }
                    self.batch.insert(&self.shared.kv, key.as_bytes(), encode(&kv));
                    self.events.push(Arc::new(WatchEvent { revision: rev, kind: EventKind::Put, kv: kv.clone() }));
                    self.overlay.insert(key, Some(kv));
                }
                Op::Delete { key } => {
                    if let Some(prev) = self.lookup(&key)? {
                        self.delete_existing(prev, rev, &mut deleted);
                    }
                }
                Op::DeletePrefix { prefix } => {
                    let mut keys: Vec<String> = Vec::new();
                    for item in self.shared.kv.prefix(&prefix) {
                        let k = item.key().map_err(engine)?;
                        keys.push(String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("non-UTF-8 key".into()))?);
                    }
                    keys.extend(self.overlay.keys().filter(|k| k.starts_with(&prefix)).cloned());
                    keys.sort();
                    keys.dedup();
                    for key in keys {
                        if let Some(prev) = self.lookup(&key)? {
                            self.delete_existing(prev, rev, &mut deleted);
                        }
                    }
                }
            }
        }
        Ok(TxnResponse { succeeded: ok, revision: rev, deleted })
    }

    fn delete_existing(&mut self, prev: KeyValue, rev: u64, deleted: &mut Vec<KeyValue>) {
        self.batch.remove(&self.shared.kv, prev.key.as_bytes());
        if let Some(l) = prev.lease {
            self.batch.remove(&self.shared.lease_keys, lease_key(l, &prev.key));
            self.lease_ops.push(LeaseOp::Detach(l, prev.key.clone()));
        }
        let mut gone = prev.clone();
        gone.mod_revision = rev;
        self.events.push(Arc::new(WatchEvent { revision: rev, kind: EventKind::Delete, kv: gone }));
        self.overlay.insert(prev.key.clone(), None);
        deleted.push(prev);
    }

    fn grant(&mut self, ttl: Duration) -> LeaseId {
        let id = loop {
            let candidate = rand_id();
            if !self.lease_exists(candidate) {
                break candidate;
            }
        };
        self.batch.insert(&self.shared.leases, id.to_be_bytes(), (ttl.as_millis() as u64).to_be_bytes());
        self.lease_ops.push(LeaseOp::Grant(id, ttl));
        self.next_revision();
        id
    }

    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        if !self.lease_exists(id) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let mut keys: Vec<String> = self.shared.lease_table.lock().get(&id).map(|l| l.keys.iter().cloned().collect()).unwrap_or_default();
        for op in &self.lease_ops {
            if let LeaseOp::Attach(l, k) = op {
                if *l == id {
                    keys.push(k.clone());
                }
            }
        }
        keys.sort();
        keys.dedup();
        let rev = self.next_revision();
        let mut deleted = Vec::new();
        for key in keys {
            if let Some(prev) = self.lookup(&key)? {
                if prev.lease == Some(id) {
                    self.delete_existing(prev, rev, &mut deleted);
                }
            }
        }
        self.batch.remove(&self.shared.leases, id.to_be_bytes());
        self.lease_ops.push(LeaseOp::Revoke(id));
        Ok(())
    }

    /// Makes the group durable, then publishes it: memory, history, watchers, committed revision.
    fn commit(self) -> Result<(), StoreError> {
        let Some(rev) = self.last_revision else { return Ok(()) };
        let mut batch = self.batch;
        batch.insert(&self.shared.meta, REVISION_KEY, rev.to_be_bytes());
        batch.commit().map_err(engine)?;
        self.shared.db.persist(PersistMode::SyncData).map_err(engine)?;
        {
            let mut table = self.shared.lease_table.lock();
            let now = Instant::now();
            for op in self.lease_ops {
                match op {
                    LeaseOp::Grant(id, ttl) => {
                        table.insert(id, LeaseState { ttl, deadline: now + ttl, keys: HashSet::new() });
                    }
                    LeaseOp::Revoke(id) => {
                        table.remove(&id);
                    }
                    LeaseOp::Attach(id, k) => {
                        if let Some(l) = table.get_mut(&id) {
                            l.keys.insert(k);
                        }
                    }
                    LeaseOp::Detach(id, k) => {
                        if let Some(l) = table.get_mut(&id) {
                            l.keys.remove(&k);
                        }
                    }
                }
            }
        }
        {
            let mut history = self.shared.history.lock();
            for ev in self.events {
                if history.events.len() == HISTORY_LEN {
                    if let Some(old) = history.events.pop_front() {
                        history.compacted_through = old.revision;
                    }
                }
                history.events.push_back(ev.clone());
                let _ = history.live.send(ev);
            }
        }
        self.shared.committed.send_replace(rev);
        Ok(())
    }
}

fn rand_id() -> LeaseId {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; good enough for unguessable-enough lease ids.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 1).max(1)
}

fn lease_key(id: LeaseId, key: &str) -> Vec<u8> {
    let mut k = id.to_be_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + kv.value.len());
    v.extend_from_slice(&kv.create_revision.to_be_bytes());
    v.extend_from_slice(&kv.mod_revision.to_be_bytes());
    v.extend_from_slice(&kv.version.to_be_bytes());
    v.extend_from_slice(&kv.lease.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&kv.value);
    v
}

fn decode(key: String, v: &[u8]) -> Result<KeyValue, StoreError> {
    let bad = || StoreError::Corrupt(format!("record of key {key:?}"));
    if v.len() < HEADER_LEN {
        return Err(bad());
    }
    let lease = u64_at(v, 24).ok_or_else(bad)?;
    Ok(KeyValue {
        create_revision: u64_at(v, 0).ok_or_else(bad)?,
        mod_revision: u64_at(v, 8).ok_or_else(bad)?,
        version: u64_at(v, 16).ok_or_else(bad)?,
        lease: (lease != 0).then_some(lease),
        value: Bytes::copy_from_slice(v.get(HEADER_LEN..).ok_or_else(bad)?),
        key,
    })
}

#[cfg(test)]
mod tests;

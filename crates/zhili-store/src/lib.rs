//! Storage contracts, shaped like etcd's model: revisioned keys, prefix ranges, compare-and-swap
//! transactions, watches from a revision, and leases. Backends live in sibling leaf crates
//! (zhili-store-fjall today); nothing above this level knows which one runs.

pub mod events;
pub mod memory;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, watch};

pub type LeaseId = u64;

/// One global, monotonic index. The store assigns revisions from it, and in-memory domains (the
/// registry's ephemeral instances) draw from it too, so every change in the process is ordered
/// on a single axis that clients can block on.
#[derive(Debug, Default)]
pub struct RevisionClock {
    last: AtomicU64,
}

impl RevisionClock {
    pub fn new(start: u64) -> Self {
        Self { last: AtomicU64::new(start) }
    }

    /// Takes the next revision.
    pub fn next(&self) -> u64 {
        self.last.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn current(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// Makes sure later revisions are above `rev` (used when recovering state from disk).
    pub fn observe(&self, rev: u64) {
        self.last.fetch_max(rev, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: u64,
    pub mod_revision: u64,
    /// Number of writes since creation (1 after the first put).
    pub version: u64,
    pub lease: Option<LeaseId>,
}

/// A condition a transaction checks before it applies its success branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod revision equals this; 0 means "the key must not exist".
    ModRevision(String, u64),
    Exists(String),
    Missing(String),
    Value(String, Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Bytes, lease: Option<LeaseId> },
    Delete { key: String },
    DeletePrefix { prefix: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self { success: vec![Op::Put { key: key.into(), value: value.into(), lease: None }], ..Default::default() }
    }

    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The store's revision after the transaction (unchanged if nothing was written).
    pub revision: u64,
    /// Keys removed by the applied branch, with their last values.
    pub deleted: Vec<KeyValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub revision: u64,
    pub kind: EventKind,
    /// For a delete: the key with its last value and `mod_revision` set to the delete's revision.
    pub kv: KeyValue,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine failed: {0}")]
    Engine(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} is compacted; oldest available is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
    #[error("the store is shutting down")]
    Closed,
}

/// The storage contract. Reads are synchronous (served from the engine's memory structures);
/// writes are asynchronous and return only once durable.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The clock revisions come from; shared with in-memory domains.
    fn clock(&self) -> Arc<RevisionClock>;
    /// The last revision this store committed durably.
    fn revision(&self) -> u64;
    /// Ticks with the store's committed revision after every durable write.
    fn subscribe(&self) -> watch::Receiver<u64>;
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Keys starting with `prefix`, in key order, at most `limit` of them.
    fn range(&self, prefix: &str, limit: Option<usize>) -> Result<Vec<KeyValue>, StoreError>;
    /// Keys starting with `prefix` and after `after` (all of them when None), in key order, at
    /// most `limit`: a page of a listing, read without touching the keys before it.
    fn range_after(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyValue>, StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;
    /// Events under `prefix` with revision ≥ `from_revision` (0 = from now on).
    fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watcher, StoreError>;
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews a lease; returns its TTL.
    fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError>;
    /// Revokes a lease, deleting every key attached to it.
    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError>;
}

/// Convenience writes on top of [`Store::txn`].
pub async fn put(store: &dyn Store, key: &str, value: impl Into<Bytes>) -> Result<u64, StoreError> {
    Ok(store.txn(Txn::put(key, value)).await?.revision)
}

/// Blocks until the key `key` (exact) or anything under it (`prefix`) changes after `index`, or
/// `wait` passes: the blocking read of every API. Uses the store's watch history, so unrelated
/// writes do not wake the reader; an index of 0 or ahead of the store answers at once.
pub async fn wait_for_change(store: &dyn Store, key: &str, prefix: bool, index: u64, wait: Duration) {
    if index == 0 || index > store.revision() {
        return;
    }
    let Ok(mut watcher) = store.watch(key, index + 1) else { return };
    let _ = tokio::time::timeout(wait, async {
        loop {
            match watcher.next().await {
                Ok(ev) if prefix || ev.kv.key == key => return,
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    })
    .await;
}

pub async fn delete(store: &dyn Store, key: &str) -> Result<TxnResponse, StoreError> {
    store.txn(Txn { success: vec![Op::Delete { key: key.into() }], ..Default::default() }).await
}

/// A stream of watch events: first the retained history from the requested revision, then live ones.
pub struct Watcher {
    prefix: String,
    backlog: VecDeque<Arc<WatchEvent>>,
    live: broadcast::Receiver<Arc<WatchEvent>>,
    after: u64,
}

impl Watcher {
    pub fn new(prefix: String, backlog: VecDeque<Arc<WatchEvent>>, live: broadcast::Receiver<Arc<WatchEvent>>, after: u64) -> Self {
        Self { prefix, backlog, live, after }
    }

    /// The next event under the prefix. Fails with `Compacted` if this watcher fell so far behind
    /// that events were dropped; the caller should re-read and watch again.
    pub async fn next(&mut self) -> Result<Arc<WatchEvent>, StoreError> {
        loop {
            let ev = match self.backlog.pop_front() {
                Some(ev) => ev,
                None => match self.live.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Err(StoreError::Compacted { requested: self.after + 1, oldest: 0 });
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
                },
            };
            // Backlog and live never overlap (the backend subscribes under its history lock), and
            // one transaction's events share a revision, so only the prefix filters here.
            if !ev.kv.key.starts_with(&self.prefix) {
                continue;
            }
            self.after = ev.revision;
            return Ok(ev);
        }
    }
}

/// What every [`Store`] must do with [`Store::range_after`]: pages in key order, within the
/// prefix, starting after the given key. Run by each backend's tests.
pub async fn range_after_conformance(store: &dyn Store) {
    for k in ["p/a", "p/b", "p/c", "p0", "o/x", "q/z"] {
        put(store, k, "v").await.expect("put");
    }
    let keys = |after: Option<&str>, limit: usize| -> Vec<String> {
        store.range_after("p/", after, limit).expect("range_after").into_iter().map(|kv| kv.key).collect()
    };
    assert_eq!(keys(None, 10), ["p/a", "p/b", "p/c"]);
    assert_eq!(keys(None, 2), ["p/a", "p/b"]);
    assert_eq!(keys(Some("p/b"), 10), ["p/c"]);
    assert_eq!(keys(Some("p/aa"), 1), ["p/b"]);
    assert_eq!(keys(Some("p/c"), 10), Vec::<String>::new());
    assert_eq!(keys(Some("a"), 10), ["p/a", "p/b", "p/c"], "an `after` before the prefix starts at the prefix");
    assert_eq!(keys(Some("z"), 10), Vec::<String>::new());
}

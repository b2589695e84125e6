//! An in-memory [`Store`] with the same semantics as the embedded backend (revisions, prefix
//! ranges, CAS transactions, watches with history, leases that expire), minus durability. Unit
//! tests of the domain crates run on it, so none of them needs a storage engine or a temp dir.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::{Compare, EventKind, KeyValue, LeaseId, Op, RevisionClock, Store, StoreError, Txn, TxnResponse, WatchEvent, Watcher};

/// Events kept for watches that start in the past.
const HISTORY_LEN: usize = 16_384;
const LIVE_EVENTS: usize = 8192;
/// How often expired leases are revoked (tokio time, so paused-time tests control it).
const LEASE_SWEEP: Duration = Duration::from_millis(100);

pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    clock: Arc<RevisionClock>,
    committed: watch::Sender<u64>,
}

struct Inner {
    keys: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: VecDeque<Arc<WatchEvent>>,
    compacted_through: u64,
    live: broadcast::Sender<Arc<WatchEvent>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store. Inside a tokio runtime it also starts the task that expires leases (it
    /// ends with the store).
    pub fn new() -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            keys: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            history: VecDeque::new(),
            compacted_through: 0,
            live: broadcast::channel(LIVE_EVENTS).0,
        }));
        let store = Self { inner, clock: Arc::new(RevisionClock::default()), committed: watch::Sender::new(0) };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(expire_leases(Arc::downgrade(&store.inner), store.clock.clone(), store.committed.clone()));
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn expire_leases(inner: Weak<Mutex<Inner>>, clock: Arc<RevisionClock>, committed: watch::Sender<u64>) {
    let mut tick = tokio::time::interval(LEASE_SWEEP);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let expired: Vec<LeaseId> = g.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let rev = clock.next();
            g.revoke(id, rev);
            committed.send_replace(rev);
        }
    }
}

impl Inner {
    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision(k, rev) => self.keys.get(k).map_or(0, |kv| kv.mod_revision) == *rev,
            Compare::Exists(k) => self.keys.contains_key(k),
            Compare::Missing(k) => !self.keys.contains_key(k),
            Compare::Value(k, v) => self.keys.get(k).is_some_and(|kv| kv.value == *v),
        }
    }

    fn publish(&mut self, ev: WatchEvent) {
        let ev = Arc::new(ev);
        if self.history.len() == HISTORY_LEN {
            if let Some(old) = self.history.pop_front() {
                self.compacted_through = old.revision;
            }
        }
        self.history.push_back(ev.clone());
        let _ = self.live.send(ev);
    }

    fn put(&mut self, key: String, value: bytes::Bytes, lease: Option<LeaseId>, rev: u64) {
        let prev = self.keys.get(&key);
        let kv = KeyValue {
            key: key.clone(),
            value,
            create_revision: prev.map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.map_or(1, |p| p.version + 1),
            lease,
        };
        if let Some(old) = prev.and_then(|p| p.lease).filter(|old| Some(*old) != lease) {
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.remove(&key);
            }
        }
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.clone());
        }
        self.keys.insert(key, kv.clone());
        self.publish(WatchEvent { revision: rev, kind: EventKind::Put, kv });
    }

    fn delete(&mut self, key: &str, rev: u64, deleted: &mut Vec<KeyValue>) {
        let Some(prev) = self.keys.remove(key) else { return };
        if let Some(l) = prev.lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.remove(key);
        }
        let mut gone = prev.clone();
        gone.mod_revision = rev;
        self.publish(WatchEvent { revision: rev, kind: EventKind::Delete, kv: gone });
        deleted.push(prev);
    }

    fn revoke(&mut self, id: LeaseId, rev: u64) {
        let Some(lease) = self.leases.remove(&id) else { return };
        let mut keys: Vec<String> = lease.keys.into_iter().collect();
        keys.sort();
        let mut deleted = Vec::new();
        for key in keys {
            self.delete(&key, rev, &mut deleted);
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn clock(&self) -> Arc<RevisionClock> {
        self.clock.clone()
    }

    fn revision(&self) -> u64 {
        *self.committed.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().keys.get(key).cloned())
    }

    fn range(&self, prefix: &str, limit: Option<usize>) -> Result<Vec<KeyValue>, StoreError> {
        let g = self.lock();
        let under = g.keys.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix));
        Ok(under.take(limit.unwrap_or(usize::MAX)).map(|(_, v)| v.clone()).collect())
    }

    fn range_after(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        use std::ops::Bound;
        let g = self.lock();
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let under = g.keys.range((start, Bound::Unbounded)).take_while(|(k, _)| k.starts_with(prefix));
        Ok(under.take(limit).map(|(_, v)| v.clone()).collect())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut g = self.lock();
        let ok = txn.compares.iter().all(|c| g.holds(c));
        let ops = if ok { txn.success } else { txn.failure };
        // Checked before anything is written, so a refused transaction writes nothing.
        for op in &ops {
            if let Op::Put { lease: Some(id), .. } = op {
                if !g.leases.contains_key(id) {
                    return Err(StoreError::LeaseNotFound(*id));
                }
            }
        }
        if ops.is_empty() {
            return Ok(TxnResponse { succeeded: ok, revision: self.revision(), deleted: vec![] });
        }
        let rev = self.clock.next();
        let mut deleted = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => g.put(key, value, lease, rev),
                Op::Delete { key } => g.delete(&key, rev, &mut deleted),
                Op::DeletePrefix { prefix } => {
                    let keys: Vec<String> = g.keys.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(k, _)| k.clone()).collect();
                    for key in keys {
                        g.delete(&key, rev, &mut deleted);
                    }
                }
            }
        }
        drop(g);
        self.committed.send_replace(rev);
        Ok(TxnResponse { succeeded: ok, revision: rev, deleted })
    }

    fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watcher, StoreError> {
        let g = self.lock();
        let after = if from_revision == 0 { self.revision() } else { from_revision - 1 };
        if after < g.compacted_through {
            return Err(StoreError::Compacted { requested: from_revision, oldest: g.compacted_through + 1 });
        }
        let backlog = g.history.iter().filter(|e| e.revision > after).cloned().collect();
        // Subscribing under the lock means no event falls between backlog and live.
        Ok(Watcher::new(prefix.to_string(), backlog, g.live.subscribe(), after))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut g = self.lock();
        let id = g.next_lease;
        g.next_lease += 1;
        g.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: HashSet::new() });
        let rev = self.clock.next();
        drop(g);
        self.committed.send_replace(rev);
        Ok(id)
    }

    fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let mut g = self.lock();
        let lease = g.leases.get_mut(&id).ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = Instant::now() + lease.ttl;
        Ok(lease.ttl)
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut g = self.lock();
        if !g.leases.contains_key(&id) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let rev = self.clock.next();
        g.revoke(id, rev);
        drop(g);
        self.committed.send_replace(rev);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn revisions_ranges_and_cas() {
        let s = MemoryStore::new();
        let r1 = crate::put(&s, "a/1", "x").await.unwrap();
        let r2 = crate::put(&s, "a/2", "y").await.unwrap();
        crate::put(&s, "b", "z").await.unwrap();
        assert!(r2 > r1);
        assert_eq!(s.range("a/", None).unwrap().iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["a/1", "a/2"]);
        assert_eq!(s.range("a/", Some(1)).unwrap().len(), 1);
        let kv = s.get("a/1").unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (r1, r1, 1));
        // A stale CAS applies the failure branch (empty): nothing written, same revision.
        let before = s.revision();
        let t = s.txn(Txn::put("a/1", "no").when(Compare::ModRevision("a/1".into(), r1 + 100))).await.unwrap();
        assert!(!t.succeeded);
        assert_eq!((s.revision(), s.get("a/1").unwrap().unwrap().value), (before, Bytes::from("x")));
        let t = s.txn(Txn::put("a/1", "yes").when(Compare::ModRevision("a/1".into(), r1))).await.unwrap();
        assert!(t.succeeded);
        assert_eq!(s.get("a/1").unwrap().unwrap().version, 2);
        let t = s.txn(Txn { success: vec![Op::DeletePrefix { prefix: "a/".into() }], ..Default::default() }).await.unwrap();
        assert_eq!(t.deleted.len(), 2);
        assert!(s.range("a/", None).unwrap().is_empty());
    }

    #[tokio::test]
    async fn watches_replay_history_then_follow() {
        let s = MemoryStore::new();
        let r1 = crate::put(&s, "w/a", "1").await.unwrap();
        crate::put(&s, "other", "1").await.unwrap();
        let mut w = s.watch("w/", r1).unwrap();
        assert_eq!(w.next().await.unwrap().kv.key, "w/a", "history from the requested revision");
        crate::delete(&s, "w/a").await.unwrap();
        let ev = w.next().await.unwrap();
        assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "w/a"));
    }

    #[tokio::test]
    async fn range_after_pages_within_the_prefix() {
        crate::range_after_conformance(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn event_log_behaves_as_the_contract_says() {
        crate::events::conformance(&MemoryEventLog::new()).await;
        crate::events::conformance_retention(&MemoryEventLog::new()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_unless_kept_alive() {
        let s = MemoryStore::new();
        let lease = s.lease_grant(Duration::from_secs(10)).await.unwrap();
        s.txn(Txn { success: vec![Op::Put { key: "l".into(), value: Bytes::from("v"), lease: Some(lease) }], ..Default::default() }).await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(s.lease_keep_alive(lease).unwrap(), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(s.get("l").unwrap().is_some(), "kept alive");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(s.get("l").unwrap().is_none(), "expired with its lease");
        assert!(matches!(s.lease_keep_alive(lease), Err(StoreError::LeaseNotFound(_))));
        let missing = s.txn(Txn { success: vec![Op::Put { key: "m".into(), value: Bytes::new(), lease: Some(lease) }], ..Default::default() }).await;
        assert!(matches!(missing, Err(StoreError::LeaseNotFound(_))));
    }
}

/// An in-memory [`EventLog`](crate::events::EventLog) with the embedded log's semantics
/// (expected revisions, idempotent ids, categories, soft delete), minus durability.
#[derive(Default)]
pub struct MemoryEventLog {
    inner: Mutex<Log>,
    head: watch::Sender<u64>,
}

#[derive(Default)]
struct Log {
    all: Vec<crate::events::RecordedEvent>,
    /// Per stream: its info and the positions of its events by revision.
    streams: BTreeMap<String, (crate::events::StreamInfo, Vec<u64>)>,
    ids: HashMap<(String, String), (u64, u64)>,
    categories: HashMap<String, Vec<u64>>,
}

impl MemoryEventLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn page<T: Clone>(items: &[T], from: u64, direction: crate::events::Direction, limit: usize) -> Vec<(u64, T)> {
    let numbered = items.iter().cloned().enumerate().map(|(i, x)| (i as u64, x));
    match direction {
        crate::events::Direction::Forwards => numbered.skip_while(|(i, _)| *i < from).take(limit).collect(),
        crate::events::Direction::Backwards => numbered.rev().skip_while(|(i, _)| *i > from).take(limit).collect(),
    }
}

#[async_trait]
impl crate::events::EventLog for MemoryEventLog {
    async fn append(
        &self,
        stream: &str,
        expected: crate::events::ExpectedRevision,
        events: Vec<crate::events::NewEvent>,
    ) -> Result<crate::events::Appended, crate::events::EventLogError> {
        use crate::events::{Appended, EventLogError, RecordedEvent};
        let mut g = self.lock();
        let key = |id: &str| (stream.to_string(), id.to_string());
        if let Some(&(rev, pos)) = events.first().and_then(|e| g.ids.get(&key(&e.id))) {
            let all_there = events.iter().enumerate().all(|(i, e)| g.ids.get(&key(&e.id)) == Some(&(rev + i as u64, pos + i as u64)));
            if !all_there {
                return Err(EventLogError::PartialDuplicate(stream.to_string()));
            }
            let n = events.len() as u64 - 1;
            return Ok(Appended { first_revision: rev, last_revision: rev + n, first_position: pos, last_position: pos + n, duplicate: true });
        }
        if events.iter().any(|e| g.ids.contains_key(&key(&e.id))) {
            return Err(EventLogError::PartialDuplicate(stream.to_string()));
        }
        let (info, _) = g.streams.get(stream).cloned().unwrap_or_default();
        let visible = info.last_revision.filter(|_| !info.deleted);
        if !expected.holds(visible) {
            return Err(EventLogError::WrongExpectedRevision { expected: expected.to_string(), actual: visible });
        }
        let first_revision = info.last_revision.map_or(0, |r| r + 1);
        let first_position = g.all.len() as u64;
        let cat = crate::events::category(stream).map(str::to_string);
        for (i, e) in events.iter().enumerate() {
            let (revision, position) = (first_revision + i as u64, first_position + i as u64);
            g.all.push(RecordedEvent {
                stream: stream.to_string(),
                revision,
                position,
                id: e.id.clone(),
                body: e.body.clone(),
                appended_ms: crate::events::now_ms(),
            });
            g.ids.insert(key(&e.id), (revision, position));
            let entry = g.streams.entry(stream.to_string()).or_default();
            if entry.0.deleted {
                entry.0.deleted = false;
                entry.0.truncate_before = revision;
            }
            entry.0.last_revision = Some(revision);
            entry.1.resize(revision as usize, u64::MAX);
            entry.1.push(position);
            if let Some(c) = &cat {
                g.categories.entry(c.clone()).or_default().push(position);
            }
        }
        let next = g.all.len() as u64;
        drop(g);
        self.head.send_replace(next);
        let n = events.len() as u64 - 1;
        Ok(Appended { first_revision, last_revision: first_revision + n, first_position, last_position: first_position + n, duplicate: false })
    }

    fn read_stream(
        &self,
        stream: &str,
        from: u64,
        direction: crate::events::Direction,
        limit: usize,
    ) -> Result<Vec<crate::events::RecordedEvent>, crate::events::EventLogError> {
        let g = self.lock();
        let Some((info, positions)) = g.streams.get(stream).filter(|(i, _)| !i.deleted) else { return Ok(vec![]) };
        let (low, now) = (info.first_visible(), crate::events::now_ms());
        let visible = page(positions, from, direction, usize::MAX).into_iter().filter(|(r, _)| *r >= low);
        let events = visible.filter_map(|(_, p)| g.all.get(p as usize).cloned()).filter(|e| info.young_enough(e.appended_ms, now));
        Ok(events.take(limit).collect())
    }

    fn read_all(
        &self,
        from: u64,
        direction: crate::events::Direction,
        limit: usize,
    ) -> Result<Vec<crate::events::RecordedEvent>, crate::events::EventLogError> {
        Ok(page(&self.lock().all, from, direction, limit).into_iter().map(|(_, e)| e).collect())
    }

    fn read_category(
        &self,
        category: &str,
        from: u64,
        direction: crate::events::Direction,
        limit: usize,
    ) -> Result<Vec<(u64, crate::events::RecordedEvent)>, crate::events::EventLogError> {
        let g = self.lock();
        let positions = g.categories.get(category).map(Vec::as_slice).unwrap_or_default();
        Ok(page(positions, from, direction, limit).into_iter().filter_map(|(n, p)| Some((n, g.all.get(p as usize)?.clone()))).collect())
    }

    fn stream_info(&self, stream: &str) -> Result<Option<crate::events::StreamInfo>, crate::events::EventLogError> {
        Ok(self.lock().streams.get(stream).map(|(i, _)| *i))
    }

    fn list_streams(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, crate::events::StreamInfo)>, crate::events::EventLogError> {
        let g = self.lock();
        let names = g.streams.iter().filter(|(n, (i, _))| n.starts_with(prefix) && after.is_none_or(|a| n.as_str() > a) && !i.deleted);
        Ok(names.take(limit).map(|(n, (i, _))| (n.clone(), *i)).collect())
    }

    async fn delete_stream(&self, stream: &str, expected: crate::events::ExpectedRevision) -> Result<(), crate::events::EventLogError> {
        let mut g = self.lock();
        let Some((info, _)) = g.streams.get_mut(stream) else {
            return Err(crate::events::EventLogError::WrongExpectedRevision { expected: expected.to_string(), actual: None });
        };
        let visible = info.last_revision.filter(|_| !info.deleted);
        if visible.is_none() || !expected.holds(visible) {
            return Err(crate::events::EventLogError::WrongExpectedRevision { expected: expected.to_string(), actual: visible });
        }
        info.deleted = true;
        info.truncate_before = info.last_revision.map_or(0, |r| r + 1);
        Ok(())
    }

    async fn set_retention(&self, stream: &str, r: crate::events::Retention) -> Result<crate::events::StreamInfo, crate::events::EventLogError> {
        let mut g = self.lock();
        let (info, _) = g.streams.get_mut(stream).ok_or_else(|| crate::events::EventLogError::StreamNotFound(stream.to_string()))?;
        info.max_count = r.max_count;
        info.max_age_ms = r.max_age_ms;
        info.truncate_before = info.truncate_before.max(r.truncate_before.unwrap_or(0));
        Ok(*info)
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}

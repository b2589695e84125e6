//! KV semantics over the [`Store`]: entries with Consul's flags and session locks, sessions with
//! TTLs (store leases) and lock-delay, and multi-key transactions that either apply whole or name
//! the operation that failed. The native KV API, Consul's `/v1/kv`, `/v1/session`, `/v1/txn`
//! and (later) Nacos config are views of this one store.
//!
//! Layout: the value lives at `kv/<key>` (raw bytes, so the value is the stored record); flags
//! and lock state, when not all zero, live beside it at `kvmeta/<key>` and are written in the
//! same transaction, so both carry the same modify index. Sessions live at `sessions/<id>`,
//! attached to a lease when they have a TTL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use zhili_model::{validate, ValidationError};
use zhili_store::{Compare, EventKind, KeyValue, Op, Store, StoreError, Txn};

pub const KV_PREFIX: &str = "kv/";
const META_PREFIX: &str = "kvmeta/";
const SESSION_PREFIX: &str = "sessions/";
/// A transaction whose reads raced with another writer is retried this many times.
const MAX_ATTEMPTS: usize = 16;
pub const MAX_TXN_OPS: usize = 128;
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("stored record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("too much contention on the keys of this transaction; retry")]
    Contention,
}

/// One key as read: its value, Consul flags, lock state and indexes.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    pub flags: u64,
    pub session: Option<String>,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub version: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Meta {
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    lock_index: u64,
}

/// One operation of a transaction (Consul's KV verbs).
#[derive(Debug, Clone)]
pub enum KvOp {
    Set { key: String, value: Bytes, flags: u64 },
    Cas { key: String, value: Bytes, flags: u64, index: u64 },
    Lock { key: String, value: Bytes, flags: u64, session: String },
    Unlock { key: String, value: Bytes, flags: u64, session: String },
    Get { key: String },
    GetTree { prefix: String },
    CheckIndex { key: String, index: u64 },
    CheckSession { key: String, session: String },
    CheckNotExists { key: String },
    Delete { key: String },
    DeleteTree { prefix: String },
    DeleteCas { key: String, index: u64 },
}

impl KvOp {
    /// The key, or the prefix of a tree operation.
    pub fn key(&self) -> &str {
        match self {
            Self::Set { key, .. }
            | Self::Cas { key, .. }
            | Self::Lock { key, .. }
            | Self::Unlock { key, .. }
            | Self::Get { key }
            | Self::CheckIndex { key, .. }
            | Self::CheckSession { key, .. }
            | Self::CheckNotExists { key }
            | Self::Delete { key }
            | Self::DeleteCas { key, .. } => key,
            Self::GetTree { prefix } | Self::DeleteTree { prefix } => prefix,
        }
    }

    fn is_tree(&self) -> bool {
        matches!(self, Self::GetTree { .. } | Self::DeleteTree { .. })
    }
}

/// What one operation of a committed transaction returns.
#[derive(Debug, Clone, PartialEq)]
pub enum OpResult {
    Entry(Option<Entry>),
    Entries(Vec<Entry>),
    Nothing,
}

/// Why a transaction did not apply: the first operation whose condition failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnFailure {
    pub op_index: usize,
    pub what: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    Release,
    Delete,
}

/// A session as stored. Indexes come from the store record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub name: String,
    pub node: String,
    pub lock_delay_ms: u64,
    pub behavior: Behavior,
    pub ttl_ms: Option<u64>,
    pub lease: Option<u64>,
    #[serde(skip)]
    pub create_index: u64,
    #[serde(skip)]
    pub modify_index: u64,
}

/// What a client asks for when it creates a session; validated by [`Kv::session_create`].
#[derive(Debug, Clone, Default)]
pub struct SessionSpec {
    pub name: String,
    pub node: String,
    pub lock_delay: Option<Duration>,
    pub behavior: Option<Behavior>,
    pub ttl: Option<Duration>,
}

pub struct Kv {
    store: Arc<dyn Store>,
    /// Keys whose lock was freed by an invalidated session may not be acquired until then.
    lock_delays: Mutex<HashMap<String, Instant>>,
}

fn kv_key(key: &str) -> String {
    format!("{KV_PREFIX}{key}")
}

fn meta_key(key: &str) -> String {
    format!("{META_PREFIX}{key}")
}

fn session_key(id: &str) -> String {
    format!("{SESSION_PREFIX}{id}")
}

fn corrupt(key: &str, e: serde_json::Error) -> KvError {
    KvError::Corrupt { key: key.into(), message: e.to_string() }
}

fn parse_meta(kv: Option<&KeyValue>) -> Result<Meta, KvError> {
    kv.map_or(Ok(Meta::default()), |kv| serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e)))
}

fn entry(kv: &KeyValue, meta: Meta) -> Entry {
    Entry {
        key: kv.key[KV_PREFIX.len()..].to_string(),
        value: kv.value.clone(),
        flags: meta.flags,
        session: meta.session,
        lock_index: meta.lock_index,
        create_index: kv.create_revision,
        modify_index: kv.mod_revision,
        version: kv.version,
    }
}

/// A random version-4 UUID, as Consul session ids are.
/// `key` up to and including the first `separator` after `prefix`, or all of it.
fn fold<'a>(key: &'a str, prefix: &str, separator: Option<&str>) -> &'a str {
    let Some(sep) = separator.filter(|s| !s.is_empty()) else { return key };
    match key.get(prefix.len()..).and_then(|rest| rest.find(sep)) {
        Some(i) => key.get(..prefix.len() + i + sep.len()).unwrap_or(key),
        None => key,
    }
}

pub fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = |r: std::ops::Range<usize>| b.get(r).unwrap_or_default().iter().map(|x| format!("{x:02x}")).collect::<String>();
    let v = (b[6] & 0x0f) | 0x40;
    let var = (b[8] & 0x3f) | 0x80;
    format!("{}-{}-{:02x}{:02x}-{:02x}{:02x}-{}", h(0..4), h(4..6), v, b[7], var, b[9], h(10..16))
}

/// The store reads one attempt of a transaction made, and the writes it plans.
#[derive(Default)]
struct Plan {
    compares: Vec<Compare>,
    writes: Vec<Op>,
}

impl Plan {
    /// Reads a key and its meta, and makes the transaction conditional on both staying as read.
    fn read(&mut self, store: &dyn Store, key: &str) -> Result<(Option<KeyValue>, Option<KeyValue>), KvError> {
        let (k, m) = (kv_key(key), meta_key(key));
        let kv = store.get(&k)?;
        let meta = store.get(&m)?;
        self.compares.push(Compare::ModRevision(k, kv.as_ref().map_or(0, |kv| kv.mod_revision)));
        self.compares.push(Compare::ModRevision(m, meta.as_ref().map_or(0, |kv| kv.mod_revision)));
        Ok((kv, meta))
    }

    fn write(&mut self, key: &str, value: Bytes, meta: &Meta, had_meta: bool) {
        self.writes.push(Op::Put { key: kv_key(key), value, lease: None });
        if *meta != Meta::default() {
            self.writes.push(Op::Put { key: meta_key(key), value: serde_json::to_vec(meta).expect("meta serializes").into(), lease: None });
        } else if had_meta {
            self.writes.push(Op::Delete { key: meta_key(key) });
        }
    }
}

impl Kv {
    /// Blocks until the key (exact) or anything under it (`prefix`) changes after `index`, or
    /// `wait` passes (blocking reads of both KV APIs and the Nacos config listeners).
    pub async fn wait(&self, key: &str, prefix: bool, index: u64, wait: Duration) {
        zhili_store::wait_for_change(&*self.store, &format!("{KV_PREFIX}{key}"), prefix, index, wait).await
    }

    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self { store, lock_delays: Mutex::new(HashMap::new()) })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        let Some(kv) = self.store.get(&kv_key(key))? else { return Ok(None) };
        let meta = parse_meta(self.store.get(&meta_key(key))?.as_ref())?;
        Ok(Some(entry(&kv, meta)))
    }

    /// A key's value and modify index, without its flags and lock state: one store read where
    /// [`Self::get`] makes two (Nacos config reads need nothing else).
    pub fn get_value(&self, key: &str) -> Result<Option<(Bytes, u64)>, KvError> {
        Ok(self.store.get(&kv_key(key))?.map(|kv| (kv.value, kv.mod_revision)))
    }

    /// Every key under `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<Entry>, KvError> {
        let mut metas: HashMap<String, KeyValue> =
            self.store.range(&meta_key(prefix), None)?.into_iter().map(|kv| (kv.key[META_PREFIX.len()..].to_string(), kv)).collect();
        self.store
            .range(&kv_key(prefix), None)?
            .iter()
            .map(|kv| {
                let meta = parse_meta(metas.remove(&kv.key[KV_PREFIX.len()..]).as_ref())?;
                Ok(entry(kv, meta))
            })
            .collect()
    }

    /// The keys under `prefix` that `visible` admits, sorted; with a `separator`, everything
    /// below the next separator after the prefix folds into one entry ending in it (Consul's
    /// and etcd's "directory" listing: `a/` for `a/b` and `a/c` under prefix ``).
    pub fn keys(&self, prefix: &str, separator: Option<&str>, visible: impl Fn(&str) -> bool) -> Result<Vec<String>, KvError> {
        let mut out: Vec<String> = Vec::new();
        for kv in self.store.range(&kv_key(prefix), None)? {
            let Some(key) = kv.key.get(KV_PREFIX.len()..) else { continue };
            if !visible(key) {
                continue;
            }
            let shown = fold(key, prefix, separator);
            if out.last().map(String::as_str) != Some(shown) {
                out.push(shown.to_string());
            }
        }
        Ok(out)
    }

    /// A plain, CAS, acquire or release write, Consul's `PUT /v1/kv/<key>`. Returns whether it
    /// applied and the store revision after it.
    pub async fn put(
        &self,
        key: &str,
        value: Bytes,
        flags: u64,
        cas: Option<u64>,
        acquire: Option<String>,
        release: Option<String>,
    ) -> Result<(bool, u64), KvError> {
        let (key, mut ops) = (key.to_string(), Vec::with_capacity(2));
        let write = match (acquire, release) {
            (Some(session), _) => KvOp::Lock { key: key.clone(), value, flags, session },
            (None, Some(session)) => KvOp::Unlock { key: key.clone(), value, flags, session },
            (None, None) => match cas {
                Some(index) => KvOp::Cas { key: key.clone(), value, flags, index },
                None => KvOp::Set { key: key.clone(), value, flags },
            },
        };
        if let (Some(index), KvOp::Lock { .. } | KvOp::Unlock { .. }) = (cas, &write) {
            ops.push(KvOp::CheckIndex { key, index });
        }
        ops.push(write);
        match self.txn(&ops).await? {
            Ok((rev, _)) => Ok((true, rev)),
            Err(_) => Ok((false, self.store.revision())),
        }
    }

    /// Deletes a key (or a tree); with `cas`, only if the key's modify index matches.
    pub async fn delete(&self, key: &str, recurse: bool, cas: Option<u64>) -> Result<(bool, u64), KvError> {
        let op = match (recurse, cas) {
            (true, _) => KvOp::DeleteTree { prefix: key.into() },
            (false, Some(index)) => KvOp::DeleteCas { key: key.into(), index },
            (false, None) => KvOp::Delete { key: key.into() },
        };
        match self.txn(&[op]).await? {
            Ok((rev, _)) => Ok((true, rev)),
            Err(_) => Ok((false, self.store.revision())),
        }
    }

    /// Applies all operations atomically, or none: the inner `Err` names the first operation
    /// whose condition failed. Reads return the state after the transaction.
    pub async fn txn(&self, ops: &[KvOp]) -> Result<Result<(u64, Vec<OpResult>), TxnFailure>, KvError> {
        if ops.len() > MAX_TXN_OPS {
            return Err(ValidationError::new("ops", format!("at most {MAX_TXN_OPS} operations per transaction")).into());
        }
        for (i, op) in ops.iter().enumerate() {
            let field = format!("ops[{i}].key");
            if op.is_tree() {
                validate::kv_prefix(&field, op.key())?;
            } else {
                validate::kv_key(&field, op.key())?;
            }
            if let KvOp::Set { value, .. } | KvOp::Cas { value, .. } | KvOp::Lock { value, .. } | KvOp::Unlock { value, .. } = op {
                validate::kv_value(&format!("ops[{i}].value"), value)?;
            }
        }
        for _ in 0..MAX_ATTEMPTS {
            let plan = match self.plan(ops)? {
                Ok(plan) => plan,
                Err(failure) => return Ok(Err(failure)),
            };
            let revision = if plan.writes.is_empty() {
                self.store.revision()
            } else {
                let res = self.store.txn(Txn { compares: plan.compares, success: plan.writes, failure: vec![] }).await?;
                if !res.succeeded {
                    continue; // something we read changed meanwhile: plan again
                }
                res.revision
            };
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    KvOp::Set { key, .. } | KvOp::Cas { key, .. } | KvOp::Lock { key, .. } | KvOp::Unlock { key, .. } | KvOp::Get { key } => {
                        OpResult::Entry(self.get(key)?)
                    }
                    KvOp::GetTree { prefix } => OpResult::Entries(self.list(prefix)?),
                    _ => OpResult::Nothing,
                });
            }
            return Ok(Ok((revision, results)));
        }
        Err(KvError::Contention)
    }

    fn plan(&self, ops: &[KvOp]) -> Result<Result<Plan, TxnFailure>, KvError> {
        let mut plan = Plan::default();
        let store = &*self.store;
        for (i, op) in ops.iter().enumerate() {
            let fail = |what: String| Ok(Err(TxnFailure { op_index: i, what }));
            if op.is_tree() {
                if let KvOp::DeleteTree { prefix } = op {
                    plan.writes.push(Op::DeletePrefix { prefix: kv_key(prefix) });
                    plan.writes.push(Op::DeletePrefix { prefix: meta_key(prefix) });
                }
                continue;
            }
            let key = op.key();
            let (kv, meta_kv) = plan.read(store, key)?;
            let had_meta = meta_kv.is_some();
            let meta = parse_meta(meta_kv.as_ref())?;
            let index = kv.as_ref().map_or(0, |kv| kv.mod_revision);
            match op {
                KvOp::Set { value, flags, .. } => plan.write(key, value.clone(), &Meta { flags: *flags, ..meta }, had_meta),
                KvOp::Cas { value, flags, index: want, .. } => {
                    if index != *want {
                        return fail(format!("current modify index {index} != {want}"));
                    }
                    plan.write(key, value.clone(), &Meta { flags: *flags, ..meta }, had_meta);
                }
                KvOp::Lock { value, flags, session, .. } => {
                    let sk = session_key(session);
                    if store.get(&sk)?.is_none() {
                        return fail(format!("invalid session {session:?}"));
                    }
                    plan.compares.push(Compare::Exists(sk));
                    if let Some(holder) = &meta.session {
                        if holder != session {
                            return fail(format!("key {key:?} is locked by session {holder:?}"));
                        }
                    } else if self.lock_delays.lock().get(key).is_some_and(|until| *until > Instant::now()) {
                        return fail(format!("key {key:?} is in its lock-delay period"));
                    }
                    let lock_index = if meta.session.as_deref() == Some(session) { meta.lock_index } else { meta.lock_index + 1 };
                    plan.write(key, value.clone(), &Meta { flags: *flags, session: Some(session.clone()), lock_index }, had_meta);
                }
                KvOp::Unlock { value, flags, session, .. } => {
                    if meta.session.as_deref() != Some(session) {
                        return fail(format!("key {key:?} is not locked by session {session:?}"));
                    }
                    plan.write(key, value.clone(), &Meta { flags: *flags, session: None, lock_index: meta.lock_index }, had_meta);
                }
                KvOp::Get { .. } => {}
                KvOp::CheckIndex { index: want, .. } => {
                    if index != *want {
                        return fail(format!("current modify index {index} != {want}"));
                    }
                }
                KvOp::CheckSession { session, .. } => {
                    if meta.session.as_deref() != Some(session) {
                        return fail(format!("key {key:?} is not locked by session {session:?}"));
                    }
                }
                KvOp::CheckNotExists { .. } => {
                    if kv.is_some() {
                        return fail(format!("key {key:?} exists"));
                    }
                }
                KvOp::Delete { .. } | KvOp::DeleteCas { .. } => {
                    if let KvOp::DeleteCas { index: want, .. } = op {
                        if index != *want {
                            return fail(format!("current modify index {index} != {want}"));
                        }
                    }
                    plan.writes.push(Op::Delete { key: kv_key(key) });
                    plan.writes.push(Op::Delete { key: meta_key(key) });
                }
                KvOp::GetTree { .. } | KvOp::DeleteTree { .. } => unreachable!("tree operations are handled above"),
            }
        }
        Ok(Ok(plan))
    }

    // ---- sessions ----------------------------------------------------------------------------

    pub async fn session_create(&self, spec: SessionSpec) -> Result<Session, KvError> {
        validate::text("Name", &spec.name)?;
        validate::name("Node", &spec.node)?;
        let lock_delay = spec.lock_delay.unwrap_or(DEFAULT_LOCK_DELAY);
        if lock_delay > MAX_LOCK_DELAY {
            return Err(ValidationError::new("LockDelay", "must be at most 60s").into());
        }
        if let Some(ttl) = spec.ttl {
            if !(MIN_SESSION_TTL..=MAX_SESSION_TTL).contains(&ttl) {
                return Err(ValidationError::new("TTL", "must be between 10s and 86400s").into());
            }
        }
        let lease = match spec.ttl {
            Some(ttl) => Some(self.store.lease_grant(ttl).await?),
            None => None,
        };
        let mut session = Session {
            id: uuid(),
            name: spec.name,
            node: spec.node,
            lock_delay_ms: lock_delay.as_millis() as u64,
            behavior: spec.behavior.unwrap_or(Behavior::Release),
            ttl_ms: spec.ttl.map(|t| t.as_millis() as u64),
            lease,
            create_index: 0,
            modify_index: 0,
        };
        let value = serde_json::to_vec(&session).expect("session serializes");
        let res = self.store.txn(Txn { success: vec![Op::Put { key: session_key(&session.id), value: value.into(), lease }], ..Default::default() }).await?;
        session.create_index = res.revision;
        session.modify_index = res.revision;
        Ok(session)
    }

    fn parse_session(kv: &KeyValue) -> Result<Session, KvError> {
        let mut s: Session = serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
        s.create_index = kv.create_revision;
        s.modify_index = kv.mod_revision;
        Ok(s)
    }

    pub fn session(&self, id: &str) -> Result<Option<Session>, KvError> {
        self.store.get(&session_key(id))?.as_ref().map(Self::parse_session).transpose()
    }

    pub fn sessions(&self) -> Result<Vec<Session>, KvError> {
        self.store.range(SESSION_PREFIX, None)?.iter().map(Self::parse_session).collect()
    }

    /// Renews a TTL session; `None` if it does not exist (any more).
    pub fn session_renew(&self, id: &str) -> Result<Option<Session>, KvError> {
        let Some(s) = self.session(id)? else { return Ok(None) };
        if let Some(lease) = s.lease {
            match self.store.lease_keep_alive(lease) {
                Ok(_) => {}
                Err(StoreError::LeaseNotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(s))
    }

    /// Destroys a session and frees (or deletes, per its behavior) the keys it holds.
    pub async fn session_destroy(&self, id: &str) -> Result<bool, KvError> {
        let Some(s) = self.session(id)? else { return Ok(false) };
        match s.lease {
            Some(lease) => match self.store.lease_revoke(lease).await {
                Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            },
            None => {
                zhili_store::delete(&*self.store, &session_key(id)).await?;
            }
        }
        self.invalidate(&s).await?;
        Ok(true)
    }

    /// Frees every lock `s` held: released (with lock-delay) or deleted, per its behavior.
    async fn invalidate(&self, s: &Session) -> Result<(), KvError> {
        let held: Vec<String> = self
            .store
            .range(META_PREFIX, None)?
            .iter()
            .filter(|kv| parse_meta(Some(kv)).is_ok_and(|m| m.session.as_deref() == Some(&s.id)))
            .map(|kv| kv.key[META_PREFIX.len()..].to_string())
            .collect();
        for key in held {
            if s.lock_delay_ms > 0 {
                self.lock_delays.lock().insert(key.clone(), Instant::now() + Duration::from_millis(s.lock_delay_ms));
            }
            for _ in 0..MAX_ATTEMPTS {
                let mut plan = Plan::default();
                let (kv, meta_kv) = plan.read(&*self.store, &key)?;
                let meta = parse_meta(meta_kv.as_ref())?;
                if meta.session.as_deref() != Some(&s.id) {
                    break;
                }
                match (s.behavior, kv) {
                    (Behavior::Release, Some(kv)) => plan.write(&key, kv.value.clone(), &Meta { session: None, ..meta }, true),
                    _ => {
                        plan.writes.push(Op::Delete { key: kv_key(&key) });
                        plan.writes.push(Op::Delete { key: meta_key(&key) });
                    }
                }
                if self.store.txn(Txn { compares: plan.compares, success: plan.writes, failure: vec![] }).await?.succeeded {
                    break;
                }
            }
        }
        self.lock_delays.lock().retain(|_, until| *until > Instant::now());
        Ok(())
    }

    /// Frees locks of sessions that expire (their lease ran out) or vanished while the server
    /// was down. Runs for the life of the server.
    pub async fn run_session_reaper(self: Arc<Self>) {
        loop {
            if let Err(e) = self.sweep_orphans().await {
                tracing::warn!(error = %e, "session sweep failed");
            }
            let mut watcher = match self.store.watch(SESSION_PREFIX, 0) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "session watch failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                match watcher.next().await {
                    Ok(ev) if ev.kind == EventKind::Delete => match Self::parse_session(&ev.kv) {
                        Ok(s) => {
                            if let Err(e) = self.invalidate(&s).await {
                                tracing::warn!(error = %e, session = %s.id, "freeing a session's locks failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable session record"),
                    },
                    Ok(_) => {}
                    Err(StoreError::Closed) => return,
                    Err(_) => break, // lagged: sweep again and re-subscribe
                }
            }
        }
    }

    async fn sweep_orphans(&self) -> Result<(), KvError> {
        let mut orphans: HashMap<String, Session> = HashMap::new();
        for kv in self.store.range(META_PREFIX, None)? {
            if let Some(id) = parse_meta(Some(&kv))?.session {
                if !orphans.contains_key(&id) && self.session(&id)?.is_none() {
                    let s = Session {
                        id: id.clone(),
                        name: String::new(),
                        node: String::new(),
                        lock_delay_ms: 0,
                        behavior: Behavior::Release,
                        ttl_ms: None,
                        lease: None,
                        create_index: 0,
                        modify_index: 0,
                    };
                    orphans.insert(id, s);
                }
            }
        }
        for s in orphans.values() {
            self.invalidate(s).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

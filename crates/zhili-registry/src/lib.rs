//! The service registry: namespaces › services › instances with their health. State lives in
//! memory, indexed for reads; persistent objects (service definitions, persistent instances) are
//! written through the [`Store`] first and applied only once durable. Ephemeral instances live on
//! heartbeats and are never written to disk. Every change takes a revision from the shared clock,
//! so blocking reads and the event stream order all changes on one axis. Services are spread
//! over shards, each under its own lock: a registration locks only its service's shard, never
//! one shared by unrelated services.

mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{RwLock, RwLockReadGuard};
use tokio::sync::{broadcast, mpsc, watch};
use zhili_model::report::{InstanceReport, ReportSpec};
use zhili_model::{
    CheckDefinition, CheckKey, CheckKind, HealthStatus, HealthTransition, Instance, InstanceList, InstanceRegistration, Maintenance, RegistryEvent,
    RegistryEventKind, Service, ServiceDetail, ServiceSummary,
};
use zhili_store::{Compare, Op, RevisionClock, Store, StoreError, Txn};
use zhili_telemetry::{HealthLabel, Metrics};

use state::{named, InstanceEntry, ServiceEntry, Shard};

const SERVICES_PREFIX: &str = "registry/services/";
const INSTANCES_PREFIX: &str = "registry/instances/";
/// Buffered registry events per subscriber; a slower subscriber is told it lagged and resyncs.
const EVENT_BUFFER: usize = 4096;

/// The registry asks whoever runs active checks to start or stop them. The binary implements this
/// over the health engine, which reports back through [`Registry::apply_transition`].
pub trait CheckScheduler: Send + Sync + 'static {
    fn schedule(&self, key: CheckKey, def: CheckDefinition);
    fn cancel(&self, key: &CheckKey);
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("service {0:?} not found")]
    ServiceNotFound(String),
    #[error("instance {0:?} not found")]
    InstanceNotFound(String),
    #[error("check {0:?} not found")]
    CheckNotFound(String),
    #[error("check {0:?} is not a ttl check; its status comes from the server's probes")]
    NotTtl(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored registry record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

/// Filters of a discovery read.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    /// Only serving instances (healthy, enabled, not in maintenance). Default true in the API.
    pub healthy_only: bool,
    /// Every tag listed must be present.
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub zone: Option<String>,
}

impl InstanceFilter {
    fn matches_static(&self, i: &Instance) -> bool {
        self.tags.iter().all(|t| i.tags.contains(t))
            && self.metadata.iter().all(|(k, v)| i.metadata.get(k) == Some(v))
            && self.zone.as_ref().is_none_or(|z| i.zone.as_ref() == Some(z))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedInstance {
    registration: InstanceRegistration,
    maintenance: Option<Maintenance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    report: Option<InstanceReport>,
}

pub struct Registry {
    store: Arc<dyn Store>,
    clock: Arc<RevisionClock>,
    /// The registry state in [`SHARDS`] shards by (namespace, service), each under its own lock:
    /// reads take it shared and never queue behind the store; writers hold it only for
    /// in-memory mutation, never across an await.
    shards: Box<[RwLock<Shard>]>,
    /// Picks a service's shard: seeded per registry, and fast (a shard is chosen on every read
    /// and write; the maps inside keep std's SipHash, since their keys are the clients').
    hasher: foldhash::fast::RandomState,
    /// Orders persistent writes of one key so disk and memory apply them in the same order,
    /// while writes of different keys proceed together (and share group commits).
    persist_order: PersistOrder,
    index: watch::Sender<u64>,
    events: broadcast::Sender<Arc<RegistryEvent>>,
    /// The lossless feed of [`Registry::journal`], once taken.
    journal: std::sync::OnceLock<JournalFeed>,
    checks: Arc<dyn CheckScheduler>,
    metrics: Arc<Metrics>,
    time: Arc<dyn Clock>,
    /// Circuit-breaker transitions reported by gateways, per (namespace, service); informational.
    breakers: parking_lot::Mutex<HashMap<(String, String), zhili_model::BreakerReport>>,
}

/// Striped locks ordering persistent writes per (namespace, service, id).
struct PersistOrder {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

const PERSIST_STRIPES: usize = 64;
/// Registry shards: enough that writers of unrelated services rarely meet on one lock.
const SHARDS: usize = 64;

impl PersistOrder {
    fn new() -> Self {
        Self { stripes: (0..PERSIST_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect() }
    }

    async fn key(&self, ns: &str, service: &str, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (ns, service, id).hash(&mut h);
        self.stripes.get(h.finish() as usize % PERSIST_STRIPES).expect("new() makes PERSIST_STRIPES stripes").lock().await
    }

    /// Every stripe, taken in one order (so two callers cannot deadlock).
    async fn all(&self) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(PERSIST_STRIPES);
        for s in &self.stripes {
            guards.push(s.lock().await);
        }
        guards
    }
}

/// Where the registry reads elapsed time for heartbeats, TTLs and expiry. Production uses
/// [`MonotonicClock`]; tests inject [`TokioClock`] and drive it with tokio's paused time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the clock started.
    fn elapsed_ms(&self) -> u64;
}

/// The process's monotonic clock.
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn elapsed_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// tokio's clock: frozen and advanced by hand under `tokio::time::pause`.
pub struct TokioClock(tokio::time::Instant);

impl Default for TokioClock {
    fn default() -> Self {
        Self(tokio::time::Instant::now())
    }
}

impl Clock for TokioClock {
    fn elapsed_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn service_key(ns: &str, name: &str) -> String {
    format!("{SERVICES_PREFIX}{ns}/{name}")
}

fn instance_key(ns: &str, service: &str, id: &str) -> String {
    format!("{INSTANCES_PREFIX}{ns}/{service}/{id}")
}

impl Registry {
    /// Builds the registry and loads persisted services and instances from the store.
    pub fn load(store: Arc<dyn Store>, checks: Arc<dyn CheckScheduler>, metrics: Arc<Metrics>) -> Result<Arc<Self>, RegistryError> {
        Self::load_with_clock(store, checks, metrics, Arc::new(MonotonicClock::default()))
    }

    /// [`Self::load`] with the clock heartbeats and TTLs are measured on.
    pub fn load_with_clock(
        store: Arc<dyn Store>,
        checks: Arc<dyn CheckScheduler>,
        metrics: Arc<Metrics>,
        time: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, RegistryError> {
        let clock = store.clock();
        let (index, _) = watch::channel(clock.current());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let reg = Arc::new(Self {
            store: store.clone(),
            clock,
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            persist_order: PersistOrder::new(),
            index,
            events,
            journal: std::sync::OnceLock::new(),
            checks,
            metrics,
            time,
            breakers: Default::default(),
        });
        let corrupt = |key: &str, e: serde_json::Error| RegistryError::Corrupt { key: key.into(), message: e.to_string() };
        let services = store.range(SERVICES_PREFIX, None)?;
        let instances = store.range(INSTANCES_PREFIX, None)?;
        let now_ms = reg.now_ms();
        for kv in services {
            let svc: Service = serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
            let key = (svc.namespace.clone(), svc.name.clone());
            reg.shard(&key.0, &key.1).write().services.insert(key, ServiceEntry::new(svc, kv.mod_revision));
        }
        for kv in instances {
            let p: PersistedInstance = serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))?;
            let rest = &kv.key[INSTANCES_PREFIX.len()..];
            let mut parts = rest.splitn(3, '/');
            let (Some(ns), Some(svc), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(RegistryError::Corrupt { key: kv.key.clone(), message: "bad key".into() });
            };
            let mut shard = reg.shard(ns, svc).write();
            let entry = shard.services.entry((ns.into(), svc.into())).or_insert_with(|| ServiceEntry::new(Service::implicit(ns, svc), kv.mod_revision));
            let mut inst = InstanceEntry::new(p.registration, kv.create_revision, kv.mod_revision, now_ms, p.maintenance);
            inst.report = p.report.map(Box::new);
            for c in inst.checks.iter().filter(|c| c.def.kind.is_active()) {
                reg.checks
                    .schedule(CheckKey { namespace: ns.into(), service: svc.into(), instance: inst.reg.id.clone(), check: c.def.id.clone() }, c.def.clone());
            }
            entry.sweep_by(inst.due(&entry.def.health));
            entry.instances.insert(inst.reg.id.clone(), inst);
        }
        Ok(reg)
    }

    fn now_ms(&self) -> u64 {
        self.time.elapsed_ms()
    }

    /// The registry's current index (the revision of its latest change).
    pub fn index(&self) -> u64 {
        *self.index.borrow()
    }

    /// Every change as it happens, for readers that can resync from the registry's state: one
    /// more than [`EVENT_BUFFER`] changes behind, a reader is told it lagged and what it missed
    /// is gone.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<RegistryEvent>> {
        self.events.subscribe()
    }

    /// Every change from now on, for the one reader that must not miss any (the `$registry`
    /// stream) however large a burst (a connection closing with a hundred thousand instances):
    /// up to [`JOURNAL_LIMIT`] changes wait for it; past that, changes are dropped and the
    /// reader is told how many. None once taken.
    pub fn journal(&self) -> Option<Journal> {
        let (tx, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(JournalCounts::default());
        self.journal.set(JournalFeed { tx, counts: counts.clone() }).ok()?;
        Some(Journal { rx, counts })
    }

    /// The shard a service lives in.
    fn shard(&self, ns: &str, service: &str) -> &RwLock<Shard> {
        use std::hash::BuildHasher;
        let i = self.hasher.hash_one((ns, service)) as usize % SHARDS;
        self.shards.get(i).expect("the registry is built with SHARDS shards")
    }

    /// One service under its shard's shared lock.
    fn read_service<T>(&self, ns: &str, service: &str, f: impl FnOnce(&ServiceEntry) -> Option<T>) -> Option<T> {
        self.shard(ns, service).read().services.get(named(&(ns, service))).and_then(f)
    }

    /// Every shard in turn under its shared lock. Each is consistent in itself; a view across
    /// services is read shard by shard, so it is at least as new as an index read before it.
    fn each_shard(&self) -> impl Iterator<Item = RwLockReadGuard<'_, Shard>> {
        self.shards.iter().map(|s| s.read())
    }

    /// Applies an in-memory mutation to one service's shard under its write lock with a fresh
    /// revision, then wakes watchers. `f` returns the events it caused (with index filled in
    /// here). The revision is drawn and published under the shard's lock: whoever sees the
    /// registry index reach it and then reads the service (through the same lock) sees the
    /// change, even when a later revision of another shard was published first. Events are sent
    /// under it too, so each service's events reach subscribers in revision order.
    fn mutate<T>(&self, ns: &str, service: &str, f: impl FnOnce(&mut Shard, u64, &mut Vec<RegistryEvent>) -> T) -> (T, u64) {
        let mut events = Vec::new();
        let mut shard = self.shard(ns, service).write();
        let rev = self.clock.next();
        let out = f(&mut shard, rev, &mut events);
        if !events.is_empty() {
            self.index.send_if_modified(|index| {
                let newer = rev > *index;
                if newer {
                    *index = rev;
                }
                newer
            });
        }
        for mut ev in events {
            ev.index = rev;
            let ev = Arc::new(ev);
            if let Some(journal) = self.journal.get() {
                journal.send(&ev);
            }
            let _ = self.events.send(ev);
        }
        drop(shard);
        (out, rev)
    }

    fn instance_event(kind: RegistryEventKind, entry: &ServiceEntry, inst: &InstanceEntry) -> RegistryEvent {
        RegistryEvent {
            index: 0,
            kind,
            namespace: entry.def.namespace.clone(),
            service: entry.def.name.clone(),
            instance: Some(inst.view(&entry.def)),
            instance_id: Some(inst.reg.id.clone()),
        }
    }

    // ---- services ----------------------------------------------------------------------------

    pub async fn put_service(&self, svc: Service) -> Result<u64, RegistryError> {
        let _order = self.persist_order.key(&svc.namespace, &svc.name, "").await;
        let value = serde_json::to_vec(&svc).expect("service serializes");
        self.store.txn(Txn::put(service_key(&svc.namespace, &svc.name), value)).await?;
        let (_, rev) = self.mutate(&svc.namespace, &svc.name, |state, rev, events| {
            let key = (svc.namespace.clone(), svc.name.clone());
            let entry = state.services.entry(key).or_insert_with(|| ServiceEntry::new(svc.clone(), rev));
            entry.def = svc.clone();
            entry.index = rev;
            // The health settings may have changed every instance's due time.
            entry.sweep_by(0);
            events.push(RegistryEvent {
                index: 0,
                kind: RegistryEventKind::ServiceUpserted,
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                instance: None,
                instance_id: None,
            });
        });
        Ok(rev)
    }

    /// Deletes a service with all its instances.
    pub async fn delete_service(&self, ns: &str, name: &str) -> Result<u64, RegistryError> {
        // Every stripe: no write to one of its instances may land between disk and memory.
        let _order = self.persist_order.all().await;
        if self.read_service(ns, name, |_| Some(())).is_none() {
            return Err(RegistryError::ServiceNotFound(name.into()));
        }
        self.store
            .txn(Txn {
                success: vec![Op::Delete { key: service_key(ns, name) }, Op::DeletePrefix { prefix: format!("{INSTANCES_PREFIX}{ns}/{name}/") }],
                ..Default::default()
            })
            .await?;
        let (removed, rev) = self.mutate(ns, name, |state, rev, events| {
            let removed = state.services.remove(named(&(ns, name)));
            state.tombstones.insert((ns.to_string(), name.to_string()), rev);
            events.push(RegistryEvent {
                index: 0,
                kind: RegistryEventKind::ServiceDeleted,
                namespace: ns.into(),
                service: name.into(),
                instance: None,
                instance_id: None,
            });
            removed
        });
        if let Some(entry) = removed {
            for inst in entry.instances.values() {
                self.cancel_checks(ns, name, inst);
            }
        }
        Ok(rev)
    }

    pub fn list_services(&self, ns: &str) -> (u64, Vec<ServiceSummary>) {
        let index = self.index();
        let mut out = Vec::new();
        for shard in self.each_shard() {
            out.extend(shard.services.iter().filter(|((n, _), _)| n == ns).map(|(_, e)| ServiceSummary {
                namespace: e.def.namespace.clone(),
                name: e.def.name.clone(),
                group: e.def.group.clone(),
                tags: e.def.tags.clone(),
                instances: e.instances.len(),
                passing: e.instances.values().filter(|i| i.is_serving()).count(),
            }));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        (index, out)
    }

    pub fn namespaces(&self) -> Vec<String> {
        let mut ns: Vec<String> = self.each_shard().flat_map(|s| s.services.keys().map(|(n, _)| n.clone()).collect::<Vec<_>>()).collect();
        ns.sort();
        ns.dedup();
        ns
    }

    pub fn service(&self, ns: &str, name: &str) -> Option<ServiceDetail> {
        self.read_service(ns, name, |e| {
            let circuit_breaker = self.breakers.lock().get(named(&(ns, name))).cloned();
            Some(ServiceDetail { service: e.def.clone(), index: e.index, instances: e.instances.values().map(|i| i.view(&e.def)).collect(), circuit_breaker })
        })
    }

    /// A service's definition alone: no instance is copied (hot paths that only need the group).
    pub fn service_definition(&self, ns: &str, name: &str) -> Option<Service> {
        self.read_service(ns, name, |e| Some(e.def.clone()))
    }

    /// The index of one service's latest change (including its deletion), or the registry's
    /// index if the service never existed.
    pub fn service_index(&self, ns: &str, name: &str) -> u64 {
        let key = (ns, name);
        let shard = self.shard(ns, name).read();
        shard.services.get(named(&key)).map(|e| e.index).or_else(|| shard.tombstones.get(named(&key)).copied()).unwrap_or_else(|| self.index())
    }

    /// Waits until `index_of()` exceeds `after`, or `timeout` passes. Returns immediately when
    /// `after` is 0 or ahead of the registry (a client holding an index from before a restart).
    pub async fn wait_for(&self, after: u64, timeout: Duration, index_of: impl Fn() -> u64) {
        let mut rx = self.index.subscribe();
        if after == 0 || after > self.index() {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while index_of() <= after {
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Discovery, rendered by `render` (e.g. to JSON). The default query (healthy only, no
    /// filters) is the hot one: its rendering is cached per service index.
    pub fn instances_rendered(
        &self,
        ns: &str,
        name: &str,
        filter: &InstanceFilter,
        render: impl FnOnce(&InstanceList) -> bytes::Bytes,
    ) -> Option<(u64, bytes::Bytes)> {
        let shard = self.shard(ns, name).read();
        let e = shard.services.get(named(&(ns, name)))?;
        let cacheable = filter.healthy_only && filter.tags.is_empty() && filter.metadata.is_empty() && filter.zone.is_none();
        if cacheable {
            if let Some((index, bytes)) = e.rendered.lock().as_ref() {
                if *index == e.index {
                    return Some((*index, bytes.clone()));
                }
            }
        }
        let list = Self::discover(e, ns, name, filter);
        let bytes = render(&list);
        if cacheable {
            *e.rendered.lock() = Some((e.index, bytes.clone()));
        }
        Some((e.index, bytes))
    }

    /// Discovery: the service's instances after filters, with the protection threshold applied.
    pub fn instances(&self, ns: &str, name: &str, filter: &InstanceFilter) -> Option<InstanceList> {
        self.read_service(ns, name, |e| Some(Self::discover(e, ns, name, filter)))
    }

    fn discover(e: &ServiceEntry, ns: &str, name: &str, filter: &InstanceFilter) -> InstanceList {
        let candidates: Vec<Instance> = e.instances.values().map(|i| i.view(&e.def)).filter(|i| filter.matches_static(i)).collect();
        let serving = candidates.iter().filter(|i| i.is_serving()).count();
        let threshold = e.def.protection_threshold;
        // Below the threshold a health-check storm is more likely than a real mass outage, so
        // hand out every instance rather than pile all traffic on the few left (Nacos semantics).
        let protection_triggered = filter.healthy_only && threshold > 0.0 && !candidates.is_empty() && (serving as f64) < threshold * candidates.len() as f64;
        let instances = if filter.healthy_only && !protection_triggered { candidates.into_iter().filter(Instance::is_serving).collect() } else { candidates };
        InstanceList { namespace: ns.into(), service: name.into(), index: e.index, protection_triggered, instances }
    }

    pub fn instance(&self, ns: &str, service: &str, id: &str) -> Option<Instance> {
        self.read_service(ns, service, |e| e.instances.get(id).map(|i| i.view(&e.def)))
    }

    /// The registration an instance was made with (checks included), for partial updates.
    pub fn registration(&self, ns: &str, service: &str, id: &str) -> Option<InstanceRegistration> {
        self.read_service(ns, service, |e| e.instances.get(id).map(|i| i.reg.clone()))
    }

    /// Every instance of a namespace (all namespaces when `None`), in (service, id) order, with
    /// the registry index they reflect. Catalog-wide views (Consul catalog, DNS nodes) use this.
    pub fn all_instances(&self, ns: Option<&str>) -> (u64, Vec<Instance>) {
        let index = self.index();
        let mut out: Vec<Instance> = Vec::new();
        for shard in self.each_shard() {
            out.extend(shard.services.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).flat_map(|(_, e)| e.instances.values().map(|i| i.view(&e.def))));
        }
        out.sort_by(|a, b| (&a.namespace, &a.service, &a.id).cmp(&(&b.namespace, &b.service, &b.id)));
        (index, out)
    }

    /// Finds an instance by id alone (Consul addresses service instances by id, not by name).
    pub fn find_instance(&self, ns: &str, id: &str) -> Option<Instance> {
        self.each_shard().find_map(|s| s.services.iter().filter(|((n, _), _)| n == ns).find_map(|(_, e)| e.instances.get(id).map(|i| i.view(&e.def))))
    }

    /// Every instance with this id in the namespace, whatever its service: ids are unique per
    /// service, so APIs that address instances by id alone (Consul's) must consider them all.
    pub fn find_instances(&self, ns: &str, id: &str) -> Vec<Instance> {
        self.each_shard()
            .flat_map(|s| s.services.iter().filter(|((n, _), _)| n == ns).filter_map(|(_, e)| e.instances.get(id).map(|i| i.view(&e.def))).collect::<Vec<_>>())
            .collect()
    }

    /// Finds the instance that owns a check id, returning (service, instance id).
    pub fn find_check(&self, ns: &str, check: &str) -> Option<(String, String)> {
        self.each_shard().find_map(|s| {
            s.services
                .iter()
                .filter(|((n, _), _)| n == ns)
                .find_map(|((_, svc), e)| e.instances.values().find(|i| i.checks.iter().any(|c| c.def.id == check)).map(|i| (svc.clone(), i.reg.id.clone())))
        })
    }

    // ---- instances ---------------------------------------------------------------------------

    /// Whether an instance exists as persistent, and its maintenance state, without building a view.
    fn existing(&self, ns: &str, service: &str, id: &str) -> (bool, Option<Maintenance>) {
        self.read_service(ns, service, |e| e.instances.get(id).map(|i| (!i.reg.ephemeral, i.maintenance.clone()))).unwrap_or((false, None))
    }

    /// A persistent instance's stored form with its current maintenance and report.
    fn persisted(&self, ns: &str, service: &str, id: &str) -> Option<PersistedInstance> {
        self.read_service(ns, service, |e| {
            let i = e.instances.get(id)?;
            Some(PersistedInstance { registration: i.reg.clone(), maintenance: i.maintenance.clone(), report: i.report.as_deref().cloned() })
        })
    }

    /// Registers (or replaces) an instance. Persistent instances are durable before this returns.
    pub async fn register(&self, ns: &str, service: &str, reg: InstanceRegistration) -> Result<u64, RegistryError> {
        self.register_owned(ns, service, reg, None).await
    }

    /// A new [`Owner`], alive as of now.
    pub fn owner(&self) -> Arc<Owner> {
        Arc::new(Owner { last_beat: BeatCell::new(self.now_ms()) })
    }

    /// One beat of `owner`: a heartbeat for every ephemeral instance registered with it.
    pub fn beat_owner(&self, owner: &Owner) {
        owner.last_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    /// [`Registry::register`], with an `owner` whose beats keep the instance alive as its own
    /// heartbeats do (for an ephemeral instance; a re-registration replaces the owner).
    pub async fn register_owned(&self, ns: &str, service: &str, reg: InstanceRegistration, owner: Option<Arc<Owner>>) -> Result<u64, RegistryError> {
        let (mut was_persistent, mut maintenance) = self.existing(ns, service, &reg.id);
        let _order = if !reg.ephemeral || was_persistent {
            let guard = self.persist_order.key(ns, service, &reg.id).await;
            // Read again under the order lock: a concurrent persistent write may have changed it.
            (was_persistent, maintenance) = self.existing(ns, service, &reg.id);
            Some(guard)
        } else {
            None
        };
        if !reg.ephemeral {
            let report = self.persisted(ns, service, &reg.id).and_then(|p| p.report);
            let value =
                serde_json::to_vec(&PersistedInstance { registration: reg.clone(), maintenance: maintenance.clone(), report }).expect("instance serializes");
            self.store.txn(Txn::put(instance_key(ns, service, &reg.id), value)).await?;
        } else if was_persistent {
            crate::delete_key(&*self.store, instance_key(ns, service, &reg.id)).await?;
        }
        let now = self.now_ms();
        let id = reg.id.clone();
        let active: Vec<CheckDefinition> = reg.checks.iter().filter(|c| c.kind.is_active()).cloned().collect();
        let (old, rev) = self.mutate(ns, service, |state, rev, events| {
            let entry = state.services.entry((ns.to_string(), service.to_string())).or_insert_with(|| ServiceEntry::new(Service::implicit(ns, service), rev));
            let mut inst = InstanceEntry::new(reg, rev, rev, now, maintenance);
            inst.owner = owner.filter(|_| inst.reg.ephemeral);
            let old = entry.instances.remove(&id);
            let kind = if let Some(old) = &old {
                inst.create_index = old.create_index;
                inst.inherit_statuses(old);
                RegistryEventKind::InstanceUpdated
            } else {
                RegistryEventKind::InstanceRegistered
            };
            entry.index = rev;
            events.push(Self::instance_event(kind, entry, &inst));
            entry.sweep_by(inst.due(&entry.def.health));
            entry.instances.insert(id.clone(), inst);
            old
        });
        if let Some(old) = &old {
            self.cancel_checks(ns, service, old);
        }
        for def in active {
            self.checks.schedule(CheckKey { namespace: ns.into(), service: service.into(), instance: id.clone(), check: def.id.clone() }, def);
        }
        self.metrics.registrations.inc();
        Ok(rev)
    }

    pub async fn deregister(&self, ns: &str, service: &str, id: &str) -> Result<u64, RegistryError> {
        let existing = self.instance(ns, service, id).ok_or_else(|| RegistryError::InstanceNotFound(id.into()))?;
        let _order = if existing.ephemeral { None } else { Some(self.persist_order.key(ns, service, id).await) };
        if !existing.ephemeral {
            delete_key(&*self.store, instance_key(ns, service, id)).await?;
        }
        self.remove_instance(ns, service, id).ok_or_else(|| RegistryError::InstanceNotFound(id.into()))
    }

    /// Removes an ephemeral instance registered with `owner` (by [`Registry::register_owned`])
    /// when its owner lets it go (a closed connection); one re-registered since, with another
    /// owner or none, stays. The revision of the removal, if there was one.
    pub fn release(&self, owner: &Arc<Owner>, ns: &str, service: &str, id: &str) -> Option<u64> {
        self.remove_instance_if(ns, service, id, |inst| inst.owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, owner)))
    }

    /// Removes an instance from memory; drops an implicit service once it has no instances.
    fn remove_instance(&self, ns: &str, service: &str, id: &str) -> Option<u64> {
        self.remove_instance_if(ns, service, id, |_| true)
    }

    fn remove_instance_if(&self, ns: &str, service: &str, id: &str, only: impl FnOnce(&InstanceEntry) -> bool) -> Option<u64> {
        let (removed, rev) = self.mutate(ns, service, |state, rev, events| {
            let entry = state.services.get_mut(named(&(ns, service)))?;
            if !only(entry.instances.get(id)?) {
                return None;
            }
            let inst = entry.instances.remove(id)?;
            entry.index = rev;
            events.push(Self::instance_event(RegistryEventKind::InstanceDeregistered, entry, &inst));
            if entry.instances.is_empty() && !entry.def.defined {
                state.services.remove(named(&(ns, service)));
                state.tombstones.insert((ns.to_string(), service.to_string()), rev);
            }
            Some(inst)
        });
        let inst = removed?;
        self.cancel_checks(ns, service, &inst);
        Some(rev)
    }

    fn cancel_checks(&self, ns: &str, service: &str, inst: &InstanceEntry) {
        for c in inst.checks.iter().filter(|c| c.def.kind.is_active()) {
            self.checks.cancel(&CheckKey { namespace: ns.into(), service: service.into(), instance: inst.reg.id.clone(), check: c.def.id.clone() });
        }
    }

    /// Records a heartbeat. The hot path takes only the shared lock and stores an atomic.
    pub fn heartbeat(&self, ns: &str, service: &str, id: &str) -> Result<(), RegistryError> {
        let now = self.now_ms();
        let revive = self
            .read_service(ns, service, |e| {
                let inst = e.instances.get(id)?;
                inst.last_beat.store(now, Ordering::Relaxed);
                Some(inst.heartbeat_status != HealthStatus::Passing)
            })
            .ok_or_else(|| RegistryError::InstanceNotFound(id.into()))?;
        self.metrics.heartbeats.inc();
        if revive {
            self.update_instance(ns, service, id, |inst, _| {
                inst.heartbeat_status = HealthStatus::Passing;
                true
            });
        }
        Ok(())
    }

    /// Mutates one instance in memory; `f` returns whether anything visible changed.
    fn update_instance(&self, ns: &str, service: &str, id: &str, f: impl FnOnce(&mut InstanceEntry, u64) -> bool) -> Option<u64> {
        let now = self.now_ms();
        let (changed, rev) = self.mutate(ns, service, |state, rev, events| {
            let entry = state.services.get_mut(named(&(ns, service)))?;
            let inst = entry.instances.get_mut(id)?;
            let changed = f(inst, now);
            // Whatever `f` did (a TTL renewed, a check gone critical, a revival), the reaper
            // sees it in time.
            entry.sweep_due.fetch_min(inst.due(&entry.def.health), Ordering::Relaxed);
            if !changed {
                return Some(false);
            }
            inst.modify_index = rev;
            let inst_view = Self::instance_event(RegistryEventKind::InstanceUpdated, entry, entry.instances.get(id)?);
            entry.index = rev;
            events.push(inst_view);
            Some(true)
        });
        changed?;
        Some(rev)
    }

    /// Records a gateway's passive-health report (an ejection) on an instance; informational.
    pub fn report_passive(&self, ns: &str, service: &str, id: &str, ejected_for: Duration, reason: &str) -> Result<u64, RegistryError> {
        let now = unix_ms();
        let report = zhili_model::PassiveHealth { ejected_until_ms: now + ejected_for.as_millis() as u64, reason: reason.to_string(), reported_ms: now };
        self.update_instance(ns, service, id, |inst, _| {
            inst.passive = Some(Box::new(report));
            true
        })
        .ok_or_else(|| RegistryError::InstanceNotFound(id.into()))
    }

    /// Records a gateway's circuit-breaker transition on a service (shown with the service).
    pub fn report_breaker(&self, ns: &str, service: &str, state: &str, reason: &str) -> Result<(), RegistryError> {
        if self.read_service(ns, service, |_| Some(())).is_none() {
            return Err(RegistryError::ServiceNotFound(service.into()));
        }
        let report = zhili_model::BreakerReport { state: state.to_string(), reason: reason.to_string(), reported_ms: unix_ms() };
        self.breakers.lock().insert((ns.to_string(), service.to_string()), report);
        Ok(())
    }

    /// Sets a TTL check's status (the "pass/warn/fail" API).
    pub fn update_ttl_check(&self, ns: &str, service: &str, id: &str, check: &str, status: HealthStatus, output: &str) -> Result<u64, RegistryError> {
        let api_driven = self
            .read_service(ns, service, |e| e.instances.get(id).map(|inst| inst.checks.iter().find(|c| c.def.id == check).map(|c| c.def.kind.is_api_driven())))
            .ok_or_else(|| RegistryError::InstanceNotFound(id.into()))?;
        match api_driven {
            None => return Err(RegistryError::CheckNotFound(check.into())),
            Some(false) => return Err(RegistryError::NotTtl(check.into())),
            Some(true) => {}
        }
        let wall = unix_ms();
        let rev = self.update_instance(ns, service, id, |inst, now| {
            let Some(c) = inst.checks.iter_mut().find(|c| c.def.id == check) else { return false };
            if let CheckKind::Ttl { ttl } = c.def.kind {
                c.ttl_deadline_ms = Some(now + ttl.as_millis() as u64);
            }
            c.set(status, output, wall, now)
        });
        Ok(rev.unwrap_or_else(|| self.index()))
    }

    pub async fn set_maintenance(&self, ns: &str, service: &str, id: &str, enabled: bool, reason: &str) -> Result<u64, RegistryError> {
        let existing = self.instance(ns, service, id).ok_or_else(|| RegistryError::InstanceNotFound(id.into()))?;
        let maintenance = enabled.then(|| {
            existing
                .maintenance
                .clone()
                .map(|m| Maintenance { reason: reason.into(), ..m })
                .unwrap_or(Maintenance { reason: reason.into(), since_ms: unix_ms() })
        });
        let _order = if existing.ephemeral { None } else { Some(self.persist_order.key(ns, service, id).await) };
        if !existing.ephemeral {
            let p = self.persisted(ns, service, id).ok_or_else(|| RegistryError::InstanceNotFound(id.into()))?;
            self.persist_existing(ns, service, id, PersistedInstance { maintenance: maintenance.clone(), ..p }).await?;
        }
        self.update_instance(ns, service, id, |inst, _| {
            inst.maintenance = maintenance;
            true
        })
        .ok_or_else(|| RegistryError::InstanceNotFound(id.into()))
    }

    /// Writes a persistent instance's stored form, only if it is still there: a concurrent
    /// deregister must not be resurrected.
    async fn persist_existing(&self, ns: &str, service: &str, id: &str, p: PersistedInstance) -> Result<(), RegistryError> {
        let value = serde_json::to_vec(&p).expect("instance serializes");
        let res = self.store.txn(Txn::put(instance_key(ns, service, id), value).when(Compare::Exists(instance_key(ns, service, id)))).await?;
        if !res.succeeded {
            return Err(RegistryError::InstanceNotFound(id.into()));
        }
        Ok(())
    }

    /// Records what an instance reports about itself (state, tasks, planned work); durable
    /// before it answers for a persistent instance, kept with an ephemeral one while it lives.
    pub async fn set_report(&self, ns: &str, service: &str, id: &str, spec: ReportSpec) -> Result<u64, RegistryError> {
        let report = InstanceReport { spec, reported_ms: unix_ms() };
        let persistent = !self.is_ephemeral(ns, service, id)?;
        let _order = if persistent { Some(self.persist_order.key(ns, service, id).await) } else { None };
        if persistent {
            let p = self.persisted(ns, service, id).ok_or_else(|| RegistryError::InstanceNotFound(id.into()))?;
            self.persist_existing(ns, service, id, PersistedInstance { report: Some(report.clone()), ..p }).await?;
        }
        self.update_instance(ns, service, id, |inst, _| {
            let changed = inst.report.as_ref().is_none_or(|r| r.spec != report.spec);
            inst.report = Some(Box::new(report));
            changed
        })
        .ok_or_else(|| RegistryError::InstanceNotFound(id.into()))
    }

    /// Whether the instance is ephemeral; an error if it does not exist.
    fn is_ephemeral(&self, ns: &str, service: &str, id: &str) -> Result<bool, RegistryError> {
        self.read_service(ns, service, |e| e.instances.get(id).map(|i| i.reg.ephemeral)).ok_or_else(|| RegistryError::InstanceNotFound(id.into()))
    }

    /// Applies a result from the health engine. Unknown checks (deregistered meanwhile) are ignored.
    pub fn apply_transition(&self, t: &HealthTransition) {
        let wall = unix_ms();
        self.update_instance(&t.key.namespace, &t.key.service, &t.key.instance, |inst, now| {
            inst.checks.iter_mut().find(|c| c.def.id == t.key.check).is_some_and(|c| c.set(t.status, &t.output, wall, now))
        });
    }

    /// Periodic housekeeping: stale heartbeats, expired TTLs, deregister-critical-after.
    pub async fn reap(&self) {
        let now = self.now_ms();
        let wall = unix_ms();
        let mut stale: Vec<(String, String, String)> = Vec::new();
        let mut remove: Vec<(String, String, String, bool)> = Vec::new();
        let mut scanned = 0;
        for shard in self.each_shard() {
            for ((ns, svc), e) in &shard.services {
                // Nothing here can be due yet; a shared lock keeps writers (who lower it) out.
                if now < e.sweep_due.load(Ordering::Relaxed) {
                    continue;
                }
                scanned += e.instances.len() as u64;
                let h = e.def.health;
                // The next pass's due time, from the instances left as they are (those handled
                // below lower it again through `update_instance`, or are removed).
                let mut next = u64::MAX;
                for inst in e.instances.values() {
                    let key = || (ns.clone(), svc.clone(), inst.reg.id.clone());
                    if inst.reg.ephemeral {
                        let age = now.saturating_sub(inst.last_beat());
                        if age > h.remove_after.as_millis() as u64 {
                            let (a, b, c) = key();
                            remove.push((a, b, c, true));
                            continue;
                        }
                        let beating = age <= h.unhealthy_after.as_millis() as u64;
                        if beating != (inst.heartbeat_status == HealthStatus::Passing) {
                            // Gone silent, or (owned instances: their owner's beat does not pass
                            // through `heartbeat`) beating again.
                            stale.push(key());
                            continue;
                        }
                    }
                    if inst.checks.iter().any(|c| c.ttl_expired(now) || c.deregister_due(now)) {
                        stale.push(key());
                        continue;
                    }
                    next = next.min(inst.due(&h));
                }
                e.sweep_due.store(next, Ordering::Relaxed);
            }
        }
        self.metrics.reaper_scanned.inc_by(scanned);
        for (ns, svc, id) in stale {
            let mut deregister = false;
            let def_health = self.read_service(&ns, &svc, |e| Some(e.def.health));
            let Some(h) = def_health else { continue };
            self.update_instance(&ns, &svc, &id, |inst, now| {
                let mut changed = false;
                if inst.reg.ephemeral {
                    let beating = now.saturating_sub(inst.last_beat()) <= h.unhealthy_after.as_millis() as u64;
                    let status = if beating { HealthStatus::Passing } else { HealthStatus::Critical };
                    if inst.heartbeat_status != status {
                        inst.heartbeat_status = status;
                        changed = true;
                    }
                }
                for c in &mut inst.checks {
                    if c.ttl_expired(now) {
                        c.ttl_deadline_ms = None;
                        changed |= c.set(HealthStatus::Critical, "TTL expired", wall, now);
                    }
                    deregister |= c.deregister_due(now);
                }
                changed
            });
            if deregister {
                let ephemeral = self.instance(&ns, &svc, &id).is_some_and(|i| i.ephemeral);
                remove.push((ns, svc, id, ephemeral));
            }
        }
        for (ns, svc, id, ephemeral) in remove {
            if ephemeral {
                self.remove_instance(&ns, &svc, &id);
            } else if let Err(e) = self.deregister(&ns, &svc, &id).await {
                tracing::warn!(error = %e, service = %svc, instance = %id, "deregister-critical-after failed");
            }
        }
    }

    /// Recomputes the instance gauges: one pass under the read lock, so it runs at scrape time,
    /// never on the write path (that would make each registration O(instances)).
    fn refresh_gauges(&self) {
        let mut counts: HashMap<HealthStatus, i64> = HashMap::new();
        let mut services = 0;
        for shard in self.each_shard() {
            services += shard.services.len();
            for e in shard.services.values() {
                for i in e.instances.values() {
                    *counts.entry(i.health()).or_default() += 1;
                }
            }
        }
        for s in [HealthStatus::Passing, HealthStatus::Warning, HealthStatus::Critical] {
            self.metrics.instances.get_or_create(&HealthLabel { health: s.as_str() }).set(counts.get(&s).copied().unwrap_or(0));
        }
        self.metrics.services.set(services as i64);
    }

    /// Refreshes gauges that drift with time (heartbeat-derived health); call before a scrape.
    pub fn observe(&self) {
        self.refresh_gauges();
    }
}

async fn delete_key(store: &dyn Store, key: String) -> Result<(), StoreError> {
    store.txn(Txn { success: vec![Op::Delete { key }], ..Default::default() }).await.map(|_| ())
}

/// Shared atomic used by instances for their last heartbeat (ms since registry start).
pub(crate) type BeatCell = AtomicU64;

/// Changes the [`Journal`] holds for its reader before it drops them.
pub const JOURNAL_LIMIT: usize = 1 << 18;

/// Changes waiting in the journal, and those dropped since the reader was last told.
#[derive(Default)]
struct JournalCounts {
    queued: AtomicUsize,
    dropped: AtomicU64,
}

struct JournalFeed {
    tx: mpsc::UnboundedSender<Arc<RegistryEvent>>,
    counts: Arc<JournalCounts>,
}

impl JournalFeed {
    fn send(&self, ev: &Arc<RegistryEvent>) {
        if self.counts.queued.fetch_add(1, Ordering::Relaxed) >= JOURNAL_LIMIT || self.tx.send(ev.clone()).is_err() {
            self.counts.queued.fetch_sub(1, Ordering::Relaxed);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The reading end of [`Registry::journal`]: every change, in the order each service's changes
/// happened.
pub struct Journal {
    rx: mpsc::UnboundedReceiver<Arc<RegistryEvent>>,
    counts: Arc<JournalCounts>,
}

/// What [`Journal::recv`] hands out.
pub enum Journaled {
    Change(Arc<RegistryEvent>),
    /// This many changes were dropped (more than [`JOURNAL_LIMIT`] waited) before the next one.
    Missed(u64),
}

impl Journal {
    /// The next change; None once the registry is gone.
    pub async fn recv(&mut self) -> Option<Journaled> {
        let missed = self.counts.dropped.swap(0, Ordering::Relaxed);
        if missed > 0 {
            return Some(Journaled::Missed(missed));
        }
        let ev = self.rx.recv().await?;
        self.counts.queued.fetch_sub(1, Ordering::Relaxed);
        Some(Journaled::Change(ev))
    }

    /// The next change if one is waiting (never reports drops: [`Journal::recv`] does).
    pub fn try_recv(&mut self) -> Option<Arc<RegistryEvent>> {
        let ev = self.rx.try_recv().ok()?;
        self.counts.queued.fetch_sub(1, Ordering::Relaxed);
        Some(ev)
    }
}

/// Whatever keeps a group of ephemeral instances registered, such as the client connection
/// that registered them (a Nacos 2.x connection owns its instances): one
/// [`Registry::beat_owner`] renews them all, however many there are, where a heartbeat per
/// instance would cost the beater work in proportion to them. An owner that stops beating
/// (its connection is gone) lets its instances lapse like any silent instance.
pub struct Owner {
    last_beat: BeatCell,
}

#[cfg(test)]
mod tests;

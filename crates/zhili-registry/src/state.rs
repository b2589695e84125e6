//! In-memory registry state, in shards. Only `Registry` mutates it, always under the write lock
//! of the shard the service hashes to.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use zhili_model::{CheckDefinition, CheckKind, CheckState, HealthDefaults, HealthStatus, Instance, InstanceRegistration, Maintenance, Service};

use crate::BeatCell;

/// A service's (namespace, name) as the registry's maps key it. Lookups go through
/// [`Named`], so a pair of `&str` finds an owned key without building one: no allocation per
/// lookup on the read, beat and watch paths.
pub(crate) type ServiceKey = (String, String);

pub(crate) trait Named {
    fn parts(&self) -> (&str, &str);
}

impl Named for ServiceKey {
    fn parts(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl Named for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn Named + 'a> for ServiceKey {
    fn borrow(&self) -> &(dyn Named + 'a) {
        self
    }
}

// Hashes as the owned pair does (a tuple hashes its fields in order, a `String` as its `str`).
impl std::hash::Hash for dyn Named + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn Named + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn Named + '_ {}

/// `(namespace, name)` as a key to look up in the registry's maps.
pub(crate) fn named<'a>(key: &'a (&'a str, &'a str)) -> &'a (dyn Named + 'a) {
    key
}

/// The services whose (namespace, name) hash to one shard, with their instances.
#[derive(Default)]
pub(crate) struct Shard {
    pub services: HashMap<ServiceKey, ServiceEntry>,
    /// Index at which a service was deleted, so blocking reads on it wake and report the change.
    pub tombstones: HashMap<ServiceKey, u64>,
}

pub(crate) struct ServiceEntry {
    pub def: Service,
    /// Revision of the latest change to the service or any of its instances.
    pub index: u64,
    pub instances: BTreeMap<String, InstanceEntry>,
    /// The rendered default discovery answer (healthy, unfiltered) and the index it reflects.
    /// Every visible change bumps `index`, so a stale entry is recognised, never served.
    /// Its own small lock, so readers under the shard's shared lock can fill it.
    pub rendered: parking_lot::Mutex<Option<(u64, bytes::Bytes)>>,
    /// Registry-epoch ms before which the reaper has nothing to do here: no instance can go
    /// silent, expire a TTL or be due for removal sooner. Heartbeats only move that later;
    /// whatever can move it sooner (a registration, any instance update, the service's health
    /// settings) lowers it under the shard's write lock, so a service of a million healthy
    /// instances is scanned when its first instance is due, not on every pass.
    pub sweep_due: AtomicU64,
}

impl ServiceEntry {
    pub fn new(def: Service, index: u64) -> Self {
        Self { def, index, instances: BTreeMap::new(), rendered: parking_lot::Mutex::new(None), sweep_due: AtomicU64::new(0) }
    }

    /// Lowers [`ServiceEntry::sweep_due`] to `due` (an instance's [`InstanceEntry::due`]).
    pub fn sweep_by(&self, due: u64) {
        self.sweep_due.fetch_min(due, Ordering::Relaxed);
    }
}

pub(crate) struct InstanceEntry {
    pub reg: InstanceRegistration,
    pub create_index: u64,
    pub modify_index: u64,
    pub maintenance: Option<Maintenance>,
    pub checks: Vec<CheckRuntime>,
    /// Registry-epoch milliseconds of the last heartbeat; atomic so heartbeats need only a read lock.
    pub last_beat: BeatCell,
    /// What else keeps this ephemeral instance alive (its client's connection): its beats count
    /// as the instance's own.
    pub owner: Option<std::sync::Arc<crate::Owner>>,
    /// Heartbeat-derived health of an ephemeral instance (always passing for persistent ones).
    pub heartbeat_status: HealthStatus,
    /// Boxed, as the report below: most instances have neither, and every instance record is
    /// smaller for it (a node holds a million of them).
    pub passive: Option<Box<zhili_model::PassiveHealth>>,
    pub report: Option<Box<zhili_model::report::InstanceReport>>,
}

pub(crate) struct CheckRuntime {
    pub def: CheckDefinition,
    pub status: HealthStatus,
    pub output: String,
    /// Unix milliseconds of the last status change.
    pub last_change_ms: u64,
    /// Registry-epoch ms after which a TTL check turns critical.
    pub ttl_deadline_ms: Option<u64>,
    /// Registry-epoch ms since the check has been critical.
    pub critical_since_ms: Option<u64>,
}

impl CheckRuntime {
    /// Returns whether the status changed. The output is kept either way.
    pub fn set(&mut self, status: HealthStatus, output: &str, wall_ms: u64, now: u64) -> bool {
        self.output = output.chars().take(4096).collect();
        if status == self.status {
            return false;
        }
        self.status = status;
        self.last_change_ms = wall_ms;
        self.critical_since_ms = (status == HealthStatus::Critical).then_some(now);
        true
    }

    pub fn ttl_expired(&self, now: u64) -> bool {
        matches!(self.def.kind, CheckKind::Ttl { .. }) && self.ttl_deadline_ms.is_some_and(|d| now > d)
    }

    pub fn deregister_due(&self, now: u64) -> bool {
        match (self.def.deregister_critical_after, self.critical_since_ms) {
            (Some(after), Some(since)) if self.status == HealthStatus::Critical => now.saturating_sub(since) >= after.as_millis() as u64,
            _ => false,
        }
    }
}

impl InstanceEntry {
    pub fn new(reg: InstanceRegistration, create_index: u64, modify_index: u64, now: u64, maintenance: Option<Maintenance>) -> Self {
        let wall = crate::unix_ms();
        // As in Consul, a check is critical until it has passed once.
        let checks = reg
            .checks
            .iter()
            .map(|def| CheckRuntime {
                def: def.clone(),
                status: HealthStatus::Critical,
                output: "not yet checked".into(),
                last_change_ms: wall,
                ttl_deadline_ms: None,
                critical_since_ms: Some(now),
            })
            .collect();
        Self {
            reg,
            create_index,
            modify_index,
            maintenance,
            checks,
            last_beat: BeatCell::new(now),
            owner: None,
            heartbeat_status: HealthStatus::Passing,
            passive: None,
            report: None,
        }
    }

    /// Registry-epoch milliseconds of the latest heartbeat, its own or its owner's.
    pub fn last_beat(&self) -> u64 {
        let own = self.last_beat.load(Ordering::Relaxed);
        self.owner.as_ref().map_or(own, |o| own.max(o.last_beat.load(Ordering::Relaxed)))
    }

    /// The earliest registry-epoch ms at which the reaper may have something to do for this
    /// instance as it stands (`u64::MAX`: nothing, until something changes it): going silent,
    /// being removed, a TTL running out, deregister-critical-after. 0 for an owned instance that
    /// is critical for silence, since its owner's beat revives it without passing through
    /// [`crate::Registry::heartbeat`].
    pub fn due(&self, h: &HealthDefaults) -> u64 {
        let mut due = u64::MAX;
        if self.reg.ephemeral {
            let beat = self.last_beat();
            if self.heartbeat_status == HealthStatus::Passing {
                due = beat.saturating_add(h.unhealthy_after.as_millis() as u64 + 1);
            } else if self.owner.is_some() {
                return 0;
            }
            due = due.min(beat.saturating_add(h.remove_after.as_millis() as u64 + 1));
        }
        for c in &self.checks {
            if let (CheckKind::Ttl { .. }, Some(d)) = (&c.def.kind, c.ttl_deadline_ms) {
                due = due.min(d.saturating_add(1));
            }
            if let (Some(after), Some(since), HealthStatus::Critical) = (c.def.deregister_critical_after, c.critical_since_ms, c.status) {
                due = due.min(since.saturating_add(after.as_millis() as u64));
            }
        }
        due
    }

    /// Re-registration keeps the results of checks whose definition did not change.
    pub fn inherit_statuses(&mut self, old: &InstanceEntry) {
        self.passive = old.passive.clone();
        self.report = old.report.clone();
        for c in &mut self.checks {
            if let Some(o) = old.checks.iter().find(|o| o.def == c.def) {
                c.status = o.status;
                c.output = o.output.clone();
                c.last_change_ms = o.last_change_ms;
                c.ttl_deadline_ms = o.ttl_deadline_ms;
                c.critical_since_ms = o.critical_since_ms;
            }
        }
    }

    /// [`Instance::is_serving`] of this instance's view, without building the view (a service
    /// listing counts them for every instance of every service).
    pub fn is_serving(&self) -> bool {
        self.reg.enabled && self.maintenance.is_none() && self.health() == HealthStatus::Passing
    }

    pub fn health(&self) -> HealthStatus {
        self.checks.iter().map(|c| c.status).chain(std::iter::once(self.heartbeat_status)).max().unwrap_or(HealthStatus::Passing)
    }

    pub fn view(&self, svc: &Service) -> Instance {
        let r = &self.reg;
        Instance {
            id: r.id.clone(),
            namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            address: r.address.clone(),
            port: r.port,
            weight: r.weight,
            tags: r.tags.clone(),
            metadata: r.metadata.clone(),
            zone: r.zone.clone(),
            version: r.version.clone(),
            enabled: r.enabled,
            ephemeral: r.ephemeral,
            maintenance: self.maintenance.clone(),
            health: self.health(),
            checks: self
                .checks
                .iter()
                .map(|c| CheckState {
                    id: c.def.id.clone(),
                    name: c.def.name.clone(),
                    kind: c.def.kind.name().into(),
                    status: c.status,
                    output: c.output.clone(),
                    last_change_ms: c.last_change_ms,
                })
                .collect(),
            create_index: self.create_index,
            modify_index: self.modify_index,
            passive_health: self.passive.as_deref().cloned(),
            report: self.report.as_deref().cloned(),
            node: r.node.as_deref().cloned(),
        }
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn a_pair_of_strs_finds_its_owned_key_and_only_that() {
        let mut m: HashMap<ServiceKey, u32> = HashMap::new();
        m.insert(("ab".into(), "c".into()), 1);
        m.insert(("a".into(), "bc".into()), 2);
        assert_eq!(m.get(named(&("ab", "c"))), Some(&1));
        assert_eq!(m.get(named(&("a", "bc"))), Some(&2), "the split between the parts counts");
        assert_eq!(m.get(named(&("abc", ""))), None);
        assert_eq!(m.remove(named(&("ab", "c"))), Some(1));
        assert_eq!(m.get(named(&("ab", "c"))), None);
    }
}

//! Plans: planned work that runs on schedule and stops itself on bad feedback. A plan is an
//! ordered list of steps (maintenance, rollout, config, approve, wait); while a step bakes its
//! gates are checked continuously (the gateway's error ratio and p99 for a rollout's target,
//! the share of serving instances, the absence of chosen events, service reports), and a failing
//! gate pauses the plan or rolls back everything it changed.
//!
//! Durability: a plan is one Store record (`plans/{name}`); every change to the world is
//! preceded by a durable undo entry saying how to take it back, and every decision is written
//! with its reason. A restart reloads unfinished plans and continues each where it was.
//!
//! The engine changes the world only through [`Environment`] (the registry, routes, KV and the
//! gateway's counters, wired by the binary), and reads events from the event log directly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use zhili_model::event::{parse_rfc3339_ms, timestamp};
use zhili_model::plan::{Gate, GateFailure, Metric, PlanSpec, PlanStatus, Step};
use zhili_model::route::{RouteSpec, SplitTarget, Subset};
use zhili_model::{parse_duration, validate, Instance, ValidationError, DEFAULT_NAMESPACE};
use zhili_store::events::{Direction, EventLog, EventLogError, NewEvent};
use zhili_store::{Op, Store, StoreError, Txn};

pub const PLANS: &str = "plans/";
pub const PLANS_STREAM: &str = "$plans";
/// Decisions kept per plan (the oldest go first).
const MAX_HISTORY: usize = 500;
/// Plans stored at once (finished ones count until deleted).
pub const MAX_PLANS: usize = 1000;
/// Events read back when checking a `no_event` gate.
const EVENT_SCAN: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    Conflict(String),
    #[error("plan {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored plan {0:?} is corrupt: {1}")]
    Corrupt(String, String),
}

/// What the gateway saw for one target since a moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Traffic {
    pub requests: u64,
    /// Answered 5xx or failed upstream.
    pub errors: u64,
    pub p99_ms: Option<f64>,
}

/// The world a plan changes and watches, wired by the binary.
#[async_trait::async_trait]
pub trait Environment: Send + Sync + 'static {
    /// Every instance of a service (serving or not); None for an unknown service.
    fn instances(&self, namespace: &str, service: &str) -> Option<Vec<Instance>>;
    async fn set_maintenance(&self, namespace: &str, service: &str, id: &str, on: bool, reason: &str) -> Result<(), String>;
    fn route(&self, name: &str) -> Option<RouteSpec>;
    /// Validates (as the API does) and stores a route.
    async fn put_route(&self, name: &str, spec: &RouteSpec) -> Result<(), String>;
    fn kv_get(&self, key: &str) -> Result<Option<Bytes>, String>;
    async fn kv_put(&self, key: &str, value: Bytes) -> Result<(), String>;
    async fn kv_delete(&self, key: &str) -> Result<(), String>;
    /// The gateway's own counters for `route`'s requests sent to `service`'s `subset` since
    /// `since_ms`; None when nothing is known (no gateway, an unknown route).
    fn traffic(&self, route: &str, namespace: &str, service: &str, subset: &Subset, since_ms: u64) -> Option<Traffic>;
}

/// A world with nothing in it (for in-process tests of the API): plans naming services, routes
/// or keys are refused or fail their gates.
pub struct EmptyWorld;

#[async_trait::async_trait]
impl Environment for EmptyWorld {
    fn instances(&self, _: &str, _: &str) -> Option<Vec<Instance>> {
        None
    }
    async fn set_maintenance(&self, _: &str, _: &str, _: &str, _: bool, _: &str) -> Result<(), String> {
        Err("no registry".into())
    }
    fn route(&self, _: &str) -> Option<RouteSpec> {
        None
    }
    async fn put_route(&self, _: &str, _: &RouteSpec) -> Result<(), String> {
        Err("no routes".into())
    }
    fn kv_get(&self, _: &str) -> Result<Option<Bytes>, String> {
        Err("no KV".into())
    }
    async fn kv_put(&self, _: &str, _: Bytes) -> Result<(), String> {
        Err("no KV".into())
    }
    async fn kv_delete(&self, _: &str) -> Result<(), String> {
        Err("no KV".into())
    }
    fn traffic(&self, _: &str, _: &str, _: &str, _: &Subset, _: u64) -> Option<Traffic> {
        None
    }
}

/// How to take back one change a plan made; written before the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Change {
    Route {
        name: String,
        previous: Box<RouteSpec>,
    },
    Maintenance {
        namespace: String,
        service: String,
        ids: Vec<String>,
    },
    /// `previous` is base64 (absent: the key did not exist).
    Config {
        key: String,
        previous: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Undo {
    /// The step that made the change.
    pub step: usize,
    #[serde(flatten)]
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    pub decision: String,
    pub reason: String,
}

/// A stored plan: its definition and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub spec: PlanSpec,
    pub status: PlanStatus,
    /// The step under way (the number of steps once finished successfully).
    pub step: usize,
    /// Within a rollout: which of its percentages is applied.
    pub phase: usize,
    /// The current step's change is made (instances drained, weight applied, approval asked).
    pub applied: bool,
    pub approved: bool,
    /// When the current step began (Unix ms), for `no_event` gates.
    pub step_started_ms: u64,
    /// When the current bake (re)started, and what was baked before a pause.
    pub since_ms: u64,
    pub baked_ms: u64,
    pub undo: Vec<Undo>,
    pub history: Vec<Decision>,
    pub created_ms: u64,
}

/// `POST /api/v1/plans/{plan}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
    Approve,
}

impl Control {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "abort" => Self::Abort,
            "approve" => Self::Approve,
            _ => return None,
        })
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn status_name(s: PlanStatus) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn subset_matches(s: &Subset, i: &Instance) -> bool {
    s.tags.iter().all(|t| i.tags.contains(t))
        && s.version.as_ref().is_none_or(|v| i.version.as_ref() == Some(v))
        && s.zone.as_ref().is_none_or(|z| i.zone.as_ref() == Some(z))
}

fn describe(s: &Subset) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The one service a route forwards to: its `service`, or the service every split target shares.
fn route_service(r: &RouteSpec) -> Option<(String, String)> {
    if let Some(s) = &r.service {
        return Some((r.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.into()), s.clone()));
    }
    let first = r.split.first()?;
    let ns = first.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    r.split
        .iter()
        .all(|t| t.service == first.service && t.namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.into()) == ns)
        .then(|| (ns, first.service.clone()))
}

/// The route with its traffic split `100 - pct` to `from` and `pct` to `to`.
fn split_route(current: &RouteSpec, ns: &str, service: &str, from: &Subset, to: &Subset, pct: u32) -> RouteSpec {
    let target = |subset: &Subset, weight: u32| SplitTarget {
        service: service.to_string(),
        namespace: (ns != DEFAULT_NAMESPACE).then(|| ns.to_string()),
        subset: (subset != &Subset::default()).then(|| subset.clone()),
        weight,
    };
    RouteSpec { service: None, namespace: None, subset: None, split: vec![target(from, 100 - pct.min(100)), target(to, pct.min(100))], ..current.clone() }
}

/// What a bake check decided.
enum Baked {
    /// Baking; look again after this long.
    Pending(Duration),
    Done,
    /// A gate failed; the plan paused or rolled back.
    Stopped,
}

struct Live {
    plan: tokio::sync::Mutex<Plan>,
    wake: Notify,
}

pub struct Plans {
    store: Arc<dyn Store>,
    env: Arc<dyn Environment>,
    log: Option<Arc<dyn EventLog>>,
    /// Decisions on their way to `$plans`, appended in order by one task.
    events: Option<tokio::sync::mpsc::Sender<NewEvent>>,
    live: parking_lot::Mutex<HashMap<String, Arc<Live>>>,
    /// One `apply` at a time, so two plans cannot both pass the overlap check.
    applying: tokio::sync::Mutex<()>,
    /// How often gates are checked while a step bakes.
    tick: Duration,
    stopped: std::sync::atomic::AtomicBool,
}

impl Plans {
    /// Loads stored plans and resumes the unfinished ones.
    pub fn start(store: Arc<dyn Store>, env: Arc<dyn Environment>, log: Option<Arc<dyn EventLog>>, tick: Duration) -> Result<Arc<Self>, PlanError> {
        let events = log.clone().map(|log| {
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            // Decisions reach $plans in the order they were made.
            tokio::spawn(zhili_store::events::append_queued(log, PLANS_STREAM, rx, 256));
            tx
        });
        let plans = Arc::new(Self { store, env, log, events, live: Default::default(), applying: Default::default(), tick, stopped: Default::default() });
        for kv in plans.store.range(PLANS, None)? {
            let p: Plan = serde_json::from_slice(&kv.value).map_err(|e| PlanError::Corrupt(kv.key.clone(), e.to_string()))?;
            if !p.status.finished() {
                plans.adopt(p);
            }
        }
        Ok(plans)
    }

    /// Stops every driver (a plan goes on after the next start).
    pub fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        for l in self.live.lock().values() {
            l.wake.notify_one();
        }
    }

    fn adopt(self: &Arc<Self>, p: Plan) {
        let name = p.name.clone();
        let live = Arc::new(Live { plan: tokio::sync::Mutex::new(p), wake: Notify::new() });
        self.live.lock().insert(name.clone(), live.clone());
        tokio::spawn(self.clone().drive(name, live));
    }

    fn live(&self, name: &str) -> Option<Arc<Live>> {
        self.live.lock().get(name).cloned()
    }

    fn load(&self, name: &str) -> Result<Option<Plan>, PlanError> {
        match self.store.get(&format!("{PLANS}{name}"))? {
            Some(kv) => serde_json::from_slice(&kv.value).map(Some).map_err(|e| PlanError::Corrupt(name.into(), e.to_string())),
            None => Ok(None),
        }
    }

    async fn save(&self, p: &Plan) -> Result<(), PlanError> {
        let value = serde_json::to_vec(p).map_err(|e| PlanError::Corrupt(p.name.clone(), e.to_string()))?;
        self.store.txn(Txn { success: vec![Op::Put { key: format!("{PLANS}{}", p.name), value: value.into(), lease: None }], ..Default::default() }).await?;
        Ok(())
    }

    /// Records a decision in the plan's history and on `$plans`.
    fn decide(&self, p: &mut Plan, decision: &str, reason: impl Into<String>) {
        let reason = reason.into();
        let now = now_ms();
        let step = (p.step < p.spec.steps.len()).then_some(p.step);
        tracing::info!(plan = %p.name, decision, %reason, "plan decision");
        p.history.push(Decision { at: timestamp(now), step, decision: decision.into(), reason: reason.clone() });
        if p.history.len() > MAX_HISTORY {
            p.history.drain(..p.history.len() - MAX_HISTORY);
        }
        if let Some(events) = &self.events {
            let id = format!("plan-{}-{now}-{}", p.name, p.history.len());
            let data = serde_json::json!({"plan": p.name, "step": step, "decision": decision, "reason": reason, "status": status_name(p.status)});
            let (kind, time) = (format!("io.zhili.plan.{decision}"), timestamp(now));
            let body = zhili_model::event::CloudEvent::new(&id, "zhili://plans", &kind, &p.name, &time, &data).to_vec();
            if events.try_send(NewEvent { id, body: body.into() }).is_err() {
                tracing::warn!(plan = %p.name, "the $plans queue is full; this decision stays in the plan's history only");
            }
        }
    }

    /// Validates a plan in full (its definition and everything it names, against live state),
    /// refuses one that shares a route, service or key with another active plan, stores it and
    /// starts it.
    pub async fn apply(self: &Arc<Self>, name: &str, spec: PlanSpec) -> Result<Plan, PlanError> {
        validate::name("plan", name)?;
        spec.validate()?;
        self.check_live(&spec)?;
        let _one = self.applying.lock().await;
        if let Some(l) = self.live(name) {
            let status = l.plan.lock().await.status;
            if !status.finished() {
                return Err(PlanError::Conflict(format!("plan {name:?} is {}; abort it before replacing it", status_name(status))));
            }
        }
        let touches = spec.touches();
        let others: Vec<Arc<Live>> = self.live.lock().values().cloned().collect();
        for other in others {
            let o = other.plan.lock().await;
            if o.status.finished() {
                continue;
            }
            if let Some(shared) = o.spec.touches().into_iter().find(|t| touches.contains(t)) {
                return Err(PlanError::Conflict(format!("plan {:?} ({}) also changes {shared}; plans never interleave", o.name, status_name(o.status))));
            }
        }
        if self.load(name)?.is_none() && self.store.range(PLANS, Some(MAX_PLANS))?.len() >= MAX_PLANS {
            return Err(PlanError::Conflict(format!("{MAX_PLANS} plans are stored; delete finished ones first")));
        }
        let now = now_ms();
        let status = match spec.start_at.as_deref().and_then(parse_rfc3339_ms) {
            Some(at) if at > now => PlanStatus::Scheduled,
            _ => PlanStatus::Running,
        };
        let mut p = Plan {
            name: name.into(),
            spec,
            status,
            step: 0,
            phase: 0,
            applied: false,
            approved: false,
            step_started_ms: now,
            since_ms: 0,
            baked_ms: 0,
            undo: vec![],
            history: vec![],
            created_ms: now,
        };
        let why = match status {
            PlanStatus::Scheduled => format!("starts at {}", p.spec.start_at.clone().unwrap_or_default()),
            _ => "starts now".into(),
        };
        self.decide(&mut p, "applied", why);
        self.save(&p).await?;
        self.adopt(p.clone());
        Ok(p)
    }

    /// Everything a plan names must exist now: services with instances, routes forwarding to
    /// one service, subsets matching instances of it.
    fn check_live(&self, spec: &PlanSpec) -> Result<(), ValidationError> {
        let service = |field: String, ns: &str, svc: &str| -> Result<Vec<Instance>, ValidationError> {
            match self.env.instances(ns, svc) {
                Some(list) if !list.is_empty() => Ok(list),
                _ => Err(ValidationError::new(field, format!("no instances of service {svc:?} in namespace {ns:?}"))),
            }
        };
        for (i, step) in spec.steps.iter().enumerate() {
            let f = |name: &str| format!("steps[{i}].{name}");
            let gates = match step {
                Step::Maintenance { service: svc, namespace, selector, gates, .. } => {
                    let ns = namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
                    let list = service(f("service"), ns, svc)?;
                    if let Some(sel) = selector {
                        if !list.iter().any(|inst| sel.matches(inst)) {
                            return Err(ValidationError::new(f("selector"), format!("matches no instance of {svc:?}")));
                        }
                    }
                    gates
                }
                Step::Rollout { route, from, to, gates, .. } => {
                    let r = self.env.route(route).ok_or_else(|| ValidationError::new(f("route"), format!("no route {route:?}")))?;
                    let (ns, svc) = route_service(&r)
                        .ok_or_else(|| ValidationError::new(f("route"), "must forward to one service (service, or a split of one service)"))?;
                    let list = service(f("route"), &ns, &svc)?;
                    for (field, s) in [("from", from), ("to", to)] {
                        if !list.iter().any(|inst| subset_matches(s, inst)) {
                            return Err(ValidationError::new(f(field), format!("{} matches no instance of {svc:?}", describe(s))));
                        }
                    }
                    gates
                }
                Step::Wait { gates, .. } => gates,
                Step::Config { .. } | Step::Approve { .. } => continue,
            };
            for (j, g) in gates.iter().enumerate() {
                if let Some(s) = &g.service {
                    service(f(&format!("gates[{j}].service")), DEFAULT_NAMESPACE, s)?;
                }
                if let Some(r) = &g.report {
                    service(f(&format!("gates[{j}].report.service")), DEFAULT_NAMESPACE, &r.service)?;
                }
                if g.metric == Some(Metric::HealthyRatio) && g.service.is_none() && matches!(step, Step::Wait { .. }) {
                    return Err(ValidationError::new(f(&format!("gates[{j}].service")), "a wait step's healthy_ratio gate names its service"));
                }
            }
        }
        Ok(())
    }

    pub async fn get(&self, name: &str) -> Result<Option<Plan>, PlanError> {
        match self.live(name) {
            Some(l) => Ok(Some(l.plan.lock().await.clone())),
            None => self.load(name),
        }
    }

    pub async fn list(&self) -> Result<Vec<Plan>, PlanError> {
        let mut out = Vec::new();
        for kv in self.store.range(PLANS, Some(MAX_PLANS))? {
            let p: Plan = serde_json::from_slice(&kv.value).map_err(|e| PlanError::Corrupt(kv.key.clone(), e.to_string()))?;
            out.push(match self.live(&p.name) {
                Some(l) => l.plan.lock().await.clone(),
                None => p,
            });
        }
        Ok(out)
    }

    /// Deletes a finished plan.
    pub async fn delete(&self, name: &str) -> Result<(), PlanError> {
        if self.live(name).is_some() {
            return Err(PlanError::Conflict(format!("plan {name:?} is not finished; abort it first")));
        }
        if self.load(name)?.is_none() {
            return Err(PlanError::NotFound(name.into()));
        }
        self.store.txn(Txn { success: vec![Op::Delete { key: format!("{PLANS}{name}") }], ..Default::default() }).await?;
        Ok(())
    }

    /// Pause, resume, abort or approve.
    pub async fn control(&self, name: &str, action: Control) -> Result<Plan, PlanError> {
        let Some(live) = self.live(name) else {
            return match self.load(name)? {
                Some(p) => Err(PlanError::Conflict(format!("plan {name:?} is {}", status_name(p.status)))),
                None => Err(PlanError::NotFound(name.into())),
            };
        };
        let mut p = live.plan.lock().await;
        let now = now_ms();
        match (action, p.status) {
            (Control::Pause, PlanStatus::Running | PlanStatus::Scheduled) => {
                if p.since_ms > 0 {
                    p.baked_ms += now.saturating_sub(p.since_ms);
                    p.since_ms = 0;
                }
                p.status = PlanStatus::Paused;
                self.decide(&mut p, "paused", "by request");
            }
            (Control::Resume, PlanStatus::Paused) => {
                p.status = PlanStatus::Running;
                if p.applied || p.baked_ms > 0 {
                    p.since_ms = now;
                }
                self.decide(&mut p, "resumed", "by request");
            }
            (Control::Approve, PlanStatus::Running | PlanStatus::Paused) if matches!(p.spec.steps.get(p.step), Some(Step::Approve { .. })) => {
                p.approved = true;
            }
            (Control::Abort, _) => {
                self.release_current(&mut p).await;
                p.status = PlanStatus::Aborted;
                self.decide(&mut p, "aborted", "by request; changes of finished steps stay");
            }
            (a, s) => return Err(PlanError::Conflict(format!("cannot {a:?} plan {name:?} while it is {} (step {})", status_name(s), p.step).to_lowercase())),
        }
        self.save(&p).await?;
        live.wake.notify_one();
        Ok(p.clone())
    }

    /// Works on one plan until it is finished.
    async fn drive(self: Arc<Self>, name: String, live: Arc<Live>) {
        loop {
            let wait = {
                let mut p = live.plan.lock().await;
                if p.status.finished() || self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                match self.advance(&mut p).await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(plan = %name, error = %e, "plan step failed; trying again");
                        Some(self.tick)
                    }
                }
            };
            match wait {
                Some(d) if d.is_zero() => {}
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = live.wake.notified() => {}
                    }
                }
                None => live.wake.notified().await,
            }
        }
        self.live.lock().remove(&name);
    }

    /// One round: returns when to look again (None: only when woken).
    async fn advance(&self, p: &mut Plan) -> Result<Option<Duration>, PlanError> {
        match p.status {
            PlanStatus::Scheduled => {
                let at = p.spec.start_at.as_deref().and_then(parse_rfc3339_ms).unwrap_or(0);
                let now = now_ms();
                if now < at {
                    return Ok(Some(Duration::from_millis((at - now).min(60_000))));
                }
                p.status = PlanStatus::Running;
                p.step_started_ms = now;
                self.decide(p, "started", "its start time came");
                self.save(p).await?;
                Ok(Some(Duration::ZERO))
            }
            PlanStatus::Running => self.run_step(p).await,
            _ => Ok(None),
        }
    }

    fn next_step(&self, p: &mut Plan) {
        p.step += 1;
        p.phase = 0;
        p.applied = false;
        p.approved = false;
        p.since_ms = 0;
        p.baked_ms = 0;
        p.step_started_ms = now_ms();
    }

    /// A change the world refused (a route the gateway would not take, ...): handled as a
    /// failing gate, so the plan pauses or rolls back instead of retrying blindly.
    async fn refused(&self, p: &mut Plan, why: String) -> Result<Option<Duration>, PlanError> {
        self.gate_failed(p, why).await?;
        Ok(Some(Duration::ZERO))
    }

    async fn run_step(&self, p: &mut Plan) -> Result<Option<Duration>, PlanError> {
        let Some(step) = p.spec.steps.get(p.step).cloned() else {
            p.status = PlanStatus::Succeeded;
            self.decide(p, "succeeded", "every step is done");
            self.save(p).await?;
            return Ok(None);
        };
        match step {
            Step::Config { key, value } => {
                if !p.undo.iter().any(|u| u.step == p.step) {
                    let previous = match self.env.kv_get(&key) {
                        Ok(v) => v.map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
                        Err(e) => return self.refused(p, format!("reading {key}: {e}")).await,
                    };
                    p.undo.push(Undo { step: p.step, change: Change::Config { key: key.clone(), previous } });
                    self.save(p).await?;
                }
                if let Err(e) = self.env.kv_put(&key, Bytes::from(value.into_bytes())).await {
                    return self.refused(p, format!("writing {key}: {e}")).await;
                }
                self.decide(p, "config_written", format!("{key} written; the previous value is kept for a rollback"));
                self.next_step(p);
                self.save(p).await?;
                Ok(Some(Duration::ZERO))
            }
            Step::Approve { message } => {
                if p.approved {
                    self.decide(p, "approved", "approved by request");
                    self.next_step(p);
                    self.save(p).await?;
                    return Ok(Some(Duration::ZERO));
                }
                if !p.applied {
                    p.applied = true;
                    self.decide(p, "waiting_for_approval", message.unwrap_or_else(|| "POST /api/v1/plans/{plan}/approve".into()));
                    self.save(p).await?;
                }
                Ok(None)
            }
            Step::Wait { duration, gates } => {
                if p.since_ms == 0 && p.baked_ms == 0 {
                    p.since_ms = now_ms();
                    self.save(p).await?;
                }
                match self.bake(p, &duration, &gates, None).await? {
                    Baked::Pending(d) => Ok(Some(d)),
                    Baked::Stopped => Ok(Some(Duration::ZERO)),
                    Baked::Done => {
                        self.decide(p, "waited", format!("{duration} passed with every gate passing"));
                        self.next_step(p);
                        self.save(p).await?;
                        Ok(Some(Duration::ZERO))
                    }
                }
            }
            Step::Maintenance { service, namespace, selector, duration, gates } => {
                let ns = namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
                if !p.applied {
                    let Some(list) = self.env.instances(&ns, &service) else {
                        return self.refused(p, format!("service {service:?} is gone")).await;
                    };
                    let sel = selector.unwrap_or_default();
                    let ids: Vec<String> = list.iter().filter(|i| sel.matches(i) && i.maintenance.is_none()).map(|i| i.id.clone()).collect();
                    // Written first, merged with what a run before a restart drained already.
                    match p.undo.iter_mut().find(|u| u.step == p.step) {
                        Some(Undo { change: Change::Maintenance { ids: held, .. }, .. }) => {
                            held.extend(ids.iter().filter(|id| !held.contains(id)).cloned().collect::<Vec<_>>());
                        }
                        _ => p
                            .undo
                            .push(Undo { step: p.step, change: Change::Maintenance { namespace: ns.clone(), service: service.clone(), ids: ids.clone() } }),
                    }
                    self.save(p).await?;
                    let reason = format!("plan {}: maintenance", p.name);
                    for id in &ids {
                        if let Err(e) = self.env.set_maintenance(&ns, &service, id, true, &reason).await {
                            tracing::warn!(plan = %p.name, %id, error = %e, "draining an instance failed");
                        }
                    }
                    p.applied = true;
                    p.since_ms = now_ms();
                    p.baked_ms = 0;
                    self.decide(p, "drained", format!("{} instance(s) of {service}: {}", ids.len(), ids.join(", ")));
                    self.save(p).await?;
                }
                match self.bake(p, &duration, &gates, Some((ns.as_str(), service.as_str()))).await? {
                    Baked::Pending(d) => Ok(Some(d)),
                    Baked::Stopped => Ok(Some(Duration::ZERO)),
                    Baked::Done => {
                        let returned = self.release_current(p).await;
                        self.decide(p, "returned", format!("{returned} instance(s) of {service} back after {duration}"));
                        self.next_step(p);
                        self.save(p).await?;
                        Ok(Some(Duration::ZERO))
                    }
                }
            }
            Step::Rollout { route, from, to, steps, bake, gates } => {
                let Some(pct) = steps.get(p.phase).copied() else {
                    self.decide(p, "rolled_out", format!("{route}: all traffic on {}", describe(&to)));
                    self.next_step(p);
                    self.save(p).await?;
                    return Ok(Some(Duration::ZERO));
                };
                let Some(current) = self.env.route(&route) else {
                    return self.refused(p, format!("route {route:?} is gone")).await;
                };
                let Some((ns, service)) = route_service(&current) else {
                    return self.refused(p, format!("route {route:?} no longer forwards to one service")).await;
                };
                if !p.applied {
                    if !p.undo.iter().any(|u| u.step == p.step) {
                        p.undo.push(Undo { step: p.step, change: Change::Route { name: route.clone(), previous: Box::new(current.clone()) } });
                        self.save(p).await?;
                    }
                    let spec = split_route(&current, &ns, &service, &from, &to, pct);
                    if let Err(e) = self.env.put_route(&route, &spec).await {
                        return self.refused(p, format!("route {route:?} refused the split: {e}")).await;
                    }
                    p.applied = true;
                    p.since_ms = now_ms();
                    p.baked_ms = 0;
                    self.decide(p, "weight_set", format!("{pct}% of {route} to {}, {}% to {}", describe(&to), 100 - pct, describe(&from)));
                    self.save(p).await?;
                }
                let target = Target { route: &route, namespace: &ns, service: &service, subset: &to };
                match self.bake_rollout(p, &bake, &gates, (&ns, &service), target).await? {
                    Baked::Pending(d) => Ok(Some(d)),
                    Baked::Stopped => Ok(Some(Duration::ZERO)),
                    Baked::Done => {
                        p.phase += 1;
                        p.applied = false;
                        p.since_ms = 0;
                        p.baked_ms = 0;
                        self.save(p).await?;
                        Ok(Some(Duration::ZERO))
                    }
                }
            }
        }
    }

    /// Returns the instances the current step drained; how many.
    async fn release_current(&self, p: &mut Plan) -> usize {
        let step = p.step;
        let mut n = 0;
        let (mine, rest): (Vec<Undo>, Vec<Undo>) = p.undo.drain(..).partition(|u| u.step == step && matches!(u.change, Change::Maintenance { .. }));
        p.undo = rest;
        for u in mine {
            if let Change::Maintenance { namespace, service, ids } = u.change {
                for id in ids {
                    match self.env.set_maintenance(&namespace, &service, &id, false, "").await {
                        Ok(()) => n += 1,
                        Err(e) => tracing::warn!(plan = %p.name, %id, error = %e, "returning an instance failed (gone?)"),
                    }
                }
            }
        }
        n
    }

    async fn bake(&self, p: &mut Plan, duration: &str, gates: &[Gate], service: Option<(&str, &str)>) -> Result<Baked, PlanError> {
        self.bake_with(p, duration, gates, service, None).await
    }

    async fn bake_rollout(&self, p: &mut Plan, duration: &str, gates: &[Gate], service: (&str, &str), target: Target<'_>) -> Result<Baked, PlanError> {
        self.bake_with(p, duration, gates, Some(service), Some(target)).await
    }

    /// Checks the gates; answers whether the bake is done, goes on, or stopped the plan.
    async fn bake_with(
        &self,
        p: &mut Plan,
        duration: &str,
        gates: &[Gate],
        service: Option<(&str, &str)>,
        target: Option<Target<'_>>,
    ) -> Result<Baked, PlanError> {
        let total = parse_duration("duration", duration).unwrap_or(Duration::ZERO).as_millis() as u64;
        let now = now_ms();
        let elapsed = p.baked_ms + now.saturating_sub(p.since_ms);
        // Traffic gates wait for some traffic: judged from a little into the bake.
        let warm = elapsed >= (total / 2).min(5_000);
        for (i, g) in gates.iter().enumerate() {
            if let Some(why) = self.gate(p, g, service, target.as_ref(), warm).await {
                self.gate_failed(p, format!("gate {i} failed: {why}")).await?;
                return Ok(Baked::Stopped);
            }
        }
        if elapsed >= total {
            return Ok(Baked::Done);
        }
        Ok(Baked::Pending(self.tick.min(Duration::from_millis(total - elapsed))))
    }

    /// Why a gate fails now (None: it passes, or cannot be judged yet).
    async fn gate(&self, p: &Plan, g: &Gate, service: Option<(&str, &str)>, target: Option<&Target<'_>>, warm: bool) -> Option<String> {
        if let Some(m) = g.metric {
            if m == Metric::HealthyRatio {
                let (ns, svc) = match (&g.service, service) {
                    (Some(s), _) => (DEFAULT_NAMESPACE, s.as_str()),
                    (None, Some(s)) => s,
                    (None, None) => return Some("healthy_ratio names no service".into()),
                };
                let list = self.env.instances(ns, svc).unwrap_or_default();
                if list.is_empty() {
                    return Some(format!("no instances of {svc} (missing data fails a gate)"));
                }
                let ratio = list.iter().filter(|i| i.is_serving()).count() as f64 / list.len() as f64;
                let min = g.min.unwrap_or(0.0);
                return (ratio < min).then(|| format!("healthy_ratio of {svc} is {ratio:.3}, below {min}"));
            }
            if !warm {
                return None;
            }
            let Some(t) = target else { return Some("a traffic gate outside a rollout".into()) };
            let Some(seen) = self.env.traffic(t.route, t.namespace, t.service, t.subset, p.since_ms).filter(|s| s.requests > 0) else {
                return Some(format!("no requests reached {} since the weight changed (missing data fails a gate)", describe(t.subset)));
            };
            let max = g.max.unwrap_or(f64::INFINITY);
            return match m {
                Metric::ErrorRatio => {
                    let ratio = seen.errors as f64 / seen.requests as f64;
                    (ratio > max)
                        .then(|| format!("error_ratio of {} is {ratio:.3} ({} of {} requests), above {max}", describe(t.subset), seen.errors, seen.requests))
                }
                _ => match seen.p99_ms {
                    Some(p99) if p99 <= max => None,
                    Some(p99) => Some(format!("p99 of {} is {p99:.1} ms, above {max} ms", describe(t.subset))),
                    None => Some("no latency measured (missing data fails a gate)".into()),
                },
            };
        }
        if let Some(e) = &g.no_event {
            let Some(log) = &self.log else { return Some("no event log to watch (missing data fails a gate)".into()) };
            let events = match log.read_stream(&e.stream, u64::MAX, Direction::Backwards, EVENT_SCAN) {
                Ok(events) => events,
                Err(EventLogError::StreamNotFound(_)) => return None,
                Err(err) => return Some(format!("reading {}: {err}", e.stream)),
            };
            #[derive(Deserialize)]
            struct Typed {
                #[serde(rename = "type")]
                kind: String,
            }
            for ev in events.iter().take_while(|ev| ev.appended_ms >= p.step_started_ms) {
                if serde_json::from_slice::<Typed>(&ev.body).is_ok_and(|t| t.kind.starts_with(&e.type_prefix)) {
                    return Some(format!("{} saw {} at {}", e.stream, e.type_prefix, timestamp(ev.appended_ms)));
                }
            }
            return None;
        }
        if let Some(r) = &g.report {
            let list = self.env.instances(DEFAULT_NAMESPACE, &r.service).unwrap_or_default();
            if list.is_empty() {
                return Some(format!("no instances of {} (missing data fails a gate)", r.service));
            }
            return list
                .iter()
                .find_map(|i| i.report.as_ref().filter(|rep| r.states.contains(&rep.spec.state)).map(|rep| format!("{} reports {:?}", i.id, rep.spec.state)));
        }
        None
    }

    /// A failing gate: pause where the plan is, or roll back what it changed.
    async fn gate_failed(&self, p: &mut Plan, why: String) -> Result<(), PlanError> {
        match p.spec.on_gate_failure {
            GateFailure::Pause => {
                if p.since_ms > 0 {
                    p.baked_ms += now_ms().saturating_sub(p.since_ms);
                    p.since_ms = 0;
                }
                p.status = PlanStatus::Paused;
                self.decide(p, "paused", why);
            }
            GateFailure::Rollback => {
                self.rollback(p).await;
                p.status = PlanStatus::RolledBack;
                self.decide(p, "rolled_back", why);
            }
        }
        self.save(p).await
    }

    /// Takes back every change, newest first.
    async fn rollback(&self, p: &mut Plan) {
        let undo: Vec<Undo> = p.undo.drain(..).rev().collect();
        for u in undo {
            let result = match &u.change {
                Change::Route { name, previous } => self.env.put_route(name, previous).await.map(|()| format!("route {name} restored")),
                Change::Maintenance { namespace, service, ids } => {
                    for id in ids {
                        if let Err(e) = self.env.set_maintenance(namespace, service, id, false, "").await {
                            tracing::warn!(plan = %p.name, %id, error = %e, "returning an instance failed (gone?)");
                        }
                    }
                    Ok(format!("{} instance(s) of {service} returned", ids.len()))
                }
                Change::Config { key, previous: Some(b64) } => match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(v) => self.env.kv_put(key, v.into()).await.map(|()| format!("{key} restored")),
                    Err(e) => Err(e.to_string()),
                },
                Change::Config { key, previous: None } => self.env.kv_delete(key).await.map(|()| format!("{key} deleted (it did not exist)")),
            };
            match result {
                Ok(what) => self.decide(p, "undone", what),
                Err(e) => self.decide(p, "undo_failed", e),
            }
        }
    }
}

/// A rollout's target, for traffic gates.
struct Target<'a> {
    route: &'a str,
    namespace: &'a str,
    service: &'a str,
    subset: &'a Subset,
}

#[cfg(test)]
mod tests;

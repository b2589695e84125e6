//! The engine against an in-memory world: steps in order, gates pausing or rolling back,
//! approvals, conflicts, and a restart continuing where the plan was.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use parking_lot::Mutex;
use zhili_model::report::{InstanceReport, ReportSpec};
use zhili_model::{HealthStatus, Maintenance};
use zhili_store::memory::{MemoryEventLog, MemoryStore};

use super::*;

#[derive(Default)]
struct World {
    instances: Mutex<Vec<Instance>>,
    routes: Mutex<BTreeMap<String, RouteSpec>>,
    kv: Mutex<BTreeMap<String, Bytes>>,
    /// (requests, errors) the gateway reports for any target.
    traffic: Mutex<Option<(u64, u64)>>,
    /// Every maintenance call: (id, on).
    maintenance_calls: Mutex<Vec<(String, bool)>>,
}

fn instance(id: &str, version: &str) -> Instance {
    Instance {
        id: id.into(),
        namespace: DEFAULT_NAMESPACE.into(),
        service: "web".into(),
        address: "127.0.0.1".into(),
        port: 80,
        weight: 1,
        tags: vec![],
        metadata: Default::default(),
        zone: None,
        version: Some(version.into()),
        enabled: true,
        ephemeral: false,
        maintenance: None,
        health: HealthStatus::Passing,
        checks: vec![],
        create_index: 1,
        modify_index: 1,
        node: None,
        passive_health: None,
        report: None,
    }
}

#[async_trait::async_trait]
impl Environment for World {
    fn instances(&self, _ns: &str, service: &str) -> Option<Vec<Instance>> {
        let list: Vec<Instance> = self.instances.lock().iter().filter(|i| i.service == service).cloned().collect();
        (!list.is_empty()).then_some(list)
    }
    async fn set_maintenance(&self, _ns: &str, _service: &str, id: &str, on: bool, reason: &str) -> Result<(), String> {
        self.maintenance_calls.lock().push((id.into(), on));
        let mut list = self.instances.lock();
        let i = list.iter_mut().find(|i| i.id == id).ok_or("gone")?;
        i.maintenance = on.then(|| Maintenance { reason: reason.into(), since_ms: 1 });
        Ok(())
    }
    fn route(&self, name: &str) -> Option<RouteSpec> {
        self.routes.lock().get(name).cloned()
    }
    async fn put_route(&self, name: &str, spec: &RouteSpec) -> Result<(), String> {
        self.routes.lock().insert(name.into(), spec.clone());
        Ok(())
    }
    fn kv_get(&self, key: &str) -> Result<Option<Bytes>, String> {
        Ok(self.kv.lock().get(key).cloned())
    }
    async fn kv_put(&self, key: &str, value: Bytes) -> Result<(), String> {
        self.kv.lock().insert(key.into(), value);
        Ok(())
    }
    async fn kv_delete(&self, key: &str) -> Result<(), String> {
        self.kv.lock().remove(key);
        Ok(())
    }
    fn traffic(&self, _route: &str, _ns: &str, _service: &str, _subset: &Subset, _since_ms: u64) -> Option<Traffic> {
        self.traffic.lock().map(|(requests, errors)| Traffic { requests, errors, p99_ms: Some(5.0) })
    }
}

fn world() -> Arc<World> {
    let w = World::default();
    *w.instances.lock() = vec![instance("web-1", "v1"), instance("web-2", "v1"), instance("web-3", "v2")];
    w.routes.lock().insert("web".into(), serde_json::from_str(r#"{"path_prefix": "/", "service": "web"}"#).unwrap());
    Arc::new(w)
}

fn spec(json: &str) -> PlanSpec {
    serde_json::from_str(json).unwrap()
}

const TICK: Duration = Duration::from_millis(20);

async fn wait_for(plans: &Plans, name: &str, what: impl Fn(&Plan) -> bool) -> Plan {
    for _ in 0..500 {
        let p = plans.get(name).await.unwrap().unwrap();
        if what(&p) {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("plan {name} never got there: {:?}", plans.get(name).await.unwrap());
}

fn decisions(p: &Plan) -> Vec<&str> {
    p.history.iter().map(|d| d.decision.as_str()).collect()
}

#[tokio::test]
async fn steps_run_in_order_and_an_approval_waits_for_a_person() {
    let w = world();
    let store = Arc::new(MemoryStore::new());
    let log = Arc::new(MemoryEventLog::new());
    let plans = Plans::start(store, w.clone(), Some(log.clone()), TICK).unwrap();
    let p = spec(
        r#"{"steps": [
        {"kind": "maintenance", "service": "web", "selector": {"version": "v1"}, "duration": "100ms"},
        {"kind": "config", "key": "flags/web", "value": "on"},
        {"kind": "approve"},
        {"kind": "rollout", "route": "web", "from": {"version": "v1"}, "to": {"version": "v2"}, "steps": [50, 100], "bake": "50ms"}]}"#,
    );
    plans.apply("release", p).await.unwrap();
    let waiting = wait_for(&plans, "release", |p| p.step == 2 && p.applied).await;
    assert_eq!(decisions(&waiting), ["applied", "drained", "returned", "config_written", "waiting_for_approval"]);
    assert_eq!(*w.maintenance_calls.lock(), [("web-1".into(), true), ("web-2".into(), true), ("web-1".into(), false), ("web-2".into(), false)]);
    assert_eq!(w.kv.lock().get("flags/web").unwrap(), "on");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(plans.get("release").await.unwrap().unwrap().step, 2, "an approve step waits");
    plans.control("release", Control::Approve).await.unwrap();
    let done = wait_for(&plans, "release", |p| p.status == PlanStatus::Succeeded).await;
    assert!(decisions(&done).ends_with(&["approved", "weight_set", "weight_set", "rolled_out", "succeeded"]), "{:?}", decisions(&done));
    let route = w.routes.lock().get("web").cloned().unwrap();
    let weights: Vec<u32> = route.split.iter().map(|t| t.weight).collect();
    assert_eq!(weights, [0, 100]);
    assert_eq!(route.split[1].subset.as_ref().unwrap().version.as_deref(), Some("v2"));
    // Every decision also went to $plans.
    let events = log.read_stream(PLANS_STREAM, 0, Direction::Forwards, 100).unwrap();
    assert_eq!(events.len(), done.history.len());
}

#[tokio::test]
async fn a_failing_gate_rolls_back_everything_the_plan_changed() {
    let w = world();
    w.kv.lock().insert("flags/web".into(), Bytes::from_static(b"old"));
    *w.traffic.lock() = Some((100, 30));
    let plans = Plans::start(Arc::new(MemoryStore::new()), w.clone(), None, TICK).unwrap();
    let p = spec(
        r#"{"on_gate_failure": "rollback", "steps": [
        {"kind": "config", "key": "flags/web", "value": "new"},
        {"kind": "config", "key": "flags/extra", "value": "x"},
        {"kind": "rollout", "route": "web", "from": {"version": "v1"}, "to": {"version": "v2"}, "steps": [10, 100], "bake": "200ms",
         "gates": [{"metric": "error_ratio", "max": 0.05}]}]}"#,
    );
    let before = w.routes.lock().get("web").cloned().unwrap();
    plans.apply("canary", p).await.unwrap();
    let done = wait_for(&plans, "canary", |p| p.status.finished()).await;
    assert_eq!(done.status, PlanStatus::RolledBack, "{:?}", done.history);
    let last = done.history.last().unwrap();
    assert!(last.reason.contains("error_ratio") && last.reason.contains("0.300"), "{last:?}");
    assert_eq!(w.routes.lock().get("web").cloned().unwrap(), before, "the split was undone");
    assert_eq!(w.kv.lock().get("flags/web").unwrap(), "old", "the previous value came back");
    assert!(!w.kv.lock().contains_key("flags/extra"), "a key that did not exist is deleted again");
    assert!(done.undo.is_empty());
}

#[tokio::test]
async fn a_failing_gate_pauses_and_resume_continues() {
    let w = world();
    let plans = Plans::start(Arc::new(MemoryStore::new()), w.clone(), None, TICK).unwrap();
    // A report gate: web-3 says it is degraded.
    w.instances.lock()[2].report = Some(InstanceReport { spec: ReportSpec { state: "degraded".into(), ..Default::default() }, reported_ms: 1 });
    let p = spec(r#"{"steps": [{"kind": "wait", "duration": "150ms", "gates": [{"report": {"service": "web", "states": ["degraded"]}}]}]}"#);
    plans.apply("quiet", p).await.unwrap();
    let paused = wait_for(&plans, "quiet", |p| p.status == PlanStatus::Paused).await;
    assert!(paused.history.last().unwrap().reason.contains("web-3 reports \"degraded\""), "{:?}", paused.history);
    w.instances.lock()[2].report = None;
    plans.control("quiet", Control::Resume).await.unwrap();
    let done = wait_for(&plans, "quiet", |p| p.status.finished()).await;
    assert_eq!(done.status, PlanStatus::Succeeded, "{:?}", done.history);
    // Missing data fails: a rollout with no traffic at all.
    let p = spec(
        r#"{"steps": [{"kind": "rollout", "route": "web", "from": {"version": "v1"}, "to": {"version": "v2"}, "steps": [100], "bake": "100ms", "gates": [{"metric": "p99_ms", "max": 100}]}]}"#,
    );
    plans.apply("blind", p).await.unwrap();
    let paused = wait_for(&plans, "blind", |p| p.status == PlanStatus::Paused).await;
    assert!(paused.history.last().unwrap().reason.contains("missing data"), "{:?}", paused.history);
}

#[tokio::test]
async fn plans_are_checked_against_live_state_and_never_interleave() {
    let w = world();
    let plans = Plans::start(Arc::new(MemoryStore::new()), w.clone(), None, TICK).unwrap();
    for (json, field) in [
        (r#"{"steps": [{"kind": "maintenance", "service": "nobody", "duration": "1s"}]}"#, "steps[0].service"),
        (r#"{"steps": [{"kind": "maintenance", "service": "web", "selector": {"version": "v9"}, "duration": "1s"}]}"#, "steps[0].selector"),
        (r#"{"steps": [{"kind": "rollout", "route": "nope", "from": {}, "to": {"version": "v2"}, "steps": [100], "bake": "1s"}]}"#, "steps[0].route"),
        (
            r#"{"steps": [{"kind": "rollout", "route": "web", "from": {"version": "v1"}, "to": {"version": "v7"}, "steps": [100], "bake": "1s"}]}"#,
            "steps[0].to",
        ),
        (
            r#"{"steps": [{"kind": "wait", "duration": "1s", "gates": [{"report": {"service": "ghost", "states": ["x"]}}]}]}"#,
            "steps[0].gates[0].report.service",
        ),
    ] {
        match plans.apply("bad", spec(json)).await {
            Err(PlanError::Invalid(e)) => assert_eq!(e.field, field, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
    }
    assert!(plans.get("bad").await.unwrap().is_none(), "nothing stored");
    plans.apply("first", spec(r#"{"steps": [{"kind": "approve"}, {"kind": "config", "key": "k", "value": "1"}]}"#)).await.unwrap();
    let clash = plans.apply("second", spec(r#"{"steps": [{"kind": "config", "key": "k", "value": "2"}]}"#)).await;
    assert!(matches!(&clash, Err(PlanError::Conflict(m)) if m.contains("first") && m.contains("key k")), "{clash:?}");
    let again = plans.apply("first", spec(r#"{"steps": [{"kind": "wait", "duration": "1s"}]}"#)).await;
    assert!(matches!(again, Err(PlanError::Conflict(_))), "a running plan is not replaced");
    plans.control("first", Control::Abort).await.unwrap();
    wait_for(&plans, "first", |p| p.status == PlanStatus::Aborted).await;
    plans.apply("second", spec(r#"{"steps": [{"kind": "config", "key": "k", "value": "2"}]}"#)).await.unwrap();
    assert!(matches!(plans.control("first", Control::Resume).await, Err(PlanError::Conflict(_))));
}

#[tokio::test]
async fn a_restart_continues_the_plan_where_it_was() {
    let w = world();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let plans = Plans::start(store.clone(), w.clone(), None, TICK).unwrap();
    let p = spec(
        r#"{"steps": [{"kind": "maintenance", "service": "web", "selector": {"ids": ["web-1"]}, "duration": "300ms"}, {"kind": "config", "key": "done", "value": "yes"}]}"#,
    );
    plans.apply("window", p).await.unwrap();
    wait_for(&plans, "window", |p| p.applied).await;
    // "Restart": a second engine on the same store once the first has stopped.
    plans.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = Plans::start(store, w.clone(), None, TICK).unwrap();
    let done = wait_for(&again, "window", |p| p.status.finished()).await;
    assert_eq!(done.status, PlanStatus::Succeeded, "{:?}", done.history);
    assert!(w.instances.lock()[0].maintenance.is_none(), "the drained instance came back");
    assert_eq!(w.kv.lock().get("done").unwrap(), "yes");
    // The scheduled start: a plan for later waits.
    let later = spec(r#"{"start_at": "2999-01-01T00:00:00Z", "steps": [{"kind": "wait", "duration": "1s"}]}"#);
    assert_eq!(again.apply("later", later).await.unwrap().status, PlanStatus::Scheduled);
}

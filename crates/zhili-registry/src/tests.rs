use std::sync::Mutex;

use zhili_model::{InstanceSpec, ServiceSpec};
use zhili_store::memory::MemoryStore;

use super::*;

#[derive(Default)]
struct Recorder(Mutex<Vec<(bool, CheckKey)>>);

impl CheckScheduler for Recorder {
    fn schedule(&self, key: CheckKey, _def: CheckDefinition) {
        self.0.lock().unwrap().push((true, key));
    }
    fn cancel(&self, key: &CheckKey) {
        self.0.lock().unwrap().push((false, key.clone()));
    }
}

/// A registry on an in-memory store, timed by tokio's clock (tests run with paused time, so
/// heartbeat and TTL deadlines pass exactly when the test advances time, not by wall-clock).
fn registry_on(store: &Arc<dyn Store>) -> (Arc<Registry>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    (Registry::load_with_clock(store.clone(), rec.clone(), Metrics::new(), Arc::new(TokioClock::default())).unwrap(), rec)
}

fn registry() -> (Arc<Registry>, Arc<Recorder>) {
    registry_on(&(Arc::new(MemoryStore::new()) as Arc<dyn Store>))
}

fn inst(json: &str) -> InstanceRegistration {
    serde_json::from_str::<InstanceSpec>(json).unwrap().validate().unwrap()
}

fn healthy() -> InstanceFilter {
    InstanceFilter { healthy_only: true, ..Default::default() }
}

#[tokio::test(start_paused = true)]
async fn register_discover_filter_deregister() {
    let (r, _) = registry();
    let i1 = r.register("default", "web", inst(r#"{"address":"10.0.0.1","port":80,"tags":["v1"],"zone":"a"}"#)).await.unwrap();
    let i2 = r.register("default", "web", inst(r#"{"address":"10.0.0.2","port":80,"tags":["v2"],"zone":"b","metadata":{"env":"prod"}}"#)).await.unwrap();
    assert!(i2 > i1);
    assert_eq!(r.instances("default", "web", &healthy()).unwrap().instances.len(), 2);
    let by_tag = InstanceFilter { tags: vec!["v2".into()], ..healthy() };
    assert_eq!(r.instances("default", "web", &by_tag).unwrap().instances[0].address, "10.0.0.2");
    let by_meta = InstanceFilter { metadata: [("env".to_string(), "prod".to_string())].into(), ..healthy() };
    assert_eq!(r.instances("default", "web", &by_meta).unwrap().instances.len(), 1);
    let by_zone = InstanceFilter { zone: Some("a".into()), ..healthy() };
    assert_eq!(r.instances("default", "web", &by_zone).unwrap().instances[0].address, "10.0.0.1");
    assert!(r.instances("other", "web", &healthy()).is_none(), "namespaces are separate");
    r.deregister("default", "web", "10.0.0.1:80").await.unwrap();
    r.deregister("default", "web", "10.0.0.2:80").await.unwrap();
    assert!(r.service("default", "web").is_none(), "an implicit service goes with its last instance");
    assert!(matches!(r.deregister("default", "web", "x").await, Err(RegistryError::InstanceNotFound(_))));
}

/// A burst larger than the broadcast buffer: a subscriber lags and loses changes, the journal
/// hands out every one of them, in order. It can be taken only once.
#[tokio::test]
async fn the_journal_keeps_a_burst_the_broadcast_loses() {
    let (r, _) = registry();
    let mut journal = r.journal().unwrap();
    assert!(r.journal().is_none(), "one journal per registry");
    let mut broadcast = r.subscribe_events();
    let burst = EVENT_BUFFER * 2 + 10;
    for n in 0..burst {
        r.register("default", "burst", inst(&format!(r#"{{"address":"10.1.{}.{}","port":1}}"#, n / 250, n % 250))).await.unwrap();
    }
    assert!(matches!(broadcast.recv().await, Err(broadcast::error::RecvError::Lagged(_))), "the broadcast lost part of the burst");
    let mut last = 0;
    for n in 0..burst {
        let Some(Journaled::Change(ev)) = journal.recv().await else { panic!("change {n} missing from the journal") };
        assert!(ev.index > last, "in order");
        last = ev.index;
        assert_eq!(ev.kind, RegistryEventKind::InstanceRegistered);
    }
    assert!(journal.try_recv().is_none(), "nothing more");
}

/// A released instance goes only while its owner is the one releasing it: a client that
/// re-registered it through a new connection (or without one) keeps it when the old one closes.
#[tokio::test]
async fn release_removes_only_what_the_owner_still_owns() {
    let (r, _) = registry();
    let (a, b) = (r.owner(), r.owner());
    let x = || inst(r#"{"address":"10.0.0.1","port":1}"#);
    r.register_owned("default", "rel", x(), Some(a.clone())).await.unwrap();
    r.register_owned("default", "rel", x(), Some(b.clone())).await.unwrap();
    assert_eq!(r.release(&a, "default", "rel", "10.0.0.1:1"), None, "re-registered by b");
    assert!(r.instance("default", "rel", "10.0.0.1:1").is_some());
    assert!(r.release(&b, "default", "rel", "10.0.0.1:1").is_some());
    assert!(r.instance("default", "rel", "10.0.0.1:1").is_none());
    r.register_owned("default", "rel", x(), Some(a.clone())).await.unwrap();
    r.register("default", "rel", x()).await.unwrap();
    assert_eq!(r.release(&a, "default", "rel", "10.0.0.1:1"), None, "re-registered without an owner");
    assert!(r.instance("default", "rel", "10.0.0.1:1").is_some());
}

/// An owner's beat keeps all its instances alive (no heartbeat of their own), revives one that
/// went critical while it was silent, and once it stops beating they lapse like silent ones.
#[tokio::test(start_paused = true)]
async fn an_owners_beats_keep_its_instances_alive_until_it_stops() {
    let (r, _) = registry();
    let spec: ServiceSpec = serde_json::from_str(r#"{"health":{"heartbeat_interval":"100ms","unhealthy_after":"300ms","remove_after":"600ms"}}"#).unwrap();
    r.put_service(spec.validate("default", "own").unwrap()).await.unwrap();
    let owner = r.owner();
    for n in 1..=3 {
        r.register_owned("default", "own", inst(&format!(r#"{{"address":"10.0.0.{n}","port":1}}"#)), Some(owner.clone())).await.unwrap();
    }
    r.register("default", "own", inst(r#"{"address":"10.0.0.9","port":1}"#)).await.unwrap();
    let healthy_ids = || {
        let mut ids: Vec<String> = r.instances("default", "own", &healthy()).unwrap().instances.into_iter().map(|i| i.id).collect();
        ids.sort();
        ids
    };
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        r.beat_owner(&owner);
        r.reap().await;
    }
    assert_eq!(healthy_ids(), ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"], "owned instances live on, the silent unowned one is gone");
    // Silent past unhealthy_after: critical; beating again: passing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    r.reap().await;
    assert!(healthy_ids().is_empty(), "a silent owner's instances turn critical");
    r.beat_owner(&owner);
    r.reap().await;
    assert_eq!(healthy_ids().len(), 3, "its beat revives them");
    // Re-registered without the owner: on its own heartbeats from now on.
    r.register("default", "own", inst(r#"{"address":"10.0.0.3","port":1}"#)).await.unwrap();
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        r.beat_owner(&owner);
        r.reap().await;
    }
    assert!(r.instance("default", "own", "10.0.0.3:1").is_none(), "re-registered without the owner, it needs heartbeats of its own");
    assert!(r.instance("default", "own", "10.0.0.1:1").is_some());
    tokio::time::sleep(Duration::from_millis(700)).await;
    r.reap().await;
    assert!(r.instance("default", "own", "10.0.0.1:1").is_none(), "an owner that stops beating lets its instances lapse");
}

/// The reaper skips a service until its first instance can be due: healthy beating instances
/// are examined a few times a second's worth of passes, not on every pass, and still go
/// critical, come back and are removed on time; an owned one still revives on its owner's beat.
#[tokio::test(start_paused = true)]
async fn the_reaper_skips_services_with_nothing_due() {
    let (r, _) = registry();
    let spec: ServiceSpec = serde_json::from_str(r#"{"health":{"heartbeat_interval":"100ms","unhealthy_after":"300ms","remove_after":"600ms"}}"#).unwrap();
    r.put_service(spec.validate("default", "big").unwrap()).await.unwrap();
    let ids: Vec<String> = (0..50).map(|n| format!("10.0.1.{n}:1")).collect();
    for n in 0..50 {
        r.register("default", "big", inst(&format!(r#"{{"address":"10.0.1.{n}","port":1}}"#))).await.unwrap();
    }
    let scanned = || r.metrics.reaper_scanned.get();
    r.reap().await;
    assert_eq!(scanned(), 50, "the service's health settings were just set: every instance is examined once");
    r.reap().await;
    assert_eq!(scanned(), 50, "then nothing can be due for 300ms: the service is skipped");
    // One second of 50 ms passes with a heartbeat from everyone every 100 ms.
    for pass in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if pass % 2 == 1 {
            for id in &ids {
                r.heartbeat("default", "big", id).unwrap();
            }
        }
        r.reap().await;
    }
    let busy = scanned() - 50;
    assert!(busy > 0, "the service is examined when its oldest beat comes due");
    assert!(busy <= 50 * 6, "examined {busy} instances in 20 passes: the service was not skipped while nothing was due");
    assert_eq!(r.instances("default", "big", &healthy()).unwrap().instances.len(), 50);
    // Silent: critical once unhealthy_after has passed, though the pass before skipped them.
    tokio::time::sleep(Duration::from_millis(320)).await;
    r.reap().await;
    assert!(r.instances("default", "big", &healthy()).unwrap().instances.is_empty(), "silent instances turn critical on time");
    r.heartbeat("default", "big", &ids[0]).unwrap();
    assert_eq!(r.instances("default", "big", &healthy()).unwrap().instances.len(), 1, "a heartbeat revives its instance at once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.reap().await;
    assert_eq!(r.instances("default", "big", &InstanceFilter::default()).unwrap().instances.len(), 1, "the silent ones are removed on time");
    // An owned instance gone critical is looked at on every pass: its owner's beat revives it.
    let owner = r.owner();
    r.register_owned("default", "big", inst(r#"{"address":"10.0.2.1","port":1}"#), Some(owner.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    r.heartbeat("default", "big", &ids[0]).unwrap();
    r.reap().await;
    assert!(r.instance("default", "big", "10.0.2.1:1").is_some_and(|i| i.health == HealthStatus::Critical));
    r.beat_owner(&owner);
    r.reap().await;
    assert!(r.instance("default", "big", "10.0.2.1:1").is_some_and(|i| i.health == HealthStatus::Passing), "its owner's beat revives it on the next pass");
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_ephemeral_instances_alive() {
    let (r, _) = registry();
    let spec: ServiceSpec = serde_json::from_str(r#"{"health":{"heartbeat_interval":"100ms","unhealthy_after":"300ms","remove_after":"600ms"}}"#).unwrap();
    r.put_service(spec.validate("default", "hb").unwrap()).await.unwrap();
    r.register("default", "hb", inst(r#"{"address":"10.0.0.1","port":1}"#)).await.unwrap();
    r.register("default", "hb", inst(r#"{"address":"10.0.0.2","port":1}"#)).await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        r.heartbeat("default", "hb", "10.0.0.1:1").unwrap();
        r.reap().await;
    }
    let all = r.instances("default", "hb", &InstanceFilter::default()).unwrap().instances;
    let silent = all.iter().find(|i| i.id == "10.0.0.2:1").unwrap();
    assert_eq!(silent.health, HealthStatus::Critical, "no heartbeat for 500ms > unhealthy_after");
    assert_eq!(r.instances("default", "hb", &healthy()).unwrap().instances.len(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.heartbeat("default", "hb", "10.0.0.1:1").unwrap();
    r.reap().await;
    assert!(r.instance("default", "hb", "10.0.0.2:1").is_none(), "removed after remove_after");
    assert!(r.instance("default", "hb", "10.0.0.1:1").is_some());
    assert!(matches!(r.heartbeat("default", "hb", "10.0.0.2:1"), Err(RegistryError::InstanceNotFound(_))));
}

#[tokio::test(start_paused = true)]
async fn persistent_instances_and_services_survive_reload() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    {
        let (r, _) = registry_on(&store);
        r.put_service(ServiceSpec { owner: Some("team-a".into()), ..Default::default() }.validate("default", "db").unwrap()).await.unwrap();
        r.register(
            "default",
            "db",
            inst(r#"{"address":"10.0.0.9","port":5432,"ephemeral":false,"checks":[{"kind":"tcp","address":"10.0.0.9:5432","interval":"1s"}]}"#),
        )
        .await
        .unwrap();
        r.register("default", "db", inst(r#"{"address":"10.0.0.8","port":5432}"#)).await.unwrap();
        r.set_maintenance("default", "db", "10.0.0.9:5432", true, "upgrade").await.unwrap();
    }
    // A new registry over the same store: what was persisted comes back, what lived only in
    // memory (ephemeral instances) does not.
    let (r, rec) = registry_on(&store);
    let detail = r.service("default", "db").unwrap();
    assert_eq!(detail.service.owner.as_deref(), Some("team-a"));
    assert_eq!(detail.instances.len(), 1, "only the persistent instance comes back");
    let i = &detail.instances[0];
    assert_eq!(i.maintenance.as_ref().unwrap().reason, "upgrade");
    assert_eq!(i.health, HealthStatus::Critical, "checks start critical until they pass");
    assert_eq!(rec.0.lock().unwrap().len(), 1, "its active check is rescheduled");
}

#[tokio::test(start_paused = true)]
async fn ttl_checks_and_transitions() {
    let (r, rec) = registry();
    r.register("default", "api", inst(r#"{"address":"10.0.0.1","port":1,"checks":[{"kind":"ttl","id":"ttl","ttl":"200ms"},{"kind":"http","id":"web","url":"http://10.0.0.1:1/health","interval":"1s"}]}"#)).await.unwrap();
    assert_eq!(rec.0.lock().unwrap().len(), 1, "only the http check is scheduled");
    let key = CheckKey { namespace: "default".into(), service: "api".into(), instance: "10.0.0.1:1".into(), check: "web".into() };
    r.apply_transition(&HealthTransition { key: key.clone(), status: HealthStatus::Passing, output: "200 OK".into() });
    r.update_ttl_check("default", "api", "10.0.0.1:1", "ttl", HealthStatus::Passing, "fine").unwrap();
    assert_eq!(r.instance("default", "api", "10.0.0.1:1").unwrap().health, HealthStatus::Passing);
    assert!(matches!(r.update_ttl_check("default", "api", "10.0.0.1:1", "web", HealthStatus::Passing, ""), Err(RegistryError::NotTtl(_))));
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.reap().await;
    let i = r.instance("default", "api", "10.0.0.1:1").unwrap();
    assert_eq!(i.health, HealthStatus::Critical);
    assert_eq!(i.checks.iter().find(|c| c.id == "ttl").unwrap().output, "TTL expired");
    r.deregister("default", "api", "10.0.0.1:1").await.unwrap();
    assert_eq!(rec.0.lock().unwrap().last().unwrap(), &(false, key));
}

#[tokio::test(start_paused = true)]
async fn protection_threshold_returns_all_when_too_few_are_healthy() {
    let (r, _) = registry();
    r.put_service(ServiceSpec { protection_threshold: Some(0.5), ..Default::default() }.validate("default", "p").unwrap()).await.unwrap();
    for i in 1..=4 {
        r.register("default", "p", inst(&format!(r#"{{"address":"10.0.0.{i}","port":1,"checks":[{{"kind":"ttl","id":"t","ttl":"1m"}}]}}"#))).await.unwrap();
    }
    r.update_ttl_check("default", "p", "10.0.0.1:1", "t", HealthStatus::Passing, "").unwrap();
    let list = r.instances("default", "p", &healthy()).unwrap();
    assert!(list.protection_triggered);
    assert_eq!(list.instances.len(), 4);
    r.update_ttl_check("default", "p", "10.0.0.2:1", "t", HealthStatus::Passing, "").unwrap();
    let list = r.instances("default", "p", &healthy()).unwrap();
    assert!(!list.protection_triggered);
    assert_eq!(list.instances.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn blocking_wait_wakes_on_change_and_times_out() {
    let (r, _) = registry();
    r.register("default", "w", inst(r#"{"address":"10.0.0.1","port":1}"#)).await.unwrap();
    let idx = r.service_index("default", "w");
    let start = tokio::time::Instant::now();
    r.wait_for(idx, Duration::from_millis(200), || r.service_index("default", "w")).await;
    assert_eq!(start.elapsed(), Duration::from_millis(200), "nothing changed, so it waited exactly the wait");
    let r2 = r.clone();
    let waiter = tokio::spawn(async move {
        r2.wait_for(idx, Duration::from_secs(10), || r2.service_index("default", "w")).await;
        r2.service_index("default", "w")
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.register("default", "other", inst(r#"{"address":"10.0.0.1","port":1}"#)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "a change to another service does not wake it");
    r.register("default", "w", inst(r#"{"address":"10.0.0.2","port":1}"#)).await.unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap();
    assert!(woke > idx);
    let mut events = r.subscribe_events();
    r.deregister("default", "w", "10.0.0.2:1").await.unwrap();
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.kind, RegistryEventKind::InstanceDeregistered);
    assert_eq!(ev.instance_id.as_deref(), Some("10.0.0.2:1"));
}

/// Two services whose shards differ (the shard hasher is seeded per registry).
fn services_in_two_shards(r: &Registry) -> (String, String) {
    let a = "a".to_string();
    let b = (0..).map(|n| format!("b{n}")).find(|b| !std::ptr::eq(r.shard("default", &a), r.shard("default", b))).expect("64 shards");
    (a, b)
}

fn registry_on_threads() -> Arc<Registry> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Registry::load(store, Arc::new(Recorder::default()), Metrics::new()).unwrap()
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
}

/// A change to one service is held mid-mutation (its shard's write lock taken, its revision
/// drawn) while an unrelated service registers, reads and publishes a later revision: the
/// unrelated registration does not wait for it, and a watcher of the held service still wakes
/// for the earlier revision once it lands, though publishing it moved the index no further.
#[test]
fn unrelated_services_share_no_lock_and_a_late_revision_still_wakes_its_watchers() {
    use std::sync::mpsc::channel;
    let r = registry_on_threads();
    let (a, b) = services_in_two_shards(&r);
    block_on(r.register("default", &a, inst(r#"{"address":"10.0.0.1","port":1}"#))).unwrap();
    let before = r.service_index("default", &a);

    let watcher = {
        let (r, a) = (r.clone(), a.clone());
        std::thread::spawn(move || {
            block_on(r.wait_for(before, Duration::from_secs(20), || r.service_index("default", &a)));
            r.service_index("default", &a)
        })
    };
    let (inside_tx, inside) = channel();
    let (go, go_rx) = channel::<()>();
    let held = {
        let (r, a) = (r.clone(), a.clone());
        std::thread::spawn(move || {
            let name = a.clone();
            r.mutate("default", &a, |shard, rev, events| {
                inside_tx.send(rev).unwrap();
                go_rx.recv_timeout(Duration::from_secs(20)).unwrap();
                let e = shard.services.get_mut(&("default".to_string(), a.clone())).unwrap();
                e.index = rev;
                events.push(RegistryEvent {
                    index: 0,
                    kind: RegistryEventKind::ServiceUpserted,
                    namespace: "default".into(),
                    service: name,
                    instance: None,
                    instance_id: None,
                });
            })
            .1
        })
    };
    let held_rev = inside.recv_timeout(Duration::from_secs(20)).unwrap();

    // While `a`'s shard is write-locked: `b` registers and is read on this thread.
    let (done_tx, done) = channel();
    let other = {
        let (r, b) = (r.clone(), b.clone());
        std::thread::spawn(move || {
            let rev = block_on(r.register("default", &b, inst(r#"{"address":"10.0.0.2","port":1}"#))).unwrap();
            done_tx.send((rev, r.instances("default", &b, &healthy()).map(|l| l.instances.len()))).unwrap();
        })
    };
    let (b_rev, b_count) = done.recv_timeout(Duration::from_secs(20)).expect("a registration of an unrelated service waited for another's lock");
    assert_eq!(b_count, Some(1));
    assert!(b_rev > held_rev && r.index() >= b_rev, "the later revision is published first");
    // Proof that `a` really is held: a read of it does not finish while the mutation waits.
    let (read_tx, read) = channel();
    let reader = {
        let (r, a) = (r.clone(), a.clone());
        std::thread::spawn(move || read_tx.send(r.service_index("default", &a)).unwrap())
    };
    assert!(read.recv_timeout(Duration::from_millis(200)).is_err(), "a's shard is locked");

    go.send(()).unwrap();
    assert_eq!(held.join().unwrap(), held_rev);
    assert_eq!(r.index(), b_rev, "publishing the earlier revision does not move the index back");
    assert_eq!(read.recv_timeout(Duration::from_secs(20)).unwrap(), held_rev);
    assert_eq!(watcher.join().unwrap(), held_rev, "the watcher of a saw its change");
    other.join().unwrap();
    reader.join().unwrap();
}

/// A service listing counts as passing exactly the instances discovery serves: enabled, not in
/// maintenance, healthy (counted without building each instance's view).
#[tokio::test(start_paused = true)]
async fn service_listing_counts_serving_instances() {
    let (r, _) = registry();
    r.register("default", "mix", inst(r#"{"address":"10.0.3.1","port":1}"#)).await.unwrap();
    r.register("default", "mix", inst(r#"{"address":"10.0.3.2","port":1,"enabled":false}"#)).await.unwrap();
    r.register("default", "mix", inst(r#"{"address":"10.0.3.3","port":1}"#)).await.unwrap();
    r.set_maintenance("default", "mix", "10.0.3.3:1", true, "patching").await.unwrap();
    r.register("default", "mix", inst(r#"{"address":"10.0.3.4","port":1,"checks":[{"kind":"ttl","id":"t","ttl":"1m"}]}"#)).await.unwrap();
    let (_, services) = r.list_services("default");
    let mix = services.iter().find(|s| s.name == "mix").unwrap();
    let serving = r.instances("default", "mix", &InstanceFilter::default()).unwrap().instances.iter().filter(|i| i.is_serving()).count();
    assert_eq!((mix.instances, mix.passing, serving), (4, 1, 1));
}

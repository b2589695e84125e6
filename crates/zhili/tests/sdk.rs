//! The Rust SDK against the real binary: registration with heartbeats and re-registration after a
//! server restart, cached discovery kept fresh by watches, balancing, KV watch.
// Test code: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::*;
use zhili_client::{Balancer, InstanceSpec, Query, Registration, RegistrationOptions, RoundRobin, ServiceCache, SmoothWeighted};

fn spec(addr: &str, port: u32, weight: u32) -> InstanceSpec {
    InstanceSpec { address: addr.into(), port, weight: Some(weight), ..Default::default() }
}

#[tokio::test]
async fn registration_survives_server_restart_and_cache_follows() {
    let mut s = dev_server();
    let c = client(&s, None);
    let opts = RegistrationOptions { heartbeat_interval: Duration::from_millis(200) };
    let a = Registration::start(c.clone(), "orders", spec("10.0.0.1", 80, 300), opts.clone()).await.unwrap();
    let b = Registration::start(c.clone(), "orders", spec("10.0.0.2", 80, 100), opts.clone()).await.unwrap();

    let mut cache = ServiceCache::start(c.clone(), "orders", Query::default()).await.unwrap();
    assert_eq!(cache.instances().len(), 2);
    let wrr = SmoothWeighted::default();
    let picks: Vec<String> = (0..4).map(|_| cache.pick(&wrr).unwrap().address).collect();
    assert_eq!(picks.iter().filter(|a| *a == "10.0.0.1").count(), 3, "weights 300:100 → 3 of 4");
    let rr = RoundRobin::default();
    let list = cache.instances();
    assert_ne!(rr.pick(&list).unwrap().id, rr.pick(&list).unwrap().id);

    // A third instance appears in the cache through the watch, without polling.
    let third = Registration::start(c.clone(), "orders", spec("10.0.0.3", 80, 100), opts.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while cache.instances().len() != 3 {
            cache.changed().await;
        }
    })
    .await
    .expect("cache saw the new instance");

    // Shutdown deregisters.
    third.shutdown().await.unwrap();
    assert_eventually(Duration::from_secs(5), "cache drops the deregistered instance", || {
        let n = cache.instances().len();
        async move { n == 2 }
    })
    .await;

    // The server restarts and forgets ephemeral instances; heartbeats get 404 and re-register.
    s.restart_after_kill9();
    let c2 = client(&s, None);
    assert_eventually(Duration::from_secs(10), "both instances re-registered after restart", || {
        let c2 = c2.clone();
        async move { c2.instances("orders", &Query::default(), None).await.map(|l| l.instances.len() == 2).unwrap_or(false) }
    })
    .await;
    assert_eventually(Duration::from_secs(10), "the cache follows the restarted server", || {
        let n = cache.instances().len();
        async move { n == 2 }
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    assert_eventually(Duration::from_secs(5), "all gone", || {
        let c2 = c2.clone();
        async move { c2.instances("orders", &Query::default(), None).await.map(|l| l.instances.is_empty()).unwrap_or(false) }
    })
    .await;
}

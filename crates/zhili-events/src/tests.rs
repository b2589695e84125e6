use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use zhili_model::subscription::SubscriptionSpec;
use zhili_store::events::{EventLog, ExpectedRevision, NewEvent};
use zhili_store::memory::{MemoryEventLog, MemoryStore};

use super::*;

fn spec(json: &str) -> SubscriptionSpec {
    serde_json::from_str(json).unwrap()
}

async fn setup(n: usize) -> (Arc<dyn Store>, Arc<dyn EventLog>, Arc<Subscriptions>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let log: Arc<dyn EventLog> = Arc::new(MemoryEventLog::new());
    for i in 0..n {
        let kind = if i % 2 == 0 { "order.paid" } else { "order.placed" };
        let body = format!(r#"{{"specversion":"1.0","id":"e{i}","source":"/s","type":"{kind}","subject":"o{i}"}}"#);
        log.append("order-1", ExpectedRevision::Any, vec![NewEvent { id: format!("e{i}"), body: Bytes::from(body) }]).await.unwrap();
    }
    let subs = Subscriptions::load(store.clone(), log.clone()).unwrap();
    (store, log, subs)
}

fn numbers(d: &[Delivery]) -> Vec<u64> {
    d.iter().map(|d| d.number).collect()
}

#[tokio::test(start_paused = true)]
async fn competing_consumers_ack_nack_and_checkpoints() {
    let (store, log, subs) = setup(10).await;
    subs.put("g", spec(r#"{"stream": "order-1", "ack_timeout": "10s", "max_deliveries": 2}"#)).await.unwrap();
    // Two consumers share the group: each event goes to one of them.
    let a = subs.next("g", 4, Duration::ZERO).await.unwrap();
    let b = subs.next("g", 4, Duration::ZERO).await.unwrap();
    assert_eq!((numbers(&a), numbers(&b)), (vec![0, 1, 2, 3], vec![4, 5, 6, 7]));
    subs.ack("g", &b.iter().map(|d| d.ack_id.clone()).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(subs.status("g").unwrap().checkpoint, 0, "0..3 are still out");
    subs.ack("g", &[a[0].ack_id.clone(), a[1].ack_id.clone()]).await.unwrap();
    assert_eq!(subs.status("g").unwrap().checkpoint, 2);
    // Nack retry: handed out again first; skip counts as done.
    subs.nack("g", &[a[2].ack_id.clone()], Nack::Retry).await.unwrap();
    subs.nack("g", &[a[3].ack_id.clone()], Nack::Skip).await.unwrap();
    let again = subs.next("g", 10, Duration::ZERO).await.unwrap();
    assert_eq!(numbers(&again), [2, 8, 9]);
    assert_eq!(again[0].deliveries, 2);
    // Not acknowledged within the ack timeout: redelivered; past max deliveries: parked.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let late = subs.next("g", 10, Duration::ZERO).await.unwrap();
    assert_eq!(numbers(&late), [8, 9], "2 was delivered twice already, so it is parked");
    assert_eq!(subs.status("g").unwrap().parked, 1);
    let parked = log.read_stream("$parked-g", 0, Direction::Forwards, 10).unwrap();
    assert_eq!(parked.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e2"]);
    subs.ack("g", &late.iter().map(|d| d.ack_id.clone()).collect::<Vec<_>>()).await.unwrap();
    let status = subs.status("g").unwrap();
    assert_eq!((status.checkpoint, status.in_flight, status.lag), (10, 0, 0));
    // A restart resumes at the checkpoint; the parked event can be replayed.
    let subs = Subscriptions::load(store.clone(), log.clone()).unwrap();
    assert_eq!(subs.status("g").unwrap().checkpoint, 10);
    assert_eq!(subs.replay_parked("g").await.unwrap(), 1);
    let replayed = subs.next("g", 10, Duration::ZERO).await.unwrap();
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0].body.starts_with(br#"{"specversion":"1.0","id":"e2""#));
    // The replay is durable: a restart before the ack hands the event out again.
    let subs = Subscriptions::load(store.clone(), log.clone()).unwrap();
    let again = subs.next("g", 10, Duration::ZERO).await.unwrap();
    assert_eq!(again.iter().map(|d| d.body.clone()).collect::<Vec<_>>(), [replayed[0].body.clone()]);
    assert_eq!(subs.status("g").unwrap().parked, 1, "still parked until done");
    subs.ack("g", &[again[0].ack_id.clone()]).await.unwrap();
    assert_eq!(subs.status("g").unwrap().parked, 0, "the parked stream is truncated behind the replay");
    // Done is done: neither a restart nor another replay hands it out again.
    let subs = Subscriptions::load(store, log).unwrap();
    assert!(subs.next("g", 10, Duration::ZERO).await.unwrap().is_empty());
    assert_eq!(subs.replay_parked("g").await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn filters_start_positions_and_waiting() {
    let (_, log, subs) = setup(6).await;
    subs.put("paid", spec(r#"{"stream": "$ce-order", "filter": {"type_prefix": "order.paid"}}"#)).await.unwrap();
    assert_eq!(numbers(&subs.next("paid", 10, Duration::ZERO).await.unwrap()), [0, 2, 4]);
    subs.put("tail", spec(r#"{"stream": "$all", "from": "end"}"#)).await.unwrap();
    assert!(subs.next("tail", 10, Duration::ZERO).await.unwrap().is_empty());
    // A waiting consumer wakes on the next append.
    let waiter = {
        let subs = subs.clone();
        tokio::spawn(async move { subs.next("tail", 10, Duration::from_secs(30)).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    log.append("other", ExpectedRevision::Any, vec![NewEvent { id: "x".into(), body: Bytes::from_static(b"{}") }]).await.unwrap();
    assert_eq!(numbers(&waiter.await.unwrap()), [6]);
    assert!(matches!(subs.next("missing", 1, Duration::ZERO).await, Err(SubscriptionError::NotFound(_))));
    assert!(subs.put("bad name", spec(r#"{"stream": "s"}"#)).await.is_err());
    subs.delete("paid").await.unwrap();
    assert!(subs.status("paid").is_err());
}

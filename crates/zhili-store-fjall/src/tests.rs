use super::*;
use zhili_store::{delete, put};

fn open() -> (tempfile::TempDir, FjallStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FjallStore::open(dir.path()).unwrap();
    (dir, store)
}

#[tokio::test]
async fn put_get_range_and_revisions() {
    let (_d, s) = open();
    let r1 = put(&s, "a/1", "one").await.unwrap();
    let r2 = put(&s, "a/2", "two").await.unwrap();
    let r3 = put(&s, "a/1", "uno").await.unwrap();
    assert!(r1 < r2 && r2 < r3);
    let kv = s.get("a/1").unwrap().unwrap();
    assert_eq!(kv.value, Bytes::from("uno"));
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (r1, r3, 2));
    let all = s.range("a/", None).unwrap();
    assert_eq!(all.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["a/1", "a/2"]);
    assert_eq!(s.range("a/", Some(1)).unwrap().len(), 1);
    assert_eq!(s.revision(), r3);
}

#[tokio::test]
async fn range_after_pages_within_the_prefix() {
    let (_d, s) = open();
    zhili_store::range_after_conformance(&s).await;
}

#[tokio::test]
async fn cas_transactions() {
    let (_d, s) = open();
    let create = Txn::put("k", "v1").when(Compare::ModRevision("k".into(), 0));
    assert!(s.txn(create.clone()).await.unwrap().succeeded);
    assert!(!s.txn(create).await.unwrap().succeeded, "create-only must fail once the key exists");
    let rev = s.get("k").unwrap().unwrap().mod_revision;
    assert!(!s.txn(Txn::put("k", "v2").when(Compare::ModRevision("k".into(), rev + 100))).await.unwrap().succeeded);
    assert!(s.txn(Txn::put("k", "v2").when(Compare::ModRevision("k".into(), rev))).await.unwrap().succeeded);
    assert_eq!(s.get("k").unwrap().unwrap().value, Bytes::from("v2"));
}

#[tokio::test]
async fn delete_prefix_and_watch_from_revision() {
    let (_d, s) = open();
    let start = put(&s, "p/a", "1").await.unwrap();
    put(&s, "p/b", "2").await.unwrap();
    put(&s, "q/c", "3").await.unwrap();
    let res = s.txn(Txn { success: vec![Op::DeletePrefix { prefix: "p/".into() }], ..Default::default() }).await.unwrap();
    assert_eq!(res.deleted.len(), 2);
    assert!(s.range("p/", None).unwrap().is_empty());
    let mut w = s.watch("p/", start).unwrap();
    let mut seen = vec![];
    for _ in 0..4 {
        let ev = w.next().await.unwrap();
        seen.push((ev.kind, ev.kv.key.clone()));
    }
    assert_eq!(seen, [(EventKind::Put, "p/a".into()), (EventKind::Put, "p/b".into()), (EventKind::Delete, "p/a".into()), (EventKind::Delete, "p/b".into())]);
    let mut live = s.watch("q/", 0).unwrap();
    put(&s, "q/d", "4").await.unwrap();
    assert_eq!(live.next().await.unwrap().kv.key, "q/d");
}

#[tokio::test]
async fn concurrent_writers_share_commits_and_all_land() {
    let (_d, s) = open();
    let s = Arc::new(s);
    let mut tasks = vec![];
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { put(s.as_ref(), &format!("c/{i:03}"), "x").await.unwrap() }));
    }
    let mut revs = vec![];
    for t in tasks {
        revs.push(t.await.unwrap());
    }
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), 200, "each transaction gets its own revision");
    assert_eq!(s.range("c/", None).unwrap().len(), 200);
}

#[tokio::test]
async fn leases_expire_and_revoke_their_keys() {
    let (_d, s) = open();
    let lease = s.lease_grant(Duration::from_millis(300)).await.unwrap();
    s.txn(Txn { success: vec![Op::Put { key: "l/a".into(), value: "1".into(), lease: Some(lease) }], ..Default::default() }).await.unwrap();
    assert_eq!(s.get("l/a").unwrap().unwrap().lease, Some(lease));
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.get("l/a").unwrap().is_some() {
        assert!(Instant::now() < deadline, "leased key outlived its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(s.lease_keep_alive(lease), Err(StoreError::LeaseNotFound(_))));
    let bad = s.txn(Txn { success: vec![Op::Put { key: "l/b".into(), value: "1".into(), lease: Some(lease) }], ..Default::default() }).await;
    assert!(matches!(bad, Err(StoreError::LeaseNotFound(_))));
    assert!(s.get("l/b").unwrap().is_none(), "a rejected transaction writes nothing");

    let lease2 = s.lease_grant(Duration::from_secs(60)).await.unwrap();
    s.txn(Txn { success: vec![Op::Put { key: "l/c".into(), value: "1".into(), lease: Some(lease2) }], ..Default::default() }).await.unwrap();
    s.lease_revoke(lease2).await.unwrap();
    assert!(s.get("l/c").unwrap().is_none());
}

#[tokio::test]
async fn reopen_recovers_data_revision_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let (rev, lease) = {
        let s = FjallStore::open(dir.path()).unwrap();
        put(&s, "x", "1").await.unwrap();
        delete(&s, "x").await.unwrap();
        put(&s, "y", "2").await.unwrap();
        let lease = s.lease_grant(Duration::from_secs(60)).await.unwrap();
        s.txn(Txn { success: vec![Op::Put { key: "z".into(), value: "3".into(), lease: Some(lease) }], ..Default::default() }).await.unwrap();
        (s.revision(), lease)
    };
    // fjall's lock file is released once its background threads notice the drop.
    let s = loop {
        match FjallStore::open(dir.path()) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(s.revision(), rev);
    assert!(s.get("x").unwrap().is_none());
    assert_eq!(s.get("y").unwrap().unwrap().value, Bytes::from("2"));
    assert!(s.lease_keep_alive(lease).is_ok());
    s.lease_revoke(lease).await.unwrap();
    assert!(s.get("z").unwrap().is_none(), "recovered lease still knows its keys");
    assert!(put(&s, "w", "4").await.unwrap() > rev);
}

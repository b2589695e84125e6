use super::*;
use zhili_store::memory::MemoryStore;

fn open() -> Arc<Kv> {
    Kv::new(Arc::new(MemoryStore::new()))
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn session(kv: &Kv, behavior: Behavior, lock_delay: Duration) -> Session {
    kv.session_create(SessionSpec { name: "s".into(), node: "zhili".into(), lock_delay: Some(lock_delay), behavior: Some(behavior), ttl: None }).await.unwrap()
}

#[tokio::test]
async fn flags_cas_and_meta_cleanup() {
    let kv = open();
    let (ok, rev) = kv.put("a/b", b("1"), 42, None, None, None).await.unwrap();
    assert!(ok);
    let e = kv.get("a/b").unwrap().unwrap();
    assert_eq!((e.value.as_ref(), e.flags, e.modify_index), (&b"1"[..], 42, rev));
    // CAS with a stale index fails and changes nothing; with the current one it applies.
    assert!(!kv.put("a/b", b("2"), 0, Some(rev - 1), None, None).await.unwrap().0);
    assert_eq!(kv.get("a/b").unwrap().unwrap().value, b("1"));
    assert!(kv.put("a/b", b("2"), 0, Some(rev), None, None).await.unwrap().0);
    let e = kv.get("a/b").unwrap().unwrap();
    assert_eq!((e.value, e.flags), (b("2"), 0), "a put without flags resets them, as in Consul");
    assert!(kv.store().get("kvmeta/a/b").unwrap().is_none(), "all-zero meta is not stored");
    // cas=0 means create-only.
    assert!(!kv.put("a/b", b("3"), 0, Some(0), None, None).await.unwrap().0);
    assert!(kv.put("a/c", b("3"), 7, Some(0), None, None).await.unwrap().0);
    let keys: Vec<(String, u64)> = kv.list("a/").unwrap().into_iter().map(|e| (e.key, e.flags)).collect();
    assert_eq!(keys, [("a/b".to_string(), 0), ("a/c".to_string(), 7)]);
    assert!(kv.delete("a/", true, None).await.unwrap().0);
    assert!(kv.list("a/").unwrap().is_empty());
    assert!(kv.store().range("kvmeta/a/", None).unwrap().is_empty(), "meta goes with its key");
}

#[tokio::test]
async fn locks_follow_sessions() {
    let kv = open();
    let s1 = session(&kv, Behavior::Release, Duration::ZERO).await;
    let s2 = session(&kv, Behavior::Release, Duration::ZERO).await;
    assert!(kv.put("lock", b("me"), 0, None, Some(s1.id.clone()), None).await.unwrap().0);
    let e = kv.get("lock").unwrap().unwrap();
    assert_eq!((e.session.as_deref(), e.lock_index), (Some(s1.id.as_str()), 1));
    assert!(!kv.put("lock", b("you"), 0, None, Some(s2.id.clone()), None).await.unwrap().0, "held by another session");
    assert!(kv.put("lock", b("me2"), 0, None, Some(s1.id.clone()), None).await.unwrap().0, "re-acquire by the holder");
    assert_eq!(kv.get("lock").unwrap().unwrap().lock_index, 1, "re-acquire keeps the lock index");
    assert!(!kv.put("lock", b("x"), 0, None, None, Some(s2.id.clone())).await.unwrap().0, "only the holder releases");
    assert!(kv.put("lock", b("x"), 0, None, None, Some(s1.id.clone())).await.unwrap().0);
    assert_eq!(kv.get("lock").unwrap().unwrap().session, None);
    assert!(kv.put("lock", b("you"), 0, None, Some(s2.id.clone()), None).await.unwrap().0);
    assert_eq!(kv.get("lock").unwrap().unwrap().lock_index, 2);
    assert!(!kv.put("lock", b("x"), 0, None, Some("no-such-session".into()), None).await.unwrap().0);
    // Destroying the holder frees the key (behavior release keeps the value).
    assert!(kv.session_destroy(&s2.id).await.unwrap());
    let e = kv.get("lock").unwrap().unwrap();
    assert_eq!((e.session, e.value), (None, b("you")));
    assert!(kv.session(&s2.id).unwrap().is_none());
    assert!(!kv.session_destroy(&s2.id).await.unwrap());
}

#[tokio::test]
async fn delete_behavior_and_lock_delay() {
    let kv = open();
    let del = session(&kv, Behavior::Delete, Duration::ZERO).await;
    assert!(kv.put("eph", b("v"), 0, None, Some(del.id.clone()), None).await.unwrap().0);
    kv.session_destroy(&del.id).await.unwrap();
    assert!(kv.get("eph").unwrap().is_none(), "behavior delete removes held keys");

    let delayed = session(&kv, Behavior::Release, Duration::from_secs(30)).await;
    let other = session(&kv, Behavior::Release, Duration::ZERO).await;
    assert!(kv.put("k", b("v"), 0, None, Some(delayed.id.clone()), None).await.unwrap().0);
    kv.session_destroy(&delayed.id).await.unwrap();
    assert!(!kv.put("k", b("v"), 0, None, Some(other.id.clone()), None).await.unwrap().0, "lock-delay blocks a new holder");
    assert!(kv.put("k", b("plain"), 0, None, None, None).await.unwrap().0, "plain writes are not delayed");
}

#[tokio::test]
async fn ttl_sessions_expire_and_free_their_locks() {
    let kv = open();
    tokio::spawn(kv.clone().run_session_reaper());
    let s = kv
        .session_create(SessionSpec { name: "t".into(), node: "zhili".into(), lock_delay: Some(Duration::ZERO), behavior: None, ttl: Some(MIN_SESSION_TTL) })
        .await
        .unwrap();
    assert!(kv.session_renew(&s.id).unwrap().is_some());
    assert!(kv.put("held", b("v"), 0, None, Some(s.id.clone()), None).await.unwrap().0);
    // Revoking the lease is what expiry does; the reaper sees the record go and frees the key.
    kv.store().lease_revoke(s.lease.unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while kv.get("held").unwrap().unwrap().session.is_some() {
        assert!(Instant::now() < deadline, "the reaper did not free the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(kv.session_renew(&s.id).unwrap().is_none());
    let bad = kv.session_create(SessionSpec { name: "t".into(), node: "zhili".into(), ttl: Some(Duration::from_secs(1)), ..Default::default() }).await;
    assert!(bad.unwrap_err().to_string().starts_with("TTL:"));
}

#[tokio::test]
async fn transactions_apply_whole_or_name_the_failure() {
    let kv = open();
    kv.put("t/a", b("1"), 0, None, None, None).await.unwrap();
    let a = kv.get("t/a").unwrap().unwrap();
    let ok = kv
        .txn(&[
            KvOp::CheckIndex { key: "t/a".into(), index: a.modify_index },
            KvOp::Set { key: "t/b".into(), value: b("2"), flags: 1 },
            KvOp::GetTree { prefix: "t/".into() },
        ])
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(&ok.1[2], OpResult::Entries(es) if es.len() == 2));
    let failed = kv.txn(&[KvOp::Set { key: "t/c".into(), value: b("3"), flags: 0 }, KvOp::CheckNotExists { key: "t/a".into() }]).await.unwrap().unwrap_err();
    assert_eq!(failed.op_index, 1);
    assert!(kv.get("t/c").unwrap().is_none(), "a failed transaction writes nothing");
    let bad = kv.txn(&[KvOp::Get { key: "../x".into() }]).await.unwrap_err();
    assert!(bad.to_string().starts_with("ops[0].key"), "{bad}");
}

#[test]
fn uuids_look_like_uuids() {
    let u = uuid();
    assert_eq!(u.len(), 36);
    assert_eq!(u.as_bytes()[14], b'4');
    assert_ne!(u, uuid());
}

#[tokio::test]
async fn keys_fold_at_the_separator_and_respect_visibility() {
    let kv = open();
    for k in ["a/b/1", "a/b/2", "a/c", "a/d/x/y", "a/secret/pw", "b"] {
        kv.put(k, b("v"), 0, None, None, None).await.unwrap();
    }
    let all = |_: &str| true;
    assert_eq!(kv.keys("a/", None, all).unwrap(), ["a/b/1", "a/b/2", "a/c", "a/d/x/y", "a/secret/pw"]);
    assert_eq!(kv.keys("a/", Some("/"), all).unwrap(), ["a/b/", "a/c", "a/d/", "a/secret/"]);
    assert_eq!(kv.keys("", Some("/"), all).unwrap(), ["a/", "b"]);
    assert_eq!(kv.keys("a/", Some(""), all).unwrap().len(), 5, "an empty separator folds nothing");
    let hidden = |k: &str| !k.starts_with("a/secret/");
    assert_eq!(kv.keys("a/", Some("/"), hidden).unwrap(), ["a/b/", "a/c", "a/d/"], "a folder only of hidden keys is not shown");
}

//! `/v1/kv`, `/v1/session` and `/v1/txn`, over the one KV store (zhili-kv).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use zhili_kv::{Behavior, Entry, KvOp, OpResult, Session, SessionSpec};
use zhili_model::acl::{Access, Resource};
use zhili_model::{parse_duration, validate};

use super::{at, bad, boolean, canon, check_dc, decode, decode_any, reply, set, take, CResult, ConsulError};
use crate::ConsulState;
use zhili_http::auth::Caller;
use zhili_http::error::ApiError;
use zhili_http::extract::QueryPairs;

pub fn routes() -> Router<ConsulState> {
    Router::new()
        .route("/v1/kv/", get(get_root).delete(delete_root))
        .route("/v1/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/v1/session/create", put(session_create))
        .route("/v1/session/destroy/{id}", put(session_destroy))
        .route("/v1/session/renew/{id}", put(session_renew))
        .route("/v1/session/info/{id}", get(session_info))
        .route("/v1/session/node/{node}", get(session_node))
        .route("/v1/session/list", get(session_list))
        .route("/v1/txn", put(txn))
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

fn entry_json(e: &Entry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": if e.value.is_empty() { Value::Null } else { Value::String(b64(&e.value)) },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let Some(s) = &e.session {
        set(&mut v, "Session", json!(s));
    }
    v
}

async fn get_root(s: State<ConsulState>, caller: Caller, q: QueryPairs) -> CResult<Response> {
    read(s, caller, String::new(), q).await
}

async fn get_key(s: State<ConsulState>, caller: Caller, Path(key): Path<String>, q: QueryPairs) -> CResult<Response> {
    read(s, caller, key, q).await
}

async fn read(State(s): State<ConsulState>, caller: Caller, key: String, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let recurse = q.get("recurse").is_some();
    let keys = q.get("keys").is_some();
    let tree = recurse || keys;
    if tree {
        validate::kv_prefix("key", &key)?;
    } else {
        if key.is_empty() {
            return Err(bad("key", "missing key name"));
        }
        validate::kv_key("key", &key)?;
        caller.require(Resource::Kv, &key, Access::Read)?;
    }
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        s.kv.wait(&key, tree, index, wait).await;
    }
    let index = s.store.revision();
    if keys {
        let out = s.kv.keys(&key, q.get("separator"), |k| caller.can(Resource::Kv, k, Access::Read))?;
        if out.is_empty() {
            return Ok(reply(index, StatusCode::NOT_FOUND));
        }
        return Ok(reply(index, Json(out)));
    }
    let entries: Vec<Entry> = if recurse {
        s.kv.list(&key)?.into_iter().filter(|e| caller.can(Resource::Kv, &e.key, Access::Read)).collect()
    } else {
        s.kv.get(&key)?.into_iter().collect()
    };
    if entries.is_empty() {
        return Ok(reply(index, StatusCode::NOT_FOUND));
    }
    if let (Some(e), true) = (entries.first(), q.get("raw").is_some() && !recurse) {
        return Ok(reply(index, ([(header::CONTENT_TYPE, "application/octet-stream")], e.value.clone())));
    }
    Ok(reply(index, Json(entries.iter().map(entry_json).collect::<Vec<_>>())))
}

async fn put_key(State(s): State<ConsulState>, caller: Caller, Path(key): Path<String>, q: QueryPairs, body: Bytes) -> CResult<Response> {
    check_dc(&s, &q)?;
    validate::kv_key("key", &key)?;
    validate::kv_value("value", &body).map_err(|e| ConsulError(ApiError::PayloadTooLarge(e.to_string())))?;
    caller.require(Resource::Kv, &key, Access::Write)?;
    let flags = q.u64("flags")?.unwrap_or(0);
    let cas = q.u64("cas")?;
    let acquire = q.get("acquire").map(str::to_string);
    let release = q.get("release").map(str::to_string);
    if acquire.is_some() && release.is_some() {
        return Err(bad("acquire", "conflicting flags: acquire and release"));
    }
    let (ok, _) = s.kv.put(&key, body, flags, cas, acquire, release).await?;
    if ok {
        s.metrics.kv_writes.inc();
    }
    Ok(boolean(ok))
}

async fn delete_root(s: State<ConsulState>, caller: Caller, q: QueryPairs) -> CResult<Response> {
    if q.get("recurse").is_none() {
        return Err(bad("key", "missing key name"));
    }
    delete(s, caller, String::new(), q).await
}

async fn delete_key(s: State<ConsulState>, caller: Caller, Path(key): Path<String>, q: QueryPairs) -> CResult<Response> {
    delete(s, caller, key, q).await
}

async fn delete(State(s): State<ConsulState>, caller: Caller, key: String, q: QueryPairs) -> CResult<Response> {
    check_dc(&s, &q)?;
    let recurse = q.get("recurse").is_some();
    if recurse {
        validate::kv_prefix("key", &key)?;
        // A recursive delete needs write on everything it could remove.
        caller.require_all(Resource::Kv, &key, Access::Write)?;
    } else {
        validate::kv_key("key", &key)?;
        caller.require(Resource::Kv, &key, Access::Write)?;
    }
    let cas = q.u64("cas")?;
    if recurse && cas.is_some() {
        return Err(bad("cas", "cannot be combined with recurse"));
    }
    let (ok, _) = s.kv.delete(&key, recurse, cas).await?;
    Ok(boolean(ok))
}

// ---- sessions --------------------------------------------------------------------------------

fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay_ms * 1_000_000,
        "Behavior": match s.behavior { Behavior::Release => "release", Behavior::Delete => "delete" },
        "TTL": s.ttl_ms.map_or(String::new(), |ms| zhili_model::format_duration(Duration::from_millis(ms))),
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": null,
        "Checks": ["serfHealth"],
        "Namespace": "default",
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// LockDelay is a duration string or a number: nanoseconds, or seconds when under 1,000 (as
/// Consul reads it).
fn lock_delay(v: &Value) -> CResult<Option<Duration>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(parse_duration("LockDelay", s)?)),
        Value::Number(n) => {
            let n = n.as_u64().ok_or_else(|| bad("LockDelay", "must not be negative"))?;
            Ok(Some(if n < 1000 { Duration::from_secs(n) } else { Duration::from_nanos(n) }))
        }
        _ => Err(bad("LockDelay", "must be a duration")),
    }
}

/// Sessions serve KV locks and service leadership alike: either kind of access will do.
fn session_access(caller: &Caller, access: Access) -> CResult<()> {
    caller.require(Resource::Kv, "", access).or_else(|_| caller.require(Resource::Service, "", access))?;
    Ok(())
}

async fn session_create(State(s): State<ConsulState>, caller: Caller, q: QueryPairs, body: Bytes) -> CResult<Response> {
    check_dc(&s, &q)?;
    session_access(&caller, Access::Write)?;
    let mut v = if body.is_empty() { json!({}) } else { decode(&body)? };
    canon(&mut v, &["Name", "Node", "LockDelay", "Behavior", "TTL", "Checks", "NodeChecks", "ServiceChecks"]);
    let node = at(&v, "Node").as_str().filter(|n| !n.is_empty()).map_or_else(|| s.consul.node.clone(), str::to_string);
    let behavior = match at(&v, "Behavior").as_str() {
        None | Some("") | Some("release") => Behavior::Release,
        Some("delete") => Behavior::Delete,
        Some(other) => return Err(bad("Behavior", format!("{other:?} is not release or delete"))),
    };
    let ttl = match at(&v, "TTL").as_str() {
        None | Some("") => None,
        Some(t) => match parse_duration("TTL", t)? {
            d if d.is_zero() => None,
            d if !(zhili_kv::MIN_SESSION_TTL..=zhili_kv::MAX_SESSION_TTL).contains(&d) => {
                // Consul's own answer, word for word: its RPC error, a 500 with the TTL in ns.
                let text = format!("Invalid Session TTL '{}', must be between [10s=24h0m0s]", d.as_nanos());
                return Ok((StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
            }
            d => Some(d),
        },
    };
    let spec = SessionSpec {
        name: at(&v, "Name").as_str().unwrap_or_default().to_string(),
        node,
        lock_delay: lock_delay(at(&v, "LockDelay"))?,
        behavior: Some(behavior),
        ttl,
    };
    let session = s.kv.session_create(spec).await?;
    Ok(reply(session.create_index, Json(json!({ "ID": session.id }))))
}

async fn session_destroy(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>) -> CResult<Response> {
    session_access(&caller, Access::Write)?;
    s.kv.session_destroy(&id).await?;
    Ok(boolean(true))
}

async fn session_renew(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>) -> CResult<Response> {
    session_access(&caller, Access::Write)?;
    match s.kv.session_renew(&id)? {
        Some(session) => Ok(reply(session.modify_index, Json(vec![session_json(&session)]))),
        None => Err(ConsulError(ApiError::NotFound(format!("Session id '{id}' not found")))),
    }
}

async fn session_info(State(s): State<ConsulState>, caller: Caller, Path(id): Path<String>) -> CResult<Response> {
    session_access(&caller, Access::Read)?;
    let list: Vec<Value> = s.kv.session(&id)?.iter().map(session_json).collect();
    Ok(reply(s.store.revision(), Json(list)))
}

async fn session_list(State(s): State<ConsulState>, caller: Caller) -> CResult<Response> {
    session_access(&caller, Access::Read)?;
    let list: Vec<Value> = s.kv.sessions()?.iter().map(session_json).collect();
    Ok(reply(s.store.revision(), Json(list)))
}

async fn session_node(State(s): State<ConsulState>, caller: Caller, Path(node): Path<String>) -> CResult<Response> {
    session_access(&caller, Access::Read)?;
    let list: Vec<Value> = s.kv.sessions()?.iter().filter(|x| x.node == node).map(session_json).collect();
    Ok(reply(s.store.revision(), Json(list)))
}

// ---- transactions ----------------------------------------------------------------------------

fn txn_op(i: usize, mut op: Value) -> CResult<(KvOp, bool)> {
    if !op.is_object() {
        return Err(bad(&format!("[{i}]"), "must be an object such as {\"KV\": {...}}"));
    }
    canon(&mut op, &["KV", "Node", "Service", "Check", "Session"]);
    let mut kv = take(&mut op, "KV");
    if kv.is_null() {
        return Err(bad(&format!("[{i}]"), "only KV operations are supported in transactions"));
    }
    canon(&mut kv, &["Verb", "Key", "Value", "Flags", "Index", "Session"]);
    let f = |n: &str| format!("[{i}].KV.{n}");
    let key = at(&kv, "Key").as_str().unwrap_or_default().to_string();
    let value = match &at(&kv, "Value") {
        Value::Null => Bytes::new(),
        Value::String(v) => base64::engine::general_purpose::STANDARD.decode(v).map_err(|_| bad(&f("Value"), "must be base64"))?.into(),
        _ => return Err(bad(&f("Value"), "must be a base64 string")),
    };
    let flags = at(&kv, "Flags").as_u64().unwrap_or(0);
    let index = at(&kv, "Index").as_u64().unwrap_or(0);
    let session = at(&kv, "Session").as_str().unwrap_or_default().to_string();
    let verb = at(&kv, "Verb").as_str().unwrap_or_default();
    let write = !matches!(verb, "get" | "get-tree" | "check-index" | "check-session" | "check-not-exists");
    let op = match verb {
        "set" => KvOp::Set { key, value, flags },
        "cas" => KvOp::Cas { key, value, flags, index },
        "lock" => KvOp::Lock { key, value, flags, session },
        "unlock" => KvOp::Unlock { key, value, flags, session },
        "get" => KvOp::Get { key },
        "get-tree" => KvOp::GetTree { prefix: key },
        "check-index" => KvOp::CheckIndex { key, index },
        "check-session" => KvOp::CheckSession { key, session },
        "check-not-exists" => KvOp::CheckNotExists { key },
        "delete" => KvOp::Delete { key },
        "delete-tree" => KvOp::DeleteTree { prefix: key },
        "delete-cas" => KvOp::DeleteCas { key, index },
        other => return Err(bad(&f("Verb"), format!("unknown verb {other:?}"))),
    };
    Ok((op, write))
}

async fn txn(State(s): State<ConsulState>, caller: Caller, q: QueryPairs, body: Bytes) -> CResult<Response> {
    check_dc(&s, &q)?;
    let Value::Array(raw) = decode_any(&body)? else { return Err(bad("body", "must be a list of operations")) };
    let mut ops = Vec::with_capacity(raw.len());
    for (i, op) in raw.into_iter().enumerate() {
        let (op, write) = txn_op(i, op)?;
        let access = if write { Access::Write } else { Access::Read };
        match op {
            // A tree delete removes every key under the prefix: each must be writable.
            KvOp::DeleteTree { .. } => caller.require_all(Resource::Kv, op.key(), access)?,
            _ => caller.require(Resource::Kv, op.key(), access)?,
        }
        ops.push(op);
    }
    match s.kv.txn(&ops).await? {
        Ok((index, results)) => {
            let results: Vec<Value> = results
                .iter()
                .flat_map(|r| match r {
                    OpResult::Entry(Some(e)) => vec![json!({ "KV": entry_json(e) })],
                    // A tree read shows only the keys the caller may read, as Consul filters it.
                    OpResult::Entries(es) => {
                        es.iter().filter(|e| caller.can(Resource::Kv, &e.key, Access::Read)).map(|e| json!({ "KV": entry_json(e) })).collect()
                    }
                    OpResult::Entry(None) | OpResult::Nothing => vec![],
                })
                .collect();
            Ok(reply(index, Json(json!({ "Results": results, "Errors": null }))))
        }
        Err(f) => Ok((StatusCode::CONFLICT, Json(json!({ "Results": null, "Errors": [{ "OpIndex": f.op_index, "What": f.what }] }))).into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXN_KEYS: &[&str] = &["KV", "Verb", "Key", "Value", "Flags", "Index", "Session", "Node", "Service", "Check", "verb", "kv"];

    proptest::proptest! {
        /// Any JSON as a transaction operation: a KV operation, or a 400 naming the operation;
        /// never a panic (a bare number used to panic the handler).
        #[test]
        fn arbitrary_txn_operations_never_panic(v in zhili_test_support::json::arbitrary_json(TXN_KEYS)) {
            if let Err(e) = txn_op(0, v) {
                proptest::prop_assert_eq!(e.0.status(), StatusCode::BAD_REQUEST);
                proptest::prop_assert!(e.0.detail().starts_with("[0]"), "{}", e.0.detail());
            }
        }
    }

    #[test]
    fn non_object_operations_are_refused() {
        for v in [json!(1), json!("x"), json!(true), json!([]), json!(null)] {
            assert!(txn_op(3, v).is_err());
        }
        assert!(decode(b"[1]").is_err(), "a body that must be an object");
        assert!(decode_any(b"[1]").is_ok());
    }
}

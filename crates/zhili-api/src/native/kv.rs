//! The KV/config store: get, recursive get, key listing, put with CAS, delete (recursive, CAS),
//! and blocking reads that wake only when something under the key or prefix changed.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::Serialize;
use zhili_kv::Entry;
use zhili_model::acl::{Access, Resource};
use zhili_model::validate;

use super::indexed;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryPairs;
use crate::{AppState, KV_PREFIX};

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/kv", get(get_root)).route("/api/v1/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
}

#[derive(Serialize, schemars::JsonSchema)]
pub struct KvEntry {
    pub key: String,
    /// Base64 of the stored bytes.
    pub value: String,
    pub create_index: u64,
    pub modify_index: u64,
    pub version: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub flags: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl KvEntry {
    /// From a raw store record (watch events); flags and lock state are not part of those.
    pub fn from_kv(kv: &zhili_store::KeyValue) -> Self {
        Self {
            key: kv.key[KV_PREFIX.len()..].to_string(),
            value: base64::engine::general_purpose::STANDARD.encode(&kv.value),
            create_index: kv.create_revision,
            modify_index: kv.mod_revision,
            version: kv.version,
            flags: 0,
            session: None,
        }
    }

    pub fn from_entry(e: &Entry) -> Self {
        Self {
            key: e.key.clone(),
            value: base64::engine::general_purpose::STANDARD.encode(&e.value),
            create_index: e.create_index,
            modify_index: e.modify_index,
            version: e.version,
            flags: e.flags,
            session: e.session.clone(),
        }
    }
}

async fn get_root(state: State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    if !q.flag("recurse")?.unwrap_or(false) && !q.flag("keys")?.unwrap_or(false) {
        return Err(ApiError::field("key", "is required unless recurse or keys is set"));
    }
    read(state, caller, String::new(), q).await
}

async fn get_key(state: State<AppState>, caller: Caller, Path(key): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    read(state, caller, key, q).await
}

async fn read(State(s): State<AppState>, caller: Caller, key: String, q: QueryPairs) -> ApiResult<Response> {
    let recurse = q.flag("recurse")?.unwrap_or(false);
    let keys = q.flag("keys")?.unwrap_or(false);
    let raw = q.flag("raw")?.unwrap_or(false);
    if recurse || keys {
        validate::kv_prefix("key", &key)?;
    } else {
        validate::kv_key("key", &key)?;
    }
    caller.require(Resource::Kv, &key, Access::Read).or_else(|e| if recurse || keys { Ok(()) } else { Err(e) })?;
    if let Some((index, wait)) = q.blocking()? {
        let _g = zhili_telemetry::WatcherGuard::new(&s.metrics);
        s.kv.wait(&key, recurse || keys, index, wait).await;
    }
    let index = s.store.revision();
    if keys {
        let out = s.kv.keys(&key, q.get("separator"), |k| caller.can(Resource::Kv, k, Access::Read))?;
        return Ok(indexed(index, Json(out)));
    }
    if recurse {
        let entries: Vec<KvEntry> = s.kv.list(&key)?.iter().filter(|e| caller.can(Resource::Kv, &e.key, Access::Read)).map(KvEntry::from_entry).collect();
        return Ok(indexed(index, Json(entries)));
    }
    let Some(e) = s.kv.get(&key)? else {
        // The index rides along so a watcher of a missing key knows where to continue from.
        return Ok(indexed(index, ApiError::NotFound(format!("key {key:?} not found"))));
    };
    if raw {
        return Ok(indexed(index, ([(header::CONTENT_TYPE, "application/octet-stream")], e.value)));
    }
    Ok(indexed(index, Json(KvEntry::from_entry(&e))))
}

async fn put_key(State(s): State<AppState>, caller: Caller, Path(key): Path<String>, q: QueryPairs, body: Bytes) -> ApiResult<Response> {
    validate::kv_key("key", &key)?;
    validate::kv_value("value", &body).map_err(|e| ApiError::PayloadTooLarge(e.to_string()))?;
    caller.require(Resource::Kv, &key, Access::Write)?;
    let cas = q.u64("cas")?;
    let (applied, revision) = s.kv.put(&key, body, 0, cas, None, None).await?;
    if !applied {
        let current = s.kv.get(&key)?.map_or(0, |e| e.modify_index);
        return Err(ApiError::Conflict(format!("cas: key {key:?} has modify index {current}, not {}", cas.unwrap_or_default())));
    }
    s.metrics.kv_writes.inc();
    Ok(indexed(revision, Json(super::Written { index: revision })))
}

async fn delete_key(State(s): State<AppState>, caller: Caller, Path(key): Path<String>, q: QueryPairs) -> ApiResult<Response> {
    let recurse = q.flag("recurse")?.unwrap_or(false);
    if recurse {
        validate::kv_prefix("key", &key)?;
    } else {
        validate::kv_key("key", &key)?;
    }
    if recurse {
        // Every key the delete could remove must be writable, not only the prefix in the URL.
        caller.require_all(Resource::Kv, &key, Access::Write)?;
    } else {
        caller.require(Resource::Kv, &key, Access::Write)?;
    }
    let cas = q.u64("cas")?;
    if recurse && cas.is_some() {
        return Err(ApiError::field("cas", "cannot be combined with recurse"));
    }
    let (applied, revision) = s.kv.delete(&key, recurse, cas).await?;
    if !applied {
        return Err(ApiError::Conflict(format!("cas: key {key:?} does not have modify index {}", cas.unwrap_or_default())));
    }
    Ok(indexed(revision, (StatusCode::OK, Json(super::Written { index: revision })).into_response()))
}

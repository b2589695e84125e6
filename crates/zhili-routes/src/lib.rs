//! Gateway routes and consumers as stored resources: where they live in the Store and how they
//! are loaded, written, deleted and waited on. The API validates a resource (a route by compiling
//! it with the gateway) before putting it; the API and the embedded gateway both read from here,
//! so a route change flows API → this crate → Store → gateway without passing back through HTTP.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;
use zhili_model::ValidationError;
use zhili_store::{Store, StoreError};

pub const ROUTES_PREFIX: &str = "routes/";
pub const CONSUMERS_PREFIX: &str = "consumers/";

/// One kind of named gateway resource, stored as JSON under a prefix.
pub trait Stored: Serialize + DeserializeOwned {
    const PREFIX: &'static str;
    /// Singular, as in paths and messages.
    const WHAT: &'static str;
}

impl Stored for RouteSpec {
    const PREFIX: &'static str = ROUTES_PREFIX;
    const WHAT: &'static str = "route";
}

impl Stored for ConsumerSpec {
    const PREFIX: &'static str = CONSUMERS_PREFIX;
    const WHAT: &'static str = "consumer";
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored {0} is unreadable: {1}")]
    Corrupt(String, String),
}

/// The store key of resource `name` (names follow the name rule).
fn key<T: Stored>(name: &str) -> Result<String, ValidationError> {
    zhili_model::validate::name(T::WHAT, name)?;
    Ok(format!("{}{name}", T::PREFIX))
}

/// Every stored resource of a kind, in name order, with the store revision they reflect. An
/// unreadable record is skipped with a warning, so one bad record cannot stop the gateway.
pub fn load_all<T: Stored>(store: &dyn Store) -> Result<(u64, Vec<(String, T)>), StoreError> {
    let revision = store.revision();
    let mut out = vec![];
    for kv in store.range(T::PREFIX, None)? {
        let name = kv.key.trim_start_matches(T::PREFIX).to_string();
        match serde_json::from_slice::<T>(&kv.value) {
            Ok(spec) => out.push((name, spec)),
            Err(e) => tracing::warn!(name = %name, kind = T::WHAT, error = %e, "stored gateway resource is unreadable; skipped"),
        }
    }
    Ok((revision, out))
}

pub fn load_routes(store: &dyn Store) -> Result<(u64, Vec<(String, RouteSpec)>), StoreError> {
    load_all(store)
}

pub fn load_consumers(store: &dyn Store) -> Result<(u64, Vec<(String, ConsumerSpec)>), StoreError> {
    load_all(store)
}

/// One resource and the revision it was last changed at.
pub fn get<T: Stored>(store: &dyn Store, name: &str) -> Result<Option<(u64, T)>, RoutesError> {
    let Some(kv) = store.get(&key::<T>(name)?)? else { return Ok(None) };
    let spec = serde_json::from_slice(&kv.value).map_err(|e| RoutesError::Corrupt(format!("{} {name:?}", T::WHAT), e.to_string()))?;
    Ok(Some((kv.mod_revision, spec)))
}

/// Stores a resource the caller has already validated; returns its revision.
pub async fn put<T: Stored>(store: &dyn Store, name: &str, spec: &T) -> Result<u64, RoutesError> {
    let value = serde_json::to_vec(spec).map_err(|e| RoutesError::Corrupt(format!("{} {name:?}", T::WHAT), e.to_string()))?;
    Ok(zhili_store::put(store, &key::<T>(name)?, value).await?)
}

/// Deletes a resource; None when there was none.
pub async fn delete<T: Stored>(store: &dyn Store, name: &str) -> Result<Option<u64>, RoutesError> {
    let r = zhili_store::delete(store, &key::<T>(name)?).await?;
    Ok((!r.deleted.is_empty()).then_some(r.revision))
}

/// Waits until a resource of the kind changes after store revision `index` (or `wait` passes).
pub async fn wait<T: Stored>(store: &dyn Store, index: u64, wait: Duration) {
    zhili_store::wait_for_change(store, T::PREFIX, true, index, wait).await
}

pub async fn wait_routes(store: &dyn Store, index: u64, wait: Duration) {
    self::wait::<RouteSpec>(store, index, wait).await
}

pub async fn wait_consumers(store: &dyn Store, index: u64, wait: Duration) {
    self::wait::<ConsumerSpec>(store, index, wait).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn put_get_list_wait_delete() {
        let store: Arc<dyn Store> = Arc::new(zhili_store::memory::MemoryStore::new());
        let spec: RouteSpec = serde_json::from_str(r#"{"path_prefix": "/a/", "service": "a"}"#).unwrap();
        assert!(put(&*store, "bad name", &spec).await.is_err(), "names follow the name rule");
        let rev = put(&*store, "a", &spec).await.unwrap();
        assert_eq!(get::<RouteSpec>(&*store, "a").unwrap().map(|(r, s)| (r, s.service)), Some((rev, Some("a".into()))));
        assert!(get::<ConsumerSpec>(&*store, "a").unwrap().is_none(), "kinds live apart");
        let (index, all) = load_routes(&*store).unwrap();
        assert_eq!((index, all.len()), (rev, 1));
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { wait_routes(&*store, rev, Duration::from_secs(10)).await })
        };
        let deleted = delete::<RouteSpec>(&*store, "a").await.unwrap();
        assert!(deleted.is_some_and(|r| r > rev));
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("a delete wakes the waiter").unwrap();
        assert_eq!(delete::<RouteSpec>(&*store, "a").await.unwrap(), None);
    }
}

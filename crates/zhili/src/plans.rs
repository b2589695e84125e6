//! The plans engine's world: instances and maintenance through the registry, routes through
//! zhili-routes (compiled by the gateway first, as the API does), KV through zhili-kv, and the
//! embedded gateway's own per-target traffic counters for rollout gates.

use std::sync::Arc;

use bytes::Bytes;
use zhili_model::route::{RouteSpec, Subset};
use zhili_model::Instance;
use zhili_plans::Traffic;
use zhili_registry::{InstanceFilter, Registry};
use zhili_store::Store;

pub struct World {
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    pub kv: Arc<zhili_kv::Kv>,
    /// The embedded gateway, when it runs (`--gateway-addr off`: traffic gates have no data).
    pub gateway: Option<Arc<zhili_gateway::Gateway>>,
}

#[async_trait::async_trait]
impl zhili_plans::Environment for World {
    fn instances(&self, namespace: &str, service: &str) -> Option<Vec<Instance>> {
        let all = InstanceFilter { healthy_only: false, ..Default::default() };
        self.registry.instances(namespace, service, &all).map(|l| l.instances)
    }

    async fn set_maintenance(&self, namespace: &str, service: &str, id: &str, on: bool, reason: &str) -> Result<(), String> {
        self.registry.set_maintenance(namespace, service, id, on, reason).await.map(drop).map_err(|e| e.to_string())
    }

    fn route(&self, name: &str) -> Option<RouteSpec> {
        zhili_routes::get::<RouteSpec>(&*self.store, name).ok().flatten().map(|(_, spec)| spec)
    }

    async fn put_route(&self, name: &str, spec: &RouteSpec) -> Result<(), String> {
        zhili_gateway::compile(name, spec).map_err(|e| e.to_string())?;
        zhili_routes::put(&*self.store, name, spec).await.map(drop).map_err(|e| e.to_string())
    }

    fn kv_get(&self, key: &str) -> Result<Option<Bytes>, String> {
        self.kv.get(key).map(|e| e.map(|e| e.value)).map_err(|e| e.to_string())
    }

    async fn kv_put(&self, key: &str, value: Bytes) -> Result<(), String> {
        self.kv.put(key, value, 0, None, None, None).await.map(drop).map_err(|e| e.to_string())
    }

    async fn kv_delete(&self, key: &str) -> Result<(), String> {
        self.kv.delete(key, false, None).await.map(drop).map_err(|e| e.to_string())
    }

    fn traffic(&self, route: &str, namespace: &str, service: &str, subset: &Subset, since_ms: u64) -> Option<Traffic> {
        let t = self.gateway.as_ref()?.traffic(route, namespace, service, subset, since_ms)?;
        Some(Traffic { requests: t.requests, errors: t.errors, p99_ms: t.p99_ms })
    }
}

//! The transaction coordinator's view of the registry: discovery-aware branch URLs
//! (`discovery://order/api/reserve`) go to a serving instance (healthy, enabled, not in
//! maintenance, not ejected by the gateway's passive health), round-robin, avoiding the one that
//! failed last when another exists.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use zhili_registry::{InstanceFilter, Registry};

pub struct RegistryResolver {
    registry: Arc<Registry>,
    next: AtomicUsize,
}

impl RegistryResolver {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry, next: AtomicUsize::new(0) }
    }
}

impl zhili_txn::Resolve for RegistryResolver {
    fn instance(&self, namespace: &str, service: &str, avoid: Option<&str>) -> Option<String> {
        let filter = InstanceFilter { healthy_only: true, ..Default::default() };
        let list = self.registry.instances(namespace, service, &filter)?;
        let addrs: Vec<String> = list.instances.iter().filter(|i| i.is_serving()).map(|i| format!("{}:{}", i.address, i.port)).collect();
        let preferred: Vec<&String> = addrs.iter().filter(|a| Some(a.as_str()) != avoid).collect();
        let pool: Vec<&String> = if preferred.is_empty() { addrs.iter().collect() } else { preferred };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        pool.get(n % pool.len().max(1)).map(|a| a.to_string())
    }
}

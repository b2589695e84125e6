//! Client-side load balancing over a discovered instance list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use zhili_model::Instance;

pub trait Balancer: Send + Sync {
    fn pick<'a>(&self, instances: &'a [Instance]) -> Option<&'a Instance>;
}

/// Each instance in turn, ignoring weights.
#[derive(Default)]
pub struct RoundRobin(AtomicUsize);

impl Balancer for RoundRobin {
    fn pick<'a>(&self, instances: &'a [Instance]) -> Option<&'a Instance> {
        instances.get(self.0.fetch_add(1, Ordering::Relaxed) % instances.len().max(1))
    }
}

/// nginx's smooth weighted round robin: proportional to weight, and interleaved rather than
/// bursty (weights 5,1,1 give a a b a c a a, not a a a a a b c). Weight 0 is never picked.
#[derive(Default)]
pub struct SmoothWeighted {
    current: Mutex<HashMap<String, i64>>,
}

impl Balancer for SmoothWeighted {
    fn pick<'a>(&self, instances: &'a [Instance]) -> Option<&'a Instance> {
        let mut current = self.current.lock();
        current.retain(|id, _| instances.iter().any(|i| &i.id == id));
        let mut total = 0i64;
        let mut best: Option<(&'a Instance, i64)> = None;
        for inst in instances.iter().filter(|i| i.weight > 0) {
            let w = i64::from(inst.weight);
            total += w;
            let c = current.entry(inst.id.clone()).or_insert(0);
            *c += w;
            if best.is_none_or(|(_, bc)| *c > bc) {
                best = Some((inst, *c));
            }
        }
        let (chosen, _) = best?;
        if let Some(c) = current.get_mut(&chosen.id) {
            *c -= total;
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhili_model::HealthStatus;

    fn inst(id: &str, weight: u32) -> Instance {
        Instance {
            id: id.into(),
            namespace: "default".into(),
            service: "s".into(),
            address: "10.0.0.1".into(),
            port: 1,
            weight,
            tags: vec![],
            metadata: Default::default(),
            zone: None,
            version: None,
            enabled: true,
            ephemeral: true,
            maintenance: None,
            health: HealthStatus::Passing,
            checks: vec![],
            create_index: 1,
            modify_index: 1,
            node: None,
            passive_health: None,
            report: None,
        }
    }

    #[test]
    fn smooth_weighted_interleaves_by_weight() {
        let list = [inst("a", 5), inst("b", 1), inst("c", 1), inst("z", 0)];
        let b = SmoothWeighted::default();
        let seq: String = (0..7).map(|_| b.pick(&list).unwrap().id.clone()).collect();
        assert_eq!(seq, "aabacaa");
        let mut counts = HashMap::new();
        for _ in 0..700 {
            *counts.entry(b.pick(&list).unwrap().id.clone()).or_insert(0) += 1;
        }
        assert_eq!((counts["a"], counts["b"], counts["c"]), (500, 100, 100));
        assert!(!counts.contains_key("z"));
    }

    #[test]
    fn round_robin_cycles() {
        let list = [inst("a", 1), inst("b", 1)];
        let rr = RoundRobin::default();
        let seq: Vec<_> = (0..4).map(|_| rr.pick(&list).unwrap().id.clone()).collect();
        assert_eq!(seq, ["a", "b", "a", "b"]);
        assert!(rr.pick(&[]).is_none());
    }
}

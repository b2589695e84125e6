//! Endpoint pools and the choice of one endpoint per try: power of two choices over peak-EWMA
//! latency × outstanding requests (the default), round robin, smooth weighted round robin, least
//! request, consistent hash. Also passive health (outlier ejection) and the retry budget.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rand::Rng;
use zhili_model::route::{LoadBalancer, Subset};

/// One instance the gateway may send to, as discovery reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    pub tags: Vec<String>,
    pub version: Option<String>,
    pub zone: Option<String>,
}

/// Consecutive failures (5xx or gateway errors) that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
pub const EJECT_BASE: Duration = Duration::from_secs(30);
pub const EJECT_MAX: Duration = Duration::from_secs(300);
/// Never eject more than this share of a pool.
pub const MAX_EJECTED_PERCENT: usize = 50;
/// Peak-EWMA decay time.
const EWMA_TAU: f64 = 10.0;
/// Latency assumed for an endpoint never measured (µs), so new endpoints get tried.
const EWMA_INITIAL_US: f64 = 1000.0;
const RING_VNODES: usize = 160;

#[derive(Debug)]
pub struct EndpointState {
    pub endpoint: Endpoint,
    /// `address:port` for the upstream URI.
    pub authority: String,
    pub pending: AtomicU32,
    ewma_us: AtomicU64,
    last_update_ms: AtomicU64,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    times_ejected: AtomicU32,
    epoch: Instant,
    /// Connections of the gateway's own HTTP/1.1 client to this endpoint.
    pub conns: Arc<crate::h1::Upstream>,
}

impl EndpointState {
    pub(crate) fn new(endpoint: Endpoint, epoch: Instant) -> Self {
        let authority = if endpoint.address.contains(':') {
            format!("[{}]:{}", endpoint.address, endpoint.port)
        } else {
            format!("{}:{}", endpoint.address, endpoint.port)
        };
        let conns = Arc::new(crate::h1::Upstream::new(authority.clone()));
        Self {
            endpoint,
            authority,
            pending: AtomicU32::new(0),
            ewma_us: AtomicU64::new(EWMA_INITIAL_US.to_bits()),
            last_update_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            epoch,
            conns,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    fn cost(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        ewma * f64::from(self.pending.load(Ordering::Relaxed) + 1) / f64::from(self.endpoint.weight.max(1))
    }

    /// Peak EWMA: a slower answer counts at once, faster ones pull the average down over `EWMA_TAU`.
    pub fn observe_latency(&self, rtt: Duration) {
        let now = self.now_ms();
        let last = self.last_update_ms.swap(now, Ordering::Relaxed);
        let rtt_us = rtt.as_micros() as f64;
        let old = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let next = if rtt_us > old {
            rtt_us
        } else {
            let w = (-((now.saturating_sub(last)) as f64 / 1000.0) / EWMA_TAU).exp();
            old * w + rtt_us * (1.0 - w)
        };
        self.ewma_us.store(next.to_bits(), Ordering::Relaxed);
    }

    fn matches(&self, subset: Option<&Subset>) -> bool {
        let Some(s) = subset else { return true };
        let e = &self.endpoint;
        s.tags.iter().all(|t| e.tags.contains(t))
            && s.version.as_ref().is_none_or(|v| e.version.as_ref() == Some(v))
            && s.zone.as_ref().is_none_or(|z| e.zone.as_ref() == Some(z))
    }
}

/// What the pool decided about an endpoint after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ejection {
    Ejected { id: String, for_: Duration },
}

/// The endpoints of one service, with the balancers' shared state.
#[derive(Debug)]
pub struct Pool {
    pub namespace: String,
    pub service: String,
    endpoints: ArcSwap<Vec<Arc<EndpointState>>>,
    rr: AtomicUsize,
    swrr: Mutex<HashMap<String, i64>>,
    ring: ArcSwap<(u64, Vec<(u64, usize)>)>,
    generation: AtomicU64,
    /// No route refers to the pool any more: its watcher stops.
    pub retired: AtomicBool,
    /// Set once discovery answered at least once.
    pub ready: AtomicBool,
    pub breaker: crate::breaker::CircuitBreaker,
    /// Requests in flight to this service (for `max_concurrent`).
    pub in_flight: AtomicU32,
    /// This service's upstream latency histogram, once looked up.
    pub upstream_latency: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    epoch: Instant,
}

fn hash64(v: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl Pool {
    pub fn new(namespace: &str, service: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service: service.into(),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            rr: AtomicUsize::new(0),
            swrr: Mutex::default(),
            ring: ArcSwap::from_pointee((u64::MAX, Vec::new())),
            generation: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            breaker: Default::default(),
            in_flight: AtomicU32::new(0),
            upstream_latency: std::sync::OnceLock::new(),
            epoch: Instant::now(),
        }
    }

    /// Replaces the endpoint set atomically; endpoints that stay keep their latency, load and
    /// ejection state.
    pub fn update(&self, endpoints: Vec<Endpoint>) {
        let old = self.endpoints.load();
        let next: Vec<Arc<EndpointState>> = endpoints
            .into_iter()
            .map(|e| match old.iter().find(|o| o.endpoint.id == e.id && o.endpoint.address == e.address && o.endpoint.port == e.port) {
                Some(o) if o.endpoint == e => o.clone(),
                Some(o) => {
                    let s = EndpointState::new(e, self.epoch);
                    s.ewma_us.store(o.ewma_us.load(Ordering::Relaxed), Ordering::Relaxed);
                    s.ejected_until_ms.store(o.ejected_until_ms.load(Ordering::Relaxed), Ordering::Relaxed);
                    s.times_ejected.store(o.times_ejected.load(Ordering::Relaxed), Ordering::Relaxed);
                    Arc::new(s)
                }
                None => Arc::new(EndpointState::new(e, self.epoch)),
            })
            .collect();
        self.endpoints.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<EndpointState>>> {
        self.endpoints.load_full()
    }

    /// Picks an endpoint for one try, skipping `tried` ones when others exist. Ejected endpoints
    /// are used only when every candidate is ejected.
    pub fn pick(&self, lb: LoadBalancer, subset: Option<&Subset>, hash_key: Option<u64>, tried: &[Arc<EndpointState>]) -> Option<Arc<EndpointState>> {
        // Candidates on the stack (a pick per request must not allocate): the subset, narrowed
        // to endpoints not tried yet and not ejected, where that leaves any.
        type Candidates<'a> = smallvec::SmallVec<[&'a Arc<EndpointState>; 16]>;
        let all = self.endpoints.load();
        let mut c: Candidates<'_> = all.iter().filter(|e| e.matches(subset) && e.endpoint.weight > 0).collect();
        if c.is_empty() {
            return None;
        }
        if !tried.is_empty() {
            let fresh: Candidates<'_> = c.iter().copied().filter(|e| !tried.iter().any(|t| Arc::ptr_eq(t, e))).collect();
            if !fresh.is_empty() {
                c = fresh;
            }
        }
        if c.iter().any(|e| e.ejected()) {
            let healthy: Candidates<'_> = c.iter().copied().filter(|e| !e.ejected()).collect();
            if !healthy.is_empty() {
                c = healthy;
            }
        }
        let chosen = match lb {
            LoadBalancer::P2cEwma => {
                if c.len() == 1 {
                    c.first().copied()?
                } else {
                    let mut rng = rand::rng();
                    let a = rng.random_range(0..c.len());
                    let mut b = rng.random_range(0..c.len() - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (c.get(a).copied()?, c.get(b).copied()?);
                    if a.cost() <= b.cost() {
                        a
                    } else {
                        b
                    }
                }
            }
            LoadBalancer::RoundRobin => c.get(self.rr.fetch_add(1, Ordering::Relaxed) % c.len()).copied()?,
            LoadBalancer::LeastRequest => {
                let min = c.iter().map(|e| e.pending.load(Ordering::Relaxed)).min().unwrap_or(0);
                let least: Candidates<'_> = c.iter().copied().filter(|e| e.pending.load(Ordering::Relaxed) == min).collect();
                least.get(self.rr.fetch_add(1, Ordering::Relaxed) % least.len().max(1)).copied()?
            }
            LoadBalancer::WeightedRoundRobin => {
                // nginx's smooth weighted round robin over the candidates.
                let mut cur = self.swrr.lock();
                let total: i64 = c.iter().map(|e| i64::from(e.endpoint.weight)).sum();
                let mut best = 0;
                let mut best_val = i64::MIN;
                for (i, e) in c.iter().enumerate() {
                    let v = cur.entry(e.endpoint.id.clone()).or_insert(0);
                    *v += i64::from(e.endpoint.weight);
                    if *v > best_val {
                        best_val = *v;
                        best = i;
                    }
                }
                let best = c.get(best).copied()?;
                if let Some(v) = cur.get_mut(&best.endpoint.id) {
                    *v -= total;
                }
                if cur.len() > c.len() * 4 + 16 {
                    cur.retain(|id, _| c.iter().any(|e| &e.endpoint.id == id));
                }
                best
            }
            LoadBalancer::ConsistentHash => {
                let key = hash_key.unwrap_or_else(|| rand::rng().random());
                self.ring_pick(&c, key)?
            }
        };
        Some(chosen.clone())
    }

    /// A ring of virtual nodes over `c` (cached per endpoint generation and candidate set).
    fn ring_pick<'a>(&self, c: &[&'a Arc<EndpointState>], key: u64) -> Option<&'a Arc<EndpointState>> {
        let sig = hash64((self.generation.load(Ordering::Relaxed), c.iter().map(|e| e.endpoint.id.as_str()).collect::<Vec<_>>()));
        let ring = self.ring.load();
        let ring = if ring.0 == sig {
            ring
        } else {
            let mut points: Vec<(u64, usize)> = Vec::with_capacity(c.len() * RING_VNODES);
            for (i, e) in c.iter().enumerate() {
                for v in 0..RING_VNODES {
                    points.push((hash64((&e.endpoint.id, v)), i));
                }
            }
            points.sort_unstable();
            self.ring.store(Arc::new((sig, points)));
            self.ring.load()
        };
        let points = &ring.1;
        let at = points.partition_point(|(h, _)| *h < key);
        let (_, i) = points.get(at).or_else(|| points.first())?;
        c.get(*i).copied()
    }

    /// Records one try's outcome for passive health; returns an ejection when this failure ejected
    /// the endpoint.
    pub fn record(&self, e: &EndpointState, failed: bool) -> Option<Ejection> {
        if !failed {
            e.failures.store(0, Ordering::Relaxed);
            return None;
        }
        if e.failures.fetch_add(1, Ordering::Relaxed) + 1 < EJECT_AFTER || e.ejected() {
            return None;
        }
        let all = self.endpoints.load();
        let ejected = all.iter().filter(|x| x.ejected()).count();
        if (ejected + 1) * 100 > all.len() * MAX_EJECTED_PERCENT && ejected > 0 {
            return None;
        }
        if all.len() == 1 {
            return None;
        }
        let times = e.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let for_ = (EJECT_BASE * times).min(EJECT_MAX);
        e.ejected_until_ms.store(e.now_ms() + for_.as_millis() as u64, Ordering::Relaxed);
        e.failures.store(0, Ordering::Relaxed);
        Some(Ejection::Ejected { id: e.endpoint.id.clone(), for_ })
    }
}

/// Retries may add at most `percent`% of requests plus `min_per_second` per second, so a failing
/// upstream never sees a retry storm.
#[derive(Debug)]
pub struct RetryBudget {
    percent: f64,
    min_per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        let min = f64::from(min_per_second);
        Self { percent: f64::from(percent) / 100.0, min_per_second: min, state: Mutex::new((min, Instant::now())) }
    }

    fn cap(&self) -> f64 {
        (self.min_per_second * 10.0).max(10.0)
    }

    /// Every request earns a share of a retry.
    pub fn deposit(&self) {
        let mut s = self.state.lock();
        s.0 = (s.0 + self.percent).min(self.cap());
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock();
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.min_per_second;
        s.1 = now;
        s.0 = (s.0 + refill).min(self.cap());
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, weight: u32, tags: &[&str]) -> Endpoint {
        Endpoint { id: id.into(), address: "10.0.0.1".into(), port: 80, weight, tags: tags.iter().map(|t| t.to_string()).collect(), version: None, zone: None }
    }

    fn pool(eps: Vec<Endpoint>) -> Pool {
        let p = Pool::new("default", "s");
        p.update(eps);
        p
    }

    fn counts(p: &Pool, lb: LoadBalancer, n: usize) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for _ in 0..n {
            let e = p.pick(lb, None, None, &[]).unwrap();
            *out.entry(e.endpoint.id.clone()).or_default() += 1;
        }
        out
    }

    #[test]
    fn round_robin_and_weighted() {
        let p = pool(vec![ep("a", 100, &[]), ep("b", 100, &[]), ep("c", 300, &[])]);
        let rr = counts(&p, LoadBalancer::RoundRobin, 300);
        assert!(rr.values().all(|c| *c == 100), "{rr:?}");
        let w = counts(&p, LoadBalancer::WeightedRoundRobin, 500);
        assert_eq!((w["a"], w["b"], w["c"]), (100, 100, 300));
    }

    #[test]
    fn p2c_prefers_fast_and_idle() {
        let p = pool(vec![ep("fast", 100, &[]), ep("slow", 100, &[])]);
        for e in p.endpoints().iter() {
            e.observe_latency(if e.endpoint.id == "fast" { Duration::from_micros(200) } else { Duration::from_millis(50) });
        }
        let c = counts(&p, LoadBalancer::P2cEwma, 1000);
        assert_eq!(c.get("slow"), None, "{c:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_little() {
        let p = pool((0..10).map(|i| ep(&format!("e{i}"), 100, &[])).collect());
        let before: Vec<String> = (0..1000u64).map(|k| p.pick(LoadBalancer::ConsistentHash, None, Some(hash64(k)), &[]).unwrap().endpoint.id.clone()).collect();
        let again: Vec<String> = (0..1000u64).map(|k| p.pick(LoadBalancer::ConsistentHash, None, Some(hash64(k)), &[]).unwrap().endpoint.id.clone()).collect();
        assert_eq!(before, again);
        p.update((0..9).map(|i| ep(&format!("e{i}"), 100, &[])).collect());
        let after: Vec<String> = (0..1000u64).map(|k| p.pick(LoadBalancer::ConsistentHash, None, Some(hash64(k)), &[]).unwrap().endpoint.id.clone()).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!(moved < 200, "removing 1 of 10 endpoints moved {moved} of 1000 keys");
    }

    #[test]
    fn subsets_retries_and_ejection() {
        let p = pool(vec![ep("v1", 100, &["v1"]), ep("v2", 100, &["v2"]), ep("v2b", 100, &["v2"])]);
        let v2 = Subset { tags: vec!["v2".into()], ..Default::default() };
        for _ in 0..50 {
            assert!(p.pick(LoadBalancer::P2cEwma, Some(&v2), None, &[]).unwrap().endpoint.id.starts_with("v2"));
        }
        let first = p.pick(LoadBalancer::RoundRobin, Some(&v2), None, &[]).unwrap();
        let second = p.pick(LoadBalancer::RoundRobin, Some(&v2), None, std::slice::from_ref(&first)).unwrap();
        assert_ne!(first.endpoint.id, second.endpoint.id, "a retry goes elsewhere");
        // Ejection after consecutive failures; at most half the pool.
        let all = p.endpoints();
        let mut ejections = 0;
        for e in all.iter() {
            for _ in 0..EJECT_AFTER {
                if p.record(e, true).is_some() {
                    ejections += 1;
                }
            }
        }
        assert_eq!(ejections, 1, "3 endpoints, at most 50% ejected");
        let c = counts(&p, LoadBalancer::RoundRobin, 30);
        assert_eq!(c.len(), 2, "the ejected endpoint gets no traffic: {c:?}");
    }

    #[test]
    fn retry_budget_bounds_retries() {
        let b = RetryBudget::new(20, 0);
        let mut allowed = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                allowed += 1;
            }
        }
        assert!((190..=200).contains(&allowed), "{allowed}");
        let none = RetryBudget::new(0, 0);
        assert!(!none.withdraw());
    }
}

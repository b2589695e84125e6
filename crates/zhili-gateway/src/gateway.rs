//! The gateway's shared state: the live route table, the endpoint pools, options, counters and
//! latency histograms, and what it observed about services (ejections, breaker transitions)
//! for the control plane.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::RwLock;
use tokio::sync::broadcast;
use zhili_model::route::{RouteSpec, Subset};

use crate::auth::{self, Consumers};
use crate::balance::{Ejection, Pool};
use crate::breaker::{self, Transition};
use crate::stats::{Latencies, Stats, TargetTraffic, TrafficWindow};
use crate::table::{self, compile, Table};
use crate::upstream::Upstreams;

/// Something the gateway observed about a service that the control plane should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveHealth {
    pub namespace: String,
    pub service: String,
    pub observed: Observed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Outlier detection ejected an instance.
    Ejected { instance: String, for_: Duration },
    /// The service's circuit breaker changed state.
    Breaker(Transition),
}

impl Transition {
    pub fn state(self) -> &'static str {
        match self {
            Transition::Opened => "open",
            Transition::HalfOpened => "half_open",
            Transition::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// One JSON line per request on the `zhili::access` log target.
    pub access_log: bool,
    /// Largest request body forwarded (larger ones get 413).
    pub max_body: usize,
    /// Largest request head (request line + headers).
    pub max_header_bytes: usize,
    /// Time allowed to receive a request's headers.
    pub header_read_timeout: Duration,
    /// Bodies up to this size are buffered so the request can be retried.
    pub max_replay_body: usize,
    pub connect_timeout: Duration,
    /// Live connections the HTTP/1.1 client keeps to one endpoint; past it, 503.
    pub max_upstream_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            access_log: true,
            max_body: 16 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_replay_body: 64 * 1024,
            connect_timeout: Duration::from_secs(2),
            max_upstream_connections: 1024,
        }
    }
}

/// Counters the gateway keeps (exported as metrics by whoever embeds it).
pub struct Gateway {
    pub latencies: Latencies,
    table: ArcSwap<Table>,
    pools: RwLock<HashMap<(String, String), Arc<Pool>>>,
    pub options: Options,
    pub stats: Stats,
    pub client: Upstreams,
    passive: broadcast::Sender<PassiveHealth>,
    pub consumers: ArcSwap<Consumers>,
    /// Set once the consumers were loaded (routes with API keys wait for it, bounded).
    pub(crate) consumers_ready: std::sync::atomic::AtomicBool,
    /// JWKS caches by URL, shared by the routes naming them.
    jwks: parking_lot::Mutex<HashMap<String, Arc<auth::Jwks>>>,
    /// Per route target traffic windows (plan gates read them), kept while the target exists.
    windows: parking_lot::Mutex<HashMap<table::WindowKey, Arc<TrafficWindow>>>,
    /// Traffic by authenticated caller (consumer) and service, for the topology; bounded.
    callers: parking_lot::Mutex<HashMap<(String, String, String), Arc<TrafficWindow>>>,
}

/// Distinct (consumer, service) pairs tracked for the topology; pairs past it are not drawn.
const MAX_CALLER_EDGES: usize = 4096;

impl Gateway {
    pub fn new(options: Options) -> Arc<Self> {
        Arc::new(Self {
            latencies: Latencies::default(),
            table: ArcSwap::from_pointee(Table::default()),
            pools: RwLock::default(),
            client: Upstreams::new(options.connect_timeout),
            options,
            stats: Stats::default(),
            passive: broadcast::channel(1024).0,
            consumers: ArcSwap::from_pointee(Consumers::default()),
            consumers_ready: Default::default(),
            jwks: Default::default(),
            windows: Default::default(),
            callers: Default::default(),
        })
    }

    /// Counts one request of consumer `caller` to a service (the topology's caller edges).
    pub(crate) fn record_caller(&self, caller: &str, namespace: &str, service: &str, now_ms: u64, latency_ms: f64, error: bool) {
        let key = (caller.to_string(), namespace.to_string(), service.to_string());
        let window = {
            let mut callers = self.callers.lock();
            match callers.get(&key) {
                Some(w) => w.clone(),
                None if callers.len() >= MAX_CALLER_EDGES => return,
                None => callers.entry(key).or_default().clone(),
            }
        };
        window.record(now_ms, latency_ms, error);
    }

    /// Every (consumer, namespace, service) edge's traffic since `since_ms`.
    pub fn caller_traffic(&self, since_ms: u64) -> Vec<((String, String, String), TargetTraffic)> {
        let callers: Vec<_> = self.callers.lock().iter().map(|(k, w)| (k.clone(), w.clone())).collect();
        callers.into_iter().map(|(k, w)| (k, w.since(since_ms))).filter(|(_, t)| t.requests > 0).collect()
    }

    /// Every route target's traffic since `since_ms`: ((route, namespace, service, subset), seen).
    pub fn traffic_all(&self, since_ms: u64) -> Vec<(table::WindowKey, TargetTraffic)> {
        let windows: Vec<(table::WindowKey, Arc<TrafficWindow>)> = self.windows.lock().iter().map(|(k, w)| (k.clone(), w.clone())).collect();
        windows.into_iter().map(|(k, w)| (k, w.since(since_ms))).collect()
    }

    /// What the gateway saw for `route`'s requests to `service`'s `subset` since `since_ms`;
    /// None when no such target exists.
    pub fn traffic(&self, route: &str, namespace: &str, service: &str, subset: &Subset, since_ms: u64) -> Option<TargetTraffic> {
        let key = (route.to_string(), namespace.to_string(), service.to_string(), subset.clone());
        self.windows.lock().get(&key).map(|w| w.since(since_ms))
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Ejections as they happen, for reporting passive health to the registry.
    pub fn passive_health(&self) -> broadcast::Receiver<PassiveHealth> {
        self.passive.subscribe()
    }

    /// Compiles `routes`, attaches each target's pool and creates the pools that do not exist
    /// yet (returned, so their endpoints can be loaded before the table goes live).
    pub fn stage(&self, routes: Vec<(String, RouteSpec)>) -> (Table, HashSet<(String, String)>, Vec<Arc<Pool>>) {
        let mut compiled = Vec::with_capacity(routes.len());
        for (name, spec) in routes {
            match compile(&name, &spec) {
                Ok(r) => compiled.push(Arc::new(r)),
                Err(e) => tracing::warn!(route = %name, error = %e, "route skipped"),
            }
        }
        let wanted: HashSet<(String, String)> = compiled
            .iter()
            .flat_map(|r| match &r.action {
                table::Action::Forward(targets) => targets.iter().map(|(t, _)| (t.namespace.clone(), t.service.clone())).collect(),
                _ => vec![],
            })
            .collect();
        let mut fresh = vec![];
        let mut pools = self.pools.write();
        for key in &wanted {
            if !pools.contains_key(key) {
                let p = Arc::new(Pool::new(&key.0, &key.1));
                pools.insert(key.clone(), p.clone());
                fresh.push(p);
            }
        }
        drop(pools);
        let mut jwks = self.jwks.lock();
        let urls: HashSet<&str> = compiled.iter().filter_map(|r| r.auth.as_ref()?.jwt.as_ref()?.jwks_url.as_deref()).collect();
        jwks.retain(|url, _| urls.contains(url.as_str()));
        for r in &compiled {
            if let Some(jwt) = r.auth.as_ref().and_then(|a| a.jwt.as_ref()) {
                if let Some(url) = &jwt.jwks_url {
                    let shared = jwks.entry(url.clone()).or_insert_with(|| Arc::new(auth::Jwks::new(url)));
                    let _ = jwt.jwks.set(shared.clone());
                }
            }
        }
        drop(jwks);
        let mut windows = self.windows.lock();
        let mut live_keys = HashSet::new();
        for r in &compiled {
            if let table::Action::Forward(targets) = &r.action {
                for (t, _) in targets {
                    let key = t.window_key(&r.name);
                    let w = windows.entry(key.clone()).or_default().clone();
                    let _ = t.window.set(w);
                    live_keys.insert(key);
                }
            }
        }
        windows.retain(|k, _| live_keys.contains(k));
        drop(windows);
        let pools = self.pools.read();
        for r in &compiled {
            if let table::Action::Forward(targets) = &r.action {
                for (t, _) in targets {
                    if let Some(p) = pools.get(&(t.namespace.clone(), t.service.clone())) {
                        let _ = t.pool.set(p.clone());
                    }
                }
            }
        }
        (Table::new(compiled), wanted, fresh)
    }

    /// Puts a staged table in force and retires the pools no route uses any more.
    pub fn install(&self, table: Table, wanted: &HashSet<(String, String)>) {
        self.table.store(Arc::new(table));
        self.pools.write().retain(|k, p| {
            let keep = wanted.contains(k);
            if !keep {
                p.retired.store(true, Ordering::Relaxed);
            }
            keep
        });
    }

    pub(crate) fn breaker_transition(&self, pool: &Pool, t: Transition) {
        if t == Transition::Opened {
            self.stats.breaker_opened.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(namespace = %pool.namespace, service = %pool.service, transition = ?t, "circuit breaker");
        let _ = self.passive.send(PassiveHealth { namespace: pool.namespace.clone(), service: pool.service.clone(), observed: Observed::Breaker(t) });
    }

    pub(crate) fn report(&self, pool: &Pool, e: Ejection) {
        let Ejection::Ejected { id, for_ } = e;
        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(service = %pool.service, instance = %id, seconds = for_.as_secs(), "endpoint ejected after consecutive failures");
        let observed = Observed::Ejected { instance: id, for_ };
        let _ = self.passive.send(PassiveHealth { namespace: pool.namespace.clone(), service: pool.service.clone(), observed });
    }
}

/// The gateway's counters and per-service state as Prometheus metrics (registered by whoever
/// serves `/metrics`).
pub struct GatewayCollector(pub Arc<Gateway>);

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

impl prometheus_client::collector::Collector for GatewayCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let s = &self.0.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, value) in [
            ("gateway_requests", "Requests the gateway received", load(&s.requests)),
            ("gateway_retries", "Retries sent upstream", load(&s.retries)),
            ("gateway_retries_denied", "Retries the retry budget refused", load(&s.retries_denied_by_budget)),
            ("gateway_ejections", "Endpoints ejected by outlier detection", load(&s.ejections)),
            ("gateway_upstream_errors", "Tries that failed to connect, were reset or timed out", load(&s.upstream_errors)),
            ("gateway_no_route", "Requests no route matched", load(&s.no_route)),
            ("gateway_rate_limited", "Requests refused by a rate limit", load(&s.rate_limited)),
            ("gateway_breaker_opened", "Circuit breaker openings", load(&s.breaker_opened)),
            ("gateway_breaker_rejected", "Requests refused by an open circuit breaker", load(&s.breaker_rejected)),
            ("gateway_concurrency_rejected", "Requests refused by a concurrency limit", load(&s.concurrency_rejected)),
            ("gateway_auth_denied", "Requests refused by route auth (401 and 403)", load(&s.auth_denied)),
            ("gateway_upstream_connections", "Upstream connections opened", load(&s.upstream_connections)),
        ] {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let mut fam = encoder.encode_descriptor("gateway_responses", "Responses by status class", None, MetricType::Counter)?;
        for (class, v) in [("2xx", &s.responses_2xx), ("3xx", &s.responses_3xx), ("4xx", &s.responses_4xx), ("5xx", &s.responses_5xx)] {
            ConstCounter::new(load(v)).encode(fam.encode_family(&vec![("class".to_string(), class.to_string())])?)?;
        }
        self.0.latencies.requests.encode(encoder.encode_descriptor(
            "gateway_request_duration_seconds",
            "Whole requests through the gateway, by route, service and status class",
            None,
            MetricType::Histogram,
        )?)?;
        self.0.latencies.upstream.encode(encoder.encode_descriptor(
            "gateway_upstream_duration_seconds",
            "Upstream tries until the response head, by service",
            None,
            MetricType::Histogram,
        )?)?;
        let pools: Vec<Arc<Pool>> = self.0.pools.read().values().cloned().collect();
        let labels = |p: &Pool| vec![("namespace".to_string(), p.namespace.clone()), ("service".to_string(), p.service.clone())];
        let mut fam =
            encoder.encode_descriptor("gateway_breaker_open", "1 while the service's circuit breaker is open or half-open", None, MetricType::Gauge)?;
        for p in &pools {
            let open = i64::from(!matches!(p.breaker.state(), breaker::State::Closed));
            ConstGauge::new(open).encode(fam.encode_family(&labels(p))?)?;
        }
        let mut fam = encoder.encode_descriptor("gateway_endpoints", "Endpoints the gateway may send to, and how many are ejected", None, MetricType::Gauge)?;
        for p in &pools {
            let eps = p.endpoints();
            let ejected = eps.iter().filter(|e| e.ejected()).count() as i64;
            let mut l = labels(p);
            l.push(("state".into(), "available".into()));
            ConstGauge::new(eps.len() as i64 - ejected).encode(fam.encode_family(&l)?)?;
            l.pop();
            l.push(("state".into(), "ejected".into()));
            ConstGauge::new(ejected).encode(fam.encode_family(&l)?)?;
        }
        Ok(())
    }
}

//! The gateway: Zhili's data plane. Requests are matched against the route table and forwarded to
//! healthy instances of the routed service (or redirected, or answered directly). Routes and
//! endpoints come from a [`Discover`] implementation (the registry when embedded in the server,
//! a server's HTTP API when standalone); both swap atomically, so a change never drops requests
//! in flight.

pub mod auth;
mod balance;
mod breaker;
mod cors;
mod fetch;
mod h1;
mod limit;
mod proxy;
mod table;
mod target;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::RwLock;
use tokio::sync::broadcast;
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;

pub use auth::Consumers;
pub use balance::{Ejection, Endpoint, Pool, RetryBudget};
pub use breaker::{CircuitBreaker, Transition};
pub use limit::{Decision, Limiter};
pub use proxy::{serve, Body, BoxError};
pub use table::{compile, Route, Table, Target};

/// How long one discovery call may block waiting for a change.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(30);
/// Blocking reads return at once while nothing was ever written (version 0: a fresh store, a
/// service never registered); the followers then poll at this pace instead of spinning.
pub const NOTHING_YET_POLL: Duration = Duration::from_millis(50);

/// Pause after a failed discovery call: 100 ms, doubling to 5 s; a success resets it.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Self(Self::FIRST)
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

async fn pace(version: u64) {
    if version == 0 {
        tokio::time::sleep(NOTHING_YET_POLL).await;
    }
}

/// How long a new route waits for the endpoints of a service new to the gateway.
pub const POOL_READY_WAIT: Duration = Duration::from_secs(2);

/// Where routes and endpoints come from. Both calls block until something changed after
/// `version` (or `wait` passed) and return the new version with the full current state, like the
/// registry's blocking reads.
#[async_trait]
pub trait Discover: Send + Sync + 'static {
    async fn routes(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), String>;
    /// The serving instances of a service.
    async fn endpoints(&self, namespace: &str, service: &str, version: u64, wait: Duration) -> Result<(u64, Vec<Endpoint>), String>;
    /// The consumers (API keys, scopes) routes authenticate against.
    async fn consumers(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), String>;
    /// Tells the control plane what the gateway observed (an ejection).
    async fn report(&self, passive: &PassiveHealth) -> Result<(), String>;
}

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
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub responses_2xx: AtomicU64,
    pub responses_3xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
    pub retries: AtomicU64,
    pub retries_denied_by_budget: AtomicU64,
    pub ejections: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub no_route: AtomicU64,
    pub rate_limited: AtomicU64,
    pub breaker_opened: AtomicU64,
    pub breaker_rejected: AtomicU64,
    pub concurrency_rejected: AtomicU64,
    pub auth_denied: AtomicU64,
    /// Upstream connections opened (against `requests`: the connection reuse ratio).
    pub upstream_connections: AtomicU64,
}

/// Labels of the per-route request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub service: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

type HistogramFamily<L> =
    prometheus_client::metrics::family::Family<L, prometheus_client::metrics::histogram::Histogram, fn() -> prometheus_client::metrics::histogram::Histogram>;

fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18))
}

/// Latency histograms: whole requests by route, service and status class; upstream tries by service.
pub struct Latencies {
    pub requests: HistogramFamily<RouteLabels>,
    pub upstream: HistogramFamily<ServiceLabels>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self { requests: HistogramFamily::new_with_constructor(latency_histogram), upstream: HistogramFamily::new_with_constructor(latency_histogram) }
    }
}

pub struct Gateway {
    pub latencies: Latencies,
    table: ArcSwap<Table>,
    pools: RwLock<HashMap<(String, String), Arc<Pool>>>,
    pub options: Options,
    pub stats: Stats,
    pub client: proxy::Upstreams,
    passive: broadcast::Sender<PassiveHealth>,
    pub consumers: ArcSwap<Consumers>,
    /// Set once the consumers were loaded (routes with API keys wait for it, bounded).
    consumers_ready: std::sync::atomic::AtomicBool,
    /// JWKS caches by URL, shared by the routes naming them.
    jwks: parking_lot::Mutex<HashMap<String, Arc<auth::Jwks>>>,
}

impl Gateway {
    pub fn new(options: Options) -> Arc<Self> {
        Arc::new(Self {
            latencies: Latencies::default(),
            table: ArcSwap::from_pointee(Table::default()),
            pools: RwLock::default(),
            client: proxy::Upstreams::new(&options),
            options,
            stats: Stats::default(),
            passive: broadcast::channel(1024).0,
            consumers: ArcSwap::from_pointee(Consumers::default()),
            consumers_ready: Default::default(),
            jwks: Default::default(),
        })
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

    fn breaker_transition(&self, pool: &Pool, t: Transition) {
        if t == Transition::Opened {
            self.stats.breaker_opened.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(namespace = %pool.namespace, service = %pool.service, transition = ?t, "circuit breaker");
        let _ = self.passive.send(PassiveHealth { namespace: pool.namespace.clone(), service: pool.service.clone(), observed: Observed::Breaker(t) });
    }

    fn report(&self, pool: &Pool, e: Ejection) {
        let Ejection::Ejected { id, for_ } = e;
        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(service = %pool.service, instance = %id, seconds = for_.as_secs(), "endpoint ejected after consecutive failures");
        let observed = Observed::Ejected { instance: id, for_ };
        let _ = self.passive.send(PassiveHealth { namespace: pool.namespace.clone(), service: pool.service.clone(), observed });
    }
}

/// Follows routes and endpoints from `discover` for as long as the gateway lives. On errors the
/// last state stays in force (a standalone gateway keeps serving while its server is away).
pub async fn follow(gw: Arc<Gateway>, discover: Arc<dyn Discover>) {
    let mut passive = gw.passive_health();
    let reporter = discover.clone();
    tokio::spawn(async move {
        loop {
            match passive.recv().await {
                Ok(p) => {
                    if let Err(e) = reporter.report(&p).await {
                        tracing::warn!(service = %p.service, observed = ?p.observed, error = %e, "passive health report failed");
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    tokio::spawn(follow_consumers(gw.clone(), discover.clone()));
    let mut version = 0;
    let mut last: Option<Vec<(String, RouteSpec)>> = None;
    let mut backoff = Backoff::new();
    loop {
        match discover.routes(version, DISCOVERY_WAIT).await {
            Ok((v, routes)) => {
                backoff.reset();
                // Unchanged routes keep their compiled state (rate-limit buckets, retry budgets):
                // the version also moves with unrelated writes.
                if (v == version && version != 0) || last.as_ref() == Some(&routes) {
                    version = v;
                    pace(v).await;
                    continue;
                }
                version = v;
                last = Some(routes.clone());
                let (table, wanted, fresh) = gw.stage(routes);
                for pool in &fresh {
                    tokio::spawn(follow_endpoints(pool.clone(), discover.clone()));
                }
                // A route to a service new to the gateway goes live once its endpoints are
                // known (or after a bound), so the switch costs no request a 503; likewise
                // the first routes wait for the consumers their API keys belong to.
                let deadline = tokio::time::Instant::now() + POOL_READY_WAIT;
                let waiting = || fresh.iter().any(|p| !p.ready.load(Ordering::Acquire)) || !gw.consumers_ready.load(Ordering::Acquire);
                while waiting() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                gw.install(table, &wanted);
            }
            Err(e) => {
                tracing::warn!(error = %e, "route discovery failed; serving the last routes");
                backoff.wait().await;
            }
        }
    }
}

async fn follow_consumers(gw: Arc<Gateway>, discover: Arc<dyn Discover>) {
    let mut version = 0;
    let mut backoff = Backoff::new();
    loop {
        match discover.consumers(version, DISCOVERY_WAIT).await {
            Ok((v, list)) => {
                backoff.reset();
                if v != version || !gw.consumers_ready.load(Ordering::Acquire) {
                    version = v;
                    gw.consumers.store(Arc::new(Consumers::new(list)));
                    gw.consumers_ready.store(true, Ordering::Release);
                }
                pace(v).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer discovery failed; keeping the last consumers");
                backoff.wait().await;
            }
        }
    }
}

async fn follow_endpoints(pool: Arc<Pool>, discover: Arc<dyn Discover>) {
    let mut version = 0;
    let mut backoff = Backoff::new();
    while !pool.retired.load(Ordering::Relaxed) {
        let answer =
            tokio::time::timeout(DISCOVERY_WAIT + Duration::from_secs(5), discover.endpoints(&pool.namespace, &pool.service, version, DISCOVERY_WAIT)).await;
        match answer {
            Ok(Ok((v, endpoints))) => {
                backoff.reset();
                if v != version || !pool.ready.load(Ordering::Acquire) {
                    version = v;
                    pool.update(endpoints);
                }
                pace(v).await;
            }
            Ok(Err(e)) => {
                tracing::warn!(service = %pool.service, error = %e, "endpoint discovery failed; serving the last endpoints");
                backoff.wait().await;
            }
            Err(_) => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Discovery whose version moves on every call while the routes stay the same.
    struct Restless(AtomicU64);

    #[async_trait]
    impl Discover for Restless {
        async fn routes(&self, _version: u64, _wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), String> {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let spec: RouteSpec = serde_json::from_str(r#"{"path": "/x", "direct_response": {"status": 200}, "rate_limit": {"rate": 1}}"#).unwrap();
            Ok((self.0.fetch_add(1, Ordering::Relaxed) + 1, vec![("r".into(), spec)]))
        }
        async fn endpoints(&self, _ns: &str, _service: &str, _version: u64, wait: Duration) -> Result<(u64, Vec<Endpoint>), String> {
            tokio::time::sleep(wait).await;
            Ok((1, vec![]))
        }
        async fn consumers(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), String> {
            if version != 0 {
                tokio::time::sleep(wait).await;
            }
            Ok((1, vec![]))
        }
        async fn report(&self, _passive: &PassiveHealth) -> Result<(), String> {
            Ok(())
        }
    }

    /// Discovery of a store nothing was written to: every answer is version 0, at once.
    #[derive(Default)]
    struct Fresh {
        calls: AtomicU64,
    }

    #[async_trait]
    impl Discover for Fresh {
        async fn routes(&self, _version: u64, _wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), String> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok((0, vec![("r".into(), serde_json::from_str(r#"{"path": "/x", "service": "nobody"}"#).unwrap())]))
        }
        async fn endpoints(&self, _ns: &str, _service: &str, _version: u64, _wait: Duration) -> Result<(u64, Vec<Endpoint>), String> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok((0, vec![]))
        }
        async fn consumers(&self, _version: u64, _wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), String> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok((0, vec![]))
        }
        async fn report(&self, _passive: &PassiveHealth) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn followers_poll_rather_than_spin_while_nothing_was_written() {
        let gw = Gateway::new(Options::default());
        let fresh = Arc::new(Fresh::default());
        // On a detached thread of its own: a spinning follower would never give it back.
        let (g, f) = (gw.clone(), fresh.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(follow(g, f));
        });
        std::thread::sleep(Duration::from_millis(500));
        // Three followers (routes, consumers, one service) at one call per 50 ms each.
        let calls = fresh.calls.load(Ordering::Relaxed);
        assert!(calls <= 60, "{calls} discovery calls in 500 ms");
        assert_eq!(gw.table().routes.len(), 1);
    }

    #[tokio::test]
    async fn unchanged_routes_keep_their_compiled_state() {
        let gw = Gateway::new(Options::default());
        let follower = tokio::spawn(follow(gw.clone(), Arc::new(Restless(AtomicU64::new(0)))));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gw.table().routes.is_empty() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first = gw.table();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(Arc::ptr_eq(&first, &gw.table()), "the same routes were recompiled");
        follower.abort();
    }
}

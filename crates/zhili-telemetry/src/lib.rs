//! Logging setup and the process's one metrics registry. Metric names are typed fields here and
//! labels are bounded sets (route templates, check kinds, statuses), never raw paths or ids.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabel {
    pub health: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub kind: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The standard methods by name, any other as `OTHER`: methods are the client's to invent.
    pub method: &'static str,
    /// The matched route template (e.g. `/api/v1/kv/{*key}`), never the raw path.
    pub route: SharedLabel,
    pub status: u16,
}

/// A label value shared, not copied, by every observation that carries it (route templates).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SharedLabel(pub Arc<str>);

impl EncodeLabelValue for SharedLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

pub struct Metrics {
    /// A std Mutex is enough: it is held only while registering at start and encoding a scrape.
    registry: Mutex<Registry>,
    pub instances: Family<HealthLabel, Gauge>,
    pub services: Gauge,
    pub heartbeats: Counter,
    pub registrations: Counter,
    /// Instances the registry's reaper examined (services with nothing due are skipped).
    pub reaper_scanned: Counter,
    pub check_results: Family<CheckLabels, Counter>,
    pub check_duration: Family<KindLabel, Histogram>,
    pub watchers: Gauge<i64, AtomicI64>,
    pub http_requests: Family<HttpLabels, Histogram>,
    pub kv_writes: Counter,
    /// Events appended durably, and their bytes.
    pub events_appended: Counter,
    pub events_appended_bytes: Counter,
    /// The event log's fsync per group commit, and how many appends each group carried.
    pub event_fsync: Histogram,
    pub event_group_size: Histogram,
    pub webhook_deliveries: Family<OutcomeLabel, Counter>,
    pub events_parked: Counter,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 18)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("zhili");
        let instances = Family::<HealthLabel, Gauge>::default();
        registry.register("instances", "Registered instances by health", instances.clone());
        let services = Gauge::default();
        registry.register("services", "Registered services", services.clone());
        let heartbeats = Counter::default();
        registry.register("heartbeats", "Heartbeats received", heartbeats.clone());
        let registrations = Counter::default();
        registry.register("registrations", "Instance registrations applied", registrations.clone());
        let reaper_scanned = Counter::default();
        registry.register("registry_reaper_scanned_instances", "Instances the registry's reaper examined", reaper_scanned.clone());
        let check_results = Family::<CheckLabels, Counter>::default();
        registry.register("check_results", "Active check results by kind and status", check_results.clone());
        let check_duration = Family::<KindLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register("check_duration_seconds", "Duration of active checks", check_duration.clone());
        let watchers = Gauge::<i64, AtomicI64>::default();
        registry.register("watchers", "Open blocking queries and event streams", watchers.clone());
        let http_requests = Family::<HttpLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register("http_request_duration_seconds", "HTTP request latency by route template", http_requests.clone());
        let kv_writes = Counter::default();
        registry.register("kv_writes", "Durable KV writes acknowledged", kv_writes.clone());
        let events_appended = Counter::default();
        registry.register("events_appended", "Events appended durably to the event log", events_appended.clone());
        let events_appended_bytes = Counter::default();
        registry.register("events_appended_bytes", "Bytes of events appended durably", events_appended_bytes.clone());
        let event_fsync = Histogram::new(latency_buckets());
        registry.register("event_log_fsync_seconds", "Event log fsync per group commit", event_fsync.clone());
        let event_group_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register("event_log_group_appends", "Appends per event log group commit", event_group_size.clone());
        let webhook_deliveries = Family::<OutcomeLabel, Counter>::default();
        registry.register("webhook_deliveries", "Webhook delivery attempts by outcome", webhook_deliveries.clone());
        let events_parked = Counter::default();
        registry.register("events_parked", "Events parked after too many deliveries or by a nack", events_parked.clone());
        Arc::new(Self {
            registry: Mutex::new(registry),
            events_appended,
            events_appended_bytes,
            event_fsync,
            event_group_size,
            webhook_deliveries,
            events_parked,
            instances,
            services,
            heartbeats,
            registrations,
            reaper_scanned,
            check_results,
            check_duration,
            watchers,
            http_requests,
            kv_writes,
        })
    }

    /// Prometheus text exposition of every metric.
    /// Adds metrics computed at scrape time (the gateway's).
    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).register_collector(collector);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail except on a formatter bug; keep the scrape alive anyway.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Keeps the gauge of open watchers honest: +1 on creation, -1 on drop, whatever path ends the wait.
pub struct WatcherGuard(Gauge<i64, AtomicI64>);

impl WatcherGuard {
    pub fn new(m: &Metrics) -> Self {
        m.watchers.inc();
        Self(m.watchers.clone())
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Checks a log filter (RUST_LOG syntax) before anything starts, so a typo is an error, not a
/// silent fallback.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter).map(|_| ()).map_err(|e| e.to_string())
}

/// Installs the global tracing subscriber. `filter` uses `RUST_LOG` syntax and was validated.
pub fn init_logging(format: LogFormat, filter: &str) {
    // The storage engine's own info lines (compactions, ingestion) are noise at our info level.
    let directives = if filter.contains("fjall") || filter.contains("lsm_tree") { filter.to_string() } else { format!("{filter},fjall=warn,lsm_tree=warn") };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A panic is one structured log line (where and why), not a backtrace per request: request
    // handlers catch their panics and answer 500, so the process goes on.
    std::panic::set_hook(Box::new(|info| {
        let cause =
            info.payload().downcast_ref::<&str>().copied().or_else(|| info.payload().downcast_ref::<String>().map(String::as_str)).unwrap_or("(no message)");
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(%at, cause, "panic");
    }));
}

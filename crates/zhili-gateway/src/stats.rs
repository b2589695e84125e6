//! What the gateway counts and times: request counters, and latency histograms by route and by
//! upstream service (exported by `GatewayCollector`).

use std::sync::atomic::AtomicU64;

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

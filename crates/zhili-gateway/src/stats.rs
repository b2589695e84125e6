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

/// Seconds of per-target traffic kept for plan gates.
const WINDOW_SECS: u64 = 300;
/// Latency buckets: upper bounds 0.1 ms × 1.5^i (the last catches everything above).
const LATENCY_BUCKETS: usize = 40;

fn latency_bucket(ms: f64) -> usize {
    let mut bound = 0.1;
    for i in 0..LATENCY_BUCKETS - 1 {
        if ms <= bound {
            return i;
        }
        bound *= 1.5;
    }
    LATENCY_BUCKETS - 1
}

fn bucket_bound(i: usize) -> f64 {
    0.1 * 1.5_f64.powi(i as i32)
}

#[derive(Debug, Clone)]
struct Second {
    at: u64,
    requests: u64,
    errors: u64,
    latency: [u32; LATENCY_BUCKETS],
}

/// A route target's recent traffic, per second (the last five minutes): what plan gates judge a
/// rollout by, from the gateway's own observations.
#[derive(Debug, Default)]
pub struct TrafficWindow {
    seconds: parking_lot::Mutex<std::collections::VecDeque<Second>>,
}

/// What a target saw since a moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetTraffic {
    pub requests: u64,
    /// Answers of 500 and above (upstream failures included: they answer 502/503/504).
    pub errors: u64,
    /// An upper estimate within 50 % (the latency bucket's bound); None without requests.
    pub p99_ms: Option<f64>,
}

impl TrafficWindow {
    pub fn record(&self, now_ms: u64, latency_ms: f64, error: bool) {
        let at = now_ms / 1000;
        let mut s = self.seconds.lock();
        if s.back().is_none_or(|b| b.at != at) {
            s.push_back(Second { at, requests: 0, errors: 0, latency: [0; LATENCY_BUCKETS] });
            while s.front().is_some_and(|f| f.at + WINDOW_SECS < at) {
                s.pop_front();
            }
        }
        if let Some(b) = s.back_mut() {
            b.requests += 1;
            b.errors += u64::from(error);
            if let Some(n) = b.latency.get_mut(latency_bucket(latency_ms)) {
                *n = n.saturating_add(1);
            }
        }
    }

    /// Traffic in the seconds from `since_ms` on.
    pub fn since(&self, since_ms: u64) -> TargetTraffic {
        let from = since_ms / 1000;
        let s = self.seconds.lock();
        let mut latency = [0u64; LATENCY_BUCKETS];
        let (mut requests, mut errors) = (0, 0);
        for b in s.iter().filter(|b| b.at >= from) {
            requests += b.requests;
            errors += b.errors;
            for (sum, n) in latency.iter_mut().zip(b.latency.iter()) {
                *sum += u64::from(*n);
            }
        }
        let p99_ms = (requests > 0).then(|| {
            let want = requests - requests / 100;
            let mut seen = 0;
            for (i, n) in latency.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return bucket_bound(i);
                }
            }
            bucket_bound(LATENCY_BUCKETS - 1)
        });
        TargetTraffic { requests, errors, p99_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_errors_and_estimate_p99_from_a_moment() {
        let w = TrafficWindow::default();
        w.record(1_000, 3.0, false);
        for i in 0..99 {
            w.record(5_000 + i, 2.0, i % 10 == 0);
        }
        w.record(5_500, 400.0, true);
        let all = w.since(0);
        assert_eq!((all.requests, all.errors), (101, 11));
        let recent = w.since(5_000);
        assert_eq!((recent.requests, recent.errors), (100, 11));
        let p99 = recent.p99_ms.unwrap();
        assert!((2.0..=3.0).contains(&p99), "{p99}");
        assert_eq!(w.since(9_000).p99_ms, None);
        // Old seconds fall out of the window.
        w.record(1_000 + (WINDOW_SECS + 10) * 1000, 1.0, false);
        assert_eq!(w.since(0).requests, 1);
    }
}

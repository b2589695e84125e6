//! Active health checking: HTTP, TCP and gRPC (grpc.health.v1) probes on jittered intervals with
//! bounded concurrency. Each check runs in its own task with its own timeout, so a hung target
//! never delays the others. Results pass through success/failure thresholds and only status
//! changes leave the engine, as [`HealthTransition`]s on a bounded channel.

mod probe;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use zhili_model::{CheckDefinition, CheckKey, HealthStatus, HealthTransition};
use zhili_telemetry::{CheckLabels, KindLabel, Metrics};

pub use probe::{Probe, ProbeResult};

/// The first run of a check happens within this window (jittered) so restarts recover quickly
/// without every check firing at once.
const FIRST_RUN_WINDOW: Duration = Duration::from_secs(2);

pub struct HealthEngine {
    inner: Arc<Inner>,
}

struct Inner {
    /// Running check tasks; aborted on cancel or reschedule. std-style lock, never held across await.
    tasks: Mutex<HashMap<CheckKey, JoinHandle<()>>>,
    sink: mpsc::Sender<HealthTransition>,
    /// Bounds probes in flight; a check waiting for a permit is late, never skipped silently.
    permits: Arc<Semaphore>,
    probe: Probe,
    metrics: Arc<Metrics>,
}

impl HealthEngine {
    pub fn new(sink: mpsc::Sender<HealthTransition>, concurrency: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner { tasks: Mutex::new(HashMap::new()), sink, permits: Arc::new(Semaphore::new(concurrency)), probe: Probe::new(), metrics }),
        }
    }

    /// Starts (or restarts with a new definition) the check `key`.
    pub fn schedule(&self, key: CheckKey, def: CheckDefinition) {
        let inner = self.inner.clone();
        let task_key = key.clone();
        let handle = tokio::spawn(async move { run_check(inner, task_key, def).await });
        if let Some(old) = self.inner.tasks.lock().insert(key, handle) {
            old.abort();
        }
    }

    pub fn cancel(&self, key: &CheckKey) {
        if let Some(h) = self.inner.tasks.lock().remove(key) {
            h.abort();
        }
    }

    pub fn running(&self) -> usize {
        self.inner.tasks.lock().len()
    }
}

impl Drop for HealthEngine {
    fn drop(&mut self) {
        for (_, h) in self.inner.tasks.lock().drain() {
            h.abort();
        }
    }
}

/// Counts consecutive results and decides when a check flips (pingora-style thresholds).
#[derive(Debug)]
pub struct Thresholds {
    /// None until the first decision: the engine does not know what the registry shows (a
    /// re-registered instance may have kept "passing"), so its first definite result is reported.
    status: Option<HealthStatus>,
    successes: u32,
    failures: u32,
    success_before_passing: u32,
    failures_before_critical: u32,
}

impl Thresholds {
    pub fn new(def: &CheckDefinition) -> Self {
        Self {
            status: None,
            successes: 0,
            failures: 0,
            success_before_passing: def.success_before_passing,
            failures_before_critical: def.failures_before_critical,
        }
    }

    pub fn status(&self) -> Option<HealthStatus> {
        self.status
    }

    /// Feeds one result; returns the new status if it changed.
    pub fn observe(&mut self, result: HealthStatus) -> Option<HealthStatus> {
        let to = match result {
            HealthStatus::Passing => {
                self.successes += 1;
                self.failures = 0;
                (self.successes >= self.success_before_passing).then_some(HealthStatus::Passing)
            }
            HealthStatus::Critical => {
                self.failures += 1;
                self.successes = 0;
                // Unknown → critical at once: a check that has never passed is critical anyway.
                (self.status.is_none() || self.failures >= self.failures_before_critical).then_some(HealthStatus::Critical)
            }
            HealthStatus::Warning => {
                self.successes = 0;
                self.failures = 0;
                Some(HealthStatus::Warning)
            }
        }?;
        if self.status == Some(to) {
            return None;
        }
        self.status = Some(to);
        Some(to)
    }
}

async fn run_check(inner: Arc<Inner>, key: CheckKey, def: CheckDefinition) {
    let kind = def.kind.name();
    let first = Duration::from_millis(rand::rng().random_range(0..FIRST_RUN_WINDOW.min(def.interval).as_millis().max(1) as u64));
    tokio::time::sleep(first).await;
    let mut thresholds = Thresholds::new(&def);
    let mut last_output = String::new();
    loop {
        let started = Instant::now();
        let result = {
            let Ok(_permit) = inner.permits.clone().acquire_owned().await else { return };
            inner.probe.run(&def.kind, def.timeout).await
        };
        inner.metrics.check_duration.get_or_create(&KindLabel { kind }).observe(started.elapsed().as_secs_f64());
        inner.metrics.check_results.get_or_create(&CheckLabels { kind, status: result.status.as_str() }).inc();
        let flipped = thresholds.observe(result.status);
        // Report status changes, and output changes while critical (why it is failing matters).
        let report = flipped.is_some() || (result.status != HealthStatus::Passing && result.output != last_output);
        if report {
            let status = thresholds.status().unwrap_or(HealthStatus::Critical);
            tracing::debug!(service = %key.service, instance = %key.instance, check = %key.check, ?status, output = %result.output, "check result");
            let t = HealthTransition { key: key.clone(), status, output: result.output.clone() };
            if inner.sink.send(t).await.is_err() {
                return;
            }
        }
        last_output = result.output;
        // ±10% jitter keeps checks of many instances from synchronising.
        let jitter = def.interval.as_millis() as i64 / 10;
        let delta = if jitter > 0 { rand::rng().random_range(-jitter..=jitter) } else { 0 };
        let next = Duration::from_millis((def.interval.as_millis() as i64 + delta).max(1) as u64).saturating_sub(started.elapsed());
        tokio::time::sleep(next).await;
    }
}

#[cfg(test)]
mod tests;

//! How the gateway learns its routes, consumers and endpoints: the [`Discover`] contract (the
//! registry when embedded, a server's HTTP API when standalone) and the followers that keep the
//! gateway's table and pools current by blocking reads, keeping the last state on errors.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;

use crate::auth::Consumers;
use crate::balance::{Endpoint, Pool};
use crate::gateway::{Gateway, PassiveHealth};

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

/// Why a discovery call failed. Every kind keeps the gateway on its last state; they differ in
/// what an operator should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoverError {
    /// The source is unreachable or failed (a server restarting, a network fault): retried with
    /// backoff, nothing to do.
    #[error("source unavailable: {0}")]
    Unavailable(String),
    /// The source refused the gateway (no token, or one without the rights): retrying as is
    /// will not help until the token is fixed.
    #[error("refused by the source (check the gateway's token and its policy): {0}")]
    Refused(String),
    /// The source answered something the gateway cannot read (a version mismatch).
    #[error("unreadable answer: {0}")]
    Invalid(String),
}

impl DiscoverError {
    /// Logged as an error (someone must act) rather than a warning (it passes by itself).
    pub fn needs_operator(&self) -> bool {
        !matches!(self, Self::Unavailable(_))
    }
}

/// Where routes and endpoints come from. Both calls block until something changed after
/// `version` (or `wait` passed) and return the new version with the full current state, like the
/// registry's blocking reads.
#[async_trait]
pub trait Discover: Send + Sync + 'static {
    async fn routes(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), DiscoverError>;
    /// The serving instances of a service.
    async fn endpoints(&self, namespace: &str, service: &str, version: u64, wait: Duration) -> Result<(u64, Vec<Endpoint>), DiscoverError>;
    /// The consumers (API keys, scopes) routes authenticate against.
    async fn consumers(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), DiscoverError>;
    /// Tells the control plane what the gateway observed (an ejection).
    async fn report(&self, passive: &PassiveHealth) -> Result<(), DiscoverError>;
}

fn log_failure(e: &DiscoverError, what: &str) {
    if e.needs_operator() {
        tracing::error!(error = %e, "{what}");
    } else {
        tracing::warn!(error = %e, "{what}");
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
                log_failure(&e, "route discovery failed; serving the last routes");
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
                log_failure(&e, "consumer discovery failed; keeping the last consumers");
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
                log_failure(&e, &format!("endpoint discovery for service {:?} failed; serving the last endpoints", pool.service));
                backoff.wait().await;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Options;
    use std::sync::atomic::AtomicU64;

    /// Discovery whose version moves on every call while the routes stay the same.
    struct Restless(AtomicU64);

    #[async_trait]
    impl Discover for Restless {
        async fn routes(&self, _version: u64, _wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), DiscoverError> {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let spec: RouteSpec = serde_json::from_str(r#"{"path": "/x", "direct_response": {"status": 200}, "rate_limit": {"rate": 1}}"#).unwrap();
            Ok((self.0.fetch_add(1, Ordering::Relaxed) + 1, vec![("r".into(), spec)]))
        }
        async fn endpoints(&self, _ns: &str, _service: &str, _version: u64, wait: Duration) -> Result<(u64, Vec<Endpoint>), DiscoverError> {
            tokio::time::sleep(wait).await;
            Ok((1, vec![]))
        }
        async fn consumers(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), DiscoverError> {
            if version != 0 {
                tokio::time::sleep(wait).await;
            }
            Ok((1, vec![]))
        }
        async fn report(&self, _passive: &PassiveHealth) -> Result<(), DiscoverError> {
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
        async fn routes(&self, _version: u64, _wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), DiscoverError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok((0, vec![("r".into(), serde_json::from_str(r#"{"path": "/x", "service": "nobody"}"#).unwrap())]))
        }
        async fn endpoints(&self, _ns: &str, _service: &str, _version: u64, _wait: Duration) -> Result<(u64, Vec<Endpoint>), DiscoverError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok((0, vec![]))
        }
        async fn consumers(&self, _version: u64, _wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), DiscoverError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok((0, vec![]))
        }
        async fn report(&self, _passive: &PassiveHealth) -> Result<(), DiscoverError> {
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

//! Staying registered and staying informed.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zhili_model::{Instance, InstanceSpec};

use crate::{Balancer, Client, ClientError, Query};

/// How long a cache's blocking read waits before asking again.
const WATCH_WAIT: Duration = Duration::from_secs(60);
/// Pause after a failed call before retrying, so an outage is not met with a tight loop.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RegistrationOptions {
    /// Heartbeat period; keep it under the service's `unhealthy_after` (default 15 s).
    pub heartbeat_interval: Duration,
}

impl Default for RegistrationOptions {
    fn default() -> Self {
        Self { heartbeat_interval: Duration::from_secs(5) }
    }
}

/// A registered instance that keeps itself alive: it heartbeats, and when the server answers
/// 404 (it forgot the instance, e.g. after a restart) it registers again. Call
/// [`Registration::shutdown`] to deregister; dropping only stops the heartbeats.
pub struct Registration {
    client: Client,
    service: String,
    id: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Registration {
    pub async fn start(client: Client, service: &str, spec: InstanceSpec, opts: RegistrationOptions) -> Result<Self, ClientError> {
        let id = client.register(service, &spec).await?;
        let (stop, mut stopped) = watch::channel(false);
        let (c, svc, hb_id) = (client.clone(), service.to_string(), id.clone());
        let spec = InstanceSpec { id: Some(id.clone()), ..spec };
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(opts.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                match c.heartbeat(&svc, &hb_id).await {
                    Ok(()) => {}
                    Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                        tracing::info!(service = %svc, id = %hb_id, "server forgot this instance; registering again");
                        if let Err(e) = c.register(&svc, &spec).await {
                            tracing::warn!(error = %e, "re-registration failed; will retry");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed; will retry"),
                }
            }
        });
        Ok(Self { client, service: service.to_string(), id, stop, task })
    }

    /// Reports this instance's state, tasks and planned work (see [`Client::report`]).
    pub async fn report(&self, report: &crate::ReportSpec) -> Result<(), ClientError> {
        self.client.report(&self.service, &self.id, report).await
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops heartbeating and deregisters.
    pub async fn shutdown(self) -> Result<(), ClientError> {
        let Registration { client, service, id, stop, task } = self;
        let _ = stop.send(true);
        let _ = task.await;
        match client.deregister(&service, &id).await {
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(()),
            other => other,
        }
    }
}

/// A local copy of a service's instances, kept fresh by blocking reads: lookups never touch the
/// network, and a change on the server reaches the cache within one round trip.
pub struct ServiceCache {
    instances: Arc<RwLock<Arc<Vec<Instance>>>>,
    updates: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl ServiceCache {
    /// Fetches the current instances (failing if the server cannot be reached), then follows changes.
    pub async fn start(client: Client, service: &str, query: Query) -> Result<Self, ClientError> {
        let first = client.instances(service, &query, None).await?;
        let instances = Arc::new(RwLock::new(Arc::new(first.instances)));
        let (tx, updates) = watch::channel(first.index);
        let shared = instances.clone();
        let service = service.to_string();
        let task = tokio::spawn(async move {
            let mut index = first.index;
            loop {
                match client.instances(&service, &query, Some((index, WATCH_WAIT))).await {
                    Ok(list) => {
                        // An index that went backwards means the server restarted: take its state.
                        if list.index != index {
                            *shared.write() = Arc::new(list.instances);
                            index = list.index;
                            let _ = tx.send(index);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "discovery watch failed; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        });
        Ok(Self { instances, updates, task })
    }

    pub fn instances(&self) -> Arc<Vec<Instance>> {
        self.instances.read().clone()
    }

    pub fn pick(&self, balancer: &dyn Balancer) -> Option<Instance> {
        let list = self.instances();
        balancer.pick(&list).cloned()
    }

    /// Waits until the cache changes; returns the new index.
    pub async fn changed(&mut self) -> u64 {
        let _ = self.updates.changed().await;
        *self.updates.borrow()
    }
}

impl Drop for ServiceCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! Zhili's own changes as events: registry changes go to the `$registry` stream as CloudEvents
//! (`io.zhili.registry.*`), so services and operators can subscribe to what happens to the
//! services they depend on, with the same reads, subscriptions and ACLs as any stream.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use zhili_model::event::CloudEvent;
use zhili_model::{RegistryEvent, RegistryEventKind};
use zhili_registry::{Journal, Journaled};
use zhili_store::events::{append_retrying, Batcher, EventLog, ExpectedRevision, NewEvent};
use zhili_store::{EventKind, Store};

pub const REGISTRY_STREAM: &str = "$registry";
/// Registry events appended in one batch at most.
const BATCH: usize = 512;

/// The CloudEvent `type` of a registry change.
pub fn registry_type(kind: RegistryEventKind) -> &'static str {
    match kind {
        RegistryEventKind::ServiceUpserted => "io.zhili.registry.service.updated",
        RegistryEventKind::ServiceDeleted => "io.zhili.registry.service.deleted",
        RegistryEventKind::InstanceRegistered => "io.zhili.registry.instance.registered",
        RegistryEventKind::InstanceUpdated => "io.zhili.registry.instance.updated",
        RegistryEventKind::InstanceDeregistered => "io.zhili.registry.instance.deregistered",
    }
}

/// One registry change as a structured CloudEvent from `source` at `time`. `n` orders events
/// that share a registry index (one change can cause several); `boot` (the publisher's start,
/// Unix ms) keeps the id unique across restarts, since ephemeral changes do not persist the
/// index and a restarted node hands out the same indexes again.
fn cloudevent(source: &str, time: &str, boot: u64, ev: &RegistryEvent, n: usize) -> NewEvent {
    let id = format!("registry-{boot}-{}-{n}", ev.index);
    let subject = match &ev.instance_id {
        Some(i) => format!("{}/{}/{i}", ev.namespace, ev.service),
        None => format!("{}/{}", ev.namespace, ev.service),
    };
    let body = CloudEvent::new(&id, source, registry_type(ev.kind), &subject, time, ev).to_vec();
    NewEvent { body: body.into(), id }
}

/// Appends every registry change to `$registry` until the registry closes, from the registry's
/// lossless journal (a burst of changes waits for the stream rather than being lost). Changes
/// that arrive together go in one append, retried until it lands.
pub async fn publish_registry(mut journal: Journal, log: Arc<dyn EventLog>, node: String) {
    let source = format!("zhili://{node}/registry");
    let boot = zhili_registry::unix_ms();
    let mut batcher = Batcher::new(BATCH);
    loop {
        let first = match journal.recv().await {
            Some(Journaled::Change(ev)) => ev,
            Some(Journaled::Missed(n)) => {
                tracing::warn!(missed = n, "the $registry publisher fell behind; {n} registry changes are not in the stream");
                continue;
            }
            None => return,
        };
        let batch = batcher.gather(first, || journal.try_recv()).await;
        // The changes of one batch arrived within a few milliseconds: one timestamp for them.
        let time = zhili_model::event::timestamp(zhili_registry::unix_ms());
        append_retrying(&*log, REGISTRY_STREAM, || registry_events(&source, &time, boot, &batch)).await;
    }
}

/// A batch of registry changes as CloudEvents, in order.
fn registry_events(source: &str, time: &str, boot: u64, batch: &[Arc<RegistryEvent>]) -> Vec<NewEvent> {
    let mut last_index = 0;
    let mut n = 0;
    batch
        .iter()
        .map(|ev| {
            n = if ev.index == last_index { n + 1 } else { 0 };
            last_index = ev.index;
            cloudevent(source, time, boot, ev, n)
        })
        .collect()
}

pub const KV_STREAM: &str = "$kv";
/// Values up to this size travel in the event (base64); larger ones only by size.
const KV_VALUE_INLINE: usize = 64 * 1024;

/// Appends every change of a KV key under `prefix` to `$kv` (`io.zhili.kv.put` /
/// `io.zhili.kv.deleted`, subject = the key, data = key, revision and the value when small),
/// in revision order, until the store closes. A watcher that falls behind the store's history
/// re-watches from now and logs how it lost track.
pub async fn publish_kv(store: Arc<dyn Store>, log: Arc<dyn EventLog>, prefix: String) {
    use base64::Engine;
    let watched = format!("{}{prefix}", zhili_kv::KV_PREFIX);
    loop {
        let mut watcher = match store.watch(&watched, 0) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, prefix = %prefix, "$kv watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let ev = match watcher.next().await {
                Ok(ev) => ev,
                Err(zhili_store::StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, prefix = %prefix, "$kv publisher fell behind the store; changes were missed, watching again from now");
                    break;
                }
            };
            let Some(key) = ev.kv.key.strip_prefix(zhili_kv::KV_PREFIX) else { continue };
            let (kind, id) = match ev.kind {
                EventKind::Put => ("io.zhili.kv.put", format!("kv-{}-{key}", ev.revision)),
                EventKind::Delete => ("io.zhili.kv.deleted", format!("kv-{}-{key}-deleted", ev.revision)),
            };
            let mut data = json!({"key": key, "revision": ev.revision, "size": ev.kv.value.len()});
            if ev.kind == EventKind::Put && ev.kv.value.len() <= KV_VALUE_INLINE {
                if let Some(o) = data.as_object_mut() {
                    o.insert("value_base64".into(), base64::engine::general_purpose::STANDARD.encode(&ev.kv.value).into());
                }
            }
            let id: String = id.chars().take(zhili_model::event::MAX_ID).collect();
            let time = zhili_model::event::timestamp(zhili_registry::unix_ms());
            let body = CloudEvent::new(&id, "zhili://kv", kind, key, &time, &data).to_vec();
            let event = NewEvent { id, body: body.into() };
            while let Err(e) = log.append(KV_STREAM, ExpectedRevision::Any, vec![event.clone()]).await {
                tracing::warn!(error = %e, "appending to $kv failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

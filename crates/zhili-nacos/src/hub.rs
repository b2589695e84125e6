//! Live Nacos state: gRPC connections, what each one subscribed to or listens on, the ephemeral
//! instances each one owns, and the two dispatchers that turn registry and KV changes into pushes
//! (and wake HTTP long-polls).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};

use zhili_model::acl::{Access, Resource};

use super::grpc::{self, Payload};
use super::{config_ref, service_info, ServiceRef};
use crate::NacosState;

/// Server pushes queued per connection; a client this far behind is disconnected (it reconnects
/// and resynchronises), so a slow client never holds memory without bound.
pub const PUSH_QUEUE: usize = 1024;

/// A subscription: which service, seen under which group and clusters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subscription {
    pub namespace: String,
    pub service: ServiceRef,
    pub clusters: String,
}

/// The ephemeral instance ids a connection registered, by namespace and service. Looked up by
/// borrowed names: a registration allocates only for a name the connection has not used yet.
#[derive(Debug, Default)]
pub struct Owned(HashMap<String, HashMap<String, HashSet<String>>>);

impl Owned {
    pub fn insert(&mut self, ns: &str, service: &str, id: &str) {
        let services = match self.0.get_mut(ns) {
            Some(s) => s,
            None => self.0.entry(ns.to_string()).or_default(),
        };
        let ids = match services.get_mut(service) {
            Some(ids) => ids,
            None => services.entry(service.to_string()).or_default(),
        };
        if !ids.contains(id) {
            ids.insert(id.to_string());
        }
    }

    pub fn remove(&mut self, ns: &str, service: &str, id: &str) {
        if let Some(ids) = self.0.get_mut(ns).and_then(|s| s.get_mut(service)) {
            ids.remove(id);
        }
    }

    /// The ids owned in one service.
    pub fn ids(&self, ns: &str, service: &str) -> Vec<String> {
        self.0.get(ns).and_then(|s| s.get(service)).map(|ids| ids.iter().cloned().collect()).unwrap_or_default()
    }

    /// Everything owned: (namespace, service, ids).
    pub fn entries(self) -> impl Iterator<Item = (String, String, HashSet<String>)> {
        self.0.into_iter().flat_map(|(ns, services)| services.into_iter().map(move |(service, ids)| (ns.clone(), service, ids)))
    }
}

/// One gRPC client connection, from `ConnectionSetupRequest` until its stream ends.
pub struct Conn {
    pub id: String,
    pub addr: SocketAddr,
    pub push: mpsc::Sender<Result<Payload, tonic::Status>>,
    /// The registry's handle on this connection's liveness: its ephemeral instances live as long
    /// as the connection beats it.
    pub owner: Arc<zhili_registry::Owner>,
    /// Ephemeral instances this connection registered.
    pub instances: Mutex<Owned>,
    pub subscriptions: Mutex<HashSet<Subscription>>,
    /// KV keys of the configs this connection listens on.
    pub listening: Mutex<HashSet<String>>,
    /// Wakes the connection's task to end the stream (a client too slow to take its pushes, or
    /// one whose token was deleted).
    pub kill: tokio::sync::Notify,
    /// The token of the connection's latest request: its subscriptions and listens are
    /// re-authorized with it whenever ACLs change.
    pub token: Mutex<Option<String>>,
}

impl Conn {
    pub fn new(id: String, addr: SocketAddr, push: mpsc::Sender<Result<Payload, tonic::Status>>, owner: Arc<zhili_registry::Owner>) -> Self {
        Self {
            id,
            addr,
            push,
            owner,
            instances: Mutex::default(),
            subscriptions: Mutex::default(),
            listening: Mutex::default(),
            kill: tokio::sync::Notify::new(),
            token: Mutex::default(),
        }
    }

    /// Queues a server request on the bidirectional stream; false when the client is too far
    /// behind (the caller then drops the connection).
    pub fn send(&self, hub: &NacosHub, kind: &str, body: serde_json::Value) -> bool {
        self.send_rendered(kind, hub.push_body(kind, body))
    }

    /// [`Self::send`] of a body rendered once ([`NacosHub::push_body`]) for every connection it
    /// goes to.
    pub fn send_rendered(&self, kind: &str, body: bytes::Bytes) -> bool {
        self.push.try_send(Ok(grpc::payload_json(kind, body))).is_ok()
    }
}

const NOTIFY_SUBSCRIBER: &str = "NotifySubscriberRequest";
const CONFIG_CHANGE: &str = "ConfigChangeNotifyRequest";

/// Instances a closing connection releases between two yields to the runtime.
const RELEASE_BATCH: usize = 512;

pub struct NacosHub {
    /// Set-up gRPC connections by peer address (one TCP connection is one Nacos connection).
    conns: Mutex<HashMap<SocketAddr, Arc<Conn>>>,
    /// Changed config KV keys, for HTTP long-polls.
    config_changes: broadcast::Sender<Arc<str>>,
    last_ref_time: AtomicU64,
    epoch_ms: AtomicU64,
    /// Numbers server pushes: one sequence for every connection, so a push body rendered once
    /// for many carries an id no other push to any of them has.
    push_seq: AtomicU64,
}

impl Default for NacosHub {
    fn default() -> Self {
        Self::new()
    }
}

impl NacosHub {
    pub fn new() -> Self {
        Self {
            conns: Mutex::default(),
            config_changes: broadcast::channel(4096).0,
            last_ref_time: AtomicU64::new(0),
            epoch_ms: AtomicU64::new(zhili_registry::unix_ms()),
            push_seq: AtomicU64::new(1),
        }
    }

    /// A server request's body as JSON, ready for any number of connections: the next push id,
    /// `module` by the request type and empty `headers` added to `body`'s fields.
    pub fn push_body(&self, kind: &str, mut body: serde_json::Value) -> bytes::Bytes {
        if let Some(o) = body.as_object_mut() {
            o.insert("requestId".into(), self.push_seq.fetch_add(1, Ordering::Relaxed).to_string().into());
            o.insert("module".into(), if kind.starts_with("Config") { "config" } else { "naming" }.into());
            o.entry("headers").or_insert_with(|| serde_json::json!({}));
        }
        serde_json::to_vec(&body).expect("json serializes").into()
    }

    /// The connection id a gRPC peer address gets (stable for the life of the TCP connection).
    pub fn conn_id(&self, addr: SocketAddr) -> String {
        let epoch = self.epoch_ms.load(Ordering::Relaxed);
        format!("{epoch}_{}_{}", addr.ip(), addr.port())
    }

    /// The set-up connection of a gRPC peer address (its id is [`NacosHub::conn_id`]).
    pub fn conn(&self, addr: SocketAddr) -> Option<Arc<Conn>> {
        self.conns.lock().get(&addr).cloned()
    }

    pub fn connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// Ends every connection's stream (the server is shutting down): a bidirectional stream
    /// never ends by itself, so without this it would hold its connection until the deadline.
    pub fn close_all(&self) {
        for conn in self.conns.lock().values() {
            conn.kill.notify_one();
        }
    }

    /// A set-up stream becomes its TCP connection's Nacos connection; a stream it replaces is
    /// ended (its instances go with it unless re-registered), so one TCP connection holds at most
    /// one stream open past its setup deadline: bidirectional streams have no read deadline.
    pub fn add(&self, conn: Arc<Conn>) {
        if let Some(replaced) = self.conns.lock().insert(conn.addr, conn) {
            replaced.kill.notify_one();
        }
    }

    /// A strictly increasing millisecond clock for `lastRefTime`: clients drop a push whose time
    /// is not newer than what they hold.
    pub fn ref_time(&self) -> u64 {
        let now = zhili_registry::unix_ms();
        let mut last = self.last_ref_time.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_ref_time.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Records that `conn` registered the instance (the registry knows `conn.owner` as its owner).
    pub fn own(&self, conn: &Conn, ns: &str, service: &str, id: &str) {
        conn.instances.lock().insert(ns, service, id);
    }

    pub fn disown(&self, conn: &Conn, ns: &str, service: &str, id: &str) {
        conn.instances.lock().remove(ns, service, id);
    }

    pub fn config_changes(&self) -> broadcast::Receiver<Arc<str>> {
        self.config_changes.subscribe()
    }

    /// Forgets a connection and removes the ephemeral instances it still owns: not those a client
    /// re-registered since through another connection (or over HTTP), which the registry knows
    /// by their owner.
    pub async fn close(&self, s: &NacosState, conn: &Arc<Conn>) {
        {
            // Only this stream's entry: a second stream on the same connection may have replaced it.
            let mut conns = self.conns.lock();
            if conns.get(&conn.addr).is_some_and(|c| Arc::ptr_eq(c, conn)) {
                conns.remove(&conn.addr);
            }
        }
        let owned = std::mem::take(&mut *conn.instances.lock());
        let mut released = 0usize;
        for (ns, service, ids) in owned.entries() {
            for id in ids {
                s.registry.release(&conn.owner, &ns, &service, &id);
                released += 1;
                // A connection may own a hundred thousand instances: let the worker serve others
                // between batches rather than stall for the whole release.
                if released.is_multiple_of(RELEASE_BATCH) {
                    tokio::task::yield_now().await;
                }
            }
        }
        tracing::debug!(conn = %conn.id, "nacos connection closed");
    }
}

/// On every ACL change: a connection whose token no longer resolves is closed (its client
/// reconnects and must present a valid token); a connection whose rights narrowed loses the
/// subscriptions and config listens it may no longer read, so no push reaches it after that.
pub(crate) async fn reauthorize(s: NacosState) {
    if !s.acl.enabled() {
        return;
    }
    let mut changes = s.acl.changes();
    while changes.changed().await.is_ok() {
        let conns: Vec<Arc<Conn>> = s.nacos.conns.lock().values().cloned().collect();
        for conn in conns {
            let token = conn.token.lock().clone();
            let Some(token) = token else { continue };
            match s.acl.resolve(Some(&token)) {
                Err(_) => {
                    tracing::info!(conn = %conn.id, "nacos connection closed: its token was deleted");
                    conn.kill.notify_one();
                }
                Ok(a) => {
                    conn.subscriptions.lock().retain(|sub| a.allows(Resource::Service, &sub.service.name, Access::Read));
                    conn.listening.lock().retain(|key| a.allows(Resource::Kv, key, Access::Read));
                }
            }
        }
    }
}

/// Registry events → `NotifySubscriberRequest` to every connection subscribed to the service.
/// Events that arrive together are coalesced: each service is rendered once per batch.
pub(crate) async fn naming_dispatcher(s: NacosState) {
    let mut events = s.registry.subscribe_events();
    loop {
        let mut dirty: HashSet<(String, String)> = HashSet::new();
        let mut all = false;
        match events.recv().await {
            Ok(ev) => {
                dirty.insert((ev.namespace.clone(), ev.service.clone()));
            }
            Err(broadcast::error::RecvError::Lagged(_)) => all = true,
            Err(broadcast::error::RecvError::Closed) => return,
        }
        loop {
            match events.try_recv() {
                Ok(ev) => {
                    dirty.insert((ev.namespace.clone(), ev.service.clone()));
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => all = true,
                Err(_) => break,
            }
        }
        let conns: Vec<Arc<Conn>> = s.nacos.conns.lock().values().cloned().collect();
        // One rendering per subscription, serialized once for all its subscribers.
        let mut rendered: HashMap<Subscription, bytes::Bytes> = HashMap::new();
        for conn in conns {
            let subs: Vec<Subscription> =
                conn.subscriptions.lock().iter().filter(|sub| all || dirty.contains(&(sub.namespace.clone(), sub.service.name.clone()))).cloned().collect();
            for sub in subs {
                let body = rendered
                    .entry(sub.clone())
                    .or_insert_with(|| {
                        let instances = super::instances_of(&s, &sub.namespace, &sub.service);
                        let info = service_info(&instances, &sub.service, &sub.clusters, false, s.nacos.ref_time());
                        let body = serde_json::json!({
                            "namespace": super::nacos_namespace(&sub.namespace),
                            "serviceName": sub.service.name,
                            "groupName": sub.service.group,
                            "serviceInfo": info,
                        });
                        s.nacos.push_body(NOTIFY_SUBSCRIBER, body)
                    })
                    .clone();
                if !conn.send_rendered(NOTIFY_SUBSCRIBER, body) {
                    tracing::warn!(conn = %conn.id, "nacos client too far behind on pushes; disconnecting");
                    conn.kill.notify_one();
                }
            }
        }
    }
}

/// KV changes under `config/` → long-poll wake-ups and `ConfigChangeNotifyRequest` pushes.
pub(crate) async fn config_dispatcher(s: NacosState) {
    let prefix = format!("{}{}", zhili_kv::KV_PREFIX, super::CONFIG_PREFIX);
    loop {
        let mut watcher = match s.store.watch(&prefix, 0) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "nacos config watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let tx = s.nacos.config_changes.clone();
        loop {
            let ev = match watcher.next().await {
                Ok(ev) => ev,
                Err(zhili_store::StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "nacos config watch fell behind; re-watching");
                    break;
                }
            };
            let Some(key) = ev.kv.key.strip_prefix(zhili_kv::KV_PREFIX) else { continue };
            let _ = tx.send(Arc::from(key));
            let Some((tenant, group, data_id)) = config_ref(key) else { continue };
            let conns: Vec<Arc<Conn>> = s.nacos.conns.lock().values().filter(|c| c.listening.lock().contains(key)).cloned().collect();
            if conns.is_empty() {
                continue;
            }
            let tenant = if tenant == super::PUBLIC { "" } else { tenant.as_str() };
            let body = s.nacos.push_body(CONFIG_CHANGE, serde_json::json!({"dataId": data_id, "group": group, "tenant": tenant}));
            for conn in conns {
                if !conn.send_rendered(CONFIG_CHANGE, body.clone()) {
                    conn.kill.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{NacosHub, Owned};
    use serde_json::{json, Value};

    #[test]
    fn push_bodies_are_numbered_once_for_every_connection() {
        let hub = NacosHub::new();
        let parse = |b: bytes::Bytes| serde_json::from_slice::<Value>(&b).expect("valid JSON");
        let first =
            parse(hub.push_body("NotifySubscriberRequest", json!({"serviceName": "a", "requestId": "stale", "serviceInfo": {"hosts": [{"ip": "10.0.0.1"}]}})));
        assert_eq!(first["requestId"], "1", "the hub's number, not the one in the body");
        assert_eq!(first["module"], "naming");
        assert_eq!(first["headers"], json!({}));
        assert_eq!(first["serviceInfo"]["hosts"][0]["ip"], "10.0.0.1");
        let second = parse(hub.push_body("ConfigChangeNotifyRequest", json!({"dataId": "d"})));
        assert_eq!((second["requestId"].as_str(), second["module"].as_str()), (Some("2"), Some("config")), "each push its own id");
    }

    #[test]
    fn owned_instances_are_kept_per_namespace_and_service() {
        let mut o = Owned::default();
        o.insert("public", "a", "1");
        o.insert("public", "a", "1");
        o.insert("public", "a", "2");
        o.insert("public", "b", "1");
        o.insert("dev", "a", "3");
        let mut ids = o.ids("public", "a");
        ids.sort();
        assert_eq!(ids, ["1", "2"], "an id owned twice is kept once");
        assert_eq!(o.ids("dev", "a"), ["3"], "namespaces are apart");
        assert!(o.ids("dev", "b").is_empty() && o.ids("none", "a").is_empty());
        o.remove("public", "a", "1");
        o.remove("public", "zzz", "1");
        assert_eq!(o.ids("public", "a"), ["2"]);
        let mut all: Vec<(String, String, usize)> = o.entries().map(|(ns, s, ids)| (ns, s, ids.len())).collect();
        all.sort();
        assert_eq!(all, [("dev".to_string(), "a".to_string(), 1), ("public".into(), "a".into(), 1), ("public".into(), "b".into(), 1)]);
    }
}

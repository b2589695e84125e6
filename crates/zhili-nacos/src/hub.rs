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
    push_seq: AtomicU64,
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
            push_seq: AtomicU64::new(1),
        }
    }

    /// Queues a server request on the bidirectional stream; false when the client is too far
    /// behind (the caller then drops the connection).
    pub fn send(&self, kind: &str, body: serde_json::Value) -> bool {
        self.send_shared(kind, &push_body(kind, body))
    }

    /// [`Self::send`] of a body rendered once for every connection it goes to ([`push_body`]):
    /// only the request id is this connection's, written in front of the shared fields.
    pub fn send_shared(&self, kind: &str, shared: &[u8]) -> bool {
        let body = with_request_id(self.push_seq.fetch_add(1, Ordering::Relaxed), shared);
        self.push.try_send(Ok(grpc::payload_json(kind, body))).is_ok()
    }
}

/// `shared` (a JSON object) with `"requestId": "<id>"` in front of its fields.
fn with_request_id(id: u64, shared: &[u8]) -> Vec<u8> {
    let fields = shared.strip_prefix(b"{").filter(|f| f.ends_with(b"}")).unwrap_or(b"}");
    let mut body = Vec::with_capacity(fields.len() + 32);
    body.extend_from_slice(b"{\"requestId\":\"");
    body.extend_from_slice(id.to_string().as_bytes());
    body.extend_from_slice(if fields.starts_with(b"}") { b"\"" } else { b"\"," });
    body.extend_from_slice(fields);
    body
}

/// A server request's body as JSON, with everything but the request id (which each connection
/// numbers itself: [`Conn::send_shared`]): `module` by the request type and empty `headers`.
pub fn push_body(kind: &str, mut body: serde_json::Value) -> Vec<u8> {
    if let Some(o) = body.as_object_mut() {
        o.remove("requestId");
        o.insert("module".into(), if kind.starts_with("Config") { "config" } else { "naming" }.into());
        o.entry("headers").or_insert_with(|| serde_json::json!({}));
    }
    serde_json::to_vec(&body).expect("json serializes")
}

const NOTIFY_SUBSCRIBER: &str = "NotifySubscriberRequest";

/// Instances a closing connection releases between two yields to the runtime.
const RELEASE_BATCH: usize = 512;

pub struct NacosHub {
    /// Set-up gRPC connections by peer address (one TCP connection is one Nacos connection).
    conns: Mutex<HashMap<SocketAddr, Arc<Conn>>>,
    /// Changed config KV keys, for HTTP long-polls.
    config_changes: broadcast::Sender<Arc<str>>,
    last_ref_time: AtomicU64,
    epoch_ms: AtomicU64,
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
        }
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
        let mut rendered: HashMap<Subscription, Arc<[u8]>> = HashMap::new();
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
                        push_body(NOTIFY_SUBSCRIBER, body).into()
                    })
                    .clone();
                if !conn.send_shared(NOTIFY_SUBSCRIBER, &body) {
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
            for conn in conns {
                let tenant = if tenant == super::PUBLIC { "" } else { tenant.as_str() };
                let body = serde_json::json!({"dataId": data_id, "group": group, "tenant": tenant});
                if !conn.send("ConfigChangeNotifyRequest", body) {
                    conn.kill.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{push_body, with_request_id, Owned};
    use serde_json::{json, Value};

    #[test]
    fn a_shared_push_body_gets_each_connection_s_request_id() {
        let shared = push_body("NotifySubscriberRequest", json!({"serviceName": "a", "requestId": "stale", "serviceInfo": {"hosts": [{"ip": "10.0.0.1"}]}}));
        for id in [1, 42] {
            let v: Value = serde_json::from_slice(&with_request_id(id, &shared)).expect("valid JSON");
            assert_eq!(v["requestId"], id.to_string(), "the connection's id, not the one in the body");
            assert_eq!(v["module"], "naming");
            assert_eq!(v["headers"], json!({}));
            assert_eq!(v["serviceInfo"]["hosts"][0]["ip"], "10.0.0.1");
        }
        assert_eq!(serde_json::from_slice::<Value>(&push_body("ConfigChangeNotifyRequest", json!({}))).unwrap()["module"], "config");
        // Nothing but the id: still one valid object.
        for shared in [&b"{}"[..], b"", b"null", b"{"] {
            let v: Value = serde_json::from_slice(&with_request_id(7, shared)).expect("valid JSON");
            assert_eq!(v, json!({"requestId": "7"}), "{:?}", String::from_utf8_lossy(shared));
        }
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

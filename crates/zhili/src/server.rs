//! Wires the server together: config → store → health engine → registry → ACL → API listener.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use zhili_config::{FileConfig, ServerConfig};
use zhili_health::HealthEngine;
use zhili_model::{CheckDefinition, CheckKey};
use zhili_registry::{CheckScheduler, Registry};
use zhili_store::Store;
use zhili_telemetry::Metrics;

use crate::{ServerArgs, EXIT_USAGE};

/// How often stale heartbeats, expired TTLs and deregister-after deadlines are looked for.
const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// How often a baking plan step checks its gates.
const PLAN_TICK: Duration = Duration::from_millis(500);
/// TTL of DNS answers: short, so a health change reaches resolvers within seconds.
const DNS_TTL: Duration = Duration::from_secs(5);
/// Health transitions waiting for the registry; when full, check tasks wait (nothing is lost).
const TRANSITION_QUEUE: usize = 4096;

/// DNS's view of the registry: serving instances of the default namespace, and nodes, as far as
/// the DNS token may read them (DNS carries no token of its own, as with Consul's agent DNS
/// token). A name the token may not read answers exactly like a name that does not exist.
struct RegistryCatalog {
    registry: Arc<Registry>,
    /// Holds the DNS token (`--dns-token` or `PUT /v1/agent/token/dns`); without one DNS has
    /// the anonymous rights (nothing while ACLs are on).
    acl: Arc<zhili_acl::Acl>,
    node: String,
    node_address: String,
}

impl RegistryCatalog {
    /// Resolved per query, so a revoked or changed token takes effect at once.
    fn may_read(&self, resource: zhili_model::acl::Resource, name: &str) -> bool {
        let token = self.acl.dns_token();
        self.acl.resolve(token.as_ref().map(|t| t.as_str())).is_ok_and(|a| a.allows(resource, name, zhili_model::acl::Access::Read))
    }
}

impl zhili_dns::Catalog for RegistryCatalog {
    fn service(&self, name: &str, tag: Option<&str>) -> Option<Vec<zhili_dns::Endpoint>> {
        if !self.may_read(zhili_model::acl::Resource::Service, name) {
            return None;
        }
        let filter = zhili_registry::InstanceFilter { healthy_only: true, tags: tag.map(|t| vec![t.to_string()]).unwrap_or_default(), ..Default::default() };
        let list = self.registry.instances(zhili_model::DEFAULT_NAMESPACE, name, &filter)?;
        Some(
            list.instances
                .into_iter()
                .map(|i| zhili_dns::Endpoint { node: i.node.map_or_else(|| self.node.clone(), |n| n.name), address: i.address, port: i.port })
                .collect(),
        )
    }

    fn node(&self, name: &str) -> Option<String> {
        if !self.may_read(zhili_model::acl::Resource::Node, name) {
            return None;
        }
        if name == self.node {
            return Some(self.node_address.clone());
        }
        let (_, all) = self.registry.all_instances(None);
        all.into_iter().find_map(|i| i.node.filter(|n| n.name == name).map(|n| n.address))
    }
}

/// The registry's check contract, implemented over the health engine.
struct EngineScheduler(Arc<HealthEngine>);

impl CheckScheduler for EngineScheduler {
    fn schedule(&self, key: CheckKey, def: CheckDefinition) {
        self.0.schedule(key, def);
    }
    fn cancel(&self, key: &CheckKey) {
        self.0.cancel(key);
    }
}

fn config_from(args: ServerArgs) -> Result<ServerConfig, zhili_config::ConfigError> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let number = |field: &'static str, v: Option<String>| {
        v.map(|v| v.parse::<usize>().map_err(|_| zhili_config::ConfigError::Invalid { field, message: format!("{v:?} is not a number") })).transpose()
    };
    let check_concurrency = number("check_concurrency", args.check_concurrency)?;
    let max_connections = number("max_connections", args.max_connections)?;
    let flags = FileConfig {
        data_dir: args.data_dir,
        dev: args.dev.then_some(true),
        api_addr: args.api_addr,
        dns_addr: args.dns_addr,
        nacos_addr: args.nacos_addr,
        nacos_grpc_addr: args.nacos_grpc_addr,
        gateway_addr: args.gateway_addr,
        dtm_addr: args.dtm_addr,
        txn_alert_webhook: args.txn_alert_webhook,
        txn_retention: args.txn_retention,
        gateway_access_log: args.gateway_access_log,
        gateway_workers: args.gateway_workers,
        gateway_tls_cert: (!args.gateway_tls_cert.is_empty()).then_some(args.gateway_tls_cert),
        gateway_tls_key: (!args.gateway_tls_key.is_empty()).then_some(args.gateway_tls_key),
        gateway_client_ca: args.gateway_client_ca,
        node_name: args.node_name,
        datacenter: args.datacenter,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        log_format: args.log_format,
        log_level: args.log_level,
        check_concurrency,
        max_connections,
        idle_timeout: args.idle_timeout,
        read_timeout: args.read_timeout,
        write_timeout: args.write_timeout,
        dns_token: args.dns_token,
        shutdown_timeout: args.shutdown_timeout,
        publish_kv: args.publish_kv,
    };
    file.overlay(flags).validate()
}

pub async fn run(args: ServerArgs) -> ExitCode {
    let cfg = match config_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zhili: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = zhili_telemetry::validate_filter(&cfg.log_level) {
        eprintln!("zhili: invalid value for log_level: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let format = match cfg.log_format {
        zhili_config::LogFormat::Pretty => zhili_telemetry::LogFormat::Pretty,
        zhili_config::LogFormat::Json => zhili_telemetry::LogFormat::Json,
    };
    zhili_telemetry::init_logging(format, &cfg.log_level);
    match serve(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("zhili: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    if cfg.dev {
        eprintln!("\n  *** ZHILI DEV MODE: ACLs are OFF. Every caller can read and change everything. ***\n  *** Never run --dev where anyone else can reach the API.                           ***\n");
        tracing::warn!("dev mode: ACLs disabled");
    }
    let (limits, budget) = connection_limits(&cfg);
    let admission = |name: &'static str| zhili_net::Admission::within(name, limits, budget.clone());
    let metrics = Metrics::new();
    let store: Arc<dyn Store> =
        Arc::new(zhili_store_fjall::FjallStore::open(&cfg.data_dir).with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?);
    let events_dir = cfg.data_dir.join("events");
    let events: Arc<dyn zhili_store::events::EventLog> = Arc::new(
        zhili_store_fjall::FjallEventLog::open_with_metrics(&events_dir, Some(metrics.clone()))
            .with_context(|| format!("opening the event log in {}", events_dir.display()))?,
    );
    let (transitions_tx, mut transitions) = mpsc::channel(TRANSITION_QUEUE);
    let engine = Arc::new(HealthEngine::new(transitions_tx, cfg.check_concurrency, metrics.clone()));
    let registry = Registry::load(store.clone(), Arc::new(EngineScheduler(engine.clone())), metrics.clone()).context("loading the registry")?;
    let acl = zhili_acl::Acl::load(store.clone(), !cfg.dev).context("loading ACLs")?;
    if !cfg.dev && !acl.bootstrapped()? {
        tracing::warn!("ACLs are on and not bootstrapped: run `zhili acl bootstrap` to create the management token");
    }

    // Every long-lived subsystem runs under one supervisor: on SIGTERM the listeners stop
    // accepting and drain; a subsystem that ends on its own takes the server down.
    let mut sup = Supervisor::new(cfg.shutdown_timeout);
    let reg = registry.clone();
    sup.spawn("health transitions", async move {
        while let Some(t) = transitions.recv().await {
            reg.apply_transition(&t);
        }
    });
    let reg = registry.clone();
    sup.spawn("registry reaper", async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            reg.reap().await;
        }
    });

    let ready = Arc::new(AtomicBool::new(false));
    let kv = zhili_kv::Kv::new(store.clone());
    sup.spawn("session reaper", kv.clone().run_session_reaper());
    let consul = zhili_consul::ConsulIdentity { node: cfg.node_name.clone(), datacenter: cfg.datacenter.clone(), address: advertised_ip(cfg.api_addr) };
    if let Some(dns_addr) = cfg.dns_addr {
        acl.use_dns_token(cfg.dns_token.clone());
        if !cfg.dev && acl.dns_token().is_none() {
            tracing::info!("DNS answers with anonymous rights (nothing while ACLs are on); set --dns-token or PUT /v1/agent/token/dns to serve names");
        }
        let catalog = RegistryCatalog { registry: registry.clone(), acl: acl.clone(), node: consul.node.clone(), node_address: consul.address.clone() };
        let dns = zhili_dns::DnsServer::new(Arc::new(catalog), &consul.datacenter, DNS_TTL);
        let local = zhili_dns::listen(dns, dns_addr).await.with_context(|| format!("binding the DNS listener on {dns_addr}"))?;
        // Printed before the API line, which tools wait for last.
        println!("zhili dns listening on {local}");
        tracing::info!(addr = %local, "DNS listener up (udp+tcp)");
    }
    let journal = registry.journal().expect("the registry's journal is taken once, here");
    sup.spawn("$registry publisher", crate::feedback::publish_registry(journal, events.clone(), cfg.node_name.clone()));
    let subscriptions =
        zhili_events::Subscriptions::load_with_metrics(store.clone(), events.clone(), Some(metrics.clone())).context("loading subscriptions")?;
    metrics.register_collector(Box::new(zhili_events::SubscriptionsCollector(subscriptions.clone())));
    sup.spawn("webhook deliveries", subscriptions.clone().run_webhooks());
    for prefix in &cfg.publish_kv {
        sup.spawn("$kv publisher", crate::feedback::publish_kv(store.clone(), events.clone(), prefix.clone()));
    }
    let (audit, audit_publisher) = zhili_events::Audit::new(events.clone());
    sup.spawn("$audit publisher", audit_publisher);
    let transactions = match cfg.dtm_addr {
        Some(_) => {
            let resolver = Arc::new(crate::txn::RegistryResolver::new(registry.clone()));
            let defaults = zhili_txn::Defaults { alert_webhook: cfg.txn_alert_webhook.clone(), retention: cfg.txn_retention, ..Default::default() };
            let c = zhili_txn::Coordinator::start(store.clone(), resolver, Some(events.clone()), defaults).context("starting the transaction coordinator")?;
            metrics.register_collector(Box::new(zhili_txn::TxnCollector(c.clone())));
            Some(c)
        }
        None => None,
    };
    // The embedded gateway's state exists before its listener, so plans can read its counters.
    let gateway = cfg.gateway_addr.map(|_| zhili_gateway::Gateway::new(zhili_gateway::Options { access_log: cfg.gateway_access_log, ..Default::default() }));
    let world = crate::plans::World { registry: registry.clone(), store: store.clone(), kv: kv.clone(), gateway: gateway.clone() };
    let plans = zhili_plans::Plans::start(store.clone(), Arc::new(world), Some(events.clone()), PLAN_TICK).context("loading plans")?;
    let state = zhili_api::AppState::new(zhili_api::Services {
        store,
        registry: registry.clone(),
        acl,
        kv,
        events,
        subscriptions,
        audit,
        transactions: transactions.clone(),
        plans,
        gateway: gateway.clone(),
        metrics,
        ready: ready.clone(),
    });
    let tls = match &cfg.tls {
        Some(files) => Some(tls::acceptor(&files.cert, &files.key)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let nacos = zhili_nacos::NacosState::new(state.clone());
    if cfg.nacos_addr.is_some() || cfg.nacos_grpc_addr.is_some() {
        sup.spawn("nacos hub", nacos.clone().run());
        let hub = nacos.clone();
        sup.on_stop(move || hub.close_all());
    }
    if let Some(addr) = cfg.nacos_addr {
        let listener = zhili_net::bind(addr).await.with_context(|| format!("binding the Nacos listener on {addr}"))?;
        println!("zhili nacos listening on {scheme}://{}", listener.local_addr()?);
        sup.listener("nacos listener", listen::serve(listener, tls.clone(), nacos.http_router(), admission("nacos"), sup.stop()));
    }
    if let Some(addr) = cfg.nacos_grpc_addr {
        let listener = zhili_net::bind(addr).await.with_context(|| format!("binding the Nacos gRPC listener on {addr}"))?;
        println!("zhili nacos-grpc listening on {}", listener.local_addr()?);
        sup.listener("nacos grpc listener", listen::serve(listener, tls.clone(), nacos.grpc_router(), admission("nacos-grpc"), sup.stop()));
    }
    if let (Some(addr), Some(gw)) = (cfg.gateway_addr, gateway) {
        // Either one listener on this runtime, or one per worker thread.
        let (listener, workers) = if cfg.gateway_workers == 0 {
            (Some(zhili_net::bind(addr).await.with_context(|| format!("binding the gateway on {addr}"))?), Vec::new())
        } else {
            (None, zhili_gateway::bind_workers(addr, cfg.gateway_workers).with_context(|| format!("binding the gateway on {addr}"))?)
        };
        let local = match (&listener, workers.first()) {
            (Some(l), _) => l.local_addr()?,
            (None, Some(w)) => w.local_addr()?,
            (None, None) => anyhow::bail!("no gateway listener"),
        };
        let files = if cfg.gateway_tls.is_empty() { cfg.tls.as_slice() } else { cfg.gateway_tls.as_slice() };
        let pairs: Vec<_> = files.iter().map(|t| (t.cert.clone(), t.key.clone())).collect();
        let gw_tls =
            if pairs.is_empty() { None } else { Some(zhili_gateway::tls::acceptor(&pairs, cfg.gateway_client_ca.as_deref()).map_err(anyhow::Error::msg)?) };
        let scheme = if gw_tls.is_some() { "https" } else { "http" };
        println!("zhili gateway listening on {scheme}://{local}");
        state.metrics.register_collector(Box::new(zhili_gateway::GatewayCollector(gw.clone())));
        let discover = Arc::new(crate::gateway::Local { registry: registry.clone(), store: state.store.clone(), events: state.events.clone() });
        sup.spawn("gateway follower", zhili_gateway::follow(gw.clone(), discover));
        let gate = admission("gateway");
        match listener {
            Some(l) => sup.listener("gateway listener", zhili_gateway::serve(l, gw, gw_tls, gate, sup.stop())),
            None => sup.listener("gateway listener", zhili_gateway::serve_workers(workers, gw, gw_tls, gate, sup.stop())),
        }
    }
    if let (Some(addr), Some(coordinator)) = (cfg.dtm_addr, transactions) {
        let listener = zhili_net::bind(addr).await.with_context(|| format!("binding the DTM listener on {addr}"))?;
        println!("zhili dtm listening on {scheme}://{}", listener.local_addr()?);
        let router = zhili_dtm::router(zhili_dtm::DtmState { coordinator, acl: state.acl.clone() });
        sup.listener("dtm listener", listen::serve(listener, tls.clone(), router, admission("dtm"), sup.stop()));
    }
    let app = zhili_api::router(state.clone(), [zhili_consul::router(state, consul)]);

    let Some(addr) = cfg.api_addr else {
        tracing::warn!("API listener is off; nothing to serve");
        ready.store(true, Ordering::Release);
        return sup.run().await;
    };
    let listener = zhili_net::bind(addr).await.with_context(|| format!("binding the API listener on {addr}"))?;
    let local = listener.local_addr()?;
    ready.store(true, Ordering::Release);
    // Tools and tests read this line to find the port when started with port 0.
    println!("zhili api listening on {scheme}://{local}");
    tracing::info!(addr = %local, tls = tls.is_some(), ready_ms = started.elapsed().as_millis() as u64, "API listener up");
    sup.listener("api listener", listen::serve(listener, tls, app, admission("api"), sup.stop()));
    sup.run().await
}

/// Runs the server's subsystems and stops them together. Listeners watch the stop signal: on
/// SIGTERM (or Ctrl-C) they stop accepting and let the connections they have finish what is in
/// flight, up to the shutdown deadline. Acknowledged writes are already durable (the store
/// fsyncs before acknowledging), so nothing else needs flushing. Any subsystem that ends by
/// itself (a panic, a listener that died) is logged and takes the whole server down, rather than
/// leaving a half-working process.
struct Supervisor {
    tasks: tokio::task::JoinSet<&'static str>,
    /// Run once the stop signal is sent: ends what graceful shutdown alone would wait on.
    on_stop: Vec<Box<dyn FnOnce() + Send>>,
    /// The listeners, which end only when told to.
    listeners: usize,
    stop: tokio::sync::watch::Sender<bool>,
    deadline: Duration,
}

impl Supervisor {
    fn new(deadline: Duration) -> Self {
        Self { tasks: tokio::task::JoinSet::new(), on_stop: Vec::new(), listeners: 0, stop: tokio::sync::watch::Sender::new(false), deadline }
    }

    /// The signal listeners watch.
    fn stop(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// A background subsystem: it never ends while the server runs.
    fn spawn(&mut self, name: &'static str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(async move {
            task.await;
            name
        });
    }

    /// Something to do when the server stops (ending open-ended streams).
    fn on_stop(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_stop.push(Box::new(f));
    }

    /// A listener: it ends once it has drained after the stop signal.
    fn listener(&mut self, name: &'static str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.listeners += 1;
        self.spawn(name, task);
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let failed = tokio::select! {
            () = shutdown_signal() => None,
            ended = self.tasks.join_next() => Some(match ended {
                Some(Ok(name)) => format!("{name} stopped unexpectedly"),
                Some(Err(e)) if e.is_panic() => "a subsystem panicked".to_string(),
                Some(Err(e)) => format!("a subsystem failed: {e}"),
                None => "no subsystem is running".to_string(),
            }),
        };
        if let Some(why) = &failed {
            tracing::error!(reason = %why, "shutting down: a subsystem ended");
        } else {
            tracing::info!(deadline_ms = self.deadline.as_millis() as u64, "shutting down: draining requests in flight");
        }
        let _ = self.stop.send(true);
        for f in self.on_stop.drain(..) {
            f();
        }
        let drained = tokio::time::timeout(self.deadline, async {
            let mut left = self.listeners;
            while left > 0 {
                match self.tasks.join_next().await {
                    Some(_) => left -= 1,
                    None => break,
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(deadline_ms = self.deadline.as_millis() as u64, "shutdown deadline passed with requests still in flight; closing them");
        }
        self.tasks.abort_all();
        tracing::info!("shut down");
        match failed {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }
}

/// Raises the open-file limit (each connection is a descriptor) and sizes the connection budget
/// every listener shares to fit in it, leaving room for the store's files and outgoing sockets.
/// Each listener is also held to `max_connections`, lowered only when even the whole budget is
/// smaller.
fn connection_limits(cfg: &ServerConfig) -> (zhili_net::Limits, Option<Arc<tokio::sync::Semaphore>>) {
    /// Descriptors kept for the store, health probes, upstream connections and the like.
    const RESERVED_FDS: u64 = 256;
    let mut max = cfg.max_connections;
    let mut budget = None;
    match zhili_net::raise_open_file_limit() {
        Ok((before, soft, hard)) => {
            let fit = soft.saturating_sub(RESERVED_FDS).max(64) as usize;
            if fit < max {
                tracing::warn!(max_connections = max, fit, "max_connections lowered to fit the open-file limit");
                max = fit;
            }
            budget = Some(Arc::new(tokio::sync::Semaphore::new(fit)));
            tracing::info!(soft_before = before, soft, hard, max_connections = max, all_listeners = fit, "open-file limit");
        }
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
    let limits = zhili_net::Limits {
        max_connections: max,
        handshake_timeout: zhili_net::DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: cfg.idle_timeout,
        read_timeout: cfg.read_timeout,
        write_timeout: cfg.write_timeout,
    };
    (limits, budget)
}

/// The address clients should use for this node: the API listener's IP, or loopback when it
/// listens on every interface (or not at all).
fn advertised_ip(api: Option<SocketAddr>) -> String {
    match api.map(|a| a.ip()) {
        Some(ip) if !ip.is_unspecified() => ip.to_string(),
        _ => "127.0.0.1".into(),
    }
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

mod tls {
    //! TLS for every TCP listener with rustls; ALPN offers h2 and http/1.1 (the gateway's loader,
    //! with one certificate and no client certificates).

    use std::path::Path;

    use tokio_rustls::TlsAcceptor;

    pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
        zhili_gateway::tls::acceptor(&[(cert.to_path_buf(), key.to_path_buf())], None).map_err(anyhow::Error::msg)
    }
}

mod listen {
    //! The accept loop of the API, Nacos and DTM listeners: the listener's connection cap,
    //! optional TLS under a handshake deadline, the peer address on every request, HTTP/2
    //! keep-alive pings (so a vanished gRPC client is noticed and its connection-bound state
    //! released), and zhili-net's idle, read and write deadlines on every connection. HTTP/1.1
    //! is served by zhili-net's own server side ([`zhili_net::h1_server`]: small per-connection
    //! buffers, so thousands of blocked watchers stay cheap); HTTP/2 (gRPC), TLS connections
    //! that chose `h2`, upgrades, streamed or large request bodies and malformed heads go on to
    //! hyper.

    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::extract::ConnectInfo;
    use bytes::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::server::graceful::{GracefulShutdown, Watcher};
    use hyper_util::service::TowerToHyperService;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tokio_rustls::TlsAcceptor;
    use tower::ServiceExt;
    use zhili_net::h1_server::{self, Outcome, Replay};
    use zhili_net::{Admission, Conn, TimedBody};

    const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
    const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

    /// Serves until `stop` turns true, then stops accepting and returns once every connection
    /// has finished what it had in flight (the supervisor bounds how long that may take).
    pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, app: axum::Router, gate: Arc<Admission>, mut stop: watch::Receiver<bool>) {
        let graceful = GracefulShutdown::new();
        // Every connection task holds a sender; all are gone when the last connection has closed.
        let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
        while let Some((stream, peer)) = zhili_net::accept(&listener, &mut stop, gate.name()).await {
            let Some((stream, conn)) = gate.admit(stream, tls.is_none()) else { continue };
            let _ = stream.set_nodelay(true);
            let (app, tls, watcher, stop, alive) = (app.clone(), tls.clone(), graceful.watcher(), stop.clone(), alive.clone());
            tokio::spawn(async move {
                let _alive = alive;
                match tls {
                    None => connection(conn.wrap(stream), true, peer, app, conn, watcher, stop).await,
                    // Boxed, so a plain connection's task is not the size of a TLS one.
                    Some(acceptor) => {
                        Box::pin(async move {
                            if let Ok(Ok(s)) = tokio::time::timeout(conn.limits().handshake_timeout, acceptor.accept(stream)).await {
                                let h1 = s.get_ref().1.alpn_protocol() != Some(b"h2");
                                connection(conn.wrap(s), h1, peer, app, conn, watcher, stop).await;
                            }
                        })
                        .await
                    }
                }
            });
        }
        // New connections are refused from here; the ones we have finish their requests.
        drop(listener);
        drop(alive);
        tokio::join!(graceful.shutdown(), all_closed.recv());
    }

    /// One connection: HTTP/1.1 on zhili-net's server side first (when `h1`), then hyper for
    /// whatever that hands over.
    async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        mut io: S,
        h1: bool,
        peer: SocketAddr,
        mut app: axum::Router,
        conn: Arc<Conn>,
        watcher: Watcher,
        mut stop: watch::Receiver<bool>,
    ) {
        conn.clone()
            .run(async move {
                let read = if h1 {
                    let handler = |req: axum::http::Request<Bytes>| {
                        // An empty body is not boxed.
                        let mut req = req.map(|b| if b.is_empty() { axum::body::Body::empty() } else { axum::body::Body::from(b) });
                        req.extensions_mut().insert(ConnectInfo(peer));
                        let answer = tower::Service::call(&mut app, req);
                        async move { answer.await.unwrap_or_else(|never| match never {}) }
                    };
                    match h1_server::serve(&mut io, H1_OPTIONS, &conn, &mut stop, handler).await {
                        Outcome::Closed => return,
                        Outcome::Hyper(read) => read,
                    }
                } else {
                    Bytes::new()
                };
                // Boxed: hyper's connection state is large, and inline it would make every
                // connection's task that large, hyper or not.
                Box::pin(with_hyper(Replay::new(read, io), peer, app, conn, watcher)).await;
            })
            .await;
    }

    /// Request heads and bodies the HTTP/1.1 fast path takes whole; larger ones go to hyper
    /// (which answers 431 for heads over its own limit, and streams large bodies).
    const H1_OPTIONS: h1_server::Options = h1_server::Options { max_head: 64 * 1024, max_body: 64 * 1024, added_headers: 0 };

    async fn with_hyper<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, peer: SocketAddr, app: axum::Router, conn: Arc<Conn>, watcher: Watcher) {
        let limits = conn.limits();
        let svc = app.map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
            let mut req = req.map(|b| TimedBody::new(b, limits.read_timeout));
            let quiet = req.body().quiet_switch();
            req.extensions_mut().insert(quiet);
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.read_timeout);
        builder.http2().timer(TokioTimer::new()).keep_alive_interval(H2_PING_INTERVAL).keep_alive_timeout(H2_PING_TIMEOUT);
        let svc = conn.service(TowerToHyperService::new(svc));
        let _ = watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(io), svc)).await;
    }
}

//! The gateway's two sources of routes and endpoints: the registry and store of this process
//! (`zhili server`), or a server's HTTP API (`zhili gateway --server URL`), plus the standalone
//! command.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clap::Args;
use zhili_gateway::{Discover, DiscoverError, Endpoint, Observed};

const BREAKER_REASON: &str = "circuit breaker of a gateway (error or slow-call ratio over its window)";
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;
use zhili_model::{Instance, InstanceList};
use zhili_registry::{InstanceFilter, Registry};
use zhili_store::Store;

fn endpoint(i: Instance) -> Endpoint {
    Endpoint { id: i.id, address: i.address, port: i.port, weight: i.weight, tags: i.tags, version: i.version, zone: i.zone }
}

/// Embedded: routes from the store, serving instances from the registry, both by blocking reads.
pub struct Local {
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    /// Where observations also go, as `$gateway` events.
    pub events: Arc<dyn zhili_store::events::EventLog>,
}

#[async_trait]
impl Discover for Local {
    async fn routes(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), DiscoverError> {
        zhili_routes::wait_routes(&*self.store, version, wait).await;
        zhili_routes::load_routes(&*self.store).map_err(|e| DiscoverError::Unavailable(e.to_string()))
    }

    async fn consumers(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), DiscoverError> {
        zhili_routes::wait_consumers(&*self.store, version, wait).await;
        zhili_routes::load_consumers(&*self.store).map_err(|e| DiscoverError::Unavailable(e.to_string()))
    }

    async fn endpoints(&self, ns: &str, service: &str, version: u64, wait: Duration) -> Result<(u64, Vec<Endpoint>), DiscoverError> {
        self.registry.wait_for(version, wait, || self.registry.service_index(ns, service)).await;
        let filter = InstanceFilter { healthy_only: true, ..Default::default() };
        let index = self.registry.service_index(ns, service);
        let list = self.registry.instances(ns, service, &filter).map(|l| l.instances).unwrap_or_default();
        Ok((index, list.into_iter().filter(Instance::is_serving).map(endpoint).collect()))
    }

    async fn report(&self, p: &zhili_gateway::PassiveHealth) -> Result<(), DiscoverError> {
        let done = match &p.observed {
            Observed::Ejected { instance, for_ } => {
                self.registry.report_passive(&p.namespace, &p.service, instance, *for_, "ejected by the gateway after consecutive failures").map(|_| ())
            }
            Observed::Breaker(t) => self.registry.report_breaker(&p.namespace, &p.service, t.state(), BREAKER_REASON),
        };
        let change = match &p.observed {
            Observed::Ejected { instance, for_ } => zhili_events::GatewayChange::Ejected { instance, for_: *for_ },
            Observed::Breaker(t) => zhili_events::GatewayChange::Breaker(t.state()),
        };
        let reason = if matches!(p.observed, Observed::Breaker(_)) { BREAKER_REASON } else { "ejected by the gateway after consecutive failures" };
        zhili_events::publish_gateway(&*self.events, &p.namespace, &p.service, change, reason).await.map_err(|e| DiscoverError::Unavailable(e.to_string()))?;
        // The registry forgot the instance (or service) in between: nothing to report on.
        done.map_err(|e| DiscoverError::Invalid(e.to_string()))
    }
}

/// Standalone: the same through a server's native API.
pub struct Remote {
    pub client: zhili_client::Client,
}

impl Remote {
    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str, wait: Duration) -> Result<T, DiscoverError> {
        let resp = self.client.raw(http::Method::GET, path, None, wait + Duration::from_secs(10)).await.map_err(|e| discover_error(path, e))?;
        serde_json::from_slice(&resp.body).map_err(|e| DiscoverError::Invalid(format!("{path}: {e}")))
    }
}

/// What a failed call to the server means for the gateway: a refusal (401/403) needs a better
/// token; anything else is the server being away or failing, retried.
fn discover_error(path: &str, e: zhili_client::ClientError) -> DiscoverError {
    match e.status() {
        Some(s) if s == http::StatusCode::UNAUTHORIZED || s == http::StatusCode::FORBIDDEN => DiscoverError::Refused(format!("{path}: {e}")),
        Some(s) if s.is_client_error() => DiscoverError::Invalid(format!("{path}: {e}")),
        _ => DiscoverError::Unavailable(format!("{path}: {e}")),
    }
}

#[derive(serde::Deserialize)]
struct RouteList {
    index: u64,
    routes: Vec<NamedRoute>,
}

#[derive(serde::Deserialize)]
struct NamedRoute {
    name: String,
    route: RouteSpec,
}

#[derive(serde::Deserialize)]
struct ConsumerList {
    index: u64,
    consumers: Vec<NamedConsumer>,
}

#[derive(serde::Deserialize)]
struct NamedConsumer {
    name: String,
    consumer: ConsumerSpec,
}

fn wait_param(version: u64, wait: Duration) -> String {
    if version == 0 {
        String::new()
    } else {
        format!("index={version}&wait={}s&", wait.as_secs().max(1))
    }
}

#[async_trait]
impl Discover for Remote {
    async fn routes(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), DiscoverError> {
        let list: RouteList = self.get(&format!("/api/v1/routes?{}", wait_param(version, wait)), wait).await?;
        Ok((list.index, list.routes.into_iter().map(|r| (r.name, r.route)).collect()))
    }

    async fn consumers(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), DiscoverError> {
        let list: ConsumerList = self.get(&format!("/api/v1/consumers?{}", wait_param(version, wait)), wait).await?;
        Ok((list.index, list.consumers.into_iter().map(|c| (c.name, c.consumer)).collect()))
    }

    async fn endpoints(&self, ns: &str, service: &str, version: u64, wait: Duration) -> Result<(u64, Vec<Endpoint>), DiscoverError> {
        let path =
            format!("/api/v1/services/{}/instances?{}ns={}&healthy=true", zhili_client::encode(service), wait_param(version, wait), zhili_client::encode(ns));
        let list: InstanceList = self.get(&path, wait).await?;
        Ok((list.index, list.instances.into_iter().filter(Instance::is_serving).map(endpoint).collect()))
    }

    async fn report(&self, p: &zhili_gateway::PassiveHealth) -> Result<(), DiscoverError> {
        let (service, ns) = (zhili_client::encode(&p.service), zhili_client::encode(&p.namespace));
        let (path, body) = match &p.observed {
            Observed::Ejected { instance, for_ } => (
                format!("/api/v1/services/{service}/instances/{}/passive?ns={ns}", zhili_client::encode(instance)),
                serde_json::json!({"ejected_for": format!("{}s", for_.as_secs().max(1)), "reason": "ejected by a gateway after consecutive failures"}),
            ),
            Observed::Breaker(t) => (format!("/api/v1/services/{service}/breaker?ns={ns}"), serde_json::json!({"state": t.state(), "reason": BREAKER_REASON})),
        };
        self.client.raw(http::Method::PUT, &path, Some(body.to_string().into()), Duration::from_secs(10)).await.map_err(|e| discover_error(&path, e))?;
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// The server to follow routes and endpoints from.
    #[arg(long, env = "ZHILI_SERVER", default_value = "http://127.0.0.1:8500")]
    server: String,
    /// ACL token: read on routes, consumers and services; write on services to report passive
    /// health (ejections, breaker transitions).
    #[arg(long, env = "ZHILI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the gateway listens.
    #[arg(long, env = "ZHILI_GATEWAY_ADDR", default_value = zhili_config::DEFAULT_GATEWAY_ADDR)]
    addr: SocketAddr,
    /// Worker threads, each with its own listening socket (SO_REUSEPORT: the kernel spreads
    /// connections across them) and a single-threaded runtime [default: one per core]
    #[arg(long, env = "ZHILI_GATEWAY_WORKERS", alias = "threads", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// Gateway access log: true or false.
    #[arg(long, env = "ZHILI_GATEWAY_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,
    /// PEM certificate chain: terminate TLS. Repeat (with --tls-key) for several certificates
    /// chosen by SNI.
    #[arg(long, env = "ZHILI_TLS_CERT", requires = "tls_key", value_delimiter = ',')]
    tls_cert: Vec<std::path::PathBuf>,
    /// PEM private keys, in the order of --tls-cert.
    #[arg(long, env = "ZHILI_TLS_KEY", requires = "tls_cert", value_delimiter = ',')]
    tls_key: Vec<std::path::PathBuf>,
    /// PEM CA certificates: ask clients for certificates and verify them (routes with auth.mtls
    /// require one).
    #[arg(long, env = "ZHILI_GATEWAY_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<std::path::PathBuf>,
    /// Log filter in RUST_LOG syntax.
    #[arg(long, env = "ZHILI_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "ZHILI_GATEWAY_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// `/metrics` of a standalone gateway.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<zhili_telemetry::Metrics>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { ([(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode()) }
        }),
    );
    let _ = axum::serve(listener, app).await;
}

/// `zhili gateway`: a data-plane node on its own runtime.
pub fn run_standalone(args: GatewayArgs) -> ExitCode {
    if let Err(e) = zhili_telemetry::validate_filter(&args.log_level) {
        eprintln!("zhili: invalid value for log_level: {e}");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    zhili_telemetry::init_logging(zhili_telemetry::LogFormat::Json, &args.log_level);
    // Each client connection is a descriptor: take the hard limit (zhili-net caps connections).
    match zhili_net::raise_open_file_limit() {
        Ok((before, soft, hard)) => tracing::info!(soft_before = before, soft, hard, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
    // The main thread follows the server (and serves /metrics); the workers serve clients.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zhili: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let client = match zhili_client::Client::new(&args.server, args.token.clone()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("zhili: --server: {e}");
                return ExitCode::from(crate::EXIT_USAGE);
            }
        };
        if args.tls_cert.len() != args.tls_key.len() {
            eprintln!("zhili: invalid value for tls_key: give one key per --tls-cert, in the same order");
            return ExitCode::from(crate::EXIT_USAGE);
        }
        let pairs: Vec<_> = args.tls_cert.iter().cloned().zip(args.tls_key.iter().cloned()).collect();
        let tls = if pairs.is_empty() {
            None
        } else {
            match zhili_gateway::tls::acceptor(&pairs, args.client_ca.as_deref()) {
                Ok(a) => Some(a),
                Err(e) => {
                    eprintln!("zhili: {e}");
                    return ExitCode::FAILURE;
                }
            }
        };
        let gw = zhili_gateway::Gateway::new(zhili_gateway::Options { access_log: args.access_log, ..Default::default() });
        tokio::spawn(zhili_gateway::follow(gw.clone(), Arc::new(Remote { client })));
        if let Some(addr) = args.metrics_addr {
            let metrics = zhili_telemetry::Metrics::new();
            metrics.register_collector(Box::new(zhili_gateway::GatewayCollector(gw.clone())));
            match zhili_net::bind(addr).await {
                Ok(l) => {
                    // Printed before the listening line, which tools wait for last.
                    if let Ok(a) = l.local_addr() {
                        println!("zhili gateway metrics on http://{a}/metrics");
                    }
                    tokio::spawn(serve_metrics(l, metrics));
                }
                Err(e) => {
                    eprintln!("zhili: binding the metrics listener on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let workers = args.workers.map_or_else(zhili_gateway::default_workers, usize::from);
        let listeners = match zhili_gateway::bind_workers(args.addr, workers) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("zhili: binding the gateway on {}: {e}", args.addr);
                return ExitCode::FAILURE;
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        match listeners.first().map(std::net::TcpListener::local_addr).unwrap_or_else(|| Err(std::io::ErrorKind::AddrNotAvailable.into())) {
            Ok(a) => println!("zhili gateway listening on {scheme}://{a}"),
            Err(e) => {
                eprintln!("zhili: {e}");
                return ExitCode::FAILURE;
            }
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let serving =
            tokio::spawn(zhili_gateway::serve_workers(listeners, gw, tls, zhili_net::Admission::new("gateway", zhili_net::Limits::default()), stopped));
        crate::server::shutdown_signal().await;
        // Requests in flight get a few seconds to finish.
        let _ = stop.send(true);
        let _ = tokio::time::timeout(zhili_config::DEFAULT_SHUTDOWN_TIMEOUT, serving).await;
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhili_client::ClientError;

    #[test]
    fn server_answers_map_to_what_an_operator_should_do() {
        let api = |code: u16| ClientError::Api { status: http::StatusCode::from_u16(code).unwrap(), detail: "x".into() };
        assert!(matches!(discover_error("/p", api(403)), DiscoverError::Refused(_)));
        assert!(matches!(discover_error("/p", api(401)), DiscoverError::Refused(_)));
        assert!(matches!(discover_error("/p", api(400)), DiscoverError::Invalid(_)));
        assert!(matches!(discover_error("/p", api(503)), DiscoverError::Unavailable(_)));
        assert!(matches!(discover_error("/p", ClientError::Transport("refused".into())), DiscoverError::Unavailable(_)));
        assert!(discover_error("/p", api(403)).needs_operator());
        assert!(!discover_error("/p", api(502)).needs_operator());
    }
}

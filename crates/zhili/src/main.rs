//! `zhili`: the governance plane in one binary. `zhili server` runs everything; the other
//! subcommands are a CLI over the HTTP API.

mod cli;
mod feedback;
mod gateway;
mod plans;
mod server;
mod txn;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit code for a bad configuration value (sysexits' EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "zhili", version, about = "Zhili (治理): service registry, health, KV and access control in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (registry, health checks, KV, ACLs) on the embedded store.
    Server(Box<ServerArgs>),
    /// Run a gateway node alone, following routes and endpoints from a server.
    Gateway(gateway::GatewayArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

/// Every flag is also read from `ZHILI_<NAME>` and from the `--config` TOML file (flags win,
/// then env, then the file).
#[derive(Args, Debug, Default)]
pub struct ServerArgs {
    /// TOML config file; unknown keys are rejected.
    #[arg(long, env = "ZHILI_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory of the embedded store [default: ./zhili-data]
    #[arg(long, env = "ZHILI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Development mode: ACLs off (every caller is a manager). Never in production.
    #[arg(long, env = "ZHILI_DEV")]
    pub dev: bool,
    /// API listener address, or "off" [default: 127.0.0.1:8500]
    #[arg(long, env = "ZHILI_API_ADDR")]
    pub api_addr: Option<String>,
    /// DNS listener (UDP and TCP, same port), or "off" [default: 127.0.0.1:8600]
    #[arg(long, env = "ZHILI_DNS_ADDR")]
    pub dns_addr: Option<String>,
    /// Nacos open API listener, or "off" [default: 127.0.0.1:8848]
    #[arg(long, env = "ZHILI_NACOS_ADDR")]
    pub nacos_addr: Option<String>,
    /// Nacos gRPC listener, or "off" [default: the Nacos port + 1000, as Nacos clients assume]
    #[arg(long, env = "ZHILI_NACOS_GRPC_ADDR")]
    pub nacos_grpc_addr: Option<String>,
    /// DTM-compatible transaction coordinator (DTM's HTTP API), or "off" [default: 127.0.0.1:36789]
    #[arg(long, env = "ZHILI_DTM_ADDR")]
    pub dtm_addr: Option<String>,
    /// URL the coordinator POSTs an alert to when a transaction's retries pass 3 in a row
    #[arg(long, env = "ZHILI_TXN_ALERT_WEBHOOK")]
    pub txn_alert_webhook: Option<String>,
    /// How long finished transactions are kept: "0" (forever) or e.g. "12h", "7d" [default: 7d]
    #[arg(long, env = "ZHILI_TXN_RETENTION")]
    pub txn_retention: Option<String>,
    /// Gateway listener (the data plane), or "off" [default: 127.0.0.1:8080]
    #[arg(long, env = "ZHILI_GATEWAY_ADDR")]
    pub gateway_addr: Option<String>,
    /// Gateway access log: true or false [default: true]
    #[arg(long, env = "ZHILI_GATEWAY_ACCESS_LOG")]
    pub gateway_access_log: Option<bool>,
    /// Gateway worker threads, each with its own listening socket (SO_REUSEPORT); 0 runs the
    /// gateway on the server's own runtime [default: 0]
    #[arg(long, env = "ZHILI_GATEWAY_WORKERS")]
    pub gateway_workers: Option<usize>,
    /// PEM certificate chain for the gateway listener; repeat with --gateway-tls-key for several
    /// certificates chosen by SNI [default: the API's --tls-cert]
    #[arg(long, env = "ZHILI_GATEWAY_TLS_CERT", value_delimiter = ',')]
    pub gateway_tls_cert: Vec<PathBuf>,
    /// PEM private keys, in the order of --gateway-tls-cert.
    #[arg(long, env = "ZHILI_GATEWAY_TLS_KEY", value_delimiter = ',')]
    pub gateway_tls_key: Vec<PathBuf>,
    /// PEM CA certificates: ask gateway clients for certificates and verify them (routes with
    /// auth.mtls require one).
    #[arg(long, env = "ZHILI_GATEWAY_CLIENT_CA")]
    pub gateway_client_ca: Option<PathBuf>,
    /// This server's node name in the Consul catalog and DNS [default: zhili]
    #[arg(long, env = "ZHILI_NODE_NAME")]
    pub node_name: Option<String>,
    /// Datacenter name reported to Consul clients and served in DNS [default: dc1]
    #[arg(long, env = "ZHILI_DATACENTER")]
    pub datacenter: Option<String>,
    /// PEM certificate chain: serve the API over TLS (needs --tls-key).
    #[arg(long, env = "ZHILI_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "ZHILI_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Log format: pretty or json [default: pretty]
    #[arg(long, env = "ZHILI_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter in RUST_LOG syntax [default: info]
    #[arg(long, env = "ZHILI_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Active health checks allowed to run at once [default: 256]
    #[arg(long, env = "ZHILI_CHECK_CONCURRENCY")]
    pub check_concurrency: Option<String>,
    /// Connections served at once on each TCP listener; more get a 503 [default: 4096]
    #[arg(long, env = "ZHILI_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
    /// Close connections with no request in flight after this long [default: 30s]
    #[arg(long, env = "ZHILI_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Deadline for a request head from its first byte, and the longest pause in a request
    /// body [default: 10s]
    #[arg(long, env = "ZHILI_READ_TIMEOUT")]
    pub read_timeout: Option<String>,
    /// Close a connection whose client has not read an answer for this long [default: 30s]
    #[arg(long, env = "ZHILI_WRITE_TIMEOUT")]
    pub write_timeout: Option<String>,
    /// ACL token whose rights DNS answers with; without one DNS has anonymous rights
    #[arg(long, env = "ZHILI_DNS_TOKEN", hide_env_values = true)]
    pub dns_token: Option<String>,
    /// On SIGTERM: stop accepting, let requests and streams in flight finish for this long, then
    /// exit [default: 10s]
    #[arg(long, env = "ZHILI_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Append changes of the KV keys under this prefix to the `$kv` stream (repeat or
    /// comma-separate; "" for every key)
    #[arg(long, env = "ZHILI_PUBLISH_KV", value_delimiter = ',')]
    pub publish_kv: Option<Vec<String>>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ => EXIT_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let cli = match cli.command {
        Command::Gateway(args) => return gateway::run_standalone(args),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zhili: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli {
        Command::Server(args) => runtime.block_on(server::run(*args)),
        Command::Client(cmd) => runtime.block_on(cli::run(cmd)),
        Command::Gateway(_) => unreachable!("handled above"),
    }
}

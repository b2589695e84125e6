//! Server configuration: parsed from a TOML file, overlaid by `ZHILI_*` env and flags (the binary
//! does the overlay), then validated before anything starts. Unknown keys are rejected and no bad
//! value is silently replaced by a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_DATA_DIR: &str = "./zhili-data";
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8500";
pub const DEFAULT_DNS_ADDR: &str = "127.0.0.1:8600";
pub const DEFAULT_NACOS_ADDR: &str = "127.0.0.1:8848";
/// DTM's default port, so DTM clients find the coordinator where they expect it.
pub const DEFAULT_DTM_ADDR: &str = "127.0.0.1:36789";
/// Gateway worker threads accepted at most.
pub const MAX_GATEWAY_WORKERS: usize = 256;
pub const DEFAULT_GATEWAY_ADDR: &str = "127.0.0.1:8080";
/// Nacos clients find gRPC at the HTTP port plus this offset.
pub const NACOS_GRPC_OFFSET: u16 = 1000;
/// The name this server gives itself as a Consul node (catalog, DNS `<node>.node.consul`).
pub const DEFAULT_NODE_NAME: &str = "zhili";
pub const DEFAULT_DATACENTER: &str = "dc1";
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Active checks running at once; more wait their turn rather than opening unbounded sockets.
pub const DEFAULT_CHECK_CONCURRENCY: usize = 256;
/// Connections served at once on each TCP listener; more are refused with a 503.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// A connection with no request in flight is closed after this long.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request head must arrive within this long of its first byte; a body may pause this long.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer the client does not read for this long closes the connection.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// On SIGTERM, requests and streams in flight get this long to finish.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

/// The config file's shape; every key optional, unknown keys an error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub dev: Option<bool>,
    pub api_addr: Option<String>,
    pub dns_addr: Option<String>,
    pub nacos_addr: Option<String>,
    pub nacos_grpc_addr: Option<String>,
    pub gateway_addr: Option<String>,
    /// DTM's HTTP API (the transaction coordinator), or "off".
    pub dtm_addr: Option<String>,
    /// Where the coordinator POSTs an alert when a transaction keeps failing (DTM's
    /// `AlertWebHook`).
    pub txn_alert_webhook: Option<String>,
    /// How long finished transactions are kept ("7d" by default; "0" keeps them).
    pub txn_retention: Option<String>,
    /// One JSON line per gateway request (default true).
    pub gateway_access_log: Option<bool>,
    /// Gateway worker threads with their own listening sockets (0, the default: the gateway
    /// shares the server's runtime; at most 256).
    pub gateway_workers: Option<usize>,
    /// Certificates of the gateway listener (several: chosen by SNI) and their keys, in order.
    pub gateway_tls_cert: Option<Vec<PathBuf>>,
    pub gateway_tls_key: Option<Vec<PathBuf>>,
    /// CA that gateway client certificates are verified against (mTLS).
    pub gateway_client_ca: Option<PathBuf>,
    pub node_name: Option<String>,
    pub datacenter: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub check_concurrency: Option<usize>,
    /// Connections served at once on each TCP listener (default 4096).
    pub max_connections: Option<usize>,
    /// Close connections with no request in flight after this long (default "30s").
    pub idle_timeout: Option<String>,
    /// Deadline for a request head from its first byte, and the longest pause in a request body
    /// (default "10s").
    pub read_timeout: Option<String>,
    /// Close a connection whose client has not read an answer for this long (default "30s").
    pub write_timeout: Option<String>,
    /// The ACL token whose rights DNS answers with (as Consul's agent DNS token); without one,
    /// DNS has the anonymous rights (nothing, while ACLs are on).
    pub dns_token: Option<String>,
    /// On SIGTERM: how long requests and streams in flight get to finish (default "10s").
    pub shutdown_timeout: Option<String>,
    /// KV prefixes whose changes are appended to the `$kv` stream ("" for every key).
    pub publish_kv: Option<Vec<String>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Fields set in `over` win.
    pub fn overlay(self, over: FileConfig) -> FileConfig {
        FileConfig {
            data_dir: over.data_dir.or(self.data_dir),
            dev: over.dev.or(self.dev),
            api_addr: over.api_addr.or(self.api_addr),
            dns_addr: over.dns_addr.or(self.dns_addr),
            nacos_addr: over.nacos_addr.or(self.nacos_addr),
            nacos_grpc_addr: over.nacos_grpc_addr.or(self.nacos_grpc_addr),
            gateway_addr: over.gateway_addr.or(self.gateway_addr),
            dtm_addr: over.dtm_addr.or(self.dtm_addr),
            txn_alert_webhook: over.txn_alert_webhook.or(self.txn_alert_webhook),
            txn_retention: over.txn_retention.or(self.txn_retention),
            gateway_access_log: over.gateway_access_log.or(self.gateway_access_log),
            gateway_workers: over.gateway_workers.or(self.gateway_workers),
            gateway_tls_cert: over.gateway_tls_cert.or(self.gateway_tls_cert),
            gateway_tls_key: over.gateway_tls_key.or(self.gateway_tls_key),
            gateway_client_ca: over.gateway_client_ca.or(self.gateway_client_ca),
            node_name: over.node_name.or(self.node_name),
            datacenter: over.datacenter.or(self.datacenter),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            log_format: over.log_format.or(self.log_format),
            log_level: over.log_level.or(self.log_level),
            check_concurrency: over.check_concurrency.or(self.check_concurrency),
            max_connections: over.max_connections.or(self.max_connections),
            idle_timeout: over.idle_timeout.or(self.idle_timeout),
            read_timeout: over.read_timeout.or(self.read_timeout),
            write_timeout: over.write_timeout.or(self.write_timeout),
            dns_token: over.dns_token.or(self.dns_token),
            shutdown_timeout: over.shutdown_timeout.or(self.shutdown_timeout),
            publish_kv: over.publish_kv.or(self.publish_kv),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// A listener address, or `None` when switched off with the value `off`.
pub type Listen = Option<SocketAddr>;

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated configuration the server is built from.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub dev: bool,
    pub api_addr: Listen,
    pub dns_addr: Listen,
    pub nacos_addr: Listen,
    pub nacos_grpc_addr: Listen,
    pub gateway_addr: Listen,
    pub dtm_addr: Listen,
    pub txn_alert_webhook: Option<String>,
    /// Zero keeps finished transactions forever.
    pub txn_retention: Duration,
    pub gateway_access_log: bool,
    /// 0: the gateway runs on the server's runtime.
    pub gateway_workers: usize,
    /// Empty: the gateway uses `tls` (if any).
    pub gateway_tls: Vec<TlsFiles>,
    pub gateway_client_ca: Option<PathBuf>,
    pub node_name: String,
    pub datacenter: String,
    pub tls: Option<TlsFiles>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub check_concurrency: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub dns_token: Option<String>,
    pub shutdown_timeout: Duration,
    pub publish_kv: Vec<String>,
}

/// A timeout: a whole number with a unit, `ms`, `s` or `m` (e.g. "500ms", "30s", "2m"),
/// between 100 ms and one hour.
pub fn parse_timeout(field: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Invalid { field, message: format!("{value:?} is not a duration such as \"500ms\", \"30s\" or \"2m\"") };
    let split = value.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = value[..split].parse().map_err(|_| bad())?;
    let d = match &value[split..] {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
        return Err(ConfigError::Invalid { field, message: format!("{value:?} is not between 100ms and 60m") });
    }
    Ok(d)
}

/// A retention: "0" (keep forever) or a whole number with a unit, `s`, `m`, `h` or `d`
/// (e.g. "12h", "7d"), at most 365 days.
pub fn parse_retention(field: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Invalid { field, message: format!("{value:?} is not \"0\" or a duration such as \"30m\", \"12h\" or \"7d\" (at most 365d)") };
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    let split = value.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(unit_secs).filter(|s| (1..=365 * 86_400).contains(s)).ok_or_else(bad)?;
    Ok(Duration::from_secs(secs))
}

pub fn parse_listen(field: &'static str, value: &str) -> Result<Listen, ConfigError> {
    if value == "off" {
        return Ok(None);
    }
    value
        .parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| ConfigError::Invalid { field, message: format!("{value:?} is not host:port (e.g. 127.0.0.1:8500) or \"off\"") })
}

impl FileConfig {
    pub fn validate(self) -> Result<ServerConfig, ConfigError> {
        let api_addr = parse_listen("api_addr", self.api_addr.as_deref().unwrap_or(DEFAULT_API_ADDR))?;
        let dns_addr = parse_listen("dns_addr", self.dns_addr.as_deref().unwrap_or(DEFAULT_DNS_ADDR))?;
        let nacos_addr = parse_listen("nacos_addr", self.nacos_addr.as_deref().unwrap_or(DEFAULT_NACOS_ADDR))?;
        let dtm_addr = parse_listen("dtm_addr", self.dtm_addr.as_deref().unwrap_or(DEFAULT_DTM_ADDR))?;
        if let Some(url) = &self.txn_alert_webhook {
            let ok = (url.starts_with("http://") || url.starts_with("https://")) && url.len() <= 2048 && !url.bytes().any(|b| b <= b' ');
            if !ok {
                return Err(ConfigError::Invalid { field: "txn_alert_webhook", message: format!("{url:?} is not an http:// or https:// URL") });
            }
        }
        let nacos_grpc_addr = match self.nacos_grpc_addr.as_deref() {
            Some(v) => parse_listen("nacos_grpc_addr", v)?,
            None => match nacos_addr {
                Some(a) if a.port() == 0 => Some(a),
                Some(mut a) => {
                    let port = a.port().checked_add(NACOS_GRPC_OFFSET).ok_or_else(|| ConfigError::Invalid {
                        field: "nacos_grpc_addr",
                        message: format!("nacos_addr port {} + {NACOS_GRPC_OFFSET} is past 65535; set nacos_grpc_addr", a.port()),
                    })?;
                    a.set_port(port);
                    Some(a)
                }
                None => None,
            },
        };
        let gateway_addr = parse_listen("gateway_addr", self.gateway_addr.as_deref().unwrap_or(DEFAULT_GATEWAY_ADDR))?;
        let gateway_workers = self.gateway_workers.unwrap_or(0);
        if gateway_workers > MAX_GATEWAY_WORKERS {
            return Err(ConfigError::Invalid { field: "gateway_workers", message: format!("at most {MAX_GATEWAY_WORKERS}") });
        }
        let node_name = self.node_name.unwrap_or_else(|| DEFAULT_NODE_NAME.into());
        let datacenter = self.datacenter.unwrap_or_else(|| DEFAULT_DATACENTER.into());
        for (field, v) in [("node_name", &node_name), ("datacenter", &datacenter)] {
            let label = !v.is_empty() && v.len() <= 63 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !v.starts_with('-');
            if !label {
                return Err(ConfigError::Invalid { field, message: format!("{v:?} is not a DNS label (letters, digits, '-', at most 63)") });
            }
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::Invalid { field: "tls_key", message: "required when tls_cert is set".into() }),
            (None, Some(_)) => return Err(ConfigError::Invalid { field: "tls_cert", message: "required when tls_key is set".into() }),
        };
        let certs = self.gateway_tls_cert.unwrap_or_default();
        let keys = self.gateway_tls_key.unwrap_or_default();
        if certs.len() != keys.len() {
            return Err(ConfigError::Invalid {
                field: "gateway_tls_key",
                message: format!("{} certificates but {} keys; give one key per certificate, in the same order", certs.len(), keys.len()),
            });
        }
        let gateway_tls: Vec<TlsFiles> = certs.into_iter().zip(keys).map(|(cert, key)| TlsFiles { cert, key }).collect();
        if self.gateway_client_ca.is_some() && gateway_tls.is_empty() && tls.is_none() {
            return Err(ConfigError::Invalid { field: "gateway_client_ca", message: "needs TLS on the gateway (gateway_tls_cert or tls_cert)".into() });
        }
        let log_format = match self.log_format.as_deref().unwrap_or("pretty") {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => return Err(ConfigError::Invalid { field: "log_format", message: format!("{other:?} is not pretty or json") }),
        };
        let check_concurrency = self.check_concurrency.unwrap_or(DEFAULT_CHECK_CONCURRENCY);
        if !(1..=65_536).contains(&check_concurrency) {
            return Err(ConfigError::Invalid { field: "check_concurrency", message: format!("{check_concurrency} is not in 1..=65536") });
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(ConfigError::Invalid { field: "max_connections", message: format!("{max_connections} is not in 1..=1000000") });
        }
        let timeout = |field, v: Option<String>, default| v.map_or(Ok(default), |v| parse_timeout(field, &v));
        let idle_timeout = timeout("idle_timeout", self.idle_timeout, DEFAULT_IDLE_TIMEOUT)?;
        let read_timeout = timeout("read_timeout", self.read_timeout, DEFAULT_READ_TIMEOUT)?;
        let write_timeout = timeout("write_timeout", self.write_timeout, DEFAULT_WRITE_TIMEOUT)?;
        let shutdown_timeout = timeout("shutdown_timeout", self.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT)?;
        if self.dns_token.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::Invalid { field: "dns_token", message: "must not be empty; leave it out for anonymous DNS".into() });
        }
        let publish_kv = self.publish_kv.unwrap_or_default();
        if publish_kv.len() > 64 {
            return Err(ConfigError::Invalid { field: "publish_kv", message: "at most 64 prefixes".into() });
        }
        if let Some(bad) = publish_kv.iter().find(|p| p.len() > 512 || p.starts_with('/') || p.chars().any(char::is_control)) {
            return Err(ConfigError::Invalid { field: "publish_kv", message: format!("{bad:?} is not a KV prefix") });
        }
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid { field: "data_dir", message: "must not be empty".into() });
        }
        Ok(ServerConfig {
            data_dir,
            dev: self.dev.unwrap_or(false),
            api_addr,
            dns_addr,
            nacos_addr,
            nacos_grpc_addr,
            gateway_addr,
            dtm_addr,
            txn_alert_webhook: self.txn_alert_webhook,
            txn_retention: parse_retention("txn_retention", self.txn_retention.as_deref().unwrap_or("7d"))?,
            gateway_access_log: self.gateway_access_log.unwrap_or(true),
            gateway_workers,
            gateway_tls,
            gateway_client_ca: self.gateway_client_ca,
            node_name,
            datacenter,
            tls,
            log_format,
            log_level: self.log_level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.into()),
            check_concurrency,
            max_connections,
            idle_timeout,
            read_timeout,
            write_timeout,
            dns_token: self.dns_token,
            shutdown_timeout,
            publish_kv,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overlay() {
        let cfg = FileConfig::default().validate().unwrap();
        assert_eq!(cfg.api_addr, Some("127.0.0.1:8500".parse().unwrap()));
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let file = FileConfig { api_addr: Some("127.0.0.1:1".into()), dev: Some(true), ..Default::default() };
        let cfg = file.overlay(FileConfig { api_addr: Some("off".into()), ..Default::default() }).validate().unwrap();
        assert_eq!(cfg.api_addr, None);
        assert!(cfg.dev);
    }

    #[test]
    fn retention_takes_days_or_zero() {
        assert_eq!(FileConfig::default().validate().unwrap().txn_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(parse_retention("f", "0").unwrap(), Duration::ZERO);
        assert_eq!(parse_retention("f", "90m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "7", "7 d", "-1d", "366d", "0s", "99999999999999999999d"] {
            assert!(parse_retention("txn_retention", bad).unwrap_err().to_string().contains("txn_retention"), "{bad:?}");
        }
    }

    #[test]
    fn nacos_grpc_follows_the_http_port() {
        let cfg = FileConfig::default().validate().unwrap();
        assert_eq!(cfg.nacos_grpc_addr, Some("127.0.0.1:9848".parse().unwrap()));
        let cfg = FileConfig { nacos_addr: Some("off".into()), ..Default::default() }.validate().unwrap();
        assert_eq!((cfg.nacos_addr, cfg.nacos_grpc_addr), (None, None));
        let cfg = FileConfig { nacos_addr: Some("127.0.0.1:65000".into()), ..Default::default() }.validate();
        assert!(cfg.unwrap_err().to_string().contains("nacos_grpc_addr"));
        let cfg = FileConfig { nacos_grpc_addr: Some("127.0.0.1:7".into()), ..Default::default() }.validate().unwrap();
        assert_eq!(cfg.nacos_grpc_addr, Some("127.0.0.1:7".parse().unwrap()));
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = FileConfig { api_addr: Some("nowhere".into()), ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("api_addr"), "{e}");
        let e = FileConfig { tls_cert: Some("c.pem".into()), ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("tls_key"), "{e}");
        let e = FileConfig { node_name: Some("a.b".into()), ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("node_name"), "{e}");
        let e = FileConfig { log_format: Some("xml".into()), ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("log_format"), "{e}");
        for bad in ["10", "s", "10h", "-1s", "0s", "2h", "1.5s"] {
            let e = FileConfig { idle_timeout: Some(bad.into()), ..Default::default() }.validate().unwrap_err();
            assert!(e.to_string().contains("idle_timeout"), "{bad}: {e}");
        }
        let e = FileConfig { max_connections: Some(0), ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
        let cfg = FileConfig { read_timeout: Some("500ms".into()), write_timeout: Some("2m".into()), ..Default::default() }.validate().unwrap();
        assert_eq!((cfg.read_timeout, cfg.write_timeout, cfg.idle_timeout), (Duration::from_millis(500), Duration::from_secs(120), DEFAULT_IDLE_TIMEOUT));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = toml::from_str::<FileConfig>("api_adr = \"x\"").unwrap_err();
        assert!(e.to_string().contains("api_adr"), "{e}");
    }
}

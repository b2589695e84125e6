//! The registry's domain: namespaces › services › instances › checks, plus the wire shapes of the
//! native API. Inputs (`*Spec`) are validated into typed values before any state changes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::{parse_duration, serde_opt, serde_str};
use crate::validate::{self, ValidationError};

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_CHECKS_PER_INSTANCE: usize = 16;
/// Active checks faster than this would let one registration flood the network.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Heartbeat timing for ephemeral instances (Nacos's defaults: 5 s / 15 s / 30 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthDefaults {
    #[serde(with = "serde_str")]
    #[schemars(with = "crate::duration::DurationText")]
    pub heartbeat_interval: Duration,
    #[serde(with = "serde_str")]
    #[schemars(with = "crate::duration::DurationText")]
    pub unhealthy_after: Duration,
    #[serde(with = "serde_str")]
    #[schemars(with = "crate::duration::DurationText")]
    pub remove_after: Duration,
}

impl Default for HealthDefaults {
    fn default() -> Self {
        Self { heartbeat_interval: Duration::from_secs(5), unhealthy_after: Duration::from_secs(15), remove_after: Duration::from_secs(30) }
    }
}

/// Health of a check or an instance; the order is "better to worse" so `max` gives the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Passing,
    Warning,
    Critical,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    pub fn parse(field: &str, s: &str) -> Result<Self, ValidationError> {
        match s {
            "passing" | "pass" => Ok(Self::Passing),
            "warning" | "warn" => Ok(Self::Warning),
            "critical" | "fail" => Ok(Self::Critical),
            _ => Err(ValidationError::new(field, format!("{s:?} is not one of passing, warning, critical"))),
        }
    }
}

/// Body of `PUT /api/v1/services/{service}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub health: Option<HealthDefaultsSpec>,
    #[serde(default)]
    pub protection_threshold: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthDefaultsSpec {
    pub heartbeat_interval: Option<String>,
    pub unhealthy_after: Option<String>,
    pub remove_after: Option<String>,
}

/// A service definition as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub group: String,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub version: Option<String>,
    pub description: Option<String>,
    pub owner: Option<String>,
    pub health: HealthDefaults,
    pub protection_threshold: f64,
    /// False when the service exists only because instances were registered into it.
    #[serde(default)]
    pub defined: bool,
}

impl Service {
    /// The implicit definition a service gets when an instance registers before anyone defined it.
    pub fn implicit(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            group: DEFAULT_GROUP.into(),
            tags: vec![],
            metadata: BTreeMap::new(),
            version: None,
            description: None,
            owner: None,
            health: HealthDefaults::default(),
            protection_threshold: 0.0,
            defined: false,
        }
    }
}

impl ServiceSpec {
    pub fn validate(self, namespace: &str, name: &str) -> Result<Service, ValidationError> {
        validate::name("namespace", namespace)?;
        validate::name("service", name)?;
        let group = self.group.unwrap_or_else(|| DEFAULT_GROUP.into());
        validate::name("group", &group)?;
        validate::tags("tags", &self.tags)?;
        validate::metadata("metadata", &self.metadata)?;
        for (field, v) in [("version", &self.version), ("description", &self.description), ("owner", &self.owner)] {
            if let Some(v) = v {
                validate::text(field, v)?;
            }
        }
        let mut health = HealthDefaults::default();
        if let Some(h) = self.health {
            if let Some(v) = h.heartbeat_interval {
                health.heartbeat_interval = parse_duration("health.heartbeat_interval", &v)?;
            }
            if let Some(v) = h.unhealthy_after {
                health.unhealthy_after = parse_duration("health.unhealthy_after", &v)?;
            }
            if let Some(v) = h.remove_after {
                health.remove_after = parse_duration("health.remove_after", &v)?;
            }
        }
        if health.heartbeat_interval < Duration::from_millis(100) {
            return Err(ValidationError::new("health.heartbeat_interval", "must be at least 100ms"));
        }
        if health.unhealthy_after < health.heartbeat_interval {
            return Err(ValidationError::new("health.unhealthy_after", "must be at least heartbeat_interval"));
        }
        if health.remove_after < health.unhealthy_after {
            return Err(ValidationError::new("health.remove_after", "must be at least unhealthy_after"));
        }
        let protection_threshold = self.protection_threshold.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&protection_threshold) || protection_threshold.is_nan() {
            return Err(ValidationError::new("protection_threshold", "must be between 0 and 1"));
        }
        Ok(Service {
            namespace: namespace.into(),
            name: name.into(),
            group,
            tags: self.tags,
            metadata: self.metadata,
            version: self.version,
            description: self.description,
            owner: self.owner,
            health,
            protection_threshold,
            defined: true,
        })
    }
}

/// One check as a client writes it; validated into [`CheckDefinition`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub kind: String,
    pub id: Option<String>,
    pub name: Option<String>,
    pub ttl: Option<String>,
    pub url: Option<String>,
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub address: Option<String>,
    /// gRPC health service name to ask about ("" = the whole server).
    pub grpc_service: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub success_before_passing: Option<u32>,
    pub failures_before_critical: Option<u32>,
    pub deregister_critical_after: Option<String>,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CheckKind {
    Ttl {
        #[serde(with = "serde_str")]
        #[schemars(with = "crate::duration::DurationText")]
        ttl: Duration,
    },
    Http {
        url: String,
        method: String,
        headers: BTreeMap<String, String>,
    },
    Tcp {
        address: String,
    },
    Grpc {
        address: String,
        grpc_service: String,
    },
    /// Status set only through the API and kept until changed (Consul catalog checks).
    Manual,
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ttl { .. } => "ttl",
            Self::Http { .. } => "http",
            Self::Tcp { .. } => "tcp",
            Self::Grpc { .. } => "grpc",
            Self::Manual => "manual",
        }
    }

    pub fn is_active(&self) -> bool {
        !matches!(self, Self::Ttl { .. } | Self::Manual)
    }

    /// Whether clients set this check's status through the API (pass/warn/fail).
    pub fn is_api_driven(&self) -> bool {
        matches!(self, Self::Ttl { .. } | Self::Manual)
    }
}

/// A validated check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CheckDefinition {
    pub id: String,
    pub name: String,
    #[serde(flatten)]
    pub kind: CheckKind,
    #[serde(with = "serde_str")]
    #[schemars(with = "crate::duration::DurationText")]
    pub interval: Duration,
    #[serde(with = "serde_str")]
    #[schemars(with = "crate::duration::DurationText")]
    pub timeout: Duration,
    pub success_before_passing: u32,
    pub failures_before_critical: u32,
    #[serde(with = "serde_opt", default)]
    #[schemars(with = "Option<crate::duration::DurationText>")]
    pub deregister_critical_after: Option<Duration>,
}

impl CheckSpec {
    pub fn validate(self, field: &str, index: usize) -> Result<CheckDefinition, ValidationError> {
        let f = |name: &str| format!("{field}.{name}");
        let opt_dur =
            |name: &str, v: &Option<String>| -> Result<Option<Duration>, ValidationError> { v.as_deref().map(|s| parse_duration(&f(name), s)).transpose() };
        let interval = opt_dur("interval", &self.interval)?.unwrap_or(DEFAULT_CHECK_INTERVAL);
        let timeout = opt_dur("timeout", &self.timeout)?.unwrap_or(DEFAULT_CHECK_TIMEOUT.min(interval));
        let kind = match self.kind.as_str() {
            "ttl" => {
                let ttl = opt_dur("ttl", &self.ttl)?.ok_or_else(|| ValidationError::new(f("ttl"), "required for a ttl check"))?;
                if ttl < Duration::from_millis(100) {
                    return Err(ValidationError::new(f("ttl"), "must be at least 100ms"));
                }
                CheckKind::Ttl { ttl }
            }
            "http" => {
                let url = self.url.ok_or_else(|| ValidationError::new(f("url"), "required for an http check"))?;
                if !url.starts_with("http://") || url.len() > 2048 {
                    return Err(ValidationError::new(f("url"), "must be an http:// URL of at most 2048 bytes (https checks are not supported yet)"));
                }
                let method = self.method.unwrap_or_else(|| "GET".into()).to_ascii_uppercase();
                if !matches!(method.as_str(), "GET" | "HEAD" | "POST" | "PUT" | "OPTIONS") {
                    return Err(ValidationError::new(f("method"), "must be GET, HEAD, POST, PUT or OPTIONS"));
                }
                if self.headers.len() > 32 {
                    return Err(ValidationError::new(f("headers"), "at most 32 headers"));
                }
                for (k, v) in &self.headers {
                    if k.is_empty()
                        || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        || v.len() > 1024
                        || v.chars().any(char::is_control)
                    {
                        return Err(ValidationError::new(f(&format!("headers.{k}")), "invalid header name or value"));
                    }
                }
                CheckKind::Http { url, method, headers: self.headers }
            }
            "tcp" | "grpc" => {
                let address = self.address.ok_or_else(|| ValidationError::new(f("address"), format!("required for a {} check (host:port)", self.kind)))?;
                let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
                    validate::address("", host.trim_start_matches('[').trim_end_matches(']')).is_ok() && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !valid {
                    return Err(ValidationError::new(f("address"), format!("{address:?} is not host:port")));
                }
                if self.kind == "tcp" {
                    CheckKind::Tcp { address }
                } else {
                    let grpc_service = self.grpc_service.unwrap_or_default();
                    validate::text(&f("grpc_service"), &grpc_service)?;
                    CheckKind::Grpc { address, grpc_service }
                }
            }
            "manual" => CheckKind::Manual,
            other => return Err(ValidationError::new(f("kind"), format!("{other:?} is not one of ttl, http, tcp, grpc, manual"))),
        };
        if kind.is_active() {
            if interval < MIN_CHECK_INTERVAL {
                return Err(ValidationError::new(f("interval"), "must be at least 100ms"));
            }
            if timeout.is_zero() || timeout > interval.max(Duration::from_secs(60)) {
                return Err(ValidationError::new(f("timeout"), "must be positive and at most max(interval, 60s)"));
            }
        }
        let id = self.id.unwrap_or_else(|| format!("{}-{index}", kind.name()));
        validate::instance_id(&f("id"), &id)?;
        let name = self.name.unwrap_or_else(|| id.clone());
        validate::text(&f("name"), &name)?;
        let deregister_critical_after = opt_dur("deregister_critical_after", &self.deregister_critical_after)?;
        let success_before_passing = self.success_before_passing.unwrap_or(1).max(1);
        let failures_before_critical = self.failures_before_critical.unwrap_or(1).max(1);
        if success_before_passing > 100 || failures_before_critical > 100 {
            return Err(ValidationError::new(f("success_before_passing"), "thresholds must be at most 100"));
        }
        Ok(CheckDefinition { id, name, kind, interval, timeout, success_before_passing, failures_before_critical, deregister_critical_after })
    }
}

/// Body of `POST /api/v1/services/{service}/instances`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub id: Option<String>,
    pub address: String,
    pub port: u32,
    pub weight: Option<u32>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub zone: Option<String>,
    pub version: Option<String>,
    pub ephemeral: Option<bool>,
    pub enabled: Option<bool>,
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
}

/// A validated registration, ready to apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InstanceRegistration {
    pub id: String,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    pub tags: Vec<String>,
    pub metadata: crate::Metadata,
    pub zone: Option<String>,
    pub version: Option<String>,
    pub ephemeral: bool,
    pub enabled: bool,
    pub checks: Vec<CheckDefinition>,
    /// The node (host) the instance runs on, when a compatibility API named one (Consul's
    /// catalog); `None` means the server's own node. Boxed: rare, and every record is smaller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Box<NodeRef>>,
}

/// A Consul-style node: a named host with an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeRef {
    pub name: String,
    pub address: String,
}

impl InstanceSpec {
    pub fn validate(self) -> Result<InstanceRegistration, ValidationError> {
        validate::address("address", &self.address)?;
        let port = validate::port("port", self.port)?;
        let id = self.id.unwrap_or_else(|| format!("{}:{}", self.address, port));
        validate::instance_id("id", &id)?;
        let weight = self.weight.unwrap_or(DEFAULT_WEIGHT);
        if weight > MAX_WEIGHT {
            return Err(ValidationError::new("weight", format!("must be 0..={MAX_WEIGHT}, got {weight}")));
        }
        validate::tags("tags", &self.tags)?;
        validate::metadata("metadata", &self.metadata)?;
        if let Some(z) = &self.zone {
            validate::name("zone", z)?;
        }
        if let Some(v) = &self.version {
            validate::text("version", v)?;
        }
        if self.checks.len() > MAX_CHECKS_PER_INSTANCE {
            return Err(ValidationError::new("checks", format!("at most {MAX_CHECKS_PER_INSTANCE} checks per instance")));
        }
        let mut checks = Vec::with_capacity(self.checks.len());
        for (i, c) in self.checks.into_iter().enumerate() {
            let def = c.validate(&format!("checks[{i}]"), i)?;
            if checks.iter().any(|d: &CheckDefinition| d.id == def.id) {
                return Err(ValidationError::new(format!("checks[{i}].id"), format!("duplicate check id {:?}", def.id)));
            }
            checks.push(def);
        }
        Ok(InstanceRegistration {
            id,
            address: self.address,
            port,
            weight,
            tags: self.tags,
            metadata: self.metadata.into(),
            zone: self.zone,
            version: self.version,
            ephemeral: self.ephemeral.unwrap_or(true),
            enabled: self.enabled.unwrap_or(true),
            checks,
            node: None,
        })
    }
}

/// The state of one check, as served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CheckState {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub status: HealthStatus,
    pub output: String,
    /// Unix milliseconds of the last status change.
    pub last_change_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Maintenance {
    pub reason: String,
    pub since_ms: u64,
}

/// An instance as served by discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Instance {
    pub id: String,
    pub namespace: String,
    pub service: String,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    pub tags: Vec<String>,
    pub metadata: crate::Metadata,
    pub zone: Option<String>,
    pub version: Option<String>,
    pub enabled: bool,
    pub ephemeral: bool,
    pub maintenance: Option<Maintenance>,
    /// The worst of the instance's checks (and its heartbeat, if ephemeral).
    pub health: HealthStatus,
    pub checks: Vec<CheckState>,
    pub create_index: u64,
    pub modify_index: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeRef>,
    /// What a gateway last observed (outlier ejection). Informational: discovery does not act on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_health: Option<PassiveHealth>,
    /// What the instance last reported about itself (state, tasks, planned work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<crate::report::InstanceReport>,
}

/// A gateway's report on an instance it ejected after consecutive failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PassiveHealth {
    /// Unix milliseconds until which the reporting gateway sends it nothing.
    pub ejected_until_ms: u64,
    pub reason: String,
    /// Unix milliseconds of the report.
    pub reported_ms: u64,
}

impl Instance {
    /// Whether discovery should hand this instance to callers that asked for healthy ones.
    pub fn is_serving(&self) -> bool {
        self.enabled && self.maintenance.is_none() && self.health == HealthStatus::Passing
    }
}

/// Identifies one check of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CheckKey {
    pub namespace: String,
    pub service: String,
    pub instance: String,
    pub check: String,
}

/// A check changed status: the health engine emits these and the registry applies them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HealthTransition {
    pub key: CheckKey,
    pub status: HealthStatus,
    pub output: String,
}

/// One change of registry state, as streamed to watchers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RegistryEvent {
    pub index: u64,
    pub kind: RegistryEventKind,
    pub namespace: String,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<Instance>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegistryEventKind {
    ServiceUpserted,
    ServiceDeleted,
    InstanceRegistered,
    InstanceUpdated,
    InstanceDeregistered,
}

/// A row of `GET /api/v1/services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ServiceSummary {
    pub namespace: String,
    pub name: String,
    pub group: String,
    pub tags: Vec<String>,
    pub instances: usize,
    pub passing: usize,
}

/// `GET /api/v1/services/{service}/instances`: the instances plus what discovery decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InstanceList {
    pub namespace: String,
    pub service: String,
    pub index: u64,
    /// True when fewer than `protection_threshold` of the instances were healthy, so all were returned.
    pub protection_triggered: bool,
    pub instances: Vec<Instance>,
}

/// `GET /api/v1/services/{service}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ServiceDetail {
    pub service: Service,
    pub index: u64,
    pub instances: Vec<Instance>,
    /// The last circuit-breaker transition a gateway reported for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerReport>,
}

/// A gateway's report of its circuit breaker on a service: `open`, `half_open` or `closed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BreakerReport {
    pub state: String,
    pub reason: String,
    /// Unix milliseconds of the report.
    pub reported_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<InstanceRegistration, ValidationError> {
        serde_json::from_str::<InstanceSpec>(json).unwrap().validate()
    }

    #[test]
    fn instance_defaults() {
        let r = spec(r#"{"address":"10.0.0.1","port":8080}"#).unwrap();
        assert_eq!(r.id, "10.0.0.1:8080");
        assert_eq!(r.weight, 100);
        assert!(r.ephemeral && r.enabled);
    }

    #[test]
    fn instance_errors_name_the_field() {
        assert_eq!(spec(r#"{"address":"10.0.0.1","port":0}"#).unwrap_err().field, "port");
        assert_eq!(spec(r#"{"address":"10.0.0.1","port":70000}"#).unwrap_err().field, "port");
        assert_eq!(spec(r#"{"address":"10.0.0.1","port":1,"weight":10001}"#).unwrap_err().field, "weight");
        assert_eq!(spec(r#"{"address":"10.0.0.1","port":1,"checks":[{"kind":"http","interval":"1s"}]}"#).unwrap_err().field, "checks[0].url");
        assert_eq!(
            spec(r#"{"address":"10.0.0.1","port":1,"checks":[{"kind":"http","url":"http://x/","interval":"5x"}]}"#).unwrap_err().field,
            "checks[0].interval"
        );
        assert_eq!(
            spec(r#"{"address":"10.0.0.1","port":1,"checks":[{"kind":"tcp","address":"nope","interval":"1s"}]}"#).unwrap_err().field,
            "checks[0].address"
        );
        assert_eq!(spec(r#"{"address":"10.0.0.1","port":1,"checks":[{"kind":"smoke"}]}"#).unwrap_err().field, "checks[0].kind");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<InstanceSpec>(r#"{"address":"a","port":1,"wieght":3}"#).is_err());
    }

    #[test]
    fn service_validation() {
        let s = ServiceSpec { protection_threshold: Some(1.5), ..Default::default() };
        assert_eq!(s.validate("default", "web").unwrap_err().field, "protection_threshold");
        let s = ServiceSpec {
            health: Some(HealthDefaultsSpec { heartbeat_interval: Some("10s".into()), unhealthy_after: Some("5s".into()), remove_after: None }),
            ..Default::default()
        };
        assert_eq!(s.validate("default", "web").unwrap_err().field, "health.unhealthy_after");
    }

    #[test]
    fn worst_status_wins() {
        assert_eq!([HealthStatus::Passing, HealthStatus::Critical, HealthStatus::Warning].into_iter().max(), Some(HealthStatus::Critical));
    }
}

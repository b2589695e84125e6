//! Gateway routes: what a request must look like (host, path, method, headers, query) and what
//! the gateway does with it (forward to a service, a subset or a weighted split; redirect; answer
//! directly), with the transforms and policies of the forwarding. Stored as JSON under `routes/`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;
use crate::validate::{self, ValidationError};

pub const MAX_HOSTS: usize = 64;
pub const MAX_MATCHERS: usize = 32;
pub const MAX_SPLIT: usize = 16;
pub const MAX_HEADER_OPS: usize = 32;
pub const MAX_DIRECT_BODY: usize = 64 * 1024;
pub const MAX_RETRIES: u32 = 10;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Exact host names or `*.suffix` wildcards; empty matches any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
    /// Higher first; among equal priorities the more specific match wins.
    #[serde(default)]
    pub priority: i32,

    // Actions: exactly one of service, split, redirect, direct_response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<Subset>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,

    // Transforms.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replaces the matched `path_prefix` with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_prefix: Option<String>,
    /// Forward the path exactly as the client sent it, and accept encoded slashes and encoded
    /// dot-segments in it (for upstreams that need them). Matching still uses the normalized
    /// path. Off by default: paths are normalized and such requests are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw_path: bool,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,

    // Policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSpec>,
}

pub const MAX_JWT_KEYS: usize = 16;
pub const MAX_ALLOWED: usize = 256;
/// HS256 secrets shorter than the hash (RFC 7518 §3.2) are refused.
pub const MIN_HMAC_SECRET: usize = 32;

/// Who may call a route. A request passes when any configured method accepts it (a valid JWT, a
/// consumer's API key, a verified client certificate); then `consumers` and `scopes` decide.
/// Failures answer 401 (no or bad credentials) or 403 (known caller, not allowed) and never reach
/// the upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeySpec>,
    /// Accept a client certificate verified against the gateway's client CA; the consumer is the
    /// certificate's subject common name.
    #[serde(default)]
    pub mtls: bool,
    /// Only these consumers (empty: any authenticated caller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,
    /// The caller must hold every one of these scopes (JWT `scope`/`scp`, or the consumer's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Remove the credential (Authorization or the API key header) before forwarding.
    #[serde(default)]
    pub hide_credentials: bool,
}

/// JWT bearer tokens, checked against static keys and/or a JWKS URL (fetched, cached, refreshed
/// every `jwks_refresh` and whenever a token names an unknown `kid`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<JwtKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The token's `aud` must name one of these (empty: not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leeway: Option<String>,
    /// Claim → request header forwarded upstream (string, number and boolean claims).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims_to_headers: BTreeMap<String, String>,
    /// The claim naming the consumer (default `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_claim: Option<String>,
    /// Also take the token from this query parameter or cookie (the header is always read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum JwtAlg {
    HS256,
    RS256,
    ES256,
}

/// A static verification key: an HS256 secret, or an RS256/ES256 public key in PEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    pub alg: JwtAlg,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// API keys of consumers stored in Zhili, read from a header (default `x-api-key`) or a query
/// parameter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// Cross-origin requests: preflights are answered by the gateway; other answers get the
/// `Access-Control-*` headers when the origin is allowed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    /// Exact origins (`https://app.example.com`) or `*`.
    pub allow_origins: Vec<String>,
    /// Default GET, HEAD, POST, PUT, PATCH, DELETE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Default: whatever the preflight asks for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Seconds a preflight may be cached (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    #[serde(default)]
    pub allow_credentials: bool,
}

fn method_name(field: &str, m: &str) -> Result<(), ValidationError> {
    if m.is_empty() || m.len() > 16 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ValidationError::new(field, format!("{m:?} is not an upper-case method name")));
    }
    Ok(())
}

impl AuthSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.jwt.is_none() && self.api_key.is_none() && !self.mtls {
            return Err(ValidationError::new("auth", "give at least one of jwt, api_key, mtls"));
        }
        if let Some(j) = &self.jwt {
            j.validate()?;
        }
        if let Some(k) = &self.api_key {
            if let Some(h) = &k.header {
                header_name("auth.api_key.header", h)?;
            }
            if let Some(q) = &k.query {
                if q.is_empty() || q.len() > 256 {
                    return Err(ValidationError::new("auth.api_key.query", "must be 1..=256 bytes"));
                }
            }
        }
        if self.consumers.len() > MAX_ALLOWED || self.scopes.len() > MAX_ALLOWED {
            return Err(ValidationError::new("auth.consumers", format!("at most {MAX_ALLOWED} consumers and {MAX_ALLOWED} scopes")));
        }
        for (i, c) in self.consumers.iter().enumerate() {
            validate::text(&format!("auth.consumers[{i}]"), c)?;
        }
        for (i, s) in self.scopes.iter().enumerate() {
            validate::scope(&format!("auth.scopes[{i}]"), s)?;
        }
        Ok(())
    }
}

impl JwtSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.keys.is_empty() && self.jwks_url.is_none() {
            return Err(ValidationError::new("auth.jwt.keys", "give keys, jwks_url or both"));
        }
        if self.keys.len() > MAX_JWT_KEYS {
            return Err(ValidationError::new("auth.jwt.keys", format!("at most {MAX_JWT_KEYS} keys")));
        }
        for (i, k) in self.keys.iter().enumerate() {
            let f = format!("auth.jwt.keys[{i}]");
            match (k.alg, &k.secret, &k.public_key) {
                (JwtAlg::HS256, Some(s), None) if s.len() >= MIN_HMAC_SECRET && s.len() <= 4096 => {}
                (JwtAlg::HS256, Some(_), None) => return Err(ValidationError::new(format!("{f}.secret"), format!("must be {MIN_HMAC_SECRET}..=4096 bytes"))),
                (JwtAlg::HS256, _, _) => return Err(ValidationError::new(format!("{f}.secret"), "HS256 needs secret (and no public_key)")),
                (_, None, Some(p)) if p.contains("-----BEGIN") && p.len() <= 16 * 1024 => {}
                (_, _, _) => return Err(ValidationError::new(format!("{f}.public_key"), "RS256 and ES256 need a PEM public_key (and no secret)")),
            }
            if let Some(kid) = &k.kid {
                validate::text(&format!("{f}.kid"), kid)?;
            }
        }
        if let Some(u) = &self.jwks_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 2048 || u.bytes().any(|b| b <= 0x20 || b == 0x7f) {
                return Err(ValidationError::new("auth.jwt.jwks_url", "must be an http:// or https:// URL"));
            }
        }
        duration("auth.jwt.jwks_refresh", &self.jwks_refresh, Duration::from_secs(300))?;
        self.leeway()?;
        if let Some(i) = &self.issuer {
            validate::text("auth.jwt.issuer", i)?;
        }
        if self.audiences.len() > MAX_ALLOWED {
            return Err(ValidationError::new("auth.jwt.audiences", format!("at most {MAX_ALLOWED}")));
        }
        for (i, a) in self.audiences.iter().enumerate() {
            validate::text(&format!("auth.jwt.audiences[{i}]"), a)?;
        }
        if self.claims_to_headers.len() > MAX_HEADER_OPS {
            return Err(ValidationError::new("auth.jwt.claims_to_headers", format!("at most {MAX_HEADER_OPS}")));
        }
        for (claim, h) in &self.claims_to_headers {
            validate::text("auth.jwt.claims_to_headers", claim)?;
            header_name(&format!("auth.jwt.claims_to_headers.{claim}"), h)?;
        }
        if let Some(c) = &self.consumer_claim {
            validate::text("auth.jwt.consumer_claim", c)?;
        }
        if let Some(q) = &self.query {
            validate::text("auth.jwt.query", q)?;
        }
        if let Some(c) = &self.cookie {
            header_name("auth.jwt.cookie", c)?;
        }
        Ok(())
    }

    pub fn leeway(&self) -> Result<Duration, ValidationError> {
        match &self.leeway {
            None => Ok(Duration::from_secs(30)),
            Some(s) => {
                let d = parse_duration("auth.jwt.leeway", s)?;
                if d > Duration::from_secs(3600) {
                    return Err(ValidationError::new("auth.jwt.leeway", "must be at most 1h"));
                }
                Ok(d)
            }
        }
    }

    pub fn jwks_refresh(&self) -> Duration {
        duration("auth.jwt.jwks_refresh", &self.jwks_refresh, Duration::from_secs(300)).unwrap_or(Duration::from_secs(300))
    }
}

impl CorsSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.allow_origins.is_empty() || self.allow_origins.len() > MAX_ALLOWED {
            return Err(ValidationError::new("cors.allow_origins", format!("give 1..={MAX_ALLOWED} origins")));
        }
        for (i, o) in self.allow_origins.iter().enumerate() {
            let f = format!("cors.allow_origins[{i}]");
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(ValidationError::new(f, format!("{o:?} is not `*` or an origin like https://app.example.com")));
            }
            header_value(&f, o)?;
        }
        if self.allow_credentials && self.allow_origins.iter().any(|o| o == "*") {
            return Err(ValidationError::new("cors.allow_credentials", "cannot be used with the origin `*`"));
        }
        for (i, m) in self.allow_methods.iter().enumerate() {
            method_name(&format!("cors.allow_methods[{i}]"), m)?;
        }
        for (field, list) in [("cors.allow_headers", &self.allow_headers), ("cors.expose_headers", &self.expose_headers)] {
            if list.len() > MAX_MATCHERS {
                return Err(ValidationError::new(field, format!("at most {MAX_MATCHERS}")));
            }
            for (i, h) in list.iter().enumerate() {
                header_name(&format!("{field}[{i}]"), h)?;
            }
        }
        if self.max_age.is_some_and(|a| a > 86_400) {
            return Err(ValidationError::new("cors.max_age", "must be at most 86400 seconds"));
        }
        Ok(())
    }
}

/// A circuit breaker on the routed service: it opens when, over the sliding `window`, at least
/// `min_calls` calls were made and the share of failed (5xx, gateway errors) or slow calls
/// reaches its threshold; after `open_for` it lets `half_open_probes` calls through and closes
/// if they all succeed. `max_concurrent` caps calls in flight (fast 503 above it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_calls: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_probes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
}

/// A breaker's settings with defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breaker {
    pub error_ratio: f64,
    /// `None`: slow calls do not open the breaker.
    pub slow_ratio: Option<f64>,
    pub slow_call: Duration,
    pub window: Duration,
    pub min_calls: u32,
    pub open_for: Duration,
    pub half_open_probes: u32,
    pub max_concurrent: Option<u32>,
}

impl BreakerSpec {
    pub fn resolve(&self) -> Result<Breaker, ValidationError> {
        let ratio = |field: &str, v: Option<f64>, default: f64| -> Result<f64, ValidationError> {
            let r = v.unwrap_or(default);
            if !(r > 0.0 && r <= 1.0) {
                return Err(ValidationError::new(field, "must be above 0 and at most 1"));
            }
            Ok(r)
        };
        let b = Breaker {
            error_ratio: ratio("circuit_breaker.error_ratio", self.error_ratio, 0.5)?,
            slow_ratio: self.slow_ratio.map(|r| ratio("circuit_breaker.slow_ratio", Some(r), 1.0)).transpose()?,
            slow_call: duration("circuit_breaker.slow_call", &self.slow_call, Duration::from_secs(1))?,
            window: duration("circuit_breaker.window", &self.window, Duration::from_secs(10))?,
            min_calls: self.min_calls.unwrap_or(20),
            open_for: duration("circuit_breaker.open_for", &self.open_for, Duration::from_secs(30))?,
            half_open_probes: self.half_open_probes.unwrap_or(3),
            max_concurrent: self.max_concurrent,
        };
        if b.min_calls == 0 {
            return Err(ValidationError::new("circuit_breaker.min_calls", "must be at least 1"));
        }
        if b.half_open_probes == 0 {
            return Err(ValidationError::new("circuit_breaker.half_open_probes", "must be at least 1"));
        }
        if b.max_concurrent == Some(0) {
            return Err(ValidationError::new("circuit_breaker.max_concurrent", "must be at least 1"));
        }
        Ok(b)
    }
}

/// A token bucket per route or per key: `rate` requests per second on average, bursts of up to
/// `burst` (default: one second's worth). Over the limit: 429 with `Retry-After`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket for the whole route (default), or one per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RateLimitKey {
    ClientIp(bool),
    /// The authenticated consumer (needs `auth`).
    Consumer(bool),
    Header(String),
}

/// A header or query parameter condition: `value` exact, `regex`, or just `present`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `false` requires the header/parameter to be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// Which instances of a service a target covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitTarget {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<Subset>,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// The full target; or build it from the parts below and the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308 (default 302).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    /// Replaces any value the header had.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Appends a value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    /// Power of two choices by peak-EWMA latency × outstanding requests (the default).
    #[default]
    P2cEwma,
    RoundRobin,
    /// Smooth weighted round robin (nginx's).
    WeightedRoundRobin,
    LeastRequest,
    /// A ring over the endpoints, keyed by `hash_on`.
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp(bool),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Retries after the first try (default 2; 0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Also retry methods that are not idempotent (off by default).
    #[serde(default)]
    pub non_idempotent: bool,
    /// Base of the jittered exponential backoff between tries (default 25ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// Retries may add at most this share of requests (default 20)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<u32>,
    /// ...plus this many per second (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_min_per_second: Option<u32>,
}

/// Timeouts and retry policy with every default filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resilience {
    pub connect: Duration,
    pub per_try: Duration,
    pub total: Duration,
    pub attempts: u32,
    pub non_idempotent: bool,
    pub backoff: Duration,
    pub budget_percent: u32,
    pub budget_min_per_second: u32,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            per_try: Duration::from_secs(15),
            total: Duration::from_secs(30),
            attempts: 2,
            non_idempotent: false,
            backoff: Duration::from_millis(25),
            budget_percent: 20,
            budget_min_per_second: 3,
        }
    }
}

fn header_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
        return Err(ValidationError::new(field, format!("{name:?} is not a header name")));
    }
    Ok(())
}

fn header_value(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() > 4096 || value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(ValidationError::new(field, "must be at most 4096 bytes without control characters"));
    }
    Ok(())
}

fn path_value(field: &str, p: &str) -> Result<(), ValidationError> {
    if !p.starts_with('/') || p.len() > 1024 || p.bytes().any(|b| b <= 0x20 || b == 0x7f) {
        return Err(ValidationError::new(field, format!("{p:?} must start with '/', be at most 1024 bytes, no spaces or control characters")));
    }
    Ok(())
}

fn subset(field: &str, s: &Subset) -> Result<(), ValidationError> {
    validate::tags(&format!("{field}.tags"), &s.tags)?;
    if let Some(v) = &s.version {
        validate::text(&format!("{field}.version"), v)?;
    }
    if let Some(z) = &s.zone {
        validate::name(&format!("{field}.zone"), z)?;
    }
    Ok(())
}

fn matchers(field: &str, list: &[ValueMatch], header: bool) -> Result<(), ValidationError> {
    if list.len() > MAX_MATCHERS {
        return Err(ValidationError::new(field, format!("at most {MAX_MATCHERS} allowed")));
    }
    for (i, m) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if header {
            header_name(&format!("{f}.name"), &m.name)?;
        } else if m.name.is_empty() || m.name.len() > 256 {
            return Err(ValidationError::new(format!("{f}.name"), "must be 1..=256 bytes"));
        }
        let set = [m.value.is_some(), m.regex.is_some(), m.present.is_some()].iter().filter(|b| **b).count();
        if set > 1 {
            return Err(ValidationError::new(f, "give one of value, regex, present"));
        }
        if let Some(v) = &m.value {
            header_value(&format!("{f}.value"), v)?;
        }
        if let Some(r) = &m.regex {
            header_value(&format!("{f}.regex"), r)?;
        }
    }
    Ok(())
}

/// Headers that frame messages or belong to one hop: the gateway alone computes and strips
/// them. A route that could set them could make an upstream (or a client) see two framings and
/// split one message into two; one that could remove `Host` could send a request nowhere in
/// particular.
pub const RESERVED_HEADERS: &[&str] =
    &["content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "upgrade", "te", "trailer", "host", "expect"];

fn header_ops(field: &str, ops: &HeaderOps) -> Result<(), ValidationError> {
    if ops.set.len() + ops.add.len() + ops.remove.len() > MAX_HEADER_OPS {
        return Err(ValidationError::new(field, format!("at most {MAX_HEADER_OPS} operations")));
    }
    let reserved = |f: &str, k: &str| {
        if RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(k)) {
            return Err(ValidationError::new(f, format!("{k:?} frames the message or belongs to one hop; only the gateway sets it")));
        }
        Ok(())
    };
    for (k, v) in ops.set.iter().chain(ops.add.iter()) {
        let f = format!("{field}.{k}");
        header_name(&f, k)?;
        header_value(&f, v)?;
        reserved(&f, k)?;
    }
    for k in &ops.remove {
        header_name(&format!("{field}.remove"), k)?;
        reserved(&format!("{field}.remove"), k)?;
    }
    Ok(())
}

fn duration(field: &str, v: &Option<String>, default: Duration) -> Result<Duration, ValidationError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let d = parse_duration(field, s)?;
            if d.is_zero() || d > Duration::from_secs(3600) {
                return Err(ValidationError::new(field, "must be between 1ms and 1h"));
            }
            Ok(d)
        }
    }
}

impl RouteSpec {
    /// Checks everything but regex syntax (the gateway compiles those and reports errors with the
    /// same field names).
    pub fn validate(&self, name: &str) -> Result<(), ValidationError> {
        validate::name("route", name)?;
        if self.hosts.len() > MAX_HOSTS {
            return Err(ValidationError::new("hosts", format!("at most {MAX_HOSTS} allowed")));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            validate::address(&format!("hosts[{i}]"), bare)?;
        }
        let paths = [self.path.is_some(), self.path_prefix.is_some(), self.path_regex.is_some()].iter().filter(|b| **b).count();
        if paths > 1 {
            return Err(ValidationError::new("path", "give at most one of path, path_prefix, path_regex"));
        }
        for (field, p) in [("path", &self.path), ("path_prefix", &self.path_prefix)] {
            if let Some(p) = p {
                path_value(field, p)?;
            }
        }
        if let Some(r) = &self.path_regex {
            header_value("path_regex", r)?;
        }
        if self.methods.len() > 16 {
            return Err(ValidationError::new("methods", "at most 16 allowed"));
        }
        for (i, m) in self.methods.iter().enumerate() {
            method_name(&format!("methods[{i}]"), m)?;
        }
        matchers("headers", &self.headers, true)?;
        matchers("query", &self.query, false)?;

        let actions = [self.service.is_some(), !self.split.is_empty(), self.redirect.is_some(), self.direct_response.is_some()].iter().filter(|b| **b).count();
        if actions != 1 {
            return Err(ValidationError::new("service", "give exactly one action: service, split, redirect or direct_response"));
        }
        if let Some(s) = &self.service {
            validate::name("service", s)?;
        }
        if let Some(ns) = &self.namespace {
            validate::name("namespace", ns)?;
        }
        if let Some(s) = &self.subset {
            if self.service.is_none() {
                return Err(ValidationError::new("subset", "needs service"));
            }
            subset("subset", s)?;
        }
        if self.split.len() > MAX_SPLIT {
            return Err(ValidationError::new("split", format!("at most {MAX_SPLIT} targets")));
        }
        for (i, t) in self.split.iter().enumerate() {
            validate::name(&format!("split[{i}].service"), &t.service)?;
            if let Some(ns) = &t.namespace {
                validate::name(&format!("split[{i}].namespace"), ns)?;
            }
            if let Some(s) = &t.subset {
                subset(&format!("split[{i}].subset"), s)?;
            }
            if t.weight > 10_000 {
                return Err(ValidationError::new(format!("split[{i}].weight"), "must be 0..=10000"));
            }
        }
        if !self.split.is_empty() && self.split.iter().all(|t| t.weight == 0) {
            return Err(ValidationError::new("split", "at least one target needs a weight above 0"));
        }
        if let Some(r) = &self.redirect {
            if let Some(code) = r.status {
                if ![301, 302, 303, 307, 308].contains(&code) {
                    return Err(ValidationError::new("redirect.status", format!("{code} is not 301, 302, 303, 307 or 308")));
                }
            }
            if let Some(l) = &r.location {
                header_value("redirect.location", l)?;
                if r.scheme.is_some() || r.host.is_some() || r.path.is_some() {
                    return Err(ValidationError::new("redirect.location", "give location or scheme/host/path, not both"));
                }
            }
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    return Err(ValidationError::new("redirect.scheme", "must be http or https"));
                }
            }
            if let Some(h) = &r.host {
                validate::address("redirect.host", h.split(':').next().unwrap_or(h))?;
            }
            if let Some(p) = &r.path {
                path_value("redirect.path", p)?;
            }
        }
        if let Some(d) = &self.direct_response {
            if !(100..=599).contains(&d.status) {
                return Err(ValidationError::new("direct_response.status", "must be 100..=599"));
            }
            if d.body.len() > MAX_DIRECT_BODY {
                return Err(ValidationError::new("direct_response.body", format!("must be at most {MAX_DIRECT_BODY} bytes")));
            }
            if let Some(ct) = &d.content_type {
                header_value("direct_response.content_type", ct)?;
            }
        }
        if (self.strip_prefix || self.rewrite_prefix.is_some()) && self.path_prefix.is_none() {
            return Err(ValidationError::new(if self.strip_prefix { "strip_prefix" } else { "rewrite_prefix" }, "needs path_prefix"));
        }
        if self.strip_prefix && self.rewrite_prefix.is_some() {
            return Err(ValidationError::new("rewrite_prefix", "give strip_prefix or rewrite_prefix, not both"));
        }
        if let Some(p) = &self.rewrite_prefix {
            path_value("rewrite_prefix", p)?;
        }
        header_ops("request_headers", &self.request_headers)?;
        header_ops("response_headers", &self.response_headers)?;
        match (self.load_balancer, &self.hash_on) {
            (Some(LoadBalancer::ConsistentHash), None) => return Err(ValidationError::new("hash_on", "required by load_balancer consistent_hash")),
            (Some(LoadBalancer::ConsistentHash), Some(h)) => match h {
                HashOn::Header(n) | HashOn::Cookie(n) => header_name("hash_on", n)?,
                HashOn::ClientIp(_) => {}
            },
            (_, Some(_)) => return Err(ValidationError::new("hash_on", "only used with load_balancer consistent_hash")),
            _ => {}
        }
        if let Some(b) = &self.circuit_breaker {
            if self.service.is_none() && self.split.is_empty() {
                return Err(ValidationError::new("circuit_breaker", "needs service or split"));
            }
            b.resolve()?;
        }
        if let Some(rl) = &self.rate_limit {
            if !(rl.rate > 0.0 && rl.rate <= 1e9) {
                return Err(ValidationError::new("rate_limit.rate", "must be above 0 (requests per second)"));
            }
            if rl.burst == Some(0) {
                return Err(ValidationError::new("rate_limit.burst", "must be at least 1"));
            }
            if let Some(RateLimitKey::Header(h)) = &rl.key {
                header_name("rate_limit.key", h)?;
            }
        }
        if let Some(a) = &self.auth {
            a.validate()?;
        }
        if let Some(c) = &self.cors {
            c.validate()?;
        }
        if matches!(&self.rate_limit, Some(RateLimitSpec { key: Some(RateLimitKey::Consumer(_)), .. })) && self.auth.is_none() {
            return Err(ValidationError::new("rate_limit.key", "consumer keys need auth on the route"));
        }
        self.resilience()?;
        Ok(())
    }

    /// The route's timeouts and retry policy with defaults filled in.
    pub fn resilience(&self) -> Result<Resilience, ValidationError> {
        let d = Resilience::default();
        let t = self.timeouts.clone().unwrap_or_default();
        let r = self.retries.clone().unwrap_or_default();
        let out = Resilience {
            connect: duration("timeouts.connect", &t.connect, d.connect)?,
            per_try: duration("timeouts.per_try", &t.per_try, d.per_try)?,
            total: duration("timeouts.total", &t.total, d.total)?,
            attempts: r.attempts.unwrap_or(d.attempts),
            non_idempotent: r.non_idempotent,
            backoff: duration("retries.backoff", &r.backoff, d.backoff)?,
            budget_percent: r.budget_percent.unwrap_or(d.budget_percent),
            budget_min_per_second: r.budget_min_per_second.unwrap_or(d.budget_min_per_second),
        };
        if out.attempts > MAX_RETRIES {
            return Err(ValidationError::new("retries.attempts", format!("must be 0..={MAX_RETRIES}")));
        }
        if out.budget_percent > 100 {
            return Err(ValidationError::new("retries.budget_percent", "must be 0..=100"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> RouteSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn minimal_route_from_the_issue() {
        let r = spec(r#"{"path_prefix": "/demo/", "service": "demo", "strip_prefix": true}"#);
        r.validate("demo").unwrap();
        assert_eq!(r.resilience().unwrap(), Resilience::default());
    }

    #[test]
    fn bad_routes_name_the_field() {
        for (json, field) in [
            (r#"{"path_prefix": "/a"}"#, "service"),
            (r#"{"path_prefix": "/a", "service": "s", "direct_response": {"status": 200}}"#, "service"),
            (r#"{"path_prefix": "a", "service": "s"}"#, "path_prefix"),
            (r#"{"path": "/a", "path_prefix": "/a", "service": "s"}"#, "path"),
            (r#"{"service": "s", "strip_prefix": true}"#, "strip_prefix"),
            (r#"{"service": "s", "methods": ["get"]}"#, "methods[0]"),
            (r#"{"service": "s", "headers": [{"name": "bad header"}]}"#, "headers[0].name"),
            (r#"{"split": [{"service": "a", "weight": 0}]}"#, "split"),
            (r#"{"redirect": {"status": 200}}"#, "redirect.status"),
            (r#"{"direct_response": {"status": 700}}"#, "direct_response.status"),
            (r#"{"service": "s", "timeouts": {"connect": "soon"}}"#, "timeouts.connect"),
            (r#"{"service": "s", "retries": {"attempts": 99}}"#, "retries.attempts"),
            (r#"{"service": "s", "load_balancer": "consistent_hash"}"#, "hash_on"),
            (r#"{"service": "s", "hosts": ["bad host"]}"#, "hosts[0]"),
            (r#"{"service": "s", "request_headers": {"set": {"x-a": "b\nc"}}}"#, "request_headers.x-a"),
            (r#"{"service": "s", "request_headers": {"set": {"Transfer-Encoding": "chunked"}}}"#, "request_headers.Transfer-Encoding"),
            (r#"{"service": "s", "request_headers": {"add": {"connection": "close"}}}"#, "request_headers.connection"),
            (r#"{"service": "s", "request_headers": {"remove": ["host"]}}"#, "request_headers.remove"),
            (r#"{"service": "s", "response_headers": {"set": {"content-length": "2"}}}"#, "response_headers.content-length"),
            (r#"{"direct_response": {"status": 200}, "response_headers": {"set": {"upgrade": "h2c"}}}"#, "response_headers.upgrade"),
            (r#"{"service": "s", "rate_limit": {"rate": 0}}"#, "rate_limit.rate"),
            (r#"{"service": "s", "circuit_breaker": {"error_ratio": 2}}"#, "circuit_breaker.error_ratio"),
            (r#"{"service": "s", "circuit_breaker": {"open_for": "x"}}"#, "circuit_breaker.open_for"),
            (r#"{"service": "s", "rate_limit": {"rate": 5, "burst": 0}}"#, "rate_limit.burst"),
            (r#"{"service": "s", "rate_limit": {"rate": 5, "key": {"consumer": true}}}"#, "rate_limit.key"),
            (r#"{"service": "s", "auth": {}}"#, "auth"),
            (r#"{"service": "s", "auth": {"jwt": {}}}"#, "auth.jwt.keys"),
            (r#"{"service": "s", "auth": {"jwt": {"keys": [{"alg": "HS256", "secret": "short"}]}}}"#, "auth.jwt.keys[0].secret"),
            (r#"{"service": "s", "auth": {"jwt": {"keys": [{"alg": "RS256", "secret": "x"}]}}}"#, "auth.jwt.keys[0].public_key"),
            (r#"{"service": "s", "auth": {"jwt": {"jwks_url": "ftp://x"}}}"#, "auth.jwt.jwks_url"),
            (r#"{"service": "s", "auth": {"jwt": {"jwks_url": "http://x", "leeway": "2h"}}}"#, "auth.jwt.leeway"),
            (r#"{"service": "s", "auth": {"mtls": true, "scopes": ["a b"]}}"#, "auth.scopes[0]"),
            (r#"{"service": "s", "auth": {"api_key": {"header": "bad header"}}}"#, "auth.api_key.header"),
            (r#"{"service": "s", "cors": {"allow_origins": []}}"#, "cors.allow_origins"),
            (r#"{"service": "s", "cors": {"allow_origins": ["example.com"]}}"#, "cors.allow_origins[0]"),
            (r#"{"service": "s", "cors": {"allow_origins": ["*"], "allow_credentials": true}}"#, "cors.allow_credentials"),
        ] {
            let e = spec(json).validate("r").unwrap_err();
            assert_eq!(e.field, field, "{json}: {e:?}");
        }
        assert!(serde_json::from_str::<RouteSpec>(r#"{"service": "s", "bogus": 1}"#).is_err());
    }
}

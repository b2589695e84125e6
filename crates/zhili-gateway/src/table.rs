//! The compiled route table: routes sorted by priority and specificity, each with its matchers
//! compiled (regexes, lower-cased hosts, header names), and the lookup a request goes through.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;
use zhili_model::route::{HashOn, LoadBalancer, Redirect, Resilience, RouteSpec, Subset, ValueMatch};
use zhili_model::ValidationError;

use crate::balance::RetryBudget;
use crate::limit::Limiter;
use crate::target::form_pairs;

#[derive(Debug)]
enum Host {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum Cond {
    Equals(String),
    Regex(Regex),
    Present(bool),
}

#[derive(Debug)]
struct HeaderCond {
    name: HeaderName,
    cond: Cond,
}

#[derive(Debug)]
struct QueryCond {
    name: String,
    cond: Cond,
}

/// Where a forwarded request goes: a service (namespace, name) and optionally a subset of it.
#[derive(Debug)]
pub struct Target {
    pub namespace: String,
    pub service: String,
    pub subset: Option<Subset>,
    /// The service's endpoint pool, attached when the gateway stages the table, so a request
    /// finds it without a map lookup.
    pub pool: std::sync::OnceLock<Arc<crate::balance::Pool>>,
    /// The target's recent traffic (kept by the gateway across table rebuilds, by route and
    /// target), attached when the table is staged.
    pub window: std::sync::OnceLock<Arc<crate::stats::TrafficWindow>>,
}

impl Target {
    /// What identifies the target's traffic window: (route, namespace, service, subset).
    pub fn window_key(&self, route: &str) -> WindowKey {
        (route.to_string(), self.namespace.clone(), self.service.clone(), self.subset.clone().unwrap_or_default())
    }
}

pub type WindowKey = (String, String, String, Subset);

#[derive(Debug)]
pub enum Action {
    Forward(Vec<(Target, u32)>),
    Redirect(Redirect),
    Direct { status: u16, body: bytes::Bytes, content_type: Option<String> },
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub priority: i32,
    hosts: Vec<Host>,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<HeaderCond>,
    query: Vec<QueryCond>,
    pub action: Action,
    /// The matched prefix to remove, and what to put in its place.
    pub rewrite: Option<(String, String)>,
    pub spec: RouteSpec,
    pub resilience: Resilience,
    pub balancer: LoadBalancer,
    pub hash_on: Option<HashOn>,
    pub budget: RetryBudget,
    pub limiter: Option<Limiter>,
    pub breaker: Option<zhili_model::route::Breaker>,
    pub auth: Option<crate::auth::Auth>,
    pub cors: Option<crate::cors::Cors>,
    /// Latency histogram handles by (service, status class), so the hot path neither allocates
    /// labels nor hashes them.
    latency: parking_lot::Mutex<Vec<(String, &'static str, prometheus_client::metrics::histogram::Histogram)>>,
}

fn regex(field: &str, r: &str) -> Result<Regex, ValidationError> {
    regex::RegexBuilder::new(r).size_limit(1 << 20).build().map_err(|e| ValidationError::new(field, format!("is not a valid regex: {e}")))
}

fn cond(field: &str, m: &ValueMatch) -> Result<Cond, ValidationError> {
    Ok(match (&m.value, &m.regex, m.present) {
        (Some(v), _, _) => Cond::Equals(v.clone()),
        (_, Some(r), _) => Cond::Regex(regex(&format!("{field}.regex"), r)?),
        (_, _, Some(p)) => Cond::Present(p),
        _ => Cond::Present(true),
    })
}

impl Cond {
    fn test(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (Cond::Present(want), v) => v.is_some() == *want,
            (_, None) => false,
            (Cond::Equals(want), Some(v)) => v == want,
            (Cond::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

/// Validates and compiles one route; errors name the field.
pub fn compile(name: &str, spec: &RouteSpec) -> Result<Route, ValidationError> {
    spec.validate(name)?;
    let hosts = spec
        .hosts
        .iter()
        .map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => Host::Suffix(suffix.to_string()),
                None => Host::Exact(h),
            }
        })
        .collect();
    let path = match (&spec.path, &spec.path_prefix, &spec.path_regex) {
        (Some(p), _, _) => PathMatch::Exact(p.clone()),
        (_, Some(p), _) => PathMatch::Prefix(p.clone()),
        (_, _, Some(r)) => PathMatch::Regex(regex("path_regex", r)?),
        _ => PathMatch::Any,
    };
    let methods = spec
        .methods
        .iter()
        .map(|m| Method::from_bytes(m.as_bytes()).map_err(|_| ValidationError::new("methods", format!("{m:?} is not a method"))))
        .collect::<Result<_, _>>()?;
    let headers = spec
        .headers
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let name = HeaderName::from_bytes(m.name.to_ascii_lowercase().as_bytes())
                .map_err(|_| ValidationError::new(format!("headers[{i}].name"), "is not a header name"))?;
            Ok(HeaderCond { name, cond: cond(&format!("headers[{i}]"), m)? })
        })
        .collect::<Result<_, ValidationError>>()?;
    let query = spec
        .query
        .iter()
        .enumerate()
        .map(|(i, m)| Ok(QueryCond { name: m.name.clone(), cond: cond(&format!("query[{i}]"), m)? }))
        .collect::<Result<_, ValidationError>>()?;
    let default_ns = || spec.namespace.clone().unwrap_or_else(|| zhili_model::DEFAULT_NAMESPACE.to_string());
    let action = if let Some(service) = &spec.service {
        Action::Forward(vec![(
            Target { namespace: default_ns(), service: service.clone(), subset: spec.subset.clone(), pool: Default::default(), window: Default::default() },
            1,
        )])
    } else if !spec.split.is_empty() {
        Action::Forward(
            spec.split
                .iter()
                .map(|t| {
                    (
                        Target {
                            namespace: t.namespace.clone().unwrap_or_else(default_ns),
                            service: t.service.clone(),
                            subset: t.subset.clone(),
                            pool: Default::default(),
                            window: Default::default(),
                        },
                        t.weight,
                    )
                })
                .collect(),
        )
    } else if let Some(r) = &spec.redirect {
        Action::Redirect(r.clone())
    } else {
        let d = spec.direct_response.clone().unwrap_or_default();
        Action::Direct { status: d.status, body: bytes::Bytes::from(d.body), content_type: d.content_type }
    };
    let rewrite = match (&spec.path_prefix, spec.strip_prefix, &spec.rewrite_prefix) {
        (Some(p), true, _) => Some((p.clone(), "/".to_string())),
        (Some(p), false, Some(r)) => Some((p.clone(), r.clone())),
        _ => None,
    };
    let resilience = spec.resilience()?;
    Ok(Route {
        name: name.to_string(),
        priority: spec.priority,
        hosts,
        path,
        methods,
        headers,
        query,
        action,
        rewrite,
        spec: spec.clone(),
        budget: RetryBudget::new(resilience.budget_percent, resilience.budget_min_per_second),
        resilience,
        balancer: spec.load_balancer.unwrap_or_default(),
        hash_on: spec.hash_on.clone(),
        limiter: spec.rate_limit.as_ref().map(Limiter::new),
        breaker: spec.circuit_breaker.as_ref().map(|b| b.resolve()).transpose()?,
        auth: spec.auth.as_ref().map(crate::auth::compile).transpose()?,
        cors: spec.cors.as_ref().map(crate::cors::Cors::new),
        latency: parking_lot::Mutex::default(),
    })
}

impl Route {
    /// How specific the match is, for ordering routes of equal priority.
    fn specificity(&self) -> (usize, usize, usize) {
        let path = match &self.path {
            PathMatch::Exact(p) => 10_000 + p.len(),
            PathMatch::Prefix(p) => p.len() * 2,
            PathMatch::Regex(_) => 1,
            PathMatch::Any => 0,
        };
        let host = self.hosts.iter().map(|h| if matches!(h, Host::Exact(_)) { 2 } else { 1 }).max().unwrap_or(0);
        (host, path, self.methods.len().min(1) + self.headers.len() + self.query.len())
    }

    fn matches(&self, host: &str, method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> bool {
        if !self.hosts.is_empty()
            && !self.hosts.iter().any(|h| match h {
                Host::Exact(e) => e == host,
                Host::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
            })
        {
            return false;
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()) || (p.ends_with('/') && path.len() + 1 == p.len() && p.starts_with(path)),
            PathMatch::Regex(r) => r.is_match(path),
        };
        if !path_ok || (!self.methods.is_empty() && !self.methods.contains(method)) {
            return false;
        }
        if !self.headers.iter().all(|h| h.cond.test(headers.get(&h.name).and_then(|v| v.to_str().ok()))) {
            return false;
        }
        if !self.query.is_empty() {
            let pairs: Vec<(String, String)> = query.map(form_pairs).unwrap_or_default();
            if !self.query.iter().all(|c| c.cond.test(pairs.iter().find(|(k, _)| *k == c.name).map(|(_, v)| v.as_str()))) {
                return false;
            }
        }
        true
    }

    /// The request latency histogram of this route for `service` and a status class.
    pub fn latency(&self, family: &crate::stats::Latencies, service: &str, class: &'static str) -> prometheus_client::metrics::histogram::Histogram {
        let mut cache = self.latency.lock();
        if let Some((_, _, h)) = cache.iter().find(|(s, c, _)| s == service && *c == class) {
            return h.clone();
        }
        let h = family
            .requests
            .get_or_create(&crate::stats::RouteLabels { route: self.name.clone(), service: service.to_string(), class: class.to_string() })
            .clone();
        cache.push((service.to_string(), class, h.clone()));
        h
    }

    /// The upstream path for `path` (prefix strip or rewrite), and `query` after a `?` when it is
    /// not empty.
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> String {
        let mut out = Vec::new();
        self.write_upstream_path(path, query, &mut out);
        // Pieces of `str`s joined whole: still UTF-8.
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`Self::upstream_path`] written to the end of `out` (the upstream request being encoded).
    pub fn write_upstream_path(&self, path: &str, query: Option<&str>, out: &mut Vec<u8>) {
        let query = query.filter(|q| !q.is_empty());
        out.reserve(path.len() + query.map_or(0, |q| q.len() + 1) + self.rewrite.as_ref().map_or(0, |(_, with)| with.len() + 1));
        match &self.rewrite {
            Some((prefix, with)) => {
                let rest = path.strip_prefix(prefix.as_str()).unwrap_or("");
                out.extend_from_slice(with.as_bytes());
                // One slash between the two.
                match (with.ends_with('/'), rest.strip_prefix('/')) {
                    (true, Some(after)) => out.extend_from_slice(after.as_bytes()),
                    (false, None) if !rest.is_empty() => {
                        out.push(b'/');
                        out.extend_from_slice(rest.as_bytes());
                    }
                    _ => out.extend_from_slice(rest.as_bytes()),
                }
            }
            None => out.extend_from_slice(path.as_bytes()),
        }
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
    }
}

/// All routes, in match order.
#[derive(Debug, Default)]
pub struct Table {
    pub routes: Vec<Arc<Route>>,
}

impl Table {
    pub fn new(mut routes: Vec<Arc<Route>>) -> Self {
        routes.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| b.specificity().cmp(&a.specificity())).then_with(|| a.name.cmp(&b.name)));
        Self { routes }
    }

    pub fn find(&self, host: &str, method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(host, method, path, query, headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field names of route specs at every depth, so generated specs reach past the top level.
    const ROUTE_KEYS: &[&str] = &[
        "add",
        "alg",
        "allow_credentials",
        "allow_headers",
        "allow_methods",
        "allow_origins",
        "api_key",
        "attempts",
        "audiences",
        "auth",
        "backoff",
        "body",
        "budget_min_per_second",
        "budget_percent",
        "burst",
        "circuit_breaker",
        "claims_to_headers",
        "connect",
        "consumer_claim",
        "consumers",
        "content_type",
        "cookie",
        "cors",
        "direct_response",
        "error_ratio",
        "expose_headers",
        "half_open_probes",
        "hash_on",
        "header",
        "headers",
        "hide_credentials",
        "host",
        "hosts",
        "issuer",
        "jwks_refresh",
        "jwks_url",
        "jwt",
        "key",
        "keys",
        "kid",
        "leeway",
        "load_balancer",
        "location",
        "max_age",
        "max_concurrent",
        "methods",
        "min_calls",
        "mtls",
        "name",
        "namespace",
        "non_idempotent",
        "open_for",
        "path",
        "path_prefix",
        "path_regex",
        "per_try",
        "present",
        "priority",
        "public_key",
        "query",
        "rate",
        "rate_limit",
        "redirect",
        "regex",
        "remove",
        "request_headers",
        "response_headers",
        "retries",
        "rewrite_prefix",
        "scheme",
        "scopes",
        "secret",
        "service",
        "set",
        "slow_call",
        "slow_ratio",
        "split",
        "status",
        "strip_prefix",
        "subset",
        "tags",
        "timeouts",
        "total",
        "value",
        "version",
        "weight",
        "window",
        "zone",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// A valid route with one or two fields replaced by anything: parsing and compiling
        /// either succeed or name what is wrong; never a panic.
        #[test]
        fn arbitrary_route_specs_never_panic(
            changes in proptest::collection::vec((proptest::sample::select(ROUTE_KEYS), zhili_test_support::json::arbitrary_json(ROUTE_KEYS)), 1..3),
            whole in zhili_test_support::json::arbitrary_json(ROUTE_KEYS),
        ) {
            let mut spec = serde_json::json!({"path_prefix": "/", "service": "web"});
            for (k, v) in changes {
                spec[k] = v;
            }
            for candidate in [spec, whole] {
                if let Ok(parsed) = serde_json::from_value::<RouteSpec>(candidate) {
                    if let Err(e) = compile("r", &parsed) {
                        proptest::prop_assert!(!e.to_string().is_empty());
                    }
                }
            }
        }

        #[test]
        fn arbitrary_consumer_specs_never_panic(v in zhili_test_support::json::arbitrary_json(&["api_keys", "description", "scopes"])) {
            if let Ok(c) = serde_json::from_value::<zhili_model::consumer::ConsumerSpec>(v) {
                if c.validate("c").is_ok() {
                    let _ = c.hashed();
                }
            }
        }
    }

    fn route(name: &str, json: &str) -> Arc<Route> {
        Arc::new(compile(name, &serde_json::from_str(json).unwrap()).unwrap())
    }

    fn find<'a>(t: &'a Table, host: &str, method: &str, path_q: &str, headers: &[(&str, &str)]) -> Option<&'a str> {
        let (path, query) = path_q.split_once('?').map_or((path_q, None), |(p, q)| (p, Some(q)));
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        t.find(host, &Method::from_bytes(method.as_bytes()).unwrap(), path, query, &h).map(|r| r.name.as_str())
    }

    #[test]
    fn most_specific_route_wins() {
        let t = Table::new(vec![
            route("catch-all", r#"{"service": "a"}"#),
            route("demo", r#"{"path_prefix": "/demo/", "service": "demo"}"#),
            route("demo-exact", r#"{"path": "/demo/health", "service": "h"}"#),
            route("host", r#"{"hosts": ["*.example.com"], "path_prefix": "/demo/", "service": "x"}"#),
            route("canary", r#"{"path_prefix": "/demo/", "headers": [{"name": "x-canary", "value": "1"}], "service": "c"}"#),
            route("posts", r#"{"path_regex": "^/v[0-9]+/posts$", "methods": ["POST"], "service": "p"}"#),
            route("debug", r#"{"path_prefix": "/q", "query": [{"name": "debug", "value": "on now"}], "service": "d", "priority": 5}"#),
        ]);
        assert_eq!(find(&t, "h", "GET", "/demo/x", &[]), Some("demo"));
        assert_eq!(find(&t, "h", "GET", "/demo", &[]), Some("demo"), "prefix /demo/ also takes /demo");
        assert_eq!(find(&t, "h", "GET", "/demo/health", &[]), Some("demo-exact"));
        assert_eq!(find(&t, "api.example.com", "GET", "/demo/x", &[]), Some("host"));
        assert_eq!(find(&t, "example.com", "GET", "/demo/x", &[]), Some("demo"), "wildcard needs a label");
        assert_eq!(find(&t, "h", "GET", "/demo/x", &[("x-canary", "1")]), Some("canary"));
        assert_eq!(find(&t, "h", "POST", "/v2/posts", &[]), Some("posts"));
        assert_eq!(find(&t, "h", "GET", "/v2/posts", &[]), Some("catch-all"));
        assert_eq!(find(&t, "h", "GET", "/q?debug=on+now", &[]), Some("debug"));
        assert_eq!(find(&t, "h", "GET", "/q?debug=on%20now&x=1", &[]), Some("debug"));
        assert_eq!(find(&t, "h", "GET", "/q?debug=off", &[]), Some("catch-all"));
    }

    #[test]
    fn rewrites() {
        let strip = route("s", r#"{"path_prefix": "/demo/", "service": "demo", "strip_prefix": true}"#);
        assert_eq!(strip.upstream_path("/demo/a/b", None), "/a/b");
        assert_eq!(strip.upstream_path("/demo/", None), "/");
        assert_eq!(strip.upstream_path("/demo", None), "/");
        assert_eq!(strip.upstream_path("/demo/a", Some("x=1&y")), "/a?x=1&y");
        assert_eq!(strip.upstream_path("/demo/a", Some("")), "/a", "an empty query adds no '?'");
        let rw = route("r", r#"{"path_prefix": "/old/", "service": "demo", "rewrite_prefix": "/new/"}"#);
        assert_eq!(rw.upstream_path("/old/x", None), "/new/x");
        let keep = route("k", r#"{"path_prefix": "/k/", "service": "demo"}"#);
        assert_eq!(keep.upstream_path("/k/x", None), "/k/x");
    }

    #[test]
    fn bad_regex_names_the_field() {
        let e = compile("r", &serde_json::from_str(r#"{"path_regex": "(", "service": "a"}"#).unwrap()).unwrap_err();
        assert_eq!(e.field, "path_regex");
        let e = compile("r", &serde_json::from_str(r#"{"headers": [{"name": "x", "regex": "["}], "service": "a"}"#).unwrap()).unwrap_err();
        assert_eq!(e.field, "headers[0].regex");
    }
}

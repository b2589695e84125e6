//! The OpenAPI document, built from [`ROUTES`]: the same table the router test checks every entry
//! of against the real router, so the document cannot list a route that is not served.

use serde_json::{json, Map, Value};

/// (method, path, tag, summary) of every public route.
pub const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("get", "/api/v1/namespaces", "registry", "List namespaces that hold services"),
    ("get", "/api/v1/services", "registry", "List services with instance and passing counts (blocking with index/wait)"),
    ("put", "/api/v1/services/{service}", "registry", "Define or update a service"),
    ("get", "/api/v1/services/{service}", "registry", "A service's definition and instances (blocking with index/wait)"),
    ("delete", "/api/v1/services/{service}", "registry", "Delete a service and all its instances"),
    ("post", "/api/v1/services/{service}/instances", "registry", "Register an instance; 201 {id, index}"),
    ("get", "/api/v1/services/{service}/instances", "registry", "Discover instances: healthy, tag, meta.K, zone filters; blocking with index/wait"),
    ("get", "/api/v1/services/{service}/instances/{id}", "registry", "One instance"),
    ("delete", "/api/v1/services/{service}/instances/{id}", "registry", "Deregister an instance"),
    ("put", "/api/v1/services/{service}/instances/{id}/heartbeat", "registry", "Heartbeat of an ephemeral instance; 404 if unknown (re-register)"),
    ("put", "/api/v1/services/{service}/instances/{id}/checks/{check}", "registry", "Set a TTL check's status {status, output}"),
    ("put", "/api/v1/services/{service}/instances/{id}/maintenance", "registry", "Enter or leave maintenance {enabled, reason}"),
    ("put", "/api/v1/services/{service}/instances/{id}/passive", "registry", "A gateway's passive-health report {ejected_for, reason}; shown on the instance"),
    (
        "put",
        "/api/v1/services/{service}/breaker",
        "registry",
        "A gateway reports a circuit-breaker transition {state: open|half_open|closed, reason}; shown in GET /api/v1/services/{service}",
    ),
    ("get", "/api/v1/events/registry", "events", "Server-sent events of registry changes (?service=)"),
    ("get", "/api/v1/sd/prometheus", "discovery", "Prometheus HTTP service discovery: serving instances as target groups with __meta_zhili_* labels"),
    ("get", "/api/v1/routes", "gateway", "List gateway routes {index, routes: [{name, route}]}; blocking with index/wait"),
    ("get", "/api/v1/routes/{route}", "gateway", "One gateway route"),
    ("put", "/api/v1/routes/{route}", "gateway", "Create or replace a gateway route (validated by compiling it)"),
    ("delete", "/api/v1/routes/{route}", "gateway", "Delete a gateway route"),
    ("get", "/api/v1/consumers", "gateway", "List gateway consumers {index, consumers: [{name, consumer}]} (API keys as digests); blocking with index/wait"),
    ("get", "/api/v1/consumers/{consumer}", "gateway", "One gateway consumer"),
    ("put", "/api/v1/consumers/{consumer}", "gateway", "Create or replace a consumer {description, api_keys, scopes}; keys are stored as SHA-256 digests"),
    ("delete", "/api/v1/consumers/{consumer}", "gateway", "Delete a gateway consumer"),
    ("get", "/api/v1/events/kv", "events", "Server-sent events of KV changes under ?prefix= from ?index="),
    ("get", "/api/v1/kv", "kv", "List or read the whole keyspace (?keys or ?recurse)"),
    ("get", "/api/v1/kv/{key}", "kv", "Read a key (?raw), a prefix (?recurse) or key names (?keys&separator=); blocking with index/wait"),
    ("put", "/api/v1/kv/{key}", "kv", "Write a key; body is the raw value (at most 512 KiB); ?cas=INDEX (0 = create only)"),
    ("delete", "/api/v1/kv/{key}", "kv", "Delete a key or a prefix (?recurse); ?cas=INDEX"),
    ("post", "/api/v1/acl/bootstrap", "acl", "Create the first management token (once)"),
    ("get", "/api/v1/acl/policies", "acl", "List policies"),
    ("post", "/api/v1/acl/policies", "acl", "Create a policy"),
    ("get", "/api/v1/acl/policies/{name}", "acl", "Read a policy"),
    ("put", "/api/v1/acl/policies/{name}", "acl", "Create or replace a policy"),
    ("delete", "/api/v1/acl/policies/{name}", "acl", "Delete a policy"),
    ("get", "/api/v1/acl/tokens", "acl", "List tokens (secrets shown to acl writers only)"),
    ("post", "/api/v1/acl/tokens", "acl", "Create a token"),
    ("get", "/api/v1/acl/tokens/{accessor}", "acl", "Read a token"),
    ("delete", "/api/v1/acl/tokens/{accessor}", "acl", "Delete a token"),
    ("get", "/api/v1/acl/token/self", "acl", "The caller's own token"),
    ("get", "/metrics", "ops", "Prometheus metrics"),
    ("get", "/health/live", "ops", "Liveness"),
    ("get", "/health/ready", "ops", "Readiness: 200 once state is loaded"),
    ("get", "/api/openapi.json", "ops", "This document"),
];

pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, tag, summary) in ROUTES {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = json!({
            "tags": [tag],
            "summary": summary,
            "parameters": params,
            "responses": {
                "default": {"description": "Errors are application/problem+json (RFC 9457) with a detail naming the field"},
                "200": {"description": "OK; reads carry X-Zhili-Index"}
            },
            "security": [{"token": []}]
        });
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Zhili native API", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    })
}

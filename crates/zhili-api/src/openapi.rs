//! The OpenAPI 3.1 document of the native API, built from [`OPERATIONS`]: each operation names
//! the Rust types its handler reads and answers, and their JSON Schemas are derived from those
//! types (schemars reads the same serde attributes the handlers parse with), so the document
//! cannot drift from the code. The router test checks every entry against the real router, and
//! Schemathesis fuzzes the server from this document in the test command.

use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};
use zhili_model::acl::{PolicySpec, Token, TokenSpec};
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;
use zhili_model::{Instance, InstanceList, InstanceSpec, Service, ServiceDetail, ServiceSpec, ServiceSummary};

use crate::native::kv::KvEntry;
use crate::native::registry::{BreakerBody, CheckUpdate, MaintenanceBody, PassiveBody, ReportList};
use crate::native::sd::TargetGroup;
use crate::native::{Registered, Stored, Written};

/// A schema, derived from a type or written for a shape the handler builds.
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// What an operation reads as its body.
pub enum Body {
    None,
    Json(SchemaFn),
    /// Raw bytes (a KV value).
    Raw,
}

/// What an operation answers on success.
pub enum Answer {
    Json(SchemaFn),
    /// JSON, or the raw value with `?raw` (KV reads).
    JsonOrRaw(SchemaFn),
    Empty,
    Text(&'static str),
    /// `text/event-stream`: never ends by itself.
    Stream,
}

/// A query parameter and its schema.
pub struct Param {
    pub name: &'static str,
    pub schema: SchemaFn,
    pub description: &'static str,
}

pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub query: &'static [Param],
    pub body: Body,
    pub status: u16,
    pub answer: Answer,
}

fn of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

fn boolean(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "boolean"})
}

fn name(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"})
}

fn text(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "maxLength": 256})
}

fn index(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "integer", "minimum": 0, "maximum": 9_007_199_254_740_991u64})
}

/// A blocking read's wait. The server accepts any duration up to 10 minutes; the document
/// offers short ones, so generated requests do not hold a fuzzer for minutes.
fn wait(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "pattern": "^[0-9]{1,3}ms$", "description": "How long to hold the answer back, e.g. \"30s\" (at most 10m)"})
}

fn strings(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "array", "items": {"type": "string"}})
}

fn any_text(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string"})
}

fn any_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object"})
}

/// `GET /api/v1/kv/{key}`: one entry, a list of entries (`recurse`) or key names (`keys`).
fn kv_read(g: &mut SchemaGenerator) -> Schema {
    let entry = g.subschema_for::<KvEntry>();
    json_schema!({"anyOf": [entry.clone(), {"type": "array", "items": entry}, {"type": "array", "items": {"type": "string"}}]})
}

/// `{index, <plural>: [{name, <what>: spec}]}`, the shape of route and consumer lists.
fn named_list<T: JsonSchema>(g: &mut SchemaGenerator, what: &str, plural: &str) -> Schema {
    let spec = g.subschema_for::<T>();
    json_schema!({
        "type": "object",
        "required": ["index", plural],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            plural: {"type": "array", "items": {
                "type": "object",
                "required": ["name", what],
                "properties": {"name": {"type": "string"}, what: spec},
            }},
        },
    })
}

fn route_list(g: &mut SchemaGenerator) -> Schema {
    named_list::<RouteSpec>(g, "route", "routes")
}

fn consumer_list(g: &mut SchemaGenerator) -> Schema {
    named_list::<ConsumerSpec>(g, "consumer", "consumers")
}

/// RFC 9457 problem details, the body of every error on `/api/v1`.
#[derive(serde::Serialize, JsonSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What is wrong, naming the field.
    pub detail: String,
}

const NS: Param = Param { name: "namespace", schema: name, description: "Namespace (default `default`)" };
const INDEX: Param = Param { name: "index", schema: index, description: "Blocking read: answer once the index passes this" };
const WAIT: Param = Param { name: "wait", schema: wait, description: "Blocking read: the longest wait (default 5m, at most 10m)" };
const RECURSE: Param = Param { name: "recurse", schema: boolean, description: "Every entry under the prefix" };
const KEYS: Param = Param { name: "keys", schema: boolean, description: "Key names only" };
const SEPARATOR: Param = Param { name: "separator", schema: text, description: "With keys: fold everything below the next separator" };
const CAS: Param = Param { name: "cas", schema: index, description: "Only at this modify index (0 on writes: only if absent)" };
const SERVICE: Param = Param { name: "service", schema: name, description: "Only this service" };

macro_rules! op {
    ($method:literal $path:literal, $tag:literal, $summary:literal, [$($q:expr),*], $body:expr, $status:literal => $answer:expr) => {
        Operation { method: $method, path: $path, tag: $tag, summary: $summary, query: &[$($q),*], body: $body, status: $status, answer: $answer }
    };
}

/// Every public operation of the API listener outside the Consul API.
pub const OPERATIONS: &[Operation] = &[
    op!("get" "/api/v1/namespaces", "registry", "List namespaces that hold services", [], Body::None, 200 => Answer::Json(strings)),
    op!("get" "/api/v1/services", "registry", "List services with instance and passing counts", [NS, INDEX, WAIT], Body::None, 200 => Answer::Json(of::<Vec<ServiceSummary>>)),
    op!("put" "/api/v1/services/{service}", "registry", "Define or update a service", [NS], Body::Json(of::<ServiceSpec>), 200 => Answer::Json(of::<Service>)),
    op!("get" "/api/v1/services/{service}", "registry", "A service's definition and instances", [NS, INDEX, WAIT], Body::None, 200 => Answer::Json(of::<ServiceDetail>)),
    op!("delete" "/api/v1/services/{service}", "registry", "Delete a service and all its instances", [NS], Body::None, 204 => Answer::Empty),
    op!("post" "/api/v1/services/{service}/instances", "registry", "Register an instance", [NS], Body::Json(of::<InstanceSpec>), 201 => Answer::Json(of::<Registered>)),
    op!("get" "/api/v1/services/{service}/instances", "registry", "Discover instances (serving ones unless healthy=false)",
        [NS, INDEX, WAIT, Param { name: "healthy", schema: boolean, description: "Only serving instances (default true)" },
         Param { name: "tag", schema: text, description: "Only instances with this tag" },
         Param { name: "zone", schema: name, description: "Only instances in this zone" }],
        Body::None, 200 => Answer::Json(of::<InstanceList>)),
    op!("get" "/api/v1/services/{service}/instances/{id}", "registry", "One instance", [NS], Body::None, 200 => Answer::Json(of::<Instance>)),
    op!("delete" "/api/v1/services/{service}/instances/{id}", "registry", "Deregister an instance", [NS], Body::None, 204 => Answer::Empty),
    op!("put" "/api/v1/services/{service}/instances/{id}/heartbeat", "registry", "Heartbeat of an ephemeral instance; 404 if unknown (re-register)", [NS], Body::None, 204 => Answer::Empty),
    op!("put" "/api/v1/services/{service}/instances/{id}/checks/{check}", "registry", "Set a TTL check's status", [NS], Body::Json(of::<CheckUpdate>), 204 => Answer::Empty),
    op!("put" "/api/v1/services/{service}/instances/{id}/maintenance", "registry", "Enter or leave maintenance", [NS], Body::Json(of::<MaintenanceBody>), 204 => Answer::Empty),
    op!("put" "/api/v1/services/{service}/instances/{id}/passive", "registry", "A gateway's passive-health report; shown on the instance", [NS], Body::Json(of::<PassiveBody>), 204 => Answer::Empty),
    op!("put" "/api/v1/services/{service}/instances/{id}/report", "registry", "The instance reports its state, tasks and planned work (report write)", [NS], Body::Json(of::<zhili_model::report::ReportSpec>), 204 => Answer::Empty),
    op!("get" "/api/v1/services/{service}/reports", "registry", "Reports of the service's instances (report read); blocking with index and wait", [NS, INDEX, WAIT], Body::None, 200 => Answer::Json(of::<ReportList>)),
    op!("put" "/api/v1/services/{service}/breaker", "registry", "A gateway reports a circuit-breaker transition", [NS], Body::Json(of::<BreakerBody>), 204 => Answer::Empty),
    op!("get" "/api/v1/events/registry", "events", "Server-sent events of registry changes", [NS, SERVICE], Body::None, 200 => Answer::Stream),
    op!("get" "/api/v1/events/kv", "events", "Server-sent events of KV changes under a prefix",
        [Param { name: "prefix", schema: text, description: "Key prefix" }, Param { name: "index", schema: index, description: "Resume after this index" }],
        Body::None, 200 => Answer::Stream),
    op!("get" "/api/v1/sd/prometheus", "discovery", "Prometheus HTTP service discovery",
        [NS, SERVICE, Param { name: "all", schema: boolean, description: "Every instance, not only serving ones" }],
        Body::None, 200 => Answer::Json(of::<Vec<TargetGroup>>)),
    op!("get" "/api/v1/routes", "gateway", "List gateway routes", [INDEX, WAIT], Body::None, 200 => Answer::Json(route_list)),
    op!("get" "/api/v1/routes/{route}", "gateway", "One gateway route", [], Body::None, 200 => Answer::Json(of::<RouteSpec>)),
    op!("put" "/api/v1/routes/{route}", "gateway", "Create or replace a gateway route (validated by compiling it)", [], Body::Json(of::<RouteSpec>), 200 => Answer::Json(of::<Stored>)),
    op!("delete" "/api/v1/routes/{route}", "gateway", "Delete a gateway route", [], Body::None, 204 => Answer::Empty),
    op!("get" "/api/v1/consumers", "gateway", "List gateway consumers (API keys as digests)", [INDEX, WAIT], Body::None, 200 => Answer::Json(consumer_list)),
    op!("get" "/api/v1/consumers/{consumer}", "gateway", "One gateway consumer", [], Body::None, 200 => Answer::Json(of::<ConsumerSpec>)),
    op!("put" "/api/v1/consumers/{consumer}", "gateway", "Create or replace a consumer; keys are stored as SHA-256 digests", [], Body::Json(of::<ConsumerSpec>), 200 => Answer::Json(of::<Stored>)),
    op!("delete" "/api/v1/consumers/{consumer}", "gateway", "Delete a gateway consumer", [], Body::None, 204 => Answer::Empty),
    op!("get" "/api/v1/plans", "plans", "List plans with their status", [], Body::None, 200 => Answer::Json(any_object)),
    op!("put" "/api/v1/plans/{name}", "plans", "Apply a plan: validated in full against live state, then scheduled or started", [],
        Body::Json(of::<zhili_model::plan::PlanSpec>), 201 => Answer::Json(any_object)),
    op!("get" "/api/v1/plans/{name}", "plans", "A plan: its definition, status, step, changes and every decision with its reason", [], Body::None, 200 => Answer::Json(any_object)),
    op!("delete" "/api/v1/plans/{name}", "plans", "Delete a finished plan", [], Body::None, 204 => Answer::Empty),
    op!("post" "/api/v1/plans/{name}/{action}", "plans", "pause, resume, abort or approve (the plan's approve step)", [], Body::None, 200 => Answer::Json(any_object)),
    op!("get" "/api/v1/kv", "kv", "List or read the whole keyspace (keys or recurse required)", [RECURSE, KEYS, SEPARATOR, INDEX, WAIT], Body::None, 200 => Answer::Json(kv_read)),
    op!("get" "/api/v1/kv/{key}", "kv", "Read a key, a prefix (recurse) or key names (keys)",
        [RECURSE, KEYS, SEPARATOR, Param { name: "raw", schema: boolean, description: "The value's bytes alone" }, INDEX, WAIT],
        Body::None, 200 => Answer::JsonOrRaw(kv_read)),
    op!("put" "/api/v1/kv/{key}", "kv", "Write a key; the body is the raw value (at most 512 KiB)", [CAS], Body::Raw, 200 => Answer::Json(of::<Written>)),
    op!("delete" "/api/v1/kv/{key}", "kv", "Delete a key, or every key under it (recurse)", [RECURSE, CAS], Body::None, 200 => Answer::Json(of::<Written>)),
    op!("post" "/api/v1/acl/bootstrap", "acl", "Create the first management token (once)", [], Body::None, 200 => Answer::Json(of::<Token>)),
    op!("get" "/api/v1/acl/policies", "acl", "List policies", [], Body::None, 200 => Answer::Json(of::<Vec<PolicySpec>>)),
    op!("post" "/api/v1/acl/policies", "acl", "Create or replace a policy", [], Body::Json(of::<PolicySpec>), 201 => Answer::Json(of::<PolicySpec>)),
    op!("get" "/api/v1/acl/policies/{name}", "acl", "Read a policy", [], Body::None, 200 => Answer::Json(of::<PolicySpec>)),
    op!("put" "/api/v1/acl/policies/{name}", "acl", "Create or replace a policy", [], Body::Json(of::<PolicySpec>), 200 => Answer::Json(of::<PolicySpec>)),
    op!("delete" "/api/v1/acl/policies/{name}", "acl", "Delete a policy", [], Body::None, 204 => Answer::Empty),
    op!("get" "/api/v1/acl/tokens", "acl", "List tokens (secrets shown to acl writers only)", [], Body::None, 200 => Answer::Json(of::<Vec<Token>>)),
    op!("post" "/api/v1/acl/tokens", "acl", "Create a token", [], Body::Json(of::<TokenSpec>), 201 => Answer::Json(of::<Token>)),
    op!("get" "/api/v1/acl/tokens/{accessor}", "acl", "Read a token", [], Body::None, 200 => Answer::Json(of::<Token>)),
    op!("delete" "/api/v1/acl/tokens/{accessor}", "acl", "Delete a token", [], Body::None, 204 => Answer::Empty),
    op!("get" "/api/v1/acl/token/self", "acl", "The caller's own token", [], Body::None, 200 => Answer::Json(of::<Token>)),
    op!("post" "/api/v1/acl/authorize", "acl", "What the caller's token may do: answers each {resource, name, access} with allow", [],
        Body::Json(of::<Vec<crate::native::acl::AuthorizeCheck>>), 200 => Answer::Json(of::<Vec<crate::native::acl::AuthorizeAnswer>>)),
    op!("get" "/api/v1/topology", "gateway", "Who calls whom through the gateway: services by health, edges with requests/s, error ratio, p99",
        [Param { name: "window", schema: wait, description: "How far back (default 60s, 1s to 5m)" }], Body::None, 200 => Answer::Json(any_object)),
    op!("get" "/metrics", "ops", "Prometheus metrics (OpenMetrics text)", [], Body::None, 200 => Answer::Text("application/openmetrics-text; version=1.0.0; charset=utf-8")),
    op!("get" "/health/live", "ops", "Liveness", [], Body::None, 200 => Answer::Text("text/plain; charset=utf-8")),
    op!("get" "/health/ready", "ops", "Readiness: 200 once state is loaded, 503 before", [], Body::None, 200 => Answer::Text("text/plain; charset=utf-8")),
    op!("get" "/api/openapi.json", "ops", "This document", [], Body::None, 200 => Answer::Json(any_object)),
];

/// Request bodies and parameters are described as the handlers parse them, answers as they are
/// written (fields skipped when empty are optional): two generators, whose shared type names are
/// told apart by an `Answer` prefix on the second.
struct Generators {
    reads: SchemaGenerator,
    answers: SchemaGenerator,
}

/// Where the answers' generator puts its definitions until they are renamed.
const ANSWERS_PATH: &str = "/components/x-answers";

fn content(media: &str, schema: Schema) -> Value {
    json!({ media: { "schema": schema } })
}

fn operation(op: &Operation, gens: &mut Generators) -> Value {
    let g = &mut gens.reads;
    let mut params: Vec<Value> = op
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|p| {
            // Names of services, routes and the like follow the name rule; ids and keys are free text.
            let schema =
                if matches!(p, "id" | "key" | "check" | "accessor") { json!({"type": "string", "minLength": 1, "maxLength": 256}) } else { name(g).to_value() };
            json!({"name": p, "in": "path", "required": true, "schema": schema})
        })
        .collect();
    for q in op.query {
        params.push(json!({"name": q.name, "in": "query", "required": false, "description": q.description, "schema": (q.schema)(g)}));
    }
    let body = match &op.body {
        Body::None => None,
        Body::Json(s) => Some(json!({"required": true, "content": content("application/json", s(g))})),
        Body::Raw => {
            Some(json!({"required": false, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary", "maxLength": 524_288}}}}))
        }
    };
    let a = &mut gens.answers;
    let ok = match &op.answer {
        Answer::Json(s) => json!({"description": "OK", "content": content("application/json", s(a))}),
        Answer::JsonOrRaw(s) => {
            let c = json!({
                "application/json": {"schema": s(a)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            });
            json!({"description": "OK (the raw value with raw=true)", "content": c})
        }
        Answer::Empty => json!({"description": "Done"}),
        Answer::Text(media) => json!({"description": "OK", "content": content(media, any_text(a))}),
        Answer::Stream => json!({"description": "An endless stream of events", "content": content("text/event-stream", any_text(a))}),
    };
    let mut responses = Map::new();
    responses.insert(op.status.to_string(), ok);
    responses.insert(
        "default".into(),
        json!({"description": "An error: problem+json (RFC 9457) whose detail names the field", "content": content("application/problem+json", a.subschema_for::<Problem>())}),
    );
    let mut o = Map::new();
    o.insert("tags".into(), json!([op.tag]));
    o.insert("summary".into(), json!(op.summary));
    o.insert("operationId".into(), json!(format!("{}{}", op.method, op.path.replace(['{', '}'], "").replace('/', "_"))));
    o.insert("parameters".into(), json!(params));
    o.insert("responses".into(), Value::Object(responses));
    o.insert("security".into(), json!([{"token": []}, {}]));
    if let Some(body) = body {
        o.insert("requestBody".into(), body);
    }
    Value::Object(o)
}

/// The document, generated on each call (it is small and asked for rarely).
pub fn document() -> Value {
    let settings = |path: &'static str| {
        SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = path.into();
        })
    };
    let mut gens = Generators {
        reads: settings("/components/schemas").for_deserialize().into_generator(),
        answers: settings(ANSWERS_PATH).for_serialize().into_generator(),
    };
    let mut paths = Map::new();
    for op in OPERATIONS {
        let o = operation(op, &mut gens);
        if let Value::Object(methods) = paths.entry(op.path.to_string()).or_insert_with(|| json!({})) {
            methods.insert(op.method.to_string(), o);
        }
    }
    let mut schemas = gens.reads.take_definitions(true);
    for (name, schema) in gens.answers.take_definitions(true) {
        schemas.insert(format!("Answer{name}"), schema);
    }
    let doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Zhili native API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Reads carry X-Zhili-Index. Errors are application/problem+json. Tokens: Authorization: Bearer <secret> or X-Zhili-Token.",
        },
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": paths,
    });
    // Point the answers' references at their prefixed names.
    let text = doc.to_string().replace(&format!("\"#{ANSWERS_PATH}/"), "\"#/components/schemas/Answer");
    serde_json::from_str(&text).unwrap_or(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves_and_bodies_have_schemas() {
        let doc = document();
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"").skip(1) {
            let target = r.split('"').next().unwrap_or_default();
            let pointer = target.strip_prefix('#').expect("local ref");
            assert!(doc.pointer(pointer).is_some(), "dangling {target}");
        }
        assert!(!text.contains("x-answers"), "answer references renamed");
        let register = &doc["paths"]["/api/v1/services/{service}/instances"]["post"];
        assert!(register["requestBody"]["content"]["application/json"]["schema"].is_object());
        let spec = doc.pointer("/components/schemas/InstanceSpec").expect("InstanceSpec schema");
        assert!(spec["properties"]["address"].is_object(), "{spec}");
        assert_eq!(spec["additionalProperties"], false, "deny_unknown_fields is in the schema");
        let entry = doc.pointer("/components/schemas/AnswerKvEntry").expect("KvEntry answer schema");
        let required: Vec<&str> = entry["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(required.contains(&"key") && !required.contains(&"flags"), "fields skipped when empty are optional: {entry}");
    }
}

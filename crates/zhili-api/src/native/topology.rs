//! `GET /api/v1/topology?window=60s`: who calls whom through the embedded gateway. Nodes are the
//! services the token may read (coloured by the health of their instances) and the gateway;
//! edges run from the gateway to each service a route sent traffic to in the window, and from
//! each authenticated consumer to the services it called, with requests per second, error
//! ratio and p99 from the gateway's own counters.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use zhili_model::acl::{Access, Resource};

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::QueryPairs;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/topology", get(topology))
}

/// (requests, errors, worst p99) of one edge.
type EdgeSum = (u64, u64, Option<f64>);

fn add(e: &mut EdgeSum, t: &zhili_gateway::TargetTraffic) {
    e.0 += t.requests;
    e.1 += t.errors;
    e.2 = match (e.2, t.p99_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
}

async fn topology(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    let window = match q.get("window") {
        Some(w) => zhili_model::parse_duration("window", w)?.clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(300)),
        None => std::time::Duration::from_secs(60),
    };
    let mut nodes: Vec<Value> = Vec::new();
    for ns in s.registry.namespaces() {
        for svc in s.registry.list_services(&ns).1 {
            if !caller.can(Resource::Service, &svc.name, Access::Read) {
                continue;
            }
            let health = match (svc.instances, svc.passing) {
                (0, _) => "empty",
                (n, p) if p == n => "passing",
                (_, 0) => "critical",
                _ => "warning",
            };
            nodes.push(json!({"id": format!("{ns}/{}", svc.name), "kind": "service", "namespace": ns, "name": svc.name,
                "instances": svc.instances, "passing": svc.passing, "health": health}));
        }
    }
    // (from, to, route) → traffic.
    let mut edges: BTreeMap<(String, String, String), EdgeSum> = BTreeMap::new();
    if let Some(gw) = &s.gateway {
        nodes.push(json!({"id": "gateway", "kind": "gateway", "name": "gateway", "health": "passing"}));
        let since = zhili_plans::now_ms().saturating_sub(window.as_millis() as u64);
        for ((route, ns, service, _subset), t) in gw.traffic_all(since) {
            if t.requests == 0 || !caller.can(Resource::Service, &service, Access::Read) {
                continue;
            }
            add(edges.entry(("gateway".into(), format!("{ns}/{service}"), route)).or_insert((0, 0, None)), &t);
        }
        let mut consumers = std::collections::BTreeSet::new();
        for ((consumer, ns, service), t) in gw.caller_traffic(since) {
            if !caller.can(Resource::Service, &service, Access::Read) || !caller.can(Resource::Consumer, &consumer, Access::Read) {
                continue;
            }
            let from = format!("consumer/{consumer}");
            add(edges.entry((from.clone(), format!("{ns}/{service}"), String::new())).or_insert((0, 0, None)), &t);
            if consumers.insert(from.clone()) {
                nodes.push(json!({"id": from, "kind": "consumer", "name": consumer, "health": "passing"}));
            }
        }
    }
    let secs = window.as_secs_f64();
    let edges: Vec<Value> = edges
        .into_iter()
        .map(|((from, to, route), (requests, errors, p99))| {
            json!({"from": from, "to": to, "route": route, "requests": requests, "requests_per_s": requests as f64 / secs,
                "error_ratio": errors as f64 / requests.max(1) as f64, "p99_ms": p99})
        })
        .collect();
    Ok(Json(json!({"window_s": secs, "nodes": nodes, "edges": edges})).into_response())
}

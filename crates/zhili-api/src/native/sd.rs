//! Prometheus HTTP service discovery (`http_sd_configs`): every serving instance as a target
//! group with `__meta_zhili_*` labels. (Prometheus's `consul_sd_configs` works against the
//! Consul API too; this endpoint serves Prometheus builds without the Consul plugin, such as
//! Debian's.)

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use zhili_model::acl::{Access, Resource};

use super::indexed;
use crate::auth::Caller;
use crate::error::ApiResult;
use crate::extract::QueryPairs;
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/sd/prometheus", get(targets))
}

/// One Prometheus HTTP SD target group.
#[derive(Serialize, schemars::JsonSchema)]
pub struct TargetGroup {
    targets: Vec<String>,
    labels: BTreeMap<String, String>,
}

/// Prometheus label names allow `[a-zA-Z0-9_]` only.
fn label_name(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

async fn targets(State(s): State<AppState>, caller: Caller, q: QueryPairs) -> ApiResult<Response> {
    let ns = q.namespace()?;
    let only = q.get("service");
    let all = q.flag("all")?.unwrap_or(false);
    let (index, list) = s.registry.all_instances(Some(&ns));
    let groups: Vec<TargetGroup> = list
        .into_iter()
        .filter(|i| only.is_none_or(|o| o == i.service) && (all || i.is_serving()) && caller.can(Resource::Service, &i.service, Access::Read))
        .map(|i| {
            let host = if i.address.contains(':') { format!("[{}]", i.address) } else { i.address.clone() };
            let mut labels = BTreeMap::from([
                ("__meta_zhili_namespace".to_string(), i.namespace.clone()),
                ("__meta_zhili_service".to_string(), i.service.clone()),
                ("__meta_zhili_instance_id".to_string(), i.id.clone()),
                ("__meta_zhili_health".to_string(), i.health.as_str().to_string()),
                // Wrapped in commas, as Consul SD does, so `.*,tag,.*` regexes match whole tags.
                ("__meta_zhili_tags".to_string(), format!(",{},", i.tags.join(","))),
            ]);
            if let Some(z) = &i.zone {
                labels.insert("__meta_zhili_zone".into(), z.clone());
            }
            for (k, v) in &i.metadata {
                labels.insert(format!("__meta_zhili_metadata_{}", label_name(k)), v.clone());
            }
            TargetGroup { targets: vec![format!("{host}:{}", i.port)], labels }
        })
        .collect();
    Ok(indexed(index, Json(groups)))
}

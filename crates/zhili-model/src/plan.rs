//! Plans: planned work (maintenance windows, weighted rollouts, config changes, approvals,
//! waits) that runs on schedule and halts by itself when the feedback from the services turns
//! bad. This module is the definition and its self-contained validation; whether the services,
//! routes and subsets it names exist is checked by the plans engine against live state.

use serde::{Deserialize, Serialize};

use crate::event::rfc3339;
use crate::route::Subset;
use crate::validate::{self, MAX_TEXT_LEN};
use crate::{parse_duration, ValidationError};

pub const MAX_PLAN_STEPS: usize = 64;
pub const MAX_GATES: usize = 16;
pub const MAX_ROLLOUT_STEPS: usize = 20;

/// Body of `PUT /api/v1/plans/{plan}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// RFC 3339; the plan waits in `scheduled` until then (now when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<String>,
    /// What a failing gate does: `pause` the plan where it is, or `rollback` everything it changed.
    #[serde(default)]
    pub on_gate_failure: GateFailure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GateFailure {
    #[default]
    Pause,
    Rollback,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Step {
    /// Drain the matching instances (maintenance on) for `duration`, then return them.
    Maintenance {
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        selector: Option<Selector>,
        duration: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gates: Vec<Gate>,
    },
    /// Move a route's traffic from one subset of its service to another in steps (percent of
    /// traffic on `to`), each held for `bake` while the gates are checked.
    Rollout {
        route: String,
        from: Subset,
        to: Subset,
        steps: Vec<u32>,
        bake: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gates: Vec<Gate>,
    },
    /// Write a KV value (the previous one is kept, to restore on rollback).
    Config { key: String, value: String },
    /// Wait for a person: `POST /api/v1/plans/{plan}/approve`.
    Approve {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Wait {
        duration: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gates: Vec<Gate>,
    },
}

/// Which instances of a service a maintenance step takes (all of them when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
}

impl Selector {
    pub fn matches(&self, i: &crate::Instance) -> bool {
        self.tags.iter().all(|t| i.tags.contains(t))
            && self.version.as_ref().is_none_or(|v| i.version.as_ref() == Some(v))
            && self.zone.as_ref().is_none_or(|z| i.zone.as_ref() == Some(z))
            && (self.ids.is_empty() || self.ids.contains(&i.id))
    }
}

/// A condition checked continuously while a step bakes. Exactly one of `metric`, `no_event`
/// and `report`. Missing data (no traffic, an unknown service) fails a gate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// For `healthy_ratio`: the service (default: the step's, or the rollout route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Fails when an event of this type (a prefix) is appended to the stream during the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_event: Option<EventMatch>,
    /// Fails while a reporting instance of the service is in one of `states`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportGate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Share of the rollout target's gateway requests answered 5xx or failed upstream (0..1).
    ErrorRatio,
    /// The rollout target's 99th percentile gateway latency, in milliseconds.
    P99Ms,
    /// Share of the service's instances that are serving (0..1).
    HealthyRatio,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    pub stream: String,
    #[serde(rename = "type")]
    pub type_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportGate {
    pub service: String,
    pub states: Vec<String>,
}

/// The plan's lifecycle (`GET /api/v1/plans/{plan}`'s `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Scheduled,
    Running,
    Paused,
    Succeeded,
    RolledBack,
    Aborted,
}

impl PlanStatus {
    pub fn finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::RolledBack | Self::Aborted)
    }
}

fn duration(field: &str, v: &str) -> Result<(), ValidationError> {
    let d = parse_duration(field, v)?;
    if d.is_zero() {
        return Err(ValidationError::new(field, "must be longer than zero"));
    }
    Ok(())
}

impl Gate {
    fn validate(&self, field: &str, in_rollout: bool) -> Result<(), ValidationError> {
        let kinds = [self.metric.is_some(), self.no_event.is_some(), self.report.is_some()].iter().filter(|b| **b).count();
        if kinds != 1 {
            return Err(ValidationError::new(field, "give exactly one of metric, no_event and report"));
        }
        if let Some(m) = self.metric {
            let bound = match (m, self.max, self.min) {
                (Metric::ErrorRatio | Metric::P99Ms, Some(max), None) => max,
                (Metric::HealthyRatio, None, Some(min)) => min,
                (Metric::HealthyRatio, _, _) => return Err(ValidationError::new(format!("{field}.min"), "healthy_ratio takes min (and no max)")),
                _ => return Err(ValidationError::new(format!("{field}.max"), "error_ratio and p99_ms take max (and no min)")),
            };
            let ratio = matches!(m, Metric::ErrorRatio | Metric::HealthyRatio);
            if !bound.is_finite() || bound < 0.0 || (ratio && bound > 1.0) {
                let f = if m == Metric::HealthyRatio { "min" } else { "max" };
                return Err(ValidationError::new(format!("{field}.{f}"), if ratio { "must be between 0 and 1" } else { "must be a positive number" }));
            }
            if !in_rollout && m != Metric::HealthyRatio {
                return Err(ValidationError::new(format!("{field}.metric"), "error_ratio and p99_ms gate a rollout's target; use healthy_ratio here"));
            }
        } else if self.max.is_some() || self.min.is_some() {
            return Err(ValidationError::new(field, "max and min go with metric"));
        }
        if let Some(s) = &self.service {
            validate::name(&format!("{field}.service"), s)?;
        }
        if let Some(e) = &self.no_event {
            if e.stream.is_empty() || e.stream.len() > 256 {
                return Err(ValidationError::new(format!("{field}.no_event.stream"), "1 to 256 bytes"));
            }
            if e.type_prefix.is_empty() || e.type_prefix.len() > 256 {
                return Err(ValidationError::new(format!("{field}.no_event.type"), "1 to 256 bytes"));
            }
        }
        if let Some(r) = &self.report {
            validate::name(&format!("{field}.report.service"), &r.service)?;
            if r.states.is_empty() || r.states.len() > 16 {
                return Err(ValidationError::new(format!("{field}.report.states"), "1 to 16 states"));
            }
        }
        Ok(())
    }
}

fn gates(field: &str, gates: &[Gate], in_rollout: bool) -> Result<(), ValidationError> {
    if gates.len() > MAX_GATES {
        return Err(ValidationError::new(field, format!("at most {MAX_GATES} gates")));
    }
    for (i, g) in gates.iter().enumerate() {
        g.validate(&format!("{field}[{i}]"), in_rollout)?;
    }
    Ok(())
}

impl PlanSpec {
    /// Everything that can be checked without live state.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(t) = &self.start_at {
            if !rfc3339(t) {
                return Err(ValidationError::new("start_at", "must be an RFC 3339 time (e.g. 2026-12-01T02:00:00Z)"));
            }
        }
        if let Some(d) = &self.description {
            validate::text("description", d)?;
            if d.len() > MAX_TEXT_LEN {
                return Err(ValidationError::new("description", format!("at most {MAX_TEXT_LEN} bytes")));
            }
        }
        if self.steps.is_empty() || self.steps.len() > MAX_PLAN_STEPS {
            return Err(ValidationError::new("steps", format!("1 to {MAX_PLAN_STEPS} steps")));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let f = |name: &str| format!("steps[{i}].{name}");
            match step {
                Step::Maintenance { service, namespace, selector, duration: d, gates: g } => {
                    validate::name(&f("service"), service)?;
                    if let Some(ns) = namespace {
                        validate::name(&f("namespace"), ns)?;
                    }
                    if let Some(sel) = selector {
                        validate::tags(&f("selector.tags"), &sel.tags)?;
                        for (j, id) in sel.ids.iter().enumerate() {
                            validate::instance_id(&f(&format!("selector.ids[{j}]")), id)?;
                        }
                    }
                    duration(&f("duration"), d)?;
                    gates(&f("gates"), g, false)?;
                }
                Step::Rollout { route, from, to, steps, bake, gates: g } => {
                    validate::name(&f("route"), route)?;
                    if from == to {
                        return Err(ValidationError::new(f("to"), "must differ from from"));
                    }
                    if steps.is_empty() || steps.len() > MAX_ROLLOUT_STEPS {
                        return Err(ValidationError::new(f("steps"), format!("1 to {MAX_ROLLOUT_STEPS} percentages")));
                    }
                    let mut last = 0;
                    for (j, p) in steps.iter().enumerate() {
                        if *p == 0 || *p > 100 || *p <= last {
                            return Err(ValidationError::new(f(&format!("steps[{j}]")), "percentages rise from 1 to 100"));
                        }
                        last = *p;
                    }
                    duration(&f("bake"), bake)?;
                    gates(&f("gates"), g, true)?;
                }
                Step::Config { key, value } => {
                    validate::kv_key(&f("key"), key)?;
                    validate::kv_value(&f("value"), value.as_bytes())?;
                }
                Step::Approve { message } => {
                    if let Some(m) = message {
                        validate::text(&f("message"), m)?;
                    }
                }
                Step::Wait { duration: d, gates: g } => {
                    duration(&f("duration"), d)?;
                    gates(&f("gates"), g, false)?;
                }
            }
        }
        Ok(())
    }

    /// Routes and services the plan changes (two active plans may not share one).
    pub fn touches(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Maintenance { service, namespace, .. } => Some(format!("service {}/{service}", namespace.as_deref().unwrap_or(crate::DEFAULT_NAMESPACE))),
                Step::Rollout { route, .. } => Some(format!("route {route}")),
                Step::Config { key, .. } => Some(format!("key {key}")),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<(), ValidationError> {
        serde_json::from_str::<PlanSpec>(json).map_err(|e| ValidationError::new("json", e.to_string()))?.validate()
    }

    #[test]
    fn a_full_plan_is_valid() {
        let plan = r#"{"start_at": "2026-12-01T02:00:00Z", "on_gate_failure": "rollback", "steps": [
            {"kind": "maintenance", "service": "web", "selector": {"version": "v1"}, "duration": "30s",
             "gates": [{"metric": "healthy_ratio", "min": 0.5}]},
            {"kind": "rollout", "route": "web", "from": {"version": "v1"}, "to": {"version": "v2"}, "steps": [1, 5, 25, 50, 100],
             "bake": "10s", "gates": [{"metric": "error_ratio", "max": 0.05}, {"metric": "p99_ms", "max": 250},
             {"no_event": {"stream": "$gateway", "type": "io.zhili.gateway.breaker.opened"}}, {"report": {"service": "web", "states": ["degraded"]}}]},
            {"kind": "config", "key": "config/web/flag", "value": "on"},
            {"kind": "approve", "message": "check the dashboards"},
            {"kind": "wait", "duration": "1m"}]}"#;
        check(plan).unwrap();
        let spec: PlanSpec = serde_json::from_str(plan).unwrap();
        assert_eq!(spec.touches(), ["key config/web/flag", "route web", "service default/web"]);
    }

    #[test]
    fn bad_plans_name_the_field() {
        for (json, field) in [
            (r#"{"steps": []}"#, "steps"),
            (r#"{"start_at": "soon", "steps": [{"kind": "wait", "duration": "1s"}]}"#, "start_at"),
            (r#"{"steps": [{"kind": "wait", "duration": "0s"}]}"#, "steps[0].duration"),
            (r#"{"steps": [{"kind": "maintenance", "service": "bad name", "duration": "1s"}]}"#, "steps[0].service"),
            (
                r#"{"steps": [{"kind": "rollout", "route": "r", "from": {"version": "a"}, "to": {"version": "a"}, "steps": [100], "bake": "1s"}]}"#,
                "steps[0].to",
            ),
            (
                r#"{"steps": [{"kind": "rollout", "route": "r", "from": {"version": "a"}, "to": {"version": "b"}, "steps": [5, 1], "bake": "1s"}]}"#,
                "steps[0].steps[1]",
            ),
            (
                r#"{"steps": [{"kind": "rollout", "route": "r", "from": {}, "to": {"version": "b"}, "steps": [100], "bake": "1s", "gates": [{"metric": "error_ratio", "max": 2}]}]}"#,
                "steps[0].gates[0].max",
            ),
            (r#"{"steps": [{"kind": "wait", "duration": "1s", "gates": [{"metric": "error_ratio", "max": 0.1}]}]}"#, "steps[0].gates[0].metric"),
            (r#"{"steps": [{"kind": "wait", "duration": "1s", "gates": [{"metric": "healthy_ratio", "max": 0.1}]}]}"#, "steps[0].gates[0].min"),
            (r#"{"steps": [{"kind": "wait", "duration": "1s", "gates": [{}]}]}"#, "steps[0].gates[0]"),
            (r#"{"steps": [{"kind": "config", "key": "", "value": "x"}]}"#, "steps[0].key"),
        ] {
            assert_eq!(check(json).unwrap_err().field, field, "{json}");
        }
        // Unknown kinds and fields do not parse.
        for json in [r#"{"steps": [{"kind": "reboot"}]}"#, r#"{"steps": [{"kind": "wait", "duration": "1s", "colour": 1}]}"#] {
            assert!(serde_json::from_str::<PlanSpec>(json).is_err(), "{json}");
        }
    }
}

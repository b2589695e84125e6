//! Service reports (业务计划反馈): what an instance says about itself — its state, the tasks it
//! is working on and the work it has planned — readable by operators, other services and plan
//! gates. Bounded and validated at the edge like every other input.

use serde::{Deserialize, Serialize};

use crate::event::rfc3339;
use crate::validate::MAX_TEXT_LEN;
use crate::ValidationError;

pub const MAX_REPORT_ITEMS: usize = 64;
const MAX_STATE_LEN: usize = 32;
const MAX_ITEM_NAME_LEN: usize = 256;

/// Body of `PUT /api/v1/services/{service}/instances/{id}/report`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// A short lowercase word: `ok`, `degraded`, `draining`, `busy`, `starting`, ... (what plan
    /// gates compare against).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Work under way now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<ReportTask>,
    /// Work the instance plans to do (a deploy, a migration, a batch job).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub planned: Vec<PlannedWork>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportTask {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Percent done, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlannedWork {
    pub name: String,
    /// RFC 3339 start and end, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// A stored report: what the instance said, and when the server received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InstanceReport {
    #[serde(flatten)]
    pub spec: ReportSpec,
    /// Unix milliseconds.
    pub reported_ms: u64,
}

fn bounded_text(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.len() > max {
        return Err(ValidationError::new(field, format!("must be at most {max} bytes")));
    }
    if value.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ValidationError::new(field, "must not contain control characters"));
    }
    Ok(())
}

impl ReportSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let s = &self.state;
        if s.is_empty() || s.len() > MAX_STATE_LEN || !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)) {
            return Err(ValidationError::new("state", format!("1 to {MAX_STATE_LEN} lowercase letters, digits or -_. (e.g. \"ok\", \"degraded\")")));
        }
        if let Some(m) = &self.message {
            bounded_text("message", m, MAX_TEXT_LEN)?;
        }
        for (what, n) in [("tasks", self.tasks.len()), ("planned", self.planned.len())] {
            if n > MAX_REPORT_ITEMS {
                return Err(ValidationError::new(what, format!("at most {MAX_REPORT_ITEMS} items")));
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if t.name.is_empty() {
                return Err(ValidationError::new(format!("tasks[{i}].name"), "must not be empty"));
            }
            bounded_text(&format!("tasks[{i}].name"), &t.name, MAX_ITEM_NAME_LEN)?;
            if let Some(st) = &t.status {
                bounded_text(&format!("tasks[{i}].status"), st, MAX_ITEM_NAME_LEN)?;
            }
            if t.progress.is_some_and(|p| p > 100) {
                return Err(ValidationError::new(format!("tasks[{i}].progress"), "must be between 0 and 100"));
            }
        }
        for (i, p) in self.planned.iter().enumerate() {
            if p.name.is_empty() {
                return Err(ValidationError::new(format!("planned[{i}].name"), "must not be empty"));
            }
            bounded_text(&format!("planned[{i}].name"), &p.name, MAX_ITEM_NAME_LEN)?;
            for (f, v) in [("at", &p.at), ("until", &p.until)] {
                if v.as_deref().is_some_and(|v| !rfc3339(v)) {
                    return Err(ValidationError::new(format!("planned[{i}].{f}"), "must be an RFC 3339 time (e.g. 2026-12-01T02:00:00Z)"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<(), ValidationError> {
        serde_json::from_str::<ReportSpec>(json).unwrap().validate()
    }

    #[test]
    fn reports_are_validated_naming_the_field() {
        assert!(spec(r#"{"state": "ok"}"#).is_ok());
        assert!(spec(
            r#"{"state": "busy", "message": "reindexing", "tasks": [{"name": "reindex", "progress": 40}],
            "planned": [{"name": "migrate", "at": "2026-12-01T02:00:00Z", "until": "2026-12-01T03:00:00Z"}]}"#
        )
        .is_ok());
        for (json, field) in [
            (r#"{"state": ""}"#, "state"),
            (r#"{"state": "Not OK"}"#, "state"),
            (r#"{"state": "ok", "tasks": [{"name": "a", "progress": 101}]}"#, "tasks[0].progress"),
            (r#"{"state": "ok", "tasks": [{"name": ""}]}"#, "tasks[0].name"),
            (r#"{"state": "ok", "planned": [{"name": "x", "at": "tomorrow"}]}"#, "planned[0].at"),
            (r#"{"state": "ok", "message": "a\u0000b"}"#, "message"),
        ] {
            assert_eq!(spec(json).unwrap_err().field, field, "{json}");
        }
        let many = format!(r#"{{"state": "ok", "tasks": [{}]}}"#, vec![r#"{"name": "t"}"#; 65].join(","));
        assert_eq!(spec(&many).unwrap_err().field, "tasks");
        assert!(serde_json::from_str::<ReportSpec>(r#"{"state": "ok", "extra": 1}"#).is_err());
    }
}

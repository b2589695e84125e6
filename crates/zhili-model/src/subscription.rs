//! Persistent subscriptions (consumer groups) and webhooks: their definition as stored and
//! sent, with validation. DESIGN.md fixes the paths and fields.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::serde_opt;
use crate::ValidationError;

pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// A webhook failing without a success for this long is disabled.
pub const DEFAULT_DISABLE_AFTER: Duration = Duration::from_secs(3600);
/// Events handed out and not yet acknowledged, per group at most.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// `PUT /api/v1/subscriptions/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// The stream read: a stream, `$all` or a category (`$ce-order`).
    pub stream: String,
    /// Where a new group starts: "start" (default), "end", or an event number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<StartFrom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    #[serde(default, with = "serde_opt", skip_serializing_if = "Option::is_none")]
    pub ack_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliveries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StartFrom {
    Number(u64),
    Named(Named),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Named {
    Start,
    End,
}

/// Only events whose CloudEvent `type` and `subject` start with these are delivered (the
/// others are passed over and count as acknowledged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    #[serde(default, with = "serde_opt", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Failing this long without a success disables the subscription.
    #[serde(default, with = "serde_opt", skip_serializing_if = "Option::is_none")]
    pub disable_after: Option<Duration>,
    /// Deliveries in flight at once (1..=[`MAX_WINDOW`]). 1, the default, delivers strictly in
    /// order; a wider window sends in order but a retried event can arrive after later ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
}

/// The widest webhook delivery window.
pub const MAX_WINDOW: u32 = 256;

impl Webhook {
    pub fn window(&self) -> usize {
        self.window.unwrap_or(1).clamp(1, MAX_WINDOW) as usize
    }
}

/// CloudEvents HTTP binding: attributes in `ce-*` headers (binary, the default) or the whole
/// event as the body (structured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Binary,
    Structured,
}

impl SubscriptionSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::event::stream_name("stream", self.stream.strip_prefix("$ce-").unwrap_or(&self.stream), self.stream.starts_with('$'))?;
        if let Some(t) = self.ack_timeout {
            if t < Duration::from_secs(1) || t > Duration::from_secs(3600) {
                return Err(ValidationError::new("ack_timeout", "must be between 1s and 1h"));
            }
        }
        if let Some(m) = self.max_deliveries {
            if m == 0 || m > 1000 {
                return Err(ValidationError::new("max_deliveries", "must be between 1 and 1000"));
            }
        }
        if let Some(f) = &self.filter {
            for (name, v) in [("filter.type_prefix", &f.type_prefix), ("filter.subject_prefix", &f.subject_prefix)] {
                if v.as_ref().is_some_and(|p| p.len() > 256) {
                    return Err(ValidationError::new(name, "at most 256 bytes"));
                }
            }
        }
        if let Some(w) = &self.webhook {
            let scheme_ok = w.url.starts_with("http://") || w.url.starts_with("https://");
            if !scheme_ok || w.url.len() > 2048 || w.url.parse::<http_uri::Check>().is_err() {
                return Err(ValidationError::new("webhook.url", "must be an http:// or https:// URL"));
            }
            if w.timeout.is_some_and(|t| t < Duration::from_millis(100) || t > Duration::from_secs(60)) {
                return Err(ValidationError::new("webhook.timeout", "must be between 100ms and 60s"));
            }
            if w.window.is_some_and(|n| n == 0 || n > MAX_WINDOW) {
                return Err(ValidationError::new("webhook.window", format!("must be between 1 and {MAX_WINDOW}")));
            }
            if w.disable_after.is_some_and(|t| t < Duration::from_secs(1)) {
                return Err(ValidationError::new("webhook.disable_after", "must be at least 1s"));
            }
        }
        Ok(())
    }

    pub fn ack_timeout(&self) -> Duration {
        self.ack_timeout.unwrap_or(DEFAULT_ACK_TIMEOUT)
    }

    pub fn max_deliveries(&self) -> u32 {
        self.max_deliveries.unwrap_or(DEFAULT_MAX_DELIVERIES)
    }
}

/// A URL check without a URL crate: a host after the scheme, no spaces or control characters.
mod http_uri {
    pub struct Check;

    impl std::str::FromStr for Check {
        type Err = ();
        fn from_str(s: &str) -> Result<Self, ()> {
            let rest = s.split_once("://").map(|(_, r)| r).ok_or(())?;
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            if host.is_empty() || s.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(());
            }
            Ok(Check)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<SubscriptionSpec, String> {
        let s: SubscriptionSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn specs_are_checked_naming_the_field() {
        let s = spec(r#"{"stream": "$ce-order", "from": "end", "filter": {"type_prefix": "order."}, "ack_timeout": "5s", "max_deliveries": 3}"#).unwrap();
        assert_eq!((s.from, s.ack_timeout(), s.max_deliveries()), (Some(StartFrom::Named(Named::End)), Duration::from_secs(5), 3));
        assert_eq!(spec(r#"{"stream": "order-1", "from": 7}"#).unwrap().from, Some(StartFrom::Number(7)));
        let w = spec(r#"{"stream": "$registry", "webhook": {"url": "http://127.0.0.1:9/hook", "mode": "structured"}}"#).unwrap();
        assert_eq!(w.webhook.unwrap().mode, Some(Mode::Structured));
        for (json, field) in [
            (r#"{"stream": "a/b"}"#, "stream:"),
            (r#"{"stream": "s", "ack_timeout": "1ms"}"#, "ack_timeout:"),
            (r#"{"stream": "s", "max_deliveries": 0}"#, "max_deliveries:"),
            (r#"{"stream": "s", "webhook": {"url": "ftp://x"}}"#, "webhook.url:"),
            (r#"{"stream": "s", "webhook": {"url": "http://"}}"#, "webhook.url:"),
            (r#"{"stream": "s", "webhook": {"url": "http://x", "timeout": "5m"}}"#, "webhook.timeout:"),
            (r#"{"stream": "s", "webhook": {"url": "http://x", "window": 0}}"#, "webhook.window:"),
            (r#"{"stream": "s", "webhook": {"url": "http://x", "window": 257}}"#, "webhook.window:"),
        ] {
            let e = spec(json).unwrap_err();
            assert!(e.starts_with(field), "{json}: {e}");
        }
        assert!(spec(r#"{"stream": "s", "bogus": 1}"#).unwrap_err().contains("bogus"));
    }
}

//! Distributed transactions from Rust over DTM's HTTP protocol (Zhili's coordinator on
//! `--dtm-addr`, or a DTM server): build a saga or a 2-phase message with [`Trans`], then
//! `submit`, `prepare`, `abort` and `query` through [`Dtm`]. Branch handlers guard their work with
//! [`crate::barrier::BranchBarrier`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{check, encode, Client, ClientError};

/// Calls to the coordinator answer quickly; a `wait_result` submit waits for the first round.
const DTM_TIMEOUT: Duration = Duration::from_secs(30);

/// A transaction as DTM's `submit`/`prepare`/`abort` take it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trans {
    pub gid: String,
    pub trans_type: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub payloads: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub query_prepared: String,
    /// Seconds between retries of a temporary failure (doubling from there); 0 = server default.
    #[serde(skip_serializing_if = "is_zero")]
    pub retry_interval: i64,
    /// Seconds a branch call may take; 0 = server default.
    #[serde(skip_serializing_if = "is_zero")]
    pub request_timeout: i64,
    /// Seconds after which an unfinished transaction fails; 0 = server default.
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_to_fail: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub branch_headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub wait_result: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rollback_reason: String,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl Trans {
    /// A saga: steps run in order; a step that fails for good compensates the attempted ones in
    /// reverse.
    pub fn saga(gid: &str) -> Self {
        Self { gid: gid.into(), trans_type: "saga".into(), ..Self::default() }
    }

    /// A 2-phase message: `prepare`, do the local work, `submit`. Left prepared, the coordinator
    /// asks `query_prepared` whether the local work committed.
    pub fn msg(gid: &str, query_prepared: &str) -> Self {
        Self { gid: gid.into(), trans_type: "msg".into(), query_prepared: query_prepared.into(), ..Self::default() }
    }

    /// A saga step: `action` forward, `compensate` to undo it; both get `payload` as their body.
    pub fn step(mut self, action: &str, compensate: &str, payload: &impl Serialize) -> Result<Self, ClientError> {
        let step = BTreeMap::from([("action".to_string(), action.to_string()), ("compensate".to_string(), compensate.to_string())]);
        self.steps.push(step);
        self.payloads.push(serde_json::to_string(payload).map_err(|e| ClientError::Config(e.to_string()))?);
        Ok(self)
    }

    /// A message step: `action` (a URL, or `topic://name` for the topic's subscribers) is called
    /// until it succeeds once the message is submitted.
    pub fn deliver(mut self, action: &str, payload: &impl Serialize) -> Result<Self, ClientError> {
        self.steps.push(BTreeMap::from([("action".to_string(), action.to_string())]));
        self.payloads.push(serde_json::to_string(payload).map_err(|e| ClientError::Config(e.to_string()))?);
        Ok(self)
    }

    pub fn retry_interval(mut self, secs: i64) -> Self {
        self.retry_interval = secs;
        self
    }

    pub fn request_timeout(mut self, secs: i64) -> Self {
        self.request_timeout = secs;
        self
    }
}

/// The coordinator's view of one transaction (`query`).
#[derive(Debug, Clone, Deserialize)]
pub struct Query {
    pub transaction: Option<Value>,
    #[serde(default)]
    pub branches: Vec<Value>,
}

impl Query {
    /// `prepared`, `submitted`, `aborting`, `succeed` or `failed`; None for an unknown gid.
    pub fn status(&self) -> Option<&str> {
        self.transaction.as_ref()?.get("status")?.as_str()
    }
}

/// A DTM-protocol coordinator at one address (`http://127.0.0.1:36789`).
#[derive(Clone)]
pub struct Dtm {
    client: Client,
}

impl Dtm {
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ClientError> {
        Ok(Self { client: Client::new(addr, token)? })
    }

    async fn call(&self, method: Method, path_and_query: &str, body: Option<Bytes>) -> Result<Value, ClientError> {
        let r = check(self.client.send(method, path_and_query, body, DTM_TIMEOUT).await?)?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn post(&self, op: &str, t: &Trans) -> Result<(), ClientError> {
        let body = serde_json::to_vec(t).map_err(|e| ClientError::Config(e.to_string()))?;
        self.call(Method::POST, &format!("/api/dtmsvr/{op}"), Some(body.into())).await.map(drop)
    }

    /// A fresh global transaction id from the coordinator.
    pub async fn new_gid(&self) -> Result<String, ClientError> {
        let v = self.call(Method::GET, "/api/dtmsvr/newGid", None).await?;
        v.get("gid").and_then(Value::as_str).map(str::to_string).ok_or_else(|| ClientError::Decode("newGid answered without a gid".into()))
    }

    /// Starts a saga or a message (or commits a prepared one). With `wait_result`, an error
    /// means the first round did not succeed.
    pub async fn submit(&self, t: &Trans) -> Result<(), ClientError> {
        self.post("submit", t).await
    }

    pub async fn prepare(&self, t: &Trans) -> Result<(), ClientError> {
        self.post("prepare", t).await
    }

    pub async fn abort(&self, t: &Trans) -> Result<(), ClientError> {
        self.post("abort", t).await
    }

    pub async fn query(&self, gid: &str) -> Result<Query, ClientError> {
        let v = self.call(Method::GET, &format!("/api/dtmsvr/query?gid={}", encode(gid)), None).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Subscribes `url` to `topic` for `topic://` message steps; true if it was new, false if
    /// this URL was already subscribed.
    pub async fn subscribe(&self, topic: &str, url: &str, remark: &str) -> Result<bool, ClientError> {
        let path = format!("/api/dtmsvr/subscribe?topic={}&url={}&remark={}", encode(topic), encode(url), encode(remark));
        match self.call(Method::GET, &path, None).await {
            Ok(_) => Ok(true),
            Err(ClientError::Api { status, detail }) if status == http::StatusCode::CONFLICT && detail.contains("exists") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_serializes_as_dtm_takes_it() {
        let t = Trans::saga("g1").step("http://a/x", "http://a/y", &serde_json::json!({"n": 1})).unwrap().retry_interval(2);
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["trans_type"], "saga");
        assert_eq!(v["steps"][0]["compensate"], "http://a/y");
        assert_eq!(v["payloads"][0], r#"{"n":1}"#);
        assert_eq!(v["retry_interval"], 2);
        assert!(v.get("query_prepared").is_none() && v.get("wait_result").is_none());
        let m = Trans::msg("g2", "http://a/q").deliver("topic://t", &1).unwrap();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["query_prepared"], "http://a/q");
        assert_eq!(v["steps"][0].as_object().unwrap().len(), 1);
    }
}

//! The transaction coordinator: DTM's model and protocol (saga, TCC, 2-phase message, XA), so
//! DTM SDKs work unchanged, with every transition durable in the [`Store`] before it is acted on.
//!
//! A transaction is one record (`txn/{gid}`: the global state and its branches), rewritten at
//! each transition; unfinished ones are also marked under `txn-open/`, which is what a restart
//! resumes. Each unfinished transaction is driven by its own task ([`Coordinator::drive`]), so a
//! slow or dead branch only delays its own transaction. A branch is marked attempted (durably)
//! before it is called, which is how compensations and cancels know what to undo after a crash.
//! Transitions are also appended to the `$txn` stream when an event log is given.

pub mod branch;
mod process;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use zhili_model::ValidationError;
use zhili_store::events::{EventLog, NewEvent};
use zhili_store::{Compare, Op, Store, StoreError, Txn};

pub use branch::{NoDiscovery, Resolve};

pub const SAGA: &str = "saga";
pub const TCC: &str = "tcc";
pub const MSG: &str = "msg";
pub const XA: &str = "xa";

/// Global and branch statuses, as DTM spells them.
pub mod status {
    pub const PREPARED: &str = "prepared";
    pub const SUBMITTED: &str = "submitted";
    pub const ABORTING: &str = "aborting";
    pub const SUCCEED: &str = "succeed";
    pub const FAILED: &str = "failed";
}

/// Branch operations, as DTM spells them.
pub mod op {
    pub const ACTION: &str = "action";
    pub const COMPENSATE: &str = "compensate";
    pub const TRY: &str = "try";
    pub const CONFIRM: &str = "confirm";
    pub const CANCEL: &str = "cancel";
    pub const COMMIT: &str = "commit";
    pub const ROLLBACK: &str = "rollback";
    pub const MSG: &str = "msg";
}

const RECORDS: &str = "txn/";
const OPEN: &str = "txn-open/";
const TOPICS: &str = "txn-topics/";
/// `txn-done/{finished ms, 16 hex digits}/{gid}`: finished transactions in the order they
/// finished, so retention removes the oldest without reading the others.
const DONE: &str = "txn-done/";
/// Expired transactions removed per Store transaction.
const SWEEP_BATCH: usize = 512;
/// The longest `delay` a message may ask for (DTM's `custom_data`), as the longest duration.
const MAX_DELAY_SECS: u64 = 7 * 24 * 3600;
pub const TXN_STREAM: &str = "$txn";
/// Longest wait between two attempts of a failing branch.
const MAX_INTERVAL: Duration = Duration::from_secs(600);
/// Largest payload of one branch, and of all of a transaction's payloads together.
pub const MAX_PAYLOAD: usize = 256 * 1024;
const MAX_BRANCHES: usize = 256;
/// Unfinished transactions held at once; past it new ones are refused (each holds a task and
/// its record in memory until it finishes).
pub const MAX_IN_FLIGHT: usize = 100_000;

/// Coordinator-wide defaults (DTM's `RequestTimeout`, `RetryInterval`, `TimeoutToFail`).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub request_timeout: Duration,
    pub retry_interval: Duration,
    /// For TCC, XA and messages left prepared (sagas have none unless they set one).
    pub timeout_to_fail: Duration,
    /// An alert event (and a POST to `alert_webhook`) once a transaction has failed this many
    /// times in a row.
    pub alert_after_retries: u32,
    pub alert_webhook: Option<String>,
    /// Finished transactions are removed this long after they finished; zero keeps them.
    pub retention: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(3),
            retry_interval: Duration::from_secs(10),
            timeout_to_fail: Duration::from_secs(35),
            alert_after_retries: 3,
            alert_webhook: None,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// DTM's transaction options (seconds, as DTM counts them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Options {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait_result: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_to_fail: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub request_timeout: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_interval: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub branch_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub concurrent: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_limit: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_count: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The global transaction as `query` and `all` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trans {
    pub gid: String,
    pub trans_type: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub payloads: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query_prepared: String,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub custom_data: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rollback_reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub result: String,
    pub create_time: String,
    pub update_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_time: Option<String>,
    #[serde(default)]
    pub next_cron_interval: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cron_time: Option<String>,
    #[serde(flatten)]
    pub options: Options,
}

/// One branch operation (a saga step has an action and a compensate, a TCC branch a confirm and
/// a cancel, an XA branch a commit and a rollback).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Branch {
    pub gid: String,
    pub url: String,
    /// The payload sent as the body (DTM's `bin_data`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
    pub branch_id: String,
    pub op: String,
    pub status: String,
    /// Times it was called (recorded before each call): a forward step with attempts was
    /// attempted, so its compensation runs.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub create_time: String,
    pub update_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<String>,
}

/// What is stored per transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub trans: Trans,
    pub branches: Vec<Branch>,
    pub created_ms: u64,
    /// When the driver next works on it (0: now).
    #[serde(default)]
    pub next_at_ms: u64,
    /// The current wait between attempts, doubled by each temporary failure.
    #[serde(default)]
    pub interval_ms: u64,
    /// Consecutive temporary failures (for alerts).
    #[serde(default)]
    pub failures: u32,
    /// Per branch, the instance that failed it last (a retry goes to another one).
    #[serde(skip)]
    pub avoid: BTreeMap<usize, String>,
}

impl Record {
    pub fn finished(&self) -> bool {
        self.trans.status == status::SUCCEED || self.trans.status == status::FAILED
    }
}

/// A body of `prepare`, `submit`, `abort`, `forceStop` (DTM's `TransBase` as JSON; nulls and
/// unknown fields are accepted as DTM's SDKs send them).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TransRequest {
    #[serde(default)]
    pub gid: Option<String>,
    #[serde(default)]
    pub trans_type: Option<String>,
    #[serde(default)]
    pub steps: Option<Vec<BTreeMap<String, String>>>,
    #[serde(default)]
    pub payloads: Option<Vec<String>>,
    #[serde(default)]
    pub custom_data: Option<String>,
    #[serde(default)]
    pub query_prepared: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub rollback_reason: Option<String>,
    #[serde(default)]
    pub wait_result: Option<bool>,
    #[serde(default)]
    pub timeout_to_fail: Option<i64>,
    #[serde(default)]
    pub request_timeout: Option<i64>,
    #[serde(default)]
    pub retry_interval: Option<i64>,
    #[serde(default)]
    pub branch_headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub concurrent: Option<bool>,
    #[serde(default)]
    pub retry_limit: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// DTM's FAILURE (409): the request cannot be done in the transaction's state.
    #[error("{0}")]
    Failure(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("transaction {0:?} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored transaction {0} is unreadable: {1}")]
    Corrupt(String, String),
}

/// A topic's subscriber (2-phase message steps to `topic://name` go to each).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Subscriber {
    pub url: String,
    #[serde(default)]
    pub remark: String,
}

/// An unfinished transaction in memory: its record behind the lock its driver and the API
/// share, and a wake-up for the driver.
struct Live {
    record: tokio::sync::Mutex<Record>,
    wake: Notify,
}

/// Counters for `/metrics` ([`TxnCollector`]).
#[derive(Debug)]
pub struct Stats {
    /// Finished transactions by (mode, outcome).
    pub finished: Mutex<BTreeMap<(String, String), u64>>,
    pub branch_calls: std::sync::atomic::AtomicU64,
    pub branch_retries: std::sync::atomic::AtomicU64,
    /// Branch call latency, seconds.
    pub branch_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            finished: Mutex::default(),
            branch_calls: Default::default(),
            branch_retries: Default::default(),
            branch_latency: prometheus_client::metrics::histogram::Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

/// The coordinator's metrics: transactions finished by mode and outcome, in flight, branch
/// calls, retries and latency (registered by whoever serves `/metrics`).
#[derive(Debug)]
pub struct TxnCollector(pub Arc<Coordinator>);

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Coordinator")
    }
}

impl prometheus_client::collector::Collector for TxnCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.0.stats;
        let finished = stats.finished.lock().clone();
        let mut fam = encoder.encode_descriptor("transactions_finished", "Transactions finished, by mode and outcome", None, MetricType::Counter)?;
        for ((mode, outcome), n) in finished {
            ConstCounter::new(n).encode(fam.encode_family(&vec![("mode".to_string(), mode), ("outcome".to_string(), outcome)])?)?;
        }
        ConstGauge::new(self.0.in_flight() as i64).encode(encoder.encode_descriptor(
            "transactions_in_flight",
            "Unfinished transactions",
            None,
            MetricType::Gauge,
        )?)?;
        for (name, help, v) in [
            ("transaction_branch_calls", "Branch calls made", stats.branch_calls.load(Relaxed)),
            ("transaction_branch_retries", "Branch calls that failed temporarily and were scheduled again", stats.branch_retries.load(Relaxed)),
        ] {
            ConstCounter::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        stats.branch_latency.encode(encoder.encode_descriptor("transaction_branch_seconds", "Branch call latency", None, MetricType::Histogram)?)?;
        Ok(())
    }
}

pub struct Coordinator {
    store: Arc<dyn Store>,
    resolve: Arc<dyn Resolve>,
    defaults: Defaults,
    live: Mutex<HashMap<String, Arc<Live>>>,
    events: Option<tokio::sync::mpsc::Sender<NewEvent>>,
    /// Kept-alive connections to branches.
    pub(crate) pool: zhili_net::client::Pool,
    pub stats: Stats,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn now_text() -> String {
    zhili_model::event::timestamp(unix_ms())
}

fn record_key(gid: &str) -> String {
    format!("{RECORDS}{gid}")
}

fn open_key(gid: &str) -> String {
    format!("{OPEN}{gid}")
}

fn done_key(finished_ms: u64, gid: &str) -> String {
    format!("{DONE}{finished_ms:016x}/{gid}")
}

/// When a submitted message's steps may start: now plus its `delay`, or at once (0).
fn message_delay(custom_data: &str) -> u64 {
    match message_delay_ms(custom_data) {
        0 => 0,
        ms => unix_ms() + ms,
    }
}

/// A message's `delay` (seconds before its steps run once submitted), from DTM's `custom_data`.
fn message_delay_ms(custom_data: &str) -> u64 {
    #[derive(serde::Deserialize)]
    struct Custom {
        delay: u64,
    }
    serde_json::from_str::<Custom>(custom_data).map_or(0, |c| c.delay.min(MAX_DELAY_SECS) * 1000)
}

/// DTM's gids: letters, digits and `-_.:@`, at most 128 bytes.
fn check_gid(gid: &str) -> Result<(), ValidationError> {
    if gid.is_empty() || gid.len() > 128 || !gid.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b)) {
        return Err(ValidationError::new("gid", "1 to 128 letters, digits or -_.:@"));
    }
    Ok(())
}

fn check_url(field: &str, url: &str, may_be_empty: bool) -> Result<(), ValidationError> {
    if url.is_empty() && may_be_empty {
        return Ok(());
    }
    let ok_scheme = ["http://", "https://", "discovery://", "topic://"].iter().any(|p| url.starts_with(p));
    if !ok_scheme || url.len() > 2048 || url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ValidationError::new(field, "must be an http://, https://, discovery:// or topic:// URL"));
    }
    Ok(())
}

impl Coordinator {
    /// Loads the topics and resumes every unfinished transaction.
    pub fn start(store: Arc<dyn Store>, resolve: Arc<dyn Resolve>, log: Option<Arc<dyn EventLog>>, defaults: Defaults) -> Result<Arc<Self>, TxnError> {
        let events = log.map(|log| {
            let (tx, rx) = tokio::sync::mpsc::channel(65_536);
            tokio::spawn(zhili_store::events::append_queued(log, TXN_STREAM, rx, 1024));
            tx
        });
        let c = Arc::new(Self { store, resolve, defaults, live: Mutex::new(HashMap::new()), events, pool: Default::default(), stats: Stats::default() });
        if !c.defaults.retention.is_zero() {
            tokio::spawn(sweep(Arc::downgrade(&c)));
        }
        let open = c.store.range(OPEN, None)?;
        for kv in open {
            let gid = kv.key.get(OPEN.len()..).unwrap_or_default().to_string();
            match c.load(&gid)? {
                Some(rec) if !rec.finished() => {
                    c.adopt(rec);
                }
                _ => {}
            }
        }
        Ok(c)
    }

    fn load(&self, gid: &str) -> Result<Option<Record>, TxnError> {
        match self.store.get(&record_key(gid))? {
            Some(kv) => serde_json::from_slice(&kv.value).map(Some).map_err(|e| TxnError::Corrupt(gid.to_string(), e.to_string())),
            None => Ok(None),
        }
    }

    /// Writes a record durably (and its open marker while unfinished).
    async fn save(&self, rec: &Record) -> Result<(), TxnError> {
        let value = serde_json::to_vec(rec).map_err(|e| TxnError::Corrupt(rec.trans.gid.clone(), e.to_string()))?;
        let gid = &rec.trans.gid;
        let mut ops = vec![Op::Put { key: record_key(gid), value: value.into(), lease: None }];
        if rec.finished() {
            ops.push(Op::Delete { key: open_key(gid) });
            ops.push(Op::Put { key: done_key(unix_ms(), gid), value: bytes::Bytes::new(), lease: None });
        } else {
            ops.push(Op::Put { key: open_key(gid), value: bytes::Bytes::new(), lease: None });
        }
        self.store.txn(Txn { success: ops, ..Default::default() }).await?;
        Ok(())
    }

    /// Starts the driver of an unfinished transaction.
    fn adopt(self: &Arc<Self>, rec: Record) -> Arc<Live> {
        let gid = rec.trans.gid.clone();
        let live = Arc::new(Live { record: tokio::sync::Mutex::new(rec), wake: Notify::new() });
        self.live.lock().insert(gid.clone(), live.clone());
        tokio::spawn(self.clone().drive(gid, live.clone()));
        live
    }

    fn live(&self, gid: &str) -> Option<Arc<Live>> {
        self.live.lock().get(gid).cloned()
    }

    /// Works on one transaction until it is finished: each round processes what is due, then
    /// sleeps until the next attempt or a wake-up (submit, abort, a registered branch).
    async fn drive(self: Arc<Self>, gid: String, live: Arc<Live>) {
        loop {
            let next = {
                let mut rec = live.record.lock().await;
                if rec.finished() {
                    break;
                }
                if rec.next_at_ms <= unix_ms() {
                    if let Err(e) = self.process(&mut rec).await {
                        tracing::warn!(gid = %gid, error = %e, "transaction step failed; retrying");
                        rec.next_at_ms = unix_ms() + 1000;
                    }
                }
                if rec.finished() {
                    break;
                }
                rec.next_at_ms
            };
            let wait = Duration::from_millis(next.saturating_sub(unix_ms()).max(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = live.wake.notified() => {}
            }
        }
        self.live.lock().remove(&gid);
    }

    /// A new gid (DTM's `newGid`).
    pub fn new_gid(&self) -> String {
        use rand::Rng;
        let bytes: [u8; 12] = rand::rng().random();
        bytes.iter().fold(String::from("z"), |mut s, b| {
            s.push_str(&format!("{b:02x}"));
            s
        })
    }

    fn new_record(&self, req: &TransRequest, initial: &str) -> Result<Record, TxnError> {
        let gid = req.gid.clone().unwrap_or_default();
        check_gid(&gid)?;
        let trans_type = req.trans_type.clone().unwrap_or_default();
        if ![SAGA, TCC, MSG, XA].contains(&trans_type.as_str()) {
            return Err(ValidationError::new("trans_type", format!("{trans_type:?} is not saga, tcc, msg or xa")).into());
        }
        let steps = req.steps.clone().unwrap_or_default();
        let payloads = req.payloads.clone().unwrap_or_default();
        if steps.len() > MAX_BRANCHES {
            return Err(ValidationError::new("steps", format!("at most {MAX_BRANCHES}")).into());
        }
        if !payloads.is_empty() && payloads.len() != steps.len() {
            return Err(ValidationError::new("payloads", format!("{} payloads for {} steps", payloads.len(), steps.len())).into());
        }
        if payloads.iter().map(String::len).sum::<usize>() > MAX_PAYLOAD {
            return Err(ValidationError::new("payloads", format!("at most {MAX_PAYLOAD} bytes in all")).into());
        }
        let ops: &[&str] = match trans_type.as_str() {
            SAGA => &[op::ACTION, op::COMPENSATE],
            MSG => &[op::ACTION],
            _ => &[],
        };
        if !ops.is_empty() && steps.is_empty() && initial != status::PREPARED {
            return Err(ValidationError::new("steps", "a saga or message needs at least one step").into());
        }
        for (i, step) in steps.iter().enumerate() {
            for (k, url) in step {
                if !ops.contains(&k.as_str()) {
                    return Err(ValidationError::new(format!("steps[{i}].{k}"), format!("{trans_type} steps take {}", ops.join(", "))).into());
                }
                check_url(&format!("steps[{i}].{k}"), url, k == op::COMPENSATE)?;
                if url.starts_with("topic://") && trans_type != MSG {
                    return Err(ValidationError::new(format!("steps[{i}].{k}"), "topic:// steps are for messages").into());
                }
            }
            if !step.contains_key(op::ACTION) {
                return Err(ValidationError::new(format!("steps[{i}].action"), "is required").into());
            }
        }
        let query_prepared = req.query_prepared.clone().unwrap_or_default();
        check_url("query_prepared", &query_prepared, true)?;
        let custom_data = req.custom_data.clone().unwrap_or_default();
        let mut orders: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        if !custom_data.is_empty() && trans_type == SAGA {
            #[derive(Deserialize)]
            struct Custom {
                #[serde(default)]
                orders: Option<BTreeMap<String, Vec<usize>>>,
            }
            let c: Custom = serde_json::from_str(&custom_data).map_err(|e| ValidationError::new("custom_data", format!("is not saga options: {e}")))?;
            for (k, v) in c.orders.unwrap_or_default() {
                let k: usize = k.parse().map_err(|_| ValidationError::new("custom_data.orders", format!("{k:?} is not a step index")))?;
                if k >= steps.len() || v.iter().any(|p| *p >= steps.len() || *p == k) {
                    return Err(ValidationError::new("custom_data.orders", "names a step that does not exist").into());
                }
                orders.insert(k, v);
            }
            process::check_acyclic(&orders, steps.len()).map_err(|_| ValidationError::new("custom_data.orders", "has a cycle"))?;
        }
        let positive = |field: &str, v: Option<i64>| match v {
            Some(n) if !(0..=86_400 * 7).contains(&n) => Err(ValidationError::new(field, "must be between 0 and a week (seconds)")),
            _ => Ok(v.unwrap_or(0)),
        };
        let options = Options {
            wait_result: req.wait_result.unwrap_or(false),
            timeout_to_fail: positive("timeout_to_fail", req.timeout_to_fail)?,
            request_timeout: positive("request_timeout", req.request_timeout)?,
            retry_interval: positive("retry_interval", req.retry_interval)?,
            branch_headers: req.branch_headers.clone().unwrap_or_default(),
            concurrent: req.concurrent.unwrap_or(false),
            retry_limit: positive("retry_limit", req.retry_limit)?,
            retry_count: 0,
        };
        let now = now_text();
        let trans = Trans {
            gid,
            trans_type,
            status: initial.to_string(),
            steps,
            payloads,
            query_prepared,
            protocol: "http".into(),
            custom_data,
            rollback_reason: String::new(),
            result: String::new(),
            create_time: now.clone(),
            update_time: now,
            finish_time: None,
            rollback_time: None,
            next_cron_interval: 0,
            next_cron_time: None,
            options,
        };
        let mut rec = Record { trans, branches: vec![], created_ms: unix_ms(), next_at_ms: 0, interval_ms: 0, failures: 0, avoid: BTreeMap::new() };
        if rec.trans.trans_type == MSG && initial == status::SUBMITTED {
            rec.next_at_ms = message_delay(&rec.trans.custom_data);
        }
        rec.interval_ms = self.retry_interval(&rec).as_millis() as u64;
        rec.branches = self.steps_to_branches(&rec);
        Ok(rec)
    }

    /// A saga's and a message's branches from their steps (topics expanded to subscribers).
    fn steps_to_branches(&self, rec: &Record) -> Vec<Branch> {
        let t = &rec.trans;
        let mut out = Vec::new();
        let now = now_text();
        let branch = |id: String, op: &str, url: &str, data: &str| Branch {
            gid: t.gid.clone(),
            url: url.to_string(),
            data: data.to_string(),
            branch_id: id,
            op: op.to_string(),
            status: status::PREPARED.into(),
            attempts: 0,
            error: None,
            create_time: now.clone(),
            update_time: now.clone(),
            finish_time: None,
        };
        for (i, step) in t.steps.iter().enumerate() {
            let data = t.payloads.get(i).map(String::as_str).unwrap_or("");
            let id = format!("{:02}", i + 1);
            let action = step.get(op::ACTION).map(String::as_str).unwrap_or("");
            match t.trans_type.as_str() {
                SAGA => {
                    out.push(branch(id.clone(), op::COMPENSATE, step.get(op::COMPENSATE).map(String::as_str).unwrap_or(""), data));
                    out.push(branch(id, op::ACTION, action, data));
                }
                MSG => match action.strip_prefix("topic://") {
                    Some(topic) => {
                        let subs = self.subscribers(topic);
                        let many = subs.len() > 1;
                        for (j, s) in subs.iter().enumerate() {
                            let id = if many { format!("{id}-{:02}", j + 1) } else { id.clone() };
                            out.push(branch(id, op::ACTION, &s.url, data));
                        }
                    }
                    None => out.push(branch(id, op::ACTION, action, data)),
                },
                _ => {}
            }
        }
        out
    }

    pub(crate) fn request_timeout(&self, rec: &Record) -> Duration {
        match rec.trans.options.request_timeout {
            n if n > 0 => Duration::from_secs(n as u64),
            _ => self.defaults.request_timeout,
        }
    }

    pub(crate) fn retry_interval(&self, rec: &Record) -> Duration {
        match rec.trans.options.retry_interval {
            n if n > 0 => Duration::from_secs(n as u64),
            _ => self.defaults.retry_interval,
        }
    }

    /// Whether a transaction has passed its `timeout_to_fail` (sagas only when they set one).
    pub(crate) fn timed_out(&self, rec: &Record) -> bool {
        let t = match rec.trans.options.timeout_to_fail {
            n if n > 0 => Duration::from_secs(n as u64),
            _ if rec.trans.trans_type == SAGA => return false,
            _ => self.defaults.timeout_to_fail,
        };
        unix_ms() >= rec.created_ms + t.as_millis() as u64
    }

    /// `prepare`: a TCC, XA or message transaction starts (idempotent while prepared).
    pub async fn prepare(self: &Arc<Self>, req: TransRequest) -> Result<(), TxnError> {
        let rec = self.new_record(&req, status::PREPARED)?;
        if rec.trans.trans_type == SAGA {
            return Err(ValidationError::new("trans_type", "a saga is submitted, not prepared").into());
        }
        match self.create(rec).await? {
            None => Ok(()),
            Some(existing) if existing.trans.status == status::PREPARED => Ok(()),
            Some(existing) => Err(TxnError::Failure(format!("current status '{}', cannot prepare", existing.trans.status))),
        }
    }

    /// Stores a new record unless the gid exists; returns the existing one if it does.
    async fn create(self: &Arc<Self>, rec: Record) -> Result<Option<Record>, TxnError> {
        let gid = rec.trans.gid.clone();
        if self.in_flight() >= MAX_IN_FLIGHT {
            return Err(TxnError::Failure(format!("{MAX_IN_FLIGHT} transactions are in flight; try again later")));
        }
        let value = serde_json::to_vec(&rec).map_err(|e| TxnError::Corrupt(gid.clone(), e.to_string()))?;
        let txn = Txn {
            compares: vec![Compare::Missing(record_key(&gid))],
            success: vec![
                Op::Put { key: record_key(&gid), value: value.into(), lease: None },
                Op::Put { key: open_key(&gid), value: bytes::Bytes::new(), lease: None },
            ],
            failure: vec![],
        };
        if !self.store.txn(txn).await?.succeeded {
            let existing = match self.live(&gid) {
                Some(live) => live.record.lock().await.clone(),
                None => self.load(&gid)?.ok_or_else(|| TxnError::NotFound(gid.clone()))?,
            };
            return Ok(Some(existing));
        }
        self.event(&rec, None);
        self.adopt(rec);
        Ok(None)
    }

    /// `submit`: a saga starts; a prepared message, TCC or XA transaction commits. Re-submitting
    /// a submitted gid is idempotent. With `wait_result`, answers once processed.
    pub async fn submit(self: &Arc<Self>, req: TransRequest) -> Result<(), TxnError> {
        let wait = req.wait_result.unwrap_or(false);
        let gid = req.gid.clone().unwrap_or_default();
        check_gid(&gid)?;
        let existing = self.live(&gid).is_some() || self.load(&gid)?.is_some();
        if !existing {
            let rec = self.new_record(&req, status::SUBMITTED)?;
            if rec.trans.trans_type != SAGA && rec.trans.trans_type != MSG {
                return Err(TxnError::Failure(format!("no prepared transaction {gid:?} to submit")));
            }
            if let Some(raced) = self.create(rec).await? {
                if raced.trans.status != status::SUBMITTED {
                    return Err(TxnError::Failure(format!("current status '{}', cannot submit", raced.trans.status)));
                }
            }
        } else {
            let Some(live) = self.live(&gid) else {
                // Finished: submitting a succeeded transaction again is idempotent.
                let done = self.load(&gid)?.map(|r| r.trans.status).unwrap_or_default();
                return match done.as_str() {
                    status::SUCCEED => Ok(()),
                    other => Err(TxnError::Failure(format!("current status '{other}', cannot submit"))),
                };
            };
            let mut rec = live.record.lock().await;
            match rec.trans.status.as_str() {
                status::SUBMITTED => {}
                status::PREPARED => {
                    if rec.trans.trans_type == MSG {
                        // The message's steps may come with the submit.
                        if rec.trans.steps.is_empty() {
                            let fresh = self.new_record(&req, status::SUBMITTED)?;
                            rec.trans.steps = fresh.trans.steps;
                            rec.trans.payloads = fresh.trans.payloads;
                            rec.branches = self.steps_to_branches(&rec);
                        }
                        if rec.branches.is_empty() {
                            return Err(ValidationError::new("steps", "a message needs at least one step").into());
                        }
                    }
                    self.set_status(&mut rec, status::SUBMITTED, "");
                    rec.next_at_ms = 0;
                    if rec.trans.trans_type == MSG {
                        if let Some(custom) = req.custom_data.as_deref().filter(|c| !c.is_empty()) {
                            rec.trans.custom_data = custom.to_string();
                        }
                        rec.next_at_ms = message_delay(&rec.trans.custom_data);
                    }
                    self.save(&rec).await?;
                }
                other => return Err(TxnError::Failure(format!("current status '{other}', cannot submit"))),
            }
            live.wake.notify_one();
        }
        if wait {
            return self.wait_result(&gid).await;
        }
        Ok(())
    }

    /// Processes a transaction once, now, and says whether it succeeded (DTM's `wait_result`).
    async fn wait_result(self: &Arc<Self>, gid: &str) -> Result<(), TxnError> {
        let Some(live) = self.live(gid) else {
            let rec = self.load(gid)?.ok_or_else(|| TxnError::NotFound(gid.to_string()))?;
            return match rec.trans.status.as_str() {
                status::SUCCEED => Ok(()),
                s => Err(TxnError::Failure(format!("wait result not return success: status {s}"))),
            };
        };
        let mut rec = live.record.lock().await;
        // A delayed message is not hurried by wait_result.
        if !rec.finished() && rec.next_at_ms <= unix_ms() {
            self.process(&mut rec).await?;
        }
        live.wake.notify_one();
        match rec.trans.status.as_str() {
            status::SUCCEED => Ok(()),
            s => Err(TxnError::Failure(format!("wait result not return success: status {s}"))),
        }
    }

    /// `abort`: a prepared TCC or XA transaction rolls back; a prepared message fails.
    pub async fn abort(self: &Arc<Self>, req: TransRequest) -> Result<(), TxnError> {
        let gid = req.gid.clone().unwrap_or_default();
        check_gid(&gid)?;
        let live = self.live(&gid).ok_or_else(|| TxnError::Failure(format!("transaction {gid:?} is not prepared, cannot abort")))?;
        let mut rec = live.record.lock().await;
        let reason = req.rollback_reason.clone().unwrap_or_default();
        match (rec.trans.trans_type.as_str(), rec.trans.status.as_str()) {
            (MSG, status::PREPARED) => {
                self.set_status(&mut rec, status::FAILED, &reason);
                self.save(&rec).await?;
            }
            (TCC | XA, status::PREPARED | status::ABORTING) => {
                if rec.trans.status != status::ABORTING {
                    self.set_status(&mut rec, status::ABORTING, &reason);
                    rec.next_at_ms = 0;
                    self.save(&rec).await?;
                }
            }
            (t, s) => return Err(TxnError::Failure(format!("trans type: '{t}' current status '{s}', cannot abort"))),
        }
        live.wake.notify_one();
        if req.wait_result.unwrap_or(false) {
            drop(rec);
            // An abort ends failed by design: processed now, answered as done.
            let _ = self.wait_result(&gid).await;
        }
        Ok(())
    }

    /// `forceStop`: an unfinished transaction is marked failed and nothing more runs.
    pub async fn force_stop(self: &Arc<Self>, gid: &str) -> Result<(), TxnError> {
        check_gid(gid)?;
        let live = self.live(gid).ok_or_else(|| TxnError::Failure(format!("transaction {gid:?} is finished or unknown, cannot force stop")))?;
        let mut rec = live.record.lock().await;
        if rec.finished() {
            return Err(TxnError::Failure(format!("global transaction force stop error. status: {}", rec.trans.status)));
        }
        self.set_status(&mut rec, status::FAILED, "force stopped");
        self.save(&rec).await?;
        live.wake.notify_one();
        Ok(())
    }

    /// `registerBranch` (and the legacy `registerTccBranch`/`registerXaBranch`): a TCC branch
    /// (`confirm`, `cancel` URLs) or an XA branch (`url`) joins a prepared transaction.
    pub async fn register_branch(self: &Arc<Self>, data: &BTreeMap<String, String>) -> Result<(), TxnError> {
        let get = |k: &str| data.get(k).cloned().unwrap_or_default();
        let gid = get("gid");
        check_gid(&gid)?;
        let branch_id = get("branch_id");
        if branch_id.is_empty() || branch_id.len() > 64 || !branch_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) {
            return Err(ValidationError::new("branch_id", "1 to 64 letters, digits, - or _").into());
        }
        let trans_type = get("trans_type");
        let pairs: Vec<(&str, String)> = match trans_type.as_str() {
            TCC => vec![(op::CANCEL, get("cancel")), (op::CONFIRM, get("confirm"))],
            XA => vec![(op::ROLLBACK, get("url")), (op::COMMIT, get("url"))],
            other => return Err(ValidationError::new("trans_type", format!("{other:?}: branches are registered for tcc or xa")).into()),
        };
        for (op, url) in &pairs {
            let field = if trans_type == XA { "url" } else { op };
            check_url(field, url, trans_type == TCC)?;
        }
        let payload = get("data");
        if payload.len() > MAX_PAYLOAD {
            return Err(ValidationError::new("data", format!("at most {MAX_PAYLOAD} bytes")).into());
        }
        let live = self.live(&gid).ok_or_else(|| TxnError::Failure(format!("no trans with gid: {gid} status: prepared found")))?;
        let mut rec = live.record.lock().await;
        if rec.trans.status != status::PREPARED || rec.trans.trans_type != trans_type {
            return Err(TxnError::Failure(format!("no trans with gid: {gid} status: prepared found")));
        }
        if rec.branches.iter().any(|b| b.branch_id == branch_id) {
            // Registering the same branch again is idempotent.
            return Ok(());
        }
        if rec.branches.len() >= MAX_BRANCHES * 2 {
            return Err(ValidationError::new("branch_id", format!("at most {MAX_BRANCHES} branches per transaction")).into());
        }
        let now = now_text();
        for (op, url) in pairs {
            rec.branches.push(Branch {
                gid: gid.clone(),
                url,
                data: payload.clone(),
                branch_id: branch_id.clone(),
                op: op.to_string(),
                status: status::PREPARED.into(),
                attempts: 0,
                error: None,
                create_time: now.clone(),
                update_time: now.clone(),
                finish_time: None,
            });
        }
        self.save(&rec).await?;
        Ok(())
    }

    /// A transaction and its branches (`query`).
    /// While its driver is calling a branch, the last durable state is answered rather than
    /// waiting for the call.
    pub async fn query(&self, gid: &str) -> Result<Option<Record>, TxnError> {
        if let Some(live) = self.live(gid) {
            if let Ok(rec) = live.record.try_lock() {
                return Ok(Some(rec.clone()));
            }
        }
        self.load(gid)
    }

    /// Transactions in gid order after `position`, at most `limit`, optionally only of one
    /// status or mode (`all`); the next position, empty at the end. Reads in chunks from the
    /// position on, never from the start.
    pub fn all(&self, position: &str, limit: usize, status: Option<&str>, trans_type: Option<&str>) -> Result<(Vec<Trans>, String), TxnError> {
        const CHUNK: usize = 256;
        let mut out: Vec<Trans> = Vec::new();
        let mut cursor = format!("{RECORDS}{position}");
        loop {
            let after = if position.is_empty() && cursor.len() == RECORDS.len() { None } else { Some(cursor.as_str()) };
            let chunk = self.store.range_after(RECORDS, after, CHUNK)?;
            let Some(last) = chunk.last() else { return Ok((out, String::new())) };
            let last_key = last.key.clone();
            for kv in chunk {
                let gid = kv.key.get(RECORDS.len()..).unwrap_or_default().to_string();
                let rec: Record = serde_json::from_slice(&kv.value).map_err(|e| TxnError::Corrupt(gid.clone(), e.to_string()))?;
                if status.is_some_and(|s| rec.trans.status != s) || trans_type.is_some_and(|t| rec.trans.trans_type != t) {
                    continue;
                }
                out.push(rec.trans);
                if out.len() == limit {
                    return Ok((out, gid));
                }
            }
            cursor = last_key;
        }
    }

    /// Unfinished transactions in memory.
    pub fn in_flight(&self) -> usize {
        self.live.lock().len()
    }

    pub fn subscribers(&self, topic: &str) -> Vec<Subscriber> {
        self.store.get(&format!("{TOPICS}{topic}")).ok().flatten().and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or_default()
    }

    /// `subscribe`: `url` receives the topic's message steps.
    pub async fn subscribe(&self, topic: &str, url: &str, remark: &str) -> Result<(), TxnError> {
        check_topic(topic)?;
        check_url("url", url, false)?;
        if url.starts_with("topic://") {
            return Err(ValidationError::new("url", "a subscriber is an http://, https:// or discovery:// URL").into());
        }
        let mut subs = self.subscribers(topic);
        if subs.iter().any(|s| s.url == url) {
            return Err(TxnError::Failure(format!("this url exists: {url}")));
        }
        subs.push(Subscriber { url: url.to_string(), remark: remark.to_string() });
        let value = serde_json::to_vec(&subs).map_err(|e| TxnError::Corrupt(topic.into(), e.to_string()))?;
        zhili_store::put(&*self.store, &format!("{TOPICS}{topic}"), value).await?;
        Ok(())
    }

    /// `unsubscribe`: the URL leaves the topic (the topic goes when empty).
    pub async fn unsubscribe(&self, topic: &str, url: &str) -> Result<(), TxnError> {
        check_topic(topic)?;
        let mut subs = self.subscribers(topic);
        let before = subs.len();
        subs.retain(|s| s.url != url);
        if subs.len() == before {
            return Err(TxnError::Failure(format!("no such url {url:?} in topic {topic:?}")));
        }
        let key = format!("{TOPICS}{topic}");
        if subs.is_empty() {
            self.store.txn(Txn { success: vec![Op::Delete { key }], ..Default::default() }).await?;
        } else {
            let value = serde_json::to_vec(&subs).map_err(|e| TxnError::Corrupt(topic.into(), e.to_string()))?;
            zhili_store::put(&*self.store, &key, value).await?;
        }
        Ok(())
    }

    pub async fn delete_topic(&self, topic: &str) -> Result<(), TxnError> {
        check_topic(topic)?;
        let key = format!("{TOPICS}{topic}");
        if self.store.get(&key)?.is_none() {
            return Err(TxnError::Failure(format!("topic {topic:?} not found")));
        }
        self.store.txn(Txn { success: vec![Op::Delete { key }], ..Default::default() }).await?;
        Ok(())
    }

    /// Moves the global status (times as DTM records them) and tells `$txn`.
    pub(crate) fn set_status(&self, rec: &mut Record, to: &str, reason: &str) {
        let now = now_text();
        rec.trans.status = to.to_string();
        rec.trans.update_time = now.clone();
        if !reason.is_empty() {
            rec.trans.rollback_reason = reason.to_string();
        }
        match to {
            status::SUCCEED => rec.trans.finish_time = Some(now),
            status::FAILED => rec.trans.rollback_time = Some(now),
            _ => {}
        }
        if rec.finished() {
            let mut f = self.stats.finished.lock();
            *f.entry((rec.trans.trans_type.clone(), to.to_string())).or_insert(0) += 1;
        }
        self.event(rec, None);
    }

    /// Appends a transition to `$txn` (queued; never blocks the coordinator).
    pub(crate) fn event(&self, rec: &Record, branch: Option<(&Branch, u64, Option<&str>)>) {
        let Some(tx) = &self.events else { return };
        let now = unix_ms();
        let t = &rec.trans;
        let (kind, data) = match branch {
            None => (
                format!("io.zhili.txn.{}", t.status),
                serde_json::json!({"gid": t.gid, "trans_type": t.trans_type, "status": t.status, "rollback_reason": t.rollback_reason}),
            ),
            Some((b, latency_ms, error)) => {
                let outcome = if error.is_some() && b.status == status::PREPARED { "retrying" } else { b.status.as_str() };
                (
                    format!("io.zhili.txn.branch.{outcome}"),
                    serde_json::json!({"gid": t.gid, "trans_type": t.trans_type, "branch_id": b.branch_id, "op": b.op, "url": b.url,
                        "status": b.status, "attempts": b.attempts, "latency_ms": latency_ms, "error": error}),
                )
            }
        };
        use rand::Rng;
        let id = format!("txn-{now}-{:x}", rand::rng().random::<u64>());
        let body = serde_json::json!({
            "specversion": "1.0", "id": id, "source": "zhili://txn", "type": kind, "subject": t.gid,
            "time": zhili_model::event::timestamp(now), "datacontenttype": "application/json", "data": data,
        });
        let _ = tx.try_send(NewEvent { id, body: serde_json::to_vec(&body).unwrap_or_default().into() });
    }

    pub(crate) fn resolver(&self) -> &dyn Resolve {
        &*self.resolve
    }

    pub(crate) fn defaults(&self) -> &Defaults {
        &self.defaults
    }
}

fn check_topic(topic: &str) -> Result<(), ValidationError> {
    if topic.is_empty() || topic.len() > 128 || !topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        return Err(ValidationError::new("topic", "1 to 128 letters, digits or -_.:"));
    }
    Ok(())
}

/// Appends queued `$txn` events in batches.
/// Removes finished transactions once they are older than the retention, oldest first, in
/// batches; runs until the coordinator is dropped.
async fn sweep(c: std::sync::Weak<Coordinator>) {
    let Some(retention) = c.upgrade().map(|c| c.defaults.retention) else { return };
    let every = (retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = c.upgrade() else { return };
        let cutoff = unix_ms().saturating_sub(retention.as_millis() as u64);
        loop {
            match c.sweep_once(cutoff).await {
                Ok(n) if n == SWEEP_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "removing expired transactions failed; will retry");
                    break;
                }
            }
        }
    }
}

impl Coordinator {
    /// Removes up to [`SWEEP_BATCH`] transactions that finished before `cutoff_ms`; returns how
    /// many finish markers it went through.
    async fn sweep_once(&self, cutoff_ms: u64) -> Result<usize, TxnError> {
        let page = self.store.range(DONE, Some(SWEEP_BATCH))?;
        let mut ops = Vec::new();
        let mut seen = 0;
        for kv in &page {
            let Some((ms, gid)) = kv.key.get(DONE.len()..).and_then(|k| k.split_once('/')) else { continue };
            let Ok(ms) = u64::from_str_radix(ms, 16) else { continue };
            if ms > cutoff_ms {
                break;
            }
            seen += 1;
            ops.push(Op::Delete { key: kv.key.clone() });
            // A gid used again after an earlier expiry keeps its newer record.
            if self.live(gid).is_none() && self.load(gid)?.is_some_and(|r| r.finished() && r.created_ms <= ms) {
                ops.push(Op::Delete { key: record_key(gid) });
            }
        }
        if !ops.is_empty() {
            self.store.txn(Txn { success: ops, ..Default::default() }).await?;
        }
        Ok(seen)
    }
}

//! The shop example's shared parts. Four services (`shop-order`, `shop-inventory`,
//! `shop-payment`, `shop-invoice`) each keep their data in their own SQLite file, register
//! themselves in Zhili through `zhili-client`, and take part in transactions run by Zhili's
//! DTM-compatible coordinator. Every branch handler runs its work in one SQLite transaction
//! guarded by the SDK's sub-transaction barrier, so retries, late compensations and
//! compensations of steps that never ran are all harmless.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{json, Value};
use zhili_client::barrier::{BarrierRow, BarrierStore, BranchBarrier, Skipped, BARRIER_TABLE_SQL};
use zhili_client::dtm::Dtm;
use zhili_client::{Client, InstanceSpec, Registration, RegistrationOptions};

/// What every shop service is told on its command line.
#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    /// Zhili's API, where the service registers itself.
    #[arg(long, env = "ZHILI_ADDR", default_value = "http://127.0.0.1:8500")]
    pub zhili: String,
    /// Zhili's DTM-compatible coordinator.
    #[arg(long, env = "ZHILI_DTM_ADDR", default_value = "http://127.0.0.1:36789")]
    pub dtm: String,
    /// An ACL token for registering and for transactions (not needed with `zhili server --dev`).
    #[arg(long, env = "ZHILI_TOKEN")]
    pub token: Option<String>,
    /// This service's SQLite file.
    #[arg(long)]
    pub db: PathBuf,
    /// Where to listen (port 0 takes a free port; the registered port is the real one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// One service's SQLite database (one connection: SQLite writes one transaction at a time).
#[derive(Clone)]
pub struct Db(Arc<Mutex<Connection>>);

impl Db {
    /// Opens (or creates) the file with the barrier table and `schema`.
    pub fn open(path: &std::path::Path, schema: &str) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        // WAL with synchronous=FULL: a committed branch survives kill -9 and power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(BARRIER_TABLE_SQL)?;
        conn.execute_batch(schema)?;
        Ok(Self(Arc::new(Mutex::new(conn))))
    }

    /// Runs `f` on the connection off the async threads.
    pub async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> T + Send + 'static) -> T {
        let db = self.0.clone();
        let run = move || {
            let mut conn = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn)
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Rows of `sql` as JSON objects (for the read endpoints).
    pub async fn rows(&self, sql: &'static str) -> Response {
        let out = self
            .with(move |c| -> rusqlite::Result<Vec<Value>> {
                let mut stmt = c.prepare(sql)?;
                let names: Vec<String> = stmt.column_names().map(String::from).collect();
                let rows = stmt.query_map([], |row| {
                    let mut obj = serde_json::Map::new();
                    for (i, name) in names.iter().enumerate() {
                        let v = match row.get_ref(i)? {
                            rusqlite::types::ValueRef::Integer(n) => json!(n),
                            rusqlite::types::ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                            rusqlite::types::ValueRef::Real(f) => json!(f),
                            _ => Value::Null,
                        };
                        obj.insert(name.clone(), v);
                    }
                    Ok(Value::Object(obj))
                })?;
                rows.collect()
            })
            .await;
        match out {
            Ok(rows) => Json(rows).into_response(),
            Err(e) => temporary(&e.to_string()),
        }
    }
}

/// The barrier's rows live in the same SQLite transaction as the branch's work.
pub struct Tx<'a>(pub Transaction<'a>);

impl BarrierStore for Tx<'_> {
    type Error = rusqlite::Error;

    fn insert_barrier(&mut self, r: &BarrierRow<'_>) -> rusqlite::Result<bool> {
        let n = self.0.execute(
            "INSERT INTO barrier (trans_type, gid, branch_id, op, barrier_id, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (gid, branch_id, op, barrier_id) DO NOTHING",
            params![r.trans_type, r.gid, r.branch_id, r.op, r.barrier_id, r.reason],
        )?;
        Ok(n == 1)
    }

    fn barrier_reason(&mut self, gid: &str, branch_id: &str, op: &str, barrier_id: &str) -> rusqlite::Result<Option<String>> {
        self.0
            .query_row(
                "SELECT reason FROM barrier WHERE gid = ?1 AND branch_id = ?2 AND op = ?3 AND barrier_id = ?4",
                params![gid, branch_id, op, barrier_id],
                |r| r.get(0),
            )
            .optional()
    }
}

/// Why a branch's work did not happen.
#[derive(Debug)]
pub enum BranchError {
    /// A business refusal (declined card, no stock): DTM's FAILURE, the saga compensates.
    Failure(String),
    /// Anything else (the database was busy, ...): the coordinator retries.
    Retry(String),
}

impl From<rusqlite::Error> for BranchError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Retry(e.to_string())
    }
}

impl BranchError {
    /// The answer in DTM's result protocol.
    pub fn response(&self) -> Response {
        match self {
            Self::Failure(why) => failure(why),
            Self::Retry(why) => temporary(why),
        }
    }
}

/// DTM's answers.
pub fn success() -> Response {
    Json(json!({"dtm_result": "SUCCESS"})).into_response()
}

pub fn failure(why: &str) -> Response {
    (StatusCode::CONFLICT, Json(json!({"dtm_result": "FAILURE", "message": why}))).into_response()
}

pub fn temporary(why: &str) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": why}))).into_response()
}

/// Runs one branch call: `work` in a SQLite transaction behind the barrier named by the call's
/// query string; committed when it succeeds (or is skipped by the barrier), rolled back when it
/// fails. Answers in DTM's result protocol.
pub async fn guarded<W>(db: &Db, query: Option<String>, what: &'static str, work: W) -> Result<Response, BadRequest>
where
    W: FnOnce(&Transaction<'_>) -> Result<(), BranchError> + Send + 'static,
{
    let mut barrier = barrier(query)?;
    let gid = barrier.gid.clone();
    let out = db
        .with(move |conn| -> Result<Result<(), Skipped>, BranchError> {
            let mut tx = Tx(conn.transaction()?);
            let done = barrier.call(&mut tx, |tx| work(&tx.0))?;
            tx.0.commit()?;
            Ok(done)
        })
        .await;
    Ok(match out {
        Ok(Ok(())) => {
            println!("{what} {gid}: done");
            success()
        }
        Ok(Err(skipped)) => {
            println!("{what} {gid}: skipped by the barrier ({skipped:?})");
            success()
        }
        Err(e) => {
            if let BranchError::Failure(why) = &e {
                println!("{what} {gid}: refused ({why})");
            }
            e.response()
        }
    })
}

/// The barrier named by a branch call's query string.
pub fn barrier(query: Option<String>) -> Result<BranchBarrier, BadRequest> {
    Ok(BranchBarrier::from_query(query.as_deref().unwrap_or(""))?)
}

/// A request the service cannot take: 400 naming what is wrong.
#[derive(Debug)]
pub struct BadRequest(pub String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, Json(json!({"error": self.0}))).into_response()
    }
}

impl From<zhili_client::ClientError> for BadRequest {
    fn from(e: zhili_client::ClientError) -> Self {
        Self(e.to_string())
    }
}

/// The JSON a request or a step carries as its body.
pub fn payload(body: &[u8]) -> Result<Value, BadRequest> {
    serde_json::from_slice(body).map_err(|e| BadRequest(format!("body: {e}")))
}

pub fn field_str(v: &Value, name: &str) -> Result<String, BadRequest> {
    v.get(name).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string).ok_or_else(|| BadRequest(format!("{name}: a string is required")))
}

pub fn field_i64(v: &Value, name: &str) -> Result<i64, BadRequest> {
    v.get(name).and_then(Value::as_i64).filter(|n| *n > 0).ok_or_else(|| BadRequest(format!("{name}: a positive integer is required")))
}

/// The coordinator client for this service.
pub fn dtm(args: &Args) -> anyhow::Result<Dtm> {
    Ok(Dtm::new(&args.dtm, args.token.clone())?)
}

/// Binds, registers `service` in Zhili (heartbeats keep it there), serves `app` until SIGTERM or
/// Ctrl-C, then deregisters. Prints `shop-<service> listening on <addr>` once it serves.
pub async fn serve(service: &str, args: &Args, app: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let client = Client::new(&args.zhili, args.token.clone())?;
    let spec =
        InstanceSpec { address: addr.ip().to_string(), port: u32::from(addr.port()), version: Some(env!("CARGO_PKG_VERSION").into()), ..Default::default() };
    let registration = Registration::start(client, service, spec, RegistrationOptions { heartbeat_interval: Duration::from_secs(2) }).await?;
    println!("shop-{service} listening on {addr} as instance {}", registration.id());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    registration.shutdown().await?;
    Ok(())
}

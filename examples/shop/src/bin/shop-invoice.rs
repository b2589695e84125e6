//! The invoice service: subscribes to the `invoices` topic at the coordinator and issues one
//! invoice per paid order when the order's 2-phase message is delivered.
//! `POST /api/issue` (the topic's subscriber), `GET /api/invoices`.

use axum::body::Bytes;
use axum::extract::RawQuery;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use rusqlite::params;
use zhili_shop::{dtm, field_i64, field_str, guarded, payload, serve, Args, BadRequest, Db};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS invoices (number INTEGER PRIMARY KEY AUTOINCREMENT, order_id TEXT NOT NULL UNIQUE, amount INTEGER NOT NULL);";

/// Where the coordinator delivers the topic: a discovery URL, so any healthy instance serves it.
const SUBSCRIBER: &str = "discovery://invoice/api/issue";

async fn issue(db: axum::extract::State<Db>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let p = payload(&body)?;
    let (order, amount) = (field_str(&p, "order")?, field_i64(&p, "amount")?);
    // The barrier makes a repeated delivery harmless; the UNIQUE order_id would turn a second
    // invoice for one order into an error that never succeeds (visible, never silent).
    guarded(&db, q, "invoice", move |tx| {
        tx.execute("INSERT INTO invoices (order_id, amount) VALUES (?1, ?2)", params![order, amount])?;
        Ok(())
    })
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = Db::open(&args.db, SCHEMA)?;
    dtm(&args)?.subscribe("invoices", SUBSCRIBER, "shop invoices").await?;
    let app = Router::new()
        .route("/api/issue", post(issue))
        .route(
            "/api/invoices",
            get(|db: axum::extract::State<Db>| async move { db.rows("SELECT number, order_id, amount FROM invoices ORDER BY number").await }),
        )
        .with_state(db);
    serve("invoice", &args, app).await
}

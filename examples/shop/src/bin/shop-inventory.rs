//! The inventory service: stock per SKU, reserved by checkout sagas and released by their
//! compensations. `POST /api/reserve` (409 when the stock is short), `POST /api/release`,
//! `GET /api/stock`, `GET /api/reservations`.

use axum::body::Bytes;
use axum::extract::RawQuery;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use rusqlite::{params, OptionalExtension};
use zhili_shop::{field_i64, field_str, guarded, payload, serve, Args, BadRequest, BranchError, Db};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL CHECK (available >= 0));
CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL, status TEXT NOT NULL);
INSERT INTO stock (sku, available) VALUES ('apple', 100), ('pear', 5) ON CONFLICT (sku) DO NOTHING;
";

async fn reserve(db: axum::extract::State<Db>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let p = payload(&body)?;
    let (order, sku, qty) = (field_str(&p, "order")?, field_str(&p, "sku")?, field_i64(&p, "qty")?);
    guarded(&db, q, "reserve", move |tx| {
        let available: Option<i64> = tx.query_row("SELECT available FROM stock WHERE sku = ?1", [&sku], |r| r.get(0)).optional()?;
        match available {
            None => return Err(BranchError::Failure(format!("unknown sku {sku:?}"))),
            Some(n) if n < qty => return Err(BranchError::Failure(format!("only {n} {sku} left, {qty} wanted"))),
            Some(_) => {}
        }
        tx.execute("UPDATE stock SET available = available - ?1 WHERE sku = ?2", params![qty, sku])?;
        tx.execute("INSERT INTO reservations (order_id, sku, qty, status) VALUES (?1, ?2, ?3, 'reserved')", params![order, sku, qty])?;
        Ok(())
    })
    .await
}

async fn release(db: axum::extract::State<Db>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let order = field_str(&payload(&body)?, "order")?;
    guarded(&db, q, "release", move |tx| {
        let held: Option<(String, i64)> = tx
            .query_row("SELECT sku, qty FROM reservations WHERE order_id = ?1 AND status = 'reserved'", [&order], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((sku, qty)) = held {
            tx.execute("UPDATE stock SET available = available + ?1 WHERE sku = ?2", params![qty, sku])?;
            tx.execute("UPDATE reservations SET status = 'released' WHERE order_id = ?1", [&order])?;
        }
        Ok(())
    })
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = Db::open(&args.db, SCHEMA)?;
    let app = Router::new()
        .route("/api/reserve", post(reserve))
        .route("/api/release", post(release))
        .route("/api/stock", get(|db: axum::extract::State<Db>| async move { db.rows("SELECT sku, available FROM stock ORDER BY sku").await }))
        .route(
            "/api/reservations",
            get(|db: axum::extract::State<Db>| async move { db.rows("SELECT order_id, sku, qty, status FROM reservations ORDER BY order_id").await }),
        )
        .with_state(db);
    serve("inventory", &args, app).await
}

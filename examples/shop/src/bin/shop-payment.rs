//! The payment service: charges cards for orders and refunds them on compensation.
//! `POST /api/charge` (409 for a declined card), `POST /api/refund`, `GET /api/charges`.
//! `SHOP_BANK_DELAY_MS` makes every charge wait that long first (a slow bank: the demo kills
//! the service while a charge waits).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use rusqlite::params;
use zhili_shop::{field_i64, field_str, guarded, payload, serve, Args, BadRequest, BranchError, Db};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS charges (order_id TEXT PRIMARY KEY, card TEXT NOT NULL, amount INTEGER NOT NULL, status TEXT NOT NULL);";

/// The card number every test payment system declines.
const DECLINED_CARD: &str = "4000000000000002";

#[derive(Clone)]
struct Payment {
    db: Db,
    bank_delay: Duration,
}

async fn charge(State(s): State<Payment>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let p = payload(&body)?;
    let (order, card, amount) = (field_str(&p, "order")?, field_str(&p, "card")?, field_i64(&p, "amount")?);
    if !s.bank_delay.is_zero() {
        println!("charge {order}: asking the bank");
        tokio::time::sleep(s.bank_delay).await;
    }
    guarded(&s.db, q, "charge", move |tx| {
        if card == DECLINED_CARD {
            return Err(BranchError::Failure(format!("card ending {} declined", card.get(card.len().saturating_sub(4)..).unwrap_or(""))));
        }
        tx.execute("INSERT INTO charges (order_id, card, amount, status) VALUES (?1, ?2, ?3, 'charged')", params![order, card, amount])?;
        Ok(())
    })
    .await
}

async fn refund(State(s): State<Payment>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let order = field_str(&payload(&body)?, "order")?;
    guarded(&s.db, q, "refund", move |tx| {
        tx.execute("UPDATE charges SET status = 'refunded' WHERE order_id = ?1 AND status = 'charged'", [&order])?;
        Ok(())
    })
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bank_delay = Duration::from_millis(std::env::var("SHOP_BANK_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    let db = Db::open(&args.db, SCHEMA)?;
    let app = Router::new()
        .route("/api/charge", post(charge))
        .route("/api/refund", post(refund))
        .route("/api/charges", get(|s: State<Payment>| async move { s.db.rows("SELECT order_id, card, amount, status FROM charges ORDER BY order_id").await }))
        .with_state(Payment { db, bank_delay });
    serve("payment", &args, app).await
}

//! The order service: takes checkouts and runs each as a saga on Zhili's coordinator:
//! create the order → reserve stock → charge the card → confirm. A step refused for good
//! (no stock, a declined card) compensates the earlier ones in reverse. Confirming marks the
//! order paid and, in the same local transaction, commits a 2-phase message to the `invoices`
//! topic, so an order is paid if and only if its invoice will be issued.
//!
//! `POST /api/checkout` `{"sku", "qty", "card", "amount"}` → 202 `{"order"}`;
//! `GET /api/orders`, `GET /api/orders/{id}`; the saga's branches `POST /api/create`,
//! `/api/cancel`, `/api/confirm`, `/api/unconfirm`; the message back-check `GET /api/query_prepared`.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};
use zhili_client::barrier::BranchBarrier;
use zhili_client::dtm::{Dtm, Trans};
use zhili_shop::{barrier, dtm, failure, field_i64, field_str, guarded, payload, serve, success, temporary, Args, BadRequest, BranchError, Db, Tx};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL, card TEXT NOT NULL,
    amount INTEGER NOT NULL, status TEXT NOT NULL, invoice_message TEXT);";

/// Branches are addressed by service name: the coordinator picks a healthy instance.
const STEPS: [(&str, &str); 4] = [
    ("discovery://order/api/create", "discovery://order/api/cancel"),
    ("discovery://inventory/api/reserve", "discovery://inventory/api/release"),
    ("discovery://payment/api/charge", "discovery://payment/api/refund"),
    ("discovery://order/api/confirm", "discovery://order/api/unconfirm"),
];

#[derive(Clone)]
struct Order {
    db: Db,
    dtm: Dtm,
}

async fn checkout(State(s): State<Order>, body: Bytes) -> Result<Response, BadRequest> {
    let p = payload(&body)?;
    let (sku, qty, card, amount) = (field_str(&p, "sku")?, field_i64(&p, "qty")?, field_str(&p, "card")?, field_i64(&p, "amount")?);
    let gid = match s.dtm.new_gid().await {
        Ok(g) => g,
        Err(e) => return Ok(temporary(&format!("coordinator: {e}"))),
    };
    let step = json!({"order": gid, "sku": sku, "qty": qty, "card": card, "amount": amount});
    let mut saga = Trans::saga(&gid).retry_interval(1).request_timeout(10);
    for (action, compensate) in STEPS {
        saga = saga.step(action, compensate, &step)?;
    }
    Ok(match s.dtm.submit(&saga).await {
        Ok(()) => {
            println!("checkout {gid}: saga submitted ({qty} {sku})");
            (StatusCode::ACCEPTED, Json(json!({"order": gid}))).into_response()
        }
        Err(e) => temporary(&format!("coordinator: {e}")),
    })
}

async fn create(State(s): State<Order>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let p = payload(&body)?;
    let (order, sku, qty) = (field_str(&p, "order")?, field_str(&p, "sku")?, field_i64(&p, "qty")?);
    let (card, amount) = (field_str(&p, "card")?, field_i64(&p, "amount")?);
    guarded(&s.db, q, "create", move |tx| {
        tx.execute("INSERT INTO orders (id, sku, qty, card, amount, status) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')", params![order, sku, qty, card, amount])?;
        Ok(())
    })
    .await
}

async fn cancel(State(s): State<Order>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let order = field_str(&payload(&body)?, "order")?;
    guarded(&s.db, q, "cancel", move |tx| {
        tx.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?1 AND status = 'pending'", [&order])?;
        Ok(())
    })
    .await
}

/// Confirm's compensation: confirm is the last step and never refuses, so nothing to undo.
async fn unconfirm(State(s): State<Order>, RawQuery(q): RawQuery) -> Result<Response, BadRequest> {
    guarded(&s.db, q, "unconfirm", |_| Ok(())).await
}

/// What confirm's local transaction decided.
enum Confirmed {
    /// Paid now: the message's barrier row committed with it, so submit it.
    Paid,
    /// This branch ran before (a retry after a lost answer): the earlier message stands.
    Before,
}

/// Marks the order paid and announces it on the `invoices` topic with a 2-phase message: the
/// message is prepared, the order is marked paid in a SQLite transaction that also holds the
/// message's barrier row (and the saga branch's own), and the message is submitted. If this
/// process dies before the submit, the coordinator's back-check (`query_prepared`) finds the
/// barrier row and commits the message; if it died before the commit, the back-check rolls the
/// message back and the saga retries confirm with a new message.
async fn confirm(State(s): State<Order>, RawQuery(q): RawQuery, body: Bytes) -> Result<Response, BadRequest> {
    let mut branch = barrier(q)?;
    let p = payload(&body)?;
    let (order, amount) = (field_str(&p, "order")?, field_i64(&p, "amount")?);
    let msg_gid = match s.dtm.new_gid().await {
        Ok(g) => g,
        Err(e) => return Ok(temporary(&format!("coordinator: {e}"))),
    };
    let msg =
        Trans::msg(&msg_gid, "discovery://order/api/query_prepared").deliver("topic://invoices", &json!({"order": order, "amount": amount}))?.retry_interval(1);
    if let Err(e) = s.dtm.prepare(&msg).await {
        return Ok(temporary(&format!("prepare the invoice message: {e}")));
    }
    let local = {
        let (order, msg_gid) = (order.clone(), msg_gid.clone());
        s.db.with(move |conn| -> Result<Confirmed, BranchError> {
            let mut tx = Tx(conn.transaction()?);
            let done = branch.call(&mut tx, |tx| {
                BranchBarrier::for_message(&msg_gid).call(tx, |tx| {
                    let n =
                        tx.0.execute("UPDATE orders SET status = 'paid', invoice_message = ?2 WHERE id = ?1 AND status = 'pending'", params![order, msg_gid])?;
                    if n == 1 {
                        Ok(())
                    } else {
                        Err(BranchError::Failure(format!("order {order} is not pending")))
                    }
                })
            })?;
            match done {
                Ok(Ok(())) => {
                    tx.0.commit()?;
                    Ok(Confirmed::Paid)
                }
                // The back-check already rolled this message back: retry with a new one.
                Ok(Err(skipped)) => Err(BranchError::Retry(format!("invoice message {msg_gid} was rolled back ({skipped:?})"))),
                Err(_) => Ok(Confirmed::Before),
            }
        })
        .await
    };
    Ok(match local {
        Ok(Confirmed::Paid) => {
            if let Err(e) = s.dtm.submit(&msg).await {
                // Committed locally: the coordinator's back-check will find it and deliver.
                println!("confirm {order}: submit failed ({e}); the back-check will commit it");
            }
            println!("confirm {order}: paid, invoice message {msg_gid}");
            success()
        }
        outcome => {
            let _ = s.dtm.abort(&msg).await;
            match outcome {
                Ok(_) => success(),
                Err(e) => e.response(),
            }
        }
    })
}

/// The invoice message's back-check: committed if the paying transaction committed.
async fn query_prepared(State(s): State<Order>, RawQuery(q): RawQuery) -> Result<Response, BadRequest> {
    let gid = barrier(q)?.gid;
    let checked =
        s.db.with(move |conn| -> rusqlite::Result<bool> {
            let mut tx = Tx(conn.transaction()?);
            let committed = BranchBarrier::query_prepared(&gid, &mut tx)?;
            tx.0.commit()?;
            Ok(committed)
        })
        .await;
    Ok(match checked {
        Ok(true) => success(),
        Ok(false) => failure("the local transaction did not commit; rolled back"),
        Err(e) => temporary(&e.to_string()),
    })
}

async fn one(State(s): State<Order>, Path(id): Path<String>) -> Response {
    let found = s
        .db
        .with(move |c| {
            c.query_row("SELECT id, sku, qty, amount, status FROM orders WHERE id = ?1", [&id], |r| {
                Ok(json!({"id": r.get::<_, String>(0)?, "sku": r.get::<_, String>(1)?, "qty": r.get::<_, i64>(2)?, "amount": r.get::<_, i64>(3)?, "status": r.get::<_, String>(4)?}))
            })
            .optional()
        })
        .await;
    match found {
        Ok(Some(v)) => Json::<Value>(v).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, Json(json!({"error": "no such order (yet)"}))).into_response(),
        Err(e) => temporary(&e.to_string()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = Order { db: Db::open(&args.db, SCHEMA)?, dtm: dtm(&args)? };
    let app = Router::new()
        .route("/api/checkout", post(checkout))
        .route(
            "/api/orders",
            get(|s: State<Order>| async move { s.db.rows("SELECT id, sku, qty, card, amount, status, invoice_message FROM orders ORDER BY id").await }),
        )
        .route("/api/orders/{id}", get(one))
        .route("/api/create", post(create))
        .route("/api/cancel", post(cancel))
        .route("/api/confirm", post(confirm))
        .route("/api/unconfirm", post(unconfirm))
        .route("/api/query_prepared", get(query_prepared))
        .with_state(state);
    serve("order", &args, app).await
}

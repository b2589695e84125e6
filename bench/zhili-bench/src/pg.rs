//! A minimal PostgreSQL client for the event-log benchmark: the v3 protocol's startup (trust
//! authentication on a private local cluster) and simple queries. Each append is one INSERT
//! into an events table, committed with `synchronous_commit=on` (the server's default).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Pg {
    s: TcpStream,
}

impl Pg {
    async fn connect(addr: SocketAddr, user: &str, db: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        let mut body = Vec::new();
        body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
        for (k, v) in [("user", user), ("database", db)] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        let mut pg = Self { s };
        pg.s.write_all(&msg).await?;
        // AuthenticationOk ('R' 0), parameters, key data, until ReadyForQuery.
        loop {
            let (kind, payload) = pg.message().await?;
            match kind {
                b'R' if payload.get(..4) != Some(&[0, 0, 0, 0]) => bail!("the cluster asks for a password; the bench expects trust authentication"),
                b'E' => bail!("startup: {}", String::from_utf8_lossy(&payload)),
                b'Z' => return Ok(pg),
                _ => {}
            }
        }
    }

    async fn message(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        let kind = self.s.read_u8().await?;
        let len = self.s.read_u32().await? as usize;
        let mut payload = vec![0u8; len.saturating_sub(4)];
        self.s.read_exact(&mut payload).await?;
        Ok((kind, payload))
    }

    /// Sends a simple-protocol Query message.
    async fn send_query(&mut self, sql: &str) -> anyhow::Result<()> {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        Ok(self.s.write_all(&msg).await?)
    }

    /// Runs one simple query; Err on an ErrorResponse.
    async fn query(&mut self, sql: &str) -> anyhow::Result<()> {
        self.send_query(sql).await?;
        let mut failed = None;
        loop {
            let (kind, payload) = self.message().await?;
            match kind {
                b'E' => failed = Some(String::from_utf8_lossy(&payload).into_owned()),
                b'Z' => return failed.map_or(Ok(()), |e| bail!("{e}")),
                _ => {}
            }
        }
    }
}

/// Closed-loop appends into a PostgreSQL events table: one INSERT of one 256-byte event per
/// request, or `batch` rows per INSERT; `per_second` counts statements.
pub async fn insert(target: SocketAddr, concurrency: usize, batch: usize, duration: Duration) -> anyhow::Result<()> {
    let mut setup = Pg::connect(target, "postgres", "postgres").await?;
    setup.query("CREATE TABLE IF NOT EXISTS events (position bigserial PRIMARY KEY, stream text NOT NULL, id text NOT NULL, body jsonb NOT NULL, UNIQUE (stream, id))").await?;
    let before = count(&mut setup).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (stop, errors) = (stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let Ok(mut c) = Pg::connect(target, "postgres", "postgres").await else { return lat };
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let rows: Vec<String> = (0..batch)
                    .map(|k| {
                        let body = crate::bench_event(w, n * batch + k).replace('\'', "''");
                        format!("('bench-{}', '{run:x}-{w}-{}', '{body}')", w % 64, n * batch + k)
                    })
                    .collect();
                let t = Instant::now();
                match c.query(&format!("INSERT INTO events (stream, id, body) VALUES {}", rows.join(","))).await {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            lat
        }));
    }
    crate::report(&format!("postgres-insert-{batch}"), concurrency, crate::Run { start, duration, stop, errors, tasks }).await?;
    let after = count(&mut setup).await?;
    println!("{}", serde_json::json!({"check": "postgres rows", "rows_added": after - before}));
    Ok(())
}

/// Rows in the events table, read back with the server's own count.
async fn count(c: &mut Pg) -> anyhow::Result<u64> {
    c.send_query("SELECT count(*) FROM events").await?;
    let mut n = None;
    loop {
        let (kind, payload) = c.message().await?;
        match kind {
            // DataRow: column count (2), then length (4) and text of the one value.
            b'D' => n = payload.get(6..).and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.parse().ok()),
            b'E' => bail!("{}", String::from_utf8_lossy(&payload)),
            b'Z' => return n.context("no count"),
            _ => {}
        }
    }
}

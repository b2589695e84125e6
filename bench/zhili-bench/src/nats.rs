//! A minimal NATS client for the event-log benchmark: the text protocol (INFO, CONNECT, PUB,
//! SUB, MSG, PING/PONG) over TCP, JetStream stream creation through its API subject, and
//! publishes whose reply subject receives JetStream's ack (`{"stream":..,"seq":N}`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

struct Nats {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    sid: u64,
}

impl Nats {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut n = Self { r: BufReader::new(r), w, sid: 100 };
        let info = n.line().await?;
        if !info.starts_with("INFO") {
            bail!("expected INFO, got {info:?}");
        }
        n.w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false}\r\nPING\r\n").await?;
        loop {
            let l = n.line().await?;
            if l == "PONG" {
                return Ok(n);
            }
            if l.starts_with("-ERR") {
                bail!("{l}");
            }
        }
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l).await? == 0 {
            bail!("connection closed");
        }
        Ok(l.trim_end().to_string())
    }

    /// The next MSG's (subject, payload), answering PINGs on the way.
    async fn msg(&mut self) -> anyhow::Result<(String, Vec<u8>)> {
        loop {
            let l = self.line().await?;
            if l == "PING" {
                self.w.write_all(b"PONG\r\n").await?;
                continue;
            }
            if let Some(rest) = l.strip_prefix("MSG ") {
                let parts: Vec<&str> = rest.split(' ').collect();
                let len: usize = parts.last().context("MSG length")?.parse()?;
                let mut payload = vec![0u8; len + 2];
                self.r.read_exact(&mut payload).await?;
                payload.truncate(len);
                return Ok((parts.first().context("MSG subject")?.to_string(), payload));
            }
            if l.starts_with("-ERR") {
                bail!("{l}");
            }
        }
    }

    async fn request(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.sid += 1;
        let (sid, inbox) = (self.sid, format!("_INBOX.setup.{}", self.sid));
        self.w.write_all(format!("SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\nPUB {subject} {inbox} {}\r\n", payload.len()).as_bytes()).await?;
        self.w.write_all(payload).await?;
        self.w.write_all(b"\r\n").await?;
        Ok(self.msg().await?.1)
    }
}

/// Closed-loop JetStream publishing with acks: `concurrency` connections, each with `inflight`
/// publishes outstanding; an ack without `"seq"` counts as an error.
pub async fn publish(target: SocketAddr, concurrency: usize, inflight: usize, duration: Duration) -> anyhow::Result<()> {
    let mut setup = Nats::connect(target).await?;
    let created = setup.request("$JS.API.STREAM.CREATE.BENCH", br#"{"name":"BENCH","subjects":["bench.>"],"storage":"file","retention":"limits"}"#).await?;
    let text = String::from_utf8_lossy(&created).into_owned();
    if text.contains("\"error\"") && !text.contains("already in use") {
        bail!("creating the JetStream stream: {text}");
    }
    let before = stored(&mut setup).await?;
    let payload = "x".repeat(256);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (stop, errors, payload) = (stop.clone(), errors.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let Ok(mut c) = Nats::connect(target).await else { return lat };
            if c.w.write_all(format!("SUB _INBOX.{w}.* 1\r\n").as_bytes()).await.is_err() {
                return lat;
            }
            let mut sent: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
            let mut n: u64 = 0;
            loop {
                while sent.len() < inflight && !stop.load(Ordering::Relaxed) {
                    let head = format!("PUB bench.{w} _INBOX.{w}.{n} {}\r\n{payload}\r\n", payload.len());
                    if c.w.write_all(head.as_bytes()).await.is_err() {
                        return lat;
                    }
                    sent.insert(n, Instant::now());
                    n += 1;
                }
                if sent.is_empty() {
                    return lat;
                }
                let Ok((subject, ack)) = c.msg().await else { return lat };
                let id: u64 = subject.rsplit('.').next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
                match sent.remove(&id) {
                    Some(t) if ack.windows(5).any(|x| x == b"\"seq\"") => lat.push(t.elapsed().as_micros() as u64),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    crate::report(&format!("nats-jetstream-publish-inflight-{inflight}"), concurrency, crate::Run { start, duration, stop, errors, tasks }).await?;
    // The peer's own count: what JetStream says it stored during the run (acked or not).
    let after = stored(&mut setup).await?;
    println!("{}", serde_json::json!({"check": "jetstream stream state", "messages_added": after - before}));
    Ok(())
}

/// Messages in the BENCH stream, from JetStream's own STREAM.INFO.
async fn stored(n: &mut Nats) -> anyhow::Result<u64> {
    let info: serde_json::Value = serde_json::from_slice(&n.request("$JS.API.STREAM.INFO.BENCH", b"").await?)?;
    info["state"]["messages"].as_u64().with_context(|| format!("stream info: {info}"))
}

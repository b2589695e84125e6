//! Event-log scenarios beyond single appends: catch-up reads (paged and over SSE), consumer-group
//! delivery, webhook delivery to a local receiver, the NDJSON streaming append, and end-to-end
//! latency from an append to an SSE subscriber at a fixed rate. Each prints JSON lines like `load`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::{bench_event, percentile, Conn};

/// A name unique to this run, so runs never meet each other's streams or groups.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}")
}

fn line(scenario: &str, events: u64, secs: f64, extra: Value) {
    let mut out =
        json!({"scenario": scenario, "events": events, "seconds": (secs * 100.0).round() / 100.0, "events_per_second": (events as f64 / secs).round()});
    if let (Some(o), Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
    println!("{out}");
}

/// Appends `n` 256-byte events to `stream` in batches of 100 over 16 connections.
async fn fill(target: SocketAddr, stream: &str, n: usize) -> anyhow::Result<()> {
    let batches = n.div_ceil(100);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (next, stream) = (next.clone(), stream.to_string());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(target).await?;
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed) as usize;
                if b >= batches {
                    return anyhow::Ok(());
                }
                let events: Vec<String> = (0..100.min(n - b * 100)).map(|k| bench_event(1000 + w, b * 100 + k)).collect();
                let (st, body) = c.send(Method::POST, &format!("/api/v1/streams/{stream}"), Some(Bytes::from(format!("[{}]", events.join(","))))).await?;
                if st != 201 {
                    bail!("filling {stream}: {st} {}", String::from_utf8_lossy(&body));
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Catch-up reads of a stream of `n` events: pages of 4,096 by one reader, then the same by
/// `readers` readers at once, then one SSE subscription from the start until it has them all.
pub async fn read(target: SocketAddr, n: usize, readers: usize) -> anyhow::Result<()> {
    let stream = unique("bench-read");
    fill(target, &stream, n).await?;
    for r in [1, readers] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..r {
            let stream = stream.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::open(target).await?;
                let (mut from, mut got) = (0u64, 0u64);
                loop {
                    let (st, body) = c.send(Method::GET, &format!("/api/v1/streams/{stream}?from={from}&limit=4096"), None).await?;
                    if st != 200 {
                        bail!("read: {st}");
                    }
                    // Counted without parsing the page (the generator shares the machine):
                    // one "stream_revision" per event, and "next" closes the page.
                    got += occurrences(&body, b"\"stream_revision\":");
                    let tail = body.get(body.len().saturating_sub(40)..).unwrap_or_default();
                    let next = tail.windows(7).position(|w| w == b"\"next\":").and_then(|i| {
                        let digits: Vec<u8> = tail.iter().skip(i + 7).take_while(|b| b.is_ascii_digit()).copied().collect();
                        String::from_utf8(digits).ok()?.parse::<u64>().ok()
                    });
                    match next {
                        Some(next) => from = next,
                        None => return anyhow::Ok(got),
                    }
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            let got = t.await??;
            if got != n as u64 {
                bail!("a reader got {got} events, not {n}");
            }
            total += got;
        }
        line("events-read-pages", total, start.elapsed().as_secs_f64(), json!({"readers": r}));
    }
    let start = Instant::now();
    let mut got = 0u64;
    // Each message ends with a blank line, which may be cut between two chunks: keep the last
    // byte of each.
    let mut carry = Vec::new();
    sse(target, &format!("/api/v1/streams/{stream}/subscribe?from=0"), |chunk| {
        carry.extend_from_slice(chunk);
        got += occurrences(&carry, b"\n\n");
        let keep = carry.len().saturating_sub(1);
        carry.drain(..keep);
        got < n as u64
    })
    .await?;
    line("events-read-sse", got, start.elapsed().as_secs_f64(), json!({}));
    Ok(())
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

/// Follows an SSE answer, handing each chunk to `more` until it returns false (or 120 s pass).
async fn sse(target: SocketAddr, path: &str, mut more: impl FnMut(&[u8]) -> bool) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", target.to_string()).header("accept", "text/event-stream").body(http_body_util::Empty::new())?;
    let resp = sender.send_request(req).await?;
    if resp.status() != 200 {
        bail!("subscribe: {}", resp.status());
    }
    let mut body = resp.into_body();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame()).await.context("SSE: no end within 120 s")? {
        if let Ok(data) = frame?.into_data() {
            if !more(&data) {
                return Ok(());
            }
        }
    }
    bail!("SSE answer ended early")
}

/// A consumer group of `consumers` competing consumers pulling batches of 1,000 and acking
/// them, over a stream of `n` events.
pub async fn group(target: SocketAddr, n: usize, consumers: usize) -> anyhow::Result<()> {
    let stream = unique("bench-group");
    fill(target, &stream, n).await?;
    let name = unique("bench-group");
    let mut c = Conn::open(target).await?;
    let (st, body) = c.send(Method::PUT, &format!("/api/v1/subscriptions/{name}"), Some(Bytes::from(json!({"stream": stream}).to_string()))).await?;
    if st != 201 {
        bail!("subscription: {st} {}", String::from_utf8_lossy(&body));
    }
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let (acked, name) = (acked.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(target).await?;
            while acked.load(Ordering::Relaxed) < n as u64 {
                if start.elapsed() > Duration::from_secs(120) {
                    bail!("not all acked within 120 s");
                }
                let (st, body) = c.send(Method::GET, &format!("/api/v1/subscriptions/{name}/next?max=1000&wait=200ms"), None).await?;
                if st != 200 {
                    bail!("next: {st}");
                }
                let page: Value = serde_json::from_slice(&body)?;
                let ids: Vec<&str> = page["events"].as_array().into_iter().flatten().filter_map(|e| e["ack_id"].as_str()).collect();
                if ids.is_empty() {
                    continue;
                }
                let (st, _) =
                    c.send(Method::POST, &format!("/api/v1/subscriptions/{name}/ack"), Some(Bytes::from(json!({"ack_ids": ids}).to_string()))).await?;
                if st != 200 {
                    bail!("ack: {st}");
                }
                acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    line("events-group", acked.load(Ordering::Relaxed), start.elapsed().as_secs_f64(), json!({"consumers": consumers}));
    let _ = c.send(Method::DELETE, &format!("/api/v1/subscriptions/{name}"), None).await;
    Ok(())
}

/// Webhook delivery of a stream of `n` events to a receiver here that answers 204, with
/// `window` deliveries in flight.
pub async fn webhook(target: SocketAddr, n: usize, window: u32) -> anyhow::Result<()> {
    let stream = unique("bench-hook");
    fill(target, &stream, n).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let receiver = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let _ = tcp.set_nodelay(true);
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder().status(204).body(http_body_util::Empty::<Bytes>::new()).unwrap_or_default(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    let name = unique("bench-hook");
    let mut c = Conn::open(target).await?;
    let start = Instant::now();
    let spec = json!({"stream": stream, "webhook": {"url": url, "window": window}});
    let (st, body) = c.send(Method::PUT, &format!("/api/v1/subscriptions/{name}"), Some(Bytes::from(spec.to_string()))).await?;
    if st != 201 {
        bail!("subscription: {st} {}", String::from_utf8_lossy(&body));
    }
    while received.load(Ordering::Relaxed) < n as u64 {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{} of {n} delivered within 120 s", received.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    line("events-webhook", n as u64, start.elapsed().as_secs_f64(), json!({"window": window}));
    let _ = c.send(Method::DELETE, &format!("/api/v1/subscriptions/{name}"), None).await;
    receiver.abort();
    Ok(())
}

/// The NDJSON streaming append: `concurrency` connections each keep up to `inflight` events
/// sent and not yet acknowledged; counts acknowledgements.
pub async fn publish(target: SocketAddr, concurrency: usize, inflight: usize, duration: Duration) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (stop, errors) = (stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move { publisher(target, w, inflight, stop, errors).await }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for t in tasks {
        acked += t.await??;
    }
    line(
        "events-publish",
        acked,
        start.elapsed().as_secs_f64(),
        json!({"concurrency": concurrency, "inflight": inflight, "errors": errors.load(Ordering::Relaxed)}),
    );
    Ok(())
}

async fn publisher(target: SocketAddr, w: usize, inflight: usize, stop: Arc<AtomicBool>, errors: Arc<AtomicU64>) -> anyhow::Result<u64> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))));
    let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let stream = format!("bench-pub-{}", w % 64);
    let req = Request::post(format!("/api/v1/streams/{stream}/publish")).header("host", target.to_string()).body(body)?;
    let answer = tokio::spawn(sender.send_request(req));
    let window = Arc::new(tokio::sync::Semaphore::new(inflight));
    let (acked, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (window, acked, errors) = (window.clone(), acked.clone(), errors.clone());
        tokio::spawn(async move {
            let resp = answer.await??;
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                for l in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    if l.windows(8).any(|x| x == b"\"error\":") {
                        errors.fetch_add(1, Ordering::Relaxed);
                    } else {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    window.add_permits(1);
                }
            }
            anyhow::Ok(())
        })
    };
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        // Send what the window allows in one chunk.
        let permits = window.clone().acquire_many_owned(1).await?;
        permits.forget();
        let mut chunk = String::new();
        let mut k = 1;
        chunk.push_str(&bench_event(2000 + w, n));
        chunk.push('\n');
        while k < 256 && window.try_acquire().map(|p| p.forget()).is_ok() {
            chunk.push_str(&bench_event(2000 + w, n + k));
            chunk.push('\n');
            k += 1;
        }
        n += k;
        done.fetch_add(k as u64, Ordering::Relaxed);
        if tx.send(Bytes::from(chunk)).await.is_err() {
            break;
        }
    }
    // Only what was acknowledged within the run counts.
    let counted = acked.load(Ordering::Relaxed);
    drop(tx);
    reader.abort();
    Ok(counted)
}

/// End-to-end latency: appends of single events at `rate` per second in total over `conns`
/// connections (open loop, each connection at its share), and one SSE subscriber on the stream;
/// the latency of an event runs from just before its append is sent to its arrival at the
/// subscriber.
pub async fn latency(target: SocketAddr, rate: f64, conns: usize, duration: Duration) -> anyhow::Result<()> {
    let stream = unique("bench-e2e");
    let total = (rate * duration.as_secs_f64()) as usize;
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let origin = Instant::now();
    let subscriber = {
        let (sent, stream) = (sent.clone(), stream.clone());
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total);
            let mut carry = Vec::new();
            sse(target, &format!("/api/v1/streams/{stream}/subscribe?from=0"), |chunk| {
                let now = origin.elapsed().as_nanos() as u64;
                carry.extend_from_slice(chunk);
                let cut = carry.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                for l in carry.get(..cut).unwrap_or_default().split(|b| *b == b'\n') {
                    // The event ids are "e2e-{seq}-": find the sequence number.
                    let Some(at) = l.windows(4).position(|w| w == b"e2e-") else { continue };
                    let digits: Vec<u8> = l.iter().skip(at + 4).take_while(|b| b.is_ascii_digit()).copied().collect();
                    let Some(seq) = std::str::from_utf8(&digits).ok().and_then(|s| s.parse::<usize>().ok()) else { continue };
                    if let Some(t) = sent.get(seq) {
                        lat.push((now.saturating_sub(t.load(Ordering::Relaxed))) / 1000);
                    }
                }
                carry.drain(..cut);
                lat.len() < total
            })
            .await
            .map(|_| lat)
        })
    };
    // Let the subscription start before the first append.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (sent, errors, next, stream) = (sent.clone(), errors.clone(), next.clone(), stream.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(target).await?;
            loop {
                // The next event in the global schedule: due at seq / rate.
                let seq = next.fetch_add(1, Ordering::Relaxed) as usize;
                if seq >= total {
                    return anyhow::Ok(());
                }
                tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
                let event = json!({"specversion": "1.0", "id": format!("e2e-{seq}-"), "source": "/bench", "type": "bench.e2e", "data": "x".repeat(160)});
                if let Some(t) = sent.get(seq) {
                    t.store(origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                match c.send(Method::POST, &format!("/api/v1/streams/{stream}"), Some(Bytes::from(event.to_string()))).await {
                    Ok((201, _)) => {}
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let behind = start.elapsed().as_secs_f64() - duration.as_secs_f64();
    let mut lat = subscriber.await??;
    lat.sort_unstable();
    let out = json!({
        "scenario": "events-e2e", "rate": rate, "conns": conns, "events": lat.len(), "errors": errors.load(Ordering::Relaxed),
        "append_overrun_seconds": (behind * 100.0).round() / 100.0,
        "p50_us": percentile(&lat, 0.5), "p99_us": percentile(&lat, 0.99), "p999_us": percentile(&lat, 0.999), "max_us": lat.last().copied().unwrap_or(0),
    });
    println!("{out}");
    Ok(())
}

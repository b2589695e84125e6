//! Zhili's load generator. Each worker owns one keep-alive HTTP/1.1 connection and sends requests
//! back to back (closed loop); latencies are recorded per request. Scenarios cover Zhili's native
//! API and, for comparison in the same run, etcd's v3 JSON gateway.

mod events;
mod nats;
mod pg;
mod txn;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// NATS JetStream publishes with acks (the event-log peer): each connection keeps
    /// `inflight` publishes of 256-byte messages outstanding; prints one JSON line like `load`.
    NatsPublish {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 1)]
        inflight: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// PostgreSQL INSERTs of 256-byte events (the other event-log peer), `batch` rows each.
    PgInsert {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Catch-up reads of a stream of `events` events (pages, by 1 and by `readers` readers, and
    /// SSE from the start).
    EventsRead {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        #[arg(long, default_value_t = 2)]
        readers: usize,
    },
    /// Consumer-group delivery: `consumers` competing consumers pull and ack `events` events.
    EventsGroup {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        #[arg(long, default_value_t = 4)]
        consumers: usize,
    },
    /// Webhook delivery of `events` events to a local receiver, `window` in flight.
    EventsWebhook {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        #[arg(long, default_value_t = 1)]
        window: u32,
    },
    /// The NDJSON streaming append (`/publish`): acknowledged events per second.
    EventsPublish {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 1000)]
        inflight: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// End-to-end latency from an append to an SSE subscriber at a fixed rate (open loop).
    EventsLatency {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 32)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Transactions through DTM's API (`target` is the DTM listener): saga | tcc | msg, each
    /// submitted with wait_result against a local branch server; closed loop, or open loop at
    /// `rate` per second.
    Txn {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "saga")]
        mode: String,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Closed-loop load of one scenario; prints one JSON line of results.
    Load {
        #[arg(long)]
        target: SocketAddr,
        /// register | heartbeat | discover | kv-put | events-append | events-batch | consul-register | consul-health | consul-health-blocking | nacos-register | nacos-register-meta | nacos-beat | nacos-list | nacos-config-publish | nacos-config-get | etcd-put-lease | etcd-keepalive | etcd-put
        #[arg(long)]
        scenario: String,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Instances pre-registered for heartbeat/discover.
        #[arg(long, default_value_t = 10)]
        instances: usize,
    },
    /// N blocking watchers on one service; one change; wake-up latency of each.
    Wake {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Registers N ephemeral instances (kept alive by nobody: measure RSS right after).
    FillInstances {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Writes N KV entries.
    FillKv {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Nacos 2.x push fan-out: `subscribers` gRPC connections subscribe to one service of
    /// `instances` instances; each round one registration changes it, and the time from the
    /// change to each subscriber's `NotifySubscriberRequest` is recorded.
    NacosPush {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 100)]
        instances: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The server's process id: its CPU time (user + system) over the rounds is reported
        /// per change.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Closed-loop Nacos 2.x gRPC instance registrations: one set-up gRPC connection per worker.
    NacosGrpc {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Register with instance metadata (`{"k": "v"}`), as Spring Cloud clients do.
        #[arg(long)]
        metadata: bool,
        /// After the run, keep the connections (and so their instances) open this many seconds,
        /// idle, before closing them all at once (the server's idle cost and its close burst).
        #[arg(long, default_value_t = 0)]
        hold: u64,
        /// Instead of registering: `ServiceQueryRequest` for a service of 10 instances (with
        /// metadata) registered first, the discovery call of clients that do not subscribe.
        #[arg(long)]
        query: bool,
        /// Instead of registering: `HealthCheckRequest`, which a server answers without doing
        /// anything: the cost of the gRPC stack alone (transport, HTTP/2, protobuf, envelope).
        #[arg(long, conflicts_with = "query")]
        check: bool,
        /// The server's process id: its CPU time (user + system) per request over the run is
        /// reported.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Closed-loop UDP DNS queries (A record of a service), one socket per worker.
    Dns {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "bench-consul.service.consul")]
        name: String,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Open-loop HTTP GETs at a fixed rate over `conns` keep-alive connections; latency is
    /// measured from when each request was due (coordinated-omission corrected, like wrk2).
    OpenLoop {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        /// Requests per second in total.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 64)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Extra request headers, `name: value`.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Starts `bin server` and reports milliseconds until /health/ready answers 200.
    Ready {
        #[arg(long)]
        bin: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        addr: SocketAddr,
        /// Leave the server running (print its pid) instead of killing it.
        #[arg(long)]
        keep: bool,
    },
}

/// One keep-alive connection.
struct Conn {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { addr, sender })
    }

    async fn send(&mut self, method: Method, path: &str, body: Option<Bytes>) -> anyhow::Result<(u16, Bytes)> {
        if self.sender.ready().await.is_err() {
            *self = Self::open(self.addr).await?;
        }
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(body.unwrap_or_default()))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Setup: registers `instances` Nacos instances (10.x addresses, port 80) into `service`.
async fn nacos_register_all(c: &mut Conn, service: &str, instances: usize) -> anyhow::Result<()> {
    for i in 0..instances {
        let (st, body) = c.send(Method::POST, &format!("/nacos/v1/ns/instance?serviceName={service}&ip={}&port=80", ip(i)), None).await?;
        if st != 200 {
            bail!("setup register: {st} {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(())
}

fn contains(body: &[u8], want: &str) -> bool {
    body.windows(want.len()).any(|w| w == want.as_bytes())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Txn { target, mode, concurrency, rate, seconds } => txn::run(target, &mode, concurrency, rate, Duration::from_secs(seconds)).await,
        Cmd::EventsRead { target, events: n, readers } => events::read(target, n, readers).await,
        Cmd::EventsGroup { target, events: n, consumers } => events::group(target, n, consumers).await,
        Cmd::EventsWebhook { target, events: n, window } => events::webhook(target, n, window).await,
        Cmd::EventsPublish { target, concurrency, inflight, seconds } => events::publish(target, concurrency, inflight, Duration::from_secs(seconds)).await,
        Cmd::EventsLatency { target, rate, conns, seconds } => events::latency(target, rate, conns, Duration::from_secs(seconds)).await,
        Cmd::PgInsert { target, concurrency, batch, seconds } => pg::insert(target, concurrency, batch, Duration::from_secs(seconds)).await,
        Cmd::NatsPublish { target, concurrency, inflight, seconds } => nats::publish(target, concurrency, inflight, Duration::from_secs(seconds)).await,
        Cmd::Load { target, scenario, concurrency, seconds, instances } => load(target, &scenario, concurrency, Duration::from_secs(seconds), instances).await,
        Cmd::Wake { target, watchers, rounds } => wake(target, watchers, rounds).await,
        Cmd::FillInstances { target, count } => {
            // Nobody heartbeats these: the service keeps them for an hour, so all of them are
            // still there when the RSS is read (with the default 30 s the first ones expire
            // during a long fill and the reading flatters).
            let health = r#"{"health":{"heartbeat_interval":"5s","unhealthy_after":"1h","remove_after":"1h"}}"#;
            let (st, body) = Conn::open(target).await?.send(Method::PUT, "/api/v1/services/fill", Some(Bytes::from_static(health.as_bytes()))).await?;
            anyhow::ensure!(st < 300, "creating the service: {st} {}", String::from_utf8_lossy(&body));
            fill(target, count, |i| (Method::POST, "/api/v1/services/fill/instances".to_string(), Some(instance_body(i)))).await
        }
        Cmd::FillKv { target, count } => {
            fill(target, count, |i| (Method::PUT, format!("/api/v1/kv/fill/{i:08}"), Some(Bytes::from(format!("value-{i}-{}", "x".repeat(64)))))).await
        }
        Cmd::Ready { bin, data_dir, addr, keep } => ready(bin, data_dir, addr, keep).await,
        Cmd::OpenLoop { target, path, rate, conns, seconds, headers } => open_loop(target, &path, &headers, rate, conns, Duration::from_secs(seconds)).await,
        Cmd::Dns { target, name, concurrency, seconds } => dns(target, &name, concurrency, Duration::from_secs(seconds)).await,
        Cmd::NacosPush { target, subscribers, instances, rounds, pid } => nacos_push(target, subscribers, instances, rounds, pid).await,
        Cmd::NacosGrpc { target, concurrency, seconds, metadata, hold, query, check, pid } => {
            let mode = if query {
                GrpcMode::Query
            } else if check {
                GrpcMode::Check
            } else {
                GrpcMode::Register
            };
            nacos_grpc(target, concurrency, Duration::from_secs(seconds), metadata, Duration::from_secs(hold), mode, pid).await
        }
    }
}

fn instance_body(i: usize) -> Bytes {
    Bytes::from(format!(r#"{{"address":"10.{}.{}.{}","port":{},"metadata":{{"k":"v"}}}}"#, (i >> 16) & 255, (i >> 8) & 255, i & 255, 1000 + (i % 50000)))
}

/// A request to send: method, path, body.
type Req = (Method, String, Option<Bytes>);

/// Per-scenario setup (run once) and the request each worker sends for its n-th request.
struct Scenario {
    next: Box<dyn Fn(usize, usize) -> Req + Send + Sync>,
    expect: u16,
    /// A success must also contain this (e.g. Nacos answers 200 with an error code inside).
    expect_body: Option<&'static str>,
}

/// A CloudEvent of 256 bytes as JSON, unique per (run, worker, n): the log answers a repeated
/// id from its idempotency index without writing, which would flatter the numbers.
pub(crate) fn bench_event(w: usize, n: usize) -> String {
    static RUN: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let head = format!(r#"{{"specversion":"1.0","id":"{run:x}-w{w}-{n}","source":"/bench","type":"bench.event","data":""#);
    let pad = 256usize.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

async fn setup(target: SocketAddr, scenario: &str, instances: usize) -> anyhow::Result<Scenario> {
    let mut c = Conn::open(target).await?;
    Ok(match scenario {
        "register" => Scenario {
            next: Box::new(|w, n| (Method::POST, "/api/v1/services/bench-reg/instances".into(), Some(instance_body(w * 10_000_000 + n)))),
            expect: 201,
            expect_body: None,
        },
        "heartbeat" | "discover" => {
            let svc = if scenario == "heartbeat" { "bench-hb" } else { "bench-disc" };
            // Long heartbeat timeouts so the pre-registered instances stay for the whole run.
            c.send(
                Method::PUT,
                &format!("/api/v1/services/{svc}"),
                Some(Bytes::from(r#"{"health":{"heartbeat_interval":"5s","unhealthy_after":"10m","remove_after":"20m"}}"#)),
            )
            .await?;
            for i in 0..instances {
                let (st, body) = c.send(Method::POST, &format!("/api/v1/services/{svc}/instances"), Some(instance_body(i))).await?;
                if st != 201 {
                    bail!("setup register: {st} {}", String::from_utf8_lossy(&body));
                }
            }
            let ids: Vec<String> = (0..instances).map(|i| format!("10.{}.{}.{}:{}", (i >> 16) & 255, (i >> 8) & 255, i & 255, 1000 + (i % 50000))).collect();
            if scenario == "heartbeat" {
                Scenario {
                    next: Box::new(move |w, n| {
                        (Method::PUT, format!("/api/v1/services/bench-hb/instances/{}/heartbeat", ids[(w * 7919 + n) % ids.len()]), None)
                    }),
                    expect: 204,
                    expect_body: None,
                }
            } else {
                Scenario { next: Box::new(|_, _| (Method::GET, "/api/v1/services/bench-disc/instances".into(), None)), expect: 200, expect_body: None }
            }
        }
        "kv-put" => Scenario {
            next: Box::new(|w, n| {
                (
                    Method::PUT,
                    format!("/api/v1/kv/bench/{w}/{}", n % 1000),
                    Some(Bytes::from_static(b"value-of-some-64-bytes-value-of-some-64-bytes-value-of-some-64b")),
                )
            }),
            expect: 200,
            expect_body: None,
        },
        "etcd-put" => Scenario {
            next: Box::new(|w, n| {
                (Method::POST, "/v3/kv/put".into(), Some(Bytes::from(json!({"key": b64(&format!("bench/{w}/{}", n % 1000)), "value": b64("value-of-some-64-bytes-value-of-some-64-bytes-value-of-some-64b")}).to_string())))
            }),
            expect: 200,
            expect_body: None,
        },
        "etcd-put-lease" | "etcd-keepalive" => {
            let (st, body) = c.send(Method::POST, "/v3/lease/grant", Some(Bytes::from(r#"{"TTL":600}"#))).await?;
            let v: Value = serde_json::from_slice(&body)?;
            let id =
                v["ID"].as_str().map(str::to_string).or_else(|| v["ID"].as_i64().map(|i| i.to_string())).with_context(|| format!("lease grant: {st} {v}"))?;
            if scenario == "etcd-put-lease" {
                Scenario {
                    next: Box::new(move |w, n| {
                        (
                            Method::POST,
                            "/v3/kv/put".into(),
                            Some(Bytes::from(format!(r#"{{"key":"{}","value":"{}","lease":"{id}"}}"#, b64(&format!("lease/{w}/{}", n % 1000)), b64("v")))),
                        )
                    }),
                    expect: 200,
                    expect_body: None,
                }
            } else {
                Scenario {
                    next: Box::new(move |_, _| (Method::POST, "/v3/lease/keepalive".into(), Some(Bytes::from(format!(r#"{{"ID":"{id}"}}"#))))),
                    expect: 200,
                    expect_body: None,
                }
            }
        }
        // Event log: one 256-byte CloudEvent per append, or batches of 100 (one fsync each).
        "events-append" => Scenario {
            next: Box::new(|w, n| (Method::POST, format!("/api/v1/streams/bench-{}", w % 64), Some(Bytes::from(bench_event(w, n))))),
            expect: 201,
            expect_body: None,
        },
        "events-batch" => Scenario {
            next: Box::new(|w, n| {
                let batch: Vec<String> = (0..100).map(|k| bench_event(w, n * 100 + k)).collect();
                (Method::POST, format!("/api/v1/streams/bench-{}", w % 64), Some(Bytes::from(format!("[{}]", batch.join(",")))))
            }),
            expect: 201,
            expect_body: None,
        },
        "consul-register" => Scenario {
            next: Box::new(|w, n| {
                let i = w * 10_000_000 + n;
                let body = format!(
                    r#"{{"Name":"bench-consul-reg","ID":"r{i}","Address":"10.{}.{}.{}","Port":80,"Meta":{{"k":"v"}}}}"#,
                    (i >> 16) & 255,
                    (i >> 8) & 255,
                    i & 255
                );
                (Method::PUT, "/v1/agent/service/register".into(), Some(Bytes::from(body)))
            }),
            expect: 200,
            expect_body: None,
        },
        "consul-health" | "consul-health-blocking" => {
            for i in 0..instances {
                let body = format!(r#"{{"Name":"bench-consul","ID":"c{i}","Address":"10.0.0.{}","Port":80,"Tags":["v1"]}}"#, i % 250 + 1);
                let (st, body) = c.send(Method::PUT, "/v1/agent/service/register", Some(Bytes::from(body))).await?;
                if st != 200 {
                    bail!("setup register: {st} {}", String::from_utf8_lossy(&body));
                }
            }
            // Blocking form: an index behind the service's, so each query takes the blocking
            // path and answers at once (as a client catching up does).
            let path = if scenario == "consul-health" {
                "/v1/health/service/bench-consul?passing"
            } else {
                "/v1/health/service/bench-consul?passing&index=1&wait=30s"
            };
            Scenario { next: Box::new(move |_, _| (Method::GET, path.into(), None)), expect: 200, expect_body: None }
        }
        // Without metadata, and with it (Spring Cloud clients always send some).
        "nacos-register" | "nacos-register-meta" => {
            let meta = if scenario == "nacos-register-meta" { "&metadata=%7B%22k%22%3A%22v%22%7D" } else { "" };
            Scenario {
                next: Box::new(move |w, n| {
                    let i = w * 10_000_000 + n;
                    (Method::POST, format!("/nacos/v1/ns/instance?serviceName=bench-nacos-reg&ip={}&port=80&ephemeral=true{meta}", ip(i)), None)
                }),
                expect: 200,
                expect_body: Some("ok"),
            }
        }
        // The instance list of a service with `instances` instances (every v1 client's poll).
        "nacos-list" => {
            nacos_register_all(&mut c, "bench-nacos-list", instances).await?;
            let (st, body) = c.send(Method::GET, "/nacos/v1/ns/instance/list?serviceName=bench-nacos-list", None).await?;
            let hosts = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["hosts"].as_array().map(Vec::len));
            if st != 200 || hosts != Some(instances) {
                bail!("setup list: {st} {hosts:?} hosts {}", String::from_utf8_lossy(&body));
            }
            Scenario {
                next: Box::new(|_, _| (Method::GET, "/nacos/v1/ns/instance/list?serviceName=bench-nacos-list".into(), None)),
                expect: 200,
                expect_body: Some("\"hosts\""),
            }
        }
        // Config: publish (a 64-byte value to one of 1,000 data ids) and get.
        "nacos-config-publish" => Scenario {
            next: Box::new(|w, n| {
                (Method::POST, format!("/nacos/v1/cs/configs?dataId=bench-{w}-{}.yaml&group=BENCH&content=value-{n}-{}", n % 1000, "x".repeat(48)), None)
            }),
            expect: 200,
            expect_body: Some("true"),
        },
        "nacos-config-get" => {
            let publish = |k: usize| format!("/nacos/v1/cs/configs?dataId=bench-get-{k}.yaml&group=BENCH&content=value-{k}-{}", "x".repeat(48));
            for k in 0..100 {
                let (st, body) = c.send(Method::POST, &publish(k), None).await?;
                if st != 200 {
                    bail!("setup publish: {st} {}", String::from_utf8_lossy(&body));
                }
            }
            // A server may acknowledge a publish before it is readable (r-nacos applies through
            // its raft log), or answer `false` while its log has no leader yet: wait until every
            // value reads back before measuring, publishing again what does not show up.
            let deadline = Instant::now() + Duration::from_secs(60);
            for k in 0..100 {
                let mut published = Instant::now();
                loop {
                    let (st, body) = c.send(Method::GET, &format!("/nacos/v1/cs/configs?dataId=bench-get-{k}.yaml&group=BENCH"), None).await?;
                    if st == 200 && contains(&body, &format!("value-{k}-")) {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("setup: config bench-get-{k} never read back ({st} {})", String::from_utf8_lossy(&body));
                    }
                    if published.elapsed() > Duration::from_secs(2) {
                        c.send(Method::POST, &publish(k), None).await?;
                        published = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Scenario {
                next: Box::new(|w, n| (Method::GET, format!("/nacos/v1/cs/configs?dataId=bench-get-{}.yaml&group=BENCH", (w + n) % 100), None)),
                expect: 200,
                expect_body: Some("value-"),
            }
        }
        "nacos-beat" => {
            nacos_register_all(&mut c, "bench-nacos-hb", instances).await?;
            Scenario {
                next: Box::new(move |w, n| {
                    let i = (w * 7919 + n) % instances;
                    (Method::PUT, format!("/nacos/v1/ns/instance/beat?serviceName=bench-nacos-hb&ip={}&port=80", ip(i)), None)
                }),
                expect: 200,
                expect_body: Some("10200"),
            }
        }
        other => bail!("unknown scenario {other:?}"),
    })
}

async fn load(target: SocketAddr, scenario: &str, concurrency: usize, duration: Duration, instances: usize) -> anyhow::Result<()> {
    let sc = Arc::new(setup(target, scenario, instances).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for w in 0..concurrency {
        let (sc, stop, errors) = (sc.clone(), stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let Ok(mut c) = Conn::open(target).await else { return lat };
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (m, path, body) = (sc.next)(w, n);
                let t = Instant::now();
                match c.send(m, &path, body).await {
                    Ok((st, body)) if st == sc.expect && sc.expect_body.is_none_or(|want| contains(&body, want)) => lat.push(t.elapsed().as_micros() as u64),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            lat
        }));
    }
    report(scenario, concurrency, Run { start, duration, stop, errors, tasks }).await
}

/// A closed-loop run in progress: workers push their latencies until `stop`.
pub(crate) struct Run {
    pub(crate) start: Instant,
    pub(crate) duration: Duration,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) errors: Arc<AtomicU64>,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<Vec<u64>>>,
}

/// Lets the run go for its duration, stops it and prints one JSON line of results.
pub(crate) async fn report(scenario: &str, concurrency: usize, run: Run) -> anyhow::Result<()> {
    report_with_cpu(scenario, concurrency, run, None).await
}

/// [`report`], plus the CPU time (user + system) process `pid` spent per request over the run,
/// when given: the server's cost of a request, which the throughput alone hides when the
/// generator shares the machine.
pub(crate) async fn report_with_cpu(scenario: &str, concurrency: usize, run: Run, pid: Option<u32>) -> anyhow::Result<()> {
    let cpu_before = pid.map(cpu_ms).transpose()?;
    tokio::time::sleep(run.duration).await;
    run.stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in run.tasks {
        all.extend(t.await?);
    }
    let secs = run.start.elapsed().as_secs_f64();
    all.sort_unstable();
    let mut out = json!({
        "scenario": scenario, "concurrency": concurrency, "requests": all.len(), "errors": run.errors.load(Ordering::Relaxed),
        "seconds": (secs * 100.0).round() / 100.0, "per_second": (all.len() as f64 / secs).round(),
        "p50_us": percentile(&all, 0.5), "p99_us": percentile(&all, 0.99),
    });
    if let (Some(pid), Some(before)) = (pid, cpu_before) {
        let spent_ms = cpu_ms(pid)?.saturating_sub(before);
        out["server_cpu_us_per_request"] = json!((spent_ms as f64 * 1000.0 / all.len().max(1) as f64).round());
    }
    println!("{out}");
    Ok(())
}

/// A DNS query packet for an A record (RFC 1035 wire format).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

async fn dns(target: SocketAddr, name: &str, concurrency: usize, duration: Duration) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (stop, errors, name) = (stop.clone(), errors.clone(), name.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let Ok(sock) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else { return lat };
            if sock.connect(target).await.is_err() {
                return lat;
            }
            let mut buf = [0u8; 4096];
            let mut n: u16 = 0;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                let id = (w as u16).wrapping_mul(4099).wrapping_add(n);
                let t = Instant::now();
                let ok = sock.send(&dns_query(id, &name)).await.is_ok()
                    && matches!(tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await,
                        Ok(Ok(len)) if len >= 12 && buf[..2] == id.to_be_bytes() && buf[3] & 0x0f == 0 && buf[7] > 0);
                if ok {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    report("dns-a", concurrency, Run { start, duration, stop, errors, tasks }).await
}

async fn wake(target: SocketAddr, watchers: usize, rounds: usize) -> anyhow::Result<()> {
    let mut c = Conn::open(target).await?;
    let (st, _) = c.send(Method::POST, "/api/v1/services/bench-wake/instances", Some(instance_body(0))).await?;
    if st != 201 {
        bail!("setup register: {st}");
    }
    let mut all = Vec::new();
    let mut connect_ms = Vec::new();
    for round in 0..rounds {
        let (_, body) = c.send(Method::GET, "/api/v1/services/bench-wake/instances", None).await?;
        let index = serde_json::from_slice::<Value>(&body)?["index"].as_u64().context("index")?;
        let changed_at = Arc::new(std::sync::OnceLock::<Instant>::new());
        let connected = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let connecting = Instant::now();
        for _ in 0..watchers {
            let (changed_at, connected) = (changed_at.clone(), connected.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::open(target).await?;
                connected.fetch_add(1, Ordering::Relaxed);
                let (st, _) = c.send(Method::GET, &format!("/api/v1/services/bench-wake/instances?index={index}&wait=60s"), None).await?;
                let done = Instant::now();
                anyhow::ensure!(st == 200, "watch answered {st}");
                // The connection is handed back, to close only once every watcher has its answer:
                // a watcher would watch again on it, and teardowns are not part of the wake-up.
                Ok::<_, anyhow::Error>((done.duration_since(*changed_at.get().context("woke before the change")?).as_micros() as u64, c))
            }));
        }
        // Every watcher connected (thousands of connects at once can wait out SYN
        // retransmissions: a watcher that arrived after the change would time its connect, not
        // its wake-up), then a moment for the requests to be written and parked.
        let deadline = connecting + Duration::from_secs(60);
        while (connected.load(Ordering::Relaxed) as usize) < watchers {
            anyhow::ensure!(Instant::now() < deadline, "only {} of {watchers} watchers connected in 60 s", connected.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        connect_ms.push(connecting.elapsed().as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        changed_at.set(Instant::now()).ok();
        let (st, _) = c.send(Method::POST, "/api/v1/services/bench-wake/instances", Some(instance_body(round + 1))).await?;
        anyhow::ensure!(st == 201, "change: {st}");
        let mut open = Vec::with_capacity(watchers);
        for t in tasks {
            let (us, conn) = t.await??;
            all.push(us);
            open.push(conn);
        }
        drop(open);
    }
    all.sort_unstable();
    println!(
        "{}",
        json!({"scenario": "wake", "watchers": watchers, "rounds": rounds, "p50_us": percentile(&all, 0.5), "p99_us": percentile(&all, 0.99), "max_us": all.last(), "all_connected_ms": connect_ms})
    );
    Ok(())
}

async fn fill(target: SocketAddr, count: usize, req: impl Fn(usize) -> Req + Send + Sync + 'static) -> anyhow::Result<()> {
    let req = Arc::new(req);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (req, next) = (req.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(target).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let (m, p, b) = req(i);
                let (st, body) = c.send(m, &p, b).await?;
                anyhow::ensure!(st < 300, "{st} {}", String::from_utf8_lossy(&body));
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!("{}", json!({"filled": count, "seconds": start.elapsed().as_secs_f64()}));
    Ok(())
}

async fn ready(bin: PathBuf, data_dir: PathBuf, addr: SocketAddr, keep: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .args(["server", "--dev", "--log-level", "warn", "--api-addr", &addr.to_string()])
        // DNS on the API port + 100, Nacos on + 200 and its gRPC on + 300, so scripts know where.
        .args(["--dns-addr", &SocketAddr::new(addr.ip(), addr.port() + 100).to_string()])
        .args(["--nacos-addr", &SocketAddr::new(addr.ip(), addr.port() + 200).to_string()])
        .args(["--nacos-grpc-addr", &SocketAddr::new(addr.ip(), addr.port() + 300).to_string()])
        // The DTM coordinator on + 400.
        .args(["--dtm-addr", &SocketAddr::new(addr.ip(), addr.port() + 400).to_string(), "--data-dir"])
        .arg(&data_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = start + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = Conn::open(addr).await {
            if let Ok((200, _)) = c.send(Method::GET, "/health/ready", None).await {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "not ready within 60s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    println!("{}", json!({"ready_ms": (ms * 10.0).round() / 10.0, "pid": child.id()}));
    if !keep {
        child.kill()?;
        child.wait()?;
    }
    Ok(())
}

type GrpcBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// The answer a client gives a server push (`XRequest` → `XResponse` with its request id).
fn push_ack(msg: &[u8]) -> Option<Bytes> {
    use prost::Message;
    let p = zhili_nacos::grpc::Payload::decode(msg).ok()?;
    let kind = p.metadata?.r#type;
    let body: Value = serde_json::from_slice(&p.body?.value).ok()?;
    let answer = format!("{}Response", kind.strip_suffix("Request")?);
    Some(grpc_frame(&answer, &json!({"requestId": body.get("requestId")?, "resultCode": 200, "errorCode": 0, "success": true})))
}

/// A Nacos gRPC client connection: h2c, with the bidirectional stream open and set up.
struct NacosConn {
    sender: hyper::client::conn::http2::SendRequest<GrpcBody>,
    addr: SocketAddr,
    /// Keeps the setup stream (and so the server-side connection) open.
    _stream: tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
    /// When each server push (a whole gRPC message on the stream) arrived.
    pushes: Arc<std::sync::Mutex<Vec<Instant>>>,
}

fn grpc_frame(kind: &str, body: &Value) -> Bytes {
    use prost::Message;
    let msg = zhili_nacos::grpc::payload(kind, body).encode_to_vec();
    let mut framed = Vec::with_capacity(msg.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    Bytes::from(framed)
}

impl NacosConn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(Ok(hyper::body::Frame::data(grpc_frame("ConnectionSetupRequest", &json!({"clientVersion": "zhili-bench", "labels": {}})))))
            .await
            .ok()
            .context("setup frame")?;
        let body = GrpcBody::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let req = Request::post(format!("http://{addr}/BiRequestStream/requestBiStream"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)?;
        sender.ready().await?;
        let pending = sender.send_request(req);
        let pushes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = pushes.clone();
        let acks = tx.clone();
        tokio::spawn(async move {
            // Take the server's pushes for as long as the stream lives, noting when each whole
            // message (5-byte gRPC prefix + length) is in, and answer each as clients do (a
            // server may stop pushing to a client that never acknowledges).
            if let Ok(resp) = pending.await {
                let mut body = resp.into_body();
                let mut buf = bytes::BytesMut::new();
                while let Some(Ok(frame)) = body.frame().await {
                    let Ok(data) = frame.into_data() else { continue };
                    buf.extend_from_slice(&data);
                    while buf.len() >= 5 {
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        if buf.len() < 5 + len {
                            break;
                        }
                        let msg = buf.split_to(5 + len);
                        if let Ok(mut l) = log.lock() {
                            l.push(Instant::now());
                        }
                        if let Some(ack) = push_ack(&msg[5..]) {
                            let _ = acks.send(Ok(hyper::body::Frame::data(ack))).await;
                        }
                    }
                }
            }
        });
        let mut c = Self { sender, addr, _stream: tx, pushes };
        // The setup is handled asynchronously by the server: wait until requests are accepted.
        for _ in 0..100 {
            if contains(&c.call("HealthCheckRequest", &json!({})).await?, "HealthCheckResponse") {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("connection to {} was not set up", c.addr)
    }

    /// Registers instance `i` (10.x address, port 8080, a Spring-like metadata map) of
    /// `service`, owned by this connection.
    async fn register(&mut self, service: &str, i: usize) -> anyhow::Result<()> {
        let body = json!({
            "namespace": "", "serviceName": service, "groupName": "DEFAULT_GROUP", "type": "registerInstance",
            "instance": {"ip": ip(i), "port": 8080, "weight": 1.0, "healthy": true, "enabled": true, "ephemeral": true, "clusterName": "DEFAULT", "metadata": {"version": "1.0.0", "zone": "a"}},
        });
        let reply = self.call("InstanceRequest", &body).await?;
        anyhow::ensure!(contains(&reply, "\"resultCode\":200"), "register {service}: {}", String::from_utf8_lossy(&reply));
        Ok(())
    }

    /// One unary request; returns the reply message bytes.
    async fn call(&mut self, kind: &str, body: &Value) -> anyhow::Result<Bytes> {
        let req = Request::post(format!("http://{}/Request/request", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(GrpcBody::new(Full::new(grpc_frame(kind, body))))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        Ok(resp.into_body().collect().await?.to_bytes())
    }
}

/// A process's CPU time so far (user + system, `/proc/PID/stat`), in milliseconds (at Linux's
/// 100 clock ticks per second).
fn cpu_ms(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) end with `)`.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks * 10)
}

async fn nacos_push(target: SocketAddr, subscribers: usize, instances: usize, rounds: usize, pid: Option<u32>) -> anyhow::Result<()> {
    const SERVICE: &str = "bench-nacos-push";
    let mut driver = NacosConn::open(target).await?;
    for i in 0..instances {
        driver.register(SERVICE, i).await?;
    }
    // Subscribers connect one at a time (thousands of h2 handshakes at once can wait out SYN
    // retransmissions), each subscribing once.
    let mut subs = Vec::with_capacity(subscribers);
    let connecting = Instant::now();
    for _ in 0..subscribers {
        let mut c = NacosConn::open(target).await?;
        let body = json!({"namespace": "", "serviceName": SERVICE, "groupName": "DEFAULT_GROUP", "clusters": "", "subscribe": true});
        let reply = c.call("SubscribeServiceRequest", &body).await?;
        anyhow::ensure!(contains(&reply, "\"resultCode\":200"), "subscribe: {}", String::from_utf8_lossy(&reply));
        subs.push(c);
    }
    let connect_ms = connecting.elapsed().as_millis() as u64;
    let pushed = |subs: &[NacosConn]| subs.iter().map(|c| c.pushes.lock().map_or(0, |l| l.len())).collect::<Vec<usize>>();
    let mut all = Vec::new();
    let mut cpu = 0;
    for round in 0..rounds {
        // Apart by more than a server's push delay (r-nacos, like Nacos, gathers changes for
        // about a second before pushing): one change, one push to each subscriber.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = pushed(&subs);
        let cpu_before = pid.map(cpu_ms).transpose()?;
        let changed = Instant::now();
        driver.register(SERVICE, instances + round).await?;
        let deadline = changed + Duration::from_secs(60);
        while pushed(&subs).iter().zip(&before).any(|(now, was)| now <= was) {
            anyhow::ensure!(Instant::now() < deadline, "not every subscriber got the push within 60 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The server's share of a change: until every push is out and acknowledged.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let (Some(pid), Some(b)) = (pid, cpu_before) {
            cpu += cpu_ms(pid)? - b;
        }
        for (c, was) in subs.iter().zip(&before) {
            let at = c.pushes.lock().map_err(|_| anyhow::anyhow!("push log"))?[*was];
            all.push(at.saturating_duration_since(changed).as_micros() as u64);
        }
    }
    all.sort_unstable();
    println!(
        "{}",
        json!({"scenario": "nacos-push", "subscribers": subscribers, "instances": instances, "rounds": rounds, "p50_us": percentile(&all, 0.5), "p99_us": percentile(&all, 0.99), "max_us": all.last(), "connect_ms": connect_ms, "server_cpu_ms_per_change": pid.map(|_| cpu as f64 / rounds.max(1) as f64)})
    );
    Ok(())
}

/// What `nacos-grpc` sends.
#[derive(Clone, Copy, PartialEq)]
enum GrpcMode {
    Register,
    Query,
    Check,
}

async fn nacos_grpc(
    target: SocketAddr,
    concurrency: usize,
    duration: Duration,
    metadata: bool,
    hold: Duration,
    mode: GrpcMode,
    pid: Option<u32>,
) -> anyhow::Result<()> {
    let query = mode == GrpcMode::Query;
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let metadata = if metadata { json!({"k": "v"}) } else { json!({}) };
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(NacosConn::open(target).await?);
    }
    // The queried service's instances, owned by a connection kept open for the run.
    let mut _owner = None;
    if query {
        let mut c = NacosConn::open(target).await?;
        for i in 0..10 {
            c.register("bench-nacos-grpc-query", i).await?;
        }
        _owner = Some(c);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (w, mut c) in conns.into_iter().enumerate() {
        let (stop, errors, metadata, held) = (stop.clone(), errors.clone(), metadata.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut n = 0;
            let asked = json!({"namespace": "", "serviceName": "bench-nacos-grpc-query", "groupName": "DEFAULT_GROUP", "cluster": "", "healthyOnly": false});
            let last = ip(9);
            while !stop.load(Ordering::Relaxed) {
                let i = w * 10_000_000 + n;
                let (kind, body) = if query {
                    ("ServiceQueryRequest", asked.clone())
                } else if mode == GrpcMode::Check {
                    ("HealthCheckRequest", json!({}))
                } else {
                    let body = json!({
                        "namespace": "", "serviceName": "bench-nacos-grpc", "groupName": "DEFAULT_GROUP", "type": "registerInstance",
                        "instance": {"ip": ip(i), "port": 80, "weight": 1.0, "healthy": true, "enabled": true, "ephemeral": true, "clusterName": "DEFAULT", "metadata": metadata},
                    });
                    ("InstanceRequest", body)
                };
                let t = Instant::now();
                match c.call(kind, &body).await {
                    // A query must also carry the 10 instances (the last one's address).
                    Ok(reply) if contains(&reply, "\"resultCode\":200") && (!query || contains(&reply, &last)) => lat.push(t.elapsed().as_micros() as u64),
                    other => {
                        // The first failure is shown, so a run against a new peer can be checked.
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("nacos-grpc: first failed reply: {:?}", other.map(|r| String::from_utf8_lossy(&r).into_owned()));
                        }
                    }
                }
                n += 1;
            }
            if let (false, Ok(mut held)) = (hold.is_zero(), held.lock()) {
                held.push(c);
            }
            lat
        }));
    }
    report_with_cpu(
        if query {
            "nacos-grpc-query"
        } else if mode == GrpcMode::Check {
            "nacos-grpc-check"
        } else if metadata.as_object().is_some_and(|m| !m.is_empty()) {
            "nacos-grpc-register-meta"
        } else {
            "nacos-grpc-register"
        },
        concurrency,
        Run { start, duration, stop, errors, tasks },
        pid,
    )
    .await?;
    if !hold.is_zero() {
        let n = held.lock().map_or(0, |h| h.len());
        println!("{}", json!({"holding_connections": n, "seconds": hold.as_secs()}));
        tokio::time::sleep(hold).await;
    }
    Ok(())
}

async fn open_loop(target: SocketAddr, path: &str, headers: &[String], rate: f64, conns: usize, run: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(rate > 0.0 && conns > 0, "rate and conns must be above 0");
    let mut extra = vec![];
    for h in headers {
        let (k, v) = h.split_once(':').with_context(|| format!("--header {h:?}: expected name: value"))?;
        extra.push((http::HeaderName::from_bytes(k.trim().as_bytes())?, http::HeaderValue::from_str(v.trim())?));
    }
    let per_conn = Duration::from_secs_f64(conns as f64 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let end = start + run;
    let mut tasks = vec![];
    for k in 0..conns {
        let (path, extra) = (path.to_string(), extra.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let stream = tokio::net::TcpStream::connect(target).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut due = start + Duration::from_secs_f64(k as f64 / rate);
            let mut prev_done = start;
            while due < end {
                tokio::time::sleep_until(due).await;
                // Coordinated omission: a request held back by a slow previous answer counts from
                // when it was due; one sent late only because the timer ticks in milliseconds
                // counts from when it went out.
                let sent = tokio::time::Instant::now();
                let from = if prev_done > due { due } else { sent };
                let mut req = Request::builder().uri(path.as_str()).header("host", target.to_string());
                for (name, value) in &extra {
                    req = req.header(name, value);
                }
                let ok = match sender.send_request(req.body(Full::new(Bytes::new()))?).await {
                    Ok(resp) => resp.status().is_success() && resp.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    errors += 1;
                }
                prev_done = tokio::time::Instant::now();
                lat.push(prev_done.duration_since(from).as_micros() as u64);
                due += per_conn;
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let mut all = vec![];
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await??;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    println!(
        "{}",
        json!({"scenario": "open-loop", "rate": rate, "requests": all.len(), "errors": errors,
               "p50_us": percentile(&all, 0.5), "p90_us": percentile(&all, 0.9), "p99_us": percentile(&all, 0.99),
               "p999_us": percentile(&all, 0.999), "max_us": all.last()})
    );
    Ok(())
}

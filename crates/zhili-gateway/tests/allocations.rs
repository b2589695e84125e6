//! Heap allocations per proxied GET on the gateway's HTTP/1.1 path, counted by a counting global
//! allocator on the gateway's own worker thread (a single-threaded runtime, as each gateway
//! worker is). The client and the upstream run on other threads and are not counted. A plain GET
//! allocates nothing of its own: header maps and write buffers come from the worker's pools, the
//! request id and trace parent are cut from a shared chunk (a new chunk every ~90 requests), the
//! body in hand is not boxed. One allocation per request anywhere on the path fails this test.
// Helpers of a test: a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zhili_gateway::{Discover, DiscoverError, Endpoint, Gateway, Options, PassiveHealth};
use zhili_model::consumer::ConsumerSpec;
use zhili_model::route::RouteSpec;

/// Allocations (and reallocations) made on the current thread while counting is on.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One route, `/demo/` to service `demo` with the prefix stripped, on one endpoint.
struct Fixed {
    upstream_port: u16,
}

#[async_trait]
impl Discover for Fixed {
    async fn routes(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, RouteSpec)>), DiscoverError> {
        if version == 1 {
            tokio::time::sleep(wait).await;
        }
        let spec =
            serde_json::from_str(r#"{"path_prefix": "/demo/", "service": "demo", "strip_prefix": true}"#).map_err(|e| DiscoverError::Invalid(e.to_string()))?;
        Ok((1, vec![("demo".into(), spec)]))
    }
    async fn endpoints(&self, _ns: &str, _service: &str, version: u64, wait: Duration) -> Result<(u64, Vec<Endpoint>), DiscoverError> {
        if version == 1 {
            tokio::time::sleep(wait).await;
        }
        let e = Endpoint { id: "u".into(), address: "127.0.0.1".into(), port: self.upstream_port, weight: 100, tags: vec![], version: None, zone: None };
        Ok((1, vec![e]))
    }
    async fn consumers(&self, version: u64, wait: Duration) -> Result<(u64, Vec<(String, ConsumerSpec)>), DiscoverError> {
        if version == 1 {
            tokio::time::sleep(wait).await;
        }
        Ok((1, vec![]))
    }
    async fn report(&self, _passive: &PassiveHealth) -> Result<(), DiscoverError> {
        Ok(())
    }
}

/// An upstream answering every request on a connection with the same 1 KiB body.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n{}", "x".repeat(1024));
                let mut out = conn.try_clone().unwrap();
                let mut reader = BufReader::new(conn);
                let mut line = String::new();
                loop {
                    // A GET head: lines up to the empty one.
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" && out.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Reads one answer with a Content-Length body; its status code.
fn answer(reader: &mut BufReader<TcpStream>) -> u16 {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    status
}

/// Allocations on the gateway's worker thread for `n` GETs sent one after another on one
/// keep-alive connection (after a warm-up that fills the caches and the connection pool).
fn allocations_for(n: u64) -> u64 {
    let upstream_port = upstream();
    let gw = Gateway::new(Options { access_log: false, ..Options::default() });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (counted_tx, counted) = std::sync::mpsc::channel::<u64>();
    let (toggle_tx, toggle) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let worker = {
        let gw = gw.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                tokio::spawn(zhili_gateway::follow(gw.clone(), Arc::new(Fixed { upstream_port })));
                // Counting is switched on and off from this thread, between requests.
                tokio::spawn(async move {
                    let mut toggle = toggle;
                    while let Some(on) = toggle.recv().await {
                        COUNTING.with(|c| c.set(on));
                        if !on {
                            let _ = counted_tx.send(ALLOCATIONS.with(Cell::get));
                        }
                    }
                });
                let gate = zhili_net::Admission::new("gateway", zhili_net::Limits::default());
                zhili_gateway::serve(tokio::net::TcpListener::from_std(listener).unwrap(), gw, None, gate, stop).await;
            });
        })
    };
    let client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = client.try_clone().unwrap();
    let mut reader = BufReader::new(client);
    let get = b"GET /demo/x HTTP/1.1\r\nHost: gateway.test\r\nUser-Agent: allocations\r\nAccept: */*\r\n\r\n";
    // Until the route and its endpoint are known, then a warm-up.
    let mut warm = 0;
    for _ in 0..500 {
        out.write_all(get).unwrap();
        if answer(&mut reader) == 200 {
            warm += 1;
            if warm == 200 {
                break;
            }
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert_eq!(warm, 200, "the gateway never proxied to the upstream");
    toggle_tx.send(true).unwrap();
    for _ in 0..n {
        out.write_all(get).unwrap();
        assert_eq!(answer(&mut reader), 200);
    }
    toggle_tx.send(false).unwrap();
    let counted = counted.recv_timeout(Duration::from_secs(10)).unwrap();
    stop_tx.send(true).unwrap();
    drop((out, reader));
    worker.join().unwrap();
    counted
}

#[test]
fn a_plain_proxied_get_allocates_nothing_of_its_own() {
    const N: u64 = 2_000;
    let per_request = allocations_for(N) as f64 / N as f64;
    println!("allocations per proxied GET: {per_request:.3}");
    assert!(per_request < 0.05, "{per_request:.3} allocations per proxied GET on the gateway's worker thread");
}

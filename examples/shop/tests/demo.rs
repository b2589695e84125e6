//! The shop demo end to end: the real server, four real services with their SQLite files, the
//! gateway, a service killed with SIGKILL mid-charge; the demo exits non-zero if any order is
//! inconsistent.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_shop_demo_ends_with_every_order_consistent() {
    let demo = Path::new(env!("CARGO_BIN_EXE_shop-demo"));
    let zhili = demo.with_file_name("zhili");
    assert!(zhili.exists(), "{} is missing: the workspace's `cargo test` builds it (or `cargo build -p zhili`)", zhili.display());
    let started = Instant::now();
    let mut child = Command::new(demo).arg("--zhili-bin").arg(&zhili).stdout(std::process::Stdio::piped()).spawn().expect("start shop-demo");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            panic!("shop-demo did not finish within 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = reader.join().expect("output");
    println!("{output}");
    assert!(status.success(), "shop-demo failed:\n{output}");
    assert!(output.contains("all 14 orders consistent"), "{output}");
    // The interrupted order went through a killed payment service and still ended paid.
    let mid = output
        .lines()
        .find(|l| l.contains("payment killed mid-charge") && l.contains("paid"))
        .unwrap_or_else(|| panic!("no paid interrupted order:\n{output}"));
    assert!(mid.contains("reserved") && mid.contains("charged") && mid.contains('#'), "{mid}");
    assert!(output.contains("mid-charge: order pending, stock reservation reserved"), "{output}");
}

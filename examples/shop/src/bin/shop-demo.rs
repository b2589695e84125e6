//! Runs the whole shop against one `zhili server --dev`: starts the server and the four
//! services, routes `/shop/<service>/` through the gateway, places good, declined and
//! out-of-stock orders, kills the payment service with SIGKILL while it is charging an order
//! and starts it again, then reads every service's state through the gateway and checks that
//! every order is consistent (exit status 1 if one is not).
//!
//! `shop-demo [--zhili-bin PATH] [--dir DIR] [--keep]`; the service binaries are found next to
//! this one.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use http::Method;
use serde_json::{json, Value};
use zhili_client::Client;

#[derive(Parser)]
struct Opts {
    /// The zhili binary (default: `zhili` next to this program).
    #[arg(long)]
    zhili_bin: Option<PathBuf>,
    /// Where the server and the services keep their data (default: a new temporary folder).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data folder afterwards.
    #[arg(long)]
    keep: bool,
    /// Print every line the services print.
    #[arg(long)]
    verbose: bool,
}

/// How long one order may take to settle (retries back off from 1 s).
const SETTLE: Duration = Duration::from_secs(60);
const GOOD_CARD: &str = "4242424242424242";
const DECLINED_CARD: &str = "4000000000000002";
const SERVICES: [&str; 4] = ["inventory", "payment", "invoice", "order"];

/// A child process whose output lines are kept (and echoed with `--verbose`).
struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `bin args` and waits for a line containing "listening on".
    fn start(name: &str, bin: &Path, args: &[String], env: &[(&str, &str)], verbose: bool) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (kept, tag) = (lines.clone(), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if verbose {
                    println!("    [{tag}] {line}");
                }
                kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let p = Self { name: name.into(), child, lines };
        p.wait_line(|l| l.contains("listening on"), Duration::from_secs(30))?;
        Ok(p)
    }

    /// Waits until a line `f` accepts was printed; returns it.
    fn wait_line(&self, f: impl Fn(&str) -> bool, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        while Instant::now() < deadline {
            {
                let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(l) = lines.iter().skip(seen).find(|l| f(l)) {
                    return Ok(l.clone());
                }
                seen = lines.len();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{} did not print the expected line within {timeout:?}", self.name)
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// "zhili <listener> listening on http://<addr>" → the address of `listener`.
fn listener(lines: &[String], name: &str) -> anyhow::Result<String> {
    let prefix = format!("zhili {name} listening on ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|a| a.trim().trim_start_matches("http://").to_string())
        .ok_or_else(|| anyhow!("the server did not print its {name} address"))
}

/// One order placed by the demo, and what it should end as.
struct Placed {
    id: String,
    what: &'static str,
    sku: &'static str,
    qty: i64,
    amount: i64,
    expect: &'static str,
}

struct Shop {
    gateway: Client,
    bin_dir: PathBuf,
    dir: PathBuf,
    api: String,
    dtm: String,
    verbose: bool,
}

impl Shop {
    fn start_service(&self, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Proc> {
        let args = [
            "--zhili".to_string(),
            format!("http://{}", self.api),
            "--dtm".into(),
            format!("http://{}", self.dtm),
            "--db".into(),
            self.dir.join(format!("{name}.db")).display().to_string(),
        ];
        Proc::start(name, &self.bin_dir.join(format!("shop-{name}")), &args, env, self.verbose)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self.gateway.send(Method::GET, path, None, Duration::from_secs(10)).await?;
        if !r.status.is_success() {
            bail!("GET {path}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
        Ok(serde_json::from_slice(&r.body)?)
    }

    async fn place(&self, what: &'static str, sku: &'static str, qty: i64, card: &str, amount: i64, expect: &'static str) -> anyhow::Result<Placed> {
        let body = json!({"sku": sku, "qty": qty, "card": card, "amount": amount}).to_string();
        let r = self.gateway.send(Method::POST, "/shop/order/api/checkout", Some(body.into()), Duration::from_secs(10)).await?;
        if r.status.as_u16() != 202 {
            bail!("checkout: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
        let id = serde_json::from_slice::<Value>(&r.body)?
            .get("order")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("checkout answered without an order id"))?
            .to_string();
        println!("  placed {id}: {qty} {sku}, {what}");
        Ok(Placed { id, what, sku, qty, amount, expect })
    }

    /// Waits until the order is paid (and invoiced) or cancelled.
    async fn settle(&self, order: &Placed) -> anyhow::Result<String> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let status = match self.get(&format!("/shop/order/api/orders/{}", order.id)).await {
                Ok(v) => v.get("status").and_then(Value::as_str).unwrap_or("").to_string(),
                Err(_) => String::new(),
            };
            let invoiced = || async { self.get("/shop/invoice/api/invoices").await.is_ok_and(|v| rows_for(&v, &order.id).len() == 1) };
            if status == "cancelled" || (status == "paid" && invoiced().await) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("order {} did not settle within {SETTLE:?} (status {status:?})", order.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn rows_for<'a>(rows: &'a Value, order: &str) -> Vec<&'a Value> {
    rows.as_array().into_iter().flatten().filter(|r| r.get("order_id").and_then(Value::as_str) == Some(order)).collect()
}

fn stock(rows: &Value) -> BTreeMap<String, i64> {
    rows.as_array().into_iter().flatten().filter_map(|r| Some((r.get("sku")?.as_str()?.to_string(), r.get("available")?.as_i64()?))).collect()
}

fn field<'a>(row: Option<&&'a Value>, name: &str) -> &'a str {
    row.and_then(|r| r.get(name)).and_then(Value::as_str).unwrap_or("-")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let me = std::env::current_exe()?;
    let bin_dir = me.parent().ok_or_else(|| anyhow!("no folder for {}", me.display()))?.to_path_buf();
    let zhili_bin = opts.zhili_bin.clone().unwrap_or_else(|| bin_dir.join("zhili"));
    let tmp = match &opts.dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("zhili-shop-").tempdir()?),
    };
    let dir = opts.dir.clone().or_else(|| tmp.as_ref().map(|t| t.path().to_path_buf())).ok_or_else(|| anyhow!("no data folder"))?;
    std::fs::create_dir_all(&dir)?;
    println!("shop demo: data in {}", dir.display());

    let server_args: Vec<String> = [
        "server",
        "--dev",
        "--data-dir",
        &dir.join("zhili").display().to_string(),
        "--api-addr",
        "127.0.0.1:0",
        "--gateway-addr",
        "127.0.0.1:0",
        "--dtm-addr",
        "127.0.0.1:0",
        "--dns-addr",
        "off",
        "--nacos-addr",
        "off",
        "--nacos-grpc-addr",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server = Proc::start("zhili", &zhili_bin, &server_args, &[("ZHILI_LOG_LEVEL", "warn")], opts.verbose)?;
    server.wait_line(|l| l.starts_with("zhili api listening on"), Duration::from_secs(30))?;
    let lines = server.lines();
    let (api, gateway, dtm) = (listener(&lines, "api")?, listener(&lines, "gateway")?, listener(&lines, "dtm")?);
    println!("1. zhili server --dev: API {api}, gateway {gateway}, DTM coordinator {dtm}");

    let shop = Shop { gateway: Client::new(&gateway, None)?, bin_dir, dir: dir.clone(), api: api.clone(), dtm, verbose: opts.verbose };
    // The bank is slow (1.5 s per charge) until the payment service is restarted.
    let mut procs: BTreeMap<&str, Proc> = BTreeMap::new();
    for name in SERVICES {
        let env: &[(&str, &str)] = if name == "payment" { &[("SHOP_BANK_DELAY_MS", "1500")] } else { &[] };
        procs.insert(name, shop.start_service(name, env)?);
    }
    let admin = Client::new(&api, None)?;
    for name in SERVICES {
        let route = json!({"path_prefix": format!("/shop/{name}/"), "service": name, "strip_prefix": true});
        admin.json_call(Method::PUT, &format!("/api/v1/routes/shop-{name}"), Some(&route)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, path) in [("order", "api/orders"), ("inventory", "api/stock"), ("payment", "api/charges"), ("invoice", "api/invoices")] {
        while shop.get(&format!("/shop/{name}/{path}")).await.is_err() {
            if Instant::now() > deadline {
                bail!("the gateway does not reach the {name} service");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("2. services registered and routed through the gateway at /shop/{{order,inventory,payment,invoice}}/");
    let before = stock(&shop.get("/shop/inventory/api/stock").await?);
    println!("   stock before: {before:?}");

    println!("3. orders: one good, one declined card, one for more pears than there are");
    let mut placed = vec![
        shop.place("good card", "apple", 2, GOOD_CARD, 300, "paid").await?,
        shop.place("declined card", "apple", 1, DECLINED_CARD, 150, "cancelled").await?,
        shop.place("more than in stock", "pear", 10, GOOD_CARD, 900, "cancelled").await?,
    ];
    for o in &placed {
        println!("   {} -> {}", o.id, shop.settle(o).await?);
    }

    println!("4. an order whose payment service is killed (SIGKILL) while it is charging the card");
    let mid = shop.place("payment killed mid-charge", "apple", 3, GOOD_CARD, 450, "paid").await?;
    let payment = procs.get_mut("payment").ok_or_else(|| anyhow!("no payment service"))?;
    payment.wait_line(|l| l == format!("charge {}: asking the bank", mid.id), SETTLE)?;
    let status = shop.get(&format!("/shop/order/api/orders/{}", mid.id)).await?;
    let held = shop.get("/shop/inventory/api/reservations").await?;
    println!(
        "   mid-charge: order {}, stock reservation {}; kill -9 payment",
        status.get("status").and_then(Value::as_str).unwrap_or("?"),
        field(rows_for(&held, &mid.id).first(), "status")
    );
    payment.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("   payment restarted (the coordinator retries the charge on the new instance)");
    procs.insert("payment", shop.start_service("payment", &[])?);
    println!("   {} -> {}", mid.id, shop.settle(&mid).await?);
    placed.push(mid);

    println!("5. ten orders at once");
    let mut burst = Vec::new();
    for i in 0..10 {
        let (card, expect, what) = if i % 3 == 2 { (DECLINED_CARD, "cancelled", "declined card") } else { (GOOD_CARD, "paid", "good card") };
        burst.push(shop.place(what, "apple", 1 + i % 2, card, 100 + i, expect));
    }
    let burst: Vec<Placed> = futures_util::future::try_join_all(burst).await?;
    futures_util::future::try_join_all(burst.iter().map(|o| shop.settle(o))).await?;
    placed.extend(burst);

    println!("6. final state, read through the gateway from each service's own database");
    let orders = shop.get("/shop/order/api/orders").await?;
    let reservations = shop.get("/shop/inventory/api/reservations").await?;
    let charges = shop.get("/shop/payment/api/charges").await?;
    let invoices = shop.get("/shop/invoice/api/invoices").await?;
    let after = stock(&shop.get("/shop/inventory/api/stock").await?);
    let mut problems = Vec::new();
    println!("   {:<34} {:<26} {:<10} {:<12} {:<10} invoice", "order", "case", "status", "reservation", "charge");
    let mut sold: BTreeMap<String, i64> = BTreeMap::new();
    for o in &placed {
        let order = orders.as_array().into_iter().flatten().find(|r| r.get("id").and_then(Value::as_str) == Some(&o.id));
        let status = order.and_then(|r| r.get("status")).and_then(Value::as_str).unwrap_or("missing");
        let (res, chg, inv) = (rows_for(&reservations, &o.id), rows_for(&charges, &o.id), rows_for(&invoices, &o.id));
        let invoice = inv.first().and_then(|r| r.get("number")).map_or("-".to_string(), |n| format!("#{n}"));
        println!("   {:<34} {:<26} {:<10} {:<12} {:<10} {invoice}", o.id, o.what, status, field(res.first(), "status"), field(chg.first(), "status"));
        let ok = match status {
            "paid" => {
                *sold.entry(o.sku.to_string()).or_default() += o.qty;
                field(res.first(), "status") == "reserved"
                    && res.first().and_then(|r| r.get("qty")).and_then(Value::as_i64) == Some(o.qty)
                    && field(chg.first(), "status") == "charged"
                    && chg.first().and_then(|r| r.get("amount")).and_then(Value::as_i64) == Some(o.amount)
                    && inv.len() == 1
            }
            "cancelled" => {
                matches!(field(res.first(), "status"), "-" | "released") && matches!(field(chg.first(), "status"), "-" | "refunded") && inv.is_empty()
            }
            _ => false,
        };
        if !ok || status != o.expect {
            problems.push(format!("{} ({}): {status}, expected {} with matching stock, charge and invoice", o.id, o.what, o.expect));
        }
    }
    for (sku, n) in &before {
        let want = n - sold.get(sku).copied().unwrap_or(0);
        if after.get(sku) != Some(&want) {
            problems.push(format!("stock of {sku}: {:?}, expected {want}", after.get(sku)));
        }
    }
    println!("   stock after: {after:?} (sold {sold:?})");
    let mid_charge_retried = procs.get("payment").is_some_and(|p| p.lines().iter().any(|l| l.starts_with("charge ") && l.ends_with(": done")));
    if !mid_charge_retried {
        problems.push("the restarted payment service never charged the interrupted order".into());
    }

    for name in SERVICES.iter().rev() {
        if let Some(p) = procs.get_mut(name) {
            p.terminate();
        }
    }
    server.terminate();
    if opts.keep {
        if let Some(t) = tmp {
            println!("data kept in {}", t.keep().display());
        }
    }
    if problems.is_empty() {
        println!("all {} orders consistent: every paid order has its stock, its charge and one invoice; every cancelled one has none", placed.len());
        Ok(())
    } else {
        for p in &problems {
            println!("INCONSISTENT: {p}");
        }
        bail!("{} problems", problems.len())
    }
}

//! The CLI: `zhili service|instance|kv|acl ...` over the HTTP API through the SDK. Errors print
//! the server's detail and exit non-zero.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use zhili_client::{encode, Client, ClientError, InstanceSpec, PlannedWork, Query, ReportSpec, ReportTask, ServiceSpec};

#[derive(Args, Debug, Clone)]
pub struct ClientOpts {
    /// Server address.
    #[arg(long, env = "ZHILI_ADDR", default_value = "http://127.0.0.1:8500", global = true)]
    addr: String,
    /// ACL token (secret id).
    #[arg(long, env = "ZHILI_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Define, list, show and delete services.
    Service {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Register, list and manage instances.
    Instance {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: InstanceCmd,
    },
    /// Read and write the KV store.
    Kv {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// Gateway routes: put, get, list, delete, or apply a file of them.
    Route {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: RouteCmd,
    },
    /// Gateway consumers (API keys, scopes): put, get, list, delete, or apply a file of them.
    Consumer {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: RouteCmd,
    },
    /// Event streams: append CloudEvents, read, tail (live), list, delete.
    Stream {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: StreamCmd,
    },
    /// Persistent subscriptions (consumer groups, webhooks): create, list, get, delete, replay parked events.
    Subscription {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: SubscriptionCmd,
    },
    /// Distributed transactions of the DTM-compatible coordinator: list, show, force-stop.
    Txn {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: TxnCmd,
    },
    /// Plans: maintenance windows, rollouts and config changes gated on feedback.
    Plan {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// Bootstrap ACLs; manage policies and tokens.
    Acl {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        cmd: AclCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// List services with instance and passing counts.
    List,
    /// Show a service's definition and instances.
    Get { name: String },
    /// Define or update a service from a JSON spec (see the API docs), e.g. '{"owner":"team-a"}'.
    Put {
        name: String,
        #[arg(default_value = "{}")]
        spec: String,
    },
    /// Delete a service and all its instances.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum InstanceCmd {
    /// Register an instance.
    Register {
        service: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        port: u32,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        weight: Option<u32>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// key=value, repeatable.
        #[arg(long = "meta")]
        meta: Vec<String>,
        #[arg(long)]
        zone: Option<String>,
        /// Persistent: survives restarts and is checked by the server instead of heartbeats.
        #[arg(long)]
        persistent: bool,
        /// Checks as a JSON array, e.g. '[{"kind":"http","url":"http://10.0.0.1:8080/health","interval":"10s"}]'.
        #[arg(long)]
        checks: Option<String>,
    },
    /// List instances (healthy only unless --all).
    List {
        service: String,
        #[arg(long)]
        all: bool,
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        zone: Option<String>,
    },
    /// Deregister an instance.
    Deregister { service: String, id: String },
    /// Send one heartbeat for an ephemeral instance.
    Heartbeat { service: String, id: String },
    /// Enter (or with --off leave) maintenance mode.
    Maintenance {
        service: String,
        id: String,
        #[arg(long)]
        off: bool,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Report the instance's own state, tasks and planned work (shown with the instance, read
    /// by plan gates): `--task reindex=40` (name, optional percent), `--planned migrate@2026-12-01T02:00:00Z`.
    Report {
        service: String,
        id: String,
        #[arg(long)]
        state: String,
        #[arg(long)]
        message: Option<String>,
        #[arg(long = "task")]
        tasks: Vec<String>,
        #[arg(long = "planned")]
        planned: Vec<String>,
    },
    /// The reports of a service's instances.
    Reports { service: String },
    /// Set a TTL check's status: passing, warning or critical.
    Check {
        service: String,
        id: String,
        check: String,
        status: String,
        #[arg(long, default_value = "")]
        output: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Read a key.
    Get {
        key: String,
        /// Print only the value bytes.
        #[arg(long)]
        raw: bool,
    },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Write only if the key's modify index is this (0: only if absent).
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Delete a key (or every key under it with --recurse).
    Delete {
        key: String,
        #[arg(long)]
        recurse: bool,
    },
    /// Entries under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Key names under a prefix.
    Keys {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        separator: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RouteCmd {
    /// Create or replace one from JSON (a route: '{"path_prefix": "/demo/", "service": "demo"}';
    /// a consumer: '{"api_keys": ["..."], "scopes": ["orders:read"]}').
    Put {
        name: String,
        /// The JSON; or give --file.
        #[arg(required_unless_present = "file")]
        route: Option<String>,
        #[arg(long, short)]
        file: Option<std::path::PathBuf>,
    },
    /// Show one by name.
    Get { name: String },
    /// List them all.
    List,
    /// Delete one by name.
    Delete { name: String },
    /// Declarative: make the server's routes (consumers) those of a JSON file
    /// `{"routes": {"name": {...}}}` (`{"consumers": {...}}`).
    Apply {
        #[arg(long, short)]
        file: std::path::PathBuf,
        /// Also delete the ones the file does not name.
        #[arg(long)]
        prune: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum StreamCmd {
    /// Append one CloudEvent built from flags, or every event of a JSON file (an object or an array).
    Append {
        stream: String,
        /// The event's type (with --source; or give --file).
        #[arg(long = "type", required_unless_present = "file")]
        kind: Option<String>,
        #[arg(long, default_value = "zhili-cli")]
        source: String,
        /// Defaults to a fresh unique id.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// JSON data.
        #[arg(long)]
        data: Option<String>,
        #[arg(long, short)]
        file: Option<std::path::PathBuf>,
        /// any (default), no_stream, exists, or a revision number.
        #[arg(long, default_value = "any")]
        expected_revision: String,
    },
    /// Read events (a stream, $all, or a $ce- category).
    Read {
        stream: String,
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        backwards: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print stored events, then new ones as they arrive (one JSON line each) until interrupted.
    Tail {
        stream: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Streams whose names start with a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Soft-delete a stream.
    Delete { stream: String },
}

#[derive(Subcommand, Debug)]
pub enum SubscriptionCmd {
    /// Create or replace one: '{"stream": "$ce-order", "webhook": {"url": "http://..."}}'
    /// (a new webhook's signing secret is printed once).
    Create {
        name: String,
        spec: String,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Deliver the events parked by this subscription again.
    ReplayParked {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Applies a plan from a JSON file (`-` for stdin): validated in full, then scheduled or started.
    Apply {
        name: String,
        file: std::path::PathBuf,
    },
    /// Every plan with its status and step.
    List,
    /// A plan: definition, status, step, changes and every decision with its reason.
    Get {
        name: String,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Stops the plan; drained instances of the current step come back, finished steps stay.
    Abort {
        name: String,
    },
    /// Lets the plan past its approve step.
    Approve {
        name: String,
    },
    /// Deletes a finished plan.
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TxnCmd {
    /// Transactions in gid order, optionally only of one status (prepared, submitted, aborting,
    /// succeed, failed) or mode (saga, tcc, msg, xa).
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        mode: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One transaction with its branches.
    Show { gid: String },
    /// Marks an unfinished transaction failed; nothing more runs for it.
    ForceStop { gid: String },
}

#[derive(Subcommand, Debug)]
pub enum AclCmd {
    /// Create the first management token (once).
    Bootstrap,
    /// Manage policies (rules: resource, name prefix, access).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Manage tokens (each holds policies).
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// List policies.
    List,
    /// Create or replace a policy; rules as JSON, e.g. '[{"resource":"kv","prefix":"app/","access":"write"}]'.
    Create {
        name: String,
        #[arg(long)]
        rules: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a policy.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// List tokens (secrets shown to ACL writers only).
    List,
    /// Create a token holding the given policies; prints its secret.
    Create {
        #[arg(long = "policy")]
        policies: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a token by accessor id (its streams end at once).
    Delete { accessor: String },
    /// The token in use.
    #[command(name = "self")]
    Current,
}

pub async fn run(cmd: ClientCommand) -> ExitCode {
    let (opts, result) = match cmd {
        ClientCommand::Service { opts, cmd } => (opts.clone(), with_client(&opts, |c| service(c, cmd)).await),
        ClientCommand::Instance { opts, cmd } => (opts.clone(), with_client(&opts, |c| instance(c, cmd)).await),
        ClientCommand::Kv { opts, cmd } => (opts.clone(), with_client(&opts, |c| kv(c, cmd)).await),
        ClientCommand::Acl { opts, cmd } => (opts.clone(), with_client(&opts, |c| acl(c, cmd)).await),
        ClientCommand::Stream { opts, cmd } => (opts.clone(), with_client(&opts, |c| stream(c, cmd)).await),
        ClientCommand::Subscription { opts, cmd } => (opts.clone(), with_client(&opts, |c| subscription(c, cmd)).await),
        ClientCommand::Txn { opts, cmd } => (opts.clone(), with_client(&opts, |c| txn(c, cmd)).await),
        ClientCommand::Plan { opts, cmd } => (opts.clone(), with_client(&opts, |c| plan(c, cmd)).await),
        ClientCommand::Route { opts, cmd } => (opts.clone(), with_client(&opts, |c| gateway_resource(c, "routes", cmd)).await),
        ClientCommand::Consumer { opts, cmd } => (opts.clone(), with_client(&opts, |c| gateway_resource(c, "consumers", cmd)).await),
    };
    match result {
        Ok(Shown::Json(v)) => {
            print(&v, opts.output);
            ExitCode::SUCCESS
        }
        Ok(Shown::Raw(bytes)) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&bytes);
            ExitCode::SUCCESS
        }
        Ok(Shown::Nothing) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zhili: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Shown {
    Json(Value),
    Raw(Vec<u8>),
    Nothing,
}

#[derive(Debug)]
enum CliError {
    Client(ClientError),
    Usage(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(e) => write!(f, "{e}"),
            Self::Usage(m) => write!(f, "{m}"),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

async fn with_client<F, Fut>(opts: &ClientOpts, f: F) -> Result<Shown, CliError>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Shown, CliError>>,
{
    let client = Client::new(&opts.addr, opts.token.clone())?;
    f(client).await
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, CliError> {
    serde_json::from_str(s).map_err(|e| CliError::Usage(format!("{what}: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> Shown {
    Shown::Json(serde_json::to_value(v).unwrap_or(Value::Null))
}

async fn service(c: Client, cmd: ServiceCmd) -> Result<Shown, CliError> {
    Ok(match cmd {
        ServiceCmd::List => to_json(&c.services().await?),
        ServiceCmd::Get { name } => to_json(&c.service(&name).await?),
        ServiceCmd::Put { name, spec } => {
            c.put_service(&name, &parse_json::<ServiceSpec>("spec", &spec)?).await?;
            to_json(&c.service(&name).await?.service)
        }
        ServiceCmd::Delete { name } => {
            c.delete_service(&name).await?;
            Shown::Nothing
        }
    })
}

async fn instance(c: Client, cmd: InstanceCmd) -> Result<Shown, CliError> {
    Ok(match cmd {
        InstanceCmd::Register { service, address, port, id, weight, tags, meta, zone, persistent, checks } => {
            let mut metadata = BTreeMap::new();
            for m in meta {
                let (k, v) = m.split_once('=').ok_or_else(|| CliError::Usage(format!("--meta {m:?}: expected key=value")))?;
                metadata.insert(k.to_string(), v.to_string());
            }
            let checks = match checks {
                Some(s) => parse_json("--checks", &s)?,
                None => vec![],
            };
            let spec = InstanceSpec { id, address, port, weight, tags, metadata, zone, version: None, ephemeral: Some(!persistent), enabled: None, checks };
            let id = c.register(&service, &spec).await?;
            Shown::Json(json!({ "id": id }))
        }
        InstanceCmd::List { service, all, tags, zone } => {
            let list = c.instances(&service, &Query { all, tags, zone, ..Default::default() }, None).await?;
            let rows = list.instances.iter().map(|i| {
                json!({ "id": i.id, "address": i.address, "port": i.port, "health": i.health, "weight": i.weight, "zone": i.zone, "tags": i.tags,
                        "ephemeral": i.ephemeral, "maintenance": i.maintenance.as_ref().map(|m| m.reason.clone()) })
            });
            Shown::Json(Value::Array(rows.collect()))
        }
        InstanceCmd::Deregister { service, id } => {
            c.deregister(&service, &id).await?;
            Shown::Nothing
        }
        InstanceCmd::Heartbeat { service, id } => {
            c.heartbeat(&service, &id).await?;
            Shown::Nothing
        }
        InstanceCmd::Maintenance { service, id, off, reason } => {
            c.maintenance(&service, &id, !off, &reason).await?;
            Shown::Nothing
        }
        InstanceCmd::Report { service, id, state, message, tasks, planned } => {
            let tasks = tasks
                .iter()
                .map(|t| match t.rsplit_once('=') {
                    Some((name, p)) => p
                        .parse::<u8>()
                        .map(|p| ReportTask { name: name.into(), status: None, progress: Some(p) })
                        .map_err(|_| CliError::Usage(format!("--task {t:?}: the part after '=' is a percent, 0 to 100"))),
                    None => Ok(ReportTask { name: t.clone(), ..Default::default() }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let planned = planned
                .iter()
                .map(|p| match p.split_once('@') {
                    Some((name, at)) => PlannedWork { name: name.into(), at: Some(at.into()), until: None },
                    None => PlannedWork { name: p.clone(), ..Default::default() },
                })
                .collect();
            c.report(&service, &id, &ReportSpec { state, message, tasks, planned }).await?;
            Shown::Nothing
        }
        InstanceCmd::Reports { service } => Shown::Json(c.json_call(http::Method::GET, &format!("/api/v1/services/{}/reports", encode(&service)), None).await?),
        InstanceCmd::Check { service, id, check, status, output } => {
            c.set_check(&service, &id, &check, &status, &output).await?;
            Shown::Nothing
        }
    })
}

async fn kv(c: Client, cmd: KvCmd) -> Result<Shown, CliError> {
    Ok(match cmd {
        KvCmd::Get { key, raw } => {
            let kv = c.kv_get(&key).await?.ok_or_else(|| CliError::Usage(format!("key {key:?} not found")))?;
            if raw {
                Shown::Raw(kv.bytes()?)
            } else {
                let value = String::from_utf8_lossy(&kv.bytes()?).into_owned();
                Shown::Json(json!({ "key": kv.key, "value": value, "modify_index": kv.modify_index, "version": kv.version }))
            }
        }
        KvCmd::Put { key, value, cas } => Shown::Json(json!({ "index": c.kv_put(&key, value.into_bytes(), cas).await? })),
        KvCmd::Delete { key, recurse } => Shown::Json(json!({ "index": c.kv_delete(&key, recurse).await? })),
        KvCmd::List { prefix } => {
            let rows: Vec<Value> = c
                .kv_list(&prefix)
                .await?
                .into_iter()
                .map(|kv| json!({ "key": kv.key, "value": String::from_utf8_lossy(&kv.bytes().unwrap_or_default()), "modify_index": kv.modify_index }))
                .collect();
            Shown::Json(Value::Array(rows))
        }
        KvCmd::Keys { prefix, separator } => to_json(&c.kv_keys(&prefix, separator.as_deref()).await?),
    })
}

async fn stream(c: Client, cmd: StreamCmd) -> Result<Shown, CliError> {
    use zhili_client::Expected;
    Ok(match cmd {
        StreamCmd::Append { stream, kind, source, id, subject, data, file, expected_revision } => {
            let expected = match expected_revision.as_str() {
                "any" => Expected::Any,
                "no_stream" => Expected::NoStream,
                "exists" => Expected::Exists,
                n => Expected::Revision(n.parse().map_err(|_| CliError::Usage(format!("--expected-revision {n:?}: any, no_stream, exists or a number")))?),
            };
            let events = match (file, kind) {
                (Some(f), _) => match serde_json::from_str::<Value>(&read_file(&f)?).map_err(|e| CliError::Usage(format!("{}: {e}", f.display())))? {
                    Value::Array(list) => list,
                    one => vec![one],
                },
                (None, Some(kind)) => {
                    let id = id.unwrap_or_else(|| {
                        format!("cli-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()))
                    });
                    let mut e = serde_json::Map::new();
                    for (k, v) in [("specversion", "1.0".to_string()), ("id", id), ("source", source), ("type", kind)] {
                        e.insert(k.into(), Value::String(v));
                    }
                    if let Some(sub) = subject {
                        e.insert("subject".into(), Value::String(sub));
                    }
                    if let Some(d) = data {
                        e.insert("data".into(), serde_json::from_str(&d).map_err(|err| CliError::Usage(format!("--data is not JSON: {err}")))?);
                        e.insert("datacontenttype".into(), Value::String("application/json".into()));
                    }
                    vec![Value::Object(e)]
                }
                (None, None) => return Err(CliError::Usage("give --type (and --source) or --file".into())),
            };
            let a = c.append(&stream, expected, &events).await?;
            Shown::Json(json!({"revision": a.revision, "last_revision": a.last_revision, "position": a.position}))
        }
        StreamCmd::Read { stream, from, backwards, limit } => {
            let page = c.read_stream(&stream, from, backwards, limit).await?;
            let rows: Vec<Value> =
                page.events.into_iter().map(|e| json!({"revision": e.revision, "position": e.position, "stream": e.stream, "event": e.event})).collect();
            Shown::Json(Value::Array(rows))
        }
        StreamCmd::Tail { stream, from } => {
            let mut sub = c.subscribe(&stream, from);
            loop {
                let (n, event) = sub.next().await?;
                println!("{}", json!({"revision": n, "event": event}));
            }
        }
        StreamCmd::List { prefix } => Shown::Json(c.list_streams(&prefix).await?.get("streams").cloned().unwrap_or(Value::Null)),
        StreamCmd::Delete { stream } => {
            c.delete_stream(&stream).await?;
            Shown::Nothing
        }
    })
}

async fn subscription(c: Client, cmd: SubscriptionCmd) -> Result<Shown, CliError> {
    Ok(match cmd {
        SubscriptionCmd::Create { name, spec } => {
            let spec: Value = serde_json::from_str(&spec).map_err(|e| CliError::Usage(format!("the spec is not JSON: {e}")))?;
            let secret = c.put_subscription(&name, &spec).await?;
            Shown::Json(json!({"name": name, "secret": secret}))
        }
        SubscriptionCmd::List => Shown::Json(c.subscriptions().await?.get("subscriptions").cloned().unwrap_or(Value::Null)),
        SubscriptionCmd::Get { name } => Shown::Json(c.subscription(&name).await?),
        SubscriptionCmd::Delete { name } => {
            c.delete_subscription(&name).await?;
            Shown::Nothing
        }
        SubscriptionCmd::ReplayParked { name } => Shown::Json(json!({"replayed": c.replay_parked(&name).await?})),
    })
}

async fn plan(c: Client, cmd: PlanCmd) -> Result<Shown, CliError> {
    use http::Method;
    let path = |name: &str| format!("/api/v1/plans/{}", encode(name));
    Ok(match cmd {
        PlanCmd::Apply { name, file } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| CliError::Usage(format!("reading stdin: {e}")))?;
                s
            } else {
                read_file(&file)?
            };
            let spec: Value = parse_json("the plan", &text)?;
            Shown::Json(c.json_call(Method::PUT, &path(&name), Some(&spec)).await?)
        }
        PlanCmd::List => Shown::Json(c.json_call(Method::GET, "/api/v1/plans", None).await?.get("plans").cloned().unwrap_or(Value::Null)),
        PlanCmd::Get { name } => Shown::Json(c.json_call(Method::GET, &path(&name), None).await?),
        PlanCmd::Delete { name } => {
            c.json_call(Method::DELETE, &path(&name), None).await?;
            Shown::Nothing
        }
        PlanCmd::Pause { name } => Shown::Json(c.json_call(Method::POST, &format!("{}/pause", path(&name)), None).await?),
        PlanCmd::Resume { name } => Shown::Json(c.json_call(Method::POST, &format!("{}/resume", path(&name)), None).await?),
        PlanCmd::Abort { name } => Shown::Json(c.json_call(Method::POST, &format!("{}/abort", path(&name)), None).await?),
        PlanCmd::Approve { name } => Shown::Json(c.json_call(Method::POST, &format!("{}/approve", path(&name)), None).await?),
    })
}

async fn txn(c: Client, cmd: TxnCmd) -> Result<Shown, CliError> {
    use http::Method;
    Ok(match cmd {
        TxnCmd::List { status, mode, limit } => {
            let mut path = format!("/api/v1/transactions?limit={limit}");
            for (k, v) in [("status", status), ("mode", mode)] {
                if let Some(v) = v {
                    path.push_str(&format!("&{k}={}", encode(&v)));
                }
            }
            Shown::Json(c.json_call(Method::GET, &path, None).await?.get("transactions").cloned().unwrap_or(Value::Null))
        }
        TxnCmd::Show { gid } => Shown::Json(c.json_call(Method::GET, &format!("/api/v1/transactions/{}", encode(&gid)), None).await?),
        TxnCmd::ForceStop { gid } => {
            c.json_call(Method::POST, &format!("/api/v1/transactions/{}/force-stop", encode(&gid)), None).await?;
            Shown::Nothing
        }
    })
}

fn read_file(path: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
}

/// Routes and consumers: `/api/v1/{plural}[/{name}]`, listed as `{plural: [{name, ...}]}`.
async fn gateway_resource(c: Client, plural: &str, cmd: RouteCmd) -> Result<Shown, CliError> {
    use http::Method;
    let what = plural.trim_end_matches('s');
    let list = format!("/api/v1/{plural}");
    let path = |name: &str| format!("/api/v1/{plural}/{}", encode(name));
    Ok(match cmd {
        RouteCmd::Put { name, route, file } => {
            let text = match (route, file) {
                (Some(r), _) => r,
                (None, Some(f)) => read_file(&f)?,
                (None, None) => return Err(CliError::Usage(format!("give the {what} as JSON or --file"))),
            };
            let body: Value = parse_json(what, &text)?;
            Shown::Json(c.json_call(Method::PUT, &path(&name), Some(&body)).await?)
        }
        RouteCmd::Get { name } => Shown::Json(c.json_call(Method::GET, &path(&name), None).await?),
        RouteCmd::List => Shown::Json(c.json_call(Method::GET, &list, None).await?.get_mut(plural).map(Value::take).unwrap_or_default()),
        RouteCmd::Delete { name } => {
            c.json_call(Method::DELETE, &path(&name), None).await?;
            Shown::Nothing
        }
        RouteCmd::Apply { file, prune } => {
            let doc: Value = parse_json(&file.display().to_string(), &read_file(&file)?)?;
            let routes = doc
                .get(plural)
                .and_then(Value::as_object)
                .ok_or_else(|| CliError::Usage(format!("{}: expected {{\"{plural}\": {{name: {what}}}}}", file.display())))?;
            let mut applied = vec![];
            for (name, spec) in routes {
                c.json_call(Method::PUT, &path(name), Some(spec)).await.map_err(|e| CliError::Usage(format!("{what} {name:?}: {e}")))?;
                applied.push(name.clone());
            }
            let mut deleted = vec![];
            if prune {
                let current = c.json_call(Method::GET, &list, None).await?;
                for r in current.get(plural).and_then(Value::as_array).into_iter().flatten() {
                    let name = r.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
                    if !routes.contains_key(&name) {
                        c.json_call(Method::DELETE, &path(&name), None).await?;
                        deleted.push(name);
                    }
                }
            }
            Shown::Json(json!({"applied": applied, "deleted": deleted}))
        }
    })
}

async fn acl(c: Client, cmd: AclCmd) -> Result<Shown, CliError> {
    use http::Method;
    Ok(match cmd {
        AclCmd::Bootstrap => Shown::Json(c.acl_bootstrap().await?),
        AclCmd::Policy(PolicyCmd::List) => Shown::Json(c.json_call(Method::GET, "/api/v1/acl/policies", None).await?),
        AclCmd::Policy(PolicyCmd::Create { name, rules, description }) => {
            let rules: Value = parse_json("--rules", &rules)?;
            let body = json!({ "name": name, "description": description, "rules": rules });
            Shown::Json(c.json_call(Method::PUT, &format!("/api/v1/acl/policies/{}", encode(&name)), Some(&body)).await?)
        }
        AclCmd::Policy(PolicyCmd::Delete { name }) => {
            c.json_call(Method::DELETE, &format!("/api/v1/acl/policies/{}", encode(&name)), None).await?;
            Shown::Nothing
        }
        AclCmd::Token(TokenCmd::List) => Shown::Json(c.json_call(Method::GET, "/api/v1/acl/tokens", None).await?),
        AclCmd::Token(TokenCmd::Create { policies, description }) => {
            let body = json!({ "policies": policies, "description": description });
            Shown::Json(c.json_call(Method::POST, "/api/v1/acl/tokens", Some(&body)).await?)
        }
        AclCmd::Token(TokenCmd::Delete { accessor }) => {
            c.json_call(Method::DELETE, &format!("/api/v1/acl/tokens/{}", encode(&accessor)), None).await?;
            Shown::Nothing
        }
        AclCmd::Token(TokenCmd::Current) => Shown::Json(c.json_call(Method::GET, "/api/v1/acl/token/self", None).await?),
    })
}

/// Prints JSON, or a table: objects become one row each with columns from the first object's
/// scalar fields; a single object prints as key/value lines.
fn print(v: &Value, output: Output) {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    match v {
        Value::Array(rows) if rows.iter().all(Value::is_object) && !rows.is_empty() => {
            let cols: Vec<String> =
                rows.first().and_then(Value::as_object).map(|o| o.iter().filter(|(_, v)| is_cell(v)).map(|(k, _)| k.clone()).collect()).unwrap_or_default();
            let cells: Vec<Vec<String>> = rows.iter().map(|r| cols.iter().map(|c| cell(r.get(c).unwrap_or(&Value::Null))).collect()).collect();
            let widths: Vec<usize> = cols
                .iter()
                .enumerate()
                .map(|(i, c)| cells.iter().map(|r| r.get(i).map_or(0, |x| x.chars().count())).chain([c.len()]).max().unwrap_or(0))
                .collect();
            let line = |vals: Vec<String>| vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string();
            println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
            for r in cells {
                println!("{}", line(r));
            }
        }
        Value::Array(items) => {
            for i in items {
                println!("{}", cell(i));
            }
        }
        Value::Object(o) => {
            let w = o.keys().map(String::len).max().unwrap_or(0);
            for (k, v) in o {
                println!("{k:<w$}  {}", cell(v));
            }
        }
        other => println!("{}", cell(other)),
    }
}

/// Whether a value fits in a table cell: scalars and lists of scalars.
fn is_cell(v: &Value) -> bool {
    match v {
        Value::Object(_) => false,
        Value::Array(a) => !a.iter().any(Value::is_object),
        _ => true,
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

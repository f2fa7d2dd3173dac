//! `warden ctl`: sends any command over NATS and prints the reply, readable by default and as
//! JSON with `--json`. Exit status: 0 on success, 1 on an error reply, 2 on bad usage, 3 when
//! no answer came (the outcome is unknown).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use serde_json::{Map, Value};

use crate::bus::NatsConfig;
use crate::client::{CallError, Client};
use crate::protocol::{Encoding, WireError};
use crate::registry::SubtreeDocument;

/// Command-line arguments of `warden ctl`.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// NATS URL(s) [default: that of the `warden up` cluster in ./.warden/up, else
    /// nats://127.0.0.1:4222].
    #[arg(long, env = "WARDEN_NATS")]
    pub nats: Option<String>,
    /// Cluster name [default: that of the `warden up` cluster, else `default`].
    #[arg(long, env = "WARDEN_CLUSTER")]
    pub cluster: Option<String>,
    /// Your identity: a seed file written by `warden auth` (`admin.nk`, ...); its file name
    /// is the identity's name [default: the admin of the `warden up` cluster, if any].
    #[arg(long, env = "WARDEN_AUTH")]
    pub auth: Option<std::path::PathBuf>,
    /// NATS token.
    #[arg(long, env = "WARDEN_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// NATS credentials file.
    #[arg(long, env = "WARDEN_NATS_CREDS")]
    pub creds: Option<std::path::PathBuf>,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
    /// Send MessagePack instead of JSON.
    #[arg(long)]
    pub msgpack: bool,
    /// Address one node instead of any.
    #[arg(long)]
    pub node: Option<u64>,
    /// Total time to wait for an answer, retries included, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// `top`: print one view and exit (with `--json`, as one JSON object).
    #[arg(long)]
    pub once: bool,
    /// Trace this command: every node that exports traces (`[traces] endpoint`) records it
    /// whatever its sampling ratio, and its trace id is printed (on stderr). The nodes send
    /// their spans where their `[traces]` says; ctl's own spans go to `--otlp`.
    #[arg(long)]
    pub trace: bool,
    /// Base URL of the OTLP/HTTP receiver for ctl's own span with `--trace`
    /// (`http://127.0.0.1:4318`) [default: none: only the nodes' spans are exported].
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp: Option<String>,
    /// The command (`cluster_status`, `create_supervisor`, ...; `status`, `tree`, `watch` and
    /// `history <agent>` are shorthands), then its fields as key=value pairs or one JSON
    /// object.
    #[arg(required = true)]
    pub command: Vec<String>,
}

/// Where and as whom `ctl` connects, after defaults.
struct Target {
    url: String,
    cluster: String,
    auth: Option<std::path::PathBuf>,
}

impl Target {
    /// Flags and environment first; what they leave open comes from a `warden up` cluster
    /// started in this directory, unless they name any credential of their own.
    fn resolve(args: &CtlArgs) -> Target {
        let own_credentials = args.auth.is_some() || args.token.is_some() || args.creds.is_some();
        let local = match (&args.nats, own_credentials) {
            (None, false) => crate::up::Local::read(std::path::Path::new(crate::up::DEFAULT_DIR)),
            _ => None,
        };
        Target {
            url: args
                .nats
                .clone()
                .or_else(|| local.as_ref().map(|l| l.nats.clone()))
                .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            cluster: args
                .cluster
                .clone()
                .or_else(|| local.as_ref().map(|l| l.cluster.clone()))
                .unwrap_or_else(|| "default".into()),
            auth: args.auth.clone().or_else(|| local.and_then(|l| l.auth)),
        }
    }
}

/// Runs `warden ctl`.
pub async fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    if !args.trace {
        return run_command(args).await;
    }
    use opentelemetry::context::FutureExt as _;
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider};
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    // Every span of this run is recorded: its `traceparent` says "sampled" to the nodes.
    let exporting = args.otlp.as_deref().and_then(|endpoint| {
        let attributes = [opentelemetry::KeyValue::new(
            "service.instance.id",
            "warden-ctl",
        )];
        let interval = Duration::from_millis(200);
        match crate::traces::provider(endpoint, Sampler::AlwaysOn, attributes, 64, interval) {
            Ok(p) => Some(p),
            Err(e) => {
                // The command still runs, traced by the nodes.
                eprintln!("warning: ctl's own spans are not exported: {e:#}");
                None
            }
        }
    });
    let provider = exporting.unwrap_or_else(|| {
        SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOn)
            .build()
    });
    opentelemetry::global::set_tracer_provider(provider.clone());
    // The command's name only: its fields may hold what should not leave for a collector.
    let name = match args.command.first() {
        Some(c) if crate::command::spec(c).is_some() => format!("warden ctl {c}"),
        _ => "warden ctl".to_string(),
    };
    let tracer = provider.tracer("warden-ctl");
    let root = tracer
        .span_builder(name)
        .with_kind(SpanKind::Client)
        .start(&tracer);
    let cx = opentelemetry::Context::new().with_span(root);
    let trace_id = cx.span().span_context().trace_id();
    let out = run_command(args).with_context(cx.clone()).await;
    cx.span().end();
    eprintln!("trace {trace_id}");
    // Sends ctl's span (bounded: a receiver that does not answer does not hold ctl up).
    let closing =
        tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(2)));
    let _ = tokio::time::timeout(Duration::from_secs(3), closing).await;
    out
}

async fn run_command(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let (name, rest) = args.command.split_first().expect("clap requires a command");
    let name = match name.as_str() {
        "status" => "cluster_status",
        "tree" => "get_supervision_tree",
        "ls" | "supervisors" => "list_supervisors",
        other => other,
    };
    let target = Target::resolve(&args);
    let identity = match &target.auth {
        Some(path) => Some(crate::auth::Identity::load(path, &target.cluster, None)?),
        None => None,
    };
    let nats_cfg = NatsConfig {
        url: target.url.clone(),
        token: args.token.clone(),
        creds_file: args.creds.clone(),
        identity,
        ..NatsConfig::default()
    };
    let (nats, violations) = crate::bus::connect_watched(&nats_cfg, "warden-ctl", false).await?;
    let mut client = Client::watched(nats, violations, &target.cluster);
    client.deadline = Duration::from_millis(args.timeout_ms);
    match name {
        "watch" => {
            let filter = rest.first().map(String::as_str);
            return watch(&client, filter, args.json).await;
        }
        "call" | "cast" => return call_agent(&client, &args, name, rest).await,
        "top" => return top(&client, &args, rest).await,
        "export" | "import" => {
            let result = match transfer(&client, &args, name, rest).await {
                Ok(r) => r,
                Err(usage) => {
                    eprintln!("error: {usage}");
                    return Ok(ExitCode::from(2));
                }
            };
            return report(result, name, &args, &target);
        }
        _ => {}
    }
    // `history <agent> [limit=N] [since=<RFC 3339>]` is `agent_history`.
    let (name, rest, agent) = match (name, rest.split_first()) {
        ("history", Some((agent, more))) if !agent.contains('=') => {
            ("agent_history", more, Some(agent.clone()))
        }
        ("history", _) => {
            eprintln!("usage: warden ctl history <agent id or name> [limit=N] [since=<time>]");
            return Ok(ExitCode::from(2));
        }
        _ => (name, rest, None),
    };
    let mut body = match parse_fields(rest) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(agent) = agent {
        body["agent"] = Value::String(agent);
    }
    // A create without a request_id gets one, so that this client's own retries are safe.
    let creates = crate::command::spec(name).is_some_and(|s| s.creates);
    if creates && body.get("request_id").is_none() {
        body["request_id"] = Value::String(uuid::Uuid::new_v4().to_string());
    }
    client.node = args.node;
    if args.msgpack {
        client.encoding = Encoding::Msgpack;
    }
    let result = client.call(name, &body).await;
    report(result, name, &args, &target)
}

/// Prints a reply (or its error) and picks the exit status.
fn report(
    result: Result<Value, CallError>,
    name: &str,
    args: &CtlArgs,
    target: &Target,
) -> anyhow::Result<ExitCode> {
    match result {
        Ok(v) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render(name, &v));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(CallError::Reply(e)) => {
            if args.json {
                println!("{}", serde_json::json!({ "ok": false, "error": e }));
            }
            eprintln!("error: {}: {}", e.code.as_str(), e.message);
            Ok(ExitCode::from(1))
        }
        Err(CallError::NoAnswer(why)) => {
            eprintln!(
                "error: no answer from cluster {:?} at {} ({why}); is a node running?",
                target.cluster, target.url
            );
            Ok(ExitCode::from(3))
        }
    }
}

/// `warden ctl export <supervisor> <file>` writes the subtree's document (JSON, or MessagePack
/// with `--msgpack`; `-` is standard output); `warden ctl import <file> [parent=<name>]
/// [prefix=<text>]` imports one (either encoding). `Err` is bad usage.
async fn transfer(
    client: &Client,
    args: &CtlArgs,
    op: &str,
    rest: &[String],
) -> Result<Result<Value, CallError>, String> {
    let failed = |what: String| Ok(Err(CallError::Reply(WireError::bad_request(what))));
    if op == "export" {
        let [name, file] = rest else {
            return Err("usage: warden ctl export <supervisor> <file, or - for stdout>".into());
        };
        let doc = match client.export_subtree(name).await {
            Ok(doc) => doc,
            Err(e) => return Ok(Err(e)),
        };
        let bytes = if args.msgpack {
            rmp_serde::to_vec_named(&doc).map_err(|e| e.to_string())?
        } else {
            serde_json::to_vec(&doc).map_err(|e| e.to_string())?
        };
        let written = if file == "-" {
            use std::io::Write;
            std::io::stdout().write_all(&bytes)
        } else {
            std::fs::write(file, &bytes)
        };
        if let Err(e) = written {
            return failed(format!("cannot write {file}: {e}"));
        }
        return Ok(Ok(serde_json::json!({
            "exported": name,
            "supervisors": doc.supervisors.len(),
            "agents": doc.agents.len(),
            "bytes": bytes.len(),
            "file": file,
        })));
    }
    let Some((file, fields)) = rest.split_first() else {
        return Err("usage: warden ctl import <file> [parent=<supervisor>] [prefix=<text>]".into());
    };
    // Taken as text, as given: `prefix=2024` is a prefix, not a number.
    let mut parent = None;
    let mut prefix = "";
    for f in fields {
        match f.split_once('=') {
            Some(("parent", v)) => parent = Some(v),
            Some(("prefix", v)) => prefix = v,
            _ => return Err(format!("{f:?}: give parent=<supervisor> or prefix=<text>")),
        }
    }
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => return failed(format!("cannot read {file}: {e}")),
    };
    // A MessagePack document is a map, whose first byte is never `{`.
    let json = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let doc: Result<SubtreeDocument, String> = if json {
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    } else {
        rmp_serde::from_slice(&bytes).map_err(|e| e.to_string())
    };
    let doc = match doc {
        Ok(d) => d,
        Err(e) => return failed(format!("{file} is not a subtree document: {e}")),
    };
    Ok(client.import_subtree(&doc, parent, prefix).await)
}

/// `warden ctl call <agent> <json>` and `cast`: retried while the agent is not running (it may
/// be starting or restarting) until the deadline.
async fn call_agent(
    client: &Client,
    args: &CtlArgs,
    op: &str,
    rest: &[String],
) -> anyhow::Result<ExitCode> {
    let Some((agent, body)) = rest.split_first() else {
        eprintln!("error: usage: warden ctl {op} <agent id or name> [key=value ... | JSON]");
        return Ok(ExitCode::from(2));
    };
    let body = match parse_fields(body) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let payload: bytes::Bytes = serde_json::to_vec(&body)?.into();
    if op == "cast" {
        let subject = client.subjects.agent(agent, "cast");
        let mut refusals = client.violations.as_ref().map(|v| v.subscribe());
        client.nats.publish(subject.clone(), payload).await?;
        client.nats.flush().await?;
        // The server sends a refusal before it answers the flush, but the client reports it
        // on another task: give that a moment.
        let refused = crate::bus::refused(refusals.as_mut(), &subject);
        if let Ok(v) = tokio::time::timeout(Duration::from_millis(250), refused).await {
            eprintln!(
                "error: forbidden: NATS refused this identity: {}",
                v.message
            );
            return Ok(ExitCode::from(1));
        }
        return Ok(ExitCode::SUCCESS);
    }
    match client.call_agent(agent, &body).await {
        Ok(v) => {
            println!(
                "{}",
                if args.json {
                    v.to_string()
                } else {
                    render_plain(&v, 0)
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(crate::client::CallError::Reply(e)) => {
            eprintln!("error: {}: {}", e.code.as_str(), e.message);
            Ok(ExitCode::from(1))
        }
        Err(crate::client::CallError::NoAnswer(why)) => {
            eprintln!("error: no answer from agent {agent:?} ({why})");
            Ok(ExitCode::from(3))
        }
    }
}

/// Fields as `key=value` pairs (values parsed as JSON when they parse, strings otherwise;
/// `a.b=1` nests), or a single JSON object.
pub fn parse_fields(rest: &[String]) -> Result<Value, String> {
    if let [one] = rest {
        if one.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(one).map_err(|e| format!("bad JSON: {e}"))?;
            return Ok(v);
        }
    }
    let mut obj = Value::Object(Map::new());
    for pair in rest {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        insert_path(&mut obj, &k.split('.').collect::<Vec<_>>(), value)
            .map_err(|_| format!("{k:?} nests into a value that is not an object"))?;
    }
    Ok(obj)
}

fn insert_path(obj: &mut Value, path: &[&str], value: Value) -> Result<(), ()> {
    let map = obj.as_object_mut().ok_or(())?;
    match path {
        [last] => {
            map.insert(last.to_string(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let child = map
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            insert_path(child, rest, value)
        }
        [] => Err(()),
    }
}

/// Streams events matching `filter` (default: all) until interrupted.
async fn watch(client: &Client, filter: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let subject = client.subjects.event_filter(filter.unwrap_or(">"));
    let mut refusals = client.violations.as_ref().map(|v| v.subscribe());
    let mut sub = client.nats.subscribe(subject.clone()).await?;
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            v = crate::bus::refused(refusals.as_mut(), &subject) => {
                eprintln!("error: forbidden: NATS refused this identity: {}", v.message);
                return Ok(ExitCode::from(1));
            }
        };
        let Some(msg) = msg else { break };
        let v: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        if json {
            println!("{v}");
        } else {
            println!(
                "{} {:<10} {:<14} {:<24} node={} seq={} {}",
                v["time"].as_str().unwrap_or("?"),
                v["entity"].as_str().unwrap_or("?"),
                v["event"].as_str().unwrap_or("?"),
                v["id"].as_str().unwrap_or("?"),
                v["node"],
                v["seq"],
                v["data"]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `warden ctl top [top=N] [every_ms=M]`: every node's role, status, agents, CPU, memory and
/// commit lag, and the busiest agents of the cluster (by time spent in calls since each
/// started on its node), refreshed every `every_ms` (default 2,000) until interrupted;
/// `--once` prints one view, `--json` as JSON.
async fn top(client: &Client, args: &CtlArgs, rest: &[String]) -> anyhow::Result<ExitCode> {
    let fields = match parse_fields(rest) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}; usage: warden ctl top [top=N] [every_ms=M] [--once] [--json]");
            return Ok(ExitCode::from(2));
        }
    };
    let number = |key: &str, default: u64| match &fields[key] {
        Value::Null => Ok(default),
        v => v.as_u64().ok_or(format!("{key} must be a number")),
    };
    let (n, every) = match (number("top", 10), number("every_ms", 2_000)) {
        (Ok(n), Ok(e)) if n <= 100 => (n as usize, Duration::from_millis(e.max(200))),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
        _ => {
            eprintln!("error: top is 0 to 100");
            return Ok(ExitCode::from(2));
        }
    };
    // CPU seconds per node at the previous view, for a rate.
    let mut before: std::collections::BTreeMap<u64, (std::time::Instant, f64)> = Default::default();
    // The last `cluster_status`: without a leader, the nodes are still asked.
    let mut status = Value::Null;
    loop {
        let view = match top_view(client, n, &mut status).await {
            Ok(v) => v,
            Err(e) => return report(Err(e), "top", args, &Target::resolve(args)),
        };
        if args.json {
            // One object with `--once`, else one line per refresh.
            if args.once {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{view}");
        } else {
            let text = render_top(&view, &mut before, n);
            if args.once {
                print!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            // Clear the screen and draw again.
            print!("\x1b[2J\x1b[H{text}");
        }
        tokio::time::sleep(every).await;
    }
}

/// One view for `top`: `cluster_status` (the last one known, when no leader answers), and
/// `node_metrics` of every node that is neither down nor gone, each within a short wait.
async fn top_view(client: &Client, n: usize, last: &mut Value) -> Result<Value, CallError> {
    let status = match client.call("cluster_status", &serde_json::json!({})).await {
        Ok(s) => {
            *last = s.clone();
            s
        }
        Err(e) if last.is_null() => return Err(e),
        Err(_) => last.clone(),
    };
    let ids: Vec<u64> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["status"] != "left" && x["status"] != "down")
        .filter_map(|x| x["id"].as_u64())
        .collect();
    let asks = ids.iter().map(|&id| {
        let c = Client {
            node: Some(id),
            deadline: client.deadline.min(Duration::from_secs(3)),
            ..client.clone()
        };
        async move {
            let m = c
                .call("node_metrics", &serde_json::json!({ "top": n }))
                .await;
            (id, m)
        }
    });
    let answers = futures::future::join_all(asks).await;
    let mut nodes = Vec::new();
    let mut busiest = Vec::new();
    for (id, m) in answers {
        let entry = status["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["id"] == id)
            .cloned()
            .unwrap_or(Value::Null);
        match m {
            Ok(m) => {
                for a in m["busiest"].as_array().into_iter().flatten() {
                    let mut a = a.clone();
                    a["node"] = id.into();
                    busiest.push(a);
                }
                nodes.push(serde_json::json!({ "status": entry, "metrics": m }));
            }
            Err(e) => nodes.push(serde_json::json!({
                "status": entry,
                "error": match e { CallError::Reply(e) => e.message, CallError::NoAnswer(w) => w },
            })),
        }
    }
    busiest.sort_by(|a, b| {
        let busy = |v: &Value| v["busy_ms"].as_f64().unwrap_or(0.0);
        busy(b).total_cmp(&busy(a))
    });
    busiest.truncate(n);
    Ok(serde_json::json!({
        "cluster": status["cluster"],
        "leader": status["leader"],
        "term": status["term"],
        "nodes": nodes,
        "busiest": busiest,
    }))
}

fn render_top(
    view: &Value,
    before: &mut std::collections::BTreeMap<u64, (std::time::Instant, f64)>,
    n: usize,
) -> String {
    let mut out = format!(
        "cluster {}  leader {}  term {}\n\n{:<6} {:<12} {:<10} {:<8} {:>7} {:>6} {:>10} {:>10}\n",
        view["cluster"].as_str().unwrap_or("?"),
        view["leader"],
        view["term"],
        "NODE",
        "NAME",
        "ROLE",
        "STATUS",
        "AGENTS",
        "CPU%",
        "MEM_MB",
        "COMMIT_LAG"
    );
    let now = std::time::Instant::now();
    for x in view["nodes"].as_array().into_iter().flatten() {
        let (s, m) = (&x["status"], &x["metrics"]);
        let id = s["id"].as_u64().unwrap_or(0);
        let cpu = m["cpu_seconds"].as_f64();
        let pct = match (cpu, before.get(&id)) {
            // A node that restarted meanwhile counts from zero again: no rate this time.
            (Some(c), Some((t, c0))) if now > *t && c >= *c0 => {
                format!("{:.0}", (c - c0) / (now - *t).as_secs_f64() * 100.0)
            }
            _ => "-".into(),
        };
        if let Some(c) = cpu {
            before.insert(id, (now, c));
        }
        let cell = |v: &Value| {
            if v.is_null() {
                "-".to_string()
            } else {
                scalar(v)
            }
        };
        out.push_str(&format!(
            "{:<6} {:<12} {:<10} {:<8} {:>7} {:>6} {:>10} {:>10}{}\n",
            id,
            s["name"].as_str().unwrap_or(""),
            m["role"].as_str().unwrap_or("?"),
            s["status"].as_str().unwrap_or("?"),
            cell(&m["agents"]["agents_running"]),
            pct,
            m["rss_bytes"]
                .as_u64()
                .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1_048_576.0)),
            cell(&m["commit_lag"]),
            x["error"]
                .as_str()
                .map_or(String::new(), |e| format!("  ({e})")),
        ));
    }
    out.push_str(&format!(
        "\nbusiest {n} agents (time in calls since each started on its node)\n{:<38} {:<20} {:<10} {:>5} {:>9} {:>9} {:>7} {:>9} {:>5}\n",
        "AGENT", "NAME", "KIND", "NODE", "CALLS", "ERRORS", "BUSY_S", "AVG_MS", "QUEUE"
    ));
    for a in view["busiest"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<38} {:<20} {:<10} {:>5} {:>9} {:>9} {:>7.1} {:>9.2} {:>5}\n",
            a["agent"].as_str().unwrap_or(""),
            a["name"].as_str().unwrap_or("-"),
            a["kind"].as_str().unwrap_or(""),
            // As text: a JSON value's Display ignores widths.
            a["node"].to_string(),
            a["calls"].to_string(),
            a["errors"].to_string(),
            a["busy_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            a["avg_call_ms"].as_f64().unwrap_or(0.0),
            a["mailbox_depth"].to_string(),
        ));
    }
    out
}

/// Readable rendering of a reply.
pub fn render(command: &str, v: &Value) -> String {
    match command {
        "cluster_status" => render_status(v),
        "get_supervision_tree" => {
            let mut out = String::new();
            render_tree(v, "", true, true, &mut out);
            out
        }
        "list_supervisors" => {
            let mut out = format!(
                "{:<24} {:<20} {:<18} {:>9} {:<10}\n",
                "NAME", "PARENT", "STRATEGY", "INTENSITY", "PLACEMENT"
            );
            for s in v["supervisors"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:<24} {:<20} {:<18} {:>9} {:<10}\n",
                    s["name"].as_str().unwrap_or(""),
                    s["parent"].as_str().unwrap_or("-"),
                    s["strategy"].as_str().unwrap_or(""),
                    format!("{}/{}s", s["max_restarts"], s["max_seconds"]),
                    s["placement"].as_str().unwrap_or(""),
                ));
            }
            out
        }
        "agent_history" | "supervisor_history" => render_history(v),
        _ => render_plain(v, 0),
    }
}

/// One line per event: time, position in the log, entity, event, and what it carried.
fn render_history(v: &Value) -> String {
    let mut out = format!(
        "{:<30} {:>12} {:<10} {:<38} {:<14} DATA\n",
        "TIME", "LOG", "ENTITY", "ID", "EVENT"
    );
    for e in v["events"].as_array().into_iter().flatten() {
        let data = serde_json::to_string(&e["data"]).unwrap_or_default();
        let data: String = data.chars().take(100).collect();
        out.push_str(&format!(
            "{:<30} {:>12} {:<10} {:<38} {:<14} {data}\n",
            e["time"].as_str().unwrap_or(""),
            format!("{}.{}", e["index"], e["pos"]),
            e["entity"].as_str().unwrap_or(""),
            e["id"].as_str().unwrap_or(""),
            e["event"].as_str().unwrap_or(""),
        ));
    }
    if v["partial"].as_bool() == Some(true) {
        out.push_str("(partial: the history holds more than one query reads)\n");
    }
    out
}

fn render_status(v: &Value) -> String {
    let mut out = format!(
        "cluster {}  leader {}  term {}  applied {}  voters_max {}\n",
        v["cluster"].as_str().unwrap_or("?"),
        v["leader"],
        v["term"],
        v["applied_index"],
        v["voters_max"]
    );
    out.push_str(&format!(
        "{:<6} {:<16} {:<8} {:<8} {:>12}  {}\n",
        "ID", "NAME", "ROLE", "STATUS", "CONTACT_MS", "LABELS"
    ));
    for n in v["nodes"].as_array().into_iter().flatten() {
        let labels: Vec<String> = n["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let leader = if n["id"] == v["leader"] { "*" } else { "" };
        out.push_str(&format!(
            "{:<6} {:<16} {:<8} {:<8} {:>12}  {}\n",
            format!("{}{leader}", n["id"]),
            n["name"].as_str().unwrap_or(""),
            n["role"].as_str().unwrap_or("-"),
            n["status"].as_str().unwrap_or("?"),
            n["last_contact_ms"]
                .as_u64()
                .map(|m| m.to_string())
                .unwrap_or("-".into()),
            labels.join(",")
        ));
    }
    out
}

fn render_tree(v: &Value, prefix: &str, last: bool, top: bool, out: &mut String) {
    let label = format!(
        "{} ({})",
        v["name"].as_str().unwrap_or("?"),
        v["strategy"].as_str().or(v["kind"].as_str()).unwrap_or("")
    );
    if top {
        out.push_str(&label);
    } else {
        out.push_str(&format!(
            "{prefix}{}{label}",
            if last { "└── " } else { "├── " }
        ));
    }
    out.push('\n');
    let children = v["children"].as_array().cloned().unwrap_or_default();
    let child_prefix = if top {
        String::new()
    } else {
        format!("{prefix}{}", if last { "    " } else { "│   " })
    };
    for (i, c) in children.iter().enumerate() {
        render_tree(c, &child_prefix, i + 1 == children.len(), false, out);
    }
}

fn render_plain(v: &Value, indent: usize) -> String {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Object(_) | Value::Array(_) if !is_empty(v) => {
                    format!("{pad}{k}:\n{}", render_plain(v, indent + 1))
                }
                _ => format!("{pad}{k}: {}\n", scalar(v)),
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|v| format!("{pad}-\n{}", render_plain(v, indent + 1)))
            .collect(),
        other => format!("{pad}{}\n", scalar(other)),
    }
}

fn is_empty(v: &Value) -> bool {
    matches!(v, Value::Object(m) if m.is_empty()) || matches!(v, Value::Array(a) if a.is_empty())
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_parse_from_pairs_and_json() {
        let args = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_fields(&args(&[
                "name=web",
                "max_restarts=3",
                "backoff.initial_ms=5"
            ]))
            .unwrap(),
            json!({"name": "web", "max_restarts": 3, "backoff": {"initial_ms": 5}})
        );
        assert_eq!(
            parse_fields(&args(&[r#"{"name":"x"}"#])).unwrap(),
            json!({"name": "x"})
        );
        assert!(parse_fields(&args(&["oops"])).is_err());
    }

    #[test]
    fn trees_render_with_branches() {
        let tree = json!({"name": "root", "strategy": "one_for_one", "children": [
            {"name": "a", "strategy": "one_for_all", "children": [
                {"name": "b", "strategy": "one_for_one", "children": []}]},
            {"name": "c", "strategy": "rest_for_one", "children": []}]});
        assert_eq!(
            render("get_supervision_tree", &tree),
            "root (one_for_one)\n├── a (one_for_all)\n│   └── b (one_for_one)\n└── c (rest_for_one)\n"
        );
    }
}

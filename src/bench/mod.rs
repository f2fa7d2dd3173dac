//! `warden bench`: drives a cluster through the NATS command path and reports each figure
//! beside a reference measured in the same run on the same connection: the raw NATS
//! request/reply round trip to a trivial responder.
//!
//! `--local` starts its own three-node cluster and nats-server (release build recommended), so
//! one command gives reproducible figures.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use serde_json::{json, Value};

mod agents;
mod etcd;
mod failover;
mod lifecycle;
mod metrics_cost;
pub mod route_cut;
mod scale;

use crate::bus::{self, NatsConfig};
use crate::client::Client;
use crate::up::{LocalCluster, NatsServer};

/// Command-line arguments of `warden bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// NATS URL of a running cluster (ignored with --local).
    #[arg(long, env = "WARDEN_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The identity to run as against a running cluster: an admin seed file (the reference
    /// responder needs `bench.>`). With --local the bench makes its own identities.
    #[arg(long, env = "WARDEN_AUTH")]
    pub auth: Option<std::path::PathBuf>,
    /// Cluster name.
    #[arg(long, env = "WARDEN_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Start a local three-node cluster and nats-server for the run.
    #[arg(long)]
    pub local: bool,
    /// Concurrent writer counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub writers: Vec<usize>,
    /// Duration of each measurement, in ms.
    #[arg(long, default_value_t = 3_000)]
    pub duration_ms: u64,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also measure a local three-member etcd (`etcd` on PATH) as the reference.
    #[arg(long)]
    pub etcd: bool,
    /// Also measure agents: restart latency, spawn throughput, and memory per idle agent with
    /// this many agents on a follower (memory needs --local).
    #[arg(long, default_value_t = 0)]
    pub agents: usize,
    /// Only the agent benchmarks (skip the write benchmark).
    #[arg(long)]
    pub agents_only: bool,
    /// Failover: for each size, SIGKILL a node running that many durable counters and time
    /// until they all run elsewhere (needs --local).
    #[arg(long, value_delimiter = ',')]
    pub failover: Vec<usize>,
    /// Migration: move one small agent this many times under a steady stream of calls and
    /// time how long it is unavailable.
    #[arg(long, default_value_t = 0)]
    pub migrations: usize,
    /// Slow stop: time calls to an agent while another agent on its node takes this many ms
    /// to stop (an exec process that ignores SIGTERM), against plain calls just before. With
    /// --local the nodes run exec with `/bin/sh` allowed; a remote cluster must allow it.
    #[arg(long, default_value_t = 0)]
    pub slow_stop_ms: u64,
    /// Scale: spawn this many echo agents in groups of 10,000 over the local cluster, and
    /// report what the load did (leader changes, lost leases, spread, memory, queries) and
    /// how long a follower SIGKILLed afterwards takes to catch up (needs --local).
    #[arg(long, default_value_t = 0)]
    pub scale: usize,
    /// Templates: register this many (at most 1,000), time `find_templates` by a capability
    /// against `get_template` of one, and remove them.
    #[arg(long, default_value_t = 0)]
    pub templates: usize,
    /// Export: spawn this many durable counters (at most 10,000) in a subtree, checkpoint each,
    /// time `export_subtree` of it against `get_agent` of one, and stop it.
    #[arg(long, default_value_t = 0)]
    pub export: usize,
    /// Route cut: on a cluster of its own (three nodes over three NATS servers whose routes run
    /// through proxies), cut the route between the leader's server and a follower's for this
    /// many seconds, and report the requests answered per second during the cut against
    /// before it. Runs alone (the other figures are skipped).
    #[arg(long, default_value_t = 0)]
    pub route_cut_s: u64,
    /// With --route-cut-s: hold only what the leader's server sends the follower's.
    #[arg(long)]
    pub one_way: bool,
    /// Metrics cost: this many rounds each of a fresh local cluster with metrics off and on
    /// (every node scraped each second), alternating; reports write throughput (at the largest
    /// --writers) and call latency on against off. Runs alone (the other figures are skipped).
    #[arg(long, default_value_t = 0)]
    pub metrics_cost: usize,
    /// History cost: the same, with the lifecycle history off (`[history] enabled = false`)
    /// and on (outboxes written, every event published to JetStream); metrics off in both.
    #[arg(long, default_value_t = 0)]
    pub history_cost: usize,
    /// Traces cost: the same, with traces off and on at 1% sampling (every node exporting to
    /// an OTLP/HTTP receiver in the bench's process); metrics off in both.
    #[arg(long, default_value_t = 0)]
    pub traces_cost: usize,
    /// Keep the local cluster's data and logs after the run (the path is printed).
    #[arg(long)]
    pub keep: bool,
    /// Send the writes through the cluster's shared queue group, as a NATS client that ignores
    /// the `Warden-Leader` hint does: any node answers, and followers forward to the leader.
    /// By default the bench client sends to the leader named by the last reply.
    #[arg(long)]
    pub shared_queue: bool,
}

/// Throughput and latency of one measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub ops: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Asks `probe` every `every` until it answers true; fails naming `what` once `within` has
/// passed, or with the probe's own error.
async fn poll_until<F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    mut probe: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    while !probe().await? {
        anyhow::ensure!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(every).await;
    }
    Ok(())
}

fn figures(mut lat_us: Vec<u64>, errors: u64, elapsed: Duration) -> Figures {
    lat_us.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat_us.is_empty() {
            0
        } else {
            lat_us[((lat_us.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    Figures {
        ops: lat_us.len() as u64,
        errors,
        per_sec: lat_us.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// Runs `n` concurrent loops of `op` for `duration`; each returns whether it succeeded.
async fn drive<F, Fut>(n: usize, duration: Duration, op: F) -> Figures
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..n {
        let op = op.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = 0u64;
            while start.elapsed() < duration {
                let t = Instant::now();
                if op(w, i).await {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
                i += 1;
            }
            (lat, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        if let Ok((lat, e)) = r {
            all.extend(lat);
            errors += e;
        }
    }
    figures(all, errors, start.elapsed())
}

/// Erlang/OTP figures from the project's issue for the same machine: restart p99 (us), used
/// only when `escript` is missing (otherwise OTP is measured in the same run), and memory per
/// process (bytes).
const ERLANG_RESTART_P99_US: f64 = 80.0;
const ERLANG_PROCESS_BYTES: f64 = 2_600.0;

async fn bench_agents(
    client: &Client,
    local: Option<&LocalCluster>,
    n: usize,
    rtt_us: u64,
) -> anyhow::Result<Value> {
    eprintln!("measuring agent restarts");
    let restarts = agents::restart_latency(client, 1_000, local).await?;
    let (restart, plain, in_node) = (restarts.client, restarts.plain_call, restarts.in_node);
    eprintln!("measuring Erlang/OTP's restarts (escript)");
    let otp = agents::otp_restart(1_000).await;
    let (otp_p99, otp_source) = match otp {
        Some((_, p99)) => (p99 as f64, "measured now"),
        None => (ERLANG_RESTART_P99_US, "issue's figure; escript not found"),
    };
    // The agents go to a follower, and another follower is the replica: the two differ only
    // by running the agents. The leader, which also publishes every event and drives
    // replication, is reported on its own.
    let status = client.call("cluster_status", &json!({})).await?;
    let leader = status["leader"].as_u64().unwrap_or(1);
    let mut followers = (1..=3).filter(|id| *id != leader);
    let (host_id, replica_id) = (followers.next().unwrap_or(1), followers.next().unwrap_or(2));
    let rss = |id: u64| local.and_then(|c| c.pid(id)).and_then(agents::rss_bytes);
    let before = [rss(host_id), rss(replica_id), rss(leader)];
    eprintln!("spawning {n} agents on node {host_id} (node {leader} leads)");
    let spawned = agents::spawn_throughput(client, n, host_id, 8).await?;
    let (acked, running) = (spawned.acked_per_sec, spawned.running_per_sec);
    eprintln!("measuring queries over {n} agents");
    let queries = agents::query_latency(client, &spawned, 500).await?;
    let get_p50 = queries[0].1.p50_us.max(1) as f64;
    let queries: serde_json::Map<String, Value> = queries
        .iter()
        .map(|(label, f)| {
            let v = json!({
                "figures": f,
                "p50_vs_get_agent": f.p50_us as f64 / get_p50,
                "p50_vs_nats_rtt": f.p50_us as f64 / rtt_us.max(1) as f64,
            });
            (label.to_string(), v)
        })
        .collect();
    let per = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / n as f64),
        _ => None,
    };
    let host = per(before[0], rss(host_id));
    let replica = per(before[1], rss(replica_id));
    let on_leader = per(before[2], rss(leader));
    Ok(json!({
        "restart": restart,
        "plain_call": plain,
        "restart_p99_vs_plain_call_p99": restart.p99_us as f64 / plain.p99_us.max(1) as f64,
        "nats_rtt_p50_us": rtt_us,
        "restart_p99_vs_nats_rtt": restart.p99_us as f64 / rtt_us.max(1) as f64,
        "restart_in_node": in_node,
        "erlang_restart_p50_us": otp.map(|o| o.0),
        "erlang_restart_p99_us": otp_p99,
        "erlang_restart_source": otp_source,
        "restart_in_node_p99_vs_erlang": in_node.as_ref().map(|f| f.p99_us as f64 / otp_p99.max(1.0)),
        "agents": n,
        "spawn_acked_per_sec": acked,
        "spawn_running_per_sec": running,
        "memory_per_agent_host_bytes": host,
        "memory_per_agent_replica_bytes": replica,
        "memory_per_agent_leader_bytes": on_leader,
        "memory_host_vs_erlang_process": host.map(|h| h / ERLANG_PROCESS_BYTES),
        "queries": queries,
        "rare_tag_agents": spawned.rare,
    }))
}

fn print_agents(a: &Value) {
    let f = |k: &str| a[k].as_f64().unwrap_or(f64::NAN);
    match a["restart_in_node"]["p99_us"].as_u64() {
        Some(p99) => println!(
            "agent restart inside the node (crash seen until running again, from its journal): p50 {} us, p99 {p99} us = {:.1}x Erlang/OTP's p99 of {:.0} us ({}; OTP p50 {} us)",
            a["restart_in_node"]["p50_us"], f("restart_in_node_p99_vs_erlang"),
            f("erlang_restart_p99_us"), a["erlang_restart_source"].as_str().unwrap_or(""),
            a["erlang_restart_p50_us"]
        ),
        None => println!("agent restart inside the node: needs --local (the bench reads the node's journal)"),
    }
    println!(
        "agent restart seen by a client (crash answer until answering again): p50 {} us, p99 {} us = {:.1}x a plain call to the agent (p50 {} us, p99 {} us), {:.1}x the NATS round trip ({} us p50)",
        a["restart"]["p50_us"], a["restart"]["p99_us"], f("restart_p99_vs_plain_call_p99"),
        a["plain_call"]["p50_us"], a["plain_call"]["p99_us"],
        f("restart_p99_vs_nats_rtt"), a["nats_rtt_p50_us"]
    );
    println!(
        "spawn: {} agents acknowledged at {:.0}/s, all running at {:.0}/s",
        a["agents"],
        f("spawn_acked_per_sec"),
        f("spawn_running_per_sec")
    );
    for (label, q) in a["queries"].as_object().into_iter().flatten() {
        println!(
            "query {label} over {} agents ({} with the rare tag): p50 {} us, p99 {} us = {:.2}x get_agent's p50, {:.1}x the NATS round trip",
            a["agents"], a["rare_tag_agents"], q["figures"]["p50_us"], q["figures"]["p99_us"],
            q["p50_vs_get_agent"].as_f64().unwrap_or(f64::NAN),
            q["p50_vs_nats_rtt"].as_f64().unwrap_or(f64::NAN)
        );
    }
    match a["memory_per_agent_host_bytes"].as_f64() {
        Some(h) => println!(
            "memory per idle agent: {h:.0} bytes on the node running it ({:.2}x an Erlang process's ~2.6 KB, issue's figure), {:.0} bytes on a follower only replicating its record, {:.0} bytes on the leader",
            f("memory_host_vs_erlang_process"),
            f("memory_per_agent_replica_bytes"),
            f("memory_per_agent_leader_bytes")
        ),
        None => println!("memory per idle agent: needs --local (the bench reads the nodes' RSS)"),
    }
}

/// Figures for a 3-member etcd on the same kind of 2-core machine (from the project's issue),
/// used when the run does not measure etcd itself (`--etcd`): (writers, writes/s).
const ETCD_REFERENCE: &[(usize, f64)] = &[(1, 1_900.0), (64, 11_000.0), (256, 15_000.0)];

/// Drives `n` etcd writers (one connection each, the first to the leader, the others spread
/// over the members) for `duration`.
async fn drive_etcd(cluster: &etcd::Etcd, n: usize, duration: Duration) -> anyhow::Result<Figures> {
    let members = cluster.leader_first().await;
    let mut conns = Vec::new();
    for w in 0..n {
        conns.push(etcd::Grpc::connect(&members[w % members.len()]).await?);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, mut c) in conns.into_iter().enumerate() {
        let addr = members[w % members.len()].clone();
        tasks.spawn(async move {
            let (mut lat, mut errors, mut i) = (Vec::new(), 0u64, 0u64);
            while start.elapsed() < duration {
                let t = Instant::now();
                match c
                    .put(format!("bench/{n}/{w}/{i}").as_bytes(), b"{\"name\":\"x\"}")
                    .await
                {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => {
                        errors += 1;
                        // A broken connection fails every call at once: connect again, or
                        // stop this writer rather than spin.
                        match etcd::Grpc::connect(&addr).await {
                            Ok(fresh) => c = fresh,
                            Err(_) => break,
                        }
                    }
                }
                i += 1;
            }
            (lat, errors)
        });
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        if let Ok((lat, e)) = r {
            all.extend(lat);
            errors += e;
        }
    }
    Ok(figures(all, errors, start.elapsed()))
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.route_cut_s > 0 {
        return bench_route_cut(&args).await;
    }
    if args.metrics_cost > 0 || args.history_cost > 0 || args.traces_cost > 0 {
        return bench_metrics_cost(&args).await;
    }
    let mut _local = None;
    let mut _nats_server = None;
    let mut seed = args.auth.clone();
    let url = if args.local {
        let dir = std::env::temp_dir().join(format!("warden-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // With identities, as production runs: permission checks are part of the cost.
        let auth = dir.join("auth");
        // A fourth identity for the node that joins in the scale figures.
        crate::auth::ensure(&auth, &args.cluster, 4)?;
        seed = Some(crate::auth::seed_path(&auth, "admin"));
        let server = NatsServer::start(&dir, &crate::up::auth_args(&auth)).await?;
        let url = server.url.clone();
        _nats_server = Some(server);
        let mut cluster =
            LocalCluster::new(std::env::current_exe()?, dir, url.clone(), &args.cluster);
        cluster.auth = Some(auth);
        if args.slow_stop_ms > 0 {
            // The slow-stop figure runs a shell that ignores SIGTERM.
            cluster.config_toml = Some("[exec]\nenabled = true\nallow = [\"/bin/sh\"]\n".into());
        }
        for id in 1..=3 {
            cluster.start_node(id, id == 1).await?;
        }
        _local = Some(cluster);
        url
    } else {
        args.nats.clone()
    };
    let etcd_cluster = if args.etcd {
        let dir = std::env::temp_dir().join(format!("warden-bench-etcd-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Some((etcd::Etcd::start(&dir).await?, dir))
    } else {
        None
    };
    let identity = match &seed {
        Some(path) => Some(crate::auth::Identity::load(path, &args.cluster, None)?),
        None => None,
    };
    let nats = bus::connect(
        &NatsConfig {
            url: url.clone(),
            identity: identity.clone(),
            ..Default::default()
        },
        "warden-bench",
        false,
    )
    .await?;
    let client = Client::new(nats.clone(), &args.cluster);
    if let Some(cluster) = &_local {
        cluster
            .wait_ready(&client, 3, Duration::from_secs(60))
            .await?;
    }

    // The reference: a responder on its own connection that echoes, as cheap as NATS gets.
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let echo_subject = client.subjects.bench_echo(&run_id);
    let responder = bus::connect(
        &NatsConfig {
            url,
            identity,
            ..Default::default()
        },
        "warden-bench-echo",
        false,
    )
    .await?;
    let mut sub = responder.subscribe(echo_subject.clone()).await?;
    responder.flush().await?;
    let echo = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await; // best effort in a bench
            }
        }
    });

    let duration = Duration::from_millis(args.duration_ms);
    let mut rows = Vec::new();
    let writers: &[usize] = if args.agents_only { &[] } else { &args.writers };
    for &n in writers {
        let nc = nats.clone();
        let subject = echo_subject.clone();
        let raw = drive(n, duration, move |_, _| {
            let (nc, subject) = (nc.clone(), subject.clone());
            async move {
                let payload = bytes::Bytes::from_static(br#"{"name":"x"}"#);
                bus::request(&nc, subject, None, payload, Duration::from_secs(5))
                    .await
                    .is_ok()
            }
        })
        .await;
        // A fresh parent per level, removed afterwards, so each level starts from the same
        // registry size.
        let parent = format!("bench-{}-{n}", &run_id[..8]);
        client
            .call(
                "create_supervisor",
                &json!({"name": parent, "request_id": format!("{parent}-parent")}),
            )
            .await?;
        let mut c = client.clone();
        c.follow_leader = !args.shared_queue;
        let p = parent.clone();
        let warden = drive(n, duration, move |w, i| {
            let (c, p) = (c.clone(), p.clone());
            async move {
                let name = format!("{p}-{n}-{w}-{i}");
                c.call("create_supervisor", &json!({"name": name, "parent": p}))
                    .await
                    .is_ok()
            }
        })
        .await;
        if let Err(e) = client
            .call("stop_supervisor", &json!({"name": parent}))
            .await
        {
            eprintln!("warning: could not remove {parent}: {e}");
        }
        let measured = match &etcd_cluster {
            Some((cluster, _)) => Some(drive_etcd(cluster, n, duration).await?),
            None => None,
        };
        let etcd = match &measured {
            Some(f) => Some(f.per_sec),
            None => ETCD_REFERENCE
                .iter()
                .find(|(w, _)| *w == n)
                .map(|(_, r)| *r),
        };
        rows.push(json!({
            "writers": n,
            "path": if args.shared_queue { "shared_queue" } else { "leader" },
            "warden": warden,
            "nats_request_reply": raw,
            "latency_p50_vs_nats": warden.p50_us as f64 / raw.p50_us.max(1) as f64,
            "etcd": measured,
            "etcd_measured_in_this_run": measured.is_some(),
            "throughput_vs_etcd_reference": etcd.map(|e| warden.per_sec / e),
        }));
        if !args.json {
            eprintln!("measured {n} writer(s)");
        }
    }
    let reference_rtt_us = if args.failover.is_empty()
        && args.migrations == 0
        && args.agents == 0
        && args.scale == 0
        && args.templates == 0
        && args.export == 0
    {
        0
    } else {
        failover::nats_rtt_p50_us(&nats, &echo_subject).await
    };
    echo.abort();
    let mut failovers = Vec::new();
    if !args.failover.is_empty() {
        let Some(cluster) = _local.as_mut() else {
            anyhow::bail!("--failover kills a node: it needs --local");
        };
        for &n in &args.failover {
            failovers.push(failover::failover(&client, cluster, n).await?);
        }
    }
    let migration = if args.migrations > 0 {
        let f = failover::migration(&client, args.migrations).await?;
        Some(json!({
            "migrations": args.migrations,
            "unavailable": f,
            "nats_rtt_p50_us": reference_rtt_us,
            "p99_vs_nats_rtt": f.p99_us as f64 / reference_rtt_us.max(1) as f64,
        }))
    } else {
        None
    };

    let slow_stop = if args.slow_stop_ms > 0 {
        eprintln!("measuring calls during a slow stop");
        let s = agents::slow_stop(&client, args.slow_stop_ms).await?;
        Some(json!({
            "shutdown_ms": s.shutdown_ms,
            "plain_call": s.plain_call,
            "during_stop": s.during_stop,
            "worst_during_us": s.worst_during_us,
            "worst_vs_plain_p99": s.worst_during_us as f64 / s.plain_call.p99_us.max(1) as f64,
            "p99_vs_plain_p99": s.during_stop.p99_us as f64 / s.plain_call.p99_us.max(1) as f64,
        }))
    } else {
        None
    };

    let agent_figures = if args.agents > 0 {
        Some(bench_agents(&client, _local.as_ref(), args.agents, reference_rtt_us).await?)
    } else {
        None
    };
    let template_figures = if args.templates > 0 {
        eprintln!("measuring find_templates over {} templates", args.templates);
        Some(lifecycle::templates(&client, args.templates, reference_rtt_us).await?)
    } else {
        None
    };
    let export_figures = if args.export > 0 {
        anyhow::ensure!(args.export <= 10_000, "--export is at most 10,000 agents");
        eprintln!("measuring export_subtree of {} agents", args.export);
        Some(lifecycle::export(&client, args.export, reference_rtt_us).await?)
    } else {
        None
    };
    let scale_figures = if args.scale > 0 {
        let Some(cluster) = _local.as_mut() else {
            anyhow::bail!("--scale restarts a node: it needs --local");
        };
        Some(scale::scale(&client, cluster, args.scale, reference_rtt_us).await?)
    } else {
        None
    };
    if args.json {
        let out = json!({
            "writes": rows,
            "agents": agent_figures,
            "scale": scale_figures,
            "failover": failovers,
            "migration": migration,
            "slow_stop": slow_stop,
            "templates": template_figures,
            "export": export_figures,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let reference = if args.etcd {
            "etcd (this run)"
        } else {
            "etcd (issue's figures)"
        };
        if !rows.is_empty() {
            println!(
                "{:>7} | {:>9} {:>8} {:>8} {:>6} | {:>9} {:>8} {:>8} | {:>9} {:>8} | {:>8} {:>8}",
                "writers",
                "warden/s",
                "p50_us",
                "p99_us",
                "errors",
                "nats_rr/s",
                "p50_us",
                "p99_us",
                "etcd/s",
                "p50_us",
                "p50/nats",
                "vs_etcd"
            );
        }
        for r in &rows {
            let f = |k: &str, f: &str| r[k][f].as_f64().unwrap_or(0.0);
            let etcd_rate = r["etcd"]["per_sec"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0}"));
            let etcd_p50 = r["etcd"]["p50_us"]
                .as_u64()
                .map_or("-".into(), |x| x.to_string());
            println!(
                "{:>7} | {:>9.0} {:>8.0} {:>8.0} {:>6.0} | {:>9.0} {:>8.0} {:>8.0} | {:>9} {:>8} | {:>7.1}x {:>8}",
                r["writers"].as_u64().unwrap_or(0),
                f("warden", "per_sec"),
                f("warden", "p50_us"),
                f("warden", "p99_us"),
                f("warden", "errors"),
                f("nats_request_reply", "per_sec"),
                f("nats_request_reply", "p50_us"),
                f("nats_request_reply", "p99_us"),
                etcd_rate,
                etcd_p50,
                r["latency_p50_vs_nats"].as_f64().unwrap_or(0.0),
                r["throughput_vs_etcd_reference"]
                    .as_f64()
                    .map(|x| format!("{x:.2}x"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        if !rows.is_empty() {
            println!("vs_etcd: warden writes/s over {reference} writes/s");
            if args.shared_queue {
                println!("warden: writes through the shared queue group (followers forward)");
            }
        }
        if let Some(v) = &scale_figures {
            scale::print(v);
        }
        if let Some(v) = &template_figures {
            lifecycle::print(v);
        }
        if let Some(v) = &export_figures {
            lifecycle::print_export(v);
        }
        if let Some(a) = &agent_figures {
            print_agents(a);
        }
        for f in &failovers {
            println!(
                "failover of {} agents (SIGKILL until all run elsewhere): p50 {} ms, p99 {} ms, all {} ms (polled every ~{} ms); p99 = {:.2}x the detection time (down_after_ms), {:.2}x Orleans' ~15 s (issue's figure)",
                f["agents"], f["p50_ms"], f["p99_ms"], f["all_ms"], f["poll_resolution_ms"],
                f["p99_vs_detection"].as_f64().unwrap_or(0.0),
                f["p99_vs_orleans"].as_f64().unwrap_or(0.0),
            );
        }
        if let Some(m) = &migration {
            println!(
                "migration unavailability ({} moves of a small agent under calls): p50 {} us, p99 {} us = {:.1}x the raw NATS round trip ({} us) of this run",
                m["migrations"], m["unavailable"]["p50_us"], m["unavailable"]["p99_us"],
                m["p99_vs_nats_rtt"].as_f64().unwrap_or(0.0), m["nats_rtt_p50_us"],
            );
        }
    }
    if let (Some(s), false) = (&slow_stop, args.json) {
        println!(
            "calls during a {} ms graceful stop of another agent on the node: worst {} us = {:.1}x a plain call's p99 ({} us, measured just before), p99 {} us = {:.2}x; {} calls, {} errors",
            s["shutdown_ms"], s["worst_during_us"],
            s["worst_vs_plain_p99"].as_f64().unwrap_or(0.0), s["plain_call"]["p99_us"],
            s["during_stop"]["p99_us"], s["p99_vs_plain_p99"].as_f64().unwrap_or(0.0),
            s["during_stop"]["ops"], s["during_stop"]["errors"],
        );
    }
    if let Some((cluster, dir)) = etcd_cluster {
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir); // a temp dir; leftovers are harmless
    }
    if let Some(mut cluster) = _local {
        cluster.stop_all(Duration::from_secs(10)).await;
        if args.keep {
            eprintln!("data and logs kept in {:?}", cluster.dir);
        } else {
            let _ = std::fs::remove_dir_all(&cluster.dir); // a temp dir; leftovers are harmless
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--route-cut-s`: the partial-partition figure, on a cluster of its own.
async fn bench_route_cut(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("warden-bench-cut-{}", std::process::id()));
    let setup = route_cut::Setup {
        bin: std::env::current_exe()?,
        dir: dir.clone(),
        cluster: args.cluster.clone(),
        how: if args.one_way {
            crate::netfault::RouteCut::OneWay
        } else {
            crate::netfault::RouteCut::Both
        },
        before: Duration::from_millis(args.duration_ms.max(1_000)),
        during: Duration::from_secs(args.route_cut_s),
        after: Duration::from_secs(3),
        request_timeout: Duration::from_secs(2),
    };
    eprintln!(
        "route cut: 3 nodes over 3 NATS servers, {} ms before, {} s cut, 3 s after",
        setup.before.as_millis(),
        args.route_cut_s
    );
    let report = route_cut::run(&setup).await;
    if args.keep {
        eprintln!("data and logs kept in {dir:?}");
    } else {
        let _ = std::fs::remove_dir_all(&dir); // a temp dir; leftovers are harmless
    }
    let v = route_cut::summary(&report?);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        route_cut::print(&v);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--metrics-cost`: metrics on against off, on clusters of its own.
async fn bench_metrics_cost(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("warden-bench-metrics-{}", std::process::id()));
    let (feature, rounds) = if args.metrics_cost > 0 {
        (metrics_cost::Feature::Metrics, args.metrics_cost)
    } else if args.history_cost > 0 {
        (metrics_cost::Feature::History, args.history_cost)
    } else {
        (metrics_cost::Feature::Traces, args.traces_cost)
    };
    let setup = metrics_cost::Setup {
        feature,
        bin: std::env::current_exe()?,
        dir: dir.clone(),
        cluster: args.cluster.clone(),
        duration: Duration::from_millis(args.duration_ms.max(1_000)),
        writers: args.writers.iter().copied().max().unwrap_or(64),
        rounds: rounds.min(10),
    };
    eprintln!(
        "{feature:?} cost: {} rounds each of off and on, {} writers, {} ms per measurement",
        setup.rounds,
        setup.writers,
        setup.duration.as_millis()
    );
    let rounds = metrics_cost::run(&setup).await;
    if args.keep {
        eprintln!("data and logs kept in {dir:?}");
    } else {
        let _ = std::fs::remove_dir_all(&dir); // a temp dir; leftovers are harmless
    }
    let v = metrics_cost::summary(&rounds?);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        metrics_cost::print(feature, &v);
    }
    Ok(ExitCode::SUCCESS)
}

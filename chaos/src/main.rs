//! `warden-chaos`: runs a scenario against real `warden node` processes and real
//! `nats-server`s with faults from one seeded schedule, then checks the guarantees G1-G7 (`chaos/README.md` lists them)
//! on the recorded history. Exits non-zero on any violation. See `chaos/README.md`.

mod availability;
mod check;
mod history;
mod hostile;
mod scenario;
mod workload;
mod world;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use check::{FinalState, NodeJournal, Verdict};
use history::{wall_us, History};
use scenario::Scenario;
use world::{Active, FaultRecord, World};

#[derive(Parser)]
#[command(
    name = "warden-chaos",
    about = "Real faults against a real Warden cluster, checked"
)]
struct Args {
    /// Scenario file.
    #[arg(long, default_value = "chaos/scenarios/ci.toml")]
    scenario: PathBuf,
    /// Seed of the schedule; random (and printed) when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Override the scenario's safety phase length, in seconds.
    #[arg(long)]
    safety_s: Option<u64>,
    /// The warden binary to run nodes with.
    #[arg(long, default_value = "target/debug/warden")]
    warden: PathBuf,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep the run's directory (logs, data) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // On SIGTERM or SIGINT the run is dropped, and with it every process it started (each is
    // killed when its handle drops): an interrupted harness leaves nothing running.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("chaos: error: cannot install signal handlers");
            return ExitCode::from(2);
        }
    };
    let outcome = tokio::select! {
        r = run(args) => r,
        _ = term.recv() => Err(anyhow::anyhow!("interrupted; stopped everything it started")),
        _ = int.recv() => Err(anyhow::anyhow!("interrupted; stopped everything it started")),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn pick_weighted<'a>(
    rng: &mut StdRng,
    weights: &'a std::collections::BTreeMap<String, u32>,
) -> Option<&'a str> {
    let total: u32 = weights.values().sum();
    if total == 0 {
        return None;
    }
    let mut roll = rng.gen_range(0..total);
    for (k, w) in weights {
        if roll < *w {
            return Some(k);
        }
        roll -= w;
    }
    None
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(s) = args.safety_s {
        scenario.safety_s = s;
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "chaos: scenario {} seed {seed} ({} s of faults)",
        scenario.name, scenario.safety_s
    );
    println!(
        "chaos: replay with --scenario {} --seed {seed}",
        args.scenario.display()
    );
    // Kept on failure (and with --keep) for its logs; removed after a clean pass.
    let dir = std::env::temp_dir().join(format!("warden-chaos-{seed}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("chaos: logs and data in {}", dir.display());
    let bin = std::fs::canonicalize(&args.warden)
        .map_err(|e| anyhow::anyhow!("warden binary {:?}: {e} (build it first)", args.warden))?;
    let mut world = World::start(&scenario, dir.clone(), bin).await?;
    let start = Instant::now();
    let history = History::new(start);

    // Leadership announcements (term, leader), in the order they arrive: leader_changed events.
    let mut leader_events = world
        .client
        .nats
        .subscribe(world.client.subjects.event_filter("node.*.leader_changed"))
        .await?;
    let mut leaders: Vec<(u64, u64)> = Vec::new();

    let mut rng = StdRng::seed_from_u64(seed);
    let until = Instant::now() + Duration::from_secs(scenario.safety_s);
    let mut clients = tokio::task::JoinSet::new();
    let drains = workload::Drains::default();
    for k in 0..scenario.workload.clients {
        let c = world.client.clone();
        let parent = workload::parent_of(k);
        let body = json!({"name": parent, "request_id": format!("parent-{parent}")});
        c.call("create_supervisor", &body)
            .await
            .map_err(|e| anyhow::anyhow!("setup {parent}: {e}"))?;
        if scenario.workload.uses_counters() {
            let counter = workload::counter_of(k);
            let body = json!({"name": counter, "supervisor": parent, "kind": "counter",
                              "config": {"durable": true}, "request_id": format!("ctr-{counter}")});
            c.call("spawn_agent", &body)
                .await
                .map_err(|e| anyhow::anyhow!("setup {counter}: {e}"))?;
        }
        clients.spawn(workload::run_client(
            k,
            seed,
            scenario.workload.clone(),
            scenario.nodes,
            c,
            history.clone(),
            drains.clone(),
            until,
        ));
    }

    if scenario.workload.hostile_ms > 0 {
        let hostile = world.connect("operator").await?;
        let counters = if scenario.workload.uses_counters() {
            (0..scenario.workload.clients)
                .map(workload::counter_of)
                .collect()
        } else {
            Vec::new()
        };
        clients.spawn(hostile::run(
            seed,
            warden::client::Client {
                deadline: Duration::from_millis(scenario.workload.op_timeout_ms),
                ..hostile
            },
            history.clone(),
            scenario.nodes,
            counters,
            Duration::from_millis(scenario.workload.hostile_ms),
            until,
        ));
    }

    // Safety phase: faults on the seeded schedule while the clients run.
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut active: Vec<(Active, Instant, usize)> = Vec::new();
    let max_active = (scenario.nodes as usize).div_ceil(2).max(1);
    let mut next_fault = Instant::now()
        + Duration::from_millis(
            rng.gen_range(scenario.faults.interval_ms[0]..=scenario.faults.interval_ms[1]),
        );
    while Instant::now() < until {
        let now = Instant::now();
        world.reap_crashes(history.now_ms());
        // Heal what is due.
        let mut i = 0;
        while i < active.len() {
            if active[i].1 <= now {
                let (fault, _, rec) = active.remove(i);
                world.heal(fault).await;
                faults[rec].healed_ms = Some(history.now_ms());
            } else {
                i += 1;
            }
        }
        if now >= next_fault {
            if active.len() < max_active {
                if let Some(kind) =
                    pick_weighted(&mut rng, &scenario.faults.kinds).map(str::to_string)
                {
                    let current: Vec<Active> = active.iter().map(|a| a.0).collect();
                    let start_ms = history.now_ms();
                    let start_wall_us = wall_us();
                    if let Some((fault, target)) = world.inject(&kind, &mut rng, &current).await {
                        let lasting = fault.map(|f| {
                            let d = rng.gen_range(
                                scenario.faults.duration_ms[0]..=scenario.faults.duration_ms[1],
                            );
                            (f, Instant::now() + Duration::from_millis(d))
                        });
                        faults.push(FaultRecord {
                            kind,
                            target,
                            start_ms,
                            start_wall_us,
                            // A fault over as soon as it was done (a rolling restart).
                            healed_ms: lasting.is_none().then(|| history.now_ms()),
                        });
                        if let Some((f, heal_at)) = lasting {
                            active.push((f, heal_at, faults.len() - 1));
                        }
                    }
                }
            }
            next_fault = Instant::now()
                + Duration::from_millis(
                    rng.gen_range(scenario.faults.interval_ms[0]..=scenario.faults.interval_ms[1]),
                );
        }
        // Sample the leader and drain leader events while waiting for the next tick.
        let tick = tokio::time::sleep(Duration::from_millis(100));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = &mut tick => break,
                Some(msg) = leader_events.next() => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) {
                        if let (Some(t), Some(l)) = (v["data"]["term"].as_u64(), v["data"]["leader"].as_u64()) {
                            leaders.push((t, l));
                        }
                    }
                }
            }
        }
    }
    while clients.join_next().await.is_some() {}
    let safety_end_ms = history.now_ms();

    // Heal everything, then the liveness phase: the cluster must come back by itself.
    for (fault, _, rec) in active.drain(..) {
        world.heal(fault).await;
        faults[rec].healed_ms = Some(history.now_ms());
    }
    world.reap_crashes(history.now_ms());
    world.restart_missing().await;
    let healed = Instant::now();
    let liveness_timeout = Duration::from_secs(scenario.liveness_timeout_s);
    // No drain outlives the safety phase: cancel what the clients could not (their last cancel
    // may have met a fault), so that every node takes agents again.
    let undrained = cancel_drains(&world, &history, &drains, liveness_timeout).await;
    let recovery = world
        .wait_healthy(
            scenario.nodes as usize,
            Duration::from_secs(scenario.liveness_timeout_s),
        )
        .await;
    let mut liveness = Verdict {
        guarantee: "G4",
        what: "the healed cluster recovers (registry)",
        checked: 1,
        violations: recovery
            .as_ref()
            .err()
            .map(|e| vec![e.clone()])
            .unwrap_or_default(),
    };
    for node in drains.pending() {
        liveness
            .violations
            .push(format!("the drain of node {node} could not be cancelled"));
    }
    // Every permanent agent the workload created runs again within the bound: the counters,
    // and every agent a client spawned (acknowledged or not) that is still in the registry.
    let ops = history.ops();
    let (agents_live, agent_records) = if scenario.workload.uses_agents() {
        let mut wanted: Vec<String> = Vec::new();
        if scenario.workload.uses_counters() {
            wanted.extend((0..scenario.workload.clients).map(workload::counter_of));
        }
        let spawned = ops.iter().filter_map(|o| match &o.kind {
            history::OpKind::SpawnAgent { name, .. } => Some(name.clone()),
            _ => None,
        });
        wanted.extend(spawned.collect::<std::collections::BTreeSet<_>>());
        let (v, records) = wait_agents_run(
            &world,
            &wanted,
            healed + liveness_timeout,
            scenario.liveness_timeout_s,
        )
        .await;
        (Some(v), records)
    } else {
        (None, Vec::new())
    };
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(200), leader_events.next()).await
    {
        if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) {
            if let (Some(t), Some(l)) = (v["data"]["term"].as_u64(), v["data"]["leader"].as_u64()) {
                leaders.push((t, l));
            }
        }
    }

    let final_state = read_final(&world).await;
    let mut finals = std::collections::BTreeMap::new();
    if scenario.workload.uses_counters() {
        for k in 0..scenario.workload.clients {
            let counter = workload::counter_of(k);
            finals.insert(counter.clone(), read_counter(&world, &counter).await);
        }
    }
    // The nodes' agent journals, read while the nodes run: a run still open was running when
    // its journal was read.
    let journals: Vec<NodeJournal> = world
        .proxies
        .keys()
        .map(|&node| {
            let read_at_us = wall_us();
            let entries = warden::agent::journal::read_dir(&world.cluster.data_dir(node));
            NodeJournal {
                node,
                entries,
                read_at_us,
            }
        })
        .collect();
    let names: std::collections::BTreeMap<String, String> = agent_records
        .iter()
        .filter_map(|a| {
            Some((
                a["id"].as_str()?.to_string(),
                a["name"].as_str()?.to_string(),
            ))
        })
        .collect();
    let mut verdicts = vec![check::g1_at_most_one(
        &journals,
        &world.procs,
        &names,
        history.start_wall_us(),
    )];
    verdicts.push(liveness);
    verdicts.extend(agents_live);
    match &final_state {
        Ok(fin) => {
            verdicts.push(check::g2_acknowledged_writes(&ops, fin));
            verdicts.push(check::g5_bad_input(&ops, fin, &world.crashes));
        }
        Err(e) => verdicts.push(Verdict {
            guarantee: "G2",
            what: "final state readable",
            checked: 1,
            violations: vec![e.clone()],
        }),
    }
    if !finals.is_empty() {
        verdicts.push(check::g3_counters(&ops, &finals));
    }
    verdicts.push(check::g6_linearizable_reads(&ops));
    verdicts.push(check::g6_leadership_never_goes_back(&leaders));
    verdicts.push(check::g7_idempotent_retries(&ops));

    let ok = verdicts.iter().all(Verdict::ok);
    let counts = op_counts(&ops);
    println!("chaos: {} faults injected:", faults.len());
    for f in &faults {
        println!(
            "  {:>7} ms  {:<17} {:<8} healed {}",
            f.start_ms,
            f.kind,
            f.target,
            f.healed_ms.map_or("-".into(), |h| format!("{h} ms"))
        );
    }
    let (free_rate, during) = availability::report(&ops, &faults, safety_end_ms);
    println!("chaos: availability: {free_rate:.1} ops/s answered ok with no fault in effect; during each fault:");
    for d in &during {
        println!(
            "  {:>7} ms  {:<17} {:<10} {:>6} ms  {:>7.1} ok/s ({:.2}x), {:.1} answered/s",
            d.start_ms, d.kind, d.target, d.ms, d.ok_per_sec, d.ratio, d.answered_per_sec
        );
    }
    println!("chaos: operations {counts}");
    println!("chaos: bad input answered {}", bad_input_answers(&ops));
    if !undrained.is_empty() {
        println!("chaos: drains cancelled after healing: nodes {undrained:?}");
    }
    println!(
        "chaos: {} node processes ended during the run, journals hold {} lines",
        world.procs.kills.len(),
        journals.iter().map(|j| j.entries.len()).sum::<usize>()
    );
    if let Ok(d) = &recovery {
        println!("chaos: recovered {} ms after healing", d.as_millis());
    }
    for v in &verdicts {
        let mark = if v.ok() { "PASS" } else { "FAIL" };
        println!(
            "  {mark} {} {} ({} checked)",
            v.guarantee, v.what, v.checked
        );
        for x in v.violations.iter().take(10) {
            println!("       {x}");
        }
    }
    let passed = verdicts.iter().filter(|v| v.ok()).count();
    println!(
        "chaos: {} passed, {} failed",
        passed,
        verdicts.len() - passed
    );
    let report = json!({
        "scenario": scenario.name, "seed": seed, "safety_s": scenario.safety_s,
        "faults": faults, "operations": counts, "verdicts": verdicts, "ok": ok,
        "availability": {"fault_free_ok_per_sec": free_rate, "during": during},
        "start_wall_us": history.start_wall_us(), "kills": world.procs.kills, "pauses": world.procs.pauses,
        "drains_cancelled_after_healing": undrained,
    });
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    drop(world);
    if ok && !args.keep {
        let _ = std::fs::remove_dir_all(&dir); // leftovers in a temp dir are harmless
    } else {
        println!("chaos: logs and data kept in {}", dir.display());
    }
    Ok(ok)
}

/// How each kind of bad input was answered: `{what: {code: count}}`.
fn bad_input_answers(ops: &[history::Op]) -> Value {
    let mut answers = serde_json::Map::new();
    for o in ops {
        let history::OpKind::BadInput { what } = &o.kind else {
            continue;
        };
        let code = match &o.outcome {
            history::Outcome::Ok { .. } => "ok",
            history::Outcome::Failed { code, .. } => code.as_str(),
            history::Outcome::Unknown { .. } => "unknown",
        };
        let e = answers.entry(what.clone()).or_insert_with(|| json!({}));
        e[code] = json!(e[code].as_u64().unwrap_or(0) + 1);
    }
    Value::Object(answers)
}

fn op_counts(ops: &[history::Op]) -> Value {
    let mut counts = serde_json::Map::new();
    for o in ops {
        let kind = match &o.kind {
            history::OpKind::Create { .. } => "create",
            history::OpKind::Stop { .. } => "stop",
            history::OpKind::Read { .. } => "read",
            history::OpKind::SpawnAgent { .. } => "spawn_agent",
            history::OpKind::StopAgent { .. } => "stop_agent",
            history::OpKind::ReadAgents { .. } => "agent_read",
            history::OpKind::BadInput { .. } => "bad_input",
            history::OpKind::Increment { .. } => "increment",
            history::OpKind::CounterRead { .. } => "counter_read",
            history::OpKind::Migrate { .. } => "migrate",
            history::OpKind::Drain { cancel: false, .. } => "drain",
            history::OpKind::Drain { cancel: true, .. } => "drain_cancel",
        };
        let outcome = match &o.outcome {
            history::Outcome::Ok { .. } => "ok",
            history::Outcome::Failed { .. } => "failed",
            history::Outcome::Unknown { .. } => "unknown",
        };
        let e = counts
            .entry(kind.to_string())
            .or_insert_with(|| json!({"ok": 0, "failed": 0, "unknown": 0}));
        e[outcome] = json!(e[outcome].as_u64().unwrap_or(0) + 1);
    }
    Value::Object(counts)
}

/// Cancels every drain that may still be in effect, retrying (safely: each cancel carries a
/// request id) until `within`. Returns the nodes it cancelled; what it could not cancel stays
/// in `drains`.
async fn cancel_drains(
    world: &World,
    history: &History,
    drains: &workload::Drains,
    within: Duration,
) -> Vec<u64> {
    let deadline = Instant::now() + within;
    let mut todo = drains.pending();
    // A drain whose answer was lost under a fault may have been applied after its client's
    // cancel: the registry, not the clients' bookkeeping, says which nodes still drain.
    todo.extend(draining_in_registry(world, deadline).await);
    todo.sort_unstable();
    todo.dedup();
    let mut done = Vec::new();
    for (i, node) in todo.into_iter().enumerate() {
        while Instant::now() < deadline {
            let c = warden::client::Client {
                deadline: deadline.saturating_duration_since(Instant::now()),
                ..world.client.clone()
            };
            let rid = format!("undrain-heal-{node}-{i}-{}", history.now_ms());
            // Recorded as the operation of a client past the last one: the harness.
            let harness = usize::MAX;
            if workload::cancel_drain(&c, history, harness, node, rid).await {
                drains.cancelled(node);
                done.push(node);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    done
}

/// The nodes `cluster_status` shows draining, asked until `deadline` (none if it never
/// answers: the recovery verdict then reports the cluster).
async fn draining_in_registry(world: &World, deadline: Instant) -> Vec<u64> {
    while Instant::now() < deadline {
        if let Ok(v) = world.client.call("cluster_status", &json!({})).await {
            return v["nodes"]
                .as_array()
                .map(|nodes| {
                    nodes
                        .iter()
                        .filter(|n| n["status"] == "draining")
                        .filter_map(|n| n["id"].as_u64())
                        .collect()
                })
                .unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Vec::new()
}

/// Every agent record, following pages.
async fn list_agents(c: &warden::client::Client) -> Result<Vec<Value>, String> {
    c.all_pages("list_agents", &json!({}), "agents")
        .await
        .map_err(|e| format!("list_agents: {e}"))
}

/// G4 (agents): polls the registry until every wanted permanent agent runs or `deadline`
/// passes; returns the verdict on the last reading and the records read.
async fn wait_agents_run(
    world: &World,
    wanted: &[String],
    deadline: Instant,
    within_s: u64,
) -> (Verdict, Vec<Value>) {
    let c = warden::client::Client {
        deadline: Duration::from_secs(5),
        ..world.client.clone()
    };
    let mut last: Vec<Value> = Vec::new();
    loop {
        match list_agents(&c).await {
            Ok(records) => {
                let v = check::g4_agents_run(wanted, &records, within_s);
                if v.ok() || Instant::now() >= deadline {
                    return (v, records);
                }
                last = records;
            }
            Err(e) if Instant::now() >= deadline => {
                let mut v = check::g4_agents_run(wanted, &last, within_s);
                v.violations
                    .push(format!("agents could not be read at the deadline: {e}"));
                return (v, last);
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads a counter after healing, waiting (bounded) for it to run again.
async fn read_counter(world: &World, counter: &str) -> Option<i64> {
    let c = warden::client::Client {
        deadline: Duration::from_secs(5),
        ..world.client.clone()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let history::Outcome::Ok { value } =
            workload::call_agent(&c, counter, &json!({"op": "get"})).await
        {
            return value["value"].as_i64();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Reads every supervisor and agent back, page by page, with linearizable reads.
async fn read_final(world: &World) -> Result<FinalState, String> {
    let c = warden::client::Client {
        deadline: Duration::from_secs(20),
        ..world.client.clone()
    };
    let names = |records: Vec<Value>| {
        records
            .iter()
            .map(|s| {
                let field = |k: &str| s[k].as_str().unwrap_or("").to_string();
                (field("name"), field("id"))
            })
            .collect()
    };
    let supervisors = c
        .all_pages("list_supervisors", &json!({}), "supervisors")
        .await
        .map_err(|e| format!("final read of supervisors: {e}"))?;
    let agents = list_agents(&c)
        .await
        .map_err(|e| format!("final read of agents: {e}"))?;
    Ok(FinalState {
        supervisors: names(supervisors),
        agents: names(agents),
    })
}

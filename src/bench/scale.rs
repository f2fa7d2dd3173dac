//! `warden bench --local --scale N`: N echo agents spawned on the local three-node cluster in
//! groups of 10,000 (8 at a time, placed by the cluster), and what that load did: leader
//! changes, nodes turned suspect or down, lost leases, the spread over the nodes, memory per
//! agent, query latencies, how long a follower SIGKILLed afterwards takes to catch up, how
//! long a fourth node new to the cluster takes to catch up and what it weighs as a replica,
//! and two bulk stops: one group, then a supervisor above ten groups.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use super::agents::{self, Spawned};
use crate::client::Client;
use crate::up::LocalCluster;

/// Agents per group: the largest group there is.
const GROUP: usize = crate::limits::MAX_GROUP as usize;
/// Groups under one parent supervisor: the bulk stop of a parent stops this many.
const GROUPS_PER_PARENT: usize = 10;
/// Groups in flight at once.
const CONCURRENCY: usize = 8;
/// How long the agents may take to all run, and a follower to catch up.
const RUN_DEADLINE: Duration = Duration::from_secs(1_200);
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(600);
/// How long the restart waits for the follower to hold a snapshot of every agent.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(120);

/// Runs the scale benchmark; `rtt_us` is a raw NATS round trip measured in the same run.
pub async fn scale(
    c: &Client,
    cluster: &mut LocalCluster,
    n: usize,
    rtt_us: u64,
) -> anyhow::Result<Value> {
    let ids = [1u64, 2, 3];
    let rss = |cluster: &LocalCluster, id: u64| cluster.pid(id).and_then(agents::rss_bytes);
    // A process's peak, since it started: for a node started after the spawn, what loading
    // or installing the snapshot and catching up cost at most.
    let peak = |cluster: &LocalCluster, id: u64| cluster.pid(id).and_then(agents::peak_rss_bytes);
    let before: Vec<Option<u64>> = ids.iter().map(|id| rss(cluster, *id)).collect();
    let status = c.call("cluster_status", &json!({})).await?;
    let term_before = status["term"].as_u64().unwrap_or(0);

    // Nodes turned suspect or down, counted from the events while the benchmark runs.
    let troubles = Arc::new(AtomicUsize::new(0));
    let mut events = c
        .nats
        .subscribe(c.subjects.event_filter("node.*.*"))
        .await?;
    c.nats.flush().await?;
    let counter = troubles.clone();
    let watch = tokio::spawn(async move {
        while let Some(msg) = events.next().await {
            if msg.subject.ends_with(".suspect") || msg.subject.ends_with(".down") {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = run[..8].to_string();
    let (tag, rare_tag) = (format!("scale-{run}"), format!("scale-{run}-rare"));
    let groups = n.div_ceil(GROUP);
    let parent = |g: usize| format!("scale-{run}-p{}", g / GROUPS_PER_PARENT);
    for g in (0..groups).step_by(GROUPS_PER_PARENT) {
        // Spread: each group below it is placed on its own.
        c.call("create_supervisor", &json!({"name": parent(g)}))
            .await?;
    }
    eprintln!("spawning {n} agents in {groups} groups of up to {GROUP}");
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let mut rare = 0;
    for g in 0..groups {
        let count = (n - g * GROUP).min(GROUP);
        let mut tags = vec![tag.clone()];
        // One group in 50 (2% of the agents) carries the rare tag the queries look for.
        if g % 50 == 0 {
            tags.push(rare_tag.clone());
            rare += count;
        }
        let body = json!({"name": format!("scale-{run}-{g}"), "count": count, "parent": parent(g),
                          "template": {"kind": "echo", "tags": tags},
                          "request_id": format!("scale-{run}-{g}")});
        let (c, sem) = (c.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            c.call("spawn_agent_group", &body).await
        });
    }
    let mut unknown = 0;
    while let Some(r) = tasks.join_next().await {
        if r.is_err() || r.is_ok_and(|r| r.is_err()) {
            unknown += 1;
        }
    }
    let acked = start.elapsed();
    // Every group is committed by now: a snapshot at this index or later holds every agent.
    let all_in_registry = c.call("cluster_status", &json!({})).await?["applied_index"]
        .as_u64()
        .unwrap_or(0);
    let q = json!({"tag": tag, "status": "running", "count": true});
    let unanswered = std::cell::Cell::new(0);
    let all_run = || async {
        // A read may time out under the load: counted, and asked again.
        match c.call("find_agents", &q).await {
            Ok(v) => Ok(v["count"].as_u64().unwrap_or(0) as usize >= n),
            Err(_) => {
                unanswered.set(unanswered.get() + 1);
                Ok(false)
            }
        }
    };
    let every = Duration::from_millis(250);
    super::poll_until("the agents did not all run", RUN_DEADLINE, every, all_run).await?;
    let unanswered = unanswered.get();
    let running = start.elapsed();
    let status = c.call("cluster_status", &json!({})).await?;
    let term_after = status["term"].as_u64().unwrap_or(0);
    let leader = status["leader"].as_u64().unwrap_or(1);
    let lost_leases = lease_losses(cluster, &ids);
    let suspect_or_down = troubles.load(Ordering::Relaxed);

    let mut per_node = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let q = json!({"node": id, "count": true});
        let count = c.call("find_agents", &q).await?["count"]
            .as_u64()
            .unwrap_or(0);
        let grown = match (before[i], rss(cluster, *id)) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b)),
            _ => None,
        };
        per_node.push((*id, count, grown));
    }
    let mean = n as f64 / ids.len() as f64;
    let spread = per_node
        .iter()
        .map(|(_, count, _)| (*count as f64 - mean).abs() / mean)
        .fold(0.0, f64::max);

    eprintln!("measuring queries over {n} agents");
    let spawned = Spawned {
        acked_per_sec: 0.0,
        running_per_sec: 0.0,
        rare_tag,
        rare,
        group: format!("scale-{run}-{}", groups / 2),
        agent: format!("scale-{run}-{}-0", groups / 2),
    };
    let queries = agents::query_latency(c, &spawned, 200).await?;
    let queries: serde_json::Map<String, Value> = queries
        .iter()
        .map(|(label, f)| {
            let v = json!({
                "figures": f,
                "p50_vs_nats_rtt": f.p50_us as f64 / rtt_us.max(1) as f64,
                "p50_vs_get_agent": f.p50_us as f64 / queries[0].1.p50_us.max(1) as f64,
            });
            (label.to_string(), v)
        })
        .collect();

    // A follower SIGKILLed and started again: how long until it has applied what the leader
    // had when it came back. Its agents fail over meanwhile (it is down longer than
    // `down_after_ms`), which the counts after it include. A follower in service has a
    // snapshot: the kill waits (a bounded time) for one that holds every agent, and the figures
    // say whether there was one, since without it the restart replays the whole spawn.
    let follower = ids.iter().copied().find(|id| *id != leader).unwrap_or(2);
    let snapshot_index = std::cell::Cell::new(0);
    let has_snapshot = || async {
        let h = node(c, follower).call("health", &json!({})).await.ok();
        snapshot_index.set(h.and_then(|h| h["snapshot_index"].as_u64()).unwrap_or(0));
        Ok(snapshot_index.get() >= all_in_registry)
    };
    let every = Duration::from_millis(250);
    let snapshotted = super::poll_until("", SNAPSHOT_WAIT, every, has_snapshot)
        .await
        .is_ok();
    eprintln!("killing node {follower} and starting it again");
    cluster.kill(follower).await;
    let restarted = Instant::now();
    cluster.start_node(follower, false).await?;
    caught_up(c, follower).await?;
    let catch_up = restarted.elapsed();
    let replica_after = rss(cluster, follower);
    let restart_peak = peak(cluster, follower);
    let status = c.call("cluster_status", &json!({})).await?;
    let (term_restart, leases_restart) = (
        status["term"].as_u64().unwrap_or(0),
        lease_losses(cluster, &ids),
    );

    // A node new to the cluster joins: it gets the leader's snapshot and the log after it. It
    // runs no agent yet, so its size is what a replica of the registry costs.
    let joiner = ids.len() as u64 + 1;
    eprintln!("starting node {joiner}, new to the cluster");
    let joined = Instant::now();
    cluster.start_node(joiner, false).await?;
    caught_up(c, joiner).await?;
    let join_catch_up = joined.elapsed();
    let baseline = before.iter().flatten().min().copied();
    let replica = match (rss(cluster, joiner), baseline) {
        (Some(r), Some(b)) => Some(r.saturating_sub(b)),
        _ => None,
    };
    let join_peak = peak(cluster, joiner);
    let status = c.call("cluster_status", &json!({})).await?;
    let every_id = [1u64, 2, 3, joiner];
    let (term_join, leases_join) = (
        status["term"].as_u64().unwrap_or(0),
        lease_losses(cluster, &every_id),
    );
    let troubles_restart = troubles.load(Ordering::Relaxed);

    // Bulk stops, once every agent in the registry runs again (the restarted node's, or
    // those that failed over): the last group, then the first parent with the groups below.
    let steady = || async {
        let total = c.call("find_agents", &json!({"count": true})).await;
        let total = total.ok().and_then(|v| v["count"].as_u64());
        Ok(total.is_some_and(|t| t > 0) && total == agents_present(c, &every_id).await)
    };
    super::poll_until(
        "the agents did not all run again",
        RUN_DEADLINE,
        every,
        steady,
    )
    .await?;
    let last = format!("scale-{run}-{}", groups - 1);
    let stop_group = bulk_stop(c, &every_id, &last, 1, rtt_us).await?;
    let below = GROUPS_PER_PARENT.min(groups.saturating_sub(1)).max(1);
    let stop_parent = bulk_stop(c, &every_id, &parent(0), below as u64 + 1, rtt_us).await?;
    let status = c.call("cluster_status", &json!({})).await?;
    watch.abort();

    let nodes: Vec<Value> = per_node
        .iter()
        .map(|(id, count, grown)| {
            // Every node holds every record and runs its own agents: its growth is both, so
            // it is reported per agent it runs and per agent in the registry.
            json!({
                "node": id,
                "agents": count,
                "rss_growth_bytes": grown,
                "growth_per_agent_run": grown.map(|g| g as f64 / (*count).max(1) as f64),
                "growth_per_agent_in_registry": grown.map(|g| g as f64 / n as f64),
            })
        })
        .collect();
    Ok(json!({
        "agents": n,
        "groups": groups,
        "group_answers_unknown": unknown,
        "reads_unanswered_while_spawning": unanswered,
        "spawn_acked_per_sec": n as f64 / acked.as_secs_f64(),
        "spawn_running_per_sec": n as f64 / running.as_secs_f64(),
        "leader_changes": term_after.saturating_sub(term_before),
        "nodes_suspect_or_down": suspect_or_down,
        "lease_losses": lost_leases,
        "nodes": nodes,
        "spread_max_vs_mean": spread,
        "queries": queries,
        "nats_rtt_p50_us": rtt_us,
        "restarted_follower": follower,
        "restarted_from_snapshot": snapshotted,
        "restarted_snapshot_index": snapshot_index.get(),
        "catch_up_ms": catch_up.as_millis() as u64,
        "catch_up_vs_nats_rtt": catch_up.as_micros() as f64 / rtt_us.max(1) as f64,
        "restarted_rss_bytes_per_agent_in_registry":
            replica_after.map(|b| b as f64 / n as f64),
        "restarted_peak_rss_bytes_per_agent_in_registry":
            restart_peak.map(|b| b as f64 / n as f64),
        "leader_changes_with_restart": term_restart.saturating_sub(term_before),
        "lease_losses_with_restart": leases_restart,
        "joined_node": joiner,
        "join_catch_up_ms": join_catch_up.as_millis() as u64,
        "join_catch_up_vs_nats_rtt": join_catch_up.as_micros() as f64 / rtt_us.max(1) as f64,
        "replica_rss_growth_bytes_per_agent": replica.map(|b| b as f64 / n as f64),
        "joined_peak_rss_bytes_per_agent": join_peak.map(|b| b as f64 / n as f64),
        "leader_changes_with_join": term_join.saturating_sub(term_restart),
        "lease_losses_with_join": leases_join - leases_restart,
        "stop_group": stop_group,
        "stop_parent": stop_parent,
        "leader_changes_in_stops": status["term"].as_u64().unwrap_or(0).saturating_sub(term_join),
        "nodes_suspect_or_down_in_stops": troubles.load(Ordering::Relaxed) - troubles_restart,
        "lease_losses_in_stops": lease_losses(cluster, &every_id) - leases_join,
    }))
}

/// Stops supervisor `name` (`supervisors` of them in its subtree, itself included) and
/// measures: the answer, every `stopped` event it owes, and the nodes' instances ended.
async fn bulk_stop(
    c: &Client,
    ids: &[u64],
    name: &str,
    supervisors: u64,
    rtt_us: u64,
) -> anyhow::Result<Value> {
    // Counted as they come, from before the call: 100,000 events would overflow the
    // subscription's buffer if they waited for the answer.
    let mut events = c
        .nats
        .subscribe(c.subjects.event_filter("*.*.stopped"))
        .await?;
    c.nats.flush().await?;
    let (count, mut seen) = tokio::sync::watch::channel(0usize);
    let drain = tokio::spawn(async move {
        while events.next().await.is_some() {
            count.send_modify(|n| *n += 1);
        }
    });
    let every = Duration::from_millis(100);
    let before = std::cell::Cell::new(None);
    let all_answer = || async {
        before.set(agents_present(c, ids).await);
        Ok(before.get().is_some())
    };
    super::poll_until("the nodes did not answer", RUN_DEADLINE, every, all_answer).await?;
    let before = before.get().unwrap_or(0);
    eprintln!("stopping {name}");
    let start = Instant::now();
    let answer = c.call("stop_supervisor", &json!({"name": name})).await?;
    let answered = start.elapsed();
    let owed = answer["stopped_count"].as_u64().unwrap_or(0) as usize;
    // Short of them all by the deadline: the count says how many came.
    let _ = tokio::time::timeout(CATCH_UP_DEADLINE, seen.wait_for(|n| *n >= owed)).await;
    let published = start.elapsed();
    let target = before.saturating_sub(owed.saturating_sub(supervisors as usize) as u64);
    let ended = || async { Ok(agents_present(c, ids).await.is_some_and(|n| n <= target)) };
    super::poll_until(
        "the stopped agents did not end",
        CATCH_UP_DEADLINE,
        every,
        ended,
    )
    .await?;
    let ended = start.elapsed();
    drain.abort();
    Ok(json!({
        "supervisor": name,
        "stopped": owed,
        "events_seen": *seen.borrow(),
        "answer_ms": answered.as_millis() as u64,
        "events_ms": published.as_millis() as u64,
        "instances_gone_ms": ended.as_millis() as u64,
        "answer_vs_nats_rtt": answered.as_micros() as f64 / rtt_us.max(1) as f64,
        "instances_gone_vs_nats_rtt": ended.as_micros() as f64 / rtt_us.max(1) as f64,
    }))
}

/// A client whose node-local commands (`health`) node `id` answers.
fn node(c: &Client, id: u64) -> Client {
    Client {
        node: Some(id),
        ..c.clone()
    }
}

/// Waits until node `id` has applied what the leader had applied when this was called, and
/// answers how long that took.
async fn caught_up(c: &Client, id: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let target = c.call("cluster_status", &json!({})).await?["applied_index"]
        .as_u64()
        .unwrap_or(0);
    let via = node(c, id);
    let applied = || async {
        let applied = match via.call("health", &json!({})).await {
            Ok(h) => h["last_applied"].as_u64().unwrap_or(0),
            Err(_) => 0, // still starting
        };
        Ok(applied >= target)
    };
    let every = Duration::from_millis(100);
    let what = format!("node {id} did not catch up");
    super::poll_until(&what, CATCH_UP_DEADLINE, every, applied).await?;
    Ok(start.elapsed())
}

/// Agent instances on the nodes, running or still stopping, by their `health`; none until
/// every node has answered.
async fn agents_present(c: &Client, ids: &[u64]) -> Option<u64> {
    let mut sum = 0;
    for id in ids {
        let via = Client {
            node: Some(*id),
            ..c.clone()
        };
        let h = via.call("health", &json!({})).await.ok()?;
        sum += h["running_agents"].as_u64()? + h["stopping_agents"].as_u64()?;
    }
    Some(sum)
}

/// Leases lost so far by the nodes, from their logs.
fn lease_losses(cluster: &LocalCluster, ids: &[u64]) -> usize {
    ids.iter()
        .map(|id| {
            let log = cluster.dir.join(format!("node-{id}.log"));
            std::fs::read_to_string(log)
                .map(|s| s.matches("lost the lease").count())
                .unwrap_or(0)
        })
        .sum()
}

/// Prints the figures `scale` answered, for a reader.
pub fn print(v: &Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    println!(
        "scale: {} agents in {} groups: {:.0} acked/s, {:.0} running/s; leader changes {}, \
         nodes suspect or down {}, lease losses {}; spread {:.1}% of the mean",
        v["agents"],
        v["groups"],
        f("spawn_acked_per_sec"),
        f("spawn_running_per_sec"),
        v["leader_changes"],
        v["nodes_suspect_or_down"],
        v["lease_losses"],
        f("spread_max_vs_mean") * 100.0
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        println!(
            "  node {}: runs {} agents; resident size grew {:.0} MB: {:.0} bytes per agent it \
             runs, {:.0} per agent in the registry",
            n["node"],
            n["agents"],
            n["rss_growth_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            n["growth_per_agent_run"].as_f64().unwrap_or(0.0),
            n["growth_per_agent_in_registry"].as_f64().unwrap_or(0.0)
        );
    }
    for (label, q) in v["queries"].as_object().into_iter().flatten() {
        println!(
            "  {label}: p50 {} us ({:.1}x NATS rtt, {:.2}x get_agent)",
            q["figures"]["p50_us"],
            q["p50_vs_nats_rtt"].as_f64().unwrap_or(0.0),
            q["p50_vs_get_agent"].as_f64().unwrap_or(0.0)
        );
    }
    let from = if v["restarted_from_snapshot"].as_bool() == Some(true) {
        "from a snapshot holding every agent"
    } else {
        "with no snapshot holding every agent (it replays the spawn from its log)"
    };
    println!(
        "  node {} SIGKILLed and restarted {from}: caught up in {} ms ({:.0}x NATS rtt); then \
         {:.0} bytes per agent in its registry (peak {:.0} while loading and catching up); \
         leader changes {}, lease losses {} in all",
        v["restarted_follower"],
        v["catch_up_ms"],
        f("catch_up_vs_nats_rtt"),
        f("restarted_rss_bytes_per_agent_in_registry"),
        f("restarted_peak_rss_bytes_per_agent_in_registry"),
        v["leader_changes_with_restart"],
        v["lease_losses_with_restart"]
    );
    println!(
        "  node {} joined: caught up in {} ms ({:.0}x NATS rtt); a replica, it grew {:.0} bytes \
         per agent in the registry (its peak, installing the snapshot and catching up: {:.0}); \
         leader changes {}, lease losses {}",
        v["joined_node"],
        v["join_catch_up_ms"],
        f("join_catch_up_vs_nats_rtt"),
        f("replica_rss_growth_bytes_per_agent"),
        f("joined_peak_rss_bytes_per_agent"),
        v["leader_changes_with_join"],
        v["lease_losses_with_join"]
    );
    for key in ["stop_group", "stop_parent"] {
        let s = &v[key];
        println!(
            "  stop_supervisor {}: {} stopped; answered in {} ms ({:.0}x NATS rtt), {} of the \
             events in {} ms, instances gone in {} ms ({:.0}x NATS rtt)",
            s["supervisor"],
            s["stopped"],
            s["answer_ms"],
            s["answer_vs_nats_rtt"].as_f64().unwrap_or(0.0),
            s["events_seen"],
            s["events_ms"],
            s["instances_gone_ms"],
            s["instances_gone_vs_nats_rtt"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "  during the stops: leader changes {}, nodes suspect or down {}, lease losses {}",
        v["leader_changes_in_stops"],
        v["nodes_suspect_or_down_in_stops"],
        v["lease_losses_in_stops"]
    );
}

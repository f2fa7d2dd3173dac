//! Failover and migration figures (`warden bench --local --failover 1000,10000 --migrations 50`).
//!
//! Failover: a group of N durable counters runs on one follower; the bench SIGKILLs that node
//! and polls the registry until every agent runs again elsewhere. The times at which half,
//! 99% and all of them were running again are the p50, p99 and max; they are reported beside
//! the configured detection time (`failure.down_after_ms`, the floor) and the figure
//! for Orleans. The node is restarted afterwards, so sizes run one after the other.
//!
//! Migration: one small counter is called in a tight loop while it is migrated; the longest
//! gap between two answered calls around each move is the time it was unavailable, reported
//! beside the raw NATS round trip measured in the same run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Figures;
use crate::client::Client;
use crate::config::FailureConfig;
use crate::up::LocalCluster;

/// The failover figure for Orleans (ms): "about 15 s or more".
const ORLEANS_FAILOVER_MS: f64 = 15_000.0;

/// Agents of the group currently running on a node other than `victim`.
async fn running_elsewhere(c: &Client, group: &str, victim: u64) -> anyhow::Result<usize> {
    let q = json!({"supervisor": group, "status": "running"});
    let agents = c.all_pages("list_agents", &q, "agents").await?;
    Ok(agents.iter().filter(|a| a["node"] != victim).count())
}

/// Measures one failover of `n` agents; returns its figures as JSON.
pub async fn failover(c: &Client, cluster: &mut LocalCluster, n: usize) -> anyhow::Result<Value> {
    let group = format!("fo-{n}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let template = json!({"kind": "counter", "config": {"durable": true}});
    let out = c
        .call(
            "spawn_agent_group",
            &json!({"name": group, "count": n, "template": template}),
        )
        .await?;
    let mut host = out["supervisor"]["node"].as_u64().unwrap_or(0);
    let leader = c.call("cluster_status", &json!({})).await?["leader"]
        .as_u64()
        .unwrap_or(0);
    if host == leader {
        // Measure a follower's failover: a leader's adds an election to it.
        let to = (1..=3).find(|id| *id != leader).unwrap_or(1);
        let first = format!("{group}-0");
        c.call("migrate_agent", &json!({"agent": first, "to": to}))
            .await?;
        host = to;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = json!({"supervisor": group, "status": "running", "node": host});
        let running = c.all_pages("list_agents", &q, "agents").await?.len();
        if running == n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the group did not start on node {host}: {running} of {n} run there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("failover of {n} agents: killing node {host}");
    let killed = Instant::now();
    cluster.kill(host).await;
    let (mut p50, mut p99, mut all) = (None, None, None);
    let mut polls = 0u64;
    let deadline = killed + Duration::from_secs(120);
    while all.is_none() {
        let up = running_elsewhere(c, &group, host).await.unwrap_or(0);
        polls += 1;
        let ms = killed.elapsed().as_millis() as u64;
        if p50.is_none() && up * 2 >= n {
            p50 = Some(ms);
        }
        if p99.is_none() && up * 100 >= n * 99 {
            p99 = Some(ms);
        }
        if up == n {
            all = Some(ms);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "failover did not finish in 120 s"
        );
    }
    let poll_ms = killed.elapsed().as_millis() as u64 / polls.max(1);
    cluster.start_node(host, false).await?;
    cluster.wait_ready(c, 3, Duration::from_secs(60)).await?;
    // Wait until the restarted node is up in the registry too, then clean up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let s = c.call("cluster_status", &json!({})).await?;
        let up = s["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().all(|n| n["status"] == "up"));
        if up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.call("stop_supervisor", &json!({"name": group})).await?;
    let down_after = FailureConfig::default().down_after_ms as f64;
    let p99 = p99.unwrap_or(0);
    Ok(json!({
        "agents": n,
        "node": host,
        "p50_ms": p50,
        "p99_ms": p99,
        "all_ms": all,
        "poll_resolution_ms": poll_ms,
        "p99_vs_detection": p99 as f64 / down_after,
        "p99_vs_orleans": p99 as f64 / ORLEANS_FAILOVER_MS,
    }))
}

/// Migrates one counter `rounds` times while a caller hammers it; returns the unavailability
/// figures (the longest gap between answered calls around each move).
pub async fn migration(c: &Client, rounds: usize) -> anyhow::Result<Figures> {
    let name = format!("mig-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    c.call("spawn_agent", &json!({"name": name, "kind": "counter"}))
        .await?;
    let mut gaps_us = Vec::new();
    let mut errors = 0;
    for _ in 0..rounds {
        let deadline = Instant::now() + Duration::from_secs(30);
        let a = loop {
            let a = c.call("get_agent", &json!({"agent": name})).await?;
            if a["status"] == "running" {
                break a;
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} did not run");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let from = a["node"].as_u64().unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let caller = {
            let (c, name, stop, count) = (c.clone(), name.clone(), stop.clone(), count.clone());
            tokio::spawn(async move {
                let mut answered = Vec::new();
                let mut failed = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match c.call_agent(&name, &json!({"op": "get"})).await {
                        Ok(_) => {
                            answered.push(Instant::now());
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (answered, failed)
            })
        };
        // The caller is in its stride before the move ...
        answered_at_least(&count, CALLS_AROUND_A_MOVE).await?;
        let out = c.call("migrate_agent", &json!({"agent": name})).await?;
        let to = out["to"].as_u64().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = c.call("get_agent", &json!({"agent": name})).await?;
            if a["status"] == "running" && a["node"] == to {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} did not move to {to}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ... and answered again on the target after it.
        answered_at_least(&count, count.load(Ordering::Relaxed) + CALLS_AROUND_A_MOVE).await?;
        stop.store(true, Ordering::Relaxed);
        let (answered, failed) = caller.await?;
        errors += failed;
        let gap = answered
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default();
        gaps_us.push(gap.as_micros() as u64);
        eprintln!("migrated {name} from {from} to {to}: unavailable {gap:?}");
    }
    c.call("stop_agent", &json!({"agent": name})).await?;
    Ok(super::figures(gaps_us, errors, Duration::from_secs(1)))
}

/// Answered calls wanted before and after each move, so the gap around it is measured.
const CALLS_AROUND_A_MOVE: u64 = 20;

/// Waits until the caller has had `n` calls answered (30 s at most).
async fn answered_at_least(count: &AtomicU64, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent stopped answering calls"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The raw NATS round trip p50 (us) to an echo responder, measured now.
pub async fn nats_rtt_p50_us(nats: &async_nats::Client, subject: &str) -> u64 {
    let mut lat = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let ok = crate::bus::request(
            nats,
            subject.to_string(),
            None,
            bytes::Bytes::from_static(b"{}"),
            Duration::from_secs(2),
        )
        .await
        .is_ok();
        if ok {
            lat.push(t.elapsed().as_micros() as u64);
        }
    }
    lat.sort_unstable();
    lat.get(lat.len() / 2).copied().unwrap_or(1).max(1)
}

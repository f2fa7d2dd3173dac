//! Placement, failover, fencing, migration and drains, with nodes as OS processes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;
use warden::agent::journal::{self, JournalEntry};
use warden::client::Client;

use crate::support::{wait_for, TestCluster};

/// Spawns `n` agents named `<prefix>-<i>` concurrently, in chunks.
async fn spawn_many(c: &Client, prefix: &str, n: usize, extra: Value) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let calls = chunk.iter().map(|i| {
            let mut body = json!({"name": format!("{prefix}-{i}"), "kind": "counter"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            async move { c.call("spawn_agent", &body).await.unwrap() }
        });
        futures::future::join_all(calls).await;
    }
}

/// Every agent record, following pages; `None` if a read got no answer (a probe retries).
async fn all_agents(c: &Client) -> Option<Vec<Value>> {
    c.all_pages("list_agents", &json!({}), "agents").await.ok()
}

/// Waits until every agent runs, and returns them.
async fn all_running(c: &Client, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} agents to run"),
        Duration::from_secs(60),
        || async {
            let agents = all_agents(c).await?;
            let running = agents.iter().filter(|a| a["status"] == "running").count();
            (agents.len() == n && running == n).then_some(agents)
        },
    )
    .await
}

fn per_node(agents: &[Value]) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for a in agents {
        *m.entry(a["node"].as_u64().unwrap_or(0)).or_default() += 1;
    }
    m
}

/// A follower: faults aimed at it leave the cluster a leader.
async fn follower(tc: &TestCluster) -> u64 {
    let leader = tc.leader().await;
    (1..=3).find(|id| *id != leader).unwrap()
}

type Run = (u64, u64, i64, i64);

/// Running intervals per agent from every node's journal: (node, epoch, start, end). A run
/// left open by a SIGKILL ends at the kill (`kills`: node and time in microseconds).
fn intervals(tc: &TestCluster, kills: &[(u64, i64)]) -> BTreeMap<Uuid, Vec<Run>> {
    let mut out: BTreeMap<Uuid, Vec<Run>> = BTreeMap::new();
    let micros = |e: &JournalEntry| e.t.timestamp_micros();
    for id in 1..=3 {
        let killed_after = |from: i64| {
            kills
                .iter()
                .filter(|(n, t)| *n == id && *t >= from)
                .map(|(_, t)| *t)
                .min()
                .unwrap_or(i64::MAX)
        };
        let mut open: BTreeMap<Uuid, (u64, i64)> = BTreeMap::new();
        for e in journal::read_dir(&tc.cluster.data_dir(id)) {
            if let Some((epoch, from)) = open.remove(&e.agent) {
                let end = match e.ev.as_str() {
                    "start" => killed_after(from).min(micros(&e)),
                    _ => e.until.map_or(micros(&e), |u| u.timestamp_micros()),
                };
                out.entry(e.agent).or_default().push((id, epoch, from, end));
            }
            if e.ev == "start" {
                open.insert(e.agent, (e.epoch, micros(&e)));
            }
        }
        for (agent, (epoch, from)) in open {
            let end = killed_after(from);
            out.entry(agent).or_default().push((id, epoch, from, end));
        }
    }
    out
}

/// Asserts that no agent ran on two nodes at once (G1), by the nodes' journals.
fn assert_at_most_one(tc: &TestCluster, kills: &[(u64, i64)]) {
    for (agent, mut runs) in intervals(tc, kills) {
        runs.sort_by_key(|r| r.2);
        for w in runs.windows(2) {
            let (a, b) = (w[0], w[1]);
            assert!(
                a.0 == b.0 || a.3 <= b.2,
                "agent {agent} ran on nodes {} (epoch {}) and {} (epoch {}) at once: {runs:?}",
                a.0,
                a.1,
                b.0,
                b.1
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_agents_spread_evenly_and_a_drain_empties_a_node() {
    let tc = TestCluster::start(3, None).await;
    spawn_many(&tc.client, "even", 300, json!({})).await;
    let agents = all_running(&tc.client, 300).await;
    let counts = per_node(&agents);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|n| (90..=110).contains(n)),
        "within 10% of even: {counts:?}"
    );

    let drained = follower(&tc).await;
    let out = tc
        .client
        .call("drain_node", &json!({"node": drained}))
        .await
        .unwrap();
    assert_eq!(out["status"], "draining");
    let agents = wait_for(
        "the drained node to be empty with everything running",
        Duration::from_secs(60),
        || async {
            let agents = all_agents(&tc.client).await?;
            let empty = agents.iter().all(|a| a["node"] != drained);
            let running = agents.iter().all(|a| a["status"] == "running");
            (empty && running).then_some(agents)
        },
    )
    .await;
    assert_eq!(agents.len(), 300);
    // Nothing new lands there while it drains; a cancelled drain takes agents again.
    let a = tc
        .client
        .call("spawn_agent", &json!({"name": "late", "kind": "echo"}))
        .await
        .unwrap();
    assert_ne!(a["node"], drained);
    let out = tc
        .client
        .call("drain_node", &json!({"node": drained, "cancel": true}))
        .await
        .unwrap();
    assert_eq!(out["status"], "up");
    let plan = tc
        .client
        .call("rebalance", &json!({"max_moves": 50, "dry_run": true}))
        .await
        .unwrap();
    let moves = plan["moves"].as_array().unwrap();
    assert!(
        moves.len() == 50 && moves.iter().all(|m| m["to"] == drained),
        "the emptied node is where a rebalance moves agents: {plan}"
    );
    assert_at_most_one(&tc, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_durable_counters_run_elsewhere_with_their_acknowledged_values() {
    let mut tc = TestCluster::start(3, None).await;
    let victim = follower(&tc).await;
    spawn_many(&tc.client, "c", 300, json!({"config": {"durable": true}})).await;
    spawn_many(
        &tc.client,
        "t",
        3,
        json!({"restart": "temporary", "placement": {"node": victim}}),
    )
    .await;
    let pinned = json!({"name": "pinned", "kind": "echo", "placement": {"node": victim}});
    tc.client.call("spawn_agent", &pinned).await.unwrap();
    let agents = all_running(&tc.client, 304).await;
    let on_victim: Vec<String> = agents
        .iter()
        .filter(|a| a["node"] == victim && a["kind"] == "counter" && a["restart"] == "permanent")
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert!(on_victim.len() >= 90, "{}", on_victim.len());
    // Acknowledged increments on every counter of the victim.
    let mut acked = BTreeMap::new();
    for (i, name) in on_victim.iter().enumerate() {
        let n = (i % 7 + 1) as u64;
        let v = tc
            .client
            .call_agent(name, &json!({"op": "add", "n": n}))
            .await
            .unwrap();
        acked.insert(name.clone(), v["value"].as_u64().unwrap());
    }
    tc.cluster.kill(victim).await;
    let kills = [(victim, chrono::Utc::now().timestamp_micros())];
    let agents = wait_for(
        "the victim's permanent agents to run elsewhere",
        Duration::from_secs(30),
        || async {
            let agents = all_agents(&tc.client).await?;
            let moved = agents
                .iter()
                .filter(|a| acked.contains_key(a["name"].as_str().unwrap_or("")))
                .all(|a| a["status"] == "running" && a["node"] != victim);
            moved.then_some(agents)
        },
    )
    .await;
    for name in acked.keys() {
        let a = agents.iter().find(|a| a["name"] == name.as_str()).unwrap();
        assert!(a["epoch"].as_u64().unwrap() >= 2, "a new epoch: {a}");
    }
    for (name, value) in &acked {
        let v = tc
            .client
            .call_agent(name, &json!({"op": "get"}))
            .await
            .unwrap();
        assert!(
            v["value"].as_u64().unwrap() >= *value,
            "{name} is {v}, below its acknowledged {value}"
        );
    }
    let names: Vec<&str> = agents.iter().filter_map(|a| a["name"].as_str()).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("t-")),
        "temporary agents are not brought back"
    );
    let p = agents.iter().find(|a| a["name"] == "pinned").unwrap();
    assert_eq!(
        (p["status"].as_str(), p["node"].as_u64()),
        (Some("pending"), None)
    );
    assert!(
        p["pending_reason"]
            .as_str()
            .unwrap()
            .contains("pinned to node"),
        "a clear status: {p}"
    );
    let status = tc.status().await;
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == victim)
        .unwrap();
    assert_eq!(node["status"], "down");
    // The node comes back: the pinned agent runs there again.
    tc.cluster.start_node(victim, false).await.unwrap();
    wait_for(
        "the pinned agent to run on its node",
        Duration::from_secs(30),
        || async {
            let a = tc
                .client
                .call("get_agent", &json!({"agent": "pinned"}))
                .await
                .ok()?;
            (a["status"] == "running" && a["node"] == victim).then_some(())
        },
    )
    .await;
    assert_at_most_one(&tc, &kills);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_s_agents_run_elsewhere_and_it_does_not_run_them_after_it_resumes() {
    let tc = TestCluster::start(3, None).await;
    let victim = follower(&tc).await;
    spawn_many(&tc.client, "p", 30, json!({"config": {"durable": true}})).await;
    let agents = all_running(&tc.client, 30).await;
    let moved: Vec<String> = agents
        .iter()
        .filter(|a| a["node"] == victim)
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!moved.is_empty());
    let pid = tc.cluster.pid(victim).unwrap();
    warden::up::signal(pid, libc::SIGSTOP);
    wait_for(
        "the paused node's agents to run elsewhere",
        Duration::from_secs(30),
        || async {
            let agents = all_agents(&tc.client).await?;
            agents
                .iter()
                .filter(|a| moved.contains(&a["name"].as_str().unwrap_or("").to_string()))
                .all(|a| a["status"] == "running" && a["node"] != victim)
                .then_some(())
        },
    )
    .await;
    warden::up::signal(pid, libc::SIGCONT);
    // Proof that the resumed node holds a lease and has reconciled since: a new agent pinned
    // to it runs there.
    let body = json!({"name": "after", "kind": "echo", "placement": {"node": victim}});
    wait_for(
        "the resumed node to be up",
        Duration::from_secs(30),
        || async { tc.client.call("spawn_agent", &body).await.ok() },
    )
    .await;
    wait_for(
        "a new agent to run on the resumed node",
        Duration::from_secs(30),
        || async {
            let a = tc
                .client
                .call("get_agent", &json!({"agent": "after"}))
                .await
                .ok()?;
            (a["status"] == "running").then_some(())
        },
    )
    .await;
    let h = tc.via(victim).call("health", &json!({})).await.unwrap();
    assert_eq!(h["running_agents"], 1, "only the new agent runs there: {h}");
    assert_at_most_one(&tc, &[]);
    // Every instance the paused node ran was cut off by its lease, not by the resume.
    let fenced = journal::read_dir(&tc.cluster.data_dir(victim))
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("lease lost"))
        .count();
    assert_eq!(fenced, moved.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_keeps_state_and_calls_during_it_all_land_once() {
    let tc = TestCluster::start(3, None).await;
    let c = &tc.client;
    let spawn = json!({"name": "m", "kind": "counter", "config": {"durable": true}});
    let a = c.call("spawn_agent", &spawn).await.unwrap();
    let first = a["node"].as_u64().unwrap();
    crate::support::wait_agent(c, "m", "m to run", |a| a["status"] == "running").await;
    // A steady stream of increments while the agent moves twice.
    let adder = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            let mut last = 0;
            for _ in 0..200 {
                let v = c
                    .call_agent("m", &json!({"op": "add", "n": 1}))
                    .await
                    .unwrap();
                let value = v["value"].as_u64().unwrap();
                assert!(
                    value > last,
                    "the counter never goes back: {value} after {last}"
                );
                last = value;
                acked += 1;
            }
            acked
        })
    };
    let mut on = first;
    for _ in 0..2 {
        crate::support::wait_agent(c, "m", "m to run", |a| a["status"] == "running").await;
        let out = c
            .call("migrate_agent", &json!({"agent": "m"}))
            .await
            .unwrap();
        assert_eq!(out["from"], on);
        let to = out["to"].as_u64().unwrap();
        assert_ne!(to, on);
        crate::support::wait_agent(c, "m", "m to run on its target", |a| {
            a["status"] == "running" && a["node"] == to
        })
        .await;
        on = to;
    }
    let acked = adder.await.unwrap();
    let v = c.call_agent("m", &json!({"op": "get"})).await.unwrap();
    assert_eq!(
        v["value"], acked,
        "every acknowledged increment, exactly once"
    );
    let a = c.call("get_agent", &json!({"agent": "m"})).await.unwrap();
    assert_eq!(a["epoch"], 3, "one epoch per placement");
    let err = c
        .call("migrate_agent", &json!({"agent": "m", "to": on}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already runs"), "{err}");
    assert_at_most_one(&tc, &[]);
}

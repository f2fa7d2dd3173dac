//! Bulk load sized for CI (issue 17): tens of thousands of agents in large groups on a debug
//! build, with the guarantees that load alone must not break.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::support::{wait_for, TestCluster};

/// Goal: a bulk spawn of 50,000 agents in groups of 10,000 (two at a time) causes no election,
/// no node turning suspect or down and no lost lease; the groups spread over the three nodes;
/// stopping one group of 10,000 publishes every `stopped` event it owes, again without an
/// election; and a follower SIGKILLed afterwards, which misses what the leader has since
/// compacted into a snapshot, catches up from that snapshot.
#[tokio::test]
async fn a_bulk_spawn_of_50_000_agents_causes_no_election_and_no_lost_lease() {
    // A snapshot every 100 entries, and no byte of log kept behind it (though 1,000 entries
    // may be, by count): a follower that misses anything a snapshot covers needs the snapshot.
    let config = "[raft]\nsnapshot_after_entries = 100\nkeep_bytes_after_snapshot = 1\n";
    let mut tc = TestCluster::start(3, Some(config)).await;
    let c = tc.client.clone();
    let mut watch = c
        .nats
        .subscribe(c.subjects.event_filter("node.*.*"))
        .await
        .unwrap();
    c.nats.flush().await.unwrap();
    let before = tc.status().await;
    let (groups, size) = (5, 10_000);
    let mut spawns = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(2));
    for g in 0..groups {
        let (c, sem) = (c.clone(), sem.clone());
        spawns.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let body = json!({"name": format!("bulk-{g}"), "count": size,
                              "template": {"kind": "echo", "tags": ["bulk"]},
                              "request_id": format!("bulk-{g}")});
            c.call("spawn_agent_group", &body).await
        });
    }
    while let Some(r) = spawns.join_next().await {
        let answer = r.unwrap().unwrap();
        assert_eq!(
            answer["agents"].as_array().map(Vec::len),
            Some(size as usize)
        );
    }
    let all = groups * size;
    wait_for("every agent to run", Duration::from_secs(180), || {
        let c = c.clone();
        async move {
            let q = json!({"tag": "bulk", "status": "running", "count": true});
            let n = c.call("find_agents", &q).await.ok()?["count"].as_u64()?;
            (n == all).then_some(())
        }
    })
    .await;
    for id in 1..=3 {
        let q = json!({"node": id, "count": true});
        let n = c.call("find_agents", &q).await.unwrap()["count"]
            .as_u64()
            .unwrap();
        assert!(
            n >= size,
            "node {id} holds {n} agents: the groups spread over every node"
        );
    }

    // A bulk stop: one entry, applied in steps, owing one event per record.
    let mut stopped = c
        .nats
        .subscribe(c.subjects.event_filter("*.*.stopped"))
        .await
        .unwrap();
    c.nats.flush().await.unwrap();
    let body = json!({"name": "bulk-0", "request_id": "stop-bulk-0"});
    let answer = c.call("stop_supervisor", &body).await.unwrap();
    assert_eq!(answer["stopped_count"].as_u64(), Some(size + 1), "{answer}");
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < size as usize + 1 {
        let msg = tokio::time::timeout_at(deadline, stopped.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {} stopped events", seen.len(), size + 1))
            .unwrap();
        seen.insert(msg.subject.to_string());
    }
    let supervisor = c.subjects.event("supervisor", "bulk-0", "stopped");
    assert!(seen.contains(&supervisor), "the supervisor's own event");
    let all = all - size;
    let q = json!({"tag": "bulk", "count": true});
    let n = c.call("find_agents", &q).await.unwrap()["count"].as_u64();
    assert_eq!(n, Some(all), "the group is gone");

    let after = tc.status().await;
    assert_eq!(after["term"], before["term"], "no election under load");
    assert_eq!(after["leader"], before["leader"]);
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), watch.next()).await {
        let subject = msg.subject.to_string();
        assert!(
            !subject.ends_with(".suspect") && !subject.ends_with(".down"),
            "no node may turn suspect or down under load alone: {subject}"
        );
    }
    for id in 1..=3 {
        let log = std::fs::read_to_string(tc.cluster.dir.join(format!("node-{id}.log")))
            .unwrap_or_default();
        // On failure, what the node logged around it says why.
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(40)
            .collect();
        assert!(
            !log.contains("lost the lease"),
            "node {id} lost its lease under load alone:\n{}",
            warnings.join("\n")
        );
    }

    let leader = after["leader"].as_u64().unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let had = tc.via(follower).call("health", &json!({})).await.unwrap()["last_applied"]
        .as_u64()
        .unwrap();
    tc.cluster.kill(follower).await;
    // Enough writes for the leader to compact past everything the follower has.
    for i in 0..120 {
        let body = json!({"name": format!("later-{i}"), "request_id": format!("later-{i}")});
        c.call("create_supervisor", &body).await.unwrap();
    }
    let via = tc.via(leader);
    let compacted = wait_for("the leader to compact", Duration::from_secs(60), || {
        let via = via.clone();
        async move {
            let h = via.call("health", &json!({})).await.ok()?;
            h["snapshot_index"].as_u64().filter(|i| *i > had + 2)
        }
    })
    .await;
    tc.cluster.start_node(follower, false).await.unwrap();
    let target = tc.status().await["applied_index"].as_u64().unwrap();
    // A debug build decodes and indexes 50,000 agents from the snapshot: 10 to 30 s here.
    let via = tc.via(follower);
    wait_for("the follower to catch up", Duration::from_secs(120), || {
        let via = via.clone();
        async move {
            let h = via.call("health", &json!({})).await.ok()?;
            (h["last_applied"].as_u64()? >= target).then_some(())
        }
    })
    .await;
    let h = tc.via(follower).call("health", &json!({})).await.unwrap();
    assert!(
        h["snapshot_index"].as_u64().unwrap_or(0) >= compacted,
        "the follower caught up from the leader's snapshot at {compacted}: {h}"
    );
    let q = json!({"tag": "bulk", "count": true});
    let n = tc.via(follower).call("find_agents", &q).await;
    assert_eq!(
        n.unwrap()["count"].as_u64(),
        Some(all),
        "the follower knows every agent"
    );
}

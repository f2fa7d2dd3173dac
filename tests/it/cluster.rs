//! Cluster behaviour with nodes as separate OS processes: formation, forwarding, leader crash,
//! catch-up, full restart, learners, leaving, snapshots.

use std::time::Duration;

use serde_json::json;

use crate::support::{supervisor_names, wait_for, TestCluster};

async fn create_many(c: &warden::client::Client, prefix: &str, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        let body = json!({"name": name, "request_id": format!("rid-{name}")});
        c.call("create_supervisor", &body)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        names.push(name);
    }
    names
}

/// SIGKILLs nodes 1 to 3 together, starts them again and waits until all are up.
async fn kill_and_restart_all(tc: &mut TestCluster) {
    for id in 1..=3 {
        tc.cluster.kill(id).await;
    }
    for id in 1..=3 {
        tc.cluster.start_node(id, false).await.unwrap();
    }
    tc.cluster
        .wait_ready(&tc.client, 3, Duration::from_secs(30))
        .await
        .unwrap();
}

/// Goal: three nodes form a cluster; a write sent to any follower is forwarded, committed and
/// visible through every node, and its reply names the leader.
/// Method: address each node's own subject for writes, then read through each node.
#[tokio::test]
async fn three_nodes_form_a_cluster_and_followers_forward_writes() {
    let tc = TestCluster::start(3, None).await;
    let status = tc.status().await;
    let roles: Vec<_> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].clone())
        .collect();
    assert_eq!(roles, [json!("voter"), json!("voter"), json!("voter")]);
    let leader = status["leader"].as_u64().unwrap();
    for id in (1..=3).filter(|id| *id != leader) {
        // A client of its own, to see what this follower's reply says about the leader.
        let c = warden::client::Client {
            leader: Default::default(),
            ..tc.via(id)
        };
        assert_eq!(c.known_leader(), None);
        c.call("create_supervisor", &json!({"name": format!("via-{id}")}))
            .await
            .unwrap();
        assert_eq!(
            c.known_leader(),
            Some(leader),
            "node {id}'s reply names the leader (Warden-Leader)"
        );
    }
    for id in 1..=3 {
        let names = supervisor_names(&tc.via(id)).await;
        assert_eq!(
            names.len(),
            3,
            "node {id} sees both writes and root: {names:?}"
        );
    }
}

/// Goal: SIGKILL of the leader elects a new one, writes continue, and the killed node, once
/// restarted, catches up with everything it missed.
#[tokio::test]
async fn leader_crash_elects_a_new_leader_and_the_restarted_node_catches_up() {
    let mut tc = TestCluster::start(3, None).await;
    let mut written = create_many(&tc.client, "before", 10).await;
    let old = tc.leader().await;
    tc.cluster.kill(old).await;
    let new = wait_for("a new leader", Duration::from_secs(20), || {
        let c = tc.client.clone();
        async move {
            let s = c.call("cluster_status", &json!({})).await.ok()?;
            s["leader"].as_u64().filter(|l| *l != old)
        }
    })
    .await;
    assert_ne!(new, old);
    written.extend(create_many(&tc.client, "after", 10).await);

    tc.cluster.start_node(old, false).await.unwrap();
    let commit = tc.status().await["applied_index"].as_u64().unwrap();
    tc.wait_applied(old, commit).await;
    let mut expected = written.clone();
    expected.push("root".into());
    expected.sort();
    assert_eq!(supervisor_names(&tc.via(old)).await, expected);
}

/// Goal: G2, every acknowledged write survives a crash of all nodes at once.
/// Method: concurrent writers, SIGKILL of every node (no clean shutdown), restart, read.
#[tokio::test]
async fn every_acknowledged_write_survives_a_crash_of_all_nodes() {
    let mut tc = TestCluster::start(3, None).await;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let c = tc.client.clone();
        tasks.spawn(async move { create_many(&c, &format!("w{w}"), 15).await });
    }
    let mut acked = vec!["root".to_string()];
    while let Some(names) = tasks.join_next().await {
        acked.extend(names.unwrap());
    }
    acked.sort();
    kill_and_restart_all(&mut tc).await;
    assert_eq!(supervisor_names(&tc.client).await, acked);

    // A clean stop (SIGTERM) exits with success and is a restart, not a departure.
    assert!(
        tc.cluster.stop(2, Duration::from_secs(10)).await,
        "clean exit on SIGTERM"
    );
    tc.cluster.start_node(2, false).await.unwrap();
    tc.cluster
        .wait_ready(&tc.client, 3, Duration::from_secs(30))
        .await
        .unwrap();
    let status = tc.status().await;
    assert_eq!(status["nodes"][1]["role"], "voter");
}

/// Goal: with voters_max 3 a fourth node joins as a learner; when a voter leaves for good the
/// learner is promoted, and the departed node stops by itself.
#[tokio::test]
async fn a_fourth_node_is_a_learner_and_is_promoted_when_a_voter_leaves() {
    let mut tc = TestCluster::start(3, None).await;
    tc.cluster.start_node(4, false).await.unwrap();
    tc.cluster
        .wait_ready(&tc.client, 4, Duration::from_secs(30))
        .await
        .unwrap();
    let status = tc.status().await;
    let role = |s: &serde_json::Value, id: u64| {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap()["role"]
            .clone()
    };
    assert_eq!(role(&status, 4), "learner");

    let leader = status["leader"].as_u64().unwrap();
    let leaving = (1..=3).find(|id| *id != leader).unwrap();
    let out = tc
        .client
        .call("leave", &json!({"node_id": leaving}))
        .await
        .unwrap();
    assert_eq!(out["status"], "left");
    let status = wait_for("the learner's promotion", Duration::from_secs(20), || {
        let c = tc.client.clone();
        async move {
            let s = c.call("cluster_status", &json!({})).await.ok()?;
            let promoted = s["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["id"] == 4 && n["role"] == "voter");
            promoted.then_some(s)
        }
    })
    .await;
    let departed = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == leaving)
        .unwrap();
    assert_eq!(departed["status"], "left");
    assert!(departed["role"].is_null());
    let mut child = tc.cluster.nodes.remove(&leaving).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    assert!(
        matches!(exit, Ok(Ok(s)) if s.success()),
        "the departed node exits cleanly: {exit:?}"
    );
    // Writes still work with the new voter set.
    tc.client
        .call("create_supervisor", &json!({"name": "after-leave"}))
        .await
        .unwrap();
}

/// Goal: the log is compacted through snapshots, nodes killed after compacting come back with
/// every acknowledged write (snapshot plus log), and a node that joins late is brought up to
/// date with a snapshot sent in chunks below NATS max_payload.
#[tokio::test]
async fn a_late_node_catches_up_from_a_chunked_snapshot() {
    let config = "[raft]\nsnapshot_after_entries = 20\nkeep_entries_after_snapshot = 2\nsnapshot_chunk_bytes = 1024\n";
    let mut tc = TestCluster::start(3, Some(config)).await;
    let written = create_many(&tc.client, "snap", 80).await;
    let leader = tc.leader().await;
    let health = tc.via(leader).call("health", &json!({})).await.unwrap();
    assert!(
        health["snapshot_index"].as_u64().unwrap() > 20,
        "the leader compacted: {health}"
    );
    // Every node killed and restarted: each resumes from its last snapshot plus its log.
    kill_and_restart_all(&mut tc).await;
    let names = supervisor_names(&tc.client).await;
    let missing: Vec<_> = written.iter().filter(|w| !names.contains(w)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes lost: {missing:?}; status {}",
        tc.status().await
    );

    tc.cluster.start_node(4, false).await.unwrap();
    tc.cluster
        .wait_ready(&tc.client, 4, Duration::from_secs(30))
        .await
        .unwrap();
    let commit = tc.status().await["applied_index"].as_u64().unwrap();
    tc.wait_applied(4, commit).await;
    let h4 = tc.via(4).call("health", &json!({})).await.unwrap();
    assert!(
        h4["snapshot_index"].is_u64(),
        "node 4 installed a snapshot: {h4}"
    );
    let names = supervisor_names(&tc.client).await;
    assert!(written.iter().all(|w| names.contains(w)));
}

/// Goal: a node stops cleanly within its stop timeout (5 s by default) of SIGTERM even when its
/// NATS server is gone (its last flush would wait for the server forever).
#[tokio::test]
async fn a_node_stops_on_sigterm_within_5_s_even_when_nats_is_gone() {
    let mut tc = TestCluster::start(1, None).await;
    tc.nats.server.kill().await;
    assert!(
        tc.cluster.stop(1, Duration::from_secs(5)).await,
        "the node exits by itself, with success, within 5 s"
    );
}

/// Goal: a node that is still starting (its NATS server is not there) stops within 5 s of
/// SIGTERM, with success, instead of waiting for NATS forever.
#[tokio::test]
async fn a_node_stops_on_sigterm_during_start_up() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cluster = warden::up::LocalCluster::new(
        env!("CARGO_BIN_EXE_warden").into(),
        dir.path().join("nodes"),
        format!("nats://127.0.0.1:{port}"),
        crate::support::CLUSTER,
    );
    cluster.start_node(1, true).await.unwrap();
    let log = dir.path().join("nodes").join("node-1.log");
    wait_for("the node to be starting", Duration::from_secs(20), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(log).ok()?;
            text.contains("connecting to NATS").then_some(())
        }
    })
    .await;
    assert!(
        cluster.stop(1, Duration::from_secs(5)).await,
        "the node exits by itself, with success, within 5 s"
    );
}

/// Goal: a node whose Raft log cannot be written stops heartbeating and exits non-zero within
/// a second, and its agents run elsewhere.
/// Method: node 3 runs with the log-write failpoint (debug builds); the trigger file is made,
/// then a write through node 1 makes node 3 append.
#[tokio::test]
async fn a_node_whose_log_store_fails_exits_at_once_and_its_agents_move() {
    let victim = 3;
    let mut trigger = std::path::PathBuf::new();
    let mut tc = TestCluster::start_tweaked(3, None, |cluster, dir| {
        trigger = dir.join("node-3-disk-fails");
        let var = warden::faults::LOG_WRITES_ENV.to_string();
        let value = trigger.to_string_lossy().into_owned();
        cluster.node_env.insert(victim, vec![(var, value)]);
    })
    .await;
    let c = tc.via(1);
    for i in 0..9 {
        let body = json!({"name": format!("w{i}"), "kind": "counter"});
        c.call("spawn_agent", &body).await.unwrap();
    }
    let on_victim: Vec<String> = wait_for("every agent to run", Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            let v = c.call("list_agents", &json!({})).await.ok()?;
            let agents = v["agents"].as_array()?.clone();
            let all_running = agents.len() == 9 && agents.iter().all(|a| a["status"] == "running");
            all_running.then(|| {
                agents
                    .iter()
                    .filter(|a| a["node"] == victim)
                    .map(|a| a["name"].as_str().unwrap().to_string())
                    .collect()
            })
        }
    })
    .await;
    assert!(
        !on_victim.is_empty(),
        "placement spreads agents over all nodes"
    );

    std::fs::write(&trigger, b"").unwrap();
    let began = std::time::Instant::now();
    c.call("create_supervisor", &json!({"name": "after-the-fault"}))
        .await
        .unwrap();
    let status = tc
        .cluster
        .wait_exit(
            victim,
            Duration::from_secs(1).saturating_sub(began.elapsed()),
        )
        .await
        .expect("the node exits within a second of the write it cannot log");
    assert!(!status.success(), "a fatal error exits non-zero: {status}");

    for name in on_victim {
        crate::support::wait_agent(&c, &name, "the agent to run elsewhere", |a| {
            a["status"] == "running" && a["node"] != victim
        })
        .await;
    }
}

/// Goal: a snapshot is built once the log has grown by `raft.snapshot_after_bytes`, long
/// before `snapshot_after_entries`: a few large entries do not grow the log without bound.
#[tokio::test]
async fn a_snapshot_is_built_by_log_bytes_not_only_by_entries() {
    let node = crate::support::InProcessNode::start_with(|cfg| {
        cfg.raft.snapshot_after_entries = 100_000;
        cfg.raft.snapshot_after_bytes = 1024 * 1024;
    })
    .await;
    let c = &node.client;
    c.call("spawn_agent", &json!({"name": "big", "kind": "echo"}))
        .await
        .unwrap();
    let before = c.call("health", &json!({})).await.unwrap();
    assert!(before["snapshot_index"].is_null(), "{before}");
    // 200 KiB of zeros, base64: six of them pass 1 MiB in a dozen entries.
    let state = "AAAA".repeat(200 * 1024 / 3);
    for _ in 0..6 {
        let body = json!({"agent": "big", "state": state});
        c.call("import_state", &body).await.unwrap();
    }
    wait_for("a snapshot by size", Duration::from_secs(20), || async {
        let h = c.call("health", &json!({})).await.ok()?;
        h["snapshot_index"].as_u64().map(|_| ())
    })
    .await;
}

/// Goal: a client cannot stop its own command from reaching the leader by sending a
/// `Warden-Forward-Hops` header: only relaying nodes' hop counts are believed.
#[tokio::test]
async fn a_clients_forward_hops_header_is_ignored() {
    let tc = TestCluster::start(3, None).await;
    let leader = tc.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let subject = warden::subjects::Subjects::new(crate::support::CLUSTER)
        .node_cmd(follower, "create_supervisor");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(warden::protocol::FORWARD_HOPS, "99");
    let req = async_nats::Request::new()
        .headers(headers)
        .payload(br#"{"name":"hopped","request_id":"h1"}"#.to_vec().into())
        .timeout(Some(Duration::from_secs(10)));
    let reply = tc.client.nats.send_request(subject, req).await.unwrap();
    let env = warden::protocol::Envelope::decode(&reply.payload).unwrap();
    let v = env.into_result().expect("the follower forwards it anyway");
    assert_eq!(v["name"], "hopped");
}

/// Goal: a `join` for a node that never answers fails after a bounded wait instead of holding
/// the membership lock: the ghost can be removed again, and a real node still joins.
#[tokio::test]
async fn a_join_for_a_node_that_never_answers_gives_up_and_frees_the_lock() {
    let mut tc = TestCluster::start(1, None).await;
    let subject = warden::subjects::Subjects::new(crate::support::CLUSTER).cmd("join");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(warden::protocol::CONTENT_TYPE, "application/json");
    let version = warden::registry::REGISTRY_VERSION;
    let body =
        format!(r#"{{"node_id": 9, "name": "ghost", "protocol_version": {version}}}"#).into_bytes();
    let started = std::time::Instant::now();
    let reply = tc
        .client
        .request(subject, headers, body.into(), Duration::from_secs(20))
        .await
        .expect("not refused by NATS")
        .expect("an answer");
    let err = warden::protocol::Envelope::decode(&reply.payload)
        .and_then(warden::protocol::Envelope::into_result)
        .expect_err("the ghost never catches up");
    assert_eq!(
        err.code,
        warden::protocol::ErrorCode::Unavailable,
        "{}",
        err.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let out = tc
        .client
        .call("leave", &json!({"node_id": 9}))
        .await
        .unwrap();
    assert_eq!(out["status"], "left");
    tc.cluster.start_node(2, false).await.unwrap();
    tc.cluster
        .wait_ready(&tc.client, 2, Duration::from_secs(30))
        .await
        .unwrap();
}

/// Goal: a result outlives the node that ran it. A job that finished on a node is recorded
/// through Raft, so `wait_agent` asked of another node answers it after that node is killed;
/// a job still working there runs again elsewhere and its wait answers once it finishes.
#[tokio::test]
async fn a_result_outlives_the_node_that_ran_it() {
    let mut tc = TestCluster::start(3, None).await;
    let c = tc.via(1);
    let later = json!({"name": "later", "kind": "job", "restart": "transient",
                       "config": {"ms": 8_000, "result": "late"}});
    c.call("spawn_agent", &later).await.unwrap();
    let victim = crate::support::wait_agent(&c, "later", "the long job to run", |a| {
        a["status"] == "running"
    })
    .await["node"]
        .as_u64()
        .unwrap();
    let done = json!({"name": "done", "kind": "job", "restart": "transient",
                      "placement": {"node": victim}, "config": {"ms": 10, "result": {"n": 7}}});
    c.call("spawn_agent", &done).await.unwrap();
    let wait = json!({"agent": "done", "timeout_ms": 20_000});
    let first = c.call("wait_agent", &wait).await.unwrap();
    assert_eq!(first["result"], json!({"n": 7}), "{first}");
    assert_eq!(first["node"], victim, "{first}");

    tc.cluster.kill(victim).await;
    let other = tc.via(if victim == 1 { 2 } else { 1 });
    let again = other.call("wait_agent", &wait).await.unwrap();
    assert_eq!(again, first, "answered after its node died");
    let late = other
        .call(
            "wait_agent",
            &json!({"agent": "later", "timeout_ms": 30_000}),
        )
        .await
        .unwrap();
    assert_eq!(late["result"], "late", "{late}");
    assert_ne!(late["node"], victim, "it finished elsewhere: {late}");
}

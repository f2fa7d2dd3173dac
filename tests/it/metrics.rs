//! Prometheus metrics: every node of a three-node cluster serves an exposition that
//! `promtool check metrics` accepts, and a scrape shows the counters move as commands come.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{call_agent, wait_for, TestCluster};

/// `GET path` over plain HTTP/1.1: the status code and the body.
pub(crate) async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the scrape answers within 10 s")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        code != 200 || head.to_lowercase().contains("text/plain; version=0.0.4"),
        "the Prometheus text format: {head}"
    );
    (code, body.to_string())
}

/// Every node's exposition.
async fn scrape_all(addrs: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for addr in addrs {
        out.push(get(addr, "/metrics").await.1);
    }
    out
}

/// The value of the sample `name{labels}` (labels exactly as exposed), if present.
pub(crate) fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}

/// Runs `promtool check metrics` on an exposition; `Err` with its output if it objects.
fn promtool(exposition: &str) -> Result<(), String> {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("promtool is not on PATH ({e}): run cluster/install-deps.sh (Debian package prometheus)")
        })?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Goal: an operator's Prometheus scrapes every node: the expositions are valid, bounded (no
/// series per agent), and the counters move with what the cluster does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_valid_metrics_that_move_with_commands() {
    let mut addrs = std::collections::BTreeMap::new();
    let snapshots = "[raft]\nsnapshot_after_entries = 10\n";
    let t = TestCluster::start_tweaked(3, Some(snapshots), |c, _| {
        let ports = warden::netfault::free_ports(3).unwrap();
        for (id, port) in (1..=3u64).zip(ports) {
            c.node_metrics.insert(id, format!("127.0.0.1:{port}"));
        }
        addrs = c.node_metrics.clone();
    })
    .await;
    let leader = t.leader().await;
    let on_leader = &addrs[&leader];
    let before = get(on_leader, "/metrics").await.1;
    for (id, addr) in &addrs {
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200, "node {id}");
        promtool(&body).unwrap_or_else(|e| panic!("node {id}'s exposition: {e}\n{body}"));
        let leads = if *id == leader { 1.0 } else { 0.0 };
        assert_eq!(
            sample(&body, "warden_raft_leader"),
            Some(leads),
            "node {id}"
        );
        assert!(sample(&body, "warden_raft_term").unwrap() >= 1.0);
        assert!(sample(&body, "warden_raft_applied_index").unwrap() >= 1.0);
        assert_eq!(
            sample(&body, "warden_registry_nodes{status=\"up\"}"),
            Some(3.0),
            "node {id}"
        );
        assert!(sample(&body, "process_resident_memory_bytes").unwrap() > 0.0);
    }

    // Commands, answered by the leader (the client follows it): some ok, one refused.
    let c = t.via(leader);
    c.call("create_supervisor", &json!({"name": "m"}))
        .await
        .unwrap();
    for i in 0..20 {
        c.call(
            "spawn_agent",
            &json!({"supervisor": "m", "name": format!("m-{i}"), "kind": "counter"}),
        )
        .await
        .unwrap();
    }
    let missing = c
        .call("get_agent", &json!({"agent": "no-such-agent"}))
        .await;
    assert!(missing.is_err());
    let status = |body: &str, s: &str| {
        sample(body, &format!("warden_registry_agents{{status=\"{s}\"}}")).unwrap_or(0.0)
    };
    let after = wait_for("the agents to run", Duration::from_secs(20), || async {
        let body = get(on_leader, "/metrics").await.1;
        (status(&body, "running") == 20.0).then_some(body)
    })
    .await;
    let count = |body: &str, command: &str, outcome: &str| {
        let series =
            format!("warden_commands_total{{command=\"{command}\",outcome=\"{outcome}\"}}");
        sample(body, &series).unwrap_or(0.0)
    };
    assert_eq!(
        count(&after, "spawn_agent", "ok") - count(&before, "spawn_agent", "ok"),
        20.0
    );
    assert_eq!(
        count(&after, "create_supervisor", "ok") - count(&before, "create_supervisor", "ok"),
        1.0
    );
    assert!(count(&after, "get_agent", "not_found") >= 1.0);
    let observed = |body: &str| {
        sample(
            body,
            "warden_command_duration_seconds_count{command=\"spawn_agent\"}",
        )
        .unwrap_or(0.0)
    };
    assert_eq!(observed(&after) - observed(&before), 20.0);
    let grants = |body: &str| sample(body, "warden_lease_grants_total").unwrap();
    assert!(grants(&after) > grants(&before), "the leader grants leases");
    promtool(&after).unwrap_or_else(|e| panic!("after commands: {e}\n{after}"));
    // No series per agent: twenty agents add none beyond the statuses and commands.
    assert!(
        !after.contains("m-1"),
        "an agent's name is in the exposition"
    );

    // Calls and a crash: counted by the node that runs the agent, and the crash and restart
    // by every node as it applies them.
    let list: Vec<String> = addrs.values().cloned().collect();
    let summed = |bodies: &[String], series: &str| -> f64 {
        bodies
            .iter()
            .map(|b| sample(b, series).unwrap_or(0.0))
            .sum()
    };
    let ok_calls = "warden_agent_calls_total{kind=\"counter\",outcome=\"ok\"}";
    let calls_before = summed(&scrape_all(&list).await, ok_calls);
    for _ in 0..5 {
        call_agent(&c, "m-3", json!({"op": "add", "n": 1}))
            .await
            .unwrap();
    }
    assert!(call_agent(&c, "m-3", json!({"op": "crash"})).await.is_err());
    let bodies = scrape_all(&list).await;
    assert_eq!(summed(&bodies, ok_calls) - calls_before, 5.0);
    let crashed = summed(
        &bodies,
        "warden_agent_calls_total{kind=\"counter\",outcome=\"crashed\"}",
    );
    assert_eq!(
        crashed, 1.0,
        "the crashing call, on the one node that runs m-3"
    );
    let event = |body: &str, e: &str| {
        let series = format!("warden_registry_events_total{{entity=\"agent\",event=\"{e}\"}}");
        sample(body, &series).unwrap_or(0.0)
    };
    let restarted = wait_for(
        "every node to apply the crash",
        Duration::from_secs(20),
        || {
            let list = list.clone();
            async move {
                let bodies = scrape_all(&list).await;
                bodies
                    .iter()
                    .all(|b| event(b, "crashed") >= 1.0 && event(b, "restarted") >= 1.0)
                    .then_some(bodies)
            }
        },
    )
    .await;
    for body in &restarted {
        assert!(event(body, "started") >= 20.0, "every first start: {body}");
        assert!(sample(body, "warden_raft_commit_index").unwrap() >= 1.0);
        assert!(
            sample(body, "warden_raft_log_flush_duration_seconds_count").unwrap() >= 1.0,
            "the log was flushed"
        );
        assert!(
            sample(body, "warden_raft_log_append_duration_seconds_count").unwrap() >= 1.0,
            "appends were timed"
        );
    }
    let leader_body = get(on_leader, "/metrics").await.1;
    for peer in addrs.keys().filter(|p| **p != leader) {
        let lag = format!("warden_raft_replication_lag_entries{{peer=\"{peer}\"}}");
        assert!(
            sample(&leader_body, &lag).is_some(),
            "the leader reports its lag to node {peer}"
        );
    }

    // A call to an agent that does not exist: the leader refuses it, and counts why.
    assert!(
        call_agent(&c, "no-such-agent", json!({"op": "add", "n": 1}))
            .await
            .is_err()
    );
    let not_found = "warden_agent_calls_refused_total{reason=\"not_found\"}";
    let body = get(on_leader, "/metrics").await.1;
    assert_eq!(sample(&body, not_found), Some(1.0), "{body}");
    // Snapshots every 10 entries (the config below): every node has built its own by now,
    // and no lease ran out.
    for body in scrape_all(&list).await {
        let built = "warden_raft_snapshots_total{how=\"built\"}";
        assert!(sample(&body, built) >= Some(1.0), "{body}");
        assert_eq!(sample(&body, "warden_lease_fences_total"), Some(0.0));
    }

    // Every node counts its own agents; together they run all twenty.
    let mut running = 0.0;
    for addr in addrs.values() {
        let body = get(addr, "/metrics").await.1;
        running += sample(&body, "warden_node_agents_running").unwrap();
    }
    assert_eq!(running, 20.0);

    // Only /metrics; anything else is refused and the listener keeps serving.
    assert_eq!(get(on_leader, "/other").await.0, 404);
    let mut junk = tokio::net::TcpStream::connect(on_leader).await.unwrap();
    junk.write_all(b"\x00\x01 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), junk.read_to_end(&mut sink)).await;
    assert_eq!(get(on_leader, "/metrics").await.0, 200);
}

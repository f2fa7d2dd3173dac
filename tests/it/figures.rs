//! Per-agent figures: `get_agent_metrics` from the node running the agent (also when asked
//! of another), `get_supervisor_metrics` summed over a subtree and over nodes, an `exec`
//! agent's process, `node_metrics`, and `warden ctl top --once --json`.

use std::time::Duration;

use serde_json::{json, Value};
use warden::client::Client;

use crate::metrics::{get, sample};
use crate::support::{call_agent, wait_agent, wait_for, InProcessNode, TestCluster};

async fn metrics(c: &Client, agent: &str) -> Value {
    c.call("get_agent_metrics", &json!({ "agent": agent }))
        .await
        .unwrap()
}

/// Goal: an agent's figures count its calls, errors and time, a crash shows in `restarts` and
/// `last_exit` (the figures start again with the new instance), an `exec` agent reports its
/// process's memory and CPU, a supervisor's figures sum its subtree, and `node_metrics` ranks
/// the busiest agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_figures_count_calls_errors_restarts_and_processes() {
    let port = warden::netfault::free_ports(1).unwrap()[0];
    let scrape = format!("127.0.0.1:{port}");
    let listen = scrape.clone();
    let node = InProcessNode::start_with(move |cfg| {
        cfg.metrics.listen = Some(listen);
        cfg.exec.enabled = true;
        cfg.exec.allow = vec!["/bin/sh".into()];
        cfg.exec.shim = Some(env!("CARGO_BIN_EXE_warden").into());
    })
    .await;
    let c = &node.client;
    c.call(
        "create_supervisor",
        &json!({"name": "f", "max_restarts": 100}),
    )
    .await
    .unwrap();
    c.call(
        "create_supervisor",
        &json!({"name": "g", "parent": "f", "max_restarts": 100}),
    )
    .await
    .unwrap();
    for (name, sup) in [("c1", "f"), ("c2", "g"), ("elsewhere", "root")] {
        let body = json!({"name": name, "supervisor": sup, "kind": "counter", "wait": "running"});
        c.call("spawn_agent", &body).await.unwrap();
    }
    for _ in 0..3 {
        call_agent(c, "c1", json!({"op": "add", "n": 1}))
            .await
            .unwrap();
    }
    call_agent(c, "c1", json!({"op": "nonsense"}))
        .await
        .unwrap_err();
    call_agent(c, "c2", json!({"op": "add", "n": 1}))
        .await
        .unwrap();
    call_agent(c, "elsewhere", json!({"op": "add", "n": 1}))
        .await
        .unwrap();
    let m = metrics(c, "c1").await;
    let f = &m["figures"];
    assert_eq!(m["running_here"], true, "{m}");
    assert_eq!(f["calls"], 4, "{m}");
    assert_eq!(f["errors"], 1, "{m}");
    assert_eq!(f["success_rate"], 0.75, "{m}");
    assert_eq!(f["mailbox_depth"], 0, "{m}");
    assert!(f["busy_ms"].as_f64().unwrap() > 0.0, "{m}");
    assert_eq!(m["restarts"], 0, "{m}");
    // A crash: counted as a restart, with its reason; the new instance counts from zero.
    call_agent(c, "c2", json!({"op": "crash"}))
        .await
        .unwrap_err();
    wait_agent(c, "c2", "c2 restarted", |a| {
        a["restarts"] == 1 && a["status"] == "running"
    })
    .await;
    let m = metrics(c, "c2").await;
    assert_eq!(m["restarts"], 1, "{m}");
    assert!(
        m["last_exit"].as_str().unwrap_or("").contains("crash"),
        "{m}"
    );
    assert_eq!(m["figures"]["calls"], 0, "{m}");
    // The subtree of f: c1 and c2, not `elsewhere`.
    call_agent(c, "c2", json!({"op": "add", "n": 1}))
        .await
        .unwrap();
    let s = c
        .call("get_supervisor_metrics", &json!({"name": "f"}))
        .await
        .unwrap();
    assert_eq!(s["agents_running"], 2, "{s}");
    assert_eq!(s["calls"], 5, "{s}");
    assert_eq!(s["errors"], 1, "{s}");
    assert_eq!(s["nodes_missing"], json!([]), "{s}");
    // An exec agent's process.
    let body = json!({"name": "proc", "supervisor": "root", "kind": "exec", "wait": "running",
                      "config": {"command": "/bin/sh", "args": ["-c", "sleep 60"]}});
    c.call("spawn_agent", &body).await.unwrap();
    let m = wait_for("the process's figures", Duration::from_secs(10), || async {
        let m = metrics(c, "proc").await;
        (m["figures"]["process"]["rss_bytes"].as_u64()? > 0).then_some(m)
    })
    .await;
    assert!(
        m["figures"]["process"]["cpu_seconds"].as_f64().is_some(),
        "{m}"
    );
    // The node's metrics count its exec processes (as of the host's last pass).
    let exposition = wait_for("the exec series", Duration::from_secs(10), || async {
        let body = get(&scrape, "/metrics").await.1;
        (sample(&body, "warden_exec_processes") == Some(1.0)).then_some(body)
    })
    .await;
    assert!(
        sample(&exposition, "warden_exec_resident_memory_bytes") > Some(0.0),
        "{exposition}"
    );
    // The busiest first, by time in calls.
    let n = c.call("node_metrics", &json!({"top": 2})).await.unwrap();
    let busiest = n["busiest"].as_array().unwrap();
    assert_eq!(busiest.len(), 2, "{n}");
    let busy = |a: &Value| a["busy_ms"].as_f64().unwrap();
    assert!(busy(&busiest[0]) >= busy(&busiest[1]), "{n}");
    let all = c.call("node_metrics", &json!({"top": 100})).await.unwrap();
    let least = all["busiest"]
        .as_array()
        .unwrap()
        .iter()
        .map(busy)
        .fold(f64::MAX, f64::min);
    assert!(busy(&busiest[1]) >= least, "{n} {all}");
    assert_eq!(n["agents"]["agents_running"], 4, "{n}");
    assert!(n["rss_bytes"].as_u64().unwrap() > 0, "{n}");
    // Bad input says why and changes nothing.
    for (command, body) in [
        ("get_agent_metrics", json!({"agent": "nobody"})),
        ("get_supervisor_metrics", json!({"name": "nobody"})),
        ("node_metrics", json!({"top": 1000})),
        ("get_agent_metrics", json!({})),
    ] {
        assert!(c.call(command, &body).await.is_err(), "{command} {body}");
    }
}

/// Goal: in a cluster, any node answers an agent's figures (from the node that runs it) and
/// a supervisor's sums over every node; `warden ctl top --once --json` shows every node and
/// the busiest agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_come_from_the_nodes_that_run_the_agents() {
    let tc = TestCluster::start(3, None).await;
    let c = &tc.client;
    c.call(
        "create_supervisor",
        &json!({"name": "w", "placement": "spread"}),
    )
    .await
    .unwrap();
    for i in 0..6 {
        let body = json!({"name": format!("w{i}"), "supervisor": "w", "kind": "counter",
                          "wait": "running"});
        c.call("spawn_agent", &body).await.unwrap();
        call_agent(c, &format!("w{i}"), json!({"op": "add", "n": 1}))
            .await
            .unwrap();
    }
    let a = c.call("get_agent", &json!({"agent": "w0"})).await.unwrap();
    let host = a["node"].as_u64().unwrap();
    for id in 1..=3 {
        let m = metrics(&tc.via(id), "w0").await;
        assert_eq!(m["running_here"], true, "asked of node {id}: {m}");
        assert_eq!(m["node"], host, "{m}");
        assert_eq!(m["figures"]["calls"], 1, "{m}");
    }
    let s = tc
        .via(1)
        .call("get_supervisor_metrics", &json!({"name": "w"}))
        .await
        .unwrap();
    assert_eq!(s["agents_running"], 6, "{s}");
    assert_eq!(s["calls"], 6, "{s}");
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3, "{s}");
    // `ctl top`, once, as JSON.
    let out = tc.nats.ctl(&["--json", "--once", "top", "top=3"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: Value = serde_json::from_str(&text).unwrap();
    let nodes = view["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{view}");
    assert!(
        nodes
            .iter()
            .all(|n| n["metrics"]["rss_bytes"].as_u64() > Some(0)),
        "{view}"
    );
    assert_eq!(view["busiest"].as_array().unwrap().len(), 3, "{view}");
}

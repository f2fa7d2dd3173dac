//! Agents under supervision on one in-process node over a real nats-server: each strategy,
//! restart types, escalation through two levels, exec with real processes, state surviving a
//! restart through its checkpoint, and bad input to the agent commands.

use std::time::Duration;

use serde_json::{json, Value};
use warden::client::{CallError, Client};
use warden::protocol::ErrorCode;

use crate::support::{call_agent, events, wait_agent, wait_for, InProcessNode};

async fn sup(c: &Client, name: &str, parent: &str, strategy: &str, max_restarts: u32) {
    let body = json!({"name": name, "parent": parent, "strategy": strategy,
                      "max_restarts": max_restarts, "max_seconds": 60,
                      "backoff": {"initial_ms": 1, "max_ms": 5, "jitter": 0.0}});
    c.call("create_supervisor", &body).await.unwrap();
}

async fn spawn(c: &Client, name: &str, supervisor: &str, extra: Value) -> Value {
    let mut body = json!({"name": name, "supervisor": supervisor, "kind": "counter"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let a = c.call("spawn_agent", &body).await.unwrap();
    wait_agent(c, name, &format!("{name} running"), |a| {
        a["status"] == "running"
    })
    .await;
    a
}

/// Spawns with `wait: "running"` an agent whose first start fails: the reply is the start's
/// error (it contains `why`) and the agent is not kept.
async fn spawn_failing(c: &Client, mut body: Value, why: &str) {
    body["wait"] = json!("running");
    let name = body["name"].as_str().unwrap().to_string();
    match c.call("spawn_agent", &body).await {
        Err(CallError::Reply(e)) => {
            assert_eq!(e.code, ErrorCode::StartFailed, "{name}: {e}");
            assert!(e.message.contains(why), "{name}: {e}");
        }
        other => panic!("{name}: expected start_failed, got {other:?}"),
    }
    let gone = c.call("get_agent", &json!({"agent": name})).await;
    assert!(
        matches!(&gone, Err(CallError::Reply(e)) if e.code == ErrorCode::NotFound),
        "{name} must not be kept: {gone:?}"
    );
}

fn restarts(a: &Value) -> u64 {
    a["restarts"].as_u64().unwrap()
}

async fn get(c: &Client, name: &str) -> Value {
    c.call("get_agent", &json!({"agent": name})).await.unwrap()
}

async fn crash(c: &Client, name: &str) {
    let err = call_agent(c, name, json!({"op": "crash"}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal, "{err}");
}

/// Goal: a durable counter's acknowledged value survives a crash: it restarts from its
/// checkpoint, and its record counts the restart.
#[tokio::test]
async fn a_crashed_durable_counter_restarts_from_its_checkpoint() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    sup(c, "s", "root", "one_for_one", 5).await;
    spawn(c, "n", "s", json!({"config": {"durable": true}})).await;
    assert_eq!(
        call_agent(c, "n", json!({"op": "add", "n": 7}))
            .await
            .unwrap(),
        json!({"value": 7})
    );
    crash(c, "n").await;
    wait_agent(c, "n", "n restarted", |a| {
        restarts(a) == 1 && a["status"] == "running"
    })
    .await;
    assert_eq!(
        call_agent(c, "n", json!({"op": "get"})).await.unwrap(),
        json!({"value": 7})
    );
    let exported = c
        .call("export_state", &json!({"agent": "n"}))
        .await
        .unwrap();
    assert!(exported["state"].as_str().is_some_and(|s| !s.is_empty()));
}

/// Goal: one_for_one restarts only the crashed child; one_for_all restarts all of them;
/// rest_for_one restarts the crashed child and those started after it.
#[tokio::test]
async fn each_strategy_restarts_exactly_its_children() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    for (s, strategy) in [
        ("o1", "one_for_one"),
        ("oa", "one_for_all"),
        ("rf", "rest_for_one"),
    ] {
        sup(c, s, "root", strategy, 10).await;
        for i in 1..=3 {
            spawn(c, &format!("{s}-{i}"), s, json!({})).await;
        }
        crash(c, &format!("{s}-2")).await;
        wait_agent(c, &format!("{s}-2"), "the crashed child restarted", |a| {
            restarts(a) == 1 && a["status"] == "running"
        })
        .await;
    }
    // Wait for the siblings' restarts to be recorded too, then compare exactly.
    let expect = [("oa-1", 1), ("oa-3", 1), ("rf-3", 1)];
    for (name, n) in expect {
        wait_agent(c, name, &format!("{name} restarted"), |a| {
            restarts(a) == n && a["status"] == "running"
        })
        .await;
    }
    for (name, n) in [("o1-1", 0), ("o1-3", 0), ("rf-1", 0)] {
        assert_eq!(
            restarts(&get(c, name).await),
            n,
            "{name} must not have been restarted"
        );
    }
}

/// Goal: a temporary child is never restarted (and is forgotten); a transient one is
/// restarted after a crash but not after a normal exit.
#[tokio::test]
async fn temporary_and_transient_children_follow_otp() {
    let node = node_with_exec().await;
    let c = &node.client;
    sup(c, "s", "root", "one_for_all", 10).await;
    spawn(c, "keep", "s", json!({})).await;
    spawn(c, "tmp", "s", json!({"restart": "temporary"})).await;
    crash(c, "tmp").await;
    wait_for(
        "the temporary child to be forgotten",
        Duration::from_secs(10),
        || async { c.call("get_agent", &json!({"agent": "tmp"})).await.err() },
    )
    .await;
    assert_eq!(
        restarts(&get(c, "keep").await),
        0,
        "no strategy applies to a temporary exit"
    );

    c.call("restart_agent", &json!({"agent": "keep"}))
        .await
        .unwrap();
    wait_agent(c, "keep", "restart_agent to restart it", |a| {
        restarts(a) == 1 && a["status"] == "running"
    })
    .await;

    spawn(c, "tr", "s", json!({"restart": "transient"})).await;
    crash(c, "tr").await;
    wait_agent(c, "tr", "transient restarted after a crash", |a| {
        restarts(a) == 1 && a["status"] == "running"
    })
    .await;

    let ok = json!({"name": "done", "supervisor": "s", "kind": "exec", "restart": "transient",
                    "config": {"command": "/bin/sh", "args": ["-c", "exit 0"]}});
    c.call("spawn_agent", &ok).await.unwrap();
    let a = wait_agent(c, "done", "a transient exit 0 to stay stopped", |a| {
        a["status"] == "stopped"
    })
    .await;
    assert_eq!(restarts(&a), 0);
}

/// Goal: escalation climbs two levels: an inner supervisor past its intensity fails to its
/// parent, which (also at zero intensity) fails to its own parent, which restarts the subtree.
#[tokio::test]
async fn escalation_climbs_two_levels_and_the_top_restarts_the_subtree() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    let mut events = events(c, "supervisor.*.escalated").await;
    sup(c, "top", "root", "one_for_all", 10).await;
    sup(c, "mid", "top", "one_for_one", 0).await;
    sup(c, "inner", "mid", "one_for_one", 0).await;
    spawn(c, "bystander", "top", json!({})).await;
    spawn(c, "leaf", "inner", json!({})).await;
    crash(c, "leaf").await;
    wait_agent(c, "leaf", "leaf restarted by top", |a| {
        restarts(a) >= 1 && a["status"] == "running"
    })
    .await;
    // top is one_for_all: restarting mid restarts the bystander too.
    wait_agent(c, "bystander", "bystander restarted", |a| {
        restarts(a) >= 1 && a["status"] == "running"
    })
    .await;
    let mut escalated = Vec::new();
    while escalated.len() < 2 {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut events),
        )
        .await
        .expect("escalated events")
        .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        escalated.push(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(escalated, ["inner", "mid"]);
}

/// Goal: exec runs a real process: output lines become log events, a non-zero exit is a
/// crash that a permanent child is restarted after, and exec stays off without config.
#[tokio::test]
async fn exec_runs_real_processes_and_reports_their_output_and_exits() {
    let node = node_with_exec().await;
    let c = &node.client;
    let mut logs = events(c, "agent.*.log").await;
    sup(c, "s", "root", "one_for_one", 10).await;
    let body = json!({"name": "job", "supervisor": "s", "kind": "exec",
                      "config": {"command": "/bin/sh", "args": ["-c", "echo hello; sleep 0.2; exit 3"]}});
    c.call("spawn_agent", &body).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut logs))
        .await
        .expect("a log event")
        .unwrap();
    let v: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["data"]["line"], "hello");
    let a = wait_agent(c, "job", "the failing process restarted", |a| {
        restarts(a) >= 1
    })
    .await;
    assert!(
        a["last_error"].as_str().unwrap().contains("status 3"),
        "{a}"
    );

    let bad = json!({"name": "evil", "kind": "exec", "config": {"command": "/bin/rm", "args": ["-rf", "/tmp/x"]}});
    spawn_failing(c, bad, "allow-list").await;
}

/// Goal: OTP's `start_child`. Under a `one_for_one` supervisor allowing one restart, a counter
/// runs; spawns whose first start fails (a command off the exec allow-list, a config the kind
/// refuses) answer the start's error with `wait: "running"`, are not kept, restart no sibling
/// and charge no intensity, however many there are; with the default wait such a spawn is
/// accepted and the agent goes away by itself with a `start_failed` event; a kind that no node
/// that is up runs is refused.
#[tokio::test]
async fn a_child_whose_first_start_fails_is_not_kept_and_costs_its_siblings_nothing() {
    let node = node_with_exec().await;
    let c = &node.client;
    let mut failed = events(c, "agent.*.start_failed").await;
    sup(c, "s", "root", "one_for_one", 1).await;
    let steady = json!({"name": "steady", "supervisor": "s", "kind": "counter",
                        "wait": "running", "timeout_ms": 10_000});
    let a = c.call("spawn_agent", &steady).await.unwrap();
    assert_eq!(a["status"], "running", "{a}");
    assert_eq!(a["started"], true, "{a}");
    let bad = |name: &str| {
        json!({"name": name, "supervisor": "s", "kind": "exec",
               "config": {"command": "/bin/rm", "args": ["-rf", "/tmp/x"]}})
    };
    for i in 0..3 {
        spawn_failing(c, bad(&format!("bad-{i}")), "allow-list").await;
    }
    let refused_config = json!({"name": "odd", "supervisor": "s", "kind": "counter",
                                "config": {"start": "ten"}});
    spawn_failing(c, refused_config, "counter config").await;

    // The default wait answers once placed; the agent then goes, with an event.
    let placed = c.call("spawn_agent", &bad("later")).await.unwrap();
    let id = placed["id"].as_str().unwrap().to_string();
    let event = loop {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut failed),
        )
        .await
        .expect("a start_failed event")
        .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        if v["id"] == id.as_str() {
            break v;
        }
    };
    assert!(
        event["data"]["error"]
            .as_str()
            .unwrap()
            .contains("allow-list"),
        "{event}"
    );
    wait_for(
        "the failed agent to be removed",
        Duration::from_secs(10),
        || async {
            let got = c.call("get_agent", &json!({"agent": "later"})).await;
            matches!(got, Err(CallError::Reply(e)) if e.code == ErrorCode::NotFound).then_some(())
        },
    )
    .await;

    // Nothing was charged: the counter never restarted, and its supervisor still has room
    // for one restart (past it, `s` would escalate and go).
    assert_eq!(restarts(&get(c, "steady").await), 0);
    crash(c, "steady").await;
    wait_agent(c, "steady", "steady restarted by s", |a| {
        restarts(a) == 1 && a["status"] == "running"
    })
    .await;
    let tree = c
        .call("get_supervision_tree", &json!({"name": "s"}))
        .await
        .unwrap();
    assert_eq!(tree["name"], "s", "{tree}");

    let unknown = json!({"name": "t", "kind": "teleporter", "wait": "running"});
    let err = c.call("spawn_agent", &unknown).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::BadRequest),
        "{err:?}"
    );
    let bad_wait = json!({"name": "w", "kind": "counter", "wait": "running", "timeout_ms": 0});
    let err = c.call("spawn_agent", &bad_wait).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::BadRequest),
        "{err:?}"
    );
}

/// Goal: bad input to agent commands gets a clear error and creates nothing.
#[tokio::test]
async fn bad_agent_input_gets_clear_errors() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    let cases = [
        (
            "spawn_agent",
            json!({"name": "x"}),
            ErrorCode::BadRequest,
            "missing field `kind`",
        ),
        (
            "spawn_agent",
            json!({"kind": "teleporter"}),
            ErrorCode::BadRequest,
            "no node that is up runs kind",
        ),
        (
            // exec is not enabled on this node, so no node advertises it.
            "spawn_agent",
            json!({"kind": "exec", "config": {"command": "/bin/sh"}}),
            ErrorCode::BadRequest,
            "no node that is up runs kind \"exec\"",
        ),
        (
            "spawn_agent",
            json!({"kind": "counter", "restart": "sometimes"}),
            ErrorCode::BadRequest,
            "unknown variant",
        ),
        (
            "spawn_agent",
            json!({"kind": "counter", "supervisor": "ghost"}),
            ErrorCode::NotFound,
            "ghost",
        ),
        (
            "spawn_agent",
            json!({"kind": "counter", "name": "6f9619ff-8b86-d011-b42d-00cf4fc964ff"}),
            ErrorCode::BadRequest,
            "UUID",
        ),
        (
            "spawn_agent",
            json!({"kind": "counter", "tags": ["a b"]}),
            ErrorCode::BadRequest,
            "invalid",
        ),
        (
            "stop_agent",
            json!({"agent": "nobody"}),
            ErrorCode::NotFound,
            "nobody",
        ),
        (
            "get_agent",
            json!({}),
            ErrorCode::BadRequest,
            "missing field `agent`",
        ),
        (
            "import_state",
            json!({"agent": "x", "state": "%%%"}),
            ErrorCode::BadRequest,
            "base64",
        ),
        (
            "spawn_agent_group",
            json!({"name": "g", "count": 0, "template": {"kind": "counter"}}),
            ErrorCode::BadRequest,
            "count",
        ),
        (
            "find_agents",
            json!({"limit": 5000}),
            ErrorCode::BadRequest,
            "limit",
        ),
    ];
    for (command, body, code, needle) in cases {
        let err = match c.call(command, &body).await {
            Err(warden::client::CallError::Reply(e)) => e,
            other => panic!("{command} {body}: expected an error, got {other:?}"),
        };
        assert_eq!(err.code, code, "{command}: {}", err.message);
        assert!(
            err.message.contains(needle),
            "{:?} should mention {needle:?}",
            err.message
        );
    }
    let all = c.call("list_agents", &json!({})).await.unwrap();
    assert_eq!(all["agents"], json!([]), "nothing was created");
    let err = call_agent(c, "nobody", json!({"op": "get"}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    spawn(c, "k", "root", json!({})).await;
    let err = call_agent(c, "k", json!({"op": "divide"}))
        .await
        .unwrap_err();
    assert_eq!(
        err.code,
        ErrorCode::BadRequest,
        "the agent refuses, and keeps running"
    );
    assert_eq!(restarts(&get(c, "k").await), 0);
}

/// Goal: a group is a simple_one_for_one supervisor with N children from one template, found
/// by tag and capability.
#[tokio::test]
async fn a_group_spawns_its_children_and_they_can_be_found() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    let body = json!({"name": "pool", "count": 5,
                      "template": {"kind": "echo", "tags": ["web"], "capabilities": ["http"]}});
    let out = c.call("spawn_agent_group", &body).await.unwrap();
    assert_eq!(out["agents"].as_array().unwrap().len(), 5);
    assert_eq!(out["supervisor"]["strategy"], "simple_one_for_one");
    for i in 0..5 {
        wait_agent(c, &format!("pool-{i}"), "group member running", |a| {
            a["status"] == "running"
        })
        .await;
    }
    let found = c
        .call(
            "find_agents",
            &json!({"tag": "web", "capability": "http", "status": "running"}),
        )
        .await
        .unwrap();
    assert_eq!(found["agents"].as_array().unwrap().len(), 5);
    let count = |q: serde_json::Value| async move { c.call("find_agents", &q).await.unwrap() };
    assert_eq!(
        count(json!({"tag": "web", "status": "running", "count": true, "limit": 2})).await,
        json!({"count": 5}),
        "a count ignores paging"
    );
    assert_eq!(
        count(json!({"tag": "web", "status": "failed", "count": true})).await,
        json!({"count": 0})
    );
    assert_eq!(
        call_agent(c, "pool-3", json!({"ping": 1})).await.unwrap(),
        json!({"ping": 1})
    );
    let stopped = c
        .call("stop_supervisor", &json!({"name": "pool"}))
        .await
        .unwrap();
    assert_eq!(stopped["stopped_count"], 6);
    let none = c.call("find_agents", &json!({"tag": "web"})).await.unwrap();
    assert_eq!(none["agents"], json!([]));
}

/// An in-process node that runs `exec` agents of `/bin/sh`.
async fn node_with_exec() -> InProcessNode {
    InProcessNode::start_with(|cfg| {
        cfg.exec.enabled = true;
        cfg.exec.allow = vec!["/bin/sh".into()];
        cfg.exec.shim = Some(env!("CARGO_BIN_EXE_warden").into());
    })
    .await
}

/// Spawns an `exec` agent whose shell ignores SIGTERM, so its graceful stop takes its whole
/// `shutdown_ms`, and waits until it runs.
async fn spawn_deaf(c: &Client, name: &str, supervisor: &str, shutdown_ms: u64) {
    let script = "trap '' TERM; while :; do sleep 0.1; done";
    let body = json!({"name": name, "supervisor": supervisor, "kind": "exec",
                      "shutdown_ms": shutdown_ms,
                      "config": {"command": "/bin/sh", "args": ["-c", script]}});
    c.call("spawn_agent", &body).await.unwrap();
    wait_agent(c, name, &format!("{name} running"), |a| {
        a["status"] == "running"
    })
    .await;
}

/// Latencies of calls to agent `name`, one after the other until `until(calls so far)`, sorted.
async fn call_latencies(c: &Client, name: &str, until: impl Fn(usize) -> bool) -> Vec<Duration> {
    let mut out = Vec::new();
    while !until(out.len()) {
        let began = std::time::Instant::now();
        call_agent(c, name, json!({"op": "get"})).await.unwrap();
        out.push(began.elapsed());
    }
    out.sort();
    out
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Goal: an agent whose graceful stop takes its whole `shutdown_ms` (5 s, five times the
/// lease) delays no call to another agent on the same node, and really gets its 5 s while the
/// lease is renewed: its process, which ignores SIGTERM, is killed only then.
#[tokio::test]
async fn a_slow_stop_delays_no_other_agent_and_gets_its_whole_shutdown_time() {
    let node = node_with_exec().await;
    let c = &node.client;
    sup(c, "s", "root", "one_for_one", 10).await;
    spawn(c, "quick", "s", json!({})).await;
    spawn_deaf(c, "slow", "s", 5_000).await;
    let status = call_agent(c, "slow", json!({"op": "status"}))
        .await
        .unwrap();
    let pid = status["pid"].as_u64().unwrap();
    assert!(process_alive(pid));

    let before = call_latencies(c, "quick", |n| n >= 500).await;
    c.call("stop_agent", &json!({"agent": "slow"}))
        .await
        .unwrap();
    let asked = std::time::Instant::now();
    let during = call_latencies(c, "quick", |_| {
        asked.elapsed() >= Duration::from_millis(4_000)
    })
    .await;
    assert!(
        process_alive(pid),
        "the process was cut before its 5 s: {:?} after the stop",
        asked.elapsed()
    );
    let (p99_before, p99_during) = (p99(&before), p99(&during));
    let worst = *during.last().unwrap();
    assert!(
        p99_during <= p99_before * 2,
        "p99 {p99_during:?} during the slow stop against {p99_before:?} before it"
    );
    assert!(
        worst <= Duration::from_millis(50),
        "a call took {worst:?} during the slow stop"
    );
    let gone = wait_for(
        "the process to be killed",
        Duration::from_secs(10),
        || async { (!process_alive(pid)).then(|| asked.elapsed()) },
    )
    .await;
    assert!(
        gone >= Duration::from_millis(4_900),
        "killed {gone:?} after the stop, before its shutdown_ms"
    );
}

/// One call to an agent, not retried: its answer or error code.
async fn call_once(c: &Client, agent: &str, body: Value) -> Result<Value, ErrorCode> {
    let subject = c.subjects.agent(agent, "call");
    let payload = serde_json::to_vec(&body).unwrap().into();
    let req = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(Duration::from_secs(5)));
    let reply = c.nats.send_request(subject, req).await.unwrap();
    let env = warden::protocol::Envelope::decode(&reply.payload).unwrap();
    env.into_result().map_err(|e| e.code)
}

/// Goal: one_for_all stops the siblings one after the other, last started first, and starts
/// anything again only once all have stopped, as OTP does, however long a sibling's stop
/// takes: the crashed child stays down meanwhile (nothing restarts it early because it was
/// seen stopped), and a sibling waiting for its turn still answers calls.
#[tokio::test]
async fn one_for_all_restarts_nothing_before_every_sibling_has_stopped() {
    let node = node_with_exec().await;
    let c = &node.client;
    sup(c, "all", "root", "one_for_all", 10).await;
    spawn(c, "first", "all", json!({})).await;
    spawn(c, "second", "all", json!({})).await;
    // Started last, so stopped first: it ignores SIGTERM and takes its whole 3 s, which
    // leaves a margin around the 1 s watched below on a loaded machine.
    spawn_deaf(c, "slow", "all", 3_000).await;
    crash(c, "second").await;
    let crashed = std::time::Instant::now();
    while crashed.elapsed() < Duration::from_millis(1_000) {
        let down = call_once(c, "second", json!({"op": "get"})).await;
        assert_eq!(
            down,
            Err(ErrorCode::Unavailable),
            "the crashed child answered {:?} after the crash, before its siblings stopped",
            crashed.elapsed()
        );
        let waiting = call_once(c, "first", json!({"op": "get"})).await;
        assert!(
            waiting.is_ok(),
            "a sibling waiting for its turn to stop answered {waiting:?}"
        );
    }
    for name in ["first", "second", "slow"] {
        wait_agent(c, name, &format!("{name} restarted"), |a| {
            restarts(a) == 1 && a["status"] == "running"
        })
        .await;
    }
}

/// Pids of the live `sleep` processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.starts_with("sleep\0") && cmdline.contains(marker) && process_alive(*pid)
        })
        .collect()
}

/// A number no other test run uses for its processes' command lines (this process's id).
fn unique_marker() -> u32 {
    7_000_000 + std::process::id() % 1_000_000
}

/// Spawns the exec agent `tree`: a shell that ignores SIGTERM and starts a grandchild in the
/// agent's process group and one that leaves it (`setsid`), both sleeping with the returned
/// marker in their command lines; waits until both run.
async fn spawn_tree(c: &Client, shutdown_ms: u64) -> u32 {
    let marker = unique_marker();
    let script = format!("trap '' TERM; setsid sleep {marker}1 & sleep {marker}2 & wait");
    let body = json!({"name": "tree", "kind": "exec", "shutdown_ms": shutdown_ms,
                      "config": {"command": "/bin/sh", "args": ["-c", script]}});
    c.call("spawn_agent", &body).await.unwrap();
    wait_for(
        "both grandchildren to run",
        Duration::from_secs(20),
        || async { (processes_with(&marker.to_string()).len() == 2).then_some(()) },
    )
    .await;
    marker
}

/// Goal: an exec agent's whole tree goes when it stops: grandchildren in its process group and
/// one that left it with `setsid` (adopted by the shim) are gone once the stop is done.
#[tokio::test]
async fn a_stopped_exec_agent_leaves_no_descendant() {
    let node = node_with_exec().await;
    let c = &node.client;
    let marker = spawn_tree(c, 200).await;
    c.call("stop_agent", &json!({"agent": "tree"}))
        .await
        .unwrap();
    wait_for(
        "every descendant to be gone",
        Duration::from_secs(10),
        || async { processes_with(&marker.to_string()).is_empty().then_some(()) },
    )
    .await;
}

/// Goal: an allow-list rule fixes what a request may not choose: arguments must start with its
/// prefix, the working directory is its own, its limits apply, and it runs as its user (as
/// root; elsewhere switching user is refused with a clear error).
#[tokio::test]
async fn an_allow_rule_fixes_arguments_directory_limits_and_user() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_path_buf();
    let rule = warden::agent::exec::ExecRule {
        command: "/bin/sh".into(),
        args_prefix: vec!["-c".into()],
        cwd: Some(cwd.clone()),
        uid: Some(65_534),
        gid: Some(65_534),
        rlimits: warden::agent::exec::Rlimits {
            nofile: Some(64),
            ..Default::default()
        },
        env: Vec::new(),
    };
    let node = InProcessNode::start_with(|cfg| {
        cfg.exec.enabled = true;
        cfg.exec.allow = vec![warden::agent::exec::AllowEntry::Rule(rule)];
        cfg.exec.shim = Some(env!("CARGO_BIN_EXE_warden").into());
    })
    .await;
    let c = &node.client;
    let mut logs = events(c, "agent.*.log").await;
    let spawn = |name: &str, config: Value| json!({"name": name, "kind": "exec", "config": config});
    let script = "echo \"$(pwd) $(ulimit -n) $(id -u)\"; sleep 30";
    let ruled = spawn(
        "ruled",
        json!({"command": "/bin/sh", "args": ["-c", script]}),
    );
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        spawn_failing(c, ruled, "exec").await;
    } else {
        c.call("spawn_agent", &ruled).await.unwrap();
        let msg =
            tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut logs))
                .await
                .expect("a log event")
                .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["data"]["line"], format!("{} 64 65534", cwd.display()));
    }
    for (name, config, why) in [
        (
            "no-prefix",
            json!({"command": "/bin/sh", "args": ["/etc/passwd"]}),
            "starting",
        ),
        (
            "elsewhere",
            json!({"command": "/bin/sh", "args": ["-c", "true"], "cwd": "/"}),
            "runs here only in",
        ),
        (
            "bash-env",
            json!({"command": "/bin/sh", "args": ["-c", "true"], "env": {"BASH_ENV": "/x"}}),
            "may not be given",
        ),
    ] {
        spawn_failing(c, spawn(name, config), why).await;
    }
}

/// Goal: SIGKILL of a node leaves none of its exec processes running, nor their children:
/// the shim sees its lifeline close and kills the whole tree, a grandchild that left the
/// process group included.
#[tokio::test]
async fn a_sigkilled_node_leaves_no_exec_process() {
    let config = "[exec]\nenabled = true\nallow = [\"/bin/sh\"]\n";
    let mut tc = crate::support::TestCluster::start(1, Some(config)).await;
    let c = tc.client.clone();
    spawn_deaf(&c, "orphan", "root", 5_000).await;
    wait_agent(&c, "orphan", "the exec agent to run", |a| {
        a["status"] == "running"
    })
    .await;
    let status = call_agent(&c, "orphan", json!({"op": "status"}))
        .await
        .unwrap();
    let pid = status["pid"].as_i64().unwrap();
    let marker = spawn_tree(&c, 5_000).await;
    tc.cluster.kill(1).await;
    wait_for(
        "the exec process and every descendant to die with their node",
        Duration::from_secs(10),
        || async move {
            (!process_alive(pid as u64) && processes_with(&marker.to_string()).is_empty())
                .then_some(())
        },
    )
    .await;
}

/// Goal: live changes through the NATS interface (seed 002). `update_supervisor` from
/// `one_for_one` to `one_for_all` restarts nothing by itself, and the next crash restarts
/// every sibling; `update_agent` moves an agent's tags in place, without a restart, and a new
/// config restarts it with that config.
#[tokio::test]
async fn a_supervisor_and_an_agent_change_while_they_run() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    sup(c, "s", "root", "one_for_one", 10).await;
    spawn(c, "x", "s", json!({})).await;
    spawn(c, "y", "s", json!({"tags": ["cold"]})).await;
    let out = c
        .call(
            "update_supervisor",
            &json!({"name": "s", "strategy": "one_for_all"}),
        )
        .await
        .unwrap();
    assert_eq!(out["strategy"], "one_for_all", "{out}");
    for name in ["x", "y"] {
        assert_eq!(
            restarts(&get(c, name).await),
            0,
            "the change restarts nothing"
        );
    }
    crash(c, "x").await;
    wait_agent(c, "y", "y restarted by the new one_for_all", |a| {
        restarts(a) == 1 && a["status"] == "running"
    })
    .await;

    let tagged = |tag: &'static str| async move {
        let page = c.call("find_agents", &json!({"tag": tag})).await.unwrap();
        page["agents"].as_array().unwrap().len()
    };
    c.call("update_agent", &json!({"agent": "y", "tags": ["hot"]}))
        .await
        .unwrap();
    assert_eq!((tagged("cold").await, tagged("hot").await), (0, 1));
    assert_eq!(
        restarts(&get(c, "y").await),
        1,
        "a tag change restarts nothing"
    );

    call_agent(c, "y", json!({"op": "add", "n": 2}))
        .await
        .unwrap();
    c.call(
        "update_agent",
        &json!({"agent": "y", "config": {"start": 41}}),
    )
    .await
    .unwrap();
    wait_for(
        "y to run again with its new config",
        Duration::from_secs(10),
        || async {
            let v = call_agent(c, "y", json!({"op": "get"})).await.ok()?;
            (v["value"] == 41).then_some(())
        },
    )
    .await;
    let err = c
        .call("update_agent", &json!({"agent": "y"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::BadRequest),
        "{err:?}"
    );
}

/// Goal: run to completion (seed 003). A transient `job` that finishes is done: `wait_agent`
/// answers its result, also when asked after it finished; a temporary one is forgotten but
/// still answered, failed with its error when it fails; `exec` reports its exit code and last
/// output lines; a wait on an agent that is not done runs out with `timeout`, one on an
/// unknown agent is `not_found`, and `stop_agent` ends a wait as `removed`.
#[tokio::test]
async fn agents_run_to_completion_and_their_results_are_waited_for() {
    let node = node_with_exec().await;
    let c = &node.client;
    let job = |name: &str, restart: &str, config: Value| json!({"name": name, "kind": "job", "restart": restart, "config": config});
    let wait = |agent: &'static str, ms: u64| async move {
        c.call("wait_agent", &json!({"agent": agent, "timeout_ms": ms}))
            .await
    };
    c.call(
        "spawn_agent",
        &job(
            "answer",
            "transient",
            json!({"ms": 300, "result": {"answer": 42}}),
        ),
    )
    .await
    .unwrap();
    let done = wait("answer", 10_000).await.unwrap();
    assert_eq!(done["status"], "stopped", "{done}");
    assert_eq!(done["result"], json!({"answer": 42}), "{done}");
    assert_eq!(
        wait("answer", 10).await.unwrap(),
        done,
        "asked again once done"
    );
    let a = get(c, "answer").await;
    assert_eq!((a["status"].as_str(), restarts(&a)), (Some("stopped"), 0));

    c.call(
        "spawn_agent",
        &job("once", "temporary", json!({"ms": 50, "result": "ok"})),
    )
    .await
    .unwrap();
    c.call(
        "spawn_agent",
        &job("broken", "temporary", json!({"ms": 50, "fail": "no disk"})),
    )
    .await
    .unwrap();
    let once = wait("once", 10_000).await.unwrap();
    assert_eq!(
        (once["status"].as_str(), &once["result"]),
        (Some("stopped"), &json!("ok"))
    );
    let broken = wait("broken", 10_000).await.unwrap();
    assert_eq!(broken["status"], "failed", "{broken}");
    assert_eq!(broken["error"], "no disk", "{broken}");
    wait_for(
        "the temporary jobs to be forgotten",
        Duration::from_secs(10),
        || async {
            let got = c.call("get_agent", &json!({"agent": "once"})).await;
            matches!(got, Err(CallError::Reply(e)) if e.code == ErrorCode::NotFound).then_some(())
        },
    )
    .await;
    assert_eq!(
        wait("once", 10).await.unwrap()["result"],
        "ok",
        "after it was forgotten"
    );

    let sh = json!({"name": "sh", "kind": "exec", "restart": "transient",
                    "config": {"command": "/bin/sh", "args": ["-c", "echo one; echo two"]}});
    c.call("spawn_agent", &sh).await.unwrap();
    let out = wait("sh", 10_000).await.unwrap();
    assert_eq!(
        out["result"],
        json!({"exit_code": 0, "output": ["one", "two"]}),
        "{out}"
    );

    c.call(
        "spawn_agent",
        &job("long", "transient", json!({"ms": 600_000})),
    )
    .await
    .unwrap();
    let err = wait("long", 200).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::Timeout),
        "{err:?}"
    );
    let waiting = tokio::spawn({
        let c = c.clone();
        async move {
            c.call(
                "wait_agent",
                &json!({"agent": "long", "timeout_ms": 20_000}),
            )
            .await
        }
    });
    wait_agent(c, "long", "the long job running", |a| {
        a["status"] == "running"
    })
    .await;
    c.call("stop_agent", &json!({"agent": "long"}))
        .await
        .unwrap();
    let removed = waiting.await.unwrap().unwrap();
    assert_eq!(removed["reason"], "removed", "{removed}");
    let err = wait("never-was", 1_000).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::NotFound),
        "{err:?}"
    );
}

/// Goal: templates (seed 000, seed 002). A registered spec is found by capability and text,
/// shown without its config to viewers' listings and whole by `get_template`; agents and
/// groups start from it, with overrides; a name in use is refused, a deleted template starts
/// nothing, and a spec of one's own beside a template is refused.
#[tokio::test]
async fn agents_and_groups_start_from_registered_templates() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    let worker = json!({"name": "worker", "description": "Counts things for the billing team",
                        "kind": "counter", "config": {"start": 10}, "restart": "transient",
                        "tags": ["billing"], "capabilities": ["count", "sum"],
                        "request_id": "tpl-1"});
    let t = c.call("register_template", &worker).await.unwrap();
    assert_eq!(t["config"], json!({"start": 10}), "{t}");
    assert_eq!(
        c.call("register_template", &worker).await.unwrap(),
        t,
        "a retry answers the same"
    );
    let mut again = worker.clone();
    again["request_id"] = json!("tpl-2");
    let err = c.call("register_template", &again).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::Conflict),
        "{err:?}"
    );
    for i in 0..5 {
        let other = json!({"name": format!("echo-{i}"), "kind": "echo",
                           "capabilities": ["reply"], "description": "says it back"});
        c.call("register_template", &other).await.unwrap();
    }
    let found = c
        .call("find_templates", &json!({"capability": "sum"}))
        .await
        .unwrap();
    let names: Vec<&str> = found["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["worker"]);
    assert!(found["templates"][0].get("config").is_none(), "{found}");
    let by_text = c
        .call("find_templates", &json!({"text": "BILLING"}))
        .await
        .unwrap();
    assert_eq!(by_text["templates"].as_array().unwrap().len(), 1);
    let page = c
        .call("list_templates", &json!({"limit": 4}))
        .await
        .unwrap();
    assert_eq!(page["templates"].as_array().unwrap().len(), 4);
    assert_eq!(page["next"], "echo-3", "{page}");

    let spawn = json!({"name": "w1", "template": "worker",
                       "overrides": {"tags": ["billing", "eu"], "config": {"start": 20}},
                       "wait": "running"});
    let a = c.call("spawn_agent", &spawn).await.unwrap();
    assert_eq!(
        (a["kind"].as_str(), a["restart"].as_str()),
        (Some("counter"), Some("transient"))
    );
    assert_eq!(a["tags"], json!(["billing", "eu"]), "{a}");
    assert_eq!(a["capabilities"], json!(["count", "sum"]), "{a}");
    let v = call_agent(c, "w1", json!({"op": "get"})).await.unwrap();
    assert_eq!(v["value"], 20, "the overridden config");
    let group = json!({"name": "pool", "count": 3, "template": "worker"});
    let g = c.call("spawn_agent_group", &group).await.unwrap();
    assert_eq!(g["agents"].as_array().unwrap().len(), 3, "{g}");
    wait_agent(c, "pool-2", "a group child from the template", |a| {
        a["status"] == "running"
    })
    .await;
    let v = call_agent(c, "pool-2", json!({"op": "get"})).await.unwrap();
    assert_eq!(v["value"], 10, "the template's config");

    let mixed = json!({"name": "w2", "template": "worker", "kind": "echo"});
    let err = c.call("spawn_agent", &mixed).await.unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::BadRequest),
        "{err:?}"
    );
    c.call("delete_template", &json!({"name": "worker"}))
        .await
        .unwrap();
    let err = c
        .call("spawn_agent", &json!({"name": "w3", "template": "worker"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::NotFound),
        "{err:?}"
    );
    let err = c
        .call("get_template", &json!({"name": "worker"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Reply(e) if e.code == ErrorCode::NotFound),
        "{err:?}"
    );
}

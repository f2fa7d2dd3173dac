//! The lifecycle history in JetStream: every event once and in log order across a leader
//! kill, pruning by `max_msgs` and `max_age`, the history commands, and `unavailable` without
//! JetStream while everything else works.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde_json::{json, Value};
use warden::client::{CallError, Client};
use warden::history::outbox::Pos;
use warden::history::parse_msg_id;
use warden::protocol::ErrorCode;

use crate::support::{call_agent, wait_agent, wait_for, InProcessNode, Nats, TestCluster};

/// Every message of the cluster's history stream, read as node identity `as_node` (clients
/// have no JetStream permissions): its position and body, in stream order.
async fn read_stream(nats: &Nats, as_node: &str) -> Vec<(Pos, Value)> {
    let c = nats.client(as_node).await;
    let js = jetstream::new(c.nats.clone());
    // The leader creates it when it starts leading: until then there is nothing to read.
    let Ok(stream) = js.get_stream(c.subjects.history_stream()).await else {
        return Vec::new();
    };
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .unwrap();
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    while (out.len() as u64) < pending {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let before = out.len();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            let at = parse_msg_id(&id).unwrap_or_else(|| panic!("message id {id:?}"));
            out.push((at, serde_json::from_slice(&m.payload).unwrap()));
        }
        if out.len() == before {
            break;
        }
    }
    out
}

/// Checks the stream's order and that it says nothing twice and has no gap event.
fn assert_once_in_order(events: &[(Pos, Value)]) {
    for w in events.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "out of order or twice: {} then {}",
            w[0].0,
            w[1].0
        );
    }
    for (at, e) in events {
        assert_ne!(e["event"], "gap", "a gap at {at}: {e}");
        assert_eq!(e["index"].as_u64(), Some(at.index), "{e}");
        assert_eq!(e["pos"].as_u64(), Some(at.pos as u64), "{e}");
    }
}

/// The sequence numbers the stream holds for agent `id`.
fn seqs_of(events: &[(Pos, Value)], id: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|(_, e)| e["entity"] == "agent" && e["id"] == id)
        .map(|(_, e)| e["seq"].as_u64().unwrap())
        .collect()
}

/// Waits until `agent_history` of agent `id` answers events that `done` accepts.
async fn history_until(c: &Client, id: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Value {
    wait_for(what, Duration::from_secs(30), || async {
        let h = c
            .call("agent_history", &json!({ "agent": id }))
            .await
            .ok()?;
        done(h["events"].as_array()?).then_some(h)
    })
    .await
}

async fn spawn_counter(c: &Client, name: &str) {
    let body = json!({"name": name, "supervisor": "h", "kind": "counter",
                      "request_id": format!("spawn-{name}")});
    c.call("spawn_agent", &body).await.unwrap();
}

/// Goal: kill the leader while agents start and crash; once the cluster recovered, every
/// lifecycle event of every agent is in the stream exactly once, in log order: each agent's
/// events number 1..=its registry `seq`, none twice, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_holds_every_event_once_in_order_across_a_leader_kill() {
    let mut tc = TestCluster::start(3, None).await;
    let c = tc.client.clone();
    c.call(
        "create_supervisor",
        &json!({"name": "h", "strategy": "one_for_one", "max_restarts": 1000, "max_seconds": 60,
                "backoff": {"initial_ms": 1, "max_ms": 5, "jitter": 0.0}}),
    )
    .await
    .unwrap();
    for i in 0..8 {
        spawn_counter(&c, &format!("a{i}")).await;
    }
    for i in 0..8 {
        wait_agent(&c, &format!("a{i}"), "running", |a| {
            a["status"] == "running"
        })
        .await;
    }
    // Crashes and starts while the leader dies.
    let busy = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..8 {
                let _ = call_agent(&c, &format!("a{i}"), json!({"op": "crash"})).await;
                let body = json!({"name": format!("b{i}"), "supervisor": "h", "kind": "counter",
                                  "request_id": format!("spawn-b{i}")});
                // Retried by the client across the election (same request_id).
                let _ = c.call("spawn_agent", &body).await;
            }
        })
    };
    let old = tc.leader().await;
    tc.cluster.kill(old).await;
    busy.await.unwrap();
    tc.cluster.start_node(old, false).await.unwrap();
    for i in 0..8 {
        spawn_counter(&c, &format!("c{i}")).await;
        let _ = call_agent(&c, &format!("c{i}"), json!({"op": "crash"})).await;
    }
    // Every agent's events, as the registry counts them, reach the stream.
    let listed = c
        .call("list_agents", &json!({"supervisor": "h"}))
        .await
        .unwrap();
    let agents: Vec<String> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    assert!(agents.len() >= 16, "{listed}");
    let events = wait_for(
        "the stream to hold every agent's events",
        Duration::from_secs(60),
        || {
            let (c, nats, agents) = (c.clone(), &tc.nats, agents.clone());
            async move {
                let events = read_stream(nats, "node-5").await;
                for name in &agents {
                    let a = c.call("get_agent", &json!({"agent": name})).await.ok()?;
                    let (id, seq) = (a["id"].as_str()?, a["seq"].as_u64()?);
                    if seqs_of(&events, id).last() != Some(&seq) {
                        return None;
                    }
                }
                Some(events)
            }
        },
    )
    .await;
    assert_once_in_order(&events);
    for name in &agents {
        let a = c.call("get_agent", &json!({"agent": name})).await.unwrap();
        let id = a["id"].as_str().unwrap();
        let seqs = seqs_of(&events, id);
        let want: Vec<u64> = (1..=a["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, want, "agent {name}: its events by seq");
    }
    // The same, through the command, from a node that did not publish them.
    let via = tc.via(old);
    let a0 = c.call("get_agent", &json!({"agent": "a0"})).await.unwrap();
    let h = via
        .call("agent_history", &json!({"agent": "a0", "limit": 1000}))
        .await
        .unwrap();
    let seqs: Vec<u64> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=a0["seq"].as_u64().unwrap()).collect::<Vec<_>>());
    assert!(seqs.len() >= 3, "placed, running, crashed...: {h}");
}

/// Goal: an agent's history outlives it; `limit` answers the latest, `since` from a time;
/// `supervisor_history` has the supervisor's and its agents' events; bad input is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_commands_answer_for_agents_that_are_gone() {
    let node = InProcessNode::start().await;
    let c = &node.client;
    c.call("create_supervisor", &json!({"name": "h"}))
        .await
        .unwrap();
    let spawned = c
        .call(
            "spawn_agent",
            &json!({"name": "gone", "supervisor": "h", "kind": "counter"}),
        )
        .await
        .unwrap();
    let id = spawned["id"].as_str().unwrap().to_string();
    wait_agent(c, "gone", "running", |a| a["status"] == "running").await;
    let before_stop = chrono::Utc::now();
    c.call("stop_agent", &json!({"agent": "gone"}))
        .await
        .unwrap();
    let h = history_until(c, &id, "the stopped event in the history", |events| {
        events.last().is_some_and(|e| e["event"] == "stopped")
    })
    .await;
    let all = h["events"].as_array().unwrap().clone();
    assert_eq!(all[0]["event"], "placed", "{h}");
    assert!(all.iter().all(|e| e["id"] == id.as_str()), "{h}");
    // The latest one only.
    let last = c
        .call("agent_history", &json!({"agent": id, "limit": 1}))
        .await
        .unwrap();
    assert_eq!(last["events"].as_array().unwrap().len(), 1);
    assert_eq!(last["events"][0]["event"], "stopped");
    // From a time on.
    let since = c
        .call(
            "agent_history",
            &json!({"agent": id, "since": before_stop.to_rfc3339()}),
        )
        .await
        .unwrap();
    let since = since["events"].as_array().unwrap();
    assert!(!since.is_empty() && since.len() < all.len(), "{since:?}");
    // The supervisor's: its creation and its agent's events.
    let s = c
        .call("supervisor_history", &json!({"name": "h"}))
        .await
        .unwrap();
    let s = s["events"].as_array().unwrap();
    assert_eq!(s[0]["entity"], "supervisor");
    assert_eq!(s[0]["event"], "created");
    assert!(s.iter().any(|e| e["id"] == id.as_str()));
    // A name resolves only while the agent exists; bad input says why.
    for (body, code) in [
        (json!({"agent": "gone"}), ErrorCode::NotFound),
        (json!({"agent": id, "limit": 0}), ErrorCode::BadRequest),
        (
            json!({"agent": id, "limit": 100_000}),
            ErrorCode::BadRequest,
        ),
        (json!({"agent": "a.b"}), ErrorCode::BadRequest),
        (
            json!({"agent": id, "since": "yesterday"}),
            ErrorCode::BadRequest,
        ),
    ] {
        match c.call("agent_history", &body).await {
            Err(CallError::Reply(e)) => assert_eq!(e.code, code, "{body}: {e}"),
            other => panic!("{body}: expected {code:?}, got {other:?}"),
        }
    }
}

/// Goal: the stream keeps at most `max_msgs` events, and none older than `max_age`; after
/// the stream aged out entirely, publishing resumes after what it held, without repeating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_pruned_by_count_and_by_age() {
    let node = InProcessNode::start_with(|cfg| {
        cfg.history.max_msgs = 10;
        cfg.history.max_age_s = 3;
    })
    .await;
    let c = &node.client;
    c.call("create_supervisor", &json!({"name": "h"}))
        .await
        .unwrap();
    for i in 0..12 {
        let body = json!({"name": format!("p{i}"), "supervisor": "h", "kind": "echo"});
        c.call("spawn_agent", &body).await.unwrap();
    }
    let last = c.call("get_agent", &json!({"agent": "p11"})).await.unwrap();
    let last_id = last["id"].as_str().unwrap().to_string();
    // By count: the newest ten, the last spawn's among them.
    let held = wait_for("the newest events", Duration::from_secs(20), || async {
        let events = read_stream(&node.nats, "node-2").await;
        events
            .iter()
            .any(|(_, e)| e["id"] == last_id.as_str())
            .then_some(events)
    })
    .await;
    assert!(held.len() <= 10, "{} events held", held.len());
    assert_once_in_order(&held);
    let newest = held.last().unwrap().0;
    // By age: everything goes.
    wait_for("the stream to age out", Duration::from_secs(20), || async {
        read_stream(&node.nats, "node-2")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    // New events follow what the stream held, and nothing it held comes back.
    c.call(
        "spawn_agent",
        &json!({"name": "after", "supervisor": "h", "kind": "echo"}),
    )
    .await
    .unwrap();
    let after = wait_for("the new events", Duration::from_secs(20), || async {
        let events = read_stream(&node.nats, "node-2").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert!(after.iter().all(|(at, _)| *at > newest), "{after:?}");
    assert!(after.iter().all(|(_, e)| e["id"] != last_id.as_str()));
}

/// Goal: without JetStream, the history commands answer `unavailable` saying to start
/// nats-server with JetStream, and commands and agents work as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jetstream_history_is_unavailable_and_all_else_works() {
    let node = InProcessNode::start_js(false, |_| {}).await;
    let c = &node.client;
    c.call("create_supervisor", &json!({"name": "h"}))
        .await
        .unwrap();
    c.call(
        "spawn_agent",
        &json!({"name": "e", "supervisor": "h", "kind": "echo"}),
    )
    .await
    .unwrap();
    let echoed = call_agent(c, "e", json!({"hi": 1})).await.unwrap();
    assert_eq!(echoed["hi"], 1, "{echoed}");
    let asked = std::time::Instant::now();
    match c.call("agent_history", &json!({"agent": "e"})).await {
        Err(CallError::Reply(e)) => {
            // At once: no retries until the client's deadline.
            assert!(
                asked.elapsed() < Duration::from_secs(3),
                "{:?}",
                asked.elapsed()
            );
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.message.contains("JetStream"), "{e}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    node.shutdown().await.unwrap();
}

/// Goal: history turned on for a cluster that ran (and compacted its log) without it starts
/// with a `gap` event for what came before, which the history commands return; what happens
/// from then on is all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_turned_on_late_starts_with_a_gap_readers_see() {
    let compact = "[raft]\nsnapshot_after_entries = 20\nkeep_entries_after_snapshot = 2\n";
    let off = format!("{compact}[history]\nenabled = false\n");
    let mut tc = TestCluster::start(1, Some(&off)).await;
    let c = tc.client.clone();
    c.call("create_supervisor", &json!({"name": "h"}))
        .await
        .unwrap();
    let spawned = c
        .call(
            "spawn_agent",
            &json!({"name": "early", "supervisor": "h", "kind": "counter", "wait": "running"}),
        )
        .await
        .unwrap();
    let id = spawned["id"].as_str().unwrap().to_string();
    let h = c.call("health", &json!({})).await.unwrap();
    let spawned_at = h["last_applied"].as_u64().unwrap();
    // Enough entries for a snapshot: the log before it is gone.
    for i in 0..40 {
        c.call("create_supervisor", &json!({"name": format!("pad-{i}")}))
            .await
            .unwrap();
    }
    // A snapshot past the agent's first events: the log that made them is gone.
    wait_for("a snapshot", Duration::from_secs(30), || async {
        let h = c.call("health", &json!({})).await.ok()?;
        (h["snapshot_index"].as_u64()? > spawned_at).then_some(())
    })
    .await;
    tc.cluster.kill(1).await;
    tc.cluster.config_toml = Some(compact.to_string());
    tc.cluster.start_node(1, false).await.unwrap();
    call_agent(&c, "early", json!({"op": "crash"}))
        .await
        .unwrap_err();
    // `crashed`, or `restarted` with its reason when the report says both at once.
    let h = history_until(&c, &id, "the crash in the history", |events| {
        events
            .iter()
            .any(|e| e["data"]["error"] == "asked to crash")
    })
    .await;
    let events = h["events"].as_array().unwrap();
    assert_eq!(events[0]["event"], "gap", "{h}");
    assert_eq!(events[0]["data"]["from_index"], 1, "{h}");
    assert!(
        events
            .iter()
            .all(|e| e["event"] == "gap" || e["id"] == id.as_str()),
        "{h}"
    );
}

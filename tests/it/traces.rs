//! OpenTelemetry traces: a real OTLP/HTTP receiver (`warden::traces::sink`, which decodes the
//! protobuf exports as a collector does) and three nodes as OS processes. A command a client
//! traces shows as one trace across the node that took it and the leader that applied it; an
//! agent call continues its caller's trace on the node that runs the agent; what no client
//! traces is not recorded at `sample_ratio = 0`; `warden ctl --trace` starts a trace of its own.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use warden::traces::sink::{Received, Sink};

use crate::support::{call_agent, wait_agent, wait_for, InProcessNode, TestCluster};

/// The spans of trace `trace` once `done` holds of them (the nodes export every 100 ms).
async fn trace_of(
    sink: &Sink,
    trace: &str,
    what: &str,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    wait_for(what, Duration::from_secs(20), || {
        let spans: Vec<Received> = sink
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace)
            .collect();
        let ok = done(&spans);
        async move { ok.then_some(spans) }
    })
    .await
}

fn node_of(s: &Received) -> u64 {
    s.resource["warden.node"].parse().unwrap()
}

fn named<'a>(spans: &'a [Received], name: &str, node: u64) -> Option<&'a Received> {
    spans.iter().find(|s| s.name == name && node_of(s) == node)
}

/// What: a command sent to a follower with a client's `traceparent` is one trace: the
/// follower's span of it (child of the client's span) and its forward, then the leader's span
/// (child of the forward, though the forward was a batch), its proposal, commit and apply in
/// order. An agent call continues the caller's trace on the agent's node. Commands without a
/// `traceparent` leave nothing at ratio 0. `warden ctl --trace` is a trace from ctl's span
/// down to the leader's apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_command_is_one_trace_from_the_follower_that_took_it_to_the_leader() {
    let (sink, tc) = traced_cluster(0.0).await;
    let leader = tc.leader().await;
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let c = &tc.client;

    // Not traced: nothing is recorded for these.
    c.call("create_supervisor", &json!({"name": "t"}))
        .await
        .unwrap();
    c.call(
        "spawn_agent",
        &json!({"name": "tr", "supervisor": "t", "kind": "counter", "wait": "running"}),
    )
    .await
    .unwrap();

    // A client's traced write, on the follower's own subject: it must be forwarded.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{client_span}-01");
    let subject = c.subjects.node_cmd(follower, "create_supervisor");
    let reply = request_traced(&tc, subject, json!({"name": "traced"}), &tp).await;
    assert_eq!(reply["ok"], true, "{reply}");

    let spans = trace_of(&sink, trace, "the follower's and the leader's spans", |s| {
        ["received create_supervisor", "forwarded"]
            .iter()
            .all(|n| named(s, n, follower).is_some())
            && [
                "received create_supervisor",
                "proposed",
                "committed",
                "applied",
            ]
            .iter()
            .all(|n| named(s, n, leader).is_some())
    })
    .await;
    let took = named(&spans, "received create_supervisor", follower).unwrap();
    assert_eq!(took.parent_span_id, client_span, "{took:?}");
    let fwd = named(&spans, "forwarded", follower).unwrap();
    assert_eq!(fwd.parent_span_id, took.span_id, "{fwd:?}");
    assert_eq!(fwd.attributes["warden.leader"], leader.to_string());
    assert_eq!(fwd.attributes["warden.forward"], "batch");
    let on_leader = named(&spans, "received create_supervisor", leader).unwrap();
    assert_eq!(on_leader.parent_span_id, fwd.span_id, "{on_leader:?}");
    assert_eq!(
        on_leader.attributes["warden.forwarded_by"],
        follower.to_string()
    );
    let proposed = named(&spans, "proposed", leader).unwrap();
    assert_eq!(proposed.parent_span_id, on_leader.span_id);
    let committed = named(&spans, "committed", leader).unwrap();
    let applied = named(&spans, "applied", leader).unwrap();
    assert_eq!(committed.parent_span_id, proposed.span_id);
    assert_eq!(applied.parent_span_id, proposed.span_id);
    assert!(
        committed.end_ns <= applied.start_ns + 1,
        "{committed:?} {applied:?}"
    );
    assert!(proposed.start_ns <= committed.start_ns && applied.end_ns <= proposed.end_ns);
    assert!(took.start_ns <= on_leader.start_ns && on_leader.end_ns <= took.end_ns);
    assert_eq!(
        committed.attributes["raft.log_index"],
        proposed.attributes["raft.log_index"]
    );

    // A traced agent call: the node that runs the agent continues the caller's trace.
    let agent = wait_agent(c, "tr", "running", |a| a["status"] == "running").await;
    let runs_on = agent["node"].as_u64().unwrap();
    let call_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    let tp = format!("00-{call_trace}-{caller}-01");
    let call = json!({"op": "add", "n": 2});
    let reply = request_traced(&tc, c.subjects.agent("tr", "call"), call, &tp).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let spans = trace_of(&sink, call_trace, "the agent call's span", |s| {
        named(s, "agent call", runs_on).is_some()
    })
    .await;
    let call = named(&spans, "agent call", runs_on).unwrap();
    assert_eq!(call.parent_span_id, caller);
    assert_eq!(
        call.attributes["warden.agent"],
        agent["id"].as_str().unwrap()
    );

    // `warden ctl --trace`: a trace of its own, from ctl's span to the leader's apply.
    let receiver = sink.endpoint.clone();
    let follower_arg = follower.to_string();
    let out = tc
        .nats
        .ctl(&[
            "--trace",
            "--otlp",
            &receiver,
            "--node",
            &follower_arg,
            "create_supervisor",
            "name=by-ctl",
        ])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ctl_trace = stderr
        .lines()
        .find_map(|l| l.strip_prefix("trace "))
        .unwrap_or_else(|| panic!("no trace id in {stderr:?}"))
        .trim()
        .to_string();
    let spans = trace_of(&sink, &ctl_trace, "ctl's trace", |s| {
        s.iter().any(|x| x.name.starts_with("warden ctl"))
            && ["received create_supervisor", "proposed", "applied"]
                .iter()
                .all(|n| named(s, n, leader).is_some())
            && named(s, "received create_supervisor", follower).is_some()
    })
    .await;
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let root = spans
        .iter()
        .find(|s| s.name.starts_with("warden ctl"))
        .unwrap();
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    // Every span of the trace leads up to ctl's: one tree, no orphan.
    for s in &spans {
        let mut at: &Received = s;
        let mut hops = 0;
        while !at.parent_span_id.is_empty() {
            at = by_id
                .get(at.parent_span_id.as_str())
                .copied()
                .unwrap_or_else(|| panic!("{s:?} has a parent outside the trace"));
            hops += 1;
            assert!(hops < 20);
        }
        assert_eq!(at.span_id, root.span_id, "{s:?}");
    }
    assert!(
        spans.iter().any(|s| s.name == "create_supervisor"),
        "the Rust client's span: {spans:?}"
    );

    // Nothing but these three traces was recorded: the untraced commands, the nodes' own
    // traffic (heartbeats, reports) and the agent's start start no trace at ratio 0.
    let others: Vec<Received> = sink
        .spans()
        .into_iter()
        .filter(|s| ![trace, call_trace, ctl_trace.as_str()].contains(&s.trace_id.as_str()))
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

/// What: without a client's `traceparent`, a node records what it starts at its sampling
/// ratio (here every command and call): a command's trace begins at the node that took it,
/// and the spans still queued when the node stops are sent before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_samples_what_it_takes_and_sends_its_last_spans_when_it_stops() {
    let sink = Sink::start(100_000).await.unwrap();
    let endpoint = sink.endpoint.clone();
    let node = InProcessNode::start_with(move |cfg| {
        cfg.traces.endpoint = Some(endpoint);
        cfg.traces.sample_ratio = 1.0;
        // Longer than the test: only the stop sends the spans.
        cfg.traces.export_interval_ms = 60_000;
    })
    .await;
    let c = node.client.clone();
    c.call("create_supervisor", &json!({"name": "s"}))
        .await
        .unwrap();
    c.call(
        "spawn_agent",
        &json!({"name": "a", "supervisor": "s", "kind": "counter", "wait": "running"}),
    )
    .await
    .unwrap();
    call_agent(&c, "a", json!({"op": "add", "n": 1}))
        .await
        .unwrap();
    assert_eq!(
        sink.received(),
        0,
        "nothing is sent before the interval or the stop"
    );
    node.shutdown().await.unwrap();

    let spans = sink.spans();
    let root = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.parent_span_id.is_empty())
            .unwrap_or_else(|| panic!("no root span {name:?} in {spans:?}"))
    };
    let created = root("received create_supervisor");
    let proposed = spans
        .iter()
        .find(|s| s.name == "proposed" && s.trace_id == created.trace_id)
        .unwrap_or_else(|| panic!("{spans:?}"));
    assert_eq!(proposed.parent_span_id, created.span_id);
    for name in ["committed", "applied"] {
        assert!(
            spans
                .iter()
                .any(|s| s.name == name && s.parent_span_id == proposed.span_id),
            "{name}: {spans:?}"
        );
    }
    root("received spawn_agent");
    let call = root("agent call");
    assert_eq!(call.resource["warden.node"], "1");
}

/// A receiver, and three nodes exporting to it every 100 ms at `ratio`.
async fn traced_cluster(ratio: f64) -> (Sink, TestCluster) {
    let sink = Sink::start(100_000).await.unwrap();
    let config = format!(
        "[traces]\nendpoint = \"{}\"\nsample_ratio = {ratio:?}\nexport_interval_ms = 100\n",
        sink.endpoint
    );
    let tc = TestCluster::start(3, Some(&config)).await;
    (sink, tc)
}

/// Sends `body` on `subject` with a `traceparent` header, as any NATS client can, and answers
/// the reply's envelope.
async fn request_traced(
    tc: &TestCluster,
    subject: String,
    body: serde_json::Value,
    traceparent: &str,
) -> serde_json::Value {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", traceparent);
    headers.insert("Content-Type", "application/json");
    let body = serde_json::to_vec(&body).unwrap();
    let reply = tc
        .client
        .request(subject, headers, body.into(), Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// `request_traced` of `command` on node `node`'s own subject.
async fn send_traced(
    tc: &TestCluster,
    node: u64,
    command: &str,
    body: serde_json::Value,
    traceparent: &str,
) -> serde_json::Value {
    let subject = tc.client.subjects.node_cmd(node, command);
    request_traced(tc, subject, body, traceparent).await
}

/// What: at `sample_ratio = 1`, a client's unsampled `traceparent` (flag 00) is still obeyed:
/// nothing of its write (forwarded in a batch) or its read (relayed) is recorded on any node,
/// so the leader never starts a trace of its own for what a follower forwarded. A malformed
/// `traceparent` fails nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_parent_is_obeyed_and_forwarded_commands_never_start_a_trace() {
    let (sink, tc) = traced_cluster(1.0).await;
    let leader = tc.leader().await;
    let follower = (1..=3).find(|&n| n != leader).unwrap();

    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{unsampled}-00f067aa0ba902b7-00");
    let wrote = send_traced(
        &tc,
        follower,
        "create_supervisor",
        json!({"name": "u"}),
        &tp,
    )
    .await;
    assert_eq!(wrote["ok"], true, "{wrote}");
    let read = send_traced(&tc, follower, "get_supervision_tree", json!({}), &tp).await;
    assert_eq!(read["ok"], true, "{read}");
    for (i, junk) in ["junk", "00-zz-zz-01", &"-".repeat(4096)]
        .iter()
        .enumerate()
    {
        let name = json!({ "name": format!("j{i}") });
        let got = send_traced(&tc, follower, "create_supervisor", name, junk).await;
        assert_eq!(got["ok"], true, "{junk:?}: {got}");
    }

    // A sampled marker, sent last: once its spans are in, so are those of what came before.
    let marker = "6bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{marker}-00f067aa0ba902b7-01");
    let got = send_traced(
        &tc,
        follower,
        "create_supervisor",
        json!({"name": "m"}),
        &tp,
    )
    .await;
    assert_eq!(got["ok"], true, "{got}");
    trace_of(&sink, marker, "the marker's spans on both nodes", |s| {
        named(s, "applied", leader).is_some()
            && named(s, "received create_supervisor", follower).is_some()
    })
    .await;

    let spans = sink.spans();
    let leaked: Vec<&Received> = spans.iter().filter(|s| s.trace_id == unsampled).collect();
    assert!(
        leaked.is_empty(),
        "an unsampled trace was recorded: {leaked:?}"
    );
    let roots: Vec<&Received> = spans
        .iter()
        .filter(|s| s.attributes.contains_key("warden.forwarded_by") && s.parent_span_id.is_empty())
        .collect();
    assert!(
        roots.is_empty(),
        "a forwarded command started a trace: {roots:?}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.attributes.contains_key("warden.forwarded_by")),
        "the marker's leader span names its sender"
    );
}

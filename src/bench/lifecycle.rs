//! Lifecycle figures (issue 18): `find_templates` by capability over many templates, against
//! a plain read (`get_template` of one) and the raw NATS round trip in the same run (seed 002
//! asks a capability match over 1,000 specs within 10 ms); the export of a subtree of
//! checkpointed agents, every page of it, against a plain read (`get_agent` of one of them)
//! and the round trip (seed 002 asks a 1,000-agent subtree within 100 ms).

use std::time::Instant;

use serde_json::{json, Value};

use crate::client::Client;

/// Calls measured per query, one after the other.
const CALLS: usize = 300;

/// Registers `n` templates (one in 50 carries each capability), times `find_templates` by a
/// capability and `get_template` of one, and removes them again.
pub async fn templates(client: &Client, n: usize, rtt_us: u64) -> anyhow::Result<Value> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let name = |i: usize| format!("bench-{run}-{i}");
    for i in 0..n {
        let body = json!({
            "name": name(i), "kind": "echo",
            "description": format!("bench template {i} of run {run}"),
            "capabilities": [format!("cap-{run}-{}", i % 50)],
            "tags": ["bench"],
            "request_id": format!("{}-r", name(i)),
        });
        client.call("register_template", &body).await?;
    }
    let find = json!({"capability": format!("cap-{run}-7")});
    let found = client.call("find_templates", &find).await?;
    let matched = found["templates"].as_array().map_or(0, Vec::len);
    let get = json!({"name": name(0)});
    let find_lat = time(client, "find_templates", &find).await?;
    let get_lat = time(client, "get_template", &get).await?;
    for i in 0..n {
        if let Err(e) = client
            .call("delete_template", &json!({"name": name(i)}))
            .await
        {
            eprintln!("warning: could not delete template {}: {e}", name(i));
        }
    }
    let (fp50, fp99) = find_lat;
    let (gp50, gp99) = get_lat;
    Ok(json!({
        "templates": n,
        "matched": matched,
        "find_by_capability": {"p50_us": fp50, "p99_us": fp99},
        "get_template": {"p50_us": gp50, "p99_us": gp99},
        "find_p50_vs_get_p50": fp50 as f64 / gp50.max(1) as f64,
        "find_p50_vs_nats_rtt": fp50 as f64 / rtt_us.max(1) as f64,
    }))
}

/// Exports measured, one after the other.
const EXPORTS: usize = 50;

/// Spawns a group of `n` durable counters under a supervisor of its own, makes each checkpoint
/// once, times the export of the subtree (all its pages) and `get_agent` of one of them, then
/// stops it.
pub async fn export(client: &Client, n: usize, rtt_us: u64) -> anyhow::Result<Value> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let top = format!("bench-export-{}", &run[..8]);
    let group = format!("{top}-g");
    let rid = format!("{top}-r");
    client
        .call(
            "create_supervisor",
            &json!({"name": top, "request_id": rid}),
        )
        .await?;
    let spawn = json!({"name": group, "parent": top, "count": n, "request_id": format!("{rid}-g"),
                       "template": {"kind": "counter", "config": {"durable": true}}});
    client.call("spawn_agent_group", &spawn).await?;
    let add = json!({"op": "add", "n": 1});
    let names: Vec<String> = (0..n).map(|i| format!("{group}-{i}")).collect();
    for chunk in names.chunks(50) {
        let calls = chunk.iter().map(|a| client.call_agent(a, &add));
        for r in futures::future::join_all(calls).await {
            r?;
        }
    }
    let mut lat = Vec::with_capacity(EXPORTS);
    let mut agents = 0;
    for _ in 0..EXPORTS {
        let t = Instant::now();
        let doc = client.export_subtree(&top).await?;
        lat.push(t.elapsed().as_micros() as u64);
        agents = doc.agents.len();
    }
    lat.sort_unstable();
    let (ep50, ep99) = (lat[lat.len() / 2], lat[lat.len() * 99 / 100]);
    let (gp50, gp99) = time(client, "get_agent", &json!({"agent": names[0]})).await?;
    if let Err(e) = client.call("stop_supervisor", &json!({"name": top})).await {
        eprintln!("warning: could not stop {top}: {e}");
    }
    Ok(json!({
        "agents": agents,
        "export": {"p50_us": ep50, "p99_us": ep99},
        "get_agent": {"p50_us": gp50, "p99_us": gp99},
        "export_p50_vs_get_p50": ep50 as f64 / gp50.max(1) as f64,
        "export_p50_vs_nats_rtt": ep50 as f64 / rtt_us.max(1) as f64,
    }))
}

pub fn print_export(v: &Value) {
    println!(
        "export_subtree of {} checkpointed agents (every page): p50 {} us, p99 {} us = {:.1}x get_agent's p50 ({} us), {:.1}x the raw NATS round trip",
        v["agents"],
        v["export"]["p50_us"], v["export"]["p99_us"],
        v["export_p50_vs_get_p50"].as_f64().unwrap_or(0.0), v["get_agent"]["p50_us"],
        v["export_p50_vs_nats_rtt"].as_f64().unwrap_or(0.0),
    );
}

/// p50 and p99 of `CALLS` calls of `command`, in microseconds.
async fn time(client: &Client, command: &str, body: &Value) -> anyhow::Result<(u64, u64)> {
    let mut lat = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        client.call(command, body).await?;
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
}

pub fn print(v: &Value) {
    println!(
        "find_templates by capability over {} templates ({} match): p50 {} us, p99 {} us = {:.2}x get_template's p50 ({} us), {:.1}x the raw NATS round trip",
        v["templates"], v["matched"],
        v["find_by_capability"]["p50_us"], v["find_by_capability"]["p99_us"],
        v["find_p50_vs_get_p50"].as_f64().unwrap_or(0.0), v["get_template"]["p50_us"],
        v["find_p50_vs_nats_rtt"].as_f64().unwrap_or(0.0),
    );
}

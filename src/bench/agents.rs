//! Agent benchmarks: restart latency (crash until answering again), spawn throughput, and
//! memory per idle agent on the node that runs them.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{figures, Figures};
use crate::agent::journal::JournalEntry;
use crate::bus;
use crate::client::Client;
use crate::protocol::{Envelope, ErrorCode};
use crate::up::LocalCluster;

/// Resident memory of a process, in bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmRSS:")
}

/// The most resident memory process `pid` ever had (Linux `VmHWM`).
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmHWM:")
}

fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn call(c: &Client, agent: &str, body: &Value) -> Result<Value, ErrorCode> {
    let payload = serde_json::to_vec(body)
        .map_err(|_| ErrorCode::Internal)?
        .into();
    let reply = bus::request(
        &c.nats,
        c.subjects.agent(agent, "call"),
        None,
        payload,
        Duration::from_secs(5),
    )
    .await
    .map_err(|_| ErrorCode::Unavailable)?;
    let env = Envelope::decode(&reply.payload).map_err(|_| ErrorCode::Internal)?;
    env.into_result().map_err(|e| e.code)
}

/// Restart latency three ways.
pub struct Restarts {
    /// Crash answer until the agent answers again, at a client.
    pub client: Figures,
    /// The reference for `client`: a plain call to the same agent, measured just before.
    pub plain_call: Figures,
    /// Crash seen until running again, inside the node (its journal; needs a local cluster).
    pub in_node: Option<Figures>,
}

/// Crashes a counter `rounds` times; each sample is the time from the crash's answer until
/// the agent answers again, as a client sees it (so at least one NATS round trip). With a
/// local cluster, also the restarts as the node journaled them: from the line of the crashed
/// run's stop (written when the node saw the crash) to the line of the next start (written as
/// the new instance starts), which is what an OTP restart time measures.
pub async fn restart_latency(
    c: &Client,
    rounds: usize,
    local: Option<&LocalCluster>,
) -> anyhow::Result<Restarts> {
    let sup = json!({"name": "bench-restart", "strategy": "one_for_one", "max_restarts": 1_000_000,
                     "max_seconds": 1, "backoff": {"initial_ms": 0, "max_ms": 0, "jitter": 0.0},
                     "request_id": "bench-restart-sup"});
    c.call("create_supervisor", &sup).await?;
    let agent = json!({"name": "bench-restart-c", "supervisor": "bench-restart", "kind": "counter",
                       "request_id": "bench-restart-agent"});
    let spawned = c.call("spawn_agent", &agent).await?;
    let get = json!({"op": "get"});
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(c, "bench-restart-c", &get).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the restart benchmark's agent never started"
        );
    }
    let start = Instant::now();
    let mut plain = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        call(c, "bench-restart-c", &get)
            .await
            .map_err(|e| anyhow::anyhow!("a plain call failed: {e:?}"))?;
        plain.push(t.elapsed().as_micros() as u64);
    }
    let plain_call = figures(plain, 0, start.elapsed());
    let start = Instant::now();
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let crashed = call(c, "bench-restart-c", &json!({"op": "crash"})).await;
        anyhow::ensure!(
            crashed == Err(ErrorCode::Internal),
            "crash answered {crashed:?}"
        );
        let t = Instant::now();
        loop {
            match call(c, "bench-restart-c", &get).await {
                Ok(_) => break,
                Err(ErrorCode::Unavailable) if t.elapsed() < Duration::from_secs(10) => {}
                Err(e) => anyhow::bail!("the agent did not come back: {e:?}"),
            }
        }
        samples.push(t.elapsed().as_micros() as u64);
    }
    let elapsed = start.elapsed();
    let record = c
        .call("get_agent", &json!({"agent": "bench-restart-c"}))
        .await?;
    let _ = c
        .call("stop_supervisor", &json!({"name": "bench-restart"}))
        .await; // cleanup only
    let in_node = match (local, record["node"].as_u64(), spawned["id"].as_str()) {
        (Some(cluster), Some(node), Some(id)) => {
            let entries = crate::agent::journal::read_dir(&cluster.data_dir(node));
            let gaps = journaled_restarts(&entries, id);
            anyhow::ensure!(
                gaps.len() >= rounds,
                "node {node}'s journal holds {} restarts of the agent, not {rounds}",
                gaps.len()
            );
            Some(figures(gaps, 0, elapsed))
        }
        _ => None,
    };
    Ok(Restarts {
        client: figures(samples, 0, elapsed),
        plain_call,
        in_node,
    })
}

/// Erlang/OTP's restart latency on this machine, now: `otp_restart.escript` crashes a
/// permanent child of a one_for_one supervisor `rounds` times (the same intensity as the
/// Warden benchmark's supervisor) and prints p50 and p99 in microseconds, from the child's
/// crash to the supervisor starting the new one. `None` when `escript` is not on PATH or the
/// run fails; the caller then falls back to the figure and says so.
pub async fn otp_restart(rounds: usize) -> Option<(u64, u64)> {
    let script = std::env::temp_dir().join(format!(
        "warden-otp-restart-{}.escript",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&script, include_str!("otp_restart.escript")).ok()?;
    let out = run_escript(&script, rounds).await;
    let _ = std::fs::remove_file(&script); // a leftover temp file only
    let (p50, p99) = out?;
    Some((p50, p99))
}

async fn run_escript(script: &std::path::Path, rounds: usize) -> Option<(u64, u64)> {
    let run = tokio::process::Command::new("escript")
        .arg(script)
        .arg(rounds.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .ok()?
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // OTP's supervisor reports go to standard output too; the figures are the last line.
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let mut nums = last.split_whitespace().map(|n| n.parse::<u64>());
    match (nums.next(), nums.next()) {
        (Some(Ok(p50)), Some(Ok(p99))) => Some((p50, p99)),
        _ => None,
    }
}

/// Microseconds from each journaled crash of `agent` to its next start.
fn journaled_restarts(entries: &[JournalEntry], agent: &str) -> Vec<u64> {
    let mut gaps = Vec::new();
    let mut crashed_at = None;
    for e in entries.iter().filter(|e| e.agent.to_string() == agent) {
        match (e.ev.as_str(), crashed_at) {
            ("stop", _) if e.reason.as_deref() == Some("crashed") => crashed_at = Some(e.t),
            ("start", Some(at)) => {
                gaps.push((e.t - at).num_microseconds().unwrap_or(0).max(0) as u64);
                crashed_at = None;
            }
            _ => crashed_at = None,
        }
    }
    gaps
}

/// What `spawn_throughput` made, for the query benchmark.
pub struct Spawned {
    /// Acknowledged agents/s, and running agents/s.
    pub acked_per_sec: f64,
    pub running_per_sec: f64,
    /// The tag every 50th group carries (2% of the agents from 50 groups on), and how many
    /// agents carry it.
    pub rare_tag: String,
    pub rare: usize,
    /// One group's supervisor, and one agent's name.
    pub group: String,
    pub agent: String,
}

/// Spawns `n` echo agents pinned to `node` in groups of 1,000, `concurrency` groups at a time,
/// and waits until all run. Every 50th group also carries a rare tag.
pub async fn spawn_throughput(
    c: &Client,
    n: usize,
    node: u64,
    concurrency: usize,
) -> anyhow::Result<Spawned> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let (tag, rare_tag) = (format!("bench-{run}"), format!("bench-{run}-rare"));
    let groups = n.div_ceil(1000);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut rare = 0;
    for g in 0..groups {
        let count = (n - g * 1000).min(1000);
        let mut tags = vec![tag.clone()];
        if g % 50 == 0 {
            tags.push(rare_tag.clone());
            rare += count;
        }
        let body = json!({"name": format!("bench-{run}-{g}"), "count": count,
                          "template": {"kind": "echo", "tags": tags,
                                       "placement": {"node": node}},
                          "request_id": format!("bench-{run}-{g}")});
        let (c, sem) = (c.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            c.call("spawn_agent_group", &body).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let acked = start.elapsed();
    let all_run = || async { Ok(count(c, &tag, "running").await? >= n) };
    let (within, every) = (Duration::from_secs(600), Duration::from_millis(100));
    super::poll_until("agents did not all start", within, every, all_run).await?;
    let running = start.elapsed();
    Ok(Spawned {
        acked_per_sec: n as f64 / acked.as_secs_f64(),
        running_per_sec: n as f64 / running.as_secs_f64(),
        rare_tag,
        rare,
        group: format!("bench-{run}-{}", groups / 2),
        agent: format!("bench-{run}-{}-0", groups / 2),
    })
}

/// Query latencies over the agents `spawn_throughput` made, each query `rounds` times one
/// after the other: `get_agent` (the reference), a page of 10 by the rare tag, a count by it,
/// and a page of 10 of one group's supervisor.
pub async fn query_latency(
    c: &Client,
    s: &Spawned,
    rounds: usize,
) -> anyhow::Result<[(&'static str, Figures); 4]> {
    let queries = [
        ("get_agent", "get_agent", json!({"agent": s.agent})),
        (
            "find_agents_tag_page",
            "find_agents",
            json!({"tag": s.rare_tag, "limit": 10}),
        ),
        (
            "find_agents_tag_count",
            "find_agents",
            json!({"tag": s.rare_tag, "count": true}),
        ),
        (
            "list_agents_supervisor_page",
            "list_agents",
            json!({"supervisor": s.group, "limit": 10}),
        ),
    ];
    let mut out = Vec::new();
    for (label, command, body) in queries {
        let start = Instant::now();
        let mut lat = Vec::with_capacity(rounds);
        let mut errors = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            match c.call(command, &body).await {
                Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                Err(_) => errors += 1,
            }
        }
        out.push((label, figures(lat, errors, start.elapsed())));
    }
    out.try_into()
        .map_err(|_| anyhow::anyhow!("four queries, four figures"))
}

/// Counts agents with a tag and status (one `find_agents {count: true}`).
async fn count(c: &Client, tag: &str, status: &str) -> anyhow::Result<usize> {
    let q = json!({"tag": tag, "status": status, "count": true});
    let v = c.call("find_agents", &q).await?;
    v["count"]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| anyhow::anyhow!("find_agents answered no count: {v}"))
}

/// Calls to another agent on the node while one agent takes its whole graceful stop.
pub struct SlowStop {
    /// Plain calls to the quick agent, just before the stop: the reference.
    pub plain_call: Figures,
    /// The same calls while the other agent stops.
    pub during_stop: Figures,
    /// The slowest of those.
    pub worst_during_us: u64,
    pub shutdown_ms: u64,
}

/// Runs a `counter` and an `exec` agent that ignores SIGTERM on one node (a colocated
/// supervisor), stops the exec agent with `shutdown_ms`, and times calls to the counter, one
/// after the other, before and during that stop. Needs `exec` enabled with `/bin/sh` allowed
/// on the nodes (`warden bench --local` does that).
pub async fn slow_stop(c: &Client, shutdown_ms: u64) -> anyhow::Result<SlowStop> {
    let sup = json!({"name": "bench-slow", "strategy": "one_for_one", "placement": "colocate",
                     "request_id": "bench-slow-sup"});
    c.call("create_supervisor", &sup).await?;
    let quick = json!({"name": "bench-slow-quick", "supervisor": "bench-slow", "kind": "counter",
                       "request_id": "bench-slow-quick"});
    c.call("spawn_agent", &quick).await?;
    let script = "trap '' TERM; while :; do sleep 0.2; done";
    let slow = json!({"name": "bench-slow-stop", "supervisor": "bench-slow", "kind": "exec",
                      "shutdown_ms": shutdown_ms, "request_id": "bench-slow-stop",
                      "config": {"command": "/bin/sh", "args": ["-c", script]}});
    c.call("spawn_agent", &slow).await?;
    let get = json!({"op": "get"});
    let status = json!({"op": "status"});
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(c, "bench-slow-quick", &get).await.is_err()
        || call(c, "bench-slow-stop", &status).await.is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the slow-stop benchmark's agents never ran (is exec enabled, with /bin/sh allowed?)"
        );
    }
    // Calls one after the other for `d`: their figures and the slowest.
    let calls_for = |d: Duration| {
        let get = &get;
        async move {
            let start = Instant::now();
            let mut lat = Vec::new();
            let mut errors = 0;
            while start.elapsed() < d {
                let t = Instant::now();
                match call(c, "bench-slow-quick", get).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            let worst = lat.iter().copied().max().unwrap_or(0);
            (figures(lat, errors, start.elapsed()), worst)
        }
    };
    let during_ms = shutdown_ms.saturating_sub(500).max(500);
    let (plain_call, _) = calls_for(Duration::from_millis(during_ms)).await;
    c.call("stop_agent", &json!({"agent": "bench-slow-stop"}))
        .await?;
    let (during_stop, worst_during_us) = calls_for(Duration::from_millis(during_ms)).await;
    let _ = c
        .call("stop_supervisor", &json!({"name": "bench-slow"}))
        .await; // cleanup only
    Ok(SlowStop {
        plain_call,
        during_stop,
        worst_during_us,
        shutdown_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_read_from_crash_to_next_start() {
        let agent = uuid::Uuid::new_v4();
        let other = uuid::Uuid::new_v4();
        let at = |ms: i64, a: uuid::Uuid, ev: &str, reason: Option<&str>| JournalEntry {
            t: chrono::DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap(),
            node: 1,
            agent: a,
            epoch: 1,
            ev: ev.into(),
            reason: reason.map(Into::into),
            until: None,
        };
        let entries = vec![
            at(0, agent, "start", None),
            at(10, agent, "stop", Some("crashed")),
            at(11, other, "start", None),
            at(12, agent, "start", None),
            // A stop that is not a crash (a migration) is no restart.
            at(20, agent, "stop", Some("migrating")),
            at(25, agent, "start", None),
            at(30, agent, "stop", Some("crashed")),
            at(33, agent, "start", None),
        ];
        assert_eq!(
            journaled_restarts(&entries, &agent.to_string()),
            vec![2_000, 3_000]
        );
    }
}

//! Agent benchmarks: restart latency (crash until answering again), spawn throughput, and
//! memory per idle agent on the node that runs them.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{figures, Figures};
use crate::bus;
use crate::client::Client;
use crate::protocol::{Envelope, ErrorCode};

/// Resident memory of a process, in bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
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

/// Crashes a counter `rounds` times; each sample is the time from the crash's answer until
/// the agent answers again.
pub async fn restart_latency(c: &Client, rounds: usize) -> anyhow::Result<Figures> {
    let sup = json!({"name": "bench-restart", "strategy": "one_for_one", "max_restarts": 1_000_000,
                     "max_seconds": 1, "backoff": {"initial_ms": 0, "max_ms": 0, "jitter": 0.0},
                     "request_id": "bench-restart-sup"});
    c.call("create_supervisor", &sup).await?;
    let agent = json!({"name": "bench-restart-c", "supervisor": "bench-restart", "kind": "counter",
                       "request_id": "bench-restart-agent"});
    c.call("spawn_agent", &agent).await?;
    let get = json!({"op": "get"});
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(c, "bench-restart-c", &get).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the restart benchmark's agent never started"
        );
    }
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
    let _ = c
        .call("stop_supervisor", &json!({"name": "bench-restart"}))
        .await; // cleanup only
    Ok(figures(samples, 0, start.elapsed()))
}

/// Spawns `n` echo agents pinned to `node` in groups of 1,000, `concurrency` groups at a time,
/// and waits until all run. Returns (acknowledged agents/s, running agents/s).
pub async fn spawn_throughput(
    c: &Client,
    n: usize,
    node: u64,
    concurrency: usize,
) -> anyhow::Result<(f64, f64)> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let groups = n.div_ceil(1000);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    for g in 0..groups {
        let count = (n - g * 1000).min(1000);
        let body = json!({"name": format!("bench-{}-{g}", &run[..8]), "count": count,
                          "template": {"kind": "echo", "tags": [format!("bench-{}", &run[..8])],
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
    let tag = format!("bench-{}", &run[..8]);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if count(c, &tag, "running").await? >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "agents did not all start within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running = start.elapsed();
    Ok((
        n as f64 / acked.as_secs_f64(),
        n as f64 / running.as_secs_f64(),
    ))
}

/// Counts agents with a tag and status, page by page.
async fn count(c: &Client, tag: &str, status: &str) -> anyhow::Result<usize> {
    let q = json!({"tag": tag, "status": status, "limit": 1000});
    Ok(c.all_pages("find_agents", &q, "agents").await?.len())
}

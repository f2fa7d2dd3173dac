//! A partial partition: three nodes over a three-server NATS cluster whose routes run through
//! proxies ([`crate::netfault::NatsMesh`]), node i on server i, a client on each server sending
//! on the shared subjects; then the route between the leader's server and one follower's is
//! cut while both still reach the third. `warden bench --route-cut` reports the requests
//! answered per second during the cut against before it; the integration test asserts on the
//! same run (tests/it/partition.rs).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use serde_json::{json, Value};

use crate::bus::RequestFailure;
use crate::client::Client;
use crate::netfault::{MeshConfig, NatsMesh, RouteCut};
use crate::protocol::Envelope;
use crate::up::{connect_as, LocalCluster};

/// What to run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The `warden` binary the nodes run.
    pub bin: PathBuf,
    /// Where the servers and nodes keep their files.
    pub dir: PathBuf,
    pub cluster: String,
    pub how: RouteCut,
    /// How long to measure before the cut, during it, and after the heal.
    pub before: Duration,
    pub during: Duration,
    pub after: Duration,
    /// One request's timeout.
    pub request_timeout: Duration,
}

/// One request as a client saw it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// Since the run's start (ms), when the request was sent.
    pub sent_ms: u64,
    pub latency_us: u64,
    pub write: bool,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Outcome {
    /// Answered with a result.
    Ok,
    /// Answered with an error (refused, with a reason).
    Refused,
    /// Nobody is subscribed: refused by NATS at once.
    NoResponders,
    /// No answer within the request's timeout.
    TimedOut,
}

/// The run, as measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Servers (0-based; node `s + 1` is on server `s`) whose route was cut, the leader's first.
    pub cut: (usize, usize),
    pub leader_before: u64,
    pub term_before: u64,
    pub leader_after: u64,
    pub term_after: u64,
    /// Since the run's start (ms): when the cut began and ended.
    pub cut_ms: u64,
    pub healed_ms: u64,
    /// Every node's status in the registry just before the heal, as the third server's
    /// client read it (`None` if no answer came).
    pub statuses_before_heal: Option<Vec<(u64, String)>>,
    /// Every request, per server its client is on.
    pub samples: Vec<Vec<Sample>>,
    /// The requests of a fourth client, on the leader's server, sent on the leader's own
    /// subject (as a client that follows the `Warden-Leader` hint does).
    pub to_leader: Vec<Sample>,
}

/// Figures of the requests sent in a window.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Window {
    pub sent: usize,
    pub answered: usize,
    pub ok: usize,
    pub timed_out: usize,
    pub answered_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Report {
    /// The requests of the client on `server` sent within `[from_ms, to_ms)`.
    pub fn window(&self, server: usize, from_ms: u64, to_ms: u64) -> Window {
        let picked: Vec<&Sample> = self.samples[server]
            .iter()
            .filter(|s| s.sent_ms >= from_ms && s.sent_ms < to_ms)
            .collect();
        let answered: Vec<&Sample> = picked
            .iter()
            .copied()
            .filter(|s| matches!(s.outcome, Outcome::Ok | Outcome::Refused))
            .collect();
        let mut lat: Vec<u64> = picked.iter().map(|s| s.latency_us).collect();
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let secs = (to_ms.saturating_sub(from_ms)).max(1) as f64 / 1000.0;
        Window {
            sent: picked.len(),
            answered: answered.len(),
            ok: picked.iter().filter(|s| s.outcome == Outcome::Ok).count(),
            timed_out: picked
                .iter()
                .filter(|s| s.outcome == Outcome::TimedOut)
                .count(),
            answered_per_sec: answered.len() as f64 / secs,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            max_us: lat.last().copied().unwrap_or(0),
        }
    }
}

/// What `start` brings up; dropping it kills everything.
struct Running {
    mesh: NatsMesh,
    _nodes: LocalCluster,
    /// One client per server, sending on the shared subjects.
    clients: Vec<Client>,
    /// The leader and term once all three nodes were up.
    leader: u64,
    term: u64,
}

/// Three servers in a mesh, node i on server i, and a client on each server.
async fn start(setup: &Setup) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&setup.dir)?;
    let auth = setup.dir.join("auth");
    crate::auth::ensure(&auth, &setup.cluster, 3)?;
    let mesh = NatsMesh::start(
        &setup.dir,
        &MeshConfig {
            servers: 3,
            name: format!("{}-mesh", setup.cluster),
            base_config: Some(auth.join(crate::auth::SERVER_FILE)),
            // A silent route is noticed within about three seconds.
            ping_interval: Some(Duration::from_secs(1)),
        },
    )
    .await?;
    mesh.wait_routes(Duration::from_secs(20)).await?;
    let mut nodes = LocalCluster::new(
        setup.bin.clone(),
        setup.dir.join("nodes"),
        String::new(),
        &setup.cluster,
    );
    nodes.auth = Some(auth.clone());
    for id in 1..=3u64 {
        nodes.node_nats.insert(id, mesh.url(id as usize - 1));
    }
    for id in 1..=3u64 {
        nodes.start_node(id, id == 1).await?;
    }
    let mut clients = Vec::new();
    for s in 0..3 {
        let mut c = connect_as(&mesh.url(s), &setup.cluster, Some(&auth), "admin").await?;
        // The shared subjects, as any NATS client sends them: the queue group picks.
        c.follow_leader = false;
        clients.push(c);
    }
    let status = nodes
        .wait_ready(&clients[0], 3, Duration::from_secs(60))
        .await?;
    let leader = status["leader"]
        .as_u64()
        .filter(|l| (1..=3).contains(l))
        .ok_or_else(|| anyhow::anyhow!("no leader in {status}"))?;
    Ok(Running {
        mesh,
        _nodes: nodes,
        clients,
        leader,
        term: status["term"].as_u64().unwrap_or(0),
    })
}

/// Runs the scenario. Everything it starts is killed when it returns.
pub async fn run(setup: &Setup) -> anyhow::Result<Report> {
    let Running {
        mesh,
        _nodes,
        clients,
        leader: leader_before,
        term: term_before,
    } = start(setup).await?;
    // The leader's server, and the next server round.
    let a = leader_before as usize - 1;
    let b = (a + 1) % 3;
    let start = Instant::now();
    let total = setup.before + setup.during + setup.after;
    let mut loops = tokio::task::JoinSet::new();
    for (s, c) in clients.iter().enumerate() {
        let c = c.clone();
        let timeout = setup.request_timeout;
        loops.spawn(async move { (s, drive(c, s, None, start, total, timeout).await) });
    }
    let direct = {
        let c = clients[a].clone();
        let timeout = setup.request_timeout;
        tokio::spawn(async move { drive(c, a, Some(leader_before), start, total, timeout).await })
    };
    tokio::time::sleep_until((start + setup.before).into()).await;
    mesh.cut(a, b, setup.how);
    let cut_ms = start.elapsed().as_millis() as u64;
    let heal_at = start + setup.before + setup.during;
    let third = 3 - a - b;
    let statuses_before_heal =
        statuses(&clients[third], heal_at - Duration::from_millis(500)).await;
    tokio::time::sleep_until(heal_at.into()).await;
    mesh.heal_all();
    let healed_ms = start.elapsed().as_millis() as u64;
    let mut samples = vec![Vec::new(); 3];
    while let Some(done) = loops.join_next().await {
        let (s, got) = done?;
        samples[s] = got;
    }
    let to_leader = direct.await?;
    let after = clients[0].call("cluster_status", &json!({})).await?;
    Ok(Report {
        cut: (a, b),
        leader_before,
        term_before,
        leader_after: after["leader"].as_u64().unwrap_or(0),
        term_after: after["term"].as_u64().unwrap_or(0),
        cut_ms,
        healed_ms,
        statuses_before_heal,
        samples,
        to_leader,
    })
}

/// The leader's NATS server cut off from both others, as measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Isolated {
    pub leader_before: u64,
    pub term_before: u64,
    /// The leader the other two servers' side elected, read just before the heal.
    pub leader_during: Option<u64>,
    pub leader_after: u64,
    pub term_after: u64,
    /// Whether the old leader came to follow the leader the majority names after the heal.
    pub settled: bool,
    /// Since the cut (ms): when it ended.
    pub healed_ms: u64,
    /// Requests sent on the old leader's own subject by a client on its server, from the
    /// cut to the heal.
    pub to_old_leader: Vec<Sample>,
}

/// Cuts the leader's server from both others (both ways) for `setup.during`: the old leader
/// keeps its clients on that server but no majority. Everything it starts is killed when it
/// returns.
pub async fn isolate_leader(setup: &Setup) -> anyhow::Result<Isolated> {
    let Running {
        mesh,
        _nodes,
        clients,
        leader: leader_before,
        term: term_before,
    } = start(setup).await?;
    let a = leader_before as usize - 1;
    let (b, c) = ((a + 1) % 3, (a + 2) % 3);
    let start = Instant::now();
    mesh.cut(a, b, RouteCut::Both);
    mesh.cut(a, c, RouteCut::Both);
    let direct = drive(
        clients[a].clone(),
        a,
        Some(leader_before),
        start,
        setup.during,
        setup.request_timeout,
    );
    let mut majority = clients[b].clone();
    majority.follow_leader = true;
    let (to_old_leader, during) = tokio::join!(direct, async {
        let by = start + setup.during;
        tokio::time::sleep_until((by - Duration::from_millis(1500)).into()).await;
        majority.call("cluster_status", &json!({})).await.ok()
    });
    let leader_during = during.and_then(|v| v["leader"].as_u64());
    let healed_ms = start.elapsed().as_millis() as u64;
    mesh.heal_all();
    mesh.wait_routes(Duration::from_secs(20)).await?;
    // Settled once the old leader, asked on its own subject, follows the leader the
    // majority names, in the same term.
    let mut old = clients[a].clone();
    old.node = Some(leader_before);
    let deadline = Instant::now() + setup.after;
    let mut after = majority.call("cluster_status", &json!({})).await?;
    let settled = loop {
        let seen = old.call("health", &json!({})).await.ok();
        let agrees =
            seen.is_some_and(|v| v["leader"] == after["leader"] && v["term"] == after["term"]);
        if agrees || Instant::now() >= deadline {
            break agrees;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = majority.call("cluster_status", &json!({})).await?;
    };
    Ok(Isolated {
        leader_before,
        term_before,
        leader_during,
        leader_after: after["leader"].as_u64().unwrap_or(0),
        term_after: after["term"].as_u64().unwrap_or(0),
        settled,
        healed_ms,
        to_old_leader,
    })
}

/// Every node's status, read through `c` shortly before `by` (one try a second until then).
async fn statuses(c: &Client, by: Instant) -> Option<Vec<(u64, String)>> {
    let mut last = None;
    for _ in 0..100 {
        let wait = Instant::now() + Duration::from_secs(1);
        if wait >= by {
            break;
        }
        if let Ok(v) = c.call("cluster_status", &json!({})).await {
            let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
            last = Some(
                nodes
                    .iter()
                    .map(|n| {
                        let id = n["id"].as_u64().unwrap_or(0);
                        (id, n["status"].as_str().unwrap_or("").to_string())
                    })
                    .collect(),
            );
        }
        tokio::time::sleep_until(wait.into()).await;
    }
    last
}

/// One client's loop until `total` has passed: a write, a read, a write... on the shared
/// subjects, or on node `to`'s own.
async fn drive(
    c: Client,
    server: usize,
    to: Option<u64>,
    start: Instant,
    total: Duration,
    timeout: Duration,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut n = 0u64;
    while start.elapsed() < total {
        let write = n.is_multiple_of(2);
        let (command, body) = if write {
            let name = match to {
                Some(_) => format!("rc-direct-{server}-{n}"),
                None => format!("rc-{server}-{n}"),
            };
            let body =
                json!({"name": name, "request_id": format!("{name}-{}", std::process::id())});
            ("create_supervisor", body)
        } else {
            ("cluster_status", json!({}))
        };
        n += 1;
        let sent = Instant::now();
        let subject = match to {
            Some(node) => c.subjects.node_cmd(node, command),
            None => c.subjects.cmd(command),
        };
        let got = c
            .request(
                subject,
                HeaderMap::new(),
                serde_json::to_vec(&body).unwrap_or_default().into(),
                timeout,
            )
            .await;
        let outcome = match got {
            Ok(Ok(reply)) => match Envelope::decode(&reply.payload) {
                Ok(Envelope { ok: true, .. }) => Outcome::Ok,
                _ => Outcome::Refused,
            },
            Ok(Err(RequestFailure::NoResponders)) => Outcome::NoResponders,
            Ok(Err(_)) => Outcome::TimedOut,
            Err(_) => Outcome::Refused,
        };
        let latency = sent.elapsed();
        out.push(Sample {
            sent_ms: sent.duration_since(start).as_millis() as u64,
            latency_us: latency.as_micros() as u64,
            write,
            outcome,
        });
        if outcome == Outcome::NoResponders {
            // Nothing to pace us: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    out
}

/// The bench's line: requests answered per second during the cut against before it, on the
/// majority's servers and on the cut-off follower's.
pub fn summary(r: &Report) -> Value {
    let (a, b) = r.cut;
    let c = 3 - a - b;
    let before = |s| r.window(s, 0, r.cut_ms);
    let during = |s| r.window(s, r.cut_ms, r.healed_ms);
    let rate = |w: Window| w.answered_per_sec;
    let majority_before = rate(before(a)) + rate(before(c));
    let majority_during = rate(during(a)) + rate(during(c));
    json!({
        "cut": format!("servers {} and {}", a + 1, b + 1),
        "leader_before": r.leader_before,
        "leader_after": r.leader_after,
        "term_before": r.term_before,
        "term_after": r.term_after,
        "majority_answered_per_sec_before": majority_before,
        "majority_answered_per_sec_during": majority_during,
        "majority_ratio": majority_during / majority_before.max(1e-9),
        "cut_off_answered_per_sec_before": rate(before(b)),
        "cut_off_answered_per_sec_during": rate(during(b)),
        "cut_off_ratio": rate(during(b)) / rate(before(b)).max(1e-9),
        "statuses_before_heal": r.statuses_before_heal,
        "windows": (0..3).map(|s| json!({"server": s + 1, "before": before(s), "during": during(s)})).collect::<Vec<_>>(),
    })
}

/// Prints `summary`'s figures.
pub fn print(v: &Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "route cut between {} (node {} leads): requests answered on the majority's servers {:.0}/s during the cut against {:.0}/s before = {:.2}x; on the cut-off follower's server {:.0}/s against {:.0}/s = {:.2}x (refusals count as answers); term {} before, {} after (leader {} after)",
        v["cut"].as_str().unwrap_or("?"), v["leader_before"],
        f("majority_answered_per_sec_during"), f("majority_answered_per_sec_before"), f("majority_ratio"),
        f("cut_off_answered_per_sec_during"), f("cut_off_answered_per_sec_before"), f("cut_off_ratio"),
        v["term_before"], v["term_after"], v["leader_after"],
    );
    println!(
        "  node statuses just before the heal: {}",
        v["statuses_before_heal"]
    );
    for w in v["windows"].as_array().into_iter().flatten() {
        for phase in ["before", "during"] {
            let x = &w[phase];
            println!(
                "  server {} {phase:<6}: {} sent, {} answered ({} ok), {} timed out, p50 {} us, p99 {} us, max {} us",
                w["server"], x["sent"], x["answered"], x["ok"], x["timed_out"], x["p50_us"], x["p99_us"], x["max_us"],
            );
        }
    }
}

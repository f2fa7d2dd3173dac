//! The world a run happens in: NATS servers (a mesh whose routes run through proxies), one
//! proxy per node, the node processes, and the faults injected into them. Everything is owned
//! here and killed when the world drops.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;
use serde_json::json;
use warden::client::Client;
use warden::config::FailureConfig;
use warden::netfault::{MeshConfig, NatsMesh, Proxy, RouteCut};
use warden::up::{signal, LocalCluster};

use crate::check::{Kill, Pause, ProcessFaults};
use crate::history::wall_us;
use crate::scenario::Scenario;

/// A fault as injected, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: String,
    pub target: String,
    pub start_ms: u64,
    /// The wall clock at `start_ms` (UTC, microseconds since the Unix epoch), to line the
    /// fault up with the nodes' agent journals.
    pub start_wall_us: i64,
    pub healed_ms: Option<u64>,
}

/// A fault that is still in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Active {
    Killed(u64),
    Paused(u64),
    Partitioned(u64),
    NatsDown(usize),
    /// The route between two NATS servers is cut (both ways, or from the first to the second).
    RouteCut(usize, usize),
}

pub struct World {
    /// The NATS URLs of every server, comma-separated, and the identities' directory.
    urls: String,
    auth: PathBuf,
    mesh: NatsMesh,
    pub proxies: BTreeMap<u64, Proxy>,
    pub cluster: LocalCluster,
    pub client: Client,
    /// Nodes the harness itself stopped or killed; any other exit is a crash.
    pub expected_down: BTreeMap<u64, bool>,
    pub crashes: Vec<String>,
    /// Every node process that ended (killed, stopped, crashed), with the wall-clock time by
    /// which it had ended, and every pause: the G1 checker ends the runs they left open.
    pub procs: ProcessFaults,
}

impl World {
    /// Starts NATS, proxies and nodes, and waits for the cluster.
    pub async fn start(s: &Scenario, dir: PathBuf, bin: PathBuf) -> anyhow::Result<World> {
        // Identities on, as in production: every node and the harness's client connect with
        // their own nkey, limited to their roles.
        let auth = dir.join("auth");
        warden::auth::ensure(&auth, "chaos", s.nodes)?;
        let mesh = NatsMesh::start(
            &dir,
            &MeshConfig {
                servers: s.nats_servers as usize,
                name: "chaos".into(),
                base_config: Some(auth.join(warden::auth::SERVER_FILE)),
                ping_interval: s.nats_ping_interval_s.map(Duration::from_secs),
            },
        )
        .await?;
        mesh.wait_routes(Duration::from_secs(30)).await?;
        let n = mesh.len();
        let mut proxies = BTreeMap::new();
        let mut cluster = LocalCluster::new(bin, dir.join("nodes"), String::new(), "chaos");
        cluster.auth = Some(auth.clone());
        for id in 1..=s.nodes {
            let server = ((id - 1) as usize) % n;
            let upstream = mesh.url(server).trim_start_matches("nats://").to_string();
            let proxy = Proxy::start(upstream).await?;
            cluster.node_nats.insert(id, proxy.url());
            proxies.insert(id, proxy);
        }
        // Snapshots early and often, so that faults also hit snapshot transfer.
        cluster.config_toml = Some("[raft]\nsnapshot_after_entries = 500\n".into());
        for id in 1..=s.nodes {
            cluster.start_node(id, id == 1).await?;
        }
        let urls = mesh.urls();
        let client = warden::up::connect_as(&urls, "chaos", Some(&auth), "admin").await?;
        cluster
            .wait_ready(&client, s.nodes as usize, Duration::from_secs(60))
            .await?;
        Ok(World {
            urls,
            auth,
            mesh,
            proxies,
            cluster,
            client,
            expected_down: BTreeMap::new(),
            crashes: Vec::new(),
            procs: ProcessFaults {
                kills: Vec::new(),
                pauses: Vec::new(),
                // The nodes run with the default failure settings.
                lease_us: FailureConfig::default().lease_ms as i64 * 1_000,
            },
        })
    }

    /// The current leader, if the cluster answers quickly.
    pub async fn leader(&self) -> Option<u64> {
        let c = Client {
            deadline: Duration::from_secs(2),
            ..self.client.clone()
        };
        c.call("cluster_status", &json!({})).await.ok()?["leader"].as_u64()
    }

    /// A client connected to every server as `identity` (`admin`, `operator`, `viewer`).
    pub async fn connect(&self, identity: &str) -> anyhow::Result<Client> {
        warden::up::connect_as(&self.urls, "chaos", Some(&self.auth), identity).await
    }

    /// Notes nodes that exited without the harness asking: crashes (G5: never on input).
    pub fn reap_crashes(&mut self, now_ms: u64) {
        let mut gone = Vec::new();
        for (id, child) in self.cluster.nodes.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                gone.push((*id, status));
            }
        }
        for (id, status) in gone {
            self.cluster.nodes.remove(&id);
            // It ended at some moment before now: now is a safe end for what it ran.
            self.procs.kills.push(Kill {
                node: id,
                at_us: wall_us(),
            });
            if !self.expected_down.contains_key(&id) {
                self.crashes.push(format!(
                    "node {id} exited by itself at {now_ms} ms: {status}"
                ));
                // Bring it back so the run can go on; the crash is already a violation.
                self.expected_down.insert(id, true);
            }
        }
    }

    /// Injects one fault of `kind`, returning its target and, for a fault that lasts until it
    /// is healed, what to heal; `None` when the fault could not be injected now.
    pub async fn inject(
        &mut self,
        kind: &str,
        rng: &mut StdRng,
        active: &[Active],
    ) -> Option<(Option<Active>, String)> {
        let busy: Vec<u64> = active
            .iter()
            .filter_map(|a| match a {
                Active::Killed(n) | Active::Paused(n) | Active::Partitioned(n) => Some(*n),
                Active::NatsDown(_) | Active::RouteCut(..) => None,
            })
            .collect();
        let ids: Vec<u64> = self
            .proxies
            .keys()
            .copied()
            .filter(|id| !busy.contains(id))
            .collect();
        let pick = |rng: &mut StdRng| -> Option<u64> {
            (!ids.is_empty()).then(|| ids[rng.gen_range(0..ids.len())])
        };
        let target = match kind {
            "kill_leader" | "pause_leader" | "partition_leader" => {
                self.leader().await.filter(|l| !busy.contains(l))?
            }
            "nats_restart" => {
                // With a route cut, a third server down would leave the cut pair no route.
                if active
                    .iter()
                    .any(|a| matches!(a, Active::NatsDown(_) | Active::RouteCut(..)))
                {
                    return None;
                }
                let i = rng.gen_range(0..self.mesh.len());
                self.mesh.kill(i).await;
                return Some((Some(Active::NatsDown(i)), format!("nats-{i}")));
            }
            "route_cut" | "route_cut_one_way" => {
                // One route at a time, and no server down: either could leave a server with
                // no route at all.
                let n = self.mesh.len();
                if n < 3
                    || active
                        .iter()
                        .any(|a| matches!(a, Active::RouteCut(..) | Active::NatsDown(_)))
                {
                    return None;
                }
                let a = rng.gen_range(0..n);
                let b = (a + rng.gen_range(1..n)) % n;
                let how = if kind == "route_cut" {
                    RouteCut::Both
                } else {
                    RouteCut::OneWay
                };
                self.mesh.cut(a, b, how);
                let arrow = if how == RouteCut::Both { "<->" } else { "->" };
                return Some((Some(Active::RouteCut(a, b)), format!("nats-{a}{arrow}{b}")));
            }
            "rolling_restart" => {
                if !busy.is_empty() {
                    return None;
                }
                for id in self.proxies.keys().copied().collect::<Vec<_>>() {
                    self.expected_down.insert(id, true);
                    self.cluster.stop(id, Duration::from_secs(10)).await;
                    self.procs.kills.push(Kill {
                        node: id,
                        at_us: wall_us(),
                    });
                    let _ = self.cluster.start_node(id, false).await;
                    self.expected_down.remove(&id);
                    let c = Client {
                        node: Some(id),
                        deadline: Duration::from_secs(15),
                        ..self.client.clone()
                    };
                    let _ = c.call("health", &json!({})).await; // wait until it answers again
                }
                return Some((None, "all".into()));
            }
            _ => pick(rng)?,
        };
        let fault = match kind {
            "kill" | "kill_leader" => {
                self.expected_down.insert(target, true);
                self.cluster.kill(target).await;
                // Read after the process was reaped: nothing ran there past this moment.
                self.procs.kills.push(Kill {
                    node: target,
                    at_us: wall_us(),
                });
                Active::Killed(target)
            }
            "pause" | "pause_leader" => {
                let pid = self.cluster.pid(target)?;
                signal(pid, libc::SIGSTOP);
                self.procs.pauses.push(Pause {
                    node: target,
                    from_us: wall_us(),
                    to_us: None,
                });
                Active::Paused(target)
            }
            _ => {
                self.proxies.get(&target)?.set_blocked(true);
                Active::Partitioned(target)
            }
        };
        Some((Some(fault), format!("node-{target}")))
    }

    /// Undoes one fault.
    pub async fn heal(&mut self, fault: Active) {
        match fault {
            Active::Killed(id) => {
                if let Err(e) = self.cluster.start_node(id, false).await {
                    eprintln!("chaos: could not restart node {id}: {e}");
                }
                self.expected_down.remove(&id);
            }
            Active::Paused(id) => {
                // Read before the signal: the node runs again from then at the earliest.
                let resumed = wall_us();
                if let Some(pid) = self.cluster.pid(id) {
                    signal(pid, libc::SIGCONT);
                }
                let open = self.procs.pauses.iter_mut().rev();
                if let Some(p) = open.filter(|p| p.node == id).find(|p| p.to_us.is_none()) {
                    p.to_us = Some(resumed);
                }
            }
            Active::Partitioned(id) => {
                if let Some(p) = self.proxies.get(&id) {
                    p.set_blocked(false);
                }
            }
            Active::NatsDown(i) => {
                if let Err(e) = self.mesh.restart(i).await {
                    eprintln!("chaos: could not restart nats-{i}: {e}");
                }
            }
            Active::RouteCut(a, b) => self.mesh.heal(a, b),
        }
    }

    /// Restarts every node that is down (crashed or killed), so liveness can be checked.
    pub async fn restart_missing(&mut self) {
        let ids: Vec<u64> = self.proxies.keys().copied().collect();
        for id in ids {
            if !self.cluster.nodes.contains_key(&id) {
                let _ = self.cluster.start_node(id, false).await;
                self.expected_down.remove(&id);
            }
        }
    }

    /// Waits until every node is up with a leader, at most `within`.
    pub async fn wait_healthy(&self, nodes: usize, within: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        self.cluster
            .wait_ready(&self.client, nodes, within)
            .await
            .map(|_| start.elapsed())
            .map_err(|e| e.to_string())
    }
}

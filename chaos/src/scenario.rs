//! Scenarios are data: `chaos/scenarios/*.toml`. Every random choice of a run is drawn from one
//! seeded generator, so a seed and a scenario replay the same schedule.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

/// One scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Warden nodes (node 1 bootstraps).
    #[serde(default = "three")]
    pub nodes: u64,
    /// NATS servers: 1, or 3 for a NATS cluster (node i talks to server (i-1) % 3).
    #[serde(default = "one")]
    pub nats_servers: u64,
    /// nats-server's `ping_interval` (whole seconds), with `ping_max` 2: how soon a server
    /// notices a silent route or client. nats-server's own default is two minutes.
    #[serde(default)]
    pub nats_ping_interval_s: Option<u64>,
    /// Length of the safety phase (faults and workload), in seconds.
    pub safety_s: u64,
    /// How long the cluster may take to recover after healing, in seconds.
    #[serde(default = "sixty")]
    pub liveness_timeout_s: u64,
    pub workload: Workload,
    pub faults: Faults,
}

/// The client workload.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Concurrent clients.
    pub clients: usize,
    /// Relative weights of operations.
    pub create: u32,
    pub stop: u32,
    pub read: u32,
    pub bad_input: u32,
    /// `spawn_agent` of an `echo` or `counter` agent (permanent or transient) under the
    /// client's supervisor, `stop_agent` of one of them, and `list_agents` of that supervisor.
    #[serde(default)]
    pub spawn_agent: u32,
    #[serde(default)]
    pub stop_agent: u32,
    #[serde(default)]
    pub agent_read: u32,
    /// Increments of the client's durable counter (an agent call), and reads of it.
    #[serde(default)]
    pub increment: u32,
    #[serde(default)]
    pub counter_read: u32,
    /// `migrate_agent` of a durable counter (any client's), to a random node or the best one.
    #[serde(default)]
    pub migrate: u32,
    /// `drain_node` of a random node, cancelled by the same client 1 to 5 s later (and, at the
    /// latest, by the harness after healing).
    #[serde(default)]
    pub drain: u32,
    /// Client-side deadline of one operation, in ms; past it the outcome is unknown.
    pub op_timeout_ms: u64,
    /// Pause between one client's operations, in ms.
    #[serde(default)]
    pub think_ms: u64,
    /// Pause between the hostile client's sends (`hostile.rs`), in ms; 0 runs none.
    #[serde(default)]
    pub hostile_ms: u64,
}

impl Workload {
    /// Whether the workload uses the clients' durable counters (and so creates them).
    pub fn uses_counters(&self) -> bool {
        self.increment + self.counter_read + self.migrate > 0
    }

    /// Whether the workload runs agents at all (its counters or agents of its own).
    pub fn uses_agents(&self) -> bool {
        self.uses_counters() || self.spawn_agent > 0
    }
}

/// The fault schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Time between the starts of two faults: a random value in [min, max] ms.
    pub interval_ms: [u64; 2],
    /// How long a fault lasts before it is healed: a random value in [min, max] ms.
    pub duration_ms: [u64; 2],
    /// Relative weights of fault kinds: `kill`, `kill_leader`, `pause`, `pause_leader`,
    /// `partition`, `partition_leader`, `nats_restart`, `rolling_restart`, and with three NATS
    /// servers `route_cut` (the route between two servers, both ways) and `route_cut_one_way`
    /// (what one server sends the other is held).
    pub kinds: BTreeMap<String, u32>,
}

fn one() -> u64 {
    1
}
fn three() -> u64 {
    3
}
fn sixty() -> u64 {
    60
}

/// Fault kinds the harness knows.
pub const FAULT_KINDS: &[&str] = &[
    "kill",
    "kill_leader",
    "pause",
    "pause_leader",
    "partition",
    "partition_leader",
    "nats_restart",
    "rolling_restart",
    "route_cut",
    "route_cut_one_way",
];

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {path:?}"))?;
        let s: Scenario = toml::from_str(&text).with_context(|| format!("parse {path:?}"))?;
        anyhow::ensure!(s.nodes >= 1, "nodes must be at least 1");
        anyhow::ensure!(
            [1, 3].contains(&s.nats_servers),
            "nats_servers must be 1 or 3"
        );
        anyhow::ensure!(s.workload.clients >= 1, "at least one client");
        for k in s.faults.kinds.keys() {
            anyhow::ensure!(
                FAULT_KINDS.contains(&k.as_str()),
                "unknown fault kind {k:?}"
            );
        }
        anyhow::ensure!(
            s.faults.interval_ms[0] <= s.faults.interval_ms[1],
            "interval_ms is [min, max]"
        );
        anyhow::ensure!(
            s.faults.duration_ms[0] <= s.faults.duration_ms[1],
            "duration_ms is [min, max]"
        );
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_files_without_the_newer_operations_still_parse() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/ci.toml"))
                .unwrap();
        let s: Scenario = toml::from_str(&text).unwrap();
        assert!(s.workload.migrate > 0 && s.workload.drain > 0);
        assert!(s.workload.spawn_agent > 0 && s.workload.stop_agent > 0);
        let old: String = text
            .lines()
            .filter(|l| {
                ![
                    "migrate",
                    "drain",
                    "spawn_agent",
                    "stop_agent",
                    "agent_read",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let s: Scenario = toml::from_str(&old).unwrap();
        assert_eq!((s.workload.migrate, s.workload.drain), (0, 0));
        let w = &s.workload;
        assert_eq!((w.spawn_agent, w.stop_agent, w.agent_read), (0, 0, 0));
    }
}

//! Node configuration: a TOML file, overridden by `WARDEN_*` environment variables, overridden
//! by command-line flags. `config/node.example.toml` documents every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::bus::NatsConfig;
use crate::limits;
use crate::registry::{validate_labels, validate_name};

/// The node's `[exec]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Off unless set: `exec` agents fail to start with a clear error.
    pub enabled: bool,
    /// What may run: absolute paths (any arguments, any working directory), or rules that
    /// fix more (`ExecRule`). A request names a command exactly; the first entry for it that
    /// the request satisfies decides.
    pub allow: Vec<AllowEntry>,
    /// The node's environment variables an exec process gets; it gets no other (never a
    /// `WARDEN_*` one: the node's identity and settings are not the agent's business).
    pub pass_env: Vec<String>,
    /// The binary that runs an exec process under a small supervisor (`warden exec-shim`):
    /// it kills the process's whole tree, grandchildren that left its group included, when
    /// the agent stops, is dropped, or its node dies, even by SIGKILL. `warden node` sets it
    /// to itself; a program embedding a node sets it to a `warden` binary (or calls
    /// `agent::exec_shim::run_if_invoked` first in its `main` and names itself). Without one,
    /// an exec process is a direct child, killed with its node by its parent-death signal,
    /// and its own children outlive a SIGKILLed node.
    pub shim: Option<PathBuf>,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            enabled: false,
            allow: Vec::new(),
            pass_env: ["PATH", "LANG", "LC_ALL", "TZ"].map(String::from).to_vec(),
            shim: None,
        }
    }
}

/// One entry of `[exec] allow`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AllowEntry {
    /// This command, with any arguments, in any working directory, as the node's user.
    Path(PathBuf),
    Rule(ExecRule),
}

impl From<&str> for AllowEntry {
    fn from(path: &str) -> Self {
        AllowEntry::Path(path.into())
    }
}

impl From<PathBuf> for AllowEntry {
    fn from(path: PathBuf) -> Self {
        AllowEntry::Path(path)
    }
}

impl AllowEntry {
    /// The command it allows.
    pub fn command(&self) -> &Path {
        match self {
            AllowEntry::Path(p) => p,
            AllowEntry::Rule(r) => &r.command,
        }
    }
}

/// A command allowed with its arguments' prefix, working directory, user and limits fixed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRule {
    /// Absolute path of the command.
    pub command: PathBuf,
    /// A request's arguments must begin with these.
    #[serde(default)]
    pub args_prefix: Vec<String>,
    /// The process runs here; a request may name no other directory.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// The user and group it runs as (the node needs the privilege to switch).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub rlimits: Rlimits,
    /// The environment variables a request may set (none by default): a rule that fixes the
    /// arguments must not let `BASH_ENV`, `PERL5OPT`, `NODE_OPTIONS` and the like run other
    /// code. A plain path entry lets a request set any but `WARDEN_*` and `LD_*` (its
    /// arguments are free anyway).
    #[serde(default)]
    pub env: Vec<String>,
}

/// Resource limits of an exec process (setrlimit, soft and hard alike), inherited by its
/// children. Unset is the node's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    /// Open files (RLIMIT_NOFILE).
    #[serde(default)]
    pub nofile: Option<u64>,
    /// Processes of its user (RLIMIT_NPROC).
    #[serde(default)]
    pub nproc: Option<u64>,
    /// Address space, in bytes (RLIMIT_AS).
    #[serde(default)]
    pub as_bytes: Option<u64>,
    /// CPU time, in seconds (RLIMIT_CPU).
    #[serde(default)]
    pub cpu_s: Option<u64>,
    /// Largest file it may write, in bytes (RLIMIT_FSIZE).
    #[serde(default)]
    pub fsize_bytes: Option<u64>,
}

impl ExecConfig {
    /// Checks the allow-list, the variables passed on and the shim.
    pub fn validate(&self) -> anyhow::Result<()> {
        for entry in &self.allow {
            let cmd = entry.command();
            if !cmd.is_absolute() {
                bail!("exec.allow lists absolute paths only, not {cmd:?}");
            }
            if let AllowEntry::Rule(r) = entry {
                if r.cwd.as_ref().is_some_and(|d| !d.is_absolute()) {
                    bail!("exec.allow: the cwd of {cmd:?} must be an absolute path");
                }
                // Without a gid, the process would keep the node's group (root's, often).
                if r.uid.is_some() && r.gid.is_none() {
                    bail!("exec.allow: the rule for {cmd:?} sets uid, so it must set gid too");
                }
            }
        }
        for name in &self.pass_env {
            if name.starts_with("WARDEN_") || name.is_empty() || name.contains('=') {
                bail!("exec.pass_env cannot pass {name:?}");
            }
        }
        if self.shim.as_ref().is_some_and(|p| !p.is_absolute()) {
            bail!("exec.shim must be an absolute path");
        }
        Ok(())
    }
}

/// A node's resolved configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id: unique in the cluster and stable across restarts. Required.
    pub id: u64,
    /// Cluster name: all subjects live under `warden.<cluster>`.
    pub cluster: String,
    /// Human-readable node name; defaults to `node-<id>`.
    pub name: String,
    /// Directory of the node's sled database.
    pub data_dir: PathBuf,
    /// Initialize a new cluster with this node as its only member. Ignored when the data dir
    /// already holds an initialized node.
    pub bootstrap: bool,
    /// Labels (`zone=eu-1`) used by placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Agents this node may hold; 0 is unlimited.
    pub capacity: u32,
    /// Raft voters the leader keeps: 1, 3 or 5; further nodes join as learners.
    pub voters_max: usize,
    /// This node's identity: its seed file from `warden auth` (`node-<id>.nk`). Without one
    /// (and without other NATS credentials) the node warns that the cluster is open to anyone
    /// on its NATS server.
    pub auth: Option<PathBuf>,
    /// Most time (ms) from SIGTERM to exit, whatever state Raft or NATS is in. The node's
    /// agents get all of it but `limits::STOP_TAIL_MS` to stop, one after the other; the rest
    /// are then dropped (an `exec` process group is killed).
    pub stop_timeout_ms: u64,
    pub nats: NatsConfig,
    pub raft: RaftConfig,
    pub failure: FailureConfig,
    pub placement: PlacementConfig,
    /// The `exec` kind: off unless enabled, and then only allow-listed commands.
    pub exec: ExecConfig,
    /// Prometheus metrics over HTTP: off unless `listen` is set.
    pub metrics: MetricsConfig,
    /// The lifecycle history in JetStream (`history`).
    pub history: crate::history::HistoryConfig,
    /// OpenTelemetry traces over OTLP/HTTP: off unless `endpoint` is set (`traces`).
    pub traces: crate::traces::TracesConfig,
}

/// The node's `[metrics]` config section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address (`127.0.0.1:9464`) of the HTTP listener that serves `GET /metrics` in the
    /// Prometheus text format. Unset: no listener. It has no authentication: bind it to an
    /// address only the scraper reaches.
    pub listen: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 0,
            cluster: "default".into(),
            name: String::new(),
            data_dir: PathBuf::new(),
            bootstrap: false,
            labels: BTreeMap::new(),
            capacity: 0,
            voters_max: 3,
            auth: None,
            stop_timeout_ms: limits::DEFAULT_STOP_TIMEOUT_MS,
            nats: NatsConfig::default(),
            raft: RaftConfig::default(),
            failure: FailureConfig::default(),
            placement: PlacementConfig::default(),
            exec: Default::default(),
            metrics: Default::default(),
            history: Default::default(),
            traces: Default::default(),
        }
    }
}

/// Raft timings and log compaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat interval, in ms.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in [min, max] ms starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries since the last one...
    pub snapshot_after_entries: u64,
    /// ...or once the entries appended since the last one take this many bytes, whichever
    /// comes first: a few large entries (checkpoints, groups) must not grow the log and a
    /// restart's replay without bound.
    pub snapshot_after_bytes: u64,
    /// Entries kept in the log behind the snapshot, so slightly lagging followers catch up
    /// from the log rather than a snapshot (the node purges the rest: `raft::snapshots`)...
    pub keep_entries_after_snapshot: u64,
    /// ...and at most this many bytes of them: replaying a large log costs a follower more
    /// than installing the snapshot (`raft::snapshots`).
    pub keep_bytes_after_snapshot: u64,
    /// Timeout of one snapshot chunk, in ms; the last chunk's answer waits for the install
    /// too (decoding and indexing the registry: seconds at a million agents).
    pub install_snapshot_timeout_ms: u64,
    /// Snapshot chunk size, in bytes; must stay well below NATS `max_payload`.
    pub snapshot_chunk_bytes: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_after_entries: 10_000,
            snapshot_after_bytes: limits::DEFAULT_SNAPSHOT_AFTER_BYTES,
            keep_entries_after_snapshot: 1_000,
            keep_bytes_after_snapshot: limits::DEFAULT_KEEP_BYTES_AFTER_SNAPSHOT,
            install_snapshot_timeout_ms: 15_000,
            snapshot_chunk_bytes: limits::SNAPSHOT_CHUNK_BYTES,
        }
    }
}

impl RaftConfig {
    /// Checks the relations between timings.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.heartbeat_interval_ms == 0 {
            bail!("raft.heartbeat_interval_ms must be positive");
        }
        // A follower must hear several heartbeats before it may time out, or a single late
        // heartbeat starts a needless election.
        if self.heartbeat_interval_ms * 3 > self.election_timeout_min_ms {
            bail!("raft.heartbeat_interval_ms x 3 must not exceed raft.election_timeout_min_ms");
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            bail!("raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms");
        }
        if self.snapshot_chunk_bytes == 0
            || self.snapshot_chunk_bytes as usize > limits::MIN_SERVER_MAX_PAYLOAD_BYTES / 2
        {
            bail!("raft.snapshot_chunk_bytes must be between 1 and half of NATS max_payload");
        }
        if self.snapshot_after_entries == 0 {
            bail!("raft.snapshot_after_entries must be positive");
        }
        if self.snapshot_after_bytes < limits::MIN_SNAPSHOT_AFTER_BYTES {
            bail!(
                "raft.snapshot_after_bytes must be at least {}",
                limits::MIN_SNAPSHOT_AFTER_BYTES
            );
        }
        Ok(())
    }

    /// The openraft configuration for these settings.
    pub fn to_openraft(&self, cluster: &str) -> anyhow::Result<openraft::Config> {
        let cfg = openraft::Config {
            cluster_name: cluster.to_string(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: limits::MAX_APPEND_ENTRIES,
            // The node decides when (`raft::snapshots`): by entries or by bytes.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            // The node purges behind a snapshot itself (`raft::snapshots`), by entries and by
            // bytes: openraft's own purge by entries would schedule purges that go backwards
            // from the node's, which openraft does not allow.
            max_in_snapshot_log_to_keep: u64::MAX,
            // Elections follow a pre-vote (`raft::election`), which openraft 0.9 lacks.
            enable_elect: false,
            ..Default::default()
        };
        Ok(cfg.validate()?)
    }
}

/// Failure detection and leases (ARCHITECTURE.md, "At most one", has the timing argument).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailureConfig {
    /// Every node sends the leader a heartbeat (with its load) this often (ms).
    pub heartbeat_interval_ms: u64,
    /// A granted heartbeat lets a node run its agents for this long (ms) from when it asked.
    pub lease_ms: u64,
    /// A node the leader has not heard from this long (ms) is `suspect`: no new agents.
    pub suspect_after_ms: u64,
    /// A node the leader has not heard from this long (ms) is `down`: its agents are placed
    /// elsewhere. Must exceed `lease_ms` by `limits::LEASE_MARGIN_MS`.
    pub down_after_ms: u64,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            heartbeat_interval_ms: 100,
            lease_ms: 1_000,
            suspect_after_ms: 500,
            down_after_ms: 1_400,
        }
    }
}

impl FailureConfig {
    /// Checks the relations the at-most-one guarantee (G1) and liveness rest on.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.heartbeat_interval_ms == 0 {
            bail!("failure.heartbeat_interval_ms must be positive");
        }
        // Two heartbeats may be lost before a lease runs out.
        if self.heartbeat_interval_ms * 3 > self.lease_ms {
            bail!("failure.heartbeat_interval_ms x 3 must not exceed failure.lease_ms");
        }
        if self.suspect_after_ms <= self.heartbeat_interval_ms {
            bail!("failure.suspect_after_ms must exceed failure.heartbeat_interval_ms");
        }
        if self.suspect_after_ms >= self.down_after_ms {
            bail!("failure.suspect_after_ms must be below failure.down_after_ms");
        }
        // G1: the node stops its agents before the leader may place them elsewhere.
        if self.lease_ms + limits::LEASE_MARGIN_MS > self.down_after_ms {
            bail!(
                "failure.down_after_ms must exceed failure.lease_ms by at least {} ms, or an \
                 agent could run on two nodes at once",
                limits::LEASE_MARGIN_MS
            );
        }
        Ok(())
    }
}

const _: () = {
    let d = FailureConfig {
        heartbeat_interval_ms: 100,
        lease_ms: 1_000,
        suspect_after_ms: 500,
        down_after_ms: 1_400,
    };
    assert!(d.lease_ms + limits::LEASE_MARGIN_MS <= d.down_after_ms);
    assert!(d.heartbeat_interval_ms * 3 <= d.lease_ms);
};

/// Drains and automatic rebalancing, carried out by the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// Agents of a draining node moving at once.
    pub drain_concurrency: usize,
    /// Rebalance by itself when the imbalance crosses `rebalance_threshold`.
    pub auto_rebalance: bool,
    /// (most - fewest agents) / mean over the open nodes that starts an automatic rebalance.
    pub rebalance_threshold: f64,
    /// Moves of one automatic rebalance.
    pub rebalance_max_moves: usize,
    /// Least time (ms) between two automatic rebalances, so that it never flaps.
    pub rebalance_cooldown_ms: u64,
    /// How often (ms) the leader copies the nodes' reported loads into the registry.
    pub load_report_ms: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            drain_concurrency: 32,
            auto_rebalance: false,
            rebalance_threshold: 0.5,
            rebalance_max_moves: 16,
            rebalance_cooldown_ms: 60_000,
            load_report_ms: 5_000,
        }
    }
}

impl PlacementConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.drain_concurrency == 0 || self.drain_concurrency > limits::REBALANCE_MOVES_MAX {
            bail!(
                "placement.drain_concurrency must be between 1 and {}",
                limits::REBALANCE_MOVES_MAX
            );
        }
        if self.rebalance_max_moves == 0 || self.rebalance_max_moves > limits::REBALANCE_MOVES_MAX {
            bail!(
                "placement.rebalance_max_moves must be between 1 and {}",
                limits::REBALANCE_MOVES_MAX
            );
        }
        if self.rebalance_threshold.is_nan() || self.rebalance_threshold <= 0.0 {
            bail!("placement.rebalance_threshold must be positive");
        }
        if self.load_report_ms < 100 {
            bail!("placement.load_report_ms must be at least 100");
        }
        Ok(())
    }
}

impl NodeConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {path:?}"))?;
        toml::from_str(&text).with_context(|| format!("parse {path:?}"))
    }

    /// Fills derived defaults and checks the whole configuration.
    pub fn finish(mut self) -> anyhow::Result<NodeConfig> {
        if self.id == 0 {
            bail!(
                "a node id is required (--id, WARDEN_ID or `id` in the config): a positive integer"
            );
        }
        validate_name("cluster", &self.cluster).map_err(|e| anyhow::anyhow!(e.message))?;
        if self.name.is_empty() {
            self.name = format!("node-{}", self.id);
        }
        validate_name("name", &self.name).map_err(|e| anyhow::anyhow!(e.message))?;
        validate_labels(&self.labels).map_err(|e| anyhow::anyhow!(e.message))?;
        if self.data_dir.as_os_str().is_empty() {
            self.data_dir = PathBuf::from(format!("./data/{}-{}", self.cluster, self.id));
        }
        if !limits::VOTERS_MAX_ALLOWED.contains(&self.voters_max) {
            bail!("voters_max must be 1, 3 or 5, not {}", self.voters_max);
        }
        let stop = limits::MIN_STOP_TIMEOUT_MS..=limits::MAX_STOP_TIMEOUT_MS;
        if !stop.contains(&self.stop_timeout_ms) {
            bail!(
                "stop_timeout_ms must be between {} and {}, not {}",
                stop.start(),
                stop.end(),
                self.stop_timeout_ms
            );
        }
        self.failure.validate()?;
        self.placement.validate()?;
        self.raft.validate()?;
        self.exec.validate()?;
        self.history.validate()?;
        self.traces.validate()?;
        if let Some(path) = &self.auth {
            let me = crate::auth::node_identity(self.id);
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if crate::auth::node_of(stem).is_some_and(|other| other != self.id) {
                bail!(
                    "node {} cannot use {path:?}: that is the identity of {stem}",
                    self.id
                );
            }
            let identity = crate::auth::Identity::load(path, &self.cluster, Some(&me))?;
            self.nats.identity = Some(identity);
        }
        Ok(self)
    }
}

/// Parses `k=v,k2=v2` into a label map.
pub fn parse_labels(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            bail!("label {part:?} is not key=value");
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_is_valid() {
        let text = include_str!("../config/node.example.toml");
        let cfg: NodeConfig = toml::from_str(text).unwrap();
        cfg.finish().unwrap();
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let base = NodeConfig {
            id: 1,
            ..Default::default()
        };
        let e = NodeConfig {
            voters_max: 2,
            ..base.clone()
        }
        .finish()
        .unwrap_err();
        assert!(e.to_string().contains("voters_max"));
        let mut c = base.clone();
        c.raft.election_timeout_min_ms = 100;
        assert!(c.finish().unwrap_err().to_string().contains("heartbeat"));
        let mut c = base.clone();
        c.failure.down_after_ms = c.failure.lease_ms + 100;
        assert!(
            c.finish().unwrap_err().to_string().contains("two nodes"),
            "a lease too close to down_after_ms breaks at-most-one"
        );
        assert!(NodeConfig::default().finish().is_err(), "id is required");
        assert!(
            toml::from_str::<NodeConfig>("idd = 3").is_err(),
            "typos are refused"
        );
    }

    #[test]
    fn labels_parse_from_the_flag_syntax() {
        let l = parse_labels("zone=eu-1, rack=r2").unwrap();
        assert_eq!(l["zone"], "eu-1");
        assert_eq!(l["rack"], "r2");
        assert!(parse_labels("zone").is_err());
    }
}

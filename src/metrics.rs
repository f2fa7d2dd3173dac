//! Per-node Prometheus metrics: counters and histograms kept as things happen, gauges read at
//! each scrape from the node's Raft metrics, registry and lease, exposed over HTTP on
//! `[metrics] listen` (off unless set) at `GET /metrics` in the Prometheus text format.
//!
//! Labels are bounded: a command label is a name from the command table (anything else is
//! `unknown`), an outcome is `ok` or an error code, a status is one of the registry's
//! statuses. Nothing is labelled per agent, per supervisor or per client: a million agents
//! make no more series than one. Per-agent figures are answered by commands.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use crate::node::Node;
use crate::protocol::WireError;
use crate::registry::{AgentStatus, NodeStatus};

/// Scrapes served at once; more wait for a turn (a scrape of a large registry counts its
/// agents, which takes a moment).
const MAX_SCRAPES: usize = 4;
/// Connections open at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandOutcome {
    command: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    entity: &'static str,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    kind: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabel {
    how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why a node refused a call before it reached an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such agent (answered by the leader).
    NotFound,
    /// The body or the operation was not understood.
    BadRequest,
    /// The agent is migrating.
    Moving,
    /// The agent is placed here but has no instance running.
    NotRunning,
    /// The instance is restarting or stopping: its mailbox is closed.
    Stopping,
    /// This node's lease ran out.
    LeaseLost,
    /// The call named another epoch of the agent.
    StaleEpoch,
    /// The agent's mailbox is full.
    MailboxFull,
}

impl Refusal {
    const ALL: [Refusal; 8] = [
        Refusal::NotFound,
        Refusal::BadRequest,
        Refusal::Moving,
        Refusal::NotRunning,
        Refusal::Stopping,
        Refusal::LeaseLost,
        Refusal::StaleEpoch,
        Refusal::MailboxFull,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::BadRequest => "bad_request",
            Refusal::Moving => "moving",
            Refusal::NotRunning => "not_running",
            Refusal::Stopping => "stopping",
            Refusal::LeaseLost => "lease_lost",
            Refusal::StaleEpoch => "stale_epoch",
            Refusal::MailboxFull => "mailbox_full",
        }
    }
}

/// What the host saw of its instances in one pass over them: their mailboxes, and the
/// process groups of its `exec` agents.
#[derive(Debug, Default)]
pub struct HostPass {
    messages: u64,
    fullest: u64,
    exec_groups: Vec<u32>,
}

impl HostPass {
    /// One instance: messages waiting in its mailbox, and its process group (0 for none).
    pub fn saw(&mut self, depth: usize, pid: u32) {
        self.messages += depth as u64;
        self.fullest = self.fullest.max(depth as u64);
        if pid != 0 {
            self.exec_groups.push(pid);
        }
    }
}

/// How a call to an agent ended, as the agent's node saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// Answered with a result.
    Ok,
    /// The agent refused the request (`bad_request`); it runs on.
    Refused,
    /// The agent crashed or panicked handling it.
    Crashed,
    /// Answered with another error (its checkpoint could not be written).
    Failed,
}

impl CallOutcome {
    const ALL: [CallOutcome; 4] = [
        CallOutcome::Ok,
        CallOutcome::Refused,
        CallOutcome::Crashed,
        CallOutcome::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Refused => "refused",
            CallOutcome::Crashed => "crashed",
            CallOutcome::Failed => "failed",
        }
    }
}

/// One kind's call metrics, made once at start so that a call costs no lookup.
#[derive(Debug)]
struct KindCalls {
    outcomes: [Counter; 4],
    seconds: Histogram,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// One node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    commands: Family<CommandOutcome, Counter>,
    command_seconds: HistogramFamily<CommandLabel>,
    grants: Counter,
    raft_term: Gauge,
    raft_leader: Gauge,
    raft_applied: Gauge,
    raft_last_log: Gauge,
    raft_snapshot: Gauge,
    raft_quorum_ack_age: Gauge<f64, AtomicU64>,
    supervisors: Gauge,
    agents: Family<StatusLabel, Gauge>,
    nodes: Family<StatusLabel, Gauge>,
    running: Gauge,
    lease_valid: Gauge,
    cut_off: Gauge,
    resident_bytes: Gauge,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    nats_connects: Counter,
    nats_slow_consumers: Counter,
    registry_events: Family<EventLabels, Counter>,
    /// Per kind, in the order of `Kinds::names` (`kind_index`).
    calls: Vec<KindCalls>,
    log_flush_seconds: Histogram,
    log_append_seconds: Histogram,
    replication_lag: Family<PeerLabel, Gauge>,
    raft_commit: Gauge,
    snapshots: Family<HowLabel, Counter>,
    fences: Counter,
    calls_refused: Family<ReasonLabel, Counter>,
    mailbox_messages: Gauge,
    mailbox_fullest: Gauge,
    exec_processes: Gauge,
    exec_resident_bytes: Gauge,
    exec_cpu_seconds: Gauge<f64, AtomicU64>,
    /// The `exec` agents' process groups as of the host's last pass, read at each scrape.
    exec_groups: Mutex<Vec<u32>>,
    /// When `/proc` was last read for them: at most once a second, however often scraped.
    exec_read: Mutex<Option<std::time::Instant>>,
    /// The commit index seen in AppendEntries (`raft::CommitIndex`).
    commit: Arc<crate::raft::CommitIndex>,
    /// Messages dropped by the node's NATS subscriptions, one count per connection.
    slow_counters: Mutex<Vec<Arc<AtomicU64>>>,
    last_slow: AtomicU64,
    /// What the process and the NATS client had counted at the last scrape: counters move by
    /// the difference.
    last_cpu_ticks: AtomicU64,
    last_connects: AtomicU64,
    /// One scrape refreshes and encodes at a time, so that two never interleave their reads.
    scrape: Mutex<()>,
    /// Whether anything is counted: only when the node serves its metrics, so that a node
    /// without the listener pays nothing (what `warden bench --metrics-cost` compares).
    enabled: bool,
}

fn command_histogram() -> Histogram {
    // 100 us to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(&[], true)
    }
}

impl Metrics {
    /// The metrics of a node whose agent kinds are `kinds` (`Kinds::names`); `enabled` says
    /// whether events are counted at all (the node serves them).
    pub fn new(kinds: &[String], enabled: bool) -> Metrics {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("warden");
        let commands = Family::<CommandOutcome, Counter>::default();
        registry.register(
            "commands",
            "Commands this node answered to clients, by command and outcome (ok, or the error code)",
            commands.clone(),
        );
        let command_seconds: HistogramFamily<CommandLabel> =
            Family::new_with_constructor(command_histogram);
        registry.register(
            "command_duration_seconds",
            "Time from a client's command arriving at this node to its answer",
            command_seconds.clone(),
        );
        let grants = Counter::default();
        registry.register(
            "lease_grants",
            "Leases this node granted to nodes' heartbeats while it led",
            grants.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let raft_term = gauge(registry, "raft_term", "This node's Raft term");
        let raft_leader = gauge(registry, "raft_leader", "1 if this node leads, else 0");
        let raft_applied = gauge(
            registry,
            "raft_applied_index",
            "Index of the last log entry this node applied",
        );
        let raft_last_log = gauge(
            registry,
            "raft_last_log_index",
            "Index of the last entry in this node's log",
        );
        let raft_snapshot = gauge(
            registry,
            "raft_snapshot_index",
            "Last log index this node's snapshot covers",
        );
        let raft_quorum_ack_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "raft_quorum_ack_age_seconds",
            "On the leader: time since a majority last acknowledged it (-1 elsewhere)",
            raft_quorum_ack_age.clone(),
        );
        let supervisors = gauge(
            registry,
            "registry_supervisors",
            "Supervisors in the registry",
        );
        let agents = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "registry_agents",
            "Agents in the registry, by status",
            agents.clone(),
        );
        let nodes = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "registry_nodes",
            "Nodes in the registry, by status",
            nodes.clone(),
        );
        let running = gauge(
            registry,
            "node_agents_running",
            "Agents running on this node",
        );
        let lease_valid = gauge(
            registry,
            "lease_valid",
            "1 if this node holds a lease and may run agents, else 0",
        );
        let cut_off = gauge(
            registry,
            "cut_off",
            "1 if this node is cut off from its leader (or, leading, from its majority), else 0",
        );
        let resident_bytes = Gauge::default();
        let cpu_seconds = Counter::<f64, AtomicU64>::default();
        let nats_connects = Counter::default();
        registry.register(
            "nats_connects",
            "Connections this node's NATS client made, the first and every reconnect",
            nats_connects.clone(),
        );
        let nats_slow_consumers = Counter::default();
        registry.register(
            "nats_slow_consumers",
            "Times a subscription of this node overflowed and NATS dropped its messages",
            nats_slow_consumers.clone(),
        );
        let registry_events = Family::<EventLabels, Counter>::default();
        registry.register(
            "registry_events",
            "Lifecycle events this node applied from the log (every node applies them all), by \
             entity and event: agents placed, started, crashed, restarted, stopped; supervisors \
             escalated; nodes up and down",
            registry_events.clone(),
        );
        let call_counts = Family::<CallLabels, Counter>::default();
        registry.register(
            "agent_calls",
            "Calls the agents of this node handled, by kind and outcome",
            call_counts.clone(),
        );
        let call_seconds: HistogramFamily<KindLabel> =
            Family::new_with_constructor(command_histogram);
        registry.register(
            "agent_call_duration_seconds",
            "Time an agent of this node took to handle a call, by kind",
            call_seconds.clone(),
        );
        let calls = kinds
            .iter()
            .map(|kind| KindCalls {
                outcomes: CallOutcome::ALL.map(|o| {
                    let labels = CallLabels {
                        kind: kind.clone(),
                        outcome: o.as_str(),
                    };
                    call_counts.get_or_create(&labels).clone()
                }),
                seconds: call_seconds
                    .get_or_create(&KindLabel { kind: kind.clone() })
                    .clone(),
            })
            .collect();
        let log_flush_seconds = command_histogram();
        registry.register(
            "raft_log_flush_duration_seconds",
            "Time to flush appended Raft log entries to disk (one flush may cover several appends)",
            log_flush_seconds.clone(),
        );
        let log_append_seconds = command_histogram();
        registry.register(
            "raft_log_append_duration_seconds",
            "Time from Raft appending entries to this node's log to their being on disk",
            log_append_seconds.clone(),
        );
        let replication_lag = Family::<PeerLabel, Gauge>::default();
        registry.register(
            "raft_replication_lag_entries",
            "On the leader: log entries each follower lacks, by peer node id",
            replication_lag.clone(),
        );
        let raft_commit = gauge(
            registry,
            "raft_commit_index",
            "The leader's commit index as last announced in an AppendEntries (sent or received)",
        );
        let snapshots = Family::<HowLabel, Counter>::default();
        registry.register(
            "raft_snapshots",
            "Snapshots of the registry this node built (`how=\"built\"`) or installed from the \
             leader (`how=\"installed\"`)",
            snapshots.clone(),
        );
        // Every series from the start: a rate over a series that appears late misses its first
        // increase.
        for how in ["built", "installed"] {
            let _ = snapshots.get_or_create(&HowLabel { how });
        }
        let fences = Counter::default();
        registry.register(
            "lease_fences",
            "Agent instances this node dropped because its lease ran out",
            fences.clone(),
        );
        let calls_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "agent_calls_refused",
            "Calls this node refused before they reached an agent, by reason (the caller is told \
             to retry for moving, not_running, stopping, lease_lost and mailbox_full)",
            calls_refused.clone(),
        );
        for r in Refusal::ALL {
            let _ = calls_refused.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        let mailbox_messages = gauge(
            registry,
            "agent_mailbox_messages",
            "Messages waiting in the mailboxes of this node's agents, as of the host's last pass \
             over them (every 0.5 s or so)",
        );
        let mailbox_fullest = gauge(
            registry,
            "agent_mailbox_messages_max",
            "Messages waiting in the fullest mailbox of this node's agents, as of the host's last \
             pass",
        );
        let exec_processes = gauge(
            registry,
            "exec_processes",
            "Process groups of this node's exec agents that are running",
        );
        let exec_resident_bytes = gauge(
            registry,
            "exec_resident_memory_bytes",
            "Resident memory of this node's exec agents' processes, summed",
        );
        let exec_cpu_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "exec_cpu_seconds",
            "CPU time the running processes of this node's exec agents have used, summed (it \
             drops when a process ends)",
            exec_cpu_seconds.clone(),
        );
        {
            // The names Prometheus's own process collectors use.
            let process = root.sub_registry_with_prefix("process");
            process.register(
                "resident_memory_bytes",
                "Resident memory of this process",
                resident_bytes.clone(),
            );
            process.register(
                "cpu_seconds",
                "CPU time this process used, user and system",
                cpu_seconds.clone(),
            );
        }
        Metrics {
            registry: root,
            commands,
            command_seconds,
            grants,
            raft_term,
            raft_leader,
            raft_applied,
            raft_last_log,
            raft_snapshot,
            raft_quorum_ack_age,
            supervisors,
            agents,
            nodes,
            running,
            lease_valid,
            cut_off,
            resident_bytes,
            cpu_seconds,
            nats_connects,
            nats_slow_consumers,
            registry_events,
            calls,
            log_flush_seconds,
            log_append_seconds,
            replication_lag,
            raft_commit,
            snapshots,
            fences,
            calls_refused,
            mailbox_messages,
            mailbox_fullest,
            exec_processes,
            exec_resident_bytes,
            exec_cpu_seconds,
            exec_groups: Mutex::new(Vec::new()),
            exec_read: Mutex::new(None),
            commit: Default::default(),
            slow_counters: Mutex::new(Vec::new()),
            last_slow: AtomicU64::new(0),
            last_cpu_ticks: AtomicU64::new(0),
            last_connects: AtomicU64::new(0),
            scrape: Mutex::new(()),
            enabled,
        }
    }

    /// Whether events are counted (see `enabled`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Counts a client's command answered by this node.
    pub fn command(&self, name: &str, result: Result<(), &WireError>, took: Duration) {
        if !self.enabled {
            return;
        }
        let command = crate::command::spec(name).map_or("unknown", |s| s.name);
        let outcome = match result {
            Ok(()) => "ok",
            Err(e) => e.code.as_str(),
        };
        self.commands
            .get_or_create(&CommandOutcome { command, outcome })
            .inc();
        self.command_seconds
            .get_or_create(&CommandLabel { command })
            .observe(took.as_secs_f64());
    }

    /// Counts a lease granted.
    pub fn granted(&self) {
        if !self.enabled {
            return;
        }
        self.grants.inc();
    }

    /// Counts the lifecycle events of an applied entry.
    pub fn applied(&self, events: &[crate::registry::RegistryEvent]) {
        if !self.enabled {
            return;
        }
        for e in events {
            self.registry_events
                .get_or_create(&EventLabels {
                    entity: e.entity,
                    event: e.event,
                })
                .inc();
        }
    }

    /// Counts a call an agent of kind number `kind` (`kind_index`) handled.
    pub fn call(&self, kind: u16, outcome: CallOutcome, took: Duration) {
        if !self.enabled {
            return;
        }
        let Some(k) = self.calls.get(kind as usize) else {
            return;
        };
        let i = CallOutcome::ALL.iter().position(|o| *o == outcome);
        if let Some(c) = i.and_then(|i| k.outcomes.get(i)) {
            c.inc();
        }
        k.seconds.observe(took.as_secs_f64());
    }

    /// The `exec` agents' processes, from `/proc` (a scan of every process: at most once a
    /// second; a scrape in between keeps the last figures).
    fn refresh_exec(&self) {
        {
            let mut last = self.exec_read.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let groups = self
            .exec_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (mut running, mut rss, mut cpu) = (0i64, 0u64, 0f64);
        if !groups.is_empty() {
            let usage = crate::procfs::groups_usage();
            for (r, c) in groups.iter().filter_map(|g| usage.get(g)) {
                running += 1;
                rss += r;
                cpu += c;
            }
        }
        self.exec_processes.set(running);
        self.exec_resident_bytes.set(rss as i64);
        self.exec_cpu_seconds.set(cpu);
    }

    /// Counts an agent instance dropped because the lease ran out.
    pub fn fenced(&self) {
        if self.enabled {
            self.fences.inc();
        }
    }

    /// Counts a call refused before it reached an agent.
    pub fn call_refused(&self, why: Refusal) {
        if self.enabled {
            self.calls_refused
                .get_or_create(&ReasonLabel {
                    reason: why.as_str(),
                })
                .inc();
        }
    }

    /// Takes what the host saw in a whole pass over its instances.
    pub fn host_passed(&self, pass: HostPass) {
        if !self.enabled {
            return;
        }
        self.mailbox_messages.set(pass.messages as i64);
        self.mailbox_fullest.set(pass.fullest as i64);
        *self.exec_groups.lock().unwrap_or_else(|p| p.into_inner()) = pass.exec_groups;
    }

    /// The counters the state machine counts its snapshots into.
    pub fn snapshot_counts(&self) -> crate::raft::store::SnapshotCounts {
        crate::raft::store::SnapshotCounts {
            built: self
                .snapshots
                .get_or_create(&HowLabel { how: "built" })
                .clone(),
            installed: self
                .snapshots
                .get_or_create(&HowLabel { how: "installed" })
                .clone(),
        }
    }

    /// The histograms the log store records its appends and flushes in.
    pub fn log_timings(&self) -> crate::raft::store::LogTimings {
        crate::raft::store::LogTimings {
            flushes: self.log_flush_seconds.clone(),
            appends: self.log_append_seconds.clone(),
        }
    }

    /// The commit index this node has seen announced, shared with Raft's network and server.
    pub fn commit_index(&self) -> Arc<crate::raft::CommitIndex> {
        self.commit.clone()
    }

    /// Counts the messages a NATS connection's subscriptions dropped (`bus::Violations`).
    pub fn watch_slow_consumers(&self, counter: Arc<AtomicU64>) {
        self.slow_counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(counter);
    }

    /// The exposition, refreshed from `node`.
    pub fn render(&self, node: &Node) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(node);
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "could not encode the metrics");
        }
        out
    }

    fn refresh(&self, node: &Node) {
        {
            // A copy: the watch's borrow would hold up Raft's next metrics while the families
            // below take their locks.
            let m = node.raft.metrics().borrow().clone();
            self.raft_term.set(m.current_term as i64);
            let leads = m.current_leader == Some(node.cfg.id);
            self.raft_leader.set(leads as i64);
            self.raft_applied
                .set(m.last_applied.map_or(0, |l| l.index) as i64);
            self.raft_last_log.set(m.last_log_index.unwrap_or(0) as i64);
            self.raft_snapshot
                .set(m.snapshot.map_or(0, |l| l.index) as i64);
            let ack = m.millis_since_quorum_ack.filter(|_| leads);
            self.raft_quorum_ack_age
                .set(ack.map_or(-1.0, |ms| ms as f64 / 1000.0));
            let applied = m.last_applied.map_or(0, |l| l.index);
            self.raft_commit.set(self.commit.get(applied) as i64);
            // Peers that left drop out: only the current followers have a series.
            self.replication_lag.clear();
            let last = m.last_log_index.unwrap_or(0);
            for (peer, matched) in m.replication.iter().flatten() {
                if *peer == node.cfg.id {
                    continue;
                }
                let lag = last.saturating_sub(matched.map_or(0, |l| l.index));
                self.replication_lag
                    .get_or_create(&PeerLabel { peer: *peer })
                    .set(lag as i64);
            }
        }
        // The agents map is persistent: its copy is taken in O(1) under the lock, and counted
        // outside it, so a scrape never holds up the log's apply.
        let (agents, supervisors, nodes) = {
            let st = node.state_read();
            let data = st.registry.data();
            let nodes: Vec<NodeStatus> = data.nodes.values().map(|n| n.status).collect();
            (data.agents.clone(), data.supervisors.len(), nodes)
        };
        self.supervisors.set(supervisors as i64);
        let mut by_status = [0i64; AgentStatus::ALL.len()];
        for a in agents.values() {
            if let Some(i) = AgentStatus::ALL.iter().position(|s| *s == a.status) {
                by_status[i] += 1;
            }
        }
        for (s, n) in AgentStatus::ALL.iter().zip(by_status) {
            self.agents
                .get_or_create(&StatusLabel { status: s.as_str() })
                .set(n);
        }
        for s in NodeStatus::ALL {
            let n = nodes.iter().filter(|x| **x == s).count();
            self.nodes
                .get_or_create(&StatusLabel { status: s.as_str() })
                .set(n as i64);
        }
        self.running.set(node.running_agents() as i64);
        self.lease_valid.set(node.lease.valid() as i64);
        self.cut_off.set(node.cut_off().is_some() as i64);
        self.resident_bytes
            .set(crate::procfs::resident_bytes() as i64);
        self.refresh_exec();
        if let Some(ticks) = crate::procfs::cpu_ticks() {
            let before = self.last_cpu_ticks.swap(ticks, Ordering::Relaxed);
            // Clock ticks are 10 ms on Linux (USER_HZ = 100).
            self.cpu_seconds
                .inc_by(ticks.saturating_sub(before) as f64 / 100.0);
        }
        let slow: u64 = self
            .slow_counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        let before = self.last_slow.swap(slow, Ordering::Relaxed);
        self.nats_slow_consumers.inc_by(slow.saturating_sub(before));
        let connects = node.client.statistics().connects.load(Ordering::Relaxed);
        let before = self.last_connects.swap(connects, Ordering::Relaxed);
        self.nats_connects.inc_by(connects.saturating_sub(before));
    }
}

/// Serves `GET /metrics` on `addr` until `stopped`. Bounded: at most `MAX_CONNECTIONS` open,
/// each closed after `CONNECTION_TIMEOUT`, and `MAX_SCRAPES` rendering at once.
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    stopped: impl std::future::Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let scrapes = Arc::new(Semaphore::new(MAX_SCRAPES));
    tokio::pin!(stopped);
    loop {
        let (stream, _peer) = tokio::select! {
            _ = &mut stopped => return,
            got = listener.accept() => match got {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, most likely: wait a moment rather than spin.
                    tracing::warn!(error = %e, "metrics listener could not accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        let node = node.clone();
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let node = node.clone();
                let scrapes = scrapes.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&node, &scrapes, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

async fn respond(
    node: &Arc<Node>,
    scrapes: &Arc<Semaphore>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
    }
    let Ok(turn) = scrapes.clone().acquire_owned().await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
    };
    let node = node.clone();
    // Counting a large registry's agents is CPU work: off the async threads. The turn goes
    // with the render, which cannot be cancelled: a client that hangs up does not free it
    // before the render is done, so at most `MAX_SCRAPES` ever run or wait.
    let render = move || {
        let _turn = turn;
        node.metrics.render(&node)
    };
    let body = match tokio::task::spawn_blocking(render).await {
        Ok(b) => b,
        Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, "could not render\n"),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
    );
    r
}

/// Binds the metrics listener, if `listen` is set.
pub async fn bind(listen: Option<&str>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = listen else { return Ok(None) };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("metrics.listen {addr:?} is not an address: {e}"))?;
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    Ok(Some(l))
}

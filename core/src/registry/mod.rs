//! The replicated registry: the pure state machine behind Raft.
//!
//! It does no I/O and reads no clock. Time and fresh ids arrive inside the [`Proposal`], stamped
//! by the leader before it is proposed, so every replica computes the same state and the same
//! replies from the same log. Business rejections (a taken name, an unknown parent) are
//! returned as data in the [`Outcome`], never as storage errors.
//!
//! The registry lives in memory on every node; the store persists it as snapshots of its
//! [`RegistryData`] (derived indexes are rebuilt by [`Registry::from_data`]).

mod agents;
mod completion;
mod index;
mod moves;
mod nodes;
mod outcome;
mod persistent;
mod refused;
mod stops;
mod templates;
mod time;
mod transfer;
mod types;
mod updates;

pub use agents::*;
pub use completion::{FinishAgent, Finished};
pub use moves::*;
pub use nodes::*;
pub use outcome::*;
pub use refused::*;
pub use templates::*;
pub use transfer::*;
pub use types::*;
pub use updates::*;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::limits;

/// Version of the persisted registry records, log entries and snapshots, and of what nodes
/// say to each other: a node joins only a cluster of its own version. 2: outcomes are typed
/// (`Applied`) and `request_id` records keep a fingerprint of the command; a version-1
/// snapshot converts on load (its remembered replies become `Applied::Legacy`). 3: nothing
/// persisted changed, but node-to-node traffic moved under `warden.<cluster>.internal`, with
/// the sender in the subject (`docs/security.md`), so version-2 nodes cannot talk to it.
/// 4: snapshots keep the next position (`RegistryData::next_position`; a version-3 snapshot
/// computes it on load), and a remembered outcome may be the refusal `IdTaken`, which a
/// version-3 node could not read. 5: snapshots are files (`raft::snapshot_files`; a version-4
/// snapshot, held whole in sled, moves to one on load), an agent's and a checkpoint's times
/// are nanoseconds in MessagePack (`registry::time`; text still reads), and a snapshot
/// chunk's data is one MessagePack `bin`: a version-4 node could not read the times.
/// 6: an agent record says whether it ever ran (`Agent::started`), a report may be of a failed
/// first start, and snapshots keep the last failed first starts (`start_failures`); a
/// version-5 snapshot reads, its agents counting as having run.
/// 7: the log may hold the subtree import commands and `spawn_subtree`, and snapshots the
/// staged imports (`imports`) and supervisor templates (`Template::subtree`), none of which
/// a version-6 node reads; a version-6 snapshot reads as it is.
pub const REGISTRY_VERSION: u32 = 7;

/// One Raft log entry: a batch of commands stamped by the leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// Record version, so that a newer node can read an older log.
    pub v: u32,
    /// The leader's clock when it proposed the batch: the only time the registry knows.
    pub time: DateTime<Utc>,
    pub items: Vec<Stamped>,
}

/// One command in a proposal, with the fresh id the leader drew for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    /// Id for anything this command creates.
    pub id: Uuid,
    /// The client's idempotency key, if it sent one.
    pub request_id: Option<String>,
    pub cmd: RegistryCmd,
    /// With a `request_id`: the leader's `fingerprint` of `cmd`. Every replica compares and
    /// keeps this one rather than its own, so they agree even if their builds encode a
    /// command differently (an entry of version 1 has none: each replica computes it).
    #[serde(default)]
    pub fingerprint: Option<u64>,
}

/// The commands that change the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RegistryCmd {
    /// A node joined or rejoined: record its name, labels and kinds and mark it up.
    RegisterNode {
        node_id: u64,
        name: String,
        labels: BTreeMap<String, String>,
        #[serde(default)]
        kinds: Vec<String>,
        /// Agents it may hold; 0 is unlimited.
        #[serde(default)]
        capacity: u32,
    },
    /// The leader's failure detector: a node turned suspect, down, or up again.
    SetNodeStatus {
        node_id: u64,
        status: NodeStatus,
    },
    /// The leader's periodic copy of the loads its nodes reported.
    NodeLoads {
        loads: Vec<LoadReport>,
    },
    /// `drain_node`: move everything away and take nothing new (or stop doing so).
    DrainNode {
        node_id: u64,
        #[serde(default)]
        cancel: bool,
    },
    /// `migrate_agent`: ask the agent's node to hand it over to `to` (or the best node).
    MigrateAgent {
        agent: String,
        #[serde(default)]
        to: Option<u64>,
    },
    /// The source node stopped migrating agents and hands over their last state.
    Handoff {
        items: Vec<HandoffItem>,
    },
    /// `rebalance`: move at most `max_moves` agents from loaded to lighter nodes.
    Rebalance {
        max_moves: usize,
    },
    /// A node left the cluster for good.
    RemoveNode {
        node_id: u64,
    },
    CreateSupervisor(CreateSupervisor),
    StopSupervisor {
        name: String,
    },
    SpawnAgent(SpawnAgent),
    StopAgent {
        agent: String,
    },
    RestartAgent {
        agent: String,
    },
    SpawnAgentGroup(SpawnAgentGroup),
    ImportState {
        agent: String,
        state: bytes::Bytes,
    },
    /// The hosting node's observations of its agents.
    ReportAgents {
        reports: Vec<AgentReport>,
    },
    /// An agent's state, from the node running it at `epoch`.
    Checkpoint {
        agent: Uuid,
        node: u64,
        epoch: u64,
        state: bytes::Bytes,
    },
    UpdateSupervisor(UpdateSupervisor),
    UpdateAgent(UpdateAgent),
    /// From the node that ran them: agents that ended for good, with their results.
    FinishAgents {
        items: Vec<FinishAgent>,
    },
    RegisterTemplate(RegisterTemplate),
    DeleteTemplate {
        name: String,
    },
    /// Opens a staged import of a subtree document (`transfer`).
    ImportBegin(ImportBegin),
    /// Part of a staged import's document.
    ImportPage(ImportPage),
    /// Checks a staged import as a whole and creates it: it must hold as many supervisors
    /// and agents as the importer sent.
    ImportCommit {
        import: Uuid,
        supervisors: u64,
        agents: u64,
    },
    /// Drops a staged import.
    ImportAbort {
        import: Uuid,
    },
    /// A whole document, imported in one command.
    ImportSubtree(ImportSubtree),
    /// A supervisor template's subtree, instantiated.
    SpawnSubtree(SpawnSubtree),
}

impl RegistryCmd {
    /// The command's name, as clients spell it; a `request_id` is bound to it.
    pub fn name(&self) -> &'static str {
        match self {
            RegistryCmd::RegisterNode { .. } => "join",
            RegistryCmd::RemoveNode { .. } => "leave",
            RegistryCmd::SetNodeStatus { .. } => "set_node_status",
            RegistryCmd::NodeLoads { .. } => "node_loads",
            RegistryCmd::DrainNode { .. } => "drain_node",
            RegistryCmd::MigrateAgent { .. } => "migrate_agent",
            RegistryCmd::Handoff { .. } => "handoff",
            RegistryCmd::Rebalance { .. } => "rebalance",
            RegistryCmd::CreateSupervisor(_) => "create_supervisor",
            RegistryCmd::StopSupervisor { .. } => "stop_supervisor",
            RegistryCmd::SpawnAgent(_) => "spawn_agent",
            RegistryCmd::StopAgent { .. } => "stop_agent",
            RegistryCmd::RestartAgent { .. } => "restart_agent",
            RegistryCmd::SpawnAgentGroup(_) => "spawn_agent_group",
            RegistryCmd::ImportState { .. } => "import_state",
            RegistryCmd::ReportAgents { .. } => "report_agents",
            RegistryCmd::Checkpoint { .. } => "checkpoint",
            RegistryCmd::UpdateSupervisor(_) => "update_supervisor",
            RegistryCmd::UpdateAgent(_) => "update_agent",
            RegistryCmd::FinishAgents { .. } => "finish_agents",
            RegistryCmd::RegisterTemplate(_) => "register_template",
            RegistryCmd::DeleteTemplate { .. } => "delete_template",
            RegistryCmd::ImportBegin(_) => "import_begin",
            RegistryCmd::ImportPage(_) => "import_page",
            RegistryCmd::ImportCommit { .. } => "import_commit",
            RegistryCmd::ImportAbort { .. } => "import_abort",
            RegistryCmd::ImportSubtree(_) => "import_subtree",
            RegistryCmd::SpawnSubtree(_) => "spawn_subtree",
        }
    }
}

/// What `Registry::apply_step` and `Registry::resume` leave: the command's outcome, or what
/// is left of it.
#[derive(Debug)]
pub enum Step {
    Done(Outcome),
    More(Unfinished),
}

/// A command applied in part: only `Registry::resume` reads it.
#[derive(Debug)]
pub struct Unfinished {
    work: Work,
    request: Option<Request>,
}

#[derive(Debug)]
enum Work {
    Group(Box<agents::GroupWork>),
    /// A node's agents placed elsewhere, then the node command's answer.
    FailOver(Box<nodes::FailOverWork>, Applied),
    /// A supervisor's subtree removed.
    Stop(stops::StopWork),
    /// Agents waiting for a node placed, then the command's outcome.
    Pending(nodes::PendingWork, Outcome),
    /// An imported subtree's supervisors and agents created.
    Import(Box<transfer::ImportWork>),
}

/// The request id a command's outcome is remembered under.
#[derive(Debug)]
struct Request {
    id: String,
    command: &'static str,
    fingerprint: u64,
}

fn request_of(item: &Stamped, fingerprint: Option<u64>) -> Option<Request> {
    let (id, fingerprint) = (item.request_id.clone()?, fingerprint?);
    Some(Request {
        id,
        command: item.cmd.name(),
        fingerprint,
    })
}

/// An event produced by applying a command. The publishing node adds its own id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEvent {
    pub entity: &'static str,
    pub id: String,
    pub event: &'static str,
    pub time: DateTime<Utc>,
    pub epoch: u64,
    pub seq: u64,
    pub data: Value,
    /// The supervisor the event belongs to: an agent's own supervisor, or the supervisor
    /// itself; none for nodes and templates. The history stream files events under it.
    #[serde(default)]
    pub supervisor: Option<String>,
}

/// The serializable content of the registry: what snapshots carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistryData {
    pub v: u32,
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub supervisors: BTreeMap<String, Supervisor>,
    pub requests: BTreeMap<String, RequestRecord>,
    /// Persistent maps: a snapshot's copy of them is taken in O(1), and what applies change
    /// meanwhile is copied then, a path and a record at a time (`Arc::make_mut`).
    #[serde(default, deserialize_with = "persistent::ord_map")]
    pub agents: imbl::OrdMap<Uuid, Arc<Agent>>,
    #[serde(default, deserialize_with = "persistent::ord_map")]
    pub checkpoints: imbl::OrdMap<Uuid, Arc<Checkpoint>>,
    /// The position the next supervisor or agent gets: above every one ever given, not only
    /// those left, so that every replica numbers alike however it got here (0 in a snapshot
    /// written before it was kept: one above the highest left).
    #[serde(default)]
    pub next_position: u64,
    /// The errors of the last first starts that failed (`agents::StartFailure`), oldest first.
    #[serde(default)]
    pub start_failures: std::collections::VecDeque<StartFailure>,
    /// Agents that are done, with their results (`completion`), by id; persistent, like the
    /// agents, so that a snapshot's copy costs nothing.
    #[serde(default, deserialize_with = "persistent::ord_map")]
    pub finished: imbl::OrdMap<Uuid, Arc<Finished>>,
    /// The order the next `Finished` record gets.
    #[serde(default)]
    pub finished_seq: u64,
    /// Registered agent templates by name (`templates`).
    #[serde(default, deserialize_with = "persistent::ord_map")]
    pub templates: imbl::OrdMap<String, Arc<Template>>,
    /// Imports being staged (`transfer`), by id.
    #[serde(default, deserialize_with = "persistent::ord_map")]
    pub imports: imbl::OrdMap<Uuid, Arc<StagedImport>>,
}

/// The registry with its derived indexes.
#[derive(Debug, Clone)]
pub struct Registry {
    data: RegistryData,
    /// `request_id`s ordered by the time they were first seen, for expiry. Derived.
    request_order: BTreeSet<(DateTime<Utc>, String)>,
    /// What the remembered `request_id`s weigh in all (`request_weight`). Derived.
    request_bytes: usize,
    /// Children of each supervisor by position (start order). Derived from the children's
    /// `parent` and `position`.
    children: BTreeMap<String, BTreeMap<u64, Child>>,
    /// Agent ids by name. Derived.
    agent_names: BTreeMap<String, Uuid>,
    /// Agents placed on each node. Derived.
    by_node: BTreeMap<u64, BTreeSet<Uuid>>,
    /// Agents placed nowhere (no node could take them), by position and id: start order.
    /// Derived.
    unplaced: BTreeSet<(u64, Uuid)>,
    /// Agents by tag, capability, kind, status and supervisor, for queries. Derived.
    index: index::AgentIndex,
    /// Set by a command that brought a node up or opened room, so that its last steps place
    /// the agents waiting for a node (`conclude`); false between commands.
    placing_due: bool,
    /// The version of the log entry being applied (`set_entry_version`): an entry written
    /// before version 6 spawns agents that count as having run, as `from_data` counts those
    /// of an older snapshot, so that every replica agrees however much of the old log it
    /// replays past its snapshot.
    entry_version: u32,
    /// The kept `Finished` records by their order, oldest first, and what they weigh. Derived.
    finished_order: completion::FinishedOrder,
    /// The latest kept record of each name. Derived.
    finished_names: BTreeMap<String, Uuid>,
    finished_bytes: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::from_data(RegistryData::default())
    }
}

impl Registry {
    /// Builds a registry from its content, rebuilding derived indexes and the root supervisor.
    pub fn from_data(mut data: RegistryData) -> Self {
        if data.v < 6 {
            // Written before a record said whether its agent ran: every agent counts as having
            // run, so that an upgrade never removes one for a failed start.
            let ids: Vec<Uuid> = data.agents.keys().copied().collect();
            for id in ids {
                if let Some(a) = data.agents.get_mut(&id) {
                    Arc::make_mut(a).started = true;
                }
            }
        }
        data.v = REGISTRY_VERSION;
        data.supervisors
            .entry(ROOT.to_string())
            .or_insert_with(Supervisor::root);
        let request_order = data
            .requests
            .iter()
            .map(|(k, r)| (r.time, k.clone()))
            .collect();
        let request_bytes = data
            .requests
            .iter()
            .map(|(k, r)| request_weight(k, &r.command, &r.outcome))
            .sum();
        let mut reg = Registry {
            data: RegistryData::default(),
            request_order,
            request_bytes,
            children: BTreeMap::new(),
            agent_names: BTreeMap::new(),
            by_node: BTreeMap::new(),
            unplaced: BTreeSet::new(),
            index: Default::default(),
            placing_due: false,
            entry_version: REGISTRY_VERSION,
            finished_order: BTreeMap::new(),
            finished_names: BTreeMap::new(),
            finished_bytes: 0,
        };
        (reg.finished_order, reg.finished_names, reg.finished_bytes) =
            completion::finished_index(&data.finished);
        let sups = std::mem::take(&mut data.supervisors);
        let agents = std::mem::take(&mut data.agents);
        data.next_position = data.next_position.max(1);
        reg.data = data;
        for s in sups.into_values() {
            reg.insert_supervisor(s);
        }
        reg.index_all(&agents);
        reg.data.agents = agents;
        reg
    }

    /// Builds the agents' derived indexes from `agents` (the decoded map is kept as it is), in
    /// bulk: ids and positions are gathered into vectors and each set or map is built from one
    /// sorted run, not a million inserts. Agents come in id order, so most runs are sorted
    /// already.
    fn index_all(&mut self, agents: &imbl::OrdMap<Uuid, Arc<Agent>>) {
        let mut children: BTreeMap<&str, Vec<(u64, Child)>> = BTreeMap::new();
        let mut names = Vec::new();
        let mut by_node = index::Gathered::default();
        let mut unplaced = Vec::new();
        for a in agents.values() {
            let child = (a.position, Child::Agent { id: a.id });
            match children.get_mut(a.supervisor.as_str()) {
                Some(list) => list.push(child),
                None => {
                    children.insert(&a.supervisor, vec![child]);
                }
            }
            self.data.next_position = self.data.next_position.max(a.position + 1);
            if let Some(n) = &a.name {
                names.push((n.clone(), a.id));
            }
            match a.node {
                Some(node) => by_node.add(&node, a.id),
                None => unplaced.push((a.position, a.id)),
            }
        }
        for (sup, mut list) in children {
            // Supervisors under it were entered by `insert_supervisor`.
            list.extend(self.children.remove(sup).unwrap_or_default());
            self.children
                .insert(sup.to_string(), list.into_iter().collect());
        }
        self.agent_names = names.into_iter().collect();
        self.by_node = by_node.into_index();
        self.unplaced = unplaced.into_iter().collect();
        self.index = index::AgentIndex::build(agents.values().map(|a| &**a));
    }

    /// Inserts a supervisor record and indexes it under its parent.
    fn insert_supervisor(&mut self, s: Supervisor) {
        if let Some(parent) = &s.parent {
            let child = Child::Supervisor {
                name: s.name.clone(),
            };
            self.children
                .entry(parent.clone())
                .or_default()
                .insert(s.position, child);
        }
        self.data.next_position = self.data.next_position.max(s.position + 1);
        self.data.supervisors.insert(s.name.clone(), s);
    }

    /// Children of supervisor `name` in start order.
    pub fn children(&self, name: &str) -> impl Iterator<Item = &Child> {
        self.children.get(name).into_iter().flat_map(|m| m.values())
    }

    /// The registry's content.
    pub fn data(&self) -> &RegistryData {
        &self.data
    }

    /// Tells the registry the version of the log entry it applies next (`Proposal::v`).
    pub fn set_entry_version(&mut self, v: u32) {
        self.entry_version = v;
    }

    /// Whether a record written by the entry being applied predates `Agent::started`.
    pub(super) fn entry_predates_started(&self) -> bool {
        self.entry_version < 6
    }

    /// Looks up a node.
    pub fn node(&self, id: u64) -> Option<&NodeRecord> {
        self.data.nodes.get(&id)
    }

    /// Looks up a supervisor by name.
    pub fn supervisor(&self, name: &str) -> Option<&Supervisor> {
        self.data.supervisors.get(name)
    }

    /// Applies one stamped command at the proposal's `time`, all of it.
    pub fn apply(
        &mut self,
        time: DateTime<Utc>,
        item: &Stamped,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let mut step = self.apply_step(time, item, events);
        loop {
            match step {
                Step::Done(outcome) => return outcome,
                Step::More(rest) => step = self.resume(time, rest, events),
            }
        }
    }

    /// Applies the first bounded step of one stamped command (`limits::APPLY_STEP_AGENTS`
    /// records at most): its outcome, or what is left of it, which `resume` carries on. The
    /// caller applies nothing else in between, so every replica ends in the same state however
    /// it paced the steps; a reader between two steps sees the command half applied.
    pub fn apply_step(
        &mut self,
        time: DateTime<Utc>,
        item: &Stamped,
        events: &mut Vec<RegistryEvent>,
    ) -> Step {
        self.expire_requests(time);
        self.expire_imports(time);
        let fingerprint = item
            .request_id
            .as_ref()
            .map(|_| item.fingerprint.unwrap_or_else(|| fingerprint(&item.cmd)));
        if let (Some(rid), Some(fp)) = (&item.request_id, fingerprint) {
            if let Some(prev) = self.data.requests.get(rid) {
                // A version-1 record has no fingerprint (0): its command name is all there is.
                let same = prev.command == item.cmd.name()
                    && (prev.fingerprint == 0 || prev.fingerprint == fp);
                if !same {
                    return Step::Done(Err(Refused::RequestIdReused {
                        request_id: rid.clone(),
                        command: prev.command.clone(),
                    }));
                }
                return Step::Done(prev.outcome.clone());
            }
        }
        let outcome = match &item.cmd {
            RegistryCmd::RegisterNode {
                node_id,
                name,
                labels,
                kinds,
                capacity,
            } => {
                let join = Join {
                    id: *node_id,
                    name,
                    labels,
                    kinds,
                    capacity: *capacity,
                };
                self.register_node(time, &join, events)
            }
            RegistryCmd::RemoveNode { node_id } => {
                let step = self.remove_node(time, *node_id, events);
                match self.then_fail_over(time, step, request_of(item, fingerprint), events) {
                    Ok(step) => return step,
                    Err(outcome) => outcome,
                }
            }
            RegistryCmd::SetNodeStatus { node_id, status } => {
                let step = self.set_node_status(time, *node_id, *status, events);
                match self.then_fail_over(time, step, request_of(item, fingerprint), events) {
                    Ok(step) => return step,
                    Err(outcome) => outcome,
                }
            }
            RegistryCmd::NodeLoads { loads } => self.node_loads(time, loads),
            RegistryCmd::DrainNode { node_id, cancel } => {
                self.drain_node(time, *node_id, *cancel, events)
            }
            RegistryCmd::MigrateAgent { agent, to } => self.migrate_agent(time, agent, *to, events),
            RegistryCmd::Handoff { items } => self.handoff(time, items, events),
            RegistryCmd::Rebalance { max_moves } => self.rebalance(time, *max_moves, events),
            RegistryCmd::CreateSupervisor(c) => self.create_supervisor(time, item.id, c, events),
            RegistryCmd::StopSupervisor { name } => match self.begin_stop(name) {
                Ok(work) => {
                    let rest = Unfinished {
                        work: Work::Stop(work),
                        request: request_of(item, fingerprint),
                    };
                    return self.resume(time, rest, events);
                }
                Err(refused) => Err(refused),
            },
            RegistryCmd::SpawnAgent(a) => self.spawn_agent(time, item.id, a, events),
            RegistryCmd::StopAgent { agent } => self.stop_agent(time, agent, events),
            RegistryCmd::RestartAgent { agent } => self.restart_agent(time, agent),
            RegistryCmd::SpawnAgentGroup(g) => {
                match self.spawn_agent_group(time, item.id, g, events) {
                    Ok(work) => {
                        let rest = Unfinished {
                            work,
                            request: request_of(item, fingerprint),
                        };
                        return self.resume(time, rest, events);
                    }
                    Err(refused) => Err(refused),
                }
            }
            RegistryCmd::ImportState { agent, state } => {
                self.import_state(time, agent, state, events)
            }
            RegistryCmd::ReportAgents { reports } => self.report_agents(time, reports, events),
            RegistryCmd::Checkpoint {
                agent,
                node,
                epoch,
                state,
            } => self.store_checkpoint(time, *agent, *node, *epoch, state, events),
            RegistryCmd::UpdateSupervisor(u) => self.update_supervisor(time, u, events),
            RegistryCmd::UpdateAgent(u) => self.update_agent(time, u, events),
            RegistryCmd::FinishAgents { items } => self.finish_agents(time, items, events),
            RegistryCmd::RegisterTemplate(r) => self.register_template(time, r, events),
            RegistryCmd::DeleteTemplate { name } => self.delete_template(time, name, events),
            RegistryCmd::ImportBegin(b) => self.import_begin(time, item.id, b),
            RegistryCmd::ImportPage(p) => self.import_page(time, p),
            RegistryCmd::ImportAbort { import } => self.import_abort(*import),
            RegistryCmd::ImportCommit {
                import,
                supervisors,
                agents,
            } => {
                let work = self.import_commit(item.id, *import, (*supervisors, *agents));
                let request = request_of(item, fingerprint);
                return self.then_import(time, work, request, events);
            }
            RegistryCmd::ImportSubtree(i) => {
                let work = self.import_subtree(time, item.id, i);
                let request = request_of(item, fingerprint);
                return self.then_import(time, work, request, events);
            }
            RegistryCmd::SpawnSubtree(s) => {
                let work = self.spawn_subtree(time, item.id, s);
                let request = request_of(item, fingerprint);
                return self.then_import(time, work, request, events);
            }
        };
        if matches!(item.cmd, RegistryCmd::StopAgent { .. }) {
            // Room opened: agents waiting for a node may fit now.
            self.placing_due = true;
        }
        self.conclude(time, request_of(item, fingerprint), outcome)
    }

    /// A node command's answer, and the fail-over it began if any: the first step of that
    /// (`Ok`), or the outcome when there is none (`Err`).
    fn then_fail_over(
        &mut self,
        time: DateTime<Utc>,
        step: Result<(Applied, Option<nodes::FailOverWork>), Refused>,
        request: Option<Request>,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<Step, Outcome> {
        match step {
            Ok((answer, Some(work))) => {
                let rest = Unfinished {
                    work: Work::FailOver(Box::new(work), answer),
                    request,
                };
                Ok(self.resume(time, rest, events))
            }
            Ok((answer, None)) => Err(Ok(answer)),
            Err(refused) => Err(Err(refused)),
        }
    }

    /// An import past its checks, begun (its first step); or its refusal, concluded.
    fn then_import(
        &mut self,
        time: DateTime<Utc>,
        work: Result<transfer::ImportWork, Refused>,
        request: Option<Request>,
        events: &mut Vec<RegistryEvent>,
    ) -> Step {
        match work {
            Ok(work) => {
                let rest = Unfinished {
                    work: Work::Import(Box::new(work)),
                    request,
                };
                self.resume(time, rest, events)
            }
            Err(refused) => self.conclude(time, request, Err(refused)),
        }
    }

    /// Applies the next bounded step of a command `apply_step` began.
    pub fn resume(
        &mut self,
        time: DateTime<Utc>,
        rest: Unfinished,
        events: &mut Vec<RegistryEvent>,
    ) -> Step {
        let Unfinished { work, request } = rest;
        let outcome = match work {
            Work::Stop(mut stopping) => {
                if !self.stop_step(time, &mut stopping, events) {
                    let work = Work::Stop(stopping);
                    return Step::More(Unfinished { work, request });
                }
                // Room opened: agents waiting for a node may fit now.
                self.placing_due = true;
                Ok(stopping.finished())
            }
            Work::Pending(mut placing, outcome) => {
                if !self.placing_step(time, &mut placing, events) {
                    let work = Work::Pending(placing, outcome);
                    return Step::More(Unfinished { work, request });
                }
                let outcome = self.answer_after_placing(outcome);
                return Step::Done(self.finish(time, request, outcome));
            }
            Work::Group(mut group) => match self.spawn_group_step(time, &mut group, events) {
                Ok(false) => {
                    let work = Work::Group(group);
                    return Step::More(Unfinished { work, request });
                }
                Ok(true) => Ok(group.finished()),
                Err(refused) => Err(refused),
            },
            Work::Import(mut import) => match self.import_step(time, &mut import, events) {
                Ok(false) => {
                    let work = Work::Import(import);
                    return Step::More(Unfinished { work, request });
                }
                Ok(true) => Ok(import.finished()),
                Err(refused) => Err(refused),
            },
            Work::FailOver(mut moving, answer) => {
                if !self.fail_over_step(time, &mut moving, events) {
                    let work = Work::FailOver(moving, answer);
                    return Step::More(Unfinished { work, request });
                }
                Ok(answer)
            }
        };
        self.conclude(time, request, outcome)
    }

    /// Ends a command whose outcome is known. When it brought a node up or opened room
    /// (`placing_due`), the agents waiting for a node are placed first, in steps.
    fn conclude(
        &mut self,
        time: DateTime<Utc>,
        request: Option<Request>,
        outcome: Outcome,
    ) -> Step {
        let placing = std::mem::take(&mut self.placing_due);
        if placing && outcome.is_ok() && self.has_waiting() {
            // A step of its own: the command's last step already did its share.
            let work = Work::Pending(nodes::PendingWork::default(), outcome);
            return Step::More(Unfinished { work, request });
        }
        Step::Done(self.finish(time, request, outcome))
    }

    /// What every command does last: its outcome is remembered under the request id.
    fn finish(
        &mut self,
        time: DateTime<Utc>,
        request: Option<Request>,
        outcome: Outcome,
    ) -> Outcome {
        // An id that was in use is the leader's draw, not the command's fault: a retry with
        // the same request_id gets a fresh id, so that refusal is not remembered.
        let redraw = matches!(outcome, Err(Refused::IdTaken { .. }));
        if let (Some(r), false) = (request, redraw) {
            self.remember_request(time, &r.id, r.command, r.fingerprint, &outcome);
        }
        outcome
    }

    fn remember_request(
        &mut self,
        time: DateTime<Utc>,
        rid: &str,
        command: &str,
        fingerprint: u64,
        out: &Outcome,
    ) {
        let record = RequestRecord {
            command: command.to_string(),
            fingerprint,
            time,
            outcome: out.clone(),
        };
        // `apply` answers a known id from its record, so a record is only ever added.
        debug_assert!(!self.data.requests.contains_key(rid));
        self.request_bytes += request_weight(rid, command, out);
        self.data.requests.insert(rid.to_string(), record);
        self.request_order.insert((time, rid.to_string()));
        while self.data.requests.len() > limits::MAX_REMEMBERED_REQUESTS
            || self.request_bytes > limits::MAX_REMEMBERED_REQUEST_BYTES
        {
            if !self.forget_oldest_request() {
                break;
            }
        }
    }

    /// What the remembered `request_id`s weigh in all (`request_weight`).
    pub fn remembered_request_bytes(&self) -> usize {
        self.request_bytes
    }

    /// Forgets `request_id`s older than the TTL. Driven by proposal time, so every replica
    /// forgets the same ids at the same log position.
    fn expire_requests(&mut self, now: DateTime<Utc>) {
        let horizon = now - chrono::Duration::seconds(limits::REQUEST_ID_TTL_SECS);
        while self
            .request_order
            .first()
            .is_some_and(|(t, _)| *t < horizon)
        {
            if !self.forget_oldest_request() {
                break;
            }
        }
    }

    /// Forgets the oldest remembered `request_id`; false if none is left.
    fn forget_oldest_request(&mut self) -> bool {
        let Some((_, rid)) = self.request_order.pop_first() else {
            return false;
        };
        if let Some(r) = self.data.requests.remove(&rid) {
            let w = request_weight(&rid, &r.command, &r.outcome);
            self.request_bytes = self.request_bytes.saturating_sub(w);
        }
        true
    }

    fn register_node(
        &mut self,
        time: DateTime<Utc>,
        j: &Join<'_>,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let id = j.id;
        let node = self.data.nodes.entry(id).or_insert_with(|| NodeRecord {
            id,
            name: j.name.to_string(),
            labels: j.labels.clone(),
            kinds: j.kinds.to_vec(),
            status: NodeStatus::Joining,
            capacity: j.capacity,
            drain: false,
            load: NodeLoad::default(),
            joined_at: time,
            updated_at: time,
            seq: 0,
        });
        if node.status == NodeStatus::Left {
            return Err(Refused::NodeLeftForGood { node: id });
        }
        let before = node.status;
        node.name = j.name.to_string();
        node.labels = j.labels.clone();
        node.kinds = j.kinds.to_vec();
        node.capacity = j.capacity;
        node.status = if node.drain {
            NodeStatus::Draining
        } else {
            NodeStatus::Up
        };
        node.updated_at = time;
        let event = match before {
            NodeStatus::Joining => Some("joined"),
            NodeStatus::Down | NodeStatus::Suspect => Some("up"),
            _ => None,
        };
        if let Some(event) = event {
            node.seq += 1;
            events.push(node_event(
                node,
                event,
                time,
                json!({ "node_id": id, "name": node.name, "labels": node.labels }),
            ));
        }
        let reply = Applied::NodeJoined(Box::new(node.clone()));
        self.placing_due = true;
        Ok(reply)
    }

    fn remove_node(
        &mut self,
        time: DateTime<Utc>,
        id: u64,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<(Applied, Option<nodes::FailOverWork>), Refused> {
        let Some(node) = self.data.nodes.get_mut(&id) else {
            return Err(Refused::NoNode { node: id });
        };
        if node.status != NodeStatus::Left {
            node.status = NodeStatus::Left;
            node.updated_at = time;
            node.seq += 1;
            events.push(node_event(
                node,
                "left",
                time,
                json!({ "node_id": id, "name": node.name }),
            ));
            // The departed node stops itself; what it ran comes back elsewhere.
            let answer = Applied::NodeLeft { node_id: id };
            return Ok((answer, Some(self.begin_fail_over(id))));
        }
        Ok((Applied::NodeLeft { node_id: id }, None))
    }

    fn create_supervisor(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        c: &CreateSupervisor,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let sup = self.new_supervisor(time, id, c, events)?;
        Ok(Applied::SupervisorCreated(Box::new(sup)))
    }

    /// Creates supervisor `c` and answers its record.
    fn new_supervisor(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        c: &CreateSupervisor,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<Supervisor, Refused> {
        let position = self.data.next_position;
        self.new_supervisor_at(time, id, c, position, events)
    }

    /// Creates supervisor `c` at start order `position` and answers its record.
    fn new_supervisor_at(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        c: &CreateSupervisor,
        position: u64,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<Supervisor, Refused> {
        if self.data.supervisors.contains_key(&c.name) {
            return Err(Refused::SupervisorExists {
                name: c.name.clone(),
            });
        }
        if self.data.supervisors.len() >= limits::MAX_SUPERVISORS {
            return Err(Refused::TooManySupervisors {
                max: limits::MAX_SUPERVISORS as u64,
            });
        }
        let parent_name = c.parent.clone().unwrap_or_else(|| ROOT.to_string());
        let Some(parent) = self.data.supervisors.get(&parent_name) else {
            return Err(Refused::NoParent { name: parent_name });
        };
        let parent_node = parent.node;
        if parent.strategy == Strategy::SimpleOneForOne {
            return Err(Refused::ParentIsSimple { name: parent_name });
        }
        if self.depth(&parent_name) + 1 > limits::MAX_SUPERVISOR_DEPTH {
            return Err(Refused::TooDeep {
                max: limits::MAX_SUPERVISOR_DEPTH as u64,
            });
        }
        let sup = Supervisor {
            id,
            name: c.name.clone(),
            parent: Some(parent_name.clone()),
            strategy: c.strategy,
            max_restarts: c.max_restarts,
            max_seconds: c.max_seconds,
            backoff: c.backoff.clone(),
            placement: c.placement,
            position,
            // A colocated subtree runs on one node: a supervisor below one inherits its node,
            // a new colocated one takes the least loaded open node. Spread ones have none.
            node: match (parent_node, c.placement) {
                (Some(n), _) => Some(n),
                (None, SupervisorPlacement::Colocate) => self.least_loaded_node(),
                (None, SupervisorPlacement::Spread) => None,
            },
            created_at: time,
            seq: 1,
        };
        // A record always encodes; the event says nothing rather than refuse the command.
        let data = serde_json::to_value(&sup).unwrap_or_default();
        events.push(RegistryEvent {
            entity: "supervisor",
            id: sup.name.clone(),
            event: "created",
            time,
            epoch: 0,
            seq: sup.seq,
            data,
            supervisor: Some(sup.name.clone()),
        });
        self.insert_supervisor(sup.clone());
        Ok(sup)
    }

    /// The up node with the fewest agents (lowest id on a tie), if any node is up.
    fn least_loaded_node(&self) -> Option<u64> {
        self.data
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Up)
            .min_by_key(|n| (self.load(n.id), n.id))
            .map(|n| n.id)
    }

    /// Depth of a supervisor below `root` (root is 0).
    fn depth(&self, name: &str) -> usize {
        let mut depth = 0;
        let mut cur = self.data.supervisors.get(name);
        while let Some(parent) = cur.and_then(|s| s.parent.as_deref()) {
            depth += 1;
            cur = self.data.supervisors.get(parent);
        }
        depth
    }

    /// The supervision tree below `name`, as nested JSON, with at most
    /// `limits::MAX_TREE_NODES` supervisors; a supervisor whose children were cut off for that
    /// carries `"truncated": true`.
    pub fn tree(&self, name: &str) -> Option<Value> {
        let mut budget = limits::MAX_TREE_NODES;
        self.tree_within(name, &mut budget)
    }

    fn tree_within(&self, name: &str, budget: &mut usize) -> Option<Value> {
        let sup = self.data.supervisors.get(name)?;
        *budget = budget.saturating_sub(1);
        let mut children = Vec::new();
        let mut truncated = false;
        for c in self.children(name) {
            if *budget == 0 {
                truncated = true;
                break;
            }
            match c {
                Child::Supervisor { name } => children.extend(self.tree_within(name, budget)),
                Child::Agent { id } => {
                    *budget = budget.saturating_sub(1);
                    if let Some(a) = self.data.agents.get(id) {
                        children.push(json!({
                            "type": "agent",
                            "id": a.id,
                            "name": a.name,
                            "kind": a.kind,
                            "status": a.status,
                            "node": a.node,
                            "restart": a.restart,
                        }));
                    }
                }
            }
        }
        let mut node = json!({
            "type": "supervisor",
            "name": sup.name,
            "id": sup.id,
            "strategy": sup.strategy,
            "placement": sup.placement,
            "node": sup.node,
            "children": children,
        });
        if truncated {
            node["truncated"] = Value::Bool(true);
        }
        Some(node)
    }
}

#[cfg(test)]
mod tests;

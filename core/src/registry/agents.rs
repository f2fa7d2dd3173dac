//! Agents in the registry: records, spawning with placement, lifecycle reports from the node
//! that runs them (fenced by epoch), checkpoints, and queries.
//!
//! The registry holds the desired state (which agents exist, where they are placed); the
//! node that hosts an agent runs it and reports what it observed (`AgentReport`). A report or
//! checkpoint carrying an old epoch, or coming from another node, is refused: a stale
//! instance cannot act.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    page_limit, take_page, validate_name, validate_request_id, Applied, Child, Outcome, Refused,
    Registry, RegistryEvent,
};
use crate::error::{ErrorCode, WireError};
use crate::limits;
use crate::placement::{AgentPlacement, Placement};
use crate::supervision::RestartType;

/// Lifecycle of an agent, as `get_agent` reports it (`docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Placed (or waiting for a node), not started yet.
    Pending,
    Starting,
    Running,
    Stopping,
    /// Ended and not restarted (a transient agent that finished normally).
    Stopped,
    /// Crashed; a restart may follow.
    Failed,
    Migrating,
}

impl AgentStatus {
    /// Every status, in declaration order.
    pub const ALL: [AgentStatus; 7] = [
        AgentStatus::Pending,
        AgentStatus::Starting,
        AgentStatus::Running,
        AgentStatus::Stopping,
        AgentStatus::Stopped,
        AgentStatus::Failed,
        AgentStatus::Migrating,
    ];

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Pending => "pending",
            AgentStatus::Starting => "starting",
            AgentStatus::Running => "running",
            AgentStatus::Stopping => "stopping",
            AgentStatus::Stopped => "stopped",
            AgentStatus::Failed => "failed",
            AgentStatus::Migrating => "migrating",
        }
    }
}

/// A small set of strings (an agent's tags or capabilities), kept as a sorted vector: every
/// node holds one per agent, and a one-element `BTreeSet` allocates a whole B-tree leaf (about
/// 280 bytes) where this allocates one slot. Encoded as a list, like the set it replaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<String>")]
pub struct StringSet(Vec<String>);

impl StringSet {
    pub fn contains(&self, s: &str) -> bool {
        self.0.binary_search_by(|x| x.as_str().cmp(s)).is_ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = &String> {
        self.0.iter()
    }
}

impl From<Vec<String>> for StringSet {
    fn from(mut v: Vec<String>) -> StringSet {
        v.sort_unstable();
        v.dedup();
        v.shrink_to_fit();
        StringSet(v)
    }
}

impl From<&BTreeSet<String>> for StringSet {
    fn from(set: &BTreeSet<String>) -> StringSet {
        StringSet(set.iter().cloned().collect())
    }
}

/// An agent record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: Uuid,
    pub name: Option<String>,
    pub kind: String,
    pub config: Value,
    pub restart: RestartType,
    /// Time allowed for a clean stop before the agent is killed; 0 is `brutal_kill`.
    pub shutdown_ms: u64,
    pub tags: StringSet,
    pub capabilities: StringSet,
    pub supervisor: String,
    /// Start order among its siblings.
    pub position: u64,
    pub status: AgentStatus,
    /// The node it is placed on; `None` while no node can take it (see `pending_reason`).
    pub node: Option<u64>,
    /// Where it may run.
    #[serde(default)]
    pub placement: AgentPlacement,
    /// While `migrating`: the node it moves to.
    #[serde(default)]
    pub migrating_to: Option<u64>,
    /// Why it waits on no node.
    #[serde(default)]
    pub pending_reason: Option<String>,
    /// Fencing token, bumped on every placement.
    pub epoch: u64,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// Bumped by `restart_agent`; the hosting node restarts the agent when it changes.
    pub restart_requested: u64,
    #[serde(with = "super::time")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "super::time")]
    pub updated_at: DateTime<Utc>,
    /// Per-entity event sequence number.
    pub seq: u64,
    /// Whether a node has ever reported it running (at any epoch). A first start that fails
    /// removes an agent that never ran, as OTP's `start_child` does not add a child whose
    /// start failed; once it has run, a failed start is a crash for its supervisor.
    #[serde(default)]
    pub started: bool,
}

/// The error of an agent's first start, kept after the agent was removed for it, so that a
/// `spawn_agent` waiting for `running` (on any node) can answer it. The last
/// `limits::MAX_START_FAILURES` are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartFailure {
    pub agent: Uuid,
    pub node: u64,
    pub error: String,
    #[serde(with = "super::time")]
    pub time: DateTime<Utc>,
}

/// An agent's last acknowledged state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub agent: Uuid,
    /// The epoch of the instance that wrote it.
    pub epoch: u64,
    /// Increases with every checkpoint of the agent.
    pub seq: u64,
    #[serde(with = "super::time")]
    pub time: DateTime<Utc>,
    /// MessagePack bytes produced by the agent's kind.
    pub state: Bytes,
    /// Calls the agent answered last before a migration, by call id, so that a retry that
    /// reaches its new node gets the same answer instead of running twice.
    #[serde(default)]
    pub calls: Vec<RememberedCall>,
}

/// One call an agent answered, by the caller's `Warden-Call-Id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RememberedCall {
    pub id: String,
    /// The agent's answer, as its caller got it.
    pub result: Result<Value, WireError>,
}

pub(super) fn default_shutdown_ms() -> u64 {
    5_000
}

/// `spawn_agent` / `add_child_to_supervisor`: both the wire request and the log command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnAgent {
    /// The supervisor to add the agent to (default `root`).
    #[serde(default)]
    pub supervisor: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Required unless `template` names one.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub config: Value,
    #[serde(default)]
    pub restart: RestartType,
    #[serde(default = "default_shutdown_ms")]
    pub shutdown_ms: u64,
    #[serde(default)]
    pub tags: BTreeSet<String>,
    #[serde(default)]
    pub capabilities: BTreeSet<String>,
    /// Strategy (`least_loaded`, `spread`, `pinned`) and label constraints.
    #[serde(default)]
    pub placement: Option<Placement>,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
    /// When the reply comes: once the agent is placed (default), or once its first start
    /// succeeded or failed. Read by the node that answers the client; not part of the log.
    #[serde(default, skip_serializing)]
    pub wait: SpawnWait,
    /// With `wait: "running"`: how long to wait for the first start, in milliseconds
    /// (default `limits::SPAWN_WAIT_DEFAULT_MS`, at most `limits::SPAWN_WAIT_MAX_MS`).
    #[serde(default, skip_serializing)]
    pub timeout_ms: Option<u64>,
    /// Start from this template (`templates`), changed by `overrides`, instead of a spec of
    /// its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<Box<super::Overrides>>,
}

/// When `spawn_agent` answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpawnWait {
    /// Once the agent is recorded and placed (or waits for a node).
    #[default]
    Placed,
    /// Once its first start succeeded (`running`), or with the start's error (`start_failed`,
    /// and the agent is not kept), or `timeout` (it is kept and may still start).
    Running,
}

impl SpawnAgent {
    /// A spawn of template `name` as it is.
    pub fn of_template(name: String) -> SpawnAgent {
        SpawnAgent {
            template: Some(name),
            ..SpawnAgent::empty()
        }
    }

    /// A spawn with every field at its default (no kind): what a spec built field by field
    /// starts from.
    pub fn empty() -> SpawnAgent {
        SpawnAgent {
            supervisor: None,
            name: None,
            kind: String::new(),
            config: Value::Null,
            restart: RestartType::default(),
            shutdown_ms: default_shutdown_ms(),
            tags: BTreeSet::new(),
            capabilities: BTreeSet::new(),
            placement: None,
            request_id: None,
            wait: SpawnWait::Placed,
            timeout_ms: None,
            template: None,
            overrides: None,
        }
    }

    /// Whether it gives an agent spec of its own (a kind, config, labels or placement).
    pub fn has_own_spec(&self) -> bool {
        !self.kind.is_empty()
            || !self.config.is_null()
            || !self.tags.is_empty()
            || !self.capabilities.is_empty()
            || self.placement.is_some()
    }

    /// Checks everything that does not depend on the registry's state.
    pub fn validate(&self) -> Result<(), WireError> {
        if let Some(s) = &self.supervisor {
            validate_name("supervisor", s)?;
        }
        if let Some(n) = &self.name {
            validate_name("name", n)?;
            if Uuid::parse_str(n).is_ok() {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    "an agent name cannot be a UUID",
                ));
            }
        }
        match &self.template {
            Some(t) => {
                validate_name("template", t)?;
                if self.has_own_spec() {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        "with a template, give kind, config, tags, capabilities and placement \
                         in overrides, or not at all",
                    ));
                }
                if let Some(o) = &self.overrides {
                    o.validate()?;
                }
            }
            None => {
                if self.overrides.is_some() {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        "overrides go with a template",
                    ));
                }
                if self.kind.is_empty() {
                    return Err(WireError::new(
                        ErrorCode::BadRequest,
                        "missing field `kind`: give a kind, or a template",
                    ));
                }
                validate_name("kind", &self.kind)?;
            }
        }
        if self.shutdown_ms > limits::MAX_SHUTDOWN_MS {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("shutdown_ms is at most {}", limits::MAX_SHUTDOWN_MS),
            ));
        }
        crate::names::validate_label_set("tags", &self.tags)?;
        crate::names::validate_label_set("capabilities", &self.capabilities)?;
        if let Some(p) = &self.placement {
            p.validate()?;
        }
        if let Some(ms) = self.timeout_ms {
            if ms == 0 || ms > limits::SPAWN_WAIT_MAX_MS {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    format!("timeout_ms is 1 to {}", limits::SPAWN_WAIT_MAX_MS),
                ));
            }
        }
        crate::names::validate_config(&self.config)?;
        validate_request_id(&self.request_id)
    }
}

/// What the hosting node observed of an agent since its last report. Reports coalesce: the
/// latest status wins, restarts add up, the last error is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    pub agent: Uuid,
    pub node: u64,
    pub epoch: u64,
    pub status: AgentStatus,
    /// Restarts since the last report.
    pub restarts: u32,
    pub error: Option<String>,
    /// With status `failed`: the agent's first start failed and it never ran, so it is
    /// removed instead of restarted (if the registry agrees that it never ran). Left out of
    /// the encoding when false, as `ran`: a million reports carry neither.
    #[serde(default, skip_serializing_if = "is_false")]
    pub first_start: bool,
    /// It ran at this epoch since the last report although its status says otherwise (a
    /// start and a crash coalesced into one report on its node): the agent counts as having
    /// run. A `running` report says so by its status.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ran: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Query of `list_agents` / `find_agents`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindAgents {
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub capability: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub node: Option<u64>,
    #[serde(default)]
    pub status: Option<AgentStatus>,
    #[serde(default)]
    pub supervisor: Option<String>,
    /// Page: agents after this id (the previous page's `next`), at most `limit` (default and
    /// maximum 1,000). A string, so that MessagePack clients can send it as they read it.
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Answer only how many agents match (`{count}`), without paging.
    #[serde(default)]
    pub count: bool,
}

impl FindAgents {
    pub fn validate(&self) -> Result<(), WireError> {
        page_limit(self.limit)?;
        self.after_id().map(|_| ())
    }

    fn after_id(&self) -> Result<Option<Uuid>, WireError> {
        self.after
            .as_deref()
            .map(|a| {
                Uuid::parse_str(a).map_err(|_| {
                    WireError::new(ErrorCode::BadRequest, "after must be an agent id (a UUID)")
                })
            })
            .transpose()
    }

    /// Answers from the registry's indexes: pages through the smallest set of agents that
    /// has one of the asked values, filtering by the others; counts by one field without
    /// walking.
    pub fn answer(&self, reg: &Registry) -> Result<Value, WireError> {
        self.answer_from(reg, true)
    }

    /// Answers by walking every agent: the oracle the indexes are checked against (tests,
    /// fuzzing). Never on a command's path.
    #[doc(hidden)]
    pub fn answer_by_scan(&self, reg: &Registry) -> Result<Value, WireError> {
        self.answer_from(reg, false)
    }

    fn answer_from(&self, reg: &Registry, indexed: bool) -> Result<Value, WireError> {
        let limit = page_limit(self.limit)?;
        let after = self.after_id()?;
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        let empty = BTreeSet::new();
        let mut sets: Vec<&BTreeSet<Uuid>> = Vec::new();
        if indexed {
            let ix = &reg.index;
            let asked = [
                self.tag.as_ref().map(|t| ix.by_tag.get(t)),
                self.capability.as_ref().map(|c| ix.by_capability.get(c)),
                self.kind.as_ref().map(|k| ix.by_kind.get(k)),
                self.status.as_ref().map(|st| ix.by_status.get(st)),
                self.supervisor
                    .as_ref()
                    .map(|sup| ix.by_supervisor.get(sup)),
                self.node.as_ref().map(|n| reg.by_node.get(n)),
            ];
            // A value no agent has: an empty set.
            sets.extend(asked.into_iter().flatten().map(|s| s.unwrap_or(&empty)));
            if self.count && after.is_none() {
                match sets.as_slice() {
                    [] => return Ok(json!({ "count": reg.data.agents.len() })),
                    [only] => return Ok(json!({ "count": only.len() })),
                    _ => {}
                }
            }
        }
        let matches = |a: &&Agent| {
            self.tag.as_ref().is_none_or(|t| a.tags.contains(t))
                && self
                    .capability
                    .as_ref()
                    .is_none_or(|c| a.capabilities.contains(c))
                && self.kind.as_ref().is_none_or(|k| &a.kind == k)
                && self.node.is_none_or(|n| a.node == Some(n))
                && self.status.is_none_or(|s| a.status == s)
                && self.supervisor.as_ref().is_none_or(|s| &a.supervisor == s)
        };
        let range = (from, std::ops::Bound::Unbounded);
        let candidates: Box<dyn Iterator<Item = &Agent>> =
            match sets.into_iter().min_by_key(|s| s.len()) {
                Some(ids) => Box::new(
                    ids.range(range)
                        .filter_map(|id| reg.data.agents.get(id).map(|a| &**a)),
                ),
                None => Box::new(reg.data.agents.range(range).map(|(_, a)| &**a)),
            };
        let candidates = candidates.filter(matches);
        if self.count {
            return Ok(json!({ "count": candidates.count() }));
        }
        let (page, more) = take_page(candidates, limit);
        let next = if more {
            page.last().map(|a| a.id)
        } else {
            None
        };
        // Records without their configs: a viewer may list agents, and a config may hold
        // secrets (`export_state` hands it to operators).
        let records: Vec<Value> = page
            .iter()
            .map(|a| {
                let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
                if let Some(record) = v.as_object_mut() {
                    record.remove("config");
                }
                v
            })
            .collect();
        Ok(json!({ "agents": records, "next": next }))
    }
}

fn not_found(agent: &str) -> Refused {
    Refused::NoAgent {
        agent: agent.to_string(),
    }
}

impl Registry {
    /// Looks an agent up by id or name.
    pub fn agent(&self, id_or_name: &str) -> Option<&Agent> {
        let id = match Uuid::parse_str(id_or_name) {
            Ok(id) => id,
            Err(_) => *self.agent_names.get(id_or_name)?,
        };
        self.data.agents.get(&id).map(|a| &**a)
    }

    /// An agent's last checkpoint.
    pub fn checkpoint(&self, id: Uuid) -> Option<&Checkpoint> {
        self.data.checkpoints.get(&id).map(|c| &**c)
    }

    /// Agents placed on `node`, by id.
    pub fn agents_on(&self, node: u64) -> impl Iterator<Item = &Agent> {
        self.by_node
            .get(&node)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .filter_map(|id| self.data.agents.get(id).map(|a| &**a))
    }

    /// Agents placed on `node` with an id in `ids`, by id.
    pub fn agents_on_within(
        &self,
        node: u64,
        ids: (std::ops::Bound<Uuid>, std::ops::Bound<Uuid>),
    ) -> impl Iterator<Item = &Agent> {
        self.by_node
            .get(&node)
            .into_iter()
            .flat_map(move |set| set.range(ids))
            .filter_map(|id| self.data.agents.get(id).map(|a| &**a))
    }

    /// How many agents are placed on `node`.
    pub fn load(&self, node: u64) -> usize {
        self.by_node.get(&node).map_or(0, |ids| ids.len())
    }

    /// Inserts an agent record and indexes it.
    pub(super) fn insert_agent(&mut self, a: Agent) {
        let child = Child::Agent { id: a.id };
        // Looked up before an entry is made: most agents join a supervisor already listed, and
        // its name is then not copied.
        match self.children.get_mut(&a.supervisor) {
            Some(siblings) => {
                siblings.insert(a.position, child);
            }
            None => {
                let siblings = BTreeMap::from([(a.position, child)]);
                self.children.insert(a.supervisor.clone(), siblings);
            }
        }
        self.data.next_position = self.data.next_position.max(a.position + 1);
        if let Some(n) = &a.name {
            self.agent_names.insert(n.clone(), a.id);
        }
        match a.node {
            Some(node) => {
                self.by_node.entry(node).or_default().insert(a.id);
            }
            None => {
                self.unplaced.insert((a.position, a.id));
            }
        }
        self.index.insert(&a);
        self.data.agents.insert(a.id, Arc::new(a));
    }

    /// Removes an agent record, its checkpoint and its index entries. The record comes back
    /// shared, as it was: a snapshot being encoded may still hold it, and a copy is not needed.
    pub(super) fn remove_agent(&mut self, id: Uuid) -> Option<Arc<Agent>> {
        let a = self.data.agents.remove(&id)?;
        if let Some(siblings) = self.children.get_mut(&a.supervisor) {
            siblings.remove(&a.position);
        }
        if let Some(n) = &a.name {
            self.agent_names.remove(n);
        }
        if let Some(n) = a.node {
            if let Some(ids) = self.by_node.get_mut(&n) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_node.remove(&n);
                }
            }
        }
        self.unplaced.remove(&(a.position, id));
        self.index.remove(&a);
        self.data.checkpoints.remove(&id);
        Some(a)
    }

    pub(super) fn spawn_agent(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        s: &SpawnAgent,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let resolved;
        let s = if s.template.is_some() {
            resolved = self.resolve_spawn(s)?;
            &resolved
        } else {
            s
        };
        let sup_name = s
            .supervisor
            .clone()
            .unwrap_or_else(|| super::ROOT.to_string());
        if !self.data.supervisors.contains_key(&sup_name) {
            return Err(Refused::NoSupervisorForAgent { name: sup_name });
        }
        if let Some(n) = &s.name {
            if self.agent_names.contains_key(n) {
                return Err(Refused::AgentExists { name: n.clone() });
            }
        }
        if self.data.agents.contains_key(&id) {
            return Err(Refused::IdTaken { id });
        }
        if self.data.agents.len() >= limits::MAX_AGENTS {
            return Err(Refused::TooManyAgents {
                max: limits::MAX_AGENTS as u64,
            });
        }
        let placement = s.placement.clone().unwrap_or_default();
        let node = self
            .place_agent(&s.kind, &sup_name, &placement, None)
            .map_err(|r| self.refusal(&sup_name, r))?;
        let agent = Agent {
            id,
            name: s.name.clone(),
            kind: s.kind.clone(),
            config: s.config.clone(),
            restart: s.restart,
            shutdown_ms: s.shutdown_ms,
            tags: StringSet::from(&s.tags),
            capabilities: StringSet::from(&s.capabilities),
            supervisor: sup_name,
            position: self.data.next_position,
            status: AgentStatus::Pending,
            node: Some(node),
            placement: placement.into(),
            migrating_to: None,
            pending_reason: None,
            epoch: 1,
            restarts: 0,
            last_error: None,
            restart_requested: 0,
            created_at: time,
            updated_at: time,
            seq: 1,
            started: self.entry_predates_started(),
        };
        let reply = Applied::AgentSpawned(Box::new(agent.clone()));
        events.push(agent_event(&agent, "placed", time, json!({ "node": node })));
        self.insert_agent(agent);
        Ok(reply)
    }

    pub(super) fn stop_agent(
        &mut self,
        time: DateTime<Utc>,
        agent: &str,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let id = self
            .agent(agent)
            .map(|a| a.id)
            .ok_or_else(|| not_found(agent))?;
        let a = self.remove_agent(id).expect("looked up above");
        let data = json!({ "reason": "stop_agent" });
        events.push(stopped_event(&a, time, data));
        Ok(Applied::AgentStopped {
            id: a.id,
            name: a.name.clone(),
        })
    }

    pub(super) fn restart_agent(&mut self, time: DateTime<Utc>, agent: &str) -> Outcome {
        let id = self
            .agent(agent)
            .map(|a| a.id)
            .ok_or_else(|| not_found(agent))?;
        let a = agent_mut(&mut self.data.agents, &id).expect("looked up above");
        a.restart_requested += 1;
        // An agent that ended for good (a transient one that finished) starts again too.
        if matches!(a.status, AgentStatus::Stopped | AgentStatus::Failed) {
            self.index
                .status_changed(id, a.status, AgentStatus::Pending);
            a.status = AgentStatus::Pending;
        }
        a.updated_at = time;
        let requested = a.restart_requested;
        if a.node.is_none() {
            // It waits on no node (it stopped while its node was lost): place it now.
            self.placing_due = true;
        }
        Ok(Applied::RestartRequested {
            id,
            restart_requested: requested,
        })
    }

    /// A placement refusal as the client reads it, naming a colocated subtree's host.
    fn refusal(&self, sup: &str, r: crate::placement::Refusal) -> Refused {
        match self.data.supervisors.get(sup).and_then(|s| s.node) {
            Some(host) if r == crate::placement::Refusal::NoRoom => Refused::HostUnavailable {
                supervisor: sup.to_string(),
                node: host,
            },
            _ => Refused::Placement(r),
        }
    }

    /// Applies a batch of reports; a stale one (another node or an older epoch) is skipped,
    /// so a fenced-off instance cannot change anything.
    pub(super) fn report_agents(
        &mut self,
        time: DateTime<Utc>,
        reports: &[AgentReport],
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let (mut applied, mut stale) = (0, Vec::new());
        for r in reports {
            match agent_mut(&mut self.data.agents, &r.agent) {
                Some(a) if a.node == Some(r.node) && a.epoch == r.epoch => {
                    let first_start = r.first_start
                        && !r.ran
                        && r.restarts == 0
                        && r.status == AgentStatus::Failed
                        && !a.started
                        && !self.data.checkpoints.contains_key(&r.agent);
                    if first_start {
                        self.forget_failed_start(time, r, events);
                        applied += 1;
                        continue;
                    }
                    // A migrating agent stays migrating until its source hands it over.
                    let status = if a.status == AgentStatus::Migrating {
                        AgentStatus::Migrating
                    } else {
                        r.status
                    };
                    let event = match (r.status, r.restarts > 0, a.status) {
                        (AgentStatus::Running, true, _) => Some("restarted"),
                        (AgentStatus::Running, false, AgentStatus::Running) => None,
                        (AgentStatus::Running, false, _) => Some("started"),
                        (AgentStatus::Failed, _, _) => Some("crashed"),
                        (AgentStatus::Stopped, _, _) => Some("stopped"),
                        _ => None,
                    };
                    a.restarts = a.restarts.saturating_add(r.restarts);
                    if r.ran || r.status == AgentStatus::Running || r.restarts > 0 {
                        a.started = true;
                    }
                    self.index.status_changed(a.id, a.status, status);
                    a.status = status;
                    if r.error.is_some() {
                        a.last_error = r.error.clone();
                    }
                    a.updated_at = time;
                    if let Some(ev) = event {
                        a.seq += 1;
                        let data =
                            json!({ "status": a.status, "error": r.error, "restarts": a.restarts });
                        events.push(agent_event(a, ev, time, data));
                    }
                    applied += 1;
                }
                _ => stale.push(r.agent),
            }
        }
        Ok(Applied::Reported { applied, stale })
    }

    /// Removes an agent whose first start failed on its node (`report_agents`): it never
    /// ran, so nothing restarts it and its supervisor's intensity is not charged. The error is
    /// kept among the last `limits::MAX_START_FAILURES`, and a `start_failed` event says it.
    fn forget_failed_start(
        &mut self,
        time: DateTime<Utc>,
        r: &AgentReport,
        events: &mut Vec<RegistryEvent>,
    ) {
        let Some(a) = self.remove_agent(r.agent) else {
            return;
        };
        let error = r.error.clone().unwrap_or_else(|| "the start failed".into());
        let mut event = agent_event(
            &a,
            "start_failed",
            time,
            json!({ "node": r.node, "error": error, "supervisor": a.supervisor }),
        );
        event.seq += 1;
        events.push(event);
        let failures = &mut self.data.start_failures;
        failures.push_back(StartFailure {
            agent: a.id,
            node: r.node,
            error,
            time,
        });
        while failures.len() > limits::MAX_START_FAILURES {
            failures.pop_front();
        }
    }

    /// The error of agent `id`'s first start, if it was removed for it among the last
    /// `limits::MAX_START_FAILURES` such agents.
    pub fn start_failure(&self, id: Uuid) -> Option<&StartFailure> {
        self.data
            .start_failures
            .iter()
            .rev()
            .find(|f| f.agent == id)
    }

    pub(super) fn store_checkpoint(
        &mut self,
        time: DateTime<Utc>,
        agent: Uuid,
        node: u64,
        epoch: u64,
        state: &Bytes,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let Some(a) = agent_mut(&mut self.data.agents, &agent) else {
            return Err(not_found(&agent.to_string()));
        };
        if a.node != Some(node) || a.epoch != epoch {
            return Err(Refused::StaleCheckpoint {
                agent,
                epoch: a.epoch,
                asked: epoch,
            });
        }
        if state.len() > limits::MAX_CHECKPOINT_BYTES {
            return Err(Refused::CheckpointTooLarge {
                bytes: state.len() as u64,
                max: limits::MAX_CHECKPOINT_BYTES as u64,
            });
        }
        let seq = self
            .data
            .checkpoints
            .get(&agent)
            .map_or(1, |c| c.seq.saturating_add(1));
        a.seq += 1;
        // Only a running instance checkpoints (or hands its state over).
        a.started = true;
        events.push(agent_event(
            a,
            "checkpointed",
            time,
            json!({ "checkpoint_seq": seq, "bytes": state.len() }),
        ));
        self.data.checkpoints.insert(
            agent,
            Arc::new(Checkpoint {
                agent,
                epoch,
                seq,
                time,
                state: state.clone(),
                calls: Vec::new(),
            }),
        );
        Ok(Applied::Checkpointed {
            agent,
            checkpoint_seq: seq,
        })
    }
}

/// The name of a group's `i`th agent.
fn group_child_name(group: &str, i: u32) -> String {
    format!("{group}-{i}")
}

/// The id of a group's `i`th agent: derived from the command's stamped id.
fn group_child_id(group: Uuid, i: u32) -> Uuid {
    Uuid::from_u128(group.as_u128().wrapping_add(u128::from(i) + 1))
}

pub(super) fn agent_event(
    a: &Agent,
    event: &'static str,
    time: DateTime<Utc>,
    data: Value,
) -> RegistryEvent {
    RegistryEvent {
        entity: "agent",
        id: a.id.to_string(),
        event,
        time,
        epoch: a.epoch,
        seq: a.seq,
        data,
        supervisor: Some(a.supervisor.clone()),
    }
}

/// The `stopped` event of an agent whose record was just removed: the record's last change.
pub(super) fn stopped_event(a: &Agent, time: DateTime<Utc>, data: Value) -> RegistryEvent {
    let mut event = agent_event(a, "stopped", time, data);
    event.seq += 1;
    event
}

/// A `spawn_agent_group` past its checks: its supervisor exists, and its children are
/// added `limits::APPLY_STEP_AGENTS` at a time.
#[derive(Debug)]
pub(super) struct GroupWork {
    id: Uuid,
    group: SpawnAgentGroup,
    supervisor: super::Supervisor,
    next: u32,
    agents: Vec<Uuid>,
}

impl GroupWork {
    pub(super) fn finished(self) -> Applied {
        Applied::GroupSpawned {
            supervisor: Box::new(self.supervisor),
            agents: self.agents,
        }
    }
}

impl Registry {
    /// `spawn_agent_group`: a `simple_one_for_one` supervisor and `count` agents named
    /// `<name>-<i>`, all or nothing. Child ids are derived from the command's stamped id.
    /// Checks everything and creates the supervisor; `spawn_group_step` adds the children.
    pub(super) fn spawn_agent_group(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        g: &SpawnAgentGroup,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<super::Work, Refused> {
        let resolved;
        let g = if g.template.template.is_some() {
            let mut r = g.clone();
            r.template = self.resolve_spawn(&g.template)?;
            let each = crate::names::validate_config(&r.template.config).unwrap_or(usize::MAX);
            let total = each.saturating_mul(g.count as usize);
            if total > limits::MAX_GROUP_CONFIG_BYTES {
                return Err(Refused::GroupConfigTooLarge {
                    bytes: total as u64,
                    max: limits::MAX_GROUP_CONFIG_BYTES as u64,
                });
            }
            resolved = r;
            &resolved
        } else {
            g
        };
        if let Some(taken) = (0..g.count)
            .map(|i| group_child_name(&g.name, i))
            .find(|n| self.agent_names.contains_key(n))
        {
            return Err(Refused::AgentExists { name: taken });
        }
        let sup = super::CreateSupervisor {
            name: g.name.clone(),
            parent: g.parent.clone(),
            strategy: super::Strategy::SimpleOneForOne,
            max_restarts: g.max_restarts,
            max_seconds: g.max_seconds,
            backoff: super::Backoff::default(),
            placement: super::SupervisorPlacement::Colocate,
            request_id: None,
        };
        // Check ids, placement and room before changing anything, so a refusal leaves no half
        // group.
        if let Some(taken) = (0..g.count)
            .map(|i| group_child_id(id, i))
            .find(|c| self.data.agents.contains_key(c))
        {
            return Err(Refused::IdTaken { id: taken });
        }
        if self.data.agents.len() + g.count as usize > limits::MAX_AGENTS {
            return Err(Refused::GroupTooLarge {
                max: limits::MAX_AGENTS as u64,
            });
        }
        let parent = g.parent.clone().unwrap_or_else(|| super::ROOT.to_string());
        if !self.data.supervisors.contains_key(&parent) {
            return Err(Refused::NoParent { name: parent });
        }
        // The group runs on one node: its parent's, or one with room for all of it.
        let placement = g.template.placement.clone().unwrap_or_default();
        let host = match self.data.supervisors.get(&parent).and_then(|s| s.node) {
            Some(h) => self
                .place_agent(&g.template.kind, &parent, &placement, None)
                .map_err(|r| self.refusal(&parent, r))
                .map(|_| h)?,
            None => {
                let none = Default::default();
                let req = crate::placement::Request {
                    kinds: vec![g.template.kind.as_str()],
                    placement: &placement,
                    count: g.count as usize,
                    exclude: None,
                    siblings: &none,
                };
                crate::placement::choose(&req, &self.candidates()).map_err(Refused::Placement)?
            }
        };
        let mut supervisor = self.new_supervisor(time, id, &sup, events)?;
        supervisor.node = Some(host);
        if let Some(s) = self.data.supervisors.get_mut(&g.name) {
            s.node = Some(host);
        }
        Ok(super::Work::Group(Box::new(GroupWork {
            id,
            group: g.clone(),
            supervisor,
            next: 0,
            agents: Vec::with_capacity(g.count as usize),
        })))
    }

    /// Adds the next `limits::APPLY_STEP_AGENTS` children of a group; true once all are in.
    pub(super) fn spawn_group_step(
        &mut self,
        time: DateTime<Utc>,
        w: &mut GroupWork,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<bool, Refused> {
        let end = w
            .group
            .count
            .min(w.next.saturating_add(limits::APPLY_STEP_AGENTS));
        for i in w.next..end {
            let child = SpawnAgent {
                supervisor: Some(w.group.name.clone()),
                name: Some(group_child_name(&w.group.name, i)),
                ..w.group.template.clone()
            };
            let child_id = group_child_id(w.id, i);
            if let Applied::AgentSpawned(a) = self.spawn_agent(time, child_id, &child, events)? {
                w.agents.push(a.id);
            }
        }
        w.next = end;
        Ok(end == w.group.count)
    }

    /// `import_state`: replaces an agent's checkpoint and asks its node to restart it from it.
    pub(super) fn import_state(
        &mut self,
        time: DateTime<Utc>,
        agent: &str,
        state: &Bytes,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let a = self.agent(agent).ok_or_else(|| not_found(agent))?;
        let (id, node, epoch) = (a.id, a.node.unwrap_or(0), a.epoch);
        let out = self.store_checkpoint(time, id, node, epoch, state, events)?;
        self.restart_agent(time, &id.to_string())?;
        Ok(out)
    }
}

/// `spawn_agent_group {name, parent?, count, template, ...}`: a `simple_one_for_one`
/// supervisor with `count` children from one template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnAgentGroup {
    pub name: String,
    #[serde(default)]
    pub parent: Option<String>,
    pub count: u32,
    /// The children's spec, or the name of a registered template.
    #[serde(deserialize_with = "spec_or_template")]
    pub template: SpawnAgent,
    #[serde(default = "one")]
    pub max_restarts: u32,
    #[serde(default = "five")]
    pub max_seconds: u32,
    #[serde(default)]
    pub request_id: Option<String>,
}

fn one() -> u32 {
    1
}
fn five() -> u32 {
    5
}

impl SpawnAgentGroup {
    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)?;
        if self.count == 0 || self.count > limits::MAX_GROUP {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("count must be between 1 and {}", limits::MAX_GROUP),
            ));
        }
        if self.template.name.is_some() || self.template.supervisor.is_some() {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "template: name and supervisor are set by the group",
            ));
        }
        if self.template.wait != SpawnWait::Placed || self.template.timeout_ms.is_some() {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "template: wait and timeout_ms are for spawn_agent; a group answers once placed",
            ));
        }
        self.template.validate()?;
        let each = crate::names::validate_config(&self.template.config)?;
        let total = each.saturating_mul(self.count as usize);
        if total > limits::MAX_GROUP_CONFIG_BYTES {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "{} agents with a {each}-byte config make {total} bytes; a group's configs \
                     total at most {} bytes",
                    self.count,
                    limits::MAX_GROUP_CONFIG_BYTES
                ),
            ));
        }
        validate_request_id(&self.request_id)
    }
}

/// The agent `id` to change: the record is copied first if a snapshot still shares it.
pub(super) fn agent_mut<'a>(
    agents: &'a mut imbl::OrdMap<Uuid, Arc<Agent>>,
    id: &Uuid,
) -> Option<&'a mut Agent> {
    agents.get_mut(id).map(Arc::make_mut)
}

/// A group's `template`: a spec, or the name of a registered template (a string).
fn spec_or_template<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SpawnAgent, D::Error> {
    struct SpecOrName;
    impl<'de> serde::de::Visitor<'de> for SpecOrName {
        type Value = SpawnAgent;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a spawn_agent spec, or the name of a template")
        }

        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<SpawnAgent, E> {
            Ok(SpawnAgent::of_template(name.to_string()))
        }

        fn visit_map<M: serde::de::MapAccess<'de>>(self, map: M) -> Result<SpawnAgent, M::Error> {
            SpawnAgent::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(SpecOrName)
}

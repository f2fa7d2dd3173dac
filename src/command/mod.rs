//! The commands of the NATS interface: parsing and validating requests, and answering reads
//! from the registry. One file per command family; transport lives in `node::dispatch`.

pub mod agent;
pub mod cluster;
pub mod figures;
pub mod history;
pub mod placement;
pub mod reply;
pub mod supervisor;
pub mod transfer;

use serde::de::DeserializeOwned;

use crate::protocol::{Encoding, ErrorCode, WireError};
use crate::registry::{
    validate_request_id, AgentReport, CreateSupervisor, FindAgents, FindTemplates, FinishAgent,
    RegisterTemplate, SpawnAgent, TemplateRef, UpdateAgent, UpdateSupervisor,
};

pub use agent::{AgentRef, ImportState, SpawnAgentGroup, WaitAgent};

pub use crate::registry::SpawnSubtree;
pub use cluster::{JoinRequest, LeaveRequest};
pub use figures::{NodeMetrics, SupervisorMetrics};
pub use history::{AgentHistory, SupervisorHistory};
pub use placement::{DrainNode, GrantId, Handoff, Heartbeat, MigrateAgent, Rebalance};
pub use supervisor::{GetSupervisionTree, ListSupervisors, StopSupervisor};
pub use transfer::{
    ExportSubtree, ImportAbort, ImportBegin, ImportCommit, ImportPage, ImportSubtree, PeekDocument,
};

/// Who may send a command. NATS enforces it: `auth::permissions` turns each identity's role
/// into the subjects it may publish on (docs/security.md has the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads and events, without agent configs or checkpoints.
    Viewer,
    /// Also supervisors and agents: create, stop, call, migrate, export.
    Operator,
    /// Everything, including membership, drains, rebalancing and importing state.
    Admin,
    /// A node of the cluster speaking for itself: heartbeats, reports, checkpoints, hand-offs.
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Node => "node",
        }
    }

    /// Whether this role may send what `needed` may: client roles nest (viewer within
    /// operator within admin); only a node sends node commands, and a node sends no client
    /// command of its own accord (it relays them).
    pub fn allows(self, needed: Role) -> bool {
        let rank = |r: Role| match r {
            Role::Viewer => Some(0),
            Role::Operator => Some(1),
            Role::Admin => Some(2),
            Role::Node => None,
        };
        match (rank(self), rank(needed)) {
            (Some(have), Some(need)) => have >= need,
            _ => self == needed,
        }
    }
}

/// One command of the NATS interface: the single declaration that parsing, routing, `warden
/// ctl` and the Rust client derive from.
pub struct Spec {
    /// Its name, the last token of its subject.
    pub name: &'static str,
    pub route: Route,
    /// It creates something, so a client should send a `request_id` (`warden ctl` adds one);
    /// every write accepts one.
    pub creates: bool,
    pub role: Role,
    /// Decodes a body into the command (validated afterwards).
    parse: fn(&Fields<'_>) -> Result<Command, WireError>,
}

impl Spec {
    /// Whether clients use it (node-to-node commands are not listed).
    pub fn public(&self) -> bool {
        self.role != Role::Node
    }
}

/// Every command, in the order `warden ctl help` lists them.
#[rustfmt::skip]
pub const TABLE: &[Spec] = &[
    Spec { name: "cluster_status", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get::<NoFields>().map(|_| Command::ClusterStatus) },
    Spec { name: "health", route: Route::Local, creates: false, role: Role::Viewer,
           parse: |f| f.get::<NoFields>().map(|_| Command::Health) },
    Spec { name: "join", route: Route::Membership, creates: false, role: Role::Admin,
           parse: |f| f.get().map(Command::Join) },
    Spec { name: "leave", route: Route::Membership, creates: false, role: Role::Admin,
           parse: |f| f.get().map(Command::Leave) },
    Spec { name: "create_supervisor", route: Route::Write, creates: true, role: Role::Operator,
           parse: |f| f.get().map(Command::CreateSupervisor) },
    Spec { name: "stop_supervisor", route: Route::Write, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::StopSupervisor) },
    Spec { name: "update_supervisor", route: Route::Write, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::UpdateSupervisor) },
    Spec { name: "list_supervisors", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::ListSupervisors) },
    Spec { name: "get_supervision_tree", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::GetSupervisionTree) },
    Spec { name: "spawn_agent", route: Route::Write, creates: true, role: Role::Operator,
           parse: |f| f.get().map(Command::SpawnAgent) },
    Spec { name: "add_child_to_supervisor", route: Route::Write, creates: true,
           role: Role::Operator, parse: |f| f.get().map(Command::SpawnAgent) },
    Spec { name: "spawn_agent_group", route: Route::Write, creates: true, role: Role::Operator,
           parse: |f| f.get().map(Command::SpawnAgentGroup) },
    Spec { name: "stop_agent", route: Route::Write, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::StopAgent) },
    Spec { name: "restart_agent", route: Route::Write, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::RestartAgent) },
    Spec { name: "update_agent", route: Route::Write, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::UpdateAgent) },
    Spec { name: "wait_agent", route: Route::Wait, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::WaitAgent) },
    Spec { name: "agent_history", route: Route::History, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::AgentHistory) },
    Spec { name: "supervisor_history", route: Route::History, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::SupervisorHistory) },
    Spec { name: "get_agent_metrics", route: Route::Figures, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::AgentMetrics) },
    Spec { name: "get_supervisor_metrics", route: Route::Figures, creates: false,
           role: Role::Viewer, parse: |f| f.get().map(Command::SupervisorMetrics) },
    Spec { name: "node_metrics", route: Route::Local, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::NodeMetrics) },
    Spec { name: "register_template", route: Route::Write, creates: true, role: Role::Operator,
           parse: |f| f.get().map(Command::RegisterTemplate) },
    Spec { name: "spawn_subtree", route: Route::Write, creates: true, role: Role::Operator,
           parse: |f| f.get().map(Command::SpawnSubtree) },
    Spec { name: "delete_template", route: Route::Write, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::DeleteTemplate) },
    Spec { name: "get_template", route: Route::Read, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::GetTemplate) },
    Spec { name: "list_templates", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::FindTemplates) },
    Spec { name: "find_templates", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::FindTemplates) },
    Spec { name: "get_agent", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::GetAgent) },
    Spec { name: "list_agents", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::FindAgents) },
    Spec { name: "find_agents", route: Route::Read, creates: false, role: Role::Viewer,
           parse: |f| f.get().map(Command::FindAgents) },
    Spec { name: "export_state", route: Route::Read, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::ExportState) },
    Spec { name: "import_state", route: Route::Write, creates: false, role: Role::Admin,
           parse: |f| f.get().map(Command::ImportState) },
    Spec { name: "export_subtree", route: Route::Read, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::ExportSubtree) },
    Spec { name: "import_subtree", route: Route::Write, creates: true, role: Role::Admin,
           parse: |f| {
               f.get::<PeekDocument>()?.check()?;
               f.get().map(|i| Command::ImportSubtree(Box::new(i)))
           } },
    Spec { name: "import_begin", route: Route::Write, creates: true, role: Role::Admin,
           parse: |f| f.get().map(Command::ImportBegin) },
    Spec { name: "import_page", route: Route::Write, creates: false, role: Role::Admin,
           parse: |f| f.get().map(|p| Command::ImportPage(Box::new(p))) },
    Spec { name: "import_commit", route: Route::Write, creates: true, role: Role::Admin,
           parse: |f| f.get().map(Command::ImportCommit) },
    Spec { name: "import_abort", route: Route::Write, creates: false, role: Role::Admin,
           parse: |f| f.get().map(Command::ImportAbort) },
    Spec { name: "migrate_agent", route: Route::Write, creates: false, role: Role::Operator,
           parse: |f| f.get().map(Command::MigrateAgent) },
    Spec { name: "drain_node", route: Route::Write, creates: false, role: Role::Admin,
           parse: |f| f.get().map(Command::DrainNode) },
    Spec { name: "rebalance", route: Route::Write, creates: false, role: Role::Admin,
           parse: |f| f.get().map(Command::Rebalance) },
    // Answered by the leader one by one, never batched behind writes.
    Spec { name: "heartbeat", route: Route::Read, creates: false, role: Role::Node,
           parse: |f| f.get().map(Command::Heartbeat) },
    Spec { name: "report_agents", route: Route::Write, creates: false, role: Role::Node,
           parse: |f| f.get().map(Command::ReportAgents) },
    Spec { name: "checkpoint", route: Route::Write, creates: false, role: Role::Node,
           parse: |f| f.get().map(Command::Checkpoint) },
    Spec { name: "handoff", route: Route::Write, creates: false, role: Role::Node,
           parse: |f| f.get().map(Command::Handoff) },
    Spec { name: "finish_agents", route: Route::Write, creates: false, role: Role::Node,
           parse: |f| f.get().map(Command::FinishAgents) },
];

/// The command named `name`, if there is one.
pub fn spec(name: &str) -> Option<&'static Spec> {
    TABLE.iter().find(|s| s.name == name)
}

/// The commands clients use, in `TABLE`'s order.
pub fn public_names() -> impl Iterator<Item = &'static str> {
    TABLE.iter().filter(|s| s.public()).map(|s| s.name)
}

/// `report_agents`: a hosting node's batch of observations; not for clients.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportAgents {
    pub reports: Vec<AgentReport>,
}

/// `checkpoint`: an agent's state from the node running it; not for clients.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    pub agent: uuid::Uuid,
    pub node: u64,
    pub epoch: u64,
    pub state: bytes::Bytes,
}

/// A parsed, validated command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    ClusterStatus,
    Health,
    Join(JoinRequest),
    Leave(LeaveRequest),
    CreateSupervisor(CreateSupervisor),
    StopSupervisor(StopSupervisor),
    UpdateSupervisor(UpdateSupervisor),
    ListSupervisors(ListSupervisors),
    GetSupervisionTree(GetSupervisionTree),
    SpawnAgent(SpawnAgent),
    SpawnAgentGroup(SpawnAgentGroup),
    StopAgent(AgentRef),
    RestartAgent(AgentRef),
    UpdateAgent(UpdateAgent),
    GetAgent(AgentRef),
    FindAgents(FindAgents),
    ExportState(AgentRef),
    ImportState(ImportState),
    ReportAgents(ReportAgents),
    Checkpoint(CheckpointRequest),
    Heartbeat(Heartbeat),
    MigrateAgent(MigrateAgent),
    DrainNode(DrainNode),
    Rebalance(Rebalance),
    Handoff(Handoff),
    FinishAgents(FinishAgents),
    WaitAgent(WaitAgent),
    AgentHistory(AgentHistory),
    SupervisorHistory(SupervisorHistory),
    AgentMetrics(AgentRef),
    SupervisorMetrics(SupervisorMetrics),
    NodeMetrics(NodeMetrics),
    RegisterTemplate(RegisterTemplate),
    DeleteTemplate(TemplateRef),
    GetTemplate(TemplateRef),
    FindTemplates(FindTemplates),
    ExportSubtree(ExportSubtree),
    ImportSubtree(Box<ImportSubtree>),
    ImportBegin(ImportBegin),
    ImportPage(Box<ImportPage>),
    ImportCommit(ImportCommit),
    ImportAbort(ImportAbort),
    SpawnSubtree(SpawnSubtree),
}

/// Where a command is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On the node that received it (`health`).
    Local,
    /// On the leader, after a linearizability check.
    Read,
    /// On the leader, through Raft.
    Write,
    /// On the leader, changing Raft membership and then the registry.
    Membership,
    /// On the node that received it, from its own copy of the registry, waiting for a change
    /// up to the body's `timeout_ms` (`wait_agent`).
    Wait,
    /// On the node that received it, from the cluster's history stream in JetStream.
    History,
    /// On the nodes that run the agents, which the node that received it asks (per-agent
    /// figures live there, not in the registry).
    Figures,
}

/// The fields of a command without any (`health`, `cluster_status`): none are accepted.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

impl Command {
    /// Parses the body of command `name`. Every failure is a `bad_request` that names the
    /// problem (unknown command, missing field, wrong type, invalid value).
    pub fn parse(name: &str, enc: Encoding, body: &[u8]) -> Result<Command, WireError> {
        let Some(spec) = spec(name) else {
            let known: Vec<&str> = public_names().collect();
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "unknown command {name:?}; known commands: {}",
                    known.join(", ")
                ),
            ));
        };
        let cmd = (spec.parse)(&Fields {
            cmd: spec.name,
            enc,
            body,
        })?;
        cmd.validate()?;
        Ok(cmd)
    }

    /// The nodes this command speaks for. A node may send such a command only for itself
    /// (`node::dispatch`, "Origin"); a client's `join` or `leave` acts on a node instead.
    pub fn speaks_for(&self) -> Vec<u64> {
        match self {
            Command::Heartbeat(h) => vec![h.node_id],
            Command::Join(j) => vec![j.node_id],
            Command::Leave(l) => vec![l.node_id],
            Command::ReportAgents(r) => r.reports.iter().map(|r| r.node).collect(),
            Command::Checkpoint(c) => vec![c.node],
            Command::Handoff(h) => h.items.iter().map(|i| i.node).collect(),
            Command::FinishAgents(f) => f.items.iter().map(|i| i.node).collect(),
            _ => Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), WireError> {
        match self {
            Command::ClusterStatus | Command::Health | Command::Leave(_) => Ok(()),
            Command::Join(j) => j.validate(),
            Command::CreateSupervisor(c) => {
                c.validate()?;
                validate_request_id(&c.request_id)
            }
            Command::StopSupervisor(s) => s.validate(),
            Command::UpdateSupervisor(u) => u.validate(),
            Command::UpdateAgent(u) => u.validate(),
            Command::ListSupervisors(l) => l.validate(),
            Command::GetSupervisionTree(g) => g.validate(),
            Command::SpawnAgent(s) => s.validate(),
            Command::SpawnAgentGroup(g) => g.validate(),
            Command::StopAgent(a)
            | Command::RestartAgent(a)
            | Command::GetAgent(a)
            | Command::ExportState(a) => a.validate(),
            Command::FindAgents(f) => f.validate(),
            Command::ImportState(i) => i.validate().map(|_| ()),
            Command::ReportAgents(_) | Command::Checkpoint(_) | Command::Handoff(_) => Ok(()),
            Command::Heartbeat(_) => Ok(()),
            Command::FinishAgents(f) => f.validate(),
            Command::WaitAgent(w) => w.validate(),
            Command::AgentHistory(h) => h.validate(),
            Command::SupervisorHistory(h) => h.validate(),
            Command::AgentMetrics(a) => a.validate(),
            Command::SupervisorMetrics(s) => s.validate(),
            Command::NodeMetrics(n) => n.validate(),
            Command::RegisterTemplate(r) => r.validate(),
            Command::DeleteTemplate(t) | Command::GetTemplate(t) => t.validate(),
            Command::FindTemplates(f) => f.validate(),
            Command::ExportSubtree(e) => e.validate(),
            Command::ImportSubtree(i) => i.validate(),
            Command::ImportBegin(b) => b.validate(),
            Command::ImportPage(p) => p.validate(),
            Command::ImportCommit(c) => validate_request_id(&c.request_id),
            Command::ImportAbort(a) => validate_request_id(&a.request_id),
            Command::SpawnSubtree(s) => s.validate(),
            Command::MigrateAgent(m) => m.validate(),
            Command::DrainNode(d) => d.validate(),
            Command::Rebalance(r) => r.validate(),
        }
    }
}

/// Where command `name` runs, from its name alone, so that a follower can forward a command
/// without parsing it. `None` for an unknown name.
pub fn route_of(name: &str) -> Option<Route> {
    spec(name).map(|s| s.route)
}

/// A command's body, decoded on demand into the command's typed fields.
pub struct Fields<'a> {
    cmd: &'a str,
    enc: Encoding,
    body: &'a [u8],
}

impl Fields<'_> {
    /// Deserializes the fields, turning serde's message into a clear `bad_request`.
    fn get<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        self.enc.decode_as(self.body).map_err(|e| {
            WireError::new(
                ErrorCode::BadRequest,
                format!("{}: {}", self.cmd, e.message),
            )
        })
    }
}

/// `finish_agents {items}` (node to leader): agents that ended for good on the sender.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishAgents {
    pub items: Vec<FinishAgent>,
}

impl FinishAgents {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.items.is_empty() || self.items.len() > crate::limits::REPORTS_PER_WRITE {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("1 to {} items", crate::limits::REPORTS_PER_WRITE),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(name: &str, body: Value) -> Result<Command, WireError> {
        Command::parse(name, Encoding::Json, &serde_json::to_vec(&body).unwrap())
    }

    #[track_caller]
    fn check_bad(name: &str, body: Value, needle: &str) {
        let err =
            Command::parse(name, Encoding::Json, &serde_json::to_vec(&body).unwrap()).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(
            err.message.contains(needle),
            "{:?} should mention {needle:?}",
            err.message
        );
    }

    #[test]
    fn bad_commands_get_errors_that_name_the_problem() {
        check_bad("frobnicate", json!({}), "unknown command");
        check_bad("create_supervisor", json!({}), "missing field `name`");
        check_bad("create_supervisor", json!({"name": 5}), "invalid type");
        check_bad("create_supervisor", json!({"name": "a b"}), "is invalid");
        check_bad(
            "create_supervisor",
            json!({"name": "a", "strategy": "one_for_none"}),
            "unknown variant",
        );
        check_bad(
            "create_supervisor",
            json!({"name": "a", "max_restart": 3}),
            "unknown field",
        );
        check_bad(
            "create_supervisor",
            json!({"name": "a", "max_seconds": 0}),
            "max_seconds",
        );
        check_bad(
            "create_supervisor",
            json!({"name": "a", "backoff": {"jitter": 2.0}}),
            "jitter",
        );
        check_bad(
            "create_supervisor",
            json!({"name": "a", "request_id": ""}),
            "request_id",
        );
        check_bad("stop_supervisor", json!({}), "missing field `name`");
        check_bad("health", json!({"x": 1}), "unknown field");
        check_bad("join", json!({"node_id": "one"}), "invalid type");
    }

    /// Goal: the table names each command once, and every name parses to its own command.
    #[test]
    fn the_table_names_each_command_once() {
        let mut names: Vec<&str> = TABLE.iter().map(|s| s.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a command is declared twice");
        assert!(public_names().all(|n| spec(n).is_some_and(|s| s.role != Role::Node)));
        assert_eq!(route_of("frobnicate"), None);
        assert!(spec("spawn_agent").is_some_and(|s| s.creates));
        assert!(spec("get_agent").is_some_and(|s| !s.creates && s.route == Route::Read));
    }

    #[test]
    fn good_commands_parse_with_defaults() {
        let c = parse("create_supervisor", json!({"name": "web"})).unwrap();
        let Command::CreateSupervisor(c) = c else {
            panic!()
        };
        assert_eq!(
            (c.max_restarts, c.max_seconds),
            (1, 5),
            "OTP's default intensity"
        );
        assert_eq!(c.parent, None);
        assert_eq!(route_of("health"), Some(Route::Local));
    }
}

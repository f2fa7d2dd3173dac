//! The commands of the NATS interface: parsing and validating requests, and answering reads
//! from the registry. One file per command family; transport lives in `node::dispatch`.

pub mod agent;
pub mod cluster;
pub mod placement;
pub mod supervisor;

use serde::de::DeserializeOwned;

use crate::protocol::{Encoding, ErrorCode, WireError};
use crate::registry::{validate_request_id, AgentReport, CreateSupervisor, FindAgents, SpawnAgent};

pub use agent::{AgentRef, ImportState, SpawnAgentGroup};

pub use cluster::{JoinRequest, LeaveRequest};
pub use placement::{DrainNode, Handoff, Heartbeat, MigrateAgent, Rebalance};
pub use supervisor::{GetSupervisionTree, ListSupervisors, StopSupervisor};

/// Every command name this node answers, in the order `warden ctl help` lists them.
pub const COMMANDS: &[&str] = &[
    "cluster_status",
    "health",
    "join",
    "leave",
    "create_supervisor",
    "stop_supervisor",
    "list_supervisors",
    "get_supervision_tree",
    "spawn_agent",
    "add_child_to_supervisor",
    "spawn_agent_group",
    "stop_agent",
    "restart_agent",
    "get_agent",
    "list_agents",
    "find_agents",
    "export_state",
    "import_state",
    "migrate_agent",
    "drain_node",
    "rebalance",
];

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
    ListSupervisors(ListSupervisors),
    GetSupervisionTree(GetSupervisionTree),
    SpawnAgent(SpawnAgent),
    SpawnAgentGroup(SpawnAgentGroup),
    StopAgent(AgentRef),
    RestartAgent(AgentRef),
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
}

/// The fields of a command without any (`health`, `cluster_status`): none are accepted.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

impl Command {
    /// Parses the body of command `name`. Every failure is a `bad_request` that names the
    /// problem (unknown command, missing field, wrong type, invalid value).
    pub fn parse(name: &str, enc: Encoding, body: &[u8]) -> Result<Command, WireError> {
        let cmd = match name {
            "cluster_status" => Fields {
                cmd: name,
                enc,
                body,
            }
            .get::<NoFields>()
            .map(|_| Command::ClusterStatus)?,
            "health" => Fields {
                cmd: name,
                enc,
                body,
            }
            .get::<NoFields>()
            .map(|_| Command::Health)?,
            "join" => Command::Join(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "leave" => Command::Leave(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "create_supervisor" => Command::CreateSupervisor(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "stop_supervisor" => Command::StopSupervisor(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "list_supervisors" => Command::ListSupervisors(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "get_supervision_tree" => Command::GetSupervisionTree(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "spawn_agent" | "add_child_to_supervisor" => Command::SpawnAgent(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "spawn_agent_group" => Command::SpawnAgentGroup(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "stop_agent" => Command::StopAgent(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "restart_agent" => Command::RestartAgent(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "get_agent" => Command::GetAgent(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "list_agents" | "find_agents" => Command::FindAgents(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "export_state" => Command::ExportState(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "import_state" => Command::ImportState(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "report_agents" => Command::ReportAgents(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "checkpoint" => Command::Checkpoint(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "heartbeat" => Command::Heartbeat(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "migrate_agent" => Command::MigrateAgent(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "drain_node" => Command::DrainNode(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "rebalance" => Command::Rebalance(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            "handoff" => Command::Handoff(
                Fields {
                    cmd: name,
                    enc,
                    body,
                }
                .get()?,
            ),
            other => {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "unknown command {other:?}; known commands: {}",
                        COMMANDS.join(", ")
                    ),
                ))
            }
        };
        cmd.validate()?;
        Ok(cmd)
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
            Command::MigrateAgent(m) => m.validate(),
            Command::DrainNode(d) => d.validate(),
            Command::Rebalance(r) => r.validate(),
        }
    }

    /// Where this command runs.
    pub fn route(&self) -> Route {
        match self {
            Command::Health => Route::Local,
            Command::ClusterStatus
            | Command::ListSupervisors(_)
            | Command::GetSupervisionTree(_)
            | Command::GetAgent(_)
            | Command::FindAgents(_)
            | Command::ExportState(_) => Route::Read,
            Command::CreateSupervisor(_)
            | Command::StopSupervisor(_)
            | Command::SpawnAgent(_)
            | Command::SpawnAgentGroup(_)
            | Command::StopAgent(_)
            | Command::RestartAgent(_)
            | Command::ImportState(_)
            | Command::ReportAgents(_)
            | Command::Checkpoint(_)
            | Command::MigrateAgent(_)
            | Command::DrainNode(_)
            | Command::Rebalance(_)
            | Command::Handoff(_) => Route::Write,
            // Answered by the leader one by one, never batched behind writes.
            Command::Heartbeat(_) => Route::Read,
            Command::Join(_) | Command::Leave(_) => Route::Membership,
        }
    }
}

/// Where command `name` runs, from its name alone, so that a follower can forward a command
/// without parsing it. `None` for an unknown name.
pub fn route_of(name: &str) -> Option<Route> {
    Some(match name {
        "health" => Route::Local,
        "cluster_status"
        | "list_supervisors"
        | "get_supervision_tree"
        | "get_agent"
        | "list_agents"
        | "find_agents"
        | "export_state"
        | "heartbeat" => Route::Read,
        "create_supervisor"
        | "stop_supervisor"
        | "spawn_agent"
        | "add_child_to_supervisor"
        | "spawn_agent_group"
        | "stop_agent"
        | "restart_agent"
        | "import_state"
        | "report_agents"
        | "checkpoint"
        | "migrate_agent"
        | "drain_node"
        | "rebalance"
        | "handoff" => Route::Write,
        "join" | "leave" => Route::Membership,
        _ => return None,
    })
}

/// A command's body, decoded on demand into the command's typed fields.
struct Fields<'a> {
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
        assert_eq!(parse("health", json!({})).unwrap().route(), Route::Local);
    }
}

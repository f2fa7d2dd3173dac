//! The commands of the NATS interface: parsing and validating requests, and answering reads
//! from the registry. One file per command family; transport lives in `node::dispatch`.

pub mod cluster;
pub mod supervisor;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::protocol::{ErrorCode, WireError};
use crate::registry::{validate_request_id, CreateSupervisor};

pub use cluster::{JoinRequest, LeaveRequest};
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
];

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
    pub fn parse(name: &str, body: Value) -> Result<Command, WireError> {
        let cmd = match name {
            "cluster_status" => fields::<NoFields>(name, body).map(|_| Command::ClusterStatus)?,
            "health" => fields::<NoFields>(name, body).map(|_| Command::Health)?,
            "join" => Command::Join(fields(name, body)?),
            "leave" => Command::Leave(fields(name, body)?),
            "create_supervisor" => Command::CreateSupervisor(fields(name, body)?),
            "stop_supervisor" => Command::StopSupervisor(fields(name, body)?),
            "list_supervisors" => Command::ListSupervisors(fields(name, body)?),
            "get_supervision_tree" => Command::GetSupervisionTree(fields(name, body)?),
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
        }
    }

    /// Where this command runs.
    pub fn route(&self) -> Route {
        match self {
            Command::Health => Route::Local,
            Command::ClusterStatus
            | Command::ListSupervisors(_)
            | Command::GetSupervisionTree(_) => Route::Read,
            Command::CreateSupervisor(_) | Command::StopSupervisor(_) => Route::Write,
            Command::Join(_) | Command::Leave(_) => Route::Membership,
        }
    }
}

/// Where command `name` runs, from its name alone, so that a follower can forward a command
/// without parsing it. `None` for an unknown name.
pub fn route_of(name: &str) -> Option<Route> {
    Some(match name {
        "health" => Route::Local,
        "cluster_status" | "list_supervisors" | "get_supervision_tree" => Route::Read,
        "create_supervisor" | "stop_supervisor" => Route::Write,
        "join" | "leave" => Route::Membership,
        _ => return None,
    })
}

/// Deserializes a command's fields, turning serde's message into a clear `bad_request`.
fn fields<T: DeserializeOwned>(command: &str, body: Value) -> Result<T, WireError> {
    serde_json::from_value(body)
        .map_err(|e| WireError::new(ErrorCode::BadRequest, format!("{command}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[track_caller]
    fn check_bad(name: &str, body: Value, needle: &str) {
        let err = Command::parse(name, body).unwrap_err();
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
        let c = Command::parse("create_supervisor", json!({"name": "web"})).unwrap();
        let Command::CreateSupervisor(c) = c else {
            panic!()
        };
        assert_eq!(
            (c.max_restarts, c.max_seconds),
            (1, 5),
            "OTP's default intensity"
        );
        assert_eq!(c.parent, None);
        assert_eq!(
            Command::parse("health", json!({})).unwrap().route(),
            Route::Local
        );
    }
}

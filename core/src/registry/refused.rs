//! Why a command changed nothing, as data. `Registry::apply` returns it and a `request_id`
//! record keeps it; the English message a client reads is produced from it (`Display`) when
//! the reply is rendered, so no message text is replicated state and rewording one changes
//! neither the log nor the snapshots.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{ErrorCode, WireError};
use crate::placement::Refusal;

/// A refusal by the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Refused {
    /// The `request_id` was used for another command (or the same one with other fields).
    RequestIdReused {
        request_id: String,
        command: String,
    },
    /// A node that left asks to join again under the same id.
    NodeLeftForGood {
        node: u64,
    },
    NoNode {
        node: u64,
    },
    /// A drain of a node that left.
    NodeLeft {
        node: u64,
    },
    SupervisorExists {
        name: String,
    },
    TooManySupervisors {
        max: u64,
    },
    NoParent {
        name: String,
    },
    /// The parent is `simple_one_for_one`: its children all come from its template.
    ParentIsSimple {
        name: String,
    },
    TooDeep {
        max: u64,
    },
    RootStops,
    NoSupervisor {
        name: String,
    },
    /// An agent's supervisor does not exist.
    NoSupervisorForAgent {
        name: String,
    },
    AgentExists {
        name: String,
    },
    TooManyAgents {
        max: u64,
    },
    /// A group would take the registry past its agents' maximum.
    GroupTooLarge {
        max: u64,
    },
    /// The id the leader drew for a new agent (or one derived from it, in a group) is in use.
    /// With random ids this does not happen; the registry refuses rather than overwrite.
    IdTaken {
        id: Uuid,
    },
    NoAgent {
        agent: String,
    },
    /// A colocated subtree's node cannot take one more of its agents.
    HostUnavailable {
        supervisor: String,
        node: u64,
    },
    /// No node can take the agent.
    Placement(Refusal),
    StaleCheckpoint {
        agent: Uuid,
        epoch: u64,
        asked: u64,
    },
    CheckpointTooLarge {
        bytes: u64,
        max: u64,
    },
    AlreadyMigrating {
        agent: String,
        to: u64,
    },
    /// An agent that waits for a node, for `why`.
    NothingToMigrate {
        agent: String,
        why: String,
    },
    Pinned {
        agent: String,
        node: u64,
    },
    AlreadyThere {
        agent: String,
        node: u64,
    },
    /// A migration's chosen target cannot take it.
    TargetUnavailable {
        node: u64,
    },
    /// A refusal remembered by a registry of version 1, which kept it as text.
    Legacy(WireError),
    /// `update_supervisor` to `simple_one_for_one` of a supervisor holding nested supervisors.
    HoldsSupervisors {
        name: String,
    },
    TemplateExists {
        name: String,
    },
    TooManyTemplates {
        max: u64,
    },
    NoTemplate {
        name: String,
    },
    /// A group of a template whose config times the count is over the limit.
    GroupConfigTooLarge {
        bytes: u64,
        max: u64,
    },
    /// No staged import by that id (never begun, committed, aborted, or expired).
    NoImport {
        import: Uuid,
    },
    /// As many imports as may be staged at once are.
    ImportsBusy {
        max: u64,
    },
    /// The import's document cannot be imported as it is.
    ImportInvalid(super::ImportProblem),
    /// A spawn of a supervisor template (`subtree`), or `spawn_subtree` of an agent template.
    WrongTemplate {
        name: String,
        subtree: bool,
    },
}

impl Refused {
    /// The reply envelope's error code.
    pub fn code(&self) -> ErrorCode {
        use Refused::*;
        match self {
            RequestIdReused { .. }
            | NodeLeftForGood { .. }
            | NodeLeft { .. }
            | SupervisorExists { .. }
            | ParentIsSimple { .. }
            | RootStops
            | AgentExists { .. }
            | IdTaken { .. }
            | StaleCheckpoint { .. }
            | AlreadyMigrating { .. }
            | NothingToMigrate { .. }
            | Pinned { .. }
            | AlreadyThere { .. }
            | HoldsSupervisors { .. }
            | TemplateExists { .. } => ErrorCode::Conflict,
            NoNode { .. }
            | NoParent { .. }
            | NoSupervisor { .. }
            | NoSupervisorForAgent { .. }
            | NoAgent { .. }
            | NoTemplate { .. }
            | NoImport { .. } => ErrorCode::NotFound,
            TooManySupervisors { .. }
            | TooManyAgents { .. }
            | GroupTooLarge { .. }
            | HostUnavailable { .. }
            | TargetUnavailable { .. }
            | TooManyTemplates { .. }
            | ImportsBusy { .. } => ErrorCode::Capacity,
            TooDeep { .. } | WrongTemplate { .. } => ErrorCode::BadRequest,
            ImportInvalid(p) => match p {
                super::ImportProblem::TooLarge { .. } => ErrorCode::TooLarge,
                super::ImportProblem::TooManyItems { .. } => ErrorCode::Capacity,
                super::ImportProblem::PageOutOfOrder { .. }
                | super::ImportProblem::Incomplete { .. } => ErrorCode::Conflict,
                _ => ErrorCode::BadRequest,
            },
            CheckpointTooLarge { .. } | GroupConfigTooLarge { .. } => ErrorCode::TooLarge,
            Placement(r) => r.code(),
            Legacy(e) => e.code,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Refused::*;
        match self {
            RequestIdReused {
                request_id,
                command,
            } => write!(
                f,
                "request_id {request_id:?} was already used for a different command or the \
                 same command with other fields (`{command}`); use a fresh one"
            ),
            NodeLeftForGood { node } => {
                write!(
                    f,
                    "node {node} left the cluster for good; start it with a new id"
                )
            }
            NoNode { node } => write!(f, "no node {node}"),
            NodeLeft { node } => write!(f, "node {node} left the cluster"),
            SupervisorExists { name } => write!(f, "a supervisor named {name:?} already exists"),
            TooManySupervisors { max } => {
                write!(f, "the registry holds its maximum of {max} supervisors")
            }
            NoParent { name } => write!(f, "parent supervisor {name:?} does not exist"),
            ParentIsSimple { name } => write!(
                f,
                "parent {name:?} is simple_one_for_one: its children all come from its \
                 template, so it cannot hold a nested supervisor"
            ),
            TooDeep { max } => write!(f, "supervisors nest at most {max} levels deep"),
            RootStops => write!(f, "the root supervisor cannot be stopped"),
            TemplateExists { name } => {
                write!(f, "a template named {name:?} exists; delete it first")
            }
            TooManyTemplates { max } => {
                write!(f, "the registry holds its maximum of {max} templates")
            }
            NoTemplate { name } => write!(f, "no template named {name:?}"),
            NoImport { import } => write!(
                f,
                "no staged import {import}: it was committed, aborted, or dropped after {} s \
                 without a page; begin again",
                crate::limits::IMPORT_TTL_SECS
            ),
            ImportsBusy { max } => write!(
                f,
                "{max} imports are being staged, the most at once; commit or abort one, or \
                 wait for an abandoned one to expire"
            ),
            ImportInvalid(p) => write!(f, "{p}"),
            WrongTemplate {
                name,
                subtree: true,
            } => write!(
                f,
                "template {name:?} is a supervisor template (a subtree): start it with \
                 spawn_subtree"
            ),
            WrongTemplate { name, .. } => write!(
                f,
                "template {name:?} is an agent template: start it with spawn_agent"
            ),
            GroupConfigTooLarge { bytes, max } => write!(
                f,
                "the template's config times the group's count makes {bytes} bytes; a group's \
                 configs total at most {max} bytes"
            ),
            HoldsSupervisors { name } => write!(
                f,
                "supervisor {name:?} holds nested supervisors; a simple_one_for_one supervisor \
                 holds agents only"
            ),
            NoSupervisor { name } => write!(f, "no supervisor named {name:?}"),
            NoSupervisorForAgent { name } => write!(f, "supervisor {name:?} does not exist"),
            AgentExists { name } => write!(f, "an agent named {name:?} already exists"),
            TooManyAgents { max } => write!(f, "the registry holds its maximum of {max} agents"),
            GroupTooLarge { max } => write!(f, "the registry holds at most {max} agents"),
            IdTaken { id } => write!(
                f,
                "the id {id} drawn for a new agent is in use; send the command again"
            ),
            NoAgent { agent } => write!(f, "no agent {agent:?}"),
            HostUnavailable { supervisor, node } => write!(
                f,
                "supervisor {supervisor:?} keeps its subtree on node {node}, which is not up or \
                 does not run the kind"
            ),
            Placement(r) => write!(f, "{}", r.describe()),
            StaleCheckpoint {
                agent,
                epoch,
                asked,
            } => write!(
                f,
                "stale checkpoint: agent {agent} is at epoch {epoch}, not {asked}"
            ),
            CheckpointTooLarge { bytes, max } => {
                write!(f, "checkpoint is {bytes} bytes; the limit is {max}")
            }
            AlreadyMigrating { agent, to } => {
                write!(f, "agent {agent:?} is already migrating to node {to}")
            }
            NothingToMigrate { agent, why } => write!(
                f,
                "agent {agent:?} waits for a node ({why}); there is nothing to migrate"
            ),
            Pinned { agent, node } => {
                write!(
                    f,
                    "agent {agent:?} is pinned to node {node} and cannot move"
                )
            }
            AlreadyThere { agent, node } => {
                write!(f, "agent {agent:?} already runs on node {node}")
            }
            TargetUnavailable { node } => write!(
                f,
                "node {node} cannot take it: it is not up, lacks the kind, fails the \
                 constraints or is full"
            ),
            Legacy(e) => write!(f, "{}", e.message),
        }
    }
}

impl From<Refused> for WireError {
    fn from(r: Refused) -> WireError {
        WireError::new(r.code(), r.to_string())
    }
}

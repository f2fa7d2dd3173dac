//! Placement and liveness commands: `migrate_agent`, `drain_node`, `rebalance`, and the
//! node-to-leader `heartbeat` and `handoff`.

use serde::{Deserialize, Serialize};

use crate::limits;
use crate::protocol::{ErrorCode, WireError};
use crate::registry::{HandoffItem, NodeLoad};

/// `heartbeat {node_id, load, acked, process}`: a node asks the leader to extend its lease, reports its
/// load, and says which grant it last received (`acked`), so that the leader can tell a node
/// that hears nothing back from one that is well. Not for clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub node_id: u64,
    #[serde(default)]
    pub load: NodeLoad,
    #[serde(default)]
    pub acked: Option<GrantId>,
    /// A number the node's process picked when it started: a new one says it restarted, and
    /// what its previous process had not acknowledged is no longer waited for.
    #[serde(default)]
    pub process: u64,
}

/// A grant, named by the leader that made it: its Raft term, then a number that grows with
/// every grant that leader makes. Ordered by term first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantId {
    pub term: u64,
    pub grant: u64,
}

/// `handoff {items}`: a source node has stopped migrating agents. Not for clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    pub items: Vec<HandoffItem>,
}

/// `migrate_agent {agent, to?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateAgent {
    pub agent: String,
    /// The target node; the best node by placement when absent.
    #[serde(default)]
    pub to: Option<u64>,
    #[serde(default)]
    pub request_id: Option<String>,
}

impl MigrateAgent {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.agent.is_empty() || self.agent.len() > limits::MAX_NAME_LEN + 8 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "agent must be an id or a name",
            ));
        }
        if self.to == Some(0) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "to: node ids are positive",
            ));
        }
        crate::registry::validate_request_id(&self.request_id)
    }
}

/// `drain_node {node, cancel?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainNode {
    pub node: u64,
    /// Stop draining: the node takes new agents again.
    #[serde(default)]
    pub cancel: bool,
    #[serde(default)]
    pub request_id: Option<String>,
}

impl DrainNode {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.node == 0 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "node ids are positive",
            ));
        }
        crate::registry::validate_request_id(&self.request_id)
    }
}

fn default_max_moves() -> usize {
    limits::REBALANCE_MOVES_DEFAULT
}

/// `rebalance {max_moves?, dry_run?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rebalance {
    #[serde(default = "default_max_moves")]
    pub max_moves: usize,
    /// Only say what would move.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub request_id: Option<String>,
}

impl Rebalance {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.max_moves == 0 || self.max_moves > limits::REBALANCE_MOVES_MAX {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "max_moves must be between 1 and {}",
                    limits::REBALANCE_MOVES_MAX
                ),
            ));
        }
        crate::registry::validate_request_id(&self.request_id)
    }
}

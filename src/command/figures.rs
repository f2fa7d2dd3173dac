//! `get_agent_metrics`, `get_supervisor_metrics` and `node_metrics`: figures that live on the
//! nodes running the agents (`node::figures`), not in the registry.

use serde::{Deserialize, Serialize};

use crate::limits;
use crate::protocol::{ErrorCode, WireError};
use crate::registry::validate_name;

/// `get_supervisor_metrics {name}`: the figures of the agents of a supervisor's subtree,
/// summed over the nodes that run them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorMetrics {
    pub name: String,
    /// Only the share of the node that receives it (what nodes ask each other).
    #[serde(default)]
    pub local: bool,
}

impl SupervisorMetrics {
    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)
    }
}

/// `node_metrics {top?}`: the receiving node's own figures and its `top` busiest agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMetrics {
    #[serde(default)]
    pub top: Option<usize>,
}

impl NodeMetrics {
    pub fn validate(&self) -> Result<(), WireError> {
        match self.top {
            Some(t) if t > limits::NODE_METRICS_TOP => Err(WireError::new(
                ErrorCode::BadRequest,
                format!("top is 0 to {}", limits::NODE_METRICS_TOP),
            )),
            _ => Ok(()),
        }
    }

    /// How many of the busiest agents to list.
    pub fn top(&self) -> usize {
        self.top.unwrap_or(10).min(limits::NODE_METRICS_TOP)
    }
}

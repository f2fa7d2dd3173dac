//! `agent_history` and `supervisor_history`: a lifecycle history read from the cluster's
//! history stream by the node that receives the command (`history::query`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::protocol::{ErrorCode, WireError};
use crate::registry::validate_name;

/// `agent_history {agent, limit?, since?}`: an agent's events, also once it is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHistory {
    /// The agent's id; or its name while it exists (a name is resolved here).
    pub agent: String,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Events at or after this time (RFC 3339), oldest first; without it, the latest.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
}

/// `supervisor_history {name, limit?, since?}`: a supervisor's events and its agents'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorHistory {
    pub name: String,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
}

fn check_limit(limit: Option<usize>) -> Result<(), WireError> {
    match limit {
        Some(l) if l == 0 || l > limits::HISTORY_MAX_LIMIT => Err(WireError::new(
            ErrorCode::BadRequest,
            format!("limit is 1 to {}", limits::HISTORY_MAX_LIMIT),
        )),
        _ => Ok(()),
    }
}

/// The limit a query answers.
pub fn limit_of(limit: Option<usize>) -> usize {
    limit
        .unwrap_or(limits::HISTORY_DEFAULT_LIMIT)
        .min(limits::HISTORY_MAX_LIMIT)
}

impl AgentHistory {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.agent.parse::<uuid::Uuid>().is_err() {
            validate_name("agent", &self.agent)?;
        }
        check_limit(self.limit)
    }
}

impl SupervisorHistory {
    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)?;
        check_limit(self.limit)
    }
}

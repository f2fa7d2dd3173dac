//! Agent commands: `spawn_agent` (alias `add_child_to_supervisor`), `spawn_agent_group`,
//! `stop_agent`, `restart_agent`, `get_agent`, `list_agents`, `find_agents`, `export_state`,
//! `import_state`, `wait_agent`. The node-to-leader `report_agents` and `checkpoint` live in
//! `command`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::base64::{base64, unbase64};
use crate::limits;
use crate::protocol::{ErrorCode, WireError};
use crate::registry::Registry;
pub use crate::registry::SpawnAgentGroup;

/// Names one agent by id or name: `{agent}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRef {
    pub agent: String,
    #[serde(default)]
    pub request_id: Option<String>,
}

impl AgentRef {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.agent.is_empty() || self.agent.len() > limits::MAX_NAME_LEN + 8 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "agent must be an id or a name",
            ));
        }
        crate::registry::validate_request_id(&self.request_id)
    }

    /// `get_agent`: the record without its config (a viewer may read it; a config may hold
    /// secrets, which `export_state` hands to operators), with its checkpoint's sequence
    /// number and size.
    pub fn get(&self, reg: &Registry) -> Result<Value, WireError> {
        let a = reg
            .agent(&self.agent)
            .ok_or_else(|| not_found(&self.agent))?;
        let mut v = serde_json::to_value(a)
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        if let Some(record) = v.as_object_mut() {
            record.remove("config");
        }
        if let Some(c) = reg.checkpoint(a.id) {
            v["checkpoint"] =
                json!({ "seq": c.seq, "epoch": c.epoch, "bytes": c.state.len(), "time": c.time });
        }
        Ok(v)
    }

    /// `export_state`: the agent's config and its last checkpoint's bytes (MessagePack),
    /// base64 in JSON; `seq`, `epoch` and `state` are null while it has no checkpoint.
    pub fn export(&self, reg: &Registry) -> Result<Value, WireError> {
        let a = reg
            .agent(&self.agent)
            .ok_or_else(|| not_found(&self.agent))?;
        Ok(match reg.checkpoint(a.id) {
            Some(c) => json!({ "agent": a.id, "config": a.config, "seq": c.seq,
                               "epoch": c.epoch, "state": base64(&c.state) }),
            None => json!({ "agent": a.id, "config": a.config, "seq": null, "epoch": null,
                            "state": null }),
        })
    }
}

fn not_found(agent: &str) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("no agent {agent:?}"))
}

/// `import_state {agent, state}`: replaces an agent's saved state (base64 of its MessagePack)
/// and restarts it from that state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportState {
    pub agent: String,
    pub state: String,
    #[serde(default)]
    pub request_id: Option<String>,
}

impl ImportState {
    pub fn validate(&self) -> Result<bytes::Bytes, WireError> {
        let bytes = unbase64(&self.state).ok_or_else(|| {
            WireError::new(
                ErrorCode::BadRequest,
                "state must be base64 (standard alphabet)",
            )
        })?;
        if bytes.len() > limits::MAX_CHECKPOINT_BYTES {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "state is {} bytes; the limit is {}",
                    bytes.len(),
                    limits::MAX_CHECKPOINT_BYTES
                ),
            ));
        }
        Ok(bytes.into())
    }
}

/// `wait_agent {agent, timeout_ms?}`: waits until the agent is done (`completion`), and
/// answers its final status and result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitAgent {
    pub agent: String,
    /// How long to wait, in milliseconds (default `limits::SPAWN_WAIT_DEFAULT_MS`, at most
    /// `limits::SPAWN_WAIT_MAX_MS`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// What `wait_agent` finds in a registry.
pub enum Waited {
    /// Done: the answer.
    Done(Value),
    /// The agent exists and is not done; its id, to look it up by from now on.
    Running(uuid::Uuid),
    /// No agent and no record of one done by that id or name.
    Unknown,
}

impl WaitAgent {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.agent.is_empty() || self.agent.len() > limits::MAX_NAME_LEN + 8 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "agent must be an id or a name",
            ));
        }
        match self.timeout_ms {
            Some(ms) if ms == 0 || ms > limits::SPAWN_WAIT_MAX_MS => Err(WireError::new(
                ErrorCode::BadRequest,
                format!("timeout_ms is 1 to {}", limits::SPAWN_WAIT_MAX_MS),
            )),
            _ => Ok(()),
        }
    }

    /// How long to wait.
    pub fn within(&self) -> std::time::Duration {
        let ms = self.timeout_ms.unwrap_or(limits::SPAWN_WAIT_DEFAULT_MS);
        std::time::Duration::from_millis(ms.min(limits::SPAWN_WAIT_MAX_MS))
    }

    /// Looks agent `agent` (an id or a name) up: done, running, or unknown. A live agent of
    /// that id or name comes first: it is done when it ended for good (a transient agent
    /// stopped), with the result its current run left, if any. An agent that is gone is done
    /// if a record of it is kept (a temporary agent is forgotten when it ends).
    pub fn look(reg: &Registry, agent: &str) -> Waited {
        use crate::registry::AgentStatus;
        use crate::supervision::RestartType;
        if let Some(a) = reg.agent(agent) {
            let record = reg
                .finished(&a.id.to_string())
                .filter(|f| f.restart_requested == a.restart_requested);
            if let Some(f) = record {
                return Waited::Done(done_answer(f));
            }
            // Finished, but its record is gone (dropped for room, or its write given up on).
            if a.status == AgentStatus::Stopped && a.restart == RestartType::Transient {
                return Waited::Done(json!({
                    "agent": a.id, "name": a.name, "supervisor": a.supervisor,
                    "status": a.status, "result": null, "error": a.last_error,
                    "node": a.node, "time": a.updated_at,
                }));
            }
            return Waited::Running(a.id);
        }
        match reg.finished(agent) {
            Some(f) => Waited::Done(done_answer(f)),
            None => Waited::Unknown,
        }
    }
}

fn done_answer(f: &crate::registry::Finished) -> Value {
    json!({
        "agent": f.agent, "name": f.name, "supervisor": f.supervisor,
        "status": f.status, "result": f.result, "error": f.error,
        "node": f.node, "time": f.time,
    })
}

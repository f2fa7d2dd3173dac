//! Replies to writes, rendered from the registry's typed outcome (`registry::Applied`). The
//! field names here are the wire contract (`docs/protocol.md`); the replicated state holds
//! none of them.

use serde::Serialize;
use serde_json::{json, Value};

use crate::protocol::{ErrorCode, WireError};
use crate::registry::{Applied, Outcome};

/// The reply to a write: its outcome rendered, or its refusal with the message for people.
pub fn render(outcome: Outcome) -> Result<Value, WireError> {
    outcome
        .map_err(WireError::from)
        .and_then(|a| render_applied(&a))
}

/// The reply body for what a write did.
pub fn render_applied(a: &Applied) -> Result<Value, WireError> {
    Ok(match a {
        Applied::NodeJoined(node) => record(node)?,
        Applied::NodeLeft { node_id } => json!({ "node_id": node_id, "status": "left" }),
        Applied::NodeStatus { node_id, status } => json!({ "node_id": node_id, "status": status }),
        Applied::LoadsRecorded { updated } => json!({ "updated": updated }),
        Applied::Drain {
            node_id,
            status,
            agents,
            pinned_stay,
        } => json!({
            "node_id": node_id,
            "status": status,
            "agents": agents,
            "pinned_stay": pinned_stay,
        }),
        Applied::Migrating {
            agent,
            from,
            to,
            epoch,
            moving,
        } => json!({ "agent": agent, "from": from, "to": to, "epoch": epoch, "moving": moving }),
        Applied::HandedOff { moved, stale } => json!({ "moved": moved, "stale": stale }),
        Applied::Rebalancing { moves } => json!({ "moves": moves, "dry_run": false }),
        Applied::SupervisorCreated(sup) => record(sup)?,
        Applied::SupervisorStopped {
            stopped,
            stopped_count,
        } => json!({ "stopped": stopped, "stopped_count": stopped_count }),
        Applied::AgentSpawned(agent) => record(agent)?,
        Applied::AgentStopped { id, name } => {
            json!({ "id": id, "name": name, "status": "stopped" })
        }
        Applied::RestartRequested {
            id,
            restart_requested,
        } => json!({ "id": id, "restart_requested": restart_requested }),
        Applied::GroupSpawned { supervisor, agents } => {
            json!({ "supervisor": record(supervisor)?, "agents": agents })
        }
        Applied::Reported { applied, stale } => json!({ "applied": applied, "stale": stale }),
        Applied::Checkpointed {
            agent,
            checkpoint_seq,
        } => json!({ "agent": agent, "checkpoint_seq": checkpoint_seq }),
        Applied::Legacy(v) => v.clone(),
        Applied::SupervisorUpdated(sup) => record(sup)?,
        Applied::AgentUpdated(agent) => record(agent)?,
        Applied::Finished { recorded, stale } => json!({ "recorded": recorded, "stale": stale }),
        Applied::TemplateRegistered(t) => t.full(),
        Applied::TemplateDeleted { name } => json!({ "name": name, "deleted": true }),
        Applied::ImportBegun { import } => json!({ "import": import }),
        Applied::ImportStaged {
            import,
            pages,
            supervisors,
            agents,
        } => json!({
            "import": import,
            "pages": pages,
            "supervisors": supervisors,
            "agents": agents,
        }),
        Applied::ImportAborted { import } => json!({ "import": import, "aborted": true }),
        Applied::SubtreeImported {
            supervisor,
            supervisors,
            agents,
        } => json!({ "supervisor": supervisor, "supervisors": supervisors, "agents": agents }),
    })
}

/// An agent's record as `spawn_agent` answers it (also once it runs, with `wait: "running"`).
pub fn agent(a: &crate::registry::Agent) -> Result<Value, WireError> {
    record(a)
}

fn record(r: &impl Serialize) -> Result<Value, WireError> {
    serde_json::to_value(r)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("cannot encode reply: {e}")))
}

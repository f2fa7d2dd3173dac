//! What an applied command did, as data. `Registry::apply` returns it; a `request_id` record
//! keeps it (with a fingerprint of the command) to answer a retry the same way; the command
//! edge renders it as the reply (`warden::command::reply`). No reply field name and no JSON
//! lives in the replicated state, so renaming a reply field changes neither the log nor the
//! snapshots. A refusal is typed the same way (`Refused`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Agent, NodeRecord, NodeStatus, Refused, Supervisor, Template};
use crate::placement::Move;

/// The outcome of one command: what it did, or why it was refused (nothing changed).
pub type Outcome = Result<Applied, Refused>;

/// What a command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Applied {
    /// `join`: the node's record.
    NodeJoined(Box<NodeRecord>),
    /// `leave`.
    NodeLeft { node_id: u64 },
    /// The failure detector's verdict, as it stands after the command.
    NodeStatus { node_id: u64, status: NodeStatus },
    /// The loads the leader recorded: how many nodes it knew.
    LoadsRecorded { updated: u64 },
    /// `drain_node` (or its cancel): the node's status, its agents, and how many of them are
    /// pinned there and stay.
    Drain {
        node_id: u64,
        status: NodeStatus,
        agents: u64,
        pinned_stay: u64,
    },
    /// `migrate_agent`: the agent (with its colocated subtree, `moving` agents in all) is on
    /// its way from `from` to `to`, at `epoch`.
    Migrating {
        agent: Uuid,
        from: u64,
        to: u64,
        epoch: u64,
        moving: u64,
    },
    /// A source node's `handoff`: the agents that moved, and those it no longer owned.
    HandedOff { moved: Vec<Moved>, stale: Vec<Uuid> },
    /// `rebalance`: the moves begun.
    Rebalancing { moves: Vec<Move> },
    /// `create_supervisor`: the supervisor's record.
    SupervisorCreated(Box<Supervisor>),
    /// `stop_supervisor`: the first `MAX_NAMES_IN_REPLY` names stopped (children first), and
    /// how many in all.
    SupervisorStopped {
        stopped: Vec<String>,
        stopped_count: u64,
    },
    /// `spawn_agent`: the agent's record as placed.
    AgentSpawned(Box<Agent>),
    /// `stop_agent`.
    AgentStopped { id: Uuid, name: Option<String> },
    /// `restart_agent`: the agent's restart request count after it.
    RestartRequested { id: Uuid, restart_requested: u64 },
    /// `spawn_agent_group`: the group's supervisor and its agents' ids, in order.
    GroupSpawned {
        supervisor: Box<Supervisor>,
        agents: Vec<Uuid>,
    },
    /// A node's `report_agents`: how many reports applied, and the agents they were stale for.
    Reported { applied: u64, stale: Vec<Uuid> },
    /// `checkpoint` or `import_state`: the agent's new checkpoint sequence number.
    Checkpointed { agent: Uuid, checkpoint_seq: u64 },
    /// A reply remembered by a registry of version 1, which kept rendered replies; answered as
    /// it was. Such records expire with the rest (`REQUEST_ID_TTL_SECS`).
    Legacy(Value),
    /// `update_supervisor`: the supervisor's record after it.
    SupervisorUpdated(Box<Supervisor>),
    /// `update_agent`: the agent's record after it.
    AgentUpdated(Box<Agent>),
    /// A node's `finish_agents`: how many were recorded, and the agents they were stale for.
    Finished { recorded: u64, stale: Vec<Uuid> },
    /// `register_template`: the template.
    TemplateRegistered(Box<Template>),
    /// `delete_template`.
    TemplateDeleted { name: String },
    /// `import_begin`: the staged import's id.
    ImportBegun { import: Uuid },
    /// `import_page`: what the staged import holds after it.
    ImportStaged {
        import: Uuid,
        pages: u32,
        supervisors: u64,
        agents: u64,
    },
    /// `import_abort`.
    ImportAborted { import: Uuid },
    /// `import_commit` or `import_subtree`: the new top supervisor, and how many supervisors
    /// and agents were created.
    SubtreeImported {
        supervisor: String,
        supervisors: u64,
        agents: u64,
    },
}

/// One agent a `handoff` moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moved {
    pub agent: Uuid,
    pub to: u64,
    pub epoch: u64,
}

/// A fingerprint of a command: FNV-1a (64 bits) over its JSON encoding. The leader computes
/// it and stamps it into the log entry (`Stamped::fingerprint`), so every replica keeps the
/// same one. It may differ between builds (serde_json's float text, a command's fields), so a
/// retry that spans an upgrade may be refused as a different command: safe (nothing runs
/// twice), and the client retries with a fresh id after reading the state.
pub fn fingerprint(cmd: &impl Serialize) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    // Writing into a hasher cannot fail; a command that cannot be encoded gets the hash of
    // what was written before the error, still the same on every replica.
    let _ = serde_json::to_writer(&mut h, cmd);
    h.0
}

/// Bytes a remembered `request_id` holds: its outcome's JSON length (counted, not built), its
/// id, its command's name and a fixed overhead for the record and its index entries. Every
/// replica counts the same for the same record, so they forget the same ones.
pub fn request_weight(rid: &str, command: &str, outcome: &Outcome) -> usize {
    let mut n = Counted(0);
    // Counting cannot fail; an outcome that cannot be encoded weighs what was written.
    let _ = serde_json::to_writer(&mut n, outcome);
    n.0 + 2 * rid.len() + command.len() + crate::limits::REQUEST_RECORD_OVERHEAD_BYTES
}

/// The length of `v`'s JSON encoding, counted, not built.
pub(super) fn json_len(v: &impl Serialize) -> usize {
    let mut n = Counted(0);
    // Counting cannot fail; a value that cannot be encoded weighs what was written.
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}

struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Fnv(u64);

impl std::io::Write for Fnv {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_fnv1a_of_the_json_and_tell_commands_apart() {
        // FNV-1a of `"a"` (three bytes with the quotes), pinned: the value is replicated state.
        assert_eq!(fingerprint(&"a"), 0xd427_2417_d7c7_7eea);
        assert_ne!(fingerprint(&("x", 1)), fingerprint(&("x", 2)));
        assert_eq!(fingerprint(&("x", 1)), fingerprint(&("x", 1)));
    }
}

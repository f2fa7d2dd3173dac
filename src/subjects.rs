//! The one module that spells NATS subjects and header names. Nothing else formats or parses a
//! subject, and nothing else spells a header (`protocol` re-exports the names).

/// Header naming the body's encoding.
pub const CONTENT_TYPE: &str = "Content-Type";
/// Header a node adds when it forwards a command, counting hops to bound forwarding loops.
pub const FORWARD_HOPS: &str = "Warden-Forward-Hops";
/// Reply header: the leader as the answering node knows it, so that a client may send its next
/// commands to `warden.<cluster>.node.<leader>.cmd.<command>` and save the forwarding hop.
pub const LEADER_HINT: &str = "Warden-Leader";
/// Header carrying an agent's epoch on calls (optional) and on their replies.
pub const EPOCH_HEADER: &str = "Warden-Epoch";
/// Header naming one logical call across its retries, so that an agent handles it once.
pub const CALL_ID_HEADER: &str = "Warden-Call-Id";

use crate::registry::REGISTRY_VERSION;

/// Raft RPC names, the last token of `raft.<node_id>.v<version>.<rpc>`.
pub const RPC_APPEND: &str = "append";
pub const RPC_VOTE: &str = "vote";
pub const RPC_SNAPSHOT: &str = "snapshot";

/// Subjects of one cluster: everything lives under `warden.<cluster>`.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects for the cluster named `cluster` (already validated).
    pub fn new(cluster: &str) -> Self {
        Subjects {
            prefix: format!("warden.{cluster}"),
        }
    }

    /// A command sent to any node: `warden.<cluster>.cmd.<command>`.
    pub fn cmd(&self, command: &str) -> String {
        format!("{}.cmd.{command}", self.prefix)
    }

    /// Wildcard the nodes subscribe to for commands.
    pub fn cmd_all(&self) -> String {
        format!("{}.cmd.*", self.prefix)
    }

    /// Queue group shared by all nodes for `cmd.*`, so each command is answered once.
    pub fn cmd_queue(&self) -> String {
        format!("{}.cmd", self.prefix)
    }

    /// A command addressed to one node: `warden.<cluster>.node.<id>.cmd.<command>`. Used for
    /// forwarding to the leader, and by operators who want one node's answer (`health`).
    pub fn node_cmd(&self, node: u64, command: &str) -> String {
        format!("{}.node.{node}.cmd.{command}", self.prefix)
    }

    /// Wildcard one node subscribes to for commands addressed to it.
    pub fn node_cmd_all(&self, node: u64) -> String {
        format!("{}.node.{node}.cmd.*", self.prefix)
    }

    /// Batches of writes a follower forwards to the leader: `warden.<cluster>.node.<id>.fwd`.
    pub fn node_forward(&self, node: u64) -> String {
        format!("{}.node.{node}.fwd", self.prefix)
    }

    /// A Raft RPC to one node: `warden.<cluster>.raft.<node_id>.v<version>.<rpc>`. The
    /// protocol version (`REGISTRY_VERSION`) is part of the subject, so nodes of different
    /// versions never exchange a Raft message: each finds no responder at the other's (a
    /// version-1 node used `raft.<node_id>.<rpc>`), and openraft treats the peer as
    /// unreachable. It costs nothing per message, unlike a header.
    pub fn raft(&self, node: u64, rpc: &str) -> String {
        format!("{}.raft.{node}.v{}.{rpc}", self.prefix, REGISTRY_VERSION)
    }

    /// Wildcard one node subscribes to for its Raft RPCs, of its own protocol version.
    pub fn raft_all(&self, node: u64) -> String {
        format!("{}.raft.{node}.v{}.*", self.prefix, REGISTRY_VERSION)
    }

    /// An event: `warden.<cluster>.evt.<entity>.<id>.<event>`.
    pub fn event(&self, entity: &str, id: &str, event: &str) -> String {
        format!("{}.evt.{entity}.{id}.{event}", self.prefix)
    }

    /// Events matching a filter tail such as `node.*.joined` or `>`.
    pub fn event_filter(&self, filter: &str) -> String {
        format!("{}.evt.{filter}", self.prefix)
    }

    /// Calls and casts to any agent: `warden.<cluster>.agent.*.*`.
    pub fn agent_all(&self) -> String {
        format!("{}.agent.*.*", self.prefix)
    }

    /// A call (`op` = `call`) or cast (`cast`) to an agent by id or name.
    pub fn agent(&self, id_or_name: &str, op: &str) -> String {
        format!("{}.agent.{id_or_name}.{op}", self.prefix)
    }

    /// The agent (id or name) and operation of a subject `agent_all` matched, if it is one of
    /// this cluster's agent subjects.
    pub fn parse_agent<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?;
        let (target, op) = rest.strip_prefix(".agent.")?.split_once('.')?;
        let well_formed = !target.is_empty() && !op.is_empty() && !op.contains('.');
        well_formed.then_some((target, op))
    }

    /// Subject of the benchmark's raw request/reply reference responder.
    pub fn bench_echo(&self, run: &str) -> String {
        format!("{}.bench.{run}.echo", self.prefix)
    }

    /// The last token of a subject (the command or RPC name).
    pub fn last_token(subject: &str) -> &str {
        subject.rsplit('.').next().unwrap_or(subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_spec() {
        let s = Subjects::new("prod");
        assert_eq!(s.cmd("health"), "warden.prod.cmd.health");
        assert_eq!(s.raft(3, "vote"), "warden.prod.raft.3.v2.vote");
        assert_eq!(s.raft_all(3), "warden.prod.raft.3.v2.*");
        assert_eq!(
            s.event("node", "2", "joined"),
            "warden.prod.evt.node.2.joined"
        );
        assert_eq!(s.node_cmd(2, "health"), "warden.prod.node.2.cmd.health");
        assert_eq!(Subjects::last_token("warden.prod.cmd.health"), "health");
        let call = s.agent("n1", "call");
        assert_eq!(s.parse_agent(&call), Some(("n1", "call")));
        assert_eq!(s.parse_agent("warden.other.agent.n1.call"), None);
        assert_eq!(s.parse_agent("warden.prod.agent.n1"), None);
    }
}

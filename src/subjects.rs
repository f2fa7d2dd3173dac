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
/// JetStream's header naming a message for deduplication (a history event's position).
pub const JS_MSG_ID: &str = "Nats-Msg-Id";
/// JetStream's header that makes a publish fail unless the stream's last sequence is this.
pub const JS_EXPECTED_LAST_SEQ: &str = "Nats-Expected-Last-Sequence";

use crate::registry::REGISTRY_VERSION;

/// Token after the cluster's prefix under which all node-to-node traffic lives.
pub const INTERNAL: &str = "internal";
/// The `to` token of own commands that any member may answer.
const ANY: &str = "any";
/// Kinds of internal messages, the token after `<from>.<to>`.
pub const FORWARD: &str = "fwd";
pub const RELAY: &str = "relay";
pub const OWN: &str = "own";
pub const RAFT: &str = "raft";
pub const LEADER: &str = "leader";
pub const REPLY: &str = "reply";

/// A node id as a subject token: canonical decimal only (no sign, no leading zero), so that
/// one id has one spelling and a permission on `internal.2` covers every subject of node 2.
fn id_token(t: &str) -> Option<u64> {
    let n: u64 = t.parse().ok()?;
    (n.to_string() == t).then_some(n)
}

/// Whom an internal message is for.
#[derive(Debug, Clone, Copy)]
enum To {
    Node(u64),
    Any,
}

impl std::fmt::Display for To {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            To::Node(n) => write!(f, "{n}"),
            To::Any => f.write_str(ANY),
        }
    }
}

/// An internal subject, taken apart: `internal.<from>.<to>.<kind>.<...name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Internal<'a> {
    /// The sender, as the subject says: NATS lets only its identity publish there.
    pub from: u64,
    /// The addressee; `None` for any member.
    pub to: Option<u64>,
    /// `fwd`, `relay`, `own` or `raft`.
    pub kind: &'a str,
    /// The last token: the command or RPC name; empty for a forward batch.
    pub name: &'a str,
}

/// Raft RPC names, the last token of `raft.<node_id>.v<version>.<rpc>`.
pub const RPC_APPEND: &str = "append";
pub const RPC_VOTE: &str = "vote";
pub const RPC_SNAPSHOT: &str = "snapshot";
pub const RPC_PREVOTE: &str = "prevote";

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

    /// A command addressed to one node: `warden.<cluster>.node.<id>.cmd.<command>`. Clients
    /// use it to reach the leader directly, or for one node's answer (`health`).
    pub fn node_cmd(&self, node: u64, command: &str) -> String {
        format!("{}.node.{node}.cmd.{command}", self.prefix)
    }

    /// `command` addressed to any one node: what a client role is allowed to publish.
    pub fn node_cmd_any(&self, command: &str) -> String {
        format!("{}.node.*.cmd.{command}", self.prefix)
    }

    /// Wildcard one node subscribes to for commands addressed to it.
    pub fn node_cmd_all(&self, node: u64) -> String {
        format!("{}.node.{node}.cmd.*", self.prefix)
    }

    /// The internal prefix: all node-to-node traffic, and nothing a client may publish.
    pub fn internal_prefix(&self) -> String {
        format!("{}.{INTERNAL}", self.prefix)
    }

    /// Node-to-node traffic from `from` to `to`:
    /// `warden.<cluster>.internal.<from>.<to>.<tail>`. Only node `from`'s identity may publish
    /// under `internal.<from>`, and only node `to`'s may subscribe to `internal.*.<to>`, so
    /// the receiver reads who sent a message from the subject, never from its body.
    fn internal(&self, from: u64, to: To, tail: &str) -> String {
        format!("{}.{INTERNAL}.{from}.{to}.{tail}", self.prefix)
    }

    /// Wildcard for `tail` sent to `me` by any node.
    fn internal_to(&self, me: To, tail: &str) -> String {
        format!("{}.{INTERNAL}.*.{me}.{tail}", self.prefix)
    }

    /// A Raft RPC from `from` to `to`: `internal.<from>.<to>.raft.v<version>.<rpc>`. The
    /// protocol version (`REGISTRY_VERSION`) is part of the subject, so nodes of different
    /// versions never exchange a Raft message: each finds no responder at the other's, and
    /// openraft treats the peer as unreachable. It costs nothing per message, unlike a header.
    pub fn raft(&self, from: u64, to: u64, rpc: &str) -> String {
        self.internal(
            from,
            To::Node(to),
            &format!("raft.v{REGISTRY_VERSION}.{rpc}"),
        )
    }

    /// Wildcard one node subscribes to for its Raft RPCs, of its own protocol version.
    pub fn raft_to(&self, me: u64) -> String {
        self.internal_to(To::Node(me), &format!("raft.v{REGISTRY_VERSION}.*"))
    }

    /// A batch of writes `from` forwards to the leader `to`: `internal.<from>.<to>.fwd`.
    pub fn forward(&self, from: u64, to: u64) -> String {
        self.internal(from, To::Node(to), FORWARD)
    }

    /// Wildcard of the batches forwarded to `me`.
    pub fn forward_to(&self, me: u64) -> String {
        self.internal_to(To::Node(me), FORWARD)
    }

    /// A client's command that `from` relays, alone, to the leader `to`:
    /// `internal.<from>.<to>.relay.<command>`.
    pub fn relay(&self, from: u64, to: u64, command: &str) -> String {
        self.internal(from, To::Node(to), &format!("{RELAY}.{command}"))
    }

    /// Wildcard of the commands relayed to `me`.
    pub fn relay_to(&self, me: u64) -> String {
        self.internal_to(To::Node(me), &format!("{RELAY}.*"))
    }

    /// A node's own command to the leader `to`: `internal.<from>.<to>.own.<command>`.
    pub fn own(&self, from: u64, to: u64, command: &str) -> String {
        self.internal(from, To::Node(to), &format!("{OWN}.{command}"))
    }

    /// Wildcard of the own commands sent to `me`.
    pub fn own_to(&self, me: u64) -> String {
        self.internal_to(To::Node(me), &format!("{OWN}.*"))
    }

    /// A node's question to any member: who leads? (`internal.<from>.any.leader`). The answer
    /// is a hint, worth what its unknown sender is.
    pub fn leader_query(&self, from: u64) -> String {
        self.internal(from, To::Any, LEADER)
    }

    /// Wildcard of the leader queries; members share it as a queue group.
    pub fn leader_queries(&self) -> String {
        self.internal_to(To::Any, LEADER)
    }

    /// Queue group of `leader_queries`.
    pub fn leader_query_queue(&self) -> String {
        format!("{}.{INTERNAL}.any", self.prefix)
    }

    /// The reply subject of request `id` from `me` to `to` (any member when `None`):
    /// `internal.<to|any>.<me>.reply.<id>`. Only `to` may publish on it: a node replies to
    /// another only on a subject that names it (`peers`).
    pub fn reply(&self, to: Option<u64>, me: u64, id: u64) -> String {
        let to = to.map_or(To::Any, To::Node);
        format!("{}.{INTERNAL}.{to}.{me}.{REPLY}.{id}", self.prefix)
    }

    /// Wildcard of the replies to `me`'s requests.
    pub fn replies_to(&self, me: u64) -> String {
        format!("{}.{INTERNAL}.*.{me}.{REPLY}.*", self.prefix)
    }

    /// The replies any member may publish: answers to leader queries.
    pub fn any_replies(&self) -> String {
        format!("{}.{INTERNAL}.{ANY}.*.{REPLY}.*", self.prefix)
    }

    /// The responder (`None` for any member), requester and id of a reply subject.
    pub fn parse_reply(&self, subject: &str) -> Option<(Option<u64>, u64, u64)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?
            .strip_prefix(INTERNAL)?
            .strip_prefix('.')?;
        let mut parts = rest.split('.');
        let from = match parts.next()? {
            ANY => None,
            t => Some(id_token(t)?),
        };
        let to = id_token(parts.next()?)?;
        if parts.next()? != REPLY {
            return None;
        }
        let id = id_token(parts.next()?)?;
        parts.next().is_none().then_some((from, to, id))
    }

    /// Whether `reply` is where node `me` (any member: `None`) answers `requester`: the only
    /// reply subjects a node answers a peer on.
    pub fn is_reply_for(&self, reply: &str, me: Option<u64>, requester: u64) -> bool {
        matches!(self.parse_reply(reply), Some((from, to, _)) if from == me && to == requester)
    }

    /// Whether a client's reply subject is one a node may answer on: anything outside the
    /// Warden subject space (with auth on, nats-server allows only `_INBOX.<cluster>.>`), so no
    /// client can make a node publish an event, a cast or node-to-node traffic.
    pub fn is_client_reply(reply: &str) -> bool {
        !reply.starts_with("warden.")
    }

    /// The parts of an internal subject of this cluster, if `subject` is one.
    pub fn parse_internal<'a>(&self, subject: &'a str) -> Option<Internal<'a>> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?
            .strip_prefix(INTERNAL)?
            .strip_prefix('.')?;
        let mut parts = rest.splitn(4, '.');
        let from = id_token(parts.next()?)?;
        let to = match parts.next()? {
            ANY => None,
            n => Some(id_token(n)?),
        };
        let kind = parts.next()?;
        let name = parts.next().map_or("", Self::last_token);
        Some(Internal {
            from,
            to,
            kind,
            name,
        })
    }

    /// An event: `warden.<cluster>.evt.<entity>.<id>.<event>`.
    pub fn event(&self, entity: &str, id: &str, event: &str) -> String {
        format!("{}.evt.{entity}.{id}.{event}", self.prefix)
    }

    /// Events matching a filter tail such as `node.*.joined` or `>`.
    pub fn event_filter(&self, filter: &str) -> String {
        format!("{}.evt.{filter}", self.prefix)
    }

    /// The JetStream stream that keeps the cluster's lifecycle history: `warden-<cluster>-history`.
    pub fn history_stream(&self) -> String {
        format!("{}-history", self.prefix.replace('.', "-"))
    }

    /// A history event: `warden.<cluster>.hist.sup.<supervisor>.<entity>.<id>.<event>` for an
    /// agent's or a supervisor's event, `warden.<cluster>.hist.cluster.<entity>.<id>.<event>`
    /// for the others (nodes, templates, gaps). Filed under the supervisor so that one filter
    /// subject (nats-server 2.9 takes one per consumer) reads an agent's history
    /// (`history_of_agent`) or a supervisor's with its agents' (`history_of_supervisor`).
    pub fn history(&self, supervisor: Option<&str>, entity: &str, id: &str, event: &str) -> String {
        match supervisor {
            Some(s) => format!("{}.hist.sup.{s}.{entity}.{id}.{event}", self.prefix),
            None => format!("{}.hist.cluster.{entity}.{id}.{event}", self.prefix),
        }
    }

    /// Every history subject: the stream's one subject.
    pub fn history_all(&self) -> String {
        format!("{}.hist.>", self.prefix)
    }

    /// The history of one agent, by id, whichever supervisor it had.
    pub fn history_of_agent(&self, id: &str) -> String {
        format!("{}.hist.sup.*.agent.{id}.*", self.prefix)
    }

    /// The history of one supervisor and of the agents it supervised.
    pub fn history_of_supervisor(&self, name: &str) -> String {
        format!("{}.hist.sup.{name}.>", self.prefix)
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

    /// Everything of `warden bench`'s reference responders.
    pub fn bench_all(&self) -> String {
        format!("{}.bench.>", self.prefix)
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
        assert_eq!(
            s.raft(1, 3, "vote"),
            "warden.prod.internal.1.3.raft.v7.vote"
        );
        assert_eq!(s.raft_to(3), "warden.prod.internal.*.3.raft.v7.*");
        assert_eq!(s.forward(2, 1), "warden.prod.internal.2.1.fwd");
        let own = s.own(2, 1, "heartbeat");
        let parsed = s.parse_internal(&own).unwrap();
        assert_eq!((parsed.from, parsed.to), (2, Some(1)));
        assert_eq!((parsed.kind, parsed.name), ("own", "heartbeat"));
        let vote = s.raft(1, 3, "vote");
        let parsed = s.parse_internal(&vote).unwrap();
        assert_eq!((parsed.from, parsed.kind, parsed.name), (1, "raft", "vote"));
        let fwd = s.forward(2, 1);
        assert_eq!(
            s.parse_internal(&fwd).map(|p| (p.kind, p.name)),
            Some(("fwd", ""))
        );
        assert_eq!(s.parse_internal("warden.prod.internal.x.1.own.join"), None);
        assert_eq!(s.parse_internal("warden.prod.internal.02.1.own.join"), None);
        assert_eq!(s.parse_internal("warden.prod.internal.+2.1.own.join"), None);
        let reply = s.reply(Some(3), 2, 17);
        assert_eq!(reply, "warden.prod.internal.3.2.reply.17");
        assert_eq!(s.parse_reply(&reply), Some((Some(3), 2, 17)));
        assert!(s.is_reply_for(&reply, Some(3), 2));
        assert!(!s.is_reply_for(&reply, Some(3), 4));
        assert!(!s.is_reply_for(&reply, None, 2));
        assert_eq!(s.parse_reply(&s.reply(None, 2, 1)), Some((None, 2, 1)));
        assert_eq!(s.parse_reply("warden.prod.internal.3.2.reply.17.x"), None);
        assert!(!Subjects::is_client_reply("warden.prod.evt.node.2.left"));
        assert!(Subjects::is_client_reply("_INBOX.prod.viewer.abc.1"));
        assert_eq!(s.parse_internal("warden.other.internal.2.1.own.join"), None);
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

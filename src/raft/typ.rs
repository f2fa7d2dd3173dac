//! The one openraft type configuration, and aliases so no other file spells openraft's
//! generic parameters.

use std::io::Cursor;

use crate::registry::{Outcome, Proposal};

/// Node ids are u64, as `node_id` is on the wire (`docs/protocol.md`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Warden's Raft types: a log entry is a batch of registry commands, and its response is
    /// one outcome per command. Nodes carry no address: peers are reached by id over NATS.
    pub TypeConfig:
        D = Proposal,
        R = Vec<Outcome>,
        NodeId = NodeId,
        Node = openraft::EmptyNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::EmptyNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::EmptyNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type LogState = openraft::LogState<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, openraft::EmptyNode>;
/// Raft's server metrics (state, vote, leader, membership): they change only with those, not
/// with every write.
pub type ServerMetrics = openraft::metrics::RaftServerMetrics<NodeId, openraft::EmptyNode>;
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type RpcError<E = openraft::error::Infallible> =
    openraft::error::RPCError<NodeId, openraft::EmptyNode, RaftError<E>>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, openraft::EmptyNode>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, openraft::EmptyNode>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
pub type InstallSnapshotError = openraft::error::InstallSnapshotError;

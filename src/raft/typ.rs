//! The one openraft type configuration, and aliases so no other file spells openraft's
//! generic parameters.

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
        SnapshotData = super::snapshot_files::SnapshotFile,
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
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, openraft::EmptyNode>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
pub type InstallSnapshotError = openraft::error::InstallSnapshotError;

/// A snapshot chunk on the wire: openraft's `InstallSnapshotRequest`, with its data as one
/// MessagePack `bin`. serde writes a `Vec<u8>` as an array of numbers: up to twice the bytes,
/// and a call per byte to encode and decode (a million agents' snapshot took 7.5 s to cross).
/// The receiver reads either form.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SnapshotChunk {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    pub data: bytes::Bytes,
    pub done: bool,
}

impl From<InstallSnapshotRequest> for SnapshotChunk {
    fn from(r: InstallSnapshotRequest) -> Self {
        SnapshotChunk {
            vote: r.vote,
            meta: r.meta,
            offset: r.offset,
            data: r.data.into(),
            done: r.done,
        }
    }
}

impl From<SnapshotChunk> for InstallSnapshotRequest {
    fn from(c: SnapshotChunk) -> Self {
        InstallSnapshotRequest {
            vote: c.vote,
            meta: c.meta,
            offset: c.offset,
            data: c.data.into(),
            done: c.done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a snapshot chunk crosses as its bytes plus a little framing, not an array of
    /// numbers, and a chunk sent the older way still decodes to the same bytes.
    #[test]
    fn a_snapshot_chunk_crosses_as_one_bin_and_reads_the_older_form() {
        let request = InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: Default::default(),
            offset: 7,
            data: vec![0xff; 1000],
            done: false,
        };
        let new = rmp_serde::to_vec_named(&SnapshotChunk::from(request.clone())).unwrap();
        let old = rmp_serde::to_vec_named(&request).unwrap();
        assert!(new.len() < 1200, "{} bytes", new.len());
        assert!(old.len() >= 2000, "{} bytes", old.len());
        for body in [new, old] {
            let chunk: SnapshotChunk = crate::protocol::from_msgpack(&body).unwrap();
            let back = InstallSnapshotRequest::from(chunk);
            assert_eq!((back.offset, back.data), (7, vec![0xff; 1000]));
        }
    }
}

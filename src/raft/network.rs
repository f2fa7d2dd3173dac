//! Raft's network client: each RPC is a NATS request to
//! `warden.<cluster>.internal.<me>.<peer>.raft.v<n>.<rpc>` with an rmp-serde payload, answered
//! by the peer's `raft::server`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{NetworkError, PayloadTooLarge, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::typ::*;
use crate::bus::RequestFailure;
use crate::subjects::Subjects;

use crate::subjects::{RPC_APPEND, RPC_SNAPSHOT, RPC_VOTE};

/// When each peer last answered a Raft RPC, as seen from this node. On the leader this is the
/// "last contact" that `cluster_status` reports.
#[derive(Debug, Default)]
pub struct Contacts {
    last: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Contacts {
    fn touch(&self, id: NodeId) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Instant::now());
    }

    /// Milliseconds since `id` last answered, if it ever did.
    pub fn since_ms(&self, id: NodeId) -> Option<u64> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.get(&id).map(|t| t.elapsed().as_millis() as u64)
    }
}

/// Creates one [`PeerClient`] per target node.
#[derive(Clone)]
pub struct Network {
    /// This node: the sender of every RPC.
    pub me: NodeId,
    /// Requests to peers, answered on subjects that name them.
    pub peers: Arc<crate::peers::Peers>,
    pub subjects: Subjects,
    pub contacts: Arc<Contacts>,
    /// The server's `max_payload`, read at connect time.
    pub max_payload: usize,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::EmptyNode) -> PeerClient {
        PeerClient {
            target,
            net: self.clone(),
        }
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    net: Network,
}

impl PeerClient {
    async fn call<Resp, E>(
        &self,
        rpc: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, RpcError<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let subject = self.net.subjects.raft(self.net.me, self.target, rpc);
        // The subject names this node's protocol version: a peer of another version has no
        // responder there, and is unreachable (`Subjects::raft`).
        let reply = self
            .net
            .peers
            .request(Some(self.target), subject, None, body.into(), timeout)
            .await
            .map_err(|e| match e {
                // Unreachable makes openraft back off before the next try (see `backoff`).
                RequestFailure::NoResponders => RpcError::Unreachable(Unreachable::new(&e)),
                _ => RpcError::Network(NetworkError::new(&e)),
            })?;
        self.net.contacts.touch(self.target);
        let result: Result<Resp, RaftError<E>> = crate::protocol::from_msgpack(&reply.payload)
            .map_err(|e| RpcError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RpcError::RemoteError(RemoteError::new(self.target, e)))
    }

    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, NetworkError> {
        rmp_serde::to_vec_named(value).map_err(|e| NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RpcError> {
        let n = rpc.entries.len() as u64;
        let body = Self::encode(&rpc).map_err(RpcError::Network)?;
        if body.len() + crate::limits::RAFT_FRAMING_BYTES > self.net.max_payload && n > 1 {
            // openraft answers this by sending fewer entries per message.
            return Err(RpcError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(n / 2),
            ));
        }
        self.call(RPC_APPEND, body, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse, RpcError<InstallSnapshotError>> {
        let body = Self::encode(&SnapshotChunk::from(rpc)).map_err(RpcError::Network)?;
        self.call(RPC_SNAPSHOT, body, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RpcError> {
        let body = Self::encode(&rpc).map_err(RpcError::Network)?;
        self.call(RPC_VOTE, body, option.hard_ttl()).await
    }

    fn backoff(&self) -> Backoff {
        let pause = Duration::from_millis(crate::limits::RAFT_UNREACHABLE_RETRY_MS);
        Backoff::new(std::iter::repeat(pause))
    }
}

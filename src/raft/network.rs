//! Raft's network client: each RPC is a NATS request to `warden.<cluster>.raft.<id>.<rpc>`
//! with an rmp-serde payload, answered by the peer's `raft::server`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{NetworkError, PayloadTooLarge, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::typ::*;
use crate::bus::{self, RequestFailure};
use crate::subjects::Subjects;

use crate::registry::REGISTRY_VERSION;
use crate::subjects::{PROTOCOL_HEADER, RPC_APPEND, RPC_SNAPSHOT, RPC_VOTE};

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
    pub client: async_nats::Client,
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
        let subject = self.net.subjects.raft(self.target, rpc);
        let reply = bus::request(
            &self.net.client,
            subject,
            Some(protocol_headers()),
            body.into(),
            timeout,
        )
        .await
        .map_err(|e| match e {
            // Unreachable makes openraft back off before the next try (see `backoff`).
            RequestFailure::NoResponders => RpcError::Unreachable(Unreachable::new(&e)),
            _ => RpcError::Network(NetworkError::new(&e)),
        })?;
        let theirs = protocol_of(reply.headers.as_ref());
        if theirs != REGISTRY_VERSION {
            // A node of another version: no Raft message crosses between them, either way.
            let e = std::io::Error::other(format!(
                "node {} speaks protocol version {theirs}, this node {REGISTRY_VERSION}",
                self.target
            ));
            return Err(RpcError::Unreachable(Unreachable::new(&e)));
        }
        self.net.contacts.touch(self.target);
        let result: Result<Resp, RaftError<E>> = rmp_serde::from_slice(&reply.payload)
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
        let body = Self::encode(&rpc).map_err(RpcError::Network)?;
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

/// Headers that name this node's protocol version, on every Raft RPC and its reply.
pub(crate) fn protocol_headers() -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert(PROTOCOL_HEADER, REGISTRY_VERSION.to_string().as_str());
    h
}

/// The protocol version a Raft message's headers name; 1 without the header (version 1 sent
/// none).
pub(crate) fn protocol_of(headers: Option<&async_nats::HeaderMap>) -> u32 {
    headers
        .and_then(|h| h.get(PROTOCOL_HEADER))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a Raft message names its sender's protocol version, and one without the header
    /// is from version 1, which sent none.
    #[test]
    fn raft_messages_carry_the_protocol_version() {
        assert_eq!(protocol_of(Some(&protocol_headers())), REGISTRY_VERSION);
        assert_eq!(protocol_of(None), 1);
        let mut other = async_nats::HeaderMap::new();
        other.insert(PROTOCOL_HEADER, "99");
        assert_eq!(protocol_of(Some(&other)), 99);
    }
}

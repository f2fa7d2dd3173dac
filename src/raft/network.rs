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
    /// The commit index this node announces when it leads (`raft::CommitIndex`).
    pub commit: Arc<super::CommitIndex>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::EmptyNode) -> PeerClient {
        PeerClient {
            target,
            net: self.clone(),
            in_flight: None,
        }
    }
}

/// How long an AppendEntries that carries entries may wait for its answer in the background,
/// beyond openraft's own timeout (see `PeerClient::append_with_entries`).
const APPEND_PATIENCE: Duration = Duration::from_secs(5);

/// Retries join the request on its way for this long; after it a retry sends the entries
/// again, so a request lost on the way (a follower that restarted, a message NATS dropped)
/// costs at most this, not `APPEND_PATIENCE`.
const APPEND_RESEND: Duration = Duration::from_secs(1);

/// Bodies smaller than this are sent as openraft asks, each retry anew: they decode fast.
const APPEND_JOIN_BYTES: usize = 64 * 1024;

/// What names an AppendEntries: a retry of the same one has the same. The leader's commit
/// index is left out: the follower's answer does not depend on it, and while the others
/// commit it changes with every retry.
type AppendKey = (Vote, Option<LogId>, Option<LogId>, u64);

/// The answer of a background request, once it came.
type Answer = Option<Result<bytes::Bytes, RequestFailure>>;

/// An AppendEntries with entries that was sent and may still be answered.
struct InFlight {
    key: AppendKey,
    answer: tokio::sync::watch::Receiver<Answer>,
    task: tokio::task::AbortHandle,
    sent: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    net: Network,
    /// At most one AppendEntries with entries waiting in the background.
    in_flight: Option<InFlight>,
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
            .await;
        self.answered(reply.map(|r| r.payload))
    }

    /// Decodes a peer's answer, or says why there is none.
    // The error is openraft's own type, which the RaftNetwork methods return as it is.
    #[allow(clippy::result_large_err)]
    fn answered<Resp, E>(
        &self,
        reply: Result<bytes::Bytes, RequestFailure>,
    ) -> Result<Resp, RpcError<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = reply.map_err(|e| match e {
            // Unreachable makes openraft back off before the next try (see `backoff`).
            RequestFailure::NoResponders => RpcError::Unreachable(Unreachable::new(&e)),
            _ => RpcError::Network(NetworkError::new(&e)),
        })?;
        self.net.contacts.touch(self.target);
        let result: Result<Resp, RaftError<E>> = crate::protocol::from_msgpack(&payload)
            .map_err(|e| RpcError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RpcError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends an AppendEntries that carries entries, or joins the one already on its way.
    ///
    /// openraft 0.9 gives every AppendEntries its heartbeat interval (50 ms) and then sends the
    /// same entries again. A follower that needs longer to decode and store a large batch
    /// (a debug build, two busy cores, entries of 10,000-agent groups) never answered in time:
    /// every retry made it decode the same megabyte again, and replication to it crawled for
    /// minutes. So a large request goes on in the background for up to `APPEND_PATIENCE`, and
    /// for `APPEND_RESEND` a retry of the same request waits for that answer instead of
    /// sending another; the first retry after it came takes it. A different request, or a
    /// retry after `APPEND_RESEND`, replaces it (the old one is dropped). Safe for Raft: the
    /// same key means the same entries from the same leader, so a joined answer is a delayed
    /// duplicate of one the follower gave, which Raft tolerates; openraft judges it against its
    /// own request. What it skews is openraft's quorum-acknowledgement time, taken at the
    /// retry: a joined answer looks up to `APPEND_RESEND` fresher than it is, which only the
    /// liveness decisions read (`Node::cut_off`, the pre-vote), never a lease.
    async fn append_with_entries(
        &mut self,
        key: AppendKey,
        body: Vec<u8>,
    ) -> Result<AppendEntriesResponse, RpcError> {
        let joined = self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.key == key && f.sent.elapsed() < APPEND_RESEND);
        if !joined {
            let (tx, rx) = tokio::sync::watch::channel(None);
            let peers = self.net.peers.clone();
            let subject = self.net.subjects.raft(self.net.me, self.target, RPC_APPEND);
            let target = self.target;
            let task = tokio::spawn(async move {
                let reply = peers
                    .request(Some(target), subject, None, body.into(), APPEND_PATIENCE)
                    .await;
                let _ = tx.send(Some(reply.map(|r| r.payload)));
            });
            self.in_flight = Some(InFlight {
                key,
                answer: rx,
                task: task.abort_handle(),
                sent: Instant::now(),
            });
        }
        let Some(f) = self.in_flight.as_mut() else {
            return Err(RpcError::Network(NetworkError::new(
                &RequestFailure::Other("no request in flight".into()),
            )));
        };
        // Cancelled here by openraft's timeout; the request itself goes on.
        let answer = f.answer.wait_for(Option::is_some).await.map(|a| a.clone());
        self.in_flight = None;
        match answer {
            Ok(Some(reply)) => self.answered(reply),
            _ => Err(RpcError::Network(NetworkError::new(
                &RequestFailure::Other("the request was dropped".into()),
            ))),
        }
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
        self.net.commit.saw(rpc.leader_commit);
        let body = Self::encode(&rpc).map_err(RpcError::Network)?;
        if body.len() + crate::limits::RAFT_FRAMING_BYTES > self.net.max_payload && n > 1 {
            // openraft answers this by sending fewer entries per message.
            return Err(RpcError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(n / 2),
            ));
        }
        match rpc.entries.last() {
            Some(last) if body.len() >= APPEND_JOIN_BYTES => {
                let key = (rpc.vote, rpc.prev_log_id, Some(last.log_id), n);
                self.append_with_entries(key, body).await
            }
            // A heartbeat or a small batch is cheap to decode again, and a late answer to a
            // heartbeat is worth nothing.
            _ => self.call(RPC_APPEND, body, option.hard_ttl()).await,
        }
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

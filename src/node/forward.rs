//! Forwarding writes from a follower to the leader in batches.
//!
//! Every node answers the shared command queue, so about two thirds of writes land on a
//! follower. Forwarding each as its own NATS request costs four message routings per write;
//! this batcher sends everything waiting for the same leader as one message to
//! `warden.<cluster>.internal.<me>.<leader>.fwd`, and the leader answers with one message
//! holding each reply, in order. Reads and membership changes are forwarded one by one
//! instead: their replies can be large, and a batch must fit in one NATS message. A node's own
//! writes (reports, checkpoints, handoffs) travel in the same batches, marked `own`: the
//! leader takes them as the sender's, whom the subject names.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::bus::RequestFailure;
use crate::limits;
use crate::peers::Peers;
use crate::subjects::Subjects;

/// Version of the forwarding messages.
const FORWARD_VERSION: u32 = 1;

/// A command as received, independent of how it arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub command: String,
    pub content_type: Option<String>,
    /// How many times it was forwarded already.
    pub hops: u32,
    pub payload: Bytes,
    /// The forwarding node's own command, rather than a client's it relays.
    #[serde(default)]
    pub own: bool,
    /// The `traceparent` of the sender's span of this command, when that is recorded
    /// (`traces`): a batch has one header set for many commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// A batch of forwarded writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardBatch {
    pub v: u32,
    pub items: Vec<Request>,
}

/// The leader's replies, one per item, each already encoded in its request's encoding.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardReplies {
    pub v: u32,
    pub items: Vec<Bytes>,
}

/// What became of a forwarded write.
#[derive(Debug, Clone)]
pub enum Forwarded {
    /// The leader's reply.
    Reply(Bytes),
    /// Nobody listens on the leader's subject: nothing reached it, safe to retry.
    Unreachable,
    /// No answer: the outcome is unknown.
    NoAnswer,
}

struct Pending {
    leader: u64,
    request: Request,
    reply: oneshot::Sender<Forwarded>,
}

/// Handle to the forwarding batcher.
#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Pending>,
}

impl Forwarder {
    /// Starts the batcher; it runs until `stopped` resolves.
    pub fn start(
        peers: Arc<Peers>,
        subjects: Subjects,
        me: u64,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> (Forwarder, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits::PROPOSAL_QUEUE_CAPACITY);
        (
            Forwarder { tx },
            tokio::spawn(batch_loop(peers, subjects, me, rx, stopped)),
        )
    }

    /// Forwards one write to `leader` and waits for its reply, at most `within`.
    pub async fn forward(&self, leader: u64, request: Request, within: Duration) -> Forwarded {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .try_send(Pending {
                leader,
                request,
                reply,
            })
            .is_err()
        {
            // Queue full or node stopping: nothing was sent.
            return Forwarded::Unreachable;
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(f)) => f,
            Ok(Err(_)) => Forwarded::NoAnswer,
            Err(_) => Forwarded::NoAnswer,
        }
    }
}

async fn batch_loop(
    peers: Arc<Peers>,
    subjects: Subjects,
    me: u64,
    mut rx: mpsc::Receiver<Pending>,
    stopped: impl Future<Output = ()> + Send + 'static,
) {
    let in_flight = Arc::new(Semaphore::new(limits::MAX_FORWARDS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut carry: Option<Pending> = None;
    tokio::pin!(stopped);
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                _ = &mut stopped => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                p = rx.recv() => match p { Some(p) => p, None => break },
            },
        };
        // While all slots are busy, more writes gather: batches grow with load.
        let permit = tokio::select! {
            _ = &mut stopped => break,
            p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let batch = super::batch::gather(
            first,
            &mut rx,
            &mut carry,
            limits::MAX_FORWARD_BATCH,
            limits::MAX_PROPOSAL_BYTES,
            |p| p.request.payload.len(),
        );
        let mut by_leader: BTreeMap<u64, Vec<Pending>> = BTreeMap::new();
        for p in batch {
            by_leader.entry(p.leader).or_default().push(p);
        }
        // A leader change mid-batch is rare; the extra groups share the one permit.
        let (peers, subjects) = (peers.clone(), subjects.clone());
        tasks.spawn(async move {
            let _permit = permit;
            for (leader, batch) in by_leader {
                send_batch(&peers, subjects.forward(me, leader), leader, batch).await;
            }
        });
    }
    tasks.abort_all();
}

async fn send_batch(peers: &Peers, subject: String, leader: u64, batch: Vec<Pending>) {
    let (requests, replies): (Vec<Request>, Vec<_>) =
        batch.into_iter().map(|p| (p.request, p.reply)).unzip();
    let n = requests.len();
    let body = match rmp_serde::to_vec_named(&ForwardBatch {
        v: FORWARD_VERSION,
        items: requests,
    }) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a forward batch");
            return; // the callers time out with "unknown", the truth as they can see it
        }
    };
    let timeout = Duration::from_millis(limits::FORWARD_TIMEOUT_MS);
    let answer = peers
        .request(Some(leader), subject, None, body.into(), timeout)
        .await;
    let outcome: Vec<Forwarded> = match answer {
        Ok(reply) => match crate::protocol::from_msgpack::<ForwardReplies>(&reply.payload) {
            Ok(r) if r.items.len() == n => r.items.into_iter().map(Forwarded::Reply).collect(),
            _ => {
                tracing::warn!(leader, "malformed forward reply");
                vec![Forwarded::NoAnswer; n]
            }
        },
        Err(RequestFailure::NoResponders) => vec![Forwarded::Unreachable; n],
        Err(_) => vec![Forwarded::NoAnswer; n],
    };
    for (reply, out) in replies.into_iter().zip(outcome) {
        let _ = reply.send(out); // the caller may have given up; its own deadline passed
    }
}

/// When a forward's caller must give up.
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

//! The leader's write path: batches concurrent commands into one Raft entry.
//!
//! Every write waits in a bounded queue; the batcher takes as many as are waiting (up to the
//! byte and count limits), stamps them with the leader's clock and fresh ids, and proposes
//! them as one log entry. While one batch is being committed the next one fills up (see
//! `limits::MAX_PROPOSALS_IN_FLIGHT` for why one at a time). One entry means one log append,
//! one disk flush per node and one replication round for the whole batch, which is what lets
//! throughput grow with the number of writers.

use std::future::Future;
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::limits;
use crate::raft::typ::Raft;
use crate::registry::{Outcome, Proposal, RegistryCmd, Stamped, REGISTRY_VERSION};

/// Why a proposal did not produce an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// This node is not the leader; nothing was proposed.
    NotLeader,
    /// The queue is full; nothing was proposed.
    Overloaded,
    /// The proposal may or may not have been committed (leadership changed, node stopping).
    Unknown(String),
}

struct Pending {
    request_id: Option<String>,
    cmd: RegistryCmd,
    size: usize,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// Handle to the batcher.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the batcher; it runs until `stopped` resolves.
    pub fn start(
        raft: Raft,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> (Proposer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits::PROPOSAL_QUEUE_CAPACITY);
        (Proposer { tx }, tokio::spawn(batch_loop(raft, rx, stopped)))
    }

    /// Proposes one command; `size` is its encoded request size, used to bound batches.
    pub async fn propose(
        &self,
        request_id: Option<String>,
        cmd: RegistryCmd,
        size: usize,
    ) -> Result<Outcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Pending {
                request_id,
                cmd,
                size,
                reply,
            })
            .map_err(|_| ProposeError::Overloaded)?;
        rx.await
            .unwrap_or_else(|_| Err(ProposeError::Unknown("the node is stopping".into())))
    }
}

async fn batch_loop(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    stopped: impl Future<Output = ()> + Send + 'static,
) {
    let in_flight = Arc::new(Semaphore::new(limits::MAX_PROPOSALS_IN_FLIGHT));
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
        // Waiting for a free slot is what makes batches grow under load.
        let permit = tokio::select! {
            _ = &mut stopped => break,
            p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let batch = super::batch::gather(
            first,
            &mut rx,
            &mut carry,
            limits::MAX_PROPOSAL_COMMANDS,
            limits::MAX_PROPOSAL_BYTES,
            |p| p.size,
        );
        let proposal = Proposal {
            v: REGISTRY_VERSION,
            time: Utc::now(),
            items: batch
                .iter()
                .map(|p| Stamped {
                    id: Uuid::new_v4(),
                    request_id: p.request_id.clone(),
                    cmd: p.cmd.clone(),
                })
                .collect(),
        };
        let raft = raft.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let started = std::time::Instant::now();
            let commands = proposal.items.len();
            let result = raft.client_write(proposal).await;
            tracing::debug!(
                commands,
                elapsed_us = started.elapsed().as_micros() as u64,
                "proposal done"
            );
            let replies: Vec<_> = batch.into_iter().map(|p| p.reply).collect();
            match result {
                Ok(resp) => {
                    for (reply, outcome) in replies.into_iter().zip(resp.data) {
                        // The client may have given up waiting; its outcome is in the registry.
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    // Whatever the error, the entry may already be in some log and may still
                    // commit under the next leader: the outcome is unknown, never "failed".
                    let err = ProposeError::Unknown(e.to_string());
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
    // Commands still queued get a clear answer rather than a dropped channel.
    rx.close();
    while let Ok(p) = rx.try_recv() {
        let _ = p.reply.send(Err(ProposeError::NotLeader));
    }
    // In-flight proposals may wait on a quorum that is gone; their callers hear "unknown".
    tasks.abort_all();
}

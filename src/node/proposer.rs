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
use std::time::{Duration, SystemTime};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::error::Elapsed;
use uuid::Uuid;

use crate::limits;
use crate::raft::store::ApplyTimes;
use crate::raft::typ::{ClientWriteError, ClientWriteResponse, Raft, RaftError};
use crate::registry::{Outcome, Proposal, RegistryCmd, Stamped, REGISTRY_VERSION};
use crate::traces::{Span, Traces};

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
    /// Its `proposed` span, when its command is traced: from the queue to its outcome.
    span: Span,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// Handle to the batcher.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the batcher; it runs until `stopped` resolves. A proposal without an outcome
    /// after `timeout` is answered "unknown" (see `limits::PROPOSAL_TIMEOUT_MS`). With
    /// `traced`, a traced command's `proposed` span gets `committed` and `applied` spans, from
    /// the times the state machine records.
    pub fn start(
        raft: Raft,
        timeout: Duration,
        traced: Option<(Arc<Traces>, Arc<ApplyTimes>)>,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> (Proposer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits::PROPOSAL_QUEUE_CAPACITY);
        (
            Proposer { tx },
            tokio::spawn(batch_loop(raft, rx, timeout, traced, stopped)),
        )
    }

    /// Proposes one command; `size` is its encoded request size, used to bound batches.
    pub async fn propose(
        &self,
        request_id: Option<String>,
        cmd: RegistryCmd,
        size: usize,
        span: Span,
    ) -> Result<Outcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let queued = self.tx.try_send(Pending {
            request_id,
            cmd,
            size,
            span,
            reply,
        });
        if let Err(full) = queued {
            full.into_inner()
                .span
                .fail("unavailable", "the leader's write queue is full");
            return Err(ProposeError::Overloaded);
        }
        rx.await
            .unwrap_or_else(|_| Err(ProposeError::Unknown("the node is stopping".into())))
    }
}

async fn batch_loop(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    timeout: Duration,
    traced: Option<(Arc<Traces>, Arc<ApplyTimes>)>,
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
                    fingerprint: p
                        .request_id
                        .as_ref()
                        .map(|_| crate::registry::fingerprint(&p.cmd)),
                })
                .collect(),
        };
        let raft = raft.clone();
        let traced = traced.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let started = std::time::Instant::now();
            let commands = proposal.items.len();
            let proposed = traced
                .as_ref()
                .filter(|_| batch.iter().any(|p| p.span.is_recording()))
                .map(|_| SystemTime::now());
            let result = tokio::time::timeout(timeout, raft.client_write(proposal)).await;
            tracing::debug!(
                commands,
                elapsed_us = started.elapsed().as_micros() as u64,
                "proposal done"
            );
            let index = match &result {
                Ok(Ok(resp)) => Some(resp.log_id.index),
                _ => None,
            };
            let (replies, spans): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.reply, p.span)).unzip();
            answer(replies, result, commands, timeout);
            // The replies went first: tracing never delays them. Each `proposed` span ends
            // where its command was answered, before the span of the command does.
            if let (Some((traces, applies)), Some(proposed)) = (&traced, proposed) {
                let answered = SystemTime::now();
                let applied = index.and_then(|i| applies.of(i));
                for span in spans.into_iter().filter(|s| s.is_recording()) {
                    trace_commit(traces, &span, proposed, index, applied, commands);
                    span.end_at(answered);
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

/// What `client_write` gave within the proposal's timeout.
type Written = Result<Result<ClientWriteResponse, RaftError<ClientWriteError>>, Elapsed>;

/// Answers each command of a proposal with its outcome, or all with why there is none.
fn answer(
    replies: Vec<oneshot::Sender<Result<Outcome, ProposeError>>>,
    result: Written,
    commands: usize,
    timeout: Duration,
) {
    let err = match result {
        Ok(Ok(resp)) => {
            for (reply, outcome) in replies.into_iter().zip(resp.data) {
                // The client may have given up waiting; its outcome is in the registry.
                let _ = reply.send(Ok(outcome));
            }
            return;
        }
        // Whatever the error, the entry may already be in some log and may still
        // commit under the next leader: the outcome is unknown, never "failed".
        Ok(Err(e)) => ProposeError::Unknown(e.to_string()),
        Err(_) => {
            tracing::warn!(
                commands,
                timeout_ms = timeout.as_millis() as u64,
                "a proposal got no outcome in time; its commands are answered unknown"
            );
            ProposeError::Unknown(format!("not committed within {} ms", timeout.as_millis()))
        }
    };
    for reply in replies {
        let _ = reply.send(Err(err.clone()));
    }
}

/// Adds to a traced command's `proposed` span what became of its entry: the `committed` span
/// (from its proposal until the leader began to apply it) and the `applied` span, when the
/// state machine still holds the entry's times (it keeps the last `limits::APPLY_TIMES`).
fn trace_commit(
    traces: &Traces,
    span: &Span,
    proposed: SystemTime,
    index: Option<u64>,
    applied: Option<(SystemTime, SystemTime)>,
    commands: usize,
) {
    span.set("warden.batch_commands", commands as i64);
    let Some(index) = index else {
        span.fail("unknown", "the proposal got no outcome");
        return;
    };
    span.set("raft.log_index", index as i64);
    if let Some((began, ended)) = applied {
        let at = vec![opentelemetry::KeyValue::new("raft.log_index", index as i64)];
        traces.past(span, "committed", proposed, began, at.clone());
        traces.past(span, "applied", began, ended, at);
    }
}

#[cfg(test)]
mod tests {
    //! Against a real openraft instance on a sled store and a real nats-server.

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::bus::NatsConfig;
    use crate::config::RaftConfig;
    use crate::raft::network::{Contacts, Network};
    use crate::raft::store::Store;
    use crate::subjects::Subjects;
    use crate::up::NatsServer;

    /// What: a proposal that can never commit is answered "unknown" after the timeout, and the
    /// batcher goes on to the next one instead of waiting for it forever.
    /// Method: a one-node cluster that starts to add a voter which does not exist, so every
    /// later entry needs that voter's vote (joint consensus) and no entry commits again.
    #[tokio::test]
    async fn a_proposal_that_never_commits_does_not_stop_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start(dir.path(), &[]).await.unwrap();
        let cfg = NatsConfig {
            url: nats.url.clone(),
            ..Default::default()
        };
        let client = crate::bus::connect(&cfg, "proposer-test", false)
            .await
            .unwrap();
        let store = Store::open(&dir.path().join("node-1")).unwrap();
        let (log, sm, _state) = store.raft_parts(None).unwrap();
        let (peers, _router) = crate::peers::Peers::start(
            client.clone(),
            Subjects::new("proposer-test"),
            1,
            std::future::pending(),
        )
        .await
        .unwrap();
        let network = Network {
            me: 1,
            peers,
            subjects: Subjects::new("proposer-test"),
            contacts: Arc::new(Contacts::default()),
            max_payload: client.server_info().max_payload,
            commit: Default::default(),
        };
        let raft_cfg = Arc::new(RaftConfig::default().to_openraft("proposer-test").unwrap());
        let raft = Raft::new(1, raft_cfg, network, log, sm).await.unwrap();
        raft.initialize(BTreeMap::from([(1, openraft::EmptyNode {})]))
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .current_leader(1, "node 1 leads")
            .await
            .unwrap();
        raft.add_learner(2, openraft::EmptyNode {}, false)
            .await
            .unwrap();
        let stuck = raft.clone();
        let change =
            tokio::spawn(
                async move { stuck.change_membership(BTreeSet::from([1, 2]), false).await },
            );
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.membership_config.membership().get_joint_config().len() == 2,
                "the joint membership is appended",
            )
            .await
            .unwrap();

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (proposer, batcher) =
            Proposer::start(raft.clone(), Duration::from_millis(300), None, async {
                let _ = stop_rx.await;
            });
        for attempt in 0..2 {
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                proposer.propose(
                    None,
                    RegistryCmd::NodeLoads { loads: vec![] },
                    16,
                    Span::none(),
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("proposal {attempt} got no answer: the batcher is stuck"));
            assert!(
                matches!(&answer, Err(ProposeError::Unknown(why)) if why.contains("300 ms")),
                "proposal {attempt}: {answer:?}"
            );
        }

        let _ = stop_tx.send(());
        batcher.await.unwrap();
        change.abort();
        raft.shutdown().await.unwrap();
    }
}

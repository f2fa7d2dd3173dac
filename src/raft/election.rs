//! When a node campaigns: a pre-vote round before every election (Raft thesis, section 9.6), so
//! that a node that lost the leader while a majority still hears it never raises the term.
//!
//! openraft 0.9 has no pre-vote: a follower that hears no leader for its election timeout
//! starts an election with a higher term, and although the others refuse it while their
//! leader lease holds, the higher term it then sends back in its replies makes the healthy
//! leader step down when the link heals. So openraft runs with elections off
//! (`Config::enable_elect = false`) and this loop decides instead, on the Raft runtime:
//!
//! - It waits as openraft would: until the node has heard no leader (openraft's own vote
//!   timestamp, refreshed by every AppendEntries it accepts and every vote it grants) for the
//!   leader lease (`election_timeout_max`) plus a random election timeout in
//!   `[election_timeout_min, election_timeout_max)`; without a known leader, the random
//!   timeout alone. A single voter campaigns at once, as openraft does.
//! - Then it asks every voter, over NATS (`raft.v<n>.prevote`), whether it would vote: a voter
//!   says yes only if its own leader lease has run out too (it has heard no leader for the
//!   lease, the very test openraft applies to a real vote; a leader says no while a quorum
//!   acknowledged it within the lease) and the candidate's log is at least as long as its
//!   own. The question changes nothing on the voter.
//! - Only with a yes from a quorum (of each half of a joint configuration) does it call
//!   openraft's `trigger().elect()`. A refusal that names a live leader is kept: it tells the
//!   node that the cluster has a leader this node cannot reach (`Election::refused_by`).
//!
//! The election itself (terms, votes, logs) stays openraft's. A failover takes what it took
//! before, plus one round of pre-vote messages (a millisecond here).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::store::LogStore;
use super::typ::{LogId, NodeId, Raft};
use crate::peers::Peers;
use crate::subjects::{Subjects, RPC_PREVOTE};

/// A candidate's question: would you vote for me now?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVote {
    /// The candidate's last log id.
    pub last_log_id: Option<LogId>,
}

/// A voter's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteReply {
    pub granted: bool,
    /// The leader the voter still hears, when that is why it says no.
    pub leader: Option<NodeId>,
}

/// The election timing, from the Raft config.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// openraft's leader lease: `election_timeout_max`.
    pub lease: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Timing {
    pub fn of(cfg: &openraft::Config) -> Timing {
        Timing {
            lease: Duration::from_millis(cfg.election_timeout_max),
            min: Duration::from_millis(cfg.election_timeout_min),
            max: Duration::from_millis(cfg.election_timeout_max),
        }
    }

    fn random_timeout(&self) -> Duration {
        let span = self.max.saturating_sub(self.min).as_millis() as u64;
        self.min + Duration::from_millis(rand::random::<u64>() % span.max(1))
    }
}

/// One node's elections.
pub struct Election {
    raft: Raft,
    peers: Arc<Peers>,
    subjects: Subjects,
    me: NodeId,
    log: LogStore,
    timing: Timing,
    /// When a voter last refused this node's pre-vote because it hears a leader, and which.
    refused: Mutex<Option<(Instant, NodeId)>>,
    /// When this node last accepted an AppendEntries of an elected leader, and whose.
    heard: Mutex<Option<(Instant, NodeId)>>,
    /// Peers whose pre-vote this node is answering: one at a time each.
    answering: Mutex<BTreeSet<NodeId>>,
}

/// What the loop reads of openraft's state in one go.
struct Seen {
    state: ServerState,
    /// When the vote last changed or was refreshed by a leader (openraft's clock).
    heard: Option<tokio::time::Instant>,
    /// Whether the vote names an elected leader.
    committed: bool,
    /// Each half of the (joint) voter configuration.
    voters: Vec<BTreeSet<NodeId>>,
}

impl Election {
    pub fn new(
        raft: Raft,
        peers: Arc<Peers>,
        subjects: Subjects,
        me: NodeId,
        log: LogStore,
    ) -> Election {
        let timing = Timing::of(raft.config());
        Election {
            raft,
            peers,
            subjects,
            me,
            log,
            timing,
            refused: Mutex::new(None),
            heard: Mutex::new(None),
            answering: Mutex::new(BTreeSet::new()),
        }
    }

    /// Evidence that the cluster has a live leader: the leader this node heard (accepted an
    /// AppendEntries of) within the leader lease, or else the one a voter named, within two
    /// rounds, when it refused this node's pre-vote because it still hears it. A leader that
    /// died leaves no evidence once its lease is over: the voters grant pre-votes then.
    pub fn live_leader(&self) -> Option<NodeId> {
        let fresh = |r: Option<(Instant, NodeId)>, within: Duration| {
            r.filter(|(at, _)| at.elapsed() < within).map(|(_, l)| l)
        };
        let heard = *self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let refused = *self.refused.lock().unwrap_or_else(|p| p.into_inner());
        fresh(heard, self.timing.lease).or_else(|| fresh(refused, self.refusal_window()))
    }

    /// Notes that this node accepted an AppendEntries of `leader`, an elected leader.
    pub fn heard(&self, leader: NodeId) {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), leader));
    }

    /// How long a pre-vote refusal stays evidence of a live leader: pre-vote rounds repeat
    /// at most a lease and an election timeout apart.
    fn refusal_window(&self) -> Duration {
        (self.timing.lease + self.timing.max) * 2
    }

    async fn seen(&self) -> Option<Seen> {
        self.raft
            .with_raft_state(|st| Seen {
                state: st.server_state,
                heard: st.vote_last_modified(),
                committed: st.vote_ref().is_committed(),
                voters: (st.membership_state.effective().get_joint_config().iter())
                    .map(|half| half.iter().copied().collect())
                    .collect(),
            })
            .await
            .ok()
    }

    /// Runs until `stopped` resolves (or Raft stops).
    pub async fn run(self: Arc<Self>, stopped: impl std::future::Future<Output = ()>) {
        tokio::pin!(stopped);
        let started = tokio::time::Instant::now();
        // The end of the last pre-vote round that did not lead to an election.
        let mut last_round: Option<tokio::time::Instant> = None;
        let mut timeout = self.timing.random_timeout();
        loop {
            let Some(seen) = self.seen().await else {
                return; // Raft has stopped
            };
            let voter = seen.voters.iter().any(|half| half.contains(&self.me));
            let alone = seen
                .voters
                .iter()
                .all(|half| half.len() == 1 && half.contains(&self.me));
            let due = if seen.state == ServerState::Leader || !voter {
                None
            } else if alone && seen.state != ServerState::Candidate {
                Some(tokio::time::Instant::now())
            } else {
                // As openraft's `handle_tick_election`: a timeout after the last sign of a
                // leader (plus its lease, while the vote names one), or after this node's own
                // last round or campaign (which moves the vote's timestamp too).
                let lease = if seen.committed {
                    self.timing.lease
                } else {
                    Duration::ZERO
                };
                let heard = seen.heard.unwrap_or(started).max(started) + lease;
                Some(last_round.map_or(heard, |r| r.max(heard)) + timeout)
            };
            let wake = match due {
                Some(at) if at <= tokio::time::Instant::now() => None,
                Some(at) => Some(at),
                // Leaders and learners look again after a timeout: membership and roles change.
                None => Some(tokio::time::Instant::now() + self.timing.max),
            };
            if let Some(at) = wake {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep_until(at) => {}
                }
                continue;
            }
            timeout = self.timing.random_timeout();
            let won = tokio::select! {
                _ = &mut stopped => return,
                won = self.pre_vote(&seen.voters) => won,
            };
            if won {
                tracing::info!("a quorum lost the leader too: campaigning");
                if self.raft.trigger().elect().await.is_err() {
                    return;
                }
                // openraft's vote timestamp moves with the new term: the next round waits a
                // timeout from there, as a failed election does in openraft.
                last_round = None;
            } else {
                last_round = Some(tokio::time::Instant::now());
            }
        }
    }

    /// Asks every other voter; true once a quorum of each half (this node included) said yes.
    async fn pre_vote(&self, voters: &[BTreeSet<NodeId>]) -> bool {
        let last_log_id = match self.last_log_id().await {
            Some(l) => l,
            None => return false,
        };
        let body: bytes::Bytes = match rmp_serde::to_vec_named(&PreVote { last_log_id }) {
            Ok(b) => b.into(),
            Err(_) => return false,
        };
        let mut yes = BTreeSet::from([self.me]);
        let quorum = |yes: &BTreeSet<NodeId>| {
            voters
                .iter()
                .all(|half| half.iter().filter(|v| yes.contains(v)).count() * 2 > half.len())
        };
        if quorum(&yes) {
            return true;
        }
        let others: BTreeSet<NodeId> = voters.iter().flatten().copied().collect();
        let mut asks = futures::stream::FuturesUnordered::new();
        for peer in others.into_iter().filter(|&p| p != self.me) {
            let subject = self.subjects.raft(self.me, peer, RPC_PREVOTE);
            let body = body.clone();
            asks.push(async move {
                let reply = self
                    .peers
                    .request(Some(peer), subject, None, body, self.timing.min)
                    .await;
                let answer = reply
                    .ok()
                    .and_then(|r| crate::protocol::from_msgpack::<PreVoteReply>(&r.payload).ok());
                (peer, answer)
            });
        }
        use futures::StreamExt;
        let mut refused_by = None;
        while let Some((peer, answer)) = asks.next().await {
            match answer {
                Some(PreVoteReply { granted: true, .. }) => {
                    yes.insert(peer);
                    if quorum(&yes) {
                        return true;
                    }
                }
                Some(PreVoteReply {
                    granted: false,
                    leader: Some(l),
                }) if l != self.me => refused_by = Some(l),
                _ => {}
            }
        }
        if let Some(l) = refused_by {
            tracing::debug!(
                leader = l,
                "pre-vote refused: a voter still hears the leader"
            );
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), l));
        }
        false
    }

    /// This node's last log id; the outer `None` when the log cannot be read.
    async fn last_log_id(&self) -> Option<Option<LogId>> {
        use openraft::storage::RaftLogStorage;
        let mut log = self.log.clone();
        log.get_log_state().await.ok().map(|s| s.last_log_id)
    }

    /// A voter's answer to `from`'s pre-vote: yes only if this node's leader lease has run out
    /// too and the candidate's log is at least as long as this node's. `None` (no answer)
    /// while an earlier question of `from` is still being answered.
    pub async fn answer(&self, from: NodeId, ask: PreVote) -> Option<PreVoteReply> {
        if !self
            .answering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(from)
        {
            return None;
        }
        /// Takes the asker off `answering` however the answer ends.
        struct Done<'a>(&'a Mutex<BTreeSet<NodeId>>, NodeId);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.1);
            }
        }
        let _done = Done(&self.answering, from);
        Some(self.decide(from, ask).await)
    }

    async fn decide(&self, from: NodeId, ask: PreVote) -> PreVoteReply {
        let lease = self.timing.lease;
        let metrics = self.raft.metrics().borrow().clone();
        let mine = self.last_log_id().await;
        let seen = self.seen().await;
        let (Some(mine), Some(seen)) = (mine, seen) else {
            return PreVoteReply {
                granted: false,
                leader: None,
            };
        };
        let leader_holds = match seen.state {
            ServerState::Leader => metrics
                .millis_since_quorum_ack
                .is_some_and(|ms| Duration::from_millis(ms) <= lease),
            _ => seen.committed && seen.heard.is_some_and(|at| at.elapsed() <= lease),
        };
        if leader_holds {
            return PreVoteReply {
                granted: false,
                leader: metrics.current_leader,
            };
        }
        let granted = ask.last_log_id >= mine;
        if !granted {
            tracing::debug!(
                candidate = from,
                "pre-vote refused: the candidate's log is behind"
            );
        }
        PreVoteReply {
            granted,
            leader: None,
        }
    }
}

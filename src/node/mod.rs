//! A Warden node: connects to NATS, opens its sled store, runs Raft, serves commands and
//! publishes events until its shutdown future resolves.

pub(crate) mod batch;
mod controller;
mod dispatch;
mod export;
mod figures;
mod forward;
pub mod host;
pub mod lease;
mod membership;
mod proposer;
mod run;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanKind;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};

use crate::agent::Kinds;
use crate::bus::RequestFailure;
use crate::command::{
    cluster, CheckpointRequest, Command, Handoff, Heartbeat, JoinRequest, ReportAgents,
};
use crate::config::NodeConfig;
use crate::limits;
use crate::protocol::{Encoding, Envelope, ErrorCode, WireError};
use crate::raft::network::Contacts;
use crate::raft::store::SharedState;
use crate::raft::typ::{Raft, RaftMetrics};
use crate::registry::{NodeStatus, RegistryCmd};
use crate::subjects::Subjects;

pub use forward::{ForwardBatch, Request};
pub use proposer::ProposeError;
pub use run::{run, run_with_kinds};

/// Everything a command handler needs, shared by all tasks of the node.
pub struct Node {
    pub cfg: NodeConfig,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub raft: Raft,
    pub state: SharedState,
    pub contacts: Arc<Contacts>,
    /// When this node campaigns (`raft::election`), and what its pre-votes learned.
    pub election: Arc<crate::raft::election::Election>,
    /// Whether this node is cut off from its leader, and from which (`cut_off`).
    cut: watch::Sender<Option<u64>>,
    /// The term this node leads in, and since when (`find_cut_off`).
    leading_since: std::sync::Mutex<Option<(u64, Instant)>>,
    proposer: proposer::Proposer,
    forwarder: forward::Forwarder,
    /// Requests to other nodes (`peers`).
    peers: Arc<crate::peers::Peers>,
    /// The agent kinds this node runs.
    pub kinds: Kinds,
    membership_lock: tokio::sync::Mutex<()>,
    /// Clients' commands being handled.
    inflight: Arc<Semaphore>,
    /// Other nodes' requests being handled: apart from clients', so that no client flood
    /// starves heartbeats, reports and hand-offs.
    inflight_internal: Arc<Semaphore>,
    /// Client spawns waiting for their agent's first start (`limits::SPAWN_WAITERS`).
    spawn_waiters: Arc<Semaphore>,
    /// Questions to the host about its instances (`figures`).
    host_asks: tokio::sync::mpsc::Sender<host::HostQuery>,
    /// Walks over this node's instances running (`limits::FIGURE_WALKS`), agents' figures
    /// answered (`FIGURE_ASKS`), supervisors' gathered from every node (`FIGURE_FANOUTS`),
    /// and the last scan of `/proc` (`figures`).
    figure_walks: Arc<Semaphore>,
    figure_asks: Arc<Semaphore>,
    figure_fanouts: Arc<Semaphore>,
    proc_scan: figures::ProcScan,
    /// History queries running on this node (`limits::HISTORY_READERS`).
    history_readers: Arc<Semaphore>,
    /// On the leader: the subtree copies `export_subtree` is paging through.
    exports: export::Exports,
    started: Instant,
    /// This node's lease: whether it may run agents now.
    pub lease: lease::Lease,
    /// On the leader: when each node was last heard from.
    pub liveness: lease::Liveness,
    quorum: lease::QuorumGate,
    /// Raises read indexes over a restart as leader (see `raft::read`).
    read_floor: crate::raft::read::ReadFloor,
    /// Agents running here, kept by the host for heartbeats.
    pub running: std::sync::atomic::AtomicU32,
    /// Agents asked to stop here whose tasks have not ended yet, kept by the host.
    pub stopping: std::sync::atomic::AtomicU32,
    /// This node's Prometheus metrics (`crate::metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This node's tracer, when `[traces]` has an endpoint (`crate::traces`).
    pub traces: Option<Arc<crate::traces::Traces>>,
}

/// What the leader needs of a command besides the command: its encoded size (to bound
/// batches) and, when it is traced, the span of the node that took it.
#[derive(Clone, Copy)]
pub(crate) struct Asked<'a> {
    size: usize,
    span: Option<&'a crate::traces::Span>,
}

impl<'a> Asked<'a> {
    pub(crate) fn traced(size: usize, span: &'a crate::traces::Span) -> Asked<'a> {
        Asked {
            size,
            span: Some(span),
        }
    }
}

impl From<usize> for Asked<'static> {
    fn from(size: usize) -> Self {
        Asked { size, span: None }
    }
}

/// The writes a node makes for itself, typed: never parsed back from a wire message on the
/// leader.
#[derive(Debug)]
pub enum OwnWrite {
    /// Asks the leader for a lease (`node::lease`).
    Heartbeat(Heartbeat),
    /// The host's observations of its agents.
    Reports(ReportAgents),
    /// An agent's state from the node running it.
    Checkpoint(CheckpointRequest),
    /// Migrating agents this node has stopped, with their last state.
    Handoff(Handoff),
    /// A sibling on another node that a spread supervisor's strategy restarts.
    RestartAgent(uuid::Uuid),
    /// A temporary agent that ended and is forgotten.
    Forget(uuid::Uuid),
    /// An agent that ended for good, with its result.
    Finish(crate::command::FinishAgents),
}

impl OwnWrite {
    /// The command it is, as `command::TABLE` names it.
    fn name(&self) -> &'static str {
        match self {
            OwnWrite::Heartbeat(_) => "heartbeat",
            OwnWrite::Reports(_) => "report_agents",
            OwnWrite::Checkpoint(_) => "checkpoint",
            OwnWrite::Handoff(_) => "handoff",
            OwnWrite::RestartAgent(_) => "restart_agent",
            OwnWrite::Forget(_) => "stop_agent",
            OwnWrite::Finish(_) => "finish_agents",
        }
    }

    /// Its body in MessagePack, as forwarded to a leader elsewhere.
    fn encode(&self) -> Vec<u8> {
        match self {
            OwnWrite::Heartbeat(h) => Encoding::Msgpack.encode(h),
            OwnWrite::Reports(r) => Encoding::Msgpack.encode(r),
            OwnWrite::Checkpoint(c) => Encoding::Msgpack.encode(c),
            OwnWrite::Handoff(h) => Encoding::Msgpack.encode(h),
            OwnWrite::Finish(f) => Encoding::Msgpack.encode(f),
            OwnWrite::RestartAgent(id) | OwnWrite::Forget(id) => {
                Encoding::Msgpack.encode(&agent_ref(*id))
            }
        }
    }

    fn into_command(self) -> Command {
        match self {
            OwnWrite::Heartbeat(h) => Command::Heartbeat(h),
            OwnWrite::Reports(r) => Command::ReportAgents(r),
            OwnWrite::Checkpoint(c) => Command::Checkpoint(c),
            OwnWrite::Handoff(h) => Command::Handoff(h),
            OwnWrite::RestartAgent(id) => Command::RestartAgent(agent_ref(id)),
            OwnWrite::Forget(id) => Command::StopAgent(agent_ref(id)),
            OwnWrite::Finish(f) => Command::FinishAgents(f),
        }
    }
}

fn agent_ref(id: uuid::Uuid) -> crate::command::AgentRef {
    crate::command::AgentRef {
        agent: id.to_string(),
        request_id: None,
    }
}

/// A command's reply: its result, or why it was refused.
type Reply = Result<Value, WireError>;

impl Node {
    /// Whether this node is the Raft leader right now (as far as it knows).
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == openraft::ServerState::Leader
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// The leader, when this node is cut off from it: it does not lead, its lease has run
    /// out, a live leader exists (this node heard it within the leader lease, or a voter
    /// refused this node's pre-vote because it still hears it), and that leader has answered
    /// none of this node's requests (a heartbeat goes every `failure.heartbeat_interval_ms`)
    /// for `failure.lease_ms`. Or this node's own id, when it leads but no majority has
    /// acknowledged it, nor sent it a heartbeat, for `failure.lease_ms` (check-quorum: it can
    /// commit nothing, and the others may be electing a new leader). Such a node answers
    /// commands at once instead of waiting on a link that does not carry them, leaves the
    /// shared command queue, and leaves agents' calls to the node that runs them now
    /// (ARCHITECTURE.md, "Partial partitions").
    /// `None` while it is connected, and while no leader is known to live (one is being
    /// elected: commands wait for it). Kept up to date every heartbeat interval by
    /// `watch_cut_off`.
    pub fn cut_off(&self) -> Option<u64> {
        *self.cut.borrow()
    }

    fn find_cut_off(&self) -> Option<u64> {
        let lease = Duration::from_millis(self.cfg.failure.lease_ms);
        let (leads, term, quorum_ack_ms, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let leads = m.state == openraft::ServerState::Leader;
            let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
            (leads, m.current_term, m.millis_since_quorum_ack, voters)
        };
        let leading_since = {
            let mut since = self.leading_since.lock().unwrap_or_else(|p| p.into_inner());
            match *since {
                Some((t, at)) if leads && t == term => Some(at),
                _ if leads => {
                    *since = Some((term, Instant::now()));
                    since.map(|(_, at)| at)
                }
                _ => {
                    *since = None;
                    None
                }
            }
        };
        if self.lease.valid() || self.started.elapsed() < lease {
            return None;
        }
        if let Some(since) = leading_since {
            // Once cut off, a leader stays so until its own lease is valid again (a quorum
            // confirmed it) or it stops leading: an acknowledgement age hovering about the
            // bound must not take it in and out of the queue group.
            if *self.cut.borrow() == Some(self.cfg.id) {
                return Some(self.cfg.id);
            }
            // A new leader has no acknowledgement yet until a follower stored an entry of its
            // term: it counts from when it began to lead.
            let age = quorum_ack_ms.map_or(since.elapsed(), Duration::from_millis);
            if age < lease || since.elapsed() < lease {
                return None;
            }
            // Raft's acknowledgements also stall when followers are merely slow (building a
            // snapshot on a loaded machine): a leader is cut off only if, besides, a majority
            // of voters has sent it no heartbeat for as long. Those are NATS requests to this
            // node, which is what clients' commands are too.
            let reached = voters
                .iter()
                .filter(|&&v| {
                    v == self.cfg.id || self.liveness.last(v).is_some_and(|t| t.elapsed() < lease)
                })
                .count();
            return (reached * 2 <= voters.len()).then_some(self.cfg.id);
        }
        let leader = (self.election.live_leader()).filter(|&l| l != self.cfg.id)?;
        let answered = self.peers.answered(leader);
        answered
            .is_none_or(|at| at.elapsed() >= lease)
            .then_some(leader)
    }

    /// Resolves once this node is cut off from its leader (`cut_off`), with that leader.
    pub async fn until_cut_off(&self) -> u64 {
        let mut rx = self.cut.subscribe();
        let leader = match rx.wait_for(|c| c.is_some()).await {
            Ok(c) => *c,
            Err(_) => None,
        };
        match leader {
            Some(l) => l,
            None => std::future::pending().await, // the node is stopping
        }
    }

    fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// Agents running on this node now.
    pub fn running_agents(&self) -> u32 {
        self.running.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The index of the last log entry this node applied.
    pub fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index)
    }

    fn registry_node_status(&self, id: u64) -> Option<NodeStatus> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.registry.node(id).map(|n| n.status)
    }

    /// Proposes a registry command through the batcher and maps failures to wire errors.
    async fn propose<'a>(
        &self,
        cmd: RegistryCmd,
        request_id: Option<String>,
        asked: impl Into<Asked<'a>>,
    ) -> Result<Value, WireError> {
        let asked = asked.into();
        let span = match (&self.traces, asked.span) {
            (Some(t), Some(parent)) => t.child(parent, "proposed", SpanKind::Internal),
            _ => crate::traces::Span::none(),
        };
        match self
            .proposer
            .propose(request_id, cmd, asked.size, span)
            .await
        {
            Ok(outcome) => crate::command::reply::render(outcome),
            Err(ProposeError::NotLeader) => Err(WireError::new(
                ErrorCode::Unavailable,
                "this node stopped leading; retry",
            )),
            Err(ProposeError::Overloaded) => Err(WireError::new(
                ErrorCode::Unavailable,
                "the leader's write queue is full; retry with backoff",
            )),
            Err(ProposeError::Unknown(why)) => Err(WireError::new(
                ErrorCode::Timeout,
                format!(
                    "outcome unknown ({why}): the command may or may not have taken effect; \
                     retry with the same request_id to find out safely"
                ),
            )),
        }
    }

    /// Runs a command that must run on the leader. Returns `None` if this node does not lead.
    async fn execute_on_leader(&self, cmd: Command, asked: Asked<'_>) -> Option<Reply> {
        if !self.is_leader() {
            return None;
        }
        Some(match cmd {
            Command::Health => Ok(self.health()),
            Command::ClusterStatus => {
                self.linearizable_read(|node| {
                    let metrics = node.metrics();
                    let st = node.state_read();
                    let since = |id| node.liveness.since_ms(id);
                    let applied = metrics.last_applied.map_or(0, |l| l.index);
                    Ok(cluster::cluster_status(
                        &node.cfg.cluster,
                        node.cfg.voters_max,
                        &metrics,
                        &st.registry,
                        &since,
                        node.metrics.commit_index().get(applied),
                    ))
                })
                .await?
            }
            Command::ListSupervisors(q) => self.read_registry(|reg| q.answer(reg)).await?,
            Command::GetSupervisionTree(q) => self.read_registry(|reg| q.answer(reg)).await?,
            Command::CreateSupervisor(mut c) => {
                let rid = c.request_id.take();
                self.propose(RegistryCmd::CreateSupervisor(c), rid, asked)
                    .await
            }
            Command::StopSupervisor(s) => {
                self.propose(
                    RegistryCmd::StopSupervisor { name: s.name },
                    s.request_id,
                    asked,
                )
                .await
            }
            Command::GetAgent(q) => self.read_registry(|reg| q.get(reg)).await?,
            Command::ExportState(q) => self.read_registry(|reg| q.export(reg)).await?,
            Command::FindAgents(q) => self.read_registry(|reg| q.answer(reg)).await?,
            Command::SpawnAgent(mut a) => {
                let rid = a.request_id.take();
                self.propose(RegistryCmd::SpawnAgent(a), rid, asked).await
            }
            Command::SpawnAgentGroup(mut g) => {
                let rid = g.request_id.take();
                self.propose(RegistryCmd::SpawnAgentGroup(g), rid, asked)
                    .await
            }
            Command::StopAgent(a) => {
                self.propose(
                    RegistryCmd::StopAgent { agent: a.agent },
                    a.request_id,
                    asked,
                )
                .await
            }
            Command::RestartAgent(a) => {
                let cmd = RegistryCmd::RestartAgent { agent: a.agent };
                self.propose(cmd, a.request_id, asked).await
            }
            Command::UpdateSupervisor(mut u) => {
                let rid = u.request_id.take();
                self.propose(RegistryCmd::UpdateSupervisor(u), rid, asked)
                    .await
            }
            Command::UpdateAgent(mut u) => {
                let rid = u.request_id.take();
                self.propose(RegistryCmd::UpdateAgent(u), rid, asked).await
            }
            Command::ImportState(i) => match i.validate() {
                Ok(state) => {
                    let cmd = RegistryCmd::ImportState {
                        agent: i.agent,
                        state,
                    };
                    self.propose(cmd, i.request_id, asked).await
                }
                Err(e) => Err(e),
            },
            Command::ReportAgents(r) => {
                let cmd = RegistryCmd::ReportAgents { reports: r.reports };
                self.propose(cmd, None, asked).await
            }
            Command::Checkpoint(c) => {
                let cmd = RegistryCmd::Checkpoint {
                    agent: c.agent,
                    node: c.node,
                    epoch: c.epoch,
                    state: c.state,
                };
                self.propose(cmd, None, asked).await
            }
            Command::Heartbeat(h) => lease::grant(self, h).await,
            Command::MigrateAgent(m) => {
                let cmd = RegistryCmd::MigrateAgent {
                    agent: m.agent,
                    to: m.to,
                };
                self.propose(cmd, m.request_id, asked).await
            }
            Command::DrainNode(d) => {
                let cmd = RegistryCmd::DrainNode {
                    node_id: d.node,
                    cancel: d.cancel,
                };
                self.propose(cmd, d.request_id, asked).await
            }
            Command::Rebalance(r) if r.dry_run => {
                self.read_registry(|reg| {
                    let moves = reg.rebalance_plan(r.max_moves);
                    Ok(serde_json::json!({ "moves": moves, "dry_run": true }))
                })
                .await?
            }
            Command::Rebalance(r) => {
                let cmd = RegistryCmd::Rebalance {
                    max_moves: r.max_moves,
                };
                self.propose(cmd, r.request_id, asked).await
            }
            Command::Handoff(h) => {
                let cmd = RegistryCmd::Handoff { items: h.items };
                self.propose(cmd, None, asked).await
            }
            Command::RegisterTemplate(mut r) => {
                let rid = r.request_id.take();
                self.propose(RegistryCmd::RegisterTemplate(r), rid, asked)
                    .await
            }
            Command::DeleteTemplate(t) => {
                let cmd = RegistryCmd::DeleteTemplate { name: t.name };
                self.propose(cmd, t.request_id, asked).await
            }
            Command::GetTemplate(t) => {
                self.read_registry(|reg| match reg.template(&t.name) {
                    Some(t) => Ok(t.full()),
                    None => Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("no template named {:?}", t.name),
                    )),
                })
                .await?
            }
            Command::FindTemplates(q) => self.read_registry(|reg| q.answer(reg)).await?,
            Command::ExportSubtree(q) => match q.export {
                // A client names the export it begins, so that a retry finds the first one.
                Some(id) if q.cursor > 0 || self.exports.holds(id) => {
                    self.exports.page_of(id, &q.name, q.cursor)
                }
                _ => {
                    let mut copy = None;
                    let read = self.read_registry(|reg| {
                        copy = Some(reg.export_copy(&q.name)?);
                        Ok(serde_json::Value::Null)
                    });
                    match (read.await?, copy) {
                        (Ok(_), Some(copy)) => {
                            let id = q.export.unwrap_or_else(uuid::Uuid::new_v4);
                            self.exports.begin(id, copy, &self.cfg.cluster)
                        }
                        (Err(e), _) => Err(e),
                        (Ok(_), None) => Err(WireError::new(ErrorCode::Internal, "no copy")),
                    }
                }
            },
            Command::ImportSubtree(mut i) => {
                let rid = i.request_id.take();
                self.propose(RegistryCmd::ImportSubtree(*i), rid, asked)
                    .await
            }
            Command::ImportBegin(mut b) => {
                let rid = b.request_id.take();
                self.propose(RegistryCmd::ImportBegin(b), rid, asked).await
            }
            Command::ImportPage(p) => self.propose(RegistryCmd::ImportPage(*p), None, asked).await,
            Command::ImportCommit(c) => {
                let cmd = RegistryCmd::ImportCommit {
                    import: c.import,
                    supervisors: c.supervisors,
                    agents: c.agents,
                };
                self.propose(cmd, c.request_id, asked).await
            }
            Command::SpawnSubtree(mut s) => {
                let rid = s.request_id.take();
                self.propose(RegistryCmd::SpawnSubtree(s), rid, asked).await
            }
            Command::ImportAbort(a) => {
                let cmd = RegistryCmd::ImportAbort { import: a.import };
                self.propose(cmd, a.request_id, asked).await
            }
            // Answered where it arrives (`dispatch`); here only as it stands, without waiting.
            Command::WaitAgent(w) => {
                let st = self.state_read();
                match crate::command::WaitAgent::look(&st.registry, &w.agent) {
                    crate::command::agent::Waited::Done(v) => Ok(v),
                    crate::command::agent::Waited::Running(id) => Err(WireError::new(
                        ErrorCode::Timeout,
                        format!("agent {id} is not done"),
                    )),
                    crate::command::agent::Waited::Unknown => Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("no agent {:?}", w.agent),
                    )),
                }
            }
            // Answered where they arrive (`dispatch`), from the stream, not the registry.
            Command::AgentHistory(_)
            | Command::SupervisorHistory(_)
            | Command::AgentMetrics(_)
            | Command::SupervisorMetrics(_)
            | Command::NodeMetrics(_) => Err(WireError::new(
                ErrorCode::Internal,
                "answered by the node that receives it",
            )),
            Command::FinishAgents(f) => {
                let cmd = RegistryCmd::FinishAgents { items: f.items };
                self.propose(cmd, None, asked).await
            }
            Command::Join(j) => membership::join(self, j).await,
            Command::Leave(l) => membership::leave(self, l).await,
        })
    }

    /// A write this node makes for itself (`OwnWrite`), wherever the leader is, and its
    /// outcome. On the leader the typed command goes straight to the proposer; elsewhere its
    /// body is encoded once and sent to the leader as this node's own command (writes in the
    /// forward batches, heartbeats alone), which the leader answers only if it still leads.
    /// Retried while nothing reached a leader, up to `FORWARD_TIMEOUT_MS`.
    pub async fn write_own(&self, w: OwnWrite) -> Result<Value, WireError> {
        let payload: bytes::Bytes = w.encode().into();
        let name = w.name();
        let cmd = w.into_command();
        let deadline = Instant::now() + Duration::from_millis(limits::FORWARD_TIMEOUT_MS);
        // Unavailable means nothing changed, but also that the leader is busy, moving, or
        // judging this node: retries slow down, a handful in all.
        let mut backoff = crate::retry::Backoff::new(
            Duration::from_millis(limits::LEADER_RETRY_MS),
            Duration::from_millis(limits::OWN_WRITE_RETRY_MAX_MS),
        );
        let unavailable = |why: &str| Err(WireError::new(ErrorCode::Unavailable, why));
        loop {
            if let Some(out) = self
                .execute_on_leader(cmd.clone(), payload.len().into())
                .await
            {
                return out;
            }
            let leader = match dispatch::wait_for_leader(self, deadline).await {
                Some(l) => l,
                None => return unavailable("no leader: the cluster has no quorum right now"),
            };
            let sent = if leader == self.cfg.id {
                None // it became leader, or just stopped: look again
            } else {
                Some(self.send_own(leader, name, payload.clone(), deadline).await)
            };
            match sent {
                Some(forward::Forwarded::Reply(body)) => {
                    match Envelope::decode(&body).and_then(Envelope::into_result) {
                        // It did not lead any more: nothing changed, ask the next one.
                        Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => {
                            tracing::debug!(error = %e, name, "own write not taken; retrying")
                        }
                        out => return out,
                    }
                }
                Some(forward::Forwarded::NoAnswer) => {
                    return Err(WireError::new(
                        ErrorCode::Timeout,
                        "the leader did not answer in time; the write may or may not have \
                         taken effect",
                    ))
                }
                Some(forward::Forwarded::Unreachable) | None => {}
            }
            if Instant::now() + backoff.peek() >= deadline {
                return unavailable("could not reach the leader; nothing changed");
            }
            backoff.wait().await;
        }
    }

    /// Sends this node's own command to `leader`: writes in a forward batch, the rest alone.
    async fn send_own(
        &self,
        leader: u64,
        name: &str,
        payload: bytes::Bytes,
        deadline: Instant,
    ) -> forward::Forwarded {
        let within = forward::remaining(deadline);
        if crate::command::route_of(name) == Some(crate::command::Route::Write) {
            let req = forward::Request {
                command: name.to_string(),
                content_type: Some(crate::protocol::MSGPACK.to_string()),
                hops: 0,
                payload,
                own: true,
                trace: None,
            };
            return self.forwarder.forward(leader, req, within).await;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(crate::protocol::CONTENT_TYPE, crate::protocol::MSGPACK);
        let subject = self.subjects.own(self.cfg.id, leader, name);
        let sent = self
            .peers
            .request(Some(leader), subject, Some(headers), payload, within)
            .await;
        match sent {
            Ok(reply) => forward::Forwarded::Reply(reply.payload),
            Err(RequestFailure::NoResponders) => forward::Forwarded::Unreachable,
            Err(_) => forward::Forwarded::NoAnswer,
        }
    }

    pub(crate) fn state_read(&self) -> std::sync::RwLockReadGuard<'_, crate::raft::store::SmState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A linearizable read of the registry.
    async fn read_registry(
        &self,
        read: impl FnOnce(&crate::registry::Registry) -> Reply,
    ) -> Option<Reply> {
        self.linearizable_read(|node| read(&node.state_read().registry))
            .await
    }

    /// Confirms leadership with a quorum and waits until everything committed before the read
    /// is applied (from the read index raised by the node's `ReadFloor`), then reads. `None`
    /// when this node turns out not to lead.
    async fn linearizable_read(&self, read: impl FnOnce(&Node) -> Reply) -> Option<Reply> {
        let deadline = Instant::now() + Duration::from_millis(limits::FORWARD_TIMEOUT_MS / 2);
        let late = |what: &str| {
            Some(Err(WireError::new(
                ErrorCode::Unavailable,
                format!("the leader could not {what} in time"),
            )))
        };
        let confirmed = tokio::time::timeout_at(deadline.into(), self.raft.get_read_log_id()).await;
        let read_id = match confirmed {
            Ok(Ok((read_id, _))) => read_id,
            Ok(Err(openraft::error::RaftError::APIError(_))) => return None,
            Ok(Err(e)) => return Some(Err(WireError::new(ErrorCode::Unavailable, e.to_string()))),
            Err(_) => return late("confirm its leadership with a quorum"),
        };
        let index = self.read_floor.raise(&self.raft, read_id);
        let left = deadline.saturating_duration_since(Instant::now());
        let applied = self
            .raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "linearizable read")
            .await;
        match applied {
            Ok(_) => Some(read(self)),
            Err(_) => late("apply the log up to the read index"),
        }
    }

    fn health(&self) -> Value {
        let metrics = self.metrics();
        let uptime = self.started.elapsed().as_millis() as u64;
        let mut h = cluster::health(&self.cfg.name, &self.cfg.cluster, uptime, &metrics);
        h["labels"] = serde_json::to_value(&self.cfg.labels).unwrap_or_default();
        h["running_agents"] = self.running_agents().into();
        h["stopping_agents"] = self
            .stopping
            .load(std::sync::atomic::Ordering::Relaxed)
            .into();
        h["protocol_version"] = crate::registry::REGISTRY_VERSION.into();
        let left = self
            .lease
            .until()
            .map(|u| u.saturating_duration_since(Instant::now()).as_millis() as u64);
        h["lease_ms_left"] = left.into();
        h
    }
}

/// Keeps `Node::cut_off` up to date, every heartbeat interval, until `stopped`.
pub async fn watch_cut_off(node: Arc<Node>, stopped: impl Future<Output = ()>) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        node.cfg.failure.heartbeat_interval_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let now = node.find_cut_off();
        node.cut.send_if_modified(|was| {
            let changed = *was != now;
            *was = now;
            changed
        });
    }
}

/// A future that resolves when the watch flips to `true` (or its sender is gone).
fn flag(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        // An error means the sender is gone, which also means "stop".
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Asks the cluster to accept this node (retrying with backoff), then serves the shared
/// command queue. A node that is already a member serves at once and refreshes its record in
/// the background, so a full-cluster restart cannot deadlock on joins.
async fn join_then_serve(
    node: Arc<Node>,
    stopped: impl Future<Output = ()> + Send + 'static,
    stop: watch::Sender<bool>,
) {
    let stopped = futures::future::FutureExt::shared(Box::pin(stopped));
    // Asked of Raft itself, not of the metrics, which may lag right after a bootstrap.
    let is_member = node.raft.is_initialized().await.unwrap_or(false);
    let join_phase = async {
        match join_loop(&node).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "the cluster refused this node");
                let _ = stop.send(true); // stopping is all that is left to do
                false
            }
        }
    };
    if is_member {
        // Serve at once: the join itself may need this node's answer (full restart).
        match subscribe_queue(&node).await {
            Ok(sub) => {
                let refresh = async {
                    tokio::select! {
                        _ = stopped.clone() => {}
                        _ = join_phase => {}
                    }
                };
                tokio::join!(
                    serve_shared(node.clone(), sub, stopped.clone()),
                    serve_leader_queries(node.clone(), stopped.clone()),
                    refresh
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "could not subscribe to commands");
                let _ = stop.send(true);
            }
        }
        return;
    }
    tokio::select! {
        _ = stopped.clone() => return,
        accepted = join_phase => if !accepted { return },
    }
    match subscribe_queue(&node).await {
        Ok(sub) => {
            tokio::join!(
                serve_shared(node.clone(), sub, stopped.clone()),
                serve_leader_queries(node.clone(), stopped)
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "could not subscribe to commands");
            let _ = stop.send(true);
        }
    }
}

/// Serves the shared command queue from `first` on. While this node is cut off from its
/// leader (`Node::cut_off`) it leaves the queue group, so that the NATS servers that still
/// hear it send the shared commands to nodes that can serve them, and it joins again once it
/// holds a lease (ARCHITECTURE.md, "Partial partitions"). Its own subject stays, and answers
/// at once.
async fn serve_shared(
    node: Arc<Node>,
    first: async_nats::Subscriber,
    stopped: impl Future<Output = ()> + Clone,
) {
    let every = Duration::from_millis(node.cfg.failure.heartbeat_interval_ms);
    let mut sub = Some(first);
    loop {
        let s = match sub.take() {
            Some(s) => s,
            None => match subscribe_queue(&node).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "could not join the shared command queue; retrying");
                    tokio::select! {
                        _ = stopped.clone() => return,
                        _ = tokio::time::sleep(every) => continue,
                    }
                }
            },
        };
        let mut cut_from = None;
        let end = async {
            tokio::select! {
                _ = stopped.clone() => {}
                leader = node.until_cut_off() => cut_from = Some(leader),
            }
        };
        // Commands in flight finish (or are refused: this node is cut off) before it leaves.
        dispatch::serve(node.clone(), s, dispatch::Feed::Commands, end).await;
        let Some(leader) = cut_from else { return };
        tracing::warn!(
            leader,
            "cut off from the leader: out of the shared command queue until it is reachable"
        );
        while node.cut_off().is_some() {
            tokio::select! {
                _ = stopped.clone() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
        tracing::info!("the leader is reachable again: back in the shared command queue");
    }
}

async fn subscribe_queue(node: &Node) -> anyhow::Result<async_nats::Subscriber> {
    let sub = node
        .client
        .queue_subscribe(node.subjects.cmd_all(), node.subjects.cmd_queue())
        .await?;
    node.client.flush().await?;
    Ok(sub)
}

/// Sends `join` until the leader accepts it. Errors only when the cluster refuses the node for
/// good (it left earlier).
async fn join_loop(node: &Node) -> Result<(), WireError> {
    let req = JoinRequest {
        node_id: node.cfg.id,
        name: node.cfg.name.clone(),
        labels: node.cfg.labels.clone(),
        kinds: node.kinds.names(),
        capacity: node.cfg.capacity,
        protocol_version: crate::registry::REGISTRY_VERSION,
    };
    let body = Encoding::Msgpack.encode(&req);
    let mut backoff = crate::retry::Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(limits::JOIN_BACKOFF_MS_MAX),
    );
    // Sent to the leader as far as this node knows it, else to the one a member names.
    // A node that did not take it (silent, or not the leader) is not asked again next time:
    // Raft may still name a leader that is gone.
    let mut silent: Option<u64> = None;
    let me = node.cfg.id;
    let payload: bytes::Bytes = body.into();
    loop {
        let outcome = if node.is_leader() {
            // It leads (a cluster it bootstrapped, or a restart): it registers itself.
            let own = node.execute_on_leader(Command::Join(req.clone()), payload.len().into());
            own.await.map(Ok)
        } else {
            let known = node.leader().filter(|&l| l != me && Some(l) != silent);
            let target = match known {
                Some(l) => Some(l),
                None => ask_leader(node).await.filter(|&l| l != me),
            };
            match target {
                Some(l) => {
                    let deadline =
                        Instant::now() + Duration::from_millis(limits::FORWARD_TIMEOUT_MS + 2_000);
                    let sent = node.send_own(l, "join", payload.clone(), deadline).await;
                    let outcome = match sent {
                        forward::Forwarded::Reply(body) => {
                            Ok(Envelope::decode(&body).and_then(Envelope::into_result))
                        }
                        forward::Forwarded::Unreachable => Err(RequestFailure::NoResponders),
                        forward::Forwarded::NoAnswer => Err(RequestFailure::TimedOut),
                    };
                    silent = (!matches!(outcome, Ok(Ok(_)))).then_some(l);
                    Some(outcome)
                }
                None => None,
            }
        };
        match outcome {
            Some(Ok(Ok(v))) => {
                tracing::info!(role = %v["role"], "joined the cluster");
                return Ok(());
            }
            // Refused for good: it left earlier, or it speaks another version (an older leader
            // does not know the version field at all, and says `bad_request`).
            Some(Ok(Err(e))) if matches!(e.code, ErrorCode::Conflict | ErrorCode::BadRequest) => {
                return Err(e)
            }
            Some(Ok(Err(e))) => tracing::info!(error = %e, "join not accepted yet; retrying"),
            Some(Err(RequestFailure::NoResponders)) => {
                tracing::debug!("the leader named does not answer; retrying join")
            }
            Some(Err(e)) => tracing::info!(error = %e, "join request failed; retrying"),
            None => tracing::debug!("no leader known yet; retrying join"),
        }
        // Spread by up to half the pause, so that nodes started together do not retry together.
        let pause = backoff.next_pause();
        let jitter = rand::random::<u64>() % (pause.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(pause + Duration::from_millis(jitter)).await;
    }
}

/// Asks any member who leads. The answer is only a hint: whoever it names must still accept
/// the join on a subject only it may answer on.
async fn ask_leader(node: &Node) -> Option<u64> {
    let reply = node
        .peers
        .request(
            None,
            node.subjects.leader_query(node.cfg.id),
            None,
            bytes::Bytes::new(),
            Duration::from_millis(limits::LEADER_WAIT_MS),
        )
        .await
        .ok()?;
    let v = Envelope::decode(&reply.payload)
        .and_then(Envelope::into_result)
        .ok()?;
    v["leader"].as_u64()
}

/// Answers other nodes' `leader` queries (as one queue group of members) until `stopped`.
async fn serve_leader_queries(node: Arc<Node>, stopped: impl Future<Output = ()>) {
    let sub = node
        .client
        .queue_subscribe(
            node.subjects.leader_queries(),
            node.subjects.leader_query_queue(),
        )
        .await;
    let mut sub = match sub {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "could not subscribe to leader queries");
            return;
        }
    };
    tokio::pin!(stopped);
    loop {
        let msg = tokio::select! {
            _ = &mut stopped => break,
            m = futures::StreamExt::next(&mut sub) => match m { Some(m) => m, None => break },
        };
        let from = node.subjects.parse_internal(&msg.subject).map(|s| s.from);
        let Some(reply) = msg.reply.as_deref() else {
            continue;
        };
        if !from.is_some_and(|f| node.subjects.is_reply_for(reply, None, f)) {
            continue;
        }
        let body = Encoding::Json.encode(&Envelope::from_result(Ok(
            serde_json::json!({ "leader": node.leader() }),
        )));
        if let Err(e) = node.client.publish(reply.to_string(), body.into()).await {
            tracing::debug!(error = %e, "could not answer a leader query");
        }
    }
    let _ = sub.unsubscribe().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a node's own writes are commands of the table, sent to the leader, and their
    /// bodies parse as the leader will parse them.
    #[test]
    fn own_writes_are_node_commands_of_the_table() {
        let id = uuid::Uuid::from_u128(7);
        let writes = [
            OwnWrite::Heartbeat(Heartbeat {
                node_id: 2,
                load: Default::default(),
                acked: Some(crate::command::GrantId { term: 3, grant: 9 }),
                process: 77,
            }),
            OwnWrite::Reports(ReportAgents { reports: vec![] }),
            OwnWrite::Handoff(Handoff { items: vec![] }),
            OwnWrite::RestartAgent(id),
            OwnWrite::Forget(id),
        ];
        for w in writes {
            let spec = crate::command::spec(w.name()).expect("in the table");
            assert_ne!(spec.route, crate::command::Route::Local, "{}", spec.name);
            let parsed = Command::parse(w.name(), Encoding::Msgpack, &w.encode()).unwrap();
            assert_eq!(parsed, w.into_command());
        }
    }
}

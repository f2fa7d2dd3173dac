//! The agents one node runs.
//!
//! The registry holds the desired state: which agents exist and where they are placed. The
//! host reconciles it with the local instances on a tick and whenever Raft applies something,
//! supervises the instances when they end, answers calls and casts on
//! `warden.<cluster>.agent.<id-or-name>.call|cast`, and reports what it observes through Raft.
//!
//! The host is a loop over a closed set of events (`Wake`) that never waits on an agent:
//! - `plan`: the pure planner. What to fence, stop, hand off and start is decided there from
//!   plain data (the registry's agents placed here, the local instances, the lease, the time).
//! - `task`: each agent's own task. It runs the kind's `start`, the agent's messages one at a
//!   time, and its graceful stop, and tells the host how each ended (`TaskEvent`). A slow start
//!   or a stop that takes its whole `shutdown_ms` delays nothing else.
//! - `calls`: routing calls and casts into mailboxes (never waiting), and the events the host
//!   publishes.
//! - `supervise`: OTP strategies on this node, through `crate::supervision`.
//! - `reports`: the writer task that sends reports, hand-offs and forgets through Raft.
//!
//! An instance is in one of two places: `instances` while it starts or runs, `stopping` from
//! the moment it is asked to stop until its task says it has. Nothing of an agent starts, and
//! a migrating agent is not handed over, while an instance of it is stopping: at most one
//! instance per agent on a node, and migration hands over a stopped agent.
//!
//! Fencing: nothing starts without a valid lease (`node::lease`) and a log applied up to the
//! lease's read index; when the lease runs out every local agent is dropped at once, an agent
//! task refuses messages past it, and a graceful stop is cut at the lease's end (and not
//! before: it follows renewals). Every local start and stop goes into the node's journal
//! (`agent::journal`), timed when the agent truly stopped being able to act.

mod calls;
mod reports;
mod supervise;
mod task;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::agent::journal::Journal;
use crate::agent::mailbox::Mailbox;
use crate::agent::{LogSink, StartContext};
use crate::names::cut;
use crate::node::Node;
use crate::registry::{AgentReport, AgentStatus, FinishAgent, HandoffItem};
use crate::supervision::{ExitReason, RestartType};
use plan::{AsLocal, Desired, HostAction, LeaseView, Local, Scheduled};
use reports::{HostWrite, Pending};
use task::{AgentMailbox, End, Exit, Handover, Parked, Run, StopRequest, TaskEvent, Who};
use warden_core::host_plan as plan;

use crate::limits::{
    AGENT_LOG_QUEUE, AGENT_MAILBOX, HOST_WRITE_QUEUE, RECONCILE_CHUNK, RECONCILE_EVERY_MS,
    RECONCILE_GAP_FACTOR, RECONCILE_GAP_MAX_MS, RECONCILE_GAP_MIN_MS, START_RETRY_MS,
};

/// A local instance that starts or runs.
struct Instance {
    epoch: u64,
    generation: u64,
    /// The lease term it started in (`node::lease`): it may run only while that term lasts.
    lease_term: u64,
    restart_requested: u64,
    /// Messages, stop requests that jump their queue, the task that runs the agent or, while
    /// it is idle, the agent itself.
    mailbox: Arc<AgentMailbox>,
    /// At most `limits::MAX_SHUTDOWN_MS`, which fits.
    shutdown_ms: u32,
    /// Whether its start is a restart (reported once the start succeeds).
    restarted: bool,
    /// Its kind's position among the node's kinds (`Kinds::index_of`), for metrics.
    kind: u16,
}

impl AsLocal for Instance {
    fn local(&self) -> Local {
        Local {
            epoch: self.epoch,
            lease_term: self.lease_term,
            restart_requested: self.restart_requested,
        }
    }
}

/// A local instance asked to stop, until its task says it has (or its time is up).
struct Stopping {
    epoch: u64,
    generation: u64,
    lease_term: u64,
    mailbox: Arc<AgentMailbox>,
    reason: &'static str,
    /// Past this the task is aborted and the agent dropped (`limits::AGENT_STOP_GRACE_MS`
    /// after its `shutdown_ms`): a kind whose stop ignores its timeout cannot hold it.
    kill_at: Instant,
    then: Then,
}

/// What follows a stop.
enum Then {
    Nothing,
    /// Hand the agent, at this epoch, to its migration target with what it handed over.
    HandOff {
        id: Uuid,
        epoch: u64,
    },
    /// Stop the next agent of a supervisor's turn.
    Next(Box<Turn>),
}

/// Agents that stop one after the other (OTP stops siblings last started first, each once the
/// one before has stopped), then the starts the supervisor's plan asked for.
struct Turn {
    rest: VecDeque<Uuid>,
    reason: &'static str,
    /// Children to start (planner ids) once all have stopped, with their delays.
    starts: Vec<(String, u64)>,
}

/// How far ahead a start held by a `Turn` is scheduled: it is never due before the turn
/// replaces it with the time its plan asked for.
const HOLD_SECS: u64 = 24 * 3600;

/// A stop to begin: the agent, why, whether to checkpoint it first, and what follows.
type NextStop = (Uuid, &'static str, bool, Then);

/// What woke the host loop: the closed set of things it reacts to.
enum Wake {
    /// The node is stopping.
    Shutdown,
    /// Raft applied something, a lease was granted, or the periodic tick: reconcile soon.
    Changed,
    /// A lease was granted: a grant after a lapse starts a new term, so fence first.
    Granted,
    /// The lease may have run out.
    LeaseEnd,
    Task(TaskEvent),
    Call(async_nats::Message),
    Query(HostQuery),
    Log(Uuid, String),
    StartsDue,
    StopsOverdue,
    Reconcile,
    /// A helper task ended.
    Helper,
}

/// A question about this node's instances (`node::figures`), answered from the host's loop
/// at once: plain figures, never the agents themselves.
pub enum HostQuery {
    /// Agent `id`'s instance, if one runs here.
    One(Uuid, tokio::sync::oneshot::Sender<Option<Figures>>),
    /// Up to `RECONCILE_CHUNK` instances with ids after the given one, in id order: a walk
    /// over every instance takes one such turn per chunk.
    After(
        Option<Uuid>,
        tokio::sync::oneshot::Sender<Vec<(Uuid, Figures)>>,
    ),
}

/// An instance's figures since it started on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub calls: u64,
    pub errors: u64,
    pub busy_us: u64,
    /// Messages waiting in its mailbox.
    pub depth: usize,
    /// Its OS process group (`exec`), 0 for none.
    pub pid: u32,
    /// The epoch it runs at.
    pub epoch: u64,
}

impl Instance {
    fn figures(&self) -> Figures {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.mailbox.stats;
        // Errors first: a call counts in `calls` before `errors`, so errors never exceed calls.
        let errors = s.errors.load(Relaxed);
        Figures {
            errors,
            calls: s.calls.load(Relaxed).max(errors),
            busy_us: s.busy_us.load(Relaxed),
            depth: self.mailbox.depth(),
            pid: s.pid.load(Relaxed),
            epoch: self.epoch,
        }
    }
}

pub(crate) struct Host {
    node: Arc<Node>,
    me: u64,
    instances: BTreeMap<Uuid, Instance>,
    stopping: BTreeMap<Uuid, Stopping>,
    /// `Stopping::kill_at` of every stopping instance, soonest first.
    stop_deadlines: BTreeSet<(Instant, Uuid)>,
    /// Instances waiting in a `Turn` to be asked to stop: they run (and answer calls) until
    /// their turn, and a reconcile meanwhile does not stop them out of order.
    queued: BTreeSet<Uuid>,
    /// Starts waiting for their backoff delay (or for an earlier instance to stop).
    scheduled: BTreeMap<Uuid, Scheduled>,
    /// Agents that ended and must not run again (at this epoch and restart request).
    ended: BTreeMap<Uuid, (u64, u64)>,
    /// Agents that started here at this epoch while the registry did not yet record them as
    /// ever running (their `running` report not yet applied): a failed start of theirs is no
    /// first start. Dropped once the registry shows them running or they move; so it holds
    /// only agents whose first report is in flight.
    ran_here: BTreeMap<Uuid, u64>,
    /// Restart history (ms since the host started) of each supervisor.
    histories: BTreeMap<String, VecDeque<i64>>,
    /// Unbounded: each start sends at most two events (`TaskEvent`), and an agent task never
    /// waits to send.
    events: mpsc::UnboundedSender<TaskEvent>,
    pending: Arc<Pending>,
    /// Finishes and forgets, in the order they happen (`reports::write_loop`).
    forget: mpsc::Sender<HostWrite>,
    handoffs: mpsc::Sender<HandoffItem>,
    /// Agents handed over (or being handed over) at this epoch; not started again here.
    handed_off: BTreeMap<Uuid, u64>,
    journal: Journal,
    logs: mpsc::Sender<(Uuid, String)>,
    log_seq: BTreeMap<Uuid, u64>,
    /// Counts local starts; see `Exit::generation`.
    generation: u64,
    tasks: JoinSet<()>,
    started: Instant,
    rng: StdRng,
    /// The reconcile under way, if one has chunks left.
    pass: Option<Pass>,
}

/// A reconcile under way: it goes over the agents placed here `RECONCILE_CHUNK` ids at a
/// time, one chunk per turn of the host's loop.
#[derive(Default)]
struct Pass {
    /// The last id of the chunk before; none before the first.
    after: Option<Uuid>,
    /// Instances to stop because their agent is gone from here, with their generation: they
    /// stop in one turn once the pass is over, last started first.
    removed: Vec<(u64, Uuid)>,
    /// Time spent on this pass so far.
    spent: Duration,
    /// What the instances looked like as the pass went over them, for the metrics.
    seen: crate::metrics::HostPass,
}

/// Runs the host until `stopped` resolves, then stops every local agent, last started first.
pub async fn run(
    node: Arc<Node>,
    mut queries: mpsc::Receiver<HostQuery>,
    stopped: impl Future<Output = ()>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (logs_tx, mut logs) = mpsc::channel(AGENT_LOG_QUEUE);
    let pending = Arc::new(Pending::default());
    let (forget_tx, forget_rx) = mpsc::channel(HOST_WRITE_QUEUE);
    let (handoff_tx, handoff_rx) = mpsc::channel(HOST_WRITE_QUEUE);
    let mut calls = match node.client.subscribe(node.subjects.agent_all()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to agent calls; no agents run here");
            return;
        }
    };
    let writer = tokio::spawn(reports::write_loop(
        node.clone(),
        pending.clone(),
        forget_rx,
        handoff_rx,
    ));
    let mut host = Host {
        me: node.cfg.id,
        node: node.clone(),
        instances: BTreeMap::new(),
        stopping: BTreeMap::new(),
        stop_deadlines: BTreeSet::new(),
        queued: BTreeSet::new(),
        scheduled: BTreeMap::new(),
        ended: BTreeMap::new(),
        ran_here: BTreeMap::new(),
        histories: BTreeMap::new(),
        events: events_tx,
        pending,
        forget: forget_tx,
        handoffs: handoff_tx,
        handed_off: BTreeMap::new(),
        journal: Journal::open(&node.cfg.data_dir, node.cfg.id),
        logs: logs_tx,
        log_seq: BTreeMap::new(),
        generation: 0,
        tasks: JoinSet::new(),
        started: Instant::now(),
        rng: StdRng::from_entropy(),
        pass: None,
    };
    let mut metrics = node.raft.metrics();
    let seen = |m: &crate::raft::typ::RaftMetrics| {
        (
            m.last_applied.map(|l| l.index),
            m.current_term,
            m.current_leader,
        )
    };
    let mut last_seen = seen(&metrics.borrow());
    let mut grants = node.lease.grants();
    let mut tick = tokio::time::interval(Duration::from_millis(RECONCILE_EVERY_MS));
    let mut next_reconcile = Instant::now();
    let mut dirty = true;
    tokio::pin!(stopped);
    loop {
        let next_start = host.next_start();
        let next_kill = host.stop_deadlines.first().map(|(t, _)| *t);
        let gap = tokio::time::sleep_until(next_reconcile.into());
        // The moment local agents must be gone, if any run or stop.
        let fence_at = if host.instances.is_empty() && host.stopping.is_empty() {
            None
        } else {
            Some(node.lease.until().unwrap_or_else(Instant::now))
        };
        let wake = tokio::select! {
            _ = &mut stopped => Wake::Shutdown,
            _ = tick.tick() => Wake::Changed,
            changed = metrics.changed() => match changed {
                Ok(()) => {
                    // Only what the registry or the leadership did matters here; a leader's
                    // metrics change with every heartbeat acknowledged.
                    let now = seen(&metrics.borrow());
                    if std::mem::replace(&mut last_seen, now) == now {
                        continue;
                    }
                    Wake::Changed
                }
                Err(_) => Wake::Shutdown,
            },
            Some(ev) = events.recv() => Wake::Task(ev),
            Ok(()) = grants.changed() => Wake::Granted,
            _ = sleep_until_opt(fence_at) => Wake::LeaseEnd,
            Some(msg) = calls.next() => Wake::Call(msg),
            Some(q) = queries.recv() => Wake::Query(q),
            Some((id, line)) = logs.recv() => Wake::Log(id, line),
            _ = sleep_until_opt(next_start) => Wake::StartsDue,
            _ = sleep_until_opt(next_kill) => Wake::StopsOverdue,
            Some(_) = host.tasks.join_next(), if !host.tasks.is_empty() => Wake::Helper,
            _ = gap, if dirty || host.pass.is_some() => Wake::Reconcile,
        };
        match wake {
            Wake::Shutdown => break,
            Wake::Changed => dirty = true,
            Wake::Granted => {
                host.fence_if_expired().await;
                dirty = true;
            }
            Wake::LeaseEnd => host.fence_if_expired().await,
            Wake::Task(ev) => {
                if host.on_task_event(ev).await {
                    // A stop ended: what waited for it may go now.
                    dirty = true;
                }
            }
            Wake::Call(msg) => host.route(msg).await,
            Wake::Query(q) => host.answer(q),
            Wake::Log(id, line) => host.publish_log(id, line).await,
            Wake::StartsDue => host.start_due(),
            Wake::StopsOverdue => host.kill_overdue().await,
            Wake::Helper => {}
            Wake::Reconcile => {
                if host.pass.is_none() {
                    // A change from now on needs another pass.
                    dirty = false;
                }
                // One chunk per turn; the next goes at once, after what else is ready.
                next_reconcile = match host.reconcile_chunk().await {
                    None => Instant::now(),
                    Some(spent) => {
                        tracing::debug!(
                            ms = spent.as_millis() as u64,
                            instances = host.instances.len(),
                            "reconciled"
                        );
                        let gap = (spent * RECONCILE_GAP_FACTOR).clamp(
                            Duration::from_millis(RECONCILE_GAP_MIN_MS),
                            Duration::from_millis(RECONCILE_GAP_MAX_MS),
                        );
                        Instant::now() + gap
                    }
                };
            }
        }
    }
    host.shutdown(&mut events).await;
    drop(host);
    let _ = writer.await; // ends once the host's sender is gone
}

/// Keeps the entries of `map` with an id `within` for which `keep` holds, and every other.
fn retain_within<V>(
    map: &mut BTreeMap<Uuid, V>,
    within: (Bound<Uuid>, Bound<Uuid>),
    keep: impl Fn(&Uuid, &V) -> bool,
) {
    let gone: Vec<Uuid> = map
        .range(within)
        .filter(|(id, v)| !keep(id, v))
        .map(|(id, _)| *id)
        .collect();
    for id in gone {
        map.remove(&id);
    }
}

/// A host that ends without its orderly shutdown (its task aborted: a stop past its budget, a
/// fatal error) kills every agent it still has, so that none runs on once the node no longer
/// watches it: each agent task is aborted, which drops the agent (an exec agent's shim then
/// kills its process tree).
impl Drop for Host {
    fn drop(&mut self) {
        for inst in self.instances.values() {
            inst.mailbox.kill();
        }
        for s in self.stopping.values() {
            s.mailbox.kill();
        }
        self.tasks.abort_all();
    }
}

pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

impl Host {
    fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// Whether agents may start here now: a valid lease, and the log applied up to its read
    /// index so that this node sees every move decided before the grant.
    fn may_start(&self) -> bool {
        self.node
            .lease
            .start_term(self.node.applied_index())
            .is_some()
    }

    fn lease_view(&self) -> LeaseView {
        LeaseView {
            term: self.node.lease.term(),
            valid: self.node.lease.valid(),
            may_start: self.may_start(),
        }
    }

    /// Publishes how many agents run and how many are stopping (`health`, heartbeats).
    fn count_running(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.node
            .running
            .store(self.instances.len() as u32, Relaxed);
        self.node
            .stopping
            .store(self.stopping.len() as u32, Relaxed);
    }

    /// When the host must next look at its scheduled starts: the soonest that is not waiting
    /// for a stop, or a short retry while the node may not start agents.
    fn next_start(&self) -> Option<Instant> {
        let waiting = self
            .scheduled
            .iter()
            .filter(|(id, _)| !self.stopping.contains_key(id) && !self.queued.contains(id))
            .map(|(_, s)| s.at)
            .min()?;
        if self.may_start() {
            Some(waiting)
        } else {
            Some(waiting.max(Instant::now() + Duration::from_millis(START_RETRY_MS)))
        }
    }

    /// Drops every local instance, running or stopping, whose lease term is over: the lease
    /// ran out, or lapsed and was granted again (the registry may have moved them
    /// meanwhile). They may be placed elsewhere once the leader's `down_after_ms` has passed,
    /// which is later by design (`node::lease`).
    async fn fence_if_expired(&mut self) {
        let over = plan::fences(&self.instances, self.lease_view());
        if !over.is_empty() {
            tracing::warn!(
                agents = over.len(),
                "lost the lease: stopping every agent started under it"
            );
        }
        for id in over {
            self.fence(id);
        }
        let lease = &self.node.lease;
        let stopping_over: Vec<Uuid> = self
            .stopping
            .iter()
            .filter(|(_, s)| !lease.valid_in(s.lease_term))
            .map(|(id, _)| *id)
            .collect();
        for id in stopping_over {
            if let Some(s) = self.take_stopping(id) {
                self.node.metrics.fenced();
                s.mailbox.kill();
                let until = task::wall_time(self.node.lease.end_of(s.lease_term));
                self.journal.stop(id, s.epoch, "lease lost", until);
                self.after_stop_then(s.then, Handover::default()).await;
            }
        }
    }

    /// Drops instance `id` at once because its lease term is over.
    fn fence(&mut self, id: Uuid) {
        let Some(inst) = self.instances.remove(&id) else {
            return;
        };
        self.node.metrics.fenced();
        // Drops the agent at once (an exec process is killed on drop).
        inst.mailbox.kill();
        let until = task::wall_time(self.node.lease.end_of(inst.lease_term));
        self.journal.stop(id, inst.epoch, "lease lost", until);
        self.count_running();
    }

    /// Brings the next chunk of local instances in line with the registry
    /// (`plan::reconcile`): the agents placed here with the next `RECONCILE_CHUNK` ids, and
    /// the instances in the same range of ids. Answers the time the whole pass took once it
    /// is over, none while chunks are left.
    async fn reconcile_chunk(&mut self) -> Option<Duration> {
        let began = Instant::now();
        let mut pass = self.pass.take().unwrap_or_default();
        let lower = pass.after.map_or(Bound::Unbounded, Bound::Excluded);
        let desired: BTreeMap<Uuid, Desired> = {
            let st = self.node.state_read();
            st.registry
                .agents_on_within(self.me, (lower, Bound::Unbounded))
                .take(RECONCILE_CHUNK)
                .map(|a| {
                    let d = Desired {
                        id: a.id,
                        epoch: a.epoch,
                        status: a.status,
                        restart_requested: a.restart_requested,
                    };
                    (a.id, d)
                })
                .collect()
        };
        // A full chunk ends at its last id; the last chunk runs to the end of the ids.
        let last = (desired.len() == RECONCILE_CHUNK)
            .then(|| desired.keys().next_back().copied())
            .flatten();
        let within = (lower, last.map_or(Bound::Unbounded, Bound::Included));
        retain_within(&mut self.handed_off, within, |id, epoch| {
            desired.get(id).is_some_and(|d| d.epoch == *epoch)
        });
        retain_within(&mut self.scheduled, within, |id, _| {
            desired.contains_key(id)
        });
        retain_within(&mut self.log_seq, within, |id, _| desired.contains_key(id));
        retain_within(&mut self.ran_here, within, |id, epoch| {
            desired
                .get(id)
                .is_some_and(|d| d.epoch == *epoch && d.status != AgentStatus::Running)
        });
        retain_within(&mut self.ended, within, |id, (epoch, req)| {
            desired
                .get(id)
                .is_some_and(|d| d.epoch == *epoch && d.restart_requested == *req)
        });
        let actions = plan::reconcile(&plan::View {
            within,
            desired: &desired,
            instances: &self.instances,
            stopping: &self.stopping,
            scheduled: &self.scheduled,
            ended: &self.ended,
            handed_off: &self.handed_off,
            lease: self.lease_view(),
        });
        for action in actions {
            match action {
                HostAction::Fence(id) => self.fence(id),
                HostAction::Stop {
                    id,
                    why: plan::StopWhy::MovedOrRemoved,
                } => {
                    // One already waiting in a turn stops there.
                    let waiting = self.queued.contains(&id);
                    if let Some(i) = self.instances.get(&id).filter(|_| !waiting) {
                        pass.removed.push((i.generation, id));
                    }
                }
                HostAction::Stop { id, why } => {
                    // Started again once stopped (`plan::due`).
                    let at = Instant::now();
                    self.scheduled.insert(id, Scheduled { at, restart: true });
                    self.stop_then((id, why.as_str(), false, Then::Nothing))
                        .await;
                }
                HostAction::HandOff { id, epoch } => self.hand_off(id, epoch).await,
                HostAction::Start { id, restarted } => self.start(id, restarted),
            }
        }
        if self.node.metrics.enabled() {
            for inst in self.instances.range(within).map(|(_, i)| i) {
                let f = inst.figures();
                pass.seen.saw(f.depth, f.pid);
            }
        }
        if let Some(id) = last {
            pass.spent += began.elapsed();
            pass.after = Some(id);
            self.pass = Some(pass);
            return None;
        }
        self.node
            .metrics
            .host_passed(std::mem::take(&mut pass.seen));
        {
            let st = self.node.state_read();
            self.histories
                .retain(|sup, _| st.registry.supervisor(sup).is_some());
        }
        // Agents removed or moved away stop one after the other, last started here first (a
        // stopped supervisor's subtree stops as OTP's does); local starts count in
        // `generation`, so it gives the order. An instance started since its chunk was
        // planned is another one, and stays.
        let mut removed: Vec<(u64, Uuid)> = pass
            .removed
            .into_iter()
            .filter(|(generation, id)| {
                let same = self.instances.get(id).map(|i| i.generation) == Some(*generation);
                same && !self.queued.contains(id)
            })
            .collect();
        if !removed.is_empty() {
            removed.sort_unstable_by(|a, b| b.cmp(a));
            let ids = removed.into_iter().map(|(_, id)| id).collect();
            let why = plan::StopWhy::MovedOrRemoved.as_str();
            self.stop_in_turn(ids, why, Vec::new()).await;
        }
        Some(pass.spent + began.elapsed())
    }

    /// Starts what is scheduled and due (`plan::due`).
    fn start_due(&mut self) {
        let busy = |id: &Uuid| self.stopping.contains_key(id) || self.queued.contains(id);
        let due = plan::due(
            &self.scheduled,
            &self.instances,
            busy,
            self.lease_view(),
            Instant::now(),
        );
        for id in due.drop {
            self.scheduled.remove(&id);
        }
        for (id, restarted) in due.start {
            self.scheduled.remove(&id);
            self.start(id, restarted);
        }
    }

    /// Starts agent `id` from its record and last checkpoint: the kind's `start` runs in the
    /// agent's own task, and the agent counts as running once it has succeeded.
    fn start(&mut self, id: Uuid, restarted: bool) {
        // The term and the check that this node may start agents, read together: the lease
        // may have lapsed and been granted again since the plan was made.
        let Some(lease_term) = self.node.lease.start_term(self.node.applied_index()) else {
            return;
        };
        let found = {
            let st = self.node.state_read();
            st.registry
                .agent(&id.to_string())
                .filter(|a| a.node == Some(self.me) && a.status != AgentStatus::Migrating)
                .map(|a| {
                    let c = st.registry.checkpoint(id);
                    let state = c.map(|c| c.state.clone());
                    let calls = c.map(|c| c.calls.clone()).unwrap_or_default();
                    (a.clone(), state, calls)
                })
        };
        let Some((a, state, calls)) = found else {
            return;
        };
        let Some(kind) = self.node.kinds.get(&a.kind) else {
            let why = format!("kind {:?} is not known on node {}", a.kind, self.me);
            if !restarted && self.never_ran(a.id, a.epoch) {
                self.report_failed_first_start(&a.id, a.epoch, why);
            } else {
                self.report(&a.id, a.epoch, AgentStatus::Failed, false, Some(why));
            }
            self.ended.insert(a.id, (a.epoch, a.restart_requested));
            return;
        };
        let ctx = StartContext {
            id: a.id,
            name: a.name.clone(),
            config: a.config.clone(),
            state,
            log: LogSink::new(self.logs.clone(), a.id),
        };
        // Journaled before the kind runs anything: the interval covers all it might do.
        self.journal.start(a.id, a.epoch);
        self.generation += 1;
        let inst = Instance {
            epoch: a.epoch,
            generation: self.generation,
            lease_term,
            restart_requested: a.restart_requested,
            mailbox: Arc::new(Mailbox::new(AGENT_MAILBOX)),
            shutdown_ms: a.shutdown_ms.min(crate::limits::MAX_SHUTDOWN_MS) as u32,
            restarted,
            kind: self.node.kinds.index_of(&a.kind),
        };
        let run = self.run_of(a.id, &inst);
        // The kind's check of the config, then its start: a refusal is a failed start.
        let start = match kind.validate(&ctx.config) {
            Ok(()) => kind.start(ctx),
            Err(why) => Box::pin(async move { Err(why) }),
        };
        let handle = tokio::spawn(task::start_task(run, start, calls, inst.mailbox.clone()));
        inst.mailbox.running(handle.abort_handle());
        self.instances.insert(a.id, inst);
        self.count_running();
    }

    /// Answers a question about the instances (whoever asked may have gone: fine).
    fn answer(&self, q: HostQuery) {
        match q {
            HostQuery::One(id, reply) => {
                let _ = reply.send(self.instances.get(&id).map(Instance::figures));
            }
            HostQuery::After(after, reply) => {
                let from = match after {
                    Some(a) => std::ops::Bound::Excluded(a),
                    None => std::ops::Bound::Unbounded,
                };
                let chunk = self
                    .instances
                    .range((from, std::ops::Bound::Unbounded))
                    .take(RECONCILE_CHUNK)
                    .map(|(id, inst)| (*id, inst.figures()))
                    .collect();
                let _ = reply.send(chunk);
            }
        }
    }

    /// What an agent task of instance `inst` needs to know.
    fn run_of(&self, id: Uuid, inst: &Instance) -> Run {
        let mut run = self.run_for(id, inst.epoch, inst.generation, inst.lease_term);
        run.who.kind = inst.kind;
        run
    }

    /// What a task needs to know; its kind is unknown (`u16::MAX`: no call metrics).
    fn run_for(&self, id: Uuid, epoch: u64, generation: u64, lease_term: u64) -> Run {
        Run {
            who: Who {
                node: self.node.clone(),
                me: self.me,
                id,
                epoch,
                kind: u16::MAX,
            },
            generation,
            lease_term,
            events: self.events.clone(),
            ended: None,
        }
    }

    /// Runs a task for agent `id`, parked in its mailbox, that a message or stop woke. Not in
    /// `tasks`: a JoinSet entry per agent would cost memory for nothing; the mailbox holds the
    /// abort handle while the task runs.
    fn wake(&self, id: Uuid, parked: Parked) {
        let (run, mailbox) = match (self.instances.get(&id), self.stopping.get(&id)) {
            (Some(inst), _) => (self.run_of(id, inst), inst.mailbox.clone()),
            (None, Some(s)) => {
                let run = self.run_for(id, s.epoch, s.generation, s.lease_term);
                (run, s.mailbox.clone())
            }
            (None, None) => return, // dropping the agent ends it
        };
        let task = tokio::spawn(task::agent_task(run, parked, mailbox.clone()));
        mailbox.running(task.abort_handle());
    }

    /// Begins a stop and carries on with what follows every stop that ends at once (an
    /// instance past its lease is dropped, not asked): a loop, so a long turn of siblings
    /// past their lease does not recurse.
    async fn stop_then(&mut self, first: NextStop) {
        let mut next = Some(first);
        while let Some(stop) = next.take() {
            if let Some((then, handover)) = self.begin_stop(stop) {
                next = self.after_stop(then, handover).await;
            }
        }
    }

    /// Asks instance `id` to stop, moving it from `instances` to `stopping`; its task says
    /// when it has. Returns what follows at once when there is nothing to wait for.
    fn begin_stop(&mut self, (id, reason, checkpoint, then): NextStop) -> Option<(Then, Handover)> {
        let Some(inst) = self.instances.remove(&id) else {
            return Some((then, Handover::default()));
        };
        self.count_running();
        if !self.node.lease.valid_in(inst.lease_term) {
            // Past its lease the agent may not run even to stop (a parked one would be woken
            // for it): it is dropped, as a fence does, and hands nothing over.
            self.node.metrics.fenced();
            inst.mailbox.kill();
            let until = task::wall_time(self.node.lease.end_of(inst.lease_term));
            self.journal.stop(id, inst.epoch, "lease lost", until);
            return Some((then, Handover::default()));
        }
        let grace =
            Duration::from_millis(u64::from(inst.shutdown_ms) + crate::limits::AGENT_STOP_GRACE_MS);
        let kill_at = Instant::now() + grace;
        let req = StopRequest {
            timeout_ms: u64::from(inst.shutdown_ms),
            checkpoint,
        };
        // Refused only when the mailbox is closed: the task is ending by itself, and its end
        // arrives as for any stop.
        let woken = inst.mailbox.stop(req).ok().flatten();
        self.stopping.insert(
            id,
            Stopping {
                epoch: inst.epoch,
                generation: inst.generation,
                lease_term: inst.lease_term,
                mailbox: inst.mailbox,
                reason,
                kill_at,
                then,
            },
        );
        self.stop_deadlines.insert((kill_at, id));
        self.count_running();
        if let Some(parked) = woken {
            // An idle agent stops in a task of its own, like a busy one.
            self.wake(id, parked);
        }
        None
    }

    fn take_stopping(&mut self, id: Uuid) -> Option<Stopping> {
        let s = self.stopping.remove(&id)?;
        self.stop_deadlines.remove(&(s.kill_at, id));
        self.count_running();
        Some(s)
    }

    /// Carries on after a stop: a hand-off, the next sibling of a turn (returned, to begin),
    /// or a turn's starts once all its agents have stopped.
    async fn after_stop(&mut self, then: Then, handover: Handover) -> Option<NextStop> {
        match then {
            Then::Nothing => None,
            Then::HandOff { id, epoch } => {
                self.send_handoff(id, epoch, handover).await;
                None
            }
            Then::Next(mut turn) => {
                while let Some(id) = turn.rest.pop_front() {
                    self.queued.remove(&id);
                    if self.instances.contains_key(&id) {
                        let reason = turn.reason;
                        return Some((id, reason, false, Then::Next(turn)));
                    }
                }
                for (child, delay_ms) in std::mem::take(&mut turn.starts) {
                    self.schedule_child(&child, delay_ms);
                }
                None
            }
        }
    }

    async fn after_stop_then(&mut self, then: Then, handover: Handover) {
        if let Some(next) = self.after_stop(then, handover).await {
            self.stop_then(next).await;
        }
    }

    /// Stops `ids` one after the other (each once the one before has stopped), then schedules
    /// `starts`.
    async fn stop_in_turn(
        &mut self,
        ids: Vec<Uuid>,
        reason: &'static str,
        starts: Vec<(String, u64)>,
    ) {
        // One already waiting in another turn keeps its place there.
        let ids: VecDeque<Uuid> = ids
            .into_iter()
            .filter(|id| self.queued.insert(*id))
            .collect();
        if !ids.is_empty() {
            // What the turn will start is held until it has stopped everything: neither a
            // reconcile nor an earlier schedule starts it meanwhile (OTP stops all, then
            // starts; and a restart keeps its backoff and counts against the intensity).
            let held = Scheduled {
                at: Instant::now() + Duration::from_secs(HOLD_SECS),
                restart: true,
            };
            for (child, _) in &starts {
                for id in self.local_agents_of(child) {
                    self.scheduled.insert(id, held);
                }
            }
        }
        let turn = Turn {
            rest: ids,
            reason,
            starts,
        };
        self.after_stop_then(Then::Next(Box::new(turn)), Handover::default())
            .await;
    }

    /// Checkpoints and stops a migrating agent, then hands it over to its target. Waits (the
    /// planner asks again) while an earlier instance of it is still stopping.
    async fn hand_off(&mut self, id: Uuid, epoch: u64) {
        if self.stopping.contains_key(&id) {
            return;
        }
        self.scheduled.remove(&id);
        self.handed_off.insert(id, epoch);
        let then = Then::HandOff { id, epoch };
        self.stop_then((id, "migrating", true, then)).await;
    }

    async fn send_handoff(&mut self, id: Uuid, epoch: u64, handover: Handover) {
        // A state over the checkpoint limit could never be stored: the agent moves with its
        // last checkpoint instead, rather than stay stuck.
        let state = handover
            .state
            .filter(|s| s.len() <= crate::limits::MAX_CHECKPOINT_BYTES);
        let item = HandoffItem {
            agent: id,
            node: self.me,
            epoch,
            state,
            calls: handover.calls,
        };
        // The writer outlives the host loop, so the send succeeds.
        let _ = self.handoffs.send(item).await;
    }

    /// Acts on what an agent task says. Returns whether a stop ended (what waited for it may
    /// go now).
    async fn on_task_event(&mut self, ev: TaskEvent) -> bool {
        match ev {
            TaskEvent::Started { id, generation } => {
                let started = self
                    .instances
                    .get(&id)
                    .filter(|i| i.generation == generation)
                    .map(|i| (i.epoch, i.restarted));
                if let Some((epoch, restarted)) = started {
                    self.report(&id, epoch, AgentStatus::Running, restarted, None);
                    let recorded = {
                        let st = self.node.state_read();
                        let a = st.registry.agent(&id.to_string());
                        a.is_some_and(|a| a.started)
                    };
                    if !recorded {
                        self.ran_here.insert(id, epoch);
                    }
                }
                false
            }
            TaskEvent::Ended(mut exit) => {
                let answer = match &mut exit.end {
                    End::Exited(_, answer, _) => answer.take(),
                    _ => None,
                };
                let stopping = self
                    .stopping
                    .get(&exit.id)
                    .is_some_and(|s| s.generation == exit.generation);
                if stopping {
                    self.finish_stop(exit).await;
                } else {
                    self.on_exit(exit).await;
                    // Restarts without a delay happen now: a timer would add up to a
                    // millisecond of its resolution to every restart.
                    self.start_due();
                }
                self.journal.flush();
                // The call that crashed the agent is answered only now: a caller that retries
                // at once finds the agent restarted, and the restart does not compete for the
                // CPU with the traffic its answer sets off.
                if let Some(answer) = answer {
                    answer.send(&self.node).await;
                }
                if stopping {
                    self.start_due();
                }
                stopping
            }
        }
    }

    /// An instance asked to stop has stopped: journal it, timed when it could no longer act,
    /// and carry on with what follows.
    async fn finish_stop(&mut self, exit: Exit) {
        let Some(s) = self.take_stopping(exit.id) else {
            return;
        };
        let (reason, until, handover) = match exit.end {
            End::Stopped {
                handover,
                lease_end,
            } => {
                if lease_end.is_some() {
                    // Its stop was cut where the lease ran out: dropped as a fence does.
                    self.node.metrics.fenced();
                }
                (s.reason, lease_end, handover)
            }
            End::Fenced { lease_end } => {
                self.node.metrics.fenced();
                ("lease lost", lease_end, Handover::default())
            }
            End::Exited(ExitReason::Crash(_), ..) => ("crashed", None, Handover::default()),
            End::Exited(..) => ("exited", None, Handover::default()),
            End::FailedStart(_) => ("failed to start", None, Handover::default()),
        };
        self.journal
            .stop_at(exit.id, s.epoch, reason, exit.at, until);
        self.after_stop_then(s.then, handover).await;
    }

    /// Kills what outlasted its stop's time.
    async fn kill_overdue(&mut self) {
        let now = Instant::now();
        while self
            .stop_deadlines
            .first()
            .is_some_and(|(at, _)| *at <= now)
        {
            let Some((_, id)) = self.stop_deadlines.pop_first() else {
                break;
            };
            let Some(s) = self.take_stopping(id) else {
                continue;
            };
            tracing::warn!(agent = %id, "the agent did not stop within its shutdown_ms; killed");
            // Aborting its task drops the agent (an exec process is killed on drop).
            s.mailbox.kill();
            self.journal
                .stop(id, s.epoch, "killed after shutdown_ms", None);
            self.after_stop_then(s.then, Handover::default()).await;
        }
    }

    /// A running instance ended without being asked to stop.
    async fn on_exit(&mut self, exit: Exit) {
        let current = self
            .instances
            .get(&exit.id)
            .is_some_and(|i| i.generation == exit.generation);
        if !current {
            return;
        }
        let Some(inst) = self.instances.remove(&exit.id) else {
            return;
        };
        self.count_running();
        let epoch = inst.epoch;
        let mut result = None;
        let reason = match exit.end {
            End::Fenced { lease_end } => {
                self.node.metrics.fenced();
                // Started again by `reconcile` once the lease is back, like after a fence here.
                self.journal
                    .stop_at(exit.id, epoch, "lease lost", exit.at, lease_end);
                return;
            }
            End::FailedStart(why) => {
                tracing::warn!(agent = %exit.id, error = %why, "agent failed to start");
                self.journal
                    .stop_at(exit.id, epoch, "failed to start", exit.at, None);
                // Its first start (no earlier run here at this epoch, and none recorded
                // anywhere): OTP's start_child. The registry removes it; nothing restarts,
                // and its supervisor is not charged.
                let never_ran = !inst.restarted && self.never_ran(exit.id, epoch);
                if never_ran {
                    let restart_requested = inst.restart_requested;
                    self.report_failed_first_start(&exit.id, epoch, why);
                    self.ended.insert(exit.id, (epoch, restart_requested));
                    return;
                }
                ExitReason::Crash(why)
            }
            End::Exited(reason, _, finished) => {
                result = finished.map(|r| *r);
                let why = match &reason {
                    ExitReason::Crash(_) => "crashed",
                    _ => "exited",
                };
                // Written with the restart's start line, or once the host has acted on it.
                self.journal.stop_held(exit.id, epoch, why, exit.at);
                reason
            }
            End::Stopped { .. } => {
                self.journal
                    .stop_at(exit.id, epoch, "stopped", exit.at, None);
                return;
            }
        };
        let supervisor = {
            let st = self.node.state_read();
            st.registry
                .agent(&exit.id.to_string())
                .map(|a| (a.supervisor.clone(), a.restart, a.restart_requested))
        };
        let Some((supervisor, restart, restart_requested)) = supervisor else {
            return;
        };
        let (status, error) = match &reason {
            ExitReason::Crash(m) => (AgentStatus::Failed, Some(m.clone())),
            _ => (AgentStatus::Stopped, None),
        };
        let ends_for_good = match restart {
            RestartType::Permanent => false,
            RestartType::Transient => !reason.is_abnormal(),
            RestartType::Temporary => true,
        };
        if ends_for_good {
            self.ended.insert(exit.id, (epoch, restart_requested));
            // Done: recorded with its result (and a temporary agent forgotten) through Raft.
            // Queued before the report of how it ended, and written first: no reader sees it
            // ended without its result.
            self.pending.finish(FinishAgent {
                agent: exit.id,
                node: self.me,
                epoch,
                restart_requested: inst.restart_requested,
                status,
                result,
                error: error
                    .clone()
                    .map(|e| cut(e, crate::limits::MAX_REPORT_ERROR_BYTES)),
                // A temporary agent is forgotten in the same step, fenced like it.
                forget: restart == RestartType::Temporary,
            });
        }
        self.report(&exit.id, epoch, status, false, error);
        self.supervise(&supervisor, format!("a:{}", exit.id), reason)
            .await;
    }

    /// Whether agent `id`, placed here at `epoch`, has never run anywhere as far as this node
    /// knows: the registry records no run and no start here at this epoch is awaiting its
    /// report. The registry checks again when it applies the report.
    fn never_ran(&self, id: Uuid, epoch: u64) -> bool {
        if self.ran_here.get(&id) == Some(&epoch) {
            return false;
        }
        let st = self.node.state_read();
        let a = st.registry.agent(&id.to_string());
        a.is_some_and(|a| !a.started && a.epoch == epoch)
    }

    /// Reports that agent `id`'s first start failed: the registry removes it if it never ran.
    fn report_failed_first_start(&self, id: &Uuid, epoch: u64, error: String) {
        self.pending.add(AgentReport {
            agent: *id,
            node: self.me,
            epoch,
            status: AgentStatus::Failed,
            restarts: 0,
            error: Some(cut(error, crate::limits::MAX_REPORT_ERROR_BYTES)),
            first_start: true,
            ran: false,
        });
    }

    fn report(
        &self,
        id: &Uuid,
        epoch: u64,
        status: AgentStatus,
        restarted: bool,
        error: Option<String>,
    ) {
        let restarts = u32::from(restarted);
        let error = error.map(|e| cut(e, crate::limits::MAX_REPORT_ERROR_BYTES));
        let r = AgentReport {
            agent: *id,
            node: self.me,
            epoch,
            status,
            restarts,
            error,
            first_start: false,
            ran: false,
        };
        self.pending.add(r);
    }

    /// Stops every local agent, last started first, each once the one before has stopped
    /// (OTP's shutdown order), and waits for them: each stop is bounded by its
    /// `shutdown_ms` and `limits::AGENT_STOP_GRACE_MS`.
    async fn shutdown(&mut self, events: &mut mpsc::UnboundedReceiver<TaskEvent>) {
        let mut order: Vec<(u64, Uuid)> = {
            let st = self.node.state_read();
            self.instances
                .keys()
                .map(|id| {
                    let pos = st.registry.agent(&id.to_string()).map_or(0, |a| a.position);
                    (pos, *id)
                })
                .collect()
        };
        order.sort();
        self.scheduled.clear();
        let ids = order.into_iter().rev().map(|(_, id)| id).collect();
        self.stop_in_turn(ids, "node stopping", Vec::new()).await;
        while !self.stopping.is_empty() {
            let next_kill = self.stop_deadlines.first().map(|(t, _)| *t);
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(TaskEvent::Ended(exit)) => {
                        if self.stopping.get(&exit.id).is_some_and(|s| s.generation == exit.generation) {
                            self.finish_stop(exit).await;
                        } else if self
                            .instances
                            .get(&exit.id)
                            .is_some_and(|i| i.generation == exit.generation)
                        {
                            // Ended by itself meanwhile: nothing restarts while stopping.
                            if let Some(inst) = self.instances.remove(&exit.id) {
                                inst.mailbox.kill();
                                let at = exit.at;
                                self.journal.stop_at(exit.id, inst.epoch, "node stopping", at, None);
                            }
                        }
                    }
                    Some(TaskEvent::Started { .. }) => {}
                    None => break,
                },
                _ = sleep_until_opt(next_kill) => self.kill_overdue().await,
            }
        }
        self.journal.flush();
        self.tasks.abort_all();
    }
}

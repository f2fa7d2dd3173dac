//! The agents one node runs.
//!
//! The registry holds the desired state: which agents exist and where they are placed. The
//! host reconciles it with the local instances on a tick and whenever Raft applies something
//! (starting what should run here, stopping what should not), supervises the instances with
//! the planner in `supervision` when they end, answers calls and casts on
//! `warden.<cluster>.agent.<id-or-name>.call|cast`, and reports what it observes through Raft.
//!
//! Each busy agent is one task that owns it and reads a bounded mailbox, so an agent sees one
//! message at a time. An idle agent with no background work is parked in its mailbox and has
//! no task; the message or stop that wakes it comes back here, and the host runs a task for it
//! (`run_task`). A call that meets a full mailbox is answered `unavailable` at once.
//!
//! Fencing: nothing starts without a valid lease (`node::lease`) and a log applied up to the
//! lease's read index; when the lease runs out every local agent is killed at once, and an
//! agent task refuses messages past it. Migration: an agent marked `migrating` here is
//! checkpointed and stopped, then handed over (`handoff`) so its target starts it from that
//! state. Every local start and stop goes into the node's journal (`agent::journal`).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::journal::Journal;
use super::mailbox::{Mailbox, Next, Park, Refused};
use super::{Agent, AgentError, LogSink, StartContext};
use crate::command::CheckpointRequest;
use crate::events::{Event, EVENT_VERSION};
use crate::node::Node;
use crate::protocol::{self, Encoding, Envelope, ErrorCode, WireError};
use crate::registry::{AgentReport, AgentStatus, Child, HandoffItem, RememberedCall, ROOT};
use crate::supervision::{self, Action, ChildState, ExitReason, Policy, RestartType};

/// Messages waiting for one agent; a call beyond this is refused with `unavailable`.
const MAILBOX: usize = 256;
/// Reconcile at least this often even when nothing is applied.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// When applies stream in, a reconcile waits after the previous one for this many times what
/// that one cost, within the bounds below: a node with few agents reacts at once (a migrating
/// agent is back in milliseconds), one with many does not spend all its time reconciling.
const RECONCILE_GAP_FACTOR: u32 = 4;
const RECONCILE_GAP_MIN: Duration = Duration::from_millis(1);
const RECONCILE_GAP_MAX: Duration = Duration::from_millis(50);
/// Bytes of remembered answers an agent carries to its next node.
const HANDED_OVER_CALLS_BYTES: usize = 8 * 1024;
/// Header carrying an agent's epoch on calls (optional) and on their replies.
pub const EPOCH_HEADER: &str = "Warden-Epoch";
/// Header naming one logical call across its retries, so that an agent handles it once.
pub const CALL_ID_HEADER: &str = "Warden-Call-Id";
/// Answers an agent instance remembers by call id: as many as its mailbox holds, so a retry
/// queued behind a full mailbox still finds the first attempt's answer.
const REMEMBERED_CALLS: usize = MAILBOX;

enum Msg {
    Call {
        body: Value,
        reply: String,
        enc: Encoding,
        /// The caller's `Warden-Call-Id`: a retry with the same id gets the first answer.
        call_id: Option<String>,
    },
    Cast {
        body: Value,
    },
}

/// Messages are boxed, so a queue that grew in a burst keeps pointer-sized slots.
type AgentMailbox = Mailbox<Box<Msg>, StopRequest, Parked>;

/// An idle agent that no task runs (`mailbox`), with what its instance remembers.
struct Parked {
    agent: Box<dyn Agent>,
    answered: Answered,
}

struct Exit {
    id: Uuid,
    /// Which local start of the agent ended: a restart keeps the epoch, so an exit of an
    /// earlier run that is still queued must not be taken for one of the current run.
    generation: u64,
    reason: ExitReason,
    /// The instance killed itself because the node's lease ran out: not a crash.
    fenced: bool,
    /// For a fenced exit, when the instance's lease ended.
    lease_end: Option<Instant>,
    /// The answer to the call that crashed the agent, sent once the host has acted on the
    /// crash.
    answer: Option<Box<Answer>>,
}

/// An answer to a call, to be sent later.
struct Answer {
    reply: String,
    enc: Encoding,
    epoch: u64,
    result: Result<Value, WireError>,
}

impl Answer {
    async fn send(self, node: &Node) {
        send_envelope(node, self.reply, self.enc, Some(self.epoch), self.result).await;
    }
}

/// A stop request: the shutdown timeout, whether to take a checkpoint first (a migration), and
/// who to tell once the agent has stopped (with that checkpoint).
struct StopRequest {
    timeout_ms: u64,
    checkpoint: bool,
    done: oneshot::Sender<Handover>,
}

/// What a stopped agent hands over to its next node: its state and its last answers.
#[derive(Default)]
struct Handover {
    state: Option<bytes::Bytes>,
    calls: Vec<RememberedCall>,
}

struct Instance {
    epoch: u64,
    generation: u64,
    /// The lease term it started in (`node::lease`): it may run only while that term lasts.
    lease_term: u64,
    restart_requested: u64,
    /// Messages, stop requests that jump their queue, the task that runs the agent or, while
    /// it is idle, the agent itself.
    mailbox: Arc<AgentMailbox>,
    shutdown_ms: u64,
}

/// Reports waiting for the writer: the latest per agent. Coalescing them instead of queueing
/// one per change bounds this to one entry per local agent, and nothing is ever dropped.
#[derive(Default)]
struct Pending {
    reports: std::sync::Mutex<BTreeMap<Uuid, AgentReport>>,
    notify: tokio::sync::Notify,
}

impl Pending {
    fn add(&self, r: AgentReport) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        match reports.get_mut(&r.agent) {
            Some(old) if old.epoch == r.epoch => {
                old.status = r.status;
                old.restarts = old.restarts.saturating_add(r.restarts);
                if r.error.is_some() {
                    old.error = r.error;
                }
            }
            _ => {
                reports.insert(r.agent, r);
            }
        }
        drop(reports);
        self.notify.notify_one();
    }

    /// Takes up to `max` reports.
    fn take(&self, max: usize) -> Vec<AgentReport> {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        while out.len() < max {
            match reports.pop_first() {
                Some((_, r)) => out.push(r),
                None => break,
            }
        }
        out
    }

    fn len(&self) -> usize {
        self.reports.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Puts back reports that could not be sent, under anything newer.
    fn restore(&self, batch: Vec<AgentReport>) {
        for r in batch {
            let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
            match reports.get_mut(&r.agent) {
                Some(newer) if newer.epoch == r.epoch => {
                    newer.restarts = newer.restarts.saturating_add(r.restarts);
                    if newer.error.is_none() {
                        newer.error = r.error;
                    }
                }
                Some(_) => {}
                None => {
                    reports.insert(r.agent, r);
                }
            }
        }
    }
}

/// How long the writer waits after the first new report before it sends what gathered.
const REPORT_GATHER: Duration = Duration::from_millis(2);
/// The least time between two report writes while fewer than a full batch wait: a crash loop
/// (or any trickle of changes) costs the cluster at most this many writes per second, each
/// fsynced on every voter, instead of one per restart. A lone change is still written after
/// `REPORT_GATHER`; a full batch goes at once, so bulk starts are not slowed.
const REPORT_INTERVAL: Duration = Duration::from_millis(25);
/// Reports (or handoffs) sent in one command: one Raft entry, well below the proposal size
/// limit.
const REPORTS_PER_WRITE: usize = 1_000;
/// What a handoff item costs in MessagePack besides its state and answers: an id, a node, an
/// epoch and field names.
const HANDOFF_ITEM_OVERHEAD_BYTES: usize = 96;

struct Host {
    node: Arc<Node>,
    me: u64,
    instances: BTreeMap<Uuid, Instance>,
    /// Starts waiting for their backoff delay; `true` when it is a restart.
    scheduled: BTreeMap<Uuid, (Instant, bool)>,
    /// Agents that ended and must not run again (at this epoch and restart request).
    parked: BTreeMap<Uuid, (u64, u64)>,
    /// Restart history (ms since the host started) of each supervisor.
    histories: BTreeMap<String, VecDeque<i64>>,
    /// Unbounded: each instance sends at most one exit, so it holds at most one per agent,
    /// and an agent task never waits to end.
    exits: mpsc::UnboundedSender<Exit>,
    pending: Arc<Pending>,
    forget: mpsc::Sender<Uuid>,
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
}

/// Runs the host until `stopped` resolves, then stops every local agent, last started first.
pub async fn run(node: Arc<Node>, stopped: impl Future<Output = ()>) {
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let (logs_tx, mut logs) = mpsc::channel(4096);
    let pending = Arc::new(Pending::default());
    let (forget_tx, forget_rx) = mpsc::channel(16 * 1024);
    let (handoff_tx, handoff_rx) = mpsc::channel(16 * 1024);
    let mut calls = match node.client.subscribe(node.subjects.agent_all()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to agent calls; no agents run here");
            return;
        }
    };
    let writer = tokio::spawn(write_loop(
        node.clone(),
        pending.clone(),
        forget_rx,
        handoff_rx,
    ));
    let mut host = Host {
        me: node.cfg.id,
        node: node.clone(),
        instances: BTreeMap::new(),
        scheduled: BTreeMap::new(),
        parked: BTreeMap::new(),
        histories: BTreeMap::new(),
        exits: exits_tx,
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
    };
    let mut metrics = node.raft.metrics();
    let mut grants = node.lease.grants();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    let mut next_reconcile = Instant::now();
    let mut dirty = true;
    tokio::pin!(stopped);
    loop {
        let next_start = host.scheduled.values().map(|(t, _)| *t).min();
        let gap = tokio::time::sleep_until(next_reconcile.into());
        // The moment local agents must be gone, if any run.
        let fence_at = if host.instances.is_empty() {
            None
        } else {
            Some(node.lease.until().unwrap_or_else(Instant::now))
        };
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => dirty = true,
            changed = metrics.changed() => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            Some(mut exit) = exits.recv() => {
                let answer = exit.answer.take();
                host.on_exit(exit).await;
                // Restarts without a delay happen now: a timer would add up to a millisecond
                // of its resolution to every restart.
                host.start_due().await;
                host.journal.flush();
                // The call that crashed the agent is answered only now: a caller that retries
                // at once finds the agent restarted, and the restart does not compete for the
                // CPU with the traffic its answer sets off.
                if let Some(answer) = answer {
                    answer.send(&node).await;
                }
            }
            Ok(()) = grants.changed() => {
                // A grant after a lapse starts a new term: what ran in the old one stops.
                host.fence_if_expired();
                dirty = true;
            }
            _ = sleep_until_opt(fence_at) => host.fence_if_expired(),
            Some(msg) = calls.next() => host.route(msg).await,
            Some((id, line)) = logs.recv() => host.publish_log(id, line).await,
            _ = sleep_until_opt(next_start) => host.start_due().await,
            Some(_) = host.tasks.join_next(), if !host.tasks.is_empty() => {}
            _ = gap, if dirty => {
                dirty = false;
                let began = Instant::now();
                host.reconcile().await;
                let spent = began.elapsed() * RECONCILE_GAP_FACTOR;
                next_reconcile =
                    Instant::now() + spent.clamp(RECONCILE_GAP_MIN, RECONCILE_GAP_MAX);
            }
        }
    }
    host.shutdown().await;
    drop(host);
    let _ = writer.await; // ends once the host's sender is gone
}

/// A monotonic instant as wall-clock time (for the journal).
fn wall_time(at: Option<Instant>) -> Option<chrono::DateTime<Utc>> {
    at.map(|u| {
        let now = Instant::now();
        let wall = Utc::now();
        match u.checked_duration_since(now) {
            Some(ahead) => wall + chrono::Duration::from_std(ahead).unwrap_or_default(),
            None => wall - chrono::Duration::from_std(now - u).unwrap_or_default(),
        }
    })
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// What the host needs of an agent's record to decide and to start it.
struct Desired {
    id: Uuid,
    epoch: u64,
    status: AgentStatus,
    restart_requested: u64,
}

impl Host {
    fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// Whether agents may start here now: a valid lease, and the log applied up to its read
    /// index so that this node sees every move decided before the grant.
    fn may_start(&self) -> bool {
        self.node.lease.valid() && self.node.applied_index() >= self.node.lease.min_applied()
    }

    fn count_running(&self) {
        let n = self.instances.len() as u32;
        self.node
            .running
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Kills every local agent whose lease term is over: the lease ran out, or lapsed and
    /// was granted again (the registry may have moved them meanwhile). They may be placed
    /// elsewhere once the leader's `down_after_ms` has passed, which is later by design
    /// (`node::lease`).
    fn fence_if_expired(&mut self) {
        let lease = &self.node.lease;
        let over: Vec<Uuid> = self
            .instances
            .iter()
            .filter(|(_, inst)| !lease.valid_in(inst.lease_term))
            .map(|(id, _)| *id)
            .collect();
        if over.is_empty() {
            return;
        }
        tracing::warn!(
            agents = over.len(),
            "lost the lease: stopping every agent started under it"
        );
        for id in over {
            let Some(inst) = self.instances.remove(&id) else {
                continue;
            };
            // Drops the agent at once (an exec process is killed on drop).
            inst.mailbox.kill();
            let until = wall_time(lease.end_of(inst.lease_term));
            self.journal.stop(id, inst.epoch, "lease lost", until);
            self.scheduled.remove(&id);
        }
        if !lease.valid() {
            self.scheduled.clear();
        }
        self.count_running();
    }

    async fn reconcile(&mut self) {
        let desired: BTreeMap<Uuid, Desired> = {
            let st = self.node.state_read();
            st.registry
                .agents_on(self.me)
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
        // Stop what should no longer run here, last started first.
        let gone: Vec<Uuid> = self
            .instances
            .iter()
            .filter(|(id, inst)| desired.get(id).is_none_or(|d| d.epoch != inst.epoch))
            .map(|(id, _)| *id)
            .collect();
        for id in gone.into_iter().rev() {
            self.stop_instance(id, "moved or removed").await;
        }
        self.handed_off
            .retain(|id, epoch| desired.get(id).is_some_and(|d| d.epoch == *epoch));
        // Hand over what is migrating away, last started first.
        let moving: Vec<(Uuid, u64)> = desired
            .values()
            .filter(|d| d.status == AgentStatus::Migrating)
            .filter(|d| !self.handed_off.contains_key(&d.id))
            .map(|d| (d.id, d.epoch))
            .collect();
        for (id, epoch) in moving.into_iter().rev() {
            self.hand_off(id, epoch).await;
        }
        self.scheduled.retain(|id, _| desired.contains_key(id));
        self.log_seq.retain(|id, _| desired.contains_key(id));
        {
            let st = self.node.state_read();
            self.histories
                .retain(|sup, _| st.registry.supervisor(sup).is_some());
        }
        self.parked.retain(|id, (epoch, req)| {
            desired
                .get(id)
                .is_some_and(|d| d.epoch == *epoch && d.restart_requested == *req)
        });
        if !self.may_start() {
            return;
        }
        for d in desired.values() {
            if d.status == AgentStatus::Migrating || self.handed_off.contains_key(&d.id) {
                continue;
            }
            let restart_asked = self
                .instances
                .get(&d.id)
                .is_some_and(|i| i.restart_requested < d.restart_requested);
            if restart_asked {
                self.stop_instance(d.id, "restart requested").await;
                self.start(d.id, true).await;
                continue;
            }
            let idle = !self.instances.contains_key(&d.id)
                && !self.scheduled.contains_key(&d.id)
                && !self.parked.contains_key(&d.id)
                && d.status != AgentStatus::Stopped;
            if idle {
                let restarted = matches!(d.status, AgentStatus::Failed | AgentStatus::Running);
                self.start(d.id, restarted).await;
            }
        }
    }

    async fn start_due(&mut self) {
        let now = Instant::now();
        if !self.may_start() {
            // Try again shortly; a fence clears the schedule if the lease is gone for good.
            for (t, _) in self.scheduled.values_mut() {
                *t = (*t).max(now + Duration::from_millis(50));
            }
            return;
        }
        let due: Vec<(Uuid, bool)> = self
            .scheduled
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(id, (_, r))| (*id, *r))
            .collect();
        for (id, restarted) in due {
            self.scheduled.remove(&id);
            if !self.instances.contains_key(&id) {
                self.start(id, restarted).await;
            }
        }
    }

    /// Starts agent `id` from its record and last checkpoint.
    async fn start(&mut self, id: Uuid, restarted: bool) {
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
            self.report(
                &a.id,
                a.epoch,
                AgentStatus::Failed,
                false,
                Some(format!(
                    "kind {:?} is not known on node {}",
                    a.kind, self.me
                )),
            );
            self.parked.insert(a.id, (a.epoch, a.restart_requested));
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
        match std::panic::AssertUnwindSafe(kind.start(ctx))
            .catch_unwind()
            .await
        {
            Ok(Ok(mut agent)) => {
                self.generation += 1;
                let inst = Instance {
                    epoch: a.epoch,
                    generation: self.generation,
                    lease_term: self.node.lease.term(),
                    restart_requested: a.restart_requested,
                    mailbox: Arc::new(Mailbox::new(MAILBOX)),
                    shutdown_ms: a.shutdown_ms,
                };
                let mut answered = Answered::default();
                for c in calls {
                    answered.remember(Some(c.id), &c.result);
                }
                let ended = agent.take_exit();
                let parked = Parked { agent, answered };
                match ended {
                    // Nothing runs in the background and nothing waits for it yet: it starts
                    // parked, and its first message or stop runs a task for it.
                    None => match inst.mailbox.park(parked) {
                        Park::Parked => {}
                        Park::Busy(p) | Park::Closed(p) => self.run_task(a.id, &inst, p, None),
                    },
                    ended => self.run_task(a.id, &inst, parked, ended),
                }
                self.instances.insert(a.id, inst);
                let epoch = a.epoch;
                self.report(&a.id, epoch, AgentStatus::Running, restarted, None);
                self.count_running();
            }
            Ok(Err(e)) => {
                self.journal.stop(a.id, a.epoch, "failed to start", None);
                self.failed_start(&a, e).await
            }
            Err(_) => {
                self.journal.stop(a.id, a.epoch, "failed to start", None);
                self.failed_start(&a, "the kind panicked while starting".into())
                    .await
            }
        }
    }

    /// A failed start is a crash: the supervisor decides what follows.
    async fn failed_start(&mut self, a: &crate::registry::Agent, why: String) {
        tracing::warn!(agent = %a.id, error = %why, "agent failed to start");
        self.report(
            &a.id,
            a.epoch,
            AgentStatus::Failed,
            false,
            Some(why.clone()),
        );
        self.supervise(&a.supervisor, format!("a:{}", a.id), ExitReason::Crash(why))
            .await;
    }

    /// Stops a local instance by its shutdown setting and waits for it.
    async fn stop_instance(&mut self, id: Uuid, reason: &str) {
        self.stop_and_take(id, false, reason).await;
    }

    /// Stops a local instance, optionally checkpointing it first, and returns that checkpoint.
    async fn stop_and_take(&mut self, id: Uuid, checkpoint: bool, reason: &str) -> Handover {
        let Some(inst) = self.instances.remove(&id) else {
            return Handover::default();
        };
        self.count_running();
        let lease = &self.node.lease;
        if !lease.valid_in(inst.lease_term) {
            // Past its lease the agent may not run even to stop (a parked one would be woken
            // for it): it is dropped, as the fence does, and hands nothing over.
            inst.mailbox.kill();
            let until = wall_time(lease.end_of(inst.lease_term));
            self.journal.stop(id, inst.epoch, "lease lost", until);
            return Handover::default();
        }
        let (done, wait) = oneshot::channel();
        let req = StopRequest {
            timeout_ms: inst.shutdown_ms,
            checkpoint,
            done,
        };
        let mut handover = Handover::default();
        if let Ok(woken) = inst.mailbox.stop(req) {
            if let Some(parked) = woken {
                // An idle agent stops in a task of its own, like a busy one.
                self.run_task(id, &inst, parked, None);
            }
            // The task answers once the agent has stopped. Past the grace, it is abandoned:
            // killing drops the agent (an exec process is killed on drop).
            let grace = Duration::from_millis(inst.shutdown_ms + 1_000);
            match tokio::time::timeout(grace, wait).await {
                Ok(Ok(h)) => handover = h,
                Ok(Err(_)) => {}
                Err(_) => inst.mailbox.kill(),
            }
        }
        self.journal.stop(id, inst.epoch, reason, None);
        handover
    }

    /// Checkpoints and stops a migrating agent, then hands it over to its target.
    async fn hand_off(&mut self, id: Uuid, epoch: u64) {
        self.scheduled.remove(&id);
        let handover = self.stop_and_take(id, true, "migrating").await;
        self.handed_off.insert(id, epoch);
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
        if exit.fenced {
            // Started again by `reconcile` once the lease is back, like after a fence here.
            self.journal
                .stop(exit.id, epoch, "lease lost", wall_time(exit.lease_end));
            return;
        }
        let why = match &exit.reason {
            ExitReason::Crash(_) => "crashed",
            _ => "exited",
        };
        // Written with the restart's start line, or once the host has acted on the exit.
        self.journal.stop_held(exit.id, epoch, why);
        let supervisor = {
            let st = self.node.state_read();
            st.registry
                .agent(&exit.id.to_string())
                .map(|a| (a.supervisor.clone(), a.restart))
        };
        let Some((supervisor, restart)) = supervisor else {
            return;
        };
        let (status, error) = match &exit.reason {
            ExitReason::Crash(m) => (AgentStatus::Failed, Some(m.clone())),
            _ => (AgentStatus::Stopped, None),
        };
        self.report(&exit.id, epoch, status, false, error);
        let ends_for_good = match restart {
            RestartType::Permanent => false,
            RestartType::Transient => !exit.reason.is_abnormal(),
            RestartType::Temporary => true,
        };
        if ends_for_good {
            let req = self
                .node
                .state_read()
                .registry
                .agent(&exit.id.to_string())
                .map_or(0, |a| a.restart_requested);
            self.parked.insert(exit.id, (epoch, req));
        }
        self.supervise(&supervisor, format!("a:{}", exit.id), exit.reason)
            .await;
    }

    /// Applies supervisor `sup`'s strategy to child `child` having ended with `reason`, and
    /// escalates to its parent when it gives up.
    async fn supervise(&mut self, sup: &str, child: String, reason: ExitReason) {
        let mut sup = sup.to_string();
        let mut child = child;
        let mut reason = reason;
        // Escalation climbs at most the tree's depth.
        for _ in 0..crate::limits::MAX_SUPERVISOR_DEPTH + 1 {
            let (policy, children, parent) = {
                let st = self.node.state_read();
                let Some(s) = st.registry.supervisor(&sup) else {
                    return;
                };
                let policy = Policy {
                    strategy: s.strategy,
                    max_restarts: s.max_restarts,
                    max_seconds: s.max_seconds,
                    backoff: s.backoff.clone(),
                    never_gives_up: sup == ROOT,
                };
                let children: Vec<ChildState> = st
                    .registry
                    .children(&sup)
                    .filter_map(|c| match c {
                        Child::Agent { id } => {
                            st.registry.agent(&id.to_string()).map(|a| ChildState {
                                id: format!("a:{id}"),
                                restart: a.restart,
                                // A sibling on another node (a spread supervisor) counts
                                // by its recorded status.
                                running: if a.node == Some(self.me) {
                                    self.instances.contains_key(id)
                                } else {
                                    a.status == AgentStatus::Running
                                },
                            })
                        }
                        Child::Supervisor { name } => Some(ChildState {
                            id: format!("s:{name}"),
                            restart: RestartType::Permanent,
                            running: true,
                        }),
                    })
                    .collect();
                (policy, children, s.parent.clone())
            };
            let history = self.histories.remove(&sup).unwrap_or_default();
            let now = self.now_ms();
            let plan = supervision::on_exit(
                &policy,
                &children,
                &child,
                &reason,
                now,
                history,
                self.rng.gen(),
            );
            self.histories.insert(sup.clone(), plan.restarts_ms);
            let mut escalate = false;
            for action in plan.actions {
                match action {
                    Action::Stop { child } => self.stop_child(&child).await,
                    Action::Forget { child } => {
                        if let Some(id) = child
                            .strip_prefix("a:")
                            .and_then(|s| Uuid::parse_str(s).ok())
                        {
                            // The writer outlives the host loop, so the send succeeds.
                            let _ = self.forget.send(id).await;
                        }
                    }
                    Action::Start { child, delay_ms } => self.schedule_child(&child, delay_ms),
                    Action::Escalate => escalate = true,
                }
            }
            if !escalate {
                return;
            }
            let Some(parent) = parent else { return };
            self.publish_escalated(&sup, &parent).await;
            reason = ExitReason::Crash(format!("supervisor {sup} reached its restart intensity"));
            child = format!("s:{sup}");
            sup = parent;
        }
    }

    /// Agents of a child (an agent, or every agent below a child supervisor), in start order.
    fn agents_of(&self, child: &str) -> Vec<Uuid> {
        if let Some(id) = child
            .strip_prefix("a:")
            .and_then(|s| Uuid::parse_str(s).ok())
        {
            return vec![id];
        }
        let Some(name) = child.strip_prefix("s:") else {
            return Vec::new();
        };
        let st = self.node.state_read();
        let mut found = Vec::new();
        let mut stack = vec![name.to_string()];
        while let Some(s) = stack.pop() {
            for c in st.registry.children(&s) {
                match c {
                    Child::Agent { id } => found.extend(
                        st.registry
                            .agent(&id.to_string())
                            .map(|a| (a.position, *id)),
                    ),
                    Child::Supervisor { name } => stack.push(name.clone()),
                }
            }
        }
        // Positions grow with every child added anywhere, so they are the start order.
        found.sort();
        found.into_iter().map(|(_, id)| id).collect()
    }

    /// Whether agent `id` is placed on this node.
    fn is_local(&self, id: &Uuid) -> bool {
        self.node
            .state_read()
            .registry
            .agent(&id.to_string())
            .is_some_and(|a| a.node == Some(self.me))
    }

    async fn stop_child(&mut self, child: &str) {
        // Siblings on other nodes are restarted by their own node when their start comes
        // (`schedule_child`), which stops them first.
        for id in self.agents_of(child).into_iter().rev() {
            if self.is_local(&id) {
                self.stop_instance(id, "stopped by its supervisor").await;
            }
        }
    }

    fn schedule_child(&mut self, child: &str, delay_ms: u64) {
        let at = Instant::now() + Duration::from_millis(delay_ms);
        for id in self.agents_of(child) {
            if self.is_local(&id) {
                self.parked.remove(&id);
                self.scheduled.insert(id, (at, true));
            } else {
                // A spread supervisor's sibling elsewhere: its node restarts it.
                let node = self.node.clone();
                self.tasks.spawn(async move {
                    let body = json!({ "agent": id.to_string() });
                    if let Err(e) = node.write_internal("restart_agent", &body).await {
                        tracing::warn!(agent = %id, error = %e, "could not restart a remote sibling");
                    }
                });
            }
        }
    }

    /// Runs agent `id` of instance `inst` in a task of its own: at its start, or to wake it
    /// from its mailbox. Not in `tasks`: a JoinSet entry per agent would cost memory for
    /// nothing; the mailbox holds the abort handle while the task runs.
    fn run_task(
        &self,
        id: Uuid,
        inst: &Instance,
        parked: Parked,
        ended: Option<futures::future::BoxFuture<'static, ExitReason>>,
    ) {
        let run = Run {
            who: Who {
                node: self.node.clone(),
                me: self.me,
                id,
                epoch: inst.epoch,
            },
            generation: inst.generation,
            lease_term: inst.lease_term,
            exits: self.exits.clone(),
            ended,
        };
        let task = tokio::spawn(agent_task(run, parked, inst.mailbox.clone()));
        inst.mailbox.running(task.abort_handle());
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
        let r = AgentReport {
            agent: *id,
            node: self.me,
            epoch,
            status,
            restarts,
            error,
        };
        self.pending.add(r);
    }

    async fn shutdown(&mut self) {
        let ids: Vec<Uuid> = self.instances.keys().copied().collect();
        // Reverse start order: by position, last first.
        let mut with_pos: Vec<(u64, Uuid)> = {
            let st = self.node.state_read();
            ids.iter()
                .map(|id| {
                    (
                        st.registry.agent(&id.to_string()).map_or(0, |a| a.position),
                        *id,
                    )
                })
                .collect()
        };
        with_pos.sort();
        for (_, id) in with_pos.into_iter().rev() {
            self.stop_instance(id, "node stopping").await;
        }
        self.tasks.abort_all();
    }

    /// Routes a call or cast to the local instance, or answers for agents nobody runs.
    async fn route(&mut self, msg: async_nats::Message) {
        let mut tokens = msg.subject.rsplit('.');
        let (Some(op), Some(target)) = (tokens.next(), tokens.next()) else {
            return;
        };
        let target = target.to_string();
        let placed = {
            let st = self.node.state_read();
            st.registry.agent(&target).map(|a| (a.id, a.node, a.status))
        };
        let ct = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(protocol::CONTENT_TYPE))
            .map(|v| v.to_string());
        let enc = Encoding::detect(ct.as_deref(), &msg.payload).unwrap_or(Encoding::Json);
        let reply = msg.reply.as_ref().map(|r| r.to_string());
        let answer = |err: WireError| {
            let node = self.node.clone();
            let reply = reply.clone();
            async move {
                if let Some(r) = reply {
                    send_envelope(&node, r, enc, None, Err(err)).await;
                }
            }
        };
        let (id, status) = match placed {
            Some((id, Some(n), status)) if n == self.me => (id, status),
            Some(_) => return, // the node it is placed on answers
            None => {
                // Unknown everywhere: the leader says so, the others stay quiet.
                if self.node.is_leader() {
                    answer(WireError::new(
                        ErrorCode::NotFound,
                        format!("no agent {target:?}"),
                    ))
                    .await;
                }
                return;
            }
        };
        let body = match enc.decode(&msg.payload) {
            Ok(b) => b,
            Err(e) => return answer(e).await,
        };
        if status == AgentStatus::Migrating {
            let why = format!("agent {target:?} is moving to another node; retry");
            return answer(WireError::new(ErrorCode::Unavailable, why)).await;
        }
        let Some(inst) = self.instances.get(&id) else {
            let why = format!("agent {target:?} is not running (status {status:?}); retry shortly");
            return answer(WireError::new(ErrorCode::Unavailable, why)).await;
        };
        if !self.node.lease.valid_in(inst.lease_term) {
            let why = format!(
                "node {} lost its lease; the agent may be moving; retry",
                self.me
            );
            return answer(WireError::new(ErrorCode::Unavailable, why)).await;
        }
        let asked_epoch = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(EPOCH_HEADER))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        if let Some(e) = asked_epoch.filter(|e| *e != inst.epoch) {
            let why = format!(
                "stale epoch: the call is for epoch {e}, the agent runs at epoch {}",
                inst.epoch
            );
            return answer(WireError::new(ErrorCode::Conflict, why)).await;
        }
        let m = match (op, reply.clone()) {
            ("call", Some(reply)) => {
                let call_id = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(CALL_ID_HEADER))
                    .map(|v| v.as_str().to_string())
                    .filter(|v| !v.is_empty() && v.len() <= crate::limits::MAX_REQUEST_ID_LEN);
                Msg::Call {
                    body,
                    reply,
                    enc,
                    call_id,
                }
            }
            ("cast", _) => Msg::Cast { body },
            ("call", None) => return,
            _ => return answer(WireError::new(ErrorCode::BadRequest, "use .call or .cast")).await,
        };
        match inst.mailbox.push(Box::new(m)) {
            Ok(None) => {}
            Ok(Some(parked)) => self.run_task(id, inst, parked, None),
            Err(Refused::Full(_)) => {
                let why = "the agent's mailbox is full; retry";
                answer(WireError::new(ErrorCode::Unavailable, why)).await
            }
            Err(Refused::Closed(_)) => {
                let why = format!("agent {target:?} is restarting or stopping; retry shortly");
                answer(WireError::new(ErrorCode::Unavailable, why)).await
            }
        }
    }

    async fn publish_log(&mut self, id: Uuid, line: String) {
        let seq = self.log_seq.entry(id).or_default();
        *seq += 1;
        let epoch = self.instances.get(&id).map_or(0, |i| i.epoch);
        let data = json!({ "line": line });
        let ids = id.to_string();
        let ev = Event {
            v: EVENT_VERSION,
            event: "log",
            entity: "agent",
            id: &ids,
            time: Utc::now(),
            node: self.me,
            epoch,
            seq: *seq,
            data: &data,
        };
        publish(
            &self.node,
            self.node.subjects.event("agent", &ids, "log"),
            &ev,
        )
        .await;
    }

    async fn publish_escalated(&self, sup: &str, parent: &str) {
        let data = json!({ "supervisor": sup, "parent": parent });
        let ev = Event {
            v: EVENT_VERSION,
            event: "escalated",
            entity: "supervisor",
            id: sup,
            time: Utc::now(),
            node: self.me,
            epoch: 0,
            seq: 0,
            data: &data,
        };
        publish(
            &self.node,
            self.node.subjects.event("supervisor", sup, "escalated"),
            &ev,
        )
        .await;
    }
}

async fn publish(node: &Node, subject: String, ev: &Event<'_>) {
    match serde_json::to_vec(ev) {
        Ok(body) => {
            if let Err(e) = node.client.publish(subject, body.into()).await {
                tracing::debug!(error = %e, "could not publish an event");
            }
        }
        Err(e) => tracing::error!(error = %e, "could not encode an event"),
    }
}

async fn send_envelope(
    node: &Node,
    reply: String,
    enc: Encoding,
    epoch: Option<u64>,
    result: Result<Value, WireError>,
) {
    let mut headers = HeaderMap::new();
    headers.insert(protocol::CONTENT_TYPE, enc.content_type());
    if let Some(e) = epoch {
        headers.insert(EPOCH_HEADER, e.to_string().as_str());
    }
    let body = enc.encode(&Envelope::from_result(result));
    if let Err(e) = node
        .client
        .publish_with_headers(reply, headers, body.into())
        .await
    {
        tracing::debug!(error = %e, "could not answer an agent call");
    }
}

/// Who an agent task is, and where it reports its end.
struct Run {
    who: Who,
    generation: u64,
    lease_term: u64,
    exits: mpsc::UnboundedSender<Exit>,
    /// What ends the agent by itself (`Agent::take_exit`), taken at its start.
    ended: Option<futures::future::BoxFuture<'static, ExitReason>>,
}

/// One agent: reads its mailbox one message at a time until it ends or is stopped. A stop
/// request is served before anything queued in the mailbox.
///
/// An agent with nothing running in the background (no `take_exit`) is parked in its mailbox
/// whenever the mailbox is empty, and the task ends: an idle agent costs no task. The host
/// runs a new task for it when a message or a stop arrives. Such an agent does nothing
/// between messages, so it needs no lease watch while parked: the host drops it when the
/// lease runs out (`fence_if_expired`), wakes it for nothing past the lease, and a woken task
/// checks the lease before each message and drops the agent if it is over.
async fn agent_task(run: Run, parked: Parked, mailbox: Arc<AgentMailbox>) {
    let Run {
        who: instance,
        generation,
        lease_term,
        exits,
        ended,
    } = run;
    let (node, lease) = (&instance.node, &instance.node.lease);
    let (me, id, epoch) = (instance.me, instance.id, instance.epoch);
    let Parked {
        mut agent,
        mut answered,
    } = parked;
    let parks = ended.is_none();
    let mut ended = ended.unwrap_or_else(|| Box::pin(std::future::pending()));
    let mut expiries = node.lease.expiries();
    // The answer to a call that crashed the agent travels out of the loop, not in a variable
    // beside it: what lives across the loop's awaits is what a running agent costs.
    let end = loop {
        let waiting = if parks { mailbox.try_next() } else { None };
        let next = if let Some(n) = waiting {
            n
        } else if parks {
            match mailbox.park(Parked { agent, answered }) {
                Park::Parked => return,
                // Being killed: dropping the agent is all that is left to do.
                Park::Closed(_) => return,
                Park::Busy(p) => {
                    (agent, answered) = (p.agent, p.answered);
                    continue;
                }
            }
        } else {
            tokio::select! {
                biased;
                r = &mut ended => break End::Exit(r, None),
                Ok(()) = expiries.changed() => {
                    if lease.valid_in(lease_term) {
                        continue; // renewed meanwhile, without a lapse
                    }
                    break End::Fenced;
                }
                n = mailbox.next() => n,
            }
        };
        let msg = match next {
            Next::Stop(req) => {
                let handover = if req.checkpoint {
                    Handover {
                        state: agent.checkpoint(),
                        calls: answered.carried(),
                    }
                } else {
                    Handover::default()
                };
                // A graceful stop never outlasts the lease: past it the agent is dropped (an
                // exec process is killed on drop).
                let left = lease.end_of(lease_term).map_or(Duration::ZERO, |u| {
                    u.saturating_duration_since(Instant::now())
                });
                let stopping = tokio::time::timeout(left, agent.stop(req.timeout_ms));
                if Box::pin(stopping).await.is_err() {
                    tracing::warn!(agent = %id, "the lease ran out while stopping; killed");
                }
                // The host may have stopped waiting; then nobody needs the state.
                let _ = req.done.send(handover);
                // Whatever still waits was not handled: say so, so that callers retry (the
                // agent may be moving); a retry of a call already handled gets its answer.
                let why = "the agent stopped before handling this call; retry";
                Box::pin(refuse_queued(node, &mailbox, &answered, epoch, why)).await;
                return;
            }
            Next::Message(m) => m,
        };
        if !lease.valid_in(lease_term) {
            // Past the lease this instance may no longer act (a woken agent finds out here).
            if let Msg::Call { reply, enc, .. } = *msg {
                let err = WireError::new(
                    ErrorCode::Unavailable,
                    format!("node {me} lost its lease; retry"),
                );
                Box::pin(send_envelope(node, reply, enc, None, Err(err))).await;
            }
            break End::Fenced;
        }
        let crash = match *msg {
            Msg::Cast { body } => {
                match std::panic::AssertUnwindSafe(agent.cast(body))
                    .catch_unwind()
                    .await
                {
                    Ok(Ok(())) | Ok(Err(AgentError::BadRequest(_))) => None,
                    Ok(Err(AgentError::Crash(m))) => Some((m, None)),
                    Err(_) => Some(("panicked handling a cast".into(), None)),
                }
            }
            // Boxed, like every large await here: the task's own state is what an idle agent
            // costs, and a call's is needed only while it runs.
            call => Box::pin(handle_call(&instance, &mut agent, &mut answered, call)).await,
        };
        if let Some((why, answer)) = crash {
            break End::Exit(ExitReason::Crash(why), answer);
        }
    };
    let (reason, crash_answer) = match end {
        End::Exit(reason, answer) => (reason, answer),
        End::Fenced => {
            // The lease ran out: this instance may no longer run, whatever the host loop is
            // busy with. Dropping the agent kills what it runs.
            drop(agent);
            let why = format!("node {me} lost its lease; retry");
            Box::pin(refuse_queued(node, &mailbox, &answered, epoch, &why)).await;
            let exit = Exit {
                id,
                generation,
                reason: ExitReason::Shutdown,
                fenced: true,
                lease_end: lease.end_of(lease_term),
                answer: None,
            };
            let _ = exits.send(exit); // the host is gone when stopping
            return;
        }
    };
    // Tell the host first, so that a restart is not held up by answering what was queued.
    let exit = Exit {
        id,
        generation,
        reason,
        fenced: false,
        lease_end: None,
        answer: crash_answer,
    };
    // If the host is gone (the node is stopping), the crashed call is answered here.
    let unsent = exits.send(exit).err().and_then(|e| e.0.answer);
    if let Some(answer) = unsent {
        Box::pin(answer.send(node)).await;
    }
    let why = "the agent ended before handling this call; retry";
    Box::pin(refuse_queued(node, &mailbox, &answered, epoch, why)).await;
}

/// How an agent task's loop ended.
enum End {
    /// The agent ended (by itself, or crashed handling a message), with the answer to the call
    /// that crashed it.
    Exit(ExitReason, Option<Box<Answer>>),
    /// Its node's lease ran out.
    Fenced,
}

/// Who an instance is, as its calls need it.
struct Who {
    node: Arc<Node>,
    me: u64,
    id: Uuid,
    epoch: u64,
}

/// Why an agent crashed, and the answer to the call that crashed it (boxed: an idle agent's
/// task keeps room for what its loop's awaits return).
type Crashed = (String, Option<Box<Answer>>);

/// Handles one call and answers it, unless it crashed the agent: then returns why, with the
/// answer for the host to send once it has acted on the crash.
async fn handle_call(
    who: &Who,
    agent: &mut Box<dyn Agent>,
    answered: &mut Answered,
    msg: Msg,
) -> Option<Crashed> {
    let Msg::Call {
        body,
        reply,
        enc,
        call_id,
    } = msg
    else {
        return None;
    };
    let node = &who.node;
    if let Some(result) = answered.get(&call_id) {
        send_envelope(node, reply, enc, Some(who.epoch), result).await;
        return None;
    }
    let out = std::panic::AssertUnwindSafe(agent.call(body))
        .catch_unwind()
        .await;
    let (result, crash) = match out {
        Ok(Ok(r)) if r.checkpoint_first => {
            match checkpoint(node, who.me, who.id, who.epoch, agent).await {
                Ok(()) => (Ok(r.value), None),
                // The agent's state ran ahead of what is saved: restart it from its last
                // checkpoint rather than let it answer from a state that a failover would lose.
                Err(e) => {
                    let why = format!("could not checkpoint: {}", e.message);
                    (Err(e), Some(why))
                }
            }
        }
        Ok(Ok(r)) => (Ok(r.value), None),
        Ok(Err(AgentError::BadRequest(m))) => (Err(WireError::new(ErrorCode::BadRequest, m)), None),
        Ok(Err(AgentError::Crash(m))) => (
            Err(WireError::new(
                ErrorCode::Internal,
                format!("the agent crashed: {m}"),
            )),
            Some(m),
        ),
        Err(_) => (
            Err(WireError::new(ErrorCode::Internal, "the agent panicked")),
            Some("panicked handling a call".to_string()),
        ),
    };
    if let Some(why) = crash {
        let answer = Answer {
            reply,
            enc,
            epoch: who.epoch,
            result,
        };
        return Some((why, Some(Box::new(answer))));
    }
    answered.remember(call_id, &result);
    send_envelope(node, reply, enc, Some(who.epoch), result).await;
    None
}

/// Closes an ending instance's mailbox and answers the calls still queued: with the answer a
/// retry would get if it was handled already, else `unavailable` (so the caller retries, and
/// reaches the agent's next instance).
async fn refuse_queued(
    node: &Node,
    mailbox: &AgentMailbox,
    answered: &Answered,
    epoch: u64,
    why: &str,
) {
    for m in mailbox.close() {
        if let Msg::Call {
            reply,
            enc,
            call_id,
            ..
        } = *m
        {
            let result = answered
                .get(&call_id)
                .unwrap_or_else(|| Err(WireError::new(ErrorCode::Unavailable, why)));
            send_envelope(node, reply, enc, Some(epoch), result).await;
        }
    }
}

/// The last answers of one agent instance by call id; empty (and unallocated) for callers
/// that send no id.
#[derive(Default)]
struct Answered {
    recent: std::collections::VecDeque<(String, Result<Value, WireError>)>,
}

impl Answered {
    fn get(&self, id: &Option<String>) -> Option<Result<Value, WireError>> {
        let id = id.as_ref()?;
        self.recent
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, r)| r.clone())
    }

    fn remember(&mut self, id: Option<String>, result: &Result<Value, WireError>) {
        let Some(id) = id else { return };
        if self.recent.len() >= REMEMBERED_CALLS {
            self.recent.pop_front();
        }
        self.recent.push_back((id, result.clone()));
    }

    /// The most recent answers that fit in `HANDED_OVER_CALLS_BYTES`, oldest first.
    fn carried(&self) -> Vec<RememberedCall> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (id, result) in self.recent.iter().rev() {
            let size = id.len() + serde_json::to_vec(result).map_or(usize::MAX, |v| v.len());
            if bytes + size > HANDED_OVER_CALLS_BYTES {
                continue; // a large answer is not carried; smaller ones still are
            }
            bytes += size;
            out.push(RememberedCall {
                id: id.clone(),
                result: result.clone(),
            });
        }
        out.reverse();
        out
    }
}

/// Checkpoints the agent through Raft and waits until it is committed.
async fn checkpoint(
    node: &Node,
    me: u64,
    id: Uuid,
    epoch: u64,
    agent: &mut Box<dyn Agent>,
) -> Result<(), WireError> {
    let Some(state) = agent.checkpoint() else {
        return Ok(());
    };
    let req = CheckpointRequest {
        agent: id,
        node: me,
        epoch,
        state,
    };
    node.write_internal("checkpoint", &req).await.map(|_| ())
}

/// Sends the host's reports (batched) and forgets through Raft, retrying while the cluster has
/// no leader. Ends when the host is gone, after one last attempt to send what is pending.
async fn write_loop(
    node: Arc<Node>,
    pending: Arc<Pending>,
    mut forget: mpsc::Receiver<Uuid>,
    mut handoffs: mpsc::Receiver<HandoffItem>,
) {
    let mut open = true;
    let mut last_reports: Option<Instant> = None;
    // When the reports waiting are to be written; `None` while none wait.
    let mut due: Option<Instant> = None;
    while open {
        tokio::select! {
            _ = pending.notify.notified() => {
                // Let a burst gather (a restart's `failed` and `running` become one report),
                // so that churn costs the cluster fewer writes; while changes keep coming,
                // leave REPORT_INTERVAL between writes unless a full batch waits. A deadline,
                // not a sleep: handoffs and forgets go meanwhile.
                let mut at = Instant::now() + REPORT_GATHER;
                if let Some(last) = last_reports {
                    if pending.len() < REPORTS_PER_WRITE {
                        at = at.max(last + REPORT_INTERVAL);
                    }
                }
                due = Some(due.map_or(at, |d| d.min(at)));
                continue;
            }
            _ = sleep_until_opt(due) => due = None,
            f = forget.recv() => match f {
                Some(id) => forget_agent(&node, id).await,
                None => open = false,
            },
            Some(first) = handoffs.recv() => {
                // Bounded by count and by size (state, remembered answers and the item's
                // own fields), so the command always fits one request.
                let size = |it: &HandoffItem| {
                    HANDOFF_ITEM_OVERHEAD_BYTES
                        + it.state.as_ref().map_or(0, |s| s.len())
                        + it.calls.iter().map(|c| c.id.len() + 64).sum::<usize>()
                        + it
                            .calls
                            .iter()
                            .map(|c| serde_json::to_vec(&c.result).map_or(0, |v| v.len()))
                            .sum::<usize>()
                };
                let mut bytes = size(&first);
                let mut batch = vec![first];
                let mut next = None;
                while batch.len() < REPORTS_PER_WRITE {
                    match handoffs.try_recv() {
                        Ok(it) if bytes + size(&it) <= crate::limits::HANDOFF_BATCH_BYTES => {
                            bytes += size(&it);
                            batch.push(it);
                        }
                        Ok(it) => {
                            next = Some(it);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                send_handoff(&node, batch).await;
                if let Some(it) = next {
                    send_handoff(&node, vec![it]).await;
                }
            }
        }
        let mut backoff = Duration::from_millis(20);
        loop {
            let batch = pending.take(REPORTS_PER_WRITE);
            if batch.is_empty() {
                break;
            }
            let body = crate::command::ReportAgents {
                reports: batch.clone(),
            };
            last_reports = Some(Instant::now());
            match node.write_internal("report_agents", &body).await {
                Ok(_) => backoff = Duration::from_millis(20),
                Err(e) if open && matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                    // After a timeout the batch may have been applied: resend the statuses
                    // but not the restart counts, which would be counted twice.
                    let timed_out = e.code == ErrorCode::Timeout;
                    let batch = batch
                        .into_iter()
                        .map(|r| {
                            if timed_out {
                                AgentReport { restarts: 0, ..r }
                            } else {
                                r
                            }
                        })
                        .collect();
                    pending.restore(batch);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agent reports were refused");
                }
            }
        }
    }
}

/// Hands migrating agents over, retrying while the cluster has no leader. A retry after a
/// timeout is safe: a handoff that was applied already is refused as stale.
async fn send_handoff(node: &Node, items: Vec<HandoffItem>) {
    let body = crate::command::Handoff { items };
    let mut backoff = Duration::from_millis(10);
    // About five minutes without a leader.
    for _ in 0..300 {
        match node.write_internal("handoff", &body).await {
            Ok(_) => return,
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::warn!(error = %e, "a handoff was refused");
                return;
            }
        }
    }
    // The agents stay `migrating` on this node; if it is lost they fail over from their
    // last checkpoint.
    tracing::warn!("gave up handing agents over");
}

/// Removes a temporary agent that ended, retrying while the cluster has no leader: a record
/// left behind would never go away.
async fn forget_agent(node: &Node, id: Uuid) {
    let body = json!({ "agent": id.to_string() });
    let mut backoff = Duration::from_millis(20);
    for _ in 0..10 {
        match node.write_internal("stop_agent", &body).await {
            Ok(_) => return,
            Err(e) if e.code == ErrorCode::NotFound => return,
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(agent = %id, error = %e, "could not forget a temporary agent");
                return;
            }
        }
    }
    tracing::warn!(agent = %id, "gave up forgetting a temporary agent; stop it with stop_agent");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<A, B, C, F: Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What an idle agent costs its node is its instance, its mailbox with the agent parked in
    /// it, and its registry record (a budget: issue #3 aims at 2 KiB per idle agent, all in).
    /// A busy agent, or one with background work (`exec`), also has a task; its large awaits
    /// are boxed so that they do not count in the task's state.
    #[test]
    fn an_idle_agent_and_a_running_task_stay_small() {
        let task = future_size(agent_task);
        let mailbox = std::mem::size_of::<AgentMailbox>();
        let instance = std::mem::size_of::<Instance>();
        assert!(task <= 800, "agent_task's state is {task} bytes");
        assert!(mailbox <= 176, "a mailbox is {mailbox} bytes");
        assert!(instance <= 48, "an instance is {instance} bytes");
    }
}

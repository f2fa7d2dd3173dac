//! The agents one node runs.
//!
//! The registry holds the desired state: which agents exist and where they are placed. The
//! host reconciles it with the local instances on a tick and whenever Raft applies something
//! (starting what should run here, stopping what should not), supervises the instances with
//! the planner in `supervision` when they end, answers calls and casts on
//! `warden.<cluster>.agent.<id-or-name>.call|cast`, and reports what it observes through Raft.
//!
//! Each agent is one task that owns it and reads a bounded mailbox, so an agent sees one
//! message at a time. A call that meets a full mailbox is answered `unavailable` at once.

use std::collections::BTreeMap;
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

use super::{Agent, AgentError, LogSink, StartContext};
use crate::command::CheckpointRequest;
use crate::events::{Event, EVENT_VERSION};
use crate::node::Node;
use crate::protocol::{self, Encoding, Envelope, ErrorCode, WireError};
use crate::registry::{AgentReport, AgentStatus, Child, ROOT};
use crate::supervision::{self, Action, ChildState, ExitReason, Policy, RestartType};

/// Messages waiting for one agent; a call beyond this is refused with `unavailable`.
const MAILBOX: usize = 256;
/// Reconcile at least this often even when nothing is applied.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// ...and at most this often when applies stream in.
const RECONCILE_MIN_GAP: Duration = Duration::from_millis(20);

enum Msg {
    Call {
        body: Value,
        reply: String,
        enc: Encoding,
    },
    Cast {
        body: Value,
    },
}

struct Exit {
    id: Uuid,
    /// Which local start of the agent ended: a restart keeps the epoch, so an exit of an
    /// earlier run that is still queued must not be taken for one of the current run.
    generation: u64,
    reason: ExitReason,
}

/// A stop request: the shutdown timeout, and who to tell once the agent has stopped.
type StopRequest = (u64, oneshot::Sender<()>);

struct Instance {
    epoch: u64,
    generation: u64,
    restart_requested: u64,
    /// Stops jump the mailbox queue: the task checks this first.
    stop: oneshot::Sender<StopRequest>,
    abort: tokio::task::AbortHandle,
    /// Messages are boxed: tokio allocates a channel's first block of slots up front, and a
    /// pointer-sized slot keeps an idle agent's mailbox small.
    tx: mpsc::Sender<Box<Msg>>,
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

/// Reports sent in one command: one Raft entry, well below the proposal size limit.
const REPORTS_PER_WRITE: usize = 1_000;

struct Host {
    node: Arc<Node>,
    me: u64,
    instances: BTreeMap<Uuid, Instance>,
    /// Starts waiting for their backoff delay; `true` when it is a restart.
    scheduled: BTreeMap<Uuid, (Instant, bool)>,
    /// Agents that ended and must not run again (at this epoch and restart request).
    parked: BTreeMap<Uuid, (u64, u64)>,
    /// Restart history (ms since the host started) of each supervisor.
    histories: BTreeMap<String, Vec<i64>>,
    exits: mpsc::Sender<Exit>,
    pending: Arc<Pending>,
    forget: mpsc::Sender<Uuid>,
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
    let (exits_tx, mut exits) = mpsc::channel(4096);
    let (logs_tx, mut logs) = mpsc::channel(4096);
    let pending = Arc::new(Pending::default());
    let (forget_tx, forget_rx) = mpsc::channel(16 * 1024);
    let mut calls = match node.client.subscribe(node.subjects.agent_all()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to agent calls; no agents run here");
            return;
        }
    };
    let writer = tokio::spawn(write_loop(node.clone(), pending.clone(), forget_rx));
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
        logs: logs_tx,
        log_seq: BTreeMap::new(),
        generation: 0,
        tasks: JoinSet::new(),
        started: Instant::now(),
        rng: StdRng::from_entropy(),
    };
    let mut metrics = node.raft.metrics();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    let mut last = Instant::now() - RECONCILE_MIN_GAP;
    let mut dirty = true;
    tokio::pin!(stopped);
    loop {
        let next_start = host.scheduled.values().map(|(t, _)| *t).min();
        let gap = tokio::time::sleep_until((last + RECONCILE_MIN_GAP).into());
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => dirty = true,
            changed = metrics.changed() => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            Some(exit) = exits.recv() => host.on_exit(exit).await,
            Some(msg) = calls.next() => host.route(msg).await,
            Some((id, line)) = logs.recv() => host.publish_log(id, line).await,
            _ = sleep_until_opt(next_start) => host.start_due().await,
            Some(_) = host.tasks.join_next(), if !host.tasks.is_empty() => {}
            _ = gap, if dirty => {
                dirty = false;
                last = Instant::now();
                host.reconcile().await;
            }
        }
    }
    host.shutdown().await;
    drop(host);
    let _ = writer.await; // ends once the host's sender is gone
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
            self.stop_instance(id).await;
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
        for d in desired.values() {
            let restart_asked = self
                .instances
                .get(&d.id)
                .is_some_and(|i| i.restart_requested < d.restart_requested);
            if restart_asked {
                self.stop_instance(d.id).await;
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
                .filter(|a| a.node == Some(self.me))
                .map(|a| {
                    let state = st.registry.checkpoint(id).map(|c| c.state.clone());
                    (a.clone(), state)
                })
        };
        let Some((a, state)) = found else { return };
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
        match std::panic::AssertUnwindSafe(kind.start(ctx))
            .catch_unwind()
            .await
        {
            Ok(Ok(agent)) => {
                let (tx, rx) = mpsc::channel(MAILBOX);
                let (stop, stop_rx) = oneshot::channel();
                self.generation += 1;
                let run = Run {
                    node: self.node.clone(),
                    me: self.me,
                    id: a.id,
                    epoch: a.epoch,
                    generation: self.generation,
                    exits: self.exits.clone(),
                };
                let abort = self.tasks.spawn(agent_task(run, agent, rx, stop_rx));
                self.instances.insert(
                    a.id,
                    Instance {
                        epoch: a.epoch,
                        generation: self.generation,
                        restart_requested: a.restart_requested,
                        stop,
                        abort,
                        tx,
                        shutdown_ms: a.shutdown_ms,
                    },
                );
                let epoch = a.epoch;
                self.report(&a.id, epoch, AgentStatus::Running, restarted, None);
            }
            Ok(Err(e)) => self.failed_start(&a, e).await,
            Err(_) => {
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
    async fn stop_instance(&mut self, id: Uuid) {
        let Some(inst) = self.instances.remove(&id) else {
            return;
        };
        let (done, wait) = oneshot::channel();
        if inst.stop.send((inst.shutdown_ms, done)).is_ok() {
            // The task answers once the agent has stopped. Past the grace, it is abandoned:
            // aborting drops the agent (an exec process is killed on drop).
            let grace = Duration::from_millis(inst.shutdown_ms + 1_000);
            if tokio::time::timeout(grace, wait).await.is_err() {
                inst.abort.abort();
            }
        }
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
        let epoch = inst.epoch;
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
                                running: self.instances.contains_key(id),
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
            let history = self.histories.get(&sup).cloned().unwrap_or_default();
            let now = self.now_ms();
            let plan = supervision::on_exit(
                &policy,
                &children,
                &child,
                &reason,
                now,
                &history,
                self.rng.gen(),
            );
            self.histories.insert(sup.clone(), plan.restarts_ms.clone());
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

    async fn stop_child(&mut self, child: &str) {
        for id in self.agents_of(child).into_iter().rev() {
            self.stop_instance(id).await;
        }
    }

    fn schedule_child(&mut self, child: &str, delay_ms: u64) {
        let at = Instant::now() + Duration::from_millis(delay_ms);
        for id in self.agents_of(child) {
            self.parked.remove(&id);
            self.scheduled.insert(id, (at, true));
        }
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
            self.stop_instance(id).await;
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
                    send_envelope(&node, r, enc, Err(err)).await;
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
        let Some(inst) = self.instances.get(&id) else {
            let why = format!("agent {target:?} is not running (status {status:?}); retry shortly");
            return answer(WireError::new(ErrorCode::Unavailable, why)).await;
        };
        let m = match (op, reply.clone()) {
            ("call", Some(reply)) => Msg::Call { body, reply, enc },
            ("cast", _) => Msg::Cast { body },
            ("call", None) => return,
            _ => return answer(WireError::new(ErrorCode::BadRequest, "use .call or .cast")).await,
        };
        if inst.tx.try_send(Box::new(m)).is_err() {
            answer(WireError::new(
                ErrorCode::Unavailable,
                "the agent's mailbox is full; retry",
            ))
            .await;
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
    result: Result<Value, WireError>,
) {
    let mut headers = HeaderMap::new();
    headers.insert(protocol::CONTENT_TYPE, enc.content_type());
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
    node: Arc<Node>,
    me: u64,
    id: Uuid,
    epoch: u64,
    generation: u64,
    exits: mpsc::Sender<Exit>,
}

/// One agent: reads its mailbox one message at a time until it ends or is stopped. A stop
/// request is served before anything queued in the mailbox.
async fn agent_task(
    run: Run,
    mut agent: Box<dyn Agent>,
    mut rx: mpsc::Receiver<Box<Msg>>,
    mut stop: oneshot::Receiver<StopRequest>,
) {
    let Run {
        node,
        me,
        id,
        epoch,
        generation,
        exits,
    } = run;
    let mut ended = agent
        .take_exit()
        .unwrap_or_else(|| Box::pin(std::future::pending()));
    let reason = loop {
        let msg = tokio::select! {
            biased;
            req = &mut stop => {
                if let Ok((timeout_ms, done)) = req {
                    agent.stop(timeout_ms).await;
                    let _ = done.send(()); // the host may have stopped waiting
                }
                return;
            }
            r = &mut ended => break r,
            m = rx.recv() => match m { Some(m) => m, None => break ExitReason::Shutdown },
        };
        match *msg {
            Msg::Cast { body } => {
                match std::panic::AssertUnwindSafe(agent.cast(body))
                    .catch_unwind()
                    .await
                {
                    Ok(Ok(())) | Ok(Err(AgentError::BadRequest(_))) => {}
                    Ok(Err(AgentError::Crash(m))) => break ExitReason::Crash(m),
                    Err(_) => break ExitReason::Crash("panicked handling a cast".into()),
                }
            }
            Msg::Call { body, reply, enc } => {
                let out = std::panic::AssertUnwindSafe(agent.call(body))
                    .catch_unwind()
                    .await;
                match out {
                    Ok(Ok(r)) => {
                        let result = if r.checkpoint_first {
                            checkpoint(&node, me, id, epoch, &mut agent)
                                .await
                                .map(|_| r.value)
                        } else {
                            Ok(r.value)
                        };
                        send_envelope(&node, reply, enc, result).await;
                    }
                    Ok(Err(AgentError::BadRequest(m))) => {
                        send_envelope(
                            &node,
                            reply,
                            enc,
                            Err(WireError::new(ErrorCode::BadRequest, m)),
                        )
                        .await;
                    }
                    Ok(Err(AgentError::Crash(m))) => {
                        let err =
                            WireError::new(ErrorCode::Internal, format!("the agent crashed: {m}"));
                        send_envelope(&node, reply, enc, Err(err)).await;
                        break ExitReason::Crash(m);
                    }
                    Err(_) => {
                        let err = WireError::new(ErrorCode::Internal, "the agent panicked");
                        send_envelope(&node, reply, enc, Err(err)).await;
                        break ExitReason::Crash("panicked handling a call".into());
                    }
                }
            }
        }
    };
    let exit = Exit {
        id,
        generation,
        reason,
    };
    let _ = exits.send(exit).await; // the host is gone when stopping
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
async fn write_loop(node: Arc<Node>, pending: Arc<Pending>, mut forget: mpsc::Receiver<Uuid>) {
    let mut open = true;
    while open {
        tokio::select! {
            _ = pending.notify.notified() => {}
            f = forget.recv() => match f {
                Some(id) => forget_agent(&node, id).await,
                None => open = false,
            },
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

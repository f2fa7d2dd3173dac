//! An agent's own task: it starts the agent (the kind's `start`), reads its mailbox one message
//! at a time, and stops it (a graceful stop may take the agent's whole `shutdown_ms`). Whatever
//! is slow about one agent happens here, never in the host loop, so one agent cannot delay
//! calls to another. The task tells the host what became of the agent (`TaskEvent`).
//!
//! An agent with nothing running in the background (no `take_exit`) is parked in its mailbox
//! whenever the mailbox is empty, and its task ends: an idle agent costs no task. The host
//! runs a new task for it when a message or a stop arrives. Such an agent does nothing between
//! messages, so it needs no lease watch while parked: the host drops it when the lease runs out
//! (its fences), wakes it for nothing past the lease, and a woken task checks the lease before
//! each message and drops the agent if it is over.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::calls::send_envelope;
use crate::agent::mailbox::{Mailbox, Next, Park};
use crate::agent::{Agent, AgentError, BoxFuture};
use crate::command::CheckpointRequest;
use crate::limits::{HANDED_OVER_CALLS_BYTES, REMEMBERED_CALLS, REMEMBERED_CALLS_BYTES};
use crate::metrics::CallOutcome;
use crate::metrics::Refusal;
use crate::node::Node;
use crate::protocol::{Encoding, ErrorCode, WireError};
use crate::registry::RememberedCall;
use crate::supervision::ExitReason;
use crate::traces::Span;

pub(super) enum Msg {
    Call {
        body: Value,
        reply: String,
        enc: Encoding,
        /// The caller's `Warden-Call-Id`: a retry with the same id gets the first answer.
        call_id: Option<String>,
        /// The call's span, when it is traced: from its routing here to its answer.
        span: Span,
    },
    Cast {
        body: Value,
    },
}

/// Messages are boxed, so a queue that grew in a burst keeps pointer-sized slots.
pub(super) type AgentMailbox = Mailbox<Box<Msg>, StopRequest, Parked>;

/// An idle agent that no task runs (`mailbox`), with what its instance remembers.
pub(super) struct Parked {
    pub agent: Box<dyn Agent>,
    pub answered: Answered,
}

/// A stop request: the shutdown timeout, and whether to take a checkpoint first (a migration).
pub(super) struct StopRequest {
    pub timeout_ms: u64,
    pub checkpoint: bool,
}

/// What a stopped agent hands over to its next node: its state and its last answers.
#[derive(Default)]
pub(super) struct Handover {
    pub state: Option<bytes::Bytes>,
    pub calls: Vec<RememberedCall>,
}

/// What an agent task tells the host. Each start sends at most one `Started` and then one
/// `Ended`, so the channel holds at most two per agent and a task never waits to send.
pub(super) enum TaskEvent {
    /// The kind's start succeeded: the agent runs.
    Started {
        id: Uuid,
        generation: u64,
    },
    Ended(Exit),
}

pub(super) struct Exit {
    pub id: Uuid,
    /// Which local start of the agent ended: a restart keeps the epoch, so an end of an
    /// earlier run that is still queued must not be taken for one of the current run.
    pub generation: u64,
    pub end: End,
    /// When the agent could no longer act: taken once it was dropped or had stopped, so a
    /// host loop that writes the journal later (or a node paused in between) does not make
    /// the run look longer than it was.
    pub at: DateTime<Utc>,
}

/// How an agent's run ended.
pub(super) enum End {
    /// It ended by itself or crashed, with the answer to the call that crashed it (sent once
    /// the host has acted on the crash), and its result if it finished normally
    /// (`Agent::finish`).
    Exited(ExitReason, Option<Box<Answer>>, Option<Box<Value>>),
    /// It stopped on request, with what it hands over. `lease_end` is set when the lease ran
    /// out first: the stop was cut there and the agent dropped, unpolled past that moment.
    Stopped {
        handover: Handover,
        lease_end: Option<DateTime<Utc>>,
    },
    /// Its lease term ended (at `lease_end`) and it was dropped.
    Fenced { lease_end: Option<DateTime<Utc>> },
    /// The kind's start failed (an error, a panic): it never ran.
    FailedStart(String),
}

/// An answer to a call, to be sent later.
pub(super) struct Answer {
    reply: String,
    enc: Encoding,
    epoch: u64,
    result: Result<Value, WireError>,
}

impl Answer {
    pub(super) async fn send(self, node: &Node) {
        send_envelope(node, self.reply, self.enc, Some(self.epoch), self.result).await;
    }
}

/// Who an agent task is, and where it reports.
pub(super) struct Run {
    pub who: Who,
    pub generation: u64,
    pub lease_term: u64,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    /// What ends the agent by itself (`Agent::take_exit`), taken at its start.
    pub ended: Option<BoxFuture<'static, ExitReason>>,
}

/// Who an instance is, as its calls need it.
pub(super) struct Who {
    pub node: Arc<Node>,
    pub me: u64,
    pub id: Uuid,
    pub epoch: u64,
    /// The agent's kind's position among the node's kinds, for metrics (`Kinds::index_of`).
    pub kind: u16,
}

impl Run {
    fn send(&self, end: End) {
        let exit = Exit {
            id: self.who.id,
            generation: self.generation,
            end,
            at: Utc::now(),
        };
        if let Err(e) = self.events.send(TaskEvent::Ended(exit)) {
            // The host is gone (the node is stopping): a crashed call is answered here.
            if let TaskEvent::Ended(Exit {
                end: End::Exited(_, Some(answer), _),
                ..
            }) = e.0
            {
                let node = self.who.node.clone();
                tokio::spawn(async move { answer.send(&node).await });
            }
        }
    }

    fn lease_end(&self) -> Option<DateTime<Utc>> {
        wall_time(self.who.node.lease.end_of(self.lease_term))
    }
}

/// A new agent's task: runs the kind's `start` within the lease, then the agent. A start that
/// fails, panics or outlasts the lease ends the task; the host hears which.
pub(super) async fn start_task(
    mut run: Run,
    start: BoxFuture<'static, Result<Box<dyn Agent>, String>>,
    calls: Vec<RememberedCall>,
    mailbox: Arc<AgentMailbox>,
) {
    let lease = &run.who.node.lease;
    let started = lease
        .while_valid(
            run.lease_term,
            std::panic::AssertUnwindSafe(start).catch_unwind(),
        )
        .await;
    let mut agent = match started {
        Some(Ok(Ok(agent))) => agent,
        failed => {
            let end = match failed {
                None => End::Fenced {
                    lease_end: run.lease_end(),
                },
                Some(Ok(Err(why))) => End::FailedStart(why),
                _ => End::FailedStart("the kind panicked while starting".into()),
            };
            run.send(end);
            let why = (Refusal::Stopping, "the agent did not start; retry");
            refuse_queued(&run.who, &mailbox, &Answered::default(), why).await;
            return;
        }
    };
    // An OS process of its own (`exec`): its figures come from the OS.
    if let Some(pid) = agent.os_process() {
        mailbox
            .stats
            .pid
            .store(pid, std::sync::atomic::Ordering::Relaxed);
    }
    let mut answered = Answered::default();
    for c in calls {
        let size = serde_json::to_vec(&c.result).map_or(usize::MAX, |v| v.len());
        answered.remember(c.id, c.result, size);
    }
    run.ended = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.take_exit())) {
        Ok(ended) => ended,
        Err(_) => {
            drop(agent);
            run.send(End::FailedStart("the kind panicked in take_exit".into()));
            let why = (Refusal::Stopping, "the agent did not start; retry");
            refuse_queued(&run.who, &mailbox, &Answered::default(), why).await;
            return;
        }
    };
    let started = TaskEvent::Started {
        id: run.who.id,
        generation: run.generation,
    };
    if run.events.send(started).is_err() {
        return; // the node is stopping; dropping the agent ends it
    }
    let parked = Parked { agent, answered };
    if run.ended.is_none() {
        // Nothing runs in the background: it waits parked, and its first message or stop
        // runs a task for it.
        match mailbox.park(parked) {
            Park::Parked | Park::Closed(_) => {}
            Park::Busy(p) => Box::pin(agent_task(run, p, mailbox)).await,
        }
    } else {
        Box::pin(agent_task(run, parked, mailbox)).await;
    }
}

/// How an agent task's loop ended.
enum LoopEnd {
    /// The agent ended (by itself, or crashed handling a message), with the answer to the
    /// call that crashed it.
    Exit(ExitReason, Option<Box<Answer>>),
    /// Its node's lease ran out.
    Fenced,
    /// It ended by itself (its `take_exit` resolved).
    Ended(ExitReason),
}

/// One agent: reads its mailbox one message at a time until it ends or is stopped. A stop
/// request is served before anything queued in the mailbox.
pub(super) async fn agent_task(mut run: Run, parked: Parked, mailbox: Arc<AgentMailbox>) {
    let who = &run.who;
    let (node, lease) = (&who.node, &who.node.lease);
    let Parked {
        mut agent,
        mut answered,
    } = parked;
    let parks = run.ended.is_none();
    let mut ended = run
        .ended
        .take()
        .unwrap_or_else(|| Box::pin(std::future::pending()));
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
            // An expiry announced before this task subscribed is not seen by `expiries`.
            if !lease.valid_in(run.lease_term) {
                break LoopEnd::Fenced;
            }
            tokio::select! {
                biased;
                r = &mut ended => break LoopEnd::Ended(r),
                Ok(()) = expiries.changed() => {
                    if lease.valid_in(run.lease_term) {
                        continue; // renewed meanwhile, without a lapse
                    }
                    break LoopEnd::Fenced;
                }
                n = mailbox.next() => n,
            }
        };
        let msg = match next {
            Next::Stop(req) => {
                drop(ended);
                return Box::pin(stop(run, agent, answered, req, mailbox)).await;
            }
            Next::Message(m) => m,
        };
        if !lease.valid_in(run.lease_term) {
            // Past the lease this instance may no longer act (a woken agent finds out here).
            if let Msg::Call {
                reply, enc, span, ..
            } = *msg
            {
                node.metrics.call_refused(Refusal::LeaseLost);
                let err = WireError::new(
                    ErrorCode::Unavailable,
                    format!("node {} lost its lease; retry", who.me),
                );
                span.fail(err.code.as_str(), err.message.clone());
                span.end();
                Box::pin(send_envelope(node, reply, enc, None, Err(err))).await;
            }
            break LoopEnd::Fenced;
        }
        // A message is handled only while the lease holds: one still running when the lease
        // ends is cut there, unanswered (its caller retries and reaches the agent wherever it
        // runs next), and the agent is dropped. Boxed, like every large await here: the
        // task's own state is what an idle agent costs, and a message's is needed only while
        // it runs.
        let handled = match *msg {
            Msg::Cast { body } => {
                let cast = std::panic::AssertUnwindSafe(agent.cast(body)).catch_unwind();
                Box::pin(lease.while_valid(run.lease_term, cast))
                    .await
                    .map(|out| match out {
                        Ok(Ok(())) | Ok(Err(AgentError::BadRequest(_))) => None,
                        Ok(Err(AgentError::Crash(m))) => Some((m, None)),
                        Err(_) => Some(("panicked handling a cast".into(), None)),
                    })
            }
            call => {
                let call = handle_call(who, &mut agent, &mut answered, call, &mailbox.stats);
                Box::pin(lease.while_valid(run.lease_term, call)).await
            }
        };
        match handled {
            None => break LoopEnd::Fenced,
            Some(Some((why, answer))) => break LoopEnd::Exit(ExitReason::Crash(why), answer),
            Some(None) => {}
        }
    };
    // Its result, if it ended by itself, before it is dropped.
    let (end, result) = match end {
        LoopEnd::Ended(reason) => (LoopEnd::Exit(reason, None), finish(&mut agent)),
        end => (end, None),
    };
    // The agent can no longer act once dropped: the exit's time is taken after this.
    drop(agent);
    let (end, refusal, why) = match end {
        LoopEnd::Exit(reason, answer) => (
            End::Exited(reason, answer, result),
            Refusal::Stopping,
            "the agent ended before handling this call; retry".to_string(),
        ),
        LoopEnd::Fenced | LoopEnd::Ended(_) => (
            End::Fenced {
                lease_end: run.lease_end(),
            },
            Refusal::LeaseLost,
            format!("node {} lost its lease; retry", who.me),
        ),
    };
    // Tell the host first, so that a restart is not held up by answering what was queued.
    run.send(end);
    Box::pin(refuse_queued(
        &run.who,
        &mailbox,
        &answered,
        (refusal, &why),
    ))
    .await;
}

/// Stops the agent gracefully: its checkpoint first if asked (a migration), then its `stop`
/// with the whole `shutdown_ms` it asked for. The stop is cut only when the lease really ends
/// (`Lease::while_valid` follows renewals): then the agent is dropped without being polled
/// again, and the host records the lease's end as the end of its run.
async fn stop(
    run: Run,
    mut agent: Box<dyn Agent>,
    answered: Answered,
    req: StopRequest,
    mailbox: Arc<AgentMailbox>,
) {
    let lease = &run.who.node.lease;
    let handover = if req.checkpoint {
        Handover {
            state: checkpoint_of(&mut agent),
            calls: answered.carried(),
        }
    } else {
        Handover::default()
    };
    let stopping = std::panic::AssertUnwindSafe(agent.stop(req.timeout_ms)).catch_unwind();
    let in_time = lease.while_valid(run.lease_term, stopping).await.is_some();
    // Dropping the agent ends whatever it still runs (an exec process is killed on drop).
    drop(agent);
    let lease_end = if in_time {
        None
    } else {
        tracing::warn!(agent = %run.who.id, "the lease ran out while stopping; dropped");
        run.lease_end()
    };
    run.send(End::Stopped {
        handover,
        lease_end,
    });
    // Whatever still waits was not handled: say so, so that callers retry (the agent may be
    // moving); a retry of a call already handled gets its answer.
    let why = "the agent stopped before handling this call; retry";
    refuse_queued(&run.who, &mailbox, &answered, (Refusal::Stopping, why)).await;
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
    stats: &crate::agent::mailbox::Stats,
) -> Option<Crashed> {
    let Msg::Call {
        body,
        reply,
        enc,
        call_id,
        span,
    } = msg
    else {
        return None;
    };
    let node = &who.node;
    if let Some(result) = answered.get(&call_id) {
        span.event("answered from memory (a retry)");
        span.end();
        send_envelope(node, reply, enc, Some(who.epoch), result).await;
        return None;
    }
    span.event("handling");
    let began = Instant::now();
    let out = std::panic::AssertUnwindSafe(agent.call(body))
        .catch_unwind()
        .await;
    let outcome = match &out {
        Ok(Ok(_)) => CallOutcome::Ok,
        Ok(Err(AgentError::BadRequest(_))) => CallOutcome::Refused,
        Ok(Err(AgentError::Crash(_))) | Err(_) => CallOutcome::Crashed,
    };
    let (result, crash) = match out {
        Ok(Ok(r)) if r.checkpoint_first => match checkpoint(who, agent).await {
            Ok(()) => (Ok(r.value), None),
            // The agent's state ran ahead of what is saved: restart it from its last
            // checkpoint rather than let it answer from a state that a failover would lose.
            Err(e) => {
                let why = format!("could not checkpoint: {}", e.message);
                (Err(e), Some(why))
            }
        },
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
    // A result the agent gave but whose checkpoint failed is not an answer.
    let outcome = match (&result, outcome) {
        (Err(_), CallOutcome::Ok) => CallOutcome::Failed,
        (_, o) => o,
    };
    node.metrics.call(who.kind, outcome, began.elapsed());
    stats.call(matches!(outcome, CallOutcome::Ok), began.elapsed());
    if let Err(e) = &result {
        span.fail(e.code.as_str(), e.message.clone());
    }
    // Ended before the answer goes: the caller's span of the call ends after this one.
    span.end();
    if let Some(why) = crash {
        let answer = Answer {
            reply,
            enc,
            epoch: who.epoch,
            result,
        };
        return Some((why, Some(Box::new(answer))));
    }
    // Remembered at the size of the answer as sent: encoded once, for the caller.
    let kept = call_id.map(|id| (id, result.clone()));
    let size = send_envelope(node, reply, enc, Some(who.epoch), result).await;
    if let Some((id, result)) = kept {
        answered.remember(id, result, size);
    }
    None
}

/// Closes an ending instance's mailbox and answers the calls still queued: with the answer a
/// retry would get if it was handled already, else `unavailable` (so the caller retries, and
/// reaches the agent's next instance).
async fn refuse_queued(
    who: &Who,
    mailbox: &AgentMailbox,
    answered: &Answered,
    (refusal, why): (Refusal, &str),
) {
    for m in mailbox.close() {
        if let Msg::Call {
            reply,
            enc,
            call_id,
            span,
            ..
        } = *m
        {
            // A retry of a call already handled gets its answer, whatever it was; the others
            // are refused.
            let result = answered.get(&call_id).unwrap_or_else(|| {
                who.node.metrics.call_refused(refusal);
                Err(WireError::new(ErrorCode::Unavailable, why))
            });
            if let Err(e) = &result {
                span.fail(e.code.as_str(), e.message.clone());
            }
            span.end();
            send_envelope(&who.node, reply, enc, Some(who.epoch), result).await;
        }
    }
}

/// The last answers of one agent instance by call id; empty (and unallocated) for callers
/// that send no id. Bounded in count (`REMEMBERED_CALLS`) and in bytes
/// (`REMEMBERED_CALLS_BYTES`): the oldest go first, and an answer bigger than the byte bound
/// is not remembered (a retry of that call runs it again).
#[derive(Default)]
pub(super) struct Answered {
    recent: std::collections::VecDeque<(String, Result<Value, WireError>, usize)>,
    bytes: usize,
}

impl Answered {
    fn get(&self, id: &Option<String>) -> Option<Result<Value, WireError>> {
        let id = id.as_ref()?;
        self.recent
            .iter()
            .find(|(k, _, _)| k == id)
            .map(|(_, r, _)| r.clone())
    }

    /// Keeps `result` for call `id`; `size` is what its answer takes encoded.
    fn remember(&mut self, id: String, result: Result<Value, WireError>, size: usize) {
        let size = id.len().saturating_add(size);
        if size > REMEMBERED_CALLS_BYTES {
            return;
        }
        while self.recent.len() >= REMEMBERED_CALLS || self.bytes + size > REMEMBERED_CALLS_BYTES {
            match self.recent.pop_front() {
                Some((_, _, s)) => self.bytes -= s,
                None => break,
            }
        }
        self.bytes += size;
        self.recent.push_back((id, result, size));
    }

    /// The most recent answers that fit in `HANDED_OVER_CALLS_BYTES`, oldest first.
    fn carried(&self) -> Vec<RememberedCall> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (id, result, size) in self.recent.iter().rev() {
            let size = *size;
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
async fn checkpoint(who: &Who, agent: &mut Box<dyn Agent>) -> Result<(), WireError> {
    let Some(state) = checkpoint_of(agent) else {
        return Ok(());
    };
    let req = CheckpointRequest {
        agent: who.id,
        node: who.me,
        epoch: who.epoch,
        state,
    };
    let write = crate::node::OwnWrite::Checkpoint(req);
    who.node.write_own(write).await.map(|_| ())
}

/// The agent's state for a checkpoint; a kind that panics producing it has none to give.
fn checkpoint_of(agent: &mut Box<dyn Agent>) -> Option<bytes::Bytes> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.checkpoint())).unwrap_or_else(
        |_| {
            tracing::warn!("an agent's kind panicked taking a checkpoint");
            None
        },
    )
}

/// A monotonic instant as wall-clock time (for the journal).
pub(super) fn wall_time(at: Option<Instant>) -> Option<DateTime<Utc>> {
    at.map(|u| {
        let now = Instant::now();
        let wall = Utc::now();
        match u.checked_duration_since(now) {
            Some(ahead) => wall + chrono::Duration::from_std(ahead).unwrap_or_default(),
            None => wall - chrono::Duration::from_std(now - u).unwrap_or_default(),
        }
    })
}

/// Asks a finished agent for its result (`Agent::finish`), bounded: a kind that panics leaves
/// none, and one over `limits::MAX_RESULT_BYTES` as JSON is replaced by an error saying so.
fn finish(agent: &mut Box<dyn Agent>) -> Option<Box<Value>> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.finish()));
    let value = result.ok().flatten()?;
    let bytes = serde_json::to_vec(&value).map_or(usize::MAX, |b| b.len());
    if bytes > crate::limits::MAX_RESULT_BYTES {
        let error = format!(
            "the result is {bytes} bytes as JSON; at most {} are kept",
            crate::limits::MAX_RESULT_BYTES
        );
        return Some(Box::new(serde_json::json!({ "error": error })));
    }
    Some(Box::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
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
        let instance = std::mem::size_of::<super::super::Instance>();
        assert!(task <= 800, "agent_task's state is {task} bytes");
        // 168 before the per-agent figures (`mailbox::Stats`, 32 bytes) came.
        assert!(mailbox <= 200, "a mailbox is {mailbox} bytes");
        assert!(instance <= 48, "an instance is {instance} bytes");
    }

    /// Goal: an agent's memory of answered calls is bounded in bytes as well as in count,
    /// oldest first, and an answer too big to keep is not kept.
    #[test]
    fn remembered_answers_are_bounded_in_bytes() {
        let mut a = Answered::default();
        let answer = |n: usize| Ok(serde_json::json!({ "pad": "x".repeat(n) }));
        for i in 0..10 {
            let n = REMEMBERED_CALLS_BYTES / 4;
            a.remember(format!("c{i}"), answer(n), n);
        }
        assert!(a.bytes <= REMEMBERED_CALLS_BYTES, "{} bytes kept", a.bytes);
        assert!(a.get(&Some("c9".into())).is_some(), "the newest is kept");
        assert!(a.get(&Some("c0".into())).is_none(), "the oldest went first");
        let n = REMEMBERED_CALLS_BYTES + 1;
        a.remember("huge".into(), answer(n), n);
        assert!(a.get(&Some("huge".into())).is_none());
        assert!(
            a.get(&Some("c9".into())).is_some(),
            "a huge answer evicts nothing"
        );
    }
}

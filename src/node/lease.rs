//! Leases: how a node knows it may run its agents, and how the leader knows who is alive.
//!
//! Every `failure.heartbeat_interval_ms` a node sends the leader a `heartbeat` with its load.
//! The leader notes when it received it, confirms with a quorum that it still leads (a fresh
//! round of Raft heartbeats sent after that moment), and grants: the node may run its agents
//! until `lease_ms` after the moment it *sent* the heartbeat, and once it has applied the log up
//! to the leader's read index. A node without a valid lease runs nothing (`node::host`).
//!
//! Each grant is named (`GrantId`), and each heartbeat acknowledges the latest grant the node
//! received. A node whose heartbeats keep coming but never acknowledge a grant made promptly
//! hears nothing back (the network is cut one way): its lease lapses, so its agents run
//! nowhere, and the leader counts it as silent from that grant on (`Liveness::heard`), to
//! declare it down and place its agents elsewhere like those of a node that sends nothing.
//!
//! Why this gives at most one (G1): the leader declares a node down `down_after_ms` after it
//! last received a heartbeat from it (or after it became leader, if later). A lease granted by
//! this leader ends at `sent + lease_ms <= received + lease_ms`. A lease granted by an earlier
//! leader was confirmed by a quorum round that started before this leader's election (a quorum
//! that acknowledged the old leader cannot have elected the new one yet), so it ends before
//! `elected + lease_ms`. Either way it ends `down_after_ms - lease_ms >= LEASE_MARGIN_MS`
//! before the agents may be placed elsewhere. A node the leader is about to declare down gets
//! no grant; a granted node starts nothing before it has applied everything committed before
//! the grant, so it sees its agents moved before it could start them again. A node found deaf
//! is declared down earlier than its last heartbeat would allow: it is first marked (no grant
//! from then on), and the verdict waits until `lease_ms + LEASE_MARGIN_MS` after the last
//! heartbeat received before the mark, so every lease it may still receive has ended by then
//! with the same margin (`Liveness::condemn_if_silent`).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use super::Node;
use crate::command::{GrantId, Heartbeat};
use crate::protocol::{ErrorCode, WireError};
use crate::raft::typ::Raft;
use crate::registry::NodeLoad;

/// This node's lease.
#[derive(Debug)]
pub struct Lease {
    state: Mutex<LeaseState>,
    /// Counts grants, so the host wakes when one arrives.
    grants: watch::Sender<u64>,
    /// Counts expiries: every agent task watches it (one timer per node, not per agent).
    expiries: watch::Sender<u64>,
    /// Picked at random when the process starts, and sent with every heartbeat.
    process: u64,
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            state: Mutex::default(),
            grants: watch::channel(0).0,
            expiries: watch::channel(0).0,
            process: rand::random(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct LeaseState {
    until: Option<Instant>,
    /// Log index this node must have applied before it starts agents.
    min_applied: u64,
    /// Counts unbroken leases: a grant that arrives once the lease has run out starts a new
    /// term. An agent runs only in the term it started in (`valid_in`): after a lapse the
    /// registry may have moved it while this node could not know, so it must not carry on.
    term: u64,
    /// When the previous term's lease ran out.
    lapsed: Option<Instant>,
    /// The latest grant received, acknowledged in every heartbeat.
    acked: Option<GrantId>,
}

impl Lease {
    /// Extends the lease to `sent + length` (never shortens it). A grant that comes after the
    /// lease ran out starts a new term, and wakes the agents of the old one (`expiries`) so
    /// that they stop.
    pub fn renew(&self, sent: Instant, length: Duration, min_applied: u64) {
        let now = Instant::now();
        let until = sent + length;
        if until <= now {
            return; // already over: it grants nothing
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let lapsed = st.until.is_none_or(|u| u <= now);
        // The first grant ends no earlier term: nothing ran before it.
        let ended_a_term = lapsed && st.until.is_some();
        if lapsed {
            st.term += 1;
            st.lapsed = st.until;
        }
        st.until = Some(st.until.map_or(until, |u| u.max(until)));
        st.min_applied = st.min_applied.max(min_applied);
        drop(st);
        if ended_a_term {
            self.expiries.send_modify(|n| *n += 1);
        }
        self.grants.send_modify(|n| *n += 1);
    }

    /// Notes a grant received, to acknowledge it in the next heartbeats.
    pub fn ack(&self, grant: GrantId) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.acked = st.acked.max(Some(grant));
    }

    /// This process's number (see `Heartbeat::process`).
    pub fn process(&self) -> u64 {
        self.process
    }

    /// The latest grant received.
    pub fn acked(&self) -> Option<GrantId> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).acked
    }

    /// The current term (see `LeaseState::term`).
    pub fn term(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).term
    }

    /// The term an agent may start in now, read at once with the lease it belongs to: `None`
    /// unless the lease is valid and `applied` (the node's applied log index) has reached the
    /// grant's read index, so that a term granted a moment ago is never paired with a check of
    /// the one before.
    pub fn start_term(&self, applied: u64) -> Option<u64> {
        let st = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        let valid = st.until.is_some_and(|u| Instant::now() < u);
        (valid && applied >= st.min_applied).then_some(st.term)
    }

    /// Whether an agent started in `term` may still run: the lease is valid and has not
    /// lapsed since.
    pub fn valid_in(&self, term: u64) -> bool {
        let st = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.term == term && st.until.is_some_and(|u| Instant::now() < u)
    }

    /// When the lease of `term` ends or ended: the current lease's end, or for an earlier
    /// term the moment the last lapse happened (the end of the previous term, and later than
    /// the end of any before it, so never too early).
    pub fn end_of(&self, term: u64) -> Option<Instant> {
        let st = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.term == term {
            st.until
        } else {
            st.lapsed
        }
    }

    /// Runs `fut` while the lease of `term` holds, following renewals: `None` once the lease
    /// has run out (or lapsed and started a new term), and then `fut` is dropped without being
    /// polled again. The lease is checked before every poll, so `fut` never runs past the
    /// lease's end, not even once after a pause of the whole process: an agent's graceful stop
    /// gets all its `shutdown_ms` while the lease is renewed, and not a moment past it.
    pub async fn while_valid<F: Future>(&self, term: u64, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut armed: Option<Instant> = None;
        std::future::poll_fn(|cx| {
            // Each pass either returns, waits, or re-arms the timer for a later end (a renewal
            // came in): bounded by the renewals that arrive while it runs.
            for _ in 0..4 {
                if !self.valid_in(term) {
                    return std::task::Poll::Ready(None);
                }
                let Some(end) = self.end_of(term) else {
                    return std::task::Poll::Ready(None);
                };
                if armed != Some(end) {
                    timer.as_mut().reset(end.into());
                    armed = Some(end);
                }
                if timer.as_mut().poll(cx).is_pending() {
                    break;
                }
            }
            fut.as_mut().poll(cx).map(Some)
        })
        .await
    }

    /// Changes with every grant.
    pub fn grants(&self) -> watch::Receiver<u64> {
        self.grants.subscribe()
    }

    /// Changes whenever the lease runs out.
    pub fn expiries(&self) -> watch::Receiver<u64> {
        self.expiries.subscribe()
    }

    /// Announces each expiry of the lease on `expiries`, until `stopped`. Its own task, so a
    /// busy host loop never delays a fence.
    pub async fn watch_expiry(&self, stopped: impl Future<Output = ()>) {
        let mut grants = self.grants();
        tokio::pin!(stopped);
        loop {
            let until = self.until();
            let expired = async {
                match until {
                    Some(u) => tokio::time::sleep_until(u.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stopped => return,
                _ = grants.changed() => continue,
                _ = expired => {}
            }
            if !self.valid() {
                self.expiries.send_modify(|n| *n += 1);
                // Wait for the next grant before looking again.
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = grants.changed() => {}
                }
            }
        }
    }

    /// When the lease ends, if one was ever granted.
    pub fn until(&self) -> Option<Instant> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).until
    }

    /// Whether agents may run now.
    pub fn valid(&self) -> bool {
        self.until().is_some_and(|u| Instant::now() < u)
    }

    /// The index this node must have applied before it starts agents.
    pub fn min_applied(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .min_applied
    }
}

/// On the leader: confirms leadership with a quorum round that starts after a given moment,
/// sharing one round among all the heartbeats waiting for it.
pub struct QuorumGate {
    /// Start time and read index of the last successful round.
    confirmed: watch::Sender<Option<(Instant, u64)>>,
    wake: Notify,
}

impl Default for QuorumGate {
    fn default() -> Self {
        QuorumGate {
            confirmed: watch::channel(None).0,
            wake: Notify::new(),
        }
    }
}

impl QuorumGate {
    /// The read index of a quorum round that started at or after `after`, or `None` if none
    /// succeeds within `within` (this node no longer leads, or has no quorum).
    pub async fn confirm_after(&self, after: Instant, within: Duration) -> Option<u64> {
        let mut rx = self.confirmed.subscribe();
        self.wake.notify_one();
        let done = async {
            rx.wait_for(|c| c.is_some_and(|(t, _)| t >= after))
                .await
                .ok()
                .and_then(|c| c.map(|(_, index)| index))
        };
        tokio::time::timeout(within, done).await.ok().flatten()
    }

    /// Runs quorum rounds while anyone waits, until `stopped`.
    pub async fn run(
        &self,
        raft: Raft,
        floor: &crate::raft::read::ReadFloor,
        round_timeout: Duration,
        stopped: impl Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = self.wake.notified() => {}
            }
            let start = Instant::now();
            // Not the leader, or no quorum in time: waiters time out and are refused.
            if let Ok(Ok((read, _))) =
                tokio::time::timeout(round_timeout, raft.get_read_log_id()).await
            {
                let index = floor.raise(&raft, read);
                self.confirmed.send_replace(Some((start, index)));
            }
        }
    }
}

/// On the leader: when each node was last heard from, what load it reported, and whether it
/// hears the grants it is sent.
#[derive(Debug)]
pub struct Liveness {
    inner: Mutex<LivenessInner>,
    /// Numbers this leader's grants (`GrantId::grant`). It starts at the wall clock's
    /// microseconds, so that a leader restarted in the same term (openraft resumes it) names
    /// its grants above those of its previous process, which nodes may still acknowledge.
    next_grant: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Liveness {
            inner: Mutex::default(),
            next_grant: AtomicU64::new(micros),
        }
    }
}

#[derive(Debug, Default)]
struct LivenessInner {
    seen: BTreeMap<u64, Seen>,
    /// Nodes being declared down: they get no grant until that is applied.
    condemned: BTreeSet<u64>,
}

/// What the leader knows of one node in its term.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// When its latest heartbeat was received.
    at: Instant,
    load: NodeLoad,
    /// The oldest grant made to it promptly that none of its heartbeats has acknowledged yet,
    /// and when it was made. A node whose heartbeats come in but never acknowledge a grant
    /// hears nothing back (a network cut one way): it is as silent as one that sends nothing.
    unacked: Option<(GrantId, Instant)>,
    /// The process its latest heartbeats came from (`Heartbeat::process`).
    process: u64,
}

impl Seen {
    /// When the node was last known to be well: its latest heartbeat, unless heartbeats
    /// received `slack` or more after a grant still do not acknowledge it, and then that
    /// grant's moment.
    fn alive_at(&self, slack: Duration) -> Instant {
        match self.unacked {
            Some((_, made)) if self.at >= made + slack => made,
            _ => self.at,
        }
    }
}

impl Liveness {
    fn lock(&self) -> std::sync::MutexGuard<'_, LivenessInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets everything: a new term starts with no knowledge.
    pub fn reset(&self) {
        *self.lock() = LivenessInner::default();
    }

    /// Records a heartbeat unless the node is being declared down; in one step, so that a
    /// verdict and a grant never pass each other. A node has several heartbeats in flight and
    /// the leader handles them concurrently, so one received earlier may be recorded later:
    /// the latest receipt is kept, never replaced by an earlier one (a grant for the later
    /// one must not outlive the verdict counted from the earlier). Its `acked` grant clears
    /// every grant up to it; an older acknowledgement clears nothing newer. A heartbeat from
    /// another process (the node restarted) clears what the previous one had not acknowledged.
    fn seen_unless_condemned(&self, id: u64, at: Instant, hb: &Heartbeat) -> bool {
        let mut inner = self.lock();
        if inner.condemned.contains(&id) {
            return false;
        }
        let s = inner.seen.entry(id).or_insert(Seen {
            at,
            load: hb.load,
            unacked: None,
            process: hb.process,
        });
        if s.at < at {
            s.at = at;
            s.load = hb.load;
        }
        if s.process != hb.process {
            s.process = hb.process;
            s.unacked = None;
        }
        let acked = hb.acked;
        if let (Some((oldest, _)), Some(acked)) = (s.unacked, acked) {
            if acked >= oldest {
                s.unacked = None;
            }
        }
        true
    }

    /// Names a grant for `id` in `term`, for the heartbeat received at `received`. A grant
    /// made within `prompt` of it must reach the node before that heartbeat gives up waiting,
    /// so it is remembered until acknowledged; a late one proves nothing either way.
    fn issue(&self, id: u64, term: u64, received: Instant, prompt: Duration) -> GrantId {
        self.issue_at(id, term, received, Instant::now(), prompt)
    }

    fn issue_at(
        &self,
        id: u64,
        term: u64,
        received: Instant,
        now: Instant,
        prompt: Duration,
    ) -> GrantId {
        let grant = GrantId {
            term,
            grant: self.next_grant.fetch_add(1, Ordering::Relaxed),
        };
        if now.saturating_duration_since(received) <= prompt {
            let mut inner = self.lock();
            if let Some(s) = inner.seen.get_mut(&id) {
                s.unacked.get_or_insert((grant, now));
            }
        }
        grant
    }

    /// Marks `id` as being declared down if it has not been well for `down_after` (counting
    /// from `since` at the earliest; see `heard`), and says whether the verdict may be
    /// proposed now: once every lease this leader granted it has run out with `margin` to
    /// spare. A node that hears nothing back still sends heartbeats, and the last ones may
    /// have been granted: from the moment it is marked it gets no more grants, and the
    /// verdict waits until the last of those has ended (a silent node's have long ended).
    /// In one step with `seen_unless_condemned`.
    pub fn condemn_if_silent(
        &self,
        id: u64,
        since: Instant,
        down_after: Duration,
        slack: Duration,
        lease_and_margin: Duration,
    ) -> bool {
        let mut inner = self.lock();
        let seen = inner.seen.get(&id).copied();
        let alive = seen.map_or(since, |s| s.alive_at(slack).max(since));
        if alive.elapsed() < down_after {
            return false;
        }
        inner.condemned.insert(id);
        let last = seen.map_or(since, |s| s.at.max(since));
        last.elapsed() >= lease_and_margin
    }

    /// When `id`'s latest heartbeat was received.
    pub fn last(&self, id: u64) -> Option<Instant> {
        self.lock().seen.get(&id).map(|s| s.at)
    }

    /// When `id` was last known to be well, for the failure detector: its latest heartbeat,
    /// or, if heartbeats received `slack` or more after a grant do not acknowledge it, the
    /// moment of that grant.
    pub fn heard(&self, id: u64, slack: Duration) -> Option<Instant> {
        self.lock().seen.get(&id).map(|s| s.alive_at(slack))
    }

    /// Milliseconds since `id`'s latest heartbeat was received.
    pub fn since_ms(&self, id: u64) -> Option<u64> {
        self.last(id).map(|t| t.elapsed().as_millis() as u64)
    }

    /// Every node's last reported load.
    pub fn loads(&self) -> Vec<(u64, NodeLoad)> {
        self.lock()
            .seen
            .iter()
            .map(|(id, s)| (*id, s.load))
            .collect()
    }

    pub fn pardon(&self, id: u64) {
        self.lock().condemned.remove(&id);
    }

    fn is_condemned(&self, id: u64) -> bool {
        self.lock().condemned.contains(&id)
    }
}

/// The leader's answer to a heartbeat.
pub async fn grant(node: &Node, hb: Heartbeat) -> Result<Value, WireError> {
    let received = Instant::now();
    let condemned = || {
        Err(WireError::new(
            ErrorCode::Unavailable,
            format!("node {} is being declared down; retry", hb.node_id),
        ))
    };
    // Only members are tracked: anything else could grow the table without bound.
    let member = node.state_read().registry.node(hb.node_id).is_some();
    if !member {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("node {} has not joined", hb.node_id),
        ));
    }
    if !node
        .liveness
        .seen_unless_condemned(hb.node_id, received, &hb)
    {
        return condemned();
    }
    let within = Duration::from_millis(node.cfg.failure.lease_ms);
    let term = node.raft.metrics().borrow().current_term;
    let confirmed = node.quorum.confirm_after(received, within).await;
    if node.liveness.is_condemned(hb.node_id) {
        return condemned();
    }
    // Named in the term this node led when it received the heartbeat: a node that lost the
    // lead meanwhile must not name a grant in its successor's term.
    let still = {
        let m = node.raft.metrics();
        let m = m.borrow();
        m.current_term == term && m.current_leader == Some(node.cfg.id)
    };
    match confirmed.filter(|_| still) {
        Some(read_index) => {
            // The node waits up to a lease for its grant: one made in the first half of that
            // reaches it in time unless the way back is cut.
            let grant = node.liveness.issue(hb.node_id, term, received, within / 2);
            node.metrics.granted();
            Ok(json!({
                "granted": true,
                "read_index": read_index,
                "leader": node.cfg.id,
                "lease_ms": node.cfg.failure.lease_ms,
                "grant": grant,
            }))
        }
        None => Err(WireError::new(
            ErrorCode::Unavailable,
            "this node could not confirm it leads; retry",
        )),
    }
}

/// Sends heartbeats until `stopped`, extending this node's lease with each grant.
///
/// One goes every `heartbeat_interval_ms` whether or not the one before was answered: the
/// leader counts a node alive from the heartbeats it receives, and a grant waits for a quorum
/// round, which a loaded cluster may take long to finish. Each heartbeat waits at most the
/// lease for its grant, so about `lease_ms / heartbeat_interval_ms` are in flight at once, and
/// never more than `limits::MAX_HEARTBEATS_IN_FLIGHT`.
pub async fn heartbeat_loop(node: Arc<Node>, stopped: impl Future<Output = ()>) {
    let every = Duration::from_millis(node.cfg.failure.heartbeat_interval_ms);
    let length = Duration::from_millis(node.cfg.failure.lease_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cpu = CpuSampler::default();
    let mut flying = tokio::task::JoinSet::new();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return, // dropping `flying` aborts what is in flight
            Some(done) = flying.join_next(), if !flying.is_empty() => {
                if let Ok((sent, reply)) = done {
                    on_grant(&node, sent, length, reply);
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        // Drops the exports that expired, also on a node that no longer leads.
        node.exports.sweep();
        if flying.len() >= crate::limits::MAX_HEARTBEATS_IN_FLIGHT {
            tracing::debug!("heartbeats in flight at their bound; this one is skipped");
            continue;
        }
        let hb = Heartbeat {
            node_id: node.cfg.id,
            load: NodeLoad {
                running: node.running_agents(),
                cpu_permille: cpu.sample(),
                mem_bytes: crate::procfs::resident_bytes(),
            },
            acked: node.lease.acked(),
            process: node.lease.process(),
        };
        let sent = Instant::now();
        let n = node.clone();
        flying.spawn(async move {
            // No answer within the lease is no use: the lease would already be over.
            let write = n.write_own(super::OwnWrite::Heartbeat(hb));
            (sent, tokio::time::timeout(length, write).await)
        });
    }
}

/// Extends the lease with the grant of a heartbeat sent at `sent`.
fn on_grant(
    node: &Node,
    sent: Instant,
    length: Duration,
    reply: Result<Result<Value, WireError>, tokio::time::error::Elapsed>,
) {
    match reply {
        Ok(Ok(v)) => {
            // Acknowledged in the next heartbeats, even if it extends nothing (it came after
            // the lease it was for had ended). One that comes after `length` is never seen.
            if let Ok(grant) = serde_json::from_value::<GrantId>(v["grant"].clone()) {
                node.lease.ack(grant);
            }
            match v["read_index"].as_u64() {
                Some(index) => node.lease.renew(sent, length, index),
                None => tracing::warn!(reply = %v, "a heartbeat grant without a read index"),
            }
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat not granted"),
        Err(_) => tracing::debug!("heartbeat not answered within the lease"),
    }
}

/// CPU use of this process between two samples, from `/proc/self/stat` (Linux; 0 elsewhere).
#[derive(Default)]
struct CpuSampler {
    last: Option<(Instant, u64)>,
}

impl CpuSampler {
    fn sample(&mut self) -> u32 {
        let Some(ticks) = crate::procfs::cpu_ticks() else {
            return 0;
        };
        let now = Instant::now();
        let out = match self.last {
            Some((t, before)) => {
                let elapsed_ms = now.duration_since(t).as_millis().max(1) as u64;
                // Clock ticks are 10 ms on Linux (USER_HZ = 100).
                let used_ms = ticks.saturating_sub(before) * 10;
                (used_ms * 1000 / elapsed_ms) as u32
            }
            None => 0,
        };
        self.last = Some((now, ticks));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: work under `while_valid` gets all the time it needs while the lease is renewed,
    /// and is cut when the lease really ends, never polled past that moment.
    #[tokio::test]
    async fn work_under_the_lease_runs_through_renewals_and_stops_at_its_end() {
        let l = Arc::new(Lease::default());
        let length = Duration::from_millis(200);
        l.renew(Instant::now(), length, 0);
        let term = l.term();
        // Renewed every 20 ms for about 600 ms, three lease lengths: a 400 ms job finishes.
        let renewer = {
            let l = l.clone();
            tokio::spawn(async move {
                for _ in 0..30 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    l.renew(Instant::now(), length, 0);
                }
            })
        };
        let began = Instant::now();
        let done = l
            .while_valid(term, tokio::time::sleep(Duration::from_millis(400)))
            .await;
        assert_eq!(done, Some(()), "renewals keep the work going");
        assert!(began.elapsed() >= Duration::from_millis(400));
        renewer.await.unwrap();
        // No more renewals: a job longer than what is left is cut at the lease's end, and
        // every poll it got came before that end.
        let end = l.end_of(term).unwrap();
        let last_poll = Arc::new(Mutex::new(None));
        let job = {
            let last_poll = last_poll.clone();
            let mut sleep = Box::pin(tokio::time::sleep(Duration::from_secs(10)));
            std::future::poll_fn(move |cx| {
                *last_poll.lock().unwrap() = Some(Instant::now());
                sleep.as_mut().poll(cx)
            })
        };
        let cut = tokio::time::timeout(Duration::from_secs(5), l.while_valid(term, job)).await;
        assert_eq!(cut, Ok(None), "cut by the lease, long before the timeout");
        let polled = last_poll.lock().unwrap().expect("polled while valid");
        assert!(polled < end, "never polled at or past the lease's end");
    }

    /// Goal: heartbeats of one node handled out of order never move its last receipt back:
    /// a verdict counted from an earlier receipt could otherwise come before the end of a
    /// lease granted for a later one.
    #[test]
    fn a_heartbeat_recorded_late_never_moves_the_last_receipt_back() {
        let live = Liveness::default();
        let later = Instant::now();
        let earlier = later - Duration::from_millis(900);
        let hb = Heartbeat {
            node_id: 2,
            load: NodeLoad::default(),
            acked: None,
            process: 1,
        };
        assert!(live.seen_unless_condemned(2, later, &hb));
        assert!(live.seen_unless_condemned(2, earlier, &hb));
        assert_eq!(live.last(2), Some(later));
        let since = later - Duration::from_secs(10);
        let ms = Duration::from_millis;
        assert!(
            !live.condemn_if_silent(2, since, ms(500), ms(500), ms(0)),
            "heard from 0 ms ago, not 900"
        );
    }

    /// Goal: a node whose heartbeats arrive but never acknowledge the grants sent back (the
    /// way back is cut) counts as silent from the first grant it missed, and is declared down
    /// only once every lease granted to it has run out; one that acknowledges stays well.
    #[test]
    fn a_node_that_hears_no_grant_is_silent_from_the_first_it_missed() {
        let ms = Duration::from_millis;
        let live = Liveness::default();
        let hb = |acked: Option<GrantId>| Heartbeat {
            node_id: 0,
            load: NodeLoad::default(),
            acked,
            process: 1,
        };
        // Heartbeats every 100 ms for 4 s, the latest 1.35 s ago.
        let t0 = Instant::now() - ms(5_350);
        let since = t0 - ms(10_000);
        let grant = |id, at: Instant| live.issue_at(id, 7, at, at + ms(5), ms(500));
        // Node 2 acknowledges each grant in its next heartbeat; node 3 never does.
        assert!(live.seen_unless_condemned(2, t0, &hb(None)));
        assert!(live.seen_unless_condemned(3, t0, &hb(None)));
        let mut g2 = grant(2, t0);
        let g3 = grant(3, t0);
        assert!(g3 > g2, "grants are numbered in the order they are made");
        let made = t0 + ms(5);
        for step in 1..=40u64 {
            let at = t0 + ms(100 * step);
            assert!(live.seen_unless_condemned(2, at, &hb(Some(g2))));
            assert!(live.seen_unless_condemned(3, at, &hb(None)));
            g2 = grant(2, at);
            grant(3, at);
        }
        let latest = t0 + ms(4_000);
        assert_eq!(
            live.last(3),
            Some(latest),
            "its heartbeats are still received"
        );
        // Node 2's heartbeats acknowledge what it got: it is heard at its latest.
        assert_eq!(live.heard(2, ms(500)), Some(latest));
        // Node 3 is counted from the first grant it never acknowledged.
        assert_eq!(live.heard(3, ms(500)), Some(made));
        assert_eq!(
            live.heard(3, ms(4_500)),
            Some(latest),
            "no heartbeat came that long after the grant: no evidence yet"
        );
        // Down 2 s after that grant, but every grant it got since lasts 1 s from its
        // heartbeat: marked now, the verdict waits for the last lease to end.
        let down_after = ms(2_000);
        assert!(!live.condemn_if_silent(3, since, down_after, ms(500), ms(60_000)));
        assert!(live.is_condemned(3), "no grant for it from now on");
        assert!(
            !live.seen_unless_condemned(3, Instant::now(), &hb(None)),
            "its heartbeats are refused"
        );
        assert!(live.condemn_if_silent(3, since, down_after, ms(500), ms(1_300)));
        assert!(!live.condemn_if_silent(2, since, down_after, ms(500), ms(1_300)));
        assert!(!live.is_condemned(2));
        // A later acknowledgement clears an older grant, never a newer one.
        let live = Liveness::default();
        assert!(live.seen_unless_condemned(4, t0, &hb(None)));
        let old = GrantId { term: 6, grant: 99 };
        let g = live.issue_at(4, 7, t0, t0, ms(500));
        assert!(live.seen_unless_condemned(4, t0 + ms(900), &hb(Some(old))));
        assert_eq!(
            live.heard(4, ms(500)),
            Some(t0),
            "an earlier term's grant acks nothing"
        );
        assert!(live.seen_unless_condemned(4, t0 + ms(950), &hb(Some(g))));
        assert_eq!(live.heard(4, ms(500)), Some(t0 + ms(950)));
        // A restarted node's new process owes nothing its previous one did not acknowledge.
        assert!(live.seen_unless_condemned(6, t0, &hb(None)));
        live.issue_at(6, 7, t0, t0, ms(500));
        assert!(live.seen_unless_condemned(6, t0 + ms(900), &hb(None)));
        assert_eq!(live.heard(6, ms(500)), Some(t0));
        let restarted = Heartbeat {
            process: 2,
            ..hb(None)
        };
        assert!(live.seen_unless_condemned(6, t0 + ms(950), &restarted));
        assert_eq!(live.heard(6, ms(500)), Some(t0 + ms(950)));
        // A grant made long after its heartbeat is not waited for.
        let late = Instant::now() - ms(800);
        assert!(live.seen_unless_condemned(5, late, &hb(None)));
        live.issue(5, 7, late, ms(500));
        assert!(live.seen_unless_condemned(5, Instant::now(), &hb(None)));
        assert!(live.heard(5, ms(1)).unwrap() > late + ms(700));
    }

    #[test]
    fn a_lease_only_grows_and_ends_on_time() {
        let l = Lease::default();
        assert!(!l.valid(), "no lease before the first grant");
        let t = Instant::now();
        l.renew(t, Duration::from_secs(60), 5);
        assert!(l.valid());
        l.renew(t - Duration::from_secs(120), Duration::from_secs(1), 3);
        assert!(l.valid(), "an older grant does not shorten it");
        assert_eq!(l.min_applied(), 5);
        let expired = Lease::default();
        expired.renew(t - Duration::from_secs(2), Duration::from_secs(1), 0);
        assert!(!expired.valid());
    }

    #[test]
    fn a_grant_after_a_lapse_starts_a_new_term_and_ends_the_old_one() {
        let l = Lease::default();
        let expiries = l.expiries();
        let t = Instant::now();
        l.renew(t, Duration::from_secs(60), 1);
        let first = l.term();
        assert!(l.valid_in(first));
        // Renewals while the lease holds keep the term.
        l.renew(t + Duration::from_millis(1), Duration::from_secs(60), 2);
        assert_eq!(l.term(), first);
        assert!(l.valid_in(first));

        // A lease that ran out (as after a pause), then a fresh grant.
        let lapsing = Lease::default();
        let short = Duration::from_millis(30);
        lapsing.renew(Instant::now(), short, 1);
        let old = lapsing.term();
        let old_end = lapsing.end_of(old).expect("granted");
        while Instant::now() < old_end {
            std::thread::yield_now();
        }
        let mut woken = lapsing.expiries();
        woken.mark_unchanged();
        lapsing.renew(Instant::now(), Duration::from_secs(60), 2);
        assert!(lapsing.valid(), "the node holds a lease again");
        assert!(
            !lapsing.valid_in(old),
            "an agent of the lapsed term must not carry on"
        );
        assert!(lapsing.valid_in(lapsing.term()));
        assert_eq!(
            lapsing.end_of(old),
            Some(old_end),
            "the old term ended then"
        );
        assert!(
            woken.has_changed().unwrap_or(false),
            "agents of the old term are woken to stop"
        );
        assert!(
            !expiries.has_changed().unwrap_or(true),
            "other leases untouched"
        );
    }

    #[test]
    fn this_process_reports_its_memory_and_cpu() {
        assert!(crate::procfs::resident_bytes() > 0);
        let mut s = CpuSampler::default();
        s.sample();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(s.sample() < 100_000);
    }
}

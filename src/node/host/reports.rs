//! The host's writes through Raft: agents' status reports (coalesced per agent and batched),
//! hand-offs of migrating agents, and forgetting temporary agents that ended. One writer task
//! owns them, so a slow or leaderless cluster delays these writes, never the host loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use uuid::Uuid;

use super::sleep_until_opt;
use crate::command::{FinishAgents, Handoff, ReportAgents};
use crate::limits::{
    FINISH_BATCH_BYTES, FORGET_TRIES, HANDOFF_BATCH_BYTES, HANDOFF_ITEM_OVERHEAD_BYTES,
    HANDOFF_TRIES, REPORTS_PER_WRITE, REPORT_GATHER_MS, REPORT_INTERVAL_MS,
};
use crate::node::{Node, OwnWrite};
use crate::protocol::ErrorCode;
use crate::registry::{AgentReport, AgentStatus, FinishAgent, HandoffItem};
use crate::retry::Backoff;

/// Reports waiting for the writer: the latest per agent. Coalescing them instead of queueing
/// one per change bounds this to one entry per local agent, and nothing is ever dropped.
#[derive(Default)]
pub(super) struct Pending {
    reports: std::sync::Mutex<BTreeMap<Uuid, AgentReport>>,
    /// Agents that ended for good, waiting to be recorded (`finish_agents`): at most one per
    /// local agent, written in batches with the reports.
    finishes: std::sync::Mutex<BTreeMap<Uuid, FinishAgent>>,
    notify: tokio::sync::Notify,
}

impl Pending {
    pub(super) fn add(&self, r: AgentReport) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        match reports.get_mut(&r.agent) {
            Some(old) if old.epoch == r.epoch => {
                // What ran before this report still ran (a `running` report is overwritten);
                // a failed first start after a run reported here is no first start.
                old.ran |= r.ran || old.status == AgentStatus::Running || old.restarts > 0;
                old.first_start = r.first_start && !old.ran;
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

    /// Queues an agent's finish (the latest for an agent wins: one run ends once).
    pub(super) fn finish(&self, f: FinishAgent) {
        let mut finishes = self.finishes.lock().unwrap_or_else(|p| p.into_inner());
        finishes.insert(f.agent, f);
        drop(finishes);
        self.notify.notify_one();
    }

    /// Takes finishes for one write: at most `REPORTS_PER_WRITE`, and `FINISH_BATCH_BYTES`
    /// of results and errors (one at least).
    fn take_finishes(&self) -> Vec<FinishAgent> {
        let mut finishes = self.finishes.lock().unwrap_or_else(|p| p.into_inner());
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while out.len() < REPORTS_PER_WRITE {
            let Some(entry) = finishes.first_entry() else {
                break;
            };
            let f = entry.get();
            let size = 256
                + f.error.as_ref().map_or(0, String::len)
                + f.result
                    .as_ref()
                    .map_or(0, |r| serde_json::to_vec(r).map_or(0, |b| b.len()));
            if !out.is_empty() && bytes + size > FINISH_BATCH_BYTES {
                break;
            }
            bytes += size;
            out.push(entry.remove());
        }
        out
    }

    /// Puts back finishes that could not be written, under any newer ones.
    fn restore_finishes(&self, batch: Vec<FinishAgent>) {
        let mut finishes = self.finishes.lock().unwrap_or_else(|p| p.into_inner());
        for f in batch {
            finishes.entry(f.agent).or_insert(f);
        }
    }

    /// Takes up to `max` reports, but none of an agent whose finish waits: that report goes
    /// after the finish, in a later flush (the host queues a finish before the report of the
    /// same end, so a report taken here never has its finish still to come).
    fn take(&self, max: usize) -> Vec<AgentReport> {
        let finishing: Vec<Uuid> = {
            let finishes = self.finishes.lock().unwrap_or_else(|p| p.into_inner());
            finishes.keys().copied().collect()
        };
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut after: Option<Uuid> = None;
        while out.len() < max {
            let next = match after {
                None => reports.keys().next().copied(),
                Some(a) => reports
                    .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .next()
                    .map(|(k, _)| *k),
            };
            let Some(id) = next else { break };
            if finishing.binary_search(&id).is_ok() {
                after = Some(id);
                continue;
            }
            if let Some(r) = reports.remove(&id) {
                out.push(r);
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
                    // Whatever ran before the newer report still ran.
                    newer.ran |= r.ran || r.status == AgentStatus::Running || r.restarts > 0;
                    newer.first_start &= !newer.ran;
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

/// A write of the host's queue (finishes go with the reports, in `Pending`).
pub(super) enum HostWrite {
    /// A temporary agent on another node that a strategy stopped is forgotten (`stop_agent`).
    Forget(Uuid),
}

/// Sends the host's reports (batched), finishes and forgets through Raft, retrying while the
/// cluster has no leader. Ends when the host is gone, after one last attempt to send what is
/// pending.
pub(super) async fn write_loop(
    node: Arc<Node>,
    pending: Arc<Pending>,
    mut forget: mpsc::Receiver<HostWrite>,
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
                let mut at = Instant::now() + Duration::from_millis(REPORT_GATHER_MS);
                if let Some(last) = last_reports {
                    if pending.len() < REPORTS_PER_WRITE {
                        at = at.max(last + Duration::from_millis(REPORT_INTERVAL_MS));
                    }
                }
                due = Some(due.map_or(at, |d| d.min(at)));
                continue;
            }
            _ = sleep_until_opt(due) => due = None,
            f = forget.recv() => match f {
                Some(HostWrite::Forget(id)) => forget_agent(&node, id).await,
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
                let mut next = None;
                let batch = crate::node::batch::gather(
                    first,
                    &mut handoffs,
                    &mut next,
                    REPORTS_PER_WRITE,
                    HANDOFF_BATCH_BYTES,
                    size,
                );
                send_handoff(&node, batch).await;
                if let Some(it) = next {
                    send_handoff(&node, vec![it]).await;
                }
            }
        }
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        // First the agents that are done, then the reports of how agents ended: a reader never
        // sees an agent ended for good without its result. A retry after a timeout is safe: a
        // finish applied already is stale the second time.
        loop {
            let batch = pending.take_finishes();
            if batch.is_empty() {
                break;
            }
            let write = OwnWrite::Finish(FinishAgents {
                items: batch.clone(),
            });
            match node.write_own(write).await {
                Ok(_) => backoff.reset(),
                Err(e) if open && matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                    pending.restore_finishes(batch);
                    backoff.wait().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agents' finishes were refused");
                }
            }
        }
        loop {
            let batch = pending.take(REPORTS_PER_WRITE);
            if batch.is_empty() {
                break;
            }
            let body = ReportAgents {
                reports: batch.clone(),
            };
            last_reports = Some(Instant::now());
            match node.write_own(OwnWrite::Reports(body)).await {
                Ok(_) => backoff.reset(),
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
                    backoff.wait().await;
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
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    // About five minutes without a leader.
    for _ in 0..HANDOFF_TRIES {
        let write = OwnWrite::Handoff(Handoff {
            items: items.clone(),
        });
        match node.write_own(write).await {
            Ok(_) => return,
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                backoff.wait().await;
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
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
    for _ in 0..FORGET_TRIES {
        match node.write_own(OwnWrite::Forget(id)).await {
            Ok(_) => return,
            Err(e) if e.code == ErrorCode::NotFound => return,
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                backoff.wait().await;
            }
            Err(e) => {
                tracing::warn!(agent = %id, error = %e, "could not forget a temporary agent");
                return;
            }
        }
    }
    tracing::warn!(agent = %id, "gave up forgetting a temporary agent; stop it with stop_agent");
}

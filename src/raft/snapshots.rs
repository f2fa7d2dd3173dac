//! When a node builds a snapshot: once `raft.snapshot_after_entries` entries were applied since
//! the last one, or once the entries appended since then take `raft.snapshot_after_bytes`,
//! whichever comes first. openraft's own policy counts entries only (it is set to `Never`),
//! so a few large entries (checkpoints, groups of 10,000) could grow the log, and a restart's
//! replay, without bound. Every node decides for itself, as openraft does.
//!
//! And how much log a node keeps behind its snapshot: at most
//! `raft.keep_entries_after_snapshot` entries and `raft.keep_bytes_after_snapshot` bytes; this
//! loop asks Raft to purge the rest once per new snapshot (openraft's own purge, by entries
//! only, is off: its purges could go backwards from these). A log of few, large entries (a
//! million agents spawned in a hundred groups is a few hundred entries) was otherwise never
//! purged, and a node joining replayed all of it (16 s at a million agents) instead of
//! installing the snapshot (a few).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits;
use crate::raft::store::LogBytes;
use crate::raft::typ::Raft;

/// When to snapshot and what log to keep behind one (`RaftConfig`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub after_entries: u64,
    pub after_bytes: u64,
    pub keep_entries: u64,
    pub keep_bytes: u64,
}

/// Asks Raft for a snapshot whenever the log has grown past either bound, until `stopped`.
/// After asking, it waits for the snapshot to appear (or `SNAPSHOT_RETRIGGER_MS`) before it
/// may ask again, so a slow build is not asked for twice. Once per new snapshot, it asks Raft
/// to purge the log behind it down to `keep_entries` entries and `keep_bytes` bytes.
pub async fn trigger_loop(
    raft: Raft,
    log: Arc<LogBytes>,
    policy: Policy,
    stopped: impl Future<Output = ()>,
) {
    let Policy {
        after_entries,
        after_bytes,
        keep_entries,
        keep_bytes,
    } = policy;
    let mut weighed: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(limits::SNAPSHOT_CHECK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked: Option<(Option<u64>, Instant)> = None;
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let (applied, snapshot, purged) = {
            let m = raft.metrics();
            let m = m.borrow();
            let index = |l: Option<openraft::LogId<u64>>| l.map(|l| l.index);
            (index(m.last_applied), index(m.snapshot), index(m.purged))
        };
        if let Some(at) = snapshot.filter(|at| weighed != Some(*at)) {
            weighed = Some(at);
            match log.purge_point(at, keep_entries, keep_bytes) {
                Ok(Some(upto)) if Some(upto) > purged => {
                    tracing::debug!(upto, snapshot = at, "purging the log behind a snapshot");
                    if let Err(e) = raft.trigger().purge_log(upto).await {
                        tracing::warn!(error = %e, "could not ask Raft to purge the log");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not weigh the log to purge"),
            }
        }
        if let Some((at, when)) = asked {
            let retrigger = Duration::from_millis(limits::SNAPSHOT_RETRIGGER_MS);
            if snapshot == at && when.elapsed() < retrigger {
                continue;
            }
            asked = None;
        }
        let entries = applied.unwrap_or(0).saturating_sub(snapshot.unwrap_or(0));
        let bytes = log.since_snapshot();
        if entries >= after_entries || bytes >= after_bytes {
            tracing::debug!(entries, bytes, "asking for a snapshot");
            match raft.trigger().snapshot().await {
                Ok(()) => asked = Some((snapshot, Instant::now())),
                Err(e) => tracing::warn!(error = %e, "could not ask Raft for a snapshot"),
            }
        }
    }
}

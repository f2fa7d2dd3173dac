//! When a node builds a snapshot: once `raft.snapshot_after_entries` entries were applied since
//! the last one, or once the entries appended since then take `raft.snapshot_after_bytes`,
//! whichever comes first. openraft's own policy counts entries only (it is set to `Never`),
//! so a few large entries (checkpoints, groups of 10,000) could grow the log, and a restart's
//! replay, without bound. Every node decides for itself, as openraft does.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits;
use crate::raft::store::LogBytes;
use crate::raft::typ::Raft;

/// Asks Raft for a snapshot whenever the log has grown past either bound, until `stopped`.
/// After asking, it waits for the snapshot to appear (or `SNAPSHOT_RETRIGGER_MS`) before it
/// may ask again, so a slow build is not asked for twice.
pub async fn trigger_loop(
    raft: Raft,
    log: Arc<LogBytes>,
    after_entries: u64,
    after_bytes: u64,
    stopped: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(limits::SNAPSHOT_CHECK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked: Option<(Option<u64>, Instant)> = None;
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let (applied, snapshot) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.last_applied.map(|l| l.index), m.snapshot.map(|l| l.index))
        };
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

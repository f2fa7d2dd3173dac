//! Availability during each fault: the operations the clients completed with an answer per
//! second while the fault lasted, against the rate while no fault was in effect. A report,
//! not a guarantee: safety is what the checkers judge; this says what a fault cost.

use serde::Serialize;

use crate::history::{Op, Outcome};
use crate::world::FaultRecord;

/// One fault's figures.
#[derive(Debug, Clone, Serialize)]
pub struct During {
    pub kind: String,
    pub target: String,
    pub start_ms: u64,
    pub ms: u64,
    /// Operations that completed with a result, per second.
    pub ok_per_sec: f64,
    /// Operations answered at all (a result or a definite refusal), per second.
    pub answered_per_sec: f64,
    /// `ok_per_sec` over the fault-free rate.
    pub ratio: f64,
}

/// The fault-free rate and each lasting fault's, from operations completed in `[0, end_ms)`.
pub fn report(ops: &[Op], faults: &[FaultRecord], end_ms: u64) -> (f64, Vec<During>) {
    let windows: Vec<(u64, u64)> = faults
        .iter()
        .filter_map(|f| f.healed_ms.map(|h| (f.start_ms, h.min(end_ms))))
        .filter(|(s, e)| e > s)
        .collect();
    let in_fault = |t: u64| windows.iter().any(|(s, e)| t >= *s && t < *e);
    // Time with no fault in effect, in 10 ms steps (bounded by the run's length).
    let free_ms = (0..end_ms / 10).filter(|i| !in_fault(i * 10)).count() as u64 * 10;
    let ok = |o: &Op| matches!(o.outcome, Outcome::Ok { .. });
    let answered = |o: &Op| !matches!(o.outcome, Outcome::Unknown { .. });
    let free_ok = ops
        .iter()
        .filter(|o| o.complete_ms < end_ms && !in_fault(o.complete_ms) && ok(o))
        .count();
    let free_rate = free_ok as f64 * 1000.0 / free_ms.max(1) as f64;
    let during = faults
        .iter()
        .filter_map(|f| {
            let end = f.healed_ms?.min(end_ms);
            let ms = end.checked_sub(f.start_ms).filter(|ms| *ms > 0)?;
            let within = |o: &&Op| o.complete_ms >= f.start_ms && o.complete_ms < end;
            let n_ok = ops.iter().filter(within).filter(|o| ok(o)).count();
            let n_answered = ops.iter().filter(within).filter(|o| answered(o)).count();
            let ok_per_sec = n_ok as f64 * 1000.0 / ms as f64;
            Some(During {
                kind: f.kind.clone(),
                target: f.target.clone(),
                start_ms: f.start_ms,
                ms,
                ok_per_sec,
                answered_per_sec: n_answered as f64 * 1000.0 / ms as f64,
                ratio: ok_per_sec / free_rate.max(1e-9),
            })
        })
        .collect();
    (free_rate, during)
}

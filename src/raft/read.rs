//! Read indexes that hold across a leader's restart.
//!
//! openraft answers "up to where must a read see?" with `max(the leader's first entry of its
//! term, its committed index)`. A node that restarts while its saved vote says it leads resumes
//! leading in the same term without an election (openraft 0.9's `Engine::startup`). Its first
//! entry of the term is then old, and its committed index is only what it last saved (the
//! store does not flush it): entries a quorum holds, which clients were told are written, can
//! lie above both. A read served at that index would miss them (found by
//! `a_late_node_catches_up_from_a_chunked_snapshot`, which kills every node right after the
//! last write). [`ReadFloor`] raises every read index to the last log index the node had when
//! it first confirmed its leadership in the term. For a normally elected leader that is its
//! first entry of the term, which openraft waits for anyway, so it costs nothing there.

use std::sync::Mutex;

use super::typ::{LogId, Raft};

/// The lowest read index of this node's current term as leader.
#[derive(Debug, Default)]
pub struct ReadFloor {
    /// (term, last log index when the term's first read index was asked for).
    seen: Mutex<(u64, u64)>,
}

impl ReadFloor {
    /// `read` (openraft's read log id, just confirmed with a quorum) raised to the floor of the
    /// current term.
    pub fn raise(&self, raft: &Raft, read: Option<LogId>) -> u64 {
        let (term, last) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            (m.current_term, m.last_log_index.unwrap_or(0))
        };
        let floor = self.floor(term, last);
        read.map_or(0, |l| l.index).max(floor)
    }

    /// The floor for `term`, fixed at `last` the first time the term is seen.
    fn floor(&self, term: u64, last: u64) -> u64 {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0 != term {
            *seen = (term, last);
        }
        seen.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_fixed_per_term_at_the_first_look() {
        let f = ReadFloor::default();
        assert_eq!(f.floor(3, 91), 91);
        // Later entries of the same term do not raise it: they are covered by committed.
        assert_eq!(f.floor(3, 120), 91);
        // A new term sets a new floor.
        assert_eq!(f.floor(4, 130), 130);
    }
}

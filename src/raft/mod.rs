//! Raft glue: the type configuration, the sled store, the NATS network client and the RPC
//! server. Membership changes live in `node::membership`, next to the commands that drive them.

pub mod election;
pub mod network;
pub mod read;
pub mod server;
pub mod snapshot_files;
pub mod snapshots;
pub mod store;
pub mod typ;

/// The highest commit index this node has seen a leader announce: in the AppendEntries it
/// received (a follower) or sent (the leader). openraft 0.9's metrics have no commit index;
/// this is it, as of the last AppendEntries, never below what this node applied.
#[derive(Debug, Default)]
pub struct CommitIndex(std::sync::atomic::AtomicU64);

impl CommitIndex {
    /// Notes a leader's commit index.
    pub fn saw(&self, index: Option<typ::LogId>) {
        if let Some(l) = index {
            self.0
                .fetch_max(l.index, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The highest seen, or `applied` if that is higher (a lone node sends no AppendEntries).
    pub fn get(&self, applied: u64) -> u64 {
        self.0
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(applied)
    }
}

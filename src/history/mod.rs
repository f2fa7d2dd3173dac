//! The cluster's lifecycle history in a JetStream stream (`warden-<cluster>-history`).
//!
//! Every node writes the events of every entry it applies to its `outbox` on disk; the
//! leader publishes its outbox into the stream (`publish`), each event once and in log order,
//! and `agent_history`/`supervisor_history` read it back (`query`), also for agents and
//! supervisors long gone. Core NATS `evt.*` stays for live watchers; this is the durable
//! record, pruned by the stream's `max_msgs`, `max_age` and `max_bytes`.
//!
//! Without JetStream on the server, events wait in each outbox (up to
//! `[history] outbox_max_bytes`), the history commands answer `unavailable`, and everything
//! else works.

pub mod outbox;
pub mod publish;
pub mod query;

use serde::{Deserialize, Serialize};

use outbox::Pos;

/// Version of the history body, carried as `v` (the live event's format, with `index`, `pos`
/// and `supervisor`, without the publishing node).
pub const HISTORY_VERSION: u32 = 1;

/// The node's `[history]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Keep the history: write the outbox, and publish it while leading. Every node of a
    /// cluster should agree.
    pub enabled: bool,
    /// The stream's replicas (on a NATS cluster with JetStream, up to 5), when the leader
    /// creates it; an existing stream keeps its own settings.
    pub replicas: usize,
    /// The stream keeps at most this many events (-1: no limit).
    pub max_msgs: i64,
    /// The stream keeps events at most this long, in seconds (0: no limit).
    pub max_age_s: u64,
    /// The stream keeps at most this many bytes (-1: no limit).
    pub max_bytes: i64,
    /// A node's outbox holds at most this many bytes of events the stream does not hold yet;
    /// past it the oldest are dropped, and the stream gets a `gap` event in their place.
    pub outbox_max_bytes: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            replicas: 1,
            max_msgs: 1_000_000,
            max_age_s: 7 * 24 * 3600,
            max_bytes: 1 << 30,
            outbox_max_bytes: 256 << 20,
        }
    }
}

impl HistoryConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=5).contains(&self.replicas),
            "history.replicas must be 1 to 5"
        );
        anyhow::ensure!(
            self.max_msgs == -1 || self.max_msgs > 0,
            "history.max_msgs must be positive, or -1 for no limit"
        );
        anyhow::ensure!(
            self.max_bytes == -1 || self.max_bytes > 0,
            "history.max_bytes must be positive, or -1 for no limit"
        );
        anyhow::ensure!(
            self.outbox_max_bytes >= 2 * outbox::SEGMENT_BYTES,
            "history.outbox_max_bytes must be at least {}",
            2 * outbox::SEGMENT_BYTES
        );
        Ok(())
    }
}

/// The `Nats-Msg-Id` of the event at `p`: `<index>.<pos>`.
pub fn msg_id(p: Pos) -> String {
    p.to_string()
}

/// The position a `Nats-Msg-Id` names.
pub fn parse_msg_id(id: &str) -> Option<Pos> {
    let (index, pos) = id.split_once('.')?;
    Some(Pos::new(index.parse().ok()?, pos.parse().ok()?))
}

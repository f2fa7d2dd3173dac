//! Records of the registry and the validated shapes of the commands that change it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Outcome;
use crate::error::{ErrorCode, WireError};
use crate::limits;
pub use crate::names::{validate_labels, validate_name, validate_request_id};
pub use crate::supervision::{Backoff, Strategy};

/// Name of the supervisor that always exists at the top of the tree.
pub const ROOT: &str = "root";

/// A node as the registry knows it. Its Raft role lives in the Raft membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Agent kinds the node can run.
    #[serde(default)]
    pub kinds: Vec<String>,
    pub status: NodeStatus,
    /// Agents it may hold; 0 is unlimited.
    #[serde(default)]
    pub capacity: u32,
    /// An operator asked to move everything away: it takes no new agents, even after a
    /// restart, until the drain is cancelled.
    #[serde(default)]
    pub drain: bool,
    /// What it last reported about itself.
    #[serde(default)]
    pub load: NodeLoad,
    pub joined_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Per-entity event sequence number.
    pub seq: u64,
}

/// Lifecycle of a node as recorded in the registry. Only `up` nodes take new agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Joining,
    Up,
    /// Silent for `failure.suspect_after_ms`: keeps its agents, takes no new ones.
    Suspect,
    /// Silent for `failure.down_after_ms`: its agents were placed elsewhere.
    Down,
    /// Alive, but being emptied on an operator's request.
    Draining,
    /// Gone for good.
    Left,
}

impl NodeStatus {
    /// Every status, in declaration order.
    pub const ALL: [NodeStatus; 6] = [
        NodeStatus::Joining,
        NodeStatus::Up,
        NodeStatus::Suspect,
        NodeStatus::Down,
        NodeStatus::Draining,
        NodeStatus::Left,
    ];

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Joining => "joining",
            NodeStatus::Up => "up",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Down => "down",
            NodeStatus::Draining => "draining",
            NodeStatus::Left => "left",
        }
    }
}

/// A node's own view of its load, sent with its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NodeLoad {
    /// Agents running there.
    pub running: u32,
    /// CPU use of the node process, in thousandths of one core.
    pub cpu_permille: u32,
    /// Resident memory of the node process, in bytes.
    pub mem_bytes: u64,
}

/// Where a supervisor's children run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SupervisorPlacement {
    /// Children are placed one by one, each where it fits best.
    #[default]
    Spread,
    /// The whole subtree runs on one node.
    Colocate,
}

/// A child of a supervisor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Child {
    Supervisor { name: String },
    Agent { id: Uuid },
}

/// A supervisor record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Supervisor {
    pub id: Uuid,
    pub name: String,
    /// `None` only for `root`.
    pub parent: Option<String>,
    pub strategy: Strategy,
    pub max_restarts: u32,
    pub max_seconds: u32,
    pub backoff: Backoff,
    pub placement: SupervisorPlacement,
    /// Start order among its siblings: children are ordered by position. Kept on the child
    /// rather than as a list on the parent, so adding a child never rewrites the parent.
    pub position: u64,
    /// The node that runs this supervisor's children; `None` for `root`, whose children are
    /// placed one by one.
    #[serde(default)]
    pub node: Option<u64>,
    pub created_at: DateTime<Utc>,
    /// Per-entity event sequence number.
    pub seq: u64,
}

impl Supervisor {
    /// The root supervisor: one_for_one, spread, never stops.
    pub fn root() -> Supervisor {
        Supervisor {
            id: Uuid::nil(),
            name: ROOT.to_string(),
            parent: None,
            strategy: Strategy::OneForOne,
            max_restarts: OTP_MAX_RESTARTS,
            max_seconds: OTP_MAX_SECONDS,
            backoff: Backoff::default(),
            placement: SupervisorPlacement::Spread,
            position: 0,
            node: None,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            seq: 0,
        }
    }
}

/// OTP's default intensity: 1 restart ...
pub const OTP_MAX_RESTARTS: u32 = 1;
/// ... within 5 seconds.
pub const OTP_MAX_SECONDS: u32 = 5;

pub(super) fn otp_max_restarts() -> u32 {
    OTP_MAX_RESTARTS
}

pub(super) fn otp_max_seconds() -> u32 {
    OTP_MAX_SECONDS
}

/// `create_supervisor`: both the wire request and the log command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSupervisor {
    pub name: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default = "otp_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "otp_max_seconds")]
    pub max_seconds: u32,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default)]
    pub placement: SupervisorPlacement,
    /// Stripped off before the command is logged: the request id travels in [`super::Stamped`].
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

impl CreateSupervisor {
    /// Checks everything that does not depend on the registry's state.
    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)?;
        if let Some(p) = &self.parent {
            validate_name("parent", p)?;
        }
        if self.max_seconds == 0 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "max_seconds must be at least 1",
            ));
        }
        if self.max_restarts > limits::MAX_RESTARTS {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("max_restarts is at most {}", limits::MAX_RESTARTS),
            ));
        }
        if self.max_seconds > limits::MAX_INTENSITY_SECONDS {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("max_seconds is at most {}", limits::MAX_INTENSITY_SECONDS),
            ));
        }
        self.backoff.validate()
    }
}

/// A remembered `request_id`: the command it was used for (its name and a fingerprint), when,
/// and the typed outcome it got, enough to answer a retry the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredRequestRecord")]
pub struct RequestRecord {
    pub command: String,
    /// `outcome::fingerprint` of the command; 0 for a record of version 1, which had none.
    pub fingerprint: u64,
    pub time: DateTime<Utc>,
    pub outcome: Outcome,
}

/// A `RequestRecord` as snapshots hold it, of either version: version 1 kept the rendered
/// reply (`reply`), version 2 the typed outcome and a fingerprint.
#[derive(Deserialize)]
struct StoredRequestRecord {
    command: String,
    #[serde(default)]
    fingerprint: u64,
    time: DateTime<Utc>,
    #[serde(default)]
    outcome: Option<Outcome>,
    #[serde(default)]
    reply: Option<Result<serde_json::Value, WireError>>,
}

impl From<StoredRequestRecord> for RequestRecord {
    fn from(r: StoredRequestRecord) -> RequestRecord {
        let outcome = match (r.outcome, r.reply) {
            (Some(o), _) => o,
            (None, Some(reply)) => reply
                .map(super::Applied::Legacy)
                .map_err(super::Refused::Legacy),
            (None, None) => Err(super::Refused::Legacy(WireError::new(
                ErrorCode::Internal,
                "this request_id's outcome was not kept; use a fresh one",
            ))),
        };
        RequestRecord {
            command: r.command,
            fingerprint: r.fingerprint,
            time: r.time,
            outcome,
        }
    }
}

/// The page size of a listing: `limit` (1 to `limits::MAX_PAGE`), by default the maximum.
pub fn page_limit(limit: Option<usize>) -> Result<usize, WireError> {
    match limit {
        None => Ok(limits::MAX_PAGE),
        Some(l) if (1..=limits::MAX_PAGE).contains(&l) => Ok(l),
        Some(_) => Err(WireError::new(
            ErrorCode::BadRequest,
            format!("limit must be between 1 and {}", limits::MAX_PAGE),
        )),
    }
}

/// Takes one page of `items`, and whether more follow it.
pub fn take_page<T>(items: impl Iterator<Item = T>, limit: usize) -> (Vec<T>, bool) {
    let mut page: Vec<T> = items.take(limit + 1).collect();
    let more = page.len() > limit;
    page.truncate(limit);
    (page, more)
}

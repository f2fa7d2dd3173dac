//! Cluster commands: `join`, `leave`, `cluster_status`, `health`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::protocol::{ErrorCode, WireError};
use crate::raft::typ::RaftMetrics;
use crate::registry::{validate_labels, validate_name, NodeStatus, Registry};

/// `join {node_id, name, labels}`: sent by a starting node until the leader accepts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub node_id: u64,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Agent kinds the node can run.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Agents it may hold; 0 is unlimited.
    #[serde(default)]
    pub capacity: u32,
    /// The version of the log, snapshots and node-to-node messages the node speaks
    /// (`registry::REGISTRY_VERSION`); a node of version 1 sent none.
    #[serde(default = "version_1")]
    pub protocol_version: u32,
}

fn version_1() -> u32 {
    1
}

impl JoinRequest {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.node_id == 0 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "node_id must be positive",
            ));
        }
        validate_name("name", &self.name)?;
        for k in &self.kinds {
            validate_name("kind", k)?;
        }
        validate_labels(&self.labels)
    }
}

/// `leave {node_id}`: removes a node from the membership for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    pub node_id: u64,
}

/// Raft role of a node, as `cluster_status` reports it.
pub fn role(metrics: &RaftMetrics, id: u64) -> Option<&'static str> {
    let m = metrics.membership_config.membership();
    if m.voter_ids().any(|v| v == id) {
        Some("voter")
    } else if m.learner_ids().any(|l| l == id) {
        Some("learner")
    } else {
        None
    }
}

/// Builds the `cluster_status` reply on the leader.
pub fn cluster_status(
    cluster: &str,
    voters_max: usize,
    metrics: &RaftMetrics,
    reg: &Registry,
    since_ms: &dyn Fn(u64) -> Option<u64>,
    commit_index: u64,
) -> Value {
    let members: Vec<u64> = metrics
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect();
    let mut ids: Vec<u64> = reg.data().nodes.keys().copied().chain(members).collect();
    ids.sort_unstable();
    ids.dedup();
    let nodes: Vec<Value> = ids
        .into_iter()
        .map(|id| {
            let rec = reg.node(id);
            let since = since_ms(id);
            // The leader's failure detector keeps the recorded status current.
            let status = rec.map(|r| r.status).unwrap_or(NodeStatus::Joining);
            json!({
                "id": id,
                "name": rec.map(|r| r.name.clone()).unwrap_or_default(),
                "role": role(metrics, id),
                "status": status,
                "last_contact_ms": since,
                "labels": rec.map(|r| r.labels.clone()).unwrap_or_default(),
                "capacity": rec.map(|r| r.capacity),
                "drain": rec.map(|r| r.drain),
                "agents": reg.load(id),
                "load": rec.map(|r| r.load),
                "joined_at": rec.map(|r| r.joined_at),
            })
        })
        .collect();
    json!({
        "cluster": cluster,
        "leader": metrics.current_leader,
        "term": metrics.current_term,
        "applied_index": metrics.last_applied.map(|l| l.index),
        // openraft 0.9's metrics have none: the leader's commit index as last announced in an
        // AppendEntries this node sent or received (`raft::CommitIndex`), never below the
        // applied index. Earlier versions reported the applied index here.
        "commit_index": commit_index,
        "last_log_index": metrics.last_log_index,
        "snapshot_index": metrics.snapshot.map(|l| l.index),
        "voters_max": voters_max,
        "nodes": nodes,
    })
}

/// Builds the `health` reply of the answering node.
pub fn health(name: &str, cluster: &str, uptime_ms: u64, metrics: &RaftMetrics) -> Value {
    json!({
        "node_id": metrics.id,
        "name": name,
        "cluster": cluster,
        "version": env!("CARGO_PKG_VERSION"),
        "raft_state": format!("{:?}", metrics.state).to_lowercase(),
        "role": role(metrics, metrics.id),
        "leader": metrics.current_leader,
        "term": metrics.current_term,
        "last_applied": metrics.last_applied.map(|l| l.index),
        "last_log_index": metrics.last_log_index,
        "snapshot_index": metrics.snapshot.map(|l| l.index),
        "uptime_ms": uptime_ms,
    })
}

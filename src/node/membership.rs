//! Membership changes on the leader: `join` adds a node as a voter while there are fewer than
//! `voters_max` voters and as a learner after that; `leave` removes a node for good and
//! promotes a learner if a voter seat opened. Changes are serialized by one lock, because
//! openraft refuses a membership change while another is in progress.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{ChangeMembers, EmptyNode};
use serde_json::{json, Value};

use super::Node;
use crate::command::{JoinRequest, LeaveRequest};
use crate::protocol::{ErrorCode, WireError};
use crate::registry::{NodeStatus, RegistryCmd};

fn members(node: &Node) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let rx = node.raft.metrics();
    let m = rx.borrow();
    let mem = m.membership_config.membership();
    let sets = (mem.voter_ids().collect(), mem.learner_ids().collect());
    sets
}

fn raft_err(e: impl std::fmt::Display) -> WireError {
    WireError::new(
        ErrorCode::Unavailable,
        format!("membership change did not complete: {e}; retry"),
    )
}

/// Handles `join` on the leader.
pub async fn join(node: &Node, req: JoinRequest) -> Result<Value, WireError> {
    if req.protocol_version != crate::registry::REGISTRY_VERSION {
        return Err(WireError::new(
            ErrorCode::Conflict,
            format!(
                "node {} speaks protocol version {}, this cluster version {}: run the same \
                 Warden version on every node (README, \"Upgrading\")",
                req.node_id,
                req.protocol_version,
                crate::registry::REGISTRY_VERSION
            ),
        ));
    }
    let _guard = node.membership_lock.lock().await;
    if node.registry_node_status(req.node_id) == Some(NodeStatus::Left) {
        return Err(WireError::new(
            ErrorCode::Conflict,
            format!(
                "node {} left the cluster for good; start it with a new id",
                req.node_id
            ),
        ));
    }
    let (voters, learners) = members(node);
    if !voters.contains(&req.node_id) {
        if !learners.contains(&req.node_id) {
            node.raft
                .add_learner(req.node_id, EmptyNode {}, false)
                .await
                .map_err(raft_err)?;
        }
        // Promoting a learner that lags would stall writes until it caught up: wait until it
        // has, but boundedly, so that a node that never answers cannot hold the membership
        // lock. Its retried join waits again; replication goes on meanwhile.
        caught_up(node, req.node_id).await?;
    }
    let (voters, _) = members(node);
    if !voters.contains(&req.node_id) && voters.len() < node.cfg.voters_max {
        let add = ChangeMembers::AddVoterIds(BTreeSet::from([req.node_id]));
        node.raft
            .change_membership(add, false)
            .await
            .map_err(raft_err)?;
    }
    let cmd = RegistryCmd::RegisterNode {
        node_id: req.node_id,
        name: req.name.clone(),
        labels: req.labels.clone(),
        kinds: req.kinds.clone(),
        capacity: req.capacity,
    };
    let record = node.propose(cmd, None, 256).await?;
    let (voters, _) = members(node);
    let role = if voters.contains(&req.node_id) {
        "voter"
    } else {
        "learner"
    };
    Ok(json!({ "node": record, "role": role, "leader": node.cfg.id }))
}

/// Waits up to `JOIN_CATCH_UP_MS` until learner `id` holds the leader's log as it is now.
async fn caught_up(node: &Node, id: u64) -> Result<(), WireError> {
    let target = node.raft.metrics().borrow().last_log_index.unwrap_or(0);
    let within = std::time::Duration::from_millis(crate::limits::JOIN_CATCH_UP_MS);
    let matched = |m: &crate::raft::typ::RaftMetrics| {
        let index = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id))
            .and_then(|l| l.as_ref())
            .map(|l| l.index);
        index.is_some_and(|i| i >= target)
    };
    node.raft
        .wait(Some(within))
        .metrics(matched, "a joining learner to catch up")
        .await
        .map(|_| ())
        .map_err(|_| {
            WireError::new(
                ErrorCode::Unavailable,
                format!(
                    "node {id} has not caught up with the log within {} ms; it is a learner \
                     meanwhile, and its retried join promotes it once it has",
                    crate::limits::JOIN_CATCH_UP_MS
                ),
            )
        })
}

/// Handles `leave` on the leader.
pub async fn leave(node: &Node, req: LeaveRequest) -> Result<Value, WireError> {
    let _guard = node.membership_lock.lock().await;
    let (voters, learners) = members(node);
    let is_voter = voters.contains(&req.node_id);
    if !is_voter && !learners.contains(&req.node_id) {
        return match node.registry_node_status(req.node_id) {
            Some(NodeStatus::Left) => Ok(json!({ "node_id": req.node_id, "status": "left" })),
            _ => Err(WireError::new(
                ErrorCode::NotFound,
                format!("node {} is not a member of the cluster", req.node_id),
            )),
        };
    }
    if is_voter && voters.len() == 1 {
        return Err(WireError::new(
            ErrorCode::Conflict,
            "the last voter cannot leave: the cluster would have no quorum",
        ));
    }
    // Record the departure first, while this node surely still leads; the membership change
    // below may hand leadership away when the leader itself is leaving.
    let removed = node
        .propose(
            RegistryCmd::RemoveNode {
                node_id: req.node_id,
            },
            None,
            64,
        )
        .await;
    let out = match removed {
        Ok(v) => v,
        // A learner whose join never finished: only Raft knows it.
        Err(e) if e.code == ErrorCode::NotFound => {
            json!({ "node_id": req.node_id, "status": "left" })
        }
        Err(e) => return Err(e),
    };
    let change = if is_voter {
        ChangeMembers::RemoveVoters(BTreeSet::from([req.node_id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([req.node_id]))
    };
    node.raft
        .change_membership(change, false)
        .await
        .map_err(raft_err)?;
    if is_voter {
        promote_learner(node).await;
    }
    Ok(out)
}

/// Fills an open voter seat with the learner that answered most recently.
async fn promote_learner(node: &Node) {
    let (voters, learners) = members(node);
    if voters.len() >= node.cfg.voters_max || !node.is_leader() {
        return;
    }
    let mut by_contact: BTreeMap<u64, u64> = BTreeMap::new();
    for l in learners {
        if let Some(ms) = node.contacts.since_ms(l) {
            by_contact.insert(ms, l);
        }
    }
    if let Some((_, id)) = by_contact.first_key_value() {
        let add = ChangeMembers::AddVoterIds(BTreeSet::from([*id]));
        match node.raft.change_membership(add, false).await {
            Ok(_) => tracing::info!(node = id, "promoted a learner to voter"),
            Err(e) => tracing::warn!(node = id, error = %e, "could not promote a learner"),
        }
    }
}

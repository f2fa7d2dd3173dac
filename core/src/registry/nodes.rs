//! Nodes in the registry: liveness decided by the leader's failure detector, loads, drains,
//! failover of a lost node's agents, and placing agents that wait for a node.
//!
//! Every change of an agent's node bumps its epoch, so the instance on the old node is fenced
//! off: its reports and checkpoints carry the old epoch and are refused.

use std::collections::BTreeMap;
use std::ops::Bound;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{
    agent_event, agent_mut, AgentStatus, Applied, Child, NodeStatus, Outcome, Refused, Registry,
    RegistryEvent, SupervisorPlacement,
};
use crate::placement::{self, Candidate, Placement, Refusal};
use crate::supervision::RestartType;

/// The fields of a `join`, as `register_node` takes them.
pub struct Join<'a> {
    pub id: u64,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub kinds: &'a [String],
    pub capacity: u32,
}

/// One node's load, as the leader copies it into the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub node_id: u64,
    pub load: super::NodeLoad,
}

/// A fail-over past its first step: the agents of `node` to place elsewhere, in start order.
#[derive(Debug)]
pub(super) struct FailOverWork {
    node: u64,
    lost: Vec<Uuid>,
    next: usize,
}

impl Registry {
    /// Nodes as placement sees them.
    pub fn candidates(&self) -> Vec<Candidate<'_>> {
        self.data
            .nodes
            .values()
            .map(|n| Candidate {
                id: n.id,
                open: n.status == NodeStatus::Up,
                labels: &n.labels,
                kinds: &n.kinds,
                capacity: n.capacity,
                load: self.load(n.id),
                cpu_permille: n.load.cpu_permille,
            })
            .collect()
    }

    /// Agents of supervisor `sup` per node, for `spread`.
    fn siblings(&self, sup: &str) -> BTreeMap<u64, usize> {
        let mut out = BTreeMap::new();
        for c in self.children(sup) {
            if let Child::Agent { id } = c {
                if let Some(n) = self.data.agents.get(id).and_then(|a| a.node) {
                    *out.entry(n).or_default() += 1;
                }
            }
        }
        out
    }

    /// Where an agent of `kind` under `sup` with `placement` goes, avoiding `exclude`. An agent
    /// of a colocated subtree goes where its supervisor runs.
    pub(super) fn place_agent(
        &self,
        kind: &str,
        sup: &str,
        placement: &Placement,
        exclude: Option<u64>,
    ) -> Result<u64, Refusal> {
        let s = self.data.supervisors.get(sup);
        let colocated = s.is_some_and(|s| s.node.is_some() || colocates(s.placement));
        if colocated {
            let host = s.and_then(|s| s.node).filter(|n| Some(*n) != exclude);
            let fits = host.and_then(|h| self.data.nodes.get(&h)).is_some_and(|n| {
                n.kinds.iter().any(|k| k == kind)
                    && matches!(
                        n.status,
                        NodeStatus::Up | NodeStatus::Suspect | NodeStatus::Draining
                    )
            });
            return match host {
                Some(h) if fits => Ok(h),
                _ => Err(Refusal::NoRoom),
            };
        }
        let siblings = self.siblings(sup);
        let req = placement::Request {
            kinds: vec![kind],
            placement,
            count: 1,
            exclude,
            siblings: &siblings,
        };
        placement::choose(&req, &self.candidates())
    }

    /// Where agent `a` goes when it leaves node `from`: the destination of its migration if
    /// that node is up and runs its kind, else wherever placement puts it.
    pub(super) fn next_node(&self, a: &super::Agent, from: u64) -> Result<u64, Refusal> {
        let open = |n: u64| {
            self.data
                .nodes
                .get(&n)
                .is_some_and(|r| r.status == NodeStatus::Up && r.kinds.contains(&a.kind))
        };
        match a.migrating_to {
            Some(t) if open(t) => Ok(t),
            _ => self.place_agent(&a.kind, &a.supervisor, &a.placement, Some(from)),
        }
    }

    /// Moves agent `id` to `node` (or nowhere), keeping the indexes right.
    pub(super) fn set_agent_node(&mut self, id: Uuid, node: Option<u64>) {
        let Some(a) = agent_mut(&mut self.data.agents, &id) else {
            return;
        };
        match a.node {
            Some(old) => {
                if let Some(ids) = self.by_node.get_mut(&old) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_node.remove(&old);
                    }
                }
            }
            None => {
                self.unplaced.remove(&(a.position, id));
            }
        }
        a.node = node;
        match node {
            Some(n) => {
                self.by_node.entry(n).or_default().insert(id);
            }
            None => {
                self.unplaced.insert((a.position, id));
            }
        }
    }

    /// Places agent `id` afresh: a new epoch on `target`, or pending on no node with the reason.
    /// `reason` says why it moves, for the event.
    pub(super) fn replace_agent(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        target: Result<u64, Refusal>,
        reason: &str,
        events: &mut Vec<RegistryEvent>,
    ) {
        let Some(from) = self.data.agents.get(&id).map(|a| a.node) else {
            return;
        };
        let node = target.as_ref().ok().copied();
        self.set_agent_node(id, node);
        let a = agent_mut(&mut self.data.agents, &id).expect("set_agent_node found it");
        a.epoch += 1;
        a.migrating_to = None;
        a.updated_at = time;
        a.seq += 1;
        if a.status != AgentStatus::Stopped {
            self.index
                .status_changed(id, a.status, AgentStatus::Pending);
            a.status = AgentStatus::Pending;
        }
        match target {
            Ok(n) => {
                a.pending_reason = None;
                let data = json!({ "node": n, "from": from, "reason": reason });
                events.push(agent_event(a, "placed", time, data));
            }
            Err(r) => {
                let why = r.describe();
                a.pending_reason = Some(why.clone());
                let data = json!({ "node": null, "from": from, "reason": reason, "waits": why });
                events.push(agent_event(a, "pending", time, data));
            }
        }
    }

    pub(super) fn set_node_status(
        &mut self,
        time: DateTime<Utc>,
        id: u64,
        status: NodeStatus,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<(Applied, Option<FailOverWork>), Refused> {
        let Some(node) = self.data.nodes.get_mut(&id) else {
            return Err(Refused::NoNode { node: id });
        };
        let before = node.status;
        let after = match (before, status) {
            (NodeStatus::Left | NodeStatus::Joining, _) => before,
            (NodeStatus::Up, NodeStatus::Suspect) => NodeStatus::Suspect,
            (_, NodeStatus::Down) => NodeStatus::Down,
            (NodeStatus::Suspect | NodeStatus::Down, NodeStatus::Up) if node.drain => {
                NodeStatus::Draining
            }
            (NodeStatus::Suspect | NodeStatus::Down, NodeStatus::Up) => NodeStatus::Up,
            _ => before,
        };
        if after == before {
            let answer = Applied::NodeStatus {
                node_id: id,
                status: before,
            };
            return Ok((answer, None));
        }
        node.status = after;
        node.updated_at = time;
        node.seq += 1;
        let event = match after {
            NodeStatus::Draining => "up",
            NodeStatus::Suspect => "suspect",
            NodeStatus::Down => "down",
            _ => "up",
        };
        events.push(node_event(
            node,
            event,
            time,
            json!({ "node_id": id, "status": after, "was": before }),
        ));
        let answer = Applied::NodeStatus {
            node_id: id,
            status: after,
        };
        match after {
            NodeStatus::Down => return Ok((answer, Some(self.begin_fail_over(id)))),
            NodeStatus::Up | NodeStatus::Draining => self.placing_due = true,
            _ => {}
        }
        Ok((answer, None))
    }

    pub(super) fn node_loads(&mut self, time: DateTime<Utc>, loads: &[LoadReport]) -> Outcome {
        let mut updated = 0;
        for r in loads {
            if let Some(n) = self.data.nodes.get_mut(&r.node_id) {
                n.load = r.load;
                n.updated_at = time;
                updated += 1;
            }
        }
        Ok(Applied::LoadsRecorded { updated })
    }

    pub(super) fn drain_node(
        &mut self,
        time: DateTime<Utc>,
        id: u64,
        cancel: bool,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let Some(node) = self.data.nodes.get_mut(&id) else {
            return Err(Refused::NoNode { node: id });
        };
        if node.status == NodeStatus::Left {
            return Err(Refused::NodeLeft { node: id });
        }
        node.drain = !cancel;
        let before = node.status;
        node.status = match (before, cancel) {
            (NodeStatus::Up, false) => NodeStatus::Draining,
            (NodeStatus::Draining, true) => NodeStatus::Up,
            (s, _) => s,
        };
        node.updated_at = time;
        let changed = node.status != before;
        if changed {
            node.seq += 1;
            let event = if cancel { "up" } else { "draining" };
            events.push(node_event(
                node,
                event,
                time,
                json!({ "node_id": id, "status": node.status }),
            ));
        }
        let status = node.status;
        // Cancelled, the node takes agents again: those waiting for one are placed before
        // the answer counts what it holds (`answer_after_placing`).
        if cancel {
            self.placing_due = true;
        }
        Ok(self.drain_answer(id, status))
    }

    /// What `drain_node` answers: what node `id` holds, and how much of it is pinned there.
    fn drain_answer(&self, id: u64, status: NodeStatus) -> Applied {
        let pinned = self
            .agents_on(id)
            .filter(|a| a.placement.pinned() == Some(id))
            .count();
        Applied::Drain {
            node_id: id,
            status,
            agents: self.load(id) as u64,
            pinned_stay: pinned as u64,
        }
    }

    /// A command's outcome once waiting agents are placed: a drain's counts are taken again.
    pub(super) fn answer_after_placing(&self, outcome: Outcome) -> Outcome {
        match outcome {
            Ok(Applied::Drain {
                node_id, status, ..
            }) => Ok(self.drain_answer(node_id, status)),
            other => other,
        }
    }

    /// The top supervisors of the colocated subtrees running on `node`.
    fn units_on(&self, node: u64) -> Vec<String> {
        self.data
            .supervisors
            .values()
            .filter(|s| s.node == Some(node))
            .filter(|s| {
                let parent = s.parent.as_ref().and_then(|p| self.data.supervisors.get(p));
                parent.is_none_or(|p| p.node != Some(node))
            })
            .map(|s| s.name.clone())
            .collect()
    }

    /// Supervisor `top` and every supervisor below it.
    pub(super) fn subtree_supervisors(&self, top: &str) -> Vec<String> {
        let mut out = vec![top.to_string()];
        let mut i = 0;
        while i < out.len() {
            for c in self.children(&out[i]) {
                if let Child::Supervisor { name } = c {
                    out.push(name.clone());
                }
            }
            i += 1;
        }
        out
    }

    /// Agents of the subtree below `top`.
    pub(super) fn subtree_agents(&self, top: &str) -> Vec<Uuid> {
        let mut out = Vec::new();
        for s in self.subtree_supervisors(top) {
            for c in self.children(&s) {
                if let Child::Agent { id } = c {
                    out.push(*id);
                }
            }
        }
        out
    }

    /// Picks one node for a whole colocated subtree and records it on its supervisors.
    pub(super) fn relocate_unit(&mut self, top: &str, exclude: Option<u64>) -> Option<u64> {
        let agents = self.subtree_agents(top);
        let kinds: Vec<String> = agents
            .iter()
            .filter_map(|id| self.data.agents.get(id))
            .map(|a| a.kind.clone())
            .collect();
        let mut kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let none = BTreeMap::new();
        let default = Placement::default();
        let req = placement::Request {
            kinds,
            placement: &default,
            count: agents.len(),
            exclude,
            siblings: &none,
        };
        let host = placement::choose(&req, &self.candidates()).ok();
        for s in self.subtree_supervisors(top) {
            if let Some(sup) = self.data.supervisors.get_mut(&s) {
                sup.node = host;
            }
        }
        host
    }

    /// Node `id` is gone: every agent it ran is placed elsewhere at a new epoch, from its last
    /// checkpoint; a temporary one is forgotten, as OTP never restarts it; one that cannot be
    /// placed (pinned there, no room) waits on no node with the reason in `pending_reason`.
    /// The first step of a fail-over of node `id`: its colocated subtrees get a new node, and
    /// its agents are listed in start order for `fail_over_step`.
    pub(super) fn begin_fail_over(&mut self, id: u64) -> FailOverWork {
        for top in self.units_on(id) {
            self.relocate_unit(&top, Some(id));
        }
        let mut lost: Vec<(u64, Uuid)> = self.agents_on(id).map(|a| (a.position, a.id)).collect();
        lost.sort_unstable();
        FailOverWork {
            node: id,
            lost: lost.into_iter().map(|(_, a)| a).collect(),
            next: 0,
        }
    }

    /// Places the next `limits::APPLY_STEP_AGENTS` agents of a failed-over node elsewhere (a
    /// temporary one is forgotten); true once all are.
    pub(super) fn fail_over_step(
        &mut self,
        time: DateTime<Utc>,
        w: &mut FailOverWork,
        events: &mut Vec<RegistryEvent>,
    ) -> bool {
        let id = w.node;
        let end = w
            .lost
            .len()
            .min(w.next + crate::limits::APPLY_STEP_AGENTS as usize);
        for i in w.next..end {
            let aid = w.lost[i];
            let Some(a) = self.data.agents.get(&aid) else {
                continue;
            };
            if a.restart == RestartType::Temporary {
                if let Some(gone) = self.remove_agent(aid) {
                    let data = json!({ "reason": format!("node {id} is down") });
                    events.push(super::agents::stopped_event(&gone, time, data));
                }
                continue;
            }
            let target = self.next_node(a, id);
            self.replace_agent(time, aid, target, "failover", events);
        }
        w.next = end;
        end == w.lost.len()
    }

    /// Whether some agent waits on no node.
    pub(super) fn has_waiting(&self) -> bool {
        !self.unplaced.is_empty()
    }

    /// Places agents that wait on no node, now that a node came up or room opened, a bounded
    /// step at a time; true once done. The first step gives colocated subtrees without a node
    /// one; each later step tries the next `limits::APPLY_STEP_AGENTS` waiting agents in start
    /// order. Nothing joins the waiting meanwhile (an agent tried and not placed keeps its
    /// place), so the steps try the same agents in the same order as one pass would.
    pub(super) fn placing_step(
        &mut self,
        time: DateTime<Utc>,
        w: &mut PendingWork,
        events: &mut Vec<RegistryEvent>,
    ) -> bool {
        if !w.relocated {
            let homeless: Vec<String> = self
                .data
                .supervisors
                .values()
                .filter(|s| s.node.is_none() && colocates(s.placement) && s.parent.is_some())
                .filter(|s| {
                    let parent = s.parent.as_ref().and_then(|p| self.data.supervisors.get(p));
                    parent.is_none_or(|p| p.node.is_none())
                })
                .map(|s| s.name.clone())
                .collect();
            for top in homeless {
                self.relocate_unit(&top, None);
            }
            w.relocated = true;
            return false;
        }
        let step = crate::limits::APPLY_STEP_AGENTS as usize;
        let lower = w.after.map_or(Bound::Unbounded, Bound::Excluded);
        let batch: Vec<(u64, Uuid)> = self
            .unplaced
            .range((lower, Bound::Unbounded))
            .take(step)
            .copied()
            .collect();
        for &(_, id) in &batch {
            let Some(a) = self.data.agents.get(&id) else {
                continue;
            };
            if a.status == AgentStatus::Stopped {
                continue;
            }
            if let Ok(n) = self.place_agent(&a.kind, &a.supervisor, &a.placement, None) {
                self.replace_agent(time, id, Ok(n), "node available", events);
            }
        }
        w.after = batch.last().copied();
        batch.len() < step
    }
}

/// Agents waiting for a node, being placed after a command that brought a node up or opened
/// room.
#[derive(Debug, Default)]
pub(super) struct PendingWork {
    /// Whether colocated subtrees without a node have been given one.
    relocated: bool,
    /// The last (position, id) tried; none before the first.
    after: Option<(u64, Uuid)>,
}

/// An event about node `n`, at its current `seq`.
pub(super) fn node_event(
    n: &super::NodeRecord,
    event: &'static str,
    time: DateTime<Utc>,
    data: serde_json::Value,
) -> RegistryEvent {
    RegistryEvent {
        entity: "node",
        id: n.id.to_string(),
        event,
        time,
        epoch: 0,
        seq: n.seq,
        data,
    }
}

fn colocates(p: SupervisorPlacement) -> bool {
    p == SupervisorPlacement::Colocate
}

//! Nodes in the registry: liveness decided by the leader's failure detector, loads, drains,
//! failover of a lost node's agents, and placing agents that wait for a node.
//!
//! Every change of an agent's node bumps its epoch, so the instance on the old node is fenced
//! off: its reports and checkpoints carry the old epoch and are refused.

use std::collections::{BTreeMap, BTreeSet};
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

/// A fail-over past its first step, in three phases of bounded steps (a node may have run a
/// third of a million agents): its colocated subtrees get a new node, its agents are listed in
/// start order, then placed elsewhere.
#[derive(Debug)]
pub(super) struct FailOverWork {
    node: u64,
    /// Colocated subtrees that were on `node`; those before `next_unit` have a new node.
    units: Vec<String>,
    next_unit: usize,
    /// The agents of the subtree `units[next_unit]`, and the kinds of those before `unit_pos`.
    unit_agents: Vec<Uuid>,
    unit_pos: usize,
    unit_kinds: BTreeSet<String>,
    /// The agents of `node` by (position, id): start order. Listed from `by_node` after
    /// `listed_after`, until `listed`.
    lost: BTreeSet<(u64, Uuid)>,
    listed_after: Option<Uuid>,
    listed: bool,
    /// The last agent placed elsewhere.
    placed_after: Option<(u64, Uuid)>,
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
        self.place_agent_among(kind, sup, placement, exclude, None)
    }

    /// `place_agent`, given the agents of `sup` per node when the caller keeps them (an import
    /// places thousands of siblings, and counting them for each is quadratic).
    pub(super) fn place_agent_among(
        &self,
        kind: &str,
        sup: &str,
        placement: &Placement,
        exclude: Option<u64>,
        known: Option<&BTreeMap<u64, usize>>,
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
        let counted;
        let siblings = match known {
            Some(s) => s,
            None => {
                counted = self.siblings(sup);
                &counted
            }
        };
        let req = placement::Request {
            kinds: vec![kind],
            placement,
            count: 1,
            exclude,
            siblings,
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
        let mut kinds = BTreeSet::new();
        self.add_kinds(&agents, &mut kinds);
        self.place_unit(top, &kinds, agents.len(), exclude)
    }

    /// Adds the kinds of `agents` to `kinds`.
    fn add_kinds(&self, agents: &[Uuid], kinds: &mut BTreeSet<String>) {
        for a in agents.iter().filter_map(|id| self.data.agents.get(id)) {
            if !kinds.contains(&a.kind) {
                kinds.insert(a.kind.clone());
            }
        }
    }

    /// Picks one node for colocated subtree `top`, of `count` agents of `kinds`, and records
    /// it on its supervisors.
    pub(super) fn place_unit(
        &mut self,
        top: &str,
        kinds: &BTreeSet<String>,
        count: usize,
        exclude: Option<u64>,
    ) -> Option<u64> {
        let none = BTreeMap::new();
        let default = Placement::default();
        let req = placement::Request {
            kinds: kinds.iter().map(String::as_str).collect(),
            placement: &default,
            count,
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
    /// The first step of a fail-over of node `id`: which colocated subtrees it held (a walk
    /// over the supervisors, not the agents). `fail_over_step` does the rest.
    pub(super) fn begin_fail_over(&mut self, id: u64) -> FailOverWork {
        FailOverWork {
            node: id,
            units: self.units_on(id),
            next_unit: 0,
            unit_agents: Vec::new(),
            unit_pos: 0,
            unit_kinds: BTreeSet::new(),
            lost: BTreeSet::new(),
            listed_after: None,
            listed: false,
            placed_after: None,
        }
    }

    /// One bounded step of a fail-over, looking at no more than `limits::APPLY_STEP_AGENTS`
    /// agents: first the kinds of the colocated subtrees to move (each gets its new node once
    /// all its kinds are known), then the listing of the node's agents in start order, then
    /// their placing elsewhere (a temporary one is forgotten). True once all are placed.
    pub(super) fn fail_over_step(
        &mut self,
        time: DateTime<Utc>,
        w: &mut FailOverWork,
        events: &mut Vec<RegistryEvent>,
    ) -> bool {
        let id = w.node;
        let step = crate::limits::APPLY_STEP_AGENTS as usize;
        if w.next_unit < w.units.len() {
            let top = w.units[w.next_unit].clone();
            if w.unit_pos == 0 && w.unit_kinds.is_empty() {
                // The subtree's ids, from the children indexes: no record is read.
                w.unit_agents = self.subtree_agents(&top);
            }
            let end = w.unit_agents.len().min(w.unit_pos + step);
            self.add_kinds(&w.unit_agents[w.unit_pos..end], &mut w.unit_kinds);
            w.unit_pos = end;
            if end == w.unit_agents.len() {
                let count = w.unit_agents.len();
                self.place_unit(&top, &w.unit_kinds, count, Some(id));
                w.next_unit += 1;
                w.unit_agents = Vec::new();
                w.unit_pos = 0;
                w.unit_kinds.clear();
            }
            return false;
        }
        if !w.listed {
            let lower = w.listed_after.map_or(Bound::Unbounded, Bound::Excluded);
            let ids: Vec<Uuid> = self
                .by_node
                .get(&id)
                .into_iter()
                .flat_map(|set| set.range((lower, Bound::Unbounded)))
                .take(step)
                .copied()
                .collect();
            for aid in &ids {
                if let Some(a) = self.data.agents.get(aid) {
                    w.lost.insert((a.position, a.id));
                }
            }
            w.listed_after = ids.last().copied().or(w.listed_after);
            w.listed = ids.len() < step;
            return false;
        }
        let lower = w.placed_after.map_or(Bound::Unbounded, Bound::Excluded);
        let batch: Vec<(u64, Uuid)> = w
            .lost
            .range((lower, Bound::Unbounded))
            .take(step)
            .copied()
            .collect();
        for &(_, aid) in &batch {
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
        w.placed_after = batch.last().copied().or(w.placed_after);
        batch.len() < step
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
        supervisor: None,
    }
}

fn colocates(p: SupervisorPlacement) -> bool {
    p == SupervisorPlacement::Colocate
}

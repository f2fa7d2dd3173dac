//! Moving agents between live nodes: `migrate_agent`, the source's `handoff`, and `rebalance`.
//!
//! A migration is two log entries. `migrate_agent` marks the agent `migrating` toward a
//! target; the source node sees it, checkpoints and stops the agent, and sends `handoff` with
//! that state at the agent's epoch. The handoff stores the state, moves the agent to the target
//! at the next epoch, and the target starts it from that state. The agent never runs on both:
//! the target starts only after the source stopped, and a late source is fenced by the epoch.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{
    agent_event, agent_mut, AgentStatus, Applied, Moved, Outcome, Refused, Registry, RegistryEvent,
};
use crate::placement::{self, Movable, Move, Placement, Refusal, Strategy};

/// One agent handed over by its source node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoffItem {
    pub agent: Uuid,
    pub node: u64,
    pub epoch: u64,
    /// The agent's state when it stopped; `None` when it was not running there (its last
    /// checkpoint stays).
    pub state: Option<Bytes>,
    /// Its last answered calls (bounded by the source), kept with the checkpoint.
    #[serde(default)]
    pub calls: Vec<super::RememberedCall>,
}

impl Registry {
    /// The supervisor at the top of the colocated subtree that `sup` belongs to, if any.
    fn colocated_top(&self, sup: &str) -> Option<String> {
        let mut cur = self.data.supervisors.get(sup)?;
        cur.node?;
        while let Some(parent) = cur
            .parent
            .as_ref()
            .and_then(|p| self.data.supervisors.get(p))
        {
            if parent.node.is_none() {
                break;
            }
            cur = parent;
        }
        Some(cur.name.clone())
    }

    pub(super) fn migrate_agent(
        &mut self,
        time: DateTime<Utc>,
        agent: &str,
        to: Option<u64>,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let a = self.agent(agent).ok_or_else(|| Refused::NoAgent {
            agent: agent.to_string(),
        })?;
        let agent = agent.to_string();
        if a.status == AgentStatus::Migrating {
            let to = a.migrating_to.unwrap_or(0);
            return Err(Refused::AlreadyMigrating { agent, to });
        }
        let Some(from) = a.node else {
            let why = a.pending_reason.as_deref().unwrap_or("no node can take it");
            let why = why.to_string();
            return Err(Refused::NothingToMigrate { agent, why });
        };
        if let Some(node) = a.placement.pinned() {
            return Err(Refused::Pinned { agent, node });
        }
        if to == Some(from) {
            return Err(Refused::AlreadyThere { agent, node: from });
        }
        let id = a.id;
        let top = self.colocated_top(&a.supervisor);
        let unit: Vec<Uuid> = match &top {
            Some(t) => self.subtree_agents(t),
            None => vec![id],
        };
        let mut kinds: Vec<&str> = unit
            .iter()
            .filter_map(|u| self.data.agents.get(u))
            .map(|u| u.kind.as_str())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        let constraints = if top.is_some() {
            Default::default()
        } else {
            a.placement.constraints.clone()
        };
        let wanted = match to {
            Some(t) => Placement {
                strategy: Some(Strategy::Pinned),
                node: Some(t),
                constraints,
                ..Default::default()
            },
            None if top.is_some() => Placement::default(),
            None => Placement::clone(&a.placement),
        };
        let siblings = Default::default();
        let req = placement::Request {
            kinds,
            placement: &wanted,
            count: unit.len(),
            exclude: Some(from),
            siblings: &siblings,
        };
        let target = placement::choose(&req, &self.candidates()).map_err(|r| match r {
            Refusal::PinnedUnavailable(node) => Refused::TargetUnavailable { node },
            other => Refused::Placement(other),
        })?;
        if let Some(t) = &top {
            for s in self.subtree_supervisors(t) {
                if let Some(sup) = self.data.supervisors.get_mut(&s) {
                    sup.node = Some(target);
                }
            }
        }
        let mut moving = 0;
        for u in &unit {
            self.start_move(time, *u, target, events, &mut moving);
        }
        let epoch = self.data.agents.get(&id).map_or(0, |a| a.epoch);
        Ok(Applied::Migrating {
            agent: id,
            from,
            to: target,
            epoch,
            moving: moving as u64,
        })
    }

    /// Marks one agent as migrating to `target`; a stopped one just moves.
    fn start_move(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        target: u64,
        events: &mut Vec<RegistryEvent>,
        moving: &mut usize,
    ) {
        let Some(a) = agent_mut(&mut self.data.agents, &id) else {
            return;
        };
        if a.node == Some(target) {
            return;
        }
        match a.status {
            AgentStatus::Stopped => self.replace_agent(time, id, Ok(target), "migration", events),
            AgentStatus::Migrating => {}
            _ => {
                self.index
                    .status_changed(id, a.status, AgentStatus::Migrating);
                a.status = AgentStatus::Migrating;
                a.migrating_to = Some(target);
                a.updated_at = time;
                a.seq += 1;
                let data = json!({ "from": a.node, "to": target });
                events.push(agent_event(a, "migrating", time, data));
                *moving += 1;
            }
        }
    }

    pub(super) fn handoff(
        &mut self,
        time: DateTime<Utc>,
        items: &[HandoffItem],
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let (mut moved, mut stale) = (Vec::new(), Vec::new());
        for it in items {
            let current = self.data.agents.get(&it.agent).is_some_and(|a| {
                a.node == Some(it.node) && a.epoch == it.epoch && a.status == AgentStatus::Migrating
            });
            if !current {
                stale.push(it.agent);
                continue;
            }
            if let Some(state) = &it.state {
                // A state over the limit cannot be kept; the agent moves with its last one.
                let stored =
                    self.store_checkpoint(time, it.agent, it.node, it.epoch, state, events);
                if let (Ok(_), Some(c)) = (stored, self.data.checkpoints.get_mut(&it.agent)) {
                    Arc::make_mut(c).calls = it.calls.clone();
                }
            }
            let a = self.data.agents.get(&it.agent).expect("checked above");
            let target = self.next_node(a, it.node);
            self.replace_agent(time, it.agent, target.clone(), "migration", events);
            if let (Ok(to), Some(a)) = (target, self.data.agents.get(&it.agent)) {
                let data = json!({ "from": it.node, "to": to });
                events.push(agent_event(a, "migrated", time, data));
                moved.push(Moved {
                    agent: it.agent,
                    to,
                    epoch: a.epoch,
                });
            }
        }
        Ok(Applied::HandedOff { moved, stale })
    }

    /// Whether `migrate_agent` could move agent `a` now (a drain skips those it could not, so
    /// that they do not hold up the rest). A colocated subtree's agent is always tried.
    pub fn can_migrate(&self, a: &super::Agent) -> bool {
        if self.colocated_top(&a.supervisor).is_some() {
            return true;
        }
        a.placement.pinned().is_none()
            && a.node.is_some()
            && self
                .place_agent(&a.kind, &a.supervisor, &a.placement, a.node)
                .is_ok()
    }

    /// The moves a rebalance of at most `max_moves` would make now.
    pub fn rebalance_plan(&self, max_moves: usize) -> Vec<Move> {
        let agents: Vec<Movable<'_>> = self
            .data
            .agents
            .values()
            .filter(|a| {
                matches!(
                    a.status,
                    AgentStatus::Running | AgentStatus::Pending | AgentStatus::Failed
                )
            })
            .filter(|a| {
                self.data
                    .supervisors
                    .get(&a.supervisor)
                    .is_none_or(|s| s.node.is_none())
            })
            .filter_map(|a| {
                Some(Movable {
                    id: a.id,
                    node: a.node?,
                    kind: &a.kind,
                    placement: &a.placement,
                })
            })
            .collect();
        placement::rebalance(&self.candidates(), &agents, max_moves)
    }

    pub(super) fn rebalance(
        &mut self,
        time: DateTime<Utc>,
        max_moves: usize,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let moves = self.rebalance_plan(max_moves);
        let mut moving = 0;
        for m in &moves {
            self.start_move(time, m.agent, m.to, events, &mut moving);
        }
        Ok(Applied::Rebalancing { moves })
    }
}

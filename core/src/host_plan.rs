//! The host's planner: what a node must do with its local agents, decided from plain data.
//!
//! Pure: no I/O, no clock (the time is an argument), no tasks. The host (`super`) gathers the
//! registry's view of the agents placed here, its own instances and its lease, asks `reconcile`
//! or `due` what to do, and carries the actions out. Every case that decides whether an agent
//! may run here (placed and not running, moved away, lease lost or of another term, migrating
//! out, stale epoch, a restart waiting for its backoff, an instance still stopping) is decided
//! here and tested with plain data in `tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::time::Instant;

use uuid::Uuid;

use crate::registry::AgentStatus;

/// What the registry wants of one agent placed on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desired {
    pub id: Uuid,
    pub epoch: u64,
    pub status: AgentStatus,
    pub restart_requested: u64,
}

/// What the planner needs of a local instance (starting or running, not stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub epoch: u64,
    /// The lease term it started in: it may run only while that term lasts.
    pub lease_term: u64,
    pub restart_requested: u64,
}

/// Anything the host keeps per instance that can say what the planner needs.
pub trait AsLocal {
    fn local(&self) -> Local;
}

impl AsLocal for Local {
    fn local(&self) -> Local {
        *self
    }
}

/// The node's lease as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseView {
    /// The current lease term.
    pub term: u64,
    /// Whether the lease of `term` is valid now.
    pub valid: bool,
    /// Whether agents may start now: the lease is valid and the log is applied up to its read
    /// index, so this node has seen every move decided before the grant.
    pub may_start: bool,
}

impl LeaseView {
    /// Whether an instance started in `term` may still run.
    pub fn holds(&self, term: u64) -> bool {
        self.valid && self.term == term
    }
}

/// A start waiting for its time (a supervisor's backoff), and whether it is a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub at: Instant,
    pub restart: bool,
}

/// Why an instance is stopped gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// Its record is gone, placed elsewhere, or at another epoch.
    MovedOrRemoved,
    /// A `restart_agent` asked for a new instance: stop, then start again at once.
    RestartRequested,
}

impl StopWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            StopWhy::MovedOrRemoved => "moved or removed",
            StopWhy::RestartRequested => "restart requested",
        }
    }
}

/// One thing the host must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAction {
    /// Drop the instance at once: the lease term it started in is over (lost, or lapsed and
    /// granted again), so it may not run even to stop.
    Fence(Uuid),
    /// Stop the instance gracefully, within its `shutdown_ms`; a restart starts it again once
    /// it has stopped.
    Stop { id: Uuid, why: StopWhy },
    /// Checkpoint and stop the instance (if one runs), then hand the agent to its target.
    HandOff { id: Uuid, epoch: u64 },
    /// Start the agent from its record and last checkpoint.
    Start { id: Uuid, restarted: bool },
}

/// The host's state, as the planner reads it. `S` is whatever the host keeps per stopping
/// instance: only its presence counts.
pub struct View<'a, I, S> {
    /// The ids this plan is about: a node with many agents reconciles them a range of ids at
    /// a time. Instances outside it are left alone.
    pub within: (Bound<Uuid>, Bound<Uuid>),
    /// The registry's agents placed on this node, those `within`.
    pub desired: &'a BTreeMap<Uuid, Desired>,
    /// Local instances that start or run (not those stopping).
    pub instances: &'a BTreeMap<Uuid, I>,
    /// Local instances asked to stop and not stopped yet: nothing of that agent starts, and it
    /// is not handed over, until they have (at most one instance per agent, and migration
    /// hands over a stopped agent).
    pub stopping: &'a BTreeMap<Uuid, S>,
    pub scheduled: &'a BTreeMap<Uuid, Scheduled>,
    /// Agents that ended for good here (a temporary child, a transient one that finished, a
    /// kind this node does not know), at this epoch and restart request.
    pub ended: &'a BTreeMap<Uuid, (u64, u64)>,
    /// Agents handed over (or being handed over) at this epoch.
    pub handed_off: &'a BTreeMap<Uuid, u64>,
    pub lease: LeaseView,
}

/// Instances whose lease term is over.
pub fn fences<I: AsLocal>(instances: &BTreeMap<Uuid, I>, lease: LeaseView) -> Vec<Uuid> {
    instances
        .iter()
        .filter(|(_, i)| !lease.holds(i.local().lease_term))
        .map(|(id, _)| *id)
        .collect()
}

/// Everything that brings the local instances in line with the registry, in order: fences,
/// then graceful stops of what should not run here (last first), hand-offs of what migrates
/// away (last first), then starts. A restart waiting for its backoff is left to `due`.
pub fn reconcile<I: AsLocal, S>(v: &View<'_, I, S>) -> Vec<HostAction> {
    let mut out = Vec::new();
    let fenced: BTreeSet<Uuid> = v
        .instances
        .range(v.within)
        .filter(|(_, i)| !v.lease.holds(i.local().lease_term))
        .map(|(id, _)| *id)
        .collect();
    out.extend(fenced.iter().map(|id| HostAction::Fence(*id)));
    // A fenced instance is gone once the fence is carried out, before anything below.
    let live = |id: &Uuid| v.instances.get(id).filter(|_| !fenced.contains(id));
    // Stop what should no longer run here.
    for (id, inst) in v.instances.range(v.within).rev() {
        if live(id).is_none() {
            continue;
        }
        let here = v
            .desired
            .get(id)
            .is_some_and(|d| d.epoch == inst.local().epoch);
        if !here {
            out.push(HostAction::Stop {
                id: *id,
                why: StopWhy::MovedOrRemoved,
            });
        }
    }
    // Hand over what migrates away, once no earlier instance of it is still stopping.
    for d in v.desired.values().rev() {
        let moving = d.status == AgentStatus::Migrating
            && !v.handed_off.contains_key(&d.id)
            && !v.stopping.contains_key(&d.id);
        if moving {
            out.push(HostAction::HandOff {
                id: d.id,
                epoch: d.epoch,
            });
        }
    }
    if !v.lease.may_start {
        return out;
    }
    for d in v.desired.values() {
        let blocked = d.status == AgentStatus::Migrating
            || v.handed_off.contains_key(&d.id)
            || v.stopping.contains_key(&d.id);
        if blocked {
            continue;
        }
        if let Some(inst) = live(&d.id).map(AsLocal::local) {
            if inst.epoch == d.epoch && inst.restart_requested < d.restart_requested {
                out.push(HostAction::Stop {
                    id: d.id,
                    why: StopWhy::RestartRequested,
                });
            }
            continue;
        }
        let idle = !v.scheduled.contains_key(&d.id)
            && !v.ended.contains_key(&d.id)
            && d.status != AgentStatus::Stopped;
        if idle {
            out.push(HostAction::Start {
                id: d.id,
                restarted: matches!(d.status, AgentStatus::Failed | AgentStatus::Running),
            });
        }
    }
    out
}

/// What the scheduled starts ask for at `now`: the starts that are due, and the scheduled
/// entries to drop because an instance already runs. A start whose agent is `busy` (an
/// instance of it is stopping, or waits for its turn to stop) stays scheduled: it goes once
/// that instance has stopped. Nothing starts without `may_start`.
pub fn due<I>(
    scheduled: &BTreeMap<Uuid, Scheduled>,
    instances: &BTreeMap<Uuid, I>,
    busy: impl Fn(&Uuid) -> bool,
    lease: LeaseView,
    now: Instant,
) -> Due {
    let mut out = Due::default();
    if !lease.may_start {
        return out;
    }
    for (id, s) in scheduled {
        if s.at > now || busy(id) {
            continue;
        }
        if instances.contains_key(id) {
            out.drop.push(*id);
        } else {
            out.start.push((*id, s.restart));
        }
    }
    out
}

/// See `due`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Agents to start now, and whether each is a restart.
    pub start: Vec<(Uuid, bool)>,
    /// Scheduled starts made moot by an instance that runs already.
    pub drop: Vec<Uuid>,
}

#[cfg(test)]
mod tests;

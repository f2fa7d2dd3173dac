//! Run to completion (seed 003: fork, exec, run, wait, kill). An agent that ends for good by
//! itself (a `transient` agent that finished normally, a `temporary` one that ended either
//! way) is done: its node sends `finish_agents` with the kind's result, and the registry keeps
//! a `Finished` record of it. The record outlives the agent's own (a temporary agent is
//! forgotten right after), so `wait_agent` answers also for an agent that finished before the
//! wait, on any node, or whose node died since.
//!
//! The records are bounded: a result is at most `limits::MAX_RESULT_BYTES` (as JSON), and the
//! registry keeps at most `limits::MAX_FINISHED` records and `limits::MAX_FINISHED_BYTES` of
//! results, dropping the oldest records first.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{agent_event, agent_mut, AgentStatus, Applied, Outcome, Registry, RegistryEvent};
use crate::limits;

/// An agent that is done, with its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub agent: Uuid,
    pub name: Option<String>,
    pub supervisor: String,
    /// `stopped` (it finished normally) or `failed` (a temporary agent that crashed).
    pub status: AgentStatus,
    /// What the kind answered (`Agent::finish`), if anything.
    pub result: Option<Value>,
    pub error: Option<String>,
    /// The node it ran on last.
    pub node: u64,
    #[serde(with = "super::time")]
    pub time: DateTime<Utc>,
    /// Its place in the order records are dropped in (`RegistryData::finished_seq`).
    pub order: u64,
    /// The run it records: the agent's `restart_requested` when it finished. A run started
    /// since (`restart_agent`, a config change) is not done by this record.
    #[serde(default)]
    pub restart_requested: u64,
}

impl Finished {
    /// What it weighs against `limits::MAX_FINISHED_BYTES` (its result's JSON is encoded to
    /// weigh it: done once per record, when it is kept or rebuilt from a snapshot).
    pub fn weight(&self) -> usize {
        let result = self
            .result
            .as_ref()
            .map_or(0, |r| serde_json::to_vec(r).map_or(0, |b| b.len()));
        weight(result, &self.error)
    }
}

fn weight(result_bytes: usize, error: &Option<String>) -> usize {
    result_bytes + error.as_ref().map_or(0, String::len) + 128
}

/// One item of `finish_agents`, from the node that ran the agent at `epoch`: it ended for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishAgent {
    pub agent: Uuid,
    pub node: u64,
    pub epoch: u64,
    /// `stopped` or `failed`.
    pub status: AgentStatus,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
    /// The run that ended: the agent's `restart_requested` it started with. A finish of an
    /// earlier run (a write retried after a restart was asked) is stale.
    #[serde(default)]
    pub restart_requested: u64,
    /// Forget the agent too, in the same step (a temporary agent): fenced like the finish, so
    /// a late one cannot remove a later run elsewhere.
    #[serde(default)]
    pub forget: bool,
}

impl Registry {
    /// `finish_agents`: records the agents that are done, each fenced by node, epoch and run;
    /// a stale one (the agent moved, restarted or went) changes nothing and is listed.
    pub(super) fn finish_agents(
        &mut self,
        time: DateTime<Utc>,
        items: &[FinishAgent],
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let (mut recorded, mut stale) = (0, Vec::new());
        for f in items {
            if self.finish_agent(time, f, events) {
                recorded += 1;
            } else {
                stale.push(f.agent);
            }
        }
        Ok(Applied::Finished { recorded, stale })
    }

    /// Records that one agent is done (and forgets it if asked); false if stale.
    fn finish_agent(
        &mut self,
        time: DateTime<Utc>,
        f: &FinishAgent,
        events: &mut Vec<RegistryEvent>,
    ) -> bool {
        let Some(a) = agent_mut(&mut self.data.agents, &f.agent) else {
            return false;
        };
        if a.node != Some(f.node)
            || a.epoch != f.epoch
            || a.restart_requested != f.restart_requested
        {
            return false;
        }
        let status = match f.status {
            AgentStatus::Failed => AgentStatus::Failed,
            _ => AgentStatus::Stopped,
        };
        // A result over the limit is not kept; the node cuts it first, so this is a guard.
        let sized = f.result.as_ref().map(|r| {
            let bytes = serde_json::to_vec(r).map_or(usize::MAX, |b| b.len());
            (r, bytes)
        });
        let (result, result_bytes) = match sized {
            Some((r, bytes)) if bytes <= limits::MAX_RESULT_BYTES => (Some(r.clone()), bytes),
            _ => (None, 0),
        };
        let error = f
            .error
            .clone()
            .map(|e| crate::names::cut(e, limits::MAX_REPORT_ERROR_BYTES));
        let before = a.status;
        if before == AgentStatus::Migrating {
            // It ended on its own while asked to move: nothing is left to hand over.
            a.migrating_to = None;
        }
        a.status = status;
        a.started = true;
        a.updated_at = time;
        a.seq += 1;
        events.push(agent_event(
            a,
            "finished",
            time,
            json!({ "status": status, "error": error, "result": result.is_some() }),
        ));
        let record = Finished {
            agent: a.id,
            name: a.name.clone(),
            supervisor: a.supervisor.clone(),
            status,
            result,
            error,
            node: f.node,
            time,
            order: 0,
            restart_requested: f.restart_requested,
        };
        self.index.status_changed(f.agent, before, status);
        let weight = weight(result_bytes, &record.error);
        self.keep_finished(record, weight);
        if f.forget {
            if let Some(gone) = self.remove_agent(f.agent) {
                let data = json!({ "reason": "finished" });
                events.push(super::stopped_event(&gone, time, data));
                self.placing_due = true;
            }
        }
        true
    }

    /// Keeps `record`, which weighs `weight`, replacing an older one of the same agent,
    /// within the bounds.
    fn keep_finished(&mut self, mut record: Finished, weight: usize) {
        let id = record.agent;
        if let Some(old) = self.data.finished.remove(&id) {
            self.forget_finished(&old);
        }
        record.order = self.data.finished_seq;
        self.data.finished_seq += 1;
        self.finished_bytes += weight;
        self.finished_order.insert(record.order, (id, weight));
        if let Some(name) = &record.name {
            self.finished_names.insert(name.clone(), id);
        }
        self.data.finished.insert(id, Arc::new(record));
        while self.data.finished.len() > limits::MAX_FINISHED
            || self.finished_bytes > limits::MAX_FINISHED_BYTES
        {
            let Some((_, &(oldest, _))) = self.finished_order.first_key_value() else {
                break;
            };
            match self.data.finished.remove(&oldest) {
                Some(gone) => self.forget_finished(&gone),
                None => {
                    self.finished_order.pop_first();
                }
            }
        }
    }

    /// Drops the derived entries of a record removed from `finished`.
    fn forget_finished(&mut self, gone: &Finished) {
        if let Some((_, weight)) = self.finished_order.remove(&gone.order) {
            self.finished_bytes -= weight;
        }
        if let Some(name) = &gone.name {
            if self.finished_names.get(name) == Some(&gone.agent) {
                self.finished_names.remove(name);
            }
        }
    }

    /// The record of a done agent, by id, or by name (the latest done agent of that name).
    pub fn finished(&self, id_or_name: &str) -> Option<&Finished> {
        let id = match Uuid::parse_str(id_or_name) {
            Ok(id) => id,
            Err(_) => *self.finished_names.get(id_or_name)?,
        };
        self.data.finished.get(&id).map(|f| &**f)
    }
}

/// The kept records by order, with their weights.
pub(super) type FinishedOrder = BTreeMap<u64, (Uuid, usize)>;

/// The derived indexes of the kept records (`Registry::from_data`): by order with their
/// weights, the latest by name, and their total weight.
pub(super) fn finished_index(
    finished: &imbl::OrdMap<Uuid, Arc<Finished>>,
) -> (FinishedOrder, BTreeMap<String, Uuid>, usize) {
    let order: FinishedOrder = finished
        .values()
        .map(|f| (f.order, (f.agent, f.weight())))
        .collect();
    let mut names = BTreeMap::new();
    for (id, _) in order.values() {
        if let Some(name) = finished.get(id).and_then(|f| f.name.clone()) {
            names.insert(name, *id);
        }
    }
    let bytes = order.values().map(|(_, w)| w).sum();
    (order, names, bytes)
}

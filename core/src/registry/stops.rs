//! `stop_supervisor` in bounded steps: a subtree goes the way OTP stops one, last started
//! first and children before their supervisor, `limits::APPLY_STEP_AGENTS` records a step.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::{agents, Applied, Child, Refused, Registry, RegistryEvent, ROOT};
use crate::limits;

/// A `stop_supervisor` under way.
#[derive(Debug)]
pub(super) struct StopWork {
    /// The supervisors from the one being stopped down to the one whose children go next.
    path: Vec<String>,
    /// The first `limits::MAX_NAMES_IN_REPLY` names stopped, in stop order.
    stopped: Vec<String>,
    /// How many agents and supervisors have stopped.
    count: u64,
}

impl StopWork {
    fn note(&mut self, name: String) {
        self.count += 1;
        if self.stopped.len() < limits::MAX_NAMES_IN_REPLY {
            self.stopped.push(name);
        }
    }

    pub(super) fn finished(self) -> Applied {
        Applied::SupervisorStopped {
            stopped: self.stopped,
            stopped_count: self.count,
        }
    }
}

impl Registry {
    /// `stop_supervisor`: checks the name; `stop_step` then removes the subtree.
    pub(super) fn begin_stop(&self, name: &str) -> Result<StopWork, Refused> {
        if name == ROOT {
            return Err(Refused::RootStops);
        }
        if !self.data.supervisors.contains_key(name) {
            return Err(Refused::NoSupervisor {
                name: name.to_string(),
            });
        }
        Ok(StopWork {
            path: vec![name.to_string()],
            stopped: Vec::new(),
            count: 0,
        })
    }

    /// Removes the next `limits::APPLY_STEP_AGENTS` records of a subtree; true once the
    /// supervisor itself is gone. Each turn takes the last child (by position) of the deepest
    /// supervisor on the path: an agent is removed, a supervisor is entered, and a supervisor
    /// with no children left is removed. That is the reverse of start order (pre-order), and
    /// no turn lists the subtree. The nodes running its agents stop them when they see the
    /// records go.
    pub(super) fn stop_step(
        &mut self,
        time: DateTime<Utc>,
        w: &mut StopWork,
        events: &mut Vec<RegistryEvent>,
    ) -> bool {
        // A turn that enters a supervisor removes nothing but is counted: the depth is bounded
        // (`limits::MAX_SUPERVISOR_DEPTH`), so every step still makes progress.
        for _ in 0..limits::APPLY_STEP_AGENTS {
            let Some(top) = w.path.last() else {
                return true;
            };
            let last = self
                .children
                .get(top)
                .and_then(|m| m.last_key_value())
                .map(|(position, child)| (*position, child.clone()));
            match last {
                Some((position, Child::Agent { id })) => match self.remove_agent(id) {
                    Some(a) => {
                        let data = json!({ "reason": "supervisor stopped" });
                        events.push(agents::stopped_event(&a, time, data));
                        w.note(a.name.clone().unwrap_or_else(|| a.id.to_string()));
                    }
                    // An index entry without its record: drop it, so the step moves on.
                    None => self.forget_child(top, position),
                },
                Some((position, Child::Supervisor { name })) => {
                    if self.data.supervisors.contains_key(&name) {
                        w.path.push(name);
                    } else {
                        self.forget_child(top, position);
                    }
                }
                None => {
                    let name = w.path.pop().expect("the path has a last");
                    self.remove_supervisor(time, &name, events);
                    w.note(name);
                }
            }
        }
        w.path.is_empty()
    }

    fn forget_child(&mut self, sup: &str, position: u64) {
        if let Some(children) = self.children.get_mut(sup) {
            children.remove(&position);
        }
    }

    /// Removes supervisor `name`, whose children are gone, with its `stopped` event.
    fn remove_supervisor(
        &mut self,
        time: DateTime<Utc>,
        name: &str,
        events: &mut Vec<RegistryEvent>,
    ) {
        let Some(mut s) = self.data.supervisors.remove(name) else {
            return;
        };
        s.seq += 1;
        events.push(RegistryEvent {
            entity: "supervisor",
            id: name.to_string(),
            event: "stopped",
            time,
            epoch: 0,
            seq: s.seq,
            data: json!({ "name": name, "id": s.id, "parent": s.parent }),
            supervisor: Some(name.to_string()),
        });
        self.children.remove(name);
        if let Some(parent) = &s.parent {
            self.forget_child(parent, s.position);
        }
    }
}

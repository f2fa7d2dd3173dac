//! Live changes (seed 002: change a strategy at runtime): `update_supervisor` changes a
//! supervisor's policy in place, `update_agent` an agent's tags, capabilities and config.
//!
//! Nothing restarts for a policy change: the node running a supervisor's children reads the
//! policy from the registry at each exit, so the next exit uses the new one (its restart
//! history is kept, and judged against the new intensity). Tags and capabilities change in
//! place, indexes included. A config change restarts the agent with the new config, as
//! `restart_agent` does: its node sees `restart_requested` move and starts it again from its
//! last checkpoint with the new config (one that had ended starts again too).

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    agent_event, Agent, Applied, Backoff, Child, Outcome, Refused, Registry, RegistryEvent,
    Strategy, StringSet,
};
use crate::error::WireError;
use crate::limits;
use crate::names::{validate_name, validate_request_id};

/// `update_supervisor`: the fields given replace the supervisor's; the others stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSupervisor {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

impl UpdateSupervisor {
    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)?;
        let given = self.strategy.is_some()
            || self.max_restarts.is_some()
            || self.max_seconds.is_some()
            || self.backoff.is_some();
        if !given {
            return Err(WireError::bad_request(
                "give at least one of strategy, max_restarts, max_seconds, backoff",
            ));
        }
        if self.max_restarts.is_some_and(|m| m > limits::MAX_RESTARTS) {
            return Err(WireError::bad_request(format!(
                "max_restarts is at most {}",
                limits::MAX_RESTARTS
            )));
        }
        if let Some(s) = self.max_seconds {
            if s == 0 || s > limits::MAX_INTENSITY_SECONDS {
                return Err(WireError::bad_request(format!(
                    "max_seconds is 1 to {}",
                    limits::MAX_INTENSITY_SECONDS
                )));
            }
        }
        if let Some(b) = &self.backoff {
            b.validate()?;
        }
        validate_request_id(&self.request_id)
    }
}

/// `update_agent`: the fields given replace the agent's; the others stay. A `config` that is
/// given (even `null`) replaces the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgent {
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<BTreeSet<String>>,
    #[serde(
        default,
        deserialize_with = "crate::names::present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub config: Option<Value>,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

impl UpdateAgent {
    pub fn validate(&self) -> Result<(), WireError> {
        if self.agent.is_empty() {
            return Err(WireError::bad_request("agent is required"));
        }
        if self.tags.is_none() && self.capabilities.is_none() && self.config.is_none() {
            return Err(WireError::bad_request(
                "give at least one of tags, capabilities, config",
            ));
        }
        for (field, set) in [("tags", &self.tags), ("capabilities", &self.capabilities)] {
            if let Some(set) = set {
                crate::names::validate_label_set(field, set)?;
            }
        }
        if let Some(c) = &self.config {
            crate::names::validate_config(c)?;
        }
        validate_request_id(&self.request_id)
    }
}

impl Registry {
    pub(super) fn update_supervisor(
        &mut self,
        time: DateTime<Utc>,
        u: &UpdateSupervisor,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        if !self.data.supervisors.contains_key(&u.name) {
            return Err(Refused::NoSupervisor {
                name: u.name.clone(),
            });
        }
        if u.strategy == Some(Strategy::SimpleOneForOne) {
            let nested = self
                .children(&u.name)
                .any(|c| matches!(c, Child::Supervisor { .. }));
            if nested {
                return Err(Refused::HoldsSupervisors {
                    name: u.name.clone(),
                });
            }
        }
        let Some(s) = self.data.supervisors.get_mut(&u.name) else {
            return Err(Refused::NoSupervisor {
                name: u.name.clone(),
            });
        };
        if let Some(strategy) = u.strategy {
            s.strategy = strategy;
        }
        if let Some(m) = u.max_restarts {
            s.max_restarts = m;
        }
        if let Some(m) = u.max_seconds {
            s.max_seconds = m;
        }
        if let Some(b) = &u.backoff {
            s.backoff = b.clone();
        }
        s.seq += 1;
        events.push(RegistryEvent {
            entity: "supervisor",
            id: s.name.clone(),
            event: "updated",
            time,
            epoch: 0,
            seq: s.seq,
            data: json!({
                "strategy": s.strategy,
                "max_restarts": s.max_restarts,
                "max_seconds": s.max_seconds,
                "backoff": s.backoff,
            }),
            supervisor: Some(s.name.clone()),
        });
        Ok(Applied::SupervisorUpdated(Box::new(s.clone())))
    }

    pub(super) fn update_agent(
        &mut self,
        time: DateTime<Utc>,
        u: &UpdateAgent,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let Some(old) = self.agent(&u.agent).cloned() else {
            return Err(Refused::NoAgent {
                agent: u.agent.clone(),
            });
        };
        let id = old.id;
        let config_changed = u.config.as_ref().is_some_and(|c| *c != old.config);
        let mut a = old.clone();
        if let Some(tags) = &u.tags {
            a.tags = StringSet::from(tags);
        }
        if let Some(caps) = &u.capabilities {
            a.capabilities = StringSet::from(caps);
        }
        if let (Some(config), true) = (&u.config, config_changed) {
            a.config = config.clone();
        }
        a.updated_at = time;
        a.seq += 1;
        let data = json!({
            "tags": a.tags,
            "capabilities": a.capabilities,
            "config_changed": config_changed,
        });
        events.push(agent_event(&a, "updated", time, data));
        if u.tags.is_some() || u.capabilities.is_some() {
            self.index.remove(&old);
            self.index.insert(&a);
        }
        self.data.agents.insert(id, Arc::new(a));
        if config_changed {
            // The new config takes effect at a restart, as `restart_agent` asks one.
            self.restart_agent(time, &id.to_string())?;
        }
        match self.data.agents.get(&id) {
            Some(a) => Ok(Applied::AgentUpdated(Box::new(Agent::clone(a)))),
            None => Err(Refused::NoAgent {
                agent: u.agent.clone(),
            }),
        }
    }
}

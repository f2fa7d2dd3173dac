//! Supervisor commands: `create_supervisor` (its shape lives with the registry, which logs it),
//! `stop_supervisor`, `list_supervisors`, `get_supervision_tree`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::protocol::{ErrorCode, WireError};
use crate::registry::{validate_name, Child, Registry, ROOT};

/// `stop_supervisor {name}`: stops a supervisor and everything below it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopSupervisor {
    pub name: String,
    /// Accepted for symmetry with creating commands; stopping is naturally idempotent.
    #[serde(default)]
    pub request_id: Option<String>,
}

impl StopSupervisor {
    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)?;
        crate::registry::validate_request_id(&self.request_id)
    }
}

/// `list_supervisors {parent?}`: every supervisor, or the direct children of `parent`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSupervisors {
    #[serde(default)]
    pub parent: Option<String>,
}

impl ListSupervisors {
    pub fn validate(&self) -> Result<(), WireError> {
        self.parent
            .as_deref()
            .map_or(Ok(()), |p| validate_name("parent", p))
    }

    /// Answers from the registry.
    pub fn answer(&self, reg: &Registry) -> Result<Value, WireError> {
        let sups: Vec<&crate::registry::Supervisor> = match &self.parent {
            None => reg.data().supervisors.values().collect(),
            Some(p) => {
                reg.supervisor(p).ok_or_else(|| not_found(p))?;
                reg.children(p)
                    .filter_map(|c| {
                        let Child::Supervisor { name } = c;
                        reg.supervisor(name.as_str())
                    })
                    .collect()
            }
        };
        Ok(json!({ "supervisors": sups }))
    }
}

/// `get_supervision_tree {name?}`: the tree below `name` (default `root`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetSupervisionTree {
    #[serde(default)]
    pub name: Option<String>,
}

impl GetSupervisionTree {
    pub fn validate(&self) -> Result<(), WireError> {
        self.name
            .as_deref()
            .map_or(Ok(()), |n| validate_name("name", n))
    }

    /// Answers from the registry.
    pub fn answer(&self, reg: &Registry) -> Result<Value, WireError> {
        let name = self.name.as_deref().unwrap_or(ROOT);
        reg.tree(name).ok_or_else(|| not_found(name))
    }
}

fn not_found(name: &str) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("no supervisor named {name:?}"))
}

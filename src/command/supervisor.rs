//! Supervisor commands: `create_supervisor` (its shape lives with the registry, which logs it),
//! `stop_supervisor`, `list_supervisors`, `get_supervision_tree`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use std::ops::Bound;

use crate::protocol::{ErrorCode, WireError};
use crate::registry::{page_limit, take_page, validate_name, Child, Registry, Supervisor, ROOT};

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

/// `list_supervisors {parent?, after?, limit?}`: supervisors by name, or the children of
/// `parent` in start order, a page at a time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSupervisors {
    #[serde(default)]
    pub parent: Option<String>,
    /// Start after this supervisor (the previous page's `next`).
    #[serde(default)]
    pub after: Option<String>,
    /// Page size, 1 to 1,000 (the default).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl ListSupervisors {
    pub fn validate(&self) -> Result<(), WireError> {
        self.parent
            .as_deref()
            .map_or(Ok(()), |p| validate_name("parent", p))?;
        self.after
            .as_deref()
            .map_or(Ok(()), |a| validate_name("after", a))?;
        page_limit(self.limit).map(|_| ())
    }

    /// Answers from the registry.
    pub fn answer(&self, reg: &Registry) -> Result<Value, WireError> {
        let limit = page_limit(self.limit)?;
        let items: Box<dyn Iterator<Item = &Supervisor>> = match &self.parent {
            None => {
                let from = match &self.after {
                    Some(a) => Bound::Excluded(a.clone()),
                    None => Bound::Unbounded,
                };
                Box::new(
                    reg.data()
                        .supervisors
                        .range((from, Bound::Unbounded))
                        .map(|(_, s)| s),
                )
            }
            Some(p) => {
                reg.supervisor(p).ok_or_else(|| not_found(p))?;
                let children = reg.children(p).filter_map(|c| {
                    let Child::Supervisor { name } = c else {
                        return None;
                    };
                    reg.supervisor(name.as_str())
                });
                match self.after.clone() {
                    Some(a) => Box::new(children.skip_while(move |s| s.name != a).skip(1)),
                    None => Box::new(children),
                }
            }
        };
        let (page, more) = take_page(items, limit);
        let next = if more {
            page.last().map(|s| s.name.clone())
        } else {
            None
        };
        Ok(json!({ "supervisors": page, "next": next }))
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

//! Agent templates (seed 000's supervisor templates, seed 002's AgentSpec registry): a named
//! agent spec (kind, config, restart, labels, placement, shutdown) kept in the registry, which
//! `spawn_agent {template, overrides}` and `spawn_agent_group {template: "name"}` start agents
//! from, and `find_templates` matches by capability, tag, kind or text.
//!
//! A spawn names its template and the leader logs it so; every replica resolves the template
//! when it applies the spawn, so a spawn and a `delete_template` racing each other are ordered
//! by the log like any two commands. Templates are bounded in count
//! (`limits::MAX_TEMPLATES`) and a template's config like a spawn's.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    page_limit, take_page, validate_name, validate_request_id, Applied, Outcome, Refused, Registry,
    RegistryEvent, SpawnAgent,
};
use crate::error::{ErrorCode, WireError};
use crate::limits;
use crate::placement::Placement;
use crate::supervision::RestartType;

/// A registered agent spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    pub description: String,
    /// The spec: everything of `spawn_agent` but the agent's name and supervisor.
    pub spec: SpawnAgent,
    #[serde(with = "super::time")]
    pub created_at: DateTime<Utc>,
    /// Per-entity event sequence number.
    pub seq: u64,
    /// A supervisor template: the subtree `spawn_subtree` instantiates (its `spec` is then
    /// empty). Left out when absent, so an agent template encodes (and weighs) as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<Box<super::SubtreeDocument>>,
}

impl Template {
    /// The template as `list_templates` and `find_templates` show it: without its config,
    /// which may hold secrets (`get_template`, an operator's command, shows it).
    pub fn summary(&self) -> Value {
        if let Some(d) = &self.subtree {
            return json!({
                "name": self.name,
                "description": self.description,
                "subtree": {
                    "root": d.root,
                    "supervisors": d.supervisors.len(),
                    "agents": d.agents.len(),
                },
                "kinds": self.kinds(),
                "tags": self.labels(|a| &a.tags),
                "capabilities": self.labels(|a| &a.capabilities),
                "created_at": self.created_at,
                "seq": self.seq,
            });
        }
        json!({
            "name": self.name,
            "description": self.description,
            "kind": self.spec.kind,
            "restart": self.spec.restart,
            "tags": self.spec.tags,
            "capabilities": self.spec.capabilities,
            "placement": self.spec.placement,
            "shutdown_ms": self.spec.shutdown_ms,
            "created_at": self.created_at,
            "seq": self.seq,
        })
    }

    /// The whole template, config (or document) included.
    pub fn full(&self) -> Value {
        let mut v = self.summary();
        match &self.subtree {
            Some(d) => v["document"] = serde_json::to_value(d).unwrap_or_default(),
            None => v["config"] = self.spec.config.clone(),
        }
        v
    }

    /// The kinds it starts.
    fn kinds(&self) -> BTreeSet<&str> {
        match &self.subtree {
            Some(d) => d
                .agents
                .iter()
                .map(|a| a.kind.as_str())
                .take(limits::MAX_LABELS)
                .collect(),
            None => BTreeSet::from([self.spec.kind.as_str()]),
        }
    }

    /// The tags or capabilities of the agents it starts.
    fn labels(&self, of: impl Fn(&super::SubtreeAgent) -> &BTreeSet<String>) -> BTreeSet<&str> {
        match &self.subtree {
            // At most as many as an agent carries, so a listing's page stays as large as for
            // agent templates.
            Some(d) => d
                .agents
                .iter()
                .flat_map(|a| of(a).iter().map(String::as_str))
                .take(limits::MAX_LABELS)
                .collect(),
            None => BTreeSet::new(),
        }
    }
}

/// `register_template`: a new template (a name in use is refused: delete it first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterTemplate {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Required, unless `subtree` makes it a supervisor template.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub config: Value,
    #[serde(default)]
    pub restart: RestartType,
    #[serde(default = "super::agents::default_shutdown_ms")]
    pub shutdown_ms: u64,
    #[serde(default)]
    pub tags: BTreeSet<String>,
    #[serde(default)]
    pub capabilities: BTreeSet<String>,
    #[serde(default)]
    pub placement: Option<Placement>,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
    /// A supervisor template: a subtree document (seed 000's supervisor templates), which
    /// `spawn_subtree` instantiates under a parent with a prefix; then no agent spec is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<Box<super::SubtreeDocument>>,
}

impl RegisterTemplate {
    /// The spec the template holds.
    pub fn spec(&self) -> SpawnAgent {
        SpawnAgent {
            kind: self.kind.clone(),
            config: self.config.clone(),
            restart: self.restart,
            shutdown_ms: self.shutdown_ms,
            tags: self.tags.clone(),
            capabilities: self.capabilities.clone(),
            placement: self.placement.clone(),
            ..SpawnAgent::empty()
        }
    }

    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)?;
        if self.description.len() > limits::MAX_TEMPLATE_DESCRIPTION {
            return Err(WireError::bad_request(format!(
                "description is at most {} bytes",
                limits::MAX_TEMPLATE_DESCRIPTION
            )));
        }
        if let Some(d) = &self.subtree {
            if self.spec().has_own_spec() {
                return Err(WireError::bad_request(
                    "a supervisor template (subtree) gives no kind, config, tags, capabilities \
                     or placement of its own: its agents do",
                ));
            }
            super::validate_document(d)?;
            // Operators register templates; putting state into agents is an admin's import.
            if d.agents
                .iter()
                .any(|a| a.checkpoint.is_some() || a.status.is_some())
            {
                return Err(WireError::bad_request(
                    "a supervisor template's agents carry no checkpoint or status: it starts \
                     them afresh (import_subtree, an admin's command, restores state)",
                ));
            }
            let bytes = super::outcome::json_len(d);
            if bytes > limits::MAX_TEMPLATE_SUBTREE_BYTES {
                return Err(WireError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "a supervisor template's document is {bytes} bytes as JSON; the limit \
                         is {}",
                        limits::MAX_TEMPLATE_SUBTREE_BYTES
                    ),
                ));
            }
            return validate_request_id(&self.request_id);
        }
        if self.kind.is_empty() {
            return Err(WireError::bad_request(
                "kind is required (or subtree, for a supervisor template)",
            ));
        }
        let bytes = crate::names::validate_config(&self.config)?;
        if bytes > limits::MAX_TEMPLATE_CONFIG_BYTES {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "a template's config is at most {} bytes as JSON",
                    limits::MAX_TEMPLATE_CONFIG_BYTES
                ),
            ));
        }
        self.spec().validate()?;
        validate_request_id(&self.request_id)
    }
}

/// What `spawn_agent {template}` changes of its template: each field given replaces the
/// template's (`config` even when `null`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(
        default,
        deserialize_with = "crate::names::present_value",
        skip_serializing_if = "Option::is_none"
    )]
    pub config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// `get_template` and `delete_template`: `{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateRef {
    pub name: String,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

impl TemplateRef {
    pub fn validate(&self) -> Result<(), WireError> {
        validate_name("name", &self.name)?;
        validate_request_id(&self.request_id)
    }
}

/// `list_templates` and `find_templates`: templates in name order that carry the capability
/// and the tag, are of the kind, and whose name, description or kind contains the text (any
/// case); a page of at most `limit` after `after`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindTemplates {
    #[serde(default)]
    pub capability: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

impl Overrides {
    pub fn validate(&self) -> Result<(), WireError> {
        for (field, set) in [("tags", &self.tags), ("capabilities", &self.capabilities)] {
            if let Some(set) = set {
                crate::names::validate_label_set(field, set)?;
            }
        }
        if self
            .shutdown_ms
            .is_some_and(|ms| ms > limits::MAX_SHUTDOWN_MS)
        {
            return Err(WireError::bad_request(format!(
                "shutdown_ms is at most {}",
                limits::MAX_SHUTDOWN_MS
            )));
        }
        if let Some(p) = &self.placement {
            p.validate()?;
        }
        if let Some(c) = &self.config {
            crate::names::validate_config(c)?;
        }
        Ok(())
    }
}

impl FindTemplates {
    pub fn validate(&self) -> Result<(), WireError> {
        page_limit(self.limit)?;
        if self
            .text
            .as_ref()
            .is_some_and(|t| t.len() > limits::MAX_NAME_LEN)
        {
            return Err(WireError::bad_request(format!(
                "text is at most {} bytes",
                limits::MAX_NAME_LEN
            )));
        }
        Ok(())
    }

    pub fn answer(&self, reg: &Registry) -> Result<Value, WireError> {
        let limit = page_limit(self.limit)?;
        let text = self.text.as_ref().map(|t| t.to_lowercase());
        let from = match &self.after {
            Some(a) => std::ops::Bound::Excluded(a.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let matching = reg
            .data
            .templates
            .range((from, std::ops::Bound::Unbounded))
            .map(|(_, t)| t)
            .filter(|t| {
                let s = &t.spec;
                // A supervisor template matches by its agents: one pass each, no sets built.
                let agents = t.subtree.as_deref().map(|d| d.agents.as_slice());
                let any = |f: &dyn Fn(&super::SubtreeAgent) -> bool| match agents {
                    Some(list) => list.iter().any(f),
                    None => false,
                };
                let cap = |c: &String| match agents {
                    Some(_) => any(&|a| a.capabilities.contains(c)),
                    None => s.capabilities.contains(c),
                };
                let tag = |g: &String| match agents {
                    Some(_) => any(&|a| a.tags.contains(g)),
                    None => s.tags.contains(g),
                };
                let kind = |k: &str| match agents {
                    Some(_) => any(&|a| a.kind == k),
                    None => s.kind == k,
                };
                let kind_text = |x: &str| match agents {
                    Some(_) => any(&|a| a.kind.to_lowercase().contains(x)),
                    None => s.kind.to_lowercase().contains(x),
                };
                self.capability.as_ref().is_none_or(cap)
                    && self.tag.as_ref().is_none_or(tag)
                    && self.kind.as_deref().is_none_or(kind)
                    && text.as_ref().is_none_or(|x| {
                        t.name.to_lowercase().contains(x)
                            || t.description.to_lowercase().contains(x)
                            || kind_text(x)
                    })
            });
        let (page, more) = take_page(matching, limit);
        let next = if more {
            page.last().map(|t| t.name.clone())
        } else {
            None
        };
        let templates: Vec<Value> = page.iter().map(|t| t.summary()).collect();
        Ok(json!({ "templates": templates, "next": next }))
    }
}

impl Registry {
    pub(super) fn register_template(
        &mut self,
        time: DateTime<Utc>,
        r: &RegisterTemplate,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        if self.data.templates.contains_key(&r.name) {
            return Err(Refused::TemplateExists {
                name: r.name.clone(),
            });
        }
        if self.data.templates.len() >= limits::MAX_TEMPLATES {
            return Err(Refused::TooManyTemplates {
                max: limits::MAX_TEMPLATES as u64,
            });
        }
        let t = Template {
            name: r.name.clone(),
            description: r.description.clone(),
            spec: r.spec(),
            created_at: time,
            seq: 1,
            subtree: r.subtree.clone(),
        };
        events.push(template_event(&t, "registered", time, t.summary()));
        self.data
            .templates
            .insert(t.name.clone(), Arc::new(t.clone()));
        Ok(Applied::TemplateRegistered(Box::new(t)))
    }

    pub(super) fn delete_template(
        &mut self,
        time: DateTime<Utc>,
        name: &str,
        events: &mut Vec<RegistryEvent>,
    ) -> Outcome {
        let Some(t) = self.data.templates.remove(name) else {
            return Err(Refused::NoTemplate { name: name.into() });
        };
        let mut event = template_event(&t, "deleted", time, json!({ "name": t.name }));
        event.seq += 1;
        events.push(event);
        Ok(Applied::TemplateDeleted {
            name: t.name.clone(),
        })
    }

    /// The template named `name`.
    pub fn template(&self, name: &str) -> Option<&Template> {
        self.data.templates.get(name).map(|t| &**t)
    }

    /// The spec a spawn asks for: its own, or its template's with its overrides applied (and
    /// its name and supervisor).
    pub(super) fn resolve_spawn(&self, s: &SpawnAgent) -> Result<SpawnAgent, Refused> {
        let Some(name) = &s.template else {
            return Ok(s.clone());
        };
        let Some(t) = self.template(name) else {
            return Err(Refused::NoTemplate { name: name.clone() });
        };
        if t.subtree.is_some() {
            return Err(Refused::WrongTemplate {
                name: name.clone(),
                subtree: true,
            });
        }
        let mut spec = t.spec.clone();
        spec.supervisor = s.supervisor.clone();
        spec.name = s.name.clone();
        if let Some(o) = &s.overrides {
            if let Some(c) = &o.config {
                spec.config = c.clone();
            }
            if let Some(r) = o.restart {
                spec.restart = r;
            }
            if let Some(ms) = o.shutdown_ms {
                spec.shutdown_ms = ms;
            }
            if let Some(t) = &o.tags {
                spec.tags = t.clone();
            }
            if let Some(c) = &o.capabilities {
                spec.capabilities = c.clone();
            }
            if let Some(p) = &o.placement {
                spec.placement = Some(p.clone());
            }
        }
        Ok(spec)
    }
}

fn template_event(
    t: &Template,
    event: &'static str,
    time: DateTime<Utc>,
    data: Value,
) -> RegistryEvent {
    RegistryEvent {
        entity: "template",
        id: t.name.clone(),
        event,
        time,
        epoch: 0,
        seq: t.seq,
        data,
        supervisor: None,
    }
}

//! A whole subtree moved between clusters (seed 002: serialize the complete supervisor state
//! and move it to another system; seed 003: export and import state as JSON).
//!
//! A *subtree document* holds a supervisor, every supervisor and agent below it, their
//! policies and specs, and each agent's latest checkpoint. `export_copy` takes what a document
//! is made from in one read (records are shared, not copied), and the node hands it out in
//! pages. An import is staged: `import_begin` opens it, each `import_page` adds part of the
//! document to it (numbered, so a page sent again is not staged twice), and `import_commit`
//! checks the whole and then creates it, in bounded steps, as one command; `import_abort`
//! drops it. A staged import is replicated state, bounded in number, bytes and items, and is
//! dropped after `limits::IMPORT_TTL_SECS` without a page: a failed or abandoned import
//! changes nothing else. `import_subtree` does all of it with a document in one request.
//!
//! Imported names get the import's `prefix`; ids are drawn afresh. Agents keep their start
//! order among siblings (the document's `position`s are ranked, not copied), count as having
//! run (a failed start is a crash for their supervisor, not a refused child: the import was
//! accepted as a whole), and start from their checkpoint on whatever node takes them; one
//! that no node can take now waits for one, as after a fail-over.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::agents::agent_event;
use super::{
    Agent, AgentStatus, Applied, Checkpoint, Child, CreateSupervisor, Outcome, Refused, Registry,
    RegistryEvent, SpawnAgent, StringSet, Supervisor, SupervisorPlacement,
};
use crate::error::WireError;
use crate::limits;
use crate::placement::{Placement, Refusal};
use crate::supervision::{Backoff, RestartType, Strategy};

/// The `format` of a subtree document.
pub const SUBTREE_FORMAT: &str = "warden.subtree";
/// The newest document version this build writes and reads.
pub const SUBTREE_VERSION: u32 = 1;

/// A supervisor in a subtree document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtreeSupervisor {
    pub name: String,
    /// Another supervisor of the document; for the document's top, the parent it had where it
    /// was exported (the import puts it under its own `parent`).
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default = "super::types::otp_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "super::types::otp_max_seconds")]
    pub max_seconds: u32,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default)]
    pub placement: SupervisorPlacement,
    /// Its start order where it was exported: only the order among siblings counts.
    #[serde(default)]
    pub position: Option<u64>,
}

/// An agent in a subtree document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtreeAgent {
    /// Its id where it was exported; an import draws a new one.
    #[serde(default, deserialize_with = "any_uuid::option::deserialize")]
    pub id: Option<Uuid>,
    #[serde(default)]
    pub name: Option<String>,
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
    /// A supervisor of the document.
    pub supervisor: String,
    #[serde(default)]
    pub position: Option<u64>,
    #[serde(default)]
    pub checkpoint: Option<SubtreeCheckpoint>,
    /// Its status where it was exported: an agent `stopped` for good is imported stopped.
    #[serde(default)]
    pub status: Option<AgentStatus>,
}

/// An agent's latest checkpoint in a subtree document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtreeCheckpoint {
    pub seq: u64,
    #[serde(with = "super::time")]
    pub time: DateTime<Utc>,
    /// The kind's MessagePack bytes: base64 text in JSON, `bin` in MessagePack (either is
    /// read in either).
    #[serde(with = "state_bytes")]
    pub state: Bytes,
}

/// What identifies a document: its format, version and top supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtreeHeader {
    pub format: String,
    pub version: u32,
    /// The name of the document's top supervisor.
    pub root: String,
}

impl SubtreeHeader {
    /// Refuses another format, and a version newer than this build reads.
    pub fn check(&self) -> Result<(), WireError> {
        if self.format != SUBTREE_FORMAT {
            return Err(WireError::bad_request(format!(
                "document format is {:?}, not {SUBTREE_FORMAT:?}",
                self.format
            )));
        }
        if self.version == 0 || self.version > SUBTREE_VERSION {
            return Err(WireError::bad_request(format!(
                "document format version {} is not one this cluster reads (1 to \
                 {SUBTREE_VERSION}); import it with the warden that exported it or a newer one",
                self.version
            )));
        }
        super::validate_name("root", &self.root)
    }
}

/// A whole document, as `import_subtree` takes it and `warden ctl export` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtreeDocument {
    pub format: String,
    pub version: u32,
    pub root: String,
    /// Where it came from (information only).
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub exported_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub supervisors: Vec<SubtreeSupervisor>,
    #[serde(default)]
    pub agents: Vec<SubtreeAgent>,
}

impl SubtreeDocument {
    pub fn header(&self) -> SubtreeHeader {
        SubtreeHeader {
            format: self.format.clone(),
            version: self.version,
            root: self.root.clone(),
        }
    }
}

impl SubtreeSupervisor {
    /// What it weighs in a staged import.
    fn weight(&self) -> u64 {
        (super::outcome::json_len(self) + limits::IMPORT_ITEM_OVERHEAD_BYTES) as u64
    }

    /// Checks everything that does not depend on the registry's state.
    pub fn validate(&self) -> Result<(), WireError> {
        if let Some(p) = &self.parent {
            super::validate_name("parent", p)?;
        }
        CreateSupervisor {
            name: self.name.clone(),
            parent: None,
            strategy: self.strategy,
            max_restarts: self.max_restarts,
            max_seconds: self.max_seconds,
            backoff: self.backoff.clone(),
            placement: self.placement,
            request_id: None,
        }
        .validate()
    }
}

impl SubtreeAgent {
    /// The spawn it amounts to under supervisor `supervisor` with name `name`.
    fn spawn(&self, supervisor: String, name: Option<String>) -> SpawnAgent {
        SpawnAgent {
            supervisor: Some(supervisor),
            name,
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

    /// Checks everything that does not depend on the registry's state.
    pub fn validate(&self) -> Result<(), WireError> {
        self.spawn(self.supervisor.clone(), self.name.clone())
            .validate()?;
        if let Some(c) = &self.checkpoint {
            if c.seq == u64::MAX {
                return Err(WireError::bad_request(format!(
                    "agent {}: checkpoint seq must be below {}",
                    self.label(),
                    u64::MAX
                )));
            }
            if c.state.len() > limits::MAX_CHECKPOINT_BYTES {
                return Err(WireError::new(
                    crate::error::ErrorCode::TooLarge,
                    format!(
                        "agent {}: its checkpoint is {} bytes; the limit is {}",
                        self.label(),
                        c.state.len(),
                        limits::MAX_CHECKPOINT_BYTES
                    ),
                ));
            }
        }
        Ok(())
    }

    /// How errors name it: its name, else its old id, else its kind.
    pub fn label(&self) -> String {
        match (&self.name, self.id) {
            (Some(n), _) => format!("{n:?}"),
            (None, Some(id)) => id.to_string(),
            (None, None) => format!("of kind {:?}", self.kind),
        }
    }

    /// What it weighs in a staged import: its checkpoint and config bytes and a fixed share
    /// for the rest. Every replica counts the same.
    fn weight(&self) -> u64 {
        use super::outcome::json_len;
        let text = [&self.kind, &self.supervisor]
            .into_iter()
            .chain(&self.name)
            .map(String::len)
            .sum::<usize>();
        let labels = json_len(&self.tags) + json_len(&self.capabilities);
        let state = self.checkpoint.as_ref().map_or(0, |c| c.state.len());
        let sum = json_len(&self.config) + json_len(&self.placement) + labels + text + state;
        (sum + limits::IMPORT_ITEM_OVERHEAD_BYTES) as u64
    }
}

/// `import_begin {parent?, prefix?, header}`: opens a staged import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportBegin {
    /// Where the document's top goes (default `root`).
    #[serde(default)]
    pub parent: Option<String>,
    /// Put before every imported supervisor's and agent's name.
    #[serde(default)]
    pub prefix: String,
    pub header: SubtreeHeader,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

/// `import_page {import, page, supervisors?, agents?}`: part of a staged import's document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportPage {
    #[serde(deserialize_with = "any_uuid::deserialize")]
    pub import: Uuid,
    /// 0 for the first page, then one more for each.
    pub page: u32,
    #[serde(default)]
    pub supervisors: Vec<SubtreeSupervisor>,
    #[serde(default)]
    pub agents: Vec<SubtreeAgent>,
    /// Accepted as on every write, and not needed: a page is staged once by its number.
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

/// `import_subtree {document, parent?, prefix?}`: a whole document in one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSubtree {
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub prefix: String,
    pub document: SubtreeDocument,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

/// `spawn_subtree {template, parent?, prefix?}`: a supervisor template instantiated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnSubtree {
    pub template: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub prefix: String,
    #[serde(default, skip_serializing)]
    pub request_id: Option<String>,
}

impl SpawnSubtree {
    pub fn validate(&self) -> Result<(), WireError> {
        super::validate_name("template", &self.template)?;
        if let Some(p) = &self.parent {
            super::validate_name("parent", p)?;
        }
        validate_prefix(&self.prefix)?;
        super::validate_request_id(&self.request_id)
    }
}

/// Checks a subtree document's items, as an import or a supervisor template takes them.
pub fn validate_document(d: &SubtreeDocument) -> Result<(), WireError> {
    d.header().check()?;
    d.supervisors.iter().try_for_each(|s| s.validate())?;
    d.agents.iter().try_for_each(|a| a.validate())
}

/// Checks an import's prefix.
pub fn validate_prefix(prefix: &str) -> Result<(), WireError> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > limits::MAX_NAME_LEN / 2 {
        return Err(WireError::bad_request(format!(
            "prefix is at most {} bytes",
            limits::MAX_NAME_LEN / 2
        )));
    }
    super::validate_name("prefix", prefix)
}

impl ImportBegin {
    pub fn validate(&self) -> Result<(), WireError> {
        if let Some(p) = &self.parent {
            super::validate_name("parent", p)?;
        }
        validate_prefix(&self.prefix)?;
        self.header.check()?;
        super::validate_request_id(&self.request_id)
    }
}

impl ImportPage {
    pub fn validate(&self) -> Result<(), WireError> {
        self.supervisors.iter().try_for_each(|s| s.validate())?;
        self.agents.iter().try_for_each(|a| a.validate())
    }
}

impl ImportSubtree {
    pub fn validate(&self) -> Result<(), WireError> {
        if let Some(p) = &self.parent {
            super::validate_name("parent", p)?;
        }
        validate_prefix(&self.prefix)?;
        validate_document(&self.document)?;
        super::validate_request_id(&self.request_id)
    }
}

/// An import being staged: what its pages brought so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedImport {
    pub id: Uuid,
    pub parent: String,
    pub prefix: String,
    pub root: String,
    /// When it began or last got a page: it is dropped `limits::IMPORT_TTL_SECS` later.
    #[serde(with = "super::time")]
    pub touched: DateTime<Utc>,
    /// Pages staged: the next one expected is numbered so.
    pub pages: u32,
    /// What its items weigh (`SubtreeAgent::weight`).
    pub bytes: u64,
    pub supervisors: Vec<Arc<SubtreeSupervisor>>,
    pub agents: Vec<Arc<SubtreeAgent>>,
}

/// Why an import's document cannot be imported as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ImportProblem {
    /// Another format, or a version this build does not read.
    Unreadable {
        format: String,
        version: u32,
    },
    /// No supervisor of the document is named as its top.
    NoTop {
        root: String,
    },
    DuplicateSupervisor {
        name: String,
    },
    DuplicateAgent {
        name: String,
    },
    /// A supervisor's parent is not in the document (or loops back to it).
    UnknownParent {
        supervisor: String,
        parent: String,
    },
    /// An agent's supervisor is not in the document.
    UnknownSupervisor {
        agent: String,
        supervisor: String,
    },
    /// A prefixed agent name reads as an id.
    NameIsId {
        name: String,
    },
    /// A prefixed name is too long.
    NameTooLong {
        name: String,
    },
    /// A `simple_one_for_one` supervisor of the document holds a supervisor.
    SimpleHoldsSupervisor {
        name: String,
    },
    /// The stage does not hold what the commit says was sent: a page is missing.
    Incomplete {
        supervisors: u64,
        agents: u64,
        expected_supervisors: u64,
        expected_agents: u64,
    },
    /// Pages came out of order.
    PageOutOfOrder {
        expected: u32,
        got: u32,
    },
    /// The document would be larger than an import may be.
    TooLarge {
        bytes: u64,
        max: u64,
    },
    /// It holds more supervisors or agents than an import may.
    TooManyItems {
        max_supervisors: u64,
        max_agents: u64,
    },
}

impl std::fmt::Display for ImportProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use ImportProblem::*;
        match self {
            Unreadable { format, version } => write!(
                f,
                "a document of format {format:?} version {version}: this cluster reads \
                 {SUBTREE_FORMAT:?} versions 1 to {SUBTREE_VERSION}"
            ),
            NoTop { root } => write!(f, "the document has no supervisor named {root:?}, its top"),
            DuplicateSupervisor { name } => {
                write!(f, "the document names supervisor {name:?} twice")
            }
            DuplicateAgent { name } => write!(f, "the document names agent {name:?} twice"),
            UnknownParent { supervisor, parent } => write!(
                f,
                "supervisor {supervisor:?}: its parent {parent:?} is not below the document's \
                 top"
            ),
            UnknownSupervisor { agent, supervisor } => write!(
                f,
                "agent {agent}: its supervisor {supervisor:?} is not in the document"
            ),
            NameIsId { name } => write!(
                f,
                "with the prefix, agent name {name:?} reads as an id; use another prefix"
            ),
            NameTooLong { name } => write!(
                f,
                "with the prefix, {name:?} is longer than {} bytes",
                limits::MAX_NAME_LEN
            ),
            SimpleHoldsSupervisor { name } => write!(
                f,
                "supervisor {name:?} is simple_one_for_one and cannot hold a supervisor"
            ),
            Incomplete {
                supervisors,
                agents,
                expected_supervisors,
                expected_agents,
            } => write!(
                f,
                "the import holds {supervisors} supervisors and {agents} agents, not the \
                 {expected_supervisors} and {expected_agents} sent: a page is missing"
            ),
            PageOutOfOrder { expected, got } => {
                write!(f, "page {got} came before page {expected}; send {expected}")
            }
            TooLarge { bytes, max } => write!(
                f,
                "the import would weigh {bytes} bytes (checkpoints and configs); staged imports \
                 weigh at most {max} in all"
            ),
            TooManyItems {
                max_supervisors,
                max_agents,
            } => write!(
                f,
                "an import holds at most {max_supervisors} supervisors and {max_agents} agents"
            ),
        }
    }
}

/// The ids of an import's items: drawn from the command's stamped id, supervisors first.
fn item_id(base: Uuid, i: usize) -> Uuid {
    Uuid::from_u128(base.as_u128().wrapping_add(i as u128 + 1))
}

/// An import past its checks: its items are created `limits::APPLY_STEP_AGENTS` at a time.
#[derive(Debug)]
pub(super) struct ImportWork {
    id: Uuid,
    staged: Arc<StagedImport>,
    /// Supervisors by index, parents first.
    order: Vec<usize>,
    /// The position each item gets: supervisors' indexes first, then agents'.
    positions: Vec<u64>,
    /// Items created so far (supervisors in `order`, then agents).
    next: usize,
    /// The supervisors (by index) that head a colocated unit: placed as one once every
    /// supervisor is in.
    units: BTreeSet<usize>,
    /// Each supervisor's imported agents per node (by the document's name), for spread
    /// placement without counting siblings again for each agent.
    siblings: BTreeMap<String, BTreeMap<u64, usize>>,
    top: String,
}

impl ImportWork {
    pub(super) fn finished(self) -> Applied {
        Applied::SubtreeImported {
            supervisor: self.top,
            supervisors: self.staged.supervisors.len() as u64,
            agents: self.staged.agents.len() as u64,
        }
    }
}

impl Registry {
    /// Staged imports, by id.
    pub fn staged_imports(&self) -> impl Iterator<Item = &StagedImport> {
        self.data.imports.values().map(|s| &**s)
    }

    /// Drops staged imports that got no page for `limits::IMPORT_TTL_SECS`. Driven by the
    /// proposal's time, so every replica drops the same ones at the same place in the log.
    pub(super) fn expire_imports(&mut self, now: DateTime<Utc>) {
        if self.data.imports.is_empty() {
            return;
        }
        let horizon = now - chrono::Duration::seconds(limits::IMPORT_TTL_SECS);
        let stale: Vec<Uuid> = self
            .data
            .imports
            .values()
            .filter(|s| s.touched < horizon)
            .map(|s| s.id)
            .collect();
        for id in stale {
            self.data.imports.remove(&id);
        }
    }

    fn staged_bytes(&self) -> u64 {
        self.data.imports.values().map(|s| s.bytes).sum()
    }

    pub(super) fn import_begin(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        b: &ImportBegin,
    ) -> Outcome {
        unreadable(&b.header)?;
        let parent = b.parent.clone().unwrap_or_else(|| super::ROOT.to_string());
        if !self.data.supervisors.contains_key(&parent) {
            return Err(Refused::NoParent { name: parent });
        }
        if self.data.imports.len() >= limits::MAX_STAGED_IMPORTS {
            return Err(Refused::ImportsBusy {
                max: limits::MAX_STAGED_IMPORTS as u64,
            });
        }
        if self.data.imports.contains_key(&id) {
            return Err(Refused::IdTaken { id });
        }
        let staged = StagedImport {
            id,
            parent,
            prefix: b.prefix.clone(),
            root: b.header.root.clone(),
            touched: time,
            pages: 0,
            bytes: 0,
            supervisors: Vec::new(),
            agents: Vec::new(),
        };
        self.data.imports.insert(id, Arc::new(staged));
        Ok(Applied::ImportBegun { import: id })
    }

    pub(super) fn import_page(&mut self, time: DateTime<Utc>, p: &ImportPage) -> Outcome {
        let others = self.staged_bytes();
        let Some(staged) = self.data.imports.get(&p.import) else {
            return Err(Refused::NoImport { import: p.import });
        };
        let staged_answer = |s: &StagedImport| Applied::ImportStaged {
            import: s.id,
            pages: s.pages,
            supervisors: s.supervisors.len() as u64,
            agents: s.agents.len() as u64,
        };
        if p.page < staged.pages {
            // Sent again (its answer was lost): it is staged already.
            return Ok(staged_answer(staged));
        }
        if p.page > staged.pages {
            return Err(Refused::ImportInvalid(ImportProblem::PageOutOfOrder {
                expected: staged.pages,
                got: p.page,
            }));
        }
        let sups = staged.supervisors.len() + p.supervisors.len();
        let agents = staged.agents.len() + p.agents.len();
        if sups > limits::MAX_IMPORT_SUPERVISORS || agents > limits::MAX_IMPORT_AGENTS {
            return Err(too_many_items());
        }
        let weight: u64 = p.agents.iter().map(SubtreeAgent::weight).sum::<u64>()
            + p.supervisors
                .iter()
                .map(SubtreeSupervisor::weight)
                .sum::<u64>();
        // `others` counts this import's bytes too.
        let total = others + weight;
        if total > limits::MAX_IMPORT_BYTES as u64 {
            return Err(Refused::ImportInvalid(ImportProblem::TooLarge {
                bytes: total,
                max: limits::MAX_IMPORT_BYTES as u64,
            }));
        }
        let Some(staged) = self.data.imports.get_mut(&p.import) else {
            return Err(Refused::NoImport { import: p.import });
        };
        // Copies the lists of pointers if a snapshot shares them; the items stay shared.
        let s = Arc::make_mut(staged);
        s.supervisors
            .extend(p.supervisors.iter().cloned().map(Arc::new));
        s.agents.extend(p.agents.iter().cloned().map(Arc::new));
        s.bytes += weight;
        s.pages += 1;
        s.touched = time;
        Ok(staged_answer(s))
    }

    pub(super) fn import_abort(&mut self, import: Uuid) -> Outcome {
        match self.data.imports.remove(&import) {
            Some(_) => Ok(Applied::ImportAborted { import }),
            None => Err(Refused::NoImport { import }),
        }
    }

    /// `import_commit`: checks the staged document as a whole and, if it can be imported,
    /// drops it from the staged ones and returns the work that creates it.
    pub(super) fn import_commit(
        &mut self,
        id: Uuid,
        import: Uuid,
        expected: (u64, u64),
    ) -> Result<ImportWork, Refused> {
        let Some(staged) = self.data.imports.get(&import).cloned() else {
            return Err(Refused::NoImport { import });
        };
        let holds = (staged.supervisors.len() as u64, staged.agents.len() as u64);
        if holds != expected {
            return Err(Refused::ImportInvalid(ImportProblem::Incomplete {
                supervisors: holds.0,
                agents: holds.1,
                expected_supervisors: expected.0,
                expected_agents: expected.1,
            }));
        }
        let work = self.check_import(id, staged)?;
        self.data.imports.remove(&import);
        Ok(work)
    }

    /// `import_subtree`: a whole document, checked and created as `import_commit` does.
    pub(super) fn import_subtree(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        i: &ImportSubtree,
    ) -> Result<ImportWork, Refused> {
        self.import_document(time, id, &i.document, i.parent.as_deref(), &i.prefix)
    }

    /// `spawn_subtree`: a supervisor template's document, instantiated under `parent` with
    /// `prefix`, as `import_subtree` imports one.
    pub(super) fn spawn_subtree(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        s: &SpawnSubtree,
    ) -> Result<ImportWork, Refused> {
        let Some(t) = self.data.templates.get(&s.template) else {
            return Err(Refused::NoTemplate {
                name: s.template.clone(),
            });
        };
        let Some(doc) = t.subtree.clone() else {
            return Err(Refused::WrongTemplate {
                name: s.template.clone(),
                subtree: false,
            });
        };
        self.import_document(time, id, &doc, s.parent.as_deref(), &s.prefix)
    }

    fn import_document(
        &mut self,
        time: DateTime<Utc>,
        id: Uuid,
        d: &SubtreeDocument,
        parent: Option<&str>,
        prefix: &str,
    ) -> Result<ImportWork, Refused> {
        unreadable(&d.header())?;
        if d.supervisors.len() > limits::MAX_IMPORT_SUPERVISORS
            || d.agents.len() > limits::MAX_IMPORT_AGENTS
        {
            return Err(too_many_items());
        }
        let staged = StagedImport {
            id,
            parent: parent.unwrap_or(super::ROOT).to_string(),
            prefix: prefix.to_string(),
            root: d.root.clone(),
            touched: time,
            pages: 1,
            bytes: d.agents.iter().map(SubtreeAgent::weight).sum::<u64>()
                + d.supervisors
                    .iter()
                    .map(SubtreeSupervisor::weight)
                    .sum::<u64>(),
            supervisors: d.supervisors.iter().cloned().map(Arc::new).collect(),
            agents: d.agents.iter().cloned().map(Arc::new).collect(),
        };
        self.check_import(id, Arc::new(staged))
    }

    /// Everything an import could be refused for, before anything changes.
    fn check_import(&self, id: Uuid, s: Arc<StagedImport>) -> Result<ImportWork, Refused> {
        let invalid = |p| Err(Refused::ImportInvalid(p));
        let named = |n: &str| format!("{}{n}", s.prefix);
        let parent = self
            .data
            .supervisors
            .get(&s.parent)
            .ok_or_else(|| Refused::NoParent {
                name: s.parent.clone(),
            })?;
        // Supervisors by name; the top's parent is the import's.
        let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, sup) in s.supervisors.iter().enumerate() {
            if by_name.insert(&sup.name, i).is_some() {
                return invalid(ImportProblem::DuplicateSupervisor {
                    name: sup.name.clone(),
                });
            }
        }
        let Some(&top) = by_name.get(s.root.as_str()) else {
            return invalid(ImportProblem::NoTop {
                root: s.root.clone(),
            });
        };
        // Depth below the top, parents first; a parent outside the document or a loop is
        // refused (a walk longer than the document is a loop).
        let mut depth: Vec<Option<usize>> = vec![None; s.supervisors.len()];
        depth[top] = Some(0);
        for i in 0..s.supervisors.len() {
            let mut chain = Vec::new();
            let mut cur = i;
            while depth[cur].is_none() {
                let sup = &s.supervisors[cur];
                let up = sup.parent.as_deref().and_then(|p| by_name.get(p).copied());
                match up {
                    Some(p) if chain.len() <= s.supervisors.len() => {
                        chain.push(cur);
                        cur = p;
                    }
                    _ => {
                        return invalid(ImportProblem::UnknownParent {
                            supervisor: s.supervisors[i].name.clone(),
                            parent: sup.parent.clone().unwrap_or_default(),
                        })
                    }
                }
            }
            let mut d = depth[cur].unwrap_or(0);
            for c in chain.into_iter().rev() {
                d += 1;
                depth[c] = Some(d);
            }
        }
        let deepest = depth.iter().flatten().copied().max().unwrap_or(0);
        if self.depth(&s.parent) + 1 + deepest > limits::MAX_SUPERVISOR_DEPTH {
            return Err(Refused::TooDeep {
                max: limits::MAX_SUPERVISOR_DEPTH as u64,
            });
        }
        if parent.strategy == Strategy::SimpleOneForOne {
            return Err(Refused::ParentIsSimple {
                name: s.parent.clone(),
            });
        }
        for (i, sup) in s.supervisors.iter().enumerate() {
            let n = named(&sup.name);
            if n.len() > limits::MAX_NAME_LEN {
                return invalid(ImportProblem::NameTooLong { name: n });
            }
            if self.data.supervisors.contains_key(&n) {
                return Err(Refused::SupervisorExists { name: n });
            }
            let parent = (i != top)
                .then(|| sup.parent.as_deref().and_then(|p| by_name.get(p)))
                .flatten();
            if let Some(&p) = parent {
                if s.supervisors[p].strategy == Strategy::SimpleOneForOne {
                    return invalid(ImportProblem::SimpleHoldsSupervisor {
                        name: s.supervisors[p].name.clone(),
                    });
                }
            }
        }
        let mut names = BTreeSet::new();
        let mut kinds = BTreeSet::new();
        for a in &s.agents {
            if !by_name.contains_key(a.supervisor.as_str()) {
                return invalid(ImportProblem::UnknownSupervisor {
                    agent: a.label(),
                    supervisor: a.supervisor.clone(),
                });
            }
            if let Some(n) = &a.name {
                let n = named(n);
                if n.len() > limits::MAX_NAME_LEN {
                    return invalid(ImportProblem::NameTooLong { name: n });
                }
                if Uuid::parse_str(&n).is_ok() {
                    return invalid(ImportProblem::NameIsId { name: n });
                }
                if self.agent_names.contains_key(&n) {
                    return Err(Refused::AgentExists { name: n });
                }
                if !names.insert(n) {
                    return invalid(ImportProblem::DuplicateAgent {
                        name: a.name.clone().unwrap_or_default(),
                    });
                }
            }
            kinds.insert(a.kind.as_str());
        }
        if self.data.supervisors.len() + s.supervisors.len() > limits::MAX_SUPERVISORS {
            return Err(Refused::TooManySupervisors {
                max: limits::MAX_SUPERVISORS as u64,
            });
        }
        if self.data.agents.len() + s.agents.len() > limits::MAX_AGENTS {
            return Err(Refused::TooManyAgents {
                max: limits::MAX_AGENTS as u64,
            });
        }
        // Under a colocated parent the subtree runs on the parent's node: it must run them all.
        if let Some(host) = parent.node {
            let fits = self
                .data
                .nodes
                .get(&host)
                .is_some_and(|n| kinds.iter().all(|k| n.kinds.iter().any(|x| x == k)));
            if !fits {
                return Err(Refused::HostUnavailable {
                    supervisor: s.parent.clone(),
                    node: host,
                });
            }
        }
        // As for a spawn (OTP's start_child): a kind no node that is up runs is refused.
        let candidates = self.candidates();
        for k in kinds {
            if !candidates
                .iter()
                .any(|c| c.open && c.kinds.iter().any(|n| n == k))
            {
                return Err(Refused::Placement(Refusal::UnknownKind(k.to_string())));
            }
        }
        let n_sups = s.supervisors.len();
        if let Some(taken) = (0..s.agents.len())
            .map(|i| item_id(id, n_sups + i))
            .find(|a| self.data.agents.contains_key(a))
        {
            return Err(Refused::IdTaken { id: taken });
        }
        let mut order: Vec<usize> = (0..n_sups).collect();
        order.sort_by_key(|&i| (depth[i], i));
        // Positions keep the exported start order among siblings: every item is ranked by its
        // old position (items without one after, in document order), and numbered from the
        // next free position in that rank.
        let mut ranked: Vec<(u64, usize)> = s
            .supervisors
            .iter()
            .map(|x| x.position)
            .chain(s.agents.iter().map(|a| a.position))
            .enumerate()
            .map(|(i, p)| (p.unwrap_or(u64::MAX), i))
            .collect();
        ranked.sort_unstable();
        let mut positions = vec![0; ranked.len()];
        for (rank, (_, i)) in ranked.into_iter().enumerate() {
            positions[i] = self.data.next_position + rank as u64;
        }
        Ok(ImportWork {
            id,
            top: named(&s.root),
            staged: s,
            order,
            positions,
            next: 0,
            units: BTreeSet::new(),
            siblings: BTreeMap::new(),
        })
    }

    /// Creates the next `limits::APPLY_STEP_AGENTS` items of an import; true once all are in.
    pub(super) fn import_step(
        &mut self,
        time: DateTime<Utc>,
        w: &mut ImportWork,
        events: &mut Vec<RegistryEvent>,
    ) -> Result<bool, Refused> {
        let s = Arc::clone(&w.staged);
        let n_sups = s.supervisors.len();
        let total = n_sups + s.agents.len();
        let end = total.min(w.next + limits::APPLY_STEP_AGENTS as usize);
        let named = |n: &str| format!("{}{n}", s.prefix);
        for k in w.next..end {
            if k < n_sups {
                let i = w.order[k];
                let sup = &s.supervisors[i];
                let parent = if sup.name == s.root {
                    s.parent.clone()
                } else {
                    named(sup.parent.as_deref().unwrap_or_default())
                };
                let unplaced_parent = self
                    .data
                    .supervisors
                    .get(&parent)
                    .is_some_and(|p| p.node.is_none());
                let c = CreateSupervisor {
                    name: named(&sup.name),
                    parent: Some(parent),
                    strategy: sup.strategy,
                    max_restarts: sup.max_restarts,
                    max_seconds: sup.max_seconds,
                    backoff: sup.backoff.clone(),
                    placement: sup.placement,
                    request_id: None,
                };
                self.new_supervisor_at(time, item_id(w.id, i), &c, w.positions[i], events)?;
                if unplaced_parent && sup.placement == SupervisorPlacement::Colocate {
                    w.units.insert(i);
                }
                if k + 1 == n_sups {
                    self.place_import_units(w);
                }
            } else {
                let j = k - n_sups;
                let a = &s.agents[j];
                let siblings = w.siblings.entry(a.supervisor.clone()).or_default();
                let at = (item_id(w.id, k), w.positions[k]);
                self.import_agent(time, at, a, &named, siblings, events);
            }
        }
        w.next = end;
        if w.next == total {
            let last = w.positions.iter().max().map_or(0, |p| p + 1);
            self.data.next_position = self.data.next_position.max(last);
        }
        Ok(w.next == total)
    }

    /// Places each colocated unit of an import on one node that runs all its kinds, as a
    /// fail-over does; a unit no node can take waits, its agents pending. A unit inside
    /// another goes with it. One pass over the document's supervisors and one over its agents.
    fn place_import_units(&mut self, w: &ImportWork) {
        if w.units.is_empty() {
            return;
        }
        let s = &w.staged;
        let index: BTreeMap<&str, usize> = s
            .supervisors
            .iter()
            .enumerate()
            .map(|(i, x)| (x.name.as_str(), i))
            .collect();
        // The unit each supervisor belongs to, parents first.
        let mut unit_of: Vec<Option<usize>> = vec![None; s.supervisors.len()];
        for &i in &w.order {
            let sup = &s.supervisors[i];
            let parent = (sup.name != s.root)
                .then(|| sup.parent.as_deref().and_then(|p| index.get(p)))
                .flatten();
            let inherited = parent.and_then(|&p| unit_of[p]);
            unit_of[i] = inherited.or(w.units.contains(&i).then_some(i));
        }
        let mut units: BTreeMap<usize, (BTreeSet<String>, usize)> = BTreeMap::new();
        for a in &s.agents {
            if let Some(u) = index.get(a.supervisor.as_str()).and_then(|&i| unit_of[i]) {
                let (kinds, count) = units.entry(u).or_default();
                kinds.insert(a.kind.clone());
                *count += 1;
            }
        }
        for (u, (kinds, count)) in units {
            let top = format!("{}{}", s.prefix, s.supervisors[u].name);
            self.place_unit(&top, &kinds, count, None);
        }
    }

    /// Creates agent `a` at `(id, position)`; `siblings` counts its supervisor's imported
    /// agents per node (all of them: the supervisor is new).
    fn import_agent(
        &mut self,
        time: DateTime<Utc>,
        (id, position): (Uuid, u64),
        a: &SubtreeAgent,
        named: &dyn Fn(&str) -> String,
        siblings: &mut BTreeMap<u64, usize>,
        events: &mut Vec<RegistryEvent>,
    ) {
        let supervisor = named(&a.supervisor);
        let placement = a.placement.clone().unwrap_or_default();
        let target = self.place_agent_among(&a.kind, &supervisor, &placement, None, Some(siblings));
        if let Ok(n) = target {
            *siblings.entry(n).or_default() += 1;
        }
        // An agent that ended for good where it came from stays ended (as after a fail-over):
        // a finished job does not run again.
        let status = match a.status {
            Some(AgentStatus::Stopped) => AgentStatus::Stopped,
            _ => AgentStatus::Pending,
        };
        let agent = Agent {
            id,
            name: a.name.as_deref().map(named),
            kind: a.kind.clone(),
            config: a.config.clone(),
            restart: a.restart,
            shutdown_ms: a.shutdown_ms,
            tags: StringSet::from(&a.tags),
            capabilities: StringSet::from(&a.capabilities),
            supervisor,
            position,
            status,
            node: target.as_ref().ok().copied(),
            placement: placement.into(),
            migrating_to: None,
            pending_reason: target.as_ref().err().map(Refusal::describe),
            epoch: 1,
            restarts: 0,
            last_error: None,
            restart_requested: 0,
            created_at: time,
            updated_at: time,
            seq: 1,
            started: true,
        };
        let data = match &target {
            Ok(n) => json!({ "node": n, "reason": "import" }),
            Err(r) => json!({ "node": null, "reason": "import", "waits": r.describe() }),
        };
        let event = if target.is_ok() { "placed" } else { "pending" };
        events.push(agent_event(&agent, event, time, data));
        if let Some(c) = &a.checkpoint {
            let checkpoint = Checkpoint {
                agent: id,
                epoch: 1,
                seq: c.seq,
                time: c.time,
                state: c.state.clone(),
                calls: Vec::new(),
            };
            self.data.checkpoints.insert(id, Arc::new(checkpoint));
        }
        self.insert_agent(agent);
    }

    /// What a subtree document is made from, as of now: supervisor `name`, every supervisor
    /// below it (parents first) and their agents with their checkpoints. Records are shared,
    /// not copied, so it costs a pointer per item; a larger subtree than an import takes is
    /// refused.
    pub fn export_copy(&self, name: &str) -> Result<ExportCopy, WireError> {
        if !self.data.supervisors.contains_key(name) {
            return Err(WireError::new(
                crate::error::ErrorCode::NotFound,
                format!("no supervisor named {name:?}"),
            ));
        }
        let too_large = || {
            WireError::new(
                crate::error::ErrorCode::TooLarge,
                format!(
                    "the subtree holds more than {} supervisors or {} agents, more than one \
                     import takes; export parts of it",
                    limits::MAX_IMPORT_SUPERVISORS,
                    limits::MAX_IMPORT_AGENTS
                ),
            )
        };
        let mut supervisors = Vec::new();
        let mut agents = Vec::new();
        let mut queue = std::collections::VecDeque::from([name.to_string()]);
        while let Some(s) = queue.pop_front() {
            let Some(rec) = self.data.supervisors.get(&s) else {
                continue;
            };
            supervisors.push(rec.clone());
            if supervisors.len() > limits::MAX_IMPORT_SUPERVISORS {
                return Err(too_large());
            }
            for c in self.children(&s) {
                match c {
                    Child::Supervisor { name } => queue.push_back(name.clone()),
                    Child::Agent { id } => {
                        if let Some(a) = self.data.agents.get(id) {
                            agents.push((Arc::clone(a), self.data.checkpoints.get(id).cloned()));
                        }
                        if agents.len() > limits::MAX_IMPORT_AGENTS {
                            return Err(too_large());
                        }
                    }
                }
            }
        }
        Ok(ExportCopy {
            root: name.to_string(),
            supervisors,
            agents,
        })
    }
}

/// A header this build does not read, refused (the command's checks refuse it first; a log
/// entry is checked again, as every replica must agree).
fn unreadable(h: &SubtreeHeader) -> Result<(), Refused> {
    match h.check() {
        Ok(()) => Ok(()),
        Err(_) => Err(Refused::ImportInvalid(ImportProblem::Unreadable {
            format: h.format.clone(),
            version: h.version,
        })),
    }
}

fn too_many_items() -> Refused {
    Refused::ImportInvalid(ImportProblem::TooManyItems {
        max_supervisors: limits::MAX_IMPORT_SUPERVISORS as u64,
        max_agents: limits::MAX_IMPORT_AGENTS as u64,
    })
}

/// A subtree as of one read, from which its document's pages are rendered.
#[derive(Debug, Clone)]
pub struct ExportCopy {
    pub root: String,
    pub supervisors: Vec<Supervisor>,
    pub agents: Vec<(Arc<Agent>, Option<Arc<Checkpoint>>)>,
}

impl ExportCopy {
    /// Items in all: supervisors, then agents.
    pub fn len(&self) -> usize {
        self.supervisors.len() + self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The document's header.
    pub fn header(&self) -> SubtreeHeader {
        SubtreeHeader {
            format: SUBTREE_FORMAT.to_string(),
            version: SUBTREE_VERSION,
            root: self.root.clone(),
        }
    }

    /// The items from `cursor` on, as many as fit in about `budget` bytes of JSON (at least
    /// one), and the cursor of the next page if any is left.
    pub fn page(&self, cursor: usize, budget: usize) -> (Vec<Value>, Vec<Value>, Option<usize>) {
        let (mut sups, mut agents) = (Vec::new(), Vec::new());
        let mut used = 0;
        let mut i = cursor;
        while i < self.len() {
            // A record always encodes.
            let (item, is_sup) = match self.supervisors.get(i) {
                Some(s) => (serde_json::to_value(subtree_supervisor(s)), true),
                None => {
                    let a = subtree_agent(&self.agents[i - self.supervisors.len()]);
                    (serde_json::to_value(a), false)
                }
            };
            let item = item.unwrap_or_default();
            // Measured as rendered, with room for the separator.
            let weight = super::outcome::json_len(&item) + 1;
            if used > 0 && used + weight > budget {
                break;
            }
            used += weight;
            if is_sup {
                sups.push(item);
            } else {
                agents.push(item);
            }
            i += 1;
        }
        (sups, agents, (i < self.len()).then_some(i))
    }
}

fn subtree_supervisor(s: &Supervisor) -> SubtreeSupervisor {
    SubtreeSupervisor {
        name: s.name.clone(),
        parent: s.parent.clone(),
        strategy: s.strategy,
        max_restarts: s.max_restarts,
        max_seconds: s.max_seconds,
        backoff: s.backoff.clone(),
        placement: s.placement,
        position: Some(s.position),
    }
}

fn subtree_agent((a, c): &(Arc<Agent>, Option<Arc<Checkpoint>>)) -> SubtreeAgent {
    let placement = (*a.placement).clone();
    SubtreeAgent {
        id: Some(a.id),
        name: a.name.clone(),
        kind: a.kind.clone(),
        config: a.config.clone(),
        restart: a.restart,
        shutdown_ms: a.shutdown_ms,
        tags: a.tags.iter().cloned().collect(),
        capabilities: a.capabilities.iter().cloned().collect(),
        placement: (placement != Placement::default()).then_some(placement),
        supervisor: a.supervisor.clone(),
        position: Some(a.position),
        status: Some(a.status),
        checkpoint: c.as_ref().map(|c| SubtreeCheckpoint {
            seq: c.seq,
            time: c.time,
            state: c.state.clone(),
        }),
    }
}

/// A checkpoint's bytes: base64 text where the format is human-readable (JSON), raw bytes
/// otherwise (MessagePack `bin`); either form is read.
mod state_bytes {
    use std::fmt;

    use bytes::Bytes;
    use serde::{de, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&crate::base64::base64(b))
        } else {
            s.serialize_bytes(b)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct State;

        impl<'de> de::Visitor<'de> for State {
            type Value = Bytes;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a checkpoint's bytes: base64 text or binary")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Bytes, E> {
                crate::base64::unbase64(text)
                    .map(Bytes::from)
                    .ok_or_else(|| E::custom("state is not base64 (standard alphabet, padded)"))
            }

            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(b))
            }

            fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(b))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    if out.len() >= crate::limits::MAX_CHECKPOINT_BYTES {
                        return Err(de::Error::custom("state is too large"));
                    }
                    out.push(b);
                }
                Ok(Bytes::from(out))
            }
        }

        d.deserialize_any(State)
    }
}

/// An id as any client sends it: text (how every reply shows one, in JSON and MessagePack
/// alike) or 16 bytes (how a Rust client's MessagePack writes a `Uuid`).
pub mod any_uuid {
    use std::fmt;

    use serde::{de, Deserializer};
    use uuid::Uuid;

    struct Id;

    impl<'de> de::Visitor<'de> for Id {
        type Value = Uuid;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an id: UUID text or 16 bytes")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Uuid, E> {
            Uuid::parse_str(text).map_err(E::custom)
        }

        fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Uuid, E> {
            Uuid::from_slice(b).map_err(E::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        d.deserialize_any(Id)
    }

    /// The same, optional.
    pub mod option {
        use super::*;

        struct MaybeId;

        impl<'de> de::Visitor<'de> for MaybeId {
            type Value = Option<Uuid>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id (UUID text or 16 bytes) or nothing")
            }

            fn visit_none<E: de::Error>(self) -> Result<Option<Uuid>, E> {
                Ok(None)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Option<Uuid>, E> {
                Ok(None)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<Uuid>, D::Error> {
                super::deserialize(d).map(Some)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Option<Uuid>, E> {
                Id.visit_str(text).map(Some)
            }

            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Option<Uuid>, E> {
                Id.visit_bytes(b).map(Some)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
            d.deserialize_any(MaybeId)
        }
    }
}

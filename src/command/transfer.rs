//! Subtree transfer commands: `export_subtree` (paged, from one copy on the leader),
//! `import_subtree` (a whole document in one request), and the staged import of a document
//! too large for one: `import_begin`, `import_page`, `import_commit`, `import_abort`. The
//! document and the staging are `registry::transfer`'s.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::protocol::WireError;
use crate::registry::{any_uuid, SubtreeHeader, SUBTREE_FORMAT};
pub use crate::registry::{ImportBegin, ImportPage, ImportSubtree};

/// `export_subtree {name, export?, cursor?}`: without `export`, takes a copy of supervisor
/// `name`'s subtree on the leader and answers its first page; with the `export` id and the
/// `cursor` a page answered as `next`, the page there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSubtree {
    pub name: String,
    #[serde(default, deserialize_with = "any_uuid::option::deserialize")]
    pub export: Option<Uuid>,
    #[serde(default)]
    pub cursor: usize,
}

impl ExportSubtree {
    pub fn validate(&self) -> Result<(), WireError> {
        crate::registry::validate_name("name", &self.name)?;
        if self.export.is_some_and(|id| id.is_nil()) {
            return Err(WireError::bad_request("export: the nil id names no export"));
        }
        if self.export.is_none() && self.cursor != 0 {
            return Err(WireError::bad_request(
                "a cursor goes with the export it came from",
            ));
        }
        Ok(())
    }
}

/// `import_commit {import, supervisors, agents}`: the counts are what the importer sent, so a
/// page lost on the way is a refusal, not a smaller tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportCommit {
    #[serde(deserialize_with = "any_uuid::deserialize")]
    pub import: Uuid,
    pub supervisors: u64,
    pub agents: u64,
    #[serde(default)]
    pub request_id: Option<String>,
}

/// `import_abort {import}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportAbort {
    #[serde(deserialize_with = "any_uuid::deserialize")]
    pub import: Uuid,
    #[serde(default)]
    pub request_id: Option<String>,
}

/// The header of an `import_subtree`'s document, read before the rest so that a document of
/// a newer version is refused for its version rather than for a field this build does not
/// know.
#[derive(Deserialize)]
pub struct PeekDocument {
    document: PeekHeader,
}

#[derive(Deserialize)]
struct PeekHeader {
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    version: Option<u32>,
}

impl PeekDocument {
    pub fn check(&self) -> Result<(), WireError> {
        let h = &self.document;
        match (&h.format, h.version) {
            (Some(format), Some(version)) => SubtreeHeader {
                format: format.clone(),
                version,
                // Checked with the whole document.
                root: "root".into(),
            }
            .check(),
            _ => Err(WireError::bad_request(format!(
                "import_subtree: document needs its format ({SUBTREE_FORMAT:?}) and version"
            ))),
        }
    }
}

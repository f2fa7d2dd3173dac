//! The leader's exports in progress (`export_subtree`): each a copy of a subtree's records
//! taken in one linearizable read (`Registry::export_copy`: shared records, a pointer per
//! item), paged out from that copy, so that every page of one document describes the subtree
//! as of the same moment however the registry changes meanwhile. Bounded: at most
//! `limits::EXPORT_SESSIONS`, each dropped `limits::EXPORT_TTL_MS` after its last page. A copy
//! lives on the node that made it; after a leader change the next page is refused and the
//! client exports again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::limits;
use crate::protocol::{ErrorCode, WireError};
use crate::registry::ExportCopy;

#[derive(Default)]
pub(super) struct Exports {
    sessions: Mutex<BTreeMap<Uuid, Session>>,
}

struct Session {
    copy: Arc<ExportCopy>,
    /// The document's header: format, version, top, where and when it was taken.
    document: Value,
    last: Instant,
    /// Its last page was answered: kept a little longer only, for a retry of that page.
    done: bool,
}

const TTL: Duration = Duration::from_millis(limits::EXPORT_TTL_MS);
/// How long a finished export stays for a retry of its last page.
const DONE_GRACE: Duration = Duration::from_secs(10);

impl Session {
    fn live(&self) -> bool {
        self.last.elapsed() < if self.done { DONE_GRACE } else { TTL }
    }
}

impl Exports {
    /// Keeps `copy` as export `id` and answers its first page.
    pub(super) fn begin(
        &self,
        id: Uuid,
        copy: ExportCopy,
        cluster: &str,
    ) -> Result<Value, WireError> {
        let h = copy.header();
        let document = json!({
            "format": h.format,
            "version": h.version,
            "root": h.root,
            "cluster": cluster,
            "exported_at": chrono::Utc::now(),
        });
        let session = Session {
            copy: Arc::new(copy),
            document,
            last: Instant::now(),
            done: false,
        };
        {
            let mut sessions = self.lock();
            sessions.retain(|_, s| s.live());
            if let Some(held) = sessions.get(&id) {
                // A retry whose first attempt took its copy meanwhile: that copy is the export,
                // so every page comes from one moment.
                if held.copy.root != session.copy.root {
                    return Err(WireError::bad_request(format!(
                        "export {id} is of supervisor {:?}; draw a new id for another",
                        held.copy.root
                    )));
                }
                drop(sessions);
                return self.page(id, 0);
            }
            if sessions.len() >= limits::EXPORT_SESSIONS {
                // Finished ones go first.
                sessions.retain(|_, s| !s.done);
            }
            if sessions.len() >= limits::EXPORT_SESSIONS {
                return Err(WireError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "{} exports are in progress on the leader, the most at once; try again \
                         when one is done (an abandoned one is dropped {} s after its last page)",
                        limits::EXPORT_SESSIONS,
                        limits::EXPORT_TTL_MS / 1000
                    ),
                ));
            }
            sessions.insert(id, session);
        }
        self.page(id, 0)
    }

    /// Whether export `id` is held (and live).
    pub(super) fn holds(&self, id: Uuid) -> bool {
        self.lock().get(&id).is_some_and(Session::live)
    }

    /// Drops the exports that expired (called every heartbeat interval).
    pub(super) fn sweep(&self) {
        self.lock().retain(|_, s| s.live());
    }

    /// Page `cursor` of export `id` of supervisor `name`.
    pub(super) fn page_of(&self, id: Uuid, name: &str, cursor: usize) -> Result<Value, WireError> {
        let root = self.lock().get(&id).map(|s| s.copy.root.clone());
        match root {
            Some(root) if root != name => Err(WireError::bad_request(format!(
                "export {id} is of supervisor {root:?}, not {name:?}"
            ))),
            _ => self.page(id, cursor),
        }
    }

    /// Page `cursor` of export `id`.
    fn page(&self, id: Uuid, cursor: usize) -> Result<Value, WireError> {
        let (copy, document) = {
            let mut sessions = self.lock();
            let Some(s) = sessions.get_mut(&id).filter(|s| s.live()) else {
                sessions.remove(&id);
                return Err(WireError::new(
                    ErrorCode::NotFound,
                    format!(
                        "no export {id} on the leader: it was dropped {} s after its last page, \
                         or leadership moved since it began; export again",
                        limits::EXPORT_TTL_MS / 1000
                    ),
                ));
            };
            s.last = Instant::now();
            (Arc::clone(&s.copy), s.document.clone())
        };
        if cursor > copy.len() {
            return Err(WireError::bad_request(format!(
                "cursor {cursor} is past the export's {} items",
                copy.len()
            )));
        }
        // Rendered outside the lock: a page may hold half a megabyte of base64.
        let (supervisors, agents, next) = copy.page(cursor, limits::EXPORT_PAGE_BYTES);
        if next.is_none() {
            if let Some(s) = self.lock().get_mut(&id) {
                s.done = true;
            }
        }
        Ok(json!({
            "export": id,
            "document": document,
            "count": { "supervisors": copy.supervisors.len(), "agents": copy.agents.len() },
            "supervisors": supervisors,
            "agents": agents,
            "next": next,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, Session>> {
        // A panic while holding it cannot leave the map inconsistent: take it back.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

//! The node's agent journal: one JSON line per local start and stop of an agent, with the
//! time, the epoch and, for a stop forced by a lost lease, the moment the lease ran out (after
//! which the agent could no longer act). It lives in `<data_dir>/agents.journal` and is what
//! the chaos harness reads to check that no agent ever ran on two nodes at once (G1).
//!
//! Lines are written unbuffered, one `write` each, so a killed node loses none it wrote. The
//! file turns over to `agents.journal.1` past `limits::JOURNAL_MAX_BYTES`.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::limits;

pub const JOURNAL_FILE: &str = "agents.journal";

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub t: DateTime<Utc>,
    pub node: u64,
    pub agent: Uuid,
    pub epoch: u64,
    /// `start` or `stop`.
    pub ev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a stop forced by a lost lease: when the lease ran out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

pub struct Journal {
    path: PathBuf,
    file: Option<std::fs::File>,
    written: u64,
    me: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`. A journal that cannot be opened is reported
    /// and skipped: agents still run.
    pub fn open(dir: &Path, me: u64) -> Journal {
        let path = dir.join(JOURNAL_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        let (file, written) = match file {
            Ok(f) => {
                let len = f.metadata().map_or(0, |m| m.len());
                (Some(f), len)
            }
            Err(e) => {
                tracing::warn!(error = %e, path = ?path, "cannot open the agent journal");
                (None, 0)
            }
        };
        Journal {
            path,
            file,
            written,
            me,
        }
    }

    pub fn start(&mut self, agent: Uuid, epoch: u64) {
        self.write("start", agent, epoch, None, None);
    }

    pub fn stop(&mut self, agent: Uuid, epoch: u64, reason: &str, until: Option<DateTime<Utc>>) {
        self.write("stop", agent, epoch, Some(reason), until);
    }

    fn write(
        &mut self,
        ev: &str,
        agent: Uuid,
        epoch: u64,
        reason: Option<&str>,
        until: Option<DateTime<Utc>>,
    ) {
        if self.written > limits::JOURNAL_MAX_BYTES {
            self.turn_over();
        }
        let Some(f) = self.file.as_mut() else { return };
        let entry = JournalEntry {
            t: Utc::now(),
            node: self.me,
            agent,
            epoch,
            ev: ev.to_string(),
            reason: reason.map(str::to_string),
            until,
        };
        let Ok(mut line) = serde_json::to_vec(&entry) else {
            return;
        };
        line.push(b'\n');
        match f.write_all(&line) {
            Ok(()) => self.written += line.len() as u64,
            Err(e) => tracing::warn!(error = %e, "cannot write the agent journal"),
        }
    }

    fn turn_over(&mut self) {
        self.file = None;
        let old = self.path.with_extension("journal.1");
        if let Err(e) = std::fs::rename(&self.path, &old) {
            tracing::warn!(error = %e, "cannot turn the agent journal over");
        }
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        *self = Journal::open(&dir, self.me);
    }
}

/// Reads every entry of the journals in `dir`, oldest file first. Unreadable lines (a torn
/// last line after a kill) are skipped.
pub fn read_dir(dir: &Path) -> Vec<JournalEntry> {
    let mut out = Vec::new();
    for name in [format!("{JOURNAL_FILE}.1"), JOURNAL_FILE.to_string()] {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_reopen_and_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = Uuid::from_u128(7);
        let mut j = Journal::open(dir.path(), 3);
        j.start(a, 1);
        drop(j);
        let mut j = Journal::open(dir.path(), 3);
        j.stop(a, 1, "lease lost", Some(Utc::now()));
        let got = read_dir(dir.path());
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].ev.as_str(), got[1].ev.as_str()), ("start", "stop"));
        assert_eq!(got[1].reason.as_deref(), Some("lease lost"));
        assert!(got[1].until.is_some() && got[0].node == 3);
    }
}

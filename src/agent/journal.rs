//! The node's agent journal: one JSON line per local start and stop of an agent, with the
//! time, the epoch and, for a stop forced by a lost lease, the moment the lease ran out (after
//! which the agent could no longer act). It lives in `<data_dir>/agents.journal` and is what
//! the chaos harness reads to check that no agent ever ran on two nodes at once (G1).
//!
//! Lines are written unbuffered, one `write` each, so a killed node loses none it wrote, with
//! one exception: the stop of a crashed agent is held (`stop_held`) until the next line or
//! `flush`, which the host calls as soon as it has acted on the crash, so that a restart costs
//! one `write` for both lines. A kill in those microseconds loses the stop line, which makes the
//! agent look as if it ran longer: a checker can only be stricter for it. The file turns over to
//! `agents.journal.1` past `limits::JOURNAL_MAX_BYTES`.

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
    /// Lines not written yet (`stop_held`); written before any later line.
    held: Vec<u8>,
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
            held: Vec::new(),
        }
    }

    pub fn start(&mut self, agent: Uuid, epoch: u64) {
        self.hold("start", agent, epoch, None, Utc::now(), None);
        self.write_held();
    }

    /// A stop, timed now.
    pub fn stop(&mut self, agent: Uuid, epoch: u64, reason: &str, until: Option<DateTime<Utc>>) {
        self.stop_at(agent, epoch, reason, Utc::now(), until);
    }

    /// A stop timed `at`: when the agent's task saw it stop, which may be a little before the
    /// host writes the line (the host is busy, or the node was paused in between).
    pub fn stop_at(
        &mut self,
        agent: Uuid,
        epoch: u64,
        reason: &str,
        at: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) {
        self.hold("stop", agent, epoch, Some(reason), at, until);
        self.write_held();
    }

    /// A stop timed `at` but written with the next line or at the next `flush`.
    pub fn stop_held(&mut self, agent: Uuid, epoch: u64, reason: &str, at: DateTime<Utc>) {
        self.hold("stop", agent, epoch, Some(reason), at, None);
    }

    /// Writes what is held.
    pub fn flush(&mut self) {
        if !self.held.is_empty() {
            self.write_held();
        }
    }

    fn write_held(&mut self) {
        let mut held = std::mem::take(&mut self.held);
        if self.written > limits::JOURNAL_MAX_BYTES {
            self.turn_over();
        }
        if let Some(f) = self.file.as_mut() {
            match f.write_all(&held) {
                Ok(()) => self.written += held.len() as u64,
                Err(e) => tracing::warn!(error = %e, "cannot write the agent journal"),
            }
        }
        // The buffer is kept for the next lines.
        held.clear();
        self.held = held;
    }

    /// Adds one line, timed `t`, to what is held.
    fn hold(
        &mut self,
        ev: &str,
        agent: Uuid,
        epoch: u64,
        reason: Option<&str>,
        t: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) {
        let entry = JournalEntry {
            t,
            node: self.me,
            agent,
            epoch,
            ev: ev.to_string(),
            reason: reason.map(str::to_string),
            until,
        };
        let len = self.held.len();
        match serde_json::to_writer(&mut self.held, &entry) {
            Ok(()) => self.held.push(b'\n'),
            Err(_) => self.held.truncate(len),
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

    /// Goal: a held stop (a crash about to be restarted) reaches the file before the next
    /// line, or at a flush, and keeps its own time.
    #[test]
    fn a_held_stop_is_written_first_with_the_next_line_or_at_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let a = Uuid::from_u128(7);
        let mut j = Journal::open(dir.path(), 3);
        j.start(a, 1);
        j.stop_held(a, 1, "crashed", Utc::now());
        assert_eq!(read_dir(dir.path()).len(), 1, "held, not written yet");
        j.start(a, 1);
        let got = read_dir(dir.path());
        let evs: Vec<_> = got.iter().map(|e| e.ev.as_str()).collect();
        assert_eq!(evs, ["start", "stop", "start"]);
        assert!(got[1].t <= got[2].t);
        j.stop_held(a, 1, "crashed", Utc::now());
        j.flush();
        let got = read_dir(dir.path());
        assert_eq!(got.len(), 4);
        assert_eq!(got[3].reason.as_deref(), Some("crashed"));
    }
}

//! The outbox: every lifecycle event this node applied, on its disk, until the cluster's
//! history stream holds it.
//!
//! Every node writes it, since any node may lead next and the new leader publishes from its
//! own. Events are derived from applied log entries, so every node writes the same records
//! (the history body carries no node of its own); an event's position is its log index and
//! its place among that entry's events (`Pos`).
//!
//! On disk: segment files `<index>-<pos>.seg` in `<data dir>/history`, each named by the
//! first position it covers and covering everything up to the next one's name, so that the
//! oldest name is the outbox's floor: every event from there on is here. A segment is a run
//! of records (`u32` length, `u32` CRC-32, MessagePack `Record`), rolled at
//! `SEGMENT_BYTES`. Writes are not synced one by one: before a snapshot is named (built or
//! installed) the outbox is synced (`sync`), so the events of every entry the snapshot
//! covers are durable, and on start the outbox is cut back to the snapshot's index
//! (`begin`): openraft applies the entries after it again, which writes their events again.
//!
//! Bounds: segments the stream holds are removed (`prune`); past `max_bytes`, the oldest
//! are removed unpublished and the floor rises (the publisher then says `gap`). A snapshot
//! installed from the leader skips entries this node never applied: a `Gap` record says
//! which.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::registry::RegistryEvent;

/// A segment is rolled once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// A record holds events up to about this many bytes of bodies (one event may exceed it).
const RECORD_BYTES: usize = 256 << 10;
/// No record is read back above this size (a corrupt length must not allocate gigabytes).
const MAX_RECORD_BYTES: usize = 64 << 20;

/// An event's position: its log entry's index and its place among that entry's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pos {
    pub index: u64,
    pub pos: u32,
}

impl Pos {
    pub const fn new(index: u64, pos: u32) -> Pos {
        Pos { index, pos }
    }

    /// The first position after this one.
    pub fn succ(self) -> Pos {
        match self.pos.checked_add(1) {
            Some(pos) => Pos::new(self.index, pos),
            None => Pos::new(self.index.saturating_add(1), 0),
        }
    }

    /// The last position before this one (itself at the very start).
    pub fn pred(self) -> Pos {
        match (self.pos.checked_sub(1), self.index.checked_sub(1)) {
            (Some(pos), _) => Pos::new(self.index, pos),
            (None, Some(index)) => Pos::new(index, u32::MAX),
            (None, None) => self,
        }
    }

    fn file_name(self) -> String {
        format!("{:020}-{:010}.seg", self.index, self.pos)
    }

    fn from_file_name(name: &str) -> Option<Pos> {
        let (index, pos) = name.strip_suffix(".seg")?.split_once('-')?;
        Some(Pos::new(index.parse().ok()?, pos.parse().ok()?))
    }
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.index, self.pos)
    }
}

/// One event as the history stream gets it: the subject's tail after `hist.` and the JSON
/// body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub subject: SubjectParts,
    #[serde(with = "serde_bytes_vec")]
    pub body: Vec<u8>,
}

/// What a history subject is made of (`subjects::Subjects::history`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectParts {
    pub supervisor: Option<String>,
    pub entity: String,
    pub id: String,
    pub event: String,
}

/// A record of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Events of entry `index`, the first at place `first`.
    Events {
        index: u64,
        first: u32,
        events: Vec<Stored>,
    },
    /// This node installed a snapshot and never applied the entries `from..=to`: their
    /// events are not here.
    Gap { from: u64, to: u64 },
}

impl Record {
    /// The position of the record's last event (a gap's is the end of its last entry).
    fn last(&self) -> Pos {
        match self {
            Record::Events {
                index,
                first,
                events,
            } => Pos::new(
                *index,
                first.saturating_add(events.len().saturating_sub(1) as u32),
            ),
            Record::Gap { to, .. } => Pos::new(*to, u32::MAX),
        }
    }
}

/// MessagePack `bin` for bodies rather than serde's array of numbers.
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// The JSON body of a history event: the live event's fields without the publishing node
/// (every node writes the same bytes), with its position.
#[derive(Serialize)]
struct Body<'a> {
    v: u32,
    index: u64,
    pos: u32,
    event: &'a str,
    entity: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    supervisor: Option<&'a str>,
    time: chrono::DateTime<chrono::Utc>,
    epoch: u64,
    seq: u64,
    data: &'a serde_json::Value,
}

/// Encodes one registry event at `at` as the stream will carry it.
pub fn stored(at: Pos, e: &RegistryEvent) -> Stored {
    let body = Body {
        v: crate::events::EVENT_VERSION,
        index: at.index,
        pos: at.pos,
        event: e.event,
        entity: e.entity,
        id: &e.id,
        supervisor: e.supervisor.as_deref(),
        time: e.time,
        epoch: e.epoch,
        seq: e.seq,
        data: &e.data,
    };
    Stored {
        subject: SubjectParts {
            supervisor: e.supervisor.clone(),
            entity: e.entity.to_string(),
            id: e.id.clone(),
            event: e.event.to_string(),
        },
        // A `Value` always encodes as JSON.
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// The outbox of one node.
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    /// Held through a whole `sync`.
    syncing: Mutex<()>,
    /// The position of the last event written (or gap), for the publisher to wait on.
    written: watch::Sender<Option<Pos>>,
}

struct Inner {
    /// Every segment by the first position it covers, with its length in bytes.
    segments: BTreeMap<Pos, u64>,
    /// The last segment, open for appending (after `begin`).
    file: Option<File>,
    /// Rolled segments not yet synced.
    unsynced: Vec<Pos>,
    /// Segments removed from `segments` whose files are still to be deleted, outside the lock.
    doomed: Vec<Pos>,
    /// The last position written.
    last: Option<Pos>,
    /// The last log index whose events are all written (or known to be missing).
    applied: u64,
    /// What the segments weigh in all.
    bytes: u64,
    /// The last position the stream was seen to hold (`prune`), kept in the file `published`:
    /// where a new leader resumes when the stream's last message aged out.
    published: Option<Pos>,
    /// Entries whose events could not be written (`from`, `through`): a gap, written once the
    /// disk takes writes again.
    failed: Option<(u64, u64)>,
}

/// The file that keeps `Inner::published`.
const PUBLISHED: &str = "published";
/// The file that keeps the log index through which the outbox was last synced whole
/// (`sync`): on start, an outbox short of its snapshot (the history was off for a while, or
/// a sync failed) records a gap for the difference.
const COVERED: &str = "covered";

/// Where a reader of the outbox is: the segment and the byte in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    segment: Pos,
    offset: u64,
}

/// What `Outbox::read` found.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// Where to read next (`None`: the segment read was removed; start again from the floor).
    pub next: Option<Cursor>,
}

/// Whether a stream that ends at `end` misses events an outbox whose floor is `floor` no
/// longer holds. An entry's events end wherever they end, so a floor at the next entry's
/// start misses nothing.
pub fn misses(end: Pos, floor: Pos) -> bool {
    floor > end.succ() && floor != Pos::new(end.index.saturating_add(1), 0)
}

fn read_mark(path: &Path) -> Option<Pos> {
    std::fs::read(path)
        .ok()
        .and_then(|b| crate::protocol::from_msgpack::<Pos>(&b).ok())
}

/// Writes `at` to the file `path` through a temporary file and a rename; synced if `sync`.
fn write_mark(path: &Path, at: Pos, sync: bool) -> std::io::Result<()> {
    let bytes = rmp_serde::to_vec(&at).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&bytes)?;
    if sync {
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`; `begin` then sets it to the state machine's
    /// applied index.
    pub fn open(dir: &Path, max_bytes: u64) -> anyhow::Result<Outbox> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("create {dir:?}"))?;
        let mut segments = BTreeMap::new();
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(at) = name.to_str().and_then(Pos::from_file_name) else {
                continue;
            };
            let len = entry.metadata()?.len();
            bytes += len;
            segments.insert(at, len);
        }
        Ok(Outbox {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(2 * SEGMENT_BYTES),
            inner: Mutex::new(Inner {
                segments,
                file: None,
                unsynced: Vec::new(),
                doomed: Vec::new(),
                last: None,
                applied: 0,
                bytes,
                published: read_mark(&dir.join(PUBLISHED)),
                failed: None,
            }),
            syncing: Mutex::new(()),
            written: watch::channel(None).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, at: Pos) -> PathBuf {
        self.dir.join(at.file_name())
    }

    /// Deletes the files of segments removed from the map (called without the lock).
    fn delete_doomed(&self) {
        let doomed = std::mem::take(&mut self.lock().doomed);
        for at in doomed {
            if let Err(e) = std::fs::remove_file(self.path(at)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, "could not remove a history segment");
                }
            }
        }
    }

    /// Sets the outbox to a state machine that has applied up to `applied` (its snapshot's
    /// index): what was written past it is removed, since openraft applies those entries again.
    /// If what is left falls short of `applied` (a record that does not read back, the
    /// history off for a while, a sync that failed), a `Gap` record says so.
    pub fn begin(&self, applied: u64) -> anyhow::Result<()> {
        let mut inner = self.lock();
        let cut = Pos::new(applied.saturating_add(1), 0);
        let beyond: Vec<Pos> = inner.segments.range(cut..).map(|(k, _)| *k).collect();
        for at in beyond.into_iter().rev() {
            // Keep the oldest: the floor must not rise by cutting back.
            if inner.segments.len() == 1 {
                break;
            }
            std::fs::remove_file(self.path(at))?;
            let len = inner.segments.remove(&at).unwrap_or(0);
            inner.bytes -= len;
        }
        let (current, fresh) = match inner.segments.last_key_value() {
            Some((at, _)) => (*at, false),
            None => {
                File::create(self.path(cut))?;
                sync_dir(&self.dir)?;
                inner.segments.insert(cut, 0);
                (cut, true)
            }
        };
        // Keep the records of the last segment before `cut` that are whole.
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(self.path(current))?;
        let (keep, last, clean) = scan(&mut file, |r| r.last() < cut)?;
        file.set_len(keep)?;
        let old = inner.segments.insert(current, keep).unwrap_or(0);
        inner.bytes = inner.bytes - old + keep;
        inner.file = Some(file);
        // An empty segment: everything before the floor counts as written (it was published).
        let last = last.or_else(|| (current != Pos::new(0, 0)).then(|| current.pred()));
        inner.last = last;
        inner.applied = applied;
        inner.failed = None;
        let reached = last.map_or(0, |l| l.index);
        let covered = read_mark(&self.dir.join(COVERED)).map_or(0, |c| c.index);
        let short = match (fresh, clean) {
            (true, _) => None,
            (false, false) => Some(reached.saturating_add(1)),
            (false, true) if covered < applied => Some(covered.max(reached).saturating_add(1)),
            (false, true) => None,
        };
        if let Some(from) = short.filter(|from| *from <= applied) {
            tracing::warn!(
                from,
                to = applied,
                "the history outbox lacks these entries' events; the history gets a gap"
            );
            self.write(&mut inner, &Record::Gap { from, to: applied })?;
        }
        let last = inner.last;
        drop(inner);
        self.delete_doomed();
        self.written.send_replace(last);
        Ok(())
    }

    /// Writes the events `events` of entry `index`, the first at place `first`; called as
    /// the entry applies, also with no events (so that the outbox knows the entry was
    /// applied). Events at or before the last one written are skipped. A write that fails is
    /// logged and its entry becomes a gap: the history never stops the registry.
    pub fn append(&self, index: u64, first: u32, events: &[RegistryEvent]) {
        let mut inner = self.lock();
        if inner.file.is_none() {
            return;
        }
        if let Some((from, through)) = inner.failed {
            if index <= through {
                return;
            }
            match self.write(&mut inner, &Record::Gap { from, to: through }) {
                Ok(()) => {
                    tracing::info!(from, to = through, "the history outbox writes again");
                    inner.failed = None;
                }
                Err(_) => {
                    inner.failed = Some((from, index));
                    return;
                }
            }
        }
        let written = self.append_events(&mut inner, index, first, events);
        match written {
            Ok(()) => inner.applied = inner.applied.max(index),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    index,
                    "could not write to the history outbox; its events become a gap"
                );
                inner.failed = Some((index, index));
            }
        }
        drop(inner);
        self.delete_doomed();
    }

    fn append_events(
        &self,
        inner: &mut Inner,
        index: u64,
        first: u32,
        events: &[RegistryEvent],
    ) -> std::io::Result<()> {
        let mut chunk = Vec::new();
        let mut chunk_first = first;
        let mut weight = 0;
        for (k, e) in events.iter().enumerate() {
            let at = Pos::new(index, first.saturating_add(k as u32));
            if inner.last.is_some_and(|last| at <= last) {
                chunk_first = at.pos.saturating_add(1);
                continue;
            }
            let s = stored(at, e);
            weight += s.body.len();
            chunk.push(s);
            if weight >= RECORD_BYTES {
                let record = Record::Events {
                    index,
                    first: chunk_first,
                    events: std::mem::take(&mut chunk),
                };
                chunk_first = at.pos.saturating_add(1);
                weight = 0;
                self.write(inner, &record)?;
            }
        }
        if !chunk.is_empty() {
            let record = Record::Events {
                index,
                first: chunk_first,
                events: chunk,
            };
            self.write(inner, &record)?;
        }
        Ok(())
    }

    /// Notes that a snapshot up to `index` was installed: the entries this node had not applied
    /// up to there are a gap.
    pub fn installed(&self, index: u64) -> std::io::Result<()> {
        let mut inner = self.lock();
        if inner.file.is_none() || index <= inner.applied {
            return Ok(());
        }
        // Past what is written already (an outbox cut back to a floor beyond its snapshot
        // holds nothing before that floor, and needs no gap for it).
        let from = (inner.applied + 1).max(inner.last.map_or(0, |l| l.index + 1));
        if from <= index {
            self.write(&mut inner, &Record::Gap { from, to: index })?;
        }
        inner.applied = index;
        inner.failed = None;
        drop(inner);
        self.delete_doomed();
        Ok(())
    }

    fn write(&self, inner: &mut Inner, record: &Record) -> std::io::Result<()> {
        let first = match record {
            Record::Events { index, first, .. } => Pos::new(*index, *first),
            Record::Gap { from, .. } => Pos::new(*from, 0),
        };
        if inner.last.is_some_and(|last| first <= last) {
            // Positions only grow; the callers never ask otherwise.
            return Err(std::io::Error::other(format!(
                "history record at {first} is not past {}",
                inner.last.map_or(String::new(), |l| l.to_string())
            )));
        }
        let payload = rmp_serde::to_vec(record).map_err(std::io::Error::other)?;
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        let (mut current, len) = inner
            .segments
            .last_key_value()
            .map(|(k, v)| (*k, *v))
            .ok_or_else(|| std::io::Error::other("the outbox has no segment"))?;
        if len >= SEGMENT_BYTES {
            // Roll: the new segment covers from this record's first position on (past the
            // current one's name: the current one is not empty, and positions only grow).
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(self.path(first))?;
            inner.unsynced.push(current);
            inner.segments.insert(first, 0);
            inner.file = Some(file);
            current = first;
            self.bound(inner);
        }
        let keep = inner.segments.get(&current).copied().unwrap_or(0);
        let file = inner
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the outbox is not open"))?;
        if let Err(e) = file.write_all(&frame) {
            // Leave no torn record behind: what follows must read back.
            let _ = file.set_len(keep);
            return Err(e);
        }
        if let Some(l) = inner.segments.get_mut(&current) {
            *l += frame.len() as u64;
        }
        inner.bytes += frame.len() as u64;
        let last = record.last();
        inner.last = Some(last);
        self.written.send_replace(Some(last));
        Ok(())
    }

    /// Past `max_bytes`, drops the oldest segments (never the one written to); their files go
    /// after the lock is released.
    fn bound(&self, inner: &mut Inner) {
        while inner.bytes > self.max_bytes && inner.segments.len() > 1 {
            let Some((at, len)) = inner.segments.pop_first() else {
                break;
            };
            let floor = inner.segments.first_key_value().map(|(k, _)| *k);
            tracing::warn!(
                from = %at,
                to = ?floor.map(|f| f.pred().to_string()),
                "the history outbox is over its bound: its oldest events were dropped before \
                 the history stream held them"
            );
            inner.unsynced.retain(|u| *u != at);
            inner.doomed.push(at);
            inner.bytes -= len;
        }
    }

    /// Makes every event written so far durable, and notes through which log index. Blocking:
    /// call it off the runtime. One sync at a time: a second waits for the first, so that
    /// neither returns before what it covers is synced.
    pub fn sync(&self) -> std::io::Result<()> {
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let (file, rolled, applied, failed) = {
            let mut inner = self.lock();
            let file = match &inner.file {
                Some(f) => Some(f.try_clone()?),
                None => None,
            };
            let rolled = std::mem::take(&mut inner.unsynced);
            (file, rolled, inner.applied, inner.failed.is_some())
        };
        let synced = (|| {
            for at in &rolled {
                match File::open(self.path(*at)) {
                    Ok(f) => f.sync_data()?,
                    // Removed meanwhile (published or over the bound): nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some(f) = &file {
                f.sync_data()?;
            }
            sync_dir(&self.dir)
        })();
        if let Err(e) = synced {
            // Synced again next time.
            self.lock().unsynced.extend(rolled);
            return Err(e);
        }
        if !failed {
            write_mark(&self.dir.join(COVERED), Pos::new(applied, 0), true)?;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Notes that the stream holds everything up to `published`, and removes the segments
    /// whose events are all at or before it. Blocking (file removals): call it off the runtime.
    pub fn prune(&self, published: Pos) {
        let next = published.succ();
        let mark = {
            let mut inner = self.lock();
            loop {
                let mut keys = inner.segments.keys();
                let (Some(&first), Some(&second)) = (keys.next(), keys.next()) else {
                    break;
                };
                if second > next {
                    break;
                }
                let len = inner.segments.remove(&first).unwrap_or(0);
                inner.unsynced.retain(|u| *u != first);
                inner.doomed.push(first);
                inner.bytes -= len;
            }
            let newer = inner.published < Some(published);
            if newer {
                inner.published = Some(published);
            }
            newer
        };
        self.delete_doomed();
        if mark {
            // Not synced: after a crash the mark is older, never wrong.
            if let Err(e) = write_mark(&self.dir.join(PUBLISHED), published, false) {
                tracing::warn!(error = %e, "could not note where the history stream ends");
            }
        }
    }

    /// The last position the stream was seen to hold.
    pub fn published(&self) -> Option<Pos> {
        self.lock().published
    }

    /// The first position the outbox holds every event from.
    pub fn floor(&self) -> Option<Pos> {
        self.lock().segments.first_key_value().map(|(k, _)| *k)
    }

    /// The last position written, as it changes.
    pub fn written(&self) -> watch::Receiver<Option<Pos>> {
        self.written.subscribe()
    }

    /// What the segments weigh.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// A cursor at the start of the segment that holds what follows `after` (the floor's
    /// when `after` is none); none if the outbox no longer holds it (`misses`).
    pub fn cursor_after(&self, after: Option<Pos>) -> Option<Cursor> {
        let inner = self.lock();
        let floor = *inner.segments.first_key_value()?.0;
        let segment = match after {
            Some(a) if misses(a, floor) => return None,
            Some(a) => inner
                .segments
                .range(..=a.succ())
                .next_back()
                .map_or(floor, |(k, _)| *k),
            None => floor,
        };
        Some(Cursor { segment, offset: 0 })
    }

    /// Reads whole records from `cursor` on, up to about `max_bytes` of them. A segment that
    /// does not read back (the disk lost part of it) reads as a gap up to the next one.
    pub fn read(&self, cursor: Cursor, max_bytes: usize) -> std::io::Result<Batch> {
        let (len, next_segment) = {
            let inner = self.lock();
            let Some(len) = inner.segments.get(&cursor.segment).copied() else {
                return Ok(Batch::default());
            };
            let next = inner
                .segments
                .range(cursor.segment.succ()..)
                .next()
                .map(|(k, _)| *k);
            (len, next)
        };
        if cursor.offset >= len {
            // The segment is read; the next one once the writer moved on to it.
            let next = match next_segment {
                Some(n) => Cursor {
                    segment: n,
                    offset: 0,
                },
                None => cursor,
            };
            return Ok(Batch {
                records: Vec::new(),
                next: Some(next),
            });
        }
        let mut file = match File::open(self.path(cursor.segment)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Batch::default()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(cursor.offset))?;
        let mut reader = std::io::BufReader::new(file.take(len - cursor.offset));
        let mut records = Vec::new();
        let mut offset = cursor.offset;
        let mut read = 0;
        while offset < len && read < max_bytes {
            let Some((record, size)) = read_record(&mut reader)? else {
                break;
            };
            offset += size;
            read += size as usize;
            records.push(record);
        }
        if records.is_empty() {
            // Below the length written, a record that does not read back: the disk lost it.
            let Some(next) = next_segment.filter(|n| n.index > cursor.segment.index) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "history segment {} is corrupt at byte {offset}",
                        cursor.segment
                    ),
                ));
            };
            tracing::error!(
                segment = %cursor.segment,
                offset,
                "a history segment does not read back; its rest becomes a gap"
            );
            return Ok(Batch {
                records: vec![Record::Gap {
                    from: cursor.segment.index,
                    to: next.index - 1,
                }],
                next: Some(Cursor {
                    segment: next,
                    offset: 0,
                }),
            });
        }
        Ok(Batch {
            records,
            next: Some(Cursor {
                segment: cursor.segment,
                offset,
            }),
        })
    }
}

/// Reads one record, with its size on disk; `None` at the end or at a torn or corrupt one.
fn read_record(r: &mut impl std::io::Read) -> std::io::Result<Option<(Record, u64)>> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD_BYTES {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    match r.read_exact(&mut payload) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    match crate::protocol::from_msgpack::<Record>(&payload) {
        Ok(record) => Ok(Some((record, 8 + len as u64))),
        Err(_) => Ok(None),
    }
}

/// Reads `file` from its start while records are whole and `keep` says so: the length they
/// take, the last position among them, and whether it stopped cleanly (at the end, or at a
/// record `keep` refused) rather than at one that does not read back.
fn scan(
    file: &mut File,
    keep: impl Fn(&Record) -> bool,
) -> std::io::Result<(u64, Option<Pos>, bool)> {
    let size = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::new(&*file);
    let (mut len, mut last) = (0, None);
    while let Some((record, bytes)) = read_record(&mut reader)? {
        if !keep(&record) {
            return Ok((len, last, true));
        }
        len += bytes;
        last = Some(record.last());
    }
    Ok((len, last, len == size))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn event(n: u64) -> RegistryEvent {
        RegistryEvent {
            entity: "agent",
            id: format!("a{n}"),
            event: "placed",
            time: Utc::now(),
            epoch: 1,
            seq: n,
            data: serde_json::json!({ "n": n }),
            supervisor: Some("s".into()),
        }
    }

    fn all(outbox: &Outbox) -> Vec<Pos> {
        let mut out = Vec::new();
        let mut cursor = outbox.cursor_after(None).unwrap();
        loop {
            let read = outbox.read(cursor, 1 << 20).unwrap();
            let next = read.next.unwrap();
            for r in &read.records {
                match r {
                    Record::Events {
                        index,
                        first,
                        events,
                    } => {
                        for k in 0..events.len() {
                            out.push(Pos::new(*index, first + k as u32));
                        }
                    }
                    Record::Gap { to, .. } => out.push(Pos::new(*to, u32::MAX)),
                }
            }
            if read.records.is_empty() && next == cursor {
                return out;
            }
            cursor = next;
        }
    }

    /// Goal: a restart cuts the outbox back to the snapshot, and applying again writes the
    /// same positions once.
    #[test]
    fn a_restart_rewrites_what_the_snapshot_does_not_cover() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(0).unwrap();
        for i in 1..=10 {
            outbox.append(i, 0, &[event(i), event(i + 100)]);
        }
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(6).unwrap();
        assert_eq!(all(&outbox).len(), 12, "entries 1..=6 kept");
        for i in 7..=10 {
            outbox.append(i, 0, &[event(i), event(i + 100)]);
        }
        let got = all(&outbox);
        assert_eq!(got.len(), 20);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    }

    /// Goal: segments roll, published ones are removed, and past the bound the floor rises.
    #[test]
    fn segments_roll_prune_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 3 * SEGMENT_BYTES).unwrap();
        outbox.begin(0).unwrap();
        let big = serde_json::json!({ "pad": "x".repeat(100_000) });
        for i in 1..=200 {
            let mut e = event(i);
            e.data = big.clone();
            outbox.append(i, 0, &[e]);
        }
        assert!(
            outbox.bytes() <= 3 * SEGMENT_BYTES + SEGMENT_BYTES,
            "{}",
            outbox.bytes()
        );
        let floor = outbox.floor().unwrap();
        assert!(floor.index > 1, "the oldest were dropped: {floor}");
        assert_eq!(all(&outbox).first().copied(), Some(floor));
        outbox.prune(Pos::new(150, 0));
        let floor = outbox.floor().unwrap();
        assert!(floor.index <= 151 && floor.index > 100, "{floor}");
        assert_eq!(all(&outbox).last().copied(), Some(Pos::new(200, 0)));
        outbox.sync().unwrap();
    }

    /// Goal: a torn record at the end is dropped on start, the records before it stay.
    #[test]
    fn a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(0).unwrap();
        outbox.append(1, 0, &[event(1)]);
        outbox.append(2, 0, &[event(2)]);
        drop(outbox);
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(1).unwrap();
        assert_eq!(all(&outbox), vec![Pos::new(1, 0)]);
        outbox.installed(5).unwrap();
        assert_eq!(all(&outbox), vec![Pos::new(1, 0), Pos::new(5, u32::MAX)]);
    }

    /// Goal: an outbox short of its snapshot (the history was off while snapshots went on)
    /// says so with a gap on start, and positions keep growing after an install.
    #[test]
    fn an_outbox_short_of_its_snapshot_records_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(0).unwrap();
        outbox.append(1, 0, &[event(1)]);
        outbox.append(2, 0, &[event(2)]);
        outbox.sync().unwrap();
        drop(outbox);
        // The node ran on without history to a snapshot at 50.
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(50).unwrap();
        assert_eq!(
            all(&outbox),
            vec![Pos::new(1, 0), Pos::new(2, 0), Pos::new(50, u32::MAX)]
        );
        outbox.append(51, 0, &[event(51)]);
        outbox.installed(60).unwrap();
        outbox.append(61, 0, &[event(61)]);
        let got = all(&outbox);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        assert_eq!(got[got.len() - 2], Pos::new(60, u32::MAX));
        // Synced through 61: a restart at a snapshot of 61 needs no gap.
        outbox.sync().unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(61).unwrap();
        assert_eq!(all(&outbox).last().copied(), Some(Pos::new(61, 0)));
    }

    /// Goal: a segment that does not read back reads as a gap up to the next one, and the
    /// reader goes on there.
    #[test]
    fn a_corrupt_segment_reads_as_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        outbox.begin(0).unwrap();
        let big = serde_json::json!({ "pad": "x".repeat(600_000) });
        for i in 1..=20 {
            let mut e = event(i);
            e.data = big.clone();
            outbox.append(i, 0, &[e]);
        }
        let first = outbox.floor().unwrap();
        let path = dir.path().join(first.file_name());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let got = all(&outbox);
        assert_eq!(got[0].pos, u32::MAX, "a gap first: {got:?}");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        assert_eq!(got.last().copied(), Some(Pos::new(20, 0)));
    }

    /// Goal: a stream end right at an entry's end followed by a floor at the next entry's
    /// start misses nothing; a floor further on does.
    #[test]
    fn what_a_stream_misses() {
        assert!(!misses(Pos::new(7, 3), Pos::new(8, 0)));
        assert!(!misses(Pos::new(7, 3), Pos::new(7, 4)));
        assert!(misses(Pos::new(7, 3), Pos::new(9, 0)));
        assert!(misses(Pos::new(7, 3), Pos::new(7, 9)));
        assert!(!misses(Pos::new(7, 3), Pos::new(5, 0)));
    }
}

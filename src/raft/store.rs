//! Raft log and state machine, persisted in sled.
//!
//! Trees: `log` (entries by big-endian index), `meta` (vote, last purged, committed), `sm`
//! (registry records plus the applied log id and membership, written in one atomic batch per
//! apply), `snapshot` (the latest snapshot). sled is kept behind this module so it can be
//! swapped one day.
//!
//! Durability: a log append and a vote are flushed before openraft is told they are done, so a
//! write is on disk before it is acknowledged. sled's flush is `sync_file_range` on Linux: it
//! survives a process kill, not necessarily a power cut. The state machine is not flushed on
//! apply: its batch is atomic, and anything lost is re-applied from the flushed log.

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); our helpers
// return it too rather than converting at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::typ::*;
use crate::registry::{Key, Record, Registry, RegistryData, RegistryEvent, REGISTRY_VERSION};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";
const COMMITTED: &[u8] = b"committed";
const APPLIED: &[u8] = b"m/applied";
const MEMBERSHIP: &[u8] = b"m/membership";
const CURRENT_SNAPSHOT: &[u8] = b"current";

/// The state machine as readers see it: the registry plus what Raft needs to resume.
#[derive(Debug, Default)]
pub struct SmState {
    pub registry: Registry,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// Shared handle on the applied state, read by command handlers after a linearizable check.
pub type SharedState = Arc<RwLock<SmState>>;

/// Appends waiting for the group-commit flusher; `append` waits when it is full.
const FLUSH_QUEUE: usize = 1024;

/// Opens the sled database of one node and hands out the log store and state machine.
pub struct Store {
    db: sled::Db,
    flush_task: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Store {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("create data dir {dir:?}"))?;
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(crate::limits::SLED_CACHE_BYTES)
            .open()
            .with_context(|| format!("open sled database in {dir:?}"))?;
        Ok(Store {
            db,
            flush_task: Default::default(),
        })
    }

    /// Waits for the log flusher to finish (it stops once Raft has dropped the log store) and
    /// flushes everything to disk; called on clean shutdown.
    pub async fn close(&self) -> anyhow::Result<()> {
        let task = self
            .flush_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            let joined = tokio::task::spawn_blocking(move || task.join());
            match tokio::time::timeout(std::time::Duration::from_secs(5), joined).await {
                Ok(Ok(Ok(()))) => {}
                Ok(_) => tracing::error!("the log flusher thread panicked"),
                Err(_) => tracing::warn!("the log flusher did not stop within 5 s"),
            }
        }
        flush(&self.db).await?;
        Ok(())
    }

    /// The log store, the state machine and the shared view of the applied state. Events
    /// produced by apply go to `events` (dropped, with a warning, if the publisher lags).
    pub fn raft_parts(
        &self,
        events: Option<mpsc::Sender<Vec<RegistryEvent>>>,
    ) -> anyhow::Result<(LogStore, StateMachine, SharedState)> {
        let (flusher, flush_rx) = mpsc::channel(FLUSH_QUEUE);
        let db = self.db.clone();
        let flush_task = std::thread::Builder::new()
            .name("warden-log-flush".into())
            .spawn(move || flush_loop(db, flush_rx))?;
        *self.flush_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(flush_task);
        let log = LogStore {
            db: self.db.clone(),
            log: self.db.open_tree("log")?,
            meta: self.db.open_tree("meta")?,
            flusher,
        };
        let sm_tree = self.db.open_tree("sm")?;
        let state = load_state(&sm_tree)?;
        let shared = Arc::new(RwLock::new(state));
        let sm = StateMachine {
            db: self.db.clone(),
            sm: sm_tree,
            snapshot: self.db.open_tree("snapshot")?,
            state: shared.clone(),
            events,
        };
        Ok((log, sm, shared))
    }
}

fn load_state(sm: &sled::Tree) -> anyhow::Result<SmState> {
    use anyhow::Context;
    let mut state = SmState::default();
    for kv in sm.iter() {
        let (k, v) = kv?;
        match &k[..] {
            APPLIED => state.last_applied = rmp_serde::from_slice(&v).context("applied id")?,
            MEMBERSHIP => state.membership = rmp_serde::from_slice(&v).context("membership")?,
            _ => {
                let rec: VersionedRecord = rmp_serde::from_slice(&v).with_context(|| {
                    format!("registry record {:?}", String::from_utf8_lossy(&k))
                })?;
                state.registry.load_record(rec.record);
            }
        }
    }
    Ok(state)
}

#[derive(Serialize, Deserialize)]
struct VersionedRecord {
    v: u32,
    record: Record,
}

/// Flushes sled on the blocking pool. sled's own `flush_async` starts a new OS thread per call.
async fn flush(db: &sled::Db) -> sled::Result<()> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(r) => r.map(|_| ()),
        Err(e) => Err(sled::Error::Io(std::io::Error::other(e))),
    }
}

fn record_key(key: &Key) -> Vec<u8> {
    let mut out = Vec::new();
    match key {
        Key::Node(id) => {
            out.extend_from_slice(b"n/");
            out.extend_from_slice(&id.to_be_bytes());
        }
        Key::Supervisor(name) => {
            out.extend_from_slice(b"s/");
            out.extend_from_slice(name.as_bytes());
        }
        Key::Request(id) => {
            out.extend_from_slice(b"r/");
            out.extend_from_slice(id.as_bytes());
        }
        Key::Agent(id) => {
            out.extend_from_slice(b"a/");
            out.extend_from_slice(id.as_bytes());
        }
        Key::Checkpoint(id) => {
            out.extend_from_slice(b"k/");
            out.extend_from_slice(id.as_bytes());
        }
    }
    out
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    rmp_serde::to_vec_named(value).map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

/// The Raft log in sled.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Group commit on a dedicated thread: flushes sled once for every append queued while the
/// previous flush ran, then reports each append complete, in order. openraft runs `append`
/// inside its core loop, so an inline flush would stall elections, replication and every other
/// append; and sled's `flush_async` starts a new OS thread per call, which cost more than the
/// flush itself. Stops when every sender (the log store and its clones) is gone.
fn flush_loop(db: sled::Db, mut rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Some(first) = rx.blocking_recv() {
        let mut waiting = vec![first];
        while let Ok(cb) = rx.try_recv() {
            waiting.push(cb);
        }
        let started = std::time::Instant::now();
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        tracing::debug!(
            appends = waiting.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "log flushed"
        );
        if let Err(e) = &result {
            tracing::error!(error = %e, "flushing the Raft log failed");
        }
        for cb in waiting {
            cb.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}

impl LogStore {
    fn read_meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self
            .meta
            .get(key)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        match raw {
            None => Ok(None),
            Some(v) => rmp_serde::from_slice(&v)
                .map(Some)
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e)),
        }
    }

    fn write_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        self.meta
            .insert(key, encode(value)?)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        flush(&self.db)
            .await
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let iter = match range.end_bound() {
            Bound::Included(i) => self.log.range(start.to_be_bytes()..=i.to_be_bytes()),
            Bound::Excluded(i) => self.log.range(start.to_be_bytes()..i.to_be_bytes()),
            Bound::Unbounded => self.log.range(start.to_be_bytes()..),
        };
        let mut out = Vec::new();
        for kv in iter {
            let (_, v) = kv.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let entry: Entry = rmp_serde::from_slice(&v)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState, StorageError> {
        let last_purged: Option<LogId> = self.read_meta(PURGED)?;
        let last = self
            .log
            .last()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let last_log_id = match last {
            Some((_, v)) => {
                let entry: Entry = rmp_serde::from_slice(&v)
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: losing it only delays re-applying committed entries until the leader
        // says they are committed again.
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&entry.log_id.index.to_be_bytes(), encode(&entry)?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        // The write is acknowledged to openraft (and so, through a quorum, to the client) only
        // once the flusher has it on disk; returning now lets openraft go on meanwhile.
        self.flusher.send(callback).await.map_err(|_| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other("log flusher stopped"),
            )
        })
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: if we crash between the two steps, the log state still
        // reads correctly and the leftover entries are purged again later.
        self.write_meta(PURGED, &log_id)?;
        self.flush().await?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = kv.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        Ok(())
    }
}

/// A snapshot as stored in the `snapshot` tree.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    v: u32,
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The content of a snapshot's data: the registry at `meta.last_log_id`.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    v: u32,
    registry: RegistryData,
}

/// The state machine: the registry in memory, its records in sled.
pub struct StateMachine {
    db: sled::Db,
    sm: sled::Tree,
    snapshot: sled::Tree,
    state: SharedState,
    events: Option<mpsc::Sender<Vec<RegistryEvent>>>,
}

impl StateMachine {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, SmState> {
        // A poisoned lock means a panic mid-apply, which already aborts the node's Raft task;
        // reading the state it left is still the most useful thing to do.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, SmState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn store_snapshot(&self, stored: &StoredSnapshot) -> Result<(), StorageError> {
        self.snapshot
            .insert(CURRENT_SNAPSHOT, encode(stored)?)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let st = self.read_state();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(
        &mut self,
        entries: I,
    ) -> Result<Vec<Vec<crate::registry::Outcome>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let mut events = Vec::new();
        let mut batch = sled::Batch::default();
        {
            let mut st = self.write_state();
            for entry in entries {
                if let Some(prev) = st.last_applied {
                    assert!(
                        entry.log_id.index > prev.index,
                        "applied index must only grow"
                    );
                }
                st.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => replies.push(Vec::new()),
                    EntryPayload::Normal(p) => {
                        let out: Vec<_> = p
                            .items
                            .iter()
                            .map(|i| st.registry.apply(p.time, i, &mut events))
                            .collect();
                        replies.push(out);
                    }
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(entry.log_id), m);
                        replies.push(Vec::new());
                    }
                }
            }
            for key in st.registry.take_touched() {
                match st.registry.record(&key) {
                    Some(record) => batch.insert(
                        record_key(&key),
                        encode(&VersionedRecord {
                            v: REGISTRY_VERSION,
                            record,
                        })?,
                    ),
                    None => batch.remove(record_key(&key)),
                }
            }
            batch.insert(APPLIED, encode(&st.last_applied)?);
            batch.insert(MEMBERSHIP, encode(&st.membership)?);
        }
        self.sm
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        if let (Some(tx), false) = (&self.events, events.is_empty()) {
            if tx.try_send(events).is_err() {
                tracing::warn!("event publisher is behind or gone; dropped a batch of events");
            }
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The copy is taken here, in order with `apply`, because sled iterators are not
        // point-in-time and apply keeps running while the snapshot is built.
        let st = self.read_state();
        SnapshotBuilder {
            last_applied: st.last_applied,
            membership: st.membership.clone(),
            data: st.registry.data().clone(),
            snapshot: self.snapshot.clone(),
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let sig = Some(meta.signature());
        let content: SnapshotData = rmp_serde::from_slice(&bytes)
            .map_err(|e| io_err(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Read, e))?;
        let registry = Registry::from_data(content.registry);
        // Rewrite the sm tree to exactly the snapshot's content, atomically.
        let mut batch = sled::Batch::default();
        for kv in self.sm.iter() {
            let (k, _) = kv.map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            batch.remove(k);
        }
        let d = registry.data();
        let keys = d
            .nodes
            .keys()
            .map(|k| Key::Node(*k))
            .chain(d.supervisors.keys().map(|k| Key::Supervisor(k.clone())))
            .chain(d.requests.keys().map(|k| Key::Request(k.clone())))
            .chain(d.agents.keys().map(|k| Key::Agent(*k)))
            .chain(d.checkpoints.keys().map(|k| Key::Checkpoint(*k)));
        for key in keys {
            if let Some(record) = registry.record(&key) {
                batch.insert(
                    record_key(&key),
                    encode(&VersionedRecord {
                        v: REGISTRY_VERSION,
                        record,
                    })?,
                );
            }
        }
        batch.insert(APPLIED, encode(&meta.last_log_id)?);
        batch.insert(MEMBERSHIP, encode(&meta.last_membership)?);
        self.sm
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        self.store_snapshot(&StoredSnapshot {
            v: REGISTRY_VERSION,
            meta: meta.clone(),
            data: bytes,
        })?;
        flush(&self.db)
            .await
            .map_err(|e| io_err(ErrorSubject::Snapshot(sig), ErrorVerb::Write, e))?;
        let mut st = self.write_state();
        st.registry = registry;
        st.last_applied = meta.last_log_id;
        st.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let raw = self
            .snapshot
            .get(CURRENT_SNAPSHOT)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        let Some(raw) = raw else { return Ok(None) };
        let stored: StoredSnapshot = rmp_serde::from_slice(&raw)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// Builds a snapshot from the copy taken in `get_snapshot_builder`.
pub struct SnapshotBuilder {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    data: RegistryData,
    snapshot: sled::Tree,
    db: sled::Db,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // Serialize the copy in place rather than cloning it once more.
        let content = SnapshotData {
            v: REGISTRY_VERSION,
            registry: std::mem::take(&mut self.data),
        };
        let data = encode(&content)?;
        self.data = content.registry;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, uuid::Uuid::new_v4()),
            None => format!("empty-{}", uuid::Uuid::new_v4()),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            v: REGISTRY_VERSION,
            meta: meta.clone(),
            data: data.clone(),
        };
        self.snapshot
            .insert(CURRENT_SNAPSHOT, encode(&stored)?)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        flush(&self.db)
            .await
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    //! openraft's storage test suite, run against the sled store in a temporary directory.

    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir()
                .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
            let store = Store::open(dir.path())
                .map_err(|e| StorageIOError::write(AnyError::error(e.to_string())))?;
            let (log, sm, _) = store
                .raft_parts(None)
                .map_err(|e| StorageIOError::write(AnyError::error(e.to_string())))?;
            Ok((dir, log, sm))
        }
    }

    /// Goal: the sled store meets every requirement openraft places on storage.
    /// Method: openraft's own suite, each case on a fresh sled directory.
    #[test]
    fn openraft_storage_suite_passes_on_sled() {
        Suite::test_all(SledBuilder).unwrap();
    }
}

//! Raft log and state machine, persisted in sled.
//!
//! Trees: `log` (entries by big-endian index), `meta` (vote, last purged, committed),
//! `snapshot` (the latest snapshot's meta, the name of its file and the file's CRC-32). A
//! snapshot's bytes, the whole registry at one log id, are a file of `raft::snapshot_files`.
//! sled is kept behind this module so it can be swapped one day.
//!
//! Durability: a log append and a vote are flushed before openraft is told they are done, so a
//! write is on disk before it is acknowledged. sled's flush is `sync_file_range` on Linux: it
//! survives a process kill, not necessarily a power cut.
//!
//! The state machine lives in memory; its durable form is the latest snapshot plus the log
//! after it. A snapshot is flushed before openraft hears it is built or installed, an older
//! snapshot never replaces a newer stored one, and the log is purged only up to the stored
//! snapshot, so the two always cover every committed entry. On start the registry is loaded
//! from the snapshot and openraft re-applies the committed entries after it
//! (`get_initial_state`). Writing every changed record to sled on
//! apply, as this store once did, made sled hold a second copy of the registry in its page
//! cache (about 2.3 KB per agent at 50,000 agents, heaptrack) and cost a sled batch per apply.

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); our helpers
// return it too rather than converting at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Read;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{AnyError, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::snapshot_files::{Checksummed, Received, SnapshotDir, SnapshotFile};
use super::typ::*;
use crate::history::outbox::Outbox;
use crate::registry::{Registry, RegistryData, RegistryEvent, Step, Unfinished, REGISTRY_VERSION};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";
const COMMITTED: &[u8] = b"committed";
/// The tree older versions kept every registry record in; dropped on open (the snapshot and
/// the log cover everything it held).
const OLD_SM_TREE: &[u8] = b"sm";
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

/// The log id of the snapshot stored in the `snapshot` tree, shared by the state machine (which
/// stores snapshots) and the log store (which must not purge past it while one is installed).
#[derive(Debug)]
struct Stored {
    last_log_id: tokio::sync::watch::Sender<Option<LogId>>,
    /// A snapshot is being received or installed.
    installing: std::sync::atomic::AtomicBool,
    /// The stored snapshot's meta and file, as sled names them. Held while the file is
    /// opened to be sent and while another replaces it, so a file is never removed between
    /// being looked up and being opened.
    current: std::sync::Mutex<Option<(SnapshotMeta, String)>>,
    /// The file the current one replaced, kept until the next replaces it in turn: sled's
    /// flush is `sync_file_range`, so after a power cut sled may come back naming it.
    previous: std::sync::Mutex<Option<String>>,
    files: SnapshotDir,
}

type StoredMark = Arc<Stored>;

/// Bytes appended to the log, in all and as of the last snapshot: what the snapshot trigger
/// (`raft::snapshots`) weighs the log by; and the log itself, read to weigh what a purge keeps.
#[derive(Debug)]
pub struct LogBytes {
    appended: std::sync::atomic::AtomicU64,
    at_snapshot: std::sync::atomic::AtomicU64,
    log: sled::Tree,
}

impl LogBytes {
    fn new(log: sled::Tree) -> LogBytes {
        LogBytes {
            appended: Default::default(),
            at_snapshot: Default::default(),
            log,
        }
    }

    /// The index up to which (inclusive) the log may be purged behind a snapshot at
    /// `snapshot_index` so that at most `keep_entries` entries and `keep_bytes` bytes stay
    /// behind it; `None` when what is there already fits. Reads at most `keep_entries + 1`
    /// entries, newest first.
    pub fn purge_point(
        &self,
        snapshot_index: u64,
        keep_entries: u64,
        keep_bytes: u64,
    ) -> anyhow::Result<Option<u64>> {
        let (mut entries, mut bytes) = (0u64, 0u64);
        for kv in self.log.range(..=snapshot_index.to_be_bytes()).rev() {
            let (k, v) = kv?;
            bytes += v.len() as u64;
            if entries == keep_entries || bytes > keep_bytes {
                let index: [u8; 8] = k.as_ref().try_into()?;
                return Ok(Some(u64::from_be_bytes(index)));
            }
            entries += 1;
        }
        Ok(None)
    }

    fn add(&self, n: usize) {
        self.appended
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// A snapshot now covers what was appended so far (approximately: entries appended while
    /// it is copied count as covered).
    fn snapshot_taken(&self) {
        let now = self.appended.load(std::sync::atomic::Ordering::Relaxed);
        self.at_snapshot
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes appended since the last snapshot was built or installed (or since start).
    pub fn since_snapshot(&self) -> u64 {
        let all = self.appended.load(std::sync::atomic::Ordering::Relaxed);
        all.saturating_sub(self.at_snapshot.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Opens the sled database of one node and hands out the log store and state machine.
pub struct Store {
    db: sled::Db,
    flush_task: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    log_bytes: Arc<LogBytes>,
    files: SnapshotDir,
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
        let log = db.open_tree("log")?;
        let files = SnapshotDir::open(dir).with_context(|| format!("open {dir:?}/snapshots"))?;
        Ok(Store {
            db,
            flush_task: Default::default(),
            log_bytes: Arc::new(LogBytes::new(log)),
            files,
        })
    }

    /// What the log has grown by since the last snapshot.
    pub fn log_bytes(&self) -> Arc<LogBytes> {
        self.log_bytes.clone()
    }

    /// Flushes everything to disk; called on clean shutdown, once Raft has stopped (so nothing
    /// more is appended). The log flusher ends once every copy of the log store is dropped;
    /// the election loop's copy lives as long as the node, so this waits for the flusher only
    /// briefly: what it would still flush, this flush covers.
    pub async fn close(&self) -> anyhow::Result<()> {
        let task = self
            .flush_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            let joined = tokio::task::spawn_blocking(move || task.join());
            match tokio::time::timeout(std::time::Duration::from_millis(200), joined).await {
                Ok(Ok(Ok(()))) => {}
                Ok(_) => tracing::error!("the log flusher thread panicked"),
                Err(_) => tracing::debug!("the log flusher still runs; flushing here"),
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
        self.raft_parts_timed(events, None, None)
    }

    /// `raft_parts`, with every append and flush of the log timed into `timings`, and the
    /// events of every applied entry written to `history` (set to the stored snapshot's index
    /// here).
    pub fn raft_parts_timed(
        &self,
        events: Option<mpsc::Sender<Vec<RegistryEvent>>>,
        timings: Option<LogTimings>,
        history: Option<Arc<Outbox>>,
    ) -> anyhow::Result<(LogStore, StateMachine, SharedState)> {
        let (flusher, flush_rx) = mpsc::channel(crate::limits::FLUSH_QUEUE);
        let db = self.db.clone();
        let flush_task = std::thread::Builder::new()
            .name("warden-log-flush".into())
            .spawn(move || flush_loop(db, flush_rx, timings))?;
        *self.flush_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(flush_task);
        let meta = self.db.open_tree("meta")?;
        let snapshot = self.db.open_tree("snapshot")?;
        let began = Instant::now();
        let (state, current) = load_state(&self.db, &snapshot, &self.files)?;
        tracing::info!(
            agents = state.registry.data().agents.len(),
            ms = began.elapsed().as_millis() as u64,
            "loaded the stored snapshot"
        );
        // What the log holds beyond the snapshot counts toward the next one by bytes: a node
        // that restarts often must still snapshot by size.
        let log_tree = self.db.open_tree("log")?;
        let after = state.last_applied.map_or(0, |l| l.index + 1);
        let mut pending = 0usize;
        for kv in log_tree.range(after.to_be_bytes()..) {
            pending += kv?.1.len();
        }
        self.log_bytes.add(pending);
        if let Some(outbox) = &history {
            outbox.begin(state.last_applied.map_or(0, |l| l.index))?;
        }
        let purged: Option<LogId> = match meta.get(PURGED)? {
            Some(v) => crate::protocol::from_msgpack(&v)?,
            None => None,
        };
        if purged.map(|l| l.index) > state.last_applied.map(|l| l.index) {
            let old = !self.db.open_tree(OLD_SM_TREE)?.is_empty();
            anyhow::bail!(
                "the latest snapshot (up to log index {:?}) does not cover the purged log (up to \
                 {:?}), so this data dir cannot rebuild the registry{}; move it away and start \
                 the node on an empty one: it catches up from the leader",
                state.last_applied.map(|l| l.index),
                purged.map(|l| l.index),
                if old {
                    " (it was written by an older version, whose `sm` tree is kept)"
                } else {
                    ""
                }
            );
        }
        if self.db.drop_tree(OLD_SM_TREE)? {
            tracing::info!("dropped the per-record state machine tree of an older version");
        }
        let mark: StoredMark = Arc::new(Stored {
            last_log_id: tokio::sync::watch::channel(state.last_applied).0,
            installing: false.into(),
            current: std::sync::Mutex::new(current),
            previous: Default::default(),
            files: self.files.clone(),
        });
        let log = LogStore {
            db: self.db.clone(),
            log: self.db.open_tree("log")?,
            meta,
            flusher,
            stored: mark.clone(),
            faults: Arc::new(crate::faults::Faults::from_env()),
            bytes: self.log_bytes.clone(),
        };
        let shared = Arc::new(RwLock::new(state));
        let sm = StateMachine {
            db: self.db.clone(),
            snapshot,
            stored: mark,
            state: shared.clone(),
            events,
            history,
            apply_times: None,
            snapshot_counts: None,
            log_bytes: self.log_bytes.clone(),
            receiving: None,
            #[cfg(test)]
            streamed_installs: Default::default(),
        };
        Ok((log, sm, shared))
    }
}

/// The state machine as the latest snapshot left it (empty without one), and that snapshot's
/// meta and file; openraft re-applies the committed entries after it. A snapshot stored
/// whole in sled by an older version moves to a file here. Files nothing names are removed.
fn load_state(
    db: &sled::Db,
    tree: &sled::Tree,
    files: &SnapshotDir,
) -> anyhow::Result<(SmState, Option<(SnapshotMeta, String)>)> {
    use anyhow::Context;
    let Some(raw) = tree.get(CURRENT_SNAPSHOT)? else {
        files.clean(None)?;
        return Ok((SmState::default(), None));
    };
    let mut stored: StoredSnapshot =
        crate::protocol::from_msgpack(&raw).context("stored snapshot")?;
    let mut checksum = None;
    let registry = match &stored.file {
        Some(name) => files.reader(name).map_err(|e| e.to_string()).and_then(|r| {
            let mut r = Checksummed::new(r);
            let registry = registry_from_reader(&mut r)?;
            checksum = Some(r.finish().1);
            Ok(registry)
        }),
        None => registry_from_snapshot(&stored.data),
    };
    if let (Some(want), Some(got)) = (stored.crc32, checksum) {
        anyhow::ensure!(
            want == got,
            "the stored snapshot's file {:?} is damaged (CRC-32 {got:08x}, not {want:08x}); \
             move this data dir away and start the node on an empty one: it catches up from \
             the leader",
            stored.file.as_deref().unwrap_or_default()
        );
    }
    let registry = registry.map_err(|e| {
        anyhow::anyhow!(
            "stored snapshot: {e}; run that version or newer, or start this node with a new id \
             and an empty data dir"
        )
    })?;
    if stored.file.is_none() {
        let index = stored.meta.last_log_id.map_or(0, |l| l.index);
        let data = std::mem::take(&mut stored.data);
        let (name, _, crc) = files
            .write(index, |w| w.write_all(&data))
            .context("move the stored snapshot to a file")?;
        stored.file = Some(name);
        stored.crc32 = Some(crc);
        tree.insert(CURRENT_SNAPSHOT, encode(&stored)?)?;
        db.flush()?;
        tracing::info!("moved the stored snapshot from sled to a file");
    }
    files.clean(stored.file.as_deref())?;
    let state = SmState {
        registry,
        last_applied: stored.meta.last_log_id,
        membership: stored.meta.last_membership.clone(),
    };
    Ok((state, stored.file.map(|f| (stored.meta, f))))
}

/// The registry a snapshot's bytes hold (from this node's disk, or installed from the
/// leader), refused if it cannot be decoded or was written by a newer version.
pub fn registry_from_snapshot(bytes: &[u8]) -> Result<Registry, String> {
    registry_of(crate::protocol::from_msgpack(bytes))
}

/// `registry_from_snapshot`, decoding as it reads: a snapshot file is never read whole into
/// memory. Bytes after the registry make it invalid, as a damaged or padded file.
pub fn registry_from_reader(mut bytes: impl Read) -> Result<Registry, String> {
    let registry = registry_of(crate::protocol::from_msgpack_reader(&mut bytes))?;
    match bytes.read(&mut [0u8]) {
        Ok(0) => Ok(registry),
        Ok(_) => Err("the snapshot has bytes after its registry".into()),
        Err(e) => Err(format!("cannot read the snapshot: {e}")),
    }
}

fn registry_of(
    content: Result<SnapshotData, rmp_serde::decode::Error>,
) -> Result<Registry, String> {
    let content = content.map_err(|e| format!("cannot decode the snapshot's registry: {e}"))?;
    if content.registry.v > REGISTRY_VERSION {
        return Err(format!(
            "the snapshot was written by a newer Warden (registry version {}; this one reads up \
             to {REGISTRY_VERSION})",
            content.registry.v
        ));
    }
    Ok(Registry::from_data(content.registry))
}

/// Flushes sled on the blocking pool. sled's own `flush_async` starts a new OS thread per call.
async fn flush(db: &sled::Db) -> sled::Result<()> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(r) => r.map(|_| ()),
        Err(e) => Err(sled::Error::Io(std::io::Error::other(e))),
    }
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
    /// Each append's callback, with when the append began.
    flusher: mpsc::Sender<(Instant, LogFlushed<TypeConfig>)>,
    /// The stored snapshot's log id: entries are purged only up to it.
    stored: StoredMark,
    /// Failpoints a test armed (`crate::faults`; none in a release build).
    faults: Arc<crate::faults::Faults>,
    bytes: Arc<LogBytes>,
}

/// Flushes on a dedicated thread: flushes sled once for every append queued while the previous
/// flush ran, then reports each append complete, in order. openraft 0.9 waits in its core for
/// each append's report, so in practice appends are flushed one at a time; the thread still
/// saves sled's `flush_async`, which starts a new OS thread per call and cost more than the
/// flush itself. Stops when every sender (the log store and its clones) is gone.
fn flush_loop(
    db: sled::Db,
    mut rx: mpsc::Receiver<(Instant, LogFlushed<TypeConfig>)>,
    timed: Option<LogTimings>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut waiting = vec![first];
        while let Ok(cb) = rx.try_recv() {
            waiting.push(cb);
        }
        let started = std::time::Instant::now();
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        if let Some(t) = &timed {
            t.flushes.observe(started.elapsed().as_secs_f64());
            for (appended, _) in &waiting {
                t.appends.observe(appended.elapsed().as_secs_f64());
            }
        }
        tracing::debug!(
            appends = waiting.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "log flushed"
        );
        if let Err(e) = &result {
            tracing::error!(error = %e, "flushing the Raft log failed");
        }
        for (_, cb) in waiting {
            cb.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}

impl LogStore {
    /// `purge` on an owned store, for a test that holds the future while installing.
    #[cfg(test)]
    async fn purge_owned(mut self, log_id: LogId) -> Result<(), StorageError> {
        self.purge(log_id).await
    }

    fn read_meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self
            .meta
            .get(key)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        match raw {
            None => Ok(None),
            Some(v) => crate::protocol::from_msgpack(&v)
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
            let entry: Entry = crate::protocol::from_msgpack(&v)
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
                let entry: Entry = crate::protocol::from_msgpack(&v)
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
        // A lone entry (every append of a lone writer) is a plain insert: a sled batch takes
        // sled's process-wide write lock and writes a batch marker, which cost 50 to 130 us per
        // append on this machine, about a tenth of a lone write, paid on the leader and again
        // on each follower. Several entries go in one batch, which amortizes that.
        let began = Instant::now();
        if self.faults.log_write_fails() {
            let e = std::io::Error::other("failpoint: the Raft log cannot be written");
            return Err(io_err(ErrorSubject::Logs, ErrorVerb::Write, e));
        }
        let mut entries = entries.into_iter();
        match (entries.next(), entries.next()) {
            (None, _) => {}
            (Some(only), None) => {
                let bytes = encode(&only)?;
                self.bytes.add(bytes.len());
                self.log
                    .insert(only.log_id.index.to_be_bytes(), bytes)
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            }
            (Some(first), Some(second)) => {
                let mut batch = sled::Batch::default();
                for entry in [first, second].into_iter().chain(entries) {
                    let bytes = encode(&entry)?;
                    self.bytes.add(bytes.len());
                    batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
                }
                self.log
                    .apply_batch(batch)
                    .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            }
        }
        // The write is acknowledged to openraft (and so, through a quorum, to the client) only
        // once the flusher has it on disk. openraft 0.9 waits for that in its core before it
        // replicates the entries, so a lone write pays the leader's flush, then a follower's.
        self.flusher.send((began, callback)).await.map_err(|_| {
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
        // The log and the stored snapshot must together cover every committed entry. openraft
        // asks a follower to purge up to a snapshot it is still installing (in the state
        // machine's task), so then wait until that snapshot is stored. (A snapshot openraft
        // built is stored before openraft hears of it.)
        let mut stored = self.stored.last_log_id.subscribe();
        let covered = stored.wait_for(|s| {
            s.map(|l| l.index) >= Some(log_id.index)
                || !self
                    .stored
                    .installing
                    .load(std::sync::atomic::Ordering::Acquire)
        });
        match tokio::time::timeout(
            std::time::Duration::from_millis(crate::limits::PURGE_WAITS_FOR_SNAPSHOT_MS),
            covered,
        )
        .await
        {
            Ok(Ok(_)) => {}
            _ => {
                return Err(io_err(
                    ErrorSubject::Logs,
                    ErrorVerb::Delete,
                    std::io::Error::other(format!(
                        "no stored snapshot covers log index {}: the log is kept",
                        log_id.index
                    )),
                ))
            }
        }
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
    /// The registry's bytes, in a snapshot stored by an older version; empty since they are
    /// in `file`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    data: Vec<u8>,
    /// The file of `raft::snapshot_files` holding the registry's bytes.
    #[serde(default)]
    file: Option<String>,
    /// The CRC-32 of that file, checked when the node loads it.
    #[serde(default)]
    crc32: Option<u32>,
}

/// The content of a snapshot's data: the registry at `meta.last_log_id`.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    v: u32,
    registry: RegistryData,
}

/// The state machine: the registry in memory, its snapshots in sled.
pub struct StateMachine {
    db: sled::Db,
    snapshot: sled::Tree,
    stored: StoredMark,
    state: SharedState,
    events: Option<mpsc::Sender<Vec<RegistryEvent>>>,
    /// Where the events of every applied entry are written for the history stream.
    history: Option<Arc<Outbox>>,
    /// When each entry began and ended applying, for traces (`time_applies`).
    apply_times: Option<Arc<ApplyTimes>>,
    /// Snapshots built and installed, for the metrics (`count_snapshots`).
    snapshot_counts: Option<SnapshotCounts>,
    log_bytes: Arc<LogBytes>,
    /// The snapshot being received, decoded on a blocking thread as its chunks arrive.
    receiving: Option<Decoding>,
    /// Installs whose registry was decoded as it came (for tests).
    #[cfg(test)]
    streamed_installs: Arc<std::sync::atomic::AtomicUsize>,
}

/// A received snapshot's decoding, which runs while its chunks are written to the reception's
/// file (`path`). It answers the registry, the CRC-32 of the bytes it read and their number.
/// It ends when that file is installed or dropped; one that was replaced by a newer reception
/// is left to end by itself.
struct Decoding {
    path: std::path::PathBuf,
    task: tokio::task::JoinHandle<Result<(Registry, u32, u64), String>>,
}

impl Decoding {
    fn start(path: std::path::PathBuf, received: Received) -> Decoding {
        let task = tokio::task::spawn_blocking(move || {
            let mut reader = Checksummed::new(received);
            let registry = registry_from_reader(&mut reader)?;
            let (received, crc) = reader.finish();
            Ok((registry, crc, received.bytes_read()))
        });
        Decoding { path, task }
    }
}

/// When the last `limits::APPLY_TIMES` entries applied here began and ended applying, by log
/// index: the leader's `committed` and `applied` spans of a traced command come from them
/// (the state machine is where the two moments are known).
#[derive(Default)]
pub struct ApplyTimes(std::sync::Mutex<std::collections::VecDeque<(u64, SystemTime, SystemTime)>>);

impl ApplyTimes {
    fn record(&self, index: u64, began: SystemTime, ended: SystemTime) {
        let mut times = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if times.len() >= crate::limits::APPLY_TIMES {
            times.pop_front();
        }
        times.push_back((index, began, ended));
    }

    /// When entry `index` began and ended applying, if it is among the last ones.
    pub fn of(&self, index: u64) -> Option<(SystemTime, SystemTime)> {
        let times = self.0.lock().unwrap_or_else(|p| p.into_inner());
        times
            .iter()
            .rev()
            .find(|(i, _, _)| *i == index)
            .map(|&(_, began, ended)| (began, ended))
    }
}

/// The metrics' histograms of the log's disk work: each flush, and each append from its call
/// to its entries on disk (its own write, waiting for the flusher, and the flush).
#[derive(Clone, Debug)]
pub struct LogTimings {
    pub flushes: prometheus_client::metrics::histogram::Histogram,
    pub appends: prometheus_client::metrics::histogram::Histogram,
}

/// The metrics' counters of snapshots this node built and installed.
#[derive(Clone, Debug)]
pub struct SnapshotCounts {
    pub built: prometheus_client::metrics::counter::Counter,
    pub installed: prometheus_client::metrics::counter::Counter,
}

impl StateMachine {
    /// Counts every snapshot built or installed into `counts`.
    pub fn count_snapshots(&mut self, counts: SnapshotCounts) {
        self.snapshot_counts = Some(counts);
    }

    /// Records when each entry begins and ends applying into `times`.
    pub fn time_applies(&mut self, times: Arc<ApplyTimes>) {
        self.apply_times = Some(times);
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, SmState> {
        // A poisoned lock means a panic mid-apply, which already aborts the node's Raft task;
        // reading the state it left is still the most useful thing to do.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, SmState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies what it can of `a` under the lock, in steps of at most
    /// `limits::APPLY_STEP_AGENTS` records, until the entry is applied (true) or
    /// `limits::APPLY_SLICE_MS` have passed since `slice` began (false: yield, then call
    /// again). The entry counts as applied only once all of it is.
    fn apply_slice(
        &self,
        a: &mut Applying,
        events: &mut Vec<RegistryEvent>,
        slice: Instant,
    ) -> bool {
        let budget = Duration::from_millis(crate::limits::APPLY_SLICE_MS);
        let slow = Duration::from_millis(SLOW_APPLY_MS);
        let waited = Instant::now();
        let mut st = self.write_state();
        if waited.elapsed() >= slow {
            // Readers hold the lock too long: the host's passes and queries must stay short.
            tracing::warn!(
                ms = waited.elapsed().as_millis() as u64,
                index = a.log_id.index,
                "waited long for the registry's lock to apply"
            );
        }
        if let Some(prev) = st.last_applied {
            assert!(a.log_id.index > prev.index, "applied index must only grow");
        }
        let st = &mut *st;
        if let EntryPayload::Normal(p) = &a.payload {
            st.registry.set_entry_version(p.v);
        }
        loop {
            let began = Instant::now();
            let resumed = a.rest.is_some();
            let step = match (a.rest.take(), &a.payload) {
                (Some(rest), _) => Some(st.registry.resume(a.time, rest, events)),
                (None, EntryPayload::Normal(p)) => p
                    .items
                    .get(a.outcomes.len())
                    .map(|item| st.registry.apply_step(p.time, item, events)),
                (None, EntryPayload::Membership(m)) => {
                    st.membership = StoredMembership::new(Some(a.log_id), m.clone());
                    None
                }
                (None, EntryPayload::Blank) => None,
            };
            if began.elapsed() >= slow {
                // A step is meant to take a few ms (`limits::APPLY_STEP_AGENTS`); one this long
                // delays Raft's heartbeats and the leases on this node.
                let command = match &a.payload {
                    EntryPayload::Normal(p) => p
                        .items
                        .get(a.outcomes.len())
                        .map_or("?", |item| item.cmd.name()),
                    _ => "membership",
                };
                tracing::warn!(
                    ms = began.elapsed().as_millis() as u64,
                    index = a.log_id.index,
                    command,
                    resumed,
                    "a slow apply step"
                );
            }
            match step {
                None => {
                    st.last_applied = Some(a.log_id);
                    return true;
                }
                Some(Step::Done(outcome)) => a.outcomes.push(outcome),
                Some(Step::More(rest)) => a.rest = Some(rest),
            }
            if slice.elapsed() >= budget {
                return false;
            }
        }
    }
}

/// An apply step or a wait for the registry's lock this long (ms) is logged as slow.
const SLOW_APPLY_MS: u64 = 50;

/// One log entry being applied, perhaps over several slices (`StateMachine::apply_slice`).
struct Applying {
    log_id: LogId,
    time: DateTime<Utc>,
    payload: EntryPayload<TypeConfig>,
    outcomes: Vec<crate::registry::Outcome>,
    /// The command of `payload` applied in part, if any.
    rest: Option<Unfinished>,
}

impl Applying {
    fn new(entry: Entry) -> Self {
        let time = match &entry.payload {
            EntryPayload::Normal(p) => p.time,
            _ => DateTime::<Utc>::UNIX_EPOCH,
        };
        Applying {
            log_id: entry.log_id,
            time,
            payload: entry.payload,
            outcomes: Vec::new(),
            rest: None,
        }
    }
}

/// Runs `work` on a thread of its own at a lower CPU priority (`limits::SNAPSHOT_NICE`), and
/// answers its result. A snapshot of a large registry is seconds of CPU and memory traffic,
/// and every node builds one at about the same time: at that priority it takes what Raft,
/// the leases and the agents leave, rather than delaying them.
async fn on_low_priority_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("warden-snapshot".into())
        .spawn(move || {
            // Linux keeps the nice value per thread, and nice() changes the calling one's by
            // this much, relative to the node's own. Lowering one's own priority needs no
            // privilege; if it fails the work runs at the usual one.
            #[cfg(target_os = "linux")]
            // SAFETY: nice() reads no memory of ours.
            unsafe {
                libc::nice(crate::limits::SNAPSHOT_NICE);
            }
            let _ = tx.send(work());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the snapshot thread ended without an answer"))
}

/// What became of a snapshot file offered to `store_snapshot`.
enum Kept {
    /// sled names it now (once flushed); the file it named before, if any, is to be kept as
    /// the previous one after that flush, and the previous one removed.
    Stored { replaced: Option<String> },
    /// A snapshot at least as new is stored: nothing names this file.
    Older,
}

/// Names the snapshot file `name` (complete and durable) as the stored snapshot, unless the
/// stored one is at least as new, and notes it in `mark`: a snapshot built from an older copy
/// can finish after a newer one was installed, and must not replace it (the log under the
/// newer one may already be purged). The caller then calls `settle`.
fn store_snapshot(
    tree: &sled::Tree,
    mark: &StoredMark,
    meta: &SnapshotMeta,
    (name, crc32): (&str, u32),
) -> Result<Kept, StorageError> {
    let encoded = encode(&StoredSnapshot {
        v: REGISTRY_VERSION,
        meta: meta.clone(),
        data: Vec::new(),
        file: Some(name.to_string()),
        crc32: Some(crc32),
    })?;
    let new = meta.last_log_id;
    let mut current = mark.current.lock().unwrap_or_else(|p| p.into_inner());
    let mut result = Ok(Kept::Older);
    mark.last_log_id.send_if_modified(|stored| {
        if stored.is_some() && *stored >= new {
            return false;
        }
        match tree.insert(CURRENT_SNAPSHOT, encoded) {
            Ok(_) => {
                *stored = new;
                let replaced = current.replace((meta.clone(), name.to_string()));
                result = Ok(Kept::Stored {
                    replaced: replaced.map(|(_, file)| file),
                });
                true
            }
            Err(e) => {
                result = Err(io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e));
                false
            }
        }
    });
    result
}

/// After `store_snapshot`: flushes sled, so that it names the new file durably, and only then
/// removes the file named before the one it replaced (that one it keeps: see
/// `Stored::previous`); or removes the new file, which nothing names. On start, every file
/// but the named one is removed.
async fn settle(
    db: &sled::Db,
    mark: &StoredMark,
    kept: Kept,
    name: &str,
) -> Result<(), StorageError> {
    match kept {
        Kept::Stored { replaced } => {
            flush(db)
                .await
                .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
            if let Some(old) = replaced {
                let retired = mark
                    .previous
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(old);
                if let Some(retired) = retired {
                    mark.files.remove(&retired);
                }
            }
        }
        Kept::Older => mark.files.remove(name),
    }
    Ok(())
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
        let mut slice = Instant::now();
        for entry in entries {
            if let EntryPayload::Normal(p) = &entry.payload {
                if p.v > REGISTRY_VERSION {
                    // Written by a newer leader: its meaning is unknown here. Stop applying
                    // rather than guess (a node of another version cannot join).
                    let why = format!(
                        "log entry {} is of registry version {}; this node reads up to \
                         {REGISTRY_VERSION}: upgrade it",
                        entry.log_id.index, p.v
                    );
                    tracing::error!("{why}");
                    return Err(StorageIOError::read_logs(AnyError::error(why)).into());
                }
            }
            let began = self.apply_times.as_ref().map(|_| SystemTime::now());
            let mut applying = Applying::new(entry);
            let index = applying.log_id.index;
            // The events of this entry so far: the next one's place among them.
            let mut emitted = 0u32;
            // Bounded slices of work under the lock, and a yield between two: Raft's
            // heartbeats, lease renewals and readers run while a large entry applies.
            loop {
                let from = events.len();
                let done = self.apply_slice(&mut applying, &mut events, slice);
                if let Some(outbox) = &self.history {
                    // Written as they come, a slice's worth at a time: the outbox has them
                    // before the entry's reply, and a large entry is not encoded at once.
                    let new = &events[from..];
                    outbox.append(index, emitted, new);
                    emitted = emitted.saturating_add(new.len() as u32);
                }
                if done {
                    break;
                }
                tokio::task::yield_now().await;
                slice = Instant::now();
            }
            if let (Some(times), Some(began)) = (&self.apply_times, began) {
                times.record(index, began, SystemTime::now());
            }
            replies.push(applying.outcomes);
        }
        if let (Some(tx), false) = (&self.events, events.is_empty()) {
            if tx.try_send(events).is_err() {
                tracing::warn!("event publisher is behind or gone; dropped a batch of events");
            }
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The copy is taken here, in order with `apply`, because apply keeps running while the
        // snapshot is built. Agents and checkpoints are persistent maps, shared in O(1); the
        // supervisors and remembered requests are copied, which can still take a while: the
        // runtime's other tasks (those queued on this thread too) move to another thread
        // meanwhile. On a runtime without other threads the copy simply runs here.
        let copy = || {
            let st = self.read_state();
            (
                st.last_applied,
                st.membership.clone(),
                st.registry.data().clone(),
            )
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let began = Instant::now();
        let (last_applied, membership, data) = if multi_thread {
            tokio::task::block_in_place(copy)
        } else {
            copy()
        };
        tracing::info!(
            agents = data.agents.len(),
            copy_ms = began.elapsed().as_millis() as u64,
            "copied the registry for a snapshot"
        );
        self.log_bytes.snapshot_taken();
        SnapshotBuilder {
            history: self.history.clone(),
            built: self.snapshot_counts.as_ref().map(|c| c.built.clone()),
            last_applied,
            membership,
            data,
            snapshot: self.snapshot.clone(),
            stored: self.stored.clone(),
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        self.stored
            .installing
            .store(true, std::sync::atomic::Ordering::Release);
        let (file, received) = self
            .stored
            .files
            .receive()
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        self.receiving = Some(Decoding::start(file.path().to_path_buf(), received));
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        let decoding = match &self.receiving {
            Some(d) if d.path == snapshot.path() => self.receiving.take(),
            _ => None,
        };
        // The end of the hand-off: the decoder reads to its end and answers.
        let mut snapshot = snapshot;
        snapshot.end_stream().await;
        let (file, path) = snapshot.into_std().await;
        let sig = Some(meta.signature());
        let began = Instant::now();
        let decoded = match decoding {
            Some(d) => match d.task.await {
                Ok(Ok(decoded)) => Some(decoded),
                Ok(Err(why)) => {
                    tracing::info!(%why, "the snapshot was not decoded as it came: decoding its file");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the snapshot's decoder failed: decoding its file");
                    None
                }
            },
            None => None,
        };
        let waited_ms = began.elapsed().as_millis() as u64;
        // Decoding (unless done as the chunks came), indexing and storing a large registry take
        // seconds: on the blocking pool, not on a thread of Raft's runtime, whose heartbeats and
        // votes must go on meanwhile. Then the file becomes the stored one.
        let (tree, mark, for_store) = (self.snapshot.clone(), self.stored.clone(), meta.clone());
        let history = self.history.clone();
        #[cfg(test)]
        let streamed = self.streamed_installs.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let size = file.metadata().map_err(|e| e.to_string())?.len();
            // Decoded as it came only if the decoder read every byte the file holds.
            let (registry, crc) = match decoded {
                Some((registry, crc, read)) if read == size => {
                    #[cfg(test)]
                    streamed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (registry, crc)
                }
                _ => {
                    use std::io::Seek;
                    (&file).rewind().map_err(|e| e.to_string())?;
                    let reader = std::io::BufReader::with_capacity(1 << 20, &file);
                    let mut reader = Checksummed::new(reader);
                    let registry = registry_from_reader(&mut reader)?;
                    (registry, reader.finish().1)
                }
            };
            let decoded_ms = began.elapsed().as_millis() as u64;
            let index = for_store.last_log_id.map_or(0, |l| l.index);
            if let Some(outbox) = &history {
                // The entries this node skips have no events here: say so durably before the
                // snapshot is named (on start the outbox is cut back to it). A failure costs
                // the history, never the registry: the outbox's mark stays short of this
                // snapshot, and its next start records the gap.
                if let Err(e) = outbox.installed(index).and_then(|()| outbox.sync()) {
                    tracing::error!(error = %e, "could not note a snapshot in the history outbox");
                }
            }
            let name = mark
                .files
                .adopt(file, &path, index)
                .map_err(|e| format!("store the snapshot's file: {e}"))?;
            let kept = store_snapshot(&tree, &mark, &for_store, (&name, crc));
            kept.map(|kept| (registry, kept, name, size, decoded_ms))
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the snapshot's install panicked: {e}")));
        // A failed install leaves `installing` set on purpose: a purge waiting for it then
        // times out and keeps the log, which no stored snapshot covers.
        let (registry, kept, name, size, decoded_ms) = loaded.map_err(|why| {
            io_err(
                ErrorSubject::Snapshot(sig.clone()),
                ErrorVerb::Write,
                std::io::Error::other(why),
            )
        })?;
        tracing::info!(
            bytes = size,
            agents = registry.data().agents.len(),
            decode_wait_ms = waited_ms,
            decode_ms = decoded_ms,
            ms = began.elapsed().as_millis() as u64,
            "installed a snapshot from the leader"
        );
        self.stored
            .installing
            .store(false, std::sync::atomic::Ordering::Release);
        // Wake a purge waiting for this install even if a newer snapshot was already stored.
        self.stored.last_log_id.send_modify(|_| {});
        settle(&self.db, &self.stored, kept, &name).await?;
        self.log_bytes.snapshot_taken();
        if let Some(c) = &self.snapshot_counts {
            c.installed.inc();
        }
        let replaced = {
            let mut st = self.write_state();
            st.last_applied = meta.last_log_id;
            st.membership = meta.last_membership.clone();
            std::mem::replace(&mut st.registry, registry)
        };
        // The registry replaced: hundreds of MB in millions of allocations with a million
        // agents, freed outside the lock and off Raft's threads.
        tokio::task::spawn_blocking(move || drop(replaced));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        // Opened under the lock that a replacing snapshot takes before it removes this one's
        // file; once open, the file reads whole even if it is removed (the leader may send it
        // to a follower for a while).
        let current = self
            .stored
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((meta, name)) = current.as_ref() else {
            return Ok(None);
        };
        let file = self.stored.files.open_file(name).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        Ok(Some(Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(file),
        }))
    }
}

/// Builds a snapshot from the copy taken in `get_snapshot_builder`.
pub struct SnapshotBuilder {
    history: Option<Arc<Outbox>>,
    /// Counts the snapshot once it is built (`SnapshotCounts`).
    built: Option<prometheus_client::metrics::counter::Counter>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    data: RegistryData,
    snapshot: sled::Tree,
    stored: StoredMark,
    db: sled::Db,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // Serialized in place rather than cloned once more, straight into its file, on a
        // low-priority thread of its own: with many agents it takes long, and Raft and the
        // leases come first.
        let content = SnapshotData {
            v: REGISTRY_VERSION,
            registry: std::mem::take(&mut self.data),
        };
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, uuid::Uuid::new_v4()),
            None => format!("empty-{}", uuid::Uuid::new_v4()),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let (tree, mark, for_store) = (self.snapshot.clone(), self.stored.clone(), meta.clone());
        let history = self.history.clone();
        let began = Instant::now();
        let built = on_low_priority_thread(move || {
            let index = for_store.last_log_id.map_or(0, |l| l.index);
            if let Some(outbox) = &history {
                // The events of every entry the snapshot covers were written when the copy was
                // taken; durable before it is named, since they are never written again. A
                // failure costs the history, not the snapshot: the outbox's mark stays short,
                // and its next start records the gap.
                if let Err(e) = outbox.sync() {
                    tracing::error!(error = %e, "could not sync the history outbox");
                }
            }
            // Records as MessagePack arrays rather than maps: at a million agents less than
            // half the bytes (204 MB against 438 MB) and faster both ways. The decoder reads
            // either form, so snapshots written by older versions (maps) still load, and a
            // registry record may only grow by fields appended at its end with
            // `#[serde(default)]` (ARCHITECTURE.md).
            let written = mark.files.write(index, |w| {
                rmp_serde::encode::write(w, &content).map_err(std::io::Error::other)
            });
            // The copy is freed here too, not on Raft's runtime: with many agents that is long
            // as well.
            drop(content);
            let (name, size, crc) = written.map_err(|e| e.to_string())?;
            // Opened before it may be removed (when a newer snapshot was stored meanwhile):
            // openraft still gets the snapshot it asked for.
            let file = mark.files.open_file(&name).map_err(|e| e.to_string())?;
            let kept = store_snapshot(&tree, &mark, &for_store, (&name, crc))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((file, kept, name, size))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|built| built)
        .map_err(|why| {
            io_err(
                ErrorSubject::Snapshot(None),
                ErrorVerb::Write,
                std::io::Error::other(why),
            )
        })?;
        let (file, kept, name, size) = built;
        let wrote = matches!(kept, Kept::Stored { .. });
        settle(&self.db, &self.stored, kept, &name).await?;
        tracing::info!(
            bytes = size,
            ms = began.elapsed().as_millis() as u64,
            stored = wrote,
            "built a snapshot"
        );
        if let Some(c) = &self.built {
            c.inc();
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
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

    /// Opens the store in `dir` again after its previous handle was dropped. sled's own
    /// background threads may hold the directory's lock a moment longer, so this retries until
    /// the open succeeds, for at most 10 s.
    async fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Ok(store) => return store,
                Err(e) if std::time::Instant::now() >= deadline => panic!("reopen: {e:#}"),
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }

    fn supervisor_entry(index: u64, name: &str) -> Entry {
        use crate::registry::*;
        let cmd = RegistryCmd::CreateSupervisor(CreateSupervisor {
            name: name.into(),
            parent: None,
            strategy: Strategy::OneForOne,
            max_restarts: 3,
            max_seconds: 5,
            backoff: Backoff::default(),
            placement: SupervisorPlacement::Spread,
            request_id: None,
        });
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                v: REGISTRY_VERSION,
                time: chrono::DateTime::from_timestamp(1_700_000_000 + index as i64, 0).unwrap(),
                items: vec![Stamped {
                    id: uuid::Uuid::from_u128(index.into()),
                    request_id: None,
                    cmd,
                    fingerprint: None,
                }],
            }),
        }
    }

    /// Goal: a node restarted on its data dir resumes from its last snapshot: the registry as
    /// the snapshot saved it and the applied log id at the snapshot's (openraft then re-applies
    /// the committed entries after it from the log), and a data dir of the older layout, with
    /// every record in an `sm` tree, loses that tree on open.
    #[tokio::test]
    async fn a_reopened_store_resumes_from_its_last_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot_id = {
            let store = Store::open(dir.path()).unwrap();
            store
                .db
                .open_tree(OLD_SM_TREE)
                .unwrap()
                .insert("x", "y")
                .unwrap();
            let (log, mut sm, _) = store.raft_parts(None).unwrap();
            sm.apply([supervisor_entry(1, "a"), supervisor_entry(2, "b")])
                .await
                .unwrap();
            let snap = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            // Applied after the snapshot: only the log (not kept in this test) has it.
            sm.apply([supervisor_entry(3, "c")]).await.unwrap();
            drop((log, sm));
            store.close().await.unwrap();
            snap.meta.last_log_id
        };
        let store = reopen(dir.path()).await;
        assert!(!store.db.tree_names().iter().any(|t| &t[..] == OLD_SM_TREE));
        let (_log, mut sm, shared) = store.raft_parts(None).unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied, snapshot_id);
        assert_eq!(applied.map(|l| l.index), Some(2));
        let st = shared.read().unwrap();
        assert!(st.registry.supervisor("a").is_some());
        assert!(st.registry.supervisor("b").is_some());
        assert!(st.registry.supervisor("c").is_none());
    }

    /// Goal: a node that restarts counts what its log holds beyond its snapshot toward the
    /// next snapshot by size, so that restarting often cannot keep the log from being
    /// compacted; building a snapshot starts the count again.
    #[tokio::test]
    async fn the_log_bytes_past_the_snapshot_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let log = store.db.open_tree("log").unwrap();
            for i in 1..=3u64 {
                log.insert(i.to_be_bytes(), vec![0u8; 1000]).unwrap();
            }
            store.db.flush().unwrap();
        }
        // sled's threads may hold the directory a moment after the first handle is gone.
        let store = reopen(dir.path()).await;
        let (_log, mut sm, _) = store.raft_parts(None).unwrap();
        assert_eq!(store.log_bytes().since_snapshot(), 3000);
        let _ = sm.get_snapshot_builder().await;
        assert_eq!(store.log_bytes().since_snapshot(), 0);
    }

    /// Goal: the log behind a snapshot is purged down to the entries and bytes kept, weighed
    /// from the newest entry the snapshot covers back; what is past the snapshot never counts.
    #[test]
    fn the_purge_point_keeps_the_newest_entries_within_both_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = store.db.open_tree("log").unwrap();
        for i in 1..=10u64 {
            log.insert(i.to_be_bytes(), vec![0u8; 100 * i as usize])
                .unwrap();
        }
        let bytes = store.log_bytes();
        // Behind a snapshot at 8: entries 8 (800 B), 7 (700 B), 6 (600 B), ...
        assert_eq!(bytes.purge_point(8, 1000, 1500).unwrap(), Some(6));
        assert_eq!(bytes.purge_point(8, 1000, 1499).unwrap(), Some(7));
        assert_eq!(bytes.purge_point(8, 2, u64::MAX).unwrap(), Some(6));
        assert_eq!(bytes.purge_point(8, 0, u64::MAX).unwrap(), Some(8));
        // Everything behind it fits: nothing to purge.
        assert_eq!(bytes.purge_point(8, 8, 3600).unwrap(), None);
        assert_eq!(bytes.purge_point(3, 1000, 600).unwrap(), None);
    }

    /// Goal: a snapshot built from an older copy that finishes after a newer one was stored
    /// (installed, say) does not replace it, so the stored snapshot still covers the purged log.
    #[tokio::test]
    async fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_log, mut sm, _) = store.raft_parts(None).unwrap();
        sm.apply([supervisor_entry(1, "a")]).await.unwrap();
        let mut older = sm.get_snapshot_builder().await;
        sm.apply([supervisor_entry(2, "b")]).await.unwrap();
        let newer = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        older.build_snapshot().await.unwrap();
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, newer.meta.last_log_id);
        assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(2));
    }

    /// Goal: a snapshot's bytes live in one file, and the one it replaced is kept until the
    /// next replaces it in turn (sled may come back naming it after a power cut); a sender
    /// that opened an older file still reads it whole once it is removed; a file with bytes
    /// after its registry is refused; a node
    /// restarting from a data dir of an older version, whose snapshot sled held whole, moves it
    /// to a file and loads the same registry; files nothing names are removed on start.
    #[tokio::test]
    async fn snapshots_live_in_one_file_and_older_stores_move_theirs_there() {
        use tokio::io::AsyncReadExt;
        let files = |d: &Path| std::fs::read_dir(d.join("snapshots")).unwrap().count();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_log, mut sm, _) = store.raft_parts(None).unwrap();
        sm.apply([supervisor_entry(1, "a")]).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let mut sending = sm.get_current_snapshot().await.unwrap().unwrap();
        for (index, name) in [(2, "b"), (3, "c")] {
            sm.apply([supervisor_entry(index, name)]).await.unwrap();
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
        }
        assert_eq!(
            files(dir.path()),
            2,
            "the current file and the one before it"
        );
        let mut old = Vec::new();
        sending.snapshot.read_to_end(&mut old).await.unwrap();
        let registry = registry_from_snapshot(&old).unwrap();
        assert!(registry.supervisor("a").is_some() && registry.supervisor("b").is_none());
        let mut padded = old.clone();
        padded.push(0xc0);
        let err = registry_from_reader(&padded[..]).expect_err("refused");
        assert!(err.contains("bytes after"), "{err}");
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        let mut bytes = Vec::new();
        { current.snapshot }.read_to_end(&mut bytes).await.unwrap();

        // A data dir as an older version left it: the snapshot whole in sled, and a file
        // nothing names.
        let older = tempfile::tempdir().unwrap();
        {
            let store = Store::open(older.path()).unwrap();
            let legacy = StoredSnapshot {
                v: REGISTRY_VERSION,
                meta: current.meta.clone(),
                data: bytes,
                file: None,
                crc32: None,
            };
            let tree = store.db.open_tree("snapshot").unwrap();
            tree.insert(CURRENT_SNAPSHOT, encode(&legacy).unwrap())
                .unwrap();
            std::fs::write(older.path().join("snapshots/stray.tmp"), b"x").unwrap();
            store.db.flush().unwrap();
        }
        let store = reopen(older.path()).await;
        let (_log, mut sm, shared) = store.raft_parts(None).unwrap();
        {
            let st = shared.read().unwrap();
            assert!(st.registry.supervisor("c").is_some());
            assert_eq!(st.last_applied, current.meta.last_log_id);
        }
        assert_eq!(
            files(older.path()),
            1,
            "moved to a file; the stray one removed"
        );
        let moved = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(moved.meta, current.meta);
    }

    /// Goal: a snapshot file damaged on disk, even in a way that still decodes, stops the
    /// node at start with a message that says what to do, instead of loading a wrong registry.
    #[tokio::test]
    async fn a_damaged_snapshot_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let (log, mut sm, _) = store.raft_parts(None).unwrap();
            sm.apply([supervisor_entry(1, "checksummed")])
                .await
                .unwrap();
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            drop((log, sm));
            store.close().await.unwrap();
        }
        let file = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.windows(11).position(|w| w == b"checksummed").unwrap();
        bytes[at + 9] = b'x';
        std::fs::write(&file, bytes).unwrap();
        let store = reopen(dir.path()).await;
        let err = store.raft_parts(None).err().expect("refuses to start");
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    /// Goal: a node never guesses at data of a newer version: a log entry written by a newer
    /// Warden stops the apply with an error that says to upgrade, and changes nothing.
    #[tokio::test]
    async fn a_log_entry_of_a_newer_version_is_refused_not_guessed_at() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_log, mut sm, _) = store.raft_parts(None).unwrap();
        let mut entry = supervisor_entry(1, "a");
        if let EntryPayload::Normal(p) = &mut entry.payload {
            p.v = REGISTRY_VERSION + 1;
        }
        let err = sm.apply([entry]).await.expect_err("refused");
        assert!(err.to_string().contains("upgrade"), "{err}");
        assert!(sm.read_state().registry.supervisor("a").is_none());
    }

    /// Goal: a snapshot received chunk by chunk is decoded as its chunks come and installs
    /// the leader's registry; the same chunks with one sent twice (a lost reply) install the
    /// same registry from the file; a restart then loads the installed snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_received_snapshot_is_decoded_as_it_comes_or_from_its_file() {
        use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
        let other = tempfile::tempdir().unwrap();
        let leader = Store::open(other.path()).unwrap();
        let (_leader_log, mut leader_sm, _) = leader.raft_parts(None).unwrap();
        let entries: Vec<Entry> = (1..=200)
            .map(|i| supervisor_entry(i, &format!("s{i}")))
            .collect();
        leader_sm.apply(entries).await.unwrap();
        let mut snap = leader_sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let mut bytes = Vec::new();
        snap.snapshot.read_to_end(&mut bytes).await.unwrap();
        assert!(bytes.len() > 3 * 1024, "several chunks: {}", bytes.len());

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_log, mut sm, _) = store.raft_parts(None).unwrap();
        for resend in [false, true] {
            let mut file = sm.begin_receiving_snapshot().await.unwrap();
            let mut offset = 0;
            for (i, chunk) in bytes.chunks(1024).enumerate() {
                if resend && i == 2 {
                    file.seek(std::io::SeekFrom::Start(offset - 1024))
                        .await
                        .unwrap();
                    file.write_all(&bytes[offset as usize - 1024..offset as usize])
                        .await
                        .unwrap();
                }
                file.write_all(chunk).await.unwrap();
                offset += chunk.len() as u64;
            }
            file.shutdown().await.unwrap();
            sm.install_snapshot(&snap.meta, file).await.unwrap();
            let streamed = sm
                .streamed_installs
                .load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                streamed, 1,
                "decoded as it came only when in order (resend {resend})"
            );
            let st = sm.read_state();
            assert!(st.registry.supervisor("s1").is_some());
            assert!(st.registry.supervisor("s200").is_some());
            assert_eq!(st.last_applied, snap.meta.last_log_id);
        }
        drop(sm);
        drop(_log);
        drop(store);
        let store = reopen(dir.path()).await;
        let (_log, sm, _) = store.raft_parts(None).unwrap();
        assert!(sm.read_state().registry.supervisor("s200").is_some());
    }

    /// Goal: while a snapshot is being installed, a purge of the log up to it waits until it
    /// is stored (openraft queues that purge right after handing the install over), and a node
    /// whose stored snapshot does not cover its purged log refuses to start with a clear error
    /// instead of running with a hole.
    #[tokio::test]
    async fn the_log_is_never_purged_past_the_stored_snapshot() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (mut log, mut sm, _) = store.raft_parts(None).unwrap();
        // A snapshot from a leader that applied two entries.
        let other = tempfile::tempdir().unwrap();
        let leader = Store::open(other.path()).unwrap();
        let (_leader_log, mut leader_sm, _) = leader.raft_parts(None).unwrap();
        leader_sm
            .apply([supervisor_entry(1, "a"), supervisor_entry(2, "b")])
            .await
            .unwrap();
        let snap = leader_sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let upto = snap.meta.last_log_id.unwrap();

        let _receiving = sm.begin_receiving_snapshot().await.unwrap();
        let mut purge = Box::pin(log.clone().purge_owned(upto));
        assert!(
            (&mut purge).now_or_never().is_none(),
            "purge waits for the install"
        );
        sm.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        purge.await.unwrap();

        // Purged past any stored snapshot (no install running): the data dir cannot restart.
        let beyond = LogId::new(openraft::CommittedLeaderId::new(1, 1), 9);
        log.purge(beyond).await.unwrap();
        drop((log, sm));
        store.close().await.unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        let err = store.raft_parts(None).err().expect("refuses to start");
        assert!(
            err.to_string().contains("does not cover the purged log"),
            "{err}"
        );
    }

    /// Goal: the sled store meets every requirement openraft places on storage.
    /// Method: openraft's own suite, each case on a fresh sled directory.
    #[test]
    fn openraft_storage_suite_passes_on_sled() {
        Suite::test_all(SledBuilder).unwrap();
    }
}

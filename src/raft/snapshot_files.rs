//! Snapshot files: a snapshot's bytes (the registry in MessagePack) live in a file of their own
//! in `<data dir>/snapshots/`, named in the `snapshot` tree of sled beside the snapshot's
//! meta. A snapshot is written to that file as it is encoded, sent from it in chunks, received
//! into a file chunk by chunk, and decoded from its file as it is read: no step holds all of a
//! snapshot's bytes in memory (222 MB at a million agents), and sled never copies them.
//!
//! Files are made durable before sled names them: written under a temporary name, synced,
//! renamed to their final name, the directory synced; then sled records the name and is
//! flushed; only then is the file before the one it replaced removed (`raft::store` keeps the
//! previous one: sled's flush is `sync_file_range`). A crash at any point leaves sled naming a
//! complete file, and at worst files that nothing names, which `clean` removes on start.
//!
//! A received snapshot is also handed, as its chunks are written, to a reader on another thread
//! (`Received`), so that it is decoded while the rest crosses instead of after: at a million
//! agents, transfer and decoding each take seconds. The hand-off is bounded
//! (`STREAM_CHUNKS`) and the writer waits on it, so a slow decoder slows the transfer rather than
//! buffering the snapshot in memory. Anything out of order (a chunk written again after a lost
//! reply) ends the hand-off, and the file, which is complete whatever happens, is decoded instead.
//! A decoder answers a registry only once the install marks the end of the stream; a reception
//! dropped before (a leader change, a vote refused) or silent for `RECEIVE_IDLE` ends it with an
//! error, so no half-built or unused registry stays in memory.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// Buffer of a snapshot's writer and reader: large enough that a file's system calls cost
/// nothing beside encoding, small beside the snapshot.
const BUFFER_BYTES: usize = 1 << 20;

/// The file names a node gives its own snapshot files; a name that came over the network is
/// never used as a path.
const RECEIVING: &str = "receiving-";
const BUILDING: &str = "building-";
const TEMPORARY: &str = ".tmp";
const FINAL: &str = ".snap";

/// How long a decoder waits for the next received chunk before it gives up: openraft keeps a
/// reception that a leader change abandoned until another snapshot begins, which may be never,
/// and a decoder must not hold a half-built registry that long. Well above the time one
/// chunk may take (`install_snapshot_timeout_ms`, 15 s by default); past it, an install still
/// decodes the file.
const RECEIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Received chunks handed to the decoder and not yet read by it, at most: each is one chunk as
/// the leader sent it (512 KiB by default, below NATS's payload limit).
const STREAM_CHUNKS: usize = 16;

/// A snapshot's bytes in a file, and where that file is: what openraft reads a snapshot's
/// chunks from when it sends one, and writes received chunks into.
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
    /// Where a received snapshot's bytes also go as they are written, while they come in order.
    stream: Option<Stream>,
}

/// The writing end of a received snapshot's hand-off to its decoder.
#[derive(Debug)]
struct Stream {
    sender: PollSender<Bytes>,
    /// Bytes written to the file and handed on: the only position a write may continue from.
    written: u64,
}

impl SnapshotFile {
    /// The file, for reading or writing on a blocking thread, once every operation started on
    /// it has completed; and its path.
    pub async fn into_std(self) -> (std::fs::File, PathBuf) {
        (self.file.into_std().await, self.path)
    }

    fn from_std(file: std::fs::File, path: PathBuf) -> SnapshotFile {
        SnapshotFile {
            file: tokio::fs::File::from_std(file),
            path,
            stream: None,
        }
    }

    /// Where this file is: a reception's path tells it from every other reception.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells a received snapshot's decoder that every chunk was written and the snapshot is
    /// being installed: only then does its reader end normally. A reception dropped without
    /// this (never installed) ends its decoder with an error, so no decoded registry outlives
    /// it.
    pub async fn end_stream(&mut self) {
        if let Some(stream) = self.stream.take() {
            if let Some(sender) = stream.sender.get_ref() {
                // Empty: never a chunk (empty writes are not handed on).
                let _ = sender.send(Bytes::new()).await;
            }
        }
    }
}

/// A received snapshot's bytes, in order, as its chunks are written to its file: a blocking
/// reader for a decoder on its own thread. It ends (reads 0) when the file is installed
/// (`SnapshotFile::end_stream`), and fails if the file is dropped first, or no chunk came for
/// `RECEIVE_IDLE`. If the hand-off was cut short, `bytes_read` falls short of the file's size.
#[derive(Debug)]
pub struct Received {
    receiver: mpsc::Receiver<Bytes>,
    current: Bytes,
    read: u64,
    ended: bool,
    runtime: tokio::runtime::Handle,
}

impl Received {
    /// Bytes read so far. Compared with the file's size once it is installed: a hand-off that
    /// ended early (bytes written out of order) read fewer.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl Read for Received {
    /// Blocks until a chunk is written: call it on a blocking thread, never on a runtime's.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            let next = tokio::time::timeout(RECEIVE_IDLE, self.receiver.recv());
            match self.runtime.block_on(next) {
                Ok(Some(chunk)) if chunk.is_empty() => self.ended = true,
                Ok(Some(chunk)) => self.current = chunk,
                Ok(None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the snapshot's reception ended before its install",
                    ))
                }
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no chunk of the snapshot came for a minute",
                    ))
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        self.read += n as u64;
        Ok(n)
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Pin::new(&mut this.file).poll_write(cx, buf);
        }
        // Room for the bytes in the hand-off first: a write waits for the decoder. A reserved
        // slot stays reserved if the file's write is pending, and is used when it completes.
        if let Some(stream) = &mut this.stream {
            match stream.sender.poll_reserve(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                // The decoder is gone; the file is decoded at install instead.
                Poll::Ready(Err(_)) => this.stream = None,
            }
        }
        let n = match Pin::new(&mut this.file).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => {
                // The file may now differ from what was handed on: the install reads the file.
                this.stream = None;
                return Poll::Ready(Err(e));
            }
            Poll::Pending => return Poll::Pending,
        };
        if let Some(stream) = &mut this.stream {
            match stream.sender.send_item(Bytes::copy_from_slice(&buf[..n])) {
                Ok(()) => stream.written += n as u64,
                Err(_) => this.stream = None,
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.file).poll_flush(cx);
        if matches!(done, Poll::Ready(Err(_))) {
            this.stream = None;
        }
        done
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.file).poll_shutdown(cx);
        if matches!(done, Poll::Ready(Err(_))) {
            this.stream = None;
        }
        done
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        // openraft seeks when a chunk does not continue the last one (sent again after a lost
        // reply): the hand-off carries bytes in order only, so it ends here.
        if let Some(stream) = &this.stream {
            if position != SeekFrom::Start(stream.written) {
                tracing::debug!(
                    ?position,
                    written = stream.written,
                    "snapshot chunks out of order"
                );
                this.stream = None;
            }
        }
        Pin::new(&mut this.file).start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.get_mut().file).poll_complete(cx)
    }
}

/// The directory of a node's snapshot files.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    path: PathBuf,
}

impl SnapshotDir {
    /// Opens (creates) `<data dir>/snapshots`.
    pub fn open(data_dir: &Path) -> io::Result<SnapshotDir> {
        let path = data_dir.join("snapshots");
        std::fs::create_dir_all(&path)?;
        Ok(SnapshotDir { path })
    }

    fn temporary(&self, prefix: &str) -> PathBuf {
        let name = format!("{prefix}{}{TEMPORARY}", uuid::Uuid::new_v4().simple());
        self.path.join(name)
    }

    /// A new, empty file to receive a snapshot's chunks into, and the reader of its bytes as
    /// they are written. Files of earlier receptions (openraft drops a reception when the
    /// leader starts another) are removed first, so at most one is ever on disk.
    pub fn receive(&self) -> io::Result<(SnapshotFile, Received)> {
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(RECEIVING) {
                remove(&entry.path());
            }
        }
        let path = self.temporary(RECEIVING);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let (sender, receiver) = mpsc::channel(STREAM_CHUNKS);
        let mut file = SnapshotFile::from_std(file, path);
        file.stream = Some(Stream {
            sender: PollSender::new(sender),
            written: 0,
        });
        let received = Received {
            receiver,
            current: Bytes::new(),
            read: 0,
            ended: false,
            runtime: tokio::runtime::Handle::current(),
        };
        Ok((file, received))
    }

    /// Writes a new snapshot file with `write`, durably, under a final name made of `index`;
    /// answers that name, the file's size and its CRC-32. On error nothing is left behind.
    pub fn write(
        &self,
        index: u64,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<(String, u64, u32)> {
        let path = self.temporary(BUILDING);
        let written = (|| {
            let file = std::fs::File::create(&path)?;
            let mut out = Checksummed::new(io::BufWriter::with_capacity(BUFFER_BYTES, file));
            write(&mut out)?;
            let (out, crc) = out.finish();
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            let size = file.metadata()?.len();
            Ok((file, size, crc))
        })();
        let (file, size, crc) = match written {
            Ok(done) => done,
            Err(e) => {
                remove(&path);
                return Err(e);
            }
        };
        drop(file);
        let name = self.commit(&path, index).inspect_err(|_| remove(&path))?;
        Ok((name, size, crc))
    }

    /// Makes a received snapshot's file one of this directory's final files and answers its
    /// name. `file` is usually one `receive` made, which is renamed. It is copied from the open
    /// handle instead when it is any other file (openraft's test suite hands over another
    /// store's), or when a newer reception already removed its name: openraft lets the first
    /// chunk of another snapshot begin between the last chunk of one and its install.
    pub fn adopt(&self, mut file: std::fs::File, path: &Path, index: u64) -> io::Result<String> {
        file.sync_all()?;
        let received = path.parent() == Some(self.path.as_path())
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(RECEIVING));
        if received {
            match self.commit(path, index) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                done => return done,
            }
        }
        let copy = self.temporary(RECEIVING);
        let copied = (|| {
            file.seek(SeekFrom::Start(0))?;
            let mut to = std::fs::File::create(&copy)?;
            io::copy(&mut file, &mut to)?;
            to.sync_all()
        })();
        match copied.and_then(|()| self.commit(&copy, index)) {
            Ok(name) => Ok(name),
            Err(e) => {
                remove(&copy);
                Err(e)
            }
        }
    }

    /// Renames a complete, synced temporary file to a final name and syncs the directory, so
    /// the name survives a crash.
    fn commit(&self, temporary: &Path, index: u64) -> io::Result<String> {
        let name = format!("{index:020}-{}{FINAL}", uuid::Uuid::new_v4().simple());
        std::fs::rename(temporary, self.path.join(&name))?;
        std::fs::File::open(&self.path)?.sync_all()?;
        Ok(name)
    }

    /// Opens the final file `name` for reading, as openraft sends it.
    pub fn open_file(&self, name: &str) -> io::Result<SnapshotFile> {
        let path = self.file(name)?;
        Ok(SnapshotFile::from_std(std::fs::File::open(&path)?, path))
    }

    /// A buffered reader of the final file `name`, to decode it.
    pub fn reader(&self, name: &str) -> io::Result<impl Read> {
        let file = std::fs::File::open(self.file(name)?)?;
        Ok(io::BufReader::with_capacity(BUFFER_BYTES, file))
    }

    /// The path of the final file `name`; refuses a name that is not one this module makes
    /// (sled is ours, but a damaged value must not name a path elsewhere).
    fn file(&self, name: &str) -> io::Result<PathBuf> {
        let ours = name.ends_with(FINAL)
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !ours || name.starts_with('.') {
            return Err(io::Error::other(format!(
                "not a snapshot file name: {name:?}"
            )));
        }
        Ok(self.path.join(name))
    }

    /// Removes the final file `name`, once nothing names it. A reader that has it open goes
    /// on reading it (openraft may be sending it to a follower).
    pub fn remove(&self, name: &str) {
        if let Ok(path) = self.file(name) {
            remove(&path);
        }
    }

    /// Removes every file but `keep`: temporary files of a build or a reception a crash cut
    /// short, and final files a crash left unnamed or not yet removed.
    pub fn clean(&self, keep: Option<&str>) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if Some(entry.file_name().to_string_lossy().as_ref()) != keep {
                remove(&entry.path());
            }
        }
        Ok(())
    }
}

/// A reader or writer that keeps the CRC-32 of the bytes through it. sled checksummed the
/// snapshot it held; a file's checksum is kept beside its name in sled, and a node refuses to
/// start from a file that no longer matches it rather than load a damaged registry.
pub struct Checksummed<T> {
    inner: T,
    crc: crc32fast::Hasher,
}

impl<T> Checksummed<T> {
    pub fn new(inner: T) -> Self {
        Checksummed {
            inner,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// The inner reader or writer, and the checksum of what went through.
    pub fn finish(self) -> (T, u32) {
        (self.inner, self.crc.finalize())
    }
}

impl<R: Read> Read for Checksummed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Removes a file; one that cannot be removed is left (and said), never fatal: it costs disk
/// space, not correctness, and `clean` tries again on the next start.
fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a snapshot file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a written snapshot file reads back whole under its final name; a failed write
    /// leaves nothing; a reception replaces the previous one's file, which still becomes a
    /// final file whole if it is installed; `clean` keeps only the named file; a name that is
    /// not ours is refused as a path.
    #[tokio::test]
    async fn files_are_written_whole_received_one_at_a_time_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let (name, size, crc) = snaps.write(7, |w| w.write_all(b"registry")).unwrap();
        assert_eq!((size, crc), (8, crc32fast::hash(b"registry")));
        let mut back = Vec::new();
        let mut reader = Checksummed::new(snaps.reader(&name).unwrap());
        reader.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"registry");
        assert_eq!(reader.finish().1, crc);

        let failed = snaps.write(8, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("encoder failed"))
        });
        assert!(failed.is_err());
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d.join("snapshots"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(dir.path()), vec![name.clone()]);

        // A newer reception removes an older one's name; the older one, open, still becomes a
        // final file (openraft may install it after the newer one began).
        let (first, _) = snaps.receive().unwrap();
        let (mut file, path) = first.into_std().await;
        file.write_all(b"first").unwrap();
        let _second = snaps.receive().unwrap();
        let listed = names(dir.path());
        assert_eq!(listed.len(), 2, "one reception at a time: {listed:?}");
        let adopted = snaps.adopt(file, &path, 9).unwrap();
        let mut back = Vec::new();
        snaps
            .reader(&adopted)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, b"first");

        snaps.clean(Some(&name)).unwrap();
        assert_eq!(names(dir.path()), vec![name.clone()]);
        assert!(snaps.open_file("../../etc/passwd").is_err());
        assert!(snaps.open_file("x.tmp").is_err());
        snaps.remove(&name);
        assert!(names(dir.path()).is_empty());
    }

    /// Goal: a reception's bytes reach its decoder in order as they are written, while the
    /// file gets them too, and the decoder's reader ends when the file is done with; chunks
    /// out of order (a chunk sent again) end the hand-off early, and the file stays whole; a
    /// decoder that stops reading never blocks the writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn received_chunks_reach_the_decoder_in_order_or_not_at_all() {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let chunks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100_000]).collect();
        let whole: Vec<u8> = chunks.concat();

        // In order: more chunks than the hand-off holds, so the writer waits for the reader.
        let (mut file, mut received) = snaps.receive().unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            received.read_to_end(&mut all).unwrap();
            (all, received.bytes_read())
        });
        for chunk in &chunks {
            file.write_all(chunk).await.unwrap();
        }
        file.shutdown().await.unwrap();
        file.end_stream().await;
        let (mut std_file, _) = file.into_std().await;
        let (all, read) = reader.await.unwrap();
        assert_eq!(all, whole);
        assert_eq!(read, whole.len() as u64);
        let mut on_disk = Vec::new();
        std_file.seek(SeekFrom::Start(0)).unwrap();
        std_file.read_to_end(&mut on_disk).unwrap();
        assert_eq!(on_disk, whole);

        // A chunk written again: the reader fails short (no end of stream came); the file is
        // whole.
        let (mut file, mut received) = snaps.receive().unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            let failed = received.read_to_end(&mut all).is_err();
            (failed, received.bytes_read())
        });
        let mut offset = 0u64;
        for (i, chunk) in chunks.iter().enumerate() {
            if i == 3 {
                file.seek(SeekFrom::Start(offset - 100_000)).await.unwrap();
                file.write_all(&chunks[2]).await.unwrap();
            }
            file.write_all(chunk).await.unwrap();
            offset += chunk.len() as u64;
        }
        file.shutdown().await.unwrap();
        let (mut std_file, _) = file.into_std().await;
        assert_eq!(
            reader.await.unwrap(),
            (true, 300_000),
            "the hand-off ends at the first rewrite, as an error"
        );
        let mut on_disk = Vec::new();
        std_file.seek(SeekFrom::Start(0)).unwrap();
        std_file.read_to_end(&mut on_disk).unwrap();
        assert_eq!(on_disk, whole);

        // A decoder that gave up: the writer goes on to the end.
        let (mut file, received) = snaps.receive().unwrap();
        drop(received);
        for chunk in &chunks {
            file.write_all(chunk).await.unwrap();
        }
        file.shutdown().await.unwrap();
        let (std_file, _) = file.into_std().await;
        assert_eq!(std_file.metadata().unwrap().len(), whole.len() as u64);
    }
}

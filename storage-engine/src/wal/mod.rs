//! Write-ahead log: every accepted write is a checksummed record here, on disk and
//! (by default) fsync'd, before it is acknowledged.
//!
//! ```text
//!  writers ──append()──▶ channel ──▶ writer thread ──write──▶ NNNN.wal ──fsync──▶ ack
//!                                   (drains every queued request, one fsync for all)
//! ```
//!
//! * **Group commit**: one thread owns the open file. It takes every request queued while
//!   the previous fsync ran, writes them as consecutive records and syncs once, then acks
//!   them all.
//! * **Sync policy**: [`SyncPolicy::Always`] acks after `fdatasync`; [`SyncPolicy::Interval`]
//!   acks after `write` and syncs at most that long afterwards.
//! * **Poisoning**: after a failed write or fsync nothing more is accepted; the page cache
//!   may have dropped the data, so no later ack could be trusted.
//! * **Rotation**: a file that grows past [`WalConfig::max_file_bytes`] is synced and closed,
//!   and a new one is started. Closed files are deleted by [`Wal::remove_files_up_to`] once
//!   everything in them has been persisted.
//! * **Recovery** ([`Wal::open`]): files are read through `mmap`, each record's checksum is
//!   verified before it is decoded. A torn or corrupt record in the newest file ends the log:
//!   the file is truncated there and a warning logged. Anything wrong in an older file stops
//!   start-up with an error naming the file and offset.
//!
//! The byte layout is in [`format`].

pub mod format;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::ids::{SequenceNumber, WalFileId};
pub use format::{FormatError, RecordKind, RecordRef};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("WAL I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt WAL file {path} at offset {offset}: {source}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        source: FormatError,
    },
    #[error("WAL file {path} at offset {offset}: sequence {found} where {expected} was expected")]
    SequenceGap {
        path: PathBuf,
        offset: u64,
        expected: SequenceNumber,
        found: SequenceNumber,
    },
    #[error("WAL file {path} has the header of file {found}")]
    FileIdMismatch { path: PathBuf, found: WalFileId },
    #[error("replaying WAL file {path} at offset {offset}: {source}")]
    Replay {
        path: PathBuf,
        offset: u64,
        source: BoxError,
    },
    #[error("the WAL refuses writes after an earlier write or fsync failed")]
    Poisoned,
    #[error("the WAL is closed")]
    Closed,
    #[error("record payload of {len} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge { len: usize, max: usize },
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// After the record is fsync'd (the default: no acknowledged write is ever lost).
    #[default]
    Always,
    /// After the record is written; fsync at most this long later. A power loss can lose
    /// up to this much acknowledged data; a process crash loses nothing.
    Interval(Duration),
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s == "always" {
            return Ok(Self::Always);
        }
        humantime::parse_duration(s)
            .map(Self::Interval)
            .map_err(|e| format!("expected `always` or a duration such as `100ms`, got {s:?}: {e}"))
    }
}

#[derive(Debug, Clone)]
pub struct WalConfig {
    pub dir: PathBuf,
    pub sync: SyncPolicy,
    /// A file is rotated once it grows past this size.
    pub max_file_bytes: u64,
    /// Most bytes of records one group commit writes before it syncs.
    pub max_group_bytes: usize,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            sync: SyncPolicy::Always,
            max_file_bytes: 64 * 1024 * 1024,
            max_group_bytes: 16 * 1024 * 1024,
        }
    }
}

/// What a replay visitor returns for a record it chose to leave out (the operator asked to
/// skip records that cannot be applied): replay logs the record's file, offset, sequence
/// and this reason, counts it in [`ReplayStats::skipped`] and goes on. Any other error
/// from the visitor stops replay with [`Error::Replay`].
#[derive(Debug, thiserror::Error)]
#[error("record skipped")]
pub struct SkipRecord(#[source] pub BoxError);

/// What recovery found.
#[derive(Debug, Clone, Default)]
pub struct ReplayStats {
    pub files: usize,
    pub records: u64,
    pub replayed: u64,
    /// Records the visitor skipped ([`SkipRecord`]).
    pub skipped: u64,
    pub truncated_bytes: u64,
    pub last_sequence: Option<SequenceNumber>,
}

#[derive(Debug, Clone)]
struct FileMeta {
    id: WalFileId,
    first_sequence: SequenceNumber,
    path: PathBuf,
}

struct Shared {
    dir: PathBuf,
    /// Every file on disk, oldest first; the last one is the one being written.
    files: Mutex<Vec<FileMeta>>,
    poisoned: AtomicBool,
}

enum Request {
    Append {
        kind: RecordKind,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<SequenceNumber>>,
    },
    Rotate(oneshot::Sender<Result<()>>),
    Shutdown(std::sync::mpsc::Sender<()>),
}

/// A handle to the write-ahead log. Cheap to share behind an `Arc`.
pub struct Wal {
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// Observes WAL activity (fsync latency, bytes written) without the WAL knowing about
/// any metrics library.
pub trait WalObserver: Send + Sync + 'static {
    fn fsync(&self, _elapsed: Duration, _bytes: usize, _records: usize) {}
}

struct NoopObserver;
impl WalObserver for NoopObserver {}

impl Wal {
    /// Recovers the log in `config.dir`, calling `visit` for every intact record in order
    /// (including those at or below any persisted sequence: the caller decides what to
    /// skip), then starts a new file for appends. Sequence numbers continue after the last
    /// record found, and never below `min_next_sequence`.
    pub fn open(
        config: WalConfig,
        min_next_sequence: SequenceNumber,
        visit: &mut dyn FnMut(RecordRef<'_>) -> std::result::Result<(), BoxError>,
    ) -> Result<(Self, ReplayStats)> {
        Self::open_with_observer(config, min_next_sequence, visit, Arc::new(NoopObserver))
    }

    pub fn open_with_observer(
        config: WalConfig,
        min_next_sequence: SequenceNumber,
        visit: &mut dyn FnMut(RecordRef<'_>) -> std::result::Result<(), BoxError>,
        observer: Arc<dyn WalObserver>,
    ) -> Result<(Self, ReplayStats)> {
        std::fs::create_dir_all(&config.dir).map_err(|e| Error::io(&config.dir, e))?;
        let (mut files, stats) = replay_dir(&config.dir, visit)?;

        let next_sequence = stats
            .last_sequence
            .map(SequenceNumber::next)
            .unwrap_or(SequenceNumber(1))
            .max(min_next_sequence)
            .max(files.last().map(|f| f.first_sequence).unwrap_or_default());
        let next_id = files.last().map(|f| f.id.next()).unwrap_or(WalFileId(1));
        let (file, meta) = create_file(&config.dir, next_id, next_sequence)?;
        files.push(meta);

        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            files: Mutex::new(files),
            poisoned: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            config,
            shared: Arc::clone(&shared),
            file,
            file_len: format::FILE_HEADER_LEN as u64,
            next_sequence,
            observer,
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("kiln-wal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io(&shared.dir, e))?;
        Ok((
            Self {
                tx,
                shared,
                thread: Mutex::new(Some(thread)),
            },
            stats,
        ))
    }

    /// Appends one record; resolves with its sequence number once the sync policy is met.
    pub async fn append(&self, kind: RecordKind, payload: Vec<u8>) -> Result<SequenceNumber> {
        if payload.len() > format::MAX_PAYLOAD_LEN {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max: format::MAX_PAYLOAD_LEN,
            });
        }
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Append {
                kind,
                payload,
                reply,
            })
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Closes the current file (if it holds any record) and starts a new one, so that
    /// everything appended so far can be removed by [`Self::remove_files_up_to`].
    pub async fn rotate(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Rotate(reply))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Deletes every closed file whose records all have sequence `<= sequence`.
    /// Returns the ids of the deleted files.
    pub fn remove_files_up_to(&self, sequence: SequenceNumber) -> Result<Vec<WalFileId>> {
        let mut files = self.shared.files.lock();
        let mut removed = Vec::new();
        while files.len() > 1 {
            let last_in_first = SequenceNumber(files[1].first_sequence.get().saturating_sub(1));
            if last_in_first > sequence {
                break;
            }
            let meta = files.remove(0);
            std::fs::remove_file(&meta.path).map_err(|e| Error::io(&meta.path, e))?;
            removed.push(meta.id);
        }
        if !removed.is_empty() {
            sync_dir(&self.shared.dir)?;
        }
        Ok(removed)
    }

    /// The files currently on disk, oldest first.
    pub fn file_ids(&self) -> Vec<WalFileId> {
        self.shared.files.lock().iter().map(|f| f.id).collect()
    }

    /// Syncs what is written and stops the writer thread. Appends after this fail with
    /// [`Error::Closed`].
    pub fn shutdown(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Request::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        }
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Writer {
    config: WalConfig,
    shared: Arc<Shared>,
    file: File,
    file_len: u64,
    next_sequence: SequenceNumber,
    observer: Arc<dyn WalObserver>,
    buf: Vec<u8>,
}

type Reply = (oneshot::Sender<Result<SequenceNumber>>, SequenceNumber);

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut replies: Vec<Reply> = Vec::new();
        let mut unsynced_since: Option<Instant> = None;
        loop {
            let first = match (self.config.sync, unsynced_since) {
                (SyncPolicy::Interval(d), Some(since)) => {
                    let wait = d.saturating_sub(since.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(r) => Some(r),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
            };
            let mut shutdown = None;
            let mut rotate = None;
            self.buf.clear();
            replies.clear();
            let mut next = first;
            while let Some(request) = next.take() {
                match request {
                    Request::Append {
                        kind,
                        payload,
                        reply,
                    } => {
                        if self.shared.poisoned.load(Ordering::Acquire) {
                            let _ = reply.send(Err(Error::Poisoned));
                        } else {
                            let seq = self.next_sequence;
                            self.next_sequence = seq.next();
                            format::encode_record(&mut self.buf, seq, kind, &payload);
                            replies.push((reply, seq));
                        }
                    }
                    Request::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                    Request::Rotate(reply) => {
                        rotate = Some(reply);
                        break;
                    }
                }
                if self.buf.len() >= self.config.max_group_bytes {
                    break;
                }
                next = rx.try_recv().ok();
            }

            let result = self.write_group(&mut unsynced_since, shutdown.is_some());
            match result {
                Ok(()) => {
                    for (reply, seq) in replies.drain(..) {
                        let _ = reply.send(Ok(seq));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "WAL write failed; refusing further writes");
                    self.shared.poisoned.store(true, Ordering::Release);
                    for (reply, _) in replies.drain(..) {
                        let _ = reply.send(Err(Error::Poisoned));
                    }
                }
            }
            if let Some(reply) = rotate {
                let result = if self.shared.poisoned.load(Ordering::Acquire) {
                    Err(Error::Poisoned)
                } else if self.file_len > format::FILE_HEADER_LEN as u64 {
                    self.rotate(&mut unsynced_since)
                } else {
                    Ok(())
                };
                if let Err(e) = &result {
                    tracing::error!(error = %crate::error_chain(&e), "WAL rotation failed; refusing further writes");
                    self.shared.poisoned.store(true, Ordering::Release);
                }
                let _ = reply.send(result);
            }
            if let Some(done) = shutdown {
                let _ = done.send(());
                return;
            }
        }
        if unsynced_since.is_some() {
            let _ = self.file.sync_data();
        }
    }

    fn current_path(&self) -> PathBuf {
        self.shared
            .files
            .lock()
            .last()
            .map(|f| f.path.clone())
            .unwrap_or_else(|| self.shared.dir.clone())
    }

    fn write_group(
        &mut self,
        unsynced_since: &mut Option<Instant>,
        force_sync: bool,
    ) -> Result<()> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let records = self.buf.len();
        if records > 0 {
            if let Err(e) = self.file.write_all(&self.buf) {
                return Err(Error::io(&self.current_path(), e));
            }
            self.file_len += self.buf.len() as u64;
        }
        let must_sync = match self.config.sync {
            SyncPolicy::Always => records > 0,
            SyncPolicy::Interval(d) => {
                if records > 0 && unsynced_since.is_none() {
                    *unsynced_since = Some(Instant::now());
                }
                force_sync || unsynced_since.is_some_and(|t| t.elapsed() >= d)
            }
        } || (force_sync && unsynced_since.is_some());
        if must_sync {
            let start = Instant::now();
            if let Err(e) = self.file.sync_data() {
                return Err(Error::io(&self.current_path(), e));
            }
            self.observer
                .fsync(start.elapsed(), self.buf.len(), records);
            *unsynced_since = None;
        }
        if self.file_len >= self.config.max_file_bytes {
            self.rotate(unsynced_since)?;
        }
        Ok(())
    }

    fn rotate(&mut self, unsynced_since: &mut Option<Instant>) -> Result<()> {
        if unsynced_since.take().is_some() {
            self.file
                .sync_data()
                .map_err(|e| Error::io(&self.current_path(), e))?;
        }
        let next_id = self
            .shared
            .files
            .lock()
            .last()
            .map(|f| f.id.next())
            .unwrap_or(WalFileId(1));
        let (file, meta) = create_file(&self.shared.dir, next_id, self.next_sequence)?;
        tracing::debug!(file = %meta.path.display(), first_sequence = %meta.first_sequence, "WAL rotated");
        self.shared.files.lock().push(meta);
        self.file = file;
        self.file_len = format::FILE_HEADER_LEN as u64;
        Ok(())
    }
}

fn file_path(dir: &Path, id: WalFileId) -> PathBuf {
    dir.join(format!("{:020}.wal", id.get()))
}

fn create_file(
    dir: &Path,
    id: WalFileId,
    first_sequence: SequenceNumber,
) -> Result<(File, FileMeta)> {
    let path = file_path(dir, id);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let header = format::FileHeader {
        file_id: id,
        first_sequence,
    };
    file.write_all(&header.encode())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)?;
    Ok((
        file,
        FileMeta {
            id,
            first_sequence,
            path,
        },
    ))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Lists `*.wal` files by id.
fn list_files(dir: &Path) -> Result<Vec<(WalFileId, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        if let Ok(id) = stem.parse::<u64>() {
            out.push((WalFileId(id), path));
        }
    }
    out.sort();
    Ok(out)
}

fn replay_dir(
    dir: &Path,
    visit: &mut dyn FnMut(RecordRef<'_>) -> std::result::Result<(), BoxError>,
) -> Result<(Vec<FileMeta>, ReplayStats)> {
    let listed = list_files(dir)?;
    let mut stats = ReplayStats::default();
    let mut metas = Vec::new();
    let mut expected: Option<SequenceNumber> = None;
    let count = listed.len();
    for (index, (id, path)) in listed.into_iter().enumerate() {
        let is_last = index + 1 == count;
        stats.files += 1;
        let file = OpenOptions::new()
            .read(true)
            .write(is_last)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let corrupt = |offset: u64, source: FormatError| Error::Corrupt {
            path: path.clone(),
            offset,
            source,
        };
        if len < format::FILE_HEADER_LEN as u64 {
            if is_last {
                // A file whose creation was cut short holds no records.
                tracing::warn!(file = %path.display(), len, "removing WAL file with a torn header");
                drop(file);
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                stats.truncated_bytes += len;
                continue;
            }
            return Err(corrupt(0, FormatError::ShortHeader { len: len as usize }));
        }
        // SAFETY: the data directory is locked by this process (see the server's
        // `LOCK` file), so nothing truncates or rewrites the file while it is mapped;
        // every byte read through the map is bounds-checked and checksummed.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bytes: &[u8] = &map;
        let header = format::FileHeader::decode(bytes).map_err(|e| corrupt(0, e))?;
        if header.file_id != id {
            return Err(Error::FileIdMismatch {
                path: path.clone(),
                found: header.file_id,
            });
        }
        if let Some(exp) = expected
            && header.first_sequence != exp
        {
            return Err(Error::SequenceGap {
                path: path.clone(),
                offset: 20,
                expected: exp,
                found: header.first_sequence,
            });
        }
        let mut offset = format::FILE_HEADER_LEN;
        let mut next_seq = header.first_sequence;
        let mut cut: Option<(usize, String)> = None;
        while offset < bytes.len() {
            match format::decode_record(&bytes[offset..]) {
                Ok((record, used)) => {
                    if record.sequence != next_seq {
                        if is_last {
                            cut = Some((
                                offset,
                                format!(
                                    "sequence {} where {next_seq} was expected",
                                    record.sequence
                                ),
                            ));
                            break;
                        }
                        return Err(Error::SequenceGap {
                            path: path.clone(),
                            offset: offset as u64,
                            expected: next_seq,
                            found: record.sequence,
                        });
                    }
                    match visit(record) {
                        Ok(()) => {}
                        Err(skip) if skip.is::<SkipRecord>() => {
                            tracing::error!(
                                file = %path.display(),
                                offset,
                                sequence = %record.sequence,
                                reason = %crate::error_chain(&*skip),
                                "WAL record skipped on replay"
                            );
                            stats.skipped += 1;
                        }
                        Err(source) => {
                            return Err(Error::Replay {
                                path: path.clone(),
                                offset: offset as u64,
                                source,
                            });
                        }
                    }
                    stats.records += 1;
                    stats.last_sequence = Some(record.sequence);
                    next_seq = record.sequence.next();
                    offset += used;
                }
                Err(e) if is_last => {
                    cut = Some((offset, e.to_string()));
                    break;
                }
                Err(e) => return Err(corrupt(offset as u64, e)),
            }
        }
        drop(map);
        if let Some((at, reason)) = cut {
            let dropped = len - at as u64;
            tracing::warn!(
                file = %path.display(),
                offset = at,
                dropped_bytes = dropped,
                %reason,
                "truncating torn tail of the newest WAL file"
            );
            file.set_len(at as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io(&path, e))?;
            stats.truncated_bytes += dropped;
        }
        expected = Some(next_seq);
        metas.push(FileMeta {
            id,
            first_sequence: header.first_sequence,
            path,
        });
    }
    Ok((metas, stats))
}

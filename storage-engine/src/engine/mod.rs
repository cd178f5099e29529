//! The storage engine: WAL + write buffer + persistence + catalog, behind one handle.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tracing::Instrument;

use crate::buffer::{BufferPartition, Chunk, WriteBuffer, time_range};
use crate::catalog::tombstones::DeleteRecord;
use crate::catalog::{
    self, Catalog, CatalogEvent, CatalogState, SegmentMeta, SourcePosition, TableDef,
};
use crate::dedup::merge_last_write_wins;
use crate::ids::{SegmentId, SequenceNumber, TableId};
use crate::persist::{encode_segment, sort_key};
use crate::series::SeriesTracker;
use crate::wal::{self, RecordKind, SyncPolicy, Wal, WalConfig, WalObserver};
use crate::write::{SourceRange, WriteBatch};

mod compact;
mod deletes;
mod follow;
mod last_caches;
mod lifecycle;
#[cfg(test)]
mod tests;
mod unpersisted;

pub use compact::{CompactionOutcome, ReadLease};
use compact::{ReadGeneration, segment_path, sweep_unreferenced};
use last_caches::LastCaches;
pub use lifecycle::RetentionOutcome;
pub use unpersisted::Unpersisted;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Wal(#[from] wal::Error),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(
        "write buffer is full ({bytes} bytes buffered, limit {limit}); persistence is behind, retry later"
    )]
    BufferFull { bytes: usize, limit: usize },
    #[error("encoding a WAL record failed")]
    Encode(#[source] arrow::error::ArrowError),
    #[error("encoding a segment failed")]
    Segment(#[from] crate::persist::Error),
    #[error("the write does not fit the catalog")]
    InvalidWrite(#[from] crate::write::InvalidWrite),
    #[error("object store, at {path}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("writing segment {path}")]
    WriteSegment {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("merging segments into {path}")]
    Merge {
        path: String,
        #[source]
        source: crate::sorted_merge::Error,
    },
    #[error("the storage engine is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("a storage task stopped before it finished")]
    Task(#[from] tokio::task::JoinError),
    #[error("reading segment {path}")]
    ReadSegment {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("warming a last-value cache failed")]
    LastCache(#[source] arrow::error::ArrowError),
    #[error("a partition of {0:?} is not allowed: widths are positive and at most 7 days")]
    PartitionWidth(Duration),
    #[error("merging buffered rows failed")]
    ReadBuffer(#[source] arrow::error::ArrowError),
    #[error("applying a delete to rows failed")]
    ApplyDelete(#[source] arrow::error::ArrowError),
    /// A delete that cannot be made as asked (a field in its predicate).
    #[error("{0}")]
    InvalidDelete(String),
    #[error(
        "this server only reads (--role querier): send writes, deletes and compactions to the \
         server that writes the catalog"
    )]
    ReadOnly,
    #[error(
        "the WAL under {0} holds writes not yet persisted, and a server that only reads (--role \
         querier) takes none: start it on a data directory of its own"
    )]
    ReadOnlyWithWal(PathBuf),
    #[error(
        "this server takes no writes (--role compactor): send writes to the servers that take \
         them (--role ingester, or all)"
    )]
    TakesNoWrites,
    #[error(
        "this catalog is written by the servers of a cluster ({0}); a server of --role all \
         would take their files for its own: start it as --role ingester, querier or compactor"
    )]
    ClusterCatalog(String),
    #[error(
        "the catalog here reached sequence {reached}, not the writer's {sequence}: the store \
         did not show this reader the writer's latest catalog entries"
    )]
    BehindCatalog {
        sequence: crate::ids::CatalogSequence,
        reached: crate::ids::CatalogSequence,
    },
}

impl Error {
    /// Whether a client should retry the same request later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::BufferFull { .. } | Self::ShuttingDown)
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub wal_dir: PathBuf,
    pub wal_sync: SyncPolicy,
    pub wal_max_file_bytes: u64,
    /// Width of a table's time partitions (new tables).
    pub partition_duration: Duration,
    /// Persist when the buffer holds this many bytes.
    pub persist_buffer_bytes: usize,
    /// Persist when the oldest unpersisted write is this old.
    pub persist_interval: Duration,
    /// Refuse writes (retry later) while the buffer holds more than this.
    pub max_buffer_bytes: usize,
    /// Compaction leaves alone a partition whose segments hold more bytes than this in all
    /// (the output is one file of about that size).
    pub compaction_max_bytes: u64,
    /// How many databases, tables and columns writes may create.
    pub schema_limits: crate::catalog::SchemaLimits,
    /// On start-up, skip a WAL record that cannot be applied (logged with its file and
    /// offset, its bytes kept under `skipped/` in the WAL directory) instead of stopping
    /// with an error naming it.
    pub wal_replay_skip_invalid: bool,
    /// Most series (keys) a last-value cache holds; one that would hold more stops
    /// answering (queries read the table instead).
    pub last_cache_max_series: usize,
    /// Every table without a defined last-value cache gets one keyed by all its tags.
    pub default_last_caches: bool,
    /// How long a segment file replaced by compaction, or dropped by retention, stays in
    /// the store after this process's last reader of it is done: servers that only read
    /// (queriers) may still be reading it until they follow the catalog.
    pub retired_file_grace: Duration,
    /// Only read: follow the catalog and segments other servers write ([`Engine::run_follower`]),
    /// take no writes, take the default last-value caches from the writer's snapshots,
    /// and leave every file in the store alone.
    pub read_only: bool,
    /// This server's name when several write one catalog (a cluster's ingesters and its
    /// compactor; see `docs/cluster.md`). Its segment files carry it, its start-up sweep
    /// removes only files that carry it, and its persisted WAL sequence, series inventory
    /// and last-value snapshots are its own (under `writers/{name}/`). `None`: the
    /// catalog's only writer.
    pub writer: Option<String>,
    /// Take writes (a cluster's compactor commits compactions but takes none).
    pub takes_writes: bool,
}

impl EngineConfig {
    pub fn new(wal_dir: impl Into<PathBuf>) -> Self {
        Self {
            wal_dir: wal_dir.into(),
            wal_sync: SyncPolicy::Always,
            wal_max_file_bytes: 64 * 1024 * 1024,
            partition_duration: Duration::from_secs(3600),
            persist_buffer_bytes: 256 * 1024 * 1024,
            persist_interval: Duration::from_secs(300),
            max_buffer_bytes: 1024 * 1024 * 1024,
            compaction_max_bytes: 256 * 1024 * 1024,
            schema_limits: crate::catalog::SchemaLimits::default(),
            wal_replay_skip_invalid: false,
            last_cache_max_series: 1_000_000,
            default_last_caches: true,
            retired_file_grace: Duration::ZERO,
            read_only: false,
            writer: None,
            takes_writes: true,
        }
    }
}

/// Counters the server exports as metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub rows_written: AtomicU64,
    pub segments_persisted: AtomicU64,
    pub bytes_persisted: AtomicU64,
    pub persist_failures: AtomicU64,
    pub writes_refused: AtomicU64,
    /// Partitions merged by compaction, the segments they had, and failed passes.
    pub compactions: AtomicU64,
    pub segments_compacted: AtomicU64,
    pub compaction_failures: AtomicU64,
    /// Segments removed because retention expired every row in them.
    pub segments_expired: AtomicU64,
}

/// What a query needs of one table: its definition, persisted segments and buffer.
#[derive(Debug, Clone)]
pub struct TableData {
    pub def: TableDef,
    /// The segments and buffer partitions whose time range overlaps the one asked for.
    pub segments: Vec<SegmentMeta>,
    pub buffer: Vec<BufferPartition>,
    /// How many the table has in all.
    pub segments_total: usize,
    pub buffer_partitions_total: usize,
    /// Keeps `segments`' files from deletion by compaction while it is held.
    pub lease: ReadLease,
    /// The table's deletes not yet made physical (of the same catalog state as
    /// `segments`): a segment is read without the rows of those that apply to it.
    pub tombstones: Vec<Arc<crate::catalog::tombstones::Tombstone>>,
    /// The sequence of the catalog state `segments` come from (read after the buffer).
    pub catalog_sequence: crate::ids::CatalogSequence,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistOutcome {
    pub through: SequenceNumber,
    pub segments: usize,
    pub rows: u64,
    pub bytes: u64,
    pub wal_files_removed: usize,
}

pub struct Engine {
    config: EngineConfig,
    catalog: Arc<Catalog>,
    store: Arc<dyn ObjectStore>,
    /// Where this writer keeps its own objects (series inventory, last-value snapshots):
    /// `store` itself, or its `writers/{name}/` (see [`EngineConfig::writer`]).
    own: Arc<dyn ObjectStore>,
    wal: Arc<Wal>,
    buffer: Arc<WriteBuffer>,
    persist_lock: tokio::sync::Mutex<()>,
    persist_wanted: tokio::sync::Notify,
    compact_lock: tokio::sync::Mutex<()>,
    /// The current generation of readers, and the files theirs have left to delete.
    generation: parking_lot::Mutex<Arc<ReadGeneration>>,
    deletable: compact::Deletable,
    stats: EngineStats,
    last_caches: Arc<LastCaches>,
    sources: Arc<SourcePositions>,
    series: Arc<SeriesTracker>,
}

/// Per partition of each outside source, the last position whose data is durable in the
/// WAL: from the catalog at start, then from every record replayed or appended.
#[derive(Debug)]
struct SourcePositions {
    last: parking_lot::Mutex<std::collections::BTreeMap<(String, i32), i64>>,
}

impl SourcePositions {
    /// The positions the catalog recorded at the last persistence.
    fn from_catalog(positions: &[SourcePosition]) -> Self {
        Self {
            last: parking_lot::Mutex::new(
                positions
                    .iter()
                    .map(|p| ((p.source.clone(), p.partition), p.last))
                    .collect(),
            ),
        }
    }

    fn record(&self, ranges: &[SourceRange]) {
        if ranges.is_empty() {
            return;
        }
        let mut last = self.last.lock();
        for r in ranges {
            let at = last
                .entry((r.source.clone(), r.partition))
                .or_insert(r.last);
            *at = (*at).max(r.last);
        }
    }

    fn get(&self, source: &str, partition: i32) -> Option<i64> {
        self.last
            .lock()
            .get(&(source.to_string(), partition))
            .copied()
    }

    fn all(&self) -> Vec<SourcePosition> {
        self.last
            .lock()
            .iter()
            .map(|((source, partition), last)| SourcePosition {
                source: source.clone(),
                partition: *partition,
                last: *last,
            })
            .collect()
    }
}

/// Where a writer keeps its own objects (see [`EngineConfig::writer`]).
fn own_store(store: &Arc<dyn ObjectStore>, writer: Option<&str>) -> Arc<dyn ObjectStore> {
    match writer {
        None => Arc::clone(store),
        Some(name) => Arc::new(object_store::prefix::PrefixStore::new(
            Arc::clone(store),
            format!("{WRITERS_PREFIX}/{name}"),
        )),
    }
}

/// Where each writer of several keeps its own objects.
pub const WRITERS_PREFIX: &str = "writers";

/// Loads the series inventory's snapshot, if there is one. It is a projection: one that
/// cannot be read is logged, and the inventory starts from the WAL.
async fn load_series(store: &Arc<dyn ObjectStore>, series: &SeriesTracker) {
    let path = Path::from(crate::series::SNAPSHOT_PATH);
    let bytes = match store.get(&path).await {
        Ok(got) => got.bytes().await,
        Err(object_store::Error::NotFound { .. }) => return,
        Err(e) => Err(e),
    };
    match bytes
        .map_err(|e| e.to_string())
        .and_then(|b| series.load(&b))
    {
        Ok(n) => tracing::info!(series = n, "series inventory loaded"),
        Err(e) => {
            tracing::warn!(%path, error = %e, "the series inventory cannot be read; it restarts from the WAL")
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads the catalog, replays the WAL into the buffer and opens the WAL for appends.
    pub async fn open(
        config: EngineConfig,
        store: Arc<dyn ObjectStore>,
        wal_observer: Option<Arc<dyn WalObserver>>,
    ) -> Result<Arc<Self>> {
        let partition_nanos = i64::try_from(config.partition_duration.as_nanos())
            .ok()
            .filter(|n| (1..=crate::time::MAX_PARTITION_NANOS).contains(n))
            .ok_or(Error::PartitionWidth(config.partition_duration))?;
        let mut catalog = Catalog::load(Arc::clone(&store), partition_nanos)
            .await?
            .with_limits(config.schema_limits);
        if config.read_only {
            catalog = catalog.read_only();
        }
        let catalog = Arc::new(catalog);
        let state = catalog.snapshot();
        // Before anything is replayed or recorded: a single node would sweep the cluster's
        // files as its own leftovers.
        if config.writer.is_none() && !config.read_only && !state.writers_persisted.is_empty() {
            let names: Vec<&str> = state.writers_persisted.keys().map(String::as_str).collect();
            return Err(Error::ClusterCatalog(names.join(", ")));
        }
        let persisted = state.persisted_by(config.writer.as_deref());
        let own = own_store(&store, config.writer.as_deref());
        let buffer = Arc::new(WriteBuffer::new(persisted));
        let sources = Arc::new(SourcePositions::from_catalog(&state.source_positions));
        let series = Arc::new(SeriesTracker::default());
        load_series(&own, &series).await;
        // A reader's caches are loaded once it is open (`load_snapshot_caches`).
        let loaded = if config.read_only {
            last_caches::empty(config.default_last_caches, config.last_cache_max_series)
        } else {
            last_caches::load(
                &[last_caches::SnapshotSource {
                    store: Arc::clone(&own),
                    persisted,
                }],
                &state,
                config.default_last_caches,
                config.last_cache_max_series,
            )
            .await
        };

        let wal_config = WalConfig {
            dir: config.wal_dir.clone(),
            sync: config.wal_sync,
            max_file_bytes: config.wal_max_file_bytes,
            max_group_bytes: 16 * 1024 * 1024,
        };
        let replay_buffer = Arc::clone(&buffer);
        let replay_sources = Arc::clone(&sources);
        let replay_series = Arc::clone(&series);
        let replay_caches = Arc::clone(loaded.caches());
        let observer = wal_observer.unwrap_or_else(|| Arc::new(NoObserver));
        let skip_invalid = config.wal_replay_skip_invalid;
        let skipped_dir = config.wal_dir.join("skipped");
        let mut replayed_deletes: Vec<(SequenceNumber, DeleteRecord)> = Vec::new();
        let (wal, stats, replayed_deletes) = tokio::task::spawn_blocking(move || {
            Wal::open_with_observer(
                wal_config,
                persisted.next(),
                &mut |record| {
                    if record.sequence <= persisted {
                        return Ok(());
                    }
                    if record.kind == RecordKind::Delete {
                        let delete = DeleteRecord::decode(record.payload)?;
                        if state.is_dropped_table(delete.table) {
                            replay_buffer.skip(record.sequence);
                        } else if state.table_by_id(delete.table).is_none() {
                            return Err(
                                format!("a delete of unknown table {}", delete.table).into()
                            );
                        } else {
                            replay_buffer.apply_delete(
                                record.sequence,
                                delete.table,
                                &delete.predicate,
                            );
                            replayed_deletes.push((record.sequence, delete));
                        }
                        return Ok(());
                    }
                    let checked = WriteBatch::decode(record.payload)
                        .map_err(wal::BoxError::from)
                        .map(|batch| batch.without_dropped(&state))
                        .and_then(|batch| match batch.check(&state) {
                            Ok(()) => Ok(batch),
                            Err(e) => Err(e.into()),
                        });
                    let batch = match checked {
                        Ok(batch) => batch,
                        Err(reason) if skip_invalid => {
                            keep_skipped(&skipped_dir, record.sequence, record.payload);
                            replay_buffer.skip(record.sequence);
                            return Err(Box::new(wal::SkipRecord(reason)));
                        }
                        Err(reason) => return Err(reason),
                    };
                    replay_caches.offer_replayed(&batch);
                    replay_buffer.apply(record.sequence, &batch, &state);
                    replay_sources.record(&batch.sources);
                    for tw in &batch.tables {
                        replay_series.offer(&state, tw.table, &tw.batch, false);
                    }
                    Ok(())
                },
                observer,
            )
            .map(|(wal, stats)| (wal, stats, replayed_deletes))
        })
        .await
        .map_err(Error::Task)??;
        tracing::info!(
            files = stats.files,
            records = stats.records,
            skipped = stats.skipped,
            truncated_bytes = stats.truncated_bytes,
            persisted = %persisted,
            buffered_bytes = buffer.bytes(),
            "WAL replayed"
        );
        if config.read_only && buffer.applied_through() > persisted {
            return Err(Error::ReadOnlyWithWal(config.wal_dir.clone()));
        }
        let removed = wal.remove_files_up_to(persisted)?;
        if !removed.is_empty() {
            tracing::info!(files = removed.len(), "removed fully persisted WAL files");
        }
        // A delete logged but not recorded in the catalog (a crash in between): recorded
        // now, before any persistence, so it covers the segments it was logged after.
        // Caches loaded from snapshots were offered the rows replayed before a delete:
        // those tables' caches are warmed again.
        let mut deleted_tables: Vec<TableId> =
            replayed_deletes.iter().map(|(_, d)| d.table).collect();
        deleted_tables.sort_unstable();
        deleted_tables.dedup();
        for (sequence, delete) in replayed_deletes {
            let state = catalog.snapshot();
            if state.tombstones.values().any(|t| t.through == sequence) {
                continue;
            }
            catalog
                .record_delete(delete.table, delete.predicate, sequence, crate::now_nanos())
                .await?;
            tracing::info!(%sequence, table = %delete.table, "recorded a delete the catalog lacked");
        }
        // Files others write are theirs to sweep: a reader deletes nothing.
        if !config.read_only {
            sweep_unreferenced(&store, &catalog.snapshot(), config.writer.as_deref()).await?;
        }
        let deletable = Arc::default();
        let engine = Arc::new(Self {
            config,
            catalog,
            store,
            own,
            wal: Arc::new(wal),
            buffer,
            persist_lock: tokio::sync::Mutex::new(()),
            persist_wanted: tokio::sync::Notify::new(),
            compact_lock: tokio::sync::Mutex::new(()),
            generation: parking_lot::Mutex::new(Arc::new(ReadGeneration::new(Arc::clone(
                &deletable,
            )))),
            deletable,
            stats: EngineStats::default(),
            last_caches: Arc::clone(loaded.caches()),
            sources,
            series,
        });
        if engine.config.read_only {
            engine.load_snapshot_caches().await;
        } else {
            engine.start_last_caches(loaded);
        }
        for table in deleted_tables {
            engine.rebuild_last_cache(table);
        }
        Ok(engine)
    }

    /// Every row of one segment. `time` comes labelled UTC; merging relabels it for free.
    async fn read_segment(&self, segment: &SegmentMeta) -> Result<Vec<RecordBatch>> {
        let path = Path::from(segment.path.as_str());
        let store_error = |source| Error::Store {
            path: segment.path.clone(),
            source,
        };
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(store_error)?
            .bytes()
            .await
            .map_err(store_error)?;
        let read_error = |source| Error::ReadSegment {
            path: segment.path.clone(),
            source,
        };
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(read_error)?
            .map(|batch| batch.map_err(|e| read_error(e.into())))
            .collect()
    }

    /// Every series seen, and per-table write quality.
    pub fn series(&self) -> &SeriesTracker {
        &self.series
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn buffer_bytes(&self) -> usize {
        self.buffer.bytes()
    }

    /// Whether writes are being refused for lack of buffer space. When it is, persistence
    /// is asked to run.
    pub fn buffer_full(&self) -> bool {
        let full = self.buffer.bytes() > self.config.max_buffer_bytes;
        if full {
            self.persist_wanted.notify_one();
        }
        full
    }

    /// The oldest and newest times of `table`'s rows not yet persisted.
    pub fn buffered_time_range(&self, table: TableId) -> Option<(i64, i64)> {
        self.buffer.time_range(table)
    }

    /// The oldest and newest times of `table`'s rows, persisted or not (deleted rows not
    /// yet compacted away may widen it).
    pub fn time_range(&self, table: TableId) -> Option<(i64, i64)> {
        self.catalog
            .snapshot()
            .segments_span(table)
            .into_iter()
            .chain(self.buffered_time_range(table))
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Makes `batch` durable in the WAL, then visible in the buffer. Runs to completion
    /// even if the caller stops waiting, so an acknowledged sequence is always applied.
    pub async fn write(&self, batch: WriteBatch) -> Result<SequenceNumber> {
        self.refuse_if_read_only()?;
        if !self.config.takes_writes {
            return Err(Error::TakesNoWrites);
        }
        if self.buffer_full() {
            self.stats.writes_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::BufferFull {
                bytes: self.buffer.bytes(),
                limit: self.config.max_buffer_bytes,
            });
        }
        // Everything applying relies on is checked before the write is logged: a record
        // in the WAL can always be applied, now and on replay.
        batch.check(&self.catalog.snapshot())?;
        let payload = batch.encode().map_err(Error::Encode)?;
        let rows = batch.rows() as u64;
        // Created here, where the caller's span is current, not in the task.
        let append = tracing::debug_span!("WAL append", rows, bytes = payload.len());
        let wal = Arc::clone(&self.wal);
        let buffer = Arc::clone(&self.buffer);
        let catalog = Arc::clone(&self.catalog);
        let last_caches = Arc::clone(&self.last_caches);
        let sources = Arc::clone(&self.sources);
        let series = Arc::clone(&self.series);
        let task = tokio::spawn(async move {
            let seq = wal
                .append(RecordKind::WriteBatch, payload)
                .instrument(append)
                .await?;
            let state = catalog.snapshot();
            // The projections first: a persistence that finds this write in the buffer
            // then stores projections that have it. They are conveniences rebuilt from
            // the log; a bug in one must not leave a logged write unapplied.
            let projections = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // A delete logged after this write and applied before it: the caches
                // must not take the rows it deletes (the buffer drops them as it applies).
                let deletes = buffer.deletes_after(seq);
                match deletes.is_empty() {
                    true => last_caches.offer(&batch, &state),
                    false => last_caches.offer(&deletes::without(&batch, &deletes), &state),
                }
                for tw in &batch.tables {
                    series.offer(&state, tw.table, &tw.batch, true);
                }
            }));
            if projections.is_err() {
                tracing::error!(sequence = %seq, "updating the last-value caches or the series inventory panicked; the write is applied");
            }
            buffer.apply(seq, &batch, &state);
            sources.record(&batch.sources);
            Ok::<_, Error>(seq)
        });
        let seq = task.await.map_err(Error::Task)??;
        self.stats.rows_written.fetch_add(rows, Ordering::Relaxed);
        if self.buffer.bytes() >= self.config.persist_buffer_bytes {
            self.persist_wanted.notify_one();
        }
        Ok(seq)
    }

    /// The last position of `partition` of `source` whose data is durable (in the WAL or
    /// in segments), if any write recorded one.
    pub fn source_position(&self, source: &str, partition: i32) -> Option<i64> {
        self.sources.get(source, partition)
    }

    /// Every source partition's last durable position, sorted by source and partition.
    pub fn source_positions(&self) -> Vec<SourcePosition> {
        self.sources.all()
    }

    /// A consistent view of one table for a query. Buffer chunks that can be merged are
    /// merged here (and the merge kept) so later queries do less work.
    ///
    /// Only data whose time range overlaps `min_time..=max_time` is returned.
    pub fn table_data(&self, table: TableId, min_time: i64, max_time: i64) -> Option<TableData> {
        let overlaps = |lo: i64, hi: i64| lo <= max_time && hi >= min_time;
        // The lease before the catalog snapshot: the files it names outlive the reader.
        let lease = self.lease();
        // Buffer first, then catalog: a persistence that completes in between leaves the
        // rows in both (deduplicated by the reader), never in neither.
        let mut buffer = self.buffer.partitions(table);
        let buffer_partitions_total = buffer.len();
        buffer.retain(|p| overlaps(p.min_time(), p.max_time()));
        let state = self.catalog.snapshot();
        let def = state.table_by_id(table)?.clone();
        let watermark = self.buffer.applied_through();
        let schema = def.schema();
        let key = sort_key(&def);
        for part in &mut buffer {
            let mergeable: Vec<&Chunk> = part
                .chunks
                .iter()
                .filter(|c| c.max_sequence <= watermark)
                .collect();
            if mergeable.len() < 2 {
                continue;
            }
            let batches: Vec<_> = mergeable.iter().map(|c| c.batch.clone()).collect();
            let ids: Vec<u64> = mergeable.iter().map(|c| c.id).collect();
            let max_seq = mergeable
                .iter()
                .map(|c| c.max_sequence)
                .max()
                .unwrap_or_default();
            match merge_last_write_wins(&batches, &schema, &key) {
                Ok(merged) => {
                    let merged = Chunk::new(max_seq, merged);
                    self.buffer
                        .replace_with_merged(table, part.partition, &ids, merged.clone());
                    part.chunks.retain(|c| c.max_sequence > watermark);
                    part.chunks.insert(0, merged);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "merging buffer chunks failed; reading them unmerged")
                }
            }
        }
        let all_segments = state.segments(table);
        Some(TableData {
            segments: all_segments
                .iter()
                .filter(|s| overlaps(s.min_time, s.max_time))
                .cloned()
                .collect(),
            segments_total: all_segments.len(),
            buffer_partitions_total,
            tombstones: state.tombstones_of(table),
            catalog_sequence: state.sequence,
            def,
            buffer,
            lease,
        })
    }

    /// Runs `persist` whenever the buffer is big or old enough, until `shutdown` resolves.
    pub async fn run_persister(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.persist_wanted.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let old = self.buffer.oldest_unpersisted().is_some_and(|t| t.elapsed() >= self.config.persist_interval);
                    if !old && self.buffer.bytes() < self.config.persist_buffer_bytes {
                        continue;
                    }
                }
            }
            if let Err(e) = self.persist().await {
                self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %crate::error_chain(&e), "persistence failed; will retry");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Persists everything in the buffer up to its watermark: writes the segments, records
    /// them in the catalog, drops them from the buffer and deletes WAL files they cover.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn persist(&self) -> Result<PersistOutcome> {
        let _guard = self.persist_lock.lock().await;
        let before = self.persisted_sequence(&self.catalog.snapshot());
        let (through, parts) = self.buffer.begin_persist();
        let result = self.persist_parts(through, parts).await;
        self.buffer
            .end_persist(result.as_ref().ok().map(|o| o.through));
        let mut outcome = result?;
        // Also when no segment was written: the WAL may hold only rows of deleted tables,
        // expired rows, or positions of outside sources.
        if outcome.through > before {
            self.wal.rotate().await?;
            outcome.wal_files_removed = self.wal.remove_files_up_to(outcome.through)?.len();
            tracing::info!(
                through = %outcome.through,
                segments = outcome.segments,
                rows = outcome.rows,
                bytes = outcome.bytes,
                wal_files_removed = outcome.wal_files_removed,
                "persisted buffer"
            );
        }
        Ok(outcome)
    }

    async fn persist_parts(
        &self,
        through: SequenceNumber,
        parts: Vec<(TableId, BufferPartition)>,
    ) -> Result<PersistOutcome> {
        let state = self.catalog.snapshot();
        if through <= self.persisted_sequence(&state) {
            return Ok(PersistOutcome {
                through,
                ..Default::default()
            });
        }
        // Rows of deleted tables are not persisted, nor partitions whose every row has
        // expired: the WAL records holding them go with this persistence.
        let now = crate::now_nanos();
        let parts: Vec<(TableId, BufferPartition)> = parts
            .into_iter()
            .filter(|(table, part)| {
                state.table_by_id(*table).is_some()
                    && state
                        .retention_cutoff(*table, now)
                        .is_none_or(|cutoff| part.max_time() >= cutoff)
            })
            .collect();
        // Partitions are encoded side by side (one per core): encoding is CPU-bound and
        // the segments are independent. `buffered` keeps their order for the catalog.
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        // Each attempt writes files of its own: one that failed may still have been
        // recorded by the catalog (a put that landed but reported an error), and its files
        // must not be overwritten by different contents.
        let attempt = crate::now_nanos();
        let jobs = parts.into_iter().enumerate().map(|(i, (table, part))| {
            let path = self.own_name(format!("{attempt:020}-{i}"));
            self.persist_partition(&state, path, table, part, through)
        });
        let segments: Vec<SegmentMeta> = futures::stream::iter(jobs)
            .buffered(parallelism)
            .try_collect()
            .await?;
        let mut outcome = PersistOutcome {
            through,
            ..Default::default()
        };
        for meta in &segments {
            outcome.segments += 1;
            outcome.rows += meta.rows;
            outcome.bytes += meta.bytes;
        }
        // Positions may run past `through`: the WAL files holding those records are kept.
        let positions = self.sources.all();
        // The series inventory holds every write applied so far (those through `through`
        // included): stored before the WAL files that also hold them may go.
        let path = Path::from(crate::series::SNAPSHOT_PATH);
        self.own
            .put(&path, PutPayload::from(self.series.encode()))
            .await
            .map_err(|source| Error::Store {
                path: path.to_string(),
                source,
            })?;
        self.last_caches
            .snapshot(&self.own, &self.catalog.snapshot(), through)
            .await?;
        // Segment ids are handed out by the state the commit follows.
        let writer = self.config.writer.clone();
        self.catalog
            .commit_with(move |state| {
                let mut events: Vec<CatalogEvent> = (state.next_segment_id..)
                    .zip(&segments)
                    .map(|(id, meta)| {
                        CatalogEvent::SegmentPersisted(SegmentMeta {
                            id: SegmentId(id),
                            ..meta.clone()
                        })
                    })
                    .collect();
                events.push(CatalogEvent::WalPersisted {
                    sequence: through,
                    writer: writer.clone(),
                });
                if !positions.is_empty() && positions != state.source_positions {
                    events.push(CatalogEvent::SourcePositions {
                        positions: positions.clone(),
                    });
                }
                Ok(events)
            })
            .await?;
        self.stats
            .segments_persisted
            .fetch_add(outcome.segments as u64, Ordering::Relaxed);
        self.stats
            .bytes_persisted
            .fetch_add(outcome.bytes, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Merges and encodes one buffer partition and writes it as a segment named `name`
    /// (its id is given when the catalog records it).
    async fn persist_partition(
        &self,
        state: &CatalogState,
        name: String,
        table: TableId,
        part: BufferPartition,
        through: SequenceNumber,
    ) -> Result<SegmentMeta> {
        let def = state.table_by_id(table).ok_or_else(|| {
            Error::Internal(format!("buffered table {table} missing from catalog"))
        })?;
        let batches: Vec<_> = part.chunks.iter().map(|c| c.batch.clone()).collect();
        let max_sequence = part
            .chunks
            .iter()
            .map(|c| c.max_sequence)
            .max()
            .unwrap_or(through);
        let (merged, bytes) = encode(def, batches).await?;
        let path = segment_path(def, part.partition, &name);
        let written = self.put_encoded(&path, &merged, bytes).await?;
        Ok(written.describe(def, part.partition, path, max_sequence))
    }

    /// Writes `bytes`, the Parquet encoding of `merged`, at `path`.
    async fn put_encoded(
        &self,
        path: &str,
        merged: &RecordBatch,
        bytes: Vec<u8>,
    ) -> Result<Written> {
        let size = bytes.len() as u64;
        self.store
            .put(&Path::from(path), PutPayload::from(bytes))
            .await
            .map_err(|source| Error::Store {
                path: path.to_owned(),
                source,
            })?;
        let (min_time, max_time) = time_range(merged);
        Ok(Written {
            rows: merged.num_rows() as u64,
            min_time,
            max_time,
            bytes: size,
        })
    }

    /// Persists what is buffered and closes the WAL. Writes after this fail.
    pub async fn shutdown(&self) -> Result<()> {
        let result = self.persist().await.map(|_| ());
        let wal = Arc::clone(&self.wal);
        tokio::task::spawn_blocking(move || wal.shutdown())
            .await
            .map_err(Error::Task)?;
        result
    }

    /// The last sequence of this engine's WAL in persisted segments, in `state`.
    fn persisted_sequence(&self, state: &CatalogState) -> SequenceNumber {
        state.persisted_by(self.config.writer.as_deref())
    }

    /// `name` of a file this engine writes, with its writer's name if it has one: its
    /// start-up sweep then removes only files that carry it ([`sweep_unreferenced`]).
    fn own_name(&self, name: String) -> String {
        match &self.config.writer {
            None => name,
            Some(writer) => format!("{name}.{writer}"),
        }
    }

    pub fn catalog_state(&self) -> Arc<CatalogState> {
        self.catalog.snapshot()
    }
}

/// A segment file as written: what the catalog records of its contents.
#[derive(Debug)]
struct Written {
    rows: u64,
    min_time: i64,
    max_time: i64,
    bytes: u64,
}

impl Written {
    /// The catalog's entry for this file as a segment of `partition` of `def`; its id is
    /// handed out when the catalog records it.
    fn describe(
        self,
        def: &TableDef,
        partition: i64,
        path: String,
        max_sequence: SequenceNumber,
    ) -> SegmentMeta {
        SegmentMeta {
            id: SegmentId(0),
            table: def.id,
            partition,
            path,
            min_time: self.min_time,
            max_time: self.max_time,
            rows: self.rows,
            bytes: self.bytes,
            max_sequence,
        }
    }
}

/// Merges `batches` (oldest write first) and encodes them as a segment, on a blocking
/// thread: the merged rows and the Parquet bytes.
async fn encode(def: &TableDef, batches: Vec<RecordBatch>) -> Result<(RecordBatch, Vec<u8>)> {
    let def = def.clone();
    tokio::task::spawn_blocking(move || encode_segment(&def, &batches))
        .await
        .map_err(Error::Task)?
        .map_err(Error::Segment)
}

/// Offers `batches` to a cache's warm-up on a blocking thread.
struct NoObserver;
impl WalObserver for NoObserver {}

/// Keeps the bytes of a WAL record skipped on replay as `<dir>/<sequence>.record`, for
/// whoever investigates; failing to is logged, not fatal (the operator chose to skip).
fn keep_skipped(dir: &std::path::Path, sequence: SequenceNumber, payload: &[u8]) {
    let path = dir.join(format!("{}.record", sequence.0));
    let kept = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, payload));
    match kept {
        Ok(()) => tracing::warn!(file = %path.display(), "kept the skipped WAL record's bytes"),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot keep a skipped WAL record's bytes")
        }
    }
}

//! Compaction: a time partition persisted in several segments is merged into one.
//!
//! Persistence writes whatever the buffer holds, so a partition that was written across
//! two persistences (an ingest that crossed the buffer limit, late data) ends up in
//! several segments, which every query must then merge row by row where their times
//! overlap. Once the partition is no longer being written, compaction reads its segments,
//! merges them last write wins (the same rule as the buffer and the reader) into one
//! sorted segment, and records a [`CatalogEvent::SegmentsCompacted`] that swaps them in
//! one catalog transaction.
//!
//! The replaced files are deleted only when no reader can still be using them: every
//! [`TableData`](super::TableData) holds a [`ReadLease`] on the generation of the catalog
//! it was taken from, and a generation's retired files go once its last lease (and every
//! older generation's) is gone. Files that a crash left behind, referenced by no catalog
//! entry, are removed when the engine opens.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use super::{Engine, Error, Result, Written, encode};
use crate::catalog::tombstones::{DeletePredicate, for_segment, remove_all};
use crate::catalog::{CatalogEvent, CatalogState, SegmentMeta, TableDef};
use crate::ids::{SegmentId, TableId};
use crate::sorted_merge;

mod stream;

/// Where segments live in the object store.
pub(super) const SEGMENTS_PREFIX: &str = "segments";

/// What one compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompactionOutcome {
    /// Partitions merged into one segment each.
    pub partitions: usize,
    /// Segments replaced.
    pub segments_replaced: usize,
    /// Rows in the merged segments (duplicates resolved).
    pub rows: u64,
    /// Bytes of the replaced segments, and of the segments that replaced them.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Partitions of several segments left as they are because they are larger than the
    /// configured limit.
    pub skipped_too_large: usize,
}

/// The readers of one generation of the catalog's segment lists.
#[derive(Debug)]
pub(super) struct ReadGeneration {
    /// Files replaced while this generation was current: some reader of it may read them.
    retired: parking_lot::Mutex<Vec<String>>,
    /// The generation after this one, kept alive while this one is: a reader of this
    /// generation may have seen the catalog before the next compaction committed too.
    next: parking_lot::Mutex<Option<Arc<ReadGeneration>>>,
    /// Where retired files go once no reader is left.
    deletable: Deletable,
}

/// Retired files no reader of this process holds, with when they became so.
pub(super) type Deletable = Arc<parking_lot::Mutex<Vec<(String, Instant)>>>;

impl ReadGeneration {
    pub(super) fn new(deletable: Deletable) -> Self {
        Self {
            retired: parking_lot::Mutex::default(),
            next: parking_lot::Mutex::default(),
            deletable,
        }
    }
}

impl Drop for ReadGeneration {
    fn drop(&mut self) {
        let retired = std::mem::take(self.retired.get_mut());
        let now = Instant::now();
        self.deletable
            .lock()
            .extend(retired.into_iter().map(|path| (path, now)));
    }
}

/// Held by whoever reads segment files named by a catalog snapshot: the files stay until
/// it is dropped. Clones share it.
#[derive(Debug, Clone)]
pub struct ReadLease {
    _generation: Arc<ReadGeneration>,
}

impl Engine {
    /// A lease on the current generation; take it before the catalog snapshot it covers.
    pub(super) fn lease(&self) -> ReadLease {
        ReadLease {
            _generation: Arc::clone(&self.generation.lock()),
        }
    }

    /// Starts a new generation; `paths` are deleted once the readers of the old one are done.
    pub(in crate::engine) fn retire(&self, paths: Vec<String>) {
        let fresh = Arc::new(ReadGeneration::new(Arc::clone(&self.deletable)));
        let old = std::mem::replace(&mut *self.generation.lock(), Arc::clone(&fresh));
        old.retired.lock().extend(paths);
        *old.next.lock() = Some(fresh);
    }

    /// Deletes the replaced segment files no reader of this process can use any more and
    /// that have waited out `retired_file_grace` (for readers in other processes: queriers
    /// that have not yet followed the catalog past them). A file that cannot be deleted now
    /// is tried again next time (and, after a restart, by the start-up sweep).
    pub async fn delete_retired(&self) -> usize {
        let grace = self.config.retired_file_grace;
        let due: Vec<(String, Instant)> = {
            let mut deletable = self.deletable.lock();
            let (due, waiting) = std::mem::take(&mut *deletable)
                .into_iter()
                .partition(|(_, since)| since.elapsed() >= grace);
            *deletable = waiting;
            due
        };
        let mut deleted = 0;
        let mut failed = Vec::new();
        for (path, since) in due {
            match self.store.delete(&Path::from(path.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => {
                    tracing::warn!(error = %e, %path, "deleting a compacted segment failed");
                    failed.push((path, since));
                }
            }
        }
        self.deletable.lock().extend(failed);
        deleted
    }

    /// Merges every time partition that is in several segments and no longer written into
    /// one segment. A partition is no longer written when the buffer holds none of its rows
    /// and, unless `newest_too`, the table has a newer partition. A failed pass is counted
    /// in the engine's stats.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn compact(&self, newest_too: bool) -> Result<CompactionOutcome> {
        self.refuse_if_read_only()?;
        let result = self.compact_pass(newest_too).await;
        if result.is_err() {
            self.stats
                .compaction_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn compact_pass(&self, newest_too: bool) -> Result<CompactionOutcome> {
        let _one_at_a_time = self.compact_lock.lock().await;
        let state = self.catalog.snapshot();
        let mut outcome = CompactionOutcome::default();
        let mut failure = None;
        for (&table, segments) in &state.segments {
            let buffered = self.buffer.partition_keys(table);
            let newest = segments
                .iter()
                .map(|s| s.partition)
                .chain(buffered.iter().copied())
                .max();
            let mut partitions: BTreeMap<i64, Vec<SegmentMeta>> = BTreeMap::new();
            for s in segments.iter() {
                partitions.entry(s.partition).or_default().push(s.clone());
            }
            let tombstones = state.tombstones_of(table);
            for (partition, group) in partitions {
                // A segment a delete applies to is rewritten without the deleted rows
                // (the delete made physical), whether or not the partition is still
                // written.
                let deleting = group
                    .iter()
                    .any(|s| !for_segment(&tombstones, s.id, s.min_time, s.max_time).is_empty());
                if !deleting
                    && (group.len() < 2
                        || buffered.contains(&partition)
                        || (!newest_too && Some(partition) == newest))
                {
                    continue;
                }
                let bytes: u64 = group.iter().map(|s| s.bytes).sum();
                if bytes > self.config.compaction_max_bytes {
                    outcome.skipped_too_large += 1;
                    tracing::debug!(%table, partition, bytes, "partition too large to compact");
                    continue;
                }
                // One partition that cannot be compacted does not hold up the others.
                if let Err(e) = self
                    .compact_partition(&state, table, group, &mut outcome)
                    .await
                {
                    tracing::warn!(
                        %table,
                        partition,
                        error = %crate::error_chain(&e),
                        "compacting a partition failed"
                    );
                    failure.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.retire_tombstones().await {
            failure.get_or_insert(e);
        }
        self.delete_retired().await;
        match failure {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    /// Retires the tombstones compaction has made physical: every row they delete is
    /// persisted (their WAL sequence is), and no segment persisted before them that they
    /// overlap is left.
    async fn retire_tombstones(&self) -> Result<()> {
        let state = self.catalog.snapshot();
        let ids: Vec<_> = state
            .tombstones
            .values()
            .filter(|t| {
                t.through <= self.persisted_sequence(&state)
                    && !state
                        .segments(t.table)
                        .iter()
                        .any(|s| t.applies_to_segment(s.id, s.min_time, s.max_time))
            })
            .map(|t| t.id)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        tracing::info!(
            tombstones = ids.len(),
            "deletes made physical; tombstones retired"
        );
        self.catalog
            .commit(vec![CatalogEvent::TombstonesRetired { ids }])
            .await?;
        Ok(())
    }

    /// Merges `segments` (one partition's, in catalog order) into one new segment, and
    /// adds what it did to `outcome`.
    async fn compact_partition(
        &self,
        state: &CatalogState,
        table: TableId,
        segments: Vec<SegmentMeta>,
        outcome: &mut CompactionOutcome,
    ) -> Result<()> {
        let started = Instant::now();
        let def = state
            .table_by_id(table)
            .ok_or_else(|| Error::Internal(format!("segments of unknown table {table}")))?
            .clone();
        let partition = segments[0].partition;
        let path = compacted_path(self, &def, partition);
        let tombstones = state.tombstones_of(table);
        let deletes: Vec<Vec<DeletePredicate>> = segments
            .iter()
            .map(|s| {
                for_segment(&tombstones, s.id, s.min_time, s.max_time)
                    .iter()
                    .map(|t| t.predicate.clone())
                    .collect()
            })
            .collect();
        let merged = match stream::merge_segments(
            Arc::clone(&self.store),
            def.clone(),
            segments.clone(),
            deletes.clone(),
            path.clone(),
        )
        .await
        {
            Err(Error::Merge {
                source: sorted_merge::Error::Unsorted { input },
                ..
            }) => {
                tracing::warn!(
                    segment = %segments[input].path,
                    "segment is not sorted by its key; merging its partition in memory"
                );
                self.merge_in_memory(&def, &segments, &deletes, &path)
                    .await?
            }
            merged => merged?,
        };
        let max_sequence = segments
            .iter()
            .map(|s| s.max_sequence)
            .max()
            .unwrap_or_default();

        // The persistence lock is held only from here: the merge above wrote to a path of
        // its own, and its commit does not interleave with a persistence's.
        let _persisting = self.persist_lock.lock().await;
        let now = self.catalog.snapshot();
        // A delete made since the merge read its segments is not in the merged rows: the
        // merge is dropped (and made again by a later pass).
        if now
            .tombstones_of(table)
            .iter()
            .any(|t| !state.tombstones.contains_key(&t.id))
        {
            drop(_persisting);
            if let Err(e) = self.store.delete(&Path::from(path.as_str())).await {
                tracing::warn!(error = %e, %path, "removing a merge a delete overtook failed");
            }
            tracing::info!(%table, partition, "a delete came during the merge; it is made again later");
            return Ok(());
        }
        let (rows, bytes_after) = (merged.rows, merged.bytes);
        let replaced: Vec<SegmentId> = segments.iter().map(|s| s.id).collect();
        // On failure the old segments stay as they were. The new file is not deleted here:
        // a failed commit may still have been written (a store that timed out), and then
        // the catalog names it. The start-up sweep removes it if nothing does.
        if rows == 0 {
            // Deletes left nothing: the segments go, and no empty one takes their place.
            if let Err(e) = self.store.delete(&Path::from(path.as_str())).await {
                tracing::warn!(error = %e, %path, "removing an empty merge failed");
            }
            self.catalog
                .commit(vec![CatalogEvent::SegmentsDeleted {
                    table,
                    segments: replaced,
                }])
                .await?;
        } else {
            // The merged segment's id is handed out by the state the commit follows.
            let merged = merged.describe(&def, partition, path, max_sequence);
            self.catalog
                .commit_with(move |state| {
                    Ok(vec![CatalogEvent::SegmentsCompacted {
                        replaced: replaced.clone(),
                        segment: SegmentMeta {
                            id: SegmentId(state.next_segment_id),
                            ..merged.clone()
                        },
                    }])
                })
                .await?;
        }
        self.retire(segments.iter().map(|s| s.path.clone()).collect());
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        self.stats
            .segments_compacted
            .fetch_add(segments.len() as u64, Ordering::Relaxed);
        let bytes_before: u64 = segments.iter().map(|s| s.bytes).sum();
        outcome.partitions += 1;
        outcome.segments_replaced += segments.len();
        outcome.rows += rows;
        outcome.bytes_before += bytes_before;
        outcome.bytes_after += bytes_after;
        tracing::info!(
            %table,
            partition,
            segments = segments.len(),
            rows,
            bytes_before,
            bytes_after,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted partition"
        );
        Ok(())
    }

    /// The merge for segments that are not sorted by their key (Kiln writes none, but a
    /// file that is must not lose rows): every row of the partition decoded and sorted at
    /// once, as persistence does with the buffer.
    async fn merge_in_memory(
        &self,
        def: &TableDef,
        segments: &[SegmentMeta],
        deletes: &[Vec<DeletePredicate>],
        path: &str,
    ) -> Result<Written> {
        let mut batches = Vec::new();
        for (segment, deletes) in segments.iter().zip(deletes) {
            for batch in self.read_segment(segment).await? {
                batches.push(remove_all(deletes, batch).map_err(Error::ApplyDelete)?);
            }
        }
        let (merged, bytes) = encode(def, batches).await?;
        self.put_encoded(path, &merged, bytes).await
    }

    /// Runs [`Engine::compact`] every `every` (never if `None`), enforces retention every
    /// `retention_every`, and deletes replaced files once their readers are done, until
    /// `shutdown` resolves.
    pub async fn run_compactor(
        self: Arc<Self>,
        every: Option<Duration>,
        retention_every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut last = Instant::now();
        let mut last_retention: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            self.delete_retired().await;
            if last_retention.is_none_or(|t| t.elapsed() >= retention_every) {
                if let Err(e) = self.enforce_retention(crate::now_nanos()).await {
                    tracing::error!(error = %crate::error_chain(&e), "enforcing retention failed; will retry");
                }
                last_retention = Some(Instant::now());
            }
            let Some(every) = every else { continue };
            if last.elapsed() < every {
                continue;
            }
            if let Err(e) = self.compact(false).await {
                tracing::error!(error = %crate::error_chain(&e), "compaction failed; will retry");
            }
            last = Instant::now();
        }
    }
}

/// The object path of the segment named `name` of `partition` of table `def`. Names are
/// unique (a persistence's start time and place, a compaction's start time): a segment's
/// id is only known when the catalog records it, and no file is ever written twice.
pub(super) fn segment_path(def: &TableDef, partition: i64, name: &str) -> String {
    format!(
        "{SEGMENTS_PREFIX}/{}/{}/{partition}-{name}.parquet",
        def.database.get(),
        def.id.get(),
    )
}

/// Where a compaction of `partition` writes its segment, unique by the time it started.
fn compacted_path(engine: &Engine, def: &TableDef, partition: i64) -> String {
    segment_path(
        def,
        partition,
        &engine.own_name(format!("compacted-{:020}", crate::now_nanos())),
    )
}

/// Deletes segment files that no catalog entry names: left by a crash between writing a
/// segment and committing it, or between a compaction's commit and its deletions. Runs
/// before anything else can write segments.
///
/// A writer of several (`writer`) removes only the files that carry its name: another's
/// file may be a segment written and not yet committed.
pub(super) async fn sweep_unreferenced(
    store: &Arc<dyn ObjectStore>,
    state: &CatalogState,
    writer: Option<&str>,
) -> Result<usize> {
    let own_suffix = writer.map(|w| format!(".{w}.parquet"));
    // Soft-deleted tables' files stay until their hard delete.
    let referenced: HashSet<&str> = state
        .segments
        .values()
        .flat_map(|s| s.iter())
        .chain(
            state
                .dropped_tables
                .values()
                .flat_map(|t| t.segments.iter()),
        )
        .map(|s| s.path.as_str())
        .collect();
    let prefix = Path::from(SEGMENTS_PREFIX);
    let listed: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| Error::Store {
            path: SEGMENTS_PREFIX.into(),
            source,
        })?;
    let mut removed = 0;
    for object in listed {
        let path = object.location.as_ref();
        let own = match &own_suffix {
            None => path.ends_with(".parquet"),
            Some(suffix) => path.ends_with(suffix.as_str()),
        };
        if !own || referenced.contains(path) {
            continue;
        }
        store
            .delete(&object.location)
            .await
            .map_err(|source| Error::Store {
                path: path.to_string(),
                source,
            })?;
        tracing::info!(%path, "removed a segment file no catalog entry names");
        removed += 1;
    }
    Ok(removed)
}

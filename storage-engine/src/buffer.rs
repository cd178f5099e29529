//! The write buffer: acknowledged writes not yet persisted, as Arrow, per table and time
//! partition. A write is visible here as soon as its WAL append is acknowledged.
//!
//! Each partition holds *chunks*. A chunk is either the rows of one WAL record, or the
//! last-write-wins merge of every chunk of the partition at or below the buffer's
//! *watermark*: the highest sequence number below which every record has been applied.
//! Because a merge always takes all chunks at or below the watermark, chunks never
//! interleave in sequence, and ordering them by `max_sequence` orders them by write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use arrow::array::{AsArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::TimestampNanosecondType;
use parking_lot::RwLock;

use crate::catalog::tombstones::{DeletePredicate, remove_all};
use crate::catalog::{CatalogState, TIME_COLUMN};
use crate::ids::{SequenceNumber, TableId};
use crate::write::WriteBatch;

static NEXT_CHUNK_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone)]
pub struct Chunk {
    pub id: u64,
    pub max_sequence: SequenceNumber,
    pub min_time: i64,
    pub max_time: i64,
    pub batch: RecordBatch,
}

impl Chunk {
    pub fn new(max_sequence: SequenceNumber, batch: RecordBatch) -> Self {
        let (min_time, max_time) = time_range(&batch);
        Self {
            id: NEXT_CHUNK_ID.fetch_add(1, Ordering::Relaxed),
            max_sequence,
            min_time,
            max_time,
            batch,
        }
    }

    /// Bytes of row data the chunk holds. Counted over the rows it spans rather than the
    /// allocations behind them: columns decoded without a copy share one request buffer,
    /// and counting that buffer once per column would overstate the buffer many times over.
    fn bytes(&self) -> usize {
        data_bytes(&self.batch)
    }
}

/// The chunks of one partition, oldest write first.
#[derive(Debug, Clone)]
pub struct BufferPartition {
    pub partition: i64,
    pub chunks: Vec<Chunk>,
}

impl BufferPartition {
    pub fn min_time(&self) -> i64 {
        self.chunks
            .iter()
            .map(|c| c.min_time)
            .min()
            .unwrap_or(i64::MAX)
    }

    pub fn max_time(&self) -> i64 {
        self.chunks
            .iter()
            .map(|c| c.max_time)
            .max()
            .unwrap_or(i64::MIN)
    }
}

#[derive(Debug, Default)]
struct Inner {
    tables: HashMap<TableId, BTreeMap<i64, Vec<Chunk>>>,
    /// Deletes above the watermark: a write below one, applied after it, loses the rows
    /// it matches as it is applied.
    deletes: Vec<(SequenceNumber, TableId, DeletePredicate)>,
    applied_through: SequenceNumber,
    pending: BTreeSet<SequenceNumber>,
    persisting: bool,
    oldest_unpersisted: Option<Instant>,
}

impl Inner {
    /// Drops the deletes no write still to be applied is older than.
    fn forget_applied_deletes(&mut self) {
        if !self.deletes.is_empty() {
            let watermark = self.applied_through;
            self.deletes.retain(|(s, _, _)| *s > watermark);
        }
    }

    /// Moves the applied watermark over `sequence` and every pending one it joins up with.
    fn mark_applied(&mut self, sequence: SequenceNumber) {
        if sequence == self.applied_through.next() {
            self.applied_through = sequence;
            while let Some(first) = self.pending.first().copied() {
                if first != self.applied_through.next() {
                    break;
                }
                self.pending.remove(&first);
                self.applied_through = first;
            }
        } else if sequence > self.applied_through {
            self.pending.insert(sequence);
        }
    }
}

#[derive(Debug, Default)]
pub struct WriteBuffer {
    inner: RwLock<Inner>,
    bytes: AtomicUsize,
}

/// Bytes of the rows `batch` spans (see [`Chunk`]'s accounting).
pub fn data_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            let data = c.to_data();
            data.get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// Smallest and largest `time` in `batch` (`(i64::MAX, i64::MIN)` when empty).
pub fn time_range(batch: &RecordBatch) -> (i64, i64) {
    let Some(col) = batch.column_by_name(TIME_COLUMN) else {
        return (i64::MAX, i64::MIN);
    };
    let times = col.as_primitive::<TimestampNanosecondType>();
    let min = arrow::compute::min(times).unwrap_or(i64::MAX);
    let max = arrow::compute::max(times).unwrap_or(i64::MIN);
    (min, max)
}

impl WriteBuffer {
    /// A buffer whose watermark starts at `applied_through` (the last sequence already
    /// applied or persisted).
    pub fn new(applied_through: SequenceNumber) -> Self {
        Self {
            inner: RwLock::new(Inner {
                applied_through,
                ..Default::default()
            }),
            bytes: AtomicUsize::new(0),
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Every sequence at or below this has been applied.
    pub fn applied_through(&self) -> SequenceNumber {
        self.inner.read().applied_through
    }

    pub fn oldest_unpersisted(&self) -> Option<Instant> {
        self.inner.read().oldest_unpersisted
    }

    /// Adds the rows of WAL record `sequence`, split by time partition.
    pub fn apply(&self, sequence: SequenceNumber, write: &WriteBatch, catalog: &CatalogState) {
        let mut new_chunks = Vec::new();
        for tw in &write.tables {
            let Some(def) = catalog.table_by_id(tw.table) else {
                // Logged before its table was deleted, or a bug.
                if !catalog.is_dropped_table(tw.table) {
                    tracing::error!(table = %tw.table, "write for a table the catalog does not know; skipped");
                }
                continue;
            };
            for (partition, batch) in split_by_partition(&tw.batch, |t| def.partition_of(t)) {
                new_chunks.push((tw.table, partition, Chunk::new(sequence, batch)));
            }
        }
        let mut inner = self.inner.write();
        // A delete logged after this write and applied before it: its rows go now.
        if inner.deletes.iter().any(|(s, _, _)| *s > sequence) {
            for (table, _, chunk) in &mut new_chunks {
                let applying = inner
                    .deletes
                    .iter()
                    .filter(|(s, t, _)| *s > sequence && t == table)
                    .map(|(_, _, p)| p);
                match remove_all(applying, chunk.batch.clone()) {
                    Ok(kept) => *chunk = Chunk::new(sequence, kept),
                    Err(e) => tracing::error!(error = %e, "applying a delete to a write failed"),
                }
            }
            new_chunks.retain(|(_, _, c)| c.batch.num_rows() > 0);
        }
        let added: usize = new_chunks.iter().map(|(_, _, c)| c.bytes()).sum();
        for (table, partition, chunk) in new_chunks {
            inner
                .tables
                .entry(table)
                .or_default()
                .entry(partition)
                .or_default()
                .push(chunk);
        }
        inner.oldest_unpersisted.get_or_insert_with(Instant::now);
        inner.mark_applied(sequence);
        inner.forget_applied_deletes();
        self.bytes.fetch_add(added, Ordering::Relaxed);
    }

    /// Applies the delete logged as WAL record `sequence`: the rows of `table` it matches
    /// go from every chunk written before it (all chunks at or below the watermark are,
    /// and a merge only takes those), and from writes before it still to be applied.
    pub fn apply_delete(
        &self,
        sequence: SequenceNumber,
        table: TableId,
        predicate: &DeletePredicate,
    ) {
        let mut inner = self.inner.write();
        let mut freed = 0;
        let mut added = 0;
        if let Some(parts) = inner.tables.get_mut(&table) {
            for chunks in parts.values_mut() {
                for chunk in chunks.iter_mut() {
                    if chunk.max_sequence >= sequence
                        || !predicate.overlaps(chunk.min_time, chunk.max_time)
                    {
                        continue;
                    }
                    match predicate.remove_from(&chunk.batch) {
                        Ok(kept) if kept.num_rows() == chunk.batch.num_rows() => {}
                        Ok(kept) => {
                            freed += chunk.bytes();
                            *chunk = Chunk::new(chunk.max_sequence, kept);
                            added += chunk.bytes();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "applying a delete to buffered rows failed")
                        }
                    }
                }
                chunks.retain(|c| c.batch.num_rows() > 0);
            }
            parts.retain(|_, c| !c.is_empty());
        }
        inner.deletes.push((sequence, table, predicate.clone()));
        inner.mark_applied(sequence);
        inner.forget_applied_deletes();
        drop(inner);
        self.bytes.fetch_add(added, Ordering::Relaxed);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// The deletes logged after WAL record `sequence` and already applied: a write of
    /// that sequence not yet applied must not show the rows they match (to the caches).
    pub fn deletes_after(&self, sequence: SequenceNumber) -> Vec<(TableId, DeletePredicate)> {
        let inner = self.inner.read();
        inner
            .deletes
            .iter()
            .filter(|(s, _, _)| *s > sequence)
            .map(|(_, t, p)| (*t, p.clone()))
            .collect()
    }

    /// Counts WAL record `sequence` as applied without adding rows (a record skipped on
    /// replay), so the applied watermark moves past it.
    pub fn skip(&self, sequence: SequenceNumber) {
        self.inner.write().mark_applied(sequence);
    }

    /// The partitions of `table` that hold rows.
    pub fn partition_keys(&self, table: TableId) -> std::collections::BTreeSet<i64> {
        let inner = self.inner.read();
        inner
            .tables
            .get(&table)
            .map(|parts| parts.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The oldest and newest times of `table`'s buffered rows.
    pub fn time_range(&self, table: TableId) -> Option<(i64, i64)> {
        let inner = self.inner.read();
        inner
            .tables
            .get(&table)?
            .values()
            .flatten()
            .map(|c| (c.min_time, c.max_time))
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
    }

    /// The partitions of `table`, each with its chunks ordered oldest write first.
    pub fn partitions(&self, table: TableId) -> Vec<BufferPartition> {
        let inner = self.inner.read();
        let Some(parts) = inner.tables.get(&table) else {
            return Vec::new();
        };
        parts
            .iter()
            .map(|(p, chunks)| {
                let mut chunks = chunks.clone();
                chunks.sort_by_key(|c| c.max_sequence);
                BufferPartition {
                    partition: *p,
                    chunks,
                }
            })
            .collect()
    }

    /// Replaces chunks `replaced` of a partition by their merge, if they are all still
    /// there, none is above the watermark and no persistence is running. Returns whether
    /// the replacement happened.
    pub fn replace_with_merged(
        &self,
        table: TableId,
        partition: i64,
        replaced: &[u64],
        merged: Chunk,
    ) -> bool {
        let mut inner = self.inner.write();
        if inner.persisting || merged.max_sequence > inner.applied_through {
            return false;
        }
        let watermark = inner.applied_through;
        let Some(chunks) = inner
            .tables
            .get_mut(&table)
            .and_then(|t| t.get_mut(&partition))
        else {
            return false;
        };
        let present = chunks.iter().filter(|c| replaced.contains(&c.id)).count();
        let all_below = chunks
            .iter()
            .filter(|c| c.max_sequence <= watermark)
            .count();
        if present != replaced.len() || all_below != replaced.len() {
            return false;
        }
        let freed: usize = chunks
            .iter()
            .filter(|c| replaced.contains(&c.id))
            .map(Chunk::bytes)
            .sum();
        chunks.retain(|c| !replaced.contains(&c.id));
        let added = merged.bytes();
        chunks.push(merged);
        drop(inner);
        self.bytes.fetch_add(added, Ordering::Relaxed);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        true
    }

    /// Drops every row of `table` (a deleted table); returns the bytes freed.
    pub fn drop_table(&self, table: TableId) -> usize {
        let mut inner = self.inner.write();
        let freed: usize = inner
            .tables
            .remove(&table)
            .into_iter()
            .flat_map(|parts| parts.into_values().flatten())
            .map(|c| c.bytes())
            .sum();
        drop(inner);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        freed
    }

    /// Drops the chunks of `table` whose every row is older than `cutoff` (expired);
    /// returns the bytes freed. Rows of a chunk that straddles it stay until persisted
    /// (queries filter them).
    pub fn expire(&self, table: TableId, cutoff: i64) -> usize {
        let mut inner = self.inner.write();
        let Some(parts) = inner.tables.get_mut(&table) else {
            return 0;
        };
        let mut freed = 0;
        for chunks in parts.values_mut() {
            chunks.retain(|c| {
                let keep = c.max_time >= cutoff;
                if !keep {
                    freed += c.bytes();
                }
                keep
            });
        }
        parts.retain(|_, c| !c.is_empty());
        if parts.is_empty() {
            inner.tables.remove(&table);
        }
        drop(inner);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        freed
    }

    /// Marks a persistence as running and returns the watermark and every chunk at or
    /// below it.
    pub fn begin_persist(&self) -> (SequenceNumber, Vec<(TableId, BufferPartition)>) {
        let mut inner = self.inner.write();
        inner.persisting = true;
        let through = inner.applied_through;
        let mut out = Vec::new();
        for (table, parts) in &inner.tables {
            for (p, chunks) in parts {
                let mut taken: Vec<Chunk> = chunks
                    .iter()
                    .filter(|c| c.max_sequence <= through)
                    .cloned()
                    .collect();
                if taken.is_empty() {
                    continue;
                }
                taken.sort_by_key(|c| c.max_sequence);
                out.push((
                    *table,
                    BufferPartition {
                        partition: *p,
                        chunks: taken,
                    },
                ));
            }
        }
        (through, out)
    }

    /// Ends a persistence. If it succeeded, drops every chunk at or below `through`.
    pub fn end_persist(&self, through: Option<SequenceNumber>) {
        let mut inner = self.inner.write();
        inner.persisting = false;
        let Some(through) = through else {
            return;
        };
        let mut freed = 0;
        for parts in inner.tables.values_mut() {
            for chunks in parts.values_mut() {
                chunks.retain(|c| {
                    let keep = c.max_sequence > through;
                    if !keep {
                        freed += c.bytes();
                    }
                    keep
                });
            }
            parts.retain(|_, c| !c.is_empty());
        }
        inner.tables.retain(|_, p| !p.is_empty());
        inner.oldest_unpersisted = if inner.tables.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        drop(inner);
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
    }
}

/// Splits `batch` by the partition of each row's time; most batches fall in one.
fn split_by_partition(
    batch: &RecordBatch,
    partition_of: impl Fn(i64) -> i64,
) -> Vec<(i64, RecordBatch)> {
    let Some(col) = batch.column_by_name(TIME_COLUMN) else {
        return Vec::new();
    };
    // A write is checked before it is logged; a time column of another type is not one.
    let Some(times) = col.as_primitive_opt::<TimestampNanosecondType>() else {
        return Vec::new();
    };
    if times.is_empty() {
        return Vec::new();
    }
    let first = partition_of(times.value(0));
    if times.values().iter().all(|t| partition_of(*t) == first) {
        return vec![(first, batch.clone())];
    }
    let mut groups: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (i, t) in times.values().iter().enumerate() {
        groups.entry(partition_of(*t)).or_default().push(i as u32);
    }
    groups
        .into_iter()
        .map(|(p, idx)| {
            let batch =
                take_record_batch(batch, &UInt32Array::from(idx)).expect("indices are in bounds");
            (p, batch)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, TimestampNanosecondArray};
    use arrow::buffer::{Buffer, ScalarBuffer};

    use super::*;

    #[test]
    fn columns_sharing_one_allocation_are_counted_by_the_rows_they_span() {
        // One 8 MiB allocation, as a request decoded without a copy; three columns of
        // 1,000 rows each point into it.
        let shared = Buffer::from_vec(vec![0i64; 1 << 20]);
        let column = |at: usize| ScalarBuffer::<i64>::new(shared.clone(), at, 1000);
        let batch = RecordBatch::try_from_iter([
            (
                "time",
                Arc::new(TimestampNanosecondArray::new(column(0), None)) as ArrayRef,
            ),
            ("a", Arc::new(Int64Array::new(column(1000), None))),
            ("b", Arc::new(Int64Array::new(column(2000), None))),
        ])
        .unwrap();
        assert!(batch.get_array_memory_size() > 3 * (8 << 20));
        assert_eq!(data_bytes(&batch), 3 * 1000 * 8);
        assert_eq!(Chunk::new(SequenceNumber(1), batch).bytes(), 24_000);
    }
}

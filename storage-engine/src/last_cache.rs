//! Last-value caches: the latest row of every series of a table, kept in memory.
//!
//! A table's cache ([`catalog::LastCacheDef`](crate::catalog::LastCacheDef)) is keyed by
//! some of its tags (all of them by default). Every write applied to the buffer is offered
//! to it; it keeps, per key, the row with the greatest `time`, and when a write repeats a
//! key's latest time, the fields it sets replace those of the kept row — the last-write-wins
//! rule of [`crate::dedup`], so the cache always holds the row a full query would return.
//!
//! A cache starts empty and *warming*: it takes writes at once, while the rows already in
//! segments and the buffer are read into a second cache; the two are then merged, the
//! live one winning where both have a key's latest time. Readers wait until it is warm.
//!
//! A cache that cannot answer — its warm-up failed, an update failed, or it would hold
//! more series than its limit — frees its rows and says so ([`CacheStatus::Failed`]):
//! queries then read the table, and the `last_cache()` function names the reason.
//!
//! Rows are held in small batches (only the rows that updated a key), referenced by index;
//! when there are many, they are compacted into one batch of exactly one row per key.
//!
//! A read that names series by the values of one key column (`host IN ('a', 'b')`) finds
//! them through an index of that column's values, made by the first such read and
//! extended only when a new key arrives, so picking a few series of many costs those few.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, DictionaryArray, Int32Array, RecordBatch,
    RecordBatchOptions, UInt32Array, new_null_array,
};
use arrow::compute::{cast, interleave};
use arrow::datatypes::{DataType, Int32Type, Int64Type, SchemaRef};
use arrow::error::ArrowError;
use arrow_select::dictionary::garbage_collect_any_dictionary;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::catalog::tombstones::DeletePredicate;
use crate::catalog::{ColumnType, TIME_COLUMN};
use crate::dedup::{align_to_schema, fit_column, fit_to_schema};
use crate::series::group_rows;

/// Batches held before they are compacted into one.
const MAX_BATCHES: usize = 32;

/// Where a key's latest row is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    time: i64,
    batch: usize,
    row: usize,
}

impl Entry {
    /// (batch, row) in the held batches.
    fn position(&self) -> (usize, usize) {
        (self.batch, self.row)
    }
}

/// A key's new latest row: the rows at its `time` to merge, oldest first, as (batch, row)
/// in the sources being merged.
struct Update<K> {
    key: K,
    time: i64,
    sources: Sources,
}

/// An update's rows: most often one (no allocation).
enum Sources {
    One((usize, usize)),
    Many(Vec<(usize, usize)>),
}

impl Sources {
    fn as_slice(&self) -> &[(usize, usize)] {
        match self {
            Sources::One(s) => std::slice::from_ref(s),
            Sources::Many(v) => v,
        }
    }
}

/// The latest rows of one table, per key.
#[derive(Debug)]
struct Rows {
    /// Each key's slot in `slots` (a key keeps its slot).
    keys: HashMap<Box<[u8]>, u32, ahash::RandomState>,
    /// Where each key's latest row is.
    slots: Vec<Entry>,
    batches: Vec<RecordBatch>,
    /// Per key column (by position), made by the first read that picks series by its
    /// values and kept up to date from then on: the slots of each value (encoded as in a
    /// key).
    indexes: HashMap<usize, ValueIndex>,
}

/// The slots of each value of one key column.
#[derive(Debug, Default)]
struct ValueIndex(HashMap<Box<[u8]>, Vec<u32>, ahash::RandomState>);

impl ValueIndex {
    /// Adds the key in `slot`, whose value in the indexed column is `value`.
    fn add(&mut self, value: &[u8], slot: u32) {
        match self.0.get_mut(value) {
            Some(slots) => slots.push(slot),
            None => {
                self.0.insert(value.into(), vec![slot]);
            }
        }
    }
}

impl Rows {
    fn new() -> Self {
        Self {
            keys: HashMap::default(),
            slots: Vec::new(),
            batches: Vec::new(),
            indexes: HashMap::new(),
        }
    }

    /// The held batches and where each key's row is in them, to read without the lock.
    fn snapshot(&self) -> (Vec<RecordBatch>, Vec<(usize, usize)>) {
        (self.batches.clone(), self.positions())
    }

    /// Where each key's row is, in slot order.
    fn positions(&self) -> Vec<(usize, usize)> {
        self.slots.iter().map(Entry::position).collect()
    }

    /// [`Self::snapshot`] of the keys whose key column at `column` holds one of `values`
    /// (each encoded as in a key, no two equal).
    fn snapshot_among(
        &mut self,
        column: usize,
        values: &[Vec<u8>],
    ) -> (Vec<RecordBatch>, Vec<(usize, usize)>) {
        let index = self.indexes.entry(column).or_insert_with(|| {
            let mut index = ValueIndex::default();
            for (key, &slot) in &self.keys {
                index.add(key_value(key, column), slot);
            }
            index
        });
        let indices = values
            .iter()
            .filter_map(|v| index.0.get(v.as_slice()))
            .flatten()
            .map(|&slot| self.slots[slot as usize].position())
            .collect();
        (self.batches.clone(), indices)
    }

    /// Offers `batch`'s rows as newer than everything held.
    fn offer(&mut self, key_columns: &[String], batch: &RecordBatch) -> Result<(), ArrowError> {
        let Some(time) = batch.column_by_name(TIME_COLUMN) else {
            return Ok(());
        };
        let time = cast(time, &DataType::Int64)?;
        let time = time.as_primitive::<Int64Type>();
        // Rows that can be a key's latest: those at the latest time of their group of
        // equal dictionary keys. Only they are encoded (a batch repeats its series).
        let keys = key_arrays(key_columns, batch)?;
        let dicts: Vec<_> = keys
            .iter()
            .map(|c| c.as_dictionary::<Int32Type>())
            .collect();
        let groups = group_rows(&dicts, batch.num_rows());
        let mut group_latest = vec![i64::MIN; groups.first_rows.len()];
        for (row, &g) in groups.group_of.iter().enumerate() {
            if time.is_valid(row) {
                let latest = &mut group_latest[g as usize];
                *latest = (*latest).max(time.value(row));
            }
        }
        let candidates: Vec<usize> = (0..batch.num_rows())
            .filter(|&row| {
                time.is_valid(row) && time.value(row) == group_latest[groups.group_of[row] as usize]
            })
            .collect();
        let encoded = encode_keys(&dicts, &candidates);
        let key_of = |i: usize| encoded.key(i);
        // The latest time of each key in this batch, and its rows at that time in order
        // (the first, then any more).
        let mut latest: HashMap<&[u8], (i64, usize, Vec<usize>), ahash::RandomState> =
            HashMap::with_capacity_and_hasher(candidates.len(), ahash::RandomState::new());
        for (i, &row) in candidates.iter().enumerate() {
            let t = time.value(row);
            let slot = latest.entry(key_of(i)).or_insert((t, row, Vec::new()));
            if t > slot.0 {
                *slot = (t, row, Vec::new());
            } else if t == slot.0 && row != slot.1 {
                slot.2.push(row);
            }
        }
        let index = self.batches.len();
        let mut updates = Vec::with_capacity(latest.len());
        for (key, (t, first, more)) in latest {
            let held = self.keys.get(key).map(|&slot| {
                let e = self.slots[slot as usize];
                (e.time, e.position())
            });
            let new_rows = std::iter::once(first).chain(more.iter().copied());
            let sources = match held {
                Some((time, _)) if time > t => continue,
                // The same time again: the held row first, overlaid by the new rows.
                Some((time, at)) if time == t => Sources::Many(
                    std::iter::once(at)
                        .chain(new_rows.map(|r| (index, r)))
                        .collect(),
                ),
                _ if more.is_empty() => Sources::One((index, first)),
                _ => Sources::Many(new_rows.map(|r| (index, r)).collect()),
            };
            updates.push(Update {
                key,
                time: t,
                sources,
            });
        }
        if updates.is_empty() {
            return Ok(());
        }
        // Every source aligned to one schema: the batch's widened by columns held rows have.
        let schema = wider_schema(&self.batches, batch.schema())?;
        if self.batches.first().is_some_and(|b| b.schema() != schema) {
            self.batches = align_all(&self.batches, &schema)?;
        }
        let new = align_to_schema(batch, &schema)?;
        let sources: Vec<&RecordBatch> = self.batches.iter().chain([&new]).collect();
        let merged = overlay(&schema, &sources, &updates)?;
        self.apply(merged, updates);
        if self.batches.len() > MAX_BATCHES {
            self.compact(&schema)?;
        }
        Ok(())
    }

    /// Appends `merged`, one row per update, and points the updates' keys at it.
    fn apply<K: AsRef<[u8]>>(&mut self, merged: RecordBatch, updates: Vec<Update<K>>) {
        let at = self.batches.len();
        self.batches.push(merged);
        for (row, u) in updates.into_iter().enumerate() {
            let entry = Entry {
                time: u.time,
                batch: at,
                row,
            };
            let key = u.key.as_ref();
            match self.keys.get(key) {
                Some(&slot) => self.slots[slot as usize] = entry,
                None => {
                    let slot = self.slots.len() as u32;
                    self.slots.push(entry);
                    for (&column, index) in &mut self.indexes {
                        index.add(key_value(key, column), slot);
                    }
                    self.keys.insert(key.into(), slot);
                }
            }
        }
    }

    /// Adds `older`'s rows where they are newer than this cache's, merging where both have
    /// a key's latest time (this cache's fields winning).
    fn absorb_older(&mut self, older: Rows) -> Result<(), ArrowError> {
        if older.slots.is_empty() {
            return Ok(());
        }
        let mut schema = wider_schema(&self.batches, Arc::new(arrow::datatypes::Schema::empty()))?;
        schema = wider_schema(&older.batches, schema)?;
        let offset = self.batches.len();
        let sources: Vec<RecordBatch> = self
            .batches
            .iter()
            .chain(older.batches.iter())
            .map(|b| align_to_schema(b, &schema))
            .collect::<Result<_, _>>()?;
        let mut updates = Vec::new();
        for (key, slot) in older.keys {
            let e = older.slots[slot as usize];
            let old = (e.batch + offset, e.row);
            let mine = self.keys.get(&key).map(|&slot| self.slots[slot as usize]);
            let sources = match mine {
                Some(mine) if mine.time > e.time => continue,
                Some(mine) if mine.time == e.time => Sources::Many(vec![old, mine.position()]),
                _ => Sources::One(old),
            };
            updates.push(Update {
                key,
                time: e.time,
                sources,
            });
        }
        let merged = (!updates.is_empty())
            .then(|| overlay(&schema, &sources.iter().collect::<Vec<_>>(), &updates))
            .transpose()?;
        self.batches = sources;
        if let Some(merged) = merged {
            self.apply(merged, updates);
        }
        self.compact(&schema)
    }

    /// Rewrites the held rows as one batch of exactly one row per key.
    fn compact(&mut self, schema: &SchemaRef) -> Result<(), ArrowError> {
        let one = gather(schema, &self.batches, &self.positions())?;
        for (row, e) in self.slots.iter_mut().enumerate() {
            e.batch = 0;
            e.row = row;
        }
        self.batches = vec![one];
        Ok(())
    }
}

/// `schema` widened by the columns of `batches` it lacks.
fn wider_schema(batches: &[RecordBatch], schema: SchemaRef) -> Result<SchemaRef, ArrowError> {
    let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
    for b in batches {
        for f in b.schema().fields() {
            if !fields.iter().any(|g| g.name() == f.name()) {
                fields.push(Arc::clone(f));
            }
        }
    }
    if fields.len() == schema.fields().len() {
        return Ok(schema);
    }
    Ok(Arc::new(arrow::datatypes::Schema::new(fields)))
}

/// `batches` aligned to `schema`.
fn align_all(batches: &[RecordBatch], schema: &SchemaRef) -> Result<Vec<RecordBatch>, ArrowError> {
    batches.iter().map(|b| align_to_schema(b, schema)).collect()
}

/// The rows `indices` ((batch, row) pairs) of `sources` as one batch of `schema`, in that
/// order. The sources hold the cache's columns: those `schema` names are taken (fitted to
/// its types, see [`fit_column`]), those it lacks are NULL.
fn gather(
    schema: &SchemaRef,
    sources: &[RecordBatch],
    indices: &[(usize, usize)],
) -> Result<RecordBatch, ArrowError> {
    if sources.is_empty() || indices.is_empty() {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    }
    let held: usize = sources.iter().map(RecordBatch::num_rows).sum();
    if indices.len() * 4 < held {
        return gather_few(schema, sources, indices);
    }
    let fitted = sources
        .iter()
        .map(|b| fit_to_schema(b, schema))
        .collect::<Result<Vec<_>, _>>()?;
    interleave_batches(schema, &fitted, indices)
}

/// [`gather`] of a few of the held rows, with work in proportion to the rows picked:
/// only the columns `schema` names, and a tag's values are picked through each row's key
/// (interleaving the dictionaries themselves would merge every source's whole dictionary,
/// a cost per held row).
fn gather_few(
    schema: &SchemaRef,
    sources: &[RecordBatch],
    indices: &[(usize, usize)],
) -> Result<RecordBatch, ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let arrays: Vec<&ArrayRef> = sources
                .iter()
                .filter_map(|b| b.column_by_name(f.name()))
                .collect();
            let picked = match arrays.len() {
                0 => None,
                n if n == sources.len() => Some(pick(&arrays, indices)?),
                _ => {
                    return Err(ArrowError::ComputeError(format!(
                        "a last-value cache's batches differ in column {:?}",
                        f.name()
                    )));
                }
            };
            fit_column(picked.as_ref(), f.data_type(), indices.len())
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(indices.len())),
    )
}

/// The values at `indices` of one column held in several arrays. A tag's (a dictionary
/// with `i32` keys) come back as a dictionary of those rows' own values.
fn pick(arrays: &[&ArrayRef], indices: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
    let dictionaries: Option<Vec<&DictionaryArray<Int32Type>>> = arrays
        .iter()
        .map(|a| a.as_dictionary_opt::<Int32Type>())
        .collect();
    let Some(dictionaries) = dictionaries else {
        let arrays: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
        return interleave(&arrays, indices);
    };
    // Rows whose key is NULL point at any value (the key's NULL hides it).
    let Some(any) = dictionaries.iter().position(|d| !d.values().is_empty()) else {
        return Ok(new_null_array(arrays[0].data_type(), indices.len()));
    };
    let mut valid = Vec::with_capacity(indices.len());
    let at: Vec<(usize, usize)> = indices
        .iter()
        .map(|&(batch, row)| {
            let keys = dictionaries[batch].keys();
            let is_valid = keys.is_valid(row);
            valid.push(is_valid);
            match is_valid {
                true => (batch, keys.value(row) as usize),
                false => (any, 0),
            }
        })
        .collect();
    let values: Vec<&dyn Array> = dictionaries.iter().map(|d| d.values().as_ref()).collect();
    let values = interleave(&values, &at)?;
    let nulls = valid
        .contains(&false)
        .then(|| arrow::buffer::NullBuffer::from(valid));
    let keys = Int32Array::new((0..indices.len() as i32).collect(), nulls);
    Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(
        keys, values,
    )?))
}

/// The rows `indices` of `sources`, interleaved column by column.
fn interleave_batches(
    schema: &SchemaRef,
    sources: &[RecordBatch],
    indices: &[(usize, usize)],
) -> Result<RecordBatch, ArrowError> {
    let columns = (0..schema.fields().len())
        .map(|c| {
            let arrays: Vec<&dyn Array> = sources.iter().map(|b| b.column(c).as_ref()).collect();
            interleave(&arrays, indices)
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(indices.len())),
    )
}

/// One row per update: each field from the last of its sources (oldest first) where that
/// field is not NULL, the last-write-wins merge of rows at one time.
fn overlay<K>(
    schema: &SchemaRef,
    sources: &[&RecordBatch],
    updates: &[Update<K>],
) -> Result<RecordBatch, ArrowError> {
    // Most often every update is one new row of one batch: a take.
    if let Some(Sources::One((batch, _))) = updates.first().map(|u| &u.sources)
        && updates
            .iter()
            .all(|u| matches!(u.sources, Sources::One((b, _)) if b == *batch))
    {
        let rows =
            UInt32Array::from_iter_values(updates.iter().map(|u| u.sources.as_slice()[0].1 as u32));
        return arrow::compute::take_record_batch(sources[*batch], &rows);
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for c in 0..schema.fields().len() {
        let picks: Vec<(usize, usize)> = updates
            .iter()
            .map(|u| {
                let rows = u.sources.as_slice();
                let last = *rows.last().expect("at least one source");
                if rows.len() == 1 {
                    return last;
                }
                rows.iter()
                    .rev()
                    .find(|&&(b, r)| sources[b].column(c).is_valid(r))
                    .copied()
                    .unwrap_or(last)
            })
            .collect();
        let arrays: Vec<&dyn Array> = sources.iter().map(|b| b.column(c).as_ref()).collect();
        columns.push(interleave(&arrays, &picks)?);
    }
    RecordBatch::try_new(Arc::clone(schema), columns)
}

/// `batch`'s `columns` as tags (dictionaries); NULL for a column it lacks.
fn key_arrays(columns: &[String], batch: &RecordBatch) -> Result<Vec<ArrayRef>, ArrowError> {
    let tag = ColumnType::Tag.arrow_type();
    columns
        .iter()
        .map(|name| match batch.column_by_name(name) {
            Some(a) if a.data_type() == &tag => Ok(Arc::clone(a)),
            Some(a) => cast(a, &tag),
            None => Ok(new_null_array(&tag, batch.num_rows())),
        })
        .collect()
}

/// Keys of some rows, back to back: per key column a NULL byte (0), or 1, the value's
/// length (4 bytes) and its bytes, so equal keys have equal bytes and no two differ only
/// in where one value ends.
struct EncodedKeys {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl EncodedKeys {
    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// The keys of `rows` of the key columns `dicts` (from [`key_arrays`]).
fn encode_keys(dicts: &[&DictionaryArray<Int32Type>], rows: &[usize]) -> EncodedKeys {
    let values: Vec<_> = dicts
        .iter()
        .map(|d| d.values().as_string::<i32>())
        .collect();
    let mut out = EncodedKeys {
        bytes: Vec::with_capacity(rows.len() * dicts.len() * 16),
        ends: Vec::with_capacity(rows.len()),
    };
    for &row in rows {
        for (d, v) in dicts.iter().zip(&values) {
            let value = usize::try_from(d.keys().value(row))
                .ok()
                .filter(|&k| d.is_valid(row) && k < v.len() && v.is_valid(k))
                .map(|k| v.value(k));
            push_value(&mut out.bytes, value);
        }
        out.ends.push(out.bytes.len());
    }
    out
}

/// Appends one key column's value as keys hold it.
fn push_value(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => out.push(0),
        Some(value) => {
            out.push(1);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
    }
}

/// The value of the key column at `column` in `key`, as [`push_value`] wrote it.
fn key_value(key: &[u8], column: usize) -> &[u8] {
    let mut start = 0;
    for c in 0..=column {
        let end = match key.get(start) {
            Some(1) => {
                let len: [u8; 4] = key[start + 1..start + 5].try_into().expect("4 bytes");
                start + 5 + u32::from_le_bytes(len) as usize
            }
            _ => start + 1,
        };
        if c == column {
            return &key[start..end];
        }
        start = end;
    }
    unreachable!("the loop returns at `column`")
}

/// Series picked by the values of one of a cache's key columns (see
/// [`LastCache::rows_where`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValues {
    pub column: String,
    /// `None`: the column is NULL.
    pub values: Vec<Option<String>>,
}

/// Where a cache is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    Warming,
    Warm,
    /// It cannot answer (warming failed, an update failed, more series than allowed):
    /// queries read the table instead, and `last_cache()` says why.
    Failed(Arc<str>),
}

/// One table's cache.
#[derive(Debug)]
pub struct LastCache {
    pub key_columns: Vec<String>,
    live: Mutex<Rows>,
    status: watch::Sender<CacheStatus>,
    /// Most keys (series) it holds before it gives up.
    max_series: usize,
    /// Writes offered so far (see [`Self::offered`]).
    offered: AtomicU64,
    /// Unique among the caches of this process (see [`Self::id`]).
    id: u64,
}

/// The next [`LastCache::id`].
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl LastCache {
    pub fn new(key_columns: Vec<String>, max_series: usize) -> Self {
        Self {
            key_columns,
            live: Mutex::new(Rows::new()),
            status: watch::channel(CacheStatus::Warming).0,
            max_series,
            offered: AtomicU64::new(0),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Offers a write's rows (newer than any seen).
    pub fn offer(&self, batch: &RecordBatch) {
        if matches!(*self.status.borrow(), CacheStatus::Failed(_)) {
            return;
        }
        self.offered.fetch_add(1, Ordering::Relaxed);
        let mut live = self.live.lock();
        let result = live.offer(&self.key_columns, batch);
        let series = live.slots.len();
        drop(live);
        match result {
            Err(e) => self.fail(format!("updating it failed: {e}")),
            Ok(()) if series > self.max_series => self.fail(self.too_many()),
            Ok(()) => {}
        }
    }

    /// This cache among all made since the process started (a replaced cache's successor
    /// has another).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many writes were offered: unchanged, the rows are the same.
    pub fn offered(&self) -> u64 {
        self.offered.load(Ordering::Relaxed)
    }

    fn too_many(&self) -> String {
        format!(
            "it would hold more than {} series (--last-cache-max-series)",
            self.max_series
        )
    }

    /// Gives up: frees the rows and answers no more queries.
    pub fn fail(&self, reason: String) {
        tracing::error!(%reason, "a last-value cache stopped answering; queries read the table instead");
        *self.live.lock() = Rows::new();
        self.status.send_replace(CacheStatus::Failed(reason.into()));
    }

    pub fn status(&self) -> CacheStatus {
        self.status.borrow().clone()
    }

    /// Starts filling the cache with rows older than any offered since it was made
    /// (segments, then the buffer, each oldest write first), a batch at a time so that no
    /// more than one batch of them need be in memory; [`Warming::finish`] marks it warm.
    pub fn warming(self: &Arc<Self>) -> Warming {
        Warming {
            cache: Arc::clone(self),
            rows: Rows::new(),
        }
    }

    pub fn is_warm(&self) -> bool {
        *self.status.borrow() == CacheStatus::Warm
    }

    /// Waits until the cache is warm; why not, if it failed.
    pub async fn warmed(&self) -> Result<(), Arc<str>> {
        let mut rx = self.status.subscribe();
        let status = match rx.wait_for(|s| *s != CacheStatus::Warming).await {
            Ok(status) => status.clone(),
            Err(_) => CacheStatus::Failed("the cache was dropped".into()),
        };
        match status {
            CacheStatus::Failed(reason) => Err(reason),
            _ => Ok(()),
        }
    }

    /// The latest row of every key, aligned to `schema`, in no particular order.
    pub fn rows(&self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        let (batches, indices) = self.live.lock().snapshot();
        gather(schema, &batches, &indices)
    }

    /// The latest rows of the keys `keep` selects, aligned to `schema`, in no particular
    /// order. `keep` is shown the columns `shown` of every key's row (key columns of
    /// `schema`, in its types) and answers which to return (NULL: not returned). Selecting
    /// a few series of many costs those columns, not the rows, and the returned
    /// dictionaries hold only the values the returned rows use.
    ///
    /// With `among`, only the keys with one of its values are shown to `keep` (which
    /// must then keep no other): they are found through an index of that column's values,
    /// made by the first such read and kept from then on, so picking a few series of many
    /// costs those few.
    pub fn rows_where<E: From<ArrowError>>(
        &self,
        schema: &SchemaRef,
        shown: &[&str],
        among: Option<&KeyValues>,
        keep: impl FnOnce(&RecordBatch) -> Result<BooleanArray, E>,
    ) -> Result<RecordBatch, E> {
        let column = among.and_then(|a| {
            let position = self.key_columns.iter().position(|c| *c == a.column)?;
            let mut values: Vec<Vec<u8>> = a
                .values
                .iter()
                .map(|v| {
                    let mut out = Vec::new();
                    push_value(&mut out, v.as_deref());
                    out
                })
                .collect();
            values.sort_unstable();
            values.dedup();
            Some((position, values))
        });
        let (batches, indices) = match column {
            Some((position, values)) => self.live.lock().snapshot_among(position, &values),
            None => self.live.lock().snapshot(),
        };
        let keys = gather(&self.key_schema(schema, shown)?, &batches, &indices)?;
        let kept = keep(&keys)?;
        if kept.len() != indices.len() {
            return Err(ArrowError::ComputeError(format!(
                "a last-value cache selection answered for {} of {} series",
                kept.len(),
                indices.len()
            ))
            .into());
        }
        let selected: Vec<(usize, usize)> = indices
            .into_iter()
            .zip(kept.iter())
            .filter(|(_, k)| *k == Some(true))
            .map(|(i, _)| i)
            .collect();
        let rows = gather(schema, &batches, &selected)?;
        let columns = rows
            .columns()
            .iter()
            .map(|c| match c.as_any_dictionary_opt() {
                Some(d) => garbage_collect_any_dictionary(d),
                None => Ok(Arc::clone(c)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(rows.schema(), columns)?)
    }

    /// The schema of the keys [`Self::rows_where`] shows its `keep` for `shown`.
    pub fn key_schema(&self, schema: &SchemaRef, shown: &[&str]) -> Result<SchemaRef, ArrowError> {
        Ok(Arc::new(
            schema.project(&self.shown_key_columns(schema, shown))?,
        ))
    }

    /// Positions in `schema` of the key columns among `shown`, in the cache's key order.
    fn shown_key_columns(&self, schema: &SchemaRef, shown: &[&str]) -> Vec<usize> {
        self.key_columns
            .iter()
            .filter(|name| shown.contains(&name.as_str()))
            .filter_map(|name| schema.index_of(name).ok())
            .collect()
    }

    /// Drops the keys whose latest row `predicate` deletes, when that keeps the cache
    /// exact: the delete has no lower bound on time, so every older row of such a key is
    /// deleted too (a delete names tags and time, and a key's rows share its tags).
    /// `false` (nothing changed) when a key's latest row is deleted but older ones may
    /// remain: the cache must read its table again. `schema` is the table's.
    pub fn remove_deleted(
        &self,
        schema: &SchemaRef,
        predicate: &DeletePredicate,
    ) -> Result<bool, ArrowError> {
        let mut live = self.live.lock();
        let (batches, indices) = live.snapshot();
        let rows = gather(schema, &batches, &indices)?;
        let matched = predicate.matches(&rows);
        if matched.true_count() == 0 {
            return Ok(true);
        }
        if predicate.min_time != i64::MIN {
            return Ok(false);
        }
        let kept = arrow::compute::filter_record_batch(&rows, &arrow::compute::not(&matched)?)?;
        let mut fresh = Rows::new();
        fresh.offer(&self.key_columns, &kept)?;
        *live = fresh;
        // Changed: its snapshot is stored again.
        self.offered.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// How many keys the cache holds.
    pub fn len(&self) -> usize {
        self.live.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Older rows being gathered for a cache's warm-up, oldest write first.
pub struct Warming {
    cache: Arc<LastCache>,
    rows: Rows,
}

impl Warming {
    pub fn offer(&mut self, batch: &RecordBatch) -> Result<(), ArrowError> {
        self.rows.offer(&self.cache.key_columns, batch)?;
        if self.rows.slots.len() > self.cache.max_series {
            return Err(ArrowError::InvalidArgumentError(self.cache.too_many()));
        }
        Ok(())
    }

    /// Adds what was gathered to the cache and marks it warm (unless it failed).
    pub fn finish(self) -> Result<(), ArrowError> {
        let mut live = self.cache.live.lock();
        live.absorb_older(self.rows)?;
        let series = live.slots.len();
        drop(live);
        if series > self.cache.max_series {
            return Err(ArrowError::InvalidArgumentError(self.cache.too_many()));
        }
        self.cache.status.send_if_modified(|s| {
            let warming = *s == CacheStatus::Warming;
            if warming {
                *s = CacheStatus::Warm;
            }
            warming
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{
        DictionaryArray, Float64Array, Int32Array, StringArray, TimestampNanosecondArray,
    };
    use std::collections::BTreeMap;

    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn batch(rows: &[(&str, i64, Option<f64>, Option<f64>)]) -> RecordBatch {
        batch_with(rows, false)
    }

    /// `shared`: one dictionary entry per distinct host (as the write path builds them),
    /// else one per row (values repeat).
    fn batch_with(rows: &[(&str, i64, Option<f64>, Option<f64>)], shared: bool) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("host", ColumnType::Tag.arrow_type(), true),
            Field::new("time", ColumnType::Time.arrow_type(), false),
            Field::new("a", DataType::Float64, true),
            Field::new("b", DataType::Float64, true),
        ]));
        let hosts: DictionaryArray<Int32Type> = if shared {
            rows.iter().map(|r| r.0).collect()
        } else {
            DictionaryArray::new(
                Int32Array::from((0..rows.len() as i32).collect::<Vec<_>>()),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
            )
        };
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(hosts),
                Arc::new(TimestampNanosecondArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    type Row = (String, i64, Option<f64>, Option<f64>);

    fn latest(cache: &LastCache, schema: &SchemaRef) -> Vec<Row> {
        rows_of(&cache.rows(schema).unwrap())
    }

    fn rows_of(b: &RecordBatch) -> Vec<Row> {
        let host = cast(b.column(0), &DataType::Utf8).unwrap();
        let host = host.as_string::<i32>();
        let time = cast(b.column(1), &DataType::Int64).unwrap();
        let time = time.as_primitive::<Int64Type>();
        let a = b.column(2).as_primitive::<arrow::datatypes::Float64Type>();
        let bb = b.column(3).as_primitive::<arrow::datatypes::Float64Type>();
        let mut out: Vec<_> = (0..b.num_rows())
            .map(|i| {
                (
                    host.value(i).to_owned(),
                    time.value(i),
                    a.is_valid(i).then(|| a.value(i)),
                    bb.is_valid(i).then(|| bb.value(i)),
                )
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }

    /// A few series of many, held in several batches whose dictionaries hold every host:
    /// the right rows, and dictionaries of only the values they use.
    #[test]
    fn a_few_series_of_many_come_back_with_their_own_dictionary_values() {
        let cache = Arc::new(LastCache::new(vec!["host".into()], 10_000));
        let names: Vec<String> = (0..400).map(|h| format!("h{h}")).collect();
        // Round r writes every (r + 1)th host: latest rows end up in different batches.
        for round in 0..3i64 {
            let rows: Vec<_> = names
                .iter()
                .enumerate()
                .filter(|(h, _)| *h as i64 % (round + 1) == 0)
                .map(|(h, n)| {
                    (
                        n.as_str(),
                        round * 10 + h as i64 % 7,
                        Some(round as f64),
                        None,
                    )
                })
                .collect();
            cache.offer(&batch_with(&rows, true));
        }
        let schema = batch(&[]).schema();
        let among = KeyValues {
            column: "host".into(),
            values: vec![Some("h3".into()), Some("h250".into()), Some("nope".into())],
        };
        let read = cache
            .rows_where::<ArrowError>(&schema, &["host"], Some(&among), |keys| {
                Ok(BooleanArray::from(vec![true; keys.num_rows()]))
            })
            .unwrap();
        assert_eq!(
            rows_of(&read),
            [
                ("h250".into(), 10 + 250 % 7, Some(1.0), None),
                ("h3".into(), 23, Some(2.0), None)
            ]
        );
        let hosts = read.column(0).as_any_dictionary();
        assert!(hosts.values().len() <= 2, "{} values", hosts.values().len());
        // All of them: the same as reading every row.
        let all = cache
            .rows_where::<ArrowError>(&schema, &["host"], None, |keys| {
                Ok(BooleanArray::from(vec![true; keys.num_rows()]))
            })
            .unwrap();
        assert_eq!(rows_of(&all), latest(&cache, &schema));
        assert_eq!(all.num_rows(), 400);

        // A series without a host (its key NULL), picked with another.
        let no_host = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(DictionaryArray::<Int32Type>::from_iter([None, Some("h5")])),
                Arc::new(TimestampNanosecondArray::from(vec![50, 50])),
                Arc::new(Float64Array::from(vec![Some(5.0), Some(6.0)])),
                Arc::new(Float64Array::from(vec![None, None])),
            ],
        )
        .unwrap();
        cache.offer(&no_host);
        let among = KeyValues {
            column: "host".into(),
            values: vec![None, Some("h5".into()), Some("h7".into())],
        };
        let read = cache
            .rows_where::<ArrowError>(&schema, &["host"], Some(&among), |keys| {
                Ok(BooleanArray::from(vec![true; keys.num_rows()]))
            })
            .unwrap();
        let hosts = cast(read.column(0), &DataType::Utf8).unwrap();
        let a = read
            .column(2)
            .as_primitive::<arrow::datatypes::Float64Type>();
        let mut got: Vec<(Option<&str>, f64)> = hosts
            .as_string::<i32>()
            .iter()
            .zip(a.values().iter().copied())
            .collect();
        got.sort_by(|x, y| x.partial_cmp(y).unwrap());
        assert_eq!(got, [(None, 5.0), (Some("h5"), 6.0), (Some("h7"), 0.0)]);
    }

    #[test]
    fn a_key_column_value_is_read_back_from_a_key() {
        let values = [Some("site-a"), None, Some(""), Some("line 7")];
        let mut key = Vec::new();
        for v in values {
            push_value(&mut key, v);
        }
        for (column, v) in values.iter().enumerate() {
            let mut alone = Vec::new();
            push_value(&mut alone, *v);
            assert_eq!(key_value(&key, column), alone.as_slice(), "column {column}");
        }
    }

    #[test]
    fn keeps_the_latest_row_per_key_and_merges_rewrites_of_its_time() {
        let cache = Arc::new(LastCache::new(vec!["host".into()], 1_000));
        let schema = batch(&[]).schema();
        cache.offer(&batch(&[
            ("x", 1, Some(1.0), Some(1.0)),
            ("y", 5, Some(5.0), None),
        ]));
        cache.offer(&batch(&[
            ("x", 3, Some(3.0), None),
            ("y", 4, Some(4.0), Some(4.0)),
        ]));
        // x's time 3 again, setting b only: a stays 3.0.
        cache.offer(&batch(&[("x", 3, None, Some(33.0))]));
        assert_eq!(
            latest(&cache, &schema),
            [
                ("x".into(), 3, Some(3.0), Some(33.0)),
                ("y".into(), 5, Some(5.0), None)
            ]
        );
        // Older rows found while warming lose to live ones, or merge under them.
        let mut warming = cache.warming();
        warming
            .offer(&batch(&[
                ("x", 3, Some(0.5), Some(0.5)),
                ("y", 5, None, Some(7.0)),
                ("z", 9, Some(9.0), None),
            ]))
            .unwrap();
        warming.finish().unwrap();
        assert!(cache.is_warm());
        assert_eq!(
            latest(&cache, &schema),
            [
                ("x".into(), 3, Some(3.0), Some(33.0)),
                ("y".into(), 5, Some(5.0), Some(7.0)),
                ("z".into(), 9, Some(9.0), None)
            ]
        );
        // Many writes compact into one batch and keep answering the same.
        for t in 10..100 {
            cache.offer(&batch(&[("x", t, Some(t as f64), None)]));
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(
            latest(&cache, &schema)[0],
            ("x".into(), 99, Some(99.0), None)
        );
    }

    proptest::proptest! {
        /// Whatever the writes (series repeated within a batch, rewrites of a latest time
        /// setting some fields, dictionaries shared or repeating values, enough batches
        /// to compact), the cache holds each host's row at its latest time with each
        /// field from the last write that set it; selecting hosts returns theirs alone,
        /// with dictionaries holding only their values.
        #[test]
        fn holds_what_the_last_write_wins_rule_gives(
            writes in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        (0..4usize, 0..6i64, proptest::option::of(0..100i32),
                         proptest::option::of(0..100i32)),
                        1..8,
                    ),
                    proptest::bool::ANY,
                ),
                1..45,
            ),
            picked in proptest::collection::btree_set(0..4usize, 0..4),
        ) {
            const HOSTS: [&str; 4] = ["h0", "h1", "h2", "h3"];
            let cache = LastCache::new(vec!["host".into()], 1_000);
            let schema = batch(&[]).schema();
            let wanted: Vec<&str> = picked.iter().map(|&h| HOSTS[h]).collect();
            // Reads picking `wanted` by a filter alone, and through the index of hosts
            // (made by the first such read, half-way through the writes).
            let among = KeyValues {
                column: "host".into(),
                values: wanted.iter().map(|h| Some((*h).to_owned())).collect(),
            };
            let select = |among: Option<&KeyValues>| {
                cache
                    .rows_where(&schema, &["host"], among, |keys| {
                        let hosts = cast(keys.column(0), &DataType::Utf8)?;
                        Ok::<_, ArrowError>(
                            hosts
                                .as_string::<i32>()
                                .iter()
                                .map(|h| Some(h.is_some_and(|h| wanted.contains(&h))))
                                .collect(),
                        )
                    })
                    .unwrap()
            };
            let mut model: BTreeMap<String, Row> = BTreeMap::new();
            for (i, (rows, shared)) in writes.iter().enumerate() {
                if i == writes.len() / 2 {
                    select(Some(&among));
                }
                let rows: Vec<_> = rows
                    .iter()
                    .map(|&(h, t, a, b)| (HOSTS[h], t, a.map(f64::from), b.map(f64::from)))
                    .collect();
                cache.offer(&batch_with(&rows, *shared));
                for &(h, t, a, b) in &rows {
                    let held = model.entry(h.to_owned()).or_insert((h.to_owned(), t, a, b));
                    if t > held.1 {
                        *held = (h.to_owned(), t, a, b);
                    } else if t == held.1 {
                        held.2 = a.or(held.2);
                        held.3 = b.or(held.3);
                    }
                }
            }
            proptest::prop_assert_eq!(latest(&cache, &schema), model.values().cloned().collect::<Vec<_>>());
            let expected: Vec<Row> =
                model.values().filter(|r| wanted.contains(&r.0.as_str())).cloned().collect();
            for among in [None, Some(&among)] {
                let selected = select(among);
                let rows = rows_of(&selected);
                proptest::prop_assert_eq!(&rows, &expected);
                let values = selected.column(0).as_any_dictionary().values().len();
                proptest::prop_assert_eq!(values, expected.len());
            }
        }
    }

    #[test]
    fn a_delete_drops_the_keys_it_empties_and_asks_for_a_rebuild_when_older_rows_may_remain() {
        use crate::catalog::tombstones::TagCondition;
        let cache = LastCache::new(vec!["host".into()], 100);
        let rows = batch(&[("a", 5, Some(1.0), None), ("b", 6, Some(2.0), None)]);
        cache.offer(&rows);
        let schema = rows.schema();
        let host = |h: &str| TagCondition {
            tag: "host".into(),
            values: vec![h.into()],
            negated: false,
        };
        let offered = cache.offered();
        // Every row of `a`: its key goes, and the cache counts as changed.
        let all_of_a = DeletePredicate {
            tags: vec![host("a")],
            ..DeletePredicate::all()
        };
        assert!(cache.remove_deleted(&schema, &all_of_a).unwrap());
        assert_eq!(
            latest(&cache, &schema),
            [("b".to_owned(), 6, Some(2.0), None)]
        );
        assert!(cache.offered() > offered);
        // `b` from time 6 on: older rows of `b` may remain, so nothing changes here.
        let recent_b = DeletePredicate {
            tags: vec![host("b")],
            min_time: 6,
            max_time: i64::MAX,
        };
        assert!(!cache.remove_deleted(&schema, &recent_b).unwrap());
        assert_eq!(cache.len(), 1);
        // A delete that misses every latest row changes nothing and needs nothing.
        let old_b = DeletePredicate {
            tags: vec![host("b")],
            min_time: 0,
            max_time: 5,
        };
        assert!(cache.remove_deleted(&schema, &old_b).unwrap());
        assert_eq!(cache.len(), 1);
        // New writes still land.
        cache.offer(&batch(&[("a", 9, Some(3.0), None)]));
        assert_eq!(cache.len(), 2);
    }
}

//! Device health: every series (table and tag set) the write path has seen, with when it
//! was first and last seen, how many rows it sent lately, and what its writes looked like.
//!
//! A projection of the log like the last-value cache: every applied write updates it
//! (grouping a batch's rows by their tags' dictionary keys, so the per-row cost is a
//! small hash), WAL replay rebuilds what was not persisted, and the persister snapshots it
//! to `series/inventory.json` in the object store before it lets WAL files go, so a
//! restart loses nothing the log no longer holds. Row counts per minute are kept in
//! memory only (they describe the last hour).
//!
//! Per table, counters of what writes looked like since start: rows, rows older than
//! their series' latest row (out of order), and rows for a time partition already
//! persisted (late).

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, TimestampNanosecondType};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogState, ColumnType, TIME_COLUMN};
use crate::ids::TableId;

const MINUTE: i64 = 60_000_000_000;
/// One-minute buckets kept: an hour.
const BUCKETS: usize = 60;

/// One series' record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesRecord {
    pub table: TableId,
    /// Its tags (those it has; a null tag is absent).
    pub tags: BTreeMap<String, String>,
    /// Earliest and latest row time seen, nanoseconds since the epoch.
    pub first_seen: i64,
    pub last_seen: i64,
    /// Rows received per minute of arrival, the current minute last (not persisted).
    #[serde(skip)]
    minutes: Minutes,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Minutes {
    /// Minute (arrival time / 1 min) of `counts[BUCKETS - 1]`.
    newest: i64,
    counts: Vec<u32>,
}

impl Minutes {
    fn advance(&mut self, minute: i64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
            self.newest = minute;
            return;
        }
        let shift = minute.saturating_sub(self.newest);
        if shift <= 0 {
            return;
        }
        let shift = usize::try_from(shift).unwrap_or(BUCKETS).min(BUCKETS);
        self.counts.rotate_left(shift);
        for c in &mut self.counts[BUCKETS - shift..] {
            *c = 0;
        }
        self.newest = minute;
    }

    fn add(&mut self, minute: i64, rows: u32) {
        self.advance(minute);
        if let Some(last) = self.counts.last_mut() {
            *last = last.saturating_add(rows);
        }
    }

    /// Rows in the last `n` minutes (the current one included) as of `minute`.
    fn sum(&self, minute: i64, n: usize) -> u64 {
        if self.counts.is_empty() {
            return 0;
        }
        let behind = usize::try_from(minute.saturating_sub(self.newest)).unwrap_or(BUCKETS);
        if behind >= n {
            return 0;
        }
        self.counts[BUCKETS - (n - behind)..]
            .iter()
            .map(|c| u64::from(*c))
            .sum()
    }
}

impl SeriesRecord {
    /// Rows received in the last minute and the last hour, as of `now`.
    pub fn recent_rows(&self, now: i64) -> (u64, u64) {
        let minute = now.div_euclid(MINUTE);
        (
            self.minutes.sum(minute, 1),
            self.minutes.sum(minute, BUCKETS),
        )
    }
}

/// What the writes of one table looked like since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableQuality {
    pub rows: u64,
    /// Rows older than their series' latest row when they arrived.
    pub out_of_order_rows: u64,
    /// Rows for a time partition that already had a persisted segment.
    pub late_rows: u64,
    /// Lines rejected by a front end (counted by the server through [`SeriesTracker::reject`]).
    pub rejected_lines: u64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Per table, series by [`raw_key`].
    series: HashMap<TableId, HashMap<Box<[u8]>, SeriesRecord, ahash::RandomState>>,
    quality: HashMap<TableId, TableQuality>,
}

/// A tag set's key in the inventory: each tag (sorted by name) as name, 0, value, 1.
/// Built in a reused buffer, so a known series costs no allocation.
fn raw_key<'a>(out: &mut Vec<u8>, tags: impl IntoIterator<Item = (&'a str, &'a str)>) {
    out.clear();
    for (name, value) in tags {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(1);
    }
}

/// Every series seen, and per-table write quality (see the module docs).
#[derive(Debug)]
pub struct SeriesTracker {
    inner: Mutex<Inner>,
    clock: fn() -> i64,
}

impl Default for SeriesTracker {
    fn default() -> Self {
        Self::with_clock(crate::now_nanos)
    }
}

/// The snapshot's encoding: `{"version": 1, "series": [SeriesRecord, …]}`.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    series: Vec<SeriesRecord>,
}

/// A batch's rows grouped by series.
pub(crate) struct Groups {
    /// Group of each row.
    pub(crate) group_of: Vec<u32>,
    /// First row of each group.
    pub(crate) first_rows: Vec<usize>,
}

/// Groups rows by their tags' dictionary keys (`-1` for null): a hash of the keys finds a
/// candidate group, whose first row is compared key by key; rows whose hash collides
/// with another tag set's go through a map of the keys themselves.
pub(crate) fn group_rows(
    dicts: &[&arrow::array::DictionaryArray<Int32Type>],
    rows: usize,
) -> Groups {
    let keys: Vec<_> = dicts.iter().map(|d| (d.keys(), d.nulls())).collect();
    let key = |i: usize, row: usize| -> i32 {
        let (k, nulls) = &keys[i];
        if nulls.is_some_and(|n| n.is_null(row)) {
            -1
        } else {
            k.value(row)
        }
    };
    let same = |a: usize, b: usize| (0..keys.len()).all(|i| key(i, a) == key(i, b));
    let mut by_hash: HashMap<u64, u32, ahash::RandomState> = HashMap::default();
    let mut collided: HashMap<Vec<i32>, u32> = HashMap::new();
    let mut out = Groups {
        group_of: Vec::with_capacity(rows),
        first_rows: Vec::new(),
    };
    for row in 0..rows {
        // FNV-1a over the keys.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for i in 0..keys.len() {
            h = (h ^ u64::from(key(i, row) as u32)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let next = out.first_rows.len() as u32;
        let g = match by_hash.get(&h) {
            None => {
                by_hash.insert(h, next);
                out.first_rows.push(row);
                next
            }
            Some(&g) if same(out.first_rows[g as usize], row) => g,
            Some(_) => {
                let tuple: Vec<i32> = (0..keys.len()).map(|i| key(i, row)).collect();
                *collided.entry(tuple).or_insert_with(|| {
                    out.first_rows.push(row);
                    next
                })
            }
        };
        out.group_of.push(g);
    }
    out
}

/// Path of the snapshot in the object store.
pub const SNAPSHOT_PATH: &str = "series/inventory.json";

impl SeriesTracker {
    pub fn with_clock(clock: fn() -> i64) -> Self {
        Self {
            inner: Mutex::default(),
            clock,
        }
    }

    /// Takes one applied write of `table`. `arrived`: it arrived now (not replayed), so
    /// its rows count as recent and its quality is counted.
    pub fn offer(&self, state: &CatalogState, table: TableId, batch: &RecordBatch, arrived: bool) {
        let Some(def) = state.table_by_id(table) else {
            return;
        };
        let Some(times) = batch
            .column_by_name(TIME_COLUMN)
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        else {
            return;
        };
        // The tag columns, sorted by name, as dictionaries.
        let mut tags: Vec<(&str, arrow::array::ArrayRef)> = Vec::new();
        for c in def.tag_columns() {
            let Some(col) = batch.column_by_name(&c.name) else {
                continue;
            };
            let col = match col.data_type() {
                DataType::Dictionary(k, _) if **k == DataType::Int32 => col.clone(),
                _ => match arrow::compute::cast(col, &ColumnType::Tag.arrow_type()) {
                    Ok(c) => c,
                    Err(_) => continue,
                },
            };
            tags.push((c.name.as_str(), col));
        }
        tags.sort_by(|a, b| a.0.cmp(b.0));
        let dicts: Vec<_> = tags
            .iter()
            .map(|(_, c)| c.as_dictionary::<Int32Type>())
            .collect();
        let groups = group_rows(&dicts, batch.num_rows());
        // Per group: row count, earliest and latest time.
        let n = groups.first_rows.len();
        let mut counts = vec![0u32; n];
        let mut earliest = vec![i64::MAX; n];
        let mut latest = vec![i64::MIN; n];
        for (row, &g) in groups.group_of.iter().enumerate() {
            if times.is_valid(row) {
                let (g, t) = (g as usize, times.value(row));
                counts[g] = counts[g].saturating_add(1);
                earliest[g] = earliest[g].min(t);
                latest[g] = latest[g].max(t);
            }
        }
        let now = (self.clock)();
        let minute = now.div_euclid(MINUTE);
        let mut inner = self.inner.lock();
        let Inner { series, quality } = &mut *inner;
        let table_series = series.entry(table).or_default();
        // Each group's series: the latest time it had before this batch, then updated.
        let mut previous = Vec::with_capacity(n);
        let mut key = Vec::new();
        for (g, &row) in groups.first_rows.iter().enumerate() {
            let row_tags = tags.iter().zip(&dicts).filter_map(|((name, _), d)| {
                if !d.is_valid(row) {
                    return None;
                }
                let values = d.values().as_string::<i32>();
                let k = usize::try_from(d.keys().value(row)).ok()?;
                (k < values.len()).then(|| (*name, values.value(k)))
            });
            raw_key(&mut key, row_tags.clone());
            let record = match table_series.get_mut(key.as_slice()) {
                Some(record) => record,
                None => table_series
                    .entry(key.clone().into_boxed_slice())
                    .or_insert_with(|| SeriesRecord {
                        table,
                        tags: row_tags
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                        first_seen: i64::MAX,
                        last_seen: i64::MIN,
                        minutes: Minutes::default(),
                    }),
            };
            previous.push((record.last_seen != i64::MIN).then_some(record.last_seen));
            if counts[g] > 0 {
                record.first_seen = record.first_seen.min(earliest[g]);
                record.last_seen = record.last_seen.max(latest[g]);
                if arrived {
                    record.minutes.add(minute, counts[g]);
                }
            }
        }
        if !arrived {
            return;
        }
        // Out of order: older than the series' latest row before this batch. Late: for a
        // partition already persisted.
        let mut persisted: Vec<i64> = state.segments(table).iter().map(|s| s.partition).collect();
        persisted.sort_unstable();
        persisted.dedup();
        let (mut out_of_order, mut late) = (0u64, 0u64);
        for (row, &g) in groups.group_of.iter().enumerate() {
            if !times.is_valid(row) {
                continue;
            }
            let t = times.value(row);
            if previous[g as usize].is_some_and(|p| t < p) {
                out_of_order += 1;
            }
            if !persisted.is_empty() && persisted.binary_search(&def.partition_of(t)).is_ok() {
                late += 1;
            }
        }
        let q = quality.entry(table).or_default();
        q.rows += batch.num_rows() as u64;
        q.out_of_order_rows += out_of_order;
        q.late_rows += late;
    }

    /// Counts `lines` rejected lines of `table`.
    pub fn reject(&self, table: TableId, lines: u64) {
        self.inner
            .lock()
            .quality
            .entry(table)
            .or_default()
            .rejected_lines += lines;
    }

    /// Forgets the series and write quality of a deleted table.
    pub fn forget_table(&self, table: TableId) {
        let mut inner = self.inner.lock();
        inner.series.remove(&table);
        inner.quality.remove(&table);
    }

    /// Every series, by table.
    pub fn series(&self) -> Vec<SeriesRecord> {
        let inner = self.inner.lock();
        inner
            .series
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// The write quality of every table that was written since start.
    pub fn quality(&self) -> HashMap<TableId, TableQuality> {
        self.inner.lock().quality.clone()
    }

    /// The snapshot to store.
    pub fn encode(&self) -> Vec<u8> {
        let snapshot = Snapshot {
            version: 1,
            series: self.series(),
        };
        serde_json::to_vec(&snapshot).unwrap_or_default()
    }

    /// Takes a stored snapshot's series (merged with what is already here).
    pub fn load(&self, bytes: &[u8]) -> Result<usize, String> {
        let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if snapshot.version != 1 {
            return Err(format!(
                "unsupported series inventory version {}; supported versions: [1]",
                snapshot.version
            ));
        }
        let n = snapshot.series.len();
        let mut inner = self.inner.lock();
        let mut key = Vec::new();
        for s in snapshot.series {
            raw_key(
                &mut key,
                s.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            );
            let entry = inner
                .series
                .entry(s.table)
                .or_default()
                .entry(key.clone().into_boxed_slice())
                .or_insert_with(|| s.clone());
            entry.first_seen = entry.first_seen.min(s.first_seen);
            entry.last_seen = entry.last_seen.max(s.last_seen);
        }
        Ok(n)
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int32Array, StringArray};

    use super::*;

    fn dict(keys: &[Option<i32>], values: &[&str]) -> ArrayRef {
        Arc::new(
            arrow::array::DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(keys.to_vec()),
                Arc::new(StringArray::from(values.to_vec())),
            )
            .unwrap(),
        )
    }

    #[test]
    fn rows_group_by_their_tag_set_with_nulls_as_absent() {
        let host = dict(&[Some(0), Some(0), Some(1), Some(0), Some(1)], &["a", "b"]);
        let line = dict(&[None, Some(0), Some(0), None, Some(0)], &["x"]);
        let dicts = [
            host.as_dictionary::<Int32Type>(),
            line.as_dictionary::<Int32Type>(),
        ];
        let groups = group_rows(&dicts, 5);
        assert_eq!(groups.group_of, [0, 1, 2, 0, 2]);
        assert_eq!(groups.first_rows, [0, 1, 2]);
    }

    #[test]
    fn minute_buckets_count_the_last_minute_and_hour() {
        let mut m = Minutes::default();
        m.add(100, 5);
        m.add(101, 7);
        assert_eq!((m.sum(101, 1), m.sum(101, BUCKETS)), (7, 12));
        assert_eq!((m.sum(102, 1), m.sum(102, BUCKETS)), (0, 12));
        m.add(100 + BUCKETS as i64, 1);
        assert_eq!(
            m.sum(100 + BUCKETS as i64, BUCKETS),
            8,
            "minute 100 left the hour"
        );
        assert_eq!(m.sum(1_000, BUCKETS), 0);
    }
}

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
    /// Per table, series by their canonical key ([`crate::catalog::alerts::series_key`]).
    series: HashMap<TableId, HashMap<String, SeriesRecord>>,
    quality: HashMap<TableId, TableQuality>,
}

/// Every series seen, and per-table write quality (see the module docs).
#[derive(Debug)]
pub struct SeriesTracker {
    inner: Mutex<Inner>,
    clock: fn() -> i64,
}

fn system_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

impl Default for SeriesTracker {
    fn default() -> Self {
        Self::with_clock(system_now)
    }
}

/// The snapshot's encoding: `{"version": 1, "series": [SeriesRecord, …]}`.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    series: Vec<SeriesRecord>,
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
        // Rows grouped by their tags' dictionary keys (-1: null).
        let mut groups: HashMap<Vec<i32>, usize> = HashMap::new();
        let mut group_of = Vec::with_capacity(batch.num_rows());
        let mut firsts = Vec::new();
        let mut key = Vec::with_capacity(dicts.len());
        for row in 0..batch.num_rows() {
            key.clear();
            key.extend(dicts.iter().map(|d| {
                if d.is_valid(row) {
                    d.keys().value(row)
                } else {
                    -1
                }
            }));
            let next = groups.len();
            let g = *groups.entry(key.clone()).or_insert_with(|| {
                firsts.push(row);
                next
            });
            group_of.push(g);
        }
        let now = (self.clock)();
        let minute = now.div_euclid(MINUTE);
        let persisted: Vec<i64> = if arrived {
            let mut p: Vec<i64> = state.segments(table).iter().map(|s| s.partition).collect();
            p.sort_unstable();
            p.dedup();
            p
        } else {
            Vec::new()
        };
        let mut inner = self.inner.lock();
        let Inner { series, quality } = &mut *inner;
        let table_series = series.entry(table).or_default();
        // Per group: its key, the latest time before this batch, and this batch's stats.
        let mut previous = Vec::with_capacity(firsts.len());
        let mut keys = Vec::with_capacity(firsts.len());
        for &row in &firsts {
            let mut tagset = BTreeMap::new();
            for ((name, _), d) in tags.iter().zip(&dicts) {
                if d.is_valid(row) {
                    let values = d.values().as_string::<i32>();
                    let k = d.keys().value(row) as usize;
                    if k < values.len() {
                        tagset.insert((*name).to_owned(), values.value(k).to_owned());
                    }
                }
            }
            let key = crate::catalog::alerts::series_key(&tagset);
            previous.push(table_series.get(&key).map(|s| s.last_seen));
            if !table_series.contains_key(&key) {
                table_series.insert(
                    key.clone(),
                    SeriesRecord {
                        table,
                        tags: tagset,
                        first_seen: i64::MAX,
                        last_seen: i64::MIN,
                        minutes: Minutes::default(),
                    },
                );
            }
            keys.push(key);
        }
        let mut counts = vec![0u32; keys.len()];
        let (mut out_of_order, mut late) = (0u64, 0u64);
        for (row, &g) in group_of.iter().enumerate() {
            if !times.is_valid(row) {
                continue;
            }
            let t = times.value(row);
            counts[g] = counts[g].saturating_add(1);
            if let Some(record) = table_series.get_mut(&keys[g]) {
                record.first_seen = record.first_seen.min(t);
                record.last_seen = record.last_seen.max(t);
            }
            if arrived {
                if previous[g].is_some_and(|p| t < p) {
                    out_of_order += 1;
                }
                if !persisted.is_empty() && persisted.binary_search(&def.partition_of(t)).is_ok() {
                    late += 1;
                }
            }
        }
        if arrived {
            for (g, key) in keys.iter().enumerate() {
                if let Some(record) = table_series.get_mut(key) {
                    record.minutes.add(minute, counts[g]);
                }
            }
            let q = quality.entry(table).or_default();
            q.rows += batch.num_rows() as u64;
            q.out_of_order_rows += out_of_order;
            q.late_rows += late;
        }
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
        for s in snapshot.series {
            let key = crate::catalog::alerts::series_key(&s.tags);
            let entry = inner
                .series
                .entry(s.table)
                .or_default()
                .entry(key)
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

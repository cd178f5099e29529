//! Tombstones: deletes of rows (`DELETE FROM t WHERE <tags> [AND <time range>]`), ordered
//! among writes by their WAL sequence, applied at read time and made physical by
//! compaction (design: `docs/lifecycle.md`).
//!
//! A tombstone deletes the rows of its table that its [`DeletePredicate`] matches and that
//! were written at a WAL sequence below its own (`through`); rows written after it stay.
//! Of the persisted segments, it applies to those with an id below `segments_before`
//! (persisted before it). A predicate names only tags and time, the columns that identify
//! a row, so every version of a row is deleted alike.
//!
//! ## Payload of a [`RecordKind::Delete`](crate::wal::RecordKind) WAL record
//!
//! JSON (`{"version": 1, "table": 3, "predicate": {…}}`, [`DeleteRecord`]): a delete is
//! rare and small; the record's CRC has been verified before it is decoded.

use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{Int32Type, TimestampNanosecondType};
use serde::{Deserialize, Serialize};

use super::TIME_COLUMN;
use crate::ids::{SegmentId, SequenceNumber, TableId, TombstoneId};

/// Rows of one tag whose value is (or, `negated`, is not) one of `values`. A row without
/// the tag matches neither (SQL's `NULL = 'x'` and `NULL <> 'x'` are both not true).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagCondition {
    pub tag: String,
    pub values: Vec<String>,
    #[serde(default)]
    pub negated: bool,
}

/// What a delete removes: rows whose tags match every condition and whose time lies in
/// `min_time..=max_time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePredicate {
    pub tags: Vec<TagCondition>,
    pub min_time: i64,
    pub max_time: i64,
}

impl DeletePredicate {
    /// Every row (`DELETE FROM t`).
    pub fn all() -> Self {
        Self {
            tags: Vec::new(),
            min_time: i64::MIN,
            max_time: i64::MAX,
        }
    }

    /// Whether a source whose rows lie in `min..=max` may hold rows it matches.
    pub fn overlaps(&self, min: i64, max: i64) -> bool {
        min <= self.max_time && max >= self.min_time
    }

    /// Per row of `batch` (a table's columns, tags dictionary-encoded), whether it is
    /// deleted.
    pub fn matches(&self, batch: &RecordBatch) -> BooleanArray {
        let rows = batch.num_rows();
        let mut keep: Vec<bool> = match batch
            .column_by_name(TIME_COLUMN)
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        {
            Some(times) => times
                .iter()
                .map(|t| t.is_some_and(|t| t >= self.min_time && t <= self.max_time))
                .collect(),
            None => vec![false; rows],
        };
        for condition in &self.tags {
            let Some(column) = batch.column_by_name(&condition.tag) else {
                // A row without the tag matches no condition on it.
                return BooleanArray::from(vec![false; rows]);
            };
            match column.as_dictionary_opt::<Int32Type>() {
                Some(dict) => {
                    let values = dict.values().as_string_opt::<i32>();
                    let hit: Vec<bool> = match values {
                        Some(values) => values
                            .iter()
                            .map(|v| {
                                v.is_some_and(|v| {
                                    condition.values.iter().any(|c| c == v) != condition.negated
                                })
                            })
                            .collect(),
                        None => vec![false; dict.values().len()],
                    };
                    for (row, key) in dict.keys().iter().enumerate() {
                        keep[row] &= key.is_some_and(|k| {
                            usize::try_from(k)
                                .ok()
                                .and_then(|k| hit.get(k))
                                .copied()
                                .unwrap_or(false)
                        });
                    }
                }
                None => match column.as_string_opt::<i32>() {
                    Some(strings) => {
                        for (row, v) in strings.iter().enumerate() {
                            keep[row] &= v.is_some_and(|v| {
                                condition.values.iter().any(|c| c == v) != condition.negated
                            });
                        }
                    }
                    None => return BooleanArray::from(vec![false; rows]),
                },
            }
        }
        BooleanArray::from(keep)
    }

    /// The rows of `batch` it does not match.
    pub fn remove_from(
        &self,
        batch: &RecordBatch,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let matched = self.matches(batch);
        if matched.true_count() == 0 {
            return Ok(batch.clone());
        }
        let kept = arrow::compute::not(&matched)?;
        arrow::compute::filter_record_batch(batch, &kept)
    }
}

impl std::fmt::Display for DeletePredicate {
    /// As SQL would say it: `host IN ('a', 'b') AND time >= … AND time <= …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .tags
            .iter()
            .map(|c| {
                let values: Vec<String> = c
                    .values
                    .iter()
                    .map(|v| format!("'{}'", v.replace('\'', "''")))
                    .collect();
                let not = if c.negated { "NOT " } else { "" };
                format!("{} {not}IN ({})", c.tag, values.join(", "))
            })
            .collect();
        if self.min_time != i64::MIN {
            parts.push(format!("time >= {}", crate::time::rfc3339(self.min_time)));
        }
        if self.max_time != i64::MAX {
            parts.push(format!("time <= {}", crate::time::rfc3339(self.max_time)));
        }
        if parts.is_empty() {
            return f.write_str("every row");
        }
        f.write_str(&parts.join(" AND "))
    }
}

/// A delete, as the catalog keeps it until compaction has made it physical.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub id: TombstoneId,
    pub table: TableId,
    pub predicate: DeletePredicate,
    /// The WAL sequence of the delete: rows written below it are deleted.
    pub through: SequenceNumber,
    /// Segments with an id below this were persisted before the delete.
    pub segments_before: SegmentId,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
}

impl Tombstone {
    /// Whether it deletes rows of the persisted segment `id` whose rows lie in `min..=max`.
    pub fn applies_to_segment(&self, id: SegmentId, min: i64, max: i64) -> bool {
        id < self.segments_before && self.predicate.overlaps(min, max)
    }
}

/// The payload of a delete's WAL record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRecord {
    pub version: u32,
    pub table: TableId,
    pub predicate: DeletePredicate,
}

impl DeleteRecord {
    pub const VERSION: u32 = 1;

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a delete record serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let record: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if record.version != Self::VERSION {
            return Err(format!(
                "unsupported delete record version {}; supported versions: [{}]",
                record.version,
                Self::VERSION
            ));
        }
        Ok(record)
    }
}

/// The rows of `batch` none of `predicates` matches.
pub fn remove_all<'a>(
    predicates: impl IntoIterator<Item = &'a DeletePredicate>,
    mut batch: RecordBatch,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    for predicate in predicates {
        batch = predicate.remove_from(&batch)?;
    }
    Ok(batch)
}

/// The tombstones of `table` that apply to the segment `id` holding rows in `min..=max`.
pub fn for_segment(
    tombstones: &[Arc<Tombstone>],
    id: SegmentId,
    min: i64,
    max: i64,
) -> Vec<Arc<Tombstone>> {
    tombstones
        .iter()
        .filter(|t| t.applies_to_segment(id, min, max))
        .cloned()
        .collect()
}

//! A coarse row filter for the Parquet reader: the rows a filter keeps, and the short gaps
//! between them.
//!
//! The reader decodes the filter's columns first, then the other columns only for the
//! rows the filter keeps: one read call per column for every run of kept rows and one
//! skip for every gap. Segments are sorted by series, and a filter on a field keeps runs
//! of a few rows while the value hovers around the threshold (`usage_user > 90` in
//! TSBS's `high-cpu-all`: 5,739 runs of 22 rows on average in a 1.44 M-row segment). The
//! calls, not the decoding, are then most of the cost. Keeping gaps of up to [`GAP`]
//! rows as well leaves 1,310 runs for 18 % more rows; the exact filter runs again above
//! the scan (a `FilterExec`), on the rows the reader returns.
//!
//! For pruning (row groups, pages, bloom filters) the coarse filter is its inner filter
//! ([`PhysicalExpr::snapshot`]): a row group where no row passes the filter has no gap
//! between two rows that pass either.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, BooleanBufferBuilder, RecordBatch};
use datafusion::arrow::compute::prep_null_mask_filter;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::Result;
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::{conjunction, split_conjunction};

/// The longest gap between two kept rows that the coarse filter keeps too. Decoding a row
/// of 20 columns costs less than a read and a skip call on each of them.
pub const GAP: usize = 32;

/// Each conjunct of `predicate` made coarse (see the module documentation).
pub fn coarse(predicate: Arc<dyn PhysicalExpr>) -> Arc<dyn PhysicalExpr> {
    conjunction(split_conjunction(&predicate).into_iter().map(|c| {
        Arc::new(CoarseFilter {
            inner: Arc::clone(c),
            gap: GAP,
        }) as Arc<dyn PhysicalExpr>
    }))
}

/// `inner`, and every row between two rows `inner` keeps that are at most `gap` rows
/// apart. Null counts as not kept.
#[derive(Debug, Eq)]
pub struct CoarseFilter {
    inner: Arc<dyn PhysicalExpr>,
    gap: usize,
}

impl PartialEq for CoarseFilter {
    fn eq(&self, other: &Self) -> bool {
        self.gap == other.gap && *self.inner == *other.inner
    }
}

impl Hash for CoarseFilter {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
        self.gap.hash(state);
    }
}

impl fmt::Display for CoarseFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coarse({})", self.inner)
    }
}

impl PhysicalExpr for CoarseFilter {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, _input_schema: &Schema) -> Result<bool> {
        Ok(false)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let kept = self.inner.evaluate(batch)?.into_array(batch.num_rows())?;
        Ok(ColumnarValue::Array(Arc::new(fill_gaps(
            kept.as_boolean(),
            self.gap,
        ))))
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.inner]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        Ok(Arc::new(CoarseFilter {
            inner: Arc::clone(&children[0]),
            gap: self.gap,
        }))
    }

    /// Pruning sees the exact filter.
    fn snapshot(&self) -> Result<Option<Arc<dyn PhysicalExpr>>> {
        Ok(Some(Arc::clone(&self.inner)))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coarse(")?;
        self.inner.fmt_sql(f)?;
        write!(f, ")")
    }
}

/// `kept` (null as false) with every run of false of at most `gap` rows between two true
/// rows set to true.
fn fill_gaps(kept: &BooleanArray, gap: usize) -> BooleanArray {
    let kept = match kept.null_count() {
        0 => kept.clone(),
        _ => prep_null_mask_filter(kept),
    };
    // Each run of kept rows is appended after the gap before it: kept too if it is short
    // and follows a run (`out` then ends where that run ended).
    let mut out = BooleanBufferBuilder::new(kept.len());
    let mut after_run = false;
    for (start, end) in kept.values().set_slices() {
        let gap_len = start - out.len();
        out.append_n(gap_len, after_run && gap_len <= gap);
        out.append_n(end - start, true);
        after_run = true;
    }
    out.append_n(kept.len() - out.len(), false);
    BooleanArray::new(out.finish(), None)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn short_gaps_between_kept_rows_are_kept_and_nulls_are_not() {
        let kept = BooleanArray::from(vec![
            Some(false),
            Some(true),
            Some(false),
            None,
            Some(true),
            Some(false),
            Some(false),
            Some(false),
            Some(true),
            None,
        ]);
        let got: Vec<bool> = fill_gaps(&kept, 2).values().iter().collect();
        assert_eq!(
            got,
            [
                false, true, true, true, true, false, false, false, true, false
            ]
        );
    }

    proptest! {
        /// Every kept row stays kept; a row is added only inside a gap of at most `gap`
        /// rows with kept rows on both sides.
        #[test]
        fn keeps_a_superset_bridging_only_short_gaps(
            kept in prop::collection::vec(prop::option::of(any::<bool>()), 0..300),
            gap in 0usize..8,
        ) {
            let array = BooleanArray::from(kept.clone());
            let got = fill_gaps(&array, gap);
            prop_assert_eq!(got.len(), kept.len());
            prop_assert_eq!(got.null_count(), 0);
            let is_kept = |i: usize| kept[i] == Some(true);
            for i in 0..kept.len() {
                if is_kept(i) {
                    prop_assert!(got.value(i));
                    continue;
                }
                let before = (0..i).rev().find(|&j| is_kept(j));
                let after = (i + 1..kept.len()).find(|&j| is_kept(j));
                let bridged = matches!((before, after), (Some(b), Some(a)) if a - b - 1 <= gap);
                prop_assert_eq!(got.value(i), bridged, "row {}", i);
            }
        }
    }
}

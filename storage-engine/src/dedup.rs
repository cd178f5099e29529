//! Last-write-wins merge: the one rule for rows with the same identity, used by the write
//! buffer, by persistence and by queries that read overlapping data.
//!
//! A row's identity is (tag values, time). Given batches ordered oldest write first,
//! [`merge_last_write_wins`] returns one batch with one row per identity, sorted by tags
//! then time, where each field holds the value of the latest write that set it (non-null).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, UInt32Array, new_null_array,
};
use arrow::buffer::ScalarBuffer;
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};

use crate::catalog::TIME_ZONE;

/// Widens `batch` to `schema`: columns are reordered to the schema's order and columns
/// the batch lacks are filled with nulls. Columns not in `schema` are an error.
pub fn align_to_schema(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema() == *schema {
        return Ok(batch.clone());
    }
    for field in batch.schema().fields() {
        if schema.field_with_name(field.name()).is_err() {
            return Err(ArrowError::SchemaError(format!(
                "column {:?} is not in the table schema",
                field.name()
            )));
        }
    }
    fit_to_schema(batch, schema)
}

/// `schema`'s columns of `batch` (see [`fit_column`]); columns not in `schema` are left
/// out.
pub fn fit_to_schema(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            fit_column(
                batch.column_by_name(f.name()),
                f.data_type(),
                batch.num_rows(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

/// A batch's column (`None`: it has none of that name) as a column of type `to` of a
/// batch of `rows` rows: the column itself, relabelled, cast, or all nulls.
pub fn fit_column(
    column: Option<&ArrayRef>,
    to: &DataType,
    rows: usize,
) -> Result<ArrayRef, ArrowError> {
    match column {
        Some(c) if c.data_type() == to => Ok(Arc::clone(c)),
        // Kiln's time is UTC whether labelled so or not: relabel without copying.
        Some(c) if is_utc_relabel(c.data_type(), to) => Ok(arrow::array::make_array(
            c.to_data().into_builder().data_type(to.clone()).build()?,
        )),
        Some(c) => arrow::compute::cast(c, to),
        None => Ok(new_null_array(to, rows)),
    }
}

/// Whether `from` and `to` are the same timestamps, one zoneless and the other in UTC
/// (either way round): Kiln's times are UTC whether labelled so or not.
fn is_utc_relabel(from: &DataType, to: &DataType) -> bool {
    let utc = |tz: &str| tz == TIME_ZONE || tz == "+00:00";
    match (from, to) {
        (DataType::Timestamp(a, None), DataType::Timestamp(b, Some(tz)))
        | (DataType::Timestamp(a, Some(tz)), DataType::Timestamp(b, None)) => a == b && utc(tz),
        _ => false,
    }
}

/// Merges `batches` (oldest write first) into one deduplicated batch sorted by `key`
/// columns (tags in order, then time), all aligned to `schema`.
pub fn merge_last_write_wins(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    key: &[&str],
) -> Result<RecordBatch, ArrowError> {
    let aligned = batches
        .iter()
        .map(|b| align_to_schema(b, schema))
        .collect::<Result<Vec<_>, _>>()?;
    let all = concat_batches(schema, &aligned)?;
    if all.num_rows() <= 1 {
        return Ok(all);
    }
    let key_indices: Vec<usize> = key
        .iter()
        .map(|k| schema.index_of(k))
        .collect::<Result<_, _>>()?;
    let KeyOrder { rows: order, runs } = sort_and_group(&all, &key_indices)?;

    let no_duplicates = runs.len() == order.len();
    let columns = if no_duplicates {
        let indices = UInt32Array::from(order);
        all.columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        fold_runs(&all, &order, &runs, &key_indices)?
    };
    RecordBatch::try_new(Arc::clone(schema), columns)
}

/// The columns of one row per run of versions of a row: a run is `order[start..end]`, row
/// indices of `batch`, oldest version first. Identity columns (`key`) and columns without
/// nulls come from the run's last row; each other column from its last row that sets it.
pub fn fold_runs(
    batch: &RecordBatch,
    order: &[u32],
    runs: &[(usize, usize)],
    key: &[usize],
) -> Result<Vec<ArrayRef>, ArrowError> {
    let last_indices: UInt32Array = runs.iter().map(|&(_, end)| order[end - 1]).collect();
    batch
        .columns()
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            if key.contains(&ci) || c.null_count() == 0 {
                return take(c.as_ref(), &last_indices, None);
            }
            let picks: UInt32Array = runs
                .iter()
                .map(|&(s, e)| {
                    order[s..e]
                        .iter()
                        .rev()
                        .copied()
                        .find(|r| c.is_valid(*r as usize))
                        .unwrap_or(order[e - 1])
                })
                .collect();
            take(c.as_ref(), &picks, None)
        })
        .collect()
}

/// The rows of a batch in key order (stable: equal keys keep their input order).
struct KeyOrder {
    rows: Vec<u32>,
    /// Runs of equal keys, as `(start, end)` positions in `rows`.
    runs: Vec<(usize, usize)>,
}

/// Orders the rows of `batch` by the columns `key_indices` and finds the runs of equal keys.
///
/// Rather than comparing whole keys row against row, the series part of the key (every key
/// column but a trailing non-null Int64/Timestamp one, the time) is encoded once per row and
/// each distinct series gets its rank among the distinct series; rows are then sorted by
/// (rank, time, input position), three integers. Tables have far fewer series than rows.
fn sort_and_group(batch: &RecordBatch, key_indices: &[usize]) -> Result<KeyOrder, ArrowError> {
    let n = batch.num_rows();
    let (series_indices, time) = key_indices
        .split_last()
        .and_then(|(last, rest)| Some((rest, time_values(batch.column(*last))?)))
        .unwrap_or_else(|| (key_indices, ScalarBuffer::from(vec![0; n])));
    let rank = series_ranks(batch, series_indices)?;
    // (rank, time with its sign bit flipped so it orders as unsigned, row): unique per row.
    let mut keyed: Vec<(u32, u64, u32)> = (0..n)
        .map(|i| (rank[i], (time[i] as u64) ^ (1 << 63), i as u32))
        .collect();
    keyed.sort_unstable();

    let mut runs = Vec::with_capacity(n);
    let mut start = 0;
    for i in 1..=n {
        if i == n || keyed[i].0 != keyed[start].0 || keyed[i].1 != keyed[start].1 {
            runs.push((start, i));
            start = i;
        }
    }
    Ok(KeyOrder {
        rows: keyed.into_iter().map(|(_, _, row)| row).collect(),
        runs,
    })
}

/// The values of a time column usable as the last sort key (no nulls, 64-bit integers),
/// sharing the column's memory.
fn time_values(column: &ArrayRef) -> Option<ScalarBuffer<i64>> {
    if column.null_count() > 0
        || !matches!(
            column.data_type(),
            DataType::Int64 | DataType::Timestamp(_, _)
        )
    {
        return None;
    }
    let raw = arrow::compute::cast(column, &DataType::Int64).ok()?;
    Some(raw.as_primitive::<Int64Type>().values().clone())
}

/// Per row, the rank of its series (the values of `columns`) among the distinct series of
/// `batch`, in the row format's order (the order of comparing the columns one by one).
fn series_ranks(batch: &RecordBatch, columns: &[usize]) -> Result<Vec<u32>, ArrowError> {
    let n = batch.num_rows();
    if columns.is_empty() {
        return Ok(vec![0; n]);
    }
    let converter = RowConverter::new(
        columns
            .iter()
            .map(|i| SortField::new(batch.schema().field(*i).data_type().clone()))
            .collect(),
    )?;
    let key_columns: Vec<ArrayRef> = columns
        .iter()
        .map(|i| Arc::clone(batch.column(*i)))
        .collect();
    let rows = converter.convert_columns(&key_columns)?;

    let mut ids: HashMap<&[u8], u32, ahash::RandomState> = HashMap::default();
    let mut distinct: Vec<&[u8]> = Vec::new();
    let row_ids: Vec<u32> = (0..n)
        .map(|i| {
            let bytes = rows.row(i).data();
            *ids.entry(bytes).or_insert_with(|| {
                distinct.push(bytes);
                (distinct.len() - 1) as u32
            })
        })
        .collect();
    let mut by_key: Vec<u32> = (0..distinct.len() as u32).collect();
    by_key.sort_unstable_by_key(|id| distinct[*id as usize]);
    let mut rank_of_id = vec![0u32; distinct.len()];
    for (rank, id) in by_key.into_iter().enumerate() {
        rank_of_id[id as usize] = rank as u32;
    }
    Ok(row_ids
        .into_iter()
        .map(|id| rank_of_id[id as usize])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Float64Array, Int64Array, StringDictionaryBuilder, TimestampNanosecondArray,
    };
    use arrow::datatypes::{DataType, Field, Int32Type, Schema, TimeUnit};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(
                "host",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                true,
            ),
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("a", DataType::Float64, true),
            Field::new("b", DataType::Int64, true),
        ]))
    }

    fn batch(hosts: &[&str], times: &[i64], a: &[Option<f64>], b: &[Option<i64>]) -> RecordBatch {
        let mut hb = StringDictionaryBuilder::<Int32Type>::new();
        for h in hosts {
            hb.append_value(h);
        }
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(hb.finish()),
                Arc::new(TimestampNanosecondArray::from(times.to_vec())),
                Arc::new(Float64Array::from(a.to_vec())),
                Arc::new(Int64Array::from(b.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn later_writes_win_field_by_field_and_output_is_sorted() {
        let first = batch(
            &["h2", "h1", "h1"],
            &[5, 9, 1],
            &[Some(1.0), Some(2.0), Some(3.0)],
            &[Some(10), Some(20), None],
        );
        let second = batch(&["h1"], &[9], &[None], &[Some(99)]);
        let third = batch(&["h1"], &[9], &[Some(7.0)], &[None]);
        let merged =
            merge_last_write_wins(&[first, second, third], &schema(), &["host", "time"]).unwrap();
        let expected = batch(
            &["h1", "h1", "h2"],
            &[1, 9, 5],
            &[Some(3.0), Some(7.0), Some(1.0)],
            &[None, Some(99), Some(10)],
        );
        assert_eq!(merged, expected);
    }

    #[test]
    fn narrower_batches_are_widened_with_nulls() {
        let narrow_schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("a", DataType::Float64, true),
        ]));
        let narrow = RecordBatch::try_new(
            narrow_schema,
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![3])),
                Arc::new(Float64Array::from(vec![4.0])),
            ],
        )
        .unwrap();
        let wide = align_to_schema(&narrow, &schema()).unwrap();
        assert_eq!(wide.num_columns(), 4);
        assert_eq!(wide.column(0).null_count(), 1);
        assert_eq!(wide.column(3).null_count(), 1);
    }

    proptest::proptest! {
        /// Against a model: a map from (host, time) to fields, writes applied oldest first,
        /// each set field overwriting. Negative times, null hosts and many duplicates.
        #[test]
        fn merge_matches_a_field_by_field_model(
            writes in proptest::collection::vec(
                proptest::collection::vec(
                    (
                        proptest::option::weighted(0.9, 0..4u8),
                        -3..3i64,
                        proptest::option::of(-5..5i32),
                        proptest::option::of(-5..5i64),
                    ),
                    0..12,
                ),
                1..5,
            )
        ) {
            use std::collections::BTreeMap;
            type Model = BTreeMap<(Option<String>, i64), (Option<f64>, Option<i64>)>;
            let mut model: Model = BTreeMap::new();
            let mut batches = Vec::new();
            for rows in &writes {
                let mut hb = StringDictionaryBuilder::<Int32Type>::new();
                let (mut times, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
                for (host, time, fa, fb) in rows {
                    let host = host.map(|h| format!("h{h}"));
                    hb.append_option(host.as_deref());
                    times.push(*time);
                    a.push(fa.map(f64::from));
                    b.push(*fb);
                    let entry = model.entry((host, *time)).or_default();
                    if let Some(v) = fa {
                        entry.0 = Some(f64::from(*v));
                    }
                    if fb.is_some() {
                        entry.1 = *fb;
                    }
                }
                batches.push(
                    RecordBatch::try_new(
                        schema(),
                        vec![
                            Arc::new(hb.finish()),
                            Arc::new(TimestampNanosecondArray::from(times)),
                            Arc::new(Float64Array::from(a)),
                            Arc::new(Int64Array::from(b)),
                        ],
                    )
                    .unwrap(),
                );
            }
            let merged = merge_last_write_wins(&batches, &schema(), &["host", "time"]).unwrap();
            // The model's order (None first, then by name, then time) is the key order.
            let hosts = merged.column(0).as_dictionary::<Int32Type>();
            let host_values = hosts.values().as_string::<i32>();
            let times = merged.column(1).as_primitive::<arrow::datatypes::TimestampNanosecondType>();
            let a = merged.column(2).as_primitive::<arrow::datatypes::Float64Type>();
            let b = merged.column(3).as_primitive::<Int64Type>();
            let got: Vec<_> = (0..merged.num_rows())
                .map(|i| {
                    let host = hosts
                        .key(i)
                        .map(|k| host_values.value(k).to_owned());
                    let a = a.is_valid(i).then(|| a.value(i));
                    let b = b.is_valid(i).then(|| b.value(i));
                    ((host, times.value(i)), (a, b))
                })
                .collect();
            let expected: Vec<_> = model.into_iter().collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }
}

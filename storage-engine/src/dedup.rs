//! Last-write-wins merge: the one rule for rows with the same identity, used by the write
//! buffer, by persistence and by queries that read overlapping data.
//!
//! A row's identity is (tag values, time). Given batches ordered oldest write first,
//! [`merge_last_write_wins`] returns one batch with one row per identity, sorted by tags
//! then time, where each field holds the value of the latest write that set it (non-null).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, UInt32Array, new_null_array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};

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
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(Arc::clone(c)),
            Some(c) => arrow::compute::cast(c, f.data_type()),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(schema), columns)
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
    let converter = RowConverter::new(
        key_indices
            .iter()
            .map(|i| SortField::new(schema.field(*i).data_type().clone()))
            .collect(),
    )?;
    let key_columns: Vec<ArrayRef> = key_indices
        .iter()
        .map(|i| Arc::clone(all.column(*i)))
        .collect();
    let rows = converter.convert_columns(&key_columns)?;

    // Stable sort: among equal keys, older writes stay first.
    let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
    order.sort_by(|a, b| rows.row(*a as usize).cmp(&rows.row(*b as usize)));

    // Group runs of equal keys.
    let mut groups: Vec<(usize, usize)> = Vec::with_capacity(order.len());
    let mut start = 0;
    for i in 1..=order.len() {
        if i == order.len() || rows.row(order[i] as usize) != rows.row(order[start] as usize) {
            groups.push((start, i));
            start = i;
        }
    }

    let no_duplicates = groups.len() == order.len();
    let columns = if no_duplicates {
        let indices = UInt32Array::from(order);
        all.columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let last_of_group: Vec<u32> = groups.iter().map(|(_, end)| order[end - 1]).collect();
        let last_indices = UInt32Array::from(last_of_group);
        all.columns()
            .iter()
            .enumerate()
            .map(|(ci, c)| {
                if key_indices.contains(&ci) || c.null_count() == 0 {
                    return take(c.as_ref(), &last_indices, None);
                }
                // Per group, the latest row where this field is set.
                let picks: Vec<u32> = groups
                    .iter()
                    .map(|(s, e)| {
                        order[*s..*e]
                            .iter()
                            .rev()
                            .copied()
                            .find(|r| c.is_valid(*r as usize))
                            .unwrap_or(order[e - 1])
                    })
                    .collect();
                take(c.as_ref(), &UInt32Array::from(picks), None)
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    RecordBatch::try_new(Arc::clone(schema), columns)
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
}

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringDictionaryBuilder,
    TimestampNanosecondArray,
};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use proptest::prelude::*;

use super::{Error, SortedMerge, Step};
use crate::dedup::merge_last_write_wins;

const KEY: [&str; 2] = ["host", "time"];

fn schema(with_b: bool) -> SchemaRef {
    let mut fields = vec![
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
    ];
    if with_b {
        fields.push(Field::new("b", DataType::Int64, true));
    }
    Arc::new(Schema::new(fields))
}

type Row = (Option<u8>, i64, Option<i32>, Option<i64>);

fn batch(rows: &[Row], with_b: bool) -> RecordBatch {
    let mut hosts = StringDictionaryBuilder::<Int32Type>::new();
    for (h, ..) in rows {
        match h {
            Some(h) => hosts.append_value(format!("h{h}")),
            None => hosts.append_null(),
        }
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(hosts.finish()),
        Arc::new(TimestampNanosecondArray::from_iter_values(
            rows.iter().map(|r| r.1),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.2.map(f64::from)),
        )),
    ];
    if with_b {
        columns.push(Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.3))));
    }
    RecordBatch::try_new(schema(with_b), columns).unwrap()
}

/// The batch with dictionaries decoded: merged dictionaries may differ and mean the same.
fn plain(batch: &RecordBatch) -> Vec<ArrayRef> {
    batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Dictionary(_, value) => cast(c, value).unwrap(),
            _ => Arc::clone(c),
        })
        .collect()
}

/// Runs a merge over `runs` (each fed in chunks of `chunk` rows) to the end.
fn run(runs: &[RecordBatch], chunk: usize, batch_rows: usize) -> Result<RecordBatch, Error> {
    let mut merge = SortedMerge::new(schema(true), &KEY, runs.len(), batch_rows)?;
    let mut offsets = vec![0; runs.len()];
    let mut out = Vec::new();
    loop {
        match merge.step()? {
            Step::Need(i) => {
                let run = &runs[i];
                let next = (offsets[i] < run.num_rows()).then(|| {
                    let len = chunk.min(run.num_rows() - offsets[i]);
                    run.slice(offsets[i], len)
                });
                offsets[i] += chunk;
                merge.push(i, next)?;
            }
            Step::Batch(b) => {
                assert!(b.num_rows() <= batch_rows);
                out.push(b);
            }
            Step::Done => break,
        }
    }
    Ok(concat_batches(&schema(true), &out)?)
}

proptest! {
    /// Sorted runs merged a batch at a time equal the whole-partition merge of the writes
    /// they came from, whatever the runs' widths, chunking and output batch size.
    #[test]
    fn merging_sorted_runs_equals_merging_everything_at_once(
        writes in prop::collection::vec(
            (
                any::<bool>(),
                prop::collection::vec(
                    (
                        prop::option::weighted(0.9, 0..4u8),
                        -3..3i64,
                        prop::option::of(-5..5i32),
                        prop::option::of(-5..5i64),
                    ),
                    0..12,
                ),
            ),
            1..6,
        ),
        chunk in 1..5usize,
        batch_rows in 1..7usize,
    ) {
        let raw: Vec<RecordBatch> = writes
            .iter()
            .map(|(with_b, rows)| batch(rows, *with_b))
            .collect();
        let runs: Vec<RecordBatch> = raw
            .iter()
            .map(|b| merge_last_write_wins(std::slice::from_ref(b), &b.schema(), &KEY).unwrap())
            .collect();
        let expected = merge_last_write_wins(&raw, &schema(true), &KEY).unwrap();
        let merged = run(&runs, chunk, batch_rows).unwrap();
        prop_assert_eq!(plain(&merged), plain(&expected));
    }
}

#[test]
fn an_input_out_of_order_is_refused_not_merged() {
    let sorted = batch(
        &[(Some(1), 1, Some(1), None), (Some(1), 2, None, None)],
        true,
    );
    let backwards = batch(&[(Some(1), 5, None, None), (Some(1), 4, None, None)], true);
    let err = run(&[sorted.clone(), backwards], 8, 8).unwrap_err();
    assert!(matches!(err, Error::Unsorted { input: 1 }), "{err}");
    // Two inputs may overlap; one input may not go back, within a batch or across two.
    assert!(run(&[sorted.slice(1, 1), sorted.clone()], 8, 8).is_ok());
    let twice = concat_batches(&schema(true), &[sorted.clone(), sorted]).unwrap();
    let err = run(&[twice], 2, 8).unwrap_err();
    assert!(matches!(err, Error::Unsorted { input: 0 }), "{err}");
}

#[test]
fn memory_is_a_batch_per_input_not_the_partition() {
    // 3 inputs of 10,000 rows fed 100 at a time: the merge never holds more than the
    // inputs' current batches and the staged rows' sources.
    let runs: Vec<RecordBatch> = (0..3)
        .map(|r| {
            let rows: Vec<Row> = (0..10_000)
                .map(|t| (Some((t % 4) as u8), t * 3 + r, Some(r as i32), None))
                .collect();
            let b = batch(&rows, true);
            merge_last_write_wins(&[b], &schema(true), &KEY).unwrap()
        })
        .collect();
    let mut merge = SortedMerge::new(schema(true), &KEY, 3, 256).unwrap();
    let mut offsets = [0usize; 3];
    let mut rows = 0;
    let mut most_pooled = 0;
    loop {
        most_pooled = most_pooled.max(merge.pool.len());
        match merge.step().unwrap() {
            Step::Need(i) => {
                let next = (offsets[i] < 10_000).then(|| runs[i].slice(offsets[i], 100));
                offsets[i] += 100;
                merge.push(i, next).unwrap();
            }
            Step::Batch(b) => rows += b.num_rows(),
            Step::Done => break,
        }
    }
    assert_eq!(rows, 30_000);
    assert!(most_pooled <= 3 * 4, "{most_pooled} batches held at once");
}

//! Persistence of one buffer partition: the last-write-wins merge (sort by tags then time)
//! and the Parquet encoding, on TSBS cpu-like data (1,000 hosts, 10 tags, 10 fields)
//! arriving as 10 write chunks of interleaved series, as the write buffer holds them.

use std::sync::Arc;

use arrow::array::TimestampNanosecondArray;
use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringDictionaryBuilder};
use arrow::datatypes::Int32Type;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_storage::catalog::{ColumnDef, ColumnType, TIME_COLUMN, TableDef};
use kiln_storage::dedup::merge_last_write_wins;
use kiln_storage::ids::{DatabaseId, TableId};
use kiln_storage::persist::{encode_segment, sort_key};

const HOSTS: usize = 1000;
const TAGS: usize = 10;
const FIELDS: usize = 10;
const CHUNKS: usize = 10;
const INTERVALS_PER_CHUNK: usize = 50;

fn table() -> TableDef {
    let mut columns = vec![ColumnDef {
        name: TIME_COLUMN.into(),
        ty: ColumnType::Time,
    }];
    columns.extend((0..TAGS).map(|t| ColumnDef {
        name: format!("tag{t}"),
        ty: ColumnType::Tag,
    }));
    columns.extend((0..FIELDS).map(|f| ColumnDef {
        name: format!("field{f}"),
        ty: ColumnType::Integer,
    }));
    TableDef {
        id: TableId(1),
        database: DatabaseId(1),
        name: "cpu".into(),
        partition_nanos: 3_600_000_000_000,
        retention_nanos: None,
        columns,
    }
}

/// One chunk: `INTERVALS_PER_CHUNK` timestamps 10 s apart, every host at each.
fn chunk(def: &TableDef, index: usize) -> RecordBatch {
    let rows = HOSTS * INTERVALS_PER_CHUNK;
    let mut time = Vec::with_capacity(rows);
    let mut tags: Vec<StringDictionaryBuilder<Int32Type>> =
        (0..TAGS).map(|_| StringDictionaryBuilder::new()).collect();
    let mut fields: Vec<Vec<i64>> = (0..FIELDS).map(|_| Vec::with_capacity(rows)).collect();
    for i in 0..INTERVALS_PER_CHUNK {
        let t = ((index * INTERVALS_PER_CHUNK + i) as i64) * 10_000_000_000;
        for h in 0..HOSTS {
            time.push(t);
            for (k, b) in tags.iter_mut().enumerate() {
                // tag0 identifies the host; the others repeat with smaller cardinalities.
                let v = if k == 0 { h } else { h % (3 + k * 7) };
                b.append_value(format!("tag{k}_value_{v}"));
            }
            for (f, col) in fields.iter_mut().enumerate() {
                col.push(((h * 31 + i * 7 + f) % 100) as i64);
            }
        }
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(TimestampNanosecondArray::from(time))];
    columns.extend(tags.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.extend(
        fields
            .into_iter()
            .map(|f| Arc::new(Int64Array::from(f)) as ArrayRef),
    );
    RecordBatch::try_new(def.schema(), columns).expect("columns match the schema")
}

fn bench(c: &mut Criterion) {
    let def = table();
    let chunks: Vec<RecordBatch> = (0..CHUNKS).map(|i| chunk(&def, i)).collect();
    let rows: usize = chunks.iter().map(RecordBatch::num_rows).sum();
    let schema = def.schema();
    let key = sort_key(&def);

    let mut group = c.benchmark_group("persist");
    group.sample_size(10);
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("merge_last_write_wins_500k_rows", |b| {
        b.iter(|| merge_last_write_wins(&chunks, &schema, &key).unwrap())
    });
    group.bench_function("encode_segment_500k_rows", |b| {
        b.iter(|| encode_segment(&def, &chunks).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Turning buffer partitions into Parquet segments.
//!
//! A segment holds one time partition of one table, deduplicated (last write wins) and
//! sorted by tags then time, compressed with LZ4 (older segments are zstd; both are read),
//! tags dictionary-encoded, with page statistics. It is written through the object store
//! before the catalog records it.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::catalog::{TIME_COLUMN, TIME_ZONE, TableDef};
use crate::dedup::{align_to_schema, merge_last_write_wins};

/// The columns that order a table's rows and identify them: tags, then time.
pub fn sort_key(def: &TableDef) -> Vec<&str> {
    def.tag_columns()
        .map(|c| c.name.as_str())
        .chain(std::iter::once(TIME_COLUMN))
        .collect()
}

/// `schema` with `time` labelled UTC.
pub fn utc_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(unit, None) if f.name() == TIME_COLUMN => Arc::new(
                f.as_ref()
                    .clone()
                    .with_data_type(DataType::Timestamp(*unit, Some(TIME_ZONE.into()))),
            ),
            _ => Arc::clone(f),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Why a partition could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("merging the partition's rows")]
    Merge(#[source] arrow::error::ArrowError),
    #[error("writing Parquet")]
    Parquet(#[from] parquet::errors::ParquetError),
}

/// Merges `batches` (oldest write first) and encodes them as a Parquet file.
pub fn encode_segment(
    def: &TableDef,
    batches: &[RecordBatch],
) -> Result<(RecordBatch, Vec<u8>), Error> {
    let schema: SchemaRef = def.schema();
    let key = sort_key(def);
    let merged = merge_last_write_wins(batches, &schema, &key).map_err(Error::Merge)?;
    let props = writer_properties(def, |tag| {
        merged
            .column_by_name(tag)
            .and_then(|a| a.as_any_dictionary_opt().map(|d| d.values().len()))
            .unwrap_or(merged.num_rows())
    })?;
    // On disk `time` says what it is, an instant in UTC (TIMESTAMP(isAdjustedToUTC=true)):
    // readers then take it as it is stored, with no conversion.
    let file_schema = utc_schema(&schema);
    let labelled = align_to_schema(&merged, &file_schema).map_err(Error::Merge)?;
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, file_schema, Some(props))?;
    writer.write(&labelled)?;
    writer.close()?;
    Ok((merged, out))
}

/// How every segment of `def` is written: LZ4 (raw), page statistics, sorted by the table's
/// key, tags dictionary-encoded with a bloom filter sized for `distinct(tag)` values (for
/// other Parquet readers: Kiln's queries prune by the sorted tags' statistics and do not
/// read the filters, see `provider::parquet_exec` in the query crate).
pub fn writer_properties(
    def: &TableDef,
    distinct: impl Fn(&str) -> usize,
) -> Result<WriterProperties, Error> {
    let schema = def.schema();
    let sorting: Vec<SortingColumn> = sort_key(def)
        .iter()
        .filter_map(|k| schema.index_of(k).ok())
        .map(|i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: true,
        })
        .collect();
    let mut props = WriterProperties::builder()
        // LZ4 rather than zstd: dictionary and RLE encodings do most of the shrinking of
        // time-series columns (TSBS cpu, 100 hosts × 1 day, compacted: 7.7 MB against
        // 7.4 MB with zstd level 1), and a zstd reader allocates a compression and a
        // decompression context for every column chunk it opens, a cost a query pays per
        // column per segment (`benches/RESULTS.md`, "Dashboards as users meet them").
        .set_compression(Compression::LZ4_RAW)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_sorting_columns(Some(sorting))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    for c in def.tag_columns() {
        let column: parquet::schema::types::ColumnPath = c.name.as_str().into();
        props = props
            .set_column_dictionary_enabled(column.clone(), true)
            .set_column_bloom_filter_enabled(column.clone(), true)
            .set_column_bloom_filter_fpp(column.clone(), 0.01)
            .set_column_bloom_filter_max_ndv(column, distinct(&c.name).max(16) as u64);
    }
    Ok(props.build())
}

/// Rows per row group of a segment.
pub const ROW_GROUP_ROWS: usize = 1024 * 1024;

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, Float64Array, TimestampNanosecondArray};
    use arrow::datatypes::{Field, TimeUnit};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;
    use crate::catalog::{ColumnDef, ColumnType};
    use crate::ids::{DatabaseId, TableId};

    #[test]
    fn segments_store_time_as_utc_instants_sorted() {
        let def = TableDef {
            id: TableId(1),
            database: DatabaseId(1),
            name: "t".into(),
            partition_nanos: 3_600_000_000_000,
            retention_nanos: None,
            columns: vec![
                ColumnDef {
                    name: TIME_COLUMN.into(),
                    ty: ColumnType::Time,
                },
                ColumnDef {
                    name: "v".into(),
                    ty: ColumnType::Float,
                },
            ],
        };
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new(
                    TIME_COLUMN,
                    DataType::Timestamp(TimeUnit::Nanosecond, None),
                    false,
                ),
                Field::new("v", DataType::Float64, true),
            ])),
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![20, 10])),
                Arc::new(Float64Array::from(vec![2.0, 1.0])),
            ],
        )
        .unwrap();
        let (merged, bytes) = encode_segment(&def, &[batch]).unwrap();
        assert_eq!(merged.num_rows(), 2);
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .unwrap()
            .build()
            .unwrap();
        let read: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        let time = read[0].column(0);
        assert_eq!(
            time.data_type(),
            &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
        );
        let values: Vec<i64> = time
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>()
            .values()
            .to_vec();
        assert_eq!(values, [10, 20], "sorted by time, the same instants");
    }
}

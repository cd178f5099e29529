//! Columnar writes: an Arrow IPC stream for one table, checked against the catalog.
//!
//! The batch is validated as a whole (a column has one type for all its rows): a column
//! of an unsupported type, or of a type other than the catalog's, rejects the batch with
//! an error naming the column.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch};
use arrow::buffer::Buffer;
use arrow::compute::kernels::numeric::mul;
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamDecoder;
use kiln_storage::catalog::{CatalogState, ColumnType, SchemaChange, TIME_COLUMN};

use crate::line_protocol::ValidatedLines;

/// Why a columnar batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArrowBatchError(pub String);

fn err(msg: impl Into<String>) -> ArrowBatchError {
    ArrowBatchError(msg.into())
}

fn field_type(dt: &DataType) -> Option<ColumnType> {
    Some(match dt {
        DataType::Float64 | DataType::Float32 => ColumnType::Float,
        DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 => ColumnType::Integer,
        DataType::UInt64 | DataType::UInt32 | DataType::UInt16 | DataType::UInt8 => {
            ColumnType::UInteger
        }
        DataType::Boolean => ColumnType::Boolean,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnType::String,
        _ => return None,
    })
}

fn is_string(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_string(v),
        _ => false,
    }
}

/// Decodes an Arrow IPC stream into its schema and one batch. Aligned column data stays
/// in `ipc`'s memory (no copy).
fn decode_ipc(ipc: Buffer) -> Result<(SchemaRef, RecordBatch), ArrowError> {
    kiln_storage::ipc::check_framing(ipc.as_slice()).map_err(ArrowError::IpcError)?;
    kiln_storage::ipc::guarded("the arrow payload", || decode_ipc_unguarded(ipc))
}

fn decode_ipc_unguarded(mut ipc: Buffer) -> Result<(SchemaRef, RecordBatch), ArrowError> {
    let mut decoder = StreamDecoder::new();
    let mut batches = Vec::new();
    while !ipc.is_empty() {
        if let Some(batch) = decoder.decode(&mut ipc)? {
            batches.push(batch);
        }
    }
    decoder.finish()?;
    let schema = decoder
        .schema()
        .ok_or_else(|| ArrowError::IpcError("the stream has no schema message".into()))?;
    let batch = match batches.len() {
        1 => batches.remove(0),
        _ => concat_batches(&schema, &batches)?,
    };
    Ok((schema, batch))
}

/// Decodes `ipc` (an Arrow IPC stream) and converts it to the table's column types.
pub fn validate_arrow(
    database: &str,
    catalog: &CatalogState,
    table: &str,
    ipc: Buffer,
    tag_columns: &[String],
) -> Result<ValidatedLines, ArrowBatchError> {
    if table.is_empty() {
        return Err(err("missing table name"));
    }
    let (schema, input) =
        decode_ipc(ipc).map_err(|e| err(format!("invalid Arrow IPC stream: {e}")))?;
    let def = catalog.table(database, table);

    for tag in tag_columns {
        if schema.field_with_name(tag).is_err() {
            return Err(err(format!("tag column {tag:?} is not in the batch")));
        }
    }
    let time = input
        .column_by_name(TIME_COLUMN)
        .ok_or_else(|| err("the batch has no `time` column"))?;
    if time.null_count() > 0 {
        return Err(err("column `time` has nulls; every row needs a time"));
    }
    let unit_nanos: i64 = match time.data_type() {
        DataType::Int64 | DataType::Timestamp(TimeUnit::Nanosecond, _) => 1,
        DataType::Timestamp(TimeUnit::Microsecond, _) => 1_000,
        DataType::Timestamp(TimeUnit::Millisecond, _) => 1_000_000,
        DataType::Timestamp(TimeUnit::Second, _) => 1_000_000_000,
        other => {
            return Err(err(format!(
                "column `time` is {other}; expected a timestamp or Int64 nanoseconds"
            )));
        }
    };
    // The raw values are UTC instants in their unit, whatever the time zone annotation.
    let raw = cast(time, &DataType::Int64).map_err(|e| err(format!("column `time`: {e}")))?;
    let stored = |t: &i64| {
        t.checked_mul(unit_nanos)
            .is_some_and(|n| kiln_storage::time::check(n).is_ok())
    };
    let values = raw.as_primitive::<Int64Type>().values();
    if let Some(row) = values.iter().position(|t| !stored(t)) {
        return Err(err(format!(
            "column `time`, row {row}: {} ({}) is outside the range Kiln stores \
             (1678-01-01T00:00:00Z to 2261-12-31T23:59:59.999999999Z)",
            values[row],
            time.data_type()
        )));
    }
    let nanos = if unit_nanos == 1 {
        raw
    } else {
        mul(&raw, &Int64Array::new_scalar(unit_nanos))
            .map_err(|e| err(format!("column `time`: {e}")))?
    };
    if let Some(retention) = catalog.retention_by_name(database, table) {
        let cutoff = kiln_storage::now_nanos().saturating_sub(retention);
        let times = nanos.as_primitive::<Int64Type>().values();
        if let Some(row) = times.iter().position(|t| *t < cutoff) {
            return Err(err(format!(
                "column `time`, row {row}: {} is older than the retention of table {table:?} ({}): rows before {} have expired",
                kiln_storage::time::rfc3339(times[row]),
                kiln_storage::catalog::lifecycle::format_retention(Some(retention)),
                kiln_storage::time::rfc3339(cutoff),
            )));
        }
    }
    let time = cast(&nanos, &ColumnType::Time.arrow_type())
        .map_err(|e| err(format!("column `time`: {e}")))?;

    let mut fields = vec![Field::new(
        TIME_COLUMN,
        ColumnType::Time.arrow_type(),
        false,
    )];
    let mut columns: Vec<ArrayRef> = vec![time];
    let mut changes = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let name = f.name();
        if name == TIME_COLUMN {
            continue;
        }
        let is_tag = tag_columns.iter().any(|t| t == name);
        let ty = if is_tag {
            if !is_string(f.data_type()) {
                return Err(err(format!(
                    "tag column {name:?} is {}; tags must be strings",
                    f.data_type()
                )));
            }
            ColumnType::Tag
        } else {
            field_type(f.data_type()).ok_or_else(|| {
                err(format!(
                    "column {name:?} is {}; fields must be Float64, Int64, UInt64, Boolean or Utf8",
                    f.data_type()
                ))
            })?
        };
        match def.and_then(|d| d.column(name)) {
            Some(existing) if existing.ty != ty => {
                return Err(err(format!(
                    "column {name:?} of table {table:?} is {}; this batch writes it as {ty}",
                    existing.ty
                )));
            }
            Some(_) => {}
            None => changes.push(SchemaChange {
                table: table.to_owned(),
                column: name.clone(),
                ty,
            }),
        }
        let column = cast(input.column(i), &ty.arrow_type())
            .map_err(|e| err(format!("column {name:?}: {e}")))?;
        fields.push(Field::new(name, ty.arrow_type(), true));
        columns.push(column);
    }
    if columns.len() < 2 {
        return Err(err("the batch has no fields besides `time`"));
    }
    changes.sort_by_key(|c| c.ty != ColumnType::Tag);
    let rows = input.num_rows();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| err(e.to_string()))?;
    Ok(ValidatedLines {
        tables: if rows > 0 {
            vec![(table.to_owned(), batch)]
        } else {
            Vec::new()
        },
        schema_changes: if rows > 0 { changes } else { Vec::new() },
        rejected: Vec::new(),
        rejected_by_table: Default::default(),
        expired_lines: 0,
        accepted_lines: rows,
    })
}

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, Float64Array, Int32Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Int32Type, TimestampNanosecondType};
    use arrow::ipc::writer::StreamWriter;

    use super::*;

    fn ipc(batch: &RecordBatch) -> Buffer {
        let mut out = Vec::new();
        let mut w = StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
        w.write(batch).unwrap();
        w.finish().unwrap();
        drop(w);
        Buffer::from(out)
    }

    fn batch(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(cols).unwrap()
    }

    #[test]
    fn columns_are_converted_to_table_types() {
        let b = batch(vec![
            (
                "time",
                Arc::new(TimestampMillisecondArray::from(vec![1, 2])) as ArrayRef,
            ),
            ("host", Arc::new(StringArray::from(vec!["a", "b"]))),
            ("v", Arc::new(Float64Array::from(vec![Some(1.5), None]))),
            ("n", Arc::new(Int32Array::from(vec![3, 4]))),
        ]);
        let v = validate_arrow(
            "db",
            &CatalogState::default(),
            "m",
            ipc(&b),
            &["host".into()],
        )
        .unwrap();
        assert_eq!(v.accepted_lines, 2);
        let out = &v.tables[0].1;
        let times = out.column(0).as_primitive::<TimestampNanosecondType>();
        assert_eq!(times.values(), &[1_000_000, 2_000_000]);
        assert_eq!(
            out.column_by_name("host")
                .unwrap()
                .as_dictionary::<Int32Type>()
                .len(),
            2
        );
        assert_eq!(
            out.column_by_name("n").unwrap().data_type(),
            &DataType::Int64
        );
        let changes: Vec<_> = v
            .schema_changes
            .iter()
            .map(|c| (c.column.as_str(), c.ty))
            .collect();
        assert_eq!(
            changes,
            vec![
                ("host", ColumnType::Tag),
                ("v", ColumnType::Float),
                ("n", ColumnType::Integer)
            ]
        );
    }

    #[test]
    fn bad_batches_name_the_column() {
        let ok_time: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![1]));
        let cases: Vec<(RecordBatch, Vec<String>, &str)> = vec![
            (
                batch(vec![(
                    "v",
                    Arc::new(Float64Array::from(vec![1.0])) as ArrayRef,
                )]),
                vec![],
                "no `time` column",
            ),
            (
                batch(vec![
                    ("time", ok_time.clone()),
                    (
                        "v",
                        Arc::new(arrow::array::Date32Array::from(vec![1])) as ArrayRef,
                    ),
                ]),
                vec![],
                "column \"v\" is Date32",
            ),
            (
                batch(vec![
                    ("time", ok_time.clone()),
                    ("t", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
                ]),
                vec!["t".into()],
                "tags must be strings",
            ),
            (batch(vec![("time", ok_time.clone())]), vec![], "no fields"),
            (
                batch(vec![
                    ("time", ok_time),
                    ("v", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
                ]),
                vec!["missing".into()],
                "tag column \"missing\"",
            ),
        ];
        for (b, tags, expected) in cases {
            let e =
                validate_arrow("db", &CatalogState::default(), "m", ipc(&b), &tags).unwrap_err();
            assert!(e.0.contains(expected), "{e} vs {expected}");
        }
        let e = validate_arrow(
            "db",
            &CatalogState::default(),
            "m",
            Buffer::from(b"garbage".to_vec()),
            &[],
        )
        .unwrap_err();
        assert!(e.0.contains("invalid Arrow IPC"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// A gateway's Arrow payload is untrusted: damaged, it is an error, never a panic
        /// or an allocation its bytes cannot back.
        #[test]
        fn damaged_arrow_payloads_are_errors(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()),
                1..8,
            )
        ) {
            let b = batch(vec![
                ("time", Arc::new(TimestampMillisecondArray::from(vec![1, 2])) as ArrayRef),
                ("host", Arc::new(StringArray::from(vec!["a", "b"]))),
                ("v", Arc::new(Float64Array::from(vec![Some(1.5), None]))),
            ]);
            let mut bytes = ipc(&b).to_vec();
            let len = bytes.len();
            for (at, value) in edits {
                bytes[at % len] = value;
            }
            let _ = validate_arrow(
                "db",
                &CatalogState::default(),
                "m",
                Buffer::from(bytes),
                &["host".into()],
            );
        }
    }
}

//! A validated write and its encoding as a WAL record payload.
//!
//! ## Payload of a [`RecordKind::WriteBatch`](crate::wal::RecordKind) record (version 2)
//!
//! | offset | size | type | meaning                                          |
//! |-------:|-----:|------|--------------------------------------------------|
//! | 0      | 1    | u8   | payload version (2; version 1 is read too)       |
//! | 1      | 4    | u32  | database id                                      |
//! | 5      | 4    | u32  | number of tables `T`                             |
//! | 9      | …    |      | `T` times: u32 table id, u32 length `L`, `L` bytes of an Arrow IPC stream holding one record batch whose column names are the table's column names |
//! | …      | 4    | u32  | number of source ranges `S` (absent in version 1)|
//! | …      | …    |      | `S` times: u16 length `N`, `N` bytes of UTF-8 source name, i32 partition, i64 first position, i64 last position |
//!
//! A source range says the write holds the data of positions `first..=last` of one partition
//! of an outside source (a Kafka topic's offsets), so a consumer resumes after `last`.
//!
//! Integers are little-endian. The record's CRC has been verified before this is decoded;
//! lengths are still bounds-checked.

use std::io::Cursor;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, TimestampNanosecondType};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;

use crate::catalog::{CatalogState, TIME_COLUMN};
use crate::ids::{DatabaseId, TableId};
use crate::time::OutOfRange;

const PAYLOAD_VERSION: u8 = 2;

/// Rows for several tables of one database, already checked against the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteBatch {
    pub database: DatabaseId,
    pub tables: Vec<TableWrite>,
    /// Positions of outside sources this write consumed (may hold no rows at all, when
    /// every message of the range was rejected).
    pub sources: Vec<SourceRange>,
}

/// Positions `first..=last` of one partition of an outside source, such as the offsets of
/// a Kafka topic partition read by one consumer group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceRange {
    /// Names the source and its reader (for Kafka: group and topic); opaque to the engine.
    pub source: String,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableWrite {
    pub table: TableId,
    pub batch: RecordBatch,
}

/// Why a write cannot be logged or applied: it does not fit the catalog it was checked
/// against. Front ends refuse such rows themselves; this is the engine's own guard, so a
/// record in the WAL can always be applied.
#[derive(Debug, thiserror::Error)]
pub enum InvalidWrite {
    #[error("database {0} is not in the catalog")]
    UnknownDatabase(DatabaseId),
    #[error("table {table} is not in database {database}")]
    UnknownTable {
        database: DatabaseId,
        table: TableId,
    },
    #[error("table {table:?} has no column {column:?}")]
    UnknownColumn { table: String, column: String },
    #[error("column {column:?} of table {table:?} is {actual}, not {expected}")]
    ColumnType {
        table: String,
        column: String,
        expected: DataType,
        actual: DataType,
    },
    #[error("table {table:?}: every row needs a time")]
    MissingTime { table: String },
    #[error("table {table:?}, row {row}: {source}")]
    TimeOutOfRange {
        table: String,
        row: usize,
        #[source]
        source: OutOfRange,
    },
}

impl WriteBatch {
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|t| t.batch.num_rows()).sum()
    }

    /// Checks that every table, column and type is the catalog's and every time is in
    /// the range Kiln stores: what applying the write to the buffer relies on.
    pub fn check(&self, catalog: &CatalogState) -> Result<(), InvalidWrite> {
        let database = self.database;
        // A write of no rows (only outside-source positions) may name a deleted database.
        let dropped = self.tables.is_empty() && catalog.is_dropped_database(database);
        if !dropped && !catalog.databases.values().any(|d| d.id == database) {
            return Err(InvalidWrite::UnknownDatabase(database));
        }
        for tw in &self.tables {
            let def = catalog
                .table_by_id(tw.table)
                .filter(|d| d.database == database)
                .ok_or(InvalidWrite::UnknownTable {
                    database,
                    table: tw.table,
                })?;
            let schema = tw.batch.schema();
            for field in schema.fields() {
                let column =
                    def.column(field.name())
                        .ok_or_else(|| InvalidWrite::UnknownColumn {
                            table: def.name.clone(),
                            column: field.name().clone(),
                        })?;
                let expected = column.ty.arrow_type();
                if field.data_type() != &expected {
                    return Err(InvalidWrite::ColumnType {
                        table: def.name.clone(),
                        column: column.name.clone(),
                        expected,
                        actual: field.data_type().clone(),
                    });
                }
            }
            let missing = || InvalidWrite::MissingTime {
                table: def.name.clone(),
            };
            let times = tw.batch.column_by_name(TIME_COLUMN).ok_or_else(missing)?;
            if times.null_count() > 0 {
                return Err(missing());
            }
            let times = times
                .as_primitive_opt::<TimestampNanosecondType>()
                .ok_or_else(missing)?;
            if let Some(row) = times
                .values()
                .iter()
                .position(|t| crate::time::check(*t).is_err())
            {
                return Err(InvalidWrite::TimeOutOfRange {
                    table: def.name.clone(),
                    row,
                    source: OutOfRange {
                        time: times.value(row),
                    },
                });
            }
        }
        Ok(())
    }

    /// The write without the rows of tables deleted since it was logged (its outside
    /// source positions stay): what replaying it applies.
    pub fn without_dropped(mut self, catalog: &CatalogState) -> Self {
        if catalog.is_dropped_database(self.database) {
            self.tables.clear();
        }
        self.tables.retain(|t| !catalog.is_dropped_table(t.table));
        self
    }

    pub fn encode(&self) -> Result<Vec<u8>, arrow::error::ArrowError> {
        let mut out = Vec::with_capacity(
            64 + self
                .tables
                .iter()
                .map(|t| crate::buffer::data_bytes(&t.batch))
                .sum::<usize>(),
        );
        out.push(PAYLOAD_VERSION);
        out.extend_from_slice(&self.database.get().to_le_bytes());
        out.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        for t in &self.tables {
            out.extend_from_slice(&t.table.get().to_le_bytes());
            let len_at = out.len();
            out.extend_from_slice(&[0u8; 4]);
            let start = out.len();
            {
                let mut writer = StreamWriter::try_new(&mut out, &t.batch.schema())?;
                writer.write(&t.batch)?;
                writer.finish()?;
            }
            let len = (out.len() - start) as u32;
            out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&(self.sources.len() as u32).to_le_bytes());
        for r in &self.sources {
            let name = r.source.as_bytes();
            let len = u16::try_from(name.len()).map_err(|_| {
                arrow::error::ArrowError::InvalidArgumentError(format!(
                    "source name of {} bytes is longer than 65535",
                    name.len()
                ))
            })?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&r.partition.to_le_bytes());
            out.extend_from_slice(&r.first.to_le_bytes());
            out.extend_from_slice(&r.last.to_le_bytes());
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.take(1)?[0];
        if !(1..=PAYLOAD_VERSION).contains(&version) {
            return Err(DecodeError::Version(version));
        }
        let database = DatabaseId(r.u32()?);
        let count = r.u32()?;
        let mut tables = Vec::new();
        for _ in 0..count {
            let table = TableId(r.u32()?);
            let len = r.u32()? as usize;
            let ipc = r.take(len)?;
            let invalid = |reason| DecodeError::Ipc { table, reason };
            crate::ipc::check_framing(ipc).map_err(invalid)?;
            let batch = crate::ipc::guarded("a table's batch", || {
                let mut reader = StreamReader::try_new(Cursor::new(ipc), None)?;
                reader
                    .next()
                    .ok_or_else(|| ArrowError::IpcError("the stream holds no batch".into()))?
            })
            .map_err(|source| DecodeError::Arrow { table, source })?;
            tables.push(TableWrite { table, batch });
        }
        let mut sources = Vec::new();
        if version >= 2 {
            for _ in 0..r.u32()? {
                let len = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes")) as usize;
                let source = std::str::from_utf8(r.take(len)?)
                    .map_err(DecodeError::SourceName)?
                    .to_string();
                let partition = i32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"));
                let first = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
                let last = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
                sources.push(SourceRange {
                    source,
                    partition,
                    first,
                    last,
                });
            }
        }
        if r.pos != bytes.len() {
            return Err(DecodeError::Trailing(bytes.len() - r.pos));
        }
        Ok(Self {
            database,
            tables,
            sources,
        })
    }
}

/// Why a logged write's bytes do not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported write batch version {0}; supported versions: [1, {PAYLOAD_VERSION}]")]
    Version(u8),
    #[error("needs {needs} bytes at offset {offset} but the payload is {len} bytes")]
    Truncated {
        needs: usize,
        offset: usize,
        len: usize,
    },
    #[error("table {table}: {reason}")]
    Ipc { table: TableId, reason: String },
    #[error("table {table}: the batch does not decode")]
    Arrow {
        table: TableId,
        #[source]
        source: ArrowError,
    },
    #[error("a source name is not UTF-8")]
    SourceName(#[source] std::str::Utf8Error),
    #[error("{0} trailing bytes after the last table")]
    Trailing(usize),
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(DecodeError::Truncated {
                needs: n,
                offset: self.pos,
                len: self.bytes.len(),
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, TimestampNanosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;

    /// A batch of `time` and a nullable float `v`.
    fn batch(times: Vec<i64>, values: Vec<Option<f64>>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("v", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampNanosecondArray::from(times)),
                Arc::new(Float64Array::from(values)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn write_batch_round_trips_and_rejects_every_truncation() {
        let batch = batch(vec![1, 2], vec![Some(1.5), None]);
        let wb = WriteBatch {
            database: DatabaseId(3),
            tables: vec![TableWrite {
                table: TableId(7),
                batch,
            }],
            sources: vec![SourceRange {
                source: "kafka/g/telemetry".into(),
                partition: 2,
                first: 40,
                last: 41,
            }],
        };
        let bytes = wb.encode().unwrap();
        assert_eq!(WriteBatch::decode(&bytes).unwrap(), wb);
        for cut in 0..bytes.len() {
            assert!(WriteBatch::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }

        // A version 1 payload (written before source ranges existed) is the same bytes
        // without the trailing count, and reads with no sources.
        let source_bytes = 4 + 2 + "kafka/g/telemetry".len() + 4 + 8 + 8;
        let mut v1 = bytes[..bytes.len() - source_bytes].to_vec();
        v1[0] = 1;
        let old = WriteBatch::decode(&v1).unwrap();
        assert_eq!(old.tables, wb.tables);
        assert!(old.sources.is_empty());
    }

    fn sample() -> Vec<u8> {
        let batch = batch(vec![1, 2, 3], vec![Some(1.5), None, Some(2.5)]);
        WriteBatch {
            database: DatabaseId(1),
            tables: vec![TableWrite {
                table: TableId(2),
                batch,
            }],
            sources: vec![],
        }
        .encode()
        .unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// A WAL payload is untrusted input: any bytes decode to a batch or an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = WriteBatch::decode(&bytes);
        }

        /// Nor does a valid payload with bytes changed (counts, lengths, Arrow metadata).
        #[test]
        fn damaged_payloads_never_panic(
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..8)
        ) {
            let mut bytes = sample();
            let len = bytes.len();
            for (at, value) in edits {
                bytes[at % len] = value;
            }
            let _ = WriteBatch::decode(&bytes);
        }
    }
}

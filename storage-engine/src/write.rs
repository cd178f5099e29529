//! A validated write and its encoding as a WAL record payload.
//!
//! ## Payload of a [`RecordKind::WriteBatch`](crate::wal::RecordKind) record (version 1)
//!
//! | offset | size | type | meaning                                          |
//! |-------:|-----:|------|--------------------------------------------------|
//! | 0      | 1    | u8   | payload version (1)                              |
//! | 1      | 4    | u32  | database id                                      |
//! | 5      | 4    | u32  | number of tables `T`                             |
//! | 9      | …    |      | `T` times: u32 table id, u32 length `L`, `L` bytes of an Arrow IPC stream holding one record batch whose column names are the table's column names |
//!
//! Integers are little-endian. The record's CRC has been verified before this is decoded;
//! lengths are still bounds-checked.

use std::io::Cursor;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;

use crate::ids::{DatabaseId, TableId};

const PAYLOAD_VERSION: u8 = 1;

/// Rows for several tables of one database, already checked against the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteBatch {
    pub database: DatabaseId,
    pub tables: Vec<TableWrite>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableWrite {
    pub table: TableId,
    pub batch: RecordBatch,
}

impl WriteBatch {
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|t| t.batch.num_rows()).sum()
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
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.take(1)?[0];
        if version != PAYLOAD_VERSION {
            return Err(format!(
                "unsupported write batch version {version}; supported versions: [{PAYLOAD_VERSION}]"
            ));
        }
        let database = DatabaseId(r.u32()?);
        let count = r.u32()?;
        let mut tables = Vec::new();
        for _ in 0..count {
            let table = TableId(r.u32()?);
            let len = r.u32()? as usize;
            let ipc = r.take(len)?;
            let mut reader =
                StreamReader::try_new(Cursor::new(ipc), None).map_err(|e| e.to_string())?;
            let batch = reader
                .next()
                .ok_or_else(|| format!("table {table}: IPC stream holds no batch"))?
                .map_err(|e| e.to_string())?;
            tables.push(TableWrite { table, batch });
        }
        if r.pos != bytes.len() {
            return Err(format!(
                "{} trailing bytes after the last table",
                bytes.len() - r.pos
            ));
        }
        Ok(Self { database, tables })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "needs {n} bytes at offset {} but the payload is {} bytes",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
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

    #[test]
    fn write_batch_round_trips_and_rejects_every_truncation() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("v", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![1, 2])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
            ],
        )
        .unwrap();
        let wb = WriteBatch {
            database: DatabaseId(3),
            tables: vec![TableWrite {
                table: TableId(7),
                batch,
            }],
        };
        let bytes = wb.encode().unwrap();
        assert_eq!(WriteBatch::decode(&bytes).unwrap(), wb);
        for cut in 0..bytes.len() {
            assert!(WriteBatch::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}

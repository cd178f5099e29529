//! Kiln's storage engine: where an acknowledged write lives until it is Parquet.
//!
//! ```text
//!  WriteBatch ──▶ wal (checksummed records, group-committed fsync) ──ack──▶ caller
//!                  │
//!                  └─▶ buffer (Arrow chunks per table × time partition, queryable)
//!                        │  size / age / shutdown
//!                        ▼
//!                      persist ──▶ Parquet segment in the object store
//!                        │
//!                        ▼
//!                      catalog (event log in the object store) ──▶ WAL files deleted
//! ```
//!
//! * [`wal`]: the write-ahead log and its recovery.
//! * [`buffer`]: unpersisted rows, split by time partition.
//! * [`persist`]: Parquet encoding of a partition.
//! * [`catalog`]: databases, tables, columns and segments as an event-sourced log.
//! * [`dedup`]: the last-write-wins rule used everywhere rows can repeat.
//! * [`last_cache`]: the latest row of every series, for tables that ask for it.
//! * [`series`]: every series seen (first and last seen, recent rows) and write quality.
//! * [`engine`]: all of the above behind one handle.
//!
//! The engine knows nothing of HTTP, SQL text or Kafka.

pub mod buffer;
pub mod catalog;
pub mod dedup;
pub mod durable_store;
pub mod engine;
pub mod ids;
pub mod ipc;
pub mod last_cache;
pub mod persist;
pub mod series;
pub mod wal;
pub mod write;

/// Now, in nanoseconds since the Unix epoch (the wall clock every part of Kiln reads).
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub use engine::{CompactionOutcome, Engine, EngineConfig, ReadLease, TableData};

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
//! * [`segment_cache`]: a disk cache of segments in front of a remote object store.
//! * [`sorted_merge`]: the last-write-wins merge of sorted segments, a batch at a time.
//! * [`time`]: the range of times Kiln stores and overflow-free partition arithmetic.
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
pub mod segment_cache;
pub mod series;
pub mod sorted_merge;
#[cfg(test)]
mod testing;
pub mod time;
pub mod wal;
pub mod write;

pub use time::now_nanos;

/// An error and its causes, `: `-separated, for a log line or a message that must name
/// the real cause (a TLS failure or a bad WAL record is several levels down). A cause an
/// error already prints at the end of its own message is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub use engine::{CompactionOutcome, Engine, EngineConfig, ReadLease, TableData};

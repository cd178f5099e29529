//! Kiln's ingest formats: turning the outside world's bytes into validated Arrow batches.
//!
//! ```text
//!  request body ──▶ line_protocol::Parser ──▶ line_protocol::validate_lines ──▶ Arrow per table
//!                   (borrowed, no per-line       (types checked against the      + schema changes
//!                    allocation)                  catalog, bad lines rejected)   + rejected lines
//! ```

pub mod arrow_batch;
pub mod kafka;
pub mod line_protocol;
pub mod mqtt;
pub mod rows;
pub mod write;

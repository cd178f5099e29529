//! Kafka ingest: consumer-group sources whose messages (line protocol, mapped JSON or
//! `kiln.ingest.v1.WriteRequest`) become WAL records carrying their offsets.

pub mod config;
pub mod consumer;
pub mod decode;
pub mod json;

pub use config::{DefaultTime, Format, SourceConfig, sources_from_toml};
pub use consumer::{KafkaSource, PartitionStatus, SourceReport, SourceStatus};

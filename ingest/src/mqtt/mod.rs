//! MQTT ingest: persistent-session subscriptions to a plant's broker whose messages (line
//! protocol or mapped JSON, with tags from topic levels) become WAL records; each message is
//! acknowledged to the broker only once its rows are durable.

pub mod config;
pub mod connection;
pub mod source;
pub mod sparkplug;
pub mod topic;

pub use config::{Format, Protocol, SourceConfig, sources_from_toml};
pub use source::{MqttSource, SourceReport, SourceStatus};
pub use topic::TopicTemplate;

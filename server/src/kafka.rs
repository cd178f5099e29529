//! `kiln serve`'s Kafka sources: one from flags (`--kafka-brokers`, …), any number from a
//! TOML file (`--kafka-config`), each consumed on its own task until shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kiln_ingest::kafka::json::JsonMapping;
use kiln_ingest::kafka::{
    DefaultTime, Format, KafkaSource, SourceConfig, SourceStatus, sources_from_toml,
};
use kiln_storage::Engine;

use crate::sources::Sources;

/// Flags of one Kafka source; for several, use `--kafka-config`.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (`host:port,…`) of a source; with `--kafka-topics` and
    /// `--kafka-database` it starts consuming.
    #[arg(long, env = "KILN_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Topics to consume (comma-separated).
    #[arg(long, env = "KILN_KAFKA_TOPICS", value_delimiter = ',')]
    pub kafka_topics: Vec<String>,

    /// Consumer group; Kiln records offsets per group and topic in its WAL.
    #[arg(long, env = "KILN_KAFKA_GROUP", default_value = "kiln")]
    pub kafka_group: String,

    /// Database the source writes to.
    #[arg(long, env = "KILN_KAFKA_DATABASE")]
    pub kafka_database: Option<String>,

    /// Payload format: `line_protocol`, `json` (needs `--kafka-json-mapping`) or `protobuf`
    /// (a `kiln.ingest.v1.WriteRequest` per message).
    #[arg(long, env = "KILN_KAFKA_FORMAT", default_value = "line_protocol")]
    pub kafka_format: Format,

    /// Timestamp precision of line protocol messages: ns, us, ms or s.
    #[arg(long, env = "KILN_KAFKA_PRECISION", default_value = "ns")]
    pub kafka_precision: String,

    /// How JSON messages map to rows, as JSON: `{"table": "…", "tags": {…}, "fields": {…},
    /// "time": "$.ts", "time_unit": "ms"}` (see the README).
    #[arg(long, env = "KILN_KAFKA_JSON_MAPPING")]
    pub kafka_json_mapping: Option<String>,

    /// Topic for messages that cannot be written (default `<group>.dead-letter`).
    #[arg(long, env = "KILN_KAFKA_DEAD_LETTER_TOPIC")]
    pub kafka_dead_letter_topic: Option<String>,

    /// A librdkafka setting for the source, `key=value` (repeat, or comma-separate in the
    /// variable), e.g. `security.protocol=SASL_SSL`.
    #[arg(
        long = "kafka-option",
        env = "KILN_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    pub kafka_options: Vec<String>,

    /// The time of a row without one: `message` (the Kafka message's timestamp) or
    /// `ingest` (when Kiln reads it).
    #[arg(long, env = "KILN_KAFKA_DEFAULT_TIME", default_value = "message")]
    pub kafka_default_time: DefaultTime,

    /// Most messages per partition written as one WAL record.
    #[arg(long, env = "KILN_KAFKA_BATCH_MESSAGES", default_value_t = 10_000)]
    pub kafka_batch_messages: usize,

    /// Most payload bytes read before a batch is written (all partitions together).
    #[arg(long, env = "KILN_KAFKA_BATCH_BYTES", default_value = "8MiB", value_parser = crate::config::size::parse_usize)]
    pub kafka_batch_bytes: usize,

    /// How long a batch waits for more messages before it is written.
    #[arg(long, env = "KILN_KAFKA_LINGER", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub kafka_linger: Duration,

    /// A TOML file of Kafka sources (`[[source]]` tables; see the README).
    #[arg(long, env = "KILN_KAFKA_CONFIG")]
    pub kafka_config: Option<PathBuf>,
}

impl KafkaArgs {
    /// Every configured source; an error names the flag or file at fault.
    pub fn sources(&self) -> Result<Vec<SourceConfig>, String> {
        let mut sources = match &self.kafka_config {
            Some(path) => sources_from_toml(path)?,
            None => Vec::new(),
        };
        if let Some(brokers) = &self.kafka_brokers {
            let database = self
                .kafka_database
                .clone()
                .ok_or("--kafka-brokers needs --kafka-database (KILN_KAFKA_DATABASE)")?;
            if self.kafka_topics.is_empty() {
                return Err("--kafka-brokers needs --kafka-topics (KILN_KAFKA_TOPICS)".into());
            }
            let json = self
                .kafka_json_mapping
                .as_deref()
                .map(|text| {
                    serde_json::from_str::<JsonMapping>(text)
                        .map_err(|e| format!("--kafka-json-mapping: {e}"))
                })
                .transpose()?;
            let options = options("--kafka-option", &self.kafka_options)?;
            let source = SourceConfig {
                brokers: brokers.clone(),
                topics: self.kafka_topics.clone(),
                group: self.kafka_group.clone(),
                database,
                format: self.kafka_format,
                precision: self.kafka_precision.clone(),
                json,
                dead_letter_topic: self.kafka_dead_letter_topic.clone(),
                options,
                default_time: self.kafka_default_time,
                batch_messages: self.kafka_batch_messages,
                batch_bytes: self.kafka_batch_bytes,
                linger: self.kafka_linger,
            };
            source.check()?;
            sources.push(source);
        } else if self.kafka_database.is_some() || !self.kafka_topics.is_empty() {
            return Err("--kafka-topics and --kafka-database need --kafka-brokers".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &sources {
            for t in &s.topics {
                if !seen.insert((s.group.clone(), t.clone())) {
                    return Err(format!(
                        "topic {t:?} is read twice by consumer group {:?}; give one of the sources another group",
                        s.group
                    ));
                }
            }
        }
        Ok(sources)
    }
}

/// Creates every source's clients (a bad setting fails start-up) and starts consuming
/// until `shutdown` turns true.
pub fn start(
    configs: Vec<SourceConfig>,
    engine: &Arc<Engine>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Result<Sources<SourceStatus>, String> {
    let made = configs
        .into_iter()
        .map(|c| KafkaSource::new(c, Arc::clone(engine), shutdown.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Sources::spawn(
        made,
        "Kafka",
        KafkaSource::status,
        KafkaSource::run,
    ))
}

/// librdkafka settings given as `key=value` to `flag`.
pub fn options(flag: &str, given: &[String]) -> Result<BTreeMap<String, String>, String> {
    given
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("{flag} {kv:?}: expected key=value"))
        })
        .collect()
}

//! How a Kafka source is described: from `kiln serve` flags for one source, or from a TOML
//! file with a `[[source]]` table per source.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::json::JsonMapping;
use crate::line_protocol::Precision;

/// One Kafka source: topics read by a consumer group into a database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group. Kiln records its positions per group and topic.
    #[serde(default = "default_group")]
    pub group: String,
    /// Database the rows are written to (created on first write).
    pub database: String,
    /// Payload format of the messages.
    #[serde(default)]
    pub format: Format,
    /// Timestamp precision of line protocol messages.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// How JSON messages map to rows; required for `format = "json"`.
    #[serde(default)]
    pub json: Option<JsonMapping>,
    /// Topic that receives messages that cannot be written, with the error in headers.
    /// Defaults to `<group>.dead-letter`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// librdkafka settings for the consumer and the dead-letter producer (SASL, TLS, …),
    /// e.g. `"security.protocol" = "SASL_SSL"`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The time of a row that has none: the Kafka message's timestamp (`message`, the
    /// default) or the time Kiln reads it (`ingest`).
    #[serde(default)]
    pub default_time: DefaultTime,
    /// Most messages written as one WAL record per partition.
    #[serde(default = "default_batch_messages")]
    pub batch_messages: usize,
    /// Most payload bytes read before a batch is written (all partitions together).
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// How long a batch waits for more messages before it is written.
    #[serde(default = "default_linger", with = "humantime_serde_compat")]
    pub linger: Duration,
}

/// Where a row without a time gets one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultTime {
    /// The Kafka message's timestamp: a message read twice gives the same rows.
    #[default]
    Message,
    /// When Kiln reads the message.
    Ingest,
}

impl std::str::FromStr for DefaultTime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "message" => Ok(Self::Message),
            "ingest" => Ok(Self::Ingest),
            other => Err(format!(
                "unknown default time {other:?}; use message or ingest"
            )),
        }
    }
}

/// The payload format of a source's messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// InfluxDB line protocol, one or more lines per message.
    #[default]
    LineProtocol,
    /// JSON, mapped to rows by the source's `json` mapping.
    Json,
    /// A protobuf `kiln.ingest.v1.WriteRequest` (typed rows or line protocol).
    Protobuf,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "line_protocol" | "lp" => Ok(Self::LineProtocol),
            "json" => Ok(Self::Json),
            "protobuf" => Ok(Self::Protobuf),
            other => Err(format!(
                "unknown Kafka payload format {other:?}; use line_protocol, json or protobuf"
            )),
        }
    }
}

fn default_group() -> String {
    "kiln".into()
}
fn default_precision() -> String {
    "ns".into()
}
fn default_batch_messages() -> usize {
    10_000
}
fn default_batch_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_linger() -> Duration {
    Duration::from_millis(20)
}

/// `linger = "50ms"` in TOML.
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// The name the WAL records the positions of `group` in `topic` under.
pub fn position_source(group: &str, topic: &str) -> String {
    format!("kafka/{group}/{topic}")
}

/// A TOML file of sources: `[[source]]` tables with the fields of [`SourceConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    #[serde(default)]
    source: Vec<SourceConfig>,
}

/// Reads the sources of a TOML file; errors name the file and, for syntax, line and column.
pub fn sources_from_toml(path: &std::path::Path) -> Result<Vec<SourceConfig>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read Kafka sources file {}: {e}", path.display()))?;
    let file: SourcesFile =
        toml::from_str(&text).map_err(|e| format!("Kafka sources file {}: {e}", path.display()))?;
    for s in &file.source {
        s.check()
            .map_err(|e| format!("Kafka sources file {}: {e}", path.display()))?;
    }
    Ok(file.source)
}

impl SourceConfig {
    /// Checks what serde cannot: required combinations and values.
    pub fn check(&self) -> Result<(), String> {
        let name = self.topics.join(",");
        if self.brokers.trim().is_empty() {
            return Err(format!("source {name:?}: brokers must not be empty"));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err("a source needs at least one topic, and no empty topic names".into());
        }
        if self.database.is_empty() {
            return Err(format!("source {name:?}: database must not be empty"));
        }
        if self.group.is_empty() {
            return Err(format!("source {name:?}: group must not be empty"));
        }
        self.precision()
            .map_err(|e| format!("source {name:?}: {e}"))?;
        match (self.format, &self.json) {
            (Format::Json, None) => {
                return Err(format!(
                    "source {name:?}: format \"json\" needs a json mapping (table, fields, …)"
                ));
            }
            (Format::Json, Some(m)) => m.check().map_err(|e| format!("source {name:?}: {e}"))?,
            _ => {}
        }
        if self.batch_messages == 0 {
            return Err(format!(
                "source {name:?}: batch_messages must be at least 1"
            ));
        }
        if self
            .topics
            .iter()
            .any(|t| Some(t) == self.dead_letter_topic.as_ref())
        {
            return Err(format!(
                "source {name:?}: the dead-letter topic must not be one of the topics read"
            ));
        }
        Ok(())
    }

    pub fn precision(&self) -> Result<Precision, String> {
        self.precision.parse()
    }

    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead-letter", self.group))
    }

    /// The name positions are recorded under for `topic`: unique per group and topic.
    pub fn position_source(&self, topic: &str) -> String {
        position_source(&self.group, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_file_with_two_sources_and_errors_that_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kafka.toml");
        std::fs::write(
            &path,
            r#"
[[source]]
brokers = "127.0.0.1:9092"
topics = ["lp"]
database = "plant"
linger = "5ms"
options = { "session.timeout.ms" = "6000" }

[[source]]
brokers = "127.0.0.1:9092"
topics = ["gw"]
group = "gateways"
database = "plant"
format = "json"
json = { table = "readings", tags = { device = "$.device" }, fields = { temp = "$.t" }, time = "$.ts", time_unit = "ms" }
"#,
        )
        .unwrap();
        let sources = sources_from_toml(&path).unwrap();
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].format, Format::LineProtocol);
        assert_eq!(sources[0].linger, Duration::from_millis(5));
        assert_eq!(sources[0].dead_letter_topic(), "kiln.dead-letter");
        assert_eq!(sources[1].position_source("gw"), "kafka/gateways/gw");

        std::fs::write(
            &path,
            "[[source]]\nbrokers = \"b\"\ntopics = [\"t\"]\ndatabase = \"d\"\nformat = \"json\"\n",
        )
        .unwrap();
        let e = sources_from_toml(&path).unwrap_err();
        assert!(e.contains("needs a json mapping"), "{e}");
        std::fs::write(
            &path,
            "[[source]]\nbrokers = \"b\"\ntopics = [\"t\"]\ndatabase = \"d\"\nformat = \"xml\"\n",
        )
        .unwrap();
        let e = sources_from_toml(&path).unwrap_err();
        assert!(e.contains("line 5"), "{e}");
    }
}

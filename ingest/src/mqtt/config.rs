//! How an MQTT source is described: from `kiln serve` flags for one source, or from a TOML
//! file with an `[[mqtt]]` table per source.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::topic::TopicTemplate;
use crate::kafka::json::JsonMapping;
use crate::line_protocol::Precision;

/// One MQTT source: a persistent session on a broker, subscribed to topic filters at QoS 1,
/// whose messages are written to a database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883, TLS).
    pub broker: String,
    /// Topic filters to subscribe to (`+` and `#` wildcards allowed).
    pub topics: Vec<String>,
    /// Database the rows are written to (created on first write).
    pub database: String,
    /// The client id, fixed so that the broker keeps the session (and the messages
    /// published meanwhile) while Kiln is away. Defaults to `kiln-<database>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// MQTT protocol version: `3.1.1` (the default) or `5`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Payload format of the messages.
    #[serde(default)]
    pub format: Format,
    /// Timestamp precision of line protocol messages.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// How JSON messages map to rows; required for `format = "json"`.
    #[serde(default)]
    pub json: Option<JsonMapping>,
    /// Topic levels that become tags (and the table), e.g. `plant/{site}/{line}/{machine}`.
    #[serde(default)]
    pub topic_template: Option<String>,
    /// Sparkplug B: the table of metric values.
    #[serde(default = "default_sparkplug_table")]
    pub sparkplug_table: String,
    /// Sparkplug B: the table of births and deaths (`online` per node and device).
    #[serde(default = "default_sparkplug_status_table")]
    pub sparkplug_status_table: String,
    /// User name for the broker.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (a mounted Secret); read at start-up.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM CA bundle the broker's certificate must chain to (`mqtts://`); the system's
    /// roots are not used.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for brokers that require one (with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A topic that receives messages that cannot be written, unchanged; off by default
    /// (they are counted and logged either way).
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Most messages unacknowledged at once: the broker sends no more until Kiln has made
    /// some durable (MQTT 5's receive maximum; for 3.1.1 the broker's own setting, such as
    /// Mosquitto's `max_inflight_messages`, decides).
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    /// Largest message accepted, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most messages written as one WAL record.
    #[serde(default = "default_batch_messages")]
    pub batch_messages: usize,
    /// How long a batch waits for more messages before it is written.
    #[serde(
        default = "default_linger",
        with = "crate::kafka::config::humantime_serde_compat"
    )]
    pub linger: Duration,
    /// Time between keep-alive pings.
    #[serde(
        default = "default_keep_alive",
        with = "crate::kafka::config::humantime_serde_compat"
    )]
    pub keep_alive: Duration,
}

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "3.1.1" | "3" | "4" => Ok(Self::V311),
            "5" | "5.0" => Ok(Self::V5),
            other => Err(format!(
                "unknown MQTT protocol version {other:?}; use 3.1.1 or 5"
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
    /// Sparkplug B (protobuf) on `spBv1.0/…` topics.
    SparkplugB,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "line_protocol" | "lp" => Ok(Self::LineProtocol),
            "json" => Ok(Self::Json),
            "sparkplug_b" | "sparkplug" => Ok(Self::SparkplugB),
            other => Err(format!(
                "unknown MQTT payload format {other:?}; use line_protocol, json or sparkplug_b"
            )),
        }
    }
}

fn default_precision() -> String {
    "ns".into()
}
fn default_sparkplug_table() -> String {
    "sparkplug".into()
}
fn default_sparkplug_status_table() -> String {
    "sparkplug_status".into()
}
fn default_inflight() -> u16 {
    1000
}
fn default_max_message_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_batch_messages() -> usize {
    1000
}
fn default_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl std::str::FromStr for Broker {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "broker {url:?}: expected mqtt://host[:port] or mqtts://host[:port]"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        // `[v6 address]:port`, `host:port` or a host alone.
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("broker {url:?}: unclosed '['"))?;
                (host, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("broker {url:?}: no host name"));
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse()
                .map_err(|_| format!("broker {url:?}: port {p:?} is not a number"))?,
        };
        Ok(Self {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

/// A TOML file of sources: `[[mqtt]]` tables with the fields of [`SourceConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    #[serde(default)]
    mqtt: Vec<SourceConfig>,
}

/// Reads the sources of a TOML file; errors name the file and, for syntax, line and column.
pub fn sources_from_toml(path: &std::path::Path) -> Result<Vec<SourceConfig>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read MQTT sources file {}: {e}", path.display()))?;
    let file: SourcesFile =
        toml::from_str(&text).map_err(|e| format!("MQTT sources file {}: {e}", path.display()))?;
    for s in &file.mqtt {
        s.check()
            .map_err(|e| format!("MQTT sources file {}: {e}", path.display()))?;
    }
    Ok(file.mqtt)
}

impl SourceConfig {
    /// Checks what serde cannot: required combinations and values.
    pub fn check(&self) -> Result<(), String> {
        let broker = self.broker()?;
        let name = self.client_id();
        let fail = |e: String| format!("MQTT source {name:?}: {e}");
        if self.topics.is_empty() {
            return Err(fail("needs at least one topic filter".into()));
        }
        for t in &self.topics {
            check_filter(t).map_err(fail)?;
        }
        if self.database.is_empty() {
            return Err(fail("database must not be empty".into()));
        }
        if name.is_empty() || name.len() > 65_535 {
            return Err(fail("the client id must not be empty".into()));
        }
        self.precision().map_err(fail)?;
        match (self.format, &self.json) {
            (Format::Json, None) => {
                return Err(fail(
                    "format \"json\" needs a json mapping (table, fields, …)".into(),
                ));
            }
            (Format::Json, Some(m)) => m.check().map_err(fail)?,
            (_, Some(_)) => {
                return Err(fail("a json mapping needs format \"json\"".into()));
            }
            (_, None) => {}
        }
        if self.format == Format::SparkplugB {
            if self.topic_template.is_some() {
                return Err(fail(
                    "Sparkplug B topics name group, edge node and device themselves: no topic_template".into(),
                ));
            }
            if let Some(t) = self.topics.iter().find(|t| {
                !matches!(
                    t.split('/').next(),
                    Some(super::sparkplug::NAMESPACE | "+" | "#")
                )
            }) {
                return Err(fail(format!(
                    "topic filter {t:?} takes no Sparkplug B data; subscribe to spBv1.0/# or spBv1.0/<group>/#"
                )));
            }
            for table in [&self.sparkplug_table, &self.sparkplug_status_table] {
                kiln_storage::catalog::validate_name(table)
                    .map_err(|e| fail(format!("Sparkplug table: {e}")))?;
            }
        }
        self.template().map_err(fail)?;
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(fail("give password_file or password_env, not both".into()));
        }
        if (self.password_file.is_some() || self.password_env.is_some()) && self.username.is_none()
        {
            return Err(fail("a password needs a username".into()));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(fail("cert_file and key_file go together".into()));
        }
        if !broker.tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err(fail(
                "TLS files are given but the broker URL is mqtt://; use mqtts://".into(),
            ));
        }
        if let Some(dl) = &self.dead_letter_topic {
            if dl.is_empty() || dl.contains(['+', '#']) {
                return Err(fail(format!(
                    "dead-letter topic {dl:?}: a topic name, without wildcards"
                )));
            }
            if self.topics.iter().any(|f| filter_matches(f, dl)) {
                return Err(fail(format!(
                    "the dead-letter topic {dl:?} is one this source reads"
                )));
            }
        }
        if self.batch_messages == 0 || self.max_inflight == 0 {
            return Err(fail(
                "batch_messages and max_inflight must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub fn broker(&self) -> Result<Broker, String> {
        self.broker.parse()
    }

    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("kiln-{}", self.database))
    }

    pub fn precision(&self) -> Result<Precision, String> {
        self.precision.parse()
    }

    pub fn template(&self) -> Result<Option<TopicTemplate>, String> {
        self.topic_template.as_deref().map(str::parse).transpose()
    }

    /// The broker password, from its file or variable (`None` without either).
    pub fn password(&self) -> Result<Option<String>, String> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("cannot read the MQTT password file {}: {e}", path.display())
            })?;
            return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
        }
        if let Some(var) = &self.password_env {
            return std::env::var(var)
                .map(Some)
                .map_err(|_| format!("the MQTT password variable {var} is not set"));
        }
        Ok(None)
    }
}

/// Checks an MQTT topic filter: `#` only as the last level, wildcards only as whole levels.
fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("an empty topic filter".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && level.len() > 1 {
            return Err(format!(
                "topic filter {filter:?}: a wildcard must be a whole level"
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!(
                "topic filter {filter:?}: '#' must be the last level"
            ));
        }
    }
    Ok(())
}

/// Whether `topic` matches the topic filter `filter`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b: Broker = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("127.0.0.1", 1884, false));
        let b: Broker = "mqtts://broker.plant".parse().unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.tls),
            ("broker.plant", 8883, true)
        );
        let b: Broker = "mqtt://[::1]:2000/".parse().unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 2000));
        for bad in ["tcp://h:1", "mqtt://", "mqtt://h:x", "mqtt://[::1"] {
            assert!(bad.parse::<Broker>().is_err(), "{bad}");
        }
    }

    #[test]
    fn filters() {
        assert!(filter_matches("plant/+/temp", "plant/a/temp"));
        assert!(!filter_matches("plant/+/temp", "plant/a/b/temp"));
        assert!(filter_matches("plant/#", "plant/a/b"));
        assert!(filter_matches("plant/#", "plant"));
        assert!(!filter_matches("plant/a", "plant/a/b"));
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("+/+/#").is_ok());
    }

    #[test]
    fn toml_file_and_errors_that_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mqtt.toml");
        std::fs::write(
            &path,
            r#"
[[mqtt]]
broker = "mqtt://127.0.0.1:1883"
topics = ["plant/+/+/+"]
database = "plant"
format = "json"
topic_template = "plant/{site}/{line}/{machine}"
json = { table = "machines", fields = { temp = "$.temp" }, time = "$.ts", time_unit = "ms" }

[[mqtt]]
broker = "mqtts://broker:8884"
topics = ["lp/#"]
database = "plant"
client_id = "kiln-lp"
protocol = "5"
linger = "20ms"
"#,
        )
        .unwrap();
        let sources = sources_from_toml(&path).unwrap();
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].client_id(), "kiln-plant");
        assert_eq!(sources[1].protocol, Protocol::V5);
        assert_eq!(sources[1].linger, Duration::from_millis(20));
        assert!(sources[1].broker().unwrap().tls);

        let bad = |body: &str| {
            std::fs::write(&path, body).unwrap();
            sources_from_toml(&path).unwrap_err()
        };
        let base = "[[mqtt]]\nbroker = \"mqtt://b\"\ndatabase = \"d\"\n";
        let e = bad(&format!("{base}topics = [\"a/#/b\"]\n"));
        assert!(e.contains("'#' must be the last level"), "{e}");
        let e = bad(&format!("{base}topics = [\"t\"]\nformat = \"json\"\n"));
        assert!(e.contains("needs a json mapping"), "{e}");
        let e = bad(&format!("{base}topics = [\"t\"]\nca_file = \"ca.pem\"\n"));
        assert!(e.contains("use mqtts://"), "{e}");
        let e = bad(&format!(
            "{base}topics = [\"t/#\"]\ndead_letter_topic = \"t/dead\"\n"
        ));
        assert!(e.contains("is one this source reads"), "{e}");
        let e = bad(&format!("{base}topics = [\"t\"]\nformat = \"xml\"\n"));
        assert!(e.contains("line 5"), "{e}");
    }
}

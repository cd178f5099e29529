//! `kiln serve`'s MQTT sources: one from flags (`--mqtt-broker`, …), any number from a TOML
//! file (`--mqtt-config`, `[[mqtt]]` tables), each on its own task until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kiln_ingest::kafka::json::JsonMapping;
use kiln_ingest::mqtt::{Format, MqttSource, Protocol, SourceConfig, SourceStatus};
use kiln_storage::Engine;

use crate::sources::Sources;

/// Flags of one MQTT source; for several, use `--mqtt-config`.
#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    /// Broker of an MQTT source: `mqtt://host[:port]` or `mqtts://host[:port]` (TLS); with
    /// `--mqtt-topics` and `--mqtt-database` it starts subscribing.
    #[arg(long, env = "KILN_MQTT_BROKER")]
    pub mqtt_broker: Option<String>,

    /// Topic filters to subscribe to at QoS 1 (comma-separated; `+` and `#` allowed).
    #[arg(long, env = "KILN_MQTT_TOPICS", value_delimiter = ',')]
    pub mqtt_topics: Vec<String>,

    /// Database the source writes to.
    #[arg(long, env = "KILN_MQTT_DATABASE")]
    pub mqtt_database: Option<String>,

    /// Client id of Kiln's persistent session (default `kiln-<database>`); keep it fixed,
    /// or the broker forgets what it held for Kiln.
    #[arg(long, env = "KILN_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,

    /// MQTT protocol version: 3.1.1 or 5.
    #[arg(long, env = "KILN_MQTT_PROTOCOL", default_value = "3.1.1")]
    pub mqtt_protocol: Protocol,

    /// Payload format: `line_protocol`, `json` (needs `--mqtt-json-mapping`) or
    /// `sparkplug_b` (topics under `spBv1.0/`).
    #[arg(long, env = "KILN_MQTT_FORMAT", default_value = "line_protocol")]
    pub mqtt_format: Format,

    /// Timestamp precision of line protocol messages: ns, us, ms or s.
    #[arg(long, env = "KILN_MQTT_PRECISION", default_value = "ns")]
    pub mqtt_precision: String,

    /// How JSON messages map to rows, as JSON (the same mapping as Kafka's; see the
    /// README).
    #[arg(long, env = "KILN_MQTT_JSON_MAPPING")]
    pub mqtt_json_mapping: Option<String>,

    /// Topic levels that become tags, `{table}` the table: `plant/{site}/{line}/{machine}`.
    #[arg(long, env = "KILN_MQTT_TOPIC_TEMPLATE")]
    pub mqtt_topic_template: Option<String>,

    /// Sparkplug B: the table of metric values (tags group, edge_node, device).
    #[arg(long, env = "KILN_MQTT_SPARKPLUG_TABLE", default_value = "sparkplug")]
    pub mqtt_sparkplug_table: String,

    /// Sparkplug B: the table of births and deaths (`online` per node and device).
    #[arg(
        long,
        env = "KILN_MQTT_SPARKPLUG_STATUS_TABLE",
        default_value = "sparkplug_status"
    )]
    pub mqtt_sparkplug_status_table: String,

    /// User name for the broker.
    #[arg(long, env = "KILN_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// A file holding the broker password (a mounted Secret).
    #[arg(long, env = "KILN_MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,

    /// PEM CA bundle the broker's certificate must chain to (for `mqtts://`).
    #[arg(long, env = "KILN_MQTT_CA")]
    pub mqtt_ca: Option<PathBuf>,

    /// PEM client certificate, for brokers that require one (with `--mqtt-key`).
    #[arg(long, env = "KILN_MQTT_CERT")]
    pub mqtt_cert: Option<PathBuf>,

    /// PEM private key of `--mqtt-cert`.
    #[arg(long, env = "KILN_MQTT_KEY")]
    pub mqtt_key: Option<PathBuf>,

    /// Topic that receives messages that cannot be written (none by default: they are
    /// counted and logged).
    #[arg(long, env = "KILN_MQTT_DEAD_LETTER_TOPIC")]
    pub mqtt_dead_letter_topic: Option<String>,

    /// Most messages unacknowledged at once (MQTT 5's receive maximum).
    #[arg(long, env = "KILN_MQTT_MAX_INFLIGHT", default_value_t = 1000)]
    pub mqtt_max_inflight: u16,

    /// Most messages written as one WAL record.
    #[arg(long, env = "KILN_MQTT_BATCH_MESSAGES", default_value_t = 1000)]
    pub mqtt_batch_messages: usize,

    /// How long a batch waits for more messages before it is written.
    #[arg(long, env = "KILN_MQTT_LINGER", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub mqtt_linger: Duration,

    /// A TOML file of MQTT sources (`[[mqtt]]` tables; see the README).
    #[arg(long, env = "KILN_MQTT_CONFIG")]
    pub mqtt_config: Option<PathBuf>,
}

impl MqttArgs {
    /// Every configured source; an error names the flag or file at fault.
    pub fn sources(&self) -> Result<Vec<SourceConfig>, String> {
        let mut sources = match &self.mqtt_config {
            Some(path) => kiln_ingest::mqtt::sources_from_toml(path)?,
            None => Vec::new(),
        };
        if let Some(broker) = &self.mqtt_broker {
            let database = self
                .mqtt_database
                .clone()
                .ok_or("--mqtt-broker needs --mqtt-database (KILN_MQTT_DATABASE)")?;
            if self.mqtt_topics.is_empty() {
                return Err("--mqtt-broker needs --mqtt-topics (KILN_MQTT_TOPICS)".into());
            }
            let json = self
                .mqtt_json_mapping
                .as_deref()
                .map(|text| {
                    serde_json::from_str::<JsonMapping>(text)
                        .map_err(|e| format!("--mqtt-json-mapping: {e}"))
                })
                .transpose()?;
            let source = SourceConfig {
                broker: broker.clone(),
                topics: self.mqtt_topics.clone(),
                database,
                client_id: self.mqtt_client_id.clone(),
                protocol: self.mqtt_protocol,
                format: self.mqtt_format,
                precision: self.mqtt_precision.clone(),
                json,
                topic_template: self.mqtt_topic_template.clone(),
                sparkplug_table: self.mqtt_sparkplug_table.clone(),
                sparkplug_status_table: self.mqtt_sparkplug_status_table.clone(),
                username: self.mqtt_username.clone(),
                password_file: self.mqtt_password_file.clone(),
                password_env: None,
                ca_file: self.mqtt_ca.clone(),
                cert_file: self.mqtt_cert.clone(),
                key_file: self.mqtt_key.clone(),
                dead_letter_topic: self.mqtt_dead_letter_topic.clone(),
                max_inflight: self.mqtt_max_inflight,
                max_message_bytes: 16 * 1024 * 1024,
                batch_messages: self.mqtt_batch_messages,
                linger: self.mqtt_linger,
                keep_alive: Duration::from_secs(30),
            };
            source.check()?;
            sources.push(source);
        } else if self.mqtt_database.is_some() || !self.mqtt_topics.is_empty() {
            return Err("--mqtt-topics and --mqtt-database need --mqtt-broker".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &sources {
            if !seen.insert((s.broker.clone(), s.client_id())) {
                return Err(format!(
                    "two MQTT sources use client id {:?} on {}: a broker keeps one session per id; give one a client_id of its own",
                    s.client_id(),
                    s.broker
                ));
            }
        }
        Ok(sources)
    }
}

/// Creates every source's client (a bad setting or file fails start-up) and starts each
/// until `shutdown` turns true. Sparkplug B sources keep the births they have seen under
/// `state_dir`.
pub fn start(
    configs: Vec<SourceConfig>,
    engine: &Arc<Engine>,
    state_dir: &std::path::Path,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Result<Sources<SourceStatus>, String> {
    let made = configs
        .into_iter()
        .map(|c| MqttSource::new(c, Arc::clone(engine), state_dir, shutdown.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Sources::spawn(
        made,
        "MQTT",
        MqttSource::status,
        MqttSource::run,
    ))
}

/// `GET /api/v3/mqtt`: every MQTT source, connected or not, with its counts, rates and
/// last error.
pub async fn status(
    axum::extract::State(state): axum::extract::State<crate::http::AppState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Err(e) = crate::auth::http::require(&state.auth, &principal, crate::auth::Action::Admin)
    {
        return crate::auth::http::refusal(&e);
    }
    let sources: Vec<_> = state.mqtt.iter().map(|s| s.report()).collect();
    axum::Json(serde_json::json!({ "sources": sources })).into_response()
}

/// The sources' figures in `/metrics`, labelled by client id.
#[derive(Debug)]
pub struct Collector(pub Arc<Vec<Arc<SourceStatus>>>);

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        if self.0.is_empty() {
            return Ok(());
        }
        let reports: Vec<_> = self.0.iter().map(|s| s.report()).collect();
        type Pick = fn(&kiln_ingest::mqtt::SourceReport) -> u64;
        let families: [(&str, &str, MetricType, Pick); 5] = [
            (
                "kiln_mqtt_connected",
                "Whether an MQTT source is connected to its broker (1) or not (0)",
                MetricType::Gauge,
                |r| u64::from(r.connected),
            ),
            (
                "kiln_mqtt_messages",
                "MQTT messages made durable and acknowledged",
                MetricType::Counter,
                |r| r.messages,
            ),
            (
                "kiln_mqtt_rows",
                "Rows written from MQTT messages",
                MetricType::Counter,
                |r| r.rows,
            ),
            (
                "kiln_mqtt_rejected",
                "MQTT messages that could not be written",
                MetricType::Counter,
                |r| r.rejected,
            ),
            (
                "kiln_mqtt_dead_lettered",
                "MQTT messages republished to the dead-letter topic",
                MetricType::Counter,
                |r| r.dead_lettered,
            ),
        ];
        for (name, help, ty, pick) in families {
            let mut family = encoder.encode_descriptor(name, help, None, ty)?;
            for r in &reports {
                let labels = [("client_id", r.client_id.as_str())];
                let metric = family.encode_family(&labels)?;
                match ty {
                    MetricType::Counter => ConstCounter::new(pick(r)).encode(metric)?,
                    _ => ConstGauge::new(pick(r) as i64).encode(metric)?,
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum MqttCommand {
    /// Show every MQTT source of a running server: connected or not, messages and rows
    /// (totals and per second), rejected messages and the last error.
    Status {
        #[command(flatten)]
        server: crate::client::ServerOptions,
    },
}

/// `kiln mqtt status`.
pub async fn command(command: MqttCommand) -> Result<(), String> {
    let MqttCommand::Status { server } = command;
    let request = server.request(reqwest::Method::GET, "/api/v3/mqtt")?;
    let resp = server.send(request).await?;
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    let sources = v["sources"].as_array().cloned().unwrap_or_default();
    if sources.is_empty() {
        println!("no MQTT sources (see `kiln serve --help`, --mqtt-*)");
        return Ok(());
    }
    for s in sources {
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let rate = |k: &str| s[k].as_f64().unwrap_or(0.0);
        println!(
            "source {}: {} {} -> database {}",
            s["client_id"].as_str().unwrap_or("?"),
            s["broker"].as_str().unwrap_or("?"),
            s["topics"],
            s["database"].as_str().unwrap_or("?"),
        );
        println!(
            "  {} ({} connects){}; {} messages, {} rows, {} rejected, {} dead-lettered; {:.0} messages/s, {:.0} rows/s",
            if s["connected"] == true {
                "connected"
            } else {
                "NOT connected"
            },
            n("connects"),
            if s["waiting_for_buffer"] == true {
                ", waiting for room in the write buffer"
            } else {
                ""
            },
            n("messages"),
            n("rows"),
            n("rejected"),
            n("dead_lettered"),
            rate("messages_per_second"),
            rate("rows_per_second"),
        );
        if let Some(e) = s["last_error"].as_object() {
            println!(
                "  last error at {}: {}",
                e.get("at").and_then(|v| v.as_str()).unwrap_or("?"),
                e.get("message").and_then(|v| v.as_str()).unwrap_or("?")
            );
        }
    }
    Ok(())
}

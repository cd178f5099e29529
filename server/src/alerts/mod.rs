//! Alerting in the server: the rules' HTTP API and CLI, the scheduler that evaluates
//! them (`kiln_query::alerts`) and the notifier that delivers their transitions
//! ([`notify`]: webhooks, Alertmanager, a Kafka topic).
//!
//! | method and path | what | needs |
//! |---|---|---|
//! | `POST /api/v3/alerts/rules` | create a rule (JSON, see [`http::CreateRule`]); 201 | write on its database |
//! | `GET /api/v3/alerts/rules` | the rules | read (shows the databases the token reads) |
//! | `GET /api/v3/alerts/rules/{name}` | one rule | read on its database |
//! | `DELETE /api/v3/alerts/rules/{name}` | delete it, resolving its alerts; 204 | write on its database |
//! | `GET /api/v3/alerts` | pending and firing alerts | read |

pub mod cli;
pub mod http;
pub mod notify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kiln_query::QueryEngine;
use kiln_query::alerts::AlertScheduler;

/// Where alert notifications go.
#[derive(Debug, Clone, Args)]
pub struct AlertArgs {
    /// Webhook (an http:// or https:// URL) that receives the firing and resolved alerts of
    /// rules without a receiver of their own, as JSON.
    #[arg(long, env = "KILN_ALERT_WEBHOOK_URL")]
    pub alert_webhook_url: Option<String>,

    /// A file holding the key that signs webhook bodies: each request carries
    /// `X-Kiln-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    #[arg(long, env = "KILN_ALERT_WEBHOOK_SECRET_FILE")]
    pub alert_webhook_secret_file: Option<PathBuf>,

    /// Prometheus Alertmanager base URL (repeat for several): alerts are posted to
    /// `<url>/api/v2/alerts` as Prometheus posts them.
    #[arg(
        long = "alertmanager-url",
        env = "KILN_ALERTMANAGER_URL",
        value_delimiter = ','
    )]
    pub alertmanager_urls: Vec<String>,

    /// Kafka bootstrap servers of a topic that receives every firing and resolution as
    /// JSON (with --alert-kafka-topic).
    #[arg(long, env = "KILN_ALERT_KAFKA_BROKERS", requires = "alert_kafka_topic")]
    pub alert_kafka_brokers: Option<String>,

    /// The topic for alert notifications (key `rule/series`, value the webhook's JSON).
    #[arg(long, env = "KILN_ALERT_KAFKA_TOPIC", requires = "alert_kafka_brokers")]
    pub alert_kafka_topic: Option<String>,

    /// A librdkafka setting of the notification producer, `name=value` (repeat):
    /// `security.protocol=SSL`, `sasl.mechanism=PLAIN`, …
    #[arg(
        long = "alert-kafka-option",
        env = "KILN_ALERT_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    pub alert_kafka_options: Vec<String>,

    /// How often firing alerts are sent to Alertmanager again while they fire.
    #[arg(long, env = "KILN_ALERT_RESEND_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub alert_resend_interval: Duration,
}

impl AlertArgs {
    /// The notifier's configuration, its files read.
    pub fn notify_config(&self) -> Result<notify::NotifyConfig, String> {
        for url in self.alert_webhook_url.iter().chain(&self.alertmanager_urls) {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("{url:?} is not an http:// or https:// URL"));
            }
        }
        let webhook_secret = match &self.alert_webhook_secret_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "cannot read the webhook secret file {}: {e}",
                        path.display()
                    )
                })?;
                let secret = text.trim();
                if secret.is_empty() {
                    return Err(format!(
                        "the webhook secret file {} is empty",
                        path.display()
                    ));
                }
                Some(secret.as_bytes().to_vec())
            }
        };
        let kafka = match (&self.alert_kafka_brokers, &self.alert_kafka_topic) {
            (Some(brokers), Some(topic)) => {
                let options =
                    crate::kafka::options("--alert-kafka-option", &self.alert_kafka_options)?;
                Some(notify::KafkaTarget {
                    brokers: brokers.clone(),
                    topic: topic.clone(),
                    options,
                })
            }
            _ => None,
        };
        Ok(notify::NotifyConfig {
            kafka,
            default_webhook: self.alert_webhook_url.clone(),
            webhook_secret,
            alertmanagers: self.alertmanager_urls.clone(),
            resend_interval: self.alert_resend_interval.max(Duration::from_secs(1)),
        })
    }
}

/// Starts the scheduler and the notifier; both stop when `stop` turns true.
pub fn start(
    query: &QueryEngine,
    config: notify::NotifyConfig,
    counters: notify::NotifyCounters,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let scheduler = AlertScheduler::new(query.clone());
    let notifier = notify::Notifier::new(Arc::clone(query.engine().catalog()), config, counters)?;
    Ok(vec![
        tokio::spawn(scheduler.run(crate::serve::stopped(stop.clone()))),
        tokio::spawn(notifier.run(crate::serve::stopped(stop.clone()))),
    ])
}

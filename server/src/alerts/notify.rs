//! Delivering alert transitions: webhooks, Alertmanager and a Kafka topic, at least once.
//!
//! The outbox is in the catalog (`AlertsState::outbox`): a firing or resolved transition
//! enters it when it is recorded and leaves once every receiver has taken it, each
//! receiver's success recorded as an event. After a restart the notifier starts from the
//! outbox again, so a transition is announced once per receiver, twice only if Kiln died
//! between a receiver's answer and that record (the idempotency key is then the same).
//! A receiver gets one transition at a time, in order: a later one waits while an earlier
//! one is retried (backoff from 1 s, doubling, up to a minute).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use kiln_storage::catalog::alerts::{AlertState, AlertTransition, alert_labels};
use kiln_storage::catalog::{Catalog, CatalogEvent, CatalogState};
use kiln_storage::ids::AlertEventId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;

/// Where notifications go, beyond each rule's own webhook.
#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    /// Webhook for rules without a receiver of their own.
    pub default_webhook: Option<String>,
    /// Key of the `X-Kiln-Signature` HMAC-SHA256 of webhook bodies.
    pub webhook_secret: Option<Vec<u8>>,
    /// Alertmanager base URLs (`…/api/v2/alerts` is appended).
    pub alertmanagers: Vec<String>,
    /// How often firing alerts are sent to Alertmanager again.
    pub resend_interval: Duration,
    /// A Kafka topic that receives every firing and resolution as JSON.
    pub kafka: Option<KafkaTarget>,
}

/// A Kafka topic for notifications.
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    pub brokers: String,
    pub topic: String,
    /// librdkafka settings (`security.protocol=SSL`, …).
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotifyLabels {
    /// `webhook`, `alertmanager` or `kafka`.
    pub receiver: String,
    /// `sent` or `failed`.
    pub outcome: String,
}

/// Counts of notification attempts, for `/metrics`.
pub type NotifyCounters = Family<NotifyLabels, Counter>;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_secs(10);

/// A receiver of a transition, named as the outbox records it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Receiver {
    Webhook(String),
    Alertmanager(String),
    Kafka(String),
}

impl Receiver {
    fn name(&self) -> String {
        match self {
            Self::Webhook(url) => format!("webhook {url}"),
            Self::Alertmanager(url) => format!("alertmanager {url}"),
            Self::Kafka(topic) => format!("kafka {topic}"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Webhook(_) => "webhook",
            Self::Alertmanager(_) => "alertmanager",
            Self::Kafka(_) => "kafka",
        }
    }
}

#[derive(Debug)]
struct Retry {
    at: Instant,
    backoff: Duration,
}

pub struct Notifier {
    catalog: Arc<Catalog>,
    config: NotifyConfig,
    client: reqwest::Client,
    kafka: Option<rdkafka::producer::FutureProducer>,
    counters: NotifyCounters,
    retries: HashMap<(AlertEventId, Receiver), Retry>,
    last_resend: Option<Instant>,
}

fn rfc3339(nanos: i64) -> String {
    crate::http::rfc3339(nanos, chrono::SecondsFormat::Millis)
}

impl Notifier {
    pub fn new(
        catalog: Arc<Catalog>,
        config: NotifyConfig,
        counters: NotifyCounters,
    ) -> Result<Self, String> {
        // The system's roots verify https receivers. An image without a CA bundle (the
        // distroless one) has none: plain http receivers still work, and https ones fail
        // at delivery with the reason (retried, counted) rather than stopping start-up.
        let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %crate::client::chain(&e), "no CA certificates for https alert receivers; http receivers only");
                reqwest::Client::builder()
                    .timeout(TIMEOUT)
                    .tls_certs_only([])
                    .build()
                    .map_err(|e| format!("cannot build the alert notifier's HTTP client: {e}"))?
            }
        };
        let kafka = match &config.kafka {
            None => None,
            Some(target) => {
                let mut c = rdkafka::ClientConfig::new();
                c.set("bootstrap.servers", &target.brokers)
                    .set("enable.idempotence", "true")
                    .set("message.timeout.ms", "10000");
                for (k, v) in &target.options {
                    c.set(k, v);
                }
                Some(c.create().map_err(|e| {
                    format!("cannot create the Kafka producer for alert notifications: {e}")
                })?)
            }
        };
        Ok(Self {
            catalog,
            config,
            client,
            kafka,
            counters,
            retries: HashMap::new(),
            last_resend: None,
        })
    }

    fn receivers(&self, t: &AlertTransition) -> Vec<Receiver> {
        let mut out: Vec<Receiver> = t
            .receiver
            .clone()
            .or_else(|| self.config.default_webhook.clone())
            .map(Receiver::Webhook)
            .into_iter()
            .collect();
        out.extend(
            self.config
                .alertmanagers
                .iter()
                .cloned()
                .map(Receiver::Alertmanager),
        );
        out.extend(
            self.config
                .kafka
                .iter()
                .map(|k| Receiver::Kafka(k.topic.clone())),
        );
        out
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            self.deliver_outbox().await;
            self.resend_firing().await;
        }
    }

    async fn deliver_outbox(&mut self) {
        let state = self.catalog.snapshot();
        if state.alerts.outbox.is_empty() {
            self.retries.clear();
            return;
        }
        let mut blocked: HashSet<Receiver> = HashSet::new();
        let now = Instant::now();
        for (id, entry) in &state.alerts.outbox {
            let receivers = self.receivers(&entry.transition);
            let todo: Vec<Receiver> = receivers
                .iter()
                .filter(|r| !entry.delivered.contains(&r.name()))
                .cloned()
                .collect();
            let mut taken = Vec::new();
            for r in &todo {
                if blocked.contains(r) {
                    continue;
                }
                if self
                    .retries
                    .get(&(*id, r.clone()))
                    .is_some_and(|retry| retry.at > now)
                {
                    blocked.insert(r.clone());
                    continue;
                }
                match self.send(r, &entry.transition).await {
                    Ok(()) => {
                        self.count(r, "sent");
                        self.retries.remove(&(*id, r.clone()));
                        taken.push(r.clone());
                    }
                    Err(e) => {
                        self.count(r, "failed");
                        let backoff = self
                            .retries
                            .get(&(*id, r.clone()))
                            .map_or(FIRST_BACKOFF, |retry| (retry.backoff * 2).min(MAX_BACKOFF));
                        tracing::warn!(receiver = %r.name(), key = %entry.transition.key(), error = %e, retry_in = ?backoff, "alert notification failed");
                        self.retries.insert(
                            (*id, r.clone()),
                            Retry {
                                at: Instant::now() + backoff,
                                backoff,
                            },
                        );
                        blocked.insert(r.clone());
                    }
                }
            }
            let remaining = todo.len() - taken.len();
            let mut events: Vec<CatalogEvent> = taken
                .iter()
                .map(|r| CatalogEvent::AlertDelivered {
                    id: *id,
                    receiver: r.name(),
                    done: false,
                })
                .collect();
            if remaining == 0 {
                events.push(CatalogEvent::AlertDelivered {
                    id: *id,
                    receiver: String::new(),
                    done: true,
                });
            }
            if events.is_empty() {
                continue;
            }
            if let Err(e) = self.catalog.record_alerts(events).await {
                tracing::warn!(error = %e, "recording alert deliveries failed");
                return;
            }
        }
    }

    fn count(&self, r: &Receiver, outcome: &str) {
        self.counters
            .get_or_create(&NotifyLabels {
                receiver: r.kind().to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    async fn send(&self, r: &Receiver, t: &AlertTransition) -> Result<(), String> {
        match r {
            Receiver::Webhook(url) => self.send_webhook(url, t).await,
            Receiver::Kafka(topic) => self.send_kafka(topic, t).await,
            Receiver::Alertmanager(url) => {
                let ends_at = if t.to == AlertState::Firing {
                    None
                } else {
                    Some(t.at)
                };
                self.post_alertmanager(
                    url,
                    vec![am_alert(
                        &t.labels,
                        &t.summary,
                        &t.description,
                        t.value,
                        t.active_at,
                        ends_at,
                        self.firing_ends_at(),
                    )],
                )
                .await
            }
        }
    }

    async fn send_webhook(&self, url: &str, t: &AlertTransition) -> Result<(), String> {
        let body = serde_json::to_vec(&webhook_payload(t)).map_err(|e| e.to_string())?;
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("x-kiln-idempotency-key", t.key());
        if let Some(secret) = &self.config.webhook_secret {
            request = request.header("x-kiln-signature", signature(secret, &body));
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| crate::client::chain(&e))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {}", response.status()))
        }
    }

    /// One message per transition: key `rule/series` (a series' transitions stay in
    /// order on one partition), the webhook's JSON as the value, the idempotency key in
    /// header `kiln-idempotency-key`.
    async fn send_kafka(&self, topic: &str, t: &AlertTransition) -> Result<(), String> {
        use rdkafka::message::{Header, OwnedHeaders};
        let Some(producer) = &self.kafka else {
            return Err("no Kafka producer".into());
        };
        let body = serde_json::to_vec(&webhook_payload(t)).map_err(|e| e.to_string())?;
        let key = format!(
            "{}/{}",
            t.rule_name,
            kiln_storage::catalog::alerts::series_key(&t.series)
        );
        let idempotency = t.key();
        let record = rdkafka::producer::FutureRecord::to(topic)
            .key(&key)
            .payload(&body)
            .headers(OwnedHeaders::new().insert(Header {
                key: "kiln-idempotency-key",
                value: Some(&idempotency),
            }));
        producer
            .send(record, TIMEOUT)
            .await
            .map(drop)
            .map_err(|(e, _)| format!("Kafka: {e}"))
    }

    /// `endsAt` of a firing alert sent to Alertmanager: far enough ahead that it stays
    /// firing between re-sends, near enough that it resolves if Kiln stops sending.
    fn firing_ends_at(&self) -> i64 {
        let ahead = self.config.resend_interval.max(Duration::from_secs(15)) * 4;
        kiln_storage::now_nanos()
            .saturating_add(i64::try_from(ahead.as_nanos()).unwrap_or(i64::MAX))
    }

    async fn post_alertmanager(
        &self,
        base: &str,
        alerts: Vec<serde_json::Value>,
    ) -> Result<(), String> {
        let url = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
        let response = self
            .client
            .post(&url)
            .json(&alerts)
            .send()
            .await
            .map_err(|e| crate::client::chain(&e))?;
        if response.status().is_success() {
            Ok(())
        } else {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            Err(format!("Alertmanager answered {status}: {}", text.trim()))
        }
    }

    /// Sends every firing alert to each Alertmanager again, as Prometheus does, so that
    /// Alertmanager keeps it firing (and notices when Kiln stops sending).
    async fn resend_firing(&mut self) {
        if self.config.alertmanagers.is_empty()
            || self
                .last_resend
                .is_some_and(|at| at.elapsed() < self.config.resend_interval)
        {
            return;
        }
        self.last_resend = Some(Instant::now());
        let state = self.catalog.snapshot();
        let alerts = firing_alerts(&state, self.firing_ends_at());
        if alerts.is_empty() {
            return;
        }
        for url in &self.config.alertmanagers {
            let r = Receiver::Alertmanager(url.clone());
            match self.post_alertmanager(url, alerts.clone()).await {
                Ok(()) => self.count(&r, "sent"),
                Err(e) => {
                    self.count(&r, "failed");
                    tracing::warn!(receiver = %r.name(), error = %e, "re-sending firing alerts failed");
                }
            }
        }
    }
}

fn firing_alerts(state: &CatalogState, ends_at: i64) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (rule_id, instances) in &state.alerts.instances {
        let Some(rule) = state.alerts.rules.get(rule_id) else {
            continue;
        };
        for i in instances.values().filter(|i| i.state == AlertState::Firing) {
            out.push(am_alert(
                &alert_labels(rule, &i.series),
                &i.summary,
                &i.description,
                i.value,
                i.active_at,
                None,
                ends_at,
            ));
        }
    }
    out
}

/// An alert as Alertmanager's `POST /api/v2/alerts` takes it.
fn am_alert(
    labels: &BTreeMap<String, String>,
    summary: &str,
    description: &str,
    value: Option<f64>,
    starts_at: i64,
    resolved_at: Option<i64>,
    firing_ends_at: i64,
) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if !summary.is_empty() {
        annotations.insert("summary".into(), summary.into());
    }
    if !description.is_empty() {
        annotations.insert("description".into(), description.into());
    }
    if let Some(v) = value {
        annotations.insert("value".into(), v.to_string().into());
    }
    json!({
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(starts_at),
        "endsAt": rfc3339(resolved_at.unwrap_or(firing_ends_at)),
    })
}

/// The JSON body a webhook receives (see the README's "Alerts" section).
pub fn webhook_payload(t: &AlertTransition) -> serde_json::Value {
    json!({
        "key": t.key(),
        "status": t.to.as_str(),
        "rule": t.rule_name,
        "severity": t.severity,
        "labels": t.labels,
        "series": t.series,
        "value": t.value,
        "summary": t.summary,
        "description": t.description,
        "starts_at": rfc3339(t.active_at),
        "at": rfc3339(t.at),
    })
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

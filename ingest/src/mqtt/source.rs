//! One MQTT source: a persistent session whose messages become WAL records.
//!
//! ```text
//!  session task: poll ─▶ PUBLISH ─▶ channel ─▶ writer: batch (full or lingered)
//!                                              ─▶ topic template, decode, validate
//!                                              ─▶ bad messages: counted, logged, dead-lettered
//!                                              ─▶ one WAL record of the good rows (fsync)
//!                                              ─▶ PUBACK every message of the batch, in order
//! ```
//!
//! Nothing acknowledged is lost: a PUBACK leaves only after the message's rows are durable,
//! and the session is persistent (fixed client id, clean start off), so what the broker
//! holds for Kiln while it is down or restarting is delivered when it is back. A message
//! delivered again (Kiln stopped between the write and the PUBACK) writes the same rows
//! again, which collapse with the first by row identity (table, tags, time): rows whose
//! time comes from the message itself are written exactly once. A full write buffer holds
//! the batch, so acknowledgements stop and the broker stops sending at its in-flight limit.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_storage::Engine;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::config::{Format, SourceConfig};
use super::connection::{self, Client, Connection, Event, Received};
use super::sparkplug::{Presence, Sparkplug};
use super::topic::TopicTemplate;
use crate::kafka::decode::{Decoder, Message, validate_messages};
use crate::line_protocol::{Precision, RowContext};
use crate::write::{WriteError, now_nanos, write_until_durable};

/// A source without a write for this long shows no throughput.
const RATE_STALE: Duration = Duration::from_secs(5);
/// How long a stopping source waits for its last acknowledgements to leave.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Live figures of one source.
#[derive(Debug)]
pub struct SourceStatus {
    pub client_id: String,
    pub broker: String,
    pub topics: Vec<String>,
    pub database: String,
    connected: AtomicBool,
    connects: AtomicU64,
    messages: AtomicU64,
    rows: AtomicU64,
    rejected: AtomicU64,
    dead_lettered: AtomicU64,
    unsupported_metrics: AtomicU64,
    rebirth_requests: AtomicU64,
    waiting: AtomicBool,
    last_error: Mutex<Option<LastError>>,
    rate: Mutex<Rate>,
}

/// The most recent problem of a source.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// RFC 3339.
    pub at: String,
    pub message: String,
}

#[derive(Debug, Default)]
struct Rate {
    window: Option<Instant>,
    messages: u64,
    rows: u64,
    last: (f64, f64),
}

/// A snapshot of [`SourceStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub client_id: String,
    pub broker: String,
    pub topics: Vec<String>,
    pub database: String,
    /// Connected with every subscription in place.
    pub connected: bool,
    /// Successful connections since start (more than one: the connection was lost).
    pub connects: u64,
    /// Messages made durable (and acknowledged), rejected ones included.
    pub messages: u64,
    pub rows: u64,
    /// Messages that could not be written: undecodable, invalid, or off the topic template.
    pub rejected: u64,
    pub dead_lettered: u64,
    /// Sparkplug B metrics left out of their rows (data sets, templates, …).
    pub unsupported_metrics: u64,
    /// Sparkplug B rebirth requests sent (NCMD `Node Control/Rebirth`).
    pub rebirth_requests: u64,
    /// Writes are waiting for room in the write buffer (acknowledgements held).
    pub waiting_for_buffer: bool,
    pub messages_per_second: f64,
    pub rows_per_second: f64,
    pub last_error: Option<LastError>,
}

impl SourceStatus {
    fn new(config: &SourceConfig) -> Self {
        Self {
            client_id: config.client_id(),
            broker: config.broker.clone(),
            topics: config.topics.clone(),
            database: config.database.clone(),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            unsupported_metrics: AtomicU64::new(0),
            rebirth_requests: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            last_error: Mutex::new(None),
            rate: Mutex::default(),
        }
    }

    fn error(&self, message: String) {
        *self.last_error.lock() = Some(LastError {
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            message,
        });
    }

    fn written(&self, messages: u64, rows: u64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
        let mut r = self.rate.lock();
        let now = Instant::now();
        match r.window {
            Some(start) if now.duration_since(start) >= Duration::from_secs(2) => {
                let secs = now.duration_since(start).as_secs_f64();
                r.last = (
                    (r.messages + messages) as f64 / secs,
                    (r.rows + rows) as f64 / secs,
                );
                *r = Rate {
                    window: Some(now),
                    last: r.last,
                    ..Rate::default()
                };
            }
            Some(_) => {
                r.messages += messages;
                r.rows += rows;
            }
            None => {
                *r = Rate {
                    window: Some(now),
                    messages,
                    rows,
                    last: r.last,
                }
            }
        }
    }

    pub fn report(&self) -> SourceReport {
        let (messages_per_second, rows_per_second) = {
            let r = self.rate.lock();
            match r.window {
                Some(start) if start.elapsed() < RATE_STALE => r.last,
                _ => (0.0, 0.0),
            }
        };
        SourceReport {
            client_id: self.client_id.clone(),
            broker: self.broker.clone(),
            topics: self.topics.clone(),
            database: self.database.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            unsupported_metrics: self.unsupported_metrics.load(Ordering::Relaxed),
            rebirth_requests: self.rebirth_requests.load(Ordering::Relaxed),
            waiting_for_buffer: self.waiting.load(Ordering::Relaxed),
            messages_per_second,
            rows_per_second,
            last_error: self.last_error.lock().clone(),
        }
    }
}

/// A configured source, ready to run.
pub struct MqttSource {
    config: Arc<SourceConfig>,
    engine: Arc<Engine>,
    status: Arc<SourceStatus>,
    decoder: Decoder,
    template: Option<TopicTemplate>,
    sparkplug: Option<(Sparkplug, PathBuf)>,
    client: Client,
    connection: Connection,
    shutdown: watch::Receiver<bool>,
}

impl MqttSource {
    /// Checks the configuration and creates the client (no network round trip yet): a bad
    /// setting or an unreadable certificate or password file fails here. A Sparkplug B
    /// source keeps the births it has seen in `state_dir`.
    pub fn new(
        config: SourceConfig,
        engine: Arc<Engine>,
        state_dir: &Path,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, String> {
        config.check()?;
        // Sparkplug B messages become line protocol in nanoseconds.
        let (format, precision) = match config.format {
            Format::LineProtocol => (crate::kafka::Format::LineProtocol, config.precision()?),
            Format::Json => (crate::kafka::Format::Json, config.precision()?),
            Format::SparkplugB => (crate::kafka::Format::LineProtocol, Precision::Nanoseconds),
        };
        let decoder = Decoder::new(format, precision, config.json.as_ref())?;
        let sparkplug = match config.format {
            Format::SparkplugB => {
                let mut state = Sparkplug::new(
                    config.sparkplug_table.clone(),
                    config.sparkplug_status_table.clone(),
                );
                let path = state_file(state_dir, &config.client_id());
                std::fs::create_dir_all(state_dir)
                    .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
                state
                    .load(&path)
                    .map_err(|e| kiln_storage::error_chain(&e))?;
                Some((state, path))
            }
            _ => None,
        };
        let template = config.template()?;
        let (client, connection) = connection::open(&config)?;
        Ok(Self {
            status: Arc::new(SourceStatus::new(&config)),
            config: Arc::new(config),
            engine,
            decoder,
            template,
            sparkplug,
            client,
            connection,
            shutdown,
        })
    }

    pub fn status(&self) -> Arc<SourceStatus> {
        Arc::clone(&self.status)
    }

    /// Reads and writes until the shutdown signal; then writes and acknowledges what it
    /// holds and disconnects (the session stays on the broker).
    pub async fn run(self) -> Result<(), String> {
        let Self {
            config,
            engine,
            status,
            decoder,
            template,
            sparkplug,
            client,
            connection,
            shutdown,
        } = self;
        tracing::info!(client_id = %status.client_id, broker = %config.broker, topics = ?config.topics, database = %config.database, "MQTT source started");
        // The session never waits for the writer: it must keep polling for the
        // acknowledgements to leave. What it holds is bounded by the broker's in-flight
        // window (MQTT 5: the receive maximum Kiln sets), which acknowledgements open.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let closing = Arc::new(AtomicBool::new(false));
        let mut reading = tokio::spawn(session(
            connection,
            client.clone(),
            Arc::clone(&config),
            Arc::clone(&status),
            tx,
            shutdown.clone(),
            Arc::clone(&closing),
        ));
        let writer = Writer {
            config: Arc::clone(&config),
            engine,
            status: Arc::clone(&status),
            decoder,
            template,
            sparkplug: sparkplug.map(|(state, path)| (Mutex::new(state), path)),
            unsupported_seen: Mutex::default(),
            client: client.clone(),
            shutdown: shutdown.clone(),
        };
        let mut signal = shutdown.clone();
        'run: loop {
            let first = tokio::select! {
                _ = signal.wait_for(|stop| *stop) => break 'run,
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break 'run,
                },
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + config.linger;
            while batch.len() < config.batch_messages {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    m = rx.recv() => match m {
                        Some(m) => batch.push(m),
                        None => break,
                    },
                }
            }
            if !writer.write(&batch).await {
                break 'run;
            }
        }
        tracing::info!(client_id = %status.client_id, "MQTT source stopping");
        // The acknowledgements queued before it leave first.
        closing.store(true, Ordering::Relaxed);
        client.disconnect().await;
        if tokio::time::timeout(CLOSE_TIMEOUT, &mut reading)
            .await
            .is_err()
        {
            tracing::warn!(client_id = %status.client_id, "MQTT session did not close in time");
            reading.abort();
        }
        status.connected.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// Polls the connection: forwards messages, subscribes on a fresh session, reconnects with
/// backoff. Ends once the source is closing and the connection is gone.
async fn session(
    mut connection: Connection,
    client: Client,
    config: Arc<SourceConfig>,
    status: Arc<SourceStatus>,
    tx: mpsc::UnboundedSender<Received>,
    mut shutdown: watch::Receiver<bool>,
    closing: Arc<AtomicBool>,
) {
    let mut failures = 0;
    // Subscriptions sent and not yet answered (they are answered in order).
    let mut subscribing = 0;
    loop {
        match connection.poll().await {
            Ok(Event::Connected { session_present }) => {
                failures = 0;
                status.connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client_id = %status.client_id, session_present, "MQTT connected");
                // A kept session keeps its subscriptions (subscribing again would make the
                // broker send its retained messages again).
                if session_present {
                    status.connected.store(true, Ordering::Relaxed);
                } else if let Err(e) = client.subscribe(&config.topics).await {
                    status.error(format!("subscribing: {e}"));
                } else {
                    subscribing = config.topics.len();
                }
            }
            Ok(Event::Subscribed(answer)) => {
                let filter = config.topics.len().checked_sub(subscribing);
                subscribing = subscribing.saturating_sub(1);
                if let Err(why) = answer {
                    let filter = filter.and_then(|i| config.topics.get(i));
                    let message =
                        format!("the broker refused the subscription to {filter:?}: {why}");
                    tracing::error!(client_id = %status.client_id, "{message}");
                    status.error(message);
                }
                if subscribing == 0 {
                    // Connected means receiving: every subscription is in place.
                    status.connected.store(true, Ordering::Relaxed);
                }
            }
            Ok(Event::Message(m)) => {
                if tx.send(m).is_err() {
                    return;
                }
            }
            Ok(Event::Other) => {}
            Err(e) => {
                status.connected.store(false, Ordering::Relaxed);
                if closing.load(Ordering::Relaxed) {
                    return;
                }
                let message = format!("connection to {}: {e}", config.broker);
                if failures == 0 {
                    tracing::warn!(client_id = %status.client_id, error = %message, "MQTT connection lost; reconnecting");
                } else {
                    tracing::debug!(client_id = %status.client_id, error = %message, "MQTT reconnect failed");
                }
                status.error(message);
                let wait = connection::backoff(failures);
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    }
}

/// Turns batches of messages into WAL records, then acknowledges them.
struct Writer {
    config: Arc<SourceConfig>,
    engine: Arc<Engine>,
    status: Arc<SourceStatus>,
    decoder: Decoder,
    template: Option<TopicTemplate>,
    /// Sparkplug B's births, aliases and sequence numbers, for a `sparkplug_b` source, and
    /// the file its births are kept in.
    sparkplug: Option<(Mutex<Sparkplug>, PathBuf)>,
    /// Unsupported Sparkplug metrics already logged (each is logged once).
    unsupported_seen: Mutex<std::collections::HashSet<String>>,
    client: Client,
    shutdown: watch::Receiver<bool>,
}

/// A message ready to validate: its payload (line protocol for Sparkplug B) and the row
/// context from its topic; or nothing to write; or why it is refused.
enum Prepared<'b> {
    Rows(Cow<'b, [u8]>, Option<RowContext>),
    Nothing,
    Refused(String),
}

/// What a batch's Sparkplug B messages ask for besides rows.
#[derive(Default)]
struct Effects {
    /// Rebirth requests to publish: (topic, payload).
    rebirths: Vec<(String, Vec<u8>)>,
    /// Births and deaths, by the index of their message.
    presence: Vec<(usize, Presence)>,
}

impl Writer {
    /// Writes `batch` and acknowledges every message of it in order; `false` if the
    /// engine is shutting down (nothing of the batch is acknowledged: the broker sends it
    /// again to the next session).
    #[tracing::instrument(
        name = "MQTT batch",
        level = "debug",
        skip_all,
        fields(otel.kind = "consumer", messaging.system = "mqtt", messaging.batch.message_count = batch.len())
    )]
    async fn write(&self, batch: &[Received]) -> bool {
        let now = now_nanos();
        let mut effects = Effects::default();
        let prepared: Vec<Prepared<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, m)| self.prepare(i, m, now, &mut effects))
            .collect();
        let mut rejected: Vec<(usize, String)> = Vec::new();
        let mut good = Vec::with_capacity(batch.len());
        for (i, p) in prepared.iter().enumerate() {
            match p {
                Prepared::Rows(payload, context) => good.push((
                    i,
                    Message {
                        payload: Some(payload),
                        timestamp: None,
                        context: context.as_ref(),
                    },
                )),
                Prepared::Nothing => {}
                Prepared::Refused(e) => rejected.push((i, e.clone())),
            }
        }
        let rows = match self.write_messages(&good, now).await {
            Ok((rows, bad)) => {
                rejected.extend(bad);
                rows
            }
            Err(WriteError::Invalid(_) | WriteError::Rejected { .. }) => {
                // Valid alone, refused together (a type another writer set meanwhile, a
                // limit): one message at a time finds the culprits.
                let mut rows = 0;
                for one in &good {
                    match self.write_messages(std::slice::from_ref(one), now).await {
                        Ok((n, bad)) => {
                            rows += n;
                            rejected.extend(bad);
                        }
                        Err(WriteError::Invalid(e) | WriteError::Rejected { message: e, .. }) => {
                            rejected.push((one.0, e));
                        }
                        Err(WriteError::Engine(_)) => return false,
                    }
                }
                rows
            }
            Err(WriteError::Engine(_)) => return false,
        };
        rejected.sort_by_key(|(i, _)| *i);
        for (i, error) in &rejected {
            self.reject(&batch[*i], error).await;
        }
        self.inventory(effects.presence, &rejected).await;
        // Births written are kept before they are acknowledged.
        if let Some((state, path)) = &self.sparkplug
            && let Err(e) = state.lock().save(path)
        {
            let e = kiln_storage::error_chain(&e);
            tracing::error!(client_id = %self.status.client_id, error = %e, "cannot keep Sparkplug B births on disk");
            self.status.error(e);
        }
        for (topic, payload) in effects.rebirths {
            match self.client.publish(&topic, payload.into()).await {
                Ok(()) => {
                    self.status.rebirth_requests.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(client_id = %self.status.client_id, %topic, "Sparkplug B rebirth requested");
                }
                Err(e) => {
                    tracing::warn!(client_id = %self.status.client_id, %topic, error = %e, "could not request a Sparkplug B rebirth")
                }
            }
        }
        self.status
            .written(batch.len() as u64, u64::try_from(rows).unwrap_or(u64::MAX));
        for m in batch {
            if let Err(e) = self.client.ack(m).await {
                // The connection is gone: the broker sends the message again.
                tracing::debug!(client_id = %self.status.client_id, error = %e, "acknowledgement not sent");
            }
        }
        true
    }

    /// What message `i`, `m`, gives to validate: its payload with the topic's row context,
    /// or, for Sparkplug B, the line protocol of its rows (and its rebirth request, births
    /// and deaths in `effects`).
    fn prepare<'b>(
        &self,
        i: usize,
        m: &'b Received,
        now: i64,
        effects: &mut Effects,
    ) -> Prepared<'b> {
        if let Some((sparkplug, _)) = &self.sparkplug {
            let decoded = sparkplug.lock().decode(m.topic(), m.payload(), now);
            return match decoded {
                Ok(d) => {
                    self.unsupported(m.topic(), &d.unsupported);
                    effects.rebirths.extend(d.rebirth);
                    effects
                        .presence
                        .extend(d.presence.into_iter().map(|p| (i, p)));
                    match d.rows {
                        Some(lines) => Prepared::Rows(Cow::Owned(lines.into_bytes()), None),
                        None => Prepared::Nothing,
                    }
                }
                Err(refused) => {
                    effects.rebirths.extend(refused.rebirth);
                    Prepared::Refused(refused.reason)
                }
            };
        }
        let context = match &self.template {
            None => None,
            Some(t) => match t.apply(m.topic()) {
                Ok(c) => Some(c),
                Err(e) => return Prepared::Refused(e),
            },
        };
        Prepared::Rows(Cow::Borrowed(m.payload()), context)
    }

    /// Sets the online state of the Sparkplug B nodes and devices whose births and deaths
    /// were written as device attributes (`sparkplug_online`, `sparkplug_group`,
    /// `sparkplug_edge_node`), in one catalog transaction: `system.devices` shows them.
    async fn inventory(&self, presence: Vec<(usize, Presence)>, rejected: &[(usize, String)]) {
        // The last state of each device whose message was written.
        let mut latest: std::collections::BTreeMap<(&str, String), Presence> = Default::default();
        for (i, p) in presence {
            if rejected.binary_search_by_key(&i, |(r, _)| *r).is_err() {
                latest.insert((p.tag, p.value.clone()), p);
            }
        }
        if latest.is_empty() {
            return;
        }
        let devices = latest
            .into_values()
            .map(|p| {
                let mut attributes = std::collections::BTreeMap::from([
                    ("sparkplug_online".to_string(), Some(p.online.to_string())),
                    ("sparkplug_group".to_string(), Some(p.group)),
                ]);
                if p.tag == "device" {
                    attributes.insert("sparkplug_edge_node".into(), Some(p.edge_node));
                }
                (p.tag.to_string(), p.value, attributes)
            })
            .collect();
        if let Err(e) = self
            .engine
            .catalog()
            .set_devices_attributes(&self.config.database, devices)
            .await
        {
            let e = kiln_storage::error_chain(&e);
            tracing::error!(client_id = %self.status.client_id, error = %e, "cannot set the Sparkplug B devices' online state");
            self.status.error(e);
        }
    }

    /// Counts Sparkplug B metrics left out, logging each kind once.
    fn unsupported(&self, topic: &str, what: &[String]) {
        if what.is_empty() {
            return;
        }
        self.status
            .unsupported_metrics
            .fetch_add(what.len() as u64, Ordering::Relaxed);
        let mut seen = self.unsupported_seen.lock();
        for w in what {
            if seen.len() < 10_000 && seen.insert(w.clone()) {
                tracing::warn!(client_id = %self.status.client_id, topic, reason = %w, "Sparkplug B metric not stored");
            }
        }
    }

    /// Validates and writes `messages`, each with its index in the batch (durably, waiting
    /// while the buffer is full); the rows written and the messages set aside, by index,
    /// with why. Rows without a time get `now`.
    async fn write_messages(
        &self,
        messages: &[(usize, Message<'_>)],
        now: i64,
    ) -> Result<(usize, Vec<(usize, String)>), WriteError> {
        if messages.is_empty() {
            return Ok((0, Vec::new()));
        }
        let (indices, messages): (Vec<usize>, Vec<Message<'_>>) = messages.iter().cloned().unzip();
        let db = self.config.database.as_str();
        let mut bad = Vec::new();
        let waiting = self.engine.buffer_full();
        self.status.waiting.store(waiting, Ordering::Relaxed);
        let rows = write_until_durable(
            &self.engine,
            db,
            Vec::new(),
            &self.shutdown,
            &self.status.client_id,
            &mut |catalog| {
                let d = validate_messages(&self.decoder, &messages, db, catalog, now);
                bad = d.rejected;
                Ok(d.rows)
            },
        )
        .await;
        self.status.waiting.store(false, Ordering::Relaxed);
        let bad = bad.into_iter().map(|(j, e)| (indices[j], e)).collect();
        Ok((rows?, bad))
    }

    /// Counts and logs a message that cannot be written, and republishes it to the
    /// dead-letter topic when there is one (before it is acknowledged).
    async fn reject(&self, m: &Received, error: &str) {
        self.status.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client_id = %self.status.client_id, topic = m.topic(), %error, "MQTT message rejected");
        self.status
            .error(format!("message on {:?} rejected: {error}", m.topic()));
        if let Some(topic) = &self.config.dead_letter_topic {
            match self.client.publish(topic, m.payload().clone()).await {
                Ok(()) => {
                    self.status.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(client_id = %self.status.client_id, dead_letter_topic = %topic, error = %e, "could not dead-letter a message");
                }
            }
        }
    }
}

/// The file a Sparkplug B source keeps its births in: one per client id.
fn state_file(dir: &Path, client_id: &str) -> PathBuf {
    let name: String = client_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{name}.sparkplug.json"))
}

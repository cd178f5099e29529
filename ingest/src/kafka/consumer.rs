//! One Kafka source: a consumer in a consumer group whose messages become WAL records.
//!
//! ```text
//!  recv ─▶ pending, per partition ─▶ (batch full or linger over) ─▶ per partition:
//!          validate ─▶ bad messages to the dead-letter topic (acknowledged by Kafka)
//!                   ─▶ one WAL record: the good rows + the partition's offset range
//!                   ─▶ next offsets committed to Kafka every 500 ms (for lag tools)
//! ```
//!
//! Exactly once: a partition's offsets are recorded in the same WAL record as its rows, so
//! after a crash Kiln resumes after the last durable offset, never from an offset Kafka
//! was told about but whose rows were lost, nor from before rows already written. On
//! assignment a partition starts after the larger of Kiln's recorded offset and the group's
//! committed one (another Kiln may have consumed it meanwhile: it commits only what its own
//! WAL holds). A partition's next batch is decoded while its previous one is written, and
//! written after it. On revocation the writes under way finish, what was written since
//! the assignment is committed synchronously, and messages not yet written are dropped,
//! for the next owner to read.
//!
//! Rebalance callbacks run inside `recv`, on the consumer's task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_storage::Engine;
use kiln_storage::write::SourceRange;
use parking_lot::Mutex;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::config::{DefaultTime, SourceConfig, position_source};
use super::decode::{Decoder, Message, validate_messages};
use crate::write::{WriteError, now_nanos, write_until_durable};

/// Settings Kiln sets itself; a source's `options` may not change them.
const RESERVED_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
];

/// How long a rebalance callback waits for the group's committed offsets.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dead-letter message is retried before it is given up (and logged).
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(60);

/// A partition without a write for this long shows no throughput.
const RATE_STALE: Duration = Duration::from_secs(5);

/// Figures of one partition, as the status endpoint shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub assigned: bool,
    /// The last offset whose rows are durable in Kiln.
    pub position: Option<i64>,
    /// The partition's high watermark (next offset to be produced) as last seen.
    pub high_watermark: Option<i64>,
    /// Messages produced but not yet durable in Kiln.
    pub lag: Option<i64>,
    pub messages: u64,
    pub rows: u64,
    pub dead_lettered: u64,
    /// Messages per second written over the last few seconds.
    pub messages_per_second: f64,
}

#[derive(Debug, Default)]
struct PartitionFigures {
    assigned: bool,
    high_watermark: Option<i64>,
    messages: u64,
    rows: u64,
    dead_lettered: u64,
    rate_window: (Option<Instant>, u64),
    rate: f64,
}

/// Live figures of one source.
#[derive(Debug)]
pub struct SourceStatus {
    pub group: String,
    pub topics: Vec<String>,
    pub database: String,
    partitions: Mutex<BTreeMap<(String, i32), PartitionFigures>>,
    paused: AtomicBool,
    pauses: AtomicU64,
    dead_letter_failures: AtomicU64,
}

/// A snapshot of [`SourceStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub group: String,
    pub topics: Vec<String>,
    pub database: String,
    /// Consumption is paused because the write buffer is full.
    pub paused: bool,
    pub pauses: u64,
    pub dead_letter_failures: u64,
    pub partitions: Vec<PartitionStatus>,
}

impl SourceStatus {
    fn new(config: &SourceConfig) -> Self {
        Self {
            group: config.group.clone(),
            topics: config.topics.clone(),
            database: config.database.clone(),
            partitions: Mutex::default(),
            paused: AtomicBool::new(false),
            pauses: AtomicU64::new(0),
            dead_letter_failures: AtomicU64::new(0),
        }
    }

    fn with<R>(
        &self,
        topic: &str,
        partition: i32,
        f: impl FnOnce(&mut PartitionFigures) -> R,
    ) -> R {
        let mut map = self.partitions.lock();
        f(map.entry((topic.to_string(), partition)).or_default())
    }

    /// The figures now, with positions from `engine` and lag computed from them.
    pub fn report(&self, engine: &Engine) -> SourceReport {
        let partitions = self
            .partitions
            .lock()
            .iter()
            .map(|((topic, partition), f)| {
                let position =
                    engine.source_position(&position_source(&self.group, topic), *partition);
                let lag = f
                    .high_watermark
                    .map(|hw| (hw - position.map_or(0, |p| p + 1)).max(0));
                PartitionStatus {
                    topic: topic.clone(),
                    partition: *partition,
                    assigned: f.assigned,
                    position,
                    high_watermark: f.high_watermark,
                    lag,
                    messages: f.messages,
                    rows: f.rows,
                    dead_lettered: f.dead_lettered,
                    // No write for a while: nothing is flowing.
                    messages_per_second: match f.rate_window.0 {
                        Some(start) if start.elapsed() < RATE_STALE => f.rate,
                        _ => 0.0,
                    },
                }
            })
            .collect();
        SourceReport {
            group: self.group.clone(),
            topics: self.topics.clone(),
            database: self.database.clone(),
            paused: self.paused.load(Ordering::Relaxed),
            pauses: self.pauses.load(Ordering::Relaxed),
            dead_letter_failures: self.dead_letter_failures.load(Ordering::Relaxed),
            partitions,
        }
    }
}

/// The consumer's context: rebalance handling and statistics.
struct SourceContext {
    engine: Arc<Engine>,
    group: String,
    status: Arc<SourceStatus>,
    /// Partitions revoked since the consumer loop last looked.
    revoked: Mutex<Vec<(String, i32)>>,
    /// Writes under way.
    in_flight: Arc<InFlight>,
    /// Per assigned partition, the offset reading started from.
    started_at: Mutex<BTreeMap<(String, i32), i64>>,
}

/// Partition writes under way: a partition has at most [`PIPELINE`] batches in flight, each
/// written after the one before it (so its WAL records stay in offset order).
#[derive(Default)]
struct InFlight {
    /// Per partition, its newest write (which waits for the one before it).
    writes: Mutex<BTreeMap<(String, i32), JoinHandle<bool>>>,
    /// Per partition, room for [`PIPELINE`] batches in flight.
    room: Mutex<BTreeMap<(String, i32), Arc<tokio::sync::Semaphore>>>,
    /// Next offsets written since the consumer loop last committed them to Kafka.
    written: Mutex<BTreeMap<(String, i32), i64>>,
}

impl InFlight {
    /// Takes every write of `partitions` (all if `None`), to be awaited.
    fn take(&self, partitions: Option<&[(String, i32)]>) -> Vec<JoinHandle<bool>> {
        let mut writes = self.writes.lock();
        match partitions {
            None => std::mem::take(&mut *writes).into_values().collect(),
            Some(keys) => keys.iter().filter_map(|k| writes.remove(k)).collect(),
        }
    }
}

/// How often written offsets are committed to Kafka (and how long an idle source waits
/// before committing what its last writes reached).
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

/// Batches of one partition in flight at once: one being written, the next ones decoding
/// meanwhile (each waits for its predecessor before it is written).
const PIPELINE: usize = 4;

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(group = %self.group, fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(group = %self.group, fac, "librdkafka: {message}")
            }
            _ => tracing::debug!(group = %self.group, fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(group = %self.group, %error, "Kafka: {reason}");
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.hi_offset < 0 {
                    continue;
                }
                self.status.with(topic, *partition, |f| {
                    f.high_watermark = Some(p.hi_offset);
                });
            }
        }
    }
}

impl SourceContext {
    /// The next offset to read of each partition Kiln has a position for.
    fn resume_offsets(
        &self,
        base: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Vec<(String, i32, i64)> {
        let committed = match base.committed_offsets(tpl.clone(), COMMITTED_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "cannot read the group's committed offsets; resuming from Kiln's own");
                TopicPartitionList::new()
            }
        };
        let mut out = Vec::new();
        for e in tpl.elements() {
            let own = self
                .engine
                .source_position(&position_source(&self.group, e.topic()), e.partition())
                .map(|last| last + 1);
            let theirs = committed
                .find_partition(e.topic(), e.partition())
                .and_then(|c| match c.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            let next = own.max(theirs);
            if let Some(next) = next {
                out.push((e.topic().to_string(), e.partition(), next));
            }
            self.started_at.lock().insert(
                (e.topic().to_string(), e.partition()),
                next.unwrap_or(i64::MIN),
            );
        }
        out
    }

    /// Commits what Kiln made durable of `partitions` since they were assigned, waiting for
    /// the answer. An older position of Kiln's own would move the group back.
    fn commit_durable(&self, base: &BaseConsumer<Self>, partitions: &[(String, i32)]) {
        let mut tpl = TopicPartitionList::new();
        let mut started_at = self.started_at.lock();
        for key @ (topic, partition) in partitions {
            let started = started_at.remove(key).unwrap_or(i64::MIN);
            if let Some(last) = self
                .engine
                .source_position(&position_source(&self.group, topic), *partition)
                .filter(|last| last + 1 > started)
            {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(last + 1));
            }
        }
        drop(started_at);
        if tpl.count() > 0
            && let Err(e) = base.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(group = %self.group, error = %e, "committing offsets of revoked partitions failed");
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for (topic, partition, next) in self.resume_offsets(base, tpl) {
                    let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(next));
                }
                for (topic, partition) in &partitions {
                    self.status.with(topic, *partition, |f| f.assigned = true);
                }
                tracing::info!(group = %self.group, ?partitions, "partitions assigned");
                if cooperative {
                    base.incremental_assign(tpl)
                } else {
                    base.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // What is being written becomes durable first, so the commit covers it.
                let writes = self.in_flight.take(Some(&partitions));
                if !writes.is_empty() {
                    tokio::task::block_in_place(|| {
                        tokio::runtime::Handle::current()
                            .block_on(futures::future::join_all(writes))
                    });
                }
                // Offsets not yet committed would arrive after this commit and move the
                // group back: the commit below covers them.
                {
                    let mut written = self.in_flight.written.lock();
                    for key in &partitions {
                        written.remove(key);
                    }
                }
                self.commit_durable(base, &partitions);
                for (topic, partition) in &partitions {
                    self.status.with(topic, *partition, |f| f.assigned = false);
                }
                self.revoked.lock().extend(partitions.iter().cloned());
                tracing::info!(group = %self.group, ?partitions, "partitions revoked");
                if cooperative {
                    base.incremental_unassign(tpl)
                } else {
                    base.unassign()
                }
            }
            other => {
                tracing::error!(group = %self.group, error = ?other, "rebalance failed");
                self.revoked.lock().extend(partitions.iter().cloned());
                base.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(group = %self.group, error = %e, "applying a rebalance failed");
        }
    }
}

/// A running source.
pub struct KafkaSource {
    config: Arc<SourceConfig>,
    engine: Arc<Engine>,
    status: Arc<SourceStatus>,
    consumer: StreamConsumer<SourceContext>,
    shutdown: watch::Receiver<bool>,
    writer: Arc<PartitionWriter>,
    in_flight: Arc<InFlight>,
}

/// Turns one partition's messages into a WAL record (and dead letters); partitions are
/// written side by side, each on its own task.
struct PartitionWriter {
    config: Arc<SourceConfig>,
    decoder: Decoder,
    engine: Arc<Engine>,
    status: Arc<SourceStatus>,
    producer: FutureProducer,
    /// Turns true when the server stops: retries give up.
    shutdown: watch::Receiver<bool>,
}

impl KafkaSource {
    /// Checks the configuration and creates the Kafka clients (no network round trip yet).
    pub fn new(
        config: SourceConfig,
        engine: Arc<Engine>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, String> {
        config.check()?;
        if let Some(k) = config
            .options
            .keys()
            .find(|k| RESERVED_OPTIONS.contains(&k.as_str()))
        {
            return Err(format!(
                "Kafka option {k:?} is set by Kiln (brokers, group and Kiln's own offset tracking); remove it"
            ));
        }
        let decoder = Decoder::new(config.format, config.precision()?, config.json.as_ref())?;
        let status = Arc::new(SourceStatus::new(&config));
        let in_flight = Arc::new(InFlight::default());
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", "kiln")
            .set("statistics.interval.ms", "1000")
            .set_log_level(RDKafkaLogLevel::Warning);
        let mut consumer_config = client.clone();
        consumer_config
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // No long wait for fetches: some Kafka-compatible brokers hold every fetch for
            // the whole wait, not only while the partition is empty.
            .set("fetch.wait.max.ms", "100");
        let mut producer_config = client;
        producer_config.set("statistics.interval.ms", "0");
        for (k, v) in &config.options {
            consumer_config.set(k, v);
            producer_config.set(k, v);
        }
        let context = SourceContext {
            engine: Arc::clone(&engine),
            group: config.group.clone(),
            status: Arc::clone(&status),
            revoked: Mutex::default(),
            in_flight: Arc::clone(&in_flight),
            started_at: Mutex::default(),
        };
        let consumer: StreamConsumer<SourceContext> = consumer_config
            .create_with_context(context)
            .map_err(|e| format!("Kafka consumer for group {:?}: {e}", config.group))?;
        let producer: FutureProducer = producer_config.create().map_err(|e| {
            format!(
                "Kafka dead-letter producer for group {:?}: {e}",
                config.group
            )
        })?;
        let config = Arc::new(config);
        let writer = Arc::new(PartitionWriter {
            config: Arc::clone(&config),
            decoder,
            engine: Arc::clone(&engine),
            status: Arc::clone(&status),
            producer,
            shutdown: shutdown.clone(),
        });
        Ok(Self {
            config,
            engine,
            status,
            consumer,
            shutdown,
            writer,
            in_flight,
        })
    }

    pub fn status(&self) -> Arc<SourceStatus> {
        Arc::clone(&self.status)
    }

    /// Consumes until the shutdown signal; then commits and leaves the group.
    pub async fn run(self) -> Result<(), String> {
        let mut signal = self.shutdown.clone();
        let shutdown = async move {
            let _ = signal.wait_for(|stop| *stop).await;
        };
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(|e| format!("subscribing to {topics:?}: {e}"))?;
        tracing::info!(group = %self.config.group, ?topics, database = %self.config.database, "Kafka source started");
        tokio::pin!(shutdown);
        let mut pending = Pending::default();
        let mut committed = Instant::now();
        'run: loop {
            // Wait for a first message, then gather more until the batch is full or lingered.
            tokio::select! {
                _ = &mut shutdown => break 'run,
                m = self.consumer.recv() => self.take(m.map(|m| m.detach()), &mut pending).await,
                // Nothing to read: tell Kafka what the last writes made durable.
                _ = tokio::time::sleep(COMMIT_INTERVAL) => {
                    self.commit_written(&mut committed, true);
                    continue 'run;
                }
            }
            let deadline = tokio::time::Instant::now() + self.config.linger;
            while !self.batch_full(&pending) {
                tokio::select! {
                    _ = &mut shutdown => break 'run,
                    _ = tokio::time::sleep_until(deadline) => break,
                    m = self.consumer.recv() => self.take(m.map(|m| m.detach()), &mut pending).await,
                }
            }
            if !self.wait_for_buffer(&mut pending, &mut shutdown).await {
                break 'run;
            }
            self.drop_revoked(&mut pending);
            self.flush(&mut pending).await;
            self.commit_written(&mut committed, false);
        }
        tracing::info!(group = %self.config.group, "Kafka source stopping");
        for write in self.in_flight.take(None) {
            let _ = write.await;
        }
        self.commit_written(&mut committed, true);
        let consumer = self.consumer;
        // Closing commits durable offsets (revocation) and leaves the group; it blocks.
        tokio::task::spawn_blocking(move || drop(consumer))
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Whether `pending` holds a batch's worth of messages or bytes.
    fn batch_full(&self, pending: &Pending) -> bool {
        pending.messages >= self.config.batch_messages || pending.bytes >= self.config.batch_bytes
    }

    async fn take(&self, m: Result<OwnedMessage, KafkaError>, pending: &mut Pending) {
        // Revocations happen inside recv; what was pending for those partitions is stale.
        self.drop_revoked(pending);
        match m {
            Ok(m) => pending.push(m),
            Err(e) => {
                tracing::warn!(group = %self.config.group, error = %e, "Kafka consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn drop_revoked(&self, pending: &mut Pending) {
        for key in std::mem::take(&mut *self.consumer.context().revoked.lock()) {
            pending.remove(&key);
        }
    }

    /// Pauses consumption while the write buffer is full. `false` if shut down meanwhile.
    async fn wait_for_buffer(
        &self,
        pending: &mut Pending,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> bool {
        if !self.engine.buffer_full() {
            return true;
        }
        self.status.paused.store(true, Ordering::Relaxed);
        self.status.pauses.fetch_add(1, Ordering::Relaxed);
        tracing::info!(group = %self.config.group, "write buffer full: Kafka consumption paused");
        let mut up = true;
        while self.engine.buffer_full() {
            // Paused partitions fetch nothing; polling still serves rebalances.
            if let Ok(assignment) = self.consumer.assignment() {
                let _ = self.consumer.pause(&assignment);
            }
            tokio::select! {
                _ = &mut *shutdown => { up = false; break; }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                m = self.consumer.recv() => self.take(m.map(|m| m.detach()), pending).await,
            }
        }
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.resume(&assignment);
        }
        self.status.paused.store(false, Ordering::Relaxed);
        if up {
            tracing::info!(group = %self.config.group, "Kafka consumption resumed");
        }
        up
    }

    /// Starts writing every pending partition batch, each after the partition's previous
    /// one; waits only while a partition already has [`PIPELINE`] batches in flight.
    async fn flush(&self, pending: &mut Pending) {
        for ((topic, partition), msgs) in std::mem::take(pending).partitions {
            let key = (topic.clone(), partition);
            let room = Arc::clone(
                self.in_flight
                    .room
                    .lock()
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(PIPELINE))),
            );
            let Ok(permit) = room.acquire_owned().await else {
                continue;
            };
            let previous = self.in_flight.writes.lock().remove(&key);
            let writer = Arc::clone(&self.writer);
            let in_flight = Arc::clone(&self.in_flight);
            let span = tracing::debug_span!(
                "Kafka batch",
                otel.kind = "consumer",
                messaging.system = "kafka",
                messaging.destination.name = %topic,
                messaging.destination.partition.id = partition,
                messaging.batch.message_count = msgs.len(),
            );
            let task = tokio::spawn(
                async move {
                    let _permit = permit;
                    let written = writer
                        .write_partition(&topic, partition, &msgs, previous)
                        .await;
                    if written && let Some(last) = msgs.last() {
                        in_flight
                            .written
                            .lock()
                            .insert((topic, partition), last.offset() + 1);
                    }
                    written
                }
                .instrument(span),
            );
            self.in_flight.writes.lock().insert(key, task);
        }
    }

    /// Tells Kafka the offsets written since last time, for lag tools (the WAL holds Kiln's
    /// own), at most every [`COMMIT_INTERVAL`] unless `now`. Synchronously: an asynchronous
    /// commit could reach the group after a later revocation's commit and move it back.
    fn commit_written(&self, last: &mut Instant, now: bool) {
        if !now && last.elapsed() < COMMIT_INTERVAL {
            return;
        }
        *last = Instant::now();
        let written = std::mem::take(&mut *self.in_flight.written.lock());
        let mut commit = TopicPartitionList::new();
        for ((topic, partition), next) in written {
            let _ = commit.add_partition_offset(&topic, partition, Offset::Offset(next));
        }
        if commit.count() == 0 {
            return;
        }
        let result =
            tokio::task::block_in_place(|| self.consumer.commit(&commit, CommitMode::Sync));
        if let Err(e) = result {
            tracing::debug!(error = %e, "committing offsets to Kafka failed; Kiln's own are durable");
        }
    }
}

impl PartitionWriter {
    /// Writes one partition's messages once `previous` (the partition's batch before) is
    /// written; `false` if the engine is shutting down or `previous` was not written.
    async fn write_partition(
        &self,
        topic: &str,
        partition: i32,
        msgs: &[OwnedMessage],
        previous: Option<JoinHandle<bool>>,
    ) -> bool {
        match self.write_messages(topic, partition, msgs, previous).await {
            Ok(()) => true,
            Err(WriteError::Invalid(_) | WriteError::Rejected { .. }) if msgs.len() > 1 => {
                // Valid alone, refused together (a name the catalog refuses, a type another
                // writer set meanwhile): one message at a time finds the culprits.
                for m in msgs {
                    match self
                        .write_messages(topic, partition, std::slice::from_ref(m), None)
                        .await
                    {
                        Ok(()) => {}
                        Err(WriteError::Invalid(e) | WriteError::Rejected { message: e, .. }) => {
                            if !self.dead_letter_and_skip(topic, partition, m, &e).await {
                                return false;
                            }
                        }
                        Err(WriteError::Engine(_)) => return false,
                    }
                }
                true
            }
            Err(WriteError::Invalid(e) | WriteError::Rejected { message: e, .. }) => {
                self.dead_letter_and_skip(topic, partition, &msgs[0], &e)
                    .await
            }
            Err(WriteError::Engine(_)) => false,
        }
    }

    /// Sends `m` to the dead-letter topic and records its offset as consumed.
    async fn dead_letter_and_skip(
        &self,
        topic: &str,
        partition: i32,
        m: &OwnedMessage,
        error: &str,
    ) -> bool {
        self.dead_letter(m, error).await;
        let range = self.range(topic, partition, std::slice::from_ref(m));
        self.write_retrying(vec![range], &mut |_| Ok(Default::default()))
            .await
            .is_ok()
    }

    fn range(&self, topic: &str, partition: i32, msgs: &[OwnedMessage]) -> SourceRange {
        SourceRange {
            source: self.config.position_source(topic),
            partition,
            first: msgs.first().map_or(0, |m| m.offset()),
            last: msgs.last().map_or(0, |m| m.offset()),
        }
    }

    /// Validates `msgs`, dead-letters the bad ones and writes the rest with their range.
    /// A message rejected only now (the catalog changed since) fails the whole call.
    async fn write_messages(
        &self,
        topic: &str,
        partition: i32,
        msgs: &[OwnedMessage],
        previous: Option<JoinHandle<bool>>,
    ) -> Result<(), WriteError> {
        let message_time = self.config.default_time == DefaultTime::Message;
        let decoded: Vec<Message<'_>> = msgs.iter().map(|m| message_of(m, message_time)).collect();
        let now = now_nanos();
        let db = self.config.database.as_str();
        let catalog = self.engine.catalog_state();
        let first = validate_messages(&self.decoder, &decoded, db, &catalog, now);
        for (i, error) in &first.rejected {
            self.dead_letter(&msgs[*i], error).await;
        }
        // Decoded while the partition's previous batch was written; written after it, never
        // without it (its offsets would be skipped).
        if let Some(previous) = previous
            && !previous.await.unwrap_or(false)
        {
            return Err(WriteError::Engine(
                kiln_storage::engine::Error::ShuttingDown,
            ));
        }
        let range = self.range(topic, partition, msgs);
        // Validated against this catalog already; again only if it changes meanwhile.
        let bad = first.rejected;
        let mut validated = Some(first.rows).filter(|rows| rows.rejected.is_empty());
        let written = self
            .write_retrying(vec![range], &mut |current| {
                if std::ptr::eq(current, &*catalog)
                    && let Some(rows) = validated.take()
                {
                    return Ok(rows);
                }
                // Rejected indices are sorted.
                let good: Vec<Message<'_>> = decoded
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bad.binary_search_by_key(i, |(b, _)| *b).is_err())
                    .map(|(_, m)| m.clone())
                    .collect();
                let d = validate_messages(&self.decoder, &good, db, current, now);
                match d.rejected.first() {
                    Some((_, e)) => Err(e.clone()),
                    None if !d.rows.rejected.is_empty() => Err(d.rows.rejected[0].to_string()),
                    None => Ok(d.rows),
                }
            })
            .await?;
        self.status.with(topic, partition, |f| {
            f.messages += msgs.len() as u64;
            f.rows += written as u64;
            f.dead_lettered += bad.len() as u64;
            let now = Instant::now();
            match f.rate_window {
                (Some(start), n) if now.duration_since(start) >= Duration::from_secs(2) => {
                    f.rate =
                        (n + msgs.len() as u64) as f64 / now.duration_since(start).as_secs_f64();
                    f.rate_window = (Some(now), 0);
                }
                (Some(start), n) => f.rate_window = (Some(start), n + msgs.len() as u64),
                (None, _) => f.rate_window = (Some(now), msgs.len() as u64),
            }
        });
        Ok(())
    }

    /// Writes until it succeeds or fails for good (see [`write_until_durable`]).
    async fn write_retrying(
        &self,
        sources: Vec<SourceRange>,
        validate: &mut (
                 dyn FnMut(
            &kiln_storage::catalog::CatalogState,
        ) -> Result<crate::line_protocol::ValidatedLines, String>
                     + Send
             ),
    ) -> Result<usize, WriteError> {
        let name = format!("kafka/{}", self.config.group);
        write_until_durable(
            &self.engine,
            &self.config.database,
            sources,
            &self.shutdown,
            &name,
            validate,
        )
        .await
    }

    /// Produces `m` to the dead-letter topic with the error and its origin in headers.
    async fn dead_letter(&self, m: &OwnedMessage, error: &str) {
        let topic = self.config.dead_letter_topic();
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        tracing::warn!(group = %self.config.group, source_topic = m.topic(), partition = m.partition(), offset = m.offset(), %error, "message dead-lettered");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "kiln.error",
                value: Some(error),
            })
            .insert(Header {
                key: "kiln.source.topic",
                value: Some(m.topic()),
            })
            .insert(Header {
                key: "kiln.source.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "kiln.source.offset",
                value: Some(&offset),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(t) = m.timestamp().to_millis() {
            record = record.timestamp(t);
        }
        match self.producer.send(record, DEAD_LETTER_TIMEOUT).await {
            Ok(_) => {}
            Err((e, _)) => {
                self.status
                    .dead_letter_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(group = %self.config.group, dead_letter_topic = %topic, source_topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "could not dead-letter a message; it stays in its source topic at this offset");
            }
        }
    }
}

/// Messages read and not yet written, per partition, with their totals.
#[derive(Default)]
struct Pending {
    partitions: BTreeMap<(String, i32), Vec<OwnedMessage>>,
    messages: usize,
    bytes: usize,
}

impl Pending {
    fn push(&mut self, m: OwnedMessage) {
        self.messages += 1;
        self.bytes += m.payload().map_or(0, <[u8]>::len);
        self.partitions
            .entry((m.topic().to_string(), m.partition()))
            .or_default()
            .push(m);
    }

    fn remove(&mut self, key: &(String, i32)) {
        for m in self.partitions.remove(key).into_iter().flatten() {
            self.messages -= 1;
            self.bytes -= m.payload().map_or(0, <[u8]>::len);
        }
    }
}

fn message_of(m: &OwnedMessage, message_time: bool) -> Message<'_> {
    Message {
        payload: m.payload(),
        timestamp: m
            .timestamp()
            .to_millis()
            .filter(|_| message_time)
            .and_then(|ms| ms.checked_mul(1_000_000)),
        context: None,
    }
}

//! Prometheus metrics, served as text at `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use kiln_ingest::kafka::SourceStatus;
use kiln_query::QueryEngine;
use kiln_storage::Engine;
use kiln_storage::wal::WalObserver;

pub const INGEST_LINES: &str = "kiln_ingest_lines";
pub const INGEST_REJECTED_LINES: &str = "kiln_ingest_rejected_lines";
pub const INGEST_EXPIRED_LINES: &str = "kiln_ingest_expired_lines";
pub const INGEST_BYTES: &str = "kiln_ingest_request_bytes";
pub const WAL_FSYNC_SECONDS: &str = "kiln_wal_fsync_seconds";
pub const QUERY_SECONDS: &str = "kiln_query_seconds";
pub const AUTH_FAILURES: &str = "kiln_auth_failures";
pub const ALERT_NOTIFICATIONS: &str = "kiln_alert_notifications";
pub const LIMIT_REFUSALS: &str = "kiln_limit_refusals";

/// The limits whose refusals [`Metrics::limit_refusals`] counts, as its `limit` label.
pub mod limit {
    pub const PG_CONNECTIONS: &str = "pg_connections";
    pub const HTTP_QUERIES: &str = "http_queries";
    pub const GRPC_STREAMS: &str = "grpc_streams";
}

#[derive(Debug)]
pub struct Metrics {
    pub ingest_lines: Counter,
    pub rejected_lines: Counter,
    /// Of the rejected lines, those older than their table's retention.
    pub expired_lines: Counter,
    pub ingest_bytes: Counter,
    pub wal_fsync: Histogram,
    pub query_seconds: Histogram,
    pub stream_backpressure_waits: Counter,
    /// Requests and connections refused because a limit was reached (label `limit`).
    pub limit_refusals: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            ingest_lines: Counter::default(),
            rejected_lines: Counter::default(),
            expired_lines: Counter::default(),
            ingest_bytes: Counter::default(),
            wal_fsync: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            query_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            stream_backpressure_waits: Counter::default(),
            limit_refusals: Family::default(),
        }
    }

    /// Counts a refusal by `limit` (one of [`limit`]'s names).
    pub fn refused(&self, limit: &'static str) {
        self.limit_refusals
            .get_or_create(&vec![("limit", limit)])
            .inc();
    }

    /// A registry with these metrics and the engine's counters.
    pub fn registry(
        self: &Arc<Self>,
        engine: Arc<Engine>,
        query: QueryEngine,
        kafka: Arc<Vec<Arc<SourceStatus>>>,
        auth_failures: Family<crate::auth::FailureLabels, Counter>,
    ) -> Registry {
        let mut r = Registry::default();
        r.register(
            LIMIT_REFUSALS,
            "Connections and requests refused because a limit was reached (label: limit)",
            self.limit_refusals.clone(),
        );
        r.register(
            AUTH_FAILURES,
            "Requests refused for their token (labels: door, reason)",
            auth_failures,
        );
        r.register(
            INGEST_LINES,
            "Line protocol lines accepted",
            self.ingest_lines.clone(),
        );
        r.register(
            INGEST_REJECTED_LINES,
            "Line protocol lines rejected",
            self.rejected_lines.clone(),
        );
        r.register(
            INGEST_EXPIRED_LINES,
            "Line protocol lines rejected for being older than their table's retention",
            self.expired_lines.clone(),
        );
        r.register(
            INGEST_BYTES,
            "Bytes of write request bodies (after decompression)",
            self.ingest_bytes.clone(),
        );
        r.register(
            WAL_FSYNC_SECONDS,
            "Latency of WAL fsyncs (one per group commit)",
            self.wal_fsync.clone(),
        );
        r.register(
            QUERY_SECONDS,
            "Latency of SQL queries, planning to last row",
            self.query_seconds.clone(),
        );
        r.register(
            "kiln_grpc_stream_backpressure_waits",
            "Times a gRPC write stream paused because the write buffer was full",
            self.stream_backpressure_waits.clone(),
        );
        r.register_collector(Box::new(EngineCollector {
            engine,
            query,
            kafka,
        }));
        r
    }
}

/// Forwards WAL fsync timings to the histogram.
#[derive(Debug)]
pub struct FsyncObserver(pub Arc<Metrics>);

impl WalObserver for FsyncObserver {
    fn fsync(&self, elapsed: Duration, _bytes: usize, _records: usize) {
        self.0.wal_fsync.observe(elapsed.as_secs_f64());
    }
}

#[derive(Debug)]
struct EngineCollector {
    engine: Arc<Engine>,
    query: QueryEngine,
    kafka: Arc<Vec<Arc<SourceStatus>>>,
}

impl prometheus_client::collector::Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.engine.stats();
        let counters = [
            (
                "kiln_ingest_rows",
                "Rows written to the WAL and buffer",
                &stats.rows_written,
            ),
            (
                "kiln_segments_persisted",
                "Parquet segments persisted",
                &stats.segments_persisted,
            ),
            (
                "kiln_persisted_bytes",
                "Bytes of Parquet segments persisted",
                &stats.bytes_persisted,
            ),
            (
                "kiln_persist_failures",
                "Persistence attempts that failed",
                &stats.persist_failures,
            ),
            (
                "kiln_writes_refused",
                "Writes refused because the buffer was full",
                &stats.writes_refused,
            ),
            (
                "kiln_compactions",
                "Time partitions merged into one segment by compaction",
                &stats.compactions,
            ),
            (
                "kiln_segments_compacted",
                "Segments replaced by compaction",
                &stats.segments_compacted,
            ),
            (
                "kiln_compaction_failures",
                "Compaction passes that failed",
                &stats.compaction_failures,
            ),
            (
                "kiln_segments_expired",
                "Segments removed because retention expired every row in them",
                &stats.segments_expired,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value.load(Ordering::Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges = [
            (
                "kiln_buffer_bytes",
                "Bytes held in the write buffer",
                self.engine.buffer_bytes(),
            ),
            (
                "kiln_wal_files",
                "WAL files on disk",
                self.engine.wal().file_ids().len(),
            ),
            (
                "kiln_queries_running",
                "HTTP and Flight SQL queries running now",
                self.query.running_queries(),
            ),
            (
                "kiln_last_caches_failed",
                "Last-value caches that stopped answering (warm-up failed, more series than --last-cache-max-series); queries read their tables",
                self.engine.failed_last_caches(),
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        self.encode_kafka(&mut encoder)
    }
}

impl EngineCollector {
    /// Per Kafka partition: lag, messages, rows and dead-lettered messages.
    fn encode_kafka(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.kafka.is_empty() {
            return Ok(());
        }
        let reports: Vec<_> = self.kafka.iter().map(|s| s.report(&self.engine)).collect();
        type Pick = fn(&kiln_ingest::kafka::PartitionStatus) -> Option<u64>;
        let families: [(&str, &str, bool, Pick); 4] = [
            (
                "kiln_kafka_lag_messages",
                "Messages of a Kafka partition produced but not yet durable in Kiln",
                false,
                |p| p.lag.map(|l| l as u64),
            ),
            (
                "kiln_kafka_messages",
                "Kafka messages consumed and made durable",
                true,
                |p| Some(p.messages),
            ),
            (
                "kiln_kafka_rows",
                "Rows written from Kafka messages",
                true,
                |p| Some(p.rows),
            ),
            (
                "kiln_kafka_dead_lettered",
                "Kafka messages sent to the dead-letter topic",
                true,
                |p| Some(p.dead_lettered),
            ),
        ];
        for (name, help, counter, pick) in families {
            let ty = if counter {
                prometheus_client::metrics::MetricType::Counter
            } else {
                prometheus_client::metrics::MetricType::Gauge
            };
            let mut family = encoder.encode_descriptor(name, help, None, ty)?;
            for r in &reports {
                for p in &r.partitions {
                    let Some(value) = pick(p) else { continue };
                    let partition = p.partition.to_string();
                    let labels = [
                        ("group", r.group.as_str()),
                        ("topic", p.topic.as_str()),
                        ("partition", partition.as_str()),
                    ];
                    let metric = family.encode_family(&labels)?;
                    if counter {
                        ConstCounter::new(value).encode(metric)?;
                    } else {
                        ConstGauge::new(value as i64).encode(metric)?;
                    }
                }
            }
        }
        Ok(())
    }
}

//! `kiln-bench kafka`: rows/s from a Kafka topic to queryable in Kiln, for the TSBS
//! cpu-only workload as line protocol and as JSON, against Kiln's HTTP line-protocol
//! ingest rate measured in the same run.
//!
//! Each run preloads a fresh topic (3 partitions, a host's rows in one partition, in time
//! order), starts a fresh `kiln serve` consuming it, and times from the first row
//! queryable to the last (so the consumer group's join delay is not counted).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::{CpuOnly, DEFAULT_START_NANOS, FIELDS, TAGS};

pub const PARTITIONS: i32 = 3;

/// A `kiln serve` child process on ephemeral ports.
pub struct Kiln {
    child: Child,
    pub http: String,
    pub grpc: String,
    pub dir: PathBuf,
}

impl Kiln {
    /// Starts `bin serve` on a fresh `dir` with extra flags; waits until it listens.
    pub fn start(bin: &Path, dir: &Path, args: &[String]) -> Result<Self, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.with_extension("log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--http-bind", "127.0.0.1:0", "--grpc-bind", "127.0.0.1:0"])
            .args(["--pg-bind", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut read = |prefix: &str| {
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            line.trim()
                .strip_prefix(prefix)
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!(
                        "kiln did not start (see {})",
                        dir.with_extension("log").display()
                    )
                })
        };
        let http = read("Kiln HTTP listening on ")?;
        let grpc = read("Kiln gRPC listening on ")?;
        read("Kiln PostgreSQL listening on ")?;
        Ok(Self {
            child,
            http,
            grpc,
            dir: dir.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KafkaFormat {
    Lp,
    Json,
}

/// The mapping Kiln is given for the JSON messages [`messages`] makes.
pub fn json_mapping() -> String {
    let tags: serde_json::Map<String, serde_json::Value> = TAGS
        .iter()
        .map(|t| (t.to_string(), format!("$.{t}").into()))
        .collect();
    let fields: serde_json::Map<String, serde_json::Value> = FIELDS
        .iter()
        .map(|f| {
            (
                f.to_string(),
                serde_json::json!({"path": format!("$.{f}"), "type": "integer"}),
            )
        })
        .collect();
    serde_json::json!({
        "rows": "$.readings",
        "table": "cpu",
        "tags": tags,
        "fields": fields,
        "time": "$.time",
        "time_unit": "ns",
    })
    .to_string()
}

/// The workload as Kafka messages of `rows_per_message` rows each: `(partition, payload)`.
/// JSON messages are `{"readings": [{"hostname": …, "usage_user": 58, …, "time": …}, …]}`.
pub fn messages(
    scale: usize,
    seed: u64,
    intervals: usize,
    format: KafkaFormat,
    rows_per_message: usize,
) -> (usize, Vec<(i32, Vec<u8>)>) {
    messages_over(scale, seed, intervals, format, rows_per_message, PARTITIONS)
}

/// [`messages`] spread over `partitions` partitions (a host's rows in one of them).
pub fn messages_over(
    scale: usize,
    seed: u64,
    intervals: usize,
    format: KafkaFormat,
    rows_per_message: usize,
    partitions: i32,
) -> (usize, Vec<(i32, Vec<u8>)>) {
    use std::fmt::Write;
    let mut generator = CpuOnly::new(scale, seed, DEFAULT_START_NANOS);
    // Per partition, the message being filled and its row count.
    let mut open: Vec<(String, usize)> = vec![(String::new(), 0); partitions as usize];
    let mut out = Vec::new();
    let mut rows = 0;
    for _ in 0..intervals {
        let mut host = 0usize;
        generator.next_rows(|r| {
            let p = host % partitions as usize;
            host += 1;
            rows += 1;
            let (buf, n) = &mut open[p];
            match format {
                KafkaFormat::Lp => {
                    buf.push_str("cpu,");
                    buf.push_str(r.tags_lp);
                    for (i, v) in r.fields.iter().enumerate() {
                        buf.push(if i == 0 { ' ' } else { ',' });
                        let _ = write!(buf, "{}={v}i", FIELDS[i]);
                    }
                    let _ = writeln!(buf, " {}", r.time);
                }
                KafkaFormat::Json => {
                    buf.push_str(if *n == 0 { "{\"readings\":[" } else { "," });
                    buf.push('{');
                    for (k, v) in TAGS.iter().zip(r.tag_values) {
                        let _ = write!(buf, "\"{k}\":\"{v}\",");
                    }
                    for (k, v) in FIELDS.iter().zip(r.fields) {
                        let _ = write!(buf, "\"{k}\":{v},");
                    }
                    let _ = write!(buf, "\"time\":{}}}", r.time);
                }
            }
            *n += 1;
            if *n == rows_per_message {
                if format == KafkaFormat::Json {
                    buf.push_str("]}");
                }
                out.push((p as i32, std::mem::take(buf).into_bytes()));
                *n = 0;
            }
        });
    }
    for (p, (mut buf, n)) in open.into_iter().enumerate() {
        if n > 0 {
            if format == KafkaFormat::Json {
                buf.push_str("]}");
            }
            out.push((p as i32, buf.into_bytes()));
        }
    }
    (rows, out)
}

/// Counts messages the broker refused.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::atomic::AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.first_error
                .lock()
                .expect("not poisoned")
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// Produces `messages` to `topic` and waits until every one is acknowledged.
pub fn produce(bootstrap: &str, topic: &str, messages: &[(i32, Vec<u8>)]) -> Result<(), String> {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create_with_context(Deliveries::default())
        .map_err(|e| e.to_string())?;
    for (partition, payload) in messages {
        let mut record = BaseRecord::<(), [u8]>::to(topic)
            .partition(*partition)
            .payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(300))
        .map_err(|e| format!("producing to {topic}: {e}"))?;
    let ctx = producer.context();
    match ctx.failed.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(format!(
            "{n} messages to {topic} were not delivered: {}",
            ctx.first_error
                .lock()
                .expect("not poisoned")
                .clone()
                .unwrap_or_default()
        )),
    }
}

/// Reads `topic` from the beginning with a plain consumer that does nothing with the
/// messages, as fast as the broker delivers them, with librdkafka `options` (those Kiln is
/// given). Returns the seconds from the first message to the last of `messages`.
pub fn drain(
    bootstrap: &str,
    topic: &str,
    options: &[(String, String)],
    messages: usize,
) -> Result<f64, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("drain-{topic}"))
        .set("enable.auto.commit", "false");
    for (k, v) in options {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let (mut seen, mut first) = (0, None);
    let started = Instant::now();
    while seen < messages {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                first.get_or_insert_with(Instant::now);
                seen += 1;
            }
            Some(Err(e)) => return Err(format!("draining {topic}: {e}")),
            None if started.elapsed() > Duration::from_secs(600) => {
                return Err(format!("draining {topic}: {seen} of {messages} messages"));
            }
            None => {}
        }
    }
    Ok(first.map_or(0.0, |f| f.elapsed().as_secs_f64()))
}

/// Deletes `topic`, so that the broker holds only the topic of the next measurement (a
/// broker that keeps every earlier topic in memory gets slower run by run).
pub async fn delete_topic(bootstrap: &str, topic: &str) -> Result<(), String> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| e.to_string())?;
    let results = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .map_err(|e| format!("deleting {topic}: {e}"))?;
    for r in results {
        r.map_err(|(t, e)| format!("deleting {t}: {e}"))?;
    }
    Ok(())
}

/// Rows in `table` of `db` now (0 while the table does not exist).
pub async fn count(http: &reqwest::Client, base: &str, db: &str, table: &str) -> u64 {
    let resp = http
        .get(format!("{base}/api/v3/query_sql"))
        .query(&[
            ("db", db),
            ("q", &format!("SELECT count(*) AS n FROM {table}")),
        ])
        .send()
        .await;
    let Ok(resp) = resp else { return 0 };
    let rows: Vec<serde_json::Value> = resp.json().await.unwrap_or_default();
    rows.first().and_then(|r| r["n"].as_u64()).unwrap_or(0)
}

/// Rows written to the WAL and buffer so far (queryable from then on), from `/metrics`:
/// cheaper to poll than a query, which would compete with ingest for the cores.
pub async fn rows_written(http: &reqwest::Client, base: &str) -> u64 {
    let Ok(resp) = http.get(format!("{base}/metrics")).send().await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("kiln_ingest_rows_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `total` rows are queryable; the rate from the first row seen to the last.
/// Checks with a query at the end that the table holds exactly `total` rows.
pub async fn time_to_queryable(base: &str, db: &str, total: u64) -> Result<f64, String> {
    time_to_queryable_in(base, db, "cpu", total, total).await
}

/// Waits until Kiln has written `total` rows; the rate from the first row seen to the
/// last. Checks with a query at the end that `table` holds exactly `rows` rows.
pub async fn time_to_queryable_in(
    base: &str,
    db: &str,
    table: &str,
    total: u64,
    rows: u64,
) -> Result<f64, String> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let (mut first, mut first_rows) = (None, 0);
    loop {
        let n = rows_written(&http, base).await;
        if n > 0 && first.is_none() {
            first = Some(Instant::now());
            first_rows = n;
        }
        if n >= total {
            let first = first.unwrap_or(started);
            let secs = first.elapsed().as_secs_f64();
            let held = count(&http, base, db, table).await;
            if held != rows {
                return Err(format!("{table} holds {held} rows; {rows} were sent"));
            }
            if secs <= 0.0 || first_rows >= total {
                return Err("every row arrived before the first look; use more rows".into());
            }
            return Ok((total - first_rows) as f64 / secs);
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("only {n} of {total} rows after 30 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

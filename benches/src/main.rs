//! `kiln-bench`: drives a running Kiln server with the TSBS cpu-only workload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, DictionaryArray, Int64Array, RecordBatch, TimestampNanosecondArray};
use arrow::datatypes::Int32Type;
use arrow::ipc::writer::StreamWriter;
use clap::{Parser, Subcommand};
use kiln_bench::{CpuOnly, DEFAULT_START_NANOS, FIELDS, INTERVAL_NANOS, TAGS};
use kiln_proto::ingest::v1::write_service_client::WriteServiceClient;
use kiln_proto::ingest::v1::{ArrowBatch, Field, Row, Rows, WriteRequest, field, write_request};
use prost::Message;

#[derive(Debug, Parser)]
#[command(name = "kiln-bench", about = "Load generator and benchmarks for Kiln")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Workload {
    /// Number of hosts (TSBS --scale).
    #[arg(long, default_value_t = 100)]
    scale: usize,
    /// Random seed.
    #[arg(long, default_value_t = 123)]
    seed: u64,
    /// Span of simulated time, 10 s between rows of a host.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time of the first rows: `tsbs` (2016-01-01T00:00:00Z), an RFC 3339 time, or
    /// `now-<duration>` (`now-30d`: data whose age matters, for retention).
    #[arg(long, default_value = "tsbs", value_parser = parse_start)]
    start: i64,
}

fn parse_start(text: &str) -> Result<i64, String> {
    if text == "tsbs" {
        return Ok(DEFAULT_START_NANOS);
    }
    if let Some(ago) = text.strip_prefix("now-") {
        let ago = humantime::parse_duration(ago).map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?;
        let start = now.saturating_sub(ago).as_nanos() as i64;
        // On the workload's 10 s grid.
        return Ok(start - start.rem_euclid(INTERVAL_NANOS));
    }
    humantime::parse_rfc3339(text)
        .map_err(|e| format!("{text:?}: tsbs, now-<duration> or RFC 3339: {e}"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .map_err(|e| e.to_string())
        })
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the workload as line protocol.
    Generate(Workload),
    /// Send the workload to a server and report rows/s and write latency.
    Ingest {
        #[command(flatten)]
        workload: Workload,
        /// How to send: HTTP line protocol, gRPC typed rows or gRPC Arrow IPC.
        #[arg(long, value_enum, default_value = "http-lp")]
        protocol: Protocol,
        /// Server HTTP base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Server gRPC URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        grpc_url: String,
        /// Database to write into.
        #[arg(long, default_value = "benchmark")]
        db: String,
        /// Lines per request.
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
        /// Concurrent connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[command(flatten)]
        access: kiln_bench::security::Access,
    },
    /// Many clients at once: PostgreSQL connections and HTTP clients querying in loops
    /// while line protocol is written; counts every answer by kind and fails if any was
    /// neither a result nor a documented limit (HTTP 429, SQLSTATE 53300).
    Load(#[command(flatten)] kiln_bench::load::LoadConfig),
    /// Write a throwaway CA and a server certificate signed by it (ca.pem, tls.crt,
    /// tls.key), for measuring Kiln with TLS.
    Certs {
        /// Directory to write them to.
        #[arg(long)]
        dir: PathBuf,
        /// Names the certificate is for.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        names: Vec<String>,
    },
    /// Line protocol at a fixed rate for a fixed time while sampling a server's resident
    /// memory (`/proc/PID/status`): the edge footprint benchmark.
    Sustain {
        /// Server HTTP base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Database to write into.
        #[arg(long, default_value = "benchmark")]
        db: String,
        /// The server's process id, whose memory is sampled.
        #[arg(long)]
        pid: u32,
        /// Rows per second.
        #[arg(long, default_value_t = 100_000)]
        rate: usize,
        /// How long to keep the rate.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Hosts of the TSBS cpu-only workload: rows per request.
        #[arg(long, default_value_t = 1000)]
        scale: usize,
        /// Concurrent connections.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        #[command(flatten)]
        access: kiln_bench::security::Access,
    },
    /// Median latency of a small query over a kept-alive HTTP connection, and of a new
    /// connection's first request (with TLS: the handshake); compare a server with
    /// tokens and TLS to one without.
    Latency {
        /// Server HTTP base URL (`https://` for TLS).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value = "benchmark")]
        db: String,
        /// The query.
        #[arg(
            long,
            default_value = "SELECT max(usage_user) FROM cpu WHERE hostname = 'host_0'"
        )]
        query: String,
        /// Measured requests of each kind.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        #[command(flatten)]
        access: kiln_bench::security::Access,
    },
    /// An OTLP/gRPC trace receiver that counts the spans it is sent (into `--count-file`)
    /// and keeps none: the collector of `benches/tracing.sh`.
    OtlpSink {
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: std::net::SocketAddr,
        #[arg(long)]
        count_file: PathBuf,
    },
    /// Stream a large query result over each query protocol (PostgreSQL wire text and
    /// binary, Flight SQL, HTTP JSON Lines and Parquet) and report the median rows/s.
    Results {
        /// Server HTTP base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Server gRPC URL (Flight SQL).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        grpc_url: String,
        /// Server PostgreSQL address.
        #[arg(long, default_value = "127.0.0.1:5433")]
        pg: String,
        /// Database to query.
        #[arg(long, default_value = "benchmark")]
        db: String,
        /// The query whose result is streamed.
        #[arg(long, default_value = "SELECT * FROM cpu LIMIT 1000000")]
        sql: String,
        /// Runs per protocol (interleaved); the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Rows/s from Kafka to queryable in Kiln (line protocol and JSON messages), against
    /// HTTP line-protocol ingest measured in the same run. Starts its own Kiln processes
    /// and, unless `--brokers` is given, an in-process Kafka mock cluster.
    Kafka {
        #[command(flatten)]
        workload: Workload,
        /// The `kiln` binary to run.
        #[arg(long, default_value = "target/release/kiln")]
        kiln: PathBuf,
        /// Bootstrap servers of a Kafka-compatible broker holding topics `tsbs-lp-<run>`
        /// and `tsbs-json-<run>` (3 partitions each); an in-process mock cluster
        /// (librdkafka's, which keeps only 5 MB per partition) by default.
        #[arg(long)]
        brokers: Option<String>,
        /// Formats to measure (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "lp,json")]
        formats: Vec<kiln_bench::kafka::KafkaFormat>,
        /// Rows of the workload per Kafka message.
        #[arg(long, default_value_t = 100)]
        rows_per_message: usize,
        /// Runs per format (interleaved with the HTTP runs); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory for the servers' data (removed after each run).
        #[arg(long, default_value = "/tmp/kiln-bench-kafka")]
        data_dir: PathBuf,
        /// An extra argument for the Kafka-consuming `kiln serve` (repeat), e.g.
        /// `--kiln-arg=--kafka-option=fetch.wait.max.ms=10`.
        #[arg(long = "kiln-arg", allow_hyphen_values = true)]
        kiln_args: Vec<String>,
    },
    /// Rows/s from Kafka through 1 and through 2 ingesters (`--role ingester`) persisting
    /// to one S3 bucket, and their CPU time per row; a querier checks every row arrived.
    Cluster {
        #[command(flatten)]
        workload: Workload,
        /// The `kiln` binary to run.
        #[arg(long, default_value = "target/release/kiln")]
        kiln: PathBuf,
        /// Bootstrap servers of a Kafka-compatible broker holding topics
        /// `cluster-<n>-<run>` of 6 partitions.
        #[arg(long)]
        brokers: String,
        /// Ingester counts to compare (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        ingesters: Vec<usize>,
        /// Rows of the workload per Kafka message.
        #[arg(long, default_value_t = 100)]
        rows_per_message: usize,
        /// Runs per ingester count (interleaved); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory for the servers' data (removed after each run).
        #[arg(long, default_value = "/tmp/kiln-bench-cluster")]
        data_dir: PathBuf,
        /// An `--object-store*` flag of the bucket and its value (repeat), e.g.
        /// `--store-arg=--object-store=s3`; credentials come from the environment.
        #[arg(long = "store-arg", allow_hyphen_values = true)]
        store_args: Vec<String>,
        /// An extra argument for each ingester (repeat).
        #[arg(long = "kiln-arg", allow_hyphen_values = true)]
        kiln_args: Vec<String>,
    },
    /// MQTT to queryable: the workload through an MQTT broker (queued for a persistent
    /// session, then taken by Kiln) as line protocol, JSON and Sparkplug B, against a
    /// subscriber that does nothing and HTTP line protocol in the same run.
    Mqtt {
        #[command(flatten)]
        workload: Workload,
        /// The `kiln` binary to run.
        #[arg(long, default_value = "target/release/kiln")]
        kiln: PathBuf,
        /// Port of an MQTT broker on 127.0.0.1 that queues without limit (Mosquitto with
        /// `max_queued_messages 0`).
        #[arg(long)]
        broker_port: u16,
        /// Formats to measure (comma-separated).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "lp,json,sparkplug"
        )]
        formats: Vec<kiln_bench::mqtt::MqttFormat>,
        /// Rows of the workload per line protocol or JSON message.
        #[arg(long, default_value_t = 100)]
        rows_per_message: usize,
        /// Runs per format (interleaved with the HTTP runs); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory for the servers' data (removed after each run).
        #[arg(long, default_value = "/tmp/kiln-bench-mqtt")]
        data_dir: PathBuf,
        /// An extra argument for the MQTT-reading `kiln serve` (repeat), e.g.
        /// `--kiln-arg=--mqtt-protocol=5`.
        #[arg(long = "kiln-arg", allow_hyphen_values = true)]
        kiln_args: Vec<String>,
    },
    /// Run librdkafka's mock Kafka cluster (for tests and scripts): prints
    /// `bootstrap=host:port` once its topics exist, and runs until stdin closes.
    MockKafka {
        /// A topic to create, `name:partitions` (repeat).
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Brokers in the cluster.
        #[arg(long, default_value_t = 1)]
        brokers: i32,
    },
    /// Run the TSBS cpu-only query types on a server holding `ingest`'s data through each
    /// client asked for, and the same queries on DuckDB in each configuration asked for;
    /// print medians and ratios.
    Queries {
        /// The workload the server holds (as given to `ingest`).
        #[command(flatten)]
        workload: Workload,
        /// Server HTTP base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Server gRPC URL (Flight SQL).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        grpc_url: String,
        /// PostgreSQL connection string without the database.
        #[arg(long, default_value = "host=127.0.0.1 port=5433 user=kiln")]
        pg: String,
        /// Database holding the data.
        #[arg(long, default_value = "benchmark")]
        db: String,
        /// Kiln's clients, one column each (comma-separated: http, pg, flight); ratios are
        /// of the first.
        #[arg(long, value_delimiter = ',', default_value = "flight")]
        clients: Vec<String>,
        /// Instances of each query type (random hosts and windows).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Query types to run (comma-separated); all by default.
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// DuckDB over the Parquet segments Kiln persisted: their glob (the server's
        /// `<data-dir>/objects/segments/*/*/*.parquet`).
        #[arg(long)]
        segments: Option<String>,
        /// DuckDB over Parquet files it wrote itself: their directory
        /// (`benches/duckdb_queries.py prepare`).
        #[arg(long)]
        duckdb_parquet: Option<String>,
        /// DuckDB over a native table: the database file.
        #[arg(long)]
        duckdb_native: Option<String>,
        /// A Python that can `import duckdb` (benches/queries.sh makes one).
        #[arg(long, default_value = "python3")]
        python: String,
        /// The DuckDB runner script.
        #[arg(long, default_value = "benches/duckdb_queries.py")]
        script: String,
        /// Receive tags as Arrow dictionaries, as Kiln stores them (the
        /// `kiln-dictionaries: keep` header), instead of as strings (Flight SQL).
        #[arg(long)]
        keep_dictionaries: bool,
        /// Time each query the first time it runs, with no untimed pass before (a server
        /// whose caches are empty).
        #[arg(long)]
        cold: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Protocol {
    HttpLp,
    GrpcRows,
    GrpcArrow,
}

fn intervals(w: &Workload) -> usize {
    (w.duration.as_nanos() / INTERVAL_NANOS as u128) as usize
}

fn main() -> std::process::ExitCode {
    // The HTTP client's TLS uses ring, as the server's does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::MockKafka { topics, brokers } => exit_code(mock_kafka(&topics, brokers)),
        Command::Kafka {
            workload,
            kiln,
            brokers,
            formats,
            rows_per_message,
            runs,
            data_dir,
            kiln_args,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let plan = KafkaPlan {
                kiln,
                brokers,
                formats,
                rows_per_message: rows_per_message.max(1),
                runs: runs.max(1),
                data_dir,
                kiln_args,
            };
            exit_code(runtime.block_on(kafka(&workload, &plan)))
        }
        Command::Cluster {
            workload,
            kiln,
            brokers,
            ingesters,
            rows_per_message,
            runs,
            data_dir,
            store_args,
            kiln_args,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let plan = kiln_bench::cluster::ClusterPlan {
                kiln,
                brokers,
                store_args: store_args
                    .iter()
                    .flat_map(|a| match a.split_once('=') {
                        Some((k, v)) => vec![k.to_owned(), v.to_owned()],
                        None => vec![a.clone()],
                    })
                    .collect(),
                ingesters,
                rows_per_message: rows_per_message.max(1),
                runs: runs.max(1),
                data_dir,
                kiln_args,
            };
            exit_code(runtime.block_on(kiln_bench::cluster::run(
                workload.scale,
                workload.seed,
                intervals(&workload),
                &plan,
            )))
        }
        Command::Mqtt {
            workload,
            kiln,
            broker_port,
            formats,
            rows_per_message,
            runs,
            data_dir,
            kiln_args,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let plan = MqttPlan {
                kiln,
                broker_port,
                formats,
                rows_per_message: rows_per_message.max(1),
                runs: runs.max(1),
                data_dir,
                kiln_args,
            };
            exit_code(runtime.block_on(mqtt(&workload, &plan)))
        }
        Command::Queries {
            workload,
            url,
            grpc_url,
            pg,
            db,
            clients,
            runs,
            types,
            segments,
            duckdb_parquet,
            duckdb_native,
            python,
            script,
            keep_dictionaries,
            cold,
        } => {
            use kiln_bench::queries::{Data, Duck, Plan, QUERY_TYPES, Urls, report};
            let mut chosen = Vec::new();
            for t in &types {
                match QUERY_TYPES.iter().find(|q| *q == t) {
                    Some(q) => chosen.push(*q),
                    None => {
                        eprintln!(
                            "error: unknown query type {t}; known: {}",
                            QUERY_TYPES.join(", ")
                        );
                        return std::process::ExitCode::FAILURE;
                    }
                }
            }
            if chosen.is_empty() {
                chosen = QUERY_TYPES.to_vec();
            }
            let ducks = [
                segments.map(Duck::KilnSegments),
                duckdb_parquet.map(Duck::Parquet),
                duckdb_native.map(Duck::Native),
            ]
            .into_iter()
            .flatten()
            .collect();
            let plan = Plan {
                urls: Urls {
                    http: url,
                    grpc: grpc_url,
                    pg,
                },
                db,
                data: Data {
                    hosts: workload.scale,
                    start: workload.start,
                    span: workload.duration.as_nanos() as i64,
                },
                runs: runs.max(1),
                seed: workload.seed,
                types: chosen,
                clients,
                ducks,
                python,
                script,
                keep_dictionaries,
                cold,
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            exit_code(runtime.block_on(report(&plan)))
        }
        Command::Results {
            url,
            grpc_url,
            pg,
            db,
            sql,
            runs,
        } => {
            let target = kiln_bench::results::Target {
                http_url: url,
                grpc_url,
                pg_addr: pg,
                db,
                sql,
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            exit_code(runtime.block_on(kiln_bench::results::report(&target, runs.max(1))))
        }
        Command::Generate(w) => {
            use std::io::Write;
            let mut generator = CpuOnly::new(w.scale, w.seed, w.start);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut buf = String::new();
            for _ in 0..intervals(&w) {
                buf.clear();
                generator.next_interval(&mut buf);
                if out.write_all(buf.as_bytes()).is_err() {
                    return std::process::ExitCode::FAILURE;
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Command::Ingest {
            workload,
            protocol,
            url,
            grpc_url,
            db,
            batch_size,
            connections,
            access,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let target = match protocol {
                Protocol::HttpLp => {
                    format!("{}/api/v3/write_lp?db={db}", url.trim_end_matches('/'))
                }
                Protocol::GrpcRows | Protocol::GrpcArrow => grpc_url,
            };
            exit_code(runtime.block_on(ingest(
                &workload,
                protocol,
                target,
                db,
                batch_size,
                connections,
                access,
            )))
        }
        Command::Sustain {
            url,
            db,
            pid,
            rate,
            duration,
            scale,
            connections,
            access,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let target = format!("{}/api/v3/write_lp?db={db}", url.trim_end_matches('/'));
            let result = access.http_client().and_then(|http| {
                runtime.block_on(kiln_bench::footprint::sustain(
                    http,
                    &target,
                    scale,
                    rate,
                    duration.as_secs(),
                    connections,
                    pid,
                ))
            });
            if let Ok(r) = &result {
                let mib = |b: u64| b as f64 / (1 << 20) as f64;
                let mut sorted = r.rss.clone();
                sorted.sort_unstable();
                let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
                let peak = sorted.last().copied().unwrap_or_default();
                println!(
                    "rows={} seconds={:.1} rows_per_sec={:.0} refused_429={} rss_median_mib={:.1} rss_peak_sampled_mib={:.1} rss_hwm_mib={:.1}",
                    r.rows,
                    r.seconds,
                    r.rows as f64 / r.seconds,
                    r.refused,
                    mib(median),
                    mib(peak),
                    mib(r.hwm)
                );
            }
            exit_code(result)
        }
        Command::Load(config) => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let result = runtime.block_on(kiln_bench::load::run(config));
            exit_code(result.and_then(|tally| {
                print!("{tally}");
                match tally.failures() {
                    0 => Ok(()),
                    n => Err(format!("{n} answers were failures")),
                }
            }))
        }
        Command::Certs { dir, names } => exit_code(kiln_bench::security::certs(&dir, &names)),
        Command::OtlpSink { bind, count_file } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            exit_code(runtime.block_on(kiln_bench::otlp_sink::run(bind, count_file)))
        }
        Command::Latency {
            url,
            db,
            query,
            runs,
            access,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let result = runtime.block_on(kiln_bench::security::latency(
                &access, &url, &db, &query, runs,
            ));
            if let Ok((query, connect)) = &result {
                println!(
                    "url={url} query_p50_ms={:.3} connect_p50_ms={:.3}",
                    query.as_secs_f64() * 1e3,
                    connect.as_secs_f64() * 1e3
                );
            }
            exit_code(result)
        }
    }
}

/// One request, ready to send.
enum Payload {
    Lp(String),
    Grpc(WriteRequest),
}

fn payloads(
    w: &Workload,
    protocol: Protocol,
    db: &str,
    batch_size: usize,
) -> Vec<(usize, usize, Payload)> {
    let mut generator = CpuOnly::new(w.scale, w.seed, w.start);
    if protocol == Protocol::HttpLp {
        return generator
            .batches(intervals(w), batch_size)
            .into_iter()
            .map(|(n, text)| (n, text.len(), Payload::Lp(text)))
            .collect();
    }
    let request = |payload| WriteRequest {
        batch_id: 0,
        database: db.to_owned(),
        payload: Some(payload),
        accept_partial: false,
    };
    let mut out = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut arrow = ArrowColumns::default();
    for _ in 0..intervals(w) {
        generator.next_rows(|r| match protocol {
            Protocol::GrpcRows => rows.push(Row {
                table: "cpu".into(),
                tags: TAGS
                    .iter()
                    .zip(r.tag_values)
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                fields: FIELDS
                    .iter()
                    .zip(r.fields)
                    .map(|(k, v)| Field {
                        name: k.to_string(),
                        value: Some(field::Value::Integer(v)),
                    })
                    .collect(),
                time_unix_nano: r.time,
            }),
            _ => arrow.push(&r),
        });
        loop {
            let ready = match protocol {
                Protocol::GrpcRows if rows.len() >= batch_size => {
                    let rest = rows.split_off(batch_size);
                    let batch = std::mem::replace(&mut rows, rest);
                    Some((
                        batch_size,
                        write_request::Payload::Rows(Rows { rows: batch }),
                    ))
                }
                Protocol::GrpcArrow if arrow.rows >= batch_size => Some((arrow.rows, arrow.take())),
                _ => None,
            };
            let Some((n, payload)) = ready else { break };
            let req = request(payload);
            out.push((n, req.encoded_len(), Payload::Grpc(req)));
        }
    }
    let last = match protocol {
        Protocol::GrpcRows if !rows.is_empty() => {
            Some((rows.len(), write_request::Payload::Rows(Rows { rows })))
        }
        Protocol::GrpcArrow if arrow.rows > 0 => Some((arrow.rows, arrow.take())),
        _ => None,
    };
    if let Some((n, payload)) = last {
        let req = request(payload);
        out.push((n, req.encoded_len(), Payload::Grpc(req)));
    }
    out
}

/// Columns of the `cpu` table being built for one Arrow request.
#[derive(Default)]
struct ArrowColumns {
    rows: usize,
    time: Vec<i64>,
    tags: Vec<Vec<String>>,
    fields: Vec<Vec<i64>>,
}

impl ArrowColumns {
    fn push(&mut self, r: &kiln_bench::CpuRow<'_>) {
        if self.tags.is_empty() {
            self.tags = vec![Vec::new(); TAGS.len()];
            self.fields = vec![Vec::new(); FIELDS.len()];
        }
        self.time.push(r.time);
        for (col, v) in self.tags.iter_mut().zip(r.tag_values) {
            col.push(v.clone());
        }
        for (col, v) in self.fields.iter_mut().zip(r.fields) {
            col.push(v);
        }
        self.rows += 1;
    }

    fn take(&mut self) -> write_request::Payload {
        let mut columns: Vec<(&str, ArrayRef)> = vec![(
            "time",
            Arc::new(TimestampNanosecondArray::from(std::mem::take(
                &mut self.time,
            ))),
        )];
        // Tags dictionary-encoded, as a columnar gateway keeps them (and as Kiln stores them).
        for (name, values) in TAGS.iter().zip(self.tags.iter_mut()) {
            let dict: DictionaryArray<Int32Type> =
                std::mem::take(values).iter().map(String::as_str).collect();
            columns.push((name, Arc::new(dict)));
        }
        for (name, values) in FIELDS.iter().zip(self.fields.iter_mut()) {
            columns.push((name, Arc::new(Int64Array::from(std::mem::take(values)))));
        }
        self.rows = 0;
        let batch = RecordBatch::try_from_iter(columns).expect("columns of equal length");
        let mut ipc = Vec::new();
        {
            let mut w = StreamWriter::try_new(&mut ipc, &batch.schema()).expect("IPC writer");
            w.write(&batch).expect("IPC write");
            w.finish().expect("IPC finish");
        }
        write_request::Payload::Arrow(ArrowBatch {
            table: "cpu".into(),
            ipc_stream: ipc.into(),
            tag_columns: TAGS.iter().map(|t| t.to_string()).collect(),
        })
    }
}

/// Sends the workload and prints (and returns) rows/s.
async fn ingest(
    w: &Workload,
    protocol: Protocol,
    target: String,
    db: String,
    batch_size: usize,
    connections: usize,
    access: kiln_bench::security::Access,
) -> Result<f64, String> {
    eprintln!(
        "generating scale={} duration={:?} seed={} as {protocol:?} ...",
        w.scale, w.duration, w.seed
    );
    let batches = payloads(w, protocol, &db, batch_size);
    let total_rows: usize = batches.iter().map(|(n, _, _)| n).sum();
    let total_bytes: usize = batches.iter().map(|(_, b, _)| b).sum();
    eprintln!(
        "sending {total_rows} rows ({:.1} MB) in {} requests over {connections} connections",
        total_bytes as f64 / 1e6,
        batches.len()
    );
    let queue = Arc::new(tokio::sync::Mutex::new(batches.into_iter()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let queue = Arc::clone(&queue);
        let target = target.clone();
        let access = access.clone();
        tasks.push(tokio::spawn(async move {
            let http = access.http_client()?;
            let authorization = access.grpc_authorization()?;
            let mut grpc = match protocol {
                Protocol::HttpLp => None,
                _ => {
                    let channel = access
                        .grpc_endpoint(&target)?
                        .initial_stream_window_size(4 * 1024 * 1024)
                        .initial_connection_window_size(16 * 1024 * 1024)
                        .connect()
                        .await
                        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
                    Some(
                        WriteServiceClient::with_interceptor(
                            channel,
                            move |mut r: tonic::Request<()>| {
                                if let Some(value) = &authorization {
                                    r.metadata_mut().insert("authorization", value.clone());
                                }
                                Ok(r)
                            },
                        )
                        .max_decoding_message_size(usize::MAX),
                    )
                }
            };
            let mut latencies = Vec::new();
            loop {
                let Some((_, _, payload)) = queue.lock().await.next() else {
                    return Ok::<_, String>(latencies);
                };
                loop {
                    let t = Instant::now();
                    let retry = match (&payload, grpc.as_mut()) {
                        (Payload::Lp(body), _) => {
                            let resp = http
                                .post(&target)
                                .body(body.clone())
                                .send()
                                .await
                                .map_err(|e| e.to_string())?;
                            let status = resp.status();
                            if !status.is_success()
                                && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                            {
                                return Err(format!(
                                    "write failed: {status}: {}",
                                    resp.text().await.unwrap_or_default()
                                ));
                            }
                            status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        }
                        (Payload::Grpc(req), Some(client)) => match client.write(req.clone()).await
                        {
                            Ok(_) => false,
                            Err(s) if s.code() == tonic::Code::ResourceExhausted => true,
                            Err(s) => return Err(format!("write failed: {s}")),
                        },
                        (Payload::Grpc(_), None) => return Err("no gRPC client".into()),
                    };
                    if retry {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    latencies.push(t.elapsed());
                    break;
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "protocol={protocol:?} rows={total_rows} elapsed={:.2}s rows_per_sec={:.0} mb_per_sec={:.1} p50_ms={:.1} p99_ms={:.1}",
        elapsed.as_secs_f64(),
        total_rows as f64 / elapsed.as_secs_f64(),
        total_bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    Ok(total_rows as f64 / elapsed.as_secs_f64())
}

/// Success, or the error printed on stderr and a failing exit status.
fn exit_code<T>(result: Result<T, String>) -> std::process::ExitCode {
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn mock_kafka(topics: &[String], brokers: i32) -> Result<(), String> {
    use std::io::{Read, Write};
    let cluster =
        rdkafka::mocking::MockCluster::new(brokers).map_err(|e| format!("mock cluster: {e}"))?;
    for t in topics {
        let (name, partitions) = t
            .rsplit_once(':')
            .and_then(|(n, p)| Some((n, p.parse::<i32>().ok()?)))
            .ok_or_else(|| format!("--topic {t:?}: expected name:partitions"))?;
        cluster
            .create_topic(name, partitions, 1)
            .map_err(|e| format!("topic {name}: {e}"))?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "bootstrap={}", cluster.bootstrap_servers()).map_err(|e| e.to_string())?;
    stdout.flush().map_err(|e| e.to_string())?;
    // Until whoever started us closes our stdin (or kills us).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

struct KafkaPlan {
    kiln: PathBuf,
    brokers: Option<String>,
    formats: Vec<kiln_bench::kafka::KafkaFormat>,
    rows_per_message: usize,
    runs: usize,
    data_dir: PathBuf,
    kiln_args: Vec<String>,
}

struct MqttPlan {
    kiln: PathBuf,
    broker_port: u16,
    formats: Vec<kiln_bench::mqtt::MqttFormat>,
    rows_per_message: usize,
    runs: usize,
    data_dir: PathBuf,
    kiln_args: Vec<String>,
}

/// Interleaves, per run: HTTP line protocol into a fresh Kiln, then per MQTT format the
/// workload queued for Kiln's session and taken by a fresh Kiln, then the same queued for
/// a subscriber that does nothing. Prints a table of medians.
async fn mqtt(w: &Workload, plan: &MqttPlan) -> Result<(), String> {
    use kiln_bench::kafka::{Kiln, time_to_queryable_in};
    use kiln_bench::mqtt::{MqttFormat, drain, open_session, publish, workload};
    let port = plan.broker_port;
    let mut loaded = Vec::new();
    for &format in &plan.formats {
        let wl = workload(w.scale, w.seed, intervals(w), format, plan.rows_per_message);
        let bytes: usize = wl.messages.iter().map(|(_, m)| m.len()).sum();
        eprintln!(
            "{format:?}: {} rows in {} messages ({:.1} MB)",
            wl.rows,
            wl.messages.len(),
            bytes as f64 / 1e6
        );
        loaded.push((format, wl));
    }
    let mut http_rates = Vec::new();
    let mut kiln_rates: Vec<Vec<f64>> = vec![Vec::new(); plan.formats.len()];
    let mut broker_rates: Vec<Vec<f64>> = vec![Vec::new(); plan.formats.len()];
    for run in 0..plan.runs {
        http_rates.push(http_baseline(w, &plan.kiln, &plan.data_dir).await?);
        for (i, (format, wl)) in loaded.iter().enumerate() {
            let filter = match format {
                MqttFormat::Sparkplug => "spBv1.0/#",
                _ => "tsbs/#",
            };
            let id = format!("kiln-bench-{run}-{format:?}").to_lowercase();
            open_session(port, &id, filter).await?;
            let t = Instant::now();
            publish(port, &wl.messages).await?;
            eprintln!(
                "run {run}: published {} messages in {:.1}s",
                wl.messages.len(),
                t.elapsed().as_secs_f64()
            );
            let mut args: Vec<String> = [
                "--mqtt-broker",
                &format!("mqtt://127.0.0.1:{port}"),
                "--mqtt-topics",
                filter,
                "--mqtt-database",
                "benchmark",
                "--mqtt-client-id",
                &id,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            match format {
                MqttFormat::Lp => {}
                MqttFormat::Json => args.extend([
                    "--mqtt-format".into(),
                    "json".into(),
                    "--mqtt-json-mapping".into(),
                    kiln_bench::kafka::json_mapping(),
                ]),
                MqttFormat::Sparkplug => {
                    args.extend(["--mqtt-format".into(), "sparkplug_b".into()])
                }
            }
            args.extend(plan.kiln_args.iter().cloned());
            let server = Kiln::start(&plan.kiln, &plan.data_dir.join("mqtt"), &args)?;
            let rate =
                time_to_queryable_in(&server.http, "benchmark", wl.table, wl.written, wl.rows)
                    .await;
            server.stop();
            let rate = rate? * wl.rows as f64 / wl.written as f64;
            println!("run {run}: mqtt {format:?} rows_per_sec={rate:.0}");
            kiln_rates[i].push(rate);
            // What the broker delivers to a subscriber that does nothing, for comparison.
            let id = format!("{id}-alone");
            open_session(port, &id, filter).await?;
            publish(port, &wl.messages).await?;
            let secs = drain(port, &id, wl.messages.len()).await?;
            if secs <= 0.0 {
                return Err("the broker delivered every message at once; use more rows".into());
            }
            let delivered = wl.rows as f64 / secs;
            println!("run {run}: broker alone {format:?} rows_per_sec={delivered:.0}");
            broker_rates[i].push(delivered);
        }
    }
    let sources = plan
        .formats
        .iter()
        .zip(kiln_rates)
        .zip(broker_rates)
        .map(|((format, rates), broker)| {
            let per = match format {
                MqttFormat::Sparkplug => "1 row of 10 metrics/message".to_string(),
                _ => format!("{} rows/message", plan.rows_per_message),
            };
            (format!("MQTT {format:?} ({per})"), rates, broker)
        })
        .collect::<Vec<_>>();
    print_sources_table(&http_rates, &sources);
    Ok(())
}

/// Interleaves, per run: HTTP line protocol into a fresh Kiln, then each Kafka format into
/// a fresh Kiln reading a freshly loaded topic. Prints a table of medians.
async fn kafka(w: &Workload, plan: &KafkaPlan) -> Result<(), String> {
    use kiln_bench::kafka::{
        KafkaFormat, Kiln, PARTITIONS, delete_topic, drain, json_mapping, messages, produce,
        time_to_queryable,
    };
    // The librdkafka options Kiln is given, for the plain consumer that measures the broker.
    let options: Vec<(String, String)> = plan
        .kiln_args
        .iter()
        .filter_map(|a| a.strip_prefix("--kafka-option="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mock = match &plan.brokers {
        Some(_) => None,
        None => {
            Some(rdkafka::mocking::MockCluster::new(1).map_err(|e| format!("mock cluster: {e}"))?)
        }
    };
    let bootstrap = match (&plan.brokers, &mock) {
        (Some(b), _) => b.clone(),
        (None, Some(m)) => m.bootstrap_servers(),
        (None, None) => unreachable!("a mock cluster when no brokers are given"),
    };
    let mut loaded = Vec::new();
    for &format in &plan.formats {
        eprintln!(
            "generating scale={} duration={:?} as {format:?}, {} rows per message ...",
            w.scale, w.duration, plan.rows_per_message
        );
        let (rows, msgs) = messages(w.scale, w.seed, intervals(w), format, plan.rows_per_message);
        let bytes: usize = msgs.iter().map(|(_, m)| m.len()).sum();
        eprintln!(
            "{format:?}: {rows} rows in {} messages ({:.1} MB)",
            msgs.len(),
            bytes as f64 / 1e6
        );
        loaded.push((format, rows, Arc::new(msgs)));
    }
    let mut http_rates = Vec::new();
    let mut kafka_rates: Vec<Vec<f64>> = vec![Vec::new(); plan.formats.len()];
    let mut broker_rates: Vec<Vec<f64>> = vec![Vec::new(); plan.formats.len()];
    for run in 0..plan.runs {
        http_rates.push(http_baseline(w, &plan.kiln, &plan.data_dir).await?);
        for (i, (format, rows, msgs)) in loaded.iter().enumerate() {
            let topic = format!("tsbs-{format:?}-{run}").to_lowercase();
            if let Some(m) = &mock {
                m.create_topic(&topic, PARTITIONS, 1)
                    .map_err(|e| format!("topic {topic}: {e}"))?;
            }
            let t = Instant::now();
            let (b, msgs2, topic2) = (bootstrap.clone(), Arc::clone(msgs), topic.clone());
            tokio::task::spawn_blocking(move || produce(&b, &topic2, &msgs2))
                .await
                .map_err(|e| e.to_string())??;
            eprintln!(
                "run {run}: produced {} messages to {topic} in {:.1}s",
                msgs.len(),
                t.elapsed().as_secs_f64()
            );
            let mut args: Vec<String> = [
                "--kafka-brokers",
                &bootstrap,
                "--kafka-topics",
                &topic,
                "--kafka-database",
                "benchmark",
                "--kafka-group",
                &format!("bench-{topic}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(plan.kiln_args.iter().cloned());
            if *format == KafkaFormat::Json {
                args.extend([
                    "--kafka-format".into(),
                    "json".into(),
                    "--kafka-json-mapping".into(),
                    json_mapping(),
                ]);
            }
            let server = Kiln::start(&plan.kiln, &plan.data_dir.join("kafka"), &args)?;
            let rate = time_to_queryable(&server.http, "benchmark", *rows as u64).await;
            server.stop();
            let rate = rate?;
            println!("run {run}: kafka {format:?} rows_per_sec={rate:.0}");
            kafka_rates[i].push(rate);
            // What the broker delivers to a consumer that does nothing, for comparison.
            let (b, topic2, options2, n) = (
                bootstrap.clone(),
                topic.clone(),
                options.clone(),
                msgs.len(),
            );
            let secs = tokio::task::spawn_blocking(move || drain(&b, &topic2, &options2, n))
                .await
                .map_err(|e| e.to_string())??;
            if secs <= 0.0 {
                return Err("the broker delivered every message at once; use more rows".into());
            }
            let delivered = *rows as f64 / secs;
            println!("run {run}: broker alone {format:?} rows_per_sec={delivered:.0}");
            broker_rates[i].push(delivered);
            // A broker that cannot delete topics still measures, only less evenly.
            if let Err(e) = delete_topic(&bootstrap, &topic).await {
                eprintln!("run {run}: {e}");
            }
        }
    }
    let sources = plan
        .formats
        .iter()
        .zip(kafka_rates)
        .zip(broker_rates)
        .map(|((format, rates), broker)| {
            (
                format!("Kafka {format:?} ({} rows/message)", plan.rows_per_message),
                rates,
                broker,
            )
        })
        .collect::<Vec<_>>();
    print_sources_table(&http_rates, &sources);
    Ok(())
}

/// One HTTP line-protocol run of the workload into a fresh Kiln (5,000 lines a request,
/// 4 connections): the rate the sources are compared with.
async fn http_baseline(w: &Workload, kiln: &Path, data_dir: &Path) -> Result<f64, String> {
    let server = kiln_bench::kafka::Kiln::start(kiln, &data_dir.join("http"), &[])?;
    let target = format!("{}/api/v3/write_lp?db=benchmark", server.http);
    let rate = ingest(
        w,
        Protocol::HttpLp,
        target,
        "benchmark".into(),
        5000,
        4,
        kiln_bench::security::Access::default(),
    )
    .await;
    server.stop();
    rate
}

/// The markdown table of a sources benchmark: HTTP line protocol, then per source its
/// runs, median, and ratios to HTTP and to the broker alone.
fn print_sources_table(http_rates: &[f64], sources: &[(String, Vec<f64>, Vec<f64>)]) {
    use kiln_bench::kafka::median;
    let http = median(http_rates);
    println!();
    println!(
        "| source | runs (rows/s) | **median rows/s** | vs HTTP LP | broker alone, median rows/s | vs broker alone |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| HTTP line protocol | {} | **{http:.0}** | 1.00× | | |",
        list(http_rates)
    );
    for (name, rates, broker) in sources {
        let (m, b) = (median(rates), median(broker));
        println!(
            "| {name} | {} | **{m:.0}** | {:.2}× | {b:.0} ({}) | {:.2}× |",
            list(rates),
            m / http,
            list(broker),
            m / b
        );
    }
}

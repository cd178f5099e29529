//! `kiln serve`: one process running the whole single-node server.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kiln_query::executor::QueryExecutor;
use kiln_query::{QueryConfig, QueryEngine};
use kiln_storage::wal::SyncPolicy;
use kiln_storage::{Engine, EngineConfig};

use crate::auth::{AuthConfig, Authorizer};
use crate::grpc::IngestService;
use crate::http::{AppState, router};
use crate::metrics::{FsyncObserver, Metrics};
use kiln_proto::ingest::v1::write_service_server::WriteServiceServer;
use std::future::IntoFuture;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

/// Configuration of `kiln serve`. Every flag can also be set with its `KILN_*` variable
/// (or `KILN_*_FILE`, a file holding the value), a key of the `--config` file, or the
/// `--profile` (see [`crate::config`]). Sizes take units: `64MiB`, `8GiB`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// A TOML file setting any of these flags, one key per flag named as the flag
    /// (`persist-buffer-bytes = "64MiB"`); flags and variables win over it.
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,

    /// Built-in settings for a kind of machine, under the configuration file's: `edge`
    /// (a 512 MiB gateway or K3s node).
    #[arg(long, env = "KILN_PROFILE", value_enum)]
    pub profile: Option<crate::config::profile::Profile>,

    /// Check the configuration (flags, variables, file, profile; TLS and token files, Kafka
    /// sources) and exit, without opening the data directory or listening.
    #[arg(long)]
    pub check: bool,

    /// What this server does: `all` (the single node), or in a cluster sharing an object
    /// store `ingester` (takes writes), `querier` (answers queries) or `compactor` (merges
    /// and expires; one per cluster). See docs/cluster.md.
    #[arg(long, env = "KILN_ROLE", value_enum, default_value = "all")]
    pub role: crate::role::Role,

    /// Directory for the WAL, and for the catalog and Parquet segments unless
    /// --object-store puts them elsewhere.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "./kiln-data")]
    pub data_dir: PathBuf,

    /// Address of the HTTP API (writes, queries, health, metrics). Port 0 picks a free port.
    #[arg(long, env = "KILN_HTTP_BIND", default_value = "127.0.0.1:8080")]
    pub http_bind: SocketAddr,

    /// Address of the gRPC API (kiln.ingest.v1.WriteService, Arrow Flight SQL, health,
    /// reflection).
    #[arg(long, env = "KILN_GRPC_BIND", default_value = "127.0.0.1:50051")]
    pub grpc_bind: SocketAddr,

    /// Address of the PostgreSQL wire protocol (psql, BI tools, Grafana's PostgreSQL data
    /// source). The database name in the connection selects the Kiln database.
    #[arg(long, env = "KILN_PG_BIND", default_value = "127.0.0.1:5433")]
    pub pg_bind: SocketAddr,

    /// Most gRPC write streams open at once (each may hold 8 messages in flight); one
    /// more is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "KILN_GRPC_MAX_STREAMS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_streams: u32,

    /// Most PostgreSQL connections served at once; one more is ended at startup with
    /// SQLSTATE 53300 (too many connections).
    #[arg(long, env = "KILN_PG_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub pg_max_connections: u32,

    /// On start-up, skip a WAL record that cannot be applied (it is logged with its file,
    /// offset and reason, and its bytes kept in `<data-dir>/wal/skipped/`) instead of
    /// refusing to start with an error naming it. Its rows are lost: use it only to bring
    /// back a server whose log holds a record no release of Kiln can apply.
    #[arg(long, env = "KILN_WAL_REPLAY_SKIP_INVALID")]
    pub wal_replay_skip_invalid: bool,

    /// When a write is acknowledged: `always` (after fsync) or a duration such as `100ms`
    /// (after write; fsync at most that long later, so a power loss can lose that much).
    #[arg(long, env = "KILN_WAL_SYNC", default_value = "always")]
    pub wal_sync: SyncPolicy,

    /// WAL files are rotated past this size (bytes).
    #[arg(long, env = "KILN_WAL_MAX_FILE_BYTES", default_value = "64MiB", value_parser = crate::config::size::parse_bytes)]
    pub wal_max_file_bytes: u64,

    /// Width of the time partitions of new tables (a Parquet segment holds one partition);
    /// at most 7 days.
    #[arg(long, env = "KILN_PARTITION_DURATION", default_value = "1h", value_parser = parse_partition_duration)]
    pub partition_duration: Duration,

    /// Persist the write buffer to Parquet once it holds this many bytes.
    #[arg(long, env = "KILN_PERSIST_BUFFER_BYTES", default_value = "256MiB", value_parser = crate::config::size::parse_usize)]
    pub persist_buffer_bytes: usize,

    /// Persist the write buffer once its oldest write is this old.
    #[arg(long, env = "KILN_PERSIST_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub persist_interval: Duration,

    /// How long a segment file replaced by compaction or dropped by retention stays in the
    /// object store once this server no longer reads it, for queriers (--role querier) that
    /// have not yet followed the catalog past it. Default: `0s` with --object-store file,
    /// `5m` with a remote store.
    #[arg(long, env = "KILN_RETIRED_SEGMENT_GRACE", value_parser = humantime::parse_duration)]
    pub retired_segment_grace: Option<Duration>,

    /// How often to merge each time partition persisted in several segments (and no longer
    /// written) into one segment (`0s`: only on request, `kiln compact`).
    #[arg(long, env = "KILN_COMPACTION_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub compaction_interval: Duration,

    /// How often to enforce retention (drop segments whose rows all expired, free expired
    /// buffered rows) and hard-delete the files of deleted databases and tables whose time
    /// has come.
    #[arg(long, env = "KILN_RETENTION_CHECK_INTERVAL", default_value = "1m", value_parser = parse_nonzero_duration)]
    pub retention_check_interval: Duration,

    /// How often to refresh materialized views whose invalidated buckets are complete
    /// (views follow persistence: see `--persist-interval`).
    #[arg(long, env = "KILN_VIEW_REFRESH_INTERVAL", default_value = "10s", value_parser = parse_nonzero_duration)]
    pub view_refresh_interval: Duration,

    /// How long a deleted database's or table's files are kept (a soft delete) when the
    /// delete does not say (`--hard-delete`).
    #[arg(long, env = "KILN_HARD_DELETE_DEFAULT_DURATION", default_value = "72h", value_parser = humantime::parse_duration)]
    pub hard_delete_default_duration: Duration,

    /// Compaction leaves alone a partition whose segments hold more than this many bytes in
    /// all: it merges a partition in memory.
    #[arg(long, env = "KILN_COMPACTION_MAX_BYTES", default_value = "256MiB", value_parser = crate::config::size::parse_bytes)]
    pub compaction_max_bytes: u64,

    /// Refuse writes with 429 (retry later) while the buffer holds more than this many bytes.
    #[arg(long, env = "KILN_MAX_BUFFER_BYTES", default_value = "1GiB", value_parser = crate::config::size::parse_usize)]
    pub max_buffer_bytes: usize,

    /// Largest accepted request body in bytes (after gzip decompression); larger gets 413
    /// over HTTP and RESOURCE_EXHAUSTED over gRPC.
    #[arg(long, env = "KILN_MAX_REQUEST_BYTES", default_value = "64MiB", value_parser = crate::config::size::parse_usize)]
    pub max_request_bytes: usize,

    /// Memory all running queries may hold together (bytes); sorts and aggregations spill
    /// to `<data-dir>/spill` beyond it, other queries fail with a clear error.
    #[arg(long, env = "KILN_QUERY_MEMORY_LIMIT", default_value = "2GiB", value_parser = crate::config::size::parse_usize)]
    pub query_memory_limit: usize,

    /// Longest a query may run (`0s`: no limit). Over HTTP and Flight SQL the whole query;
    /// over PostgreSQL up to its first row, as `statement_timeout`, which a client may set.
    #[arg(long, env = "KILN_QUERY_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub query_timeout: Duration,

    /// Threads queries execute on (`0`: one per CPU). They are not the threads that take
    /// writes.
    #[arg(long, env = "KILN_QUERY_THREADS", default_value_t = 0)]
    pub query_threads: usize,

    /// Nice value of the query threads, 0 (the same priority as writes) to 19: when the
    /// CPU is short, writes get it before queries do.
    #[arg(long, env = "KILN_QUERY_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub query_nice: i32,

    /// Largest result (bytes of Arrow data) the HTTP query API assembles; PostgreSQL and
    /// Flight SQL stream and are not bound by it.
    #[arg(long, env = "KILN_MAX_RESULT_BYTES", default_value = "1GiB", value_parser = crate::config::size::parse_usize)]
    pub max_result_bytes: usize,

    /// Most queries the HTTP query API runs at once (each holds its whole result until
    /// it is encoded); one more waits up to a second, then gets 429 with Retry-After.
    #[arg(long, env = "KILN_HTTP_MAX_QUERIES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_queries: u32,

    /// On shutdown, how long to wait for open requests and connections to finish before
    /// closing them; the write buffer is then persisted either way.
    #[arg(long, env = "KILN_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Most series a last-value cache holds; one that would hold more stops answering
    /// (queries read the table instead, `last_cache()` says why).
    #[arg(long, env = "KILN_LAST_CACHE_MAX_SERIES", default_value_t = 1_000_000)]
    pub last_cache_max_series: usize,

    /// Give no table a last-value cache it was not given (`kiln last-cache create`). By
    /// default every other table has one keyed by all its tags, so "latest row per
    /// series" queries (and alert rules) read it instead of the table.
    #[arg(long, env = "KILN_NO_DEFAULT_LAST_CACHES")]
    pub no_default_last_caches: bool,

    /// Most databases writes may create.
    #[arg(long, env = "KILN_MAX_DATABASES", default_value_t = 100)]
    pub max_databases: usize,

    /// Most tables writes may create, across all databases.
    #[arg(long, env = "KILN_MAX_TABLES", default_value_t = 10_000)]
    pub max_tables: usize,

    /// Most columns a table may have (`time` included).
    #[arg(long, env = "KILN_MAX_COLUMNS_PER_TABLE", default_value_t = 1_000)]
    pub max_columns_per_table: usize,

    /// Serve without tokens, even on a non-loopback address. Without this flag a server
    /// that listens beyond loopback needs an admin token (in the catalog or from
    /// `--admin-token-file`) and enforces tokens on every request.
    #[arg(long, env = "KILN_WITHOUT_AUTH")]
    pub without_auth: bool,

    /// A file holding an admin token (a mounted Kubernetes Secret, say): accepted as an
    /// admin token and never stored. With it, tokens are enforced from the first start.
    #[arg(long, env = "KILN_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate chain for TLS on every listener (HTTP, gRPC, PostgreSQL); read again
    /// when the file changes. Needs --tls-key.
    #[arg(long, env = "KILN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "KILN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: with it, TLS clients must present a certificate it signed (mTLS).
    #[arg(long, env = "KILN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    #[command(flatten)]
    pub telemetry: crate::telemetry::TelemetryArgs,

    #[command(flatten)]
    pub store: crate::store::StoreArgs,

    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,

    #[command(flatten)]
    pub kafka: crate::kafka::KafkaArgs,

    #[command(flatten)]
    pub mqtt: crate::mqtt::MqttArgs,

    #[command(flatten)]
    pub alerts: crate::alerts::AlertArgs,
}

pub async fn run(config: ServeConfig, notes: Vec<String>) -> Result<(), String> {
    for note in &notes {
        tracing::info!("{note}");
    }
    config
        .store
        .check()
        .map_err(|e| kiln_storage::error_chain(&e))?;
    let kafka_sources = config.kafka.sources()?;
    let mqtt_sources = config.mqtt.sources()?;
    let notify_config = config.alerts.notify_config()?;
    config
        .role
        .check(&config, kafka_sources.len(), mqtt_sources.len())?;
    let admin_token = match &config.admin_token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(format!("the admin token file {} is empty", path.display()));
            }
            Some(token)
        }
    };
    // A querier asks the ingesters for rows they have not persisted.
    let writers = config
        .role
        .read_only()
        .then(|| {
            crate::cluster::writers::FlightWriters::new(&config.cluster, admin_token.as_deref())
        })
        .transpose()?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(
            crate::tls::Tls::load(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca.clone(),
            })
            .map_err(|e| format!("cannot set up TLS: {e}"))?,
        ),
        _ => None,
    };
    if config.check {
        use crate::config::size::display;
        println!(
            "configuration OK: role {}, HTTP {}, gRPC {}, PostgreSQL {}{}, data in {}, objects in {}, {} Kafka source(s), {} MQTT source(s); \
             buffer persists at {} and refuses writes at {}, queries may hold {}",
            config.role.name(),
            config.http_bind,
            config.grpc_bind,
            config.pg_bind,
            if tls.is_some() { " (TLS)" } else { "" },
            config.data_dir.display(),
            config.store.url(&config.data_dir),
            kafka_sources.len(),
            mqtt_sources.len(),
            display(config.persist_buffer_bytes as u64),
            display(config.max_buffer_bytes as u64),
            display(config.query_memory_limit as u64),
        );
        if let (Some(address), Some(name)) =
            (&config.cluster.advertise_address, &config.cluster.node_name)
        {
            println!("joins the catalog as ingester {name}, asked by queriers at {address}");
        }
        if let Some(endpoint) = &config.telemetry.otlp_endpoint {
            println!(
                "spans exported over OTLP to {endpoint}, {} of the traces this server starts",
                config.telemetry.otlp_sample_ratio
            );
        }
        for note in &notes {
            println!("{note}");
        }
        return Ok(());
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        format!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    let lock_path = config.data_dir.join("LOCK");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        format!(
            "data directory {} is in use by another kiln process",
            config.data_dir.display()
        )
    })?;

    let opened = config
        .store
        .open(&config.data_dir, config.role.read_only())
        .await
        .map_err(|e| kiln_storage::error_chain(&e))?;
    tracing::info!(url = %opened.url, cache_bytes = opened.cache.as_ref().map(|c| c.max_bytes()), "object store opened");
    let store = opened.store;
    let segment_cache = opened.cache;
    let metrics = Arc::new(Metrics::new());
    let engine_config = EngineConfig {
        wal_dir: config.data_dir.join("wal"),
        wal_sync: config.wal_sync,
        wal_max_file_bytes: config.wal_max_file_bytes,
        partition_duration: config.partition_duration,
        persist_buffer_bytes: config.persist_buffer_bytes,
        persist_interval: config.persist_interval,
        max_buffer_bytes: config.max_buffer_bytes,
        compaction_max_bytes: config.compaction_max_bytes,
        schema_limits: kiln_storage::catalog::SchemaLimits {
            max_databases: config.max_databases,
            max_tables: config.max_tables,
            max_columns_per_table: config.max_columns_per_table,
        },
        wal_replay_skip_invalid: config.wal_replay_skip_invalid,
        last_cache_max_series: config.last_cache_max_series,
        default_last_caches: !config.no_default_last_caches,
        read_only: config.role.read_only(),
        takes_writes: config.role.takes_writes(),
        writer: config.role.writer(config.cluster.node_name.as_deref())?,
        retired_file_grace: config
            .retired_segment_grace
            .unwrap_or_else(|| config.store.default_retired_grace()),
    };
    let engine = Engine::open(
        engine_config,
        store,
        Some(Arc::new(FsyncObserver(Arc::clone(&metrics)))),
    )
    .await
    .map_err(|e| {
        let hint = match &e {
            kiln_storage::engine::Error::Wal(kiln_storage::wal::Error::Replay { .. }) => {
                " (to start anyway, losing that record's rows, pass --wal-replay-skip-invalid)"
            }
            _ => "",
        };
        format!(
            "cannot start the storage engine: {}{hint}",
            kiln_storage::error_chain(&e)
        )
    })?;

    // Before any write is taken: from here on queriers ask this ingester.
    let membership = crate::cluster::membership::join(&engine, &config.cluster).await?;

    // Turns true on SIGTERM/SIGINT: both listeners stop taking requests.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let spill_dir = config.data_dir.join("spill");
    // Spill files of queries cut short by a crash are of no use to anyone.
    let _ = std::fs::remove_dir_all(&spill_dir);
    std::fs::create_dir_all(&spill_dir)
        .map_err(|e| format!("cannot create {}: {e}", spill_dir.display()))?;
    let query = QueryEngine::new(
        Arc::clone(&engine),
        QueryConfig {
            memory_limit: config.query_memory_limit,
            spill_dir: Some(spill_dir),
            timeout: Some(config.query_timeout).filter(|t| !t.is_zero()),
            executor: Some(query_executor(config.query_threads, config.query_nice)?),
            writers: writers.map(|w| Arc::new(w) as _),
        },
    )
    .map_err(|e| format!("cannot start the query engine: {e}"))?;
    let auth = Arc::new(Authorizer::new(
        Arc::clone(engine.catalog()),
        AuthConfig {
            without_auth: config.without_auth,
            admin_token,
        },
    ));
    auth.check_startup(&[config.http_bind, config.grpc_bind, config.pg_bind])?;
    let sources = crate::kafka::start(kafka_sources, &engine, &stop_rx)?;
    let kafka = Arc::new(sources.statuses.clone());
    let mqtt_sources = crate::mqtt::start(
        mqtt_sources,
        &engine,
        &config.data_dir.join("mqtt"),
        &stop_rx,
    )?;
    let mqtt = Arc::new(mqtt_sources.statuses.clone());
    let notify_counters = crate::alerts::notify::NotifyCounters::default();
    let mut registry = metrics.registry(
        Arc::clone(&engine),
        query.clone(),
        Arc::clone(&kafka),
        auth.failures(),
    );
    registry.register(
        crate::metrics::ALERT_NOTIFICATIONS,
        "Alert notification attempts (labels: receiver webhook|alertmanager, outcome sent|failed)",
        notify_counters.clone(),
    );
    registry.register_collector(Box::new(crate::mqtt::Collector(Arc::clone(&mqtt))));
    if let Some(cache) = segment_cache {
        registry.register_collector(Box::new(crate::store::Collector(cache)));
    }
    let registry = Arc::new(registry);
    // Alert state is catalog events: rules are evaluated by the server that writes it.
    let alert_tasks = match config.role.evaluates() {
        true => crate::alerts::start(&query, notify_config, notify_counters, &stop_rx)?,
        false => Vec::new(),
    };
    let state = AppState {
        kafka,
        mqtt,
        engine: Arc::clone(&engine),
        query,
        metrics,
        registry,
        max_body_bytes: config.max_request_bytes,
        max_result_bytes: config.max_result_bytes,
        query_permits: Arc::new(tokio::sync::Semaphore::new(
            config.http_max_queries as usize,
        )),
        shutdown: stop_rx.clone(),
        auth: Arc::clone(&auth),
        hard_delete_default: config.hard_delete_default_duration,
    };

    let listener = tokio::net::TcpListener::bind(config.http_bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.http_bind))?;
    let http_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.grpc_bind))?;
    let grpc_addr = grpc_listener.local_addr().map_err(|e| e.to_string())?;
    let pg_listener = tokio::net::TcpListener::bind(config.pg_bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.pg_bind))?;
    let pg_addr = pg_listener.local_addr().map_err(|e| e.to_string())?;
    let shutdown = shutdown_signal();
    tracing::info!(role = config.role.name(), %http_addr, %grpc_addr, %pg_addr, data_dir = %config.data_dir.display(), tokens_enforced = auth.enforced(), "Kiln is serving");
    // Stable lines on stdout for scripts and tests that bind port 0.
    // A closed stdout (the reader went away) must not stop the server.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let _ = writeln!(out, "Kiln HTTP listening on {scheme}://{http_addr}");
        let _ = writeln!(out, "Kiln gRPC listening on {scheme}://{grpc_addr}");
        let _ = writeln!(out, "Kiln PostgreSQL listening on postgres://{pg_addr}");
        let _ = out.flush();
    }

    // Stopped after the listeners, so the buffer keeps persisting while requests drain.
    let (background_stop_tx, background_stop_rx) = tokio::sync::watch::channel(false);
    let background =
        config
            .role
            .start_background(&engine, &state.query, &config, &background_stop_rx);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<WriteServiceServer<IngestService>>()
        .await;
    tokio::spawn({
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: no new requests, finishing the ones in flight");
            health
                .set_not_serving::<WriteServiceServer<IngestService>>()
                .await;
            let _ = stop_tx.send(true);
        }
    });

    // Reflection in both versions: grpcurl and many tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let ingest = IngestService::new(
        Arc::clone(&engine),
        Arc::clone(&state.metrics),
        stop_rx.clone(),
        Arc::clone(&auth),
        config.grpc_max_streams as usize,
    )
    .into_server(config.max_request_bytes);
    let flight = crate::flight::FlightSql::new(state.query.clone(), Arc::clone(&auth))
        .into_server(config.max_request_bytes);
    let tls_acceptor = |alpn: &[&[u8]]| -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        tls.as_ref()
            .map(|t| t.acceptor(alpn))
            .transpose()
            .map_err(|e| format!("cannot set up TLS: {e}"))
    };
    let grpc_tls = tls_acceptor(&[b"h2"])?;
    // HTTP/1.1 over TLS: large write bodies went about 9 % faster than through HTTP/2's flow
    // control (benches/RESULTS.md); plain HTTP still takes HTTP/2 with prior knowledge.
    let http_tls = tls_acceptor(&[b"http/1.1"])?;
    let pg_tls = tls_acceptor(&[])?;
    if let Some(tls) = &tls {
        tls.watch(stop_rx.clone());
    }
    // Gateways send batches of a megabyte or more: HTTP/2's default 64 KiB flow-control
    // window would cost a round trip per 64 KiB.
    let grpc = tonic::transport::Server::builder()
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .layer(crate::telemetry::grpc())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ingest)
        .add_service(flight);
    let grpc: ServerFuture = match grpc_tls {
        None => Box::pin(grpc.serve_with_incoming_shutdown(
            // Small responses (acks, query results) go out at once: without TCP_NODELAY
            // each waits for the client's delayed ACK (tens of milliseconds).
            TcpListenerStream::new(grpc_listener).map(|stream| {
                if let Ok(stream) = &stream {
                    let _ = stream.set_nodelay(true);
                }
                stream
            }),
            stopped(stop_rx.clone()),
        )),
        Some(acceptor) => {
            let connections = crate::tls::incoming(grpc_listener, acceptor);
            Box::pin(
                grpc.serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(connections)
                        .map(|(stream, _)| Ok::<_, std::io::Error>(stream)),
                    stopped(stop_rx.clone()),
                ),
            )
        }
    };
    let grpc = async { grpc.await.map_err(|e| e.to_string()) };
    let pg = crate::postgres::serve(
        pg_listener,
        pg_tls,
        state.query.clone(),
        Arc::clone(&auth),
        crate::postgres::Limits {
            max_connections: config.pg_max_connections as usize,
            metrics: Arc::clone(&state.metrics),
        },
        stop_rx.clone(),
    );
    let app = config
        .role
        .http_api(router(state))
        .layer(crate::telemetry::http());
    let http: HttpFuture = match http_tls {
        None => {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            Box::pin(
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            )
        }
        Some(acceptor) => {
            let listener = crate::tls::TlsListener::new(listener, acceptor)
                .map_err(|e| format!("cannot listen on {http_addr}: {e}"))?;
            Box::pin(
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            )
        }
    };
    let servers = async { tokio::join!(http, grpc, pg) };
    // A client that never finishes its request (or, on HTTP/2, never answers the
    // shutdown ping) must not keep the server from stopping.
    let grace = config.shutdown_timeout;
    let deadline = async {
        stopped(stop_rx).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        (http_result, grpc_result, pg_result) = servers => {
            http_result.map_err(|e| format!("HTTP server failed: {e}"))?;
            grpc_result.map_err(|e| format!("gRPC server failed: {e}"))?;
            pg_result.map_err(|e| format!("PostgreSQL server failed: {e}"))?;
        }
        _ = deadline => {
            tracing::warn!(timeout = ?grace, "requests still open at the shutdown timeout; closing their connections");
        }
    }

    sources.stopped().await;
    mqtt_sources.stopped().await;
    for task in alert_tasks {
        let _ = task.await;
    }
    let _ = background_stop_tx.send(true);
    for task in background {
        let _ = task.await;
    }
    tracing::info!("persisting the write buffer and syncing the WAL");
    engine
        .shutdown()
        .await
        .map_err(|e| format!("shutdown persistence failed: {e}"))?;
    if let Some(membership) = membership {
        membership.leave(&engine).await;
    }
    tracing::info!("stopped cleanly");
    drop(lock);
    Ok(())
}

/// A listener's server future, TLS or not.
type ServerFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
>;
type HttpFuture = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;

/// Resolves once `rx` turns true (or its sender is gone).
pub(crate) async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Registers for SIGTERM and SIGINT (Ctrl-C) at once, so a signal that arrives as soon as
/// the server says it is listening stops it cleanly rather than killing it; resolves when
/// one arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(terminate) => {},
                _ = wait(interrupt) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A partition width: a positive duration of at most seven days.
fn parse_partition_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let max = Duration::from_nanos(kiln_storage::time::MAX_PARTITION_NANOS.unsigned_abs());
    if d.is_zero() || d > max {
        return Err(format!(
            "{text:?}: a partition is wider than 0s and at most 7 days"
        ));
    }
    Ok(d)
}

/// The runtime queries execute on (see `kiln_query::executor`): `threads` workers (one per
/// CPU for 0) at nice value `nice`.
fn query_executor(threads: usize, nice: i32) -> Result<QueryExecutor, String> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    QueryExecutor::dedicated(threads, nice)
        .map_err(|e| format!("cannot start the query threads: {e}"))
}

fn parse_nonzero_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err(format!("{text:?}: must be longer than 0s")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

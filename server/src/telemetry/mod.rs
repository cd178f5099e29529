//! Logs and traces. Logs go to stderr through `tracing` (`KILN_LOG`, `--log-format`);
//! with `--otlp-endpoint`, spans of writes and queries are exported over OTLP/gRPC too.
//!
//! Each request is a span at the door it came through (`HTTP request`, `gRPC request`,
//! `PostgreSQL query`, `Kafka batch`, `MQTT batch`), continuing the trace its client
//! started when it sends a W3C `traceparent` header. Below it are the steps where time
//! goes: `write` → `validate`, `schema change`, `WAL append`; `plan` and `execute` → `scan`
//! → `unpersisted rows` → `writer` (on a querier, which carries the trace on to each
//! ingester), `fetch segment` on a cache miss. Every span is at `debug` level: without an
//! OTLP endpoint they cost nothing at the default log level.

mod doors;

use std::any::Any;
use std::path::PathBuf;

use datafusion::common::runtime::JoinSetTracer;
use futures::FutureExt;
use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use doors::{grpc, http, trace_headers};

/// How a server logs and exports traces.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log format: `text` or `json`.
    #[arg(long, env = "KILN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Export spans of writes and queries over OTLP/gRPC to this collector, such as
    /// `http://otel-collector:4317`. An `https://` collector's certificate is checked
    /// against public roots, or --otlp-tls-ca. Headers (an API key) come from
    /// `OTEL_EXPORTER_OTLP_HEADERS`.
    #[arg(long, env = "KILN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The share of the traces this server starts that it exports, 0 to 1. A request
    /// that carries its client's `traceparent` is exported if the client sampled it.
    #[arg(long, env = "KILN_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = ratio)]
    pub otlp_sample_ratio: f64,

    /// PEM CA bundle that signed an `https://` collector's certificate.
    #[arg(long, env = "KILN_OTLP_TLS_CA", requires = "otlp_endpoint")]
    pub otlp_tls_ca: Option<PathBuf>,
}

fn ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{text:?} is not a ratio from 0 to 1")),
    }
}

/// Who this server is, in every span it exports.
pub struct Identity<'a> {
    pub role: &'a str,
    pub node_name: Option<&'a str>,
}

/// Keeps the trace exporter running; [`Telemetry::shutdown`] sends what it holds.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans not yet sent (waiting up to the exporter's timeout).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = flushed {
            eprintln!("warning: spans not exported at shutdown: {e}");
        }
    }
}

/// Starts logging and, with `--otlp-endpoint`, trace export. Must be called inside the
/// Tokio runtime: the exporter's connection runs on it.
pub fn init(args: &TelemetryArgs, who: Identity<'_>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match args.log_format.as_str() {
        "json" => logs.json().boxed(),
        _ => logs.boxed(),
    }
    .with_filter(filter);
    let Some(endpoint) = &args.otlp_endpoint else {
        tracing_subscriber::registry()
            .with(logs)
            .try_init()
            .map_err(|e| format!("cannot start logging: {e}"))?;
        return Ok(Telemetry { provider: None });
    };
    let provider = provider(args, endpoint, who)?;
    // Kiln's own spans (all at `debug`, so that logs at the default level leave them
    // out) with its events from `info`; other crates' only when something goes wrong.
    // Events become events of the span they happened in.
    let spans = Targets::new()
        .with_target("kiln", LevelFilter::DEBUG)
        .with_default(LevelFilter::WARN)
        .and(filter_fn(|meta| {
            meta.is_span() || *meta.level() <= tracing::Level::INFO
        }));
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("kiln"))
        .with_filter(spans);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| format!("cannot start logging: {e}"))?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // A query's operators run in tasks of their own: their spans belong to the query.
    let _ = datafusion::common::runtime::set_join_set_tracer(&SpawnedInCurrentSpan);
    tracing::info!(
        endpoint = %endpoint,
        sample_ratio = args.otlp_sample_ratio,
        "exporting spans over OTLP"
    );
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn provider(
    args: &TelemetryArgs,
    endpoint: &str,
    who: Identity<'_>,
) -> Result<SdkTracerProvider, String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    match endpoint.split_once("://").map(|(scheme, _)| scheme) {
        Some("http") => {}
        Some("https") => {
            let tls = crate::tls::grpc_client(args.otlp_tls_ca.as_deref(), "--otlp-tls-ca")?;
            exporter = exporter.with_tls_config(tls);
        }
        _ => {
            return Err(format!(
                "--otlp-endpoint {endpoint:?} must start with http:// or https://"
            ));
        }
    }
    let exporter = exporter.build().map_err(|e| {
        format!(
            "--otlp-endpoint {endpoint:?}: {}",
            kiln_storage::error_chain(&e)
        )
    })?;
    let instance = match who.node_name {
        Some(name) => name.to_owned(),
        None => hostname(),
    };
    let resource = Resource::builder()
        .with_service_name("kiln")
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("kiln.role", who.role.to_owned()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            args.otlp_sample_ratio,
        ))))
        .with_resource(resource)
        .build())
}

/// This machine's name, for `service.instance.id` when `--node-name` gives none.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "kiln".to_owned())
}

/// Runs DataFusion's spawned tasks and blocking closures in the span that spawned them.
struct SpawnedInCurrentSpan;

impl JoinSetTracer for SpawnedInCurrentSpan {
    fn trace_future(
        &self,
        fut: BoxFuture<'static, Box<dyn Any + Send>>,
    ) -> BoxFuture<'static, Box<dyn Any + Send>> {
        fut.in_current_span().boxed()
    }

    fn trace_block(
        &self,
        f: Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>,
    ) -> Box<dyn FnOnce() -> Box<dyn Any + Send> + Send> {
        let span = tracing::Span::current();
        Box::new(move || span.in_scope(f))
    }
}

//! The span of each request at its door, continuing its client's trace (W3C
//! `traceparent`), and the headers that carry a trace on to another server.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{HeaderMap, Request, Response};
use opentelemetry::propagation::Extractor;
use tower_http::classify::{GrpcErrorsAsFailures, ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{MakeSpan, OnEos, OnResponse, TraceLayer};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A tower layer giving each request its span (see [`http`] and [`grpc`]).
pub type Traced<C> =
    TraceLayer<SharedClassifier<C>, DoorSpan, (), RecordStatus, (), RecordStatus, ()>;

/// Spans for the HTTP API. Probes and scrapes (`/health`, `/ready`, `/metrics`) get none.
pub fn http() -> Traced<ServerErrorsAsFailures> {
    TraceLayer::new_for_http()
        .make_span_with(DoorSpan::Http)
        .on_request(())
        .on_response(RecordStatus)
        .on_body_chunk(())
        .on_eos(RecordStatus)
        .on_failure(())
}

/// Spans for the gRPC listener (writes, Flight SQL, a querier's calls to an ingester).
/// Health checks and write streams get none.
pub fn grpc() -> Traced<GrpcErrorsAsFailures> {
    TraceLayer::new_for_grpc()
        .make_span_with(DoorSpan::Grpc)
        .on_request(())
        .on_response(RecordStatus)
        .on_body_chunk(())
        .on_eos(RecordStatus)
        .on_failure(())
}

/// The headers that carry the current span's trace to another server (`traceparent`,
/// and `tracestate` if any); none when spans are not exported.
pub fn trace_headers() -> HashMap<String, String> {
    let context = Span::current().context();
    let mut headers = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut headers));
    headers
}

/// Which door a request came through.
#[derive(Debug, Clone, Copy)]
pub enum DoorSpan {
    Http,
    Grpc,
}

impl<B> MakeSpan<B> for DoorSpan {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        let path = request.uri().path();
        let span = match self {
            Self::Http => {
                if matches!(path, "/health" | "/ready" | "/metrics") {
                    return Span::none();
                }
                let route = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or(path, MatchedPath::as_str);
                tracing::debug_span!(
                    "HTTP request",
                    otel.name = %format_args!("{} {route}", request.method()),
                    otel.kind = "server",
                    otel.status_code = Empty,
                    http.request.method = %request.method(),
                    http.route = route,
                    http.response.status_code = Empty,
                )
            }
            Self::Grpc => {
                // A gateway's write stream lasts for hours: each of its messages' writes
                // is a trace of its own instead.
                if path.starts_with("/grpc.health.") || path.ends_with("/WriteStream") {
                    return Span::none();
                }
                let (service, method) = path
                    .trim_start_matches('/')
                    .split_once('/')
                    .unwrap_or((path, ""));
                tracing::debug_span!(
                    "gRPC request",
                    otel.name = path.trim_start_matches('/'),
                    otel.kind = "server",
                    otel.status_code = Empty,
                    rpc.system = "grpc",
                    rpc.service = service,
                    rpc.method = method,
                    rpc.grpc.status_code = Empty,
                )
            }
        };
        continue_trace(&span, request.headers());
        span
    }
}

/// Makes `span` a child of the span its client sent in `headers`, if any.
fn continue_trace(span: &Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(parent);
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Records the answer's status in the request's span: the HTTP status, and gRPC's
/// `grpc-status` (in the headers of an error answered at once, else in the trailers).
#[derive(Debug, Clone, Copy)]
pub struct RecordStatus;

impl<B> OnResponse<B> for RecordStatus {
    fn on_response(self, response: &Response<B>, _: Duration, span: &Span) {
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        record_grpc_status(response.headers(), span);
    }
}

impl OnEos for RecordStatus {
    fn on_eos(self, trailers: Option<&HeaderMap>, _: Duration, span: &Span) {
        if let Some(trailers) = trailers {
            record_grpc_status(trailers, span);
        }
    }
}

fn record_grpc_status(headers: &HeaderMap, span: &Span) {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    span.record("rpc.grpc.status_code", code);
    // The codes that mean the server failed, not the request.
    if matches!(
        tonic::Code::from_i32(code),
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

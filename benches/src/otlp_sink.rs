//! An OTLP/gRPC trace receiver that only counts what it is sent: where
//! `benches/tracing.sh` points `--otlp-endpoint`, so that exporting costs the server what a
//! collector on the same machine would make it cost, and nothing is kept.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

struct Count {
    spans: AtomicU64,
    /// Rewritten with the total after every export.
    file: PathBuf,
}

#[tonic::async_trait]
impl TraceService for Count {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        let total = self.spans.fetch_add(spans as u64, Ordering::Relaxed) + spans as u64;
        let _ = std::fs::write(&self.file, format!("{total}\n"));
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves on `bind` until killed, printing `OTLP sink listening on http://ADDR` first and
/// keeping the number of spans received in `count_file`.
pub async fn run(bind: SocketAddr, count_file: PathBuf) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    std::fs::write(&count_file, "0\n").map_err(|e| format!("{}: {e}", count_file.display()))?;
    println!("OTLP sink listening on http://{addr}");
    let count = Count {
        spans: AtomicU64::new(0),
        file: count_file,
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(count))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await
        .map_err(|e| e.to_string())
}

//! gRPC: `kiln.ingest.v1.WriteService` (unary and streaming writes with durable acks),
//! the standard health service and server reflection. Writes carry a token once tokens
//! are enforced ([`crate::auth::grpc`]) that may write the request's database.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use kiln_ingest::arrow_batch::validate_arrow;
use kiln_ingest::line_protocol::{LineError, Precision, validate_lines};
use kiln_ingest::rows::validate_rows;
use kiln_proto::ingest::v1::write_service_server::{WriteService, WriteServiceServer};
use kiln_proto::ingest::v1::{RowError, WriteAck, WriteRequest, WriteResponse, write_request};
use kiln_storage::Engine;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::grpc::{Authenticate, authorize, principal};
use crate::auth::{Action, Authorizer, Door, Principal};
use crate::metrics::Metrics;
use crate::serve::stopped;
use crate::write::{FailureKind, WriteError, Written, classify, write_validated};

/// Batches a stream may have in flight (written, not yet acknowledged) at once.
const STREAM_IN_FLIGHT: usize = 8;
/// How long a stream waits for room in a full write buffer before giving up on a batch.
const STREAM_BACKPRESSURE_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct IngestService {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    auth: Arc<Authorizer>,
    /// Permits for write streams open at once (`--grpc-max-streams`).
    streams: Arc<tokio::sync::Semaphore>,
    max_streams: usize,
}

/// The tonic service with every call authenticated.
pub type IngestServer = tonic::service::interceptor::InterceptedService<
    WriteServiceServer<IngestService>,
    Authenticate,
>;

impl IngestService {
    pub fn new(
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        auth: Arc<Authorizer>,
        max_streams: usize,
    ) -> Self {
        Self {
            engine,
            metrics,
            shutdown,
            auth,
            streams: Arc::new(tokio::sync::Semaphore::new(max_streams)),
            max_streams,
        }
    }

    /// The tonic service, accepting gzip and zstd, limiting message size and
    /// authenticating every call.
    pub fn into_server(self, max_message_bytes: usize) -> IngestServer {
        let authenticate = Authenticate::new(Arc::clone(&self.auth), Door::Grpc);
        let server = WriteServiceServer::new(self)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(max_message_bytes);
        tonic::service::interceptor::InterceptedService::new(server, authenticate)
    }

    /// `principal` may write `req`'s database.
    fn may_write(&self, principal: &Principal, req: &WriteRequest) -> Result<(), Status> {
        authorize(
            &self.auth,
            Door::Grpc,
            principal,
            Action::Write(&req.database),
        )
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn write_one(&self, req: &WriteRequest) -> Result<Written, WriteError> {
        if self.shutting_down() {
            return Err(WriteError::Engine(
                kiln_storage::engine::Error::ShuttingDown,
            ));
        }
        if req.database.is_empty() {
            return Err(WriteError::Invalid("missing database".into()));
        }
        let db = req.database.as_str();
        let payload = req.payload.as_ref().ok_or_else(|| {
            WriteError::Invalid("the request has no payload (rows, arrow or line_protocol)".into())
        })?;
        let default_time = kiln_ingest::write::now_nanos();
        let precision = match payload {
            write_request::Payload::LineProtocol(lp) if !lp.precision.is_empty() => lp
                .precision
                .parse::<Precision>()
                .map_err(WriteError::Invalid)?,
            _ => Precision::Nanoseconds,
        };
        write_validated(
            &self.engine,
            &self.metrics,
            db,
            req.accept_partial,
            |catalog| match payload {
                write_request::Payload::LineProtocol(lp) => Ok(validate_lines(
                    &lp.text,
                    db,
                    catalog,
                    precision,
                    default_time,
                )),
                write_request::Payload::Rows(rows) => Ok(validate_rows(rows, db, catalog)),
                write_request::Payload::Arrow(a) => validate_arrow(
                    db,
                    catalog,
                    &a.table,
                    a.ipc_stream.clone().into(),
                    &a.tag_columns,
                )
                .map_err(|e| e.0),
            },
        )
        .await
    }

    /// Writes one batch of a stream, waiting while the buffer is full, and builds its ack.
    async fn write_for_stream(self, principal: Principal, req: WriteRequest) -> WriteAck {
        let batch_id = req.batch_id;
        if let Err(refused) = self.may_write(&principal, &req) {
            return failed_ack(batch_id, &refused, Vec::new());
        }
        let started = Instant::now();
        let mut waited = false;
        let result = loop {
            while self.engine.buffer_full()
                && !self.shutting_down()
                && started.elapsed() < STREAM_BACKPRESSURE_WAIT
            {
                if !waited {
                    self.metrics.stream_backpressure_waits.inc();
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match self.write_one(&req).await {
                // Another batch filled the buffer first: pause again.
                Err(WriteError::Engine(kiln_storage::engine::Error::BufferFull { .. }))
                    if started.elapsed() < STREAM_BACKPRESSURE_WAIT && !self.shutting_down() => {}
                other => break other,
            }
        };
        match result {
            Ok(w) => WriteAck {
                batch_id,
                durable: true,
                rows_written: w.rows as u64,
                errors: row_errors(&w.rejected),
                code: 0,
                message: String::new(),
            },
            Err(e) => {
                let errors = match &e {
                    WriteError::Rejected { rejected, .. } => row_errors(rejected),
                    _ => Vec::new(),
                };
                failed_ack(batch_id, &status_of(e), errors)
            }
        }
    }
}

fn failed_ack(batch_id: u64, status: &Status, errors: Vec<RowError>) -> WriteAck {
    WriteAck {
        batch_id,
        durable: false,
        rows_written: 0,
        errors,
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

fn row_errors(errors: &[LineError]) -> Vec<RowError> {
    errors
        .iter()
        .map(|e| RowError {
            row: e.line as u64,
            column: e.column as u32,
            message: e.message.clone(),
        })
        .collect()
}

/// Maps a write failure to a gRPC status; rejected rows travel as an encoded
/// `WriteResponse` in the status details.
fn status_of(e: WriteError) -> Status {
    match e {
        WriteError::Rejected { message, rejected } => {
            let details = WriteResponse {
                batch_id: 0,
                rows_written: 0,
                errors: row_errors(&rejected),
            }
            .encode_to_vec();
            let mut text = message;
            for r in rejected.iter().skip(1).take(20) {
                text.push_str(&format!("; {r}"));
            }
            Status::with_details(tonic::Code::InvalidArgument, text, details.into())
        }
        WriteError::Invalid(m) => Status::invalid_argument(m),
        WriteError::Engine(e) => {
            let (kind, message) = classify(&e);
            match kind {
                FailureKind::Invalid => Status::invalid_argument(message),
                FailureKind::Retry => Status::resource_exhausted(message),
                FailureKind::Unavailable => Status::unavailable(message),
                FailureKind::NotHere => Status::failed_precondition(message),
                FailureKind::Internal => Status::internal(message),
            }
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<WriteAck, Status>> + Send>>;

#[tonic::async_trait]
impl WriteService for IngestService {
    async fn write(
        &self,
        request: Request<WriteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.into_inner();
        self.may_write(&principal, &req)?;
        let batch_id = req.batch_id;
        let written = self.write_one(&req).await.map_err(status_of)?;
        Ok(Response::new(WriteResponse {
            batch_id,
            rows_written: written.rows as u64,
            errors: row_errors(&written.rejected),
        }))
    }

    type WriteStreamStream = AckStream;

    async fn write_stream(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<Self::WriteStreamStream>, Status> {
        if self.shutting_down() {
            return Err(Status::unavailable("the server is shutting down"));
        }
        let principal = principal(&request)?;
        // Each stream may hold STREAM_IN_FLIGHT messages: bound how many streams there are.
        let Ok(permit) = Arc::clone(&self.streams).try_acquire_owned() else {
            self.metrics.refused(crate::metrics::limit::GRPC_STREAMS);
            return Err(Status::resource_exhausted(format!(
                "the server has as many write streams open as it serves at once \
                 ({}, --grpc-max-streams); retry later or send unary writes",
                self.max_streams
            )));
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT * 2);
        let svc = self.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut in_flight = FuturesOrdered::new();
            let mut reading = true;
            let mut end: Option<Status> = None;
            loop {
                tokio::select! {
                    next = inbound.message(), if reading && in_flight.len() < STREAM_IN_FLIGHT => match next {
                        Ok(Some(req)) => in_flight.push_back(svc.clone().write_for_stream(principal.clone(), req)),
                        Ok(None) => reading = false,
                        Err(status) => {
                            reading = false;
                            end = Some(status);
                        }
                    },
                    Some(ack) = in_flight.next(), if !in_flight.is_empty() => {
                        if tx.send(Ok(ack)).await.is_err() {
                            return; // the client went away; its batches still complete
                        }
                    }
                    _ = stopped(shutdown.clone()), if reading => {
                        reading = false;
                        end = Some(Status::unavailable("the server is shutting down; reconnect and resend unacknowledged batches"));
                    }
                }
                if !reading && in_flight.is_empty() {
                    break;
                }
            }
            if let Some(status) = end {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

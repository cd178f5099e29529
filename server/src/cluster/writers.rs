//! A querier's side: asks every server of `--ingesters` for a table's rows it has not
//! persisted, all at once, at each scan (see `kiln_query::cluster`).

use std::path::Path;
use std::time::Duration;

use arrow_flight::FlightClient;
use arrow_flight::flight_service_client::FlightServiceClient;
use futures::TryStreamExt;
use kiln_proto::internal::v1::BufferRequest;
use kiln_query::cluster::{WriterError, WriterRows, Writers};
use kiln_storage::ids::CatalogSequence;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;
use tracing::field::Empty;

use super::{CATALOG_SEQUENCE_HEADER, ClusterArgs, buffer};

/// How long a querier waits to connect to a writer before the query fails naming it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest Flight message a writer's answer may hold (a batch is cut to about 2 MiB).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The writers of `--ingesters`, each reached over one lazily connected channel.
#[derive(Debug)]
pub struct FlightWriters {
    writers: Vec<(String, Channel)>,
    /// `Bearer …`, when the writers enforce tokens.
    authorization: Option<String>,
}

impl FlightWriters {
    /// The writers `args` lists (`None` if it lists none). `admin_token` is the server's
    /// own (`--admin-token-file`), presented unless `--ingester-token-file` gives another.
    pub fn new(args: &ClusterArgs, admin_token: Option<&str>) -> Result<Option<Self>, String> {
        if args.ingesters.is_empty() {
            return Ok(None);
        }
        let token = match &args.ingester_token_file {
            Some(path) => Some(read_token(path)?),
            None => admin_token.map(str::to_owned),
        };
        let tls = match &args.ingester_tls_ca {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("cannot read --ingester-tls-ca {}: {e}", ca.display()))?;
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tonic::transport::ClientTlsConfig::new().with_enabled_roots(),
        };
        let mut writers = Vec::new();
        for address in &args.ingesters {
            let address = address.trim().trim_end_matches('/').to_owned();
            let mut endpoint = Endpoint::from_shared(address.clone())
                .map_err(|e| format!("--ingesters: {address:?} is not a URL: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            if address.starts_with("https://") {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| format!("--ingesters: TLS for {address}: {e}"))?;
            }
            writers.push((address, endpoint.connect_lazy()));
        }
        Ok(Some(Self {
            writers,
            authorization: token.map(|t| format!("Bearer {t}")),
        }))
    }

    /// One writer's answer.
    async fn ask(
        &self,
        channel: Channel,
        request: &BufferRequest,
    ) -> Result<WriterRows, Box<dyn std::error::Error + Send + Sync>> {
        let inner = FlightServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut client = FlightClient::new_from_inner(inner);
        if let Some(authorization) = &self.authorization {
            client.add_header("authorization", authorization)?;
        }
        // The writer's spans join the query's trace.
        for (name, value) in crate::telemetry::trace_headers() {
            client.add_header(&name, &value)?;
        }
        let stream = client.do_get(buffer::ticket(request)).await?;
        let sequence = stream
            .headers()
            .get(CATALOG_SEQUENCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(CatalogSequence)
            .ok_or("the answer has no catalog sequence header (a server of another version?)")?;
        let batches = stream.try_collect().await?;
        Ok(WriterRows {
            catalog_sequence: sequence,
            batches,
        })
    }
}

#[async_trait::async_trait]
impl Writers for FlightWriters {
    async fn unpersisted(
        &self,
        database: &str,
        table: &str,
        min_time: i64,
        max_time: i64,
    ) -> Vec<Result<WriterRows, WriterError>> {
        let request = BufferRequest {
            database: database.to_owned(),
            table: table.to_owned(),
            min_time,
            max_time,
        };
        let asks = self.writers.iter().map(|(address, channel)| {
            let request = &request;
            let span = tracing::debug_span!(
                "writer",
                otel.kind = "client",
                server.address = %address,
                rows = Empty,
            );
            async move {
                let answer = self.ask(channel.clone(), request).await;
                if let Ok(rows) = &answer {
                    let rows: usize = rows.batches.iter().map(|b| b.num_rows()).sum();
                    tracing::Span::current().record("rows", rows);
                }
                answer.map_err(|source| WriterError {
                    writer: address.clone(),
                    source,
                })
            }
            .instrument(span)
        });
        futures::future::join_all(asks).await
    }
}

/// The token in `path` (trimmed), which must not be empty.
fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --ingester-token-file {}: {e}", path.display()))?;
    match text.trim() {
        "" => Err(format!("--ingester-token-file {} is empty", path.display())),
        token => Ok(token.to_owned()),
    }
}

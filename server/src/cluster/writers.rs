//! A querier's side: asks every ingester that joined the catalog, and every server of
//! `--ingesters`, for a table's rows it has not persisted, all at once, at each scan (see
//! `kiln_query::cluster`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use arrow_flight::FlightClient;
use arrow_flight::flight_service_client::FlightServiceClient;
use futures::TryStreamExt;
use kiln_proto::internal::v1::BufferRequest;
use kiln_query::cluster::{WriterError, WriterRows, Writers};
use kiln_storage::catalog::ingesters::Ingester;
use kiln_storage::ids::CatalogSequence;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::Instrument;
use tracing::field::Empty;

use super::{CATALOG_SEQUENCE_HEADER, ClusterArgs, buffer};

/// How long a querier waits to connect to a writer before the query fails naming it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest Flight message a writer's answer may hold (a batch is cut to about 2 MiB).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A querier's writers: the catalog's joined ingesters and the servers of `--ingesters`,
/// each reached over one lazily connected channel.
#[derive(Debug)]
pub struct FlightWriters {
    /// The addresses of `--ingesters`.
    listed: Vec<String>,
    /// For `https://` writers.
    tls: ClientTlsConfig,
    /// A channel per address asked, kept while the address is a writer's.
    channels: Mutex<HashMap<String, Channel>>,
    /// `Bearer …`, when the writers enforce tokens.
    authorization: Option<String>,
}

/// A writer to ask: its name if it joined the catalog, its address, and the channel to it
/// (or why there is none).
struct Target<'a> {
    name: Option<&'a str>,
    address: String,
    channel: Result<Channel, String>,
}

impl FlightWriters {
    /// A querier's writers, with the servers `args` lists. `admin_token` is the server's
    /// own (`--admin-token-file`), presented unless `--ingester-token-file` gives another.
    pub fn new(args: &ClusterArgs, admin_token: Option<&str>) -> Result<Self, String> {
        let token = match &args.ingester_token_file {
            Some(path) => Some(read_token(path)?),
            None => admin_token.map(str::to_owned),
        };
        let tls = crate::tls::grpc_client(args.ingester_tls_ca.as_deref(), "--ingester-tls-ca")?;
        let listed: Vec<String> = args.ingesters.iter().map(|a| normalize(a)).collect();
        let mut channels = HashMap::new();
        for address in &listed {
            let channel = connect(address, &tls).map_err(|e| format!("--ingesters: {e}"))?;
            channels.insert(address.clone(), channel);
        }
        Ok(Self {
            listed,
            tls,
            channels: Mutex::new(channels),
            authorization: token.map(|t| format!("Bearer {t}")),
        })
    }

    /// The writers to ask: every joined ingester, then the listed servers that are not
    /// one of them, each with its channel (made on first use). Channels of addresses no
    /// longer asked are dropped.
    fn targets<'a>(&self, joined: &'a BTreeMap<String, Ingester>) -> Vec<Target<'a>> {
        let mut named: Vec<(Option<&'a str>, String)> = joined
            .iter()
            .map(|(name, ingester)| (Some(name.as_str()), normalize(&ingester.address)))
            .collect();
        for address in &self.listed {
            if !named.iter().any(|(_, a)| a == address) {
                named.push((None, address.clone()));
            }
        }
        let mut channels = self.channels.lock().expect("channel map poisoned");
        channels.retain(|address, _| named.iter().any(|(_, a)| a == address));
        named
            .into_iter()
            .map(|(name, address)| {
                let channel = match channels.get(&address) {
                    Some(channel) => Ok(channel.clone()),
                    None => connect(&address, &self.tls).inspect(|channel| {
                        channels.insert(address.clone(), channel.clone());
                    }),
                };
                Target {
                    name,
                    address,
                    channel,
                }
            })
            .collect()
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
        joined: &BTreeMap<String, Ingester>,
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
        let asks = self.targets(joined).into_iter().map(|target| {
            let request = &request;
            let span = tracing::debug_span!(
                "writer",
                otel.kind = "client",
                server.address = %target.address,
                kiln.ingester = target.name,
                rows = Empty,
            );
            async move {
                let answer = match target.channel {
                    Ok(channel) => self.ask(channel, request).await,
                    Err(e) => Err(e.into()),
                };
                if let Ok(rows) = &answer {
                    let rows: usize = rows.batches.iter().map(|b| b.num_rows()).sum();
                    tracing::Span::current().record("rows", rows);
                }
                answer.map_err(|source| WriterError {
                    name: target.name.map(str::to_owned),
                    address: target.address,
                    source,
                })
            }
            .instrument(span)
        });
        futures::future::join_all(asks).await
    }
}

/// `address` without surrounding blanks and trailing slashes.
fn normalize(address: &str) -> String {
    address.trim().trim_end_matches('/').to_owned()
}

/// A lazily connected channel to the writer at `address`.
fn connect(address: &str, tls: &ClientTlsConfig) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| format!("{address:?} is not a URL: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if address.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS for {address}: {e}"))?;
    }
    Ok(endpoint.connect_lazy())
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

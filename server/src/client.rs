//! `kiln write`, `kiln query`, `kiln last-cache`, `kiln compact` and `kiln kafka`:
//! command-line clients of a running server.

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `name=value` (a label, an attribute, a tag): the name must not be empty.
pub fn name_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not name=value"))
}

/// `name` as one URL path segment.
pub fn percent_encode(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How to reach a running server.
#[derive(Debug, Clone, Args)]
pub struct ServerOptions {
    /// Base URL of the Kiln server.
    #[arg(long, env = "KILN_HOST", default_value = "http://127.0.0.1:8080")]
    pub host: String,

    /// Token to send (`Authorization: Bearer …`), once the server enforces tokens.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// PEM file of the CA that signed the server's certificate, for `https://` hosts
    /// (the system's roots otherwise).
    #[arg(long, env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl ServerOptions {
    /// A request to `path` (`/api/v3/…`) of the server, with the token.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, String> {
        let url = format!("{}{path}", self.host.trim_end_matches('/'));
        let mut request = http(self.tls_ca.as_deref())?.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        Ok(request)
    }

    /// Sends `request`; a failure status becomes the server's error.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, String> {
        send(request, &self.host).await
    }

    /// Sends `request` and decodes the JSON answer.
    pub async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, String> {
        self.send(request)
            .await?
            .json()
            .await
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Args)]
pub struct ClientOptions {
    #[command(flatten)]
    pub server: ServerOptions,

    /// Database to write to or query.
    #[arg(long, short = 'd', env = "KILN_DATABASE")]
    pub database: String,
}

#[derive(Debug, Clone, Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub client: ClientOptions,

    /// Timestamp precision of the lines: ns, us, ms or s.
    #[arg(long, default_value = "ns")]
    pub precision: String,

    /// Write nothing if any line is invalid (by default valid lines are written).
    #[arg(long)]
    pub reject_all_on_error: bool,

    /// Line protocol file to send; `-` or nothing reads standard input.
    pub file: Option<PathBuf>,

    /// Line protocol given directly on the command line instead of a file.
    #[arg(long, short = 'l', conflicts_with = "file")]
    pub line: Vec<String>,

    /// Send over gRPC (kiln.ingest.v1.WriteService) instead of HTTP.
    #[arg(long)]
    pub grpc: bool,

    /// gRPC address of the Kiln server, with --grpc.
    #[arg(long, env = "KILN_GRPC_HOST", default_value = "http://127.0.0.1:50051")]
    pub grpc_host: String,
}

#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub client: ClientOptions,

    /// Output format: pretty (a table), json, jsonl, csv or parquet.
    #[arg(long, short = 'f', default_value = "pretty")]
    pub format: String,

    /// The SQL query.
    pub sql: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum LastCacheCommand {
    /// Keep the latest row of every series of a table in memory: `last_cache('db',
    /// 'table')` reads it, and "latest row per series" queries use it.
    Create {
        #[command(flatten)]
        client: ClientOptions,
        /// The table.
        #[arg(long, short = 't')]
        table: String,
        /// Tags that identify a series (comma-separated); all the table's tags by default.
        #[arg(long, value_delimiter = ',')]
        key_columns: Vec<String>,
    },
    /// Drop a table's last-value cache.
    Drop {
        #[command(flatten)]
        client: ClientOptions,
        #[arg(long, short = 't')]
        table: String,
    },
}

pub use kiln_storage::error_chain as chain;

/// An HTTP client trusting `ca` (a PEM file) alone if given, the system's roots otherwise.
fn http(ca: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{} holds no PEM certificate: {e}", ca.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| e.to_string())
}

/// A gRPC channel to `host`, over TLS for `https://` (trusting `ca` alone if given).
pub async fn grpc_channel(
    host: &str,
    ca: Option<&std::path::Path>,
) -> Result<tonic::transport::Channel, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(host.to_owned())
        .map_err(|e| format!("invalid gRPC address {host}: {e}"))?;
    if host.starts_with("https://") {
        let tls = crate::tls::grpc_client(ca, "--tls-ca")?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS for {host}: {e}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach {host}: {}", chain(&e)))
}

/// Sends `request` to the server at `host`; a failure status becomes the server's error.
async fn send(request: reqwest::RequestBuilder, host: &str) -> Result<reqwest::Response, String> {
    let resp = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {host}: {}", chain(&e)))?;
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(error_text(resp).await)
    }
}

async fn error_text(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => {
            let mut out = format!("{status}: {}", v["error"].as_str().unwrap_or(&body));
            if let Some(lines) = v["data"].as_array() {
                for l in lines {
                    out.push_str(&format!(
                        "\n  line {}, column {}: {}",
                        l["line_number"],
                        l["column"],
                        l["error_message"].as_str().unwrap_or("")
                    ));
                }
            }
            out
        }
        Err(_) => format!("{status}: {body}"),
    }
}

pub async fn write(args: WriteArgs) -> Result<(), String> {
    let body = if !args.line.is_empty() {
        args.line.join("\n")
    } else {
        let mut text = String::new();
        match args.file.as_deref() {
            None => std::io::stdin().read_to_string(&mut text),
            Some(p) if p.as_os_str() == "-" => std::io::stdin().read_to_string(&mut text),
            Some(p) => std::fs::File::open(p).and_then(|mut f| f.read_to_string(&mut text)),
        }
        .map_err(|e| format!("cannot read input: {e}"))?;
        text
    };
    if args.grpc {
        return write_grpc(&args, body).await;
    }
    let server = &args.client.server;
    let request = server
        .request(reqwest::Method::POST, "/api/v3/write_lp")?
        .query(&[
            ("db", args.client.database.as_str()),
            ("precision", args.precision.as_str()),
            (
                "accept_partial",
                if args.reject_all_on_error {
                    "false"
                } else {
                    "true"
                },
            ),
        ])
        .body(body);
    server.send(request).await.map(drop)
}

async fn write_grpc(args: &WriteArgs, text: String) -> Result<(), String> {
    use kiln_proto::ingest::v1::write_service_client::WriteServiceClient;
    use kiln_proto::ingest::v1::{LineProtocol, WriteRequest, WriteResponse, write_request};
    use prost::Message;

    let channel = grpc_channel(&args.grpc_host, args.client.server.tls_ca.as_deref()).await?;
    let authorization = match &args.client.server.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse::<tonic::metadata::MetadataValue<_>>()
                .map_err(|_| "the token is not a valid header value".to_owned())?,
        ),
        None => None,
    };
    let mut client =
        WriteServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            if let Some(value) = &authorization {
                r.metadata_mut().insert("authorization", value.clone());
            }
            Ok(r)
        });
    let request = WriteRequest {
        batch_id: 0,
        database: args.client.database.clone(),
        payload: Some(write_request::Payload::LineProtocol(LineProtocol {
            text,
            precision: args.precision.clone(),
        })),
        accept_partial: !args.reject_all_on_error,
    };
    let describe = |errors: &[kiln_proto::ingest::v1::RowError]| {
        errors
            .iter()
            .map(|e| format!("\n  line {}, column {}: {}", e.row, e.column, e.message))
            .collect::<String>()
    };
    match client.write(request).await {
        Ok(resp) if resp.get_ref().errors.is_empty() => Ok(()),
        Ok(resp) => {
            let r = resp.into_inner();
            Err(format!(
                "partial write: {} rows written, {} rejected{}",
                r.rows_written,
                r.errors.len(),
                describe(&r.errors)
            ))
        }
        Err(status) => {
            let details = WriteResponse::decode(status.details())
                .map(|r| r.errors)
                .unwrap_or_default();
            let first_line = status.message().split("; ").next().unwrap_or_default();
            if details.is_empty() {
                Err(format!("{:?}: {}", status.code(), status.message()))
            } else {
                Err(format!(
                    "{:?}: {first_line}{}",
                    status.code(),
                    describe(&details)
                ))
            }
        }
    }
}

pub async fn query(args: QueryArgs) -> Result<(), String> {
    let server = &args.client.server;
    let request = server
        .request(reqwest::Method::POST, "/api/v3/query_sql")?
        .json(
            &serde_json::json!({"db": args.client.database, "q": args.sql, "format": args.format}),
        );
    let resp = server.send(request).await?;
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A DELETE's answer is one JSON object: a line of its own.
    let newline: &[u8] =
        if bytes.last().is_some_and(|b| *b != b'\n') && bytes.first() == Some(&b'{') {
            b"\n"
        } else {
            b""
        };
    out.write_all(&bytes)
        .and_then(|()| out.write_all(newline))
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())
}

const LAST_CACHE_PATH: &str = "/api/v3/configure/last_cache";

pub async fn last_cache(command: LastCacheCommand) -> Result<(), String> {
    let (client, request) = match &command {
        LastCacheCommand::Create {
            client,
            table,
            key_columns,
        } => {
            let mut body = serde_json::json!({"db": client.database, "table": table});
            if !key_columns.is_empty() {
                body["key_columns"] = serde_json::json!(key_columns);
            }
            let request = client
                .server
                .request(reqwest::Method::POST, LAST_CACHE_PATH)?
                .json(&body);
            (client, request)
        }
        LastCacheCommand::Drop { client, table } => {
            let query = [("db", client.database.as_str()), ("table", table.as_str())];
            let request = client
                .server
                .request(reqwest::Method::DELETE, LAST_CACHE_PATH)?
                .query(&query);
            (client, request)
        }
    };
    let resp = client.server.send(request).await?;
    match command {
        LastCacheCommand::Create { table, .. } => {
            let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
            println!(
                "last-value cache of {table} created, keyed by {}",
                v["key_columns"]
            );
        }
        LastCacheCommand::Drop { table, .. } => println!("last-value cache of {table} dropped"),
    }
    Ok(())
}

#[derive(Debug, Clone, Subcommand)]
pub enum KafkaCommand {
    /// Show every Kafka source of a running server: per partition, Kiln's durable
    /// position, the high watermark, the lag between them, and counts.
    Status {
        #[command(flatten)]
        server: ServerOptions,
    },
}

/// Asks a running server to compact now and prints what it did.
pub async fn compact(server: ServerOptions) -> Result<(), String> {
    let request = server.request(reqwest::Method::POST, "/api/v3/compact")?;
    let resp = server.send(request).await?;
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    let count = |key: &str| v[key].as_u64().unwrap_or(0);
    let partitions = |n: u64| match n {
        1 => "1 partition".to_string(),
        n => format!("{n} partitions"),
    };
    println!(
        "compacted {}: {} segments ({} bytes) merged into {} ({} bytes, {} rows)",
        partitions(count("partitions")),
        count("segments_replaced"),
        count("bytes_before"),
        count("partitions"),
        count("bytes_after"),
        count("rows")
    );
    if count("skipped_too_large") > 0 {
        println!(
            "left {} larger than --compaction-max-bytes as they are",
            partitions(count("skipped_too_large"))
        );
    }
    Ok(())
}

pub async fn kafka(command: KafkaCommand) -> Result<(), String> {
    let KafkaCommand::Status { server } = command;
    let request = server.request(reqwest::Method::GET, "/api/v3/kafka")?;
    let resp = server.send(request).await?;
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    let sources = v["sources"].as_array().cloned().unwrap_or_default();
    if sources.is_empty() {
        println!("no Kafka sources (see `kiln serve --help`, --kafka-*)");
        return Ok(());
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_f64() => format!("{:.0}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    };
    let header = [
        "topic",
        "partition",
        "assigned",
        "position",
        "high",
        "lag",
        "messages",
        "rows",
        "dead-lettered",
        "msg/s",
    ];
    for s in sources {
        println!(
            "source: group {} -> database {}{}{}",
            text(&s["group"]),
            text(&s["database"]),
            if s["paused"] == true {
                " (paused: write buffer full)"
            } else {
                ""
            },
            match s["dead_letter_failures"].as_u64() {
                Some(n) if n > 0 => format!(", {n} messages could not be dead-lettered"),
                _ => String::new(),
            }
        );
        let rows: Vec<Vec<String>> = s["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                [
                    "topic",
                    "partition",
                    "assigned",
                    "position",
                    "high_watermark",
                    "lag",
                    "messages",
                    "rows",
                    "dead_lettered",
                    "messages_per_second",
                ]
                .iter()
                .map(|k| text(&p[*k]))
                .collect()
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{}", line(&header.map(String::from)));
        for r in &rows {
            println!("{}", line(r));
        }
    }
    Ok(())
}

/// `kiln probe`: asks a server's `/health` (or `/ready`) and exits 0 only on 200, for a
/// container's `HEALTHCHECK` or a probe that has no shell or curl to run.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Base URL of the server. By default the server of this container or machine:
    /// loopback at the port of `KILN_HTTP_BIND` (8080 without it), `https://` when
    /// `KILN_TLS_CERT` is set (its certificate then goes unverified: it names the
    /// service, not loopback).
    #[arg(long)]
    pub host: Option<String>,
    /// PEM file of the CA that signed the server's certificate, for an `https://` host.
    #[arg(long, env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Ask `/ready` (accepting writes) instead of `/health` (the process answers).
    #[arg(long)]
    pub ready: bool,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Skip verifying the server's certificate.
    #[arg(long)]
    pub insecure: bool,
}

/// The server `kiln serve` would run here, from its own variables: (URL, whether TLS
/// is on).
fn own_server() -> (String, bool) {
    let port = std::env::var("KILN_HTTP_BIND")
        .ok()
        .and_then(|bind| bind.parse::<std::net::SocketAddr>().ok())
        .map_or(8080, |addr| addr.port());
    let tls = std::env::var_os("KILN_TLS_CERT").is_some_and(|v| !v.is_empty());
    let scheme = if tls { "https" } else { "http" };
    (format!("{scheme}://127.0.0.1:{port}"), tls)
}

pub async fn probe(args: ProbeArgs) -> Result<(), String> {
    let path = if args.ready { "/ready" } else { "/health" };
    let (host, insecure) = match args.host {
        Some(host) => (host, args.insecure),
        None => {
            let (host, tls) = own_server();
            (host, args.insecure || tls)
        }
    };
    let mut builder = reqwest::Client::builder().timeout(args.timeout);
    if host.starts_with("http://") {
        // No certificate to verify: the probe works in an image without a CA bundle.
        builder = builder.tls_certs_only([]);
    } else if insecure {
        builder = builder.tls_danger_accept_invalid_certs(true);
    } else if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{} holds no PEM certificate: {e}", ca.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let url = format!("{}{path}", host.trim_end_matches('/'));
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {}", chain(&e)))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status.is_success() {
        println!("{url}: {}", body.trim());
        Ok(())
    } else {
        Err(format!("{url}: {status}: {}", body.trim()))
    }
}

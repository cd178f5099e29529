//! Servers of a cluster talking to each other (see `docs/cluster.md`):
//!
//! ```text
//!   querier ── DoGet(kiln.internal.v1.BufferRequest), admin token ──▶ ingester (or all)
//!      ▲                                                                  │
//!      └──────── the table's unpersisted rows, header kiln-catalog-sequence ┘
//! ```
//!
//! - [`buffer`]: a writer's side, the Flight ticket that sends a table's rows it has not
//!   persisted.
//! - [`membership`]: an ingester joining the catalog (`--advertise-address`) and leaving
//!   it after a clean stop.
//! - [`writers`]: a querier's side, asking every joined ingester and every writer of
//!   `--ingesters` at each scan (`kiln_query::cluster`).

pub mod buffer;
pub mod membership;
pub mod writers;

use std::path::PathBuf;

/// The response header that carries a writer's catalog sequence.
pub const CATALOG_SEQUENCE_HEADER: &str = "kiln-catalog-sequence";

/// A server's place in a cluster: its name, and how a querier reaches the servers that
/// take writes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// This server's name in a cluster (--role ingester, required, or compactor): unique
    /// among the servers that write, and the same across restarts (a StatefulSet pod's
    /// name). Its segment files and its own objects in the store carry it.
    #[arg(long, env = "KILN_NODE_NAME")]
    pub node_name: Option<String>,

    /// On an ingester: the gRPC address queriers reach it at
    /// (`http://kiln-ingester-0.kiln-ingester:50051`). The ingester joins the shared
    /// catalog with it before taking writes, and leaves after a clean stop that persisted
    /// every row; queriers ask every ingester that joined.
    #[arg(long, env = "KILN_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// On a querier: the gRPC addresses of servers that take writes and do not join the
    /// catalog (`http://writer-0:50051`, comma separated), such as a server of role all.
    /// Each query asks every one, and every ingester that joined, for the rows it has not
    /// persisted yet.
    #[arg(long, env = "KILN_INGESTERS", value_delimiter = ',')]
    pub ingesters: Vec<String>,

    /// File holding the admin token a querier presents to the ingesters and --ingesters
    /// (default: the one of --admin-token-file). Not needed when they run --without-auth.
    #[arg(long, env = "KILN_INGESTER_TOKEN_FILE")]
    pub ingester_token_file: Option<PathBuf>,

    /// PEM file of the CA that signed the certificates of `https://` ingesters and
    /// --ingesters (the public roots otherwise).
    #[arg(long, env = "KILN_INGESTER_TLS_CA")]
    pub ingester_tls_ca: Option<PathBuf>,
}

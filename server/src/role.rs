//! What a `kiln serve` process does (`--role`).
//!
//! - `all` (the default): the single node. It takes writes into its WAL, persists,
//!   compacts, applies retention, refreshes views and evaluates alert rules.
//! - `ingester`: one of several servers that take writes (HTTP, gRPC, Kafka, MQTT) into a
//!   WAL of their own and persist to one shared object store and catalog, each under its
//!   `--node-name`. It neither compacts nor applies retention, refreshes no view and
//!   evaluates no alert rule.
//! - `compactor`: the one server that merges and expires what the ingesters persist. It
//!   takes no writes.
//! - `querier`: it only answers queries, over the catalog and segments the others write to
//!   a shared object store, and over the rows the servers of `--ingesters` have not
//!   persisted. It follows the catalog's log every second and changes nothing: writes and
//!   every request that would change the catalog are refused, and it never deletes a file
//!   of the store. Its data directory holds only the segment cache, so any number can run
//!   side by side.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use kiln_query::QueryEngine;
use kiln_storage::Engine;
use tokio::task::JoinHandle;

use crate::serve::{ServeConfig, stopped};
use crate::store::StoreKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The single node: writes, persistence, compaction, retention, views and alerts.
    All,
    /// Takes writes and persists them, one of several writing one shared object store.
    Ingester,
    /// Queries only, over what the others persist to a shared object store and what
    /// `--ingesters` hold.
    Querier,
    /// Compaction and retention of what ingesters persist; the only one of a cluster.
    Compactor,
}

/// How often a querier looks for new catalog entries.
pub(crate) const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// What a querier tells a client that asked it to change something.
const NOT_HERE: &str = "this server only answers queries (--role querier): send writes and \
                        changes to the server that writes the catalog";

/// What a compactor tells a client that asked it to write.
const NOT_A_WRITER: &str = "this server takes no writes (--role compactor): send writes to \
                            the ingesters";

/// The name a compactor goes by unless --node-name gives another.
const COMPACTOR_NAME: &str = "compactor";

impl Role {
    /// Refuses settings the role cannot honour.
    pub fn check(self, config: &ServeConfig, kafka: usize, mqtt: usize) -> Result<(), String> {
        crate::cluster::membership::check(self, &config.cluster)?;
        if self != Self::Querier && !config.cluster.ingesters.is_empty() {
            return Err(
                "--ingesters lists the servers a querier asks for rows not yet \
                        persisted: give it to servers of --role querier"
                    .into(),
            );
        }
        if self == Self::All {
            return Ok(());
        }
        if config.store.object_store == StoreKind::File {
            return Err(format!(
                "--role {} works on what several servers share in an object store: give it \
                 --object-store s3|gcs|azure with the bucket and prefix of the cluster",
                self.name()
            ));
        }
        if matches!(self, Self::Querier | Self::Compactor) && kafka + mqtt > 0 {
            return Err(format!(
                "--role {} takes no writes: Kafka and MQTT sources belong on the servers \
                 that take writes (--role ingester, or all)",
                self.name()
            ));
        }
        self.writer(config.cluster.node_name.as_deref())?;
        Ok(())
    }

    /// The name this role writes the catalog under when several servers write it (see
    /// `EngineConfig::writer`): an ingester's own, required, or the compactor's.
    pub fn writer(self, node_name: Option<&str>) -> Result<Option<String>, String> {
        let name = match (self, node_name) {
            (Self::All | Self::Querier, _) => return Ok(None),
            (Self::Compactor, None) => COMPACTOR_NAME,
            (Self::Ingester, None) => {
                return Err(
                    "--role ingester needs --node-name (KILN_NODE_NAME): a name of its \
                            own among the cluster's servers that stays the same across restarts, \
                            such as its StatefulSet pod's"
                        .into(),
                );
            }
            (_, Some(name)) => name,
        };
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        match valid {
            true => Ok(Some(name.to_owned())),
            false => Err(format!(
                "--node-name {name:?} is not a name: 1 to 63 lower-case letters, digits and \
                 dashes"
            )),
        }
    }

    /// Whether this role only reads the catalog and segments others write.
    pub fn read_only(self) -> bool {
        self == Self::Querier
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Ingester => "ingester",
            Self::Querier => "querier",
            Self::Compactor => "compactor",
        }
    }

    /// Whether this role takes writes (a compactor commits compactions, but takes none).
    pub fn takes_writes(self) -> bool {
        matches!(self, Self::All | Self::Ingester)
    }

    /// Whether this role evaluates alert rules and refreshes views (the single node's
    /// work; a cluster does neither yet).
    pub fn evaluates(self) -> bool {
        self == Self::All
    }

    /// The HTTP API as this role serves it: a querier's refuses changes up front
    /// ([`refuse_changes`]); the single node's is left as it is, with nothing added to its
    /// write path.
    pub fn http_api(self, router: axum::Router) -> axum::Router {
        match self {
            Self::All | Self::Ingester => router,
            Self::Querier => router.layer(axum::middleware::from_fn(refuse_changes)),
            Self::Compactor => router.layer(axum::middleware::from_fn(refuse_writes)),
        }
    }

    /// Starts the role's background work: persistence, compaction with retention, and view
    /// refreshes for `all`; following the catalog for a querier. The handles end once
    /// `stop` turns true.
    pub fn start_background(
        self,
        engine: &Arc<Engine>,
        query: &QueryEngine,
        config: &ServeConfig,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        match self {
            Self::All => vec![
                tokio::spawn(Arc::clone(engine).run_persister(stopped(stop.clone()))),
                tokio::spawn(Arc::clone(engine).run_compactor(
                    Some(config.compaction_interval).filter(|t| !t.is_zero()),
                    config.retention_check_interval,
                    stopped(stop.clone()),
                )),
                tokio::spawn(kiln_query::views::run_refresher(
                    query.clone(),
                    config.view_refresh_interval,
                    stopped(stop.clone()),
                )),
            ],
            Self::Ingester => vec![
                tokio::spawn(Arc::clone(engine).run_persister(stopped(stop.clone()))),
                tokio::spawn(Arc::clone(engine).run_follower(FOLLOW_EVERY, stopped(stop.clone()))),
            ],
            Self::Compactor => vec![
                tokio::spawn(Arc::clone(engine).run_follower(FOLLOW_EVERY, stopped(stop.clone()))),
                tokio::spawn(Arc::clone(engine).run_compactor(
                    Some(config.compaction_interval).filter(|t| !t.is_zero()),
                    config.retention_check_interval,
                    stopped(stop.clone()),
                )),
            ],
            Self::Querier => vec![tokio::spawn(
                Arc::clone(engine).run_follower(FOLLOW_EVERY, stopped(stop.clone())),
            )],
        }
    }
}

/// Refuses with 403 every HTTP request that could change something: all but reads and SQL
/// queries. The engine and the catalog of a querier refuse such changes too; this answers
/// them before any work, the same way for every endpoint.
async fn refuse_changes(request: Request, next: Next) -> Response {
    let reads = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !reads && request.uri().path() != "/api/v3/query_sql" {
        return crate::http::error_response(StatusCode::FORBIDDEN, NOT_HERE);
    }
    next.run(request).await
}

/// Refuses with 403 the HTTP writes (line protocol in every dialect): a compactor takes
/// none, and its engine refuses them too.
async fn refuse_writes(request: Request, next: Next) -> Response {
    if matches!(
        request.uri().path(),
        "/api/v3/write_lp" | "/api/v2/write" | "/write"
    ) {
        return crate::http::error_response(StatusCode::FORBIDDEN, NOT_A_WRITER);
    }
    next.run(request).await
}

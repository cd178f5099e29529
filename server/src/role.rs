//! What a `kiln serve` process does (`--role`).
//!
//! - `all` (the default): the single node. It takes writes into its WAL, persists,
//!   compacts, applies retention, refreshes views and evaluates alert rules.
//! - `querier`: it only answers queries, over the catalog and segments another server
//!   (`all`) writes to a shared object store. It follows the catalog's log every second
//!   and changes nothing: writes and every request that would change the catalog are
//!   refused, and it never deletes a file of the store. Its data directory holds only the
//!   segment cache, so any number can run side by side.

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
    /// Queries only, over what a server of role `all` persisted to a shared object store.
    Querier,
}

/// How often a querier looks for new catalog entries.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// What a querier tells a client that asked it to change something.
const NOT_HERE: &str = "this server only answers queries (--role querier): send writes and \
                        changes to the server that writes the catalog";

impl Role {
    /// Refuses settings the role cannot honour.
    pub fn check(self, config: &ServeConfig, kafka: usize, mqtt: usize) -> Result<(), String> {
        if self == Self::All {
            if !config.cluster.ingesters.is_empty() {
                return Err(
                    "--ingesters lists the servers a querier asks for rows not yet \
                            persisted: give it to servers of --role querier"
                        .into(),
                );
            }
            return Ok(());
        }
        if config.store.object_store == StoreKind::File {
            return Err(
                "--role querier reads what another server writes to a shared object store: \
                 give it --object-store s3|gcs|azure with that server's bucket and prefix"
                    .into(),
            );
        }
        if kafka + mqtt > 0 {
            return Err(
                "--role querier takes no writes: Kafka and MQTT sources belong on the \
                        server that writes (--role all)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether this role only reads the catalog and segments others write.
    pub fn read_only(self) -> bool {
        self == Self::Querier
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Querier => "querier",
        }
    }

    /// The HTTP API as this role serves it: a querier's refuses changes up front
    /// ([`refuse_changes`]); the single node's is left as it is, with nothing added to its
    /// write path.
    pub fn http_api(self, router: axum::Router) -> axum::Router {
        match self.read_only() {
            true => router.layer(axum::middleware::from_fn(refuse_changes)),
            false => router,
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

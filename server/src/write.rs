//! Metrics and error classes around the shared write path ([`kiln_ingest::write`]).

use kiln_ingest::line_protocol::ValidatedLines;
pub use kiln_ingest::write::{WriteError, Written};
use kiln_storage::Engine;
use kiln_storage::catalog::{self, CatalogState};

use crate::metrics::Metrics;

/// What a client should do about an engine failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Fix the request.
    Invalid,
    /// Retry the same request later (the write buffer is full).
    Retry,
    /// The server does not take writes now (shutting down, WAL poisoned).
    Unavailable,
    /// This server never takes writes (a querier): send them to another.
    NotHere,
    /// Kiln failed; the detail is in the server log.
    Internal,
}

/// Sorts an engine error for the protocol edges, with the message a client may see.
/// Details a client can't act on are logged here and left out of the message.
pub fn classify(e: &kiln_storage::engine::Error) -> (FailureKind, String) {
    use kiln_storage::engine::Error as E;
    match e {
        E::BufferFull { .. } => (FailureKind::Retry, e.to_string()),
        E::ShuttingDown | E::Wal(kiln_storage::wal::Error::Closed) => (
            FailureKind::Unavailable,
            "the server is shutting down".into(),
        ),
        E::Wal(kiln_storage::wal::Error::Poisoned) => {
            tracing::error!(error = %kiln_storage::error_chain(e), "write refused");
            (
                FailureKind::Unavailable,
                "the write-ahead log failed to sync earlier and refuses writes; see the server log"
                    .into(),
            )
        }
        E::ReadOnly | E::TakesNoWrites | E::Catalog(catalog::Error::ReadOnly) => {
            (FailureKind::NotHere, e.to_string())
        }
        E::Catalog(catalog::Error::InvalidName { .. } | catalog::Error::LimitExceeded(_)) => {
            (FailureKind::Invalid, e.to_string())
        }
        E::InvalidWrite(_) => (FailureKind::Invalid, kiln_storage::error_chain(e)),
        _ => {
            tracing::error!(error = %kiln_storage::error_chain(e), "write failed");
            (
                FailureKind::Internal,
                "internal error while writing; see the server log".into(),
            )
        }
    }
}

/// Validates with `validate` against the current catalog, extends the schema if needed
/// (validating again if a concurrent writer changed it first), and writes durably.
/// Accepted and rejected rows are counted in `metrics`.
pub async fn write_validated(
    engine: &Engine,
    metrics: &Metrics,
    db: &str,
    accept_partial: bool,
    mut validate: impl FnMut(&CatalogState) -> Result<ValidatedLines, String>,
) -> Result<Written, WriteError> {
    let mut rejected_by_table = std::collections::BTreeMap::new();
    let mut expired = 0;
    let validate = |state: &CatalogState| {
        let validated = validate(state)?;
        rejected_by_table.clone_from(&validated.rejected_by_table);
        expired = validated.expired_lines;
        Ok(validated)
    };
    let written = kiln_ingest::write::write(engine, db, accept_partial, Vec::new(), validate).await;
    // Per-table data quality (`system.data_quality`): tables that exist.
    let state = engine.catalog_state();
    for (table, lines) in rejected_by_table {
        if let Some(def) = state.table(db, &table) {
            engine.series().reject(def.id, lines);
        }
    }
    metrics.expired_lines.inc_by(expired);
    match &written {
        Ok(w) => {
            metrics.ingest_lines.inc_by(w.rows as u64);
            metrics.rejected_lines.inc_by(w.rejected.len() as u64);
        }
        Err(WriteError::Rejected { rejected, .. }) => {
            metrics.rejected_lines.inc_by(rejected.len() as u64);
        }
        Err(_) => {}
    }
    written
}

//! The write path every protocol shares: validate against the catalog, add what the
//! schema lacks, append to the WAL, apply to the buffer.

use kiln_ingest::line_protocol::{LineError, ValidatedLines};
use kiln_storage::Engine;
use kiln_storage::catalog::{self, CatalogState};
use kiln_storage::write::{TableWrite, WriteBatch};

use crate::metrics::Metrics;

/// What was written.
#[derive(Debug, Default)]
pub struct Written {
    pub rows: usize,
    /// Rows rejected while the others were written (partial writes only).
    pub rejected: Vec<LineError>,
}

#[derive(Debug)]
pub enum WriteError {
    /// Nothing was written because of these rows.
    Rejected {
        message: String,
        rejected: Vec<LineError>,
    },
    /// The request as a whole is invalid (bad name, columnar type conflict, …).
    Invalid(String),
    /// The engine refused or failed.
    Engine(kiln_storage::engine::Error),
}

/// What a client should do about an engine failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Fix the request.
    Invalid,
    /// Retry the same request later (the write buffer is full).
    Retry,
    /// The server does not take writes now (shutting down, WAL poisoned).
    Unavailable,
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
            tracing::error!(error = %e, "write refused");
            (
                FailureKind::Unavailable,
                "the write-ahead log failed to sync earlier and refuses writes; see the server log"
                    .into(),
            )
        }
        E::Catalog(catalog::Error::InvalidName { .. }) => (FailureKind::Invalid, e.to_string()),
        _ => {
            tracing::error!(error = %e, "write failed");
            (
                FailureKind::Internal,
                "internal error while writing; see the server log".into(),
            )
        }
    }
}

impl From<kiln_storage::engine::Error> for WriteError {
    fn from(e: kiln_storage::engine::Error) -> Self {
        Self::Engine(e)
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
    validate: impl FnMut(&CatalogState) -> Result<ValidatedLines, String>,
) -> Result<Written, WriteError> {
    let written = write(engine, db, accept_partial, validate).await;
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

async fn write(
    engine: &Engine,
    db: &str,
    accept_partial: bool,
    mut validate: impl FnMut(&CatalogState) -> Result<ValidatedLines, String>,
) -> Result<Written, WriteError> {
    let mut attempt = 0;
    let (validated, state) = loop {
        attempt += 1;
        let catalog = engine.catalog_state();
        let validated = validate(&catalog).map_err(WriteError::Invalid)?;
        if !validated.rejected.is_empty() && (!accept_partial || validated.accepted_lines == 0) {
            let total = validated.rejected.len() + validated.accepted_lines;
            let message = if validated.accepted_lines == 0 {
                format!("no valid rows: {}", validated.rejected[0])
            } else {
                format!(
                    "nothing was written: {} of {total} rows are invalid (accept_partial=false); first: {}",
                    validated.rejected.len(),
                    validated.rejected[0]
                )
            };
            return Err(WriteError::Rejected {
                message,
                rejected: validated.rejected,
            });
        }
        if validated.tables.is_empty() {
            return Ok(Written::default());
        }
        // Schema changes were computed against this same catalog state.
        let needs_schema = catalog.database(db).is_none() || !validated.schema_changes.is_empty();
        if !needs_schema {
            break (validated, catalog);
        }
        match engine
            .catalog()
            .ensure_schema(db, &validated.schema_changes)
            .await
        {
            Ok(state) => break (validated, state),
            // Another request set a column's type first: validate again against it.
            Err(catalog::Error::TypeConflict { .. }) if attempt < 3 => continue,
            Err(e @ (catalog::Error::TypeConflict { .. } | catalog::Error::InvalidName { .. })) => {
                return Err(WriteError::Invalid(e.to_string()));
            }
            Err(e) => return Err(kiln_storage::engine::Error::from(e).into()),
        }
    };

    let missing = |what: &str| {
        WriteError::Engine(kiln_storage::engine::Error::Internal(format!(
            "{what} missing from the catalog after a write added it"
        )))
    };
    let database = state.database(db).ok_or_else(|| missing("database"))?.id;
    let mut tables = Vec::with_capacity(validated.tables.len());
    for (name, batch) in validated.tables {
        let def = state.table(db, &name).ok_or_else(|| missing("table"))?;
        tables.push(TableWrite {
            table: def.id,
            batch,
        });
    }
    engine.write(WriteBatch { database, tables }).await?;
    Ok(Written {
        rows: validated.accepted_lines,
        rejected: validated.rejected,
    })
}

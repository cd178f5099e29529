//! The write path every protocol shares: validate against the catalog, add what the
//! schema lacks, append to the WAL, apply to the buffer.

use kiln_storage::Engine;
use kiln_storage::catalog::{self, CatalogState};
use kiln_storage::write::{SourceRange, TableWrite, WriteBatch};
use tracing::Instrument;
use tracing::field::Empty;

use crate::line_protocol::{LineError, ValidatedLines};

/// Now, in nanoseconds since the Unix epoch: the time of a row written without one.
pub use kiln_storage::now_nanos;

/// What was written.
#[derive(Debug, Default)]
pub struct Written {
    pub rows: usize,
    /// Rows rejected while the others were written (partial writes only).
    pub rejected: Vec<LineError>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Nothing was written because of these rows.
    #[error("{message}")]
    Rejected {
        message: String,
        rejected: Vec<LineError>,
    },
    /// The request as a whole is invalid (bad name, columnar type conflict, …).
    #[error("{0}")]
    Invalid(String),
    /// The engine refused or failed.
    #[error("the storage engine refused the write")]
    Engine(#[source] kiln_storage::engine::Error),
}

impl From<kiln_storage::engine::Error> for WriteError {
    fn from(e: kiln_storage::engine::Error) -> Self {
        match e {
            // Rows the engine's own check refused are the client's to fix, not a retry.
            kiln_storage::engine::Error::InvalidWrite(_) => {
                Self::Invalid(kiln_storage::error_chain(&e))
            }
            e => Self::Engine(e),
        }
    }
}

/// Validates with `validate` against the current catalog, extends the schema if needed
/// (validating again if a concurrent writer changed it first), and writes durably together
/// with the outside-source positions in `sources`.
#[tracing::instrument(
    level = "debug",
    skip_all,
    fields(db.namespace = db, rows = Empty, rejected = Empty)
)]
pub async fn write(
    engine: &Engine,
    db: &str,
    accept_partial: bool,
    sources: Vec<SourceRange>,
    mut validate: impl FnMut(&CatalogState) -> Result<ValidatedLines, String>,
) -> Result<Written, WriteError> {
    let mut attempt = 0;
    let (validated, state) = loop {
        attempt += 1;
        let catalog = engine.catalog_state();
        let validated = tracing::debug_span!("validate")
            .in_scope(|| validate(&catalog))
            .map_err(WriteError::Invalid)?;
        let span = tracing::Span::current();
        span.record("rows", validated.accepted_lines);
        span.record("rejected", validated.rejected.len());
        refuse_views(&catalog, db, &validated)?;
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
        if validated.tables.is_empty() && sources.is_empty() {
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
            .instrument(tracing::debug_span!(
                "schema change",
                changes = validated.schema_changes.len()
            ))
            .await
        {
            Ok(state) => break (validated, state),
            // Another request set a column's type first: validate again against it.
            Err(catalog::Error::TypeConflict { .. }) if attempt < 3 => continue,
            Err(
                e @ (catalog::Error::TypeConflict { .. }
                | catalog::Error::InvalidName { .. }
                | catalog::Error::LimitExceeded(_)),
            ) => {
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
    engine
        .write(WriteBatch {
            database,
            tables,
            sources,
        })
        .await?;
    Ok(Written {
        rows: validated.accepted_lines,
        rejected: validated.rejected,
    })
}

/// A view's rows come from its query only: a write to its table is refused whole (line
/// protocol refuses such lines one by one before this).
fn refuse_views(
    catalog: &CatalogState,
    db: &str,
    validated: &ValidatedLines,
) -> Result<(), WriteError> {
    let names = validated
        .tables
        .iter()
        .map(|(name, _)| name)
        .chain(validated.schema_changes.iter().map(|c| &c.table));
    for name in names {
        if let Some(def) = catalog.table(db, name)
            && catalog.view(def.id).is_some()
        {
            return Err(WriteError::Invalid(format!(
                "table {name:?} is a materialized view: its rows come from its query \
                 (write to the table it aggregates)"
            )));
        }
    }
    Ok(())
}

/// Writes like [`write`] (whole, not partial) until it succeeds or fails for good: a source
/// that has taken messages from a broker may skip none of them, so a full buffer (before
/// validating) or a WAL that refuses writes is waited out (backing off to a second between
/// tries). Gives up
/// only when `shutdown` turns true or the engine closes. `source` names the writer in logs.
pub async fn write_until_durable(
    engine: &Engine,
    db: &str,
    sources: Vec<SourceRange>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
    source: &str,
    validate: &mut (dyn FnMut(&CatalogState) -> Result<ValidatedLines, String> + Send),
) -> Result<usize, WriteError> {
    let mut delay = std::time::Duration::from_millis(20);
    loop {
        // Validating is wasted while the buffer has no room: wait for it first.
        while engine.buffer_full() && !*shutdown.borrow() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(1));
        }
        match write(engine, db, false, sources.clone(), &mut *validate).await {
            Ok(w) => return Ok(w.rows),
            Err(WriteError::Engine(e))
                if !*shutdown.borrow()
                    && !matches!(
                        e,
                        kiln_storage::engine::Error::ShuttingDown
                            | kiln_storage::engine::Error::Wal(kiln_storage::wal::Error::Closed)
                    ) =>
            {
                if !e.is_retryable() {
                    tracing::error!(source, error = %e, "writing a source's messages failed; retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

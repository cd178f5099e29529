//! A querier's view of the servers that write (`--role querier`; see `docs/cluster.md`):
//! the ingesters that joined the catalog and those of `--ingesters`. The rows they
//! acknowledged and have not persisted are fetched when a table is scanned, and merged
//! with the segments the shared catalog names, last write wins, as a single node merges
//! its own buffer.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::config::ConfigExtension;
use datafusion::error::{DataFusionError, Result};
use kiln_storage::Engine;
use kiln_storage::buffer::{BufferPartition, Chunk};
use kiln_storage::catalog::ingesters::Ingester;
use kiln_storage::engine::TableData;
use kiln_storage::ids::{CatalogSequence, SequenceNumber, TableId};
use tracing::Instrument;
use tracing::field::Empty;

datafusion::common::extensions_options! {
    /// Kiln's settings of a session (`SET kiln.…` over PostgreSQL).
    pub struct KilnOptions {
        /// On a querier: when a writer does not answer, answer from the others and the
        /// persisted segments instead of failing (`partial=true` over HTTP).
        pub partial_results: bool, default = false
    }
}

impl ConfigExtension for KilnOptions {
    const PREFIX: &'static str = "kiln";
}

/// Where a querier gets the rows its writers have not persisted.
#[async_trait]
pub trait Writers: Debug + Send + Sync {
    /// Every writer's rows of `database.table` not yet persisted, in the time partitions
    /// that overlap `min_time..=max_time`: one answer per writer. The writers are the
    /// ingesters `joined` (the catalog's) and any others the querier was given.
    async fn unpersisted(
        &self,
        joined: &BTreeMap<String, Ingester>,
        database: &str,
        table: &str,
        min_time: i64,
        max_time: i64,
    ) -> Vec<Result<WriterRows, WriterError>>;
}

/// One writer's answer (see `kiln.internal.v1.BufferRequest`).
#[derive(Debug)]
pub struct WriterRows {
    /// The writer's catalog sequence, read after it took the rows.
    pub catalog_sequence: CatalogSequence,
    /// The writer's buffered rows, partition by partition, each partition's in the order
    /// they were written (of two versions of a row, the later one wins).
    pub batches: Vec<RecordBatch>,
}

/// A writer that did not answer: the query fails naming it, unless it asked for partial
/// results.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} did not answer, so rows it has not persisted cannot be read; ask for partial results \
     (partial=true over HTTP, SET kiln.partial_results = true) to answer without them",
    self.writer()
)]
pub struct WriterError {
    /// The ingester's name, if it joined the catalog (rather than being listed to the
    /// querier).
    pub name: Option<String>,
    /// Its gRPC address.
    pub address: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl WriterError {
    /// `the ingester NAME at ADDRESS`, or `the writer at ADDRESS`.
    pub fn writer(&self) -> String {
        match &self.name {
            Some(name) => format!("the ingester {name} at {}", self.address),
            None => format!("the writer at {}", self.address),
        }
    }
}

/// The writers a session's scans ask, kept in its configuration.
#[derive(Debug)]
pub(crate) struct SessionWriters(pub Arc<dyn Writers>);

/// [`Engine::table_data`] on a querier: the segments of the catalog once it has reached
/// every writer's, and the writers' unpersisted rows as buffer chunks.
pub(crate) async fn table_data(
    engine: &Engine,
    session: &dyn Session,
    database: &str,
    table: &str,
    id: TableId,
    min_time: i64,
    max_time: i64,
) -> Result<Option<TableData>> {
    let Some(writers) = session.config().get_extension::<SessionWriters>() else {
        return Ok(engine.table_data(id, min_time, max_time));
    };
    let partial = session
        .config()
        .options()
        .extensions
        .get::<KilnOptions>()
        .is_some_and(|o| o.partial_results);
    let mut answered = Vec::new();
    let asked = tracing::debug_span!("unpersisted rows", writers = Empty, rows = Empty);
    let joined = engine.catalog_state();
    for answer in writers
        .0
        .unpersisted(&joined.ingesters, database, table, min_time, max_time)
        .instrument(asked.clone())
        .await
    {
        match answer {
            Ok(rows) => answered.push(rows),
            Err(e) if partial => tracing::warn!(
                writer = %e.writer(),
                error = %kiln_storage::error_chain(&e),
                "answering without a writer's unpersisted rows (partial results asked for)"
            ),
            Err(e) => return Err(DataFusionError::External(Box::new(e))),
        }
    }
    asked.record("writers", answered.len());
    asked.record(
        "rows",
        answered
            .iter()
            .flat_map(|a| &a.batches)
            .map(|b| b.num_rows())
            .sum::<usize>(),
    );
    // The catalog must name everything a writer persisted before it answered: rows it
    // dropped from its buffer are then in a segment here.
    if let Some(newest) = answered.iter().map(|a| a.catalog_sequence).max() {
        engine
            .follow_to(newest)
            .instrument(tracing::debug_span!("follow catalog", to = newest.0))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
    }
    let Some(mut data) = engine.table_data(id, min_time, max_time) else {
        return Ok(None);
    };
    for batch in answered.into_iter().flat_map(|a| a.batches) {
        if batch.num_rows() == 0 {
            continue;
        }
        // After the segments: the merge takes the newest version from the buffer.
        let chunk = Chunk::new(SequenceNumber::default(), batch);
        let partition = data.def.partition_of(chunk.min_time);
        match data.buffer.iter_mut().find(|p| p.partition == partition) {
            Some(p) => p.chunks.push(chunk),
            None => {
                data.buffer_partitions_total += 1;
                data.buffer.push(BufferPartition {
                    partition,
                    chunks: vec![chunk],
                });
            }
        }
    }
    Ok(Some(data))
}

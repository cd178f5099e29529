//! A writer's rows not yet persisted, as a querier in a cluster reads them (see
//! `docs/cluster.md`): the querier has the writer's segments through the shared catalog,
//! and asks the writer for the rest.

use arrow::datatypes::SchemaRef;

use super::{Engine, Error, Result};
use crate::dedup::merge_last_write_wins;
use crate::ids::CatalogSequence;
use crate::persist::sort_key;

/// One table's buffered rows, for a reader in another process.
#[derive(Debug)]
pub struct Unpersisted {
    /// This engine's catalog sequence, read after the rows were taken: a reader whose
    /// catalog has reached it holds in segments every row persisted (and so dropped from
    /// the buffer) before the rows were taken. Nothing falls between the two.
    pub catalog_sequence: CatalogSequence,
    /// The table's schema in that catalog state; every batch of `partitions` has it.
    pub schema: SchemaRef,
    /// Per time partition overlapping the bounds asked for, in ascending order: its rows
    /// merged last write wins, each identity once, sorted by identity.
    pub partitions: Vec<arrow::array::RecordBatch>,
}

impl Engine {
    /// The rows of `database.table` acknowledged and not yet persisted whose partitions
    /// overlap `min_time..=max_time` (`None`: no such table).
    pub fn unpersisted(
        &self,
        database: &str,
        table: &str,
        min_time: i64,
        max_time: i64,
    ) -> Result<Option<Unpersisted>> {
        let Some(id) = self.catalog.snapshot().table(database, table).map(|t| t.id) else {
            return Ok(None);
        };
        // The buffer first, then the catalog, as `table_data` takes them: rows persisted
        // in between are in both (the reader merges them), never in neither.
        let mut buffer = self.buffer.partitions(id);
        buffer.retain(|p| p.min_time() <= max_time && p.max_time() >= min_time);
        let state = self.catalog.snapshot();
        let Some(def) = state.table_by_id(id) else {
            return Ok(None);
        };
        let schema = def.schema();
        let key = sort_key(def);
        let partitions = buffer
            .iter()
            .map(|p| {
                let batches: Vec<_> = p.chunks.iter().map(|c| c.batch.clone()).collect();
                merge_last_write_wins(&batches, &schema, &key).map_err(Error::ReadBuffer)
            })
            .collect::<Result<_>>()?;
        Ok(Some(Unpersisted {
            catalog_sequence: state.sequence,
            schema,
            partitions,
        }))
    }
}

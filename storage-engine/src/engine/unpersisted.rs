//! A writer's rows not yet persisted, as a querier in a cluster reads them (see
//! `docs/cluster.md`): the querier has the writer's segments through the shared catalog,
//! and asks the writer for the rest.

use arrow::datatypes::SchemaRef;

use super::{Engine, Error, Result};
use crate::dedup::align_to_schema;
use crate::ids::CatalogSequence;

/// One table's buffered rows, for a reader in another process.
#[derive(Debug)]
pub struct Unpersisted {
    /// This engine's catalog sequence, read after the rows were taken: a reader whose
    /// catalog has reached it holds in segments every row persisted (and so dropped from
    /// the buffer) before the rows were taken. Nothing falls between the two.
    pub catalog_sequence: CatalogSequence,
    /// The table's schema in that catalog state; every batch of `chunks` has it.
    pub schema: SchemaRef,
    /// The buffer's chunks of the partitions that overlap the bounds asked for, partition
    /// by partition, each partition's in the order they were written: of two versions of
    /// a row, the later one wins.
    pub chunks: Vec<arrow::array::RecordBatch>,
}

impl Engine {
    /// The rows of `database.table` acknowledged and not yet persisted whose partitions
    /// overlap `min_time..=max_time` (`None`: no such table). Taken as a query of this
    /// server takes them ([`Engine::table_data`]), so chunks merged for one are merged
    /// for the next.
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
        let Some(data) = self.table_data(id, min_time, max_time) else {
            return Ok(None);
        };
        let schema = data.def.schema();
        let chunks = data
            .buffer
            .iter()
            .flat_map(|p| &p.chunks)
            .map(|c| align_to_schema(&c.batch, &schema).map_err(Error::ReadBuffer))
            .collect::<Result<_>>()?;
        Ok(Some(Unpersisted {
            catalog_sequence: data.catalog_sequence,
            schema,
            chunks,
        }))
    }
}

//! Deletes of rows: the engine's side of [tombstones](crate::catalog::tombstones).
//!
//! [`Engine::delete_rows`] logs the delete in the WAL (which orders it among writes),
//! applies it to the buffer, and records the tombstone in the catalog, all under the
//! persistence lock and to completion even if the caller stops waiting. Reads of segments
//! persisted before it go through [`without_deleted`]; compaction applies it for good.

use std::sync::Arc;

use arrow::array::RecordBatch;

use super::{Engine, Error, Result};
use crate::catalog::SegmentMeta;
use crate::catalog::tombstones::{DeletePredicate, DeleteRecord, Tombstone, for_segment};
use crate::wal::RecordKind;

impl Engine {
    /// Deletes the rows of `table` of `database` that `predicate` matches and that were
    /// written before now. The predicate names only tags of the table (and time).
    pub async fn delete_rows(
        self: &Arc<Self>,
        database: &str,
        table: &str,
        predicate: DeletePredicate,
    ) -> Result<Tombstone> {
        let state = self.catalog.snapshot();
        let def = state
            .table(database, table)
            .ok_or_else(|| {
                Error::Catalog(crate::catalog::Error::TableNotFound {
                    database: database.to_owned(),
                    table: table.to_owned(),
                })
            })?
            .clone();
        for condition in &predicate.tags {
            match def.column(&condition.tag) {
                Some(c) if c.ty == crate::catalog::ColumnType::Tag => {}
                Some(_) => {
                    return Err(Error::InvalidDelete(format!(
                        "{:?} is a field of table {:?}: a delete filters on tags and time only",
                        condition.tag, def.name
                    )));
                }
                None => {
                    return Err(Error::InvalidDelete(format!(
                        "table {:?} has no tag {:?}",
                        def.name, condition.tag
                    )));
                }
            }
        }
        let engine = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _persisting = engine.persist_lock.lock().await;
            let record = DeleteRecord {
                version: DeleteRecord::VERSION,
                table: def.id,
                predicate: predicate.clone(),
            };
            let sequence = engine
                .wal
                .append(RecordKind::Delete, record.encode())
                .await?;
            engine.buffer.apply_delete(sequence, def.id, &predicate);
            let tombstone = engine
                .catalog
                .record_delete(def.id, predicate, sequence, crate::now_nanos())
                .await?;
            engine.rebuild_last_cache(def.id);
            tracing::info!(table = %def.id, name = %def.name, %sequence, predicate = %tombstone.predicate, "rows deleted");
            Ok::<_, Error>(tombstone)
        });
        task.await.map_err(Error::Task)?
    }
}

/// `batches` of `segment` without the rows the tombstones of its table (`tombstones`)
/// delete from it.
pub(super) fn without_deleted(
    tombstones: &[Arc<Tombstone>],
    segment: &SegmentMeta,
    batches: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>> {
    let applying = for_segment(tombstones, segment.id, segment.min_time, segment.max_time);
    if applying.is_empty() {
        return Ok(batches);
    }
    let mut out = Vec::with_capacity(batches.len());
    for mut batch in batches {
        for t in &applying {
            batch = t
                .predicate
                .remove_from(&batch)
                .map_err(Error::ApplyDelete)?;
        }
        if batch.num_rows() > 0 {
            out.push(batch);
        }
    }
    Ok(out)
}

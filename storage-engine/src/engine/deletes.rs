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
use crate::ids::TableId;
use crate::wal::RecordKind;
use crate::write::WriteBatch;

impl Engine {
    /// Deletes the rows of `table` of `database` that `predicate` matches and that were
    /// written before now. The predicate names only tags of the table (and time).
    pub async fn delete_rows(
        self: &Arc<Self>,
        database: &str,
        table: &str,
        predicate: DeletePredicate,
    ) -> Result<Tombstone> {
        self.refuse_if_read_only()?;
        if let Some(writer) = &self.config.writer {
            // Its tombstone would reach the other writers' buffers only once they persist.
            return Err(Error::InvalidDelete(format!(
                "deleting rows is not supported where several servers write one catalog (this \
                 is {writer:?}): rows the other ingesters buffer would be left"
            )));
        }
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
            engine.after_delete(def.id, &tombstone.predicate);
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

/// `batch` without the rows `deletes` (per table) match.
pub(super) fn without(batch: &WriteBatch, deletes: &[(TableId, DeletePredicate)]) -> WriteBatch {
    let mut out = batch.clone();
    for tw in &mut out.tables {
        for (_, predicate) in deletes.iter().filter(|(t, _)| *t == tw.table) {
            match predicate.remove_from(&tw.batch) {
                Ok(kept) => tw.batch = kept,
                Err(e) => tracing::error!(error = %e, "applying a delete to a write failed"),
            }
        }
    }
    out
}

impl Engine {
    /// Brings `table`'s last-value cache up to date after a delete: the keys whose latest
    /// row it deleted are dropped when that is exact, else the cache reads the table again.
    fn after_delete(self: &Arc<Self>, table: TableId, predicate: &DeletePredicate) {
        let Some(cache) = self.last_cache(table).filter(|c| c.is_warm()) else {
            self.rebuild_last_cache(table);
            return;
        };
        let Some(schema) = self
            .catalog
            .snapshot()
            .table_by_id(table)
            .map(|d| d.schema())
        else {
            return;
        };
        match cache.remove_deleted(&schema, predicate) {
            Ok(true) => {}
            Ok(false) => self.rebuild_last_cache(table),
            Err(e) => {
                tracing::warn!(%table, error = %e, "updating a last-value cache after a delete failed; it reads its table again");
                self.rebuild_last_cache(table);
            }
        }
    }
}

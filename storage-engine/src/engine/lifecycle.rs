//! Deleting databases and tables, and enforcing retention: the engine's side of the
//! catalog's [`lifecycle`](crate::catalog::lifecycle) events.
//!
//! A soft delete commits its event, then frees what the engine holds of the table at
//! once (buffered rows, its last-value cache, its series); WAL records of it are skipped
//! on replay and go with the next persistence. A retention pass, run by the compactor,
//! expires the segments whose every row is older than each table's cutoff (one
//! [`CatalogEvent::SegmentsExpired`] per table), drops expired buffered chunks, and hard
//! deletes the dropped objects whose time has come. Files leave the object store only
//! once no running query holds a lease on a catalog that names them (as compaction's).

use std::sync::atomic::Ordering;

use object_store::ObjectStoreExt;
use serde::Serialize;

use super::{Engine, Result};
use crate::catalog::CatalogEvent;
use crate::catalog::lifecycle::{DroppedDatabase, DroppedTable, expired_segments};
use crate::ids::TableId;

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionOutcome {
    /// Segments removed because every row in them expired, and their bytes.
    pub segments_expired: usize,
    pub bytes_expired: u64,
    /// Bytes of expired rows dropped from the buffer.
    pub buffer_bytes_expired: usize,
    /// Dropped tables whose files were handed for deletion (hard delete), and their bytes.
    pub tables_purged: usize,
    pub bytes_purged: u64,
}

impl Engine {
    /// Soft-deletes database `name`: queries and writes stop seeing it at once, its name is
    /// free, its files are deleted from `hard_delete_at` on.
    pub async fn delete_database(
        &self,
        name: &str,
        hard_delete_at: i64,
    ) -> Result<DroppedDatabase> {
        let dropped = self
            .catalog
            .delete_database(name, crate::now_nanos(), hard_delete_at)
            .await?;
        for &table in &dropped.tables {
            self.forget_table(table);
        }
        Ok(dropped)
    }

    /// Soft-deletes table `table` of `database` (see [`Engine::delete_database`]).
    pub async fn delete_table(
        &self,
        database: &str,
        table: &str,
        hard_delete_at: i64,
    ) -> Result<DroppedTable> {
        let dropped = self
            .catalog
            .delete_table(database, table, crate::now_nanos(), hard_delete_at)
            .await?;
        self.forget_table(dropped.def.id);
        Ok(dropped)
    }

    /// Frees what the engine holds of a deleted table. A write applied after this (one
    /// logged before the delete) leaves rows the next persistence drops.
    fn forget_table(&self, table: TableId) {
        let freed = self.buffer.drop_table(table);
        self.last_caches.forget(table);
        self.series.forget_table(table);
        tracing::info!(%table, buffer_bytes_freed = freed, "table deleted");
    }

    /// Expires what retention allows at `now` and hard-deletes dropped objects whose time
    /// has come.
    pub async fn enforce_retention(&self, now: i64) -> Result<RetentionOutcome> {
        let _one_at_a_time = self.compact_lock.lock().await;
        let mut outcome = RetentionOutcome::default();
        let state = self.catalog.snapshot();
        for &table in state.tables.keys() {
            let Some((cutoff, expired)) = expired_segments(&state, table, now) else {
                continue;
            };
            outcome.buffer_bytes_expired += self.buffer.expire(table, cutoff);
            if expired.is_empty() {
                continue;
            }
            let event = CatalogEvent::SegmentsExpired {
                table,
                segments: expired.iter().map(|s| s.id).collect(),
                cutoff,
            };
            // Under the persistence lock, like a compaction's commit.
            let committed = {
                let _persisting = self.persist_lock.lock().await;
                self.catalog.commit(vec![event]).await
            };
            if let Err(e) = committed {
                // A table deleted meanwhile; the others still expire.
                tracing::warn!(%table, error = %crate::error_chain(&e), "expiring segments failed");
                continue;
            }
            let bytes: u64 = expired.iter().map(|s| s.bytes).sum();
            tracing::info!(%table, cutoff, segments = expired.len(), bytes, "expired segments past retention");
            outcome.segments_expired += expired.len();
            outcome.bytes_expired += bytes;
            self.retire(expired.into_iter().map(|s| s.path).collect());
        }
        let purged = self.catalog.purge_dropped(now).await?;
        for table in purged {
            let bytes: u64 = table.segments.iter().map(|s| s.bytes).sum();
            tracing::info!(table = %table.def.id, name = %table.def.name, database = %table.database, segments = table.segments.len(), bytes, "hard-deleting a dropped table");
            outcome.tables_purged += 1;
            outcome.bytes_purged += bytes;
            let snapshot = super::last_caches::snapshot_path(table.def.id);
            if let Err(e) = self.store.delete(&snapshot).await
                && !matches!(e, object_store::Error::NotFound { .. })
            {
                tracing::warn!(error = %e, path = %snapshot, "deleting a dropped table's last-value snapshot failed");
            }
            self.retire(table.segments.into_iter().map(|s| s.path).collect());
        }
        self.stats
            .segments_expired
            .fetch_add(outcome.segments_expired as u64, Ordering::Relaxed);
        self.delete_retired().await;
        Ok(outcome)
    }
}

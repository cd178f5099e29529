//! A read-only engine: a server that answers queries over the catalog and segments other
//! servers write (`--role querier`). It follows the catalog's log, takes no writes, and
//! deletes nothing in the store.

use std::sync::Arc;
use std::time::Duration;

use super::{Engine, Error, Result};
use crate::ids::CatalogSequence;

impl Engine {
    /// Refuses what a read-only engine must not do (writes, deletes, compaction).
    pub(super) fn refuse_if_read_only(&self) -> Result<()> {
        if self.config.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Whether this engine only reads what others write.
    pub fn is_read_only(&self) -> bool {
        self.config.read_only
    }

    /// Applies what other servers add to the catalog, every `every`, until `shutdown`
    /// resolves: their persisted segments, schema changes and deletes become visible to
    /// queries here, and after each persistence the writers' last-value snapshots. A
    /// failure (the store away) is logged and retried.
    pub async fn run_follower(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let persisted_by = |state: &crate::catalog::CatalogState| {
            (state.persisted_sequence, state.writers_persisted.clone())
        };
        let mut persisted = persisted_by(&self.catalog.snapshot());
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.catalog.follow().await {
                Ok(moved) => {
                    let state = self.catalog.snapshot();
                    if moved {
                        tracing::debug!(sequence = %state.sequence, "followed the catalog");
                    }
                    // Also when a query moved the catalog on (`follow_to`). A writer keeps
                    // caches of its own, fed by its writes.
                    if self.config.read_only && persisted_by(&state) != persisted {
                        persisted = persisted_by(&state);
                        self.load_snapshot_caches().await;
                    }
                }
                Err(e) => tracing::warn!(
                    error = %crate::error_chain(&e),
                    "following the catalog failed; will retry"
                ),
            }
        }
    }

    /// Follows the catalog until it has reached `sequence` (a writer's, read with the rows
    /// it has not persisted: see [`Engine::unpersisted`]). At once when it already has.
    pub async fn follow_to(&self, sequence: CatalogSequence) -> Result<()> {
        for _ in 0..FOLLOW_TO_ATTEMPTS {
            if self.catalog.snapshot().sequence >= sequence {
                return Ok(());
            }
            // Reads every entry the log has; a snapshot's, if the log was pruned past us.
            self.catalog.follow().await?;
        }
        match self.catalog.snapshot().sequence {
            reached if reached >= sequence => Ok(()),
            reached => Err(Error::BehindCatalog { sequence, reached }),
        }
    }
}

/// Reads of the log `follow_to` makes before giving up (the writer's entry is in the log
/// before it answers, so one is enough unless the log was pruned past this reader).
const FOLLOW_TO_ATTEMPTS: usize = 3 * crate::catalog::FOLLOW_SNAPSHOT_CHECK_EVERY as usize;

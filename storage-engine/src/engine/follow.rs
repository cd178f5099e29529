//! A read-only engine: a server that answers queries over the catalog and segments other
//! servers write (`--role querier`). It follows the catalog's log, takes no writes, and
//! deletes nothing in the store.

use std::sync::Arc;
use std::time::Duration;

use super::{Engine, Error, Result};

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
    /// queries here, and after each persistence the writer's last-value snapshots. A
    /// failure (the store away) is logged and retried.
    pub async fn run_follower(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut persisted = self.catalog.snapshot().persisted_sequence;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.catalog.follow().await {
                Ok(true) => {
                    let state = self.catalog.snapshot();
                    tracing::debug!(sequence = %state.sequence, "followed the catalog");
                    if state.persisted_sequence != persisted {
                        persisted = state.persisted_sequence;
                        self.load_snapshot_caches().await;
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    error = %crate::error_chain(&e),
                    "following the catalog failed; will retry"
                ),
            }
        }
    }
}

//! The catalog's objects in the store: the log of transactions, the snapshots that shorten
//! its replay, and pruning what a newer snapshot covers.
//!
//! ```text
//! catalog/log/{sequence:020}.json        one transaction, written create-if-absent
//! catalog/snapshots/{sequence:020}.json  the state as of that transaction
//! ```
//!
//! Loading starts from the newest snapshot that decodes (an older one if it does not) and
//! replays the log after it. Once a snapshot is written, snapshots older than the one
//! before it, and log entries that one covers, are deleted: the newest two snapshots and
//! the log after the older of them stay, so a damaged newest snapshot still loads.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{CatalogState, Error, Result, format};
use crate::ids::CatalogSequence;

pub(super) const LOG_PREFIX: &str = "catalog/log";
pub(super) const SNAPSHOT_PREFIX: &str = "catalog/snapshots";

/// Snapshots kept: the newest and the one before it.
const SNAPSHOTS_KEPT: usize = 2;

pub(super) fn log_path(seq: CatalogSequence) -> Path {
    Path::from(format!("{LOG_PREFIX}/{:020}.json", seq.get()))
}

pub(super) fn snapshot_path(seq: CatalogSequence) -> Path {
    Path::from(format!("{SNAPSHOT_PREFIX}/{:020}.json", seq.get()))
}

fn sequence_of(path: &Path) -> Option<CatalogSequence> {
    let name = path.filename()?;
    name.strip_suffix(".json")?
        .parse()
        .ok()
        .map(CatalogSequence)
}

/// The state as the store holds it: the newest snapshot that decodes, then the log; and
/// the sequence of that snapshot.
pub(super) async fn load_state(
    store: &Arc<dyn ObjectStore>,
) -> Result<(CatalogState, CatalogSequence)> {
    let mut state = CatalogState::default();
    for seq in list_sequences(store, SNAPSHOT_PREFIX).await?.iter().rev() {
        let path = snapshot_path(*seq);
        let decoded = get(store, &path).await.and_then(|bytes| {
            format::decode_snapshot(&bytes).map_err(|source| Error::Decode {
                path: path.to_string(),
                source,
            })
        });
        match decoded {
            Ok(s) => {
                state = s;
                break;
            }
            Err(e) => tracing::warn!(
                error = %crate::error_chain(&e),
                "catalog snapshot unreadable; loading from an older one"
            ),
        }
    }
    let snapshot = state.sequence;
    let entries = list_sequences(store, LOG_PREFIX).await?;
    if entries
        .first()
        .is_some_and(|first| *first > state.sequence.next())
    {
        return Err(Error::Decode {
            path: log_path(entries[0]).to_string(),
            source: format::DecodeError::Missing {
                first: entries[0],
                snapshot: state.sequence,
            },
        });
    }
    for seq in entries {
        if seq > state.sequence {
            let path = log_path(seq);
            let bytes = get(store, &path).await?;
            apply_entry(&mut state, &path, &bytes)?;
        }
    }
    Ok((state, snapshot))
}

/// Applies the transactions the log holds after `state`'s, if any (another writer's, or
/// one whose put reported an error after it landed). Whether anything was applied.
pub(super) async fn catch_up(
    store: &Arc<dyn ObjectStore>,
    state: &mut CatalogState,
) -> Result<bool> {
    let mut applied = false;
    loop {
        let path = log_path(state.sequence.next());
        let bytes = match get(store, &path).await {
            Ok(bytes) => bytes,
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => return Ok(applied),
            Err(e) => return Err(e),
        };
        apply_entry(state, &path, &bytes)?;
        applied = true;
    }
}

/// Folds the transaction `bytes` (read from `path`) into `state`; it must be the next one.
fn apply_entry(state: &mut CatalogState, path: &Path, bytes: &[u8]) -> Result<()> {
    let tx = format::decode_transaction(bytes).map_err(|source| Error::Decode {
        path: path.to_string(),
        source,
    })?;
    if tx.sequence != state.sequence.next() {
        return Err(Error::Decode {
            path: path.to_string(),
            source: format::DecodeError::Gap {
                found: tx.sequence,
                previous: state.sequence,
            },
        });
    }
    for event in &tx.events {
        state.apply(event)?;
    }
    state.sequence = tx.sequence;
    Ok(())
}

/// Writes a snapshot of `state`, then deletes what the snapshot before it covers. Runs
/// apart from commits: a failure only leaves more log to replay (and is logged).
pub(super) async fn snapshot_and_prune(store: Arc<dyn ObjectStore>, state: Arc<CatalogState>) {
    let sequence = state.sequence;
    let encoded = tokio::task::spawn_blocking(move || format::encode_snapshot(&state)).await;
    let Ok(bytes) = encoded else {
        tracing::warn!(%sequence, "encoding a catalog snapshot failed");
        return;
    };
    let path = snapshot_path(sequence);
    if let Err(e) = store.put(&path, PutPayload::from(bytes)).await {
        tracing::warn!(error = %e, %path, "writing catalog snapshot failed");
        return;
    }
    if let Err(e) = prune(&store).await {
        tracing::warn!(error = %crate::error_chain(&e), "pruning the catalog log failed");
    }
}

/// Deletes snapshots older than the newest [`SNAPSHOTS_KEPT`], and log entries the oldest
/// kept snapshot covers.
async fn prune(store: &Arc<dyn ObjectStore>) -> Result<()> {
    let snapshots = list_sequences(store, SNAPSHOT_PREFIX).await?;
    if snapshots.len() < SNAPSHOTS_KEPT {
        return Ok(());
    }
    let oldest_kept = snapshots[snapshots.len() - SNAPSHOTS_KEPT];
    let mut doomed: Vec<Path> = snapshots
        .iter()
        .filter(|s| **s < oldest_kept)
        .map(|s| snapshot_path(*s))
        .collect();
    doomed.extend(
        list_sequences(store, LOG_PREFIX)
            .await?
            .into_iter()
            .filter(|s| *s <= oldest_kept)
            .map(log_path),
    );
    if doomed.is_empty() {
        return Ok(());
    }
    let count = doomed.len();
    let locations = futures::stream::iter(doomed.into_iter().map(Ok)).boxed();
    store
        .delete_stream(locations)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|source| Error::Store {
            path: LOG_PREFIX.to_owned(),
            source,
        })?;
    tracing::debug!(objects = count, through = %oldest_kept, "pruned the catalog log");
    Ok(())
}

pub(super) async fn get(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<bytes::Bytes> {
    let map = |source| Error::Store {
        path: path.to_string(),
        source,
    };
    store
        .get(path)
        .await
        .map_err(map)?
        .bytes()
        .await
        .map_err(map)
}

pub(super) async fn list_sequences(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
) -> Result<Vec<CatalogSequence>> {
    let prefix_path = Path::from(prefix);
    let metas: Vec<_> = store
        .list(Some(&prefix_path))
        .try_collect()
        .await
        .map_err(|source| Error::Store {
            path: prefix.to_owned(),
            source,
        })?;
    let mut seqs: Vec<_> = metas
        .iter()
        .filter_map(|m| sequence_of(&m.location))
        .collect();
    seqs.sort();
    Ok(seqs)
}

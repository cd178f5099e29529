//! The tables' last-value caches: those defined in the catalog (`kiln last-cache
//! create`), and a default one for every other table, keyed by all its tags.
//!
//! A defined cache warms at every start by reading its table. A default cache cannot
//! (every table, however large): it is a projection of the log like the series
//! inventory. Each persistence stores its rows in `last_values/<table>.arrow` with the
//! WAL sequence they cover, before the WAL files that hold those writes may go; a start
//! loads them and replays the WAL on top. A snapshot older than the catalog's persisted
//! sequence (written before default caches were turned off and on again) is not used:
//! that table's cache warms by reading the table, as a defined cache does.
//!
//! Writes are offered to the caches before they are applied to the buffer, so a
//! persistence that finds a write in the buffer stores a snapshot that has it.
//! Offering a write again (a snapshot that already had it, then the WAL) gives the same
//! rows: the last-write-wins merge keeps each field of the last write that set it.
//!
//! A default cache follows its table's tags: when a write brings a new tag, the cache is
//! keyed again from its rows (each held row has no value for the new tag).

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::RwLock;

use super::{Engine, Error, Result};
use crate::catalog::{CatalogState, LastCacheDef, TableDef};
use crate::ids::{SequenceNumber, TableId};
use crate::last_cache::{CacheStatus, LastCache, Warming};
use crate::write::WriteBatch;

/// Where default caches' snapshots live in the object store.
pub const SNAPSHOT_PREFIX: &str = "last_values";
/// Schema metadata key of a snapshot: the WAL sequence its rows cover.
const THROUGH_KEY: &str = "kiln.through";

fn snapshot_path(table: TableId) -> Path {
    Path::from(format!("{SNAPSHOT_PREFIX}/{}.arrow", table.0))
}

#[derive(Debug, Clone)]
struct TableCache {
    cache: Arc<LastCache>,
    /// A default cache (not in the catalog): keyed by all the table's tags, snapshotted.
    default: bool,
}

/// The tables' caches, fed by every applied write.
#[derive(Debug)]
pub(super) struct LastCaches {
    tables: RwLock<HashMap<TableId, TableCache>>,
    /// Whether tables without a defined cache get a default one.
    defaults: bool,
    max_series: usize,
}

/// The tag columns of `def`, which key its default cache.
fn tags(def: &TableDef) -> Vec<String> {
    def.tag_columns().map(|c| c.name.clone()).collect()
}

impl LastCaches {
    pub(super) fn new(defaults: bool, max_series: usize) -> Self {
        Self {
            tables: RwLock::default(),
            defaults,
            max_series,
        }
    }

    /// Offers a write about to be applied; a table that has no cache yet (it is new) gets
    /// its default cache, warm at once (it had no rows before this write).
    pub(super) fn offer(&self, write: &WriteBatch, state: &CatalogState) {
        for tw in &write.tables {
            let held = self.tables.read().get(&tw.table).cloned();
            let cache = match held {
                Some(c) if !c.default => c.cache,
                Some(c)
                    if state
                        .table_by_id(tw.table)
                        .is_none_or(|def| c.cache.key_columns.iter().eq(tags(def).iter())) =>
                {
                    c.cache
                }
                _ if !self.defaults => continue,
                _ => match state.table_by_id(tw.table).and_then(|def| self.rekey(def)) {
                    Some(cache) => cache,
                    None => continue,
                },
            };
            cache.offer(&tw.batch);
        }
    }

    /// Offers a write replayed from the WAL to the caches loaded from snapshots.
    pub(super) fn offer_replayed(&self, write: &WriteBatch) {
        let tables = self.tables.read();
        for tw in &write.tables {
            if let Some(c) = tables.get(&tw.table) {
                c.cache.offer(&tw.batch);
            }
        }
    }

    /// `def`'s default cache keyed by its tags now: a new one for a new table, or the
    /// rows of the one keyed by fewer tags, keyed again.
    fn rekey(&self, def: &TableDef) -> Option<Arc<LastCache>> {
        let mut tables = self.tables.write();
        let keys = tags(def);
        let old = match tables.get(&def.id) {
            Some(c) if !c.default || c.cache.key_columns == keys => {
                return Some(Arc::clone(&c.cache));
            }
            held => held.map(|c| Arc::clone(&c.cache)),
        };
        let cache = match LastCache::new(keys, self.max_series) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, table = %def.id, "cannot make a last-value cache");
                return None;
            }
        };
        let seeded = match old.as_deref().map(LastCache::status) {
            None => Ok(()),
            Some(CacheStatus::Warm) => old
                .as_deref()
                .expect("a held cache")
                .rows(&def.schema())
                .and_then(|rows| {
                    cache.offer(&rows);
                    Ok(())
                }),
            Some(CacheStatus::Warming) => Err(ArrowError::InvalidArgumentError(
                "the table's tags changed while its last-value cache warmed; it warms again \
                 at the next start"
                    .into(),
            )),
            Some(CacheStatus::Failed(reason)) => {
                Err(ArrowError::InvalidArgumentError(reason.to_string()))
            }
        };
        match seeded.and_then(|()| cache.warming().finish()) {
            Ok(()) => {}
            Err(e) => cache.fail(e.to_string()),
        }
        tables.insert(
            def.id,
            TableCache {
                cache: Arc::clone(&cache),
                default: true,
            },
        );
        Some(cache)
    }

    /// Stores every default cache's rows, covering the WAL through `through`; removes the
    /// snapshot of one that cannot answer (a later start then reads the table).
    pub(super) async fn snapshot(
        &self,
        store: &Arc<dyn ObjectStore>,
        state: &CatalogState,
        through: SequenceNumber,
    ) -> Result<()> {
        let defaults: Vec<(TableId, Arc<LastCache>)> = self
            .tables
            .read()
            .iter()
            .filter(|(_, c)| c.default)
            .map(|(id, c)| (*id, Arc::clone(&c.cache)))
            .collect();
        for (table, cache) in defaults {
            let path = snapshot_path(table);
            let store_error = |source| Error::Store {
                path: path.to_string(),
                source,
            };
            let rows = match (cache.is_warm(), state.table_by_id(table)) {
                (true, Some(def)) => cache.rows(&def.schema()).map_err(Error::LastCache)?,
                _ => {
                    match store.delete(&path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(store_error(e)),
                    }
                    continue;
                }
            };
            let bytes = encode_snapshot(&rows, through).map_err(Error::LastCache)?;
            store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(store_error)?;
        }
        Ok(())
    }
}

fn encode_snapshot(rows: &RecordBatch, through: SequenceNumber) -> Result<Vec<u8>, ArrowError> {
    let schema = Schema::new(rows.schema().fields().clone()).with_metadata(
        [(THROUGH_KEY.to_owned(), through.0.to_string())]
            .into_iter()
            .collect(),
    );
    let rows = rows.clone().with_schema(Arc::new(schema))?;
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, &rows.schema())?;
    writer.write(&rows)?;
    writer.finish()?;
    drop(writer);
    Ok(out)
}

/// A snapshot's rows and the WAL sequence they cover.
fn decode_snapshot(bytes: &[u8]) -> Result<(SequenceNumber, Vec<RecordBatch>), ArrowError> {
    crate::ipc::check_framing(bytes).map_err(ArrowError::IpcError)?;
    crate::ipc::guarded("a last-value snapshot", || {
        let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
        let through = reader
            .schema()
            .metadata()
            .get(THROUGH_KEY)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ArrowError::IpcError(format!("no {THROUGH_KEY} in the schema")))?;
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        Ok((SequenceNumber(through), batches))
    })
}

/// Default caches loaded from snapshots before the WAL is replayed onto them, and the
/// tables whose cache must be warmed by reading them.
pub(super) struct Loaded {
    caches: Arc<LastCaches>,
    from_snapshots: Vec<Arc<LastCache>>,
    to_warm: Vec<LastCacheDef>,
}

impl Loaded {
    /// The caches, to register with the engine (replayed writes go to them first).
    pub(super) fn caches(&self) -> &Arc<LastCaches> {
        &self.caches
    }
}

/// Loads the default caches' snapshots of every table without a defined cache (when
/// default caches are on).
pub(super) async fn load(
    store: &Arc<dyn ObjectStore>,
    state: &CatalogState,
    defaults: bool,
    max_series: usize,
) -> Loaded {
    let caches = Arc::new(LastCaches::new(defaults, max_series));
    let mut loaded = Loaded {
        caches: Arc::clone(&caches),
        from_snapshots: Vec::new(),
        to_warm: state.last_caches.values().cloned().collect(),
    };
    if !defaults {
        return loaded;
    }
    for def in state.tables.values() {
        if state.last_caches.contains_key(&def.id) {
            continue;
        }
        let keys = tags(def);
        let path = snapshot_path(def.id);
        let read = async {
            let bytes = store.get(&path).await?.bytes().await?;
            Ok::<_, object_store::Error>(bytes)
        };
        let found = match read.await {
            Ok(bytes) => decode_snapshot(&bytes).map(Some).map_err(|e| e.to_string()),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let cache = match found {
            Ok(Some((through, batches))) if through >= state.persisted_sequence => {
                LastCache::new(keys.clone(), max_series).map(|cache| {
                    for batch in &batches {
                        cache.offer(batch);
                    }
                    Arc::new(cache)
                })
            }
            Ok(found) => {
                if found.is_some() {
                    tracing::info!(table = %def.id, "a last-value snapshot older than the persisted data; the cache reads the table");
                }
                loaded.to_warm.push(LastCacheDef {
                    table: def.id,
                    key_columns: keys,
                });
                continue;
            }
            Err(reason) => {
                tracing::warn!(%path, %reason, "a last-value snapshot cannot be read; the cache reads the table");
                loaded.to_warm.push(LastCacheDef {
                    table: def.id,
                    key_columns: keys,
                });
                continue;
            }
        };
        match cache {
            Ok(cache) => {
                caches.tables.write().insert(
                    def.id,
                    TableCache {
                        cache: Arc::clone(&cache),
                        default: true,
                    },
                );
                loaded.from_snapshots.push(cache);
            }
            Err(e) => {
                tracing::error!(error = %e, table = %def.id, "cannot make a last-value cache")
            }
        }
    }
    loaded
}

impl Engine {
    /// After the WAL is replayed: the caches loaded from snapshots are warm; the others
    /// (defined caches, default ones without a usable snapshot) warm by reading their
    /// tables in the background.
    pub(super) fn start_last_caches(self: &Arc<Self>, loaded: Loaded) {
        for cache in loaded.from_snapshots {
            if let Err(e) = cache.warming().finish() {
                cache.fail(e.to_string());
            }
        }
        for def in &loaded.to_warm {
            let default = !self.catalog.snapshot().last_caches.contains_key(&def.table);
            self.start_last_cache(def, default);
        }
    }

    /// Registers a cache for `def` (fed by writes from now on) and warms it in the
    /// background from the table's segments and buffer.
    fn start_last_cache(self: &Arc<Self>, def: &LastCacheDef, default: bool) {
        let cache = match LastCache::new(def.key_columns.clone(), self.last_caches.max_series) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, table = %def.table, "cannot make a last-value cache");
                return;
            }
        };
        self.last_caches.tables.write().insert(
            def.table,
            TableCache {
                cache: Arc::clone(&cache),
                default,
            },
        );
        let engine = Arc::clone(self);
        let table = def.table;
        tokio::spawn(async move {
            let started = Instant::now();
            match engine.warm_last_cache(table, &cache).await {
                Ok(()) => tracing::info!(
                    %table,
                    series = cache.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "last-value cache warm"
                ),
                Err(e) => cache.fail(crate::error_chain(&e)),
            }
        });
    }

    /// Feeds `cache` every row of `table` now in segments and the buffer, oldest write
    /// first, one segment at a time (never the whole table in memory), and marks it warm.
    async fn warm_last_cache(&self, table: TableId, cache: &Arc<LastCache>) -> Result<()> {
        let mut warming = cache.warming();
        if let Some(data) = self.table_data(table, i64::MIN, i64::MAX) {
            for segment in &data.segments {
                warming = gather(warming, self.read_segment(segment).await?).await?;
            }
            let buffered = data
                .buffer
                .into_iter()
                .flat_map(|p| p.chunks.into_iter().map(|c| c.batch))
                .collect();
            warming = gather(warming, buffered).await?;
        }
        warming.finish().map_err(Error::LastCache)
    }

    /// Gives `table` of `database` a last-value cache keyed by `key_columns` (all its tags
    /// if empty), recorded in the catalog; it is warm once the table's rows are read.
    pub async fn create_last_cache(
        self: &Arc<Self>,
        database: &str,
        table: &str,
        key_columns: &[String],
    ) -> Result<LastCacheDef> {
        let def = self
            .catalog
            .create_last_cache(database, table, key_columns)
            .await?;
        self.start_last_cache(&def, false);
        Ok(def)
    }

    /// Drops the last-value cache of `table`; `false` if it had none. With default caches
    /// on, the table gets its default cache back (warmed by reading the table).
    pub async fn drop_last_cache(self: &Arc<Self>, database: &str, table: &str) -> Result<bool> {
        let id = self.catalog.snapshot().table(database, table).map(|t| t.id);
        let dropped = self.catalog.drop_last_cache(database, table).await?;
        if let Some(id) = id.filter(|_| dropped) {
            self.last_caches.tables.write().remove(&id);
            let state = self.catalog.snapshot();
            if let Some(def) = state.table_by_id(id).filter(|_| self.last_caches.defaults) {
                let def = LastCacheDef {
                    table: id,
                    key_columns: tags(def),
                };
                self.start_last_cache(&def, true);
            }
        }
        Ok(dropped)
    }

    /// The last-value cache of `table`, if it has one.
    pub fn last_cache(&self, table: TableId) -> Option<Arc<LastCache>> {
        self.last_caches
            .tables
            .read()
            .get(&table)
            .map(|c| Arc::clone(&c.cache))
    }

    /// Last-value caches that stopped answering (see [`crate::last_cache::CacheStatus`]).
    pub fn failed_last_caches(&self) -> usize {
        self.last_caches
            .tables
            .read()
            .values()
            .filter(|c| matches!(c.cache.status(), CacheStatus::Failed(_)))
            .count()
    }
}

async fn gather(mut warming: Warming, batches: Vec<RecordBatch>) -> Result<Warming> {
    tokio::task::spawn_blocking(move || {
        for batch in &batches {
            warming.offer(batch)?;
        }
        Ok(warming)
    })
    .await
    .map_err(Error::Task)?
    .map_err(Error::LastCache)
}

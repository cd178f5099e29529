//! The tables' last-value caches: those defined in the catalog (`kiln last-cache
//! create`), and a default one for every other table, keyed by all its tags.
//!
//! A defined cache warms at every start by reading its table. A default cache cannot
//! (every table, however large): it is a projection of the log like the series
//! inventory. Each persistence stores the rows of the caches written to since the last
//! one in `last_values/<table>.arrow`, then `last_values/manifest.json`: the WAL sequence
//! they all cover and the tables stored. This happens before the WAL files that hold those
//! writes may go; a start loads them and replays the WAL on top. A manifest older than the
//! catalog's persisted sequence (default caches were turned off for a while) is not used:
//! the caches warm by reading their tables, as a defined cache does.
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
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::{Engine, Error, Result};
use crate::catalog::{CatalogState, LastCacheDef, TableDef};
use crate::ids::{SequenceNumber, TableId};
use crate::last_cache::{CacheStatus, LastCache, Warming};
use crate::write::WriteBatch;

/// Where default caches' snapshots live in the object store.
pub const SNAPSHOT_PREFIX: &str = "last_values";

pub(super) fn snapshot_path(table: TableId) -> Path {
    Path::from(format!("{SNAPSHOT_PREFIX}/{}.arrow", table.0))
}

fn manifest_path() -> Path {
    Path::from(format!("{SNAPSHOT_PREFIX}/manifest.json"))
}

/// What the stored snapshots cover.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// Every write through this WAL sequence is in the snapshots.
    through: SequenceNumber,
    /// Tables with a snapshot.
    tables: Vec<TableId>,
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
    /// Per table, the cache (its id) and its count of writes offered when its snapshot
    /// was stored: a cache offered nothing since is not stored again.
    stored: tokio::sync::Mutex<HashMap<TableId, (u64, u64)>>,
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
            stored: tokio::sync::Mutex::default(),
            defaults,
            max_series,
        }
    }

    /// Offers a write about to be applied; a table that has no cache yet (it is new) gets
    /// its default cache, warm at once (it had no rows before this write). Caches are fed
    /// under the read lock, so one replaced (keyed again) misses no write.
    pub(super) fn offer(&self, write: &WriteBatch, state: &CatalogState) {
        for tw in &write.tables {
            let keyed_by_tags = |cache: &LastCache| {
                state.table_by_id(tw.table).is_none_or(|def| {
                    cache
                        .key_columns
                        .iter()
                        .eq(def.tag_columns().map(|c| &c.name))
                })
            };
            {
                let tables = self.tables.read();
                match tables.get(&tw.table) {
                    Some(c) if !c.default || keyed_by_tags(&c.cache) => {
                        c.cache.offer(&tw.batch);
                        continue;
                    }
                    _ if !self.defaults => continue,
                    _ => {}
                }
            }
            if let Some(def) = state.table_by_id(tw.table) {
                self.rekey(def);
            }
            if let Some(c) = self.tables.read().get(&tw.table) {
                c.cache.offer(&tw.batch);
            }
        }
    }

    /// Forgets the cache of a deleted table.
    pub(super) fn forget(&self, table: TableId) {
        self.tables.write().remove(&table);
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

    /// Gives `def` a default cache keyed by its tags now (unless another writer did, or it
    /// has a defined cache): a new one for a new table, or the rows of the one keyed by
    /// fewer tags, keyed again.
    fn rekey(&self, def: &TableDef) {
        let mut tables = self.tables.write();
        let keys = tags(def);
        let old = match tables.get(&def.id) {
            Some(c) if !c.default || c.cache.key_columns == keys => return,
            held => held.map(|c| Arc::clone(&c.cache)),
        };
        let cache = Arc::new(LastCache::new(keys, self.max_series));
        let seeded = match old.as_deref() {
            None => Ok(()),
            Some(old) => match old.status() {
                CacheStatus::Warm => old.rows(&def.schema()).map(|rows| cache.offer(&rows)),
                CacheStatus::Warming => Err(ArrowError::InvalidArgumentError(
                    "the table's tags changed while its last-value cache warmed; it warms \
                     again at the next start"
                        .into(),
                )),
                CacheStatus::Failed(reason) => {
                    Err(ArrowError::InvalidArgumentError(reason.to_string()))
                }
            },
        };
        match seeded.and_then(|()| cache.warming().finish()) {
            Ok(()) => {}
            Err(e) => cache.fail(e.to_string()),
        }
        tables.insert(
            def.id,
            TableCache {
                cache,
                default: true,
            },
        );
    }

    /// Stores the rows of every default cache offered writes since its last snapshot, and
    /// a manifest saying the snapshots cover the WAL through `through`. A cache that cannot
    /// answer is left out (a later start reads its table).
    pub(super) async fn snapshot(
        &self,
        store: &Arc<dyn ObjectStore>,
        state: &CatalogState,
        through: SequenceNumber,
    ) -> Result<()> {
        let mut stored = self.stored.lock().await;
        let defaults: Vec<(TableId, Arc<LastCache>)> = self
            .tables
            .read()
            .iter()
            .filter(|(_, c)| c.default)
            .map(|(id, c)| (*id, Arc::clone(&c.cache)))
            .collect();
        let mut manifest = Manifest {
            through,
            tables: Vec::new(),
        };
        let put = |path: Path, bytes: Vec<u8>| async move {
            store
                .put(&path, PutPayload::from(bytes))
                .await
                .map(drop)
                .map_err(|source| Error::Store {
                    path: path.to_string(),
                    source,
                })
        };
        for (table, cache) in defaults {
            let Some(def) = state.table_by_id(table).filter(|_| cache.is_warm()) else {
                stored.remove(&table);
                continue;
            };
            manifest.tables.push(table);
            let version = (cache.id(), cache.offered());
            if stored.get(&table) == Some(&version) {
                continue;
            }
            let rows = cache.rows(&def.schema()).map_err(Error::LastCache)?;
            put(
                snapshot_path(table),
                encode_snapshot(&rows).map_err(Error::LastCache)?,
            )
            .await?;
            stored.insert(table, version);
        }
        manifest.tables.sort();
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        put(manifest_path(), bytes).await
    }
}

fn encode_snapshot(rows: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, &rows.schema())?;
    writer.write(rows)?;
    writer.finish()?;
    drop(writer);
    Ok(out)
}

fn decode_snapshot(bytes: &[u8]) -> Result<Vec<RecordBatch>, ArrowError> {
    crate::ipc::check_framing(bytes).map_err(ArrowError::IpcError)?;
    crate::ipc::guarded("a last-value snapshot", || {
        StreamReader::try_new(Cursor::new(bytes), None)?.collect()
    })
}

/// The rows of `table`'s snapshot.
async fn load_snapshot(
    store: &Arc<dyn ObjectStore>,
    table: TableId,
) -> Result<Vec<RecordBatch>, String> {
    match read(store, &snapshot_path(table)).await {
        Ok(Some(bytes)) => decode_snapshot(&bytes).map_err(|e| e.to_string()),
        Ok(None) => Err("the manifest names it but it is missing".into()),
        Err(e) => Err(crate::error_chain(&e)),
    }
}

/// The bytes at `path`; `None` if there are none.
async fn read(store: &Arc<dyn ObjectStore>, path: &Path) -> Result<Option<bytes::Bytes>> {
    let got = async { store.get(path).await?.bytes().await };
    match got.await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(source) => Err(Error::Store {
            path: path.to_string(),
            source,
        }),
    }
}

/// Default caches loaded from snapshots before the WAL is replayed onto them, and the
/// tables whose cache must be warmed by reading them.
pub(super) struct Loaded {
    caches: Arc<LastCaches>,
    from_snapshots: Vec<Arc<LastCache>>,
    /// With whether each is a default cache (else defined in the catalog).
    to_warm: Vec<(LastCacheDef, bool)>,
}

impl Loaded {
    /// The caches, to register with the engine (replayed writes go to them first).
    pub(super) fn caches(&self) -> &Arc<LastCaches> {
        &self.caches
    }
}

/// No caches yet.
pub(super) fn empty(defaults: bool, max_series: usize) -> Loaded {
    Loaded {
        caches: Arc::new(LastCaches::new(defaults, max_series)),
        from_snapshots: Vec::new(),
        to_warm: Vec::new(),
    }
}

/// Where default caches' snapshots are read from: a writer's own objects, and the last
/// sequence of its WAL in persisted segments, which its manifest must cover.
pub(super) struct SnapshotSource {
    pub store: Arc<dyn ObjectStore>,
    pub persisted: SequenceNumber,
}

/// Loads the default caches' snapshots of every table without a defined cache (when
/// default caches are on). A table's cache holds the snapshots of every source that has
/// one for it (a querier's sources are every writer of a cluster): each key keeps its
/// latest row among them. If any source's snapshots do not cover what it persisted, no
/// table's cache is taken from snapshots: one would miss that source's rows.
pub(super) async fn load(
    sources: &[SnapshotSource],
    state: &CatalogState,
    defaults: bool,
    max_series: usize,
) -> Loaded {
    let caches = Arc::new(LastCaches::new(defaults, max_series));
    let mut loaded = Loaded {
        caches: Arc::clone(&caches),
        from_snapshots: Vec::new(),
        to_warm: state
            .last_caches
            .values()
            .map(|def| (def.clone(), false))
            .collect(),
    };
    if !defaults {
        return loaded;
    }
    // Left empty if any source's snapshots fall short: then no table has snapshots.
    let mut covered = Vec::with_capacity(sources.len());
    for source in sources {
        match covered_tables(source).await {
            Some(tables) => covered.push(tables),
            None => {
                covered.clear();
                break;
            }
        }
    }
    for def in state.tables.values() {
        if state.last_caches.contains_key(&def.id) {
            continue;
        }
        let keys = tags(def);
        let mut snapshots = Vec::new();
        for (source, covered) in sources.iter().zip(&covered) {
            if covered.binary_search(&def.id).is_err() {
                continue;
            }
            match load_snapshot(&source.store, def.id).await {
                Ok(batches) => snapshots.push(batches),
                Err(reason) => {
                    tracing::warn!(table = %def.id, %reason, "a last-value snapshot cannot be read; the cache reads the table");
                    snapshots.clear();
                    break;
                }
            }
        }
        if snapshots.is_empty() {
            loaded.to_warm.push((
                LastCacheDef {
                    table: def.id,
                    key_columns: keys,
                },
                true,
            ));
            continue;
        }
        let cache = Arc::new(LastCache::new(keys, max_series));
        for batch in snapshots.iter().flatten() {
            cache.offer(batch);
        }
        caches.tables.write().insert(
            def.id,
            TableCache {
                cache: Arc::clone(&cache),
                default: true,
            },
        );
        loaded.from_snapshots.push(cache);
    }
    loaded
}

/// The tables `source`'s snapshots cover; `None` if they do not cover every write it
/// persisted (or cannot be read).
async fn covered_tables(source: &SnapshotSource) -> Option<Vec<TableId>> {
    let manifest = read(&source.store, &manifest_path())
        .await
        .map_err(|e| crate::error_chain(&e))
        .and_then(|bytes| {
            bytes
                .map(|b| serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string()))
                .transpose()
        })
        .map_err(|reason| {
            tracing::warn!(%reason, "the last-value manifest cannot be read; caches read their tables");
        })
        .ok()?;
    match manifest {
        Some(m) if m.through >= source.persisted => Some(m.tables),
        // Nothing persisted, nothing to cover.
        None if source.persisted == SequenceNumber::default() => Some(Vec::new()),
        _ => {
            tracing::info!(
                "the last-value snapshots are older than the persisted data; caches read their tables"
            );
            None
        }
    }
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
        for (def, default) in &loaded.to_warm {
            self.start_last_cache(def, *default);
        }
    }

    /// For a read-only engine (a querier): the default caches as the writers' snapshots
    /// hold them (the single writer's, or every ingester's of a cluster, merged), replacing
    /// those it had. No write reaches a querier to feed a cache, but a writer stores its
    /// snapshots before each persistence's catalog entry, so loaded again whenever a
    /// writer's persisted sequence moves they cover what the querier's segments hold. A
    /// table without a usable snapshot, or with a cache defined in the catalog, gets none
    /// here: queries read the table.
    pub(super) async fn load_snapshot_caches(&self) {
        let state = self.catalog.snapshot();
        // The single writer's snapshots, and each of a cluster's writers' own.
        let mut sources = vec![SnapshotSource {
            store: Arc::clone(&self.store),
            persisted: state.persisted_sequence,
        }];
        for (writer, persisted) in &state.writers_persisted {
            sources.push(SnapshotSource {
                store: super::own_store(&self.store, Some(writer)),
                persisted: *persisted,
            });
        }
        let loaded = load(
            &sources,
            &state,
            self.config.default_last_caches,
            self.last_caches.max_series,
        )
        .await;
        for cache in loaded.from_snapshots {
            if let Err(e) = cache.warming().finish() {
                cache.fail(e.to_string());
            }
        }
        let tables = std::mem::take(&mut *loaded.caches.tables.write());
        *self.last_caches.tables.write() = tables;
    }

    /// Registers a cache for `def` (fed by writes from now on) and warms it in the
    /// background from the table's segments and buffer.
    fn start_last_cache(self: &Arc<Self>, def: &LastCacheDef, default: bool) {
        let cache = Arc::new(LastCache::new(
            def.key_columns.clone(),
            self.last_caches.max_series,
        ));
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
                let batches = self.read_segment(segment).await?;
                let batches = super::deletes::without_deleted(&data.tombstones, segment, batches)?;
                warming = gather(warming, batches).await?;
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

    /// Gives `table` the cache the catalog says it has (its defined one, else its default
    /// one when those are on, else none), warmed from its rows as they are now: after a
    /// delete removed rows its cache may hold, or its defined cache was dropped.
    pub(super) fn rebuild_last_cache(self: &Arc<Self>, table: TableId) {
        self.last_caches.forget(table);
        let state = self.catalog.snapshot();
        match (state.last_caches.get(&table), state.table_by_id(table)) {
            (Some(def), _) => self.start_last_cache(def, false),
            (None, Some(t)) if self.last_caches.defaults => self.start_last_cache(
                &LastCacheDef {
                    table,
                    key_columns: tags(t),
                },
                true,
            ),
            _ => {}
        }
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
            self.rebuild_last_cache(id);
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

//! A local disk cache of segment files, for a server whose object store is remote (S3,
//! GCS, Azure).
//!
//! A segment is fetched whole the first time a query reads any of it, kept in a directory
//! of the data directory, and served from there afterwards; the cache evicts the least
//! recently used files when it holds more bytes than its budget. Segments this server
//! persists are cached as they are written. Every other object (the catalog, snapshots)
//! goes straight to the remote store.
//!
//! A cached copy is never stale: a segment file is written once, under a name of its own,
//! and only ever deleted (by compaction, retention or a dropped table), which this store
//! passes on to the cache. A file is copied under a temporary name, synced and renamed, so
//! one that exists after a crash is whole; the cache's index is rebuilt from the directory
//! on start.
//!
//! The store also counts the requests that reach the remote store, by kind.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

/// Objects under this prefix are segments: immutable, and cached.
const CACHED_PREFIX: &str = "segments/";
/// Files being copied in carry this in their name; a start removes leftovers.
const PARTIAL_MARK: &str = ".partial-";

/// What the cache did, and the requests that reached the remote store.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Bytes copied from the remote store into the cache.
    pub fetched_bytes: AtomicU64,
    pub evictions: AtomicU64,
    /// Requests sent to the remote store, by kind.
    pub remote_gets: AtomicU64,
    pub remote_heads: AtomicU64,
    pub remote_puts: AtomicU64,
    pub remote_lists: AtomicU64,
    pub remote_deletes: AtomicU64,
    pub remote_copies: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    /// When it was last read or written, in the index's own ticks.
    used: u64,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, Entry>,
    bytes: u64,
    tick: u64,
}

/// The cache directory, its index and counters: what a delete's stream reaches after
/// the call that made it returned.
#[derive(Debug)]
struct Local {
    dir: PathBuf,
    files: LocalFileSystem,
    max_bytes: u64,
    index: parking_lot::Mutex<Index>,
    stats: CacheStats,
    copies: AtomicU64,
}

/// A remote object store with a bounded disk cache of its segment files.
#[derive(Debug)]
pub struct SegmentCache {
    remote: Arc<dyn ObjectStore>,
    local: Arc<Local>,
    /// One copy at a time per file: queries that miss the same segment wait for one copy.
    filling: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Files found larger than the whole cache: read from the remote store without trying.
    too_big: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Display for SegmentCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SegmentCache({}, {})",
            self.local.dir.display(),
            self.remote
        )
    }
}

impl SegmentCache {
    /// A cache of at most `max_bytes` in `dir` (created if missing) in front of `remote`;
    /// files a previous run cached are kept, oldest first to go.
    pub fn open(
        remote: Arc<dyn ObjectStore>,
        dir: impl Into<PathBuf>,
        max_bytes: u64,
    ) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        let files = LocalFileSystem::new_with_prefix(&dir).map_err(std::io::Error::other)?;
        let mut found = Vec::new();
        scan(&dir, &dir, &mut found)?;
        // Least recently modified first: the first to be evicted.
        found.sort_by_key(|(_, _, modified)| *modified);
        let mut index = Index::default();
        for (key, bytes, _) in found {
            index.tick += 1;
            index.bytes += bytes;
            index.entries.insert(
                key,
                Entry {
                    bytes,
                    used: index.tick,
                },
            );
        }
        let local = Arc::new(Local {
            dir,
            files,
            max_bytes,
            index: parking_lot::Mutex::new(index),
            stats: CacheStats::default(),
            copies: AtomicU64::new(0),
        });
        local.evict();
        Ok(Self {
            remote,
            local,
            filling: parking_lot::Mutex::new(HashMap::new()),
            too_big: parking_lot::Mutex::new(Default::default()),
        })
    }

    pub fn stats(&self) -> &CacheStats {
        &self.local.stats
    }

    /// Bytes and files the cache holds now.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.local.index.lock();
        (index.bytes, index.entries.len())
    }

    pub fn max_bytes(&self) -> u64 {
        self.local.max_bytes
    }

    /// Copies `location` whole from the remote store into the cache. False when it does
    /// not fit in the cache at all.
    async fn fill(&self, location: &Path) -> std::result::Result<bool, FillError> {
        let key = location.as_ref().to_owned();
        let lock = {
            let mut filling = self.filling.lock();
            Arc::clone(filling.entry(key.clone()).or_default())
        };
        let guard = lock.lock().await;
        let filled = async {
            if self.local.touch(&key) {
                return Ok(true);
            }
            self.local.stats.remote_gets.fetch_add(1, Ordering::Relaxed);
            let got = self
                .remote
                .get_opts(location, GetOptions::default())
                .await?;
            let size = got.meta.size;
            if size > self.local.max_bytes {
                self.too_big.lock().insert(key.clone());
                return Ok(false);
            }
            self.local.write(&key, got.into_stream()).await?;
            self.local
                .stats
                .fetched_bytes
                .fetch_add(size, Ordering::Relaxed);
            self.local.insert(&key, size);
            Ok(true)
        }
        .await;
        drop(guard);
        self.filling.lock().remove(&key);
        filled
    }
}

/// Why a file could not be copied into the cache; the read then goes to the remote store.
#[derive(Debug, thiserror::Error)]
enum FillError {
    #[error("reading it from the object store failed")]
    Remote(#[from] object_store::Error),
    #[error("writing it into the cache failed")]
    Local(#[from] std::io::Error),
}

impl Local {
    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Whether `key` is cached (without marking it used).
    fn holds(&self, key: &str) -> bool {
        self.index.lock().entries.contains_key(key)
    }

    /// Marks `key` used; false when it is not cached.
    fn touch(&self, key: &str) -> bool {
        let mut index = self.index.lock();
        index.tick += 1;
        let tick = index.tick;
        match index.entries.get_mut(key) {
            Some(entry) => {
                entry.used = tick;
                true
            }
            None => false,
        }
    }

    fn insert(&self, key: &str, bytes: u64) {
        {
            let mut index = self.index.lock();
            index.tick += 1;
            let used = index.tick;
            if let Some(old) = index.entries.insert(key.to_owned(), Entry { bytes, used }) {
                index.bytes -= old.bytes;
            }
            index.bytes += bytes;
        }
        self.evict();
    }

    /// Drops `key` from the cache (its file deleted, or found missing).
    fn forget(&self, key: &str) {
        let removed = {
            let mut index = self.index.lock();
            let removed = index.entries.remove(key);
            if let Some(entry) = &removed {
                index.bytes -= entry.bytes;
            }
            removed
        };
        if removed.is_some()
            && let Err(e) = std::fs::remove_file(self.path_of(key))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = key, error = %e, "cannot remove a cached segment");
        }
    }

    /// Evicts the least recently used files until the cache is within its budget.
    fn evict(&self) {
        loop {
            let victim = {
                let index = self.index.lock();
                if index.bytes <= self.max_bytes {
                    return;
                }
                index
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(k, _)| k.clone())
            };
            let Some(victim) = victim else { return };
            self.forget(&victim);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes `stream` as the cached copy of `key`: a temporary file, synced, renamed.
    async fn write(
        &self,
        key: &str,
        mut stream: BoxStream<'static, Result<bytes::Bytes>>,
    ) -> std::result::Result<(), FillError> {
        let path = self.path_of(key);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let partial = PathBuf::from(format!(
            "{}{PARTIAL_MARK}{}",
            path.display(),
            self.copies.fetch_add(1, Ordering::Relaxed)
        ));
        let written = async {
            let mut file = tokio::fs::File::create(&partial).await?;
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk?).await?;
            }
            file.sync_data().await?;
            tokio::fs::rename(&partial, &path).await?;
            Ok::<_, FillError>(())
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        written
    }
}

/// Every cached file under `dir` as (key, bytes, modified); leftovers of copies cut
/// short are removed.
fn scan(
    root: &FsPath,
    dir: &FsPath,
    found: &mut Vec<(String, u64, std::time::SystemTime)>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            scan(root, &path, found)?;
        } else if path.to_string_lossy().contains(PARTIAL_MARK) {
            std::fs::remove_file(&path)?;
        } else if let Ok(key) = path.strip_prefix(root) {
            let key = key.to_string_lossy().into_owned();
            found.push((key, meta.len(), meta.modified()?));
        }
    }
    Ok(())
}

fn cached(location: &Path) -> bool {
    location.as_ref().starts_with(CACHED_PREFIX)
}

/// A read that asks for conditions or a version is the remote store's to answer.
fn plain(options: &GetOptions) -> bool {
    options.if_match.is_none()
        && options.if_none_match.is_none()
        && options.if_modified_since.is_none()
        && options.if_unmodified_since.is_none()
        && options.version.is_none()
}

#[async_trait]
impl ObjectStore for SegmentCache {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.local.stats.remote_puts.fetch_add(1, Ordering::Relaxed);
        let result = self
            .remote
            .put_opts(location, payload.clone(), opts)
            .await?;
        let len = payload.content_length() as u64;
        if cached(location) && len <= self.local.max_bytes {
            let key = location.as_ref();
            let chunks: Vec<Result<bytes::Bytes>> = payload.into_iter().map(Ok).collect();
            match self
                .local
                .write(key, futures::stream::iter(chunks).boxed())
                .await
            {
                Ok(()) => self.local.insert(key, len),
                Err(e) => {
                    tracing::warn!(file = key, error = %crate::error_chain(&e), "cannot cache a segment as it is written")
                }
            }
        }
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.local.stats.remote_puts.fetch_add(1, Ordering::Relaxed);
        self.remote.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let key = location.as_ref();
        // A HEAD of a file not cached is no reason to copy it.
        let local = cached(location)
            && plain(&options)
            && (!options.head || self.local.holds(key))
            && self.make_local(location).await?;
        if local {
            match self.local.files.get_opts(location, options.clone()).await {
                Ok(got) => return Ok(got),
                // Removed behind the cache's back: read from the store.
                Err(object_store::Error::NotFound { .. }) => self.local.forget(key),
                Err(e) => return Err(e),
            }
        }
        self.count_get(&options);
        self.remote.get_opts(location, options).await
    }

    /// Column chunks of a Parquet file, as the query engine reads them: from the cached
    /// copy in one go (the local store reads every range of a file in one blocking task),
    /// else one request per coalesced range.
    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        if cached(location) && self.make_local(location).await? {
            match self.local.files.get_ranges(location, ranges).await {
                Ok(got) => return Ok(got),
                Err(object_store::Error::NotFound { .. }) => self.local.forget(location.as_ref()),
                Err(e) => return Err(e),
            }
        }
        object_store::coalesce_ranges(
            ranges,
            |range| async move {
                let options = GetOptions {
                    range: Some(range.into()),
                    ..Default::default()
                };
                self.count_get(&options);
                self.remote.get_opts(location, options).await?.bytes().await
            },
            object_store::OBJECT_STORE_COALESCE_DEFAULT,
        )
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let local = Arc::clone(&self.local);
        let counted = Arc::clone(&self.local);
        let locations = locations
            .inspect_ok(move |_| {
                counted.stats.remote_deletes.fetch_add(1, Ordering::Relaxed);
            })
            .boxed();
        self.remote
            .delete_stream(locations)
            .inspect_ok(move |path| local.forget(path.as_ref()))
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.local
            .stats
            .remote_lists
            .fetch_add(1, Ordering::Relaxed);
        self.remote.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.local
            .stats
            .remote_lists
            .fetch_add(1, Ordering::Relaxed);
        self.remote.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.local
            .stats
            .remote_lists
            .fetch_add(1, Ordering::Relaxed);
        self.remote.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.local
            .stats
            .remote_copies
            .fetch_add(1, Ordering::Relaxed);
        self.remote.copy_opts(from, to, options).await
    }
}

impl SegmentCache {
    /// Whether the segment at `location` can be read from the cache: it is there (a hit),
    /// or it is copied in now (a miss). False when it must be read from the remote store:
    /// it is larger than the whole cache, or the copy failed (logged). A segment missing
    /// from the store is the caller's error, as without a cache.
    async fn make_local(&self, location: &Path) -> Result<bool> {
        let key = location.as_ref();
        if self.local.touch(key) {
            self.local.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        if self.too_big.lock().contains(key) {
            return Ok(false);
        }
        self.local.stats.misses.fetch_add(1, Ordering::Relaxed);
        let fetch = tracing::debug_span!("fetch segment", file = key);
        match self.fill(location).instrument(fetch).await {
            Ok(filled) => Ok(filled),
            Err(FillError::Remote(e @ object_store::Error::NotFound { .. })) => Err(e),
            Err(e) => {
                tracing::warn!(file = key, error = %crate::error_chain(&e), "cannot cache a segment; reading it from the object store");
                Ok(false)
            }
        }
    }

    fn count_get(&self, options: &GetOptions) {
        let counter = if options.head {
            &self.local.stats.remote_heads
        } else {
            &self.local.stats.remote_gets
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use object_store::{GetRange, ObjectStoreExt};

    use super::*;

    fn open(remote: &Arc<InMemory>, dir: &FsPath, max_bytes: u64) -> SegmentCache {
        SegmentCache::open(Arc::clone(remote) as _, dir, max_bytes).unwrap()
    }

    async fn put_remote(remote: &InMemory, key: &str, len: usize) -> Vec<u8> {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        remote
            .put(&Path::from(key), PutPayload::from(bytes.clone()))
            .await
            .unwrap();
        bytes
    }

    async fn read_range(cache: &SegmentCache, key: &str, range: std::ops::Range<u64>) -> Vec<u8> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let got = cache.get_opts(&Path::from(key), options).await.unwrap();
        got.bytes().await.unwrap().to_vec()
    }

    fn gets(cache: &SegmentCache) -> u64 {
        cache.stats().remote_gets.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_segment_is_fetched_once_then_read_from_disk_and_other_objects_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(InMemory::new());
        let a = put_remote(&remote, "segments/1/1/0-a.parquet", 1000).await;
        let log = put_remote(&remote, "catalog/log/1", 10).await;
        let cache = open(&remote, dir.path(), 10_000);

        assert_eq!(
            read_range(&cache, "segments/1/1/0-a.parquet", 990..1000).await,
            a[990..]
        );
        assert_eq!(gets(&cache), 1);
        assert_eq!(
            read_range(&cache, "segments/1/1/0-a.parquet", 0..10).await,
            a[..10]
        );
        assert_eq!(gets(&cache), 1, "the second read is the disk's");
        assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 1);
        // Column chunks, as the query engine asks for them.
        let ranges = cache
            .get_ranges(&Path::from("segments/1/1/0-a.parquet"), &[0..10, 500..520])
            .await
            .unwrap();
        assert_eq!(ranges[0], a[..10]);
        assert_eq!(ranges[1], a[500..520]);
        assert_eq!(gets(&cache), 1);
        assert_eq!(cache.usage(), (1000, 1));

        for _ in 0..2 {
            assert_eq!(read_range(&cache, "catalog/log/1", 0..10).await, log);
        }
        assert_eq!(gets(&cache), 3, "the catalog is never cached");

        let missing = cache.get(&Path::from("segments/1/1/0-gone.parquet")).await;
        assert!(
            matches!(missing, Err(object_store::Error::NotFound { .. })),
            "{missing:?}"
        );
    }

    #[tokio::test]
    async fn the_least_recently_used_segments_go_when_the_cache_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(InMemory::new());
        for name in ["a", "b", "c"] {
            put_remote(&remote, &format!("segments/{name}.parquet"), 100).await;
        }
        put_remote(&remote, "segments/huge.parquet", 1000).await;
        let cache = open(&remote, dir.path(), 250);
        read_range(&cache, "segments/a.parquet", 0..1).await;
        read_range(&cache, "segments/b.parquet", 0..1).await;
        read_range(&cache, "segments/a.parquet", 0..1).await;
        read_range(&cache, "segments/c.parquet", 0..1).await;
        // b was the least recently used.
        assert_eq!(cache.usage(), (200, 2));
        assert_eq!(cache.stats().evictions.load(Ordering::Relaxed), 1);
        assert!(!dir.path().join("segments/b.parquet").exists());
        let before = gets(&cache);
        read_range(&cache, "segments/a.parquet", 0..1).await;
        assert_eq!(gets(&cache), before);
        read_range(&cache, "segments/b.parquet", 0..1).await;
        assert_eq!(gets(&cache), before + 1);

        // A file larger than the whole cache is read from the remote store every time.
        let before = gets(&cache);
        for _ in 0..2 {
            assert_eq!(
                read_range(&cache, "segments/huge.parquet", 998..1000)
                    .await
                    .len(),
                2
            );
        }
        assert_eq!(
            gets(&cache),
            before + 3,
            "a probe the first time, then reads"
        );
        let ranges = cache
            .get_ranges(&Path::from("segments/huge.parquet"), &[0..2, 998..1000])
            .await
            .unwrap();
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 4);
        assert_eq!(
            gets(&cache),
            before + 4,
            "near ranges coalesce into one request"
        );
        assert!(cache.usage().0 <= 250);
    }

    #[tokio::test]
    async fn writes_are_cached_deletes_remove_copies_and_a_restart_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(InMemory::new());
        let cache = open(&remote, dir.path(), 10_000);
        for name in ["a", "b"] {
            cache
                .put(
                    &Path::from(format!("segments/{name}.parquet")),
                    PutPayload::from(vec![7u8; 100]),
                )
                .await
                .unwrap();
        }
        assert_eq!(cache.usage(), (200, 2));
        read_range(&cache, "segments/a.parquet", 0..100).await;
        assert_eq!(gets(&cache), 0, "what this server wrote is read from disk");

        cache
            .delete(&Path::from("segments/b.parquet"))
            .await
            .unwrap();
        assert_eq!(cache.usage(), (100, 1));
        assert!(!dir.path().join("segments/b.parquet").exists());
        assert!(remote.get(&Path::from("segments/b.parquet")).await.is_err());

        // A copy a crash cut short is removed on start; whole ones are kept.
        std::fs::write(dir.path().join("segments/c.parquet.partial-3"), b"xx").unwrap();
        drop(cache);
        let cache = open(&remote, dir.path(), 10_000);
        assert_eq!(cache.usage(), (100, 1));
        assert!(!dir.path().join("segments/c.parquet.partial-3").exists());
        assert_eq!(
            read_range(&cache, "segments/a.parquet", 0..100).await,
            vec![7u8; 100]
        );
        assert_eq!(gets(&cache), 0);
    }
}

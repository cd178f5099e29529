//! The catalog with a long history behind it: how long loading takes (the catalog's part
//! of a server's start-up) and how long a commit takes, after `--events` transactions.
//!
//! History as years of a plant server make it: 10 tables, one segment persisted per table
//! per transaction, four segments per hourly partition merged by a compaction (so a
//! quarter of the segments ever written are live). It is written through a plain local
//! store (no fsync, to build it quickly); loads and the measured commits then run on the
//! fsync'd store the server uses.
//!
//! ```text
//! cargo bench -p kiln-storage --bench catalog_history -- --events 100000 --commits 2000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_storage::catalog::{Catalog, CatalogEvent, ColumnType, SchemaChange, SegmentMeta};
use kiln_storage::durable_store::DurableLocalStore;
use kiln_storage::ids::{SegmentId, SequenceNumber, TableId};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

const TABLES: u32 = 10;
const HOUR: i64 = 3_600_000_000_000;
const PER_PARTITION: u64 = 4;

/// The history's generator: which event comes next.
struct History {
    tables: Vec<TableId>,
    next_segment: u64,
    /// Per table, the live segments of its newest partition.
    open: Vec<Vec<SegmentId>>,
    written: u64,
}

impl History {
    fn event(&mut self) -> CatalogEvent {
        let t = (self.written % u64::from(TABLES)) as usize;
        let table = self.tables[t];
        // Per table: four segments of a partition, then their compaction, then the next hour.
        let partition = (self.written / u64::from(TABLES) / (PER_PARTITION + 1)) as i64 * HOUR;
        let max_sequence = SequenceNumber(self.written + 1);
        let segment = |id: u64| SegmentMeta {
            id: SegmentId(id),
            table,
            partition,
            path: format!("segments/1/{}/{partition}-{id:020}.parquet", table.get()),
            min_time: partition,
            max_time: partition + HOUR - 1,
            rows: 36_000,
            bytes: 1 << 20,
            max_sequence,
        };
        self.written += 1;
        if self.open[t].len() as u64 == PER_PARTITION {
            let replaced = std::mem::take(&mut self.open[t]);
            self.next_segment += 1;
            return CatalogEvent::SegmentsCompacted {
                replaced,
                segment: segment(self.next_segment),
            };
        }
        self.next_segment += 1;
        self.open[t].push(SegmentId(self.next_segment));
        CatalogEvent::SegmentPersisted(segment(self.next_segment))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn dir_stats(dir: &std::path::Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                let (f, b) = dir_stats(&e.path());
                files += f;
                bytes += b;
            } else {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (files, bytes)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events = arg("--events", 100_000);
    let commits = arg("--commits", 2_000);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("objects");
    std::fs::create_dir_all(&root).unwrap();

    // Build the history quickly, without fsync.
    let fast: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&root).unwrap());
    let catalog = Arc::new(Catalog::load(Arc::clone(&fast), HOUR).await.unwrap());
    let changes: Vec<SchemaChange> = (0..TABLES)
        .map(|t| SchemaChange {
            table: format!("t{t}"),
            column: "v".into(),
            ty: ColumnType::Float,
        })
        .collect();
    let state = catalog.ensure_schema("plant", &changes).await.unwrap();
    let tables: Vec<TableId> = (0..TABLES)
        .map(|t| state.table("plant", &format!("t{t}")).unwrap().id)
        .collect();
    let mut history = History {
        tables,
        next_segment: state.next_segment_id,
        open: vec![Vec::new(); TABLES as usize],
        written: 0,
    };
    let started = Instant::now();
    let mut build = Vec::with_capacity(events as usize);
    while history.written < events {
        let at = Instant::now();
        catalog.commit(vec![history.event()]).await.unwrap();
        build.push(at.elapsed());
    }
    let built = started.elapsed();
    drop(catalog);
    build.sort();
    let (files, bytes) = dir_stats(&root.join("catalog"));
    println!(
        "history: {events} transactions in {:.1} s (commit without fsync: p50 {}, p99 {}, max {}); \
         catalog on disk: {files} files, {:.1} MiB",
        built.as_secs_f64(),
        ms(percentile(&build, 0.5)),
        ms(percentile(&build, 0.99)),
        ms(*build.last().unwrap()),
        bytes as f64 / (1 << 20) as f64,
    );

    // Loads, on the store the server uses.
    let durable: Arc<dyn ObjectStore> = Arc::new(DurableLocalStore::new(&root).unwrap());
    let mut loads = Vec::new();
    let mut live = 0;
    for _ in 0..5 {
        let at = Instant::now();
        let catalog = Catalog::load(Arc::clone(&durable), HOUR).await.unwrap();
        loads.push(at.elapsed());
        live = catalog
            .snapshot()
            .segments
            .values()
            .map(|s| s.len())
            .sum::<usize>();
    }
    loads.sort();
    println!(
        "load: median {} (min {}, max {}) of 5; {live} live segments",
        ms(percentile(&loads, 0.5)),
        ms(loads[0]),
        ms(loads[4]),
    );

    // The storage engine's whole start-up on it (catalog, empty WAL, sweep of the store).
    let mut opens = Vec::new();
    for _ in 0..5 {
        let config = kiln_storage::EngineConfig::new(tmp.path().join("wal"));
        let at = Instant::now();
        let engine = kiln_storage::Engine::open(config, Arc::clone(&durable), None)
            .await
            .unwrap();
        opens.push(at.elapsed());
        engine.wal().shutdown();
    }
    opens.sort();
    println!("engine open: median {} of 5", ms(percentile(&opens, 0.5)));

    // Commits with fsync, as persistence and compaction make them.
    let catalog = Arc::new(Catalog::load(Arc::clone(&durable), HOUR).await.unwrap());
    let mut latencies = Vec::with_capacity(commits as usize);
    for _ in 0..commits {
        let at = Instant::now();
        catalog.commit(vec![history.event()]).await.unwrap();
        latencies.push(at.elapsed());
    }
    latencies.sort();
    println!(
        "commit (fsync'd) x{commits}: p50 {}, p99 {}, max {}",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
    );
    let (files, bytes) = dir_stats(&root.join("catalog"));
    println!(
        "catalog on disk after: {files} files, {:.1} MiB",
        bytes as f64 / (1 << 20) as f64
    );
}

use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringDictionaryBuilder, TimestampNanosecondArray};
use arrow::datatypes::{Int32Type, Schema};
use object_store::ObjectStore;

use super::*;
use crate::catalog::{ColumnType, SchemaChange};
use crate::dedup::merge_last_write_wins;
use crate::durable_store::DurableLocalStore;
use crate::write::TableWrite;

const HOUR: i64 = 3_600_000_000_000;

async fn open(dir: &std::path::Path) -> Arc<Engine> {
    let store: Arc<dyn ObjectStore> =
        Arc::new(DurableLocalStore::new(dir.join("objects")).unwrap());
    let mut config = EngineConfig::new(dir.join("wal"));
    config.wal_max_file_bytes = 4096;
    Engine::open(config, store, None).await.unwrap()
}

async fn write(engine: &Engine, rows: &[(&str, i64, f64)]) {
    write_from(engine, rows, Vec::new()).await
}

async fn write_from(engine: &Engine, rows: &[(&str, i64, f64)], sources: Vec<SourceRange>) {
    let batch = batch_of(engine, rows, sources).await;
    engine.write(batch).await.unwrap();
}

/// `rows` (host, time, v) of table `m` in database `db` as a write, creating the schema.
async fn batch_of(
    engine: &Engine,
    rows: &[(&str, i64, f64)],
    sources: Vec<SourceRange>,
) -> WriteBatch {
    let state = engine
        .catalog()
        .ensure_schema(
            "db",
            &[
                SchemaChange {
                    table: "m".into(),
                    column: "host".into(),
                    ty: ColumnType::Tag,
                },
                SchemaChange {
                    table: "m".into(),
                    column: "v".into(),
                    ty: ColumnType::Float,
                },
            ],
        )
        .await
        .unwrap();
    let def = state.table("db", "m").unwrap();
    let schema = Arc::new(Schema::new(vec![
        def.schema().field_with_name("time").unwrap().clone(),
        def.schema().field_with_name("host").unwrap().clone(),
        def.schema().field_with_name("v").unwrap().clone(),
    ]));
    let mut hosts = StringDictionaryBuilder::<Int32Type>::new();
    for (h, _, _) in rows {
        hosts.append_value(h);
    }
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampNanosecondArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(hosts.finish()),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    let database = state.database("db").unwrap().id;
    WriteBatch {
        database,
        tables: vec![TableWrite {
            table: def.id,
            batch,
        }],
        sources,
    }
}

/// The rows of segment `s`'s file, read back from the store.
async fn segment_rows(engine: &Engine, s: &SegmentMeta) -> Vec<RecordBatch> {
    let path = object_store::path::Path::from(s.path.as_str());
    let bytes = object_store::ObjectStoreExt::get(engine.store(), &path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1024)
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// Everything the table holds: buffer chunks merged with segments read back from disk.
async fn contents(engine: &Engine) -> RecordBatch {
    let state = engine.catalog_state();
    let def = state.table("db", "m").unwrap();
    let data = engine.table_data(def.id, i64::MIN, i64::MAX).unwrap();
    let mut batches = Vec::new();
    for s in &data.segments {
        batches.extend(segment_rows(engine, s).await);
    }
    for p in &data.buffer {
        batches.extend(p.chunks.iter().map(|c| c.batch.clone()));
    }
    merge_last_write_wins(&batches, &def.schema(), &crate::persist::sort_key(def)).unwrap()
}

#[tokio::test]
async fn persisted_data_reads_the_same_after_restart_and_wal_files_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for i in 0..50 {
        write(
            &engine,
            &[
                ("a", i * 1_000_000_000, i as f64),
                ("b", HOUR + i, -(i as f64)),
            ],
        )
        .await;
    }
    // Overwrite one row: last write wins.
    write(&engine, &[("a", 0, 100.0)]).await;
    let before = contents(&engine).await;
    assert_eq!(before.num_rows(), 100);
    let files_before = engine.wal().file_ids();
    assert!(
        files_before.len() > 1,
        "small files should have rotated: {files_before:?}"
    );

    let outcome = engine.persist().await.unwrap();
    assert_eq!(outcome.segments, 2, "one segment per hour partition");
    assert_eq!(outcome.rows, 100);
    assert_eq!(outcome.through, SequenceNumber(51));
    assert_eq!(engine.buffer_bytes(), 0);
    let after_files = engine.wal().file_ids();
    assert_eq!(
        after_files.len(),
        1,
        "only the fresh file remains: {after_files:?}"
    );
    assert!(after_files[0] > *files_before.last().unwrap());
    assert_eq!(contents(&engine).await, before);

    // More writes after persistence, overlapping a persisted row.
    write(&engine, &[("a", 0, 7.0), ("c", 5, 1.0)]).await;
    let expected = contents(&engine).await;
    assert_eq!(expected.num_rows(), 101);
    engine.wal().shutdown();
    drop(engine);

    let engine = open(dir.path()).await;
    assert_eq!(
        engine.catalog_state().persisted_sequence,
        SequenceNumber(51)
    );
    assert_eq!(contents(&engine).await, expected);
    // Sequences continue after the persisted ones.
    write(&engine, &[("d", 1, 1.0)]).await;
    assert_eq!(engine.buffer.applied_through(), SequenceNumber(53));
}

#[tokio::test]
async fn a_full_buffer_refuses_writes_until_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(DurableLocalStore::new(dir.path().join("objects")).unwrap());
    let mut config = EngineConfig::new(dir.path().join("wal"));
    config.max_buffer_bytes = 1;
    let engine = Engine::open(config, store, None).await.unwrap();
    write(&engine, &[("a", 1, 1.0)]).await;
    let state = engine.catalog_state();
    let def = state.table("db", "m").unwrap();
    let batch = engine
        .table_data(def.id, i64::MIN, i64::MAX)
        .unwrap()
        .buffer[0]
        .chunks[0]
        .batch
        .clone();
    let refused = engine
        .write(WriteBatch {
            database: state.database("db").unwrap().id,
            tables: vec![TableWrite {
                table: def.id,
                batch: batch.clone(),
            }],
            sources: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(refused.is_retryable(), "{refused}");
    engine.persist().await.unwrap();
    engine
        .write(WriteBatch {
            database: state.database("db").unwrap().id,
            tables: vec![TableWrite {
                table: def.id,
                batch,
            }],
            sources: Vec::new(),
        })
        .await
        .unwrap();
}

fn range(partition: i32, first: i64, last: i64) -> SourceRange {
    SourceRange {
        source: "kafka/g/t".into(),
        partition,
        first,
        last,
    }
}

/// A source's positions survive a crash (WAL replay), persistence that deletes the WAL
/// files recording them (catalog), and a write holding positions but no rows.
#[tokio::test]
async fn source_positions_survive_replay_and_persistence() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path()).await;
        assert_eq!(engine.source_position("kafka/g/t", 0), None);
        write_from(&engine, &[("a", 1, 1.0)], vec![range(0, 0, 9)]).await;
        write_from(
            &engine,
            &[("a", 2, 2.0)],
            vec![range(0, 10, 19), range(1, 0, 4)],
        )
        .await;
        assert_eq!(engine.source_position("kafka/g/t", 0), Some(19));
        // Dropped without shutdown: only the WAL knows.
    }
    let engine = open(dir.path()).await;
    assert_eq!(engine.source_position("kafka/g/t", 0), Some(19));
    assert_eq!(engine.source_position("kafka/g/t", 1), Some(4));
    let outcome = engine.persist().await.unwrap();
    assert!(outcome.wal_files_removed > 0, "{outcome:?}");
    assert_eq!(
        engine.catalog_state().source_position("kafka/g/t", 0),
        Some(19)
    );
    // Every message of a range rejected: the write carries positions only.
    let database = engine.catalog_state().database("db").unwrap().id;
    engine
        .write(WriteBatch {
            database,
            tables: Vec::new(),
            sources: vec![range(1, 5, 7)],
        })
        .await
        .unwrap();
    drop(engine);
    let engine = open(dir.path()).await;
    assert_eq!(engine.source_position("kafka/g/t", 0), Some(19));
    assert_eq!(engine.source_position("kafka/g/t", 1), Some(7));
    assert_eq!(contents(&engine).await.num_rows(), 2);
    assert_eq!(engine.source_positions().len(), 2);
}

/// The segment files under the store's `segments/` folder.
async fn segment_files(engine: &Engine) -> Vec<String> {
    let mut files: Vec<String> = engine
        .store()
        .list(Some(&object_store::path::Path::from("segments")))
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    files.sort();
    files
}

fn catalog_files(engine: &Engine) -> Vec<String> {
    let state = engine.catalog_state();
    let mut files: Vec<String> = state
        .segments
        .values()
        .flat_map(|s| s.iter())
        .map(|s| s.path.clone())
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn compaction_merges_a_partition_last_write_wins_and_keeps_files_its_readers_use() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    // Hour 0 persisted twice, the second time overwriting a row and adding others; hour 1
    // once, then hour 0 once more (late data).
    write(&engine, &[("a", 0, 1.0), ("a", 10, 2.0), ("b", 0, 3.0)]).await;
    engine.persist().await.unwrap();
    write(&engine, &[("a", 10, 20.0), ("c", 5, 4.0)]).await;
    engine.persist().await.unwrap();
    write(&engine, &[("a", HOUR, 5.0)]).await;
    engine.persist().await.unwrap();
    write(&engine, &[("b", 0, 30.0), ("d", 1, 6.0)]).await;
    engine.persist().await.unwrap();
    let expected = contents(&engine).await;
    assert_eq!(expected.num_rows(), 6);
    assert_eq!(segment_files(&engine).await.len(), 4);

    // A query in flight when the compaction commits.
    let state = engine.catalog_state();
    let table = state.table("db", "m").unwrap().id;
    let reader = engine.table_data(table, i64::MIN, i64::MAX).unwrap();
    let replaced: Vec<String> = reader
        .segments
        .iter()
        .filter(|s| s.partition == 0)
        .map(|s| s.path.clone())
        .collect();

    // The newest partition (hour 1) is left for later; hour 0 becomes one segment.
    let outcome = engine.compact(false).await.unwrap();
    assert_eq!(outcome.partitions, 1);
    assert_eq!(outcome.segments_replaced, 3);
    assert_eq!(outcome.rows, 5, "hour 0 holds five distinct rows");
    let segments = engine.catalog_state().segments(table).to_vec();
    assert_eq!(segments.len(), 2);
    assert_eq!(segments[0].partition, 0);
    assert_eq!(segments[0].rows, 5);
    assert_eq!(
        segments[0].max_sequence,
        SequenceNumber(4),
        "the newest write merged"
    );
    assert_eq!(
        contents(&engine).await,
        expected,
        "last write wins, as before"
    );
    assert_eq!(engine.stats().segments_compacted.load(Ordering::Relaxed), 3);

    // The reader's files are still there, however often deletion runs, until it is done.
    assert_eq!(engine.delete_retired().await, 0);
    assert_eq!(segment_files(&engine).await.len(), 5);
    drop(reader);
    assert_eq!(engine.delete_retired().await, 3);
    let files = segment_files(&engine).await;
    assert_eq!(files, catalog_files(&engine));
    assert!(replaced.iter().all(|p| !files.contains(p)), "{files:?}");

    // Nothing left to merge; with the newest partition included, still nothing (one segment).
    assert_eq!(engine.compact(true).await.unwrap().partitions, 0);
    engine.wal().shutdown();
    drop(engine);
    let engine = open(dir.path()).await;
    assert_eq!(
        contents(&engine).await,
        expected,
        "the same after a restart"
    );
    assert_eq!(segment_files(&engine).await, catalog_files(&engine));
}

/// Files compaction replaced stay for the grace period after this process's readers are
/// done: servers that only read (queriers) may be reading them until they follow the
/// catalog.
#[tokio::test]
async fn replaced_files_wait_out_the_grace_for_readers_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(DurableLocalStore::new(dir.path().join("objects")).unwrap());
    let mut config = EngineConfig::new(dir.path().join("wal"));
    config.retired_file_grace = std::time::Duration::from_millis(500);
    let engine = Engine::open(config, store, None).await.unwrap();
    write(&engine, &[("a", 0, 1.0)]).await;
    engine.persist().await.unwrap();
    write(&engine, &[("b", 0, 2.0)]).await;
    engine.persist().await.unwrap();
    assert_eq!(engine.compact(true).await.unwrap().segments_replaced, 2);
    assert_eq!(engine.delete_retired().await, 0, "within the grace");
    assert_eq!(segment_files(&engine).await.len(), 3);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(engine.delete_retired().await, 2);
    assert_eq!(segment_files(&engine).await, catalog_files(&engine));
}

#[tokio::test]
async fn files_a_crash_left_unreferenced_are_swept_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    write(&engine, &[("a", 0, 1.0)]).await;
    engine.persist().await.unwrap();
    write(&engine, &[("a", 0, 2.0), ("b", 0, 3.0)]).await;
    engine.persist().await.unwrap();
    let expected = contents(&engine).await;
    // A crash after the compaction's commit, before its deletions: a reader still held
    // the old files when the process died.
    let table = engine.catalog_state().table("db", "m").unwrap().id;
    let reader = engine.table_data(table, i64::MIN, i64::MAX).unwrap();
    assert_eq!(engine.compact(true).await.unwrap().segments_replaced, 2);
    // And a crash after writing a segment, before committing it.
    let stray = object_store::path::Path::from("segments/1/1/0-00000000000000000099.parquet");
    engine
        .store()
        .put(&stray, object_store::PutPayload::from_static(b"PAR1"))
        .await
        .unwrap();
    assert_eq!(segment_files(&engine).await.len(), 4);
    engine.wal().shutdown();
    drop(engine);

    let engine = open(dir.path()).await;
    assert_eq!(segment_files(&engine).await, catalog_files(&engine));
    assert_eq!(segment_files(&engine).await.len(), 1);
    assert_eq!(contents(&engine).await, expected);
    drop(reader);
}

/// A persistence whose catalog entry landed although the store reported an error (a lost
/// answer): the next persistence catches up with that entry, writes files of its own, and
/// takes segment ids after it. No file is named twice, none is overwritten, and every row
/// survives a restart.
#[tokio::test]
async fn a_persistence_whose_catalog_entry_landed_but_failed_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(crate::testing::FailingAfterPut::new(Arc::new(
        DurableLocalStore::new(dir.path().join("objects")).unwrap(),
    )));
    let open_failing = || async {
        let mut config = EngineConfig::new(dir.path().join("wal"));
        config.wal_max_file_bytes = 4096;
        Engine::open(config, Arc::clone(&failing) as _, None)
            .await
            .unwrap()
    };
    let engine = open_failing().await;
    write(&engine, &[("a", 0, 1.0), ("b", HOUR, 2.0)]).await;
    failing.fail_next_put_under("catalog/log/");
    assert!(engine.persist().await.is_err());
    // The entry is in the log, but this process was told otherwise: its state is behind.
    assert_eq!(catalog_files(&engine).len(), 0);

    write(&engine, &[("a", 0, 5.0), ("c", 1, 3.0)]).await;
    engine.persist().await.unwrap();
    let expected = contents(&engine).await;
    assert_eq!(expected.num_rows(), 3);
    let state = engine.catalog_state();
    let segments: Vec<&SegmentMeta> = state.segments.values().flat_map(|s| s.iter()).collect();
    // Two from the attempt whose entry landed, two from the next one.
    assert_eq!(segments.len(), 4, "{segments:?}");
    let mut ids: Vec<SegmentId> = segments.iter().map(|s| s.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "segment ids are unique: {segments:?}");
    assert_eq!(segment_files(&engine).await, catalog_files(&engine));
    // Every file holds the rows its entry says: none was rewritten under an entry.
    for s in &segments {
        let rows: usize = segment_rows(&engine, s)
            .await
            .iter()
            .map(RecordBatch::num_rows)
            .sum();
        assert_eq!(rows as u64, s.rows, "{}", s.path);
    }
    engine.wal().shutdown();
    drop(engine);

    let engine = open_failing().await;
    assert_eq!(segment_files(&engine).await, catalog_files(&engine));
    assert_eq!(contents(&engine).await, expected);
}

/// (host, first_seen, last_seen) of every series of table `m`, sorted.
fn series_of(engine: &Engine) -> Vec<(String, i64, i64)> {
    let mut out: Vec<_> = engine
        .series()
        .series()
        .into_iter()
        .map(|s| (s.tags["host"].clone(), s.first_seen, s.last_seen))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn the_series_inventory_survives_restarts_through_its_snapshot_and_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    write(&engine, &[("a", 10, 1.0), ("b", 20, 1.0), ("a", 30, 1.0)]).await;
    // Out of order for `a` (25 < 30) and, once persisted, late for its partition.
    write(&engine, &[("a", 25, 1.0)]).await;
    let quality = engine.series().quality();
    let q = quality.values().next().unwrap();
    assert_eq!((q.rows, q.out_of_order_rows, q.late_rows), (4, 1, 0));
    engine.persist().await.unwrap();
    write(&engine, &[("a", 5, 1.0), ("c", HOUR + 1, 1.0)]).await;
    let q = engine.series().quality().values().next().copied().unwrap();
    assert_eq!((q.out_of_order_rows, q.late_rows), (2, 1));
    let expected = vec![
        ("a".to_owned(), 5, 30),
        ("b".to_owned(), 20, 20),
        ("c".to_owned(), HOUR + 1, HOUR + 1),
    ];
    assert_eq!(series_of(&engine), expected);
    let (minute, hour) = engine.series().series()[0].recent_rows(engine.series().now());
    assert!(minute >= 1 && hour >= minute, "{minute} {hour}");
    drop(engine);

    // The persisted part comes from the snapshot (its WAL files are gone), the rest from
    // the WAL; replayed rows are not counted as recent.
    let engine = open(dir.path()).await;
    assert_eq!(series_of(&engine), expected);
    assert!(
        engine
            .series()
            .series()
            .iter()
            .all(|s| s.recent_rows(engine.series().now()) == (0, 0))
    );
    assert!(engine.series().quality().is_empty());
    engine.persist().await.unwrap();
    drop(engine);
    let engine = open(dir.path()).await;
    assert_eq!(series_of(&engine), expected);

    // A snapshot that cannot be read leaves the inventory to the WAL, and start-up goes on.
    engine
        .store()
        .put(
            &Path::from(crate::series::SNAPSHOT_PATH),
            PutPayload::from_static(b"{\"version\": 7}"),
        )
        .await
        .unwrap();
    drop(engine);
    let engine = open(dir.path()).await;
    assert!(series_of(&engine).is_empty());
}

/// `batch` with column `name` replaced by `column` (its field typed as the column is).
fn with_column(mut batch: WriteBatch, name: &str, column: arrow::array::ArrayRef) -> WriteBatch {
    let old = &batch.tables[0].batch;
    let schema = old.schema();
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| match f.name() == name {
            true => Arc::new(
                f.as_ref()
                    .clone()
                    .with_data_type(column.data_type().clone()),
            ),
            false => Arc::clone(f),
        })
        .collect();
    let columns: Vec<_> = schema
        .fields()
        .iter()
        .zip(old.columns())
        .map(|(f, c)| match f.name() == name {
            true => Arc::clone(&column),
            false => Arc::clone(c),
        })
        .collect();
    batch.tables[0].batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    batch
}

#[tokio::test]
async fn writes_that_do_not_fit_the_catalog_are_refused_before_they_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    write(&engine, &[("a", 1, 1.0)]).await;
    let good = batch_of(&engine, &[("a", 2, 2.0)], vec![]).await;

    let mut unknown_table = good.clone();
    unknown_table.tables[0].table = TableId(999);
    let mut unknown_database = good.clone();
    unknown_database.database = crate::ids::DatabaseId(999);
    let too_late = batch_of(&engine, &[("a", crate::time::MAX_TIME + 1, 3.0)], vec![]).await;
    let wrapped = batch_of(&engine, &[("a", 5, 1.0), ("b", i64::MIN, 3.0)], vec![]).await;
    let wrong_type = with_column(
        good.clone(),
        "v",
        Arc::new(arrow::array::Int64Array::from(vec![2])),
    );
    let time_as_int = with_column(
        good.clone(),
        "time",
        Arc::new(arrow::array::Int64Array::from(vec![2])),
    );
    let cases = [
        (unknown_table, "table 999 is not in database"),
        (unknown_database, "database 999 is not in the catalog"),
        (
            too_late,
            "row 0: time 9214646400000000000 ns is outside the range",
        ),
        (
            wrapped,
            "row 1: time -9223372036854775808 ns is outside the range",
        ),
        (
            wrong_type,
            "column \"v\" of table \"m\" is Int64, not Float64",
        ),
        (time_as_int, "column \"time\" of table \"m\" is Int64"),
    ];
    for (batch, expected) in cases {
        let err = engine.write(batch).await.unwrap_err();
        assert!(matches!(err, Error::InvalidWrite(_)), "{err:?}");
        let text = crate::error_chain(&err);
        assert!(text.contains(expected), "{text}");
    }

    // Nothing was logged: the next write takes the next sequence, and persistence (which
    // waits for every logged write to be applied) goes through.
    assert_eq!(engine.write(good).await.unwrap(), SequenceNumber(2));
    let outcome = engine.persist().await.unwrap();
    assert_eq!(outcome.through, SequenceNumber(2));
    assert_eq!(contents(&engine).await.num_rows(), 2);
}

#[tokio::test]
async fn a_logged_record_that_cannot_be_applied_stops_replay_unless_told_to_skip_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    write(&engine, &[("a", 1, 1.0)]).await;
    // A record no check let through (an older release's, or a bug's): logged directly.
    let bad = with_column(
        batch_of(&engine, &[("a", 2, 2.0)], vec![]).await,
        "v",
        Arc::new(arrow::array::BooleanArray::from(vec![true])),
    );
    let seq = engine
        .wal
        .append(RecordKind::WriteBatch, bad.encode().unwrap())
        .await
        .unwrap();
    assert_eq!(seq, SequenceNumber(2));
    let payload = bad.encode().unwrap();
    write(&engine, &[("b", 3, 3.0)]).await;
    engine.wal().shutdown();
    drop(engine);

    // Start-up stops with the file, offset and reason.
    let store: Arc<dyn ObjectStore> =
        Arc::new(DurableLocalStore::new(dir.path().join("objects")).unwrap());
    let mut config = EngineConfig::new(dir.path().join("wal"));
    config.wal_max_file_bytes = 4096;
    let err = Engine::open(config.clone(), Arc::clone(&store), None)
        .await
        .unwrap_err();
    let text = crate::error_chain(&err);
    assert!(
        matches!(err, Error::Wal(wal::Error::Replay { .. })),
        "{text}"
    );
    assert!(text.contains(".wal at offset "), "{text}");
    assert!(
        text.contains("column \"v\" of table \"m\" is Boolean, not Float64"),
        "{text}"
    );

    // Told to skip it, the server starts with every other row; the record's bytes are kept.
    config.wal_replay_skip_invalid = true;
    let engine = Engine::open(config.clone(), Arc::clone(&store), None)
        .await
        .unwrap();
    assert_eq!(engine.buffer.applied_through(), SequenceNumber(3));
    assert_eq!(contents(&engine).await.num_rows(), 2);
    let kept = std::fs::read(dir.path().join("wal/skipped/2.record")).unwrap();
    assert_eq!(kept, payload);
    // Persisting moves past the skipped record, so later starts need no option.
    assert_eq!(engine.persist().await.unwrap().through, SequenceNumber(3));
    engine.wal().shutdown();
    drop(engine);
    config.wal_replay_skip_invalid = false;
    let engine = Engine::open(config, store, None).await.unwrap();
    assert_eq!(contents(&engine).await.num_rows(), 2);
}

#[tokio::test]
async fn a_deleted_tables_wal_records_are_skipped_on_replay_and_go_with_the_next_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for i in 0..40 {
        write(&engine, &[("a", i, i as f64)]).await;
    }
    let old = engine.catalog_state().table("db", "m").unwrap().id;
    let wal_before = engine.wal().file_ids();
    assert!(wal_before.len() > 1, "{wal_before:?}");
    engine.delete_table("db", "m", i64::MAX).await.unwrap();
    assert_eq!(engine.buffer_bytes(), 0);
    assert!(engine.last_cache(old).is_none());
    // Dropped without a persistence: the WAL still holds the deleted table's rows, and a
    // new table of the same name is written after them.
    write(&engine, &[("b", 1, 1.0)]).await;
    drop(engine);

    let engine = open(dir.path()).await;
    let state = engine.catalog_state();
    assert!(state.is_dropped_table(old));
    assert_ne!(state.table("db", "m").unwrap().id, old);
    let rows = contents(&engine).await;
    assert_eq!(rows.num_rows(), 1, "only the new table's row: {rows:?}");
    // The new table's row is persisted; the WAL files of the old one's go with it.
    let outcome = engine.persist().await.unwrap();
    assert_eq!(outcome.segments, 1);
    assert!(outcome.wal_files_removed >= wal_before.len(), "{outcome:?}");
    // A persistence whose buffer holds only a deleted table's rows records the WAL too.
    write(&engine, &[("c", 2, 2.0)]).await;
    engine.delete_table("db", "m", i64::MAX).await.unwrap();
    let outcome = engine.persist().await.unwrap();
    assert_eq!(outcome.segments, 0);
    assert_eq!(
        engine.catalog_state().persisted_sequence,
        outcome.through,
        "{outcome:?}"
    );
    drop(engine);
    let engine = open(dir.path()).await;
    assert!(engine.catalog_state().table("db", "m").is_none());
    assert_eq!(engine.buffer_bytes(), 0);
}

#[tokio::test]
async fn retention_expires_whole_segments_and_buffered_chunks_and_purges_what_is_due() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    // Three persisted hour partitions, then one buffered row in the first.
    write(
        &engine,
        &[
            ("a", 10, 1.0),
            ("a", HOUR + 10, 2.0),
            ("a", 2 * HOUR + 10, 3.0),
        ],
    )
    .await;
    engine.persist().await.unwrap();
    write(&engine, &[("b", 20, 4.0)]).await;
    engine
        .catalog()
        .set_retention("db", None, Some(2 * HOUR))
        .await
        .unwrap();
    let table = engine.catalog_state().table("db", "m").unwrap().id;
    let files = segment_files(&engine).await;
    assert_eq!(files.len(), 3);

    // At 3 h 30 min the cutoff is 1 h 30 min: the first two partitions have expired.
    let outcome = engine.enforce_retention(3 * HOUR + HOUR / 2).await.unwrap();
    assert_eq!(outcome.segments_expired, 2, "{outcome:?}");
    assert!(outcome.buffer_bytes_expired > 0, "{outcome:?}");
    assert_eq!(engine.buffer_bytes(), 0);
    assert_eq!(segment_files(&engine).await, files[2..]);
    assert_eq!(engine.catalog_state().segments(table).len(), 1);
    engine.wal().shutdown();
    drop(engine);
    // The expired buffered row is back from the WAL (queries cut it off); the next pass
    // drops it again, and the persistence after that lets its WAL file go.
    let engine = open(dir.path()).await;
    assert_eq!(contents(&engine).await.num_rows(), 2);
    engine.enforce_retention(3 * HOUR + HOUR / 2).await.unwrap();
    assert_eq!(contents(&engine).await.num_rows(), 1);
    let outcome = engine.persist().await.unwrap();
    assert_eq!(outcome.segments, 0);
    assert_eq!(engine.catalog_state().persisted_sequence, outcome.through);

    // A table deleted to be purged later: its files survive restarts until then.
    // (A delete is stamped with the wall clock: its hard-delete time is never before.)
    let due = crate::now_nanos() + HOUR;
    engine.delete_table("db", "m", due).await.unwrap();
    drop(engine);
    let engine = open(dir.path()).await;
    assert_eq!(segment_files(&engine).await, files[2..]);
    let outcome = engine.enforce_retention(due - 1).await.unwrap();
    assert_eq!(outcome.tables_purged, 0);
    let outcome = engine.enforce_retention(due).await.unwrap();
    assert_eq!(outcome.tables_purged, 1);
    assert!(segment_files(&engine).await.is_empty());
    assert!(engine.catalog_state().dropped_tables.is_empty());
}

#[tokio::test]
async fn a_delete_orders_among_writes_by_its_wal_sequence() {
    use crate::catalog::tombstones::{DeletePredicate, TagCondition};
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    write(&engine, &[("a", 1, 1.0), ("b", 1, 1.0)]).await;
    // A write logged before the delete and applied after it (sequence 2 of 2 and 3):
    // the delete holds for it. One logged after (4) is not deleted.
    let early = batch_of(&engine, &[("a", 2, 2.0)], Vec::new()).await;
    let table = engine.catalog_state().table("db", "m").unwrap().id;
    let a = DeletePredicate {
        tags: vec![TagCondition {
            tag: "host".into(),
            values: vec!["a".into()],
            negated: false,
        }],
        ..DeletePredicate::all()
    };
    engine.buffer.apply_delete(SequenceNumber(3), table, &a);
    engine
        .buffer
        .apply(SequenceNumber(2), &early, &engine.catalog_state());
    let late = batch_of(&engine, &[("a", 3, 3.0)], Vec::new()).await;
    engine
        .buffer
        .apply(SequenceNumber(4), &late, &engine.catalog_state());
    let rows = contents(&engine).await;
    let hosts: Vec<String> = (0..rows.num_rows())
        .map(|i| arrow::util::display::array_value_to_string(rows.column(1), i).unwrap())
        .collect();
    assert_eq!(hosts, ["a", "b"], "{rows:?}");
}

#[tokio::test]
async fn a_logged_delete_the_catalog_lost_is_recorded_on_replay() {
    use crate::catalog::tombstones::{DeletePredicate, DeleteRecord};
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path()).await;
        write(&engine, &[("a", 1, 1.0), ("b", 1, 1.0)]).await;
        engine.persist().await.unwrap();
        write(&engine, &[("a", 2, 2.0)]).await;
        let table = engine.catalog_state().table("db", "m").unwrap().id;
        // The WAL record of a delete of every row, and a crash before its catalog event.
        let record = DeleteRecord {
            version: DeleteRecord::VERSION,
            table,
            predicate: DeletePredicate::all(),
        };
        engine
            .wal()
            .append(RecordKind::Delete, record.encode())
            .await
            .unwrap();
        write(&engine, &[("c", 3, 3.0)]).await;
        engine.wal().shutdown();
    }
    let engine = open(dir.path()).await;
    let state = engine.catalog_state();
    assert_eq!(state.tombstones.len(), 1);
    let tombstone = state.tombstones.values().next().unwrap();
    assert_eq!(tombstone.through, SequenceNumber(3));
    // The persisted segment is one the delete applies to; the buffer replayed through it.
    let segment = &state.segments(tombstone.table)[0];
    assert!(tombstone.applies_to_segment(segment.id, segment.min_time, segment.max_time));
    let data = engine
        .table_data(tombstone.table, i64::MIN, i64::MAX)
        .unwrap();
    let buffered: usize = data
        .buffer
        .iter()
        .flat_map(|p| &p.chunks)
        .map(|c| c.batch.num_rows())
        .sum();
    assert_eq!(buffered, 1, "only the write after the delete");
    // Compaction makes it physical and retires it.
    engine.persist().await.unwrap();
    engine.compact(true).await.unwrap();
    let state = engine.catalog_state();
    assert!(state.tombstones.is_empty());
    assert_eq!(contents(&engine).await.num_rows(), 1);
}

/// A writer of several on one store, with its own WAL under `dir/name`.
async fn open_writer(
    store: &Arc<dyn ObjectStore>,
    dir: &std::path::Path,
    name: &str,
) -> Arc<Engine> {
    let mut config = EngineConfig::new(dir.join(name).join("wal"));
    config.writer = Some(name.to_owned());
    Engine::open(config, Arc::clone(store), None).await.unwrap()
}

/// Rows of `engine`'s table `m`, segments and buffer merged, as (host, v) sorted.
async fn hosts_and_values(engine: &Engine) -> Vec<(String, f64)> {
    let merged = contents(engine).await;
    let hosts = arrow::compute::cast(
        merged.column_by_name("host").unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    let hosts = hosts
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap();
    let values = merged
        .column_by_name("v")
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    let mut rows: Vec<_> = (0..merged.num_rows())
        .map(|i| (hosts.value(i).to_owned(), values.value(i)))
        .collect();
    rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rows
}

/// Two writers on one catalog, each with its own WAL: one persisting far ahead of the
/// other's WAL sequence must not make the other skip its unpersisted records after a
/// crash, and neither's start-up sweep removes the other's file not yet committed.
#[tokio::test]
async fn writers_of_one_catalog_recover_their_own_wal_and_sweep_only_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(DurableLocalStore::new(dir.path().join("objects")).unwrap());
    let a = open_writer(&store, dir.path(), "ingester-a").await;
    let b = open_writer(&store, dir.path(), "ingester-b").await;
    // A writes and persists 20 records; B writes 3 it never persists.
    for i in 0..20 {
        write(&a, &[("a", i, i as f64)]).await;
    }
    for i in 0..3 {
        write(&b, &[("b", i, 100.0 + i as f64)]).await;
    }
    a.persist().await.unwrap();
    let state = a.catalog_state();
    assert_eq!(state.persisted_by(Some("ingester-a")), SequenceNumber(20));
    assert_eq!(state.persisted_by(Some("ingester-b")), SequenceNumber(0));
    assert_eq!(state.persisted_sequence, SequenceNumber(0));
    let named: Vec<_> = state.segments.values().flat_map(|s| s.iter()).collect();
    assert!(
        named
            .iter()
            .all(|s| s.path.ends_with(".ingester-a.parquet")),
        "{named:?}"
    );

    // A file of A's not yet committed (written, then A stops before its commit).
    let pending = Path::from("segments/1/1/0-00000000000000000001-0.ingester-a.parquet");
    store
        .put(&pending, PutPayload::from_static(b"PAR1"))
        .await
        .unwrap();
    // B crashes and comes back: its three records are replayed, none skipped for A's 20;
    // its sweep leaves A's file alone.
    drop(b);
    let b = open_writer(&store, dir.path(), "ingester-b").await;
    assert!(store.head(&pending).await.is_ok(), "B swept A's file");
    b.persist().await.unwrap();
    let rows = hosts_and_values(&b).await;
    let from_b: Vec<_> = rows.iter().filter(|(h, _)| h == "b").collect();
    assert_eq!(from_b.len(), 3, "{rows:?}");
    assert_eq!(rows.iter().filter(|(h, _)| h == "a").count(), 20);
    let state = b.catalog_state();
    assert_eq!(state.persisted_by(Some("ingester-b")), SequenceNumber(3));
    assert_eq!(state.persisted_by(Some("ingester-a")), SequenceNumber(20));
    // A's own sweep takes it: no catalog entry names it.
    drop(a);
    let _a = open_writer(&store, dir.path(), "ingester-a").await;
    assert!(store.head(&pending).await.is_err(), "A kept its stray file");
}

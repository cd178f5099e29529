use object_store::memory::InMemory;
use object_store::{ObjectStoreExt, PutPayload};

use super::log::{LOG_PREFIX, SNAPSHOT_PREFIX, list_sequences, log_path, snapshot_path};
use super::*;
use crate::ids::{AlertEventId, AlertRuleId};
use crate::testing::FailingAfterPut;

fn change(table: &str, column: &str, ty: ColumnType) -> SchemaChange {
    SchemaChange {
        table: table.into(),
        column: column.into(),
        ty,
    }
}

const HOUR: i64 = 3_600_000_000_000;

#[tokio::test]
async fn schema_changes_survive_reload_and_conflicts_commit_nothing() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let state = catalog
        .ensure_schema(
            "plant",
            &[
                change("cpu", "host", ColumnType::Tag),
                change("cpu", "usage", ColumnType::Float),
            ],
        )
        .await
        .unwrap();
    let cpu = state.table("plant", "cpu").unwrap();
    let names: Vec<_> = cpu.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["time", "host", "usage"]);
    assert_eq!(state.sequence, CatalogSequence(1));

    let err = catalog
        .ensure_schema(
            "plant",
            &[
                change("cpu", "new", ColumnType::Integer),
                change("cpu", "usage", ColumnType::String),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TypeConflict { ref column, .. } if column == "usage"),
        "{err}"
    );
    assert!(
        catalog
            .snapshot()
            .table("plant", "cpu")
            .unwrap()
            .column("new")
            .is_none()
    );

    let reloaded = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    assert_eq!(*reloaded.snapshot(), *catalog.snapshot());
}

#[tokio::test]
async fn snapshots_shorten_replay_and_give_the_same_state() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    for i in 0..(SNAPSHOT_INTERVAL + 5) {
        catalog
            .ensure_schema("db", &[change("t", &format!("f{i}"), ColumnType::Integer)])
            .await
            .unwrap();
    }
    let snapshots = snapshots_once_written(&store, 1).await;
    assert_eq!(snapshots, vec![CatalogSequence(SNAPSHOT_INTERVAL)]);
    let reloaded = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    assert_eq!(*reloaded.snapshot(), *catalog.snapshot());
    assert_eq!(
        reloaded.snapshot().table("db", "t").unwrap().columns.len() as u64,
        SNAPSHOT_INTERVAL + 6
    );
}

/// The snapshots in `store` once at least `n` are written (they are written in the
/// background).
async fn snapshots_once_written(store: &Arc<dyn ObjectStore>, n: usize) -> Vec<CatalogSequence> {
    for _ in 0..500 {
        let snapshots = list_sequences(store, SNAPSHOT_PREFIX).await.unwrap();
        if snapshots.len() >= n {
            return snapshots;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} snapshots were written");
}

#[tokio::test]
async fn a_follower_applies_another_servers_commits_and_reloads_past_the_pruning() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    writer
        .ensure_schema("db", &[change("t", "x", ColumnType::Float)])
        .await
        .unwrap();
    let follower = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(*follower.snapshot(), *writer.snapshot());

    writer
        .ensure_schema("db", &[change("t", "y", ColumnType::Float)])
        .await
        .unwrap();
    assert!(
        follower
            .snapshot()
            .table("db", "t")
            .unwrap()
            .column("y")
            .is_none()
    );
    assert!(follower.follow().await.unwrap());
    assert_eq!(*follower.snapshot(), *writer.snapshot());
    assert!(!follower.follow().await.unwrap(), "nothing new");

    // The writer goes on past two snapshots: the entries after the follower's state are
    // pruned, and the follower loads the newest snapshot instead.
    let n = 2 * SNAPSHOT_INTERVAL + 5;
    for i in 0..n {
        writer
            .ensure_schema("db", &[change("t", &format!("f{i}"), ColumnType::Integer)])
            .await
            .unwrap();
    }
    // A snapshot due while the previous one is still being written is put off to a later
    // commit; on a busy machine the first may take all of the commits above.
    let mut i = n;
    while list_sequences(&store, SNAPSHOT_PREFIX).await.unwrap().len() < 2 && i < n + 500 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        writer
            .ensure_schema("db", &[change("t", &format!("f{i}"), ColumnType::Integer)])
            .await
            .unwrap();
        i += 1;
    }
    snapshots_once_written(&store, 2).await;
    let mut pruned = false;
    for _ in 0..500 {
        let log = list_sequences(&store, LOG_PREFIX).await.unwrap();
        pruned = log
            .first()
            .is_some_and(|first| *first > follower.snapshot().sequence.next());
        if pruned {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(pruned, "the log the follower needs was never pruned");
    let mut changed = false;
    for _ in 0..FOLLOW_SNAPSHOT_CHECK_EVERY {
        changed |= follower.follow().await.unwrap();
    }
    assert!(changed);
    // The snapshot, then the log after it.
    follower.follow().await.unwrap();
    assert_eq!(*follower.snapshot(), *writer.snapshot());
}

#[tokio::test]
async fn a_second_writer_catches_up_with_the_log_and_commits_after_it() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let b = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    a.ensure_schema("db", &[change("t", "x", ColumnType::Float)])
        .await
        .unwrap();
    // b's view is stale: its events are computed again against a's transaction.
    let state = b
        .ensure_schema("db", &[change("t", "y", ColumnType::Float)])
        .await
        .unwrap();
    assert_eq!(state.sequence, CatalogSequence(2));
    let t = state.table("db", "t").unwrap();
    assert_eq!(
        t.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["time", "x", "y"]
    );
    // The same type decision a single node makes: a conflicting type is refused.
    let err = a
        .ensure_schema("db", &[change("t", "y", ColumnType::Integer)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TypeConflict { .. }), "{err}");
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(*reloaded.snapshot(), *b.snapshot());
    assert_eq!(*a.snapshot(), *b.snapshot());
}

#[tokio::test]
async fn a_put_that_landed_but_failed_does_not_block_later_commits() {
    let failing = Arc::new(FailingAfterPut::new(Arc::new(InMemory::new())));
    let store: Arc<dyn ObjectStore> = Arc::clone(&failing) as _;
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    catalog
        .ensure_schema("db", &[change("t", "x", ColumnType::Float)])
        .await
        .unwrap();

    failing.fail_next_put_under("");
    let err = catalog
        .ensure_schema("db", &[change("t", "y", ColumnType::Float)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    // The caller was told it failed; the entry is in the log all the same.
    assert_eq!(catalog.snapshot().sequence, CatalogSequence(1));

    // Without a restart, the next commits go through after catching up with that entry.
    for column in ["y", "z"] {
        catalog
            .ensure_schema("db", &[change("t", column, ColumnType::Float)])
            .await
            .unwrap();
    }
    let state = catalog.snapshot();
    assert_eq!(state.sequence, CatalogSequence(3));
    assert_eq!(state.table("db", "t").unwrap().columns.len(), 4);
    let reloaded = Catalog::load(store, HOUR).await.unwrap();
    assert_eq!(*reloaded.snapshot(), *state);
}

#[tokio::test]
async fn snapshots_prune_the_log_they_cover_and_a_damaged_newest_one_falls_back() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let n = 3 * SNAPSHOT_INTERVAL + 7;
    for i in 0..n {
        catalog
            .ensure_schema("db", &[change("t", &format!("f{i}"), ColumnType::Integer)])
            .await
            .unwrap();
        // Let each background snapshot (and its pruning) finish before the next is due.
        if (i + 1) % SNAPSHOT_INTERVAL == 0 {
            let _finished = catalog.snapshotting.lock().await;
        }
    }
    let snapshots = snapshots_once_written(&store, 2).await;
    assert_eq!(
        snapshots,
        [2 * SNAPSHOT_INTERVAL, 3 * SNAPSHOT_INTERVAL].map(CatalogSequence)
    );
    let log = list_sequences(&store, LOG_PREFIX).await.unwrap();
    assert_eq!(
        log.first(),
        Some(&CatalogSequence(2 * SNAPSHOT_INTERVAL + 1))
    );
    assert_eq!(log.last(), Some(&CatalogSequence(n)));
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(*reloaded.snapshot(), *catalog.snapshot());

    // The newest snapshot damaged: the one before it and the log after it still load.
    store
        .put(
            &snapshot_path(CatalogSequence(3 * SNAPSHOT_INTERVAL)),
            PutPayload::from_static(b"{\"version\": 1, \"sta"),
        )
        .await
        .unwrap();
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(*reloaded.snapshot(), *catalog.snapshot());
}

#[tokio::test]
async fn corrupt_and_unknown_version_entries_name_the_path() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    catalog
        .ensure_schema("db", &[change("t", "x", ColumnType::Float)])
        .await
        .unwrap();
    let load_error = |bytes: &'static [u8]| {
        let store = Arc::clone(&store);
        async move {
            store
                .put(
                    &log_path(CatalogSequence(2)),
                    PutPayload::from_static(bytes),
                )
                .await
                .unwrap();
            crate::error_chain(&Catalog::load(store, HOUR).await.unwrap_err())
        }
    };
    let err = load_error(b"{\"version\": 9}").await;
    assert!(
        err.contains("catalog/log/00000000000000000002.json")
            && err.contains("supported versions: [1]"),
        "{err}"
    );
    let err = load_error(b"{not json").await;
    assert!(err.contains("00000000000000000002.json"), "{err}");
}

#[tokio::test]
async fn a_commit_whose_caller_gives_up_still_completes() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    // The caller stops waiting at once (a client that disconnected, a passed deadline).
    let _ = tokio::time::timeout(
        std::time::Duration::ZERO,
        catalog.ensure_schema("db", &[change("t", "a", ColumnType::Float)]),
    )
    .await;
    // The log and the in-memory state still agree: the next commit is not a conflict.
    let state = catalog
        .ensure_schema("db", &[change("t", "b", ColumnType::Float)])
        .await
        .unwrap();
    assert!(state.table("db", "t").unwrap().column("b").is_some());
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(*reloaded.snapshot(), *catalog.snapshot());
}

#[test]
fn invalid_names_are_rejected() {
    assert!(validate_name("").is_err());
    assert!(validate_name("a\nb").is_err());
    assert!(validate_name("a\0b").is_err());
    assert!(validate_name(&"x".repeat(256)).is_err());
    assert!(validate_name("plant floor/line 1").is_err());
    assert!(validate_name("..").is_err());
    assert!(validate_name("a..b").is_err());
    assert!(validate_name("plant floor, line 1.5 (ß)").is_ok());
    assert!(validate_name(&"x".repeat(255)).is_ok());
    // Columns may hold '/' (`flow/min`), not control characters.
    assert!(validate_column_name("flow/min").is_ok());
    assert!(validate_column_name("a\tb").is_err());
    assert!(validate_column_name(&"x".repeat(256)).is_err());
}

#[tokio::test]
async fn writes_create_no_more_databases_tables_and_columns_than_the_limits() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(
        Catalog::load(Arc::clone(&store), HOUR)
            .await
            .unwrap()
            .with_limits(SchemaLimits {
                max_databases: 2,
                max_tables: 2,
                max_columns_per_table: 3,
            }),
    );
    catalog
        .ensure_schema("a", &[change("t1", "x", ColumnType::Float)])
        .await
        .unwrap();
    let err = catalog
        .ensure_schema(
            "a",
            &[
                change("t1", "y", ColumnType::Float),
                change("t1", "z", ColumnType::Float),
            ],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--max-columns-per-table"), "{err}");
    catalog
        .ensure_schema("b", &[change("t2", "x", ColumnType::Float)])
        .await
        .unwrap();
    let err = catalog
        .ensure_schema("c", &[change("t3", "x", ColumnType::Float)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--max-databases"), "{err}");
    let err = catalog
        .ensure_schema("a", &[change("t3", "x", ColumnType::Float)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--max-tables"), "{err}");
    // Nothing of a refused change was committed; what exists is still written to.
    let state = catalog.snapshot();
    assert_eq!(state.tables.len(), 2);
    assert_eq!(state.table("a", "t1").unwrap().columns.len(), 2);
    catalog
        .ensure_schema("a", &[change("t1", "x", ColumnType::Float)])
        .await
        .unwrap();
}

#[tokio::test]
async fn last_caches_survive_reload_and_need_tag_keys() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    catalog
        .ensure_schema(
            "plant",
            &[
                change("cpu", "host", ColumnType::Tag),
                change("cpu", "usage", ColumnType::Float),
            ],
        )
        .await
        .unwrap();
    let def = catalog
        .create_last_cache("plant", "cpu", &[])
        .await
        .unwrap();
    assert_eq!(def.key_columns, ["host"], "all tags by default");
    let err = catalog
        .create_last_cache("plant", "cpu", &["usage".into()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must be tags"), "{err}");
    assert!(
        catalog
            .create_last_cache("plant", "nope", &[])
            .await
            .is_err()
    );

    let reloaded = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    assert_eq!(reloaded.snapshot().last_caches.get(&def.table), Some(&def));
    assert!(reloaded.drop_last_cache("plant", "cpu").await.unwrap());
    assert!(!reloaded.drop_last_cache("plant", "cpu").await.unwrap());
    let again = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert!(again.snapshot().last_caches.is_empty());
}

#[tokio::test]
async fn several_devices_set_in_one_transaction_survive_reload() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    catalog
        .ensure_schema("plant", &[change("t", "device", ColumnType::Tag)])
        .await
        .unwrap();
    let before = catalog.snapshot().sequence;
    let attrs = |online: &str| BTreeMap::from([("online".to_string(), Some(online.to_string()))]);
    catalog
        .set_devices_attributes(
            "plant",
            vec![
                ("device".into(), "d1".into(), attrs("true")),
                ("device".into(), "d2".into(), attrs("false")),
                ("edge_node".into(), "gw1".into(), attrs("true")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        catalog.snapshot().sequence,
        CatalogSequence(before.0 + 1),
        "one transaction"
    );
    let bad = catalog
        .set_devices_attributes("plant", vec![("\u{1}".into(), "x".into(), attrs("true"))])
        .await;
    assert!(bad.is_err());
    assert!(
        catalog
            .set_devices_attributes("nowhere", vec![("device".into(), "d1".into(), attrs("x"))])
            .await
            .is_err()
    );
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    let devices = &reloaded.snapshot().devices["plant"];
    assert_eq!(devices["device"]["d1"]["online"], "true");
    assert_eq!(devices["device"]["d2"]["online"], "false");
    assert_eq!(devices["edge_node"]["gw1"]["online"], "true");
}

fn segment(id: u64, table: TableId, partition: i64) -> SegmentMeta {
    SegmentMeta {
        id: SegmentId(id),
        table,
        partition,
        path: format!("segments/1/{}/{partition}-{id:020}.parquet", table.get()),
        min_time: partition,
        max_time: partition + 10,
        rows: 1,
        bytes: 1,
        max_sequence: SequenceNumber(id),
    }
}

#[tokio::test]
async fn compactions_replace_a_partitions_segments_in_place_and_survive_reload() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let state = catalog
        .ensure_schema("plant", &[change("cpu", "v", ColumnType::Float)])
        .await
        .unwrap();
    let cpu = state.table("plant", "cpu").unwrap().id;
    // Partition 0 in segments 0, 2 and 3; partition HOUR in 1 and 4.
    let persisted = [(0, 0), (1, HOUR), (2, 0), (3, 0), (4, HOUR)];
    catalog
        .commit(
            persisted
                .iter()
                .map(|&(id, p)| CatalogEvent::SegmentPersisted(segment(id, cpu, p)))
                .collect(),
        )
        .await
        .unwrap();
    let order = |c: &Catalog| -> Vec<u64> {
        c.snapshot()
            .segments(cpu)
            .iter()
            .map(|s| s.id.get())
            .collect()
    };

    // Segments not all of one partition, or not consecutive in it, are refused.
    for replaced in [vec![0, 1], vec![0, 3], vec![7]] {
        let err = catalog
            .commit(vec![CatalogEvent::SegmentsCompacted {
                replaced: replaced.iter().copied().map(SegmentId).collect(),
                segment: segment(9, cpu, 0),
            }])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Compaction(_)), "{replaced:?}: {err}");
    }
    assert_eq!(
        order(&catalog),
        [0, 1, 2, 3, 4],
        "a refused compaction changes nothing"
    );

    catalog
        .commit(vec![CatalogEvent::SegmentsCompacted {
            replaced: vec![SegmentId(0), SegmentId(2), SegmentId(3)],
            segment: segment(5, cpu, 0),
        }])
        .await
        .unwrap();
    assert_eq!(order(&catalog), [5, 1, 4]);
    assert_eq!(catalog.snapshot().next_segment_id, 6);

    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(*reloaded.snapshot(), *catalog.snapshot());
}

fn token(name: &str, hash: &str, permissions: TokenPermissions) -> TokenDef {
    TokenDef {
        id: TokenId(0),
        name: name.into(),
        hash: hash.into(),
        permissions,
        created_at: 1,
        expires_at: None,
    }
}

#[tokio::test]
async fn tokens_survive_reload_names_are_unique_and_the_last_admin_stays() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let admin = catalog
        .create_token(token("ops", "aa", TokenPermissions::Admin))
        .await
        .unwrap();
    let reader = TokenPermissions::Database {
        databases: vec!["plant".into()],
        read: true,
        write: false,
    };
    let grafana = catalog
        .create_token(token("grafana", "bb", reader.clone()))
        .await
        .unwrap();
    assert_ne!(admin.id, grafana.id);
    assert!(catalog.snapshot().has_admin_token());

    // A name or a hash in use is refused, and nothing is committed.
    let sequence = catalog.snapshot().sequence;
    for (name, hash) in [("grafana", "cc"), ("other", "bb")] {
        let err = catalog
            .create_token(token(name, hash, reader.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidToken(_)), "{err}");
    }
    assert_eq!(catalog.snapshot().sequence, sequence);

    // The only admin token is not revoked unless told; another one can be.
    let err = catalog.revoke_token("ops", false).await.unwrap_err();
    assert!(err.to_string().contains("last admin token"), "{err}");
    assert_eq!(
        catalog.revoke_token("grafana", false).await.unwrap(),
        Some(grafana.clone())
    );
    assert_eq!(catalog.revoke_token("grafana", false).await.unwrap(), None);
    // A revoked token's name can be used again; ids are never reused.
    let again = catalog
        .create_token(token("grafana", "dd", reader))
        .await
        .unwrap();
    assert!(again.id > grafana.id);

    let reloaded = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let state = reloaded.snapshot();
    assert_eq!(*state, *catalog.snapshot());
    let names: Vec<_> = state.tokens.values().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["ops", "grafana"]);
    assert_eq!(state.token("ops").unwrap().hash, "aa");
}

#[test]
fn catalogs_written_before_tokens_still_load() {
    // A snapshot of the format before tokens: no `tokens`, no `next_token_id`.
    let old = br#"{"version":1,"state":{"sequence":3,"databases":{},"tables":{},"segments":{},
        "persisted_sequence":0,"next_database_id":0,"next_table_id":0,"next_segment_id":0}}"#;
    let state = format::decode_snapshot(old).unwrap();
    assert!(state.tokens.is_empty());
    assert_eq!(state.next_token_id, 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Catalog entries are read from the object store: any bytes are an entry or an error.
    #[test]
    fn arbitrary_catalog_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
        let _ = format::decode_transaction(&bytes);
        let _ = format::decode_snapshot(&bytes);
    }

    /// JSON-shaped damage too: a valid transaction with characters changed.
    #[test]
    fn damaged_transactions_never_panic(
        edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..6)
    ) {
        let tx = format::Transaction {
            sequence: CatalogSequence(4),
            events: vec![
                CatalogEvent::DatabaseCreated { id: DatabaseId(0), name: "plant".into() },
                CatalogEvent::TokenRevoked { id: TokenId(3) },
            ],
        };
        let mut bytes = format::encode_transaction(&tx);
        let len = bytes.len();
        for (at, value) in edits {
            bytes[at % len] = value;
        }
        let _ = format::decode_transaction(&bytes);
    }
}

fn rule(name: &str) -> alerts::AlertRuleDef {
    alerts::AlertRuleDef {
        id: AlertRuleId(99),
        name: name.into(),
        database: "plant".into(),
        kind: alerts::AlertRuleKind::Threshold {
            sql: "SELECT host, max(temp) AS value FROM machine GROUP BY host".into(),
            value_column: "value".into(),
            condition: "> 90".into(),
            recovery: Some("< 85".into()),
        },
        every_nanos: 1_000_000_000,
        for_nanos: 0,
        severity: "critical".into(),
        summary: "{{ $labels.host }} is hot".into(),
        description: String::new(),
        labels: BTreeMap::new(),
        receiver: None,
        created_at: 0,
    }
}

fn transition(
    rule: AlertRuleId,
    host: &str,
    from: alerts::AlertState,
    to: alerts::AlertState,
) -> CatalogEvent {
    CatalogEvent::AlertTransitioned(alerts::AlertTransition {
        id: AlertEventId(12345),
        rule,
        series: BTreeMap::from([("host".to_owned(), host.to_owned())]),
        rule_name: "hot".into(),
        severity: "critical".into(),
        labels: BTreeMap::new(),
        receiver: None,
        from,
        to,
        value: Some(95.5),
        at: 10,
        active_at: 5,
        summary: format!("{host} is hot"),
        description: String::new(),
    })
}

#[tokio::test]
async fn alert_rules_states_and_outbox_survive_reload() {
    use alerts::AlertState::*;
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let hot = catalog.create_alert_rule(rule("hot")).await.unwrap();
    assert_eq!(hot.id, AlertRuleId(0), "ids are assigned by the catalog");
    let err = catalog.create_alert_rule(rule("hot")).await.unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");

    catalog
        .record_alerts(vec![
            transition(hot.id, "a", Inactive, Firing),
            transition(hot.id, "b", Inactive, Pending),
        ])
        .await
        .unwrap();
    // A transition from a state the alert is not in is refused, and commits nothing.
    let err = catalog
        .record_alerts(vec![
            transition(hot.id, "b", Pending, Firing),
            transition(hot.id, "c", Firing, Resolved),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is inactive, not firing"), "{err}");

    let state = catalog.snapshot();
    let a = &state.alerts.instances[&hot.id]["host=a"];
    assert_eq!((a.state, a.fired_at), (Firing, Some(10)));
    assert_eq!(state.alerts.instances[&hot.id]["host=b"].state, Pending);
    // Only the firing is notified; transitions are numbered in order.
    let outbox: Vec<_> = state.alerts.outbox.keys().copied().collect();
    assert_eq!(outbox, [AlertEventId(0)]);
    assert_eq!(state.alerts.history.len(), 2);
    assert_eq!(state.alerts.history[1].id, AlertEventId(1));

    catalog
        .record_alerts(vec![CatalogEvent::AlertDelivered {
            id: AlertEventId(0),
            receiver: "webhook".into(),
            done: false,
        }])
        .await
        .unwrap();
    let reloaded = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    assert_eq!(*reloaded.snapshot(), *catalog.snapshot());
    let outbox = &reloaded.snapshot().alerts.outbox[&AlertEventId(0)];
    assert!(outbox.delivered.contains("webhook"));

    // Deleting the rule resolves its alerts in the same transaction.
    let deleted = reloaded
        .delete_alert_rule("hot", |r, i| alerts::AlertTransition {
            id: AlertEventId(0),
            rule: i.rule,
            series: i.series.clone(),
            rule_name: r.name.clone(),
            severity: r.severity.clone(),
            labels: alerts::alert_labels(r, &i.series),
            receiver: r.receiver.clone(),
            from: i.state,
            to: if i.state == Firing {
                Resolved
            } else {
                Inactive
            },
            value: None,
            at: 20,
            active_at: i.active_at,
            summary: i.summary.clone(),
            description: String::new(),
        })
        .await
        .unwrap();
    assert!(deleted.is_some());
    let state = reloaded.snapshot();
    assert!(state.alerts.rules.is_empty() && state.alerts.instances.is_empty());
    let resolved: Vec<_> = state
        .alerts
        .outbox
        .values()
        .map(|o| (o.transition.id, o.transition.to))
        .collect();
    assert_eq!(
        resolved,
        [(AlertEventId(0), Firing), (AlertEventId(2), Resolved)]
    );
    assert!(
        reloaded
            .delete_alert_rule("hot", |_, _| unreachable!())
            .await
            .unwrap()
            .is_none()
    );
}

#[test]
fn conditions_parse_and_hold() {
    use alerts::Condition;
    let cases = [
        ("> 90", 90.5, true),
        (">90", 90.0, false),
        (">= 90", 90.0, true),
        ("< 5", 4.0, true),
        ("<= 5", 5.0, true),
        ("== 1", 1.0, true),
        ("!= 0", 0.0, false),
        ("between 10 and 20", 20.0, true),
        ("BETWEEN 10 AND 20", 9.0, false),
        ("outside 10 and 20", 21.0, true),
    ];
    for (text, v, holds) in cases {
        let c: Condition = text.parse().unwrap();
        assert_eq!(c.holds(v), holds, "{text} on {v}");
        let again: Condition = c.to_string().parse().unwrap();
        assert_eq!(again, c);
    }
    for bad in ["", "90", "> hot", "between 20 and 10", "> inf", "between 1"] {
        assert!(bad.parse::<Condition>().is_err(), "{bad:?} parsed");
    }
}

#[tokio::test]
async fn deleted_objects_free_their_names_keep_their_files_until_purged_and_survive_reload() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let cols = [
        change("cpu", "host", ColumnType::Tag),
        change("mem", "host", ColumnType::Tag),
    ];
    let state = catalog.ensure_schema("plant", &cols).await.unwrap();
    let (plant, cpu, mem) = (
        state.database("plant").unwrap().id,
        state.table("plant", "cpu").unwrap().id,
        state.table("plant", "mem").unwrap().id,
    );
    catalog
        .commit(vec![
            CatalogEvent::SegmentPersisted(segment(1, cpu, 0)),
            CatalogEvent::SegmentPersisted(segment(2, mem, 0)),
        ])
        .await
        .unwrap();

    // A table first: out of its database, its segments kept among the dropped.
    let dropped = catalog.delete_table("plant", "mem", 10, 100).await.unwrap();
    assert_eq!(dropped.segments.len(), 1);
    let state = catalog.snapshot();
    assert!(state.table("plant", "mem").is_none());
    assert!(state.is_dropped_table(mem) && !state.is_dropped_table(cpu));
    assert!(
        !state.is_dropped_table(TableId(99)),
        "never created is not dropped"
    );
    let err = catalog
        .delete_table("plant", "mem", 11, 100)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TableNotFound { .. }), "{err}");

    // Then the database: its name makes a new one with new ids.
    let dropped = catalog.delete_database("plant", 20, 200).await.unwrap();
    assert_eq!(dropped.tables, vec![cpu]);
    let state = catalog.ensure_schema("plant", &cols[..1]).await.unwrap();
    let again = state.database("plant").unwrap().id;
    assert_ne!(again, plant);
    assert_ne!(state.table("plant", "cpu").unwrap().id, cpu);
    assert!(state.is_dropped_database(plant) && !state.is_dropped_database(again));
    assert!(state.segments(cpu).is_empty());

    // Reloaded from the log, then from a snapshot: the same.
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(*reloaded.snapshot(), *state);
    let snapshot = format::decode_snapshot(&format::encode_snapshot(&state)).unwrap();
    assert_eq!(snapshot, *state);

    // A purge forgets only what is due.
    let purged = catalog.purge_dropped(150).await.unwrap();
    assert_eq!(purged.len(), 1);
    assert_eq!(purged[0].def.id, mem);
    let state = catalog.snapshot();
    assert!(state.dropped_tables.contains_key(&cpu));
    assert!(state.dropped_databases.contains_key(&plant));
    let purged = catalog.purge_dropped(200).await.unwrap();
    assert_eq!(purged.len(), 1);
    let state = catalog.snapshot();
    assert!(state.dropped_tables.is_empty() && state.dropped_databases.is_empty());
    assert!(state.is_dropped_table(cpu), "ids stay taken after a purge");
}

#[tokio::test]
async fn retention_is_per_database_overridden_per_table_and_expires_whole_segments() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let db = catalog
        .create_database("plant", Some(2 * HOUR))
        .await
        .unwrap();
    assert_eq!(db.retention_nanos, Some(2 * HOUR));
    let err = catalog.create_database("plant", None).await.unwrap_err();
    assert!(matches!(err, Error::DatabaseExists(_)), "{err}");
    let state = catalog
        .ensure_schema("plant", &[change("cpu", "host", ColumnType::Tag)])
        .await
        .unwrap();
    let cpu = state.table("plant", "cpu").unwrap().id;
    assert_eq!(state.retention_cutoff(cpu, 10 * HOUR), Some(8 * HOUR));

    catalog
        .set_retention("plant", Some("cpu"), Some(5 * HOUR))
        .await
        .unwrap();
    assert_eq!(catalog.snapshot().retention(cpu), Some(5 * HOUR));
    catalog
        .set_retention("plant", Some("cpu"), None)
        .await
        .unwrap();
    assert_eq!(catalog.snapshot().retention(cpu), Some(2 * HOUR));
    let err = catalog
        .set_retention("plant", None, Some(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRetention(_)), "{err}");
    let err = catalog.set_retention("nope", None, None).await.unwrap_err();
    assert!(matches!(err, Error::DatabaseNotFound(_)), "{err}");

    // Segments at 0, 1 h and 2 h (each ten nanoseconds long): at 3 h 30 min the cutoff is
    // 1 h 30 min, so the first two have only expired rows.
    let segments: Vec<_> = (0..3)
        .map(|i| segment(i + 1, cpu, i as i64 * HOUR))
        .collect();
    catalog
        .commit(
            segments
                .iter()
                .cloned()
                .map(CatalogEvent::SegmentPersisted)
                .collect(),
        )
        .await
        .unwrap();
    let state = catalog.snapshot();
    let (cutoff, expired) = lifecycle::expired_segments(&state, cpu, 3 * HOUR + HOUR / 2).unwrap();
    assert_eq!(cutoff, HOUR + HOUR / 2);
    assert_eq!(expired, segments[..2]);
    catalog
        .commit(vec![CatalogEvent::SegmentsExpired {
            table: cpu,
            segments: expired.iter().map(|s| s.id).collect(),
            cutoff,
        }])
        .await
        .unwrap();
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(reloaded.snapshot().segments(cpu), &segments[2..]);
    assert_eq!(reloaded.snapshot().retention(cpu), Some(2 * HOUR));

    assert_eq!(lifecycle::parse_retention("30d"), Ok(Some(30 * 24 * HOUR)));
    assert_eq!(lifecycle::parse_retention("none"), Ok(None));
    assert!(lifecycle::parse_retention("0s").is_err());
    assert!(lifecycle::parse_retention("soon").is_err());
    assert_eq!(lifecycle::format_retention(Some(30 * 24 * HOUR)), "30days");
}

/// A view's invalidations are derived from the log: persisted segments and deletes of its
/// source add them (compaction does not), a refresh removes those it took and keeps what
/// it left, and a reload derives the same.
#[tokio::test]
async fn view_invalidations_follow_the_log_and_survive_reload() {
    use super::views::{NewView, Pending, Refresh, ViewDef};
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let catalog = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let state = catalog
        .ensure_schema("plant", &[change("cpu", "host", ColumnType::Tag)])
        .await
        .unwrap();
    let cpu = state.table("plant", "cpu").unwrap().id;
    let minute = HOUR / 60;
    let (view_table, view) = catalog
        .create_view(NewView {
            database: "plant".into(),
            name: "cpu_1m".into(),
            columns: vec![
                ("host".into(), ColumnType::Tag),
                ("n".into(), ColumnType::Integer),
            ],
            def: ViewDef {
                table: cpu,
                source: cpu,
                query: "SELECT …".into(),
                bucket_nanos: minute,
                origin_nanos: 0,
                lag_nanos: 0,
                realtime: false,
                created_at: 0,
            },
            initial: Some((HOUR + 5, HOUR + 3 * minute - 1)),
            retention_nanos: Some(365 * 24 * HOUR),
        })
        .await
        .unwrap();
    assert_eq!(view.def.table, view_table.id);
    assert_eq!(view.def.source, cpu);
    let spans = |state: &CatalogState| -> Vec<(i64, i64, bool)> {
        state
            .view(view_table.id)
            .unwrap()
            .invalid
            .iter()
            .map(|i| (i.start, i.end, i.deleted))
            .collect()
    };
    assert_eq!(
        spans(&catalog.snapshot()),
        [(HOUR, HOUR + 3 * minute, false)]
    );
    assert_eq!(
        catalog.snapshot().retention(view_table.id),
        Some(365 * 24 * HOUR)
    );

    // A segment of the source (not of the view) invalidates the minutes it spans.
    let mut seg = segment(1, cpu, 2 * HOUR);
    seg.max_time = 2 * HOUR + minute;
    catalog
        .commit(vec![CatalogEvent::SegmentPersisted(seg.clone())])
        .await
        .unwrap();
    let mut own = segment(2, view_table.id, 0);
    own.max_time = 10 * HOUR;
    catalog
        .commit(vec![CatalogEvent::SegmentPersisted(own)])
        .await
        .unwrap();
    // Compaction changes no bucket.
    let mut merged = segment(3, cpu, 2 * HOUR);
    merged.max_time = 2 * HOUR + minute;
    catalog
        .commit(vec![CatalogEvent::SegmentsCompacted {
            replaced: vec![seg.id],
            segment: merged,
        }])
        .await
        .unwrap();
    assert_eq!(
        spans(&catalog.snapshot()),
        [
            (HOUR, HOUR + 3 * minute, false),
            (2 * HOUR, 2 * HOUR + 2 * minute, false)
        ]
    );

    // A refresh that took both, leaving a minute for later.
    catalog
        .record_refresh(Refresh {
            view: view_table.id,
            through: 2,
            pending: vec![Pending {
                start: 2 * HOUR + minute,
                end: 2 * HOUR + 2 * minute,
                deleted: false,
            }],
            watermark: 2 * HOUR + minute,
            done: Some((HOUR, 2 * HOUR + minute)),
            at: 7,
        })
        .await
        .unwrap();
    // An open-ended delete reaches as far as rows were persisted or materialized.
    let tombstone = catalog
        .record_delete(
            cpu,
            super::tombstones::DeletePredicate::all(),
            SequenceNumber(9),
            0,
        )
        .await
        .unwrap();
    assert_eq!(tombstone.table, cpu);
    let expected = [
        (2 * HOUR + minute, 2 * HOUR + 2 * minute, false),
        (HOUR, 2 * HOUR + 2 * minute, true),
    ];
    let state = catalog.snapshot();
    assert_eq!(spans(&state), expected);
    let v = state.view(view_table.id).unwrap();
    assert_eq!(
        (v.watermark, v.extent, v.refreshed_at),
        (
            Some(2 * HOUR + minute),
            Some((HOUR, 2 * HOUR + minute)),
            Some(7)
        )
    );

    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(
        reloaded.snapshot().view(view_table.id),
        state.view(view_table.id)
    );

    // The view goes with its table.
    catalog.delete_table("plant", "cpu_1m", 0, 0).await.unwrap();
    assert!(catalog.snapshot().view(view_table.id).is_none());
}

#[tokio::test]
async fn ingesters_joined_and_left_survive_reload_through_the_log_and_a_snapshot() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    let b = Arc::new(Catalog::load(Arc::clone(&store), HOUR).await.unwrap());
    assert!(
        a.ingester_joined("ingester-0", "http://10.0.0.1:50051", 7)
            .await
            .unwrap()
    );
    // Another writer, behind the log, catches up and commits after it.
    assert!(
        b.ingester_joined("ingester-1", "http://10.0.0.2:50051", 7)
            .await
            .unwrap()
    );
    assert_eq!(b.snapshot().sequence, CatalogSequence(2));
    // The same announcement again commits nothing; a new address replaces the old.
    assert!(
        !a.ingester_joined("ingester-0", "http://10.0.0.1:50051", 7)
            .await
            .unwrap()
    );
    let log = || async { list_sequences(&store, LOG_PREFIX).await.unwrap().len() };
    assert_eq!(log().await, 2);
    a.ingester_joined("ingester-0", "http://10.0.0.9:50051", 7)
        .await
        .unwrap();
    b.ingester_left("ingester-1").await.unwrap();
    b.ingester_left("ingester-1").await.unwrap();
    assert_eq!(log().await, 4, "nothing to leave");

    let joined = |state: &CatalogState| -> Vec<(String, String)> {
        state
            .ingesters
            .iter()
            .map(|(name, i)| (name.clone(), i.address.clone()))
            .collect()
    };
    let expected = vec![("ingester-0".to_owned(), "http://10.0.0.9:50051".to_owned())];
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(joined(&reloaded.snapshot()), expected);
    assert_eq!(*reloaded.snapshot(), *b.snapshot());

    // Past a snapshot: loaded from it, the same ingesters.
    for i in 0..SNAPSHOT_INTERVAL {
        b.ensure_schema("db", &[change("t", &format!("f{i}"), ColumnType::Integer)])
            .await
            .unwrap();
    }
    let _finished = b.snapshotting.lock().await;
    let snapshots = list_sequences(&store, SNAPSHOT_PREFIX).await.unwrap();
    assert_eq!(snapshots.len(), 1);
    store.delete(&log_path(CatalogSequence(1))).await.ok();
    let reloaded = Catalog::load(Arc::clone(&store), HOUR).await.unwrap();
    assert_eq!(joined(&reloaded.snapshot()), expected);
    assert_eq!(*reloaded.snapshot(), *b.snapshot());
}

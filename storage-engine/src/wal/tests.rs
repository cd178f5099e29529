use std::collections::BTreeMap;

use super::*;

type Replayed = Vec<(SequenceNumber, Vec<u8>)>;

fn collect(dir: &Path, min_next: SequenceNumber) -> Result<(Wal, ReplayStats, Replayed)> {
    let mut seen = Vec::new();
    let (wal, stats) = Wal::open(WalConfig::new(dir), min_next, &mut |r| {
        seen.push((r.sequence, r.payload.to_vec()));
        Ok(())
    })?;
    Ok((wal, stats, seen))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn wal_files(dir: &Path) -> Vec<PathBuf> {
    list_files(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

#[test]
fn appended_records_round_trip_through_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (wal, stats, seen) = collect(dir.path(), SequenceNumber(1)).unwrap();
    assert_eq!(stats.records, 0);
    assert!(seen.is_empty());
    let seqs: Vec<_> = rt.block_on(async {
        let mut out = Vec::new();
        for i in 0..10u8 {
            out.push(
                wal.append(RecordKind::WriteBatch, vec![i; i as usize * 3])
                    .await
                    .unwrap(),
            );
        }
        out
    });
    assert_eq!(seqs, (1..=10).map(SequenceNumber).collect::<Vec<_>>());
    drop(wal);

    let (wal, stats, seen) = collect(dir.path(), SequenceNumber(1)).unwrap();
    assert_eq!(stats.records, 10);
    assert_eq!(stats.truncated_bytes, 0);
    for (i, (seq, payload)) in seen.iter().enumerate() {
        assert_eq!(*seq, SequenceNumber(i as u64 + 1));
        assert_eq!(payload, &vec![i as u8; i * 3]);
    }
    // Sequence numbers continue after the replayed log.
    let next = rt
        .block_on(wal.append(RecordKind::WriteBatch, b"x".to_vec()))
        .unwrap();
    assert_eq!(next, SequenceNumber(11));
}

#[test]
fn sequence_never_goes_below_the_persisted_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (wal, _, _) = collect(dir.path(), SequenceNumber(500)).unwrap();
    let seq = rt
        .block_on(wal.append(RecordKind::WriteBatch, vec![1]))
        .unwrap();
    assert_eq!(seq, SequenceNumber(500));
}

#[test]
fn torn_tail_is_truncated_at_every_offset_and_earlier_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (wal, _, _) = collect(dir.path(), SequenceNumber(1)).unwrap();
    rt.block_on(async {
        for i in 0..3u8 {
            wal.append(RecordKind::WriteBatch, vec![i; 40])
                .await
                .unwrap();
        }
    });
    drop(wal);
    let files = wal_files(dir.path());
    // Reopening created a second, empty file; the records live in the first.
    let data_file = files[0].clone();
    let full = std::fs::read(&data_file).unwrap();
    let last_record_start = full.len() - (format::RECORD_HEADER_LEN + 40);

    for cut in last_record_start..full.len() {
        let case = tempfile::tempdir().unwrap();
        let path = case.path().join(data_file.file_name().unwrap());
        std::fs::write(&path, &full[..cut]).unwrap();
        let (wal, stats, seen) = collect(case.path(), SequenceNumber(1)).unwrap();
        assert_eq!(seen.len(), 2, "cut at {cut}");
        assert_eq!(seen[1], (SequenceNumber(2), vec![1u8; 40]));
        assert_eq!(stats.truncated_bytes, (cut - last_record_start) as u64);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            last_record_start as u64
        );
        // The log goes on from the last intact record.
        let next = rt
            .block_on(wal.append(RecordKind::WriteBatch, vec![9]))
            .unwrap();
        assert_eq!(next, SequenceNumber(3), "cut at {cut}");
    }

    // A newest file cut inside its header holds nothing and is removed.
    for cut in 0..format::FILE_HEADER_LEN {
        let case = tempfile::tempdir().unwrap();
        std::fs::write(
            case.path().join(data_file.file_name().unwrap()),
            &full[..cut],
        )
        .unwrap();
        let (_wal, stats, seen) = collect(case.path(), SequenceNumber(1)).unwrap();
        assert!(seen.is_empty());
        assert_eq!(stats.truncated_bytes, cut as u64);
    }
}

#[test]
fn flipped_byte_in_an_older_file_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut config = WalConfig::new(dir.path());
    config.max_file_bytes = 200;
    let (wal, _) = Wal::open(config, SequenceNumber(1), &mut |_| Ok(())).unwrap();
    rt.block_on(async {
        for i in 0..6u8 {
            wal.append(RecordKind::WriteBatch, vec![i; 100])
                .await
                .unwrap();
        }
    });
    drop(wal);
    let files = wal_files(dir.path());
    assert!(
        files.len() >= 3,
        "rotation should have made several files: {files:?}"
    );
    let victim = &files[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let offset = format::FILE_HEADER_LEN + format::RECORD_HEADER_LEN + 10;
    bytes[offset] ^= 0xff;
    std::fs::write(victim, &bytes).unwrap();

    let err = collect(dir.path(), SequenceNumber(1)).unwrap_err();
    match &err {
        Error::Corrupt {
            path,
            offset,
            source,
        } => {
            assert_eq!(path, victim);
            assert_eq!(*offset, format::FILE_HEADER_LEN as u64);
            assert!(matches!(source, FormatError::RecordChecksum { .. }));
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&victim.display().to_string()) && text.contains("offset 32"),
        "{text}"
    );
}

#[test]
fn bad_magic_and_unknown_version_in_an_older_file_stop_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (wal, _, _) = collect(dir.path(), SequenceNumber(1)).unwrap();
    rt.block_on(wal.append(RecordKind::WriteBatch, vec![1]))
        .unwrap();
    drop(wal);
    let files = wal_files(dir.path());
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[0] = b'X';
    std::fs::write(&files[0], &bytes).unwrap();
    let err = collect(dir.path(), SequenceNumber(1)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Corrupt {
                offset: 0,
                source: FormatError::BadMagic { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn concurrent_writers_share_fsyncs_and_every_ack_survives_exactly_once() {
    struct CountingObserver(std::sync::atomic::AtomicUsize);
    impl WalObserver for CountingObserver {
        fn fsync(&self, _: Duration, _: usize, _: usize) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let observer = Arc::new(CountingObserver(Default::default()));
    let mut config = WalConfig::new(dir.path());
    config.max_file_bytes = 64 * 1024;
    let (wal, _) = Wal::open_with_observer(
        config,
        SequenceNumber(1),
        &mut |_| Ok(()),
        Arc::clone(&observer) as Arc<dyn WalObserver>,
    )
    .unwrap();
    let wal = Arc::new(wal);
    const WRITERS: u32 = 32;
    const PER_WRITER: u32 = 50;
    let acked: BTreeMap<SequenceNumber, Vec<u8>> = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let wal = Arc::clone(&wal);
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..PER_WRITER {
                    let payload = format!("writer {w} write {i}").into_bytes();
                    let seq = wal
                        .append(RecordKind::WriteBatch, payload.clone())
                        .await
                        .unwrap();
                    mine.push((seq, payload));
                }
                mine
            }));
        }
        let mut all = BTreeMap::new();
        for t in tasks {
            for (seq, payload) in t.await.unwrap() {
                assert!(
                    all.insert(seq, payload).is_none(),
                    "sequence handed out twice"
                );
            }
        }
        all
    });
    let total = (WRITERS * PER_WRITER) as usize;
    assert_eq!(acked.len(), total);
    let fsyncs = observer.0.load(Ordering::Relaxed);
    assert!(
        fsyncs < total,
        "group commit should share fsyncs: {fsyncs} for {total} writes"
    );
    drop(wal);

    let (_wal, stats, seen) = collect(dir.path(), SequenceNumber(1)).unwrap();
    assert_eq!(stats.records as usize, total);
    let replayed: BTreeMap<_, _> = seen.into_iter().collect();
    assert_eq!(replayed, acked);
}

#[test]
fn interval_sync_acknowledges_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut config = WalConfig::new(dir.path());
    config.sync = "50ms".parse().unwrap();
    let (wal, _) = Wal::open(config, SequenceNumber(1), &mut |_| Ok(())).unwrap();
    rt.block_on(async {
        for i in 0..20u8 {
            wal.append(RecordKind::WriteBatch, vec![i]).await.unwrap();
        }
    });
    drop(wal);
    let (_wal, stats, _) = collect(dir.path(), SequenceNumber(1)).unwrap();
    assert_eq!(stats.records, 20);
    assert!("sometimes".parse::<SyncPolicy>().is_err());
}

#[test]
fn files_at_or_below_the_persisted_sequence_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut config = WalConfig::new(dir.path());
    config.max_file_bytes = 100;
    let (wal, _) = Wal::open(config, SequenceNumber(1), &mut |_| Ok(())).unwrap();
    rt.block_on(async {
        for i in 0..5u8 {
            wal.append(RecordKind::WriteBatch, vec![i; 90])
                .await
                .unwrap();
        }
    });
    // One record per file: files 1..=5 hold sequences 1..=5, file 6 is current.
    assert_eq!(wal.file_ids().len(), 6);
    let removed = wal.remove_files_up_to(SequenceNumber(3)).unwrap();
    assert_eq!(removed, vec![WalFileId(1), WalFileId(2), WalFileId(3)]);
    assert_eq!(wal_files(dir.path()).len(), 3);
    // The current file is never removed.
    wal.remove_files_up_to(SequenceNumber(100)).unwrap();
    assert_eq!(wal.file_ids(), vec![WalFileId(6)]);
    drop(wal);
    let (_wal, stats, seen) = collect(dir.path(), SequenceNumber(6)).unwrap();
    assert!(seen.is_empty());
    assert_eq!(stats.records, 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

    /// WAL bytes are untrusted input: any bytes are a record, a header or an error.
    #[test]
    fn arbitrary_wal_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let _ = format::decode_record(&bytes);
        let _ = format::FileHeader::decode(&bytes);
    }
}

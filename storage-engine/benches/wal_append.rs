//! WAL append: one writer and 32 concurrent writers (group commit), fsync on every group.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_storage::ids::SequenceNumber;
use kiln_storage::wal::{RecordKind, Wal, WalConfig};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(WalConfig::new(dir.path()), SequenceNumber(1), &mut |_| {
        Ok(())
    })
    .unwrap();
    let wal = Arc::new(wal);
    let payload = vec![7u8; 64 * 1024];

    let mut group = c.benchmark_group("wal_append");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("one_writer_64KiB_fsync", |b| {
        b.iter(|| {
            rt.block_on(wal.append(RecordKind::WriteBatch, payload.clone()))
                .unwrap()
        })
    });
    const WRITERS: usize = 32;
    group.throughput(Throughput::Bytes((payload.len() * WRITERS) as u64));
    group.bench_function("32_writers_64KiB_group_commit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..WRITERS)
                    .map(|_| {
                        let wal = Arc::clone(&wal);
                        let payload = payload.clone();
                        tokio::spawn(async move {
                            wal.append(RecordKind::WriteBatch, payload).await.unwrap()
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

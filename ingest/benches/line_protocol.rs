//! Line protocol throughput on the TSBS cpu-only workload: the parser alone, and parsing
//! plus validation into Arrow columns.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_bench::{CpuOnly, DEFAULT_START_NANOS};
use kiln_ingest::line_protocol::{Parser, Precision, validate_lines};
use kiln_storage::catalog::CatalogState;

fn workload() -> String {
    // 5,000 lines: one request of kiln-bench ingest.
    let mut text = String::new();
    let mut generator = CpuOnly::new(100, 1, DEFAULT_START_NANOS);
    for _ in 0..50 {
        generator.next_interval(&mut text);
    }
    text
}

fn bench(c: &mut Criterion) {
    let text = workload();
    let mut group = c.benchmark_group("line_protocol");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("parse", |b| {
        b.iter(|| {
            let mut parser = Parser::new(&text);
            let mut fields = 0;
            while let Some(line) = parser.next() {
                fields += line.expect("valid").fields.len();
            }
            assert_eq!(fields, 50_000);
        })
    });
    let catalog = CatalogState::default();
    group.bench_function("parse_and_build_arrow", |b| {
        b.iter(|| {
            let v = validate_lines(&text, "bench", &catalog, Precision::Nanoseconds, 0);
            assert_eq!(v.accepted_lines, 5_000);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Kafka message decoding on the TSBS cpu-only workload: 100-row messages as line protocol
//! and as JSON read through the benchmark's mapping, validated into Arrow columns.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_bench::kafka::{KafkaFormat, json_mapping, messages};
use kiln_ingest::kafka::decode::{Decoder, Message, validate_messages};
use kiln_ingest::kafka::json::JsonMapping;
use kiln_ingest::line_protocol::Precision;
use kiln_storage::catalog::CatalogState;

fn bench(c: &mut Criterion) {
    let catalog = CatalogState::default();
    let mapping: JsonMapping = serde_json::from_str(&json_mapping()).expect("mapping");
    let mut group = c.benchmark_group("kafka_decode");
    for (name, format, decoder) in [
        (
            "line_protocol",
            KafkaFormat::Lp,
            Decoder::LineProtocol(Precision::Nanoseconds),
        ),
        (
            "json",
            KafkaFormat::Json,
            Decoder::new(
                kiln_ingest::kafka::Format::Json,
                Precision::Nanoseconds,
                Some(&mapping),
            )
            .expect("decoder"),
        ),
    ] {
        // 10,000 rows in 100 messages of 100 rows.
        let (rows, payloads) = messages(100, 1, 100, format, 100);
        let msgs: Vec<Message<'_>> = payloads
            .iter()
            .map(|(_, p)| Message {
                payload: Some(p),
                timestamp: Some(0),
                context: None,
            })
            .collect();
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let out = validate_messages(&decoder, &msgs, "bench", &catalog, 0);
                assert!(out.rejected.is_empty(), "{:?}", out.rejected.first());
                assert_eq!(out.rows.accepted_lines, rows);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

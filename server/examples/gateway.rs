//! An edge gateway: streams readings to Kiln over gRPC and survives reconnects.
//!
//! It keeps every batch until Kiln acknowledges it as durable. When the connection or the
//! server goes away it reconnects (with backoff) and resends every unacknowledged batch;
//! rows keep their identity (table, tags, time), so a batch that was in fact written
//! before the ack was lost is overwritten with itself, not duplicated.
//!
//! ```sh
//! # Generated readings: 100 batches of 500 rows from 50 sensors.
//! cargo run --example gateway -- --database plant --batches 100
//! # Or a CSV file with lines `time_unix_nano,sensor,value`.
//! cargo run --example gateway -- --database plant --csv readings.csv
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use kiln_proto::ingest::v1::write_service_client::WriteServiceClient;
use kiln_proto::ingest::v1::{Field, Row, Rows, WriteRequest, field, write_request};

#[derive(Debug, Parser)]
struct Args {
    /// Kiln's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    grpc: String,
    /// Target database.
    #[arg(long, default_value = "plant")]
    database: String,
    /// Read `time_unix_nano,sensor,value` lines from this CSV file instead of generating.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Generated batches.
    #[arg(long, default_value_t = 100)]
    batches: u64,
    /// Rows per batch.
    #[arg(long, default_value_t = 500)]
    rows_per_batch: usize,
}

fn reading(sensor: &str, value: f64, time: i64) -> Row {
    Row {
        table: "reading".into(),
        tags: [("sensor".to_string(), sensor.to_string())].into(),
        fields: vec![Field {
            name: "value".into(),
            value: Some(field::Value::Float(value)),
        }],
        time_unix_nano: time,
    }
}

fn load(args: &Args) -> Result<Vec<Row>, String> {
    match &args.csv {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, line)| {
                    let parts: Vec<&str> = line.split(',').map(str::trim).collect();
                    let [time, sensor, value] = parts.as_slice() else {
                        return Err(format!(
                            "line {}: expected time_unix_nano,sensor,value",
                            i + 1
                        ));
                    };
                    let time = time
                        .parse()
                        .map_err(|e| format!("line {}: time: {e}", i + 1))?;
                    let value = value
                        .parse()
                        .map_err(|e| format!("line {}: value: {e}", i + 1))?;
                    Ok(reading(sensor, value, time))
                })
                .collect()
        }
        None => {
            let start = 1_700_000_000_000_000_000i64;
            let total = args.batches as usize * args.rows_per_batch;
            Ok((0..total)
                .map(|i| {
                    let sensor = format!("s{:03}", i % 50);
                    let tick = (i / 50) as i64;
                    reading(
                        &sensor,
                        20.0 + (tick as f64 / 10.0).sin(),
                        start + tick * 1_000_000_000,
                    )
                })
                .collect())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let rows = load(&args)?;
    let mut pending: BTreeMap<u64, WriteRequest> = rows
        .chunks(args.rows_per_batch)
        .enumerate()
        .map(|(i, chunk)| {
            let id = i as u64;
            let req = WriteRequest {
                batch_id: id,
                database: args.database.clone(),
                payload: Some(write_request::Payload::Rows(Rows {
                    rows: chunk.to_vec(),
                })),
                accept_partial: true,
            };
            (id, req)
        })
        .collect();
    let total = pending.len();
    let mut backoff = Duration::from_millis(200);
    while !pending.is_empty() {
        let mut client = match WriteServiceClient::connect(args.grpc.clone()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "cannot connect to {}: {e}; retrying in {backoff:?}",
                    args.grpc
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        // (Re)send everything not yet acknowledged, oldest first.
        let outbound: Vec<WriteRequest> = pending.values().cloned().collect();
        eprintln!(
            "connected; sending {} unacknowledged batches",
            outbound.len()
        );
        let mut acks = match client.write_stream(futures::stream::iter(outbound)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                eprintln!("stream refused: {status}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        loop {
            match acks.message().await {
                Ok(Some(ack)) if ack.durable => {
                    pending.remove(&ack.batch_id);
                    backoff = Duration::from_millis(200);
                    for e in &ack.errors {
                        eprintln!(
                            "batch {}: row {} rejected: {}",
                            ack.batch_id, e.row, e.message
                        );
                    }
                }
                Ok(Some(ack)) => {
                    // Rejected as a whole: resending the same rows would fail again.
                    eprintln!(
                        "batch {} failed: {} (code {})",
                        ack.batch_id, ack.message, ack.code
                    );
                    if ack.code == tonic::Code::InvalidArgument as i32 {
                        pending.remove(&ack.batch_id);
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    eprintln!(
                        "stream broken: {status}; {} batches unacknowledged",
                        pending.len()
                    );
                    break;
                }
            }
        }
        if !pending.is_empty() {
            tokio::time::sleep(backoff).await;
        }
    }
    println!("{total} batches acknowledged as durable");
    Ok(())
}

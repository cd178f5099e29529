//! `kiln-bench`: drives a running Kiln server with the TSBS cpu-only workload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use kiln_bench::{CpuOnly, DEFAULT_START_NANOS, INTERVAL_NANOS};

#[derive(Debug, Parser)]
#[command(name = "kiln-bench", about = "Load generator and benchmarks for Kiln")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Workload {
    /// Number of hosts (TSBS --scale).
    #[arg(long, default_value_t = 100)]
    scale: usize,
    /// Random seed.
    #[arg(long, default_value_t = 123)]
    seed: u64,
    /// Span of simulated time, 10 s between rows of a host.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the workload as line protocol.
    Generate(Workload),
    /// Send the workload to a server and report rows/s and write latency.
    Ingest {
        #[command(flatten)]
        workload: Workload,
        /// Server base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Database to write into.
        #[arg(long, default_value = "benchmark")]
        db: String,
        /// Lines per request.
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
        /// Concurrent connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
}

fn intervals(w: &Workload) -> usize {
    (w.duration.as_nanos() / INTERVAL_NANOS as u128) as usize
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(w) => {
            use std::io::Write;
            let mut generator = CpuOnly::new(w.scale, w.seed, DEFAULT_START_NANOS);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut buf = String::new();
            for _ in 0..intervals(&w) {
                buf.clear();
                generator.next_interval(&mut buf);
                if out.write_all(buf.as_bytes()).is_err() {
                    return std::process::ExitCode::FAILURE;
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Command::Ingest {
            workload,
            url,
            db,
            batch_size,
            connections,
        } => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(ingest(workload, url, db, batch_size, connections)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

async fn ingest(
    w: Workload,
    url: String,
    db: String,
    batch_size: usize,
    connections: usize,
) -> Result<(), String> {
    eprintln!(
        "generating scale={} duration={:?} seed={} ...",
        w.scale, w.duration, w.seed
    );
    let batches =
        CpuOnly::new(w.scale, w.seed, DEFAULT_START_NANOS).batches(intervals(&w), batch_size);
    let total_rows: usize = batches.iter().map(|(n, _)| n).sum();
    let total_bytes: usize = batches.iter().map(|(_, b)| b.len()).sum();
    eprintln!(
        "sending {total_rows} rows ({:.1} MB) in {} requests over {connections} connections",
        total_bytes as f64 / 1e6,
        batches.len()
    );
    let queue = Arc::new(tokio::sync::Mutex::new(batches.into_iter()));
    let endpoint = format!("{}/api/v3/write_lp?db={db}", url.trim_end_matches('/'));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let queue = Arc::clone(&queue);
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = Vec::new();
            loop {
                let Some((_, body)) = queue.lock().await.next() else {
                    return Ok(latencies);
                };
                loop {
                    let t = Instant::now();
                    let resp = client
                        .post(&endpoint)
                        .body(body.clone())
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = resp.status();
                    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    if !status.is_success() {
                        return Err(format!(
                            "write failed: {status}: {}",
                            resp.text().await.unwrap_or_default()
                        ));
                    }
                    latencies.push(t.elapsed());
                    break;
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "rows={total_rows} elapsed={:.2}s rows_per_sec={:.0} mb_per_sec={:.1} p50_ms={:.1} p99_ms={:.1}",
        elapsed.as_secs_f64(),
        total_rows as f64 / elapsed.as_secs_f64(),
        total_bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    Ok(())
}

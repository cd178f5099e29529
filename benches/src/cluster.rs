//! `kiln-bench cluster`: TSBS rows/s from a Kafka topic through 1 and through 2 ingesters
//! (`--role ingester`) persisting to one S3 bucket, and the CPU time each spends per row.
//!
//! Each run preloads a fresh topic of 6 partitions (a host's rows in one partition), starts
//! the ingesters on a fresh prefix of the bucket, all in one consumer group, and times from
//! the first row written (the sum of their `kiln_ingest_rows_total`) to the last, so the
//! group's join is not counted. CPU time is the processes' user and system time from
//! `/proc` at the end, over the rows. A querier (`--ingesters` listing them) then checks
//! that the table holds every row once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kafka::{KafkaFormat, Kiln, count, median, messages_over, produce, rows_written};

/// Partitions of each run's topic.
pub const PARTITIONS: i32 = 6;

/// What to measure.
pub struct ClusterPlan {
    pub kiln: PathBuf,
    /// Bootstrap servers of a broker holding topics `cluster-{n}-{run}` of 6 partitions.
    pub brokers: String,
    /// `--object-store*` flags of the bucket (credentials come from the environment).
    pub store_args: Vec<String>,
    /// Ingester counts to compare, e.g. `[1, 2]`.
    pub ingesters: Vec<usize>,
    pub rows_per_message: usize,
    pub runs: usize,
    pub data_dir: PathBuf,
    pub kiln_args: Vec<String>,
}

/// One measurement: rows/s and CPU microseconds per row.
struct Measured {
    rows_per_second: f64,
    cpu_us_per_row: f64,
}

/// Measures `plan` on the TSBS workload of `scale` hosts over `intervals` rows each.
pub async fn run(
    scale: usize,
    seed: u64,
    intervals: usize,
    plan: &ClusterPlan,
) -> Result<(), String> {
    let (rows, messages) = messages_over(
        scale,
        seed,
        intervals,
        KafkaFormat::Lp,
        plan.rows_per_message,
        PARTITIONS,
    );
    eprintln!(
        "{rows} rows in {} messages over {PARTITIONS} partitions",
        messages.len()
    );
    let mut results: Vec<(usize, Vec<Measured>)> =
        plan.ingesters.iter().map(|n| (*n, Vec::new())).collect();
    for run in 0..plan.runs {
        for (n, measured) in &mut results {
            let topic = format!("cluster-{n}-{run}");
            produce(&plan.brokers, &topic, &messages)?;
            let m = measure(plan, *n, &topic, &format!("bench-{n}-{run}"), rows as u64).await?;
            eprintln!(
                "run {run}, {n} ingester(s): {:.0} rows/s, {:.2} µs CPU per row",
                m.rows_per_second, m.cpu_us_per_row
            );
            measured.push(m);
        }
    }
    println!("| ingesters | median rows/s | vs 1 ingester | median CPU µs per row |");
    println!("|---:|---:|---:|---:|");
    let base = results
        .first()
        .map(|(_, m)| median(&m.iter().map(|m| m.rows_per_second).collect::<Vec<_>>()))
        .unwrap_or(1.0);
    for (n, measured) in &results {
        let rate = median(
            &measured
                .iter()
                .map(|m| m.rows_per_second)
                .collect::<Vec<_>>(),
        );
        let cpu = median(
            &measured
                .iter()
                .map(|m| m.cpu_us_per_row)
                .collect::<Vec<_>>(),
        );
        println!("| {n} | {rate:.0} | {:.2}× | {cpu:.2} |", rate / base);
    }
    Ok(())
}

/// `n` ingesters consuming `topic` into `prefix` until `total` rows are written.
async fn measure(
    plan: &ClusterPlan,
    n: usize,
    topic: &str,
    prefix: &str,
    total: u64,
) -> Result<Measured, String> {
    let store = store_args(&plan.store_args, prefix);
    let mut ingesters = Vec::new();
    for i in 0..n {
        let mut args = store.clone();
        args.extend(
            [
                "--role",
                "ingester",
                "--node-name",
                &format!("ingester-{i}"),
                "--kafka-brokers",
                &plan.brokers,
                "--kafka-topics",
                topic,
                "--kafka-database",
                "bench",
                // A group of its own: members of an earlier run's group, killed, would
                // hold partitions until their session times out.
                "--kafka-group",
                topic,
            ]
            .map(str::to_owned),
        );
        args.extend(plan.kiln_args.iter().cloned());
        let dir = plan.data_dir.join(format!("ingester-{i}"));
        ingesters.push(Kiln::start(&plan.kiln, &dir, &args)?);
    }
    let http = reqwest::Client::new();
    let started = Instant::now();
    let (mut first, mut first_rows) = (None, 0);
    let secs = loop {
        let mut written = 0;
        for k in &ingesters {
            written += rows_written(&http, &k.http).await;
        }
        if written > 0 && first.is_none() {
            first = Some(Instant::now());
            first_rows = written;
        }
        if written >= total {
            break first.unwrap_or(started).elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!("only {written} of {total} rows after 30 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if secs <= 0.0 || first_rows >= total {
        return Err("every row arrived before the first look; use more rows".into());
    }
    let mut cpu = 0.0;
    for k in &ingesters {
        cpu += cpu_seconds(k.pid())?;
    }
    // Every row once, as a querier answers it (the rows not yet persisted come from the
    // ingesters).
    let mut args = store.clone();
    let list: Vec<String> = ingesters.iter().map(|k| k.grpc.clone()).collect();
    args.extend([
        "--role".into(),
        "querier".into(),
        "--ingesters".into(),
        list.join(","),
    ]);
    let querier = Kiln::start(&plan.kiln, &plan.data_dir.join("querier"), &args)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let held = count(&http, &querier.http, "bench", "cpu").await;
        if held == total || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    querier.stop();
    for k in ingesters {
        k.stop();
    }
    if held != total {
        return Err(format!(
            "a querier answers {held} rows; {total} were produced"
        ));
    }
    Ok(Measured {
        rows_per_second: (total - first_rows) as f64 / secs,
        cpu_us_per_row: cpu * 1e6 / total as f64,
    })
}

/// `args` with `--object-store-prefix` set to `prefix` (replacing one given).
fn store_args(args: &[String], prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--object-store-prefix" {
            it.next();
            continue;
        }
        out.push(a.clone());
    }
    out.extend(["--object-store-prefix".into(), prefix.to_owned()]);
    out
}

/// User and system CPU seconds process `pid` has used (`/proc/PID/stat`, in clock ticks of
/// 1/100 s, Linux's `USER_HZ`).
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = Path::new("/proc").join(pid.to_string()).join("stat");
    let stat = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{} is not a stat line", path.display()))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("{} has no field {}", path.display(), i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

//! `kiln-bench queries`: the TSBS cpu-only query types, on Kiln and on DuckDB.
//!
//! Each query type is instantiated `runs` times with seeded random hosts and windows, as
//! TSBS's query generator does for TimescaleDB, and the same SQL (dialect aside) runs on
//! Kiln over Flight SQL and on DuckDB over the Parquet segments Kiln persisted
//! (`benches/duckdb_queries.py`, run with the Python given). Every query runs once
//! untimed, then once timed, on each engine. Times are client-side, from sending the query
//! to holding the whole result as Arrow; the row counts of the two engines are compared for
//! every query.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::FIELDS;

/// The TSBS cpu-only query types.
pub const QUERY_TYPES: [&str; 15] = [
    "single-groupby-1-1-1",
    "single-groupby-1-1-12",
    "single-groupby-1-8-1",
    "single-groupby-5-1-1",
    "single-groupby-5-1-12",
    "single-groupby-5-8-1",
    "cpu-max-all-1",
    "cpu-max-all-8",
    "double-groupby-1",
    "double-groupby-5",
    "double-groupby-all",
    "high-cpu-1",
    "high-cpu-all",
    "lastpoint",
    "groupby-orderby-limit",
];

const HOUR: i64 = 3_600_000_000_000;

/// The data the queries run over: `hosts` hosts from `start` for `span` nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Data {
    pub hosts: usize,
    pub start: i64,
    pub span: i64,
}

/// One query in both dialects.
#[derive(Debug, Clone)]
pub struct Query {
    pub kind: &'static str,
    pub kiln: String,
    pub duckdb: String,
}

/// A timestamp literal in each dialect. Kiln's segments store `time` as UTC nanoseconds,
/// which DuckDB reads as `TIMESTAMPTZ_NS` and compares only with literals of that type.
fn at(nanos: i64) -> (String, String) {
    let t = chrono_like(nanos);
    (
        format!("'{t}Z'"),
        format!("'{}+00'::TIMESTAMPTZ_NS", t.replace('T', " ")),
    )
}

/// `nanos` as `YYYY-MM-DDTHH:MM:SS` (UTC), without a date library.
fn chrono_like(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Data {
    /// A random window of `len` nanoseconds inside the data, on whole seconds.
    fn window(&self, rng: &mut SmallRng, len: i64) -> (i64, i64) {
        let room = (self.span - len).max(0) / 1_000_000_000;
        let start = self.start + rng.random_range(0..=room) * 1_000_000_000;
        (start, start + len)
    }

    fn hosts(&self, rng: &mut SmallRng, n: usize) -> String {
        sample(rng, self.hosts, n.min(self.hosts))
            .iter()
            .map(|h| format!("'host_{h}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn metrics(n: usize) -> &'static [&'static str] {
    &FIELDS[..n]
}

fn aggregates(func: &str, fields: &[&str]) -> String {
    fields
        .iter()
        .map(|f| format!("{func}({f}) AS {func}_{f}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Both dialects of `sql`, where `{start}`/`{end}` are timestamp literals and `{time}` the
/// time column as `time_bucket` takes it (DuckDB has no `time_bucket` for `TIMESTAMPTZ_NS`).
fn both(kind: &'static str, sql: &str, start: i64, end: i64) -> Query {
    let (ks, ds) = at(start);
    let (ke, de) = at(end);
    Query {
        kind,
        kiln: sql
            .replace("{start}", &ks)
            .replace("{end}", &ke)
            .replace("{time}", "time"),
        duckdb: sql
            .replace("{start}", &ds)
            .replace("{end}", &de)
            .replace("{time}", "time::TIMESTAMPTZ"),
    }
}

/// An instance of query type `kind`, as TSBS's TimescaleDB generator writes it.
pub fn generate(kind: &'static str, data: &Data, rng: &mut SmallRng) -> Query {
    let minute = "time_bucket(INTERVAL '1 minute', {time})";
    let hour = "time_bucket(INTERVAL '1 hour', {time})";
    if let Some(rest) = kind.strip_prefix("single-groupby-") {
        let parts: Vec<usize> = rest.split('-').map(|p| p.parse().expect("n-n-n")).collect();
        let (m, h, hours) = (parts[0], parts[1], parts[2] as i64);
        let (start, end) = data.window(rng, hours * HOUR);
        let sql = format!(
            "SELECT {minute} AS minute, {} FROM cpu \
             WHERE hostname IN ({}) AND time >= {{start}} AND time < {{end}} \
             GROUP BY minute ORDER BY minute ASC",
            aggregates("max", metrics(m)),
            data.hosts(rng, h)
        );
        return both(kind, &sql, start, end);
    }
    if let Some(h) = kind.strip_prefix("cpu-max-all-") {
        let h: usize = h.parse().expect("host count");
        let (start, end) = data.window(rng, 8 * HOUR);
        let sql = format!(
            "SELECT {hour} AS hour, {} FROM cpu \
             WHERE hostname IN ({}) AND time >= {{start}} AND time < {{end}} \
             GROUP BY hour ORDER BY hour",
            aggregates("max", metrics(10)),
            data.hosts(rng, h)
        );
        return both(kind, &sql, start, end);
    }
    if let Some(m) = kind.strip_prefix("double-groupby-") {
        let m = if m == "all" {
            10
        } else {
            m.parse().expect("metric count")
        };
        let (start, end) = data.window(rng, 12 * HOUR);
        let sql = format!(
            "SELECT {hour} AS hour, hostname, {} FROM cpu \
             WHERE time >= {{start}} AND time < {{end}} \
             GROUP BY hour, hostname ORDER BY hour, hostname",
            aggregates("avg", metrics(m))
        );
        return both(kind, &sql, start, end);
    }
    match kind {
        "high-cpu-1" | "high-cpu-all" => {
            let (start, end) = data.window(rng, 12 * HOUR);
            let hosts = if kind == "high-cpu-1" {
                format!(" AND hostname IN ({})", data.hosts(rng, 1))
            } else {
                String::new()
            };
            let sql = format!(
                "SELECT * FROM cpu WHERE usage_user > 90.0 \
                 AND time >= {{start}} AND time < {{end}}{hosts}"
            );
            both(kind, &sql, start, end)
        }
        "lastpoint" => both(
            kind,
            "SELECT DISTINCT ON (hostname) * FROM cpu ORDER BY hostname, time DESC",
            0,
            0,
        ),
        "groupby-orderby-limit" => {
            let (_, end) = data.window(rng, HOUR);
            let sql = format!(
                "SELECT {minute} AS minute, max(usage_user) FROM cpu \
                 WHERE time < {{end}} GROUP BY minute ORDER BY minute DESC LIMIT 5"
            );
            both(kind, &sql, 0, end)
        }
        other => panic!("unknown query type {other}"),
    }
}

/// A Flight SQL connection to Kiln, kept for all queries.
pub struct Kiln {
    client: FlightSqlServiceClient<Channel>,
}

impl Kiln {
    /// With `keep_dictionaries`, tags come as Arrow dictionaries (`kiln-dictionaries: keep`).
    pub async fn connect(
        grpc_url: &str,
        db: &str,
        keep_dictionaries: bool,
    ) -> Result<Self, String> {
        let mut client = FlightSqlServiceClient::new(crate::flight_channel(grpc_url).await?);
        client.set_header("database", db);
        if keep_dictionaries {
            client.set_header("kiln-dictionaries", "keep");
        }
        Ok(Self { client })
    }

    /// Runs `sql`; the rows it returned and the time until the last arrived.
    pub async fn run(&mut self, sql: &str) -> Result<(usize, Duration), String> {
        let err = |e: arrow_flight::error::FlightError| format!("Flight SQL: {e} in {sql}");
        let started = Instant::now();
        let info = self
            .client
            .execute(sql.to_owned(), None)
            .await
            .map_err(|e| format!("Flight SQL: {e} in {sql}"))?;
        let mut rows = 0;
        for endpoint in info.endpoint {
            let ticket = endpoint
                .ticket
                .ok_or("a Flight endpoint without a ticket")?;
            let mut stream = self
                .client
                .do_get(ticket)
                .await
                .map_err(|e| format!("Flight SQL: {e} in {sql}"))?;
            while let Some(batch) = stream.try_next().await.map_err(err)? {
                rows += batch.num_rows();
            }
        }
        Ok((rows, started.elapsed()))
    }
}

/// Runs `queries` on DuckDB over the Parquet files under `segments`, with `python` (which
/// must be able to `import duckdb`); the rows and seconds of each, in order.
pub fn run_duckdb(
    python: &str,
    script: &str,
    segments: &str,
    queries: &[Query],
) -> Result<Vec<(usize, f64)>, String> {
    let mut child = Command::new(python)
        .arg(script)
        .arg(segments)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {python} {script}: {e}"))?;
    {
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        for q in queries {
            writeln!(stdin, "{}", q.duckdb.replace('\n', " ")).map_err(|e| e.to_string())?;
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{script} failed: {}", out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (rows, secs) = l.split_once(' ').ok_or(format!("bad line {l:?}"))?;
            Ok((
                rows.parse().map_err(|e| format!("{l:?}: {e}"))?,
                secs.parse().map_err(|e| format!("{l:?}: {e}"))?,
            ))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Everything `kiln-bench queries` needs.
pub struct Plan {
    pub grpc_url: String,
    pub db: String,
    pub data: Data,
    pub runs: usize,
    pub seed: u64,
    pub types: Vec<&'static str>,
    pub python: String,
    pub script: String,
    pub segments: String,
    /// Ask Kiln for tags as dictionaries rather than strings.
    pub keep_dictionaries: bool,
}

/// Runs every query type on both engines and prints the table.
pub async fn report(plan: &Plan) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(plan.seed);
    let mut kiln = Kiln::connect(&plan.grpc_url, &plan.db, plan.keep_dictionaries).await?;
    println!("| query type | Kiln median | DuckDB median | Kiln / DuckDB | rows (median) |");
    println!("|---|---:|---:|---:|---:|");
    for &kind in &plan.types {
        let queries: Vec<Query> = (0..plan.runs)
            .map(|_| generate(kind, &plan.data, &mut rng))
            .collect();
        // Every query once untimed first, on both engines: the timed pass then reads files
        // in the page cache, as a long-running server does.
        for q in &queries {
            kiln.run(&q.kiln).await?;
        }
        let mut kiln_times = Vec::new();
        let mut kiln_rows = Vec::new();
        for q in &queries {
            let (rows, took) = kiln.run(&q.kiln).await?;
            kiln_times.push(took.as_secs_f64());
            kiln_rows.push(rows);
        }
        let mut with_warmup = queries.clone();
        with_warmup.extend(queries.iter().cloned());
        let duck = run_duckdb(&plan.python, &plan.script, &plan.segments, &with_warmup)?;
        let duck = &duck[queries.len()..];
        for ((q, kr), (dr, _)) in queries.iter().zip(&kiln_rows).zip(duck) {
            if kr != dr {
                eprintln!(
                    "warning: {kind}: Kiln returned {kr} rows, DuckDB {dr}, for {}",
                    q.kiln
                );
            }
        }
        let k = median(kiln_times);
        let d = median(duck.iter().map(|(_, s)| *s).collect());
        let rows = median(kiln_rows.iter().map(|&r| r as f64).collect());
        println!(
            "| {kind} | {:.2} ms | {:.2} ms | {:.2}× | {rows:.0} |",
            k * 1e3,
            d * 1e3,
            k / d
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_queries_in_both_dialects() {
        assert_eq!(
            chrono_like(1_451_606_400_000_000_000),
            "2016-01-01T00:00:00"
        );
        assert_eq!(
            chrono_like(1_709_287_261_000_000_000),
            "2024-03-01T10:01:01"
        );
        let data = Data {
            hosts: 10,
            start: 1_451_606_400_000_000_000,
            span: 24 * HOUR,
        };
        let mut rng = SmallRng::seed_from_u64(1);
        for kind in QUERY_TYPES {
            let q = generate(kind, &data, &mut rng);
            assert!(!q.kiln.contains('{') && !q.duckdb.contains('{'), "{q:?}");
        }
        let q = generate("single-groupby-5-8-1", &data, &mut rng);
        assert_eq!(q.kiln.matches("host_").count(), 8);
        assert!(!q.kiln.contains("max(usage_guest)"));
        assert!(q.kiln.contains("max(usage_iowait)"));
        assert!(q.duckdb.contains("'2016-01-01 ") && q.duckdb.contains("+00'::TIMESTAMPTZ_NS"));
        assert!(q.duckdb.contains("time::TIMESTAMPTZ)") && q.kiln.contains(", time)"));
    }
}

//! `kiln-bench queries`: the TSBS cpu-only query types, on Kiln and on DuckDB.
//!
//! Each query type is instantiated `runs` times with seeded random hosts and windows, as
//! TSBS's query generator does for TimescaleDB, and the same SQL (dialect aside) runs on
//! Kiln through each client asked for ([`Client`]: HTTP JSON, PostgreSQL simple protocol,
//! Flight SQL) and on DuckDB in each configuration asked for ([`Duck`]: over the Parquet
//! segments Kiln persisted, over Parquet files DuckDB wrote itself, over a native DuckDB
//! table; `benches/duckdb_queries.py`, run with the Python given). Every query runs once
//! untimed, then once timed, on each. Times are client-side, from sending the query to
//! holding the whole result (the JSON body, every PostgreSQL row, the Arrow batches); the
//! row counts are compared for every query.

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

/// One query in each dialect.
#[derive(Debug, Clone)]
pub struct Query {
    pub kind: &'static str,
    pub kiln: String,
    /// For DuckDB over Kiln's segments.
    pub duckdb: String,
    /// For DuckDB over its own files and tables (zoneless timestamps, no casts).
    pub duckdb_own: String,
}

/// A timestamp literal in each dialect. Kiln's segments store `time` as UTC nanoseconds,
/// which DuckDB reads as `TIMESTAMPTZ_NS` and compares only with literals of that type;
/// DuckDB's own files hold it as a zoneless `TIMESTAMP`.
fn at(nanos: i64) -> (String, String, String) {
    let t = chrono_like(nanos);
    let spaced = t.replace('T', " ");
    (
        format!("'{t}Z'"),
        format!("'{spaced}+00'::TIMESTAMPTZ_NS"),
        format!("TIMESTAMP '{spaced}'"),
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

/// Every dialect of `sql`, where `{start}`/`{end}` are timestamp literals and `{time}` the
/// time column as `time_bucket` takes it (DuckDB has no `time_bucket` for `TIMESTAMPTZ_NS`).
fn both(kind: &'static str, sql: &str, start: i64, end: i64) -> Query {
    let (ks, ds, os) = at(start);
    let (ke, de, oe) = at(end);
    Query {
        duckdb_own: sql
            .replace("{start}", &os)
            .replace("{end}", &oe)
            .replace("{time}", "time"),
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

/// A Kiln client kept for all queries.
pub enum Client {
    /// Flight SQL (Kiln's own benchmark client).
    Flight(FlightSqlServiceClient<Channel>),
    /// `POST /api/v3/query_sql`, JSON results, one kept connection.
    Http {
        client: reqwest::Client,
        url: String,
        db: String,
    },
    /// The PostgreSQL simple protocol with text results, as psql sends queries.
    Postgres(tokio_postgres::Client),
}

/// Which Kiln clients: `flight`, `http`, `pg`.
pub const CLIENTS: [&str; 3] = ["http", "pg", "flight"];

impl Client {
    /// Connects client `kind` (one of [`CLIENTS`]). With `keep_dictionaries`, Flight SQL
    /// receives tags as Arrow dictionaries (`kiln-dictionaries: keep`).
    pub async fn connect(
        kind: &str,
        urls: &Urls,
        db: &str,
        keep_dictionaries: bool,
    ) -> Result<Self, String> {
        match kind {
            "flight" => {
                let mut client =
                    FlightSqlServiceClient::new(crate::flight_channel(&urls.grpc).await?);
                client.set_header("database", db);
                if keep_dictionaries {
                    client.set_header("kiln-dictionaries", "keep");
                }
                Ok(Self::Flight(client))
            }
            "http" => Ok(Self::Http {
                client: reqwest::Client::new(),
                url: format!("{}/api/v3/query_sql", urls.http.trim_end_matches('/')),
                db: db.to_owned(),
            }),
            "pg" => {
                let (client, connection) = tokio_postgres::connect(
                    &format!("{} dbname={db}", urls.pg),
                    tokio_postgres::NoTls,
                )
                .await
                .map_err(|e| format!("PostgreSQL {}: {e}", urls.pg))?;
                tokio::spawn(connection);
                Ok(Self::Postgres(client))
            }
            other => Err(format!(
                "unknown client {other}; known: {}",
                CLIENTS.join(", ")
            )),
        }
    }

    /// Runs `sql`; the rows it returned and the time until the client held them all.
    pub async fn run(&mut self, sql: &str) -> Result<(usize, Duration), String> {
        let started = Instant::now();
        match self {
            Self::Flight(client) => {
                let err = |e: arrow_flight::error::FlightError| format!("Flight SQL: {e} in {sql}");
                let info = client
                    .execute(sql.to_owned(), None)
                    .await
                    .map_err(|e| format!("Flight SQL: {e} in {sql}"))?;
                let mut rows = 0;
                for endpoint in info.endpoint {
                    let ticket = endpoint
                        .ticket
                        .ok_or("a Flight endpoint without a ticket")?;
                    let mut stream = client
                        .do_get(ticket)
                        .await
                        .map_err(|e| format!("Flight SQL: {e} in {sql}"))?;
                    while let Some(batch) = stream.try_next().await.map_err(err)? {
                        rows += batch.num_rows();
                    }
                }
                Ok((rows, started.elapsed()))
            }
            Self::Http { client, url, db } => {
                let response = client
                    .post(url.as_str())
                    .json(&serde_json::json!({ "db": db, "q": sql }))
                    .send()
                    .await
                    .map_err(|e| format!("HTTP: {e} in {sql}"))?;
                let status = response.status();
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| format!("HTTP: {e} in {sql}"))?;
                let took = started.elapsed();
                if !status.is_success() {
                    return Err(format!(
                        "HTTP {status}: {} in {sql}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                // Counted once the clock has stopped.
                let rows = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body)
                    .map_err(|e| format!("HTTP: a result that is not a JSON array: {e}"))?
                    .len();
                Ok((rows, took))
            }
            Self::Postgres(client) => {
                let messages = client
                    .simple_query(sql)
                    .await
                    .map_err(|e| format!("PostgreSQL: {e} in {sql}"))?;
                let took = started.elapsed();
                let rows = messages
                    .iter()
                    .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                    .count();
                Ok((rows, took))
            }
        }
    }
}

/// Where Kiln answers.
pub struct Urls {
    pub http: String,
    pub grpc: String,
    /// A libpq connection string without the database (`host=… port=… user=…`).
    pub pg: String,
}

/// A DuckDB configuration to compare with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Duck {
    /// Over the Parquet segments Kiln persisted (a glob), casting literals to their type.
    KilnSegments(String),
    /// Over Parquet files DuckDB wrote itself (`benches/duckdb_queries.py prepare`).
    Parquet(String),
    /// Over a native table in a DuckDB database file.
    Native(String),
}

impl Duck {
    pub fn label(&self) -> &'static str {
        match self {
            Duck::KilnSegments(_) => "DuckDB (Kiln's files)",
            Duck::Parquet(_) => "DuckDB Parquet",
            Duck::Native(_) => "DuckDB native",
        }
    }

    fn sql<'a>(&self, q: &'a Query) -> &'a str {
        match self {
            Duck::KilnSegments(_) => &q.duckdb,
            _ => &q.duckdb_own,
        }
    }
}

/// Runs `queries` on DuckDB as `duck` says, with `python` (which must be able to `import
/// duckdb`); the rows and seconds of each, in order.
pub fn run_duckdb(
    python: &str,
    script: &str,
    duck: &Duck,
    queries: &[Query],
) -> Result<Vec<(usize, f64)>, String> {
    let (mode, path) = match duck {
        Duck::KilnSegments(p) => ("kiln-segments", p),
        Duck::Parquet(p) => ("parquet", p),
        Duck::Native(p) => ("native", p),
    };
    let mut child = Command::new(python)
        .arg(script)
        .arg(mode)
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {python} {script}: {e}"))?;
    {
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        for q in queries {
            writeln!(stdin, "{}", duck.sql(q).replace('\n', " ")).map_err(|e| e.to_string())?;
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
    pub urls: Urls,
    pub db: String,
    pub data: Data,
    pub runs: usize,
    pub seed: u64,
    pub types: Vec<&'static str>,
    /// Kiln's clients (of [`CLIENTS`]), one column each; the first is the one the ratios
    /// are of.
    pub clients: Vec<String>,
    /// DuckDB's configurations, one column each.
    pub ducks: Vec<Duck>,
    pub python: String,
    pub script: String,
    /// Ask Kiln for tags as dictionaries rather than strings (Flight SQL).
    pub keep_dictionaries: bool,
    /// Time Kiln's queries the first time they run (no untimed pass before).
    pub cold: bool,
}

fn label(client: &str) -> &'static str {
    match client {
        "http" => "Kiln HTTP JSON",
        "pg" => "Kiln PostgreSQL",
        _ => "Kiln Flight SQL",
    }
}

/// Runs every query type on every client and DuckDB configuration and prints the table of
/// medians (ms), the first client's ratio to each DuckDB, and the geometric means of those
/// ratios over the types.
pub async fn report(plan: &Plan) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(plan.seed);
    let mut clients = Vec::new();
    for c in &plan.clients {
        clients.push(Client::connect(c, &plan.urls, &plan.db, plan.keep_dictionaries).await?);
    }
    let Some(first) = plan.clients.first() else {
        return Err("no Kiln client".into());
    };
    let mut header = vec!["query type".to_owned()];
    header.extend(plan.clients.iter().map(|c| label(c).to_owned()));
    header.extend(plan.ducks.iter().map(|d| d.label().to_owned()));
    header.extend(
        plan.ducks
            .iter()
            .map(|d| format!("{} / {}", label(first), d.label())),
    );
    header.push("rows (median)".into());
    println!("| {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(header.len() - 1));
    let mut log_ratios = vec![0.0; plan.ducks.len()];
    for &kind in &plan.types {
        let queries: Vec<Query> = (0..plan.runs)
            .map(|_| generate(kind, &plan.data, &mut rng))
            .collect();
        let mut medians = Vec::new();
        let mut kiln_rows = Vec::new();
        for (name, client) in plan.clients.iter().zip(&mut clients) {
            // Every query once untimed first: the timed pass then reads files in the page
            // cache, as a long-running server does.
            if !plan.cold {
                for q in &queries {
                    client.run(&q.kiln).await?;
                }
            }
            let mut times = Vec::new();
            let mut rows = Vec::new();
            for q in &queries {
                let (r, took) = client.run(&q.kiln).await?;
                times.push(took.as_secs_f64());
                rows.push(r);
            }
            if kiln_rows.is_empty() {
                kiln_rows = rows;
            } else if rows != kiln_rows {
                eprintln!("warning: {kind}: {name} returned {rows:?} rows, not {kiln_rows:?}");
            }
            medians.push(median(times));
        }
        let mut duck_medians = Vec::new();
        for duck in &plan.ducks {
            let mut with_warmup = queries.clone();
            with_warmup.extend(queries.iter().cloned());
            let runs = run_duckdb(&plan.python, &plan.script, duck, &with_warmup)?;
            let timed = &runs[queries.len()..];
            for ((q, kr), (dr, _)) in queries.iter().zip(&kiln_rows).zip(timed) {
                if kr != dr {
                    eprintln!(
                        "warning: {kind}: Kiln returned {kr} rows, {} {dr}, for {}",
                        duck.label(),
                        q.kiln
                    );
                }
            }
            duck_medians.push(median(timed.iter().map(|(_, s)| *s).collect()));
        }
        let rows = median(kiln_rows.iter().map(|&r| r as f64).collect());
        let mut cells = vec![kind.to_owned()];
        cells.extend(
            medians
                .iter()
                .chain(&duck_medians)
                .map(|m| format!("{:.2}", m * 1e3)),
        );
        for (i, d) in duck_medians.iter().enumerate() {
            let ratio = medians[0] / d;
            log_ratios[i] += ratio.ln();
            cells.push(format!("{ratio:.2}×"));
        }
        cells.push(format!("{rows:.0}"));
        println!("| {} |", cells.join(" | "));
    }
    if !plan.ducks.is_empty() {
        let n = plan.types.len() as f64;
        let mut cells = vec!["geometric mean of the ratios".to_owned()];
        cells.extend(std::iter::repeat_n(
            String::new(),
            plan.clients.len() + plan.ducks.len(),
        ));
        cells.extend(log_ratios.iter().map(|l| format!("{:.2}×", (l / n).exp())));
        cells.push(String::new());
        println!("| {} |", cells.join(" | "));
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
        assert!(
            q.duckdb_own.contains("TIMESTAMP '2016-01-01 ") && q.duckdb_own.contains(", time)")
        );
    }
}

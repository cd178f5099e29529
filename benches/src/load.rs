//! Many clients at once: PostgreSQL connections and HTTP clients querying in loops while
//! line protocol is written, for a fixed time. Every answer is counted by what it was:
//! a result, a documented limit (429 over HTTP, SQLSTATE 53300 over PostgreSQL), or a
//! failure, which the run reports and makes the exit status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::{CpuOnly, DEFAULT_START_NANOS};

/// What the clients got, by kind: `pg ok`, `http 429`, `pg error: …`.
#[derive(Debug, Default)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn add(&mut self, kind: String) {
        *self.0.entry(kind).or_default() += 1;
    }

    /// Answers that were neither results nor a documented limit.
    pub fn failures(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| !k.ends_with(" ok") && !k.ends_with(" limit"))
            .map(|(_, n)| n)
            .sum()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (kind, n) in &self.0 {
            writeln!(f, "{n:>10}  {kind}")?;
        }
        Ok(())
    }
}

/// The queries every client cycles through: small dashboard panels over recent data.
const QUERIES: [&str; 3] = [
    "SELECT hostname, max(usage_user) FROM cpu WHERE time > (SELECT max(time) FROM cpu) - INTERVAL '5 minutes' GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
    "SELECT count(*) FROM cpu WHERE time > (SELECT max(time) FROM cpu) - INTERVAL '1 minute'",
    "SELECT * FROM cpu WHERE hostname = 'host_3' ORDER BY time DESC LIMIT 10",
];

#[derive(Debug, Clone, clap::Args)]
pub struct LoadConfig {
    /// Server HTTP base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Server PostgreSQL address.
    #[arg(long, default_value = "127.0.0.1:5433")]
    pub pg: String,
    /// Database to write into and query.
    #[arg(long, default_value = "benchmark")]
    pub db: String,
    /// PostgreSQL connections, each querying in a loop.
    #[arg(long, default_value_t = 200)]
    pub pg_clients: usize,
    /// HTTP clients, each querying in a loop.
    #[arg(long, default_value_t = 50)]
    pub http_clients: usize,
    /// Rows per second written meanwhile.
    #[arg(long, default_value_t = 100_000)]
    pub rate: usize,
    /// Hosts of the TSBS cpu-only workload.
    #[arg(long, default_value_t = 1000)]
    pub scale: usize,
    /// How long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The server's process id: its resident memory is sampled every second and its
    /// peak reported.
    #[arg(long)]
    pub pid: Option<u32>,
}

pub async fn run(mut config: LoadConfig) -> Result<Tally, String> {
    config.url = config.url.trim_end_matches('/').to_owned();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let end = Instant::now() + config.duration;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(config.http_clients + 8)
        .build()
        .map_err(|e| e.to_string())?;
    // Some data first, so the queries have a table.
    let write_url = format!("{}/api/v3/write_lp?db={}", config.url, config.db);
    let mut generator = CpuOnly::new(config.scale, 11, DEFAULT_START_NANOS);
    for (_, body) in generator.batches(6, config.scale) {
        let resp = http
            .post(&write_url)
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("seeding failed: {}", resp.status()));
        }
    }

    let mut tasks = Vec::new();
    // The writer: one TSBS interval of every host per request, paced to the rate.
    {
        let (http, tally, url) = (http.clone(), Arc::clone(&tally), write_url.clone());
        let (rate, scale) = (config.rate.max(1), config.scale.max(1));
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut rows = 0usize;
            while Instant::now() < end {
                let due = start + Duration::from_secs_f64(rows as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let Some((lines, body)) = generator.batches(1, scale).into_iter().next() else {
                    break;
                };
                rows += lines;
                let kind = match http.post(&url).body(body).send().await {
                    Ok(r) if r.status().is_success() => "write ok".to_owned(),
                    Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                        "write 429 limit".to_owned()
                    }
                    Ok(r) => format!("write {}", r.status()),
                    Err(e) => format!("write error: {e}"),
                };
                tally.lock().await.add(kind);
            }
        }));
    }
    for i in 0..config.http_clients {
        let (http, tally) = (http.clone(), Arc::clone(&tally));
        let (url, db) = (config.url.clone(), config.db.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            while Instant::now() < end {
                let sql = QUERIES[n % QUERIES.len()];
                n += 1;
                let resp = http
                    .get(format!("{url}/api/v3/query_sql"))
                    .query(&[("db", db.as_str()), ("q", sql)])
                    .send()
                    .await;
                let kind = match resp {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => "http ok".to_owned(),
                        Err(e) => format!("http body error: {e}"),
                    },
                    Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        "http 429 limit".to_owned()
                    }
                    Ok(r) => format!(
                        "http {}: {}",
                        r.status(),
                        r.text()
                            .await
                            .unwrap_or_default()
                            .chars()
                            .take(120)
                            .collect::<String>()
                    ),
                    Err(e) => format!("http error: {e}"),
                };
                tally.lock().await.add(kind);
            }
        }));
    }
    let (host, port) = config.pg.rsplit_once(':').ok_or("--pg is host:port")?;
    let conninfo = format!("host={host} port={port} user=load dbname={}", config.db);
    for i in 0..config.pg_clients {
        let (tally, conninfo) = (Arc::clone(&tally), conninfo.clone());
        tasks.push(tokio::spawn(async move {
            let client = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    client
                }
                Err(e) => {
                    let kind = match e.code() {
                        Some(c) if *c == tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS => {
                            "pg connect 53300 limit".to_owned()
                        }
                        _ => format!("pg connect error: {e}"),
                    };
                    tally.lock().await.add(kind);
                    return;
                }
            };
            tally.lock().await.add("pg connect ok".to_owned());
            let mut n = i;
            while Instant::now() < end {
                let sql = QUERIES[n % QUERIES.len()];
                n += 1;
                let kind = match client.simple_query(sql).await {
                    Ok(_) => "pg ok".to_owned(),
                    Err(e) => format!(
                        "pg error: {}",
                        e.as_db_error()
                            .map_or(e.to_string(), |d| d.message().to_owned())
                    ),
                };
                tally.lock().await.add(kind);
            }
        }));
    }
    let sampler = config.pid.map(|pid| {
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < end {
                if let Ok((rss, _)) = crate::footprint::memory_of(pid) {
                    samples.push(rss);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        })
    });
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    if let (Some(pid), Some(sampler)) = (config.pid, sampler) {
        let mut samples = sampler.await.map_err(|e| e.to_string())?;
        samples.sort_unstable();
        let mib = |b: u64| b as f64 / 1048576.0;
        if let Some(median) = samples.get(samples.len() / 2) {
            println!(
                "server RSS: median {:.1} MiB of {} samples, peak (VmHWM) {:.1} MiB",
                mib(*median),
                samples.len(),
                mib(crate::footprint::memory_of(pid).map_or(0, |(_, peak)| peak))
            );
        }
    }
    let tally = std::mem::take(&mut *tally.lock().await);
    Ok(tally)
}

//! `kiln-bench results`: how fast a large query result streams out of each protocol.
//!
//! The same query runs over PostgreSQL wire (text rows over the simple protocol, binary
//! rows over the extended one), Arrow Flight SQL, and HTTP (JSON Lines and Parquet), in
//! rounds so every protocol sees the same server state; each run counts the rows it
//! received, and the report gives the median rows/s per protocol.

use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::{StreamExt, TryStreamExt};

/// Where the server listens and what to run.
#[derive(Debug, Clone)]
pub struct Target {
    pub http_url: String,
    pub grpc_url: String,
    /// `host:port` of the PostgreSQL listener.
    pub pg_addr: String,
    pub db: String,
    pub sql: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    PgText,
    PgBinary,
    FlightSql,
    HttpJsonl,
    HttpParquet,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::PgText,
        Protocol::PgBinary,
        Protocol::FlightSql,
        Protocol::HttpJsonl,
        Protocol::HttpParquet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::PgText => "pgwire text (simple)",
            Protocol::PgBinary => "pgwire binary (extended)",
            Protocol::FlightSql => "Flight SQL",
            Protocol::HttpJsonl => "HTTP JSON Lines",
            Protocol::HttpParquet => "HTTP Parquet",
        }
    }
}

/// Runs the query once over `protocol`; returns the rows received and the time taken.
pub async fn run_once(target: &Target, protocol: Protocol) -> Result<(usize, Duration), String> {
    let start = Instant::now();
    let rows = match protocol {
        Protocol::PgText | Protocol::PgBinary => pg(target, protocol == Protocol::PgBinary).await?,
        Protocol::FlightSql => flight(target).await?,
        Protocol::HttpJsonl | Protocol::HttpParquet => {
            http(target, protocol == Protocol::HttpParquet).await?
        }
    };
    Ok((rows, start.elapsed()))
}

async fn pg(target: &Target, binary: bool) -> Result<usize, String> {
    let (host, port) = target
        .pg_addr
        .rsplit_once(':')
        .ok_or("the PostgreSQL address is host:port")?;
    let (client, connection) = tokio_postgres::connect(
        &format!("host={host} port={port} user=bench dbname={}", target.db),
        tokio_postgres::NoTls,
    )
    .await
    .map_err(|e| format!("PostgreSQL connect: {e}"))?;
    tokio::spawn(connection);
    let err = |e: tokio_postgres::Error| format!("PostgreSQL query: {e}");
    let mut rows = 0;
    if binary {
        let stream = client
            .query_raw(&target.sql, std::iter::empty::<i64>())
            .await
            .map_err(err)?;
        futures::pin_mut!(stream);
        while let Some(row) = stream.next().await {
            row.map_err(err)?;
            rows += 1;
        }
    } else {
        let stream = client.simple_query_raw(&target.sql).await.map_err(err)?;
        futures::pin_mut!(stream);
        while let Some(message) = stream.next().await {
            if let tokio_postgres::SimpleQueryMessage::Row(_) = message.map_err(err)? {
                rows += 1;
            }
        }
    }
    Ok(rows)
}

async fn flight(target: &Target) -> Result<usize, String> {
    fn err(e: impl std::fmt::Display) -> String {
        format!("Flight SQL: {e}")
    }
    let mut client = FlightSqlServiceClient::new(crate::flight_channel(&target.grpc_url).await?);
    client.set_header("database", &target.db);
    let info = client
        .execute(target.sql.clone(), None)
        .await
        .map_err(err)?;
    let mut rows = 0;
    for endpoint in info.endpoint {
        let ticket = endpoint
            .ticket
            .ok_or("a Flight endpoint without a ticket")?;
        let mut stream = client.do_get(ticket).await.map_err(err)?;
        while let Some(batch) = stream.try_next().await.map_err(err)? {
            rows += batch.num_rows();
        }
    }
    Ok(rows)
}

async fn http(target: &Target, parquet: bool) -> Result<usize, String> {
    let format = if parquet { "parquet" } else { "jsonl" };
    let response = reqwest::Client::new()
        .get(format!(
            "{}/api/v3/query_sql",
            target.http_url.trim_end_matches('/')
        ))
        .query(&[
            ("db", &target.db),
            ("q", &target.sql),
            ("format", &format.to_owned()),
        ])
        .send()
        .await
        .map_err(|e| format!("HTTP query: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("HTTP query: {}", response.status()));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("HTTP body: {e}"))?;
    if parquet {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(body)
            .map_err(|e| format!("Parquet: {e}"))?
            .build()
            .map_err(|e| format!("Parquet: {e}"))?;
        let mut rows = 0;
        for batch in reader {
            rows += batch.map_err(|e| format!("Parquet: {e}"))?.num_rows();
        }
        Ok(rows)
    } else {
        Ok(body.iter().filter(|b| **b == b'\n').count())
    }
}

/// Runs every protocol `runs` times, interleaved, and prints the medians.
pub async fn report(target: &Target, runs: usize) -> Result<(), String> {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); Protocol::ALL.len()];
    let mut expected = None;
    for round in 1..=runs {
        for (i, protocol) in Protocol::ALL.into_iter().enumerate() {
            let (rows, elapsed) = run_once(target, protocol).await?;
            match expected {
                None => expected = Some(rows),
                Some(n) if n != rows => {
                    return Err(format!(
                        "{} returned {rows} rows, others {n}",
                        protocol.name()
                    ));
                }
                _ => {}
            }
            let rate = rows as f64 / elapsed.as_secs_f64();
            eprintln!(
                "round {round}: {:<26} {rows} rows in {:>8.3} s = {rate:>12.0} rows/s",
                protocol.name(),
                elapsed.as_secs_f64()
            );
            times[i].push(rate);
        }
    }
    println!(
        "rows={} runs={runs} sql={:?}",
        expected.unwrap_or(0),
        target.sql
    );
    println!("| protocol | median rows/s |");
    println!("|---|---:|");
    for (protocol, mut rates) in Protocol::ALL.into_iter().zip(times) {
        rates.sort_by(f64::total_cmp);
        println!("| {} | {:.0} |", protocol.name(), rates[rates.len() / 2]);
    }
    Ok(())
}

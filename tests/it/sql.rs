//! The SQL behaviour suite: every `tests/sql/*.slt` file, run with sqllogictest against a
//! real `kiln serve` over the PostgreSQL wire protocol (text results, as psql shows them).
//!
//! Each file gets a fresh server and data directory, and the database `slt`. Besides SQL,
//! a record may be one of two directives:
//!
//! ```text
//! statement ok
//! WRITE
//! cpu,host=a usage=1.5 1700000000000000000
//!
//! statement ok
//! RESTART
//! ```
//!
//! `WRITE` sends the lines that follow as line protocol (HTTP, nanosecond timestamps;
//! `{now}` and `{now-25h}` are replaced by now, or now minus a duration, for data whose
//! age matters); `RESTART` stops the server cleanly (which persists the write buffer to
//! Parquet) and starts it again on the same data, so a file can set up segments, overlaps
//! and late data; `RETENTION 1d` sets the database's retention, `RETENTION temp 2h` a
//! table's (`none` clears it); `COMPACT` compacts every partition at once (`kiln compact`).
//!
//! `KILN_SLT=<part of a file name>` runs only the files whose name contains it.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};
use tokio_postgres::SimpleQueryMessage;

use crate::support::TestServer;

const DATABASE: &str = "slt";

struct Kiln {
    data: PathBuf,
    server: Option<TestServer>,
    client: Option<tokio_postgres::Client>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SltError(String);

impl Kiln {
    async fn client(&mut self) -> Result<&tokio_postgres::Client, SltError> {
        if self.client.is_none() {
            let server = self.server.as_ref().expect("server running");
            let client = crate::postgres::connect(server, DATABASE)
                .await
                .map_err(|e| SltError(db_message(&e)))?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    async fn restart(&mut self) {
        self.client = None;
        if let Some(mut server) = self.server.take() {
            tokio::task::spawn_blocking(move || server.terminate())
                .await
                .expect("server stopped");
        }
        self.server = Some(TestServer::start(&self.data, &[]));
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_nanos() as i64
}

/// `lines` with every `{now}` and `{now-<duration>}` replaced by that time in nanoseconds.
fn with_times(lines: &str, now: i64) -> Result<String, String> {
    let mut out = String::with_capacity(lines.len());
    let mut rest = lines;
    while let Some(start) = rest.find("{now") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed {{now…}} in {rest:?}"))?
            + start;
        let time = match rest[start + 4..end].strip_prefix('-') {
            None if start + 4 == end => now,
            Some(ago) => {
                let ago = humantime::parse_duration(ago).map_err(|e| format!("{ago:?}: {e}"))?;
                now - ago.as_nanos() as i64
            }
            None => {
                return Err(format!(
                    "{:?} is not {{now}} or {{now-1h}}",
                    &rest[start..=end]
                ));
            }
        };
        out.push_str(&time.to_string());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

#[async_trait]
impl AsyncDB for Kiln {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let trimmed = sql.trim();
        if let Some(lines) = trimmed.strip_prefix("WRITE") {
            let server = self.server.as_ref().expect("server running");
            let lines = with_times(lines.trim(), now_nanos()).map_err(SltError)?;
            let (status, body) = server.write(DATABASE, lines, &[]).await;
            if !status.is_success() {
                return Err(SltError(format!("write failed with {status}: {body}")));
            }
            return Ok(DBOutput::StatementComplete(0));
        }
        if let Some(args) = trimmed.strip_prefix("RETENTION ") {
            let server = self.server.as_ref().expect("server running");
            let (path, body) = match args.split_whitespace().collect::<Vec<_>>()[..] {
                [retention] => (
                    "/api/v3/configure/database",
                    serde_json::json!({"db": DATABASE, "retention_period": retention}),
                ),
                [table, retention] => (
                    "/api/v3/configure/table",
                    serde_json::json!({"db": DATABASE, "table": table, "retention_period": retention}),
                ),
                _ => {
                    return Err(SltError(format!(
                        "RETENTION [table] <duration>, not {args:?}"
                    )));
                }
            };
            let response = server
                .client
                .patch(server.url(path))
                .json(&body)
                .send()
                .await
                .map_err(|e| SltError(e.to_string()))?;
            if !response.status().is_success() {
                let text = response.text().await.unwrap_or_default();
                return Err(SltError(format!("RETENTION failed: {text}")));
            }
            return Ok(DBOutput::StatementComplete(0));
        }
        if trimmed == "COMPACT" {
            let server = self.server.as_ref().expect("server running");
            let response = server
                .client
                .post(server.url("/api/v3/compact"))
                .send()
                .await
                .map_err(|e| SltError(e.to_string()))?;
            if !response.status().is_success() {
                let text = response.text().await.unwrap_or_default();
                return Err(SltError(format!("COMPACT failed: {text}")));
            }
            return Ok(DBOutput::StatementComplete(0));
        }
        if trimmed == "RESTART" {
            self.restart().await;
            return Ok(DBOutput::StatementComplete(0));
        }
        let messages = self
            .client()
            .await?
            .simple_query(sql)
            .await
            .map_err(|e| SltError(db_message(&e)))?;
        let mut rows = Vec::new();
        let mut columns = None;
        let mut affected = 0;
        for message in messages {
            match message {
                SimpleQueryMessage::CommandComplete(n) => affected = n,
                SimpleQueryMessage::RowDescription(description) => {
                    columns = Some(description.len());
                }
                SimpleQueryMessage::Row(row) => {
                    columns = Some(row.len());
                    let mut values: Vec<String> = (0..row.len())
                        .map(|i| row.get(i).unwrap_or("NULL").to_owned())
                        .collect();
                    // A multi-line value (an EXPLAIN plan) is written one line per
                    // result line: its first line in the row, the others as rows of their own.
                    let more: Vec<Vec<String>> = match values.last_mut() {
                        Some(last) if last.contains('\n') => {
                            let text = std::mem::take(last);
                            let mut lines = text.trim_end_matches('\n').lines();
                            *last = lines.next().unwrap_or_default().to_owned();
                            lines.map(|l| vec![l.to_owned()]).collect()
                        }
                        _ => Vec::new(),
                    };
                    rows.push(values);
                    rows.extend(more);
                }
                _ => {}
            }
        }
        match columns {
            Some(n) => Ok(DBOutput::Rows {
                types: vec![DefaultColumnType::Any; n],
                rows,
            }),
            None => Ok(DBOutput::StatementComplete(affected)),
        }
    }

    async fn shutdown(&mut self) {}

    async fn sleep(duration: std::time::Duration) {
        tokio::time::sleep(duration).await;
    }
}

async fn run_file(path: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    let server = TestServer::start(&data, &[]);
    let mut kiln = Some(Kiln {
        data,
        server: Some(server),
        client: None,
    });
    let mut runner = sqllogictest::Runner::new(move || {
        let db = kiln.take().expect("one connection per file");
        async move { Ok(db) }
    });
    runner
        .run_file_async(path)
        .await
        .map_err(|e| format!("{}", e.display(false)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_behaviour_suite() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/sql");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .filter(|p| {
            std::env::var("KILN_SLT").map_or(true, |only| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(&only))
            })
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {dir}");
    let mut failures = Vec::new();
    for file in &files {
        if let Err(e) = run_file(file).await {
            failures.push(format!("{}:\n{e}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} files failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}

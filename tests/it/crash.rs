//! `kill -9` under concurrent load, also while persisting: every acknowledged row is
//! there exactly once after a restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use tokio::sync::Mutex;

use crate::support::TestServer;

const WRITERS: u64 = 4;
const ROWS_PER_BATCH: u64 = 200;
const ROUNDS: u64 = 4;

/// Rows are identified by (writer tag, time); time encodes round, writer, batch and row.
fn time_of(round: u64, writer: u64, batch: u64, row: u64) -> u64 {
    1_600_000_000_000_000_000
        + round * 10_000_000_000_000
        + writer * 1_000_000_000_000
        + batch * 1_000_000
        + row * 1_000
}

fn batch_body(round: u64, writer: u64, batch: u64) -> String {
    (0..ROWS_PER_BATCH)
        .map(|row| {
            format!(
                "load,writer=w{writer} round={round}i,batch={batch}i,row={row}i,payload=\"{}\" {}\n",
                "x".repeat(32),
                time_of(round, writer, batch, row)
            )
        })
        .collect()
}

async fn all_identities(server: &TestServer) -> Vec<(String, u64)> {
    all_identities_in(server, "crash").await
}

async fn all_identities_in(server: &TestServer, db: &str) -> Vec<(String, u64)> {
    let (status, body) = server
        .query(
            db,
            "SELECT writer, CAST(time AS BIGINT) AS t FROM load",
            "csv",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let mut reader = csv::Reader::from_reader(&body[..]);
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].to_owned(), r[1].parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_loses_no_acknowledged_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Small thresholds so persistence and WAL rotation run all the time under load.
    let args = [
        "--persist-buffer-bytes",
        "300000",
        "--wal-max-file-bytes",
        "65536",
        "--partition-duration",
        "10m",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6e);
    let mut acked: Vec<(u64, u64, u64)> = Vec::new();

    for round in 0..ROUNDS {
        let server = Arc::new(Mutex::new(TestServer::start(&data, &args)));
        let base = server.lock().await.base.clone();
        let acked_now = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let base = base.clone();
            let acked_now = Arc::clone(&acked_now);
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                for batch in 0.. {
                    let resp = client
                        .post(format!("{base}/api/v3/write_lp"))
                        .query(&[("db", "crash")])
                        .body(batch_body(round, writer, batch))
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status() == StatusCode::NO_CONTENT => {
                            acked_now.lock().await.push((round, writer, batch));
                        }
                        Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => return, // the server is gone
                    }
                }
            }));
        }
        // Kill at a random moment once writes are flowing.
        let flowing = crate::support::eventually(Duration::from_secs(30), || async {
            !acked_now.lock().await.is_empty()
        })
        .await;
        assert!(flowing, "round {round}: no write was acknowledged");
        let wait = rng.random_range(100..1200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.lock().await.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        let round_acked = acked_now.lock().await.clone();
        assert!(
            !round_acked.is_empty(),
            "round {round}: nothing was acknowledged before the kill"
        );
        acked.extend(round_acked);

        // Restart and check every acknowledged row, every round.
        let server = TestServer::start(&data, &args);
        let ids = all_identities(&server).await;
        let unique: HashSet<_> = ids.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "round {round}: duplicate rows after restart"
        );
        for (r, w, b) in &acked {
            for row in 0..ROWS_PER_BATCH {
                let id = (format!("w{w}"), time_of(*r, *w, *b, row));
                assert!(
                    unique.contains(&id),
                    "round {round}: acknowledged row {id:?} lost"
                );
            }
        }
        drop(server);
    }
    let persisted = walk_count(&data.join("objects/segments"));
    assert!(persisted > 0, "load never triggered persistence");
}

#[tokio::test]
async fn a_failed_wal_write_refuses_later_writes_and_keeps_acknowledged_ones() {
    use std::os::unix::process::CommandExt;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The kernel refuses to grow any file of the server past 256 KiB (EFBIG), as a full
    // disk would: the WAL write fails mid-record.
    let server = TestServer::start_with(&data, &[], |cmd| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 256 * 1024,
                    rlim_max: 256 * 1024,
                };
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let mut acked = Vec::new();
    let mut refused = None;
    for batch in 0..200 {
        let (status, text) = server.write("full", batch_body(0, 0, batch), &[]).await;
        match status {
            StatusCode::NO_CONTENT => acked.push(batch),
            other => {
                refused = Some((other, text));
                break;
            }
        }
    }
    let (status, text) = refused.expect("the WAL never hit the file size limit");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(!acked.is_empty());
    // Poisoned: even a tiny write is refused now, and the server says it is not ready.
    let (status, text) = server.write("full", "m v=1 1".to_owned(), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("refuses writes"), "{text}");
    let ready = server
        .client
        .get(server.url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Queries still work.
    let rows = server
        .query_json("full", "SELECT count(*) AS n FROM load")
        .await;
    assert!(rows[0]["n"].as_u64().unwrap() >= acked.len() as u64 * ROWS_PER_BATCH);
    drop(server);

    // Without the limit every acknowledged row is back.
    let server = TestServer::start(&data, &[]);
    let ids: HashSet<_> = all_identities_in(&server, "full")
        .await
        .into_iter()
        .collect();
    for batch in &acked {
        for row in 0..ROWS_PER_BATCH {
            assert!(
                ids.contains(&("w0".to_owned(), time_of(0, 0, *batch, row))),
                "batch {batch} row {row} lost"
            );
        }
    }
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk_count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

//! Persistence to Parquet and restart: the same answers before and after.

use std::time::Duration;

use serde_json::json;

use crate::support::{TestServer, eventually, wal_files};

/// Every row of `plant.temp` as CSV, ordered by line and time.
pub(crate) async fn snapshot(server: &TestServer) -> String {
    let (status, body) = server
        .query("plant", "SELECT * FROM temp ORDER BY line, time", "csv")
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn queries_match_before_and_after_persistence_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(
        &data,
        &["--persist-interval", "1s", "--wal-max-file-bytes", "4096"],
    );
    // Two hours of readings for three lines, in several requests.
    for chunk in 0..6 {
        let body: String = (0..120)
            .map(|i| {
                let t = 1_700_000_000 + chunk * 1200 + i * 10;
                format!(
                    "temp,line=l{} celsius={}.5,count={}i {t}\n",
                    i % 3,
                    i,
                    chunk * 120 + i
                )
            })
            .collect();
        let (status, text) = server.write("plant", body, &[("precision", "s")]).await;
        assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{text}");
    }
    let before = snapshot(&server).await;
    assert_eq!(before.lines().count(), 721);
    let wal_before = wal_files(&data);
    assert!(wal_before.len() > 1, "{wal_before:?}");

    // Persistence by age.
    assert!(
        eventually(Duration::from_secs(20), || async {
            server.metric("kiln_segments_persisted_total").await >= 2.0
        })
        .await,
        "nothing persisted"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            server.metric("kiln_buffer_bytes").await == 0.0
        })
        .await,
        "buffer not emptied"
    );
    assert_eq!(snapshot(&server).await, before);
    // WAL files at or below the persisted sequence are gone: only the fresh file is left.
    assert!(
        eventually(Duration::from_secs(5), || async {
            wal_files(&data).len() == 1
        })
        .await,
        "{:?}",
        wal_files(&data)
    );
    let wal_after = wal_files(&data);
    assert!(
        wal_after[0] >= *wal_before.last().unwrap(),
        "{wal_before:?} {wal_after:?}"
    );
    let segments: Vec<_> = walk(&data.join("objects/segments"));
    assert!(
        segments.iter().all(|p| p.ends_with(".parquet")) && segments.len() >= 2,
        "{segments:?}"
    );

    // A time range reads only the segments that overlap it.
    let (_, plan) = server
        .query(
            "plant",
            "EXPLAIN SELECT count(*) FROM temp WHERE time >= '2023-11-14T23:00:00' AND time < '2023-11-15T00:00:00'",
            "csv",
        )
        .await;
    let plan = String::from_utf8_lossy(&plan);
    assert_eq!(plan.matches(".parquet").count(), 1, "{plan}");
    let (_, plan) = server
        .query("plant", "EXPLAIN SELECT count(*) FROM temp", "csv")
        .await;
    let plan = String::from_utf8_lossy(&plan);
    assert_eq!(plan.matches(".parquet").count(), segments.len(), "{plan}");

    // Last write wins across a persisted segment and the buffer, field by field.
    server
        .write_ok("plant", "temp,line=l0 celsius=99.0 1700000000000000000")
        .await;
    assert_overwritten_row(&server).await;
    let after_overwrite = snapshot(&server).await;
    assert_eq!(after_overwrite.lines().count(), 721);

    server.terminate();
    let server = TestServer::start(&data, &[]);
    assert_eq!(snapshot(&server).await, after_overwrite);
    let rows = server
        .query_json(
            "plant",
            "SELECT line, count(*) AS n, max(celsius) AS hi FROM temp GROUP BY line ORDER BY line",
        )
        .await;
    assert_eq!(rows[0]["n"], json!(240));
    assert_eq!(rows[0]["hi"], json!(117.5));
    assert_overwritten_row(&server).await;
}

#[tokio::test]
async fn graceful_shutdown_persists_and_a_second_server_cannot_share_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    server.write_ok("db", "m,t=a v=1 1\nm,t=b v=2 2").await;

    // The data directory is locked while a server runs.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--http-bind",
            "127.0.0.1:0",
            "--grpc-bind",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by another kiln process"));

    server.terminate();
    let segments = walk(&data.join("objects/segments"));
    assert_eq!(
        segments.len(),
        1,
        "shutdown persists the buffer: {segments:?}"
    );
    let server = TestServer::start(&data, &[]);
    let rows = server
        .query_json("db", "SELECT t, v FROM m ORDER BY t")
        .await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["v"], json!(2.0));
}

#[tokio::test]
async fn shutdown_does_not_wait_forever_for_a_request_that_never_finishes() {
    use std::io::Write;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &["--shutdown-timeout", "1s"]);
    server.write_ok("db", "m,t=a v=1 1").await;

    // A write whose body never arrives: the server is still reading it when asked to stop.
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(
            b"POST /api/v3/write_lp?db=db HTTP/1.1\r\nHost: kiln\r\nContent-Length: 1000\r\n\r\nm,t=b v=2 2\n",
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Without a shutdown timeout this would wait for the stalled client forever.
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || server.terminate()),
    )
    .await;
    assert!(stopped.is_ok(), "the server did not stop");
    stopped.unwrap().unwrap();
    drop(stalled);

    let server = TestServer::start(&data, &[]);
    let rows = server
        .query_json("db", "SELECT t, v FROM m ORDER BY t")
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((&rows[0]["t"], &rows[0]["v"]), (&json!("a"), &json!(1.0)));
}

/// The row overwritten after persistence holds the new value and the old untouched field.
async fn assert_overwritten_row(server: &TestServer) {
    let rows = server
        .query_json(
            "plant",
            "SELECT celsius, count FROM temp WHERE line = 'l0' AND time = '2023-11-14T22:13:20'",
        )
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["celsius"], json!(99.0));
    assert_eq!(rows[0]["count"], json!(0));
}

pub(crate) fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_full_buffer_answers_429_until_persistence_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(
        &data,
        &["--max-buffer-bytes", "1", "--persist-interval", "1s"],
    );
    server.write_ok("db", "m,t=a v=1 1").await;
    let resp = server
        .client
        .post(server.url("/api/v3/write_lp?db=db"))
        .body("m,t=b v=2 2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert!(resp.text().await.unwrap().contains("retry later"));
    // Persistence empties the buffer and writes are accepted again.
    let accepted = eventually(Duration::from_secs(20), || async {
        server.write("db", "m,t=b v=2 2".to_owned(), &[]).await.0 == reqwest::StatusCode::NO_CONTENT
    })
    .await;
    assert!(accepted, "writes never recovered");
    let rows = server
        .query_json("db", "SELECT t, v FROM m ORDER BY t")
        .await;
    assert_eq!(rows.len(), 2);
    assert!(server.metric("kiln_writes_refused_total").await >= 1.0);
}

/// Rows rewritten across two segments of one partition and the buffer come back once,
/// each field from its latest write: the streaming merge across batch boundaries.
#[tokio::test]
async fn overlapping_segments_and_buffer_merge_last_write_wins() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    let t0 = 1_700_000_000i64; // all in one hour: one time partition
    let mut expected: BTreeMap<(String, i64), (Option<i64>, Option<i64>)> = BTreeMap::new();
    let mut write = |lines: &mut String, host: usize, s: i64, v: Option<i64>, w: Option<i64>| {
        let fields: Vec<String> = [("v", v), ("w", w)]
            .iter()
            .filter_map(|(n, x)| x.map(|x| format!("{n}={x}i")))
            .collect();
        lines.push_str(&format!(
            "t,host=h{host:02} {} {}\n",
            fields.join(","),
            t0 + s
        ));
        let e = expected.entry((format!("h{host:02}"), s)).or_default();
        if v.is_some() {
            e.0 = v;
        }
        if w.is_some() {
            e.1 = w;
        }
    };
    // 50 hosts × 400 seconds; then a third of the rows again; then every 7th, w only.
    let mut first = String::new();
    let mut second = String::new();
    let mut third = String::new();
    for host in 0..50 {
        for s in 0..400 {
            write(&mut first, host, s, Some(1), Some(10));
            if (host + s as usize).is_multiple_of(3) {
                write(&mut second, host, s, Some(2), None);
            }
            if (host * 400 + s as usize).is_multiple_of(7) {
                write(&mut third, host, s, None, Some(70));
            }
        }
    }
    let (status, text) = server.write("plant", first, &[("precision", "s")]).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{text}");
    server.terminate();
    server = TestServer::start(&data, &[]);
    let (status, text) = server.write("plant", second, &[("precision", "s")]).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{text}");
    server.terminate();
    server = TestServer::start(&data, &[]);
    let (status, text) = server.write("plant", third, &[("precision", "s")]).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{text}");

    let (status, body) = server
        .query(
            "plant",
            "SELECT host, time, v, w FROM t ORDER BY host, time",
            "csv",
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let got: Vec<String> = String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect();
    assert_eq!(got.len(), expected.len(), "one row per identity");
    for (line, ((host, s), (v, w))) in got.iter().zip(&expected) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0], host);
        let clock = format!("22:{:02}:{:02}", (800 + s) / 60, (800 + s) % 60);
        assert!(cells[1].contains(&clock), "{line}");
        let show = |x: &Option<i64>| x.map(|x| x.to_string()).unwrap_or_default();
        assert_eq!(
            (cells[2], cells[3]),
            (show(v).as_str(), show(w).as_str()),
            "{line}"
        );
    }
    // A field filter sees only the newest versions.
    let ones = expected.values().filter(|(v, _)| *v == Some(1)).count();
    let rows = server
        .query_json("plant", "SELECT count(*) AS n FROM t WHERE v = 1")
        .await;
    assert_eq!(rows[0]["n"], json!(ones));
}

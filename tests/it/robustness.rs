//! Client data and plain age never take the server down: times outside the stored range
//! are refused per row, and a WAL record that cannot be applied is named, not looped on.

use std::process::Command;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, TimestampSecondArray};
use kiln_storage::ids::SequenceNumber;
use kiln_storage::wal::{RecordKind, Wal, WalConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::Code;

use crate::grpc::{arrow_request, client, float, row, rows_request};
use crate::support::TestServer;

#[tokio::test]
async fn times_outside_the_stored_range_are_refused_per_row_on_every_door() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);

    // HTTP line protocol: the edges of i64, and seconds that overflow nanoseconds.
    let body =
        "m,host=a v=1 1\nm,host=b v=2 -9223372036854775808\nm,host=c v=3 9223372036854775807\n";
    let (status, text) = server.write("plant", body, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let rejected = v["data"].as_array().unwrap();
    assert_eq!(
        rejected
            .iter()
            .map(|r| r["line_number"].clone())
            .collect::<Vec<_>>(),
        vec![json!(2), json!(3)]
    );
    for r in rejected {
        assert_eq!(r["column"], json!("m,host=b v=2 ".len() + 1), "{text}");
        let message = r["error_message"].as_str().unwrap();
        assert!(
            message.contains("outside the range Kiln stores"),
            "{message}"
        );
    }
    let (status, text) = server
        .write(
            "plant",
            "m,host=d v=4 9300000000\n",
            &[("precision", "second")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("outside the range"), "{text}");

    // gRPC rows and Arrow batches.
    let mut grpc = client(&server).await;
    let status = grpc
        .write(rows_request(
            1,
            "plant",
            vec![row("m", &[("host", "e")], vec![float("v", 5.0)], i64::MIN)],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("outside the range"),
        "{}",
        status.message()
    );
    let batch = RecordBatch::try_from_iter([
        (
            "time",
            Arc::new(TimestampSecondArray::from(vec![1, 9_300_000_000])) as ArrayRef,
        ),
        ("v", Arc::new(Float64Array::from(vec![6.0, 7.0]))),
    ])
    .unwrap();
    let status = grpc
        .write(arrow_request(2, "plant", "m", &batch, &[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("column `time`, row 1: 9300000000"),
        "{}",
        status.message()
    );

    // Only the one valid row is stored, before and after a kill -9.
    let count = "SELECT count(*) AS n FROM m";
    assert_eq!(server.query_json("plant", count).await[0]["n"], json!(1));
    server.kill9();
    let server = TestServer::start(&data, &[]);
    assert_eq!(server.query_json("plant", count).await[0]["n"], json!(1));
    server.write_ok("plant", "m,host=f v=8 2\n").await;
    assert_eq!(server.query_json("plant", count).await[0]["n"], json!(2));
}

/// Runs `kiln serve` on `data` expecting it to refuse to start; returns its error output.
fn refused_start(data: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args(["--http-bind", "127.0.0.1:0", "--grpc-bind", "127.0.0.1:0"])
        .args(["--pg-bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "kiln started");
    // The error it ends with (the log lines before it carry times).
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match stderr.lines().rfind(|l| l.starts_with("error: ")) {
        Some(error) => error.to_owned(),
        None => panic!("no error line: {stderr}"),
    }
}

#[tokio::test]
async fn a_wal_record_that_cannot_be_applied_is_named_at_start_and_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    server.write_ok("plant", "m,host=a v=1 1\n").await;
    server.kill9();

    // A record an older release (or a bug) logged and no release can apply.
    let wal_dir = data.join("wal");
    let (wal, _) = Wal::open(WalConfig::new(&wal_dir), SequenceNumber(1), &mut |_| Ok(())).unwrap();
    let bad = wal
        .append(RecordKind::WriteBatch, vec![9, 0, 0])
        .await
        .unwrap();
    wal.shutdown();
    drop(wal);

    let stderr = refused_start(&data);
    assert!(stderr.contains("replaying WAL file"), "{stderr}");
    assert!(stderr.contains(".wal at offset "), "{stderr}");
    assert!(
        stderr.contains("unsupported write batch version 9"),
        "{stderr}"
    );
    assert!(stderr.contains("--wal-replay-skip-invalid"), "{stderr}");
    // Refusing changed nothing: it refuses again the same way.
    assert_eq!(refused_start(&data), stderr);

    let mut server = TestServer::start(&data, &["--wal-replay-skip-invalid"]);
    let count = "SELECT count(*) AS n FROM m";
    assert_eq!(server.query_json("plant", count).await[0]["n"], json!(1));
    server.write_ok("plant", "m,host=b v=2 2\n").await;
    assert_eq!(server.query_json("plant", count).await[0]["n"], json!(2));
    assert!(wal_dir.join(format!("skipped/{}.record", bad.0)).exists());
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("WAL record skipped on replay"), "{log}");

    // Once persisted past it, the server starts without the option.
    server.terminate();
    let server = TestServer::start(&data, &[]);
    assert_eq!(server.query_json("plant", count).await[0]["n"], json!(2));
}

#[tokio::test]
async fn a_long_catalog_history_is_snapshotted_pruned_and_survives_kill_nine() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    // Each new field is one catalog transaction.
    for i in 0..250 {
        server
            .write_ok("plant", &format!("m,host=a f{i}={i} {}\n", i + 1))
            .await;
    }
    let catalog = data.join("objects/catalog");
    let names = |dir: &str| {
        let mut names: Vec<String> = std::fs::read_dir(catalog.join(dir))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    assert!(
        crate::support::eventually(std::time::Duration::from_secs(10), || async {
            names("snapshots").len() == 2 && names("log").len() < 200
        })
        .await,
        "snapshots {:?}, {} log entries",
        names("snapshots"),
        names("log").len()
    );
    assert_eq!(
        names("snapshots"),
        ["00000000000000000100.json", "00000000000000000200.json"]
    );
    assert_eq!(names("log")[0], "00000000000000000101.json");

    server.kill9();
    let server = TestServer::start(&data, &[]);
    let rows = server
        .query_json("plant", "SELECT count(*) AS n, sum(f249) AS last FROM m")
        .await;
    assert_eq!(rows[0]["n"], json!(250));
    assert_eq!(rows[0]["last"], json!(249.0));
    server.write_ok("plant", "m,host=a f250=1 251\n").await;
    let columns = server
        .query_json(
            "plant",
            "SELECT count(*) AS n FROM information_schema.columns WHERE table_name = 'm'",
        )
        .await;
    assert_eq!(columns[0]["n"], json!(253), "time, host and 251 fields");
}

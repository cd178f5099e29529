//! `--role querier`: a server that answers queries over what another server persists to a
//! shared S3 bucket (a real S3 server, `s3s-fs`), follows its catalog, and changes nothing.

use std::time::Duration;

use reqwest::StatusCode;

use crate::cli::kiln_env;
use crate::object_storage::{
    BUCKET, PREFIX, credentials, kiln_with_store, rows, s3_args, segment_keys, start, values,
};
use crate::support::s3::S3Server;
use crate::support::{TestServer, eventually};

fn start_querier(data: &std::path::Path, s3: &S3Server) -> TestServer {
    let mut args = s3_args(s3);
    args.extend(["--role", "querier"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start_with(data, &args, S3Server::credentials)
}

async fn count(server: &TestServer, sql: &str) -> Option<i64> {
    let (status, body) = server.query("plant", sql, "json").await;
    if status != StatusCode::OK {
        return None;
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&body).ok()?;
    rows.first()?.get("n")?.as_i64()
}

/// The rows of `temp`'s last-value cache as JSON text, if it answers.
pub(crate) async fn latest(server: &TestServer) -> Option<String> {
    let (status, body) = server
        .query(
            "plant",
            "SELECT machine, celsius FROM last_cache('plant', 'temp') ORDER BY machine",
            "json",
        )
        .await;
    (status == StatusCode::OK).then(|| String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_querier_follows_what_the_writer_persists_and_refuses_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), BUCKET);
    let mut writer = start(&dir.path().join("writer"), &s3);
    // Started before anything exists: it follows from an empty catalog.
    let querier_data = dir.path().join("querier");
    let mut querier = start_querier(&querier_data, &s3);

    writer.write_ok("plant", &rows(0, 1000)).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&querier, "SELECT count(*) AS n FROM temp").await == Some(1000)
        })
        .await,
        "the querier never saw the persisted rows"
    );
    assert_eq!(values(&querier).await, (0..1000).collect::<Vec<_>>());

    // Schema changes and new tables follow too.
    writer
        .write_ok(
            "plant",
            "temp,machine=press-9 celsius=1,humidity=40 1800000000000000000\n\
             vibration,machine=press-9 mm_s=2.5 1800000000000000000\n",
        )
        .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&querier, "SELECT count(humidity) AS n FROM temp").await == Some(1)
                && count(&querier, "SELECT count(*) AS n FROM vibration").await == Some(1)
        })
        .await,
        "the querier never saw the new column and table"
    );

    // Its last-value caches are the writer's snapshots, loaded again after each
    // persistence: the latest row of each machine, press-9 included.
    assert!(
        eventually(Duration::from_secs(30), || async {
            latest(&querier).await.is_some_and(|rows| {
                rows.contains(r#"{"machine":"press-3","celsius":999.0}"#)
                    && rows.contains(r#"{"machine":"press-9","celsius":1.0}"#)
            })
        })
        .await,
        "the querier's last-value cache never showed the writer's latest rows: {:?}",
        latest(&querier).await
    );

    // It changes nothing, on any door, and says where changes go.
    let (status, body) = querier
        .write("plant", "temp,machine=x celsius=1 1", &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("--role querier"), "{body}");
    let resp = querier
        .client
        .post(querier.url("/api/v3/configure/database"))
        .json(&serde_json::json!({"db": "other"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let mut grpc = crate::grpc::client(&querier).await;
    let refused = grpc
        .write(crate::grpc::rows_request(
            1,
            "plant",
            vec![crate::grpc::row(
                "temp",
                &[("machine", "x")],
                vec![crate::grpc::float("celsius", 1.0)],
                1,
            )],
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    let (status, body) = querier
        .query(
            "plant",
            "DELETE FROM temp WHERE machine = 'press-1'",
            "json",
        )
        .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("--role querier"), "{body}");

    let pg = crate::postgres::connect(&querier, "plant").await.unwrap();
    let refused = pg
        .simple_query("DELETE FROM temp WHERE machine = 'press-1'")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused}"
    );

    // A compaction on the writer replaces segments; the querier follows and still answers.
    // A second segment of vibration's partition first.
    let persisted = writer.metric("kiln_segments_persisted_total").await;
    writer
        .write_ok(
            "plant",
            "vibration,machine=press-8 mm_s=3 1800000000000000000\n",
        )
        .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            writer.metric("kiln_segments_persisted_total").await > persisted
        })
        .await
    );
    let resp = writer
        .client
        .post(writer.url("/api/v3/compact"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let outcome: serde_json::Value = resp.json().await.unwrap();
    assert!(
        outcome["segments_replaced"].as_u64().unwrap() >= 2,
        "{outcome}"
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            let (_, plan) = querier
                .query("plant", "EXPLAIN SELECT * FROM vibration", "json")
                .await;
            String::from_utf8_lossy(&plan).contains("-compacted-")
        })
        .await,
        "the querier never read the merged segment"
    );
    assert_eq!(
        count(&querier, "SELECT count(*) AS n FROM vibration").await,
        Some(2)
    );
    assert_eq!(values(&querier).await.len(), 1001);
    // Tokens are in the catalog: the first admin token made on the writer is enforced by
    // the querier once it follows.
    let created: serde_json::Value = writer
        .client
        .post(writer.url("/api/v3/tokens"))
        .json(&serde_json::json!({"name": "ops", "admin": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(30), || async {
            let resp = querier
                .client
                .get(querier.url("/api/v3/tokens"))
                .send()
                .await;
            resp.is_ok_and(|r| r.status() == StatusCode::UNAUTHORIZED)
        })
        .await,
        "the querier never enforced the writer's token"
    );
    let listed = querier
        .client
        .get(querier.url("/api/v3/tokens"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);

    // It deletes nothing in the store, not even at start, when a file no catalog entry
    // names could be a writer's fresh segment about to be committed.
    writer.terminate();
    let existing = segment_keys(&s3).remove(0);
    let stray = s3
        .bucket_dir(BUCKET)
        .join(std::path::Path::new(&existing).parent().unwrap())
        .join("0-not-yet-committed.parquet");
    std::fs::write(&stray, b"PAR1").unwrap();
    let before = segment_keys(&s3);
    querier.terminate();
    let querier = start_querier(&querier_data, &s3);
    let (status, body) = querier
        .client
        .get(querier.url("/api/v3/query_sql"))
        .query(&[("db", "plant"), ("q", "SELECT count(*) AS n FROM temp")])
        .bearer_auth(&token)
        .send()
        .await
        .map(|r| (r.status(), r))
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let rows: Vec<serde_json::Value> = body.json().await.unwrap();
    assert_eq!(rows[0]["n"], 1001);
    assert_eq!(segment_keys(&s3), before);
    assert!(stray.exists());
    assert!(!querier_data.join("objects").exists());
    assert!(
        s3.keys(BUCKET, PREFIX)
            .iter()
            .all(|k| !k.contains("probe/")),
        "a querier writes nothing, not even a probe"
    );

    // A querier started on the writer's data directory, whose WAL holds acknowledged rows
    // not yet persisted, refuses: it would neither persist nor show them.
    let writer_data = dir.path().join("writer");
    let mut writer = start(&writer_data, &s3);
    let (status, _) = writer
        .client
        .post(writer.url("/api/v3/write_lp"))
        .query(&[("db", "plant")])
        .bearer_auth(&token)
        .body("temp,machine=press-5 celsius=1 1900000000000000000")
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    writer.kill9();
    let args = [
        "serve",
        "--role",
        "querier",
        "--data-dir",
        writer_data.to_str().unwrap(),
    ];
    let (ok, _, err) = kiln_with_store(&args, &s3, &credentials());
    assert!(!ok);
    assert!(err.contains("holds writes not yet persisted"), "{err}");
}

#[test]
fn a_querier_needs_a_shared_store_and_takes_no_sources() {
    let (ok, _, err) = kiln_env(&["serve", "--check", "--role", "querier"], None, &[]);
    assert!(!ok);
    assert!(
        err.contains("--role querier works on what several servers share in an object store"),
        "{err}"
    );
    let on_s3 = [
        "serve",
        "--check",
        "--role",
        "querier",
        "--object-store",
        "s3",
        "--object-store-bucket",
        "plant",
    ];
    let kafka = [
        "--kafka-brokers",
        "127.0.0.1:9092",
        "--kafka-topics",
        "plant",
        "--kafka-database",
        "plant",
    ];
    let (ok, _, err) = kiln_env(&[&on_s3[..], &kafka[..]].concat(), None, &[]);
    assert!(!ok);
    assert!(
        err.contains("Kafka and MQTT sources belong on the servers that take writes"),
        "{err}"
    );
    let (ok, out, err) = kiln_env(&on_s3, None, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("role querier"), "{out}");
}

/// Writes `lp` to `server`'s `plant` with `token`.
async fn write_with(server: &TestServer, token: &str, lp: &str) {
    let resp = crate::auth::http_write(server, Some(token), lp).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

/// `SELECT count(*)` of `temp` over HTTP, with `partial=true` if asked: the status and the
/// count or the error.
pub(crate) async fn count_temp(
    server: &TestServer,
    partial: bool,
) -> (StatusCode, Result<i64, String>) {
    let mut query = vec![("db", "plant"), ("q", "SELECT count(*) AS n FROM temp")];
    if partial {
        query.push(("partial", "true"));
    }
    let resp = server
        .client
        .get(server.url("/api/v3/query_sql"))
        .query(&query)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    let count = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|rows| rows[0]["n"].as_i64())
        .ok_or(body);
    (status, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_querier_reads_rows_the_writer_has_not_persisted_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), BUCKET);
    let token_file = dir.path().join("admin-token");
    let admin = "kiln_".to_owned() + &"cd".repeat(32);
    std::fs::write(&token_file, format!("{admin}\n")).unwrap();
    let token_path = token_file.to_str().unwrap();
    // Persists only when 64 KiB are buffered: small writes stay in its buffer.
    let mut args = s3_args(&s3);
    args.extend(
        [
            "--persist-interval",
            "1h",
            "--persist-buffer-bytes",
            "64KiB",
            "--admin-token-file",
            token_path,
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut writer =
        TestServer::start_with(&dir.path().join("writer"), &args, S3Server::credentials);
    let querier_with = |name: &str, extra: &[&str]| {
        let mut args = s3_args(&s3);
        args.extend(["--role", "querier", "--ingesters", &writer.grpc].map(str::to_owned));
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        TestServer::start_with(&dir.path().join(name), &args, S3Server::credentials)
    };
    // One presents the writer's admin token; the other none, and the writer refuses it.
    let querier = querier_with("querier", &["--ingester-token-file", token_path]);
    let refused = querier_with("refused", &[]);

    write_with(&writer, &admin, &rows(0, 100)).await;
    assert_eq!(
        writer.metric("kiln_segments_persisted_total").await,
        0.0,
        "nothing persisted yet"
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            count_temp(&querier, false).await.1 == Ok(100)
        })
        .await,
        "the querier never read the writer's unpersisted rows: {:?}",
        count_temp(&querier, false).await
    );
    assert_eq!(values(&querier).await, (0..100).collect::<Vec<_>>());
    // A writer that does not answer fails the query, naming it and the way out (once that
    // querier too has followed the catalog to the table).
    eventually(Duration::from_secs(30), || async {
        count_temp(&refused, false).await.0 != StatusCode::NOT_FOUND
    })
    .await;
    let (status, error) = count_temp(&refused, false).await;
    let error = error.unwrap_err();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(error.contains(&writer.grpc), "{error}");
    assert!(error.contains("partial=true"), "{error}");
    // Partial results: what the catalog names, here nothing yet.
    assert_eq!(count_temp(&refused, true).await, (StatusCode::OK, Ok(0)));

    // Writes while the writer persists (every 64 KiB) and the querier follows: every
    // answer right after a write holds every row once, whether the writer still buffers
    // it, has persisted it, or both.
    let mut total = 100;
    for round in 0..40 {
        write_with(&writer, &admin, &rows(total, 250)).await;
        total += 250;
        // An update of a row written before (row 4 * round, machine press-0): the newest
        // version wins.
        write_with(
            &writer,
            &admin,
            &format!(
                "temp,machine=press-0 celsius={} {}\n",
                -(round as i64) - 1,
                1_700_000_000_000_000_000i64 + round as i64 * 4 * 1_000_000_000
            ),
        )
        .await;
        assert_eq!(
            count_temp(&querier, false).await,
            (StatusCode::OK, Ok(total as i64)),
            "round {round}"
        );
        let updated = querier
            .query_json(
                "plant",
                &format!(
                    "SELECT celsius FROM temp WHERE machine = 'press-0' AND time = \
                     to_timestamp_nanos({})",
                    1_700_000_000_000_000_000i64 + round as i64 * 4 * 1_000_000_000
                ),
            )
            .await;
        let updated: Vec<f64> = updated
            .iter()
            .map(|r| r["celsius"].as_f64().unwrap())
            .collect();
        assert_eq!(updated, vec![-(round as f64) - 1.0], "round {round}");
    }
    assert!(
        writer.metric("kiln_segments_persisted_total").await >= 5.0,
        "the writer persisted while the querier read"
    );
    // Rows only in the writer's buffer: written until one write leaves the buffer holding
    // rows once any persistence it started is over.
    loop {
        write_with(&writer, &admin, &rows(total, 20)).await;
        total += 20;
        let mut buffered = writer.metric("kiln_buffer_bytes").await;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = writer.metric("kiln_buffer_bytes").await;
            if now == buffered {
                break;
            }
            buffered = now;
        }
        if buffered > 0.0 {
            break;
        }
    }
    let (status, partial) = count_temp(&refused, true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        partial.unwrap() < total as i64,
        "some rows are still only buffered"
    );

    // The writer gone: strict queries fail naming it, over HTTP and PostgreSQL, and
    // partial results answer from the segments.
    writer.kill9();
    let (status, error) = count_temp(&querier, false).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error:?}");
    assert!(error.unwrap_err().contains(&writer.grpc));
    let (status, persisted) = count_temp(&querier, true).await;
    assert_eq!(status, StatusCode::OK);
    let persisted = persisted.unwrap();
    assert!(persisted > 0 && persisted < total as i64, "{persisted}");
    let pg = crate::postgres::connect(&querier, "plant").await.unwrap();
    let failed = pg
        .simple_query("SELECT count(*) FROM temp")
        .await
        .unwrap_err();
    let failed = failed.as_db_error().expect("an error from the server");
    assert!(failed.message().contains(&writer.grpc), "{failed:?}");
    pg.batch_execute("SET kiln.partial_results = true")
        .await
        .unwrap();
    let row = pg
        .query_one("SELECT count(*) FROM temp", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), persisted);
}

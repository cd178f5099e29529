//! Data lifecycle: databases and tables created, listed and deleted (soft, then hard),
//! retention that hides, refuses and drops expired rows; across restarts and `kill -9`.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;

use crate::cli::kiln;
use crate::persistence::walk;
use crate::postgres::{connect, simple_rows};
use crate::support::{TestServer, eventually};

const HOUR: i64 = 3_600;

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn parquet_files(data: &Path) -> Vec<String> {
    let mut files: Vec<String> = walk(&data.join("objects/segments"))
        .into_iter()
        .filter(|p| p.ends_with(".parquet"))
        .collect();
    files.sort();
    files
}

async fn write_s(server: &TestServer, db: &str, body: String) -> (StatusCode, String) {
    server.write(db, body, &[("precision", "s")]).await
}

/// `(sensor, time in seconds)` of every row of `temp`, in order.
async fn rows(server: &TestServer, db: &str) -> Vec<(String, i64)> {
    server
        .query_json(
            db,
            "SELECT sensor, CAST(to_unixtime(time) AS BIGINT) AS t FROM temp ORDER BY sensor, time",
        )
        .await
        .iter()
        .map(|r| {
            (
                r["sensor"].as_str().unwrap().to_owned(),
                r["t"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn host(server: &TestServer) -> String {
    format!("--host={}", server.base)
}

#[tokio::test]
async fn retention_hides_refuses_and_drops_expired_rows_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let slow = ["--retention-check-interval", "1h"];
    let mut server = TestServer::start(&data, &slow);
    let now = now_secs();

    // A database created explicitly, no retention yet: everything is kept and written.
    let (ok, out, err) = kiln(&["database", "create", "plant", &host(&server)], None);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = kiln(&["database", "create", "plant", &host(&server)], None);
    assert!(!ok && err.contains("exists already"), "{err}");

    // Series `a` has only old rows; `b` old and recent ones; the rows at 24 h ± 5 min
    // straddle the cutoff a one-day retention sets.
    let old = [now - 50 * HOUR, now - 30 * HOUR, now - 24 * HOUR - 300];
    let recent = [now - 24 * HOUR + 300, now - 23 * HOUR, now - HOUR];
    let mut body = String::new();
    for t in old {
        body.push_str(&format!("temp,sensor=a celsius=1 {t}\n"));
        body.push_str(&format!("temp,sensor=b celsius=1 {t}\n"));
    }
    for t in recent {
        body.push_str(&format!("temp,sensor=b celsius=2 {t}\n"));
    }
    let (status, text) = write_s(&server, "plant", body).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    // Persisted by the stop; one more old row stays in the buffer and the WAL.
    server.terminate();
    server = TestServer::start(&data, &slow);
    let buffered_old = now - 26 * HOUR;
    let (status, text) = write_s(
        &server,
        "plant",
        format!("temp,sensor=c celsius=3 {buffered_old}\n"),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    assert_eq!(rows(&server, "plant").await.len(), 10);
    let files_before = parquet_files(&data);

    // One day: every query stops seeing what is older, from every source.
    let (ok, out, err) = kiln(
        &[
            "database",
            "update",
            "plant",
            "--retention",
            "1d",
            &host(&server),
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("retention 1day"), "{out}");
    let expected: Vec<(String, i64)> = recent.iter().map(|t| ("b".to_owned(), *t)).collect();
    assert_eq!(rows(&server, "plant").await, expected);
    let pg = connect(&server, "plant").await.unwrap();
    let counted = simple_rows(&pg, "SELECT count(*) FROM temp").await;
    assert_eq!(counted, vec![vec![Some("3".to_owned())]]);
    // The latest row of each series: `a` and `c` have none left.
    let latest = server
        .query_json(
            "plant",
            "SELECT DISTINCT ON (sensor) sensor, celsius FROM temp ORDER BY sensor, time DESC",
        )
        .await;
    assert_eq!(latest.len(), 1, "{latest:?}");
    assert_eq!(latest[0]["sensor"], "b");
    let cached = server
        .query_json("plant", "SELECT sensor FROM last_cache('plant', 'temp')")
        .await;
    assert_eq!(cached.len(), 1, "{cached:?}");

    // Writes older than the retention are refused line by line, the others written.
    let body = format!(
        "temp,sensor=d celsius=4 {}\ntemp,sensor=d celsius=5 {}\n",
        now - 2 * 24 * HOUR,
        now - 60
    );
    let (status, text) = server
        .write(
            "plant",
            body,
            &[("precision", "s"), ("accept_partial", "true")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(
        text.contains("older than the retention of table")
            && text.contains("(1day)")
            && text.contains("\"line_number\":1"),
        "{text}"
    );
    assert_eq!(server.metric("kiln_ingest_expired_lines_total").await, 1.0);
    assert_eq!(rows(&server, "plant").await.len(), 4);

    // A table's own retention overrides its database's.
    let (ok, out, err) = kiln(
        &[
            "table",
            "update",
            "-d",
            "plant",
            "temp",
            "--retention",
            "2h",
            &host(&server),
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    let kept = rows(&server, "plant").await;
    assert_eq!(kept, vec![("b".into(), now - HOUR), ("d".into(), now - 60)]);
    let (ok, out, err) = kiln(
        &[
            "table",
            "update",
            "-d",
            "plant",
            "temp",
            "--retention",
            "none",
            &host(&server),
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    assert_eq!(rows(&server, "plant").await.len(), 4);

    // The retention pass drops the segments whose every row expired, and the buffered
    // chunk; a kill -9 at any moment of it resurrects nothing.
    let fast = ["--retention-check-interval", "1s"];
    for pause in [0, 300, 900] {
        server.kill9();
        server = TestServer::start(&data, &fast);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        assert_eq!(rows(&server, "plant").await.len(), 4);
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            server.metric("kiln_segments_expired_total").await > 0.0
                || parquet_files(&data).len() < files_before.len()
        })
        .await
    );
    // Two of the three old partitions are wholly expired (the third straddles the edge,
    // or holds rows on both sides of it).
    assert!(
        eventually(Duration::from_secs(20), || async {
            parquet_files(&data).len() + 2 <= files_before.len()
        })
        .await,
        "before {files_before:?}, now {:?}",
        parquet_files(&data)
    );
    server.kill9();
    server = TestServer::start(&data, &fast);
    assert_eq!(rows(&server, "plant").await.len(), 4);
    let listed = kiln(&["database", "list", &host(&server)], None);
    assert!(listed.1.contains("plant\tretention 1day"), "{listed:?}");
}

#[tokio::test]
async fn deleted_tables_and_databases_go_at_once_and_their_files_after_the_hard_delete() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--retention-check-interval", "1s"];
    let mut server = TestServer::start(&data, &args);
    let now = now_secs();
    let body = |value: i32, from: i64| -> String {
        (0..10)
            .map(|i| {
                format!(
                    "temp,sensor=s{i} celsius={value} {t}\nvibration,sensor=s{i} mm={value} {t}\n",
                    t = from + i
                )
            })
            .collect()
    };
    let (status, text) = write_s(&server, "plant", body(1, now - 7200)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    server.terminate(); // persisted: segments of both tables
    server = TestServer::start(&data, &args);
    let (status, text) = write_s(&server, "plant", body(2, now - 60)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    let persisted = parquet_files(&data);
    assert_eq!(persisted.len(), 2, "{persisted:?}");

    // A table: gone at once, listed as deleted, its files kept for an hour.
    let (ok, out, err) = kiln(
        &[
            "table",
            "delete",
            "-d",
            "plant",
            "vibration",
            "--hard-delete",
            "1h",
            &host(&server),
        ],
        None,
    );
    assert!(ok && out.contains("vibration\tdeleted"), "{out}{err}");
    let (status, body_text) = server
        .query("plant", "SELECT * FROM vibration", "json")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        String::from_utf8_lossy(&body_text).contains("vibration"),
        "{body_text:?}"
    );
    let (ok, out, _) = kiln(&["database", "list", "--deleted", &host(&server)], None);
    assert!(ok && out.contains("vibration\tdeleted"), "{out}");
    assert_eq!(rows(&server, "plant").await.len(), 20);

    // A database: its name is free at once; a write makes a new, empty one.
    let (ok, out, err) = kiln(&["database", "delete", "plant", &host(&server)], None);
    assert!(ok && out.contains("plant\tdeleted"), "{out}{err}");
    let (status, _) = server.query("plant", "SELECT * FROM temp", "json").await;
    assert_ne!(status, StatusCode::OK);
    let (status, text) = write_s(
        &server,
        "plant",
        format!("temp,sensor=new celsius=9 {}\n", now - 30),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    assert_eq!(rows(&server, "plant").await, vec![("new".into(), now - 30)]);
    // Listed: the new database, then the deleted one with the table deleted before it.
    let (ok, out, _) = kiln(&["database", "list", "--deleted", &host(&server)], None);
    let (new, old) = (
        out.find("plant\tretention none").unwrap(),
        out.find("plant\tdeleted").unwrap(),
    );
    let vibration = out.find("  vibration\tdeleted").unwrap();
    assert!(ok && new < old && old < vibration, "{out}");

    // Soft-deleted files survive a restart's sweep; the WAL's records of the deleted
    // objects are not replayed into the new database.
    server.kill9();
    server = TestServer::start(&data, &args);
    assert_eq!(rows(&server, "plant").await, vec![("new".into(), now - 30)]);
    for file in &persisted {
        assert!(
            Path::new(file).exists(),
            "{file} was deleted before its time"
        );
    }
    let (status, _) = server
        .query("plant", "SELECT * FROM vibration", "json")
        .await;
    assert_ne!(status, StatusCode::OK);

    // A hard delete now: the new database's files go, the soft-deleted ones stay.
    server.terminate(); // persists the new database's row
    server = TestServer::start(&data, &args);
    let with_new = parquet_files(&data);
    assert_eq!(with_new.len(), 3, "{with_new:?}");
    let (ok, out, err) = kiln(
        &[
            "database",
            "delete",
            "plant",
            "--hard-delete",
            "now",
            &host(&server),
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            parquet_files(&data) == persisted
        })
        .await,
        "{:?}",
        parquet_files(&data)
    );
    let (ok, out, _) = kiln(&["database", "list", "--deleted", &host(&server)], None);
    assert!(ok && out.matches("plant\tdeleted").count() == 1, "{out}");
    server.kill9();
    server = TestServer::start(&data, &args);
    assert_eq!(parquet_files(&data), persisted);
    let (ok, out, _) = kiln(&["database", "list", &host(&server)], None);
    assert!(ok && !out.contains("plant"), "{out}");

    // Errors name what is wrong.
    let (ok, _, err) = kiln(&["database", "delete", "plant", &host(&server)], None);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = kiln(
        &[
            "database",
            "create",
            "x",
            "--retention",
            "soon",
            &host(&server),
        ],
        None,
    );
    assert!(!ok && err.contains("invalid retention"), "{err}");
}

/// Rows of `temp` of `sensor`.
async fn count(server: &TestServer, sensor: &str) -> i64 {
    let sql = format!("SELECT count(*) AS n FROM temp WHERE sensor = '{sensor}'");
    server.query_json("plant", &sql).await[0]["n"]
        .as_i64()
        .unwrap()
}

/// Rows of `temp` of sensors a, b and c.
async fn counts(server: &TestServer) -> (i64, i64, i64) {
    (
        count(server, "a").await,
        count(server, "b").await,
        count(server, "c").await,
    )
}

/// Catalog events of type `kind` in the catalog's log.
fn events(data: &Path, kind: &str) -> usize {
    walk(&data.join("objects/catalog/log"))
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .map(|text| text.matches(&format!("\"type\":\"{kind}\"")).count())
        .sum()
}

/// Runs `sql` (a DELETE, a view statement) against database `plant` over HTTP: status
/// and JSON answer.
pub(crate) async fn statement(server: &TestServer, sql: &str) -> (StatusCode, serde_json::Value) {
    let response = server
        .client
        .post(server.url("/api/v3/query_sql"))
        .json(&serde_json::json!({"db": "plant", "q": sql}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn deleted_rows_are_gone_from_segments_and_buffer_through_restarts_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--compaction-interval", "0s"];
    let mut server = TestServer::start(&data, &args);
    let now = now_secs();
    // Sensors a, b, c every minute for two hours: persisted (segments), then an hour more
    // in the buffer.
    let rows = |from: i64, minutes: i64| -> String {
        (0..minutes)
            .flat_map(|m| {
                ["a", "b", "c"].map(|s| format!("temp,sensor={s} celsius={m}i {}\n", from + m * 60))
            })
            .collect()
    };
    let (status, text) = write_s(&server, "plant", rows(now - 3 * HOUR, 120)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    server.terminate();
    server = TestServer::start(&data, &args);
    let (status, text) = write_s(&server, "plant", rows(now - HOUR, 60)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    assert_eq!(count(&server, "a").await, 180);

    // One sensor entirely: segments and buffer.
    let (status, answer) = statement(&server, "DELETE FROM temp WHERE sensor = 'a'").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["deleted"], 180, "{answer}");
    assert_eq!(count(&server, "a").await, 0);
    // Another over a time range that spans segments and the buffer.
    let (status, answer) = statement(
        &server,
        &format!(
            "DELETE FROM temp WHERE sensor IN ('b') AND time >= to_timestamp({}) AND time < to_timestamp({})",
            now - 90 * 60,
            now - 30 * 60
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["deleted"], 60, "{answer}");
    assert_eq!(count(&server, "b").await, 120);
    assert_eq!(count(&server, "c").await, 180);
    // Latest values no longer show the deleted sensor.
    let latest = server
        .query_json(
            "plant",
            "SELECT DISTINCT ON (sensor) sensor FROM temp ORDER BY sensor, time DESC",
        )
        .await;
    assert_eq!(latest.len(), 2, "{latest:?}");
    let cached = server
        .query_json(
            "plant",
            "SELECT sensor FROM last_cache('plant', 'temp') ORDER BY sensor",
        )
        .await;
    assert_eq!(cached.len(), 2, "{cached:?}");
    assert_eq!(cached[0]["sensor"], "b");

    // What it cannot do, it says; what matches nothing, it says too.
    let (status, answer) = statement(&server, "DELETE FROM temp WHERE celsius > 3").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer.to_string().contains("\\\"celsius\\\" is a field"),
        "{answer}"
    );
    let (status, answer) = statement(&server, "DELETE FROM temp WHERE sensor = 'nope'").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["deleted"], 0, "{answer}");
    let (status, _) = statement(&server, "DELETE FROM nope WHERE sensor = 'a'").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The other doors: PostgreSQL (`DELETE <n>`) and Flight SQL (an update's count).
    let pg = connect(&server, "plant").await.unwrap();
    let done = pg
        .simple_query("DELETE FROM temp WHERE sensor = 'c' AND time < to_timestamp(0)")
        .await
        .unwrap();
    assert!(
        matches!(
            done.last(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(0))
        ),
        "{done:?}"
    );
    let mut flight = crate::flight::flight_sql(&server, Some("plant")).await;
    let rows = flight
        .execute_update(
            format!(
                "DELETE FROM temp WHERE sensor = 'c' AND time >= to_timestamp({})",
                now - 30 * 60
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(rows, 30);
    assert_eq!(count(&server, "c").await, 150);
    let refused = flight
        .execute_update("INSERT INTO temp VALUES (1)".to_owned(), None)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("update statements are DELETE"),
        "{refused}"
    );

    // A row of `a` written after the delete stays.
    let (status, text) = write_s(
        &server,
        "plant",
        format!("temp,sensor=a celsius=99i {}\n", now - 10),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    assert_eq!(count(&server, "a").await, 1);

    // kill -9: the WAL replays the deletes in order; then persisted and compacted, the
    // same rows.
    server.kill9();
    server = TestServer::start(&data, &args);
    assert_eq!(counts(&server).await, (1, 120, 150));
    server.terminate();
    server = TestServer::start(&data, &args);
    assert_eq!(events(&data, "rows_deleted"), 3);
    assert_eq!(events(&data, "tombstones_retired"), 0);
    let pending = server
        .query_json(
            "plant",
            "SELECT table_name, predicate, segments_pending FROM system.deletes ORDER BY id",
        )
        .await;
    assert_eq!(pending.len(), 3, "{pending:?}");
    assert_eq!(pending[0]["predicate"], "sensor IN ('a')");
    assert!(
        pending[0]["segments_pending"].as_u64().unwrap() > 0,
        "{pending:?}"
    );
    // kill -9 while a compaction makes the deletes physical: nothing deleted comes back.
    for pause in [5, 40, 150] {
        let (client, url) = (server.client.clone(), server.url("/api/v3/compact"));
        let compacting = tokio::spawn(async move { client.post(url).send().await });
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill9();
        let _ = compacting.await;
        server = TestServer::start(&data, &args);
        assert_eq!(
            counts(&server).await,
            (1, 120, 150),
            "after a kill -9 {pause} ms into a compaction"
        );
    }
    let (ok, out, err) = kiln(&["compact", &host(&server)], None);
    assert!(ok, "{out}{err}");
    // Made physical: every segment was rewritten without the deleted rows.
    assert!(events(&data, "tombstones_retired") >= 1);
    let pending = server
        .query_json("plant", "SELECT count(*) AS n FROM system.deletes")
        .await;
    assert_eq!(pending[0]["n"], 0, "{pending:?}");
    assert_eq!(counts(&server).await, (1, 120, 150));
    server.kill9();
    server = TestServer::start(&data, &args);
    assert_eq!(counts(&server).await, (1, 120, 150));
}

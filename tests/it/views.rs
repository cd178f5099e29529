//! Continuous aggregates end to end: a view created, refreshed and dropped over HTTP,
//! PostgreSQL and Flight SQL; kept up to date by the background refresh; equal to its
//! query after `kill -9` during its creation and during refreshes.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;

use crate::lifecycle::statement;
use crate::postgres::connect;
use crate::support::{TestServer, eventually};

const VIEW: &str = "CREATE MATERIALIZED VIEW cpu_1m AS SELECT time_bucket('1 minute', time) AS time, \
                    host, count(*) AS n, max(usage) AS mx, avg(usage) AS mean FROM cpu GROUP BY 1, 2";
const OF_VIEW: &str = "SELECT time, host, n, mx, mean FROM cpu_1m ORDER BY time, host";
const OF_SOURCE: &str = "SELECT time_bucket('1 minute', time) AS time, host, count(*) AS n, \
                         max(usage) AS mx, avg(usage) AS mean FROM cpu GROUP BY 1, 2 ORDER BY 1, 2";
const ARGS: [&str; 2] = ["--view-refresh-interval", "200ms"];

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `hosts` hosts every 10 s for `minutes` minutes from `from` (seconds), values from
/// `seed`.
fn rows(from: i64, minutes: i64, hosts: usize, seed: i64) -> String {
    let mut out = String::new();
    for s in (0..minutes * 60).step_by(10) {
        for h in 0..hosts {
            let v = (s + seed * 7 + h as i64 * 13) % 100;
            out.push_str(&format!("cpu,host=h{h} usage={v}i {}\n", from + s));
        }
    }
    out
}

async fn write(server: &TestServer, body: String) {
    let (status, text) = server.write("plant", body, &[("precision", "s")]).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
}

/// Whether the view holds exactly its query's answer over the source.
async fn matches(server: &TestServer) -> bool {
    let view = server.query_json("plant", OF_VIEW).await;
    let source = server.query_json("plant", OF_SOURCE).await;
    !view.is_empty() && view == source
}

async fn assert_matches(server: &TestServer, after: &str) {
    let view = server.query_json("plant", OF_VIEW).await;
    let source = server.query_json("plant", OF_SOURCE).await;
    assert_eq!(view.len(), source.len(), "{after}");
    assert!(view == source, "{after}: the view differs from its query");
}

fn exists(data: &Path) -> bool {
    crate::persistence::walk(&data.join("objects/catalog"))
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"type\":\"view_created\"")))
}

#[tokio::test]
async fn a_view_over_every_door_equals_its_query_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &ARGS);
    let now = now_secs();
    let start = now - now % 3_600 - 26 * 3_600;
    // 20 hosts every 10 s for 26 hours: 187,200 rows over two days of buckets.
    for hour in 0..26 {
        write(&server, rows(start + hour * 3_600, 60, 20, hour)).await;
    }

    // Created over PostgreSQL (materialized at once), refreshed over Flight SQL.
    let pg = connect(&server, "plant").await.unwrap();
    let done = pg.simple_query(VIEW).await.unwrap();
    assert!(
        matches!(
            done.last(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(_))
        ),
        "{done:?}"
    );
    assert_matches(&server, "created").await;
    let listed = server
        .query_json(
            "plant",
            "SELECT view_name, source, bucket_s, pending_buckets FROM system.views",
        )
        .await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["source"], "cpu");
    assert_eq!(listed[0]["bucket_s"], 60.0);

    // Late rows in old buckets: a refresh recomputes them.
    write(&server, rows(start + 3_600, 5, 25, 99)).await;
    let mut flight = crate::flight::flight_sql(&server, Some("plant")).await;
    let written = flight
        .execute_update("REFRESH MATERIALIZED VIEW cpu_1m".to_owned(), None)
        .await
        .unwrap();
    // 5 minutes of 25 hosts recomputed (more if the newest minute closed meanwhile).
    assert!(written >= 125, "{written}");
    assert_matches(&server, "refreshed over Flight SQL").await;

    // Lines for the view are refused, each with its line number; nothing is written to
    // it.
    let (status, text) = server.write("plant", "cpu_1m,host=x n=1i 1", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("is a materialized view"), "{text}");
    let (status, text) = server
        .write(
            "plant",
            format!("cpu,host=h0 usage=5i {start}\ncpu_1m,host=x n=1i {start}"),
            &[("precision", "s")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("\"line_number\":2"), "{text}");
    let held = server
        .query_json("plant", "SELECT count(*) AS n FROM cpu_1m WHERE host = 'x'")
        .await;
    assert_eq!(held[0]["n"], 0);

    // The background refresh follows persistence: late rows, persisted by a restart,
    // reach the view with no statement.
    write(&server, rows(start + 7_200, 3, 30, 5)).await;
    server.terminate();
    server = TestServer::start(&data, &ARGS);
    assert!(
        eventually(Duration::from_secs(20), || matches(&server)).await,
        "the background refresh did not bring the view up to date"
    );

    // kill -9 during refreshes of late rows and deletes: after a restart and a refresh,
    // the view is its query again (nothing lost, nothing counted twice).
    for (i, pause) in [10u64, 60, 200].into_iter().enumerate() {
        write(
            &server,
            rows(start + (i as i64 + 4) * 3_600, 30, 25, pause as i64),
        )
        .await;
        let (status, answer) =
            statement(&server, &format!("DELETE FROM cpu WHERE host = 'h{i}'")).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let (client, url) = (server.client.clone(), server.url("/api/v3/query_sql"));
        let refreshing = tokio::spawn(async move {
            client
                .post(url)
                .json(&serde_json::json!({"db": "plant", "q": "REFRESH MATERIALIZED VIEW cpu_1m"}))
                .send()
                .await
        });
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill9();
        let _ = refreshing.await;
        server = TestServer::start(&data, &ARGS);
        let (status, answer) = statement(&server, "REFRESH MATERIALIZED VIEW cpu_1m").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_matches(&server, &format!("kill -9 {pause} ms into a refresh")).await;
    }

    // kill -9 during a creation: the view exists (then refreshes to its query) or not.
    let (status, answer) = statement(&server, "DROP MATERIALIZED VIEW cpu_1m").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (client, url) = (server.client.clone(), server.url("/api/v3/query_sql"));
    let creating = tokio::spawn(async move {
        client
            .post(url)
            .json(&serde_json::json!({"db": "plant", "q": VIEW}))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(40)).await;
    server.kill9();
    let _ = creating.await;
    server = TestServer::start(&data, &ARGS);
    let listed = server
        .query_json("plant", "SELECT view_name FROM system.views")
        .await;
    let sql = match listed.len() {
        1 => "REFRESH MATERIALIZED VIEW cpu_1m",
        _ => VIEW,
    };
    let (status, answer) = statement(&server, sql).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_matches(&server, "kill -9 during a creation").await;
    assert!(exists(&data));

    // Dropped: gone from SQL and from system.views.
    let (status, answer) = statement(&server, "DROP MATERIALIZED VIEW cpu_1m").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["statement"], "DROP MATERIALIZED VIEW");
    let (status, _) = server.query("plant", OF_VIEW, "json").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let listed = server
        .query_json("plant", "SELECT view_name FROM system.views")
        .await;
    assert!(listed.is_empty(), "{listed:?}");
}

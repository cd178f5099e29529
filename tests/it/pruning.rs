//! What a query skips, as `EXPLAIN ANALYZE` tells it: segments outside the time range,
//! row groups whose bloom filter rules a tag value out.

use crate::support::TestServer;

/// `EXPLAIN ANALYZE` of `sql` as one string.
async fn explain_analyze(server: &TestServer, sql: &str) -> String {
    let rows = server
        .query_json("plant", &format!("EXPLAIN ANALYZE {sql}"))
        .await;
    rows.iter()
        .filter_map(|r| r.get("plan").and_then(|p| p.as_str()))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn count(server: &TestServer, sql: &str) -> i64 {
    server.query_json("plant", sql).await[0]["n"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn explain_analyze_shows_segments_and_row_groups_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    // Three hours (three time partitions) of ten hosts, one reading a minute.
    let start = 1_704_067_200i64; // 2024-01-01T00:00:00Z
    let lines: String = (0..180)
        .flat_map(|m| {
            (0..10).map(move |h| {
                let t = (start + m * 60) * 1_000_000_000;
                format!("cpu,host=host_{h} usage={m} {t}\n")
            })
        })
        .collect();
    server.write_ok("plant", &lines).await;
    // A clean stop persists the buffer: three segments.
    server.terminate();
    let server = TestServer::start(&data, &[]);

    let in_hour_two = "SELECT count(*) AS n FROM cpu \
                       WHERE time >= '2024-01-01T01:10:00Z' AND time < '2024-01-01T01:20:00Z'";
    assert_eq!(count(&server, in_hour_two).await, 100);
    let plan = explain_analyze(&server, in_hour_two).await;
    assert!(
        plan.contains("KilnScanExec: cpu, segments 1 of 3 (2 outside the time range)"),
        "{plan}"
    );

    let absent = "SELECT count(*) AS n FROM cpu WHERE host = 'host_77'";
    assert_eq!(count(&server, absent).await, 0);
    let plan = explain_analyze(&server, absent).await;
    assert!(plan.contains("segments 3 of 3"), "{plan}");
    assert!(
        plan.contains("row_groups_pruned_bloom_filter=3 total → 0 matched"),
        "{plan}"
    );

    let present = "SELECT count(*) AS n FROM cpu WHERE host = 'host_7'";
    assert_eq!(count(&server, present).await, 180);
    let plan = explain_analyze(&server, present).await;
    assert!(
        plan.contains("row_groups_pruned_bloom_filter=3 total → 3 matched"),
        "{plan}"
    );
}

//! What a query skips, as `EXPLAIN ANALYZE` tells it: segments outside the time range,
//! row groups whose statistics rule a tag value out.

use crate::compaction::{persisted_in_parts, write};
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

    // Tags are the sort key: a value outside a row group's range is skipped by its
    // statistics (queries do not read the segments' bloom filters: a value inside the
    // range is nearly always present, and reading a filter costs every query).
    let absent = "SELECT count(*) AS n FROM cpu WHERE host = 'sensor_77'";
    assert_eq!(count(&server, absent).await, 0);
    let plan = explain_analyze(&server, absent).await;
    assert!(plan.contains("segments 3 of 3"), "{plan}");
    assert!(
        plan.contains("row_groups_pruned_statistics=3 total → 0 matched"),
        "{plan}"
    );

    let present = "SELECT count(*) AS n FROM cpu WHERE host = 'host_7'";
    assert_eq!(count(&server, present).await, 180);
    let plan = explain_analyze(&server, present).await;
    assert!(
        plan.contains("row_groups_pruned_statistics=3 total → 3 matched"),
        "{plan}"
    );
}

/// Lines of `hosts` hosts every `step` seconds over `[from, to)` (times in seconds), values
/// from `seed`.
fn readings(hosts: u64, from: i64, to: i64, step: i64, seed: &mut u64) -> String {
    let mut lines = String::new();
    for t in (from..to).step_by(step as usize) {
        for h in 0..hosts {
            // A small LCG: deterministic, and different for every write.
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let usage = (*seed >> 33) % 1000;
            lines.push_str(&format!("cpu,host=host_{h} usage={usage}i {t}\n"));
        }
    }
    lines
}

/// Bounds on time are applied by the scan, only to the sources that straddle them
/// (segments, segments merged with other segments and with buffered rows, buffered rows):
/// every window returns what the same window on the time as an integer returns (a filter
/// DataFusion applies to every row).
#[tokio::test]
async fn time_bounds_keep_what_a_filter_on_time_as_an_integer_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--compaction-interval", "0s"];
    let start = 1_704_067_200i64; // 2024-01-01T00:00:00Z, three hourly partitions
    let mut seed = 7u64;
    // Segments of the three hours, then overwrites and new instants in the first two
    // (a second segment in each), then newer ones in the buffer over the first and last.
    let server = persisted_in_parts(
        &data,
        &args,
        [
            readings(4, start, start + 3 * 3600, 300, &mut seed),
            readings(3, start + 1200, start + 5400, 420, &mut seed),
        ],
    )
    .await;
    write(
        &server,
        readings(2, start + 600, start + 2700, 600, &mut seed),
    )
    .await;
    write(
        &server,
        readings(4, start + 9000, start + 11100, 240, &mut seed),
    )
    .await;

    let ts = |s: i64| {
        let at = chrono::DateTime::from_timestamp(s, 0).unwrap();
        (
            format!("'{}'", at.to_rfc3339()),
            (s * 1_000_000_000).to_string(),
        )
    };
    let mut checked = 0;
    for (i, (lo, hi)) in [
        (start, start + 3 * 3600),
        (start + 3600, start + 7200),
        (start + 1000, start + 2000),
        (start + 1200, start + 6000),
        (start - 600, start + 700),
        (start + 3599, start + 3601),
        (start + 2700, start + 9300),
        (start + 9000, start + 20_000),
        (start + 300, start + 300),
    ]
    .into_iter()
    .enumerate()
    {
        let ((a, a_int), (b, b_int)) = (ts(lo), ts(hi));
        // `abs()` keeps DataFusion from turning it back into a comparison of `time`.
        let int = "abs(arrow_cast(time, 'Int64'))";
        let tag = if i % 2 == 0 {
            ""
        } else {
            " AND host != 'host_1'"
        };
        for (by_time, by_int) in [
            (
                format!("time >= {a} AND time < {b}"),
                format!("{int} >= {a_int} AND {int} < {b_int}"),
            ),
            (
                format!("time > {a} AND time <= {b}"),
                format!("{int} > {a_int} AND {int} <= {b_int}"),
            ),
            (
                format!("time BETWEEN {a} AND {b}"),
                format!("{int} BETWEEN {a_int} AND {b_int}"),
            ),
            (format!("time >= {a}"), format!("{int} >= {a_int}")),
            (format!("time < {b}"), format!("{int} < {b_int}")),
            (format!("time = {a}"), format!("{int} = {a_int}")),
        ] {
            let q = |filter: &str| {
                format!(
                    "SELECT host, {int} AS t, usage FROM cpu WHERE {filter}{tag} ORDER BY host, t"
                )
            };
            let expected = server.query_json("plant", &q(&by_int)).await;
            let got = server.query_json("plant", &q(&by_time)).await;
            assert_eq!(got, expected, "WHERE {by_time}{tag}");
            // A row limit counts rows after the filter.
            let limited = format!(
                "SELECT count(*) AS n FROM (SELECT usage FROM cpu WHERE {by_time}{tag} LIMIT 5)"
            );
            assert_eq!(
                count(&server, &limited).await,
                expected.len().min(5) as i64,
                "{limited}"
            );
            checked += expected.len();
        }
    }
    assert!(checked > 1000, "too few rows compared: {checked}");
    // Every hour is merged: two segments and buffered rows, two segments, a segment and
    // buffered rows.
    let plan = explain_analyze(&server, "SELECT count(*) FROM cpu").await;
    assert!(plan.contains("merged 3"), "{plan}");
}

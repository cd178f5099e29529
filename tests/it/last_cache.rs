//! Last-value caches end to end: created and dropped with the CLI, the same answer as the
//! full query after writes, persistence, a clean restart and a `kill -9`.

use serde_json::{Map, Value};

use crate::cli::kiln;
use crate::support::TestServer;

/// The latest row of every host, from the cache.
const FROM_CACHE: &str = "SELECT * FROM last_cache('plant', 'cpu') ORDER BY host";
/// The same, answered by the planner (from the cache when it can).
const DISTINCT_ON: &str = "SELECT DISTINCT ON (host) * FROM cpu ORDER BY host, time DESC";
/// The same, from the table: a time filter keeps the planner off the cache.
const FULL: &str = "SELECT DISTINCT ON (host) * FROM cpu \
                    WHERE time >= '1970-01-01T00:00:00Z' ORDER BY host, time DESC";

async fn rows(server: &TestServer, sql: &str) -> Vec<Map<String, Value>> {
    server.query_json("plant", sql).await
}

async fn plan(server: &TestServer, sql: &str) -> String {
    let rows = rows(server, &format!("EXPLAIN {sql}")).await;
    rows.iter()
        .filter_map(|r| r.get("plan").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many series a query's read of the cache returned (`EXPLAIN ANALYZE`).
async fn series_read(server: &TestServer, sql: &str) -> usize {
    let plan = plan(server, &format!("ANALYZE {sql}")).await;
    let line = plan
        .lines()
        .find(|l| l.contains("LastCacheExec"))
        .unwrap_or_else(|| panic!("no cache read in {plan}"));
    let rows = line
        .split("output_rows=")
        .nth(1)
        .unwrap_or_else(|| panic!("no output_rows in {line}"));
    rows.split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Checks the cache, the planner's answer and the full query agree, and that the planner
/// used the cache.
async fn agree(server: &TestServer, hosts: usize) {
    let full = rows(server, FULL).await;
    assert_eq!(full.len(), hosts);
    assert_eq!(rows(server, FROM_CACHE).await, full);
    assert_eq!(rows(server, DISTINCT_ON).await, full);
    assert!(
        plan(server, DISTINCT_ON).await.contains("last-value cache"),
        "DISTINCT ON should read the cache"
    );
    assert!(!plan(server, FULL).await.contains("last-value cache"));

    // A filter on the key columns picks series before any row is read; one on other
    // columns is applied to the rows read.
    let some = "SELECT DISTINCT ON (host) host, usage FROM cpu WHERE host IN ('h1', 'h3') \
                ORDER BY host, time DESC";
    let some_full = "SELECT DISTINCT ON (host) host, usage FROM cpu WHERE host IN ('h1', 'h3') \
                     AND time >= '1970-01-01T00:00:00Z' ORDER BY host, time DESC";
    let expected = rows(server, some_full).await;
    assert_eq!(expected.len(), 2);
    assert_eq!(rows(server, some).await, expected);
    assert_eq!(series_read(server, some).await, 2);
    // Series named by value are found through the cache's index of that column (made by
    // the first such read, kept up to date as new series arrive).
    for picked in [
        "host = 'h2'",
        "'h0' = host AND dc = 'eu'",
        "host = 'h1' OR host = 'h4' OR host = 'nope'",
        "host IN ('h3', NULL, 'h1') AND dc IN ('eu', 'us')",
        "dc = 'eu' AND host IN ('h0', 'h2')",
    ] {
        let cached = format!(
            "SELECT DISTINCT ON (host) host, usage FROM cpu WHERE {picked} \
             ORDER BY host, time DESC"
        );
        let full = format!(
            "SELECT DISTINCT ON (host) host, usage FROM cpu WHERE {picked} \
             AND time >= '1970-01-01T00:00:00Z' ORDER BY host, time DESC"
        );
        let expected = rows(server, &full).await;
        assert!(!expected.is_empty(), "{picked}");
        assert_eq!(rows(server, &cached).await, expected, "{picked}");
        // (Keyed by host alone, the cache cannot answer a filter on dc.)
        if !picked.contains("dc") {
            assert_eq!(
                series_read(server, &cached).await,
                expected.len(),
                "{picked}"
            );
        }
    }
    let mixed = "SELECT * FROM last_cache('plant', 'cpu') WHERE host <> 'h0' AND usage > 1192 \
                 ORDER BY host";
    let expected: Vec<_> = full
        .iter()
        .filter(|r| r["host"] != "h0" && r["usage"].as_f64().unwrap() > 1192.0)
        .cloned()
        .collect();
    assert!(!expected.is_empty() && expected.len() < hosts - 1);
    assert_eq!(rows(server, mixed).await, expected);
}

fn lines(hosts: usize, from: i64, minutes: i64) -> String {
    let mut out = String::new();
    for m in from..from + minutes {
        for h in 0..hosts {
            let t = (1_704_067_200 + m * 60) * 1_000_000_000;
            out.push_str(&format!(
                "cpu,host=h{h},dc=eu usage={},idle={} {t}\n",
                m * 10 + h as i64,
                100 - m
            ));
        }
    }
    out
}

#[tokio::test]
async fn last_cache_matches_the_full_query_through_writes_persistence_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Caches created and dropped here alone.
    let start = |data| TestServer::start(data, &["--no-default-last-caches"]);
    let mut server = start(&data);
    server.write_ok("plant", &lines(5, 0, 90)).await;
    // Persist part of it, so the cache warms from segments and the buffer.
    server.terminate();
    server = start(&data);
    server.write_ok("plant", &lines(5, 90, 30)).await;

    let host = server.base.clone();
    // By default a series is all the table's tags.
    let (ok, out, err) = kiln(
        &[
            "last-cache",
            "create",
            "--host",
            &host,
            "-d",
            "plant",
            "-t",
            "cpu",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains("\"host\"") && out.contains("\"dc\""), "{out}");
    // Reading the cache waits until it is warm; the planner uses it only then.
    assert_eq!(rows(&server, FROM_CACHE).await.len(), 5);
    // DISTINCT ON names the cache's key columns, or some of them (the latest of the
    // cached rows of each host).
    let by_host_dc = "SELECT DISTINCT ON (host, dc) * FROM cpu ORDER BY host, dc, time DESC";
    assert!(
        plan(&server, by_host_dc)
            .await
            .contains("last-value cache (5 series held)")
    );
    agree(&server, 5).await;
    let on_field = "SELECT DISTINCT ON (host) * FROM cpu WHERE usage > 0 ORDER BY host, time DESC";
    assert!(!plan(&server, on_field).await.contains("last-value cache"));
    // Keyed by host alone (replacing the first).
    let (ok, _, err) = kiln(
        &[
            "last-cache",
            "create",
            "--host",
            &host,
            "-d",
            "plant",
            "-t",
            "cpu",
            "--key-columns",
            "host",
        ],
        None,
    );
    assert!(ok, "{err}");
    agree(&server, 5).await;

    // New series, late rows (older than the latest: ignored), a rewrite of a latest time
    // that sets one field only (merged, as queries merge it).
    let late = "cpu,host=h1,dc=eu usage=-1 1704067200000000000\n";
    let new_series = "cpu,host=h9,dc=us usage=9 1704070000000000000\n";
    let latest_h2 = (1_704_067_200 + 119 * 60) * 1_000_000_000i64;
    let rewrite = format!("cpu,host=h2,dc=eu idle=-5 {latest_h2}\n");
    server
        .write_ok("plant", &format!("{late}{new_series}{rewrite}"))
        .await;
    agree(&server, 6).await;
    let cached = rows(&server, FROM_CACHE).await;
    let h2 = cached.iter().find(|r| r["host"] == "h2").unwrap();
    assert_eq!(h2["idle"], serde_json::json!(-5.0));
    assert_eq!(h2["usage"], serde_json::json!(1192.0));

    // A clean restart (persists everything): the cache is in the catalog and warms again.
    server.terminate();
    server = start(&data);
    agree(&server, 6).await;

    // kill -9 with writes only in the WAL: replayed, and still the same answer.
    server.write_ok("plant", &lines(6, 120, 5)).await;
    server.kill9();
    server = start(&data);
    agree(&server, 7).await;

    // Dropped: the table function says so and the planner reads the table.
    let (ok, _, err) = kiln(
        &[
            "last-cache",
            "drop",
            "--host",
            &server.base,
            "-d",
            "plant",
            "-t",
            "cpu",
        ],
        None,
    );
    assert!(ok, "{err}");
    let (status, body) = server.query("plant", FROM_CACHE, "json").await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("has no last-value cache"));
    assert!(
        !plan(&server, DISTINCT_ON)
            .await
            .contains("last-value cache")
    );
    assert_eq!(rows(&server, DISTINCT_ON).await.len(), 7);
    let (ok, _, err) = kiln(
        &[
            "last-cache",
            "drop",
            "--host",
            &server.base,
            "-d",
            "plant",
            "-t",
            "cpu",
        ],
        None,
    );
    assert!(!ok && err.contains("no last-value cache"), "{err}");
}

/// A cache that would hold more series than `--last-cache-max-series` (while warming, or
/// later as series arrive) stops answering: `last_cache()` says why at once instead of
/// waiting forever, the planner reads the table, and a metric counts it.
#[tokio::test]
async fn a_cache_past_its_series_limit_says_so_and_queries_read_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let limit = ["--last-cache-max-series", "3"];
    let mut server = TestServer::start(&data, &limit);
    server.write_ok("plant", &lines(2, 0, 5)).await;
    let create = |host: &str| {
        kiln(
            &[
                "last-cache",
                "create",
                "--host",
                host,
                "-d",
                "plant",
                "-t",
                "cpu",
            ],
            None,
        )
    };
    let (ok, _, err) = create(&server.base);
    assert!(ok, "{err}");
    assert_eq!(rows(&server, FROM_CACHE).await.len(), 2);

    // A third and fourth series arrive: the cache gives up.
    server.write_ok("plant", &lines(4, 5, 1)).await;
    let (status, body) = server.query("plant", FROM_CACHE, "json").await;
    let text = String::from_utf8_lossy(&body);
    assert!(!status.is_success(), "{text}");
    assert!(
        text.contains("more than 3 series (--last-cache-max-series)"),
        "{text}"
    );
    assert!(
        !plan(&server, DISTINCT_ON)
            .await
            .contains("last-value cache")
    );
    assert_eq!(rows(&server, DISTINCT_ON).await, rows(&server, FULL).await);
    assert_eq!(rows(&server, DISTINCT_ON).await.len(), 4);
    assert_eq!(server.metric("kiln_last_caches_failed").await, 1.0);

    // After a restart the warm-up itself finds too many series: an answer at once, not a
    // query waiting for a cache that will never be warm.
    server.terminate();
    let server = TestServer::start(&data, &limit);
    let (status, body) = server.query("plant", FROM_CACHE, "json").await;
    let text = String::from_utf8_lossy(&body);
    assert!(!status.is_success(), "{text}");
    assert!(text.contains("--last-cache-max-series"), "{text}");
    assert_eq!(rows(&server, DISTINCT_ON).await.len(), 4);
}

/// Until it answers from the cache, and then the full query's answer.
async fn answered_from_cache(server: &TestServer) {
    for _ in 0..100 {
        if plan(server, DISTINCT_ON).await.contains("last-value cache") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        plan(server, DISTINCT_ON).await.contains("last-value cache"),
        "DISTINCT ON should read the default cache"
    );
    assert_eq!(rows(server, DISTINCT_ON).await, rows(server, FULL).await);
}

/// Every table has a cache keyed by all its tags without anyone creating one: it follows a
/// new tag, comes back from its snapshot after a clean restart and a `kill -9` (WAL
/// replayed on top), and a snapshot older than the persisted data (stored before default
/// caches were turned off for a while) is not trusted.
#[tokio::test]
async fn every_table_has_a_default_cache_that_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    server.write_ok("plant", &lines(5, 0, 90)).await;
    // DISTINCT ON (host) over a cache keyed by (host, dc): the latest row of each host
    // is picked as the cache is read.
    assert!(
        plan(&server, DISTINCT_ON)
            .await
            .contains("last-value cache (5 series held), latest per host")
    );
    answered_from_cache(&server).await;
    assert_eq!(rows(&server, FROM_CACHE).await, rows(&server, FULL).await);

    // A new tag: h0 has a second series, whose row is h0's latest.
    let t = (1_704_067_200 + 95 * 60) * 1_000_000_000i64;
    server
        .write_ok(
            "plant",
            &format!("cpu,host=h0,dc=eu,line=l1 usage=7777 {t}\n"),
        )
        .await;
    assert!(
        plan(&server, DISTINCT_ON)
            .await
            .contains("last-value cache (6 series held)")
    );
    answered_from_cache(&server).await;
    let h0 = rows(&server, DISTINCT_ON).await;
    assert_eq!(h0[0]["usage"], serde_json::json!(7777.0));
    assert_eq!(h0[0]["line"], "l1");

    // A clean restart persists and snapshots; the cache is loaded, not re-read.
    server.terminate();
    assert!(data.join("objects/last_values").is_dir());
    server = TestServer::start(&data, &[]);
    answered_from_cache(&server).await;

    // Writes only in the WAL, then kill -9: snapshot plus replay.
    server.write_ok("plant", &lines(5, 120, 3)).await;
    server.kill9();
    server = TestServer::start(&data, &[]);
    answered_from_cache(&server).await;
    assert_eq!(rows(&server, DISTINCT_ON).await[1]["usage"], 1221.0);

    // Default caches off while newer rows are persisted: the old snapshot does not
    // cover them, so the cache reads the table when they are back on.
    server.terminate();
    server = TestServer::start(&data, &["--no-default-last-caches"]);
    assert!(
        !plan(&server, DISTINCT_ON)
            .await
            .contains("last-value cache")
    );
    server
        .write_ok("plant", "cpu,host=h1,dc=eu usage=-42 1704081600000000000\n")
        .await;
    server.terminate();
    server = TestServer::start(&data, &[]);
    assert_eq!(rows(&server, FROM_CACHE).await.len(), 6);
    answered_from_cache(&server).await;
    assert_eq!(rows(&server, DISTINCT_ON).await[1]["usage"], -42.0);
}

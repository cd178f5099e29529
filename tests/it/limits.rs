//! Query limits end to end: the memory pool (spilling where DataFusion can), the query
//! timeout on every protocol, and the HTTP API's result size bound.

use std::time::Duration;

use reqwest::StatusCode;
use tokio_postgres::error::SqlState;

use crate::support::{TestServer, eventually};

/// Runs many seconds on any machine (a debug build all the more).
const SLOW: &str = "SELECT sum(value) FROM generate_series(1, 5000000000)";

async fn error_text(server: &TestServer, sql: &str) -> (StatusCode, String) {
    let (status, body) = server.query("plant", sql, "json").await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn queries_spill_or_fail_clearly_within_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data, &["--query-memory-limit", "2000000"]);
    server.write_ok("plant", "cpu,host=a u=1 1\n").await;

    // A sort and a grouping far larger than 2 MB spill to disk and answer correctly.
    let rows = server
        .query_json(
            "plant",
            "SELECT max(v) AS top, count(*) AS n FROM \
             (SELECT value AS v FROM generate_series(1, 1000000) ORDER BY value DESC)",
        )
        .await;
    assert_eq!(
        (rows[0]["top"].as_i64(), rows[0]["n"].as_i64()),
        (Some(1_000_000), Some(1_000_000))
    );
    let rows = server
        .query_json(
            "plant",
            "SELECT count(*) AS groups FROM \
             (SELECT value % 300000 AS k, count(*) FROM generate_series(1, 2000000) GROUP BY 1)",
        )
        .await;
    assert_eq!(rows[0]["groups"].as_i64(), Some(300_000));

    // One that cannot spill fails with a clear error; the server keeps serving.
    let (status, error) = error_text(
        &server,
        "SELECT array_agg(value) FROM generate_series(1, 3000000)",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(error.contains("Resources exhausted"), "{error}");
    let rows = server
        .query_json("plant", "SELECT count(*) AS n FROM cpu")
        .await;
    assert_eq!(rows[0]["n"].as_i64(), Some(1));
}

#[tokio::test]
async fn the_query_timeout_stops_queries_on_every_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--query-timeout", "500ms"]);
    server.write_ok("plant", "cpu,host=a u=1 1\n").await;

    let (status, error) = error_text(&server, SLOW).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{error}");
    assert!(error.contains("query timeout (500ms)"), "{error}");

    // PostgreSQL: the server's timeout stands in for a statement_timeout the client did not set.
    let client = crate::postgres::connect(&server, "plant").await.unwrap();
    let e = client.simple_query(SLOW).await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e:?}");

    // Flight SQL: DEADLINE_EXCEEDED.
    let mut flight = crate::flight::flight_sql(&server, Some("plant")).await;
    let info = flight.execute(SLOW.to_owned(), None).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let result: Result<Vec<_>, _> =
        futures::TryStreamExt::try_collect(flight.do_get(ticket).await.unwrap()).await;
    let e = result.unwrap_err().to_string();
    assert!(e.contains("query timeout"), "{e}");

    // Quick queries are unaffected.
    let rows = server
        .query_json("plant", "SELECT count(*) AS n FROM cpu")
        .await;
    assert_eq!(rows[0]["n"].as_i64(), Some(1));
}

#[tokio::test]
async fn http_results_are_bounded_and_the_streaming_protocols_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--max-result-bytes", "100000"]);
    server.write_ok("plant", "cpu,host=a u=1 1\n").await;
    let big = "SELECT value FROM generate_series(1, 100000)";

    let (status, error) = error_text(&server, big).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error.contains("--max-result-bytes (100000 bytes)"),
        "{error}"
    );

    let client = crate::postgres::connect(&server, "plant").await.unwrap();
    let rows = client.query(big, &[]).await.unwrap();
    assert_eq!(rows.len(), 100_000);
}

/// A client that gives up (here: its own 3 s timeout) takes its query with it: the work
/// stops instead of running to its end (`kiln_queries_running` counts it until then).
#[tokio::test]
async fn a_query_whose_client_goes_away_stops() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", "cpu,host=a u=1 1\n").await;
    assert_eq!(server.metric("kiln_queries_running").await, 0.0);

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let request = impatient
        .get(server.url("/api/v3/query_sql"))
        .query(&[("db", "plant"), ("q", SLOW)])
        .send();
    let watch = async {
        eventually(Duration::from_secs(3), || async {
            server.metric("kiln_queries_running").await == 1.0
        })
        .await
    };
    let (response, seen_running) = tokio::join!(request, watch);
    assert!(seen_running, "the query was never counted as running");
    assert!(response.unwrap_err().is_timeout());

    let stopped = eventually(Duration::from_secs(10), || async {
        server.metric("kiln_queries_running").await == 0.0
    })
    .await;
    assert!(stopped, "the query kept running after its client left");
}

/// One client more than a limit allows, on each door: refused with an error naming the
/// limit, counted, and the clients within it keep being served.
#[tokio::test]
async fn connections_queries_and_streams_beyond_their_limits_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--pg-max-connections",
            "2",
            "--http-max-queries",
            "1",
            "--grpc-max-streams",
            "1",
        ],
    );
    server.write_ok("plant", "cpu,host=a u=1 1\n").await;
    let count = "SELECT count(*) AS n FROM cpu";

    // PostgreSQL: the third connection ends at startup with 53300.
    let first = crate::postgres::connect(&server, "plant").await.unwrap();
    let second = crate::postgres::connect(&server, "plant").await.unwrap();
    let e = crate::postgres::connect(&server, "plant")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");
    let message = e.as_db_error().unwrap().message();
    assert!(message.contains("--pg-max-connections"), "{message}");
    assert_eq!(first.simple_query(count).await.unwrap().len(), 3);
    drop(second);
    assert!(
        eventually(Duration::from_secs(10), || async {
            crate::postgres::connect(&server, "plant").await.is_ok()
        })
        .await,
        "a connection's slot is free again once it closes"
    );

    // HTTP: while one query runs, another waits a second, then gets 429 with Retry-After.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    let slow = tokio::spawn(
        impatient
            .get(server.url("/api/v3/query_sql"))
            .query(&[("db", "plant"), ("q", SLOW)])
            .send(),
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            server.metric("kiln_queries_running").await == 1.0
        })
        .await
    );
    let resp = server
        .client
        .get(server.url("/api/v3/query_sql"))
        .query(&[("db", "plant"), ("q", count)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    let text = resp.text().await.unwrap();
    assert!(text.contains("--http-max-queries"), "{text}");
    // The slow query's client gives up; its permit comes back.
    assert!(slow.await.unwrap().is_err());
    assert!(
        eventually(Duration::from_secs(10), || async {
            server.query("plant", count, "json").await.0 == StatusCode::OK
        })
        .await
    );

    // gRPC: a second write stream while one is open is RESOURCE_EXHAUSTED.
    let mut grpc = crate::grpc::client(&server).await;
    let (open_tx, open_rx) = tokio::sync::mpsc::channel(1);
    let open = grpc
        .write_stream(tokio_stream::wrappers::ReceiverStream::new(open_rx))
        .await
        .unwrap();
    let status = crate::grpc::client(&server)
        .await
        .write_stream(futures::stream::empty())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("--grpc-max-streams"),
        "{}",
        status.message()
    );
    drop(open_tx);
    drop(open);

    let metrics = server.metrics().await;
    for limit in ["pg_connections", "http_queries", "grpc_streams"] {
        let line = format!("kiln_limit_refusals_total{{limit=\"{limit}\"}} ");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{limit}:\n{metrics}"
        );
    }
    // Everyone within the limits is still served.
    assert_eq!(server.query_json("plant", count).await[0]["n"], 1);
}

/// A thread of the server: its name, nice value and CPU time so far (clock ticks).
#[derive(Debug)]
struct Thread {
    name: String,
    nice: i64,
    cpu_ticks: u64,
}

fn threads(pid: u32) -> Vec<Thread> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // ended meanwhile
        };
        let (head, tail) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_owned();
        // Fields from the state (field 3) on: utime 14, stime 15, nice 19.
        let fields: Vec<&str> = tail.split_whitespace().collect();
        let field = |n: usize| fields[n - 3].parse::<i64>().unwrap();
        threads.push(Thread {
            name,
            nice: field(19),
            cpu_ticks: (field(14) + field(15)) as u64,
        });
    }
    threads
}

/// CPU time so far of the query threads and of all the others.
fn ticks(pid: u32) -> (u64, u64) {
    let all = threads(pid);
    let sum = |query: bool| {
        all.iter()
            .filter(|t| (t.name == "kiln-query") == query)
            .map(|t| t.cpu_ticks)
            .sum()
    };
    (sum(true), sum(false))
}

/// CPU time of the query threads and of the others while `work` runs.
async fn ticks_during(pid: u32, work: impl std::future::Future<Output = ()>) -> (u64, u64) {
    let before = ticks(pid);
    work.await;
    let after = ticks(pid);
    (after.0 - before.0, after.1 - before.1)
}

/// Queries execute on threads of their own at the nice value asked for, so that writes
/// get the CPU first; the server's other threads keep the normal priority.
#[tokio::test]
async fn queries_run_on_their_own_threads_below_the_writes_priority() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--query-threads",
            "2",
            "--query-nice",
            "7",
            "--query-timeout",
            "2s",
        ],
    );
    server.write_ok("plant", "cpu,host=a u=1 1\n").await;
    let all = threads(server.pid());
    let query: Vec<_> = all.iter().filter(|t| t.name == "kiln-query").collect();
    assert!(query.len() >= 2, "{all:?}");
    assert!(query.iter().all(|t| t.nice == 7), "{all:?}");
    assert!(
        all.iter()
            .filter(|t| t.name != "kiln-query")
            .all(|t| t.nice == 0),
        "{all:?}"
    );

    // A CPU-bound query's work is done there, over HTTP and over PostgreSQL (two seconds
    // of it, less what other tests take; clock ticks are usually 1/100 s).
    let http = ticks_during(server.pid(), async {
        let (status, _) = error_text(&server, SLOW).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    })
    .await;
    assert!(
        http.0 >= 10 && http.0 > http.1,
        "query threads, others: {http:?}"
    );
    let client = crate::postgres::connect(&server, "plant").await.unwrap();
    let postgres = ticks_during(server.pid(), async {
        let e = client.simple_query(SLOW).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e:?}");
    })
    .await;
    assert!(
        postgres.0 >= 10 && postgres.0 > postgres.1,
        "query threads, others: {postgres:?}"
    );

    // Quick queries answer as before.
    let rows = server
        .query_json("plant", "SELECT count(*) AS n FROM cpu")
        .await;
    assert_eq!(rows[0]["n"].as_i64(), Some(1));
    let rows = client.query("SELECT count(*) FROM cpu", &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 1);
}

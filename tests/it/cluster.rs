//! A cluster on loopback: a Kafka-protocol broker (librdkafka's mock cluster) and a real S3
//! server (`s3s-fs`) underneath; two ingesters (a third joins), one compactor and two
//! queriers as separate `kiln` processes, the queriers finding the ingesters through the
//! catalog. Ingesters are `kill -9`ed and restarted while
//! rows are produced, a querier is killed mid-query, two ingesters race a schema change,
//! and S3 goes away and comes back. Every produced row is then answered exactly once by
//! both queriers, rows not yet persisted included.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use reqwest::StatusCode;

use crate::kafka::source_args;
use crate::object_storage::s3_args;
use crate::support::s3::S3Server;
use crate::support::{TestServer, eventually};

const TOPIC: &str = "plant-events";
const PARTITIONS: i32 = 6;
/// Readings carry their time, as TSBS rows do: one every 10 ms from `FIRST`, so 9,000 of
/// them span 18 partitions of 5 s.
const FIRST: i64 = 1_800_000_000_000_000_000;
const STEP: i64 = 10_000_000;

/// A free loopback address to give a server that must keep it across restarts.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// The cluster's shared flags for `role`: the bucket, and short partitions so that
/// compaction has partitions no longer written.
fn role_args(s3: &S3Server, role: &str, extra: &[String]) -> Vec<String> {
    let mut args = s3_args(s3);
    args.extend(
        ["--role", role, "--partition-duration", "5s"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(extra.iter().cloned());
    args
}

fn start(dir: &std::path::Path, grpc: &str, args: &[String]) -> TestServer {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start_on(grpc, dir, &args, S3Server::credentials)
}

/// An ingester named `name` consuming the topic, joining the catalog with its gRPC
/// `address`. It persists once `persist_at` is buffered, never on age, so the newest rows
/// stay in its buffer.
fn ingester_args(
    s3: &S3Server,
    bootstrap: &str,
    name: &str,
    address: &str,
    persist_at: &str,
) -> Vec<String> {
    let mut extra = source_args(bootstrap, TOPIC);
    let advertised = format!("http://{address}");
    extra.extend(
        [
            "--node-name",
            name,
            "--advertise-address",
            &advertised,
            "--persist-buffer-bytes",
            persist_at,
            "--persist-interval",
            "1h",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    role_args(s3, "ingester", &extra)
}

/// Produces readings `ids` (a message each, its partition by id), `per_batch` at a time
/// with a pause between batches, unless `stop` turns true.
fn produce(bootstrap: &str, ids: std::ops::Range<u64>, per_batch: usize, stop: &AtomicBool) {
    let ids: Vec<u64> = ids.collect();
    for batch in ids.chunks(per_batch) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let messages: Vec<(i32, Vec<u8>)> = batch
            .iter()
            .map(|id| {
                (
                    (id % PARTITIONS as u64) as i32,
                    format!("reading,id={id} v={id}i {}", FIRST + *id as i64 * STEP).into_bytes(),
                )
            })
            .collect();
        kiln_bench::kafka::produce(bootstrap, TOPIC, &messages).expect("produce");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The end of the log of the server whose data directory is `data`.
fn log_tail(data: &std::path::Path) -> String {
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    log[log.len().saturating_sub(4000)..].to_owned()
}

/// The sum of a metric over all its labels.
async fn total(server: &TestServer, name: &str) -> f64 {
    server
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// How many rows carry each id, as `server` answers (its error if it does not).
async fn ids(server: &TestServer) -> Result<BTreeMap<u64, u64>, String> {
    let (status, body) = server
        .query(
            "plant",
            "SELECT id, count(*) AS n FROM reading GROUP BY id",
            "json",
        )
        .await;
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|e| format!("{e}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().parse().unwrap(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect())
}

/// Waits until `querier` answers every id below `n` exactly once.
async fn all_exactly_once(querier: &TestServer, n: u64, what: &str) {
    let complete = eventually(Duration::from_secs(90), || async {
        ids(querier).await.is_ok_and(|seen| seen.len() as u64 >= n)
    })
    .await;
    let seen = match ids(querier).await {
        Ok(seen) => seen,
        Err(e) => panic!("{what}: the querier does not answer: {e}"),
    };
    assert!(complete, "{what}: {} of {n} ids answered", seen.len());
    let wrong: Vec<_> = seen.iter().filter(|(_, count)| **count != 1).collect();
    assert!(wrong.is_empty(), "{what}: ids not answered once: {wrong:?}");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>(),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_answers_every_row_once_through_crashes_rebalances_and_outages() {
    let kafka: MockCluster<'static, DefaultProducerContext> = MockCluster::new(3).unwrap();
    kafka.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(dir.path(), crate::object_storage::BUCKET);
    let addresses = [free_address(), free_address(), free_address()];
    let data = |name: &str| dir.path().join(name);

    // Flags taken before S3 is stopped and started again (its endpoint stays).
    let flags: Vec<Vec<String>> = (0..3)
        .map(|i| {
            let persist_at = ["16KiB", "20KiB", "24KiB"][i];
            ingester_args(
                &s3,
                &bootstrap,
                &format!("ingester-{i}"),
                &addresses[i],
                persist_at,
            )
        })
        .collect();
    // The queriers ask the ingesters that joined the catalog, the third included.
    let querier_flags = role_args(&s3, "querier", &[]);
    let ingester = |i: usize| start(&data(&format!("ingester-{i}")), &addresses[i], &flags[i]);
    let mut ingesters = vec![ingester(0), ingester(1)];
    let compactor = start(
        &data("compactor"),
        "127.0.0.1:0",
        &role_args(
            &s3,
            "compactor",
            &["--compaction-interval".into(), "1s".into()],
        ),
    );

    // Produced all along while one ingester is killed and restarted and a third joins.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (bootstrap, stop) = (bootstrap.clone(), Arc::clone(&stop));
        std::thread::spawn(move || produce(&bootstrap, 0..6000, 50, &stop))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    ingesters[1].kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ingesters[1] = ingester(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    ingesters.push(ingester(2));
    producer.join().unwrap();

    let mut queriers = [
        start(&data("querier-0"), "127.0.0.1:0", &querier_flags),
        start(&data("querier-1"), "127.0.0.1:0", &querier_flags),
    ];
    for (i, querier) in queriers.iter().enumerate() {
        all_exactly_once(querier, 6000, &format!("querier {i}")).await;
    }
    // Each of the three took partitions of the topic, and the newest rows are still
    // only in their buffers: the queriers read them from there.
    let mut buffered = 0.0;
    for (i, ingester) in ingesters.iter().enumerate() {
        let rows = total(ingester, "kiln_kafka_rows_total").await;
        assert!(rows > 0.0, "ingester {i} consumed nothing");
        buffered += ingester.metric("kiln_buffer_bytes").await;
    }
    assert!(
        buffered > 0.0,
        "every row was persisted: nothing tested unpersisted rows"
    );

    // The compactor merges the partitions several ingesters persisted; nothing changes
    // for the queriers.
    assert!(
        eventually(Duration::from_secs(60), || async {
            compactor.metric("kiln_compactions_total").await > 0.0
        })
        .await,
        "the compactor merged nothing; its log:\n{}",
        log_tail(&data("compactor"))
    );
    for ingester in &ingesters {
        assert_eq!(ingester.metric("kiln_compactions_total").await, 0.0);
    }
    all_exactly_once(&queriers[1], 6000, "after compaction").await;

    // A querier killed mid-query: its client gets an error, the other querier answers.
    let slow = {
        let client = queriers[0].client.clone();
        let url = queriers[0].url("/api/v3/query_sql");
        tokio::spawn(async move {
            client
                .get(url)
                .query(&[
                    ("db", "plant"),
                    (
                        "q",
                        "SELECT count(*) FROM reading a, reading b, reading c WHERE a.v + b.v = c.v",
                    ),
                ])
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    queriers[0].kill9();
    let killed = slow.await.unwrap();
    assert!(
        killed.is_err() || !killed.unwrap().status().is_success(),
        "a query answered by a querier killed while it ran"
    );
    all_exactly_once(&queriers[1], 6000, "the other querier").await;

    // Two ingesters add the same field with different types, the second before its
    // catalog has followed the first: its commit finds the log entry taken, catches up,
    // and its write is refused as a single node refuses it.
    let write = |server: &TestServer, value: &str| {
        server
            .client
            .post(server.url("/api/v3/write_lp"))
            .query(&[("db", "plant")])
            .body(format!("shift,line=a extra={value} {FIRST}"))
            .send()
    };
    let first = write(&ingesters[0], "1i").await.unwrap();
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    let second = write(&ingesters[1], "\"one\"").await.unwrap();
    assert_eq!(second.status(), StatusCode::BAD_REQUEST);
    let body = second.text().await.unwrap();
    assert!(body.contains("extra") && body.contains("integer"), "{body}");

    // S3 away while rows arrive: the ingesters keep them in their WALs and persist them
    // once it is back. One is killed meanwhile, and its WAL gives them back.
    s3.stop();
    let never = AtomicBool::new(false);
    produce(&bootstrap, 6000..9000, 500, &never);
    assert!(
        eventually(Duration::from_secs(30), || async {
            let mut failures = 0.0;
            for ingester in &ingesters {
                failures += ingester.metric("kiln_persist_failures_total").await;
            }
            failures > 0.0
        })
        .await,
        "no persistence was attempted while S3 was away"
    );
    ingesters[0].kill9();
    s3.resume();
    ingesters[0] = ingester(0);
    let fresh = start(&data("querier-2"), "127.0.0.1:0", &querier_flags);
    all_exactly_once(&fresh, 9000, "after the outage").await;
    assert!(
        ids(&queriers[1]).await.is_ok_and(|seen| seen.len() == 9000),
        "the other querier"
    );
    stop.store(true, Ordering::Relaxed);

    // The compactor takes no writes, and a single node refuses the cluster's catalog.
    let (status, body) = compactor
        .write("plant", format!("reading,id=x v=1i {FIRST}"), &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("--role compactor"), "{body}");
    let single = data("single");
    let args = ["serve", "--data-dir", single.to_str().unwrap()];
    let (ok, _, err) =
        crate::object_storage::kiln_with_store(&args, &s3, &crate::object_storage::credentials());
    assert!(!ok);
    assert!(err.contains("written by the servers of a cluster"), "{err}");
}

/// An ingester joins the catalog with `--advertise-address`: a querier given no
/// `--ingesters` asks it; while it is killed, with rows only its WAL holds, queries fail
/// naming it; once it stopped cleanly (everything persisted, left the catalog) the querier
/// answers from the segments without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_querier_asks_joined_ingesters_and_tells_a_missing_one_from_one_that_left() {
    use crate::object_storage::{rows, values};
    use crate::querier::{count_temp, latest};

    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), crate::object_storage::BUCKET);
    let address = free_address();
    let advertised = format!("http://{address}");
    let flags = role_args(
        &s3,
        "ingester",
        &[
            "--node-name",
            "ingester-0",
            "--advertise-address",
            &advertised,
            "--persist-interval",
            "1h",
            "--persist-buffer-bytes",
            "64KiB",
        ]
        .map(str::to_owned),
    );
    let data = dir.path().join("ingester-0");
    let mut ingester = start(&data, &address, &flags);
    let querier = start(
        &dir.path().join("querier"),
        "127.0.0.1:0",
        &role_args(&s3, "querier", &[]),
    );

    ingester.write_ok("plant", &rows(0, 10)).await;
    counts_eventually(
        &querier,
        10,
        "the querier never asked the ingester that joined",
    )
    .await;
    let joined = querier
        .query_json(
            "plant",
            "SELECT name, address, joined_at IS NOT NULL AS dated FROM system.ingesters",
        )
        .await;
    let expected = serde_json::json!({"name": "ingester-0", "address": advertised, "dated": true});
    assert_eq!(
        serde_json::Value::from(joined),
        serde_json::json!([expected])
    );
    assert_eq!(
        ingester.metric("kiln_segments_persisted_total").await,
        0.0,
        "the rows came from the ingester's buffer"
    );

    // Killed: still joined, and its rows are only in its WAL.
    ingester.kill9();
    let (status, error) = count_temp(&querier, false).await;
    let error = error.unwrap_err();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(
        error.contains(&format!(
            "the ingester ingester-0 at {advertised} did not answer"
        )),
        "{error}"
    );
    assert_eq!(count_temp(&querier, true).await, (StatusCode::OK, Ok(0)));

    // Back (its WAL replayed), then stopped cleanly: it persists everything and leaves.
    ingester = start(&data, &address, &flags);
    assert_eq!(count_temp(&querier, false).await, (StatusCode::OK, Ok(10)));
    ingester.write_ok("plant", &rows(10, 5)).await;
    assert_eq!(count_temp(&querier, false).await, (StatusCode::OK, Ok(15)));
    ingester.terminate();
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("left the cluster's catalog"), "{log}");
    counts_eventually(
        &querier,
        15,
        "the querier still asks the ingester that left",
    )
    .await;
    assert!(
        querier
            .query_json("plant", "SELECT name FROM system.ingesters")
            .await
            .is_empty()
    );
    assert_eq!(values(&querier).await, (0..15).collect::<Vec<_>>());
    // Its last-value snapshots, stored as it persisted, are the querier's cache.
    let expected = r#"[{"machine":"press-0","celsius":12.0},{"machine":"press-1","celsius":13.0},{"machine":"press-2","celsius":14.0},{"machine":"press-3","celsius":11.0}]"#;
    assert!(
        eventually(Duration::from_secs(30), || async {
            latest(&querier).await.as_deref() == Some(expected)
        })
        .await,
        "the querier's last-value cache is not the ingester's: {:?}",
        latest(&querier).await
    );

    // Its disk lost for good while it held unpersisted rows: a server with its name and
    // address on an empty data directory, stopped cleanly, makes it leave (README).
    ingester = start(&data, &address, &flags);
    ingester.write_ok("plant", &rows(15, 5)).await;
    ingester.kill9();
    assert_eq!(
        count_temp(&querier, false).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let mut stand_in = start(&dir.path().join("stand-in"), &address, &flags);
    stand_in.terminate();
    counts_eventually(&querier, 15, "the ingester never left").await;
}

/// Asserts that `querier` soon counts `n` rows of `temp`, or fails saying `what` went wrong.
async fn counts_eventually(querier: &TestServer, n: i64, what: &str) {
    use crate::querier::count_temp;
    let counted = eventually(Duration::from_secs(30), || async {
        count_temp(querier, false).await == (StatusCode::OK, Ok(n))
    })
    .await;
    assert!(counted, "{what}: {:?}", count_temp(querier, false).await);
}

#[test]
fn only_an_ingester_advertises_an_address_and_it_must_be_a_url() {
    let on_s3 = [
        "serve",
        "--check",
        "--object-store",
        "s3",
        "--object-store-bucket",
        "plant",
    ];
    let check = |extra: &[&str]| crate::cli::kiln_env(&[&on_s3[..], extra].concat(), None, &[]);
    let ingester = ["--role", "ingester", "--node-name", "ingester-0"];
    let address = [
        "--advertise-address",
        "http://kiln-ingester-0.kiln-ingester:50051",
    ];
    let (ok, out, err) = check(&[&ingester[..], &address[..]].concat());
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "joins the catalog as ingester ingester-0, asked by queriers at \
             http://kiln-ingester-0.kiln-ingester:50051"
        ),
        "{out}"
    );
    let (ok, _, err) = check(&[&["--role", "querier"][..], &address[..]].concat());
    assert!(!ok);
    assert!(
        err.contains("give it to servers of --role ingester, not querier"),
        "{err}"
    );
    let (ok, _, err) = check(
        &[
            &ingester[..],
            &["--advertise-address", "kiln-ingester-0:50051"][..],
        ]
        .concat(),
    );
    assert!(!ok);
    assert!(
        err.contains("is not an http:// or https:// URL with a host"),
        "{err}"
    );
}

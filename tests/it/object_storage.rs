//! Segments and the catalog in S3: a real S3 server (`s3s-fs`) on loopback, outages of it,
//! `kill -9` of Kiln while it is away, and the flags' checks.

use std::time::Duration;

use reqwest::StatusCode;

use crate::cli::kiln_env;
use crate::support::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use crate::support::{TestServer, eventually, wal_files};

pub(crate) const BUCKET: &str = "plant";
pub(crate) const PREFIX: &str = "site-a/kiln";

pub(crate) fn s3_args(s3: &S3Server) -> Vec<String> {
    [
        "--object-store",
        "s3",
        "--object-store-bucket",
        BUCKET,
        "--object-store-prefix",
        PREFIX,
        "--object-store-endpoint",
        &s3.endpoint(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `kiln ARGS` with the flags of `s3`'s bucket added and `env` set.
pub(crate) fn kiln_with_store(
    args: &[&str],
    s3: &S3Server,
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let store = s3_args(s3);
    let mut args = args.to_vec();
    args.extend(store.iter().map(String::as_str));
    kiln_env(&args, None, env)
}

pub(crate) fn credentials() -> [(&'static str, &'static str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
    ]
}

pub(crate) fn start(data: &std::path::Path, s3: &S3Server) -> TestServer {
    let mut args = s3_args(s3);
    args.extend(["--persist-interval", "1s"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start_with(data, &args, S3Server::credentials)
}

/// `n` rows of line protocol, one per second from `from`.
pub(crate) fn rows(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| {
            format!(
                "temp,machine=press-{} celsius={i} {}\n",
                i % 4,
                1_700_000_000_000_000_000i64 + i as i64 * 1_000_000_000
            )
        })
        .collect()
}

/// Every row's value, in order, and their count: each written exactly once.
pub(crate) async fn values(server: &TestServer) -> Vec<i64> {
    server
        .query_json("plant", "SELECT celsius FROM temp ORDER BY time")
        .await
        .iter()
        .map(|r| r["celsius"].as_f64().unwrap() as i64)
        .collect()
}

pub(crate) fn segment_keys(s3: &S3Server) -> Vec<String> {
    s3.keys(BUCKET, PREFIX)
        .into_iter()
        .filter(|k| k.ends_with(".parquet"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_and_catalog_live_in_s3_through_store_outages_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(dir.path(), BUCKET);
    let data = dir.path().join("data");
    let mut server = start(&data, &s3);

    server.write_ok("plant", &rows(0, 1000)).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            server.metric("kiln_segments_persisted_total").await >= 1.0
        })
        .await,
        "nothing persisted"
    );
    // Segments and the catalog are in the bucket, under the prefix; none in the data
    // directory, which keeps the WAL.
    let keys = s3.keys(BUCKET, PREFIX);
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{PREFIX}/catalog/"))),
        "{keys:?}"
    );
    let first_segments = segment_keys(&s3);
    assert!(
        first_segments
            .iter()
            .all(|k| k.starts_with(&format!("{PREFIX}/segments/"))),
        "{first_segments:?}"
    );
    assert!(!first_segments.is_empty(), "{keys:?}");
    assert!(!data.join("objects").exists());
    assert!(
        !s3.keys(BUCKET, "").iter().any(|k| k.contains("probe/")),
        "the start-up probe leaves nothing behind"
    );

    // The store goes away while rows arrive: writes are still acknowledged (the WAL holds
    // them) and persistence waits. When it is back, they are persisted.
    s3.stop();
    server.write_ok("plant", &rows(1000, 1000)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s3.resume();
    let persisted = server.metric("kiln_segments_persisted_total").await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            server.metric("kiln_segments_persisted_total").await > persisted
                || segment_keys(&s3).len() > first_segments.len()
        })
        .await,
        "the rows written while the store was away were never persisted"
    );
    assert_eq!(values(&server).await, (0..2000).collect::<Vec<_>>());

    // Away again, and Kiln is killed before it can persist: after both come back, every
    // acknowledged row is there, from the WAL that was kept.
    s3.stop();
    server.write_ok("plant", &rows(2000, 500)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.kill9();
    assert!(!wal_files(&data).is_empty());
    s3.resume();
    let mut server = start(&data, &s3);
    assert_eq!(values(&server).await, (0..2500).collect::<Vec<_>>());
    assert!(
        eventually(Duration::from_secs(30), || async {
            server.metric("kiln_segments_persisted_total").await >= 1.0
        })
        .await,
        "the replayed rows were never persisted"
    );

    // A clean restart reads them back: segments this server wrote or read are on its disk
    // already (the cache survives restarts), so no query fetches one.
    server.terminate();
    let mut server = start(&data, &s3);
    assert_eq!(values(&server).await, (0..2500).collect::<Vec<_>>());
    assert!(server.metric("kiln_segment_cache_hits_total").await >= 1.0);
    assert_eq!(server.metric("kiln_segment_cache_misses_total").await, 0.0);

    // Without the cache, the first query fetches the segments from the bucket and the next
    // reads them from disk.
    server.terminate();
    std::fs::remove_dir_all(data.join("cache")).unwrap();
    let server = start(&data, &s3);
    assert_eq!(values(&server).await, (0..2500).collect::<Vec<_>>());
    let misses = server.metric("kiln_segment_cache_misses_total").await;
    assert!(misses >= 1.0);
    assert!(
        server
            .metric("kiln_segment_cache_fetched_bytes_total")
            .await
            > 0.0
    );
    let hits = server.metric("kiln_segment_cache_hits_total").await;
    assert_eq!(values(&server).await, (0..2500).collect::<Vec<_>>());
    assert_eq!(
        server.metric("kiln_segment_cache_misses_total").await,
        misses
    );
    assert!(server.metric("kiln_segment_cache_hits_total").await > hits);
}

/// The README's move of a data directory into a bucket: the objects copied under the
/// prefix (what `aws s3 sync` does; this S3 server keeps objects as files), the WAL left
/// where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_moves_into_a_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), BUCKET);
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &["--persist-interval", "1s"]);
    server.write_ok("plant", &rows(0, 300)).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            server.metric("kiln_segments_persisted_total").await >= 1.0
        })
        .await
    );
    // Written after the persistence, and killed: these rows are only in the WAL.
    server.write_ok("plant", &rows(300, 200)).await;
    server.kill9();

    let target = s3.bucket_dir(BUCKET).join(PREFIX);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(data.join("objects"))
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(data.join("objects")).unwrap();
    let server = start(&data, &s3);
    assert_eq!(values(&server).await, (0..500).collect::<Vec<_>>());
    assert!(!data.join("objects").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_made_offline_goes_into_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), BUCKET);
    let data = dir.path().join("data");
    let args = [
        "token",
        "create",
        "--name",
        "ops",
        "--admin",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let (ok, out, err) = kiln_with_store(&args, &s3, &credentials());
    assert!(ok, "{err}");
    let token = out.trim().to_owned();

    let server = start(&data, &s3);
    let resp = server
        .client
        .get(server.url("/api/v3/tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = server
        .client
        .get(server.url("/api/v3/tokens"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.unwrap();
    assert!(body.contains("\"ops\""), "{body}");
}

#[test]
fn object_store_flags_are_checked_and_a_store_that_refuses_us_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();

    let (ok, _, err) = kiln_env(
        &["serve", "--data-dir", data, "--object-store", "s3"],
        None,
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("--object-store s3 needs --object-store-bucket"),
        "{err}"
    );
    let (ok, _, err) = kiln_env(
        &[
            "serve",
            "--data-dir",
            data,
            "--object-store-region",
            "eu-west-1",
        ],
        None,
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("--object-store file takes no --object-store-region"),
        "{err}"
    );
    let (ok, out, err) = kiln_env(
        &[
            "serve",
            "--check",
            "--object-store",
            "s3",
            "--object-store-bucket",
            BUCKET,
            "--object-store-prefix",
            "/site-a/",
        ],
        None,
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("objects in s3://plant/site-a,"), "{out}");

    // Wrong credentials: start-up stops naming the store and S3's reason.
    let s3 = S3Server::start(dir.path(), BUCKET);
    let mut env = credentials();
    env[1].1 = "not-the-secret";
    let (ok, _, err) = kiln_with_store(&["serve", "--data-dir", data], &s3, &env);
    assert!(!ok);
    assert!(
        err.contains("cannot write to the object store s3://plant/site-a/kiln"),
        "{err}"
    );
    assert!(err.contains("403") || err.contains("Signature"), "{err}");
}

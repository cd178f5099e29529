//! Compaction: a partition persisted in several segments becomes one, in the background
//! or on request, and every answer stays the same, across `kill -9` too.

use std::path::Path;
use std::time::Duration;

use crate::cli::kiln;
use crate::persistence::{snapshot, walk};
use crate::support::{TestServer, eventually};

const T0: i64 = 1_700_000_000; // 2023-11-14T22:13:20Z

fn parquet_files(data: &Path) -> usize {
    walk(&data.join("objects/segments"))
        .iter()
        .filter(|p| p.ends_with(".parquet"))
        .count()
}

pub(crate) async fn write(server: &TestServer, body: String) {
    let (status, text) = server.write("plant", body, &[("precision", "s")]).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{text}");
}

/// Writes each body on a server of its own on `data` and stops it (a stop persists the
/// buffer: one segment per body and partition); returns a server started afresh.
pub(crate) async fn persisted_in_parts<const N: usize>(
    data: &Path,
    args: &[&str],
    bodies: [String; N],
) -> TestServer {
    for body in bodies {
        let mut server = TestServer::start(data, args);
        write(&server, body).await;
        server.terminate();
    }
    TestServer::start(data, args)
}

/// Readings of three lines over `seconds` from `from`, with `value` in every row.
fn readings(from: i64, seconds: i64, value: f64) -> String {
    (0..seconds)
        .map(|s| format!("temp,line=l{} celsius={value} {}\n", s % 3, from + s))
        .collect()
}

#[tokio::test]
async fn partitions_in_several_segments_become_one_and_answers_stay_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let background = ["--compaction-interval", "1s"];
    // One hour partition persisted twice (each stop persists the buffer); the second
    // write overwrites half the rows and adds others.
    let mut server = persisted_in_parts(
        &data,
        &background,
        [readings(T0, 600, 1.0), readings(T0 + 300, 600, 2.0)],
    )
    .await;
    assert_eq!(parquet_files(&data), 2);
    let expected = snapshot(&server).await;
    assert_eq!(expected.lines().count(), 1 + 900);

    // While it is the table's newest partition it may still be written: left alone.
    // A row in the next hour moves writing on, and the background compactor merges it.
    write(&server, readings(T0 + 3600, 1, 3.0)).await;
    // The same before, during and after the merge.
    let expected_now = snapshot(&server).await;
    assert_eq!(expected_now.lines().count(), 1 + 901);
    assert!(expected.lines().all(|l| expected_now.contains(l)));
    let compacted = eventually(Duration::from_secs(30), || async {
        server.metric("kiln_segments_compacted_total").await == 2.0
    })
    .await;
    assert!(compacted, "{}", server.metrics().await);
    assert_eq!(server.metric("kiln_compactions_total").await, 1.0);
    assert_eq!(snapshot(&server).await, expected_now);
    assert!(
        eventually(Duration::from_secs(10), || async {
            parquet_files(&data) == 1
        })
        .await,
        "replaced files not deleted: {:?}",
        walk(&data.join("objects/segments"))
    );
    let plan = server
        .query_json("plant", "EXPLAIN SELECT * FROM temp")
        .await;
    let plan = serde_json::to_string(&plan).unwrap();
    assert!(plan.contains("segments 1 of 1"), "{plan}");
    assert!(plan.contains("merged 0"), "{plan}");

    // kill -9 and restart: the catalog names the merged segment, the WAL the new row.
    server.kill9();
    server = TestServer::start(&data, &["--compaction-interval", "0s"]);
    assert_eq!(snapshot(&server).await, expected_now);
    assert_eq!(parquet_files(&data), 1);

    // On request (`kiln compact`), the newest partition too: persisted twice, merged once.
    server.terminate();
    server = TestServer::start(&data, &["--compaction-interval", "0s"]);
    write(&server, readings(T0 + 3600, 2, 4.0)).await;
    let expected = snapshot(&server).await;
    server.terminate();
    server = TestServer::start(&data, &["--compaction-interval", "0s"]);
    assert_eq!(parquet_files(&data), 3);
    let (ok, out, err) = kiln(&["compact", "--host", &server.url("")], None);
    assert!(ok, "{err}");
    assert!(out.contains("compacted 1 partition: 2 segments"), "{out}");
    assert_eq!(snapshot(&server).await, expected);
    assert_eq!(parquet_files(&data), 2);
    let (ok, out, _) = kiln(&["compact", "--host", &server.url("")], None);
    assert!(ok && out.contains("compacted 0 partitions"), "{out}");
    let plan = server
        .query_json("plant", "EXPLAIN SELECT * FROM temp")
        .await;
    let plan = serde_json::to_string(&plan).unwrap();
    assert!(
        plan.contains("segments 2 of 2") && plan.contains("merged 0"),
        "{plan}"
    );
}

/// A query streaming the old segments when compaction replaces them reads on to the end:
/// the files go only once it is done.
#[tokio::test]
async fn a_query_reading_replaced_segments_finishes_before_they_are_deleted() {
    use futures::TryStreamExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--compaction-interval", "0s"];
    // 50 lines; the first half hour, then a half hour overlapping it by a quarter.
    let lines = |from: i64, seconds: i64, value: f64| -> String {
        (0..seconds)
            .flat_map(|s| {
                (0..50).map(move |l| format!("temp,line=l{l:02} celsius={value} {}\n", from + s))
            })
            .collect()
    };
    let server = persisted_in_parts(
        &data,
        &args,
        [lines(T0, 1800, 1.0), lines(T0 + 900, 1800, 2.0)],
    )
    .await;
    assert_eq!(parquet_files(&data), 2);

    let mut client = crate::flight::flight_sql(&server, Some("plant")).await;
    let info = client
        .execute("SELECT line, time, celsius FROM temp".to_owned(), None)
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut stream = client.do_get(ticket).await.unwrap();
    let first = stream.try_next().await.unwrap().expect("a first batch");
    let mut rows = first.num_rows();

    let (ok, out, err) = kiln(&["compact", "--host", &server.url("")], None);
    assert!(
        ok && out.contains("compacted 1 partition: 2 segments"),
        "{out}{err}"
    );
    assert_eq!(
        parquet_files(&data),
        3,
        "the replaced files wait for the reader"
    );
    while let Some(batch) = stream.try_next().await.unwrap() {
        rows += batch.num_rows();
    }
    assert_eq!(
        rows,
        50 * 2700,
        "every row once, read from the replaced segments"
    );
    drop(stream);
    drop(client);
    assert!(
        eventually(Duration::from_secs(10), || async {
            parquet_files(&data) == 1
        })
        .await,
        "replaced files not deleted after the reader finished"
    );
    let n = server
        .query_json("plant", "SELECT count(*) AS n FROM temp")
        .await;
    assert_eq!(n[0]["n"], serde_json::json!(50 * 2700));
}

/// A partition larger than compaction's upload buffer (8 MiB) is merged as a stream and
/// written in parts: the same rows, field by field last write wins, and the result
/// survives `kill -9`.
#[tokio::test]
async fn a_large_partition_is_merged_as_a_stream_and_survives_kill_nine() {
    use std::collections::HashMap;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--compaction-interval", "0s"];
    // Integers that do not compress: the segments are about 10 MiB each.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 24) as i64
    };
    // Two writes of 400,000 rows, overlapping by half: the second leaves `c` out of the
    // rows it shares with the first, so theirs stays.
    let mut model: HashMap<(u32, i64), [i64; 3]> = HashMap::new();
    let mut bodies = Vec::new();
    for (from, to) in [(0, 4000), (2000, 6000)] {
        let mut body = String::new();
        for k in from..to {
            let time = T0 * 1000 + k * 100;
            for s in 0..100u32 {
                let (a, b, c) = (random(), random(), random());
                let row = model.entry((s, time)).or_insert([0; 3]);
                row[0] = a;
                row[1] = b;
                if from == 0 || k >= 4000 {
                    row[2] = c;
                    body.push_str(&format!("m,s=s{s} a={a}i,b={b}i,c={c}i {time}\n"));
                } else {
                    body.push_str(&format!("m,s=s{s} a={a}i,b={b}i {time}\n"));
                }
            }
        }
        bodies.push(body);
    }
    let totals = |i: usize| model.values().map(|r| r[i]).sum::<i64>();
    let expected = serde_json::json!([{
        "n": model.len(), "a": totals(0), "b": totals(1), "c": totals(2),
    }]);
    let summary = "SELECT count(*) AS n, sum(a) AS a, sum(b) AS b, sum(c) AS c FROM m";

    let mut server = TestServer::start(&data, &args);
    for body in &bodies {
        for chunk in body.lines().collect::<Vec<_>>().chunks(50_000) {
            let (status, text) = server
                .write("plant", chunk.join("\n"), &[("precision", "ms")])
                .await;
            assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{text}");
        }
        // A stop persists the buffer: one segment per write.
        server.terminate();
        server = TestServer::start(&data, &args);
    }
    assert_eq!(parquet_files(&data), 2);
    let rows = server.query_json("plant", summary).await;
    assert_eq!(serde_json::Value::from(rows.clone()), expected);

    let (ok, out, err) = kiln(&["compact", "--host", &server.url("")], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("compacted 1 partition: 2 segments") && out.contains("600000 rows"),
        "{out}"
    );
    let merged = server.query_json("plant", summary).await;
    assert_eq!(serde_json::Value::from(merged), expected);
    assert!(
        eventually(Duration::from_secs(10), || async {
            parquet_files(&data) == 1
        })
        .await
    );
    let files = walk(&data.join("objects/segments"));
    let file = files.iter().find(|p| p.ends_with(".parquet")).unwrap();
    assert!(file.contains("-compacted-"), "{file}");
    let size = std::fs::metadata(file).unwrap().len();
    assert!(size > 8 << 20, "{size} bytes: not past the upload buffer");

    server.kill9();
    let server = TestServer::start(&data, &args);
    let after = server.query_json("plant", summary).await;
    assert_eq!(serde_json::Value::from(after), expected);
    let per_series = server
        .query_json("plant", "SELECT count(DISTINCT s) AS series FROM m")
        .await;
    assert_eq!(per_series[0]["series"], serde_json::json!(100));
}

//! The HTTP API end to end against a real `kiln serve`.

use std::fmt::Write as _;
use std::io::Write;

use arrow::array::AsArray;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::TestServer;

const LINES: &str = "\
cpu,host=a,region=eu usage=1.5,load=3i,ok=true,note=\"fine\" 1700000000000000000
cpu,host=b,region=us usage=2.5,load=4i,ok=false,note=\"hot, very\" 1700000010000000000
cpu,host=a,region=eu usage=3.5 1700000020000000000
";

#[tokio::test]
async fn written_rows_come_back_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let sql = "SELECT host, region, usage, load, ok, note, time FROM cpu ORDER BY time";

    // json: an array of row objects keyed by column name; nulls left out.
    let rows = server.query_json("plant", sql).await;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["host"], json!("a"));
    assert_eq!(rows[0]["usage"], json!(1.5));
    assert_eq!(rows[0]["load"], json!(3));
    assert_eq!(rows[1]["ok"], json!(false));
    assert_eq!(rows[1]["note"], json!("hot, very"));
    assert_eq!(rows[0]["time"], json!("2023-11-14T22:13:20Z"));
    assert!(rows[2].get("load").is_none_or(Value::is_null));

    // jsonl: one object per line.
    let (status, body) = server.query("plant", sql, "jsonl").await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<Value> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["usage"], json!(3.5));

    // csv with a header, quoting the comma.
    let (status, body) = server.query("plant", sql, "csv").await;
    assert_eq!(status, StatusCode::OK);
    let mut reader = csv::Reader::from_reader(&body[..]);
    let headers: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        headers,
        ["host", "region", "usage", "load", "ok", "note", "time"]
    );
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), 3);
    assert_eq!(&records[1][5], "hot, very");
    assert_eq!(&records[2][3], "");

    // parquet, read back with the parquet reader.
    let (status, body) = server.query("plant", sql, "parquet").await;
    assert_eq!(status, StatusCode::OK);
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(body, 1024).unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(total, 3);
    let usage = batches[0]
        .column_by_name("usage")
        .unwrap()
        .as_primitive::<arrow::datatypes::Float64Type>();
    assert_eq!(usage.value(0), 1.5);

    // pretty: a text table.
    let (status, body) = server.query("plant", sql, "pretty").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("| host |") && text.contains("hot, very"),
        "{text}"
    );

    // Empty results are still well formed.
    let rows = server
        .query_json("plant", "SELECT * FROM cpu WHERE host = 'zzz'")
        .await;
    assert!(rows.is_empty());
    let (_, body) = server
        .query("plant", "SELECT host FROM cpu WHERE host = 'zzz'", "csv")
        .await;
    assert_eq!(&body[..], b"host\n");

    // Unknown format.
    let (status, _) = server.query("plant", sql, "xml").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A result of many megabytes is sent as a stream of chunks while it is encoded: every
/// row arrives, tags (dictionary-encoded) escaped as JSON strings.
#[tokio::test]
async fn a_large_result_streams_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let mut lines = String::new();
    for i in 0..30_000u64 {
        let host = format!("h\"{}", i % 7);
        writeln!(
            lines,
            "m,host={host},site=plant\\ {} v={i}i,note=\"n\\\"{i}\" {}",
            i % 3,
            1_700_000_000_000_000_000 + i * 1_000_000_000
        )
        .unwrap();
    }
    server.write_ok("big", &lines).await;
    let sql = "SELECT host, site, v, note, time FROM m ORDER BY time";

    let rows = server.query_json("big", sql).await;
    assert_eq!(rows.len(), 30_000);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["host"], json!(format!("h\"{}", i % 7)), "row {i}");
        assert_eq!(row["site"], json!(format!("plant {}", i % 3)), "row {i}");
        assert_eq!(row["v"], json!(i), "row {i}");
        assert_eq!(row["note"], json!(format!("n\"{i}")), "row {i}");
    }

    let (status, body) = server.query("big", sql, "jsonl").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.len() > 1 << 20, "{} bytes", body.len());
    let last: Value = serde_json::from_str(
        std::str::from_utf8(&body)
            .unwrap()
            .lines()
            .nth(29_999)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["v"], json!(29_999));

    let (status, body) = server.query("big", sql, "csv").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        csv::Reader::from_reader(&body[..]).records().count(),
        30_000
    );
}

#[tokio::test]
async fn partial_writes_keep_valid_lines_and_list_rejected_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let body = "m,t=a v=1 1\nm,t=b v= 2\nm,t=c v=3 3\n\nm,t=d v=\"str\" 4\n";
    let (status, text) = server.write("db", body.to_owned(), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_str(&text).unwrap();
    let rejected: Vec<(u64, u64)> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["line_number"].as_u64().unwrap(),
                l["column"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rejected, vec![(2, 9), (5, 7)]);
    assert_eq!(v["data"][0]["original_line"], json!("m,t=b v= 2"));
    assert!(
        v["data"][1]["error_message"]
            .as_str()
            .unwrap()
            .contains("\"v\""),
        "{text}"
    );
    let rows = server.query_json("db", "SELECT t FROM m ORDER BY t").await;
    let tags: Vec<_> = rows
        .iter()
        .map(|r| r["t"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tags, ["a", "c"]);
}

#[tokio::test]
async fn backslashes_unescape_and_overlong_names_are_refused_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let long = "x".repeat(65_536);
    let body = format!(
        "my\\\\wea\\\\ther,k=\\\\wea\\\\ther v=1 1\n\
         with\\\\\\ backslash v=2 2\n\
         m,t={long} v=3 3\n\
         m,t=ok,f\\\\k=a\\\\ v=4 4\n"
    );
    let (status, text) = server.write("db", body, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let rejected = v["data"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{text}");
    assert_eq!(rejected[0]["line_number"], json!(3));
    assert_eq!(rejected[0]["column"], json!(5));
    assert_eq!(
        rejected[0]["error_message"],
        json!("tag value is 65536 bytes long; the limit is 65535 bytes")
    );

    let rows = server
        .query_json("db", r#"SELECT k, v FROM "my\wea\ther""#)
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["k"], json!(r"\wea\ther"));
    let rows = server
        .query_json("db", r#"SELECT v FROM "with\ backslash""#)
        .await;
    assert_eq!(rows[0]["v"], json!(2.0));
    let rows = server.query_json("db", r#"SELECT t, "f\k" FROM m"#).await;
    assert_eq!(rows.len(), 1, "only the valid line of m was written");
    assert_eq!(rows[0]["t"], json!("ok"));
    assert_eq!(rows[0][r"f\k"], json!(r"a\"));
}

#[tokio::test]
async fn reject_all_writes_nothing_from_a_request_with_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("db", "m,t=seed v=0 1").await;
    let (status, text) = server
        .write(
            "db",
            "m,t=x v=1 2\nm,t=y v=oops 3\n".to_owned(),
            &[("accept_partial", "false")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text.contains("nothing was written") && text.contains("line 2"),
        "{text}"
    );
    let rows = server.query_json("db", "SELECT count(*) AS n FROM m").await;
    assert_eq!(rows[0]["n"], json!(1));
    // A request whose lines are all valid is written whole.
    let (status, _) = server
        .write(
            "db",
            "m,t=x v=1 2\nm,t=y v=2 3\n".to_owned(),
            &[("accept_partial", "false")],
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn type_conflict_names_line_and_field_across_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("db", "sensor,line=1 temp=20.5 1").await;
    let (status, text) = server
        .write(
            "db",
            "sensor,line=1 ok=1i 2\nsensor,line=1 temp=21i 3".to_owned(),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["data"][0]["line_number"], json!(2));
    let msg = v["data"][0]["error_message"].as_str().unwrap();
    assert!(
        msg.contains("\"temp\"") && msg.contains("float") && msg.contains("integer"),
        "{msg}"
    );
}

#[tokio::test]
async fn oversized_and_compressed_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--max-request-bytes", "2000"]);
    let big = "m v=1 1\n".repeat(400);
    let (status, _) = server.write("db", big.clone(), &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let gzip = |text: &str| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap()
    };
    // A small gzip body that inflates past the limit is refused too.
    let resp = server
        .client
        .post(server.url("/api/v3/write_lp?db=db"))
        .header("Content-Encoding", "gzip")
        .body(gzip(&big))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let resp = server
        .client
        .post(server.url("/api/v3/write_lp?db=db"))
        .header("Content-Encoding", "gzip")
        .body(gzip("m v=1 1\nm v=2 2\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let rows = server.query_json("db", "SELECT count(*) AS n FROM m").await;
    assert_eq!(rows[0]["n"], json!(2));

    // Not UTF-8: the error names line and column.
    let (status, text) = server
        .write("db", b"m v=1 1\nm,t=\xff v=1 2\n".to_vec(), &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("line 2, column 5"), "{text}");
}

#[tokio::test]
async fn unknown_database_and_table_are_404_and_bad_sql_is_400() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("db", "m v=1 1").await;
    let (status, body) = server.query("nope", "SELECT 1", "json").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        String::from_utf8_lossy(&body).contains("database \\\"nope\\\" not found"),
        "{body:?}"
    );
    let (status, body) = server.query("db", "SELECT * FROM missing", "json").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        String::from_utf8_lossy(&body).contains("missing"),
        "{body:?}"
    );
    let (status, _) = server.query("db", "SELEC 1", "json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = server
        .query("db", "SELECT nosuchcolumn FROM m", "json")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("nosuchcolumn"));
    // The server keeps serving.
    let rows = server.query_json("db", "SELECT v FROM m").await;
    assert_eq!(rows.len(), 1);
}

#[tokio::test]
async fn influxdb_v1_and_v2_write_paths_and_sql_features() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    // InfluxDB v2 path, as Telegraf and influxdb-client send it.
    let resp = server
        .client
        .post(server.url("/api/v2/write?org=acme&bucket=telemetry&precision=s"))
        .header("Authorization", "Token any")
        .body("cpu,host=a usage=1 1700000000\ncpu,host=b usage=2 1700000001")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // InfluxDB v1 path.
    let resp = server
        .client
        .post(server.url("/write?db=telemetry&precision=ms"))
        .body("cpu,host=c usage=3 1700000002000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // A line without a timestamp gets the server's time.
    server.write_ok("telemetry", "cpu,host=d usage=4").await;

    let rows = server
        .query_json(
            "telemetry",
            "SELECT host, time FROM cpu WHERE time < '2024-01-01T00:00:00' ORDER BY host",
        )
        .await;
    let times: Vec<_> = rows
        .iter()
        .map(|r| r["time"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        times,
        [
            "2023-11-14T22:13:20Z",
            "2023-11-14T22:13:21Z",
            "2023-11-14T22:13:22Z"
        ]
    );
    let now = server
        .query_json(
            "telemetry",
            "SELECT count(*) AS n FROM cpu WHERE time > now() - INTERVAL '1 hour'",
        )
        .await;
    assert_eq!(now[0]["n"], json!(1));

    // time_bucket as TimescaleDB spells it, next to date_bin.
    let rows = server
        .query_json(
            "telemetry",
            "SELECT time_bucket('1 minute', time) AS b1, date_bin(INTERVAL '1 minute', time) AS b2, \
             time_bucket(INTERVAL '7 days', time) AS week FROM cpu WHERE host = 'a'",
        )
        .await;
    assert_eq!(rows[0]["b1"], json!("2023-11-14T22:13:00Z"));
    assert_eq!(rows[0]["b1"], rows[0]["b2"]);
    // Weekly buckets start on Monday (2023-11-13), TimescaleDB's default origin.
    assert_eq!(rows[0]["week"], json!("2023-11-13T00:00:00Z"));

    // SHOW TABLES and information_schema.
    let rows = server.query_json("telemetry", "SHOW TABLES").await;
    assert!(
        rows.iter()
            .any(|r| r["table_name"] == json!("cpu") && r["table_schema"] == json!("telemetry"))
    );
    let cols = server
        .query_json(
            "telemetry",
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'cpu' ORDER BY ordinal_position",
        )
        .await;
    let names: Vec<_> = cols
        .iter()
        .map(|r| r["column_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["time", "host", "usage"]);

    // POST with a JSON body.
    let resp = server
        .client
        .post(server.url("/api/v3/query_sql"))
        .json(&json!({"db": "telemetry", "q": "SELECT count(*) AS n FROM cpu", "format": "json"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v[0]["n"], json!(4));
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    for path in ["/health", "/ready"] {
        let resp = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    server.write_ok("db", "m v=1 1\nm v=2 2").await;
    let _ = server.write("db", "bad".to_owned(), &[]).await;
    let _ = server.query_json("db", "SELECT * FROM m").await;
    assert_eq!(server.metric("kiln_ingest_rows_total").await, 2.0);
    assert_eq!(server.metric("kiln_ingest_lines_total").await, 2.0);
    assert_eq!(server.metric("kiln_ingest_rejected_lines_total").await, 1.0);
    assert!(server.metric("kiln_wal_fsync_seconds_count").await >= 1.0);
    assert!(server.metric("kiln_query_seconds_count").await >= 1.0);
    assert!(server.metric("kiln_buffer_bytes").await > 0.0);
}

#[tokio::test]
async fn wide_sparse_tables_keep_each_column_typed() {
    // A wide, sparse table: each line sets a different field.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let body: String = (0..50)
        .map(|i| format!("wide,k=v f{i}={i}i {i}\n"))
        .collect();
    server.write_ok("db", &body).await;
    let rows = server
        .query_json(
            "db",
            "SELECT f7, f49 FROM wide WHERE f7 IS NOT NULL OR f49 IS NOT NULL ORDER BY time",
        )
        .await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["f7"], json!(7));
    assert_eq!(rows[1]["f49"], json!(49));
}

/// A Grafana time-series panel's query: buckets of its interval over its time range, one
/// series per host, gaps carried forward. Each host must come back as a regular series.
#[tokio::test]
async fn gap_filled_dashboard_query_returns_regular_series() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let start = 1_709_287_200i64; // 2024-03-01T10:00:00Z
    let minute_has_data = |host: i64, m: i64| m >= host && (m * (host + 3)) % 7 != 0;
    let mut lines = String::new();
    for host in 0..3 {
        for m in 0..30 {
            if minute_has_data(host, m) {
                for s in [0, 20, 40] {
                    let usage = (host * 100 + m) as f64 + s as f64 / 100.0;
                    let t = (start + m * 60 + s) * 1_000_000_000;
                    lines.push_str(&format!("cpu,host=h{host} usage={usage} {t}\n"));
                }
            }
        }
    }
    server.write_ok("plant", &lines).await;

    let sql = "SELECT time_bucket_gapfill('60s', time) AS \"time\", host, locf(avg(usage)) AS usage \
               FROM cpu WHERE time BETWEEN '2024-03-01T10:00:00Z' AND '2024-03-01T10:29:59Z' \
               GROUP BY 1, host ORDER BY host, 1";
    let rows = server.query_json("plant", sql).await;
    assert_eq!(rows.len(), 3 * 30, "30 one-minute buckets per host");
    for host in 0..3 {
        let series: Vec<_> = rows
            .iter()
            .filter(|r| r["host"] == json!(format!("h{host}")))
            .collect();
        let mut carried = None;
        for (m, row) in series.iter().enumerate() {
            let m = m as i64;
            let expected_time = chrono::DateTime::from_timestamp(start + m * 60, 0)
                .unwrap()
                .naive_utc()
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            assert_eq!(row["time"], json!(expected_time), "host h{host} minute {m}");
            if minute_has_data(host, m) {
                carried = Some((host * 100 + m) as f64 + 0.2);
            }
            let got = row.get("usage").and_then(Value::as_f64);
            match (got, carried) {
                (Some(g), Some(c)) => assert!((g - c).abs() < 1e-9, "h{host} m{m}: {g} != {c}"),
                (None, None) => {}
                other => panic!("h{host} minute {m}: usage {other:?}"),
            }
        }
    }
}

/// `tz` on the query API: buckets start at local midnight (23-hour day at the change to
/// summer time) and timestamps come back in local time; an unknown zone is a 400.
#[tokio::test]
async fn tz_buckets_and_shows_local_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let start = 1_711_756_800i64; // 2024-03-30T00:00:00Z
    let lines: String = (0..72)
        .step_by(3)
        .map(|h| format!("meter kwh={h} {}\n", (start + h * 3600) * 1_000_000_000))
        .collect();
    server.write_ok("plant", &lines).await;
    let sql = "SELECT time_bucket('1 day', time) AS day, count(*) AS n FROM meter \
               GROUP BY 1 ORDER BY 1";
    let query = |tz: &'static str| {
        server
            .client
            .get(server.url("/api/v3/query_sql"))
            .query(&[("db", "plant"), ("q", sql), ("tz", tz)])
            .send()
    };
    let resp = query("Europe/Berlin").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let rows: Vec<Value> = resp.json().await.unwrap();
    let days: Vec<_> = rows.iter().map(|r| r["day"].as_str().unwrap()).collect();
    assert_eq!(
        days,
        [
            "2024-03-30T00:00:00+01:00",
            "2024-03-31T00:00:00+01:00",
            "2024-04-01T00:00:00+02:00"
        ]
    );
    // Without tz: UTC days, shown in UTC.
    let rows = server.query_json("plant", sql).await;
    assert_eq!(rows[0]["day"], json!("2024-03-30T00:00:00Z"));

    let resp = query("Mars/Olympus").await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = resp.text().await.unwrap();
    assert!(body.contains("unknown time zone"), "{body}");
}

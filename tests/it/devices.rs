//! Device health end to end: the series inventory and its statuses, device attributes
//! joined with readings, per-table data quality, all surviving `kill -9`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use serde_json::{Map, Value, json};

use crate::cli::kiln;
use crate::support::TestServer;

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

async fn write(server: &TestServer, hosts: &[&str]) {
    let now = now_nanos();
    let body: String = hosts
        .iter()
        .map(|h| format!("machine,host={h} temp=20 {now}\n"))
        .collect();
    server.write_ok("plant", &body).await;
}

async fn statuses(server: &TestServer) -> Vec<(String, String)> {
    server
        .query_json(
            "plant",
            "SELECT series, status FROM system.series WHERE table_name = 'machine' ORDER BY series",
        )
        .await
        .iter()
        .map(|r| {
            (
                r["series"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn series_go_stale_and_offline_as_writes_stop_and_come_back_when_they_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    write(&server, &["m1", "m2"]).await;
    let resp = server
        .client
        .put(server.url("/api/v3/series/staleness"))
        .json(&json!({"database": "plant", "table": "machine", "stale_after": "2s", "offline_after": "4s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        statuses(&server).await,
        pairs(&[("host=m1", "online"), ("host=m2", "online")])
    );
    let rows = server
        .query_json(
            "plant",
            "SELECT rows_last_minute, rows_last_hour, first_seen <= last_seen AS ordered \
             FROM system.series WHERE series = 'host=m1'",
        )
        .await;
    assert_eq!(rows[0]["rows_last_minute"], 1);
    assert_eq!(rows[0]["rows_last_hour"], 1);
    assert_eq!(rows[0]["ordered"], true);

    // m1 keeps sending; m2 goes stale, then offline.
    let mut seen_stale = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut ok = false;
    while tokio::time::Instant::now() < deadline {
        write(&server, &["m1"]).await;
        let s = statuses(&server).await;
        assert_eq!(s[0], ("host=m1".to_owned(), "online".to_owned()));
        seen_stale |= s[1].1 == "stale";
        if s[1].1 == "offline" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok && seen_stale, "m2 went stale, then offline");
    write(&server, &["m2"]).await;
    assert_eq!(
        statuses(&server).await,
        pairs(&[("host=m1", "online"), ("host=m2", "online")])
    );

    // After kill -9 the inventory is rebuilt (first seen kept) and the staleness holds.
    let before = server
        .query_json(
            "plant",
            "SELECT series, first_seen FROM system.series ORDER BY series",
        )
        .await;
    server.kill9();
    let server = TestServer::start(&data, &[]);
    let after = server
        .query_json(
            "plant",
            "SELECT series, first_seen FROM system.series ORDER BY series",
        )
        .await;
    assert_eq!(after, before);
    let resp = server
        .client
        .put(server.url("/api/v3/series/staleness"))
        .json(&json!({"database": "plant", "table": "nowhere", "stale_after": "2s", "offline_after": "1s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn device_attributes_join_readings_and_data_quality_counts_what_writes_looked_like() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &[]);
    server
        .write_ok(
            "plant",
            "machine,host=m1 temp=20 2000\nmachine,host=m2 temp=30 2000\n",
        )
        .await;
    for (host, attrs) in [
        ("m1", vec!["location=hall-2", "model=X200"]),
        ("m2", vec!["location=hall-5", "firmware=4.1"]),
    ] {
        let tag = format!("host={host}");
        let mut args = vec![
            "device",
            "set",
            "--host",
            &server.base,
            "-d",
            "plant",
            "--tag",
            &tag,
        ];
        for a in &attrs {
            args.extend(["--attr", a]);
        }
        let (ok, out, err) = kiln(&args, None);
        assert!(ok, "{out}{err}");
    }
    let (ok, out, err) = kiln(
        &[
            "device",
            "set",
            "--host",
            &server.base,
            "-d",
            "plant",
            "--tag",
            "host=m2",
            "--remove",
            "firmware",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "host=m2: location=hall-5");
    let rows = server
        .query_json(
            "plant",
            "SELECT m.host, d.location, d.model, avg(m.temp) AS temp \
             FROM machine m JOIN system.devices d ON d.tag = 'host' AND d.value = m.host \
             GROUP BY 1, 2, 3 ORDER BY 1",
        )
        .await;
    let expected: Vec<Map<String, Value>> = [
        json!({"host": "m1", "location": "hall-2", "model": "X200", "temp": 20.0}),
        json!({"host": "m2", "location": "hall-5", "temp": 30.0}),
    ]
    .into_iter()
    .map(|v| v.as_object().unwrap().clone())
    .collect();
    assert_eq!(rows, expected);
    // Attribute columns are those some device has: `firmware` was removed from all.
    let (status, _) = server
        .query("plant", "SELECT firmware FROM system.devices", "json")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A rejected line (a type conflict) and a row older than its series' latest.
    let (status, _) = server
        .write(
            "plant",
            "machine,host=m1 temp=\"hot\" 3000\nmachine,host=m1 temp=21 1000\n".to_owned(),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let q = server
        .query_json("plant", "SELECT * FROM system.data_quality")
        .await;
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["table_name"], "machine");
    assert_eq!(q[0]["rows"], 3);
    assert_eq!(q[0]["rejected_lines"], 1);
    assert_eq!(q[0]["out_of_order_rows"], 1);
    assert_eq!(q[0]["late_rows"], 0);

    // Attributes are catalog events: they survive kill -9.
    server.kill9();
    let server = TestServer::start(&data, &[]);
    let (ok, out, _) = kiln(&["device", "list", "--host", &server.base], None);
    assert!(ok);
    assert!(
        out.contains("plant\thost=m1\tlocation=hall-2, model=X200"),
        "{out}"
    );
    let resp = server
        .client
        .put(server.url("/api/v3/devices"))
        .json(
            &json!({"database": "nowhere", "tag": "host", "value": "m1", "attributes": {"a": "b"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

//! MQTT ingest against a real Mosquitto broker: nothing lost or doubled through `kill -9`
//! while devices publish, JSON with tags and the table from topic levels over MQTT 5, a
//! poison message dead-lettered among good ones, the status endpoint and metrics, and TLS
//! with a client certificate and a password to the broker.

use std::path::Path;
use std::time::Duration;

use crate::support::mosquitto::{Mosquitto, Subscriber, add_user, free_port, publish, publish_as};
use crate::support::{TestServer, eventually};

/// `GET /api/v3/mqtt`.
async fn mqtt_status(server: &TestServer) -> serde_json::Value {
    server.get_json("/api/v3/mqtt").await
}

/// Starts Kiln with an MQTT source and waits until it is connected and subscribed (a
/// broker keeps messages only for subscriptions it has).
async fn start_connected(data: &Path, args: &[&str]) -> TestServer {
    let server = TestServer::start(data, args);
    assert!(
        eventually(Duration::from_secs(10), || async {
            mqtt_status(&server).await["sources"][0]["connected"] == true
        })
        .await,
        "{}",
        mqtt_status(&server).await
    );
    server
}

async fn rows(server: &TestServer, sql: &str) -> Vec<serde_json::Value> {
    let (status, body) = server.query("plant", sql, "json").await;
    if !status.is_success() {
        return Vec::new();
    }
    serde_json::from_slice(&body).unwrap()
}

async fn count(server: &TestServer, table: &str) -> u64 {
    rows(server, &format!("SELECT count(*) AS n FROM {table}"))
        .await
        .first()
        .and_then(|r| r["n"].as_u64())
        .unwrap_or(0)
}

/// Each message is one reading with its own time: a message delivered again after a
/// crash (written, not yet acknowledged) writes the same row, which collapses with the
/// first. So every sequence number must be there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_devices_publish_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let data = dir.path().join("kiln");
    let url = broker.url();
    let args = [
        "--mqtt-broker",
        url.as_str(),
        "--mqtt-topics",
        "plant/#",
        "--mqtt-database",
        "plant",
        "--mqtt-topic-template",
        "plant/{site}/{machine}",
    ];
    let mut server = start_connected(&data, &args).await;
    const TOTAL: u64 = 6000;
    let port = broker.port;
    let publishing = tokio::spawn(async move {
        for chunk in 0..TOTAL / 100 {
            let messages = (chunk * 100..(chunk + 1) * 100)
                .map(|i| {
                    let machine = format!("press-{}", i % 7);
                    let time = 1_700_000_000_000_000_000 + i as i64 * 1_000_000;
                    (
                        format!("plant/north/{machine}"),
                        format!("reading seq={i}i,temp={}.5 {time}", i % 90).into_bytes(),
                    )
                })
                .collect();
            publish(port, messages).await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });

    for target in [1000, 3000] {
        assert!(
            eventually(Duration::from_secs(60), || async {
                count(&server, "reading").await >= target
            })
            .await,
            "fewer than {target} rows arrived"
        );
        server.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server = TestServer::start(&data, &args);
    }
    publishing.await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            count(&server, "reading").await >= TOTAL
        })
        .await,
        "not every message arrived: {} of {TOTAL}",
        count(&server, "reading").await
    );
    // A few more batches' time for a duplicate to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rows(
        &server,
        "SELECT count(*) AS n, count(DISTINCT seq) AS d, sum(seq) AS s, min(seq) AS lo, \
         max(seq) AS hi, count(DISTINCT machine) AS machines FROM reading WHERE site = 'north'",
    )
    .await;
    let r = &got[0];
    assert_eq!(r["n"], TOTAL, "{r}");
    assert_eq!(r["d"], TOTAL, "{r}");
    assert_eq!(r["s"], TOTAL * (TOTAL - 1) / 2, "{r}");
    assert_eq!(
        (r["lo"].as_u64(), r["hi"].as_u64()),
        (Some(0), Some(TOTAL - 1))
    );
    assert_eq!(r["machines"], 7, "{r}");
    // The last process saw the session the broker kept for it.
    let status = mqtt_status(&server).await;
    assert_eq!(status["sources"][0]["connected"], true, "{status}");
    assert_eq!(status["sources"][0]["rejected"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_over_mqtt5_takes_tags_and_table_from_the_topic_and_sets_poison_aside() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let dead = Subscriber::start(broker.port, "kiln/dead").await;
    let url = broker.url();
    let mapping = r#"{"table": "readings", "fields": {"temp": "$.t", "rpm": {"path": "$.rpm", "type": "integer"}}, "time": "$.ts", "time_unit": "ms"}"#;
    let server = start_connected(
        &dir.path().join("kiln"),
        &[
            "--mqtt-broker",
            &url,
            "--mqtt-protocol",
            "5",
            "--mqtt-topics",
            "plant/+/+/+,plant/+/+",
            "--mqtt-database",
            "plant",
            "--mqtt-client-id",
            "kiln-json",
            "--mqtt-format",
            "json",
            "--mqtt-json-mapping",
            mapping,
            "--mqtt-topic-template",
            "plant/{site}/{table}/{machine}",
            "--mqtt-dead-letter-topic",
            "kiln/dead",
        ],
    )
    .await;
    let m = |topic: &str, body: &str| (topic.to_string(), body.as_bytes().to_vec());
    publish(
        broker.port,
        vec![
            m(
                "plant/north/presses/p1",
                r#"{"t": 81.5, "rpm": 1450, "ts": 1700000000000}"#,
            ),
            m("plant/north/presses/p3", r#"{"t": 80.0, "rpm": "#),
            m(
                "plant/north/presses/p2",
                r#"{"t": 79.25, "rpm": 1500, "ts": 1700000000000}"#,
            ),
            m("plant/north/presses", r#"{"t": 1, "ts": 1700000000000}"#),
            m(
                "plant/south/boilers/b1",
                r#"{"t": 140.5, "ts": 1700000001000, "ignored": [1, 2]}"#,
            ),
        ],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            mqtt_status(&server).await["sources"][0]["messages"] == 5
        })
        .await,
        "{}",
        mqtt_status(&server).await
    );
    let presses = rows(
        &server,
        "SELECT site, machine, temp, rpm FROM presses ORDER BY machine",
    )
    .await;
    assert_eq!(
        serde_json::Value::from(presses),
        serde_json::json!([
            {"site": "north", "machine": "p1", "temp": 81.5, "rpm": 1450},
            {"site": "north", "machine": "p2", "temp": 79.25, "rpm": 1500},
        ])
    );
    let boilers = rows(&server, "SELECT site, machine, temp, time FROM boilers").await;
    assert_eq!(
        serde_json::Value::from(boilers),
        serde_json::json!([
            {"site": "south", "machine": "b1", "temp": 140.5, "time": "2023-11-14T22:13:21Z"},
        ])
    );

    // The two bad messages: counted, reported, and republished unchanged.
    let status = mqtt_status(&server).await;
    let s = &status["sources"][0];
    assert_eq!(
        (&s["rows"], &s["rejected"], &s["dead_lettered"]),
        (&3.into(), &2.into(), &2.into()),
        "{status}"
    );
    let last = s["last_error"]["message"].as_str().unwrap_or_default();
    assert!(
        last.contains("\"plant/north/presses\"") && last.contains("does not fit"),
        "{status}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            dead.received.lock().unwrap().len() == 2
        })
        .await
    );
    let dead_letters = dead.received.lock().unwrap().clone();
    assert_eq!(
        dead_letters,
        [
            m("kiln/dead", r#"{"t": 80.0, "rpm": "#),
            m("kiln/dead", r#"{"t": 1, "ts": 1700000000000}"#)
        ]
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("kiln_mqtt_rows_total{client_id=\"kiln-json\"} 3")
            && metrics.contains("kiln_mqtt_rejected_total{client_id=\"kiln-json\"} 2")
            && metrics.contains("kiln_mqtt_connected{client_id=\"kiln-json\"} 1"),
        "{metrics}"
    );

    // The source keeps serving after the poison.
    publish(
        broker.port,
        vec![m(
            "plant/north/presses/p1",
            r#"{"t": 82.0, "rpm": 1460, "ts": 1700000002000}"#,
        )],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            count(&server, "presses").await == 3
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_and_a_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::tls::ca("plant CA");
    let (cert, key) = crate::tls::leaf(&ca, &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = crate::tls::leaf(&ca, &["kiln"]);
    let ca_path = crate::tls::write(dir.path(), "ca.pem", &ca.pem);
    let cert_path = crate::tls::write(dir.path(), "broker.pem", &cert);
    let key_path = crate::tls::write(dir.path(), "broker.key", &key);
    let client_cert_path = crate::tls::write(dir.path(), "kiln.pem", &client_cert);
    let client_key_path = crate::tls::write(dir.path(), "kiln.key", &client_key);
    let password_file = crate::tls::write(dir.path(), "kiln-password", "s3cret\n");
    let passwd = dir.path().join("passwd");
    add_user(&passwd, "kiln", "s3cret");
    add_user(&passwd, "gateway", "gw-pass");
    let tls_port = free_port();
    let broker = Mosquitto::start_with(
        dir.path(),
        &format!("allow_anonymous false\npassword_file {}", passwd.display()),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true",
            ca_path.display(),
            cert_path.display(),
            key_path.display()
        ),
    );
    broker.wait_listening(tls_port);
    let url = format!("mqtts://localhost:{tls_port}");
    let server = start_connected(
        &dir.path().join("kiln"),
        &[
            "--mqtt-broker",
            &url,
            "--mqtt-topics",
            "lines/#",
            "--mqtt-database",
            "plant",
            "--mqtt-ca",
            ca_path.to_str().unwrap(),
            "--mqtt-cert",
            client_cert_path.to_str().unwrap(),
            "--mqtt-key",
            client_key_path.to_str().unwrap(),
            "--mqtt-username",
            "kiln",
            "--mqtt-password-file",
            password_file.to_str().unwrap(),
        ],
    )
    .await;
    publish_as(
        broker.port,
        Some(("gateway", "gw-pass")),
        vec![(
            "lines/1".into(),
            b"speed,line=1 value=2.5 1700000000000000000".to_vec(),
        )],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            count(&server, "speed").await == 1
        })
        .await
    );
}

/// A wrong password keeps the source out; the status says so and why, and the server
/// serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    add_user(&passwd, "kiln", "right");
    let broker = Mosquitto::start_with(
        dir.path(),
        &format!("allow_anonymous false\npassword_file {}", passwd.display()),
        "",
    );
    let password_file = crate::tls::write(dir.path(), "kiln-password", "wrong");
    let url = broker.url();
    let server = TestServer::start(
        &dir.path().join("kiln"),
        &[
            "--mqtt-broker",
            &url,
            "--mqtt-topics",
            "t",
            "--mqtt-database",
            "plant",
            "--mqtt-username",
            "kiln",
            "--mqtt-password-file",
            password_file.to_str().unwrap(),
        ],
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            mqtt_status(&server).await["sources"][0]["last_error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("connection to"))
        })
        .await,
        "{}",
        mqtt_status(&server).await
    );
    assert_eq!(mqtt_status(&server).await["sources"][0]["connected"], false);
    server.write_ok("plant", "t v=1 1").await;
}

/// Sparkplug B end to end with payloads built here (the interop suite drives pysparkplug):
/// births, aliased data, and an unknown alias answered with a rebirth request on NCMD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_b_births_data_and_a_rebirth_request() {
    use kiln_proto::sparkplug::{DataType, Metric, Payload, Value};
    use prost::Message as _;

    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let commands = Subscriber::start(broker.port, "spBv1.0/plant/NCMD/+").await;
    let url = broker.url();
    let server = start_connected(
        &dir.path().join("kiln"),
        &[
            "--mqtt-broker",
            &url,
            "--mqtt-topics",
            "spBv1.0/#",
            "--mqtt-database",
            "plant",
            "--mqtt-format",
            "sparkplug_b",
        ],
    )
    .await;
    let metric =
        |name: Option<&str>, alias: u64, datatype: Option<DataType>, value: Value| Metric {
            name: name.map(str::to_string),
            alias: Some(alias),
            datatype: datatype.map(|d| d as u32),
            value: Some(value),
            ..Metric::default()
        };
    let body = |seq: Option<u64>, ms: u64, metrics: Vec<Metric>| {
        Payload {
            timestamp: Some(ms),
            metrics,
            seq,
            ..Payload::default()
        }
        .encode_to_vec()
    };
    let t0 = 1_700_000_000_000;
    publish(
        broker.port,
        vec![
            (
                "spBv1.0/plant/NBIRTH/gw1".into(),
                body(
                    Some(0),
                    t0,
                    vec![metric(
                        Some("bdSeq"),
                        0,
                        Some(DataType::Int64),
                        Value::Long(3),
                    )],
                ),
            ),
            (
                "spBv1.0/plant/DBIRTH/gw1/press4".into(),
                body(
                    Some(1),
                    t0 + 1,
                    vec![
                        metric(
                            Some("temp"),
                            10,
                            Some(DataType::Double),
                            Value::Double(20.5),
                        ),
                        metric(
                            Some("running"),
                            11,
                            Some(DataType::Boolean),
                            Value::Boolean(true),
                        ),
                    ],
                ),
            ),
            (
                "spBv1.0/plant/DDATA/gw1/press4".into(),
                body(
                    Some(2),
                    t0 + 2,
                    vec![metric(None, 10, None, Value::Double(21.25))],
                ),
            ),
            (
                "spBv1.0/plant/DDATA/gw1/press4".into(),
                body(
                    Some(3),
                    t0 + 3,
                    vec![metric(None, 77, None, Value::Double(1.0))],
                ),
            ),
        ],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            !commands.received.lock().unwrap().is_empty()
        })
        .await,
        "no rebirth request; {}",
        mqtt_status(&server).await
    );
    let (topic, request) = commands.received.lock().unwrap()[0].clone();
    assert_eq!(topic, "spBv1.0/plant/NCMD/gw1");
    let request = Payload::decode(request.as_slice()).unwrap();
    assert_eq!(
        request.metrics[0].name.as_deref(),
        Some("Node Control/Rebirth")
    );
    assert_eq!(request.metrics[0].value, Some(Value::Boolean(true)));

    let data = rows(
        &server,
        "SELECT \"group\", edge_node, device, temp, running FROM sparkplug ORDER BY time",
    )
    .await;
    assert_eq!(
        serde_json::Value::from(data),
        serde_json::json!([
            {"group": "plant", "edge_node": "gw1", "device": "press4", "temp": 20.5, "running": true},
            {"group": "plant", "edge_node": "gw1", "device": "press4", "temp": 21.25},
        ])
    );
    let status = rows(
        &server,
        "SELECT device, online, bd_seq FROM sparkplug_status ORDER BY time",
    )
    .await;
    assert_eq!(
        serde_json::Value::from(status),
        serde_json::json!([{"online": true, "bd_seq": 3}, {"device": "press4", "online": true}])
    );
    // Births and deaths reach the device inventory.
    let inventory = rows(
        &server,
        "SELECT tag, value, sparkplug_online, sparkplug_group, sparkplug_edge_node \
         FROM system.devices ORDER BY tag",
    )
    .await;
    assert_eq!(
        serde_json::Value::from(inventory),
        serde_json::json!([
            {"tag": "device", "value": "press4", "sparkplug_online": "true", "sparkplug_group": "plant", "sparkplug_edge_node": "gw1"},
            {"tag": "edge_node", "value": "gw1", "sparkplug_online": "true", "sparkplug_group": "plant"},
        ])
    );
    let s = &mqtt_status(&server).await["sources"][0];
    assert_eq!(
        (&s["rejected"], &s["rebirth_requests"]),
        (&1.into(), &1.into()),
        "{s}"
    );
    assert!(
        s["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("alias 77 is not defined by the birth")),
        "{s}"
    );
}

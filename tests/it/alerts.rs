//! Alert rules end to end: a real server evaluates rules and notifies a webhook receiver
//! run by the test; state survives `kill -9`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::cli::kiln;
use crate::support::{TestServer, eventually};

/// A webhook receiver: records what it takes; answers 503 while `down`.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        use std::sync::atomic::Ordering;
        let receiver = Self::default();
        let r = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let r = r.clone();
                async move {
                    if r.down.load(Ordering::SeqCst) {
                        r.refused.fetch_add(1, Ordering::SeqCst);
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let value: Value = serde_json::from_slice(&body).expect("JSON body");
                    assert_eq!(
                        headers["x-kiln-signature"].to_str().unwrap(),
                        signature(&body),
                        "the body's HMAC"
                    );
                    r.received.lock().push((headers, value));
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    /// (status, host label, key) of every message so far.
    fn messages(&self) -> Vec<(String, String, String)> {
        self.received
            .lock()
            .iter()
            .map(|(headers, v)| {
                let key = v["key"].as_str().unwrap().to_owned();
                assert_eq!(headers["x-kiln-idempotency-key"].to_str().unwrap(), key);
                (
                    v["status"].as_str().unwrap().to_owned(),
                    v["labels"]["host"].as_str().unwrap_or_default().to_owned(),
                    key,
                )
            })
            .collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<(String, String, String)> {
        let ok = eventually(Duration::from_secs(30), || async {
            self.received.lock().len() >= n
        })
        .await;
        assert!(
            ok,
            "the receiver got {:?}, not {n} messages",
            self.messages()
        );
        self.messages()
    }
}

const SECRET: &str = "webhook-secret";

fn signature(body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn start(dir: &std::path::Path, webhook: &str) -> TestServer {
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, SECRET).unwrap();
    TestServer::start(
        &dir.join("data"),
        &[
            "--alert-webhook-url",
            webhook,
            "--alert-webhook-secret-file",
            secret.to_str().unwrap(),
        ],
    )
}

async fn create_rule(server: &TestServer, rule: Value) -> (StatusCode, Value) {
    let resp = server
        .client
        .post(server.url("/api/v3/alerts/rules"))
        .json(&rule)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn write_temps(server: &TestServer, temps: &[(&str, f64)]) {
    let now = now_nanos();
    let body: String = temps
        .iter()
        .map(|(host, t)| format!("machine,host={host} temp={t} {now}\n"))
        .collect();
    server.write_ok("plant", &body).await;
}

fn hot_rule(for_: &str) -> Value {
    json!({
        "name": "bearing-hot",
        "database": "plant",
        "sql": "SELECT host, last(temp, time) AS value FROM machine GROUP BY host",
        "condition": "> 90",
        "recovery": "< 85",
        "every": "1s",
        "for": for_,
        "severity": "critical",
        "summary": "{{ $labels.host }} runs at {{ $value }} °C",
        "labels": { "line": "3" },
    })
}

#[tokio::test]
async fn a_threshold_rule_fires_once_after_its_for_and_resolves_once() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, url) = Receiver::start().await;
    let server = start(dir.path(), &url);
    write_temps(&server, &[("m1", 95.0), ("m2", 50.0)]).await;
    let (status, body) = create_rule(&server, hot_rule("2s")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["kind"], "threshold");

    let messages = receiver.wait_for(1).await;
    assert_eq!(messages[0].0, "firing");
    assert_eq!(messages[0].1, "m1");
    let (_, firing) = receiver.received.lock()[0].clone();
    assert_eq!(firing["labels"]["alertname"], "bearing-hot");
    assert_eq!(firing["labels"]["line"], "3");
    assert_eq!(firing["labels"]["severity"], "critical");
    assert_eq!(firing["value"], 95.0);
    assert_eq!(firing["summary"], "m1 runs at 95 °C");
    let starts =
        chrono::DateTime::parse_from_rfc3339(firing["starts_at"].as_str().unwrap()).unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(firing["at"].as_str().unwrap()).unwrap();
    assert!(
        at - starts >= chrono::TimeDelta::seconds(2),
        "fired after its `for`: {starts} → {at}"
    );

    let rows = server
        .query_json(
            "plant",
            "SELECT rule, labels, state, value FROM system.alerts",
        )
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["labels"], "host=m1");
    assert_eq!(rows[0]["state"], "firing");
    let (status, alerts) = {
        let resp = server
            .client
            .get(server.url("/api/v3/alerts"))
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json::<Value>().await.unwrap())
    };
    assert_eq!(status, StatusCode::OK);
    assert_eq!(alerts[0]["state"], "firing");

    // Between the condition and the recovery: still firing.
    write_temps(&server, &[("m1", 88.0)]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.messages().len(), 1);
    write_temps(&server, &[("m1", 80.0)]).await;
    let messages = receiver.wait_for(2).await;
    assert_eq!(messages[1].0, "resolved");
    assert_eq!(messages[1].1, "m1");
    assert_ne!(messages[0].2, messages[1].2, "a key per transition");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.messages().len(), 2, "{:?}", receiver.messages());

    let events = server
        .query_json(
            "plant",
            "SELECT from_state, to_state FROM system.alert_events ORDER BY id",
        )
        .await;
    let path: Vec<_> = events
        .iter()
        .map(|e| {
            format!(
                "{}>{}",
                e["from_state"].as_str().unwrap(),
                e["to_state"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        path,
        ["inactive>pending", "pending>firing", "firing>resolved"]
    );
}

/// A rule's plan is kept from one evaluation to the next, but never past a change that
/// would plan it otherwise: a new column (the table's default last-value cache is keyed
/// again), a cache created by hand, and `now()`, which is read at every evaluation.
#[tokio::test]
async fn a_rules_kept_plan_follows_new_columns_new_caches_and_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, url) = Receiver::start().await;
    let server = start(dir.path(), &url);
    write_temps(&server, &[("m1", 50.0)]).await;
    let rule = |name: &str, filter: &str| {
        json!({
            "name": name,
            "database": "plant",
            "sql": format!("SELECT DISTINCT ON (host) host, temp AS value FROM machine \
                            {filter} ORDER BY host, time DESC"),
            "condition": "> 90",
            "every": "1s",
        })
    };
    let (status, body) = create_rule(&server, rule("latest", "")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let evaluations = || async {
        let rows = server
            .query_json(
                "plant",
                "SELECT evaluations FROM system.alert_rules WHERE rule = 'latest'",
            )
            .await;
        rows[0]["evaluations"].as_u64().unwrap()
    };
    let evaluated = |n: u64| async move {
        eventually(Duration::from_secs(30), || async {
            evaluations().await >= n
        })
        .await
    };
    assert!(evaluated(3).await);

    // A new tag: the table and its default cache change; the rule sees the new series.
    let now = now_nanos();
    server
        .write_ok("plant", &format!("machine,host=m2,zone=z1 temp=95 {now}\n"))
        .await;
    let messages = receiver.wait_for(1).await;
    assert_eq!(
        (messages[0].0.as_str(), messages[0].1.as_str()),
        ("firing", "m2")
    );
    // A series' new value, after runs of the same plan: each run reads the cache anew.
    assert!(evaluated(evaluations().await + 2).await);
    write_temps(&server, &[("m1", 92.0)]).await;
    let messages = receiver.wait_for(2).await;
    assert_eq!(
        (messages[1].0.as_str(), messages[1].1.as_str()),
        ("firing", "m1")
    );

    // A cache created by hand replaces the default one.
    let resp = server
        .client
        .post(server.url("/api/v3/configure/last_cache"))
        .json(&json!({"db": "plant", "table": "machine", "key_columns": ["host"]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    write_temps(&server, &[("m3", 96.0)]).await;
    let messages = receiver.wait_for(3).await;
    assert_eq!(
        (messages[2].0.as_str(), messages[2].1.as_str()),
        ("firing", "m3")
    );

    // `now()` moves: a row leaves the rule's window and its alert resolves.
    let (status, body) = create_rule(
        &server,
        rule(
            "recent",
            "WHERE time > now() - INTERVAL '3 seconds' AND host = 'm4'",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    write_temps(&server, &[("m4", 97.0)]).await;
    let messages = receiver.wait_for(5).await;
    let m4: Vec<&str> = messages
        .iter()
        .filter(|m| m.1 == "m4")
        .map(|m| m.0.as_str())
        .collect();
    // m4 also fires under the first rule; under the second it fires, then resolves.
    let resolved = eventually(Duration::from_secs(30), || async {
        receiver
            .messages()
            .iter()
            .any(|m| m.1 == "m4" && m.0 == "resolved")
    })
    .await;
    assert!(resolved, "{m4:?} then {:?}", receiver.messages());
}

#[tokio::test]
async fn notifications_wait_for_a_receiver_that_is_down_and_survive_kill_9_without_repeats() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (receiver, url) = Receiver::start().await;
    receiver.down.store(true, Ordering::SeqCst);
    let mut server = start(dir.path(), &url);
    write_temps(&server, &[("m1", 99.0)]).await;
    let (status, body) = create_rule(&server, hot_rule("0s")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The receiver refuses a few attempts; the failures are counted.
    assert!(
        eventually(Duration::from_secs(30), || async {
            receiver.refused.load(Ordering::SeqCst) >= 2
        })
        .await
    );
    assert!(
        server
            .metrics()
            .await
            .contains(r#"kiln_alert_notifications_total{receiver="webhook",outcome="failed"}"#)
    );
    // Killed while the firing waits in the outbox: it is delivered after the restart.
    server.kill9();
    receiver.down.store(false, Ordering::SeqCst);
    let mut server = start(dir.path(), &url);
    let messages = receiver.wait_for(1).await;
    assert_eq!(messages[0].0, "firing");

    // Killed between firing and resolution: the firing is not announced again, and
    // the condition that cleared resolves it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill9();
    let server = start(dir.path(), &url);
    write_temps(&server, &[("m1", 20.0)]).await;
    let messages = receiver.wait_for(2).await;
    assert_eq!(messages[1].0, "resolved");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let messages = receiver.messages();
    assert_eq!(
        messages.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
        ["firing", "resolved"],
        "{messages:?}"
    );
    assert!(
        server
            .metrics()
            .await
            .contains(r#"kiln_alert_notifications_total{receiver="webhook",outcome="sent"} 1"#)
    );
}

#[tokio::test]
async fn a_no_data_rule_fires_for_the_silent_sensor_only_and_resolves_when_it_sends() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, url) = Receiver::start().await;
    let server = start(dir.path(), &url);
    write_temps(&server, &[("m1", 20.0), ("m2", 20.0)]).await;
    // Through the CLI, as the README shows it.
    let (ok, out, err) = kiln(
        &[
            "alert",
            "create",
            "sensor-silent",
            "--host",
            &server.base,
            "--database",
            "plant",
            "--no-data-table",
            "machine",
            "--no-data-after",
            "2s",
            "--every",
            "1s",
            "--summary",
            "{{ $labels.host }} silent for {{ $value }} s",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("created alert rule \"sensor-silent\""),
        "{out}"
    );
    // m1 keeps sending, m2 stops.
    for _ in 0..10 {
        write_temps(&server, &[("m1", 20.0)]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let messages = receiver.wait_for(1).await;
    assert_eq!(&messages[0].0[..], "firing");
    assert_eq!(&messages[0].1[..], "m2");
    write_temps(&server, &[("m2", 21.0)]).await;
    let messages = receiver.wait_for(2).await;
    assert_eq!(&messages[1].0[..], "resolved");
    assert_eq!(&messages[1].1[..], "m2");
    assert!(messages.iter().all(|m| m.1 == "m2"), "{messages:?}");

    let (ok, out, _) = kiln(&["alert", "list", "--host", &server.base], None);
    assert!(ok);
    assert!(out.contains("sensor-silent\tplant\tno_data\t1s"), "{out}");
    let (ok, out, err) = kiln(
        &["alert", "delete", "sensor-silent", "--host", &server.base],
        None,
    );
    assert!(ok, "{out}{err}");
    let (ok, _, err) = kiln(
        &["alert", "show", "sensor-silent", "--host", &server.base],
        None,
    );
    assert!(!ok);
    assert!(err.contains("no alert rule named"), "{err}");
}

#[tokio::test]
async fn bad_rules_are_refused_and_a_failing_rule_reports_its_error_while_others_run() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, url) = Receiver::start().await;
    let server = start(dir.path(), &url);
    write_temps(&server, &[("m1", 95.0)]).await;
    let base = hot_rule("0s");
    let with = |changes: Value| {
        let mut rule = base.clone();
        for (k, v) in changes.as_object().unwrap() {
            rule[k] = v.clone();
        }
        rule
    };
    let cases = [
        (
            with(json!({"sql": "SELEC host FROM machine"})),
            "does not plan",
        ),
        (
            with(json!({"sql": "SELECT host, temp AS value FROM nowhere"})),
            "nowhere",
        ),
        (
            with(
                json!({"sql": "SELECT host, temp AS value FROM machine", "value_column": "volume"}),
            ),
            "no column \"volume\"",
        ),
        (
            with(json!({"sql": "SELECT host AS value, temp FROM machine"})),
            "not a number",
        ),
        (with(json!({"condition": "hot"})), "unknown condition"),
        (
            with(json!({"summary": "{{ host }}"})),
            "unknown placeholder",
        ),
        (with(json!({"every": "10ms"})), "at least 1s"),
        (with(json!({"database": "nowhere"})), "not found"),
        (
            json!({"name": "x", "database": "plant", "table": "nowhere", "no_data_after": "1m"}),
            "not found",
        ),
    ];
    for (rule, expected) in cases {
        let (status, body) = create_rule(&server, rule.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{rule} → {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(expected),
            "{rule}: {error:?} lacks {expected:?}"
        );
    }
    let (status, _) = create_rule(&server, base.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = create_rule(&server, base.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Plans, then fails on every evaluation (a tag is not a number).
    let failing = with(json!({
        "name": "broken",
        "sql": "SELECT host, arrow_cast(host, 'Int64') AS value FROM machine GROUP BY host",
    }));
    let (status, body) = create_rule(&server, failing).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    receiver.wait_for(1).await;
    let ok = eventually(Duration::from_secs(20), || async {
        let rows = server
            .query_json(
                "plant",
                "SELECT rule, state, error FROM system.alerts WHERE rule = 'broken'",
            )
            .await;
        rows.first().is_some_and(|r| {
            r["state"] == "error" && r["error"].as_str().is_some_and(|e| e.contains("Int64"))
        })
    })
    .await;
    assert!(ok, "the failing rule's error is in system.alerts");
    let rules = server
        .query_json(
            "plant",
            "SELECT rule, last_error, evaluations, firing FROM system.alert_rules ORDER BY rule",
        )
        .await;
    assert_eq!(rules[0]["rule"], "bearing-hot");
    assert_eq!(rules[0]["firing"], 1);
    assert!(
        rules[0].get("last_error").is_none_or(Value::is_null),
        "{rules:?}"
    );
    assert!(rules[1]["last_error"].as_str().is_some(), "{rules:?}");
    // Writes to a database named like the system schema are refused.
    let (status, text) = server.write("system", "t v=1".to_owned(), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("reserved"), "{text}");
}

/// Every message of `topic` (all partitions), read from the start: (key, idempotency
/// header, JSON value).
fn consume_all(bootstrap: &str, topic: &str, want: usize) -> Vec<(String, String, Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "alerts-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while out.len() < want && std::time::Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let header = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "kiln-idempotency-key"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        out.push((
            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            header,
            serde_json::from_slice(m.payload().unwrap_or_default()).unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn transitions_reach_a_kafka_topic_keyed_by_rule_and_series() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("alerts", 2, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--alert-kafka-brokers",
            &bootstrap,
            "--alert-kafka-topic",
            "alerts",
        ],
    );
    write_temps(&server, &[("m1", 95.0)]).await;
    let (status, body) = create_rule(&server, hot_rule("0s")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        eventually(Duration::from_secs(30), || async {
            server
                .metrics()
                .await
                .contains(r#"kiln_alert_notifications_total{receiver="kafka",outcome="sent"} 1"#)
        })
        .await
    );
    write_temps(&server, &[("m1", 20.0)]).await;
    let messages = tokio::task::spawn_blocking(move || consume_all(&bootstrap, "alerts", 2))
        .await
        .unwrap();
    let statuses: Vec<_> = messages.iter().map(|m| m.2["status"].clone()).collect();
    assert_eq!(statuses, ["firing", "resolved"], "{messages:?}");
    for (key, header, value) in &messages {
        assert_eq!(key, "bearing-hot/host=m1");
        assert_eq!(header, value["key"].as_str().unwrap());
        assert_eq!(value["labels"]["host"], "m1");
    }
}

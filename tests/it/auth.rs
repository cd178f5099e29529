//! Tokens on every door: HTTP, the gRPC WriteService, Flight SQL and PostgreSQL, each
//! asked with no token, a wrong, revoked or expired one, a read token writing, a token of
//! another database, and a token that may: exact refusals, nothing written when refused.

use std::path::Path;
use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use kiln_proto::ingest::v1::write_service_client::WriteServiceClient;
use kiln_proto::ingest::v1::{LineProtocol, WriteRequest, write_request};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::TestServer;

/// The tokens of the matrix, by what they are.
struct Tokens {
    admin: String,
    reader: String,
    writer: String,
    other: String,
    expired: String,
    revoked: String,
}

async fn create(server: &TestServer, admin: &str, body: Value) -> String {
    let resp = server
        .client
        .post(server.url("/api/v3/tokens"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// Starts a server whose admin token comes from a file, and makes the other tokens.
async fn start(dir: &Path) -> (TestServer, Tokens) {
    let admin_file = dir.join("admin-token");
    let admin = "kiln_".to_owned() + &"ab".repeat(32);
    std::fs::write(&admin_file, format!("{admin}\n")).unwrap();
    let server = TestServer::start(
        &dir.join("data"),
        &["--admin-token-file", admin_file.to_str().unwrap()],
    );
    let reader = create(
        &server,
        &admin,
        json!({"name": "grafana", "databases": ["plant"], "permissions": ["read"]}),
    )
    .await;
    let writer = create(
        &server,
        &admin,
        json!({"name": "gateway", "databases": ["plant"], "permissions": ["write"]}),
    )
    .await;
    let other = create(
        &server,
        &admin,
        json!({"name": "lab", "databases": ["lab"], "permissions": ["read", "write"]}),
    )
    .await;
    let expired = create(
        &server,
        &admin,
        json!({"name": "temp", "databases": ["*"], "permissions": ["read", "write"], "expires_in": "1s"}),
    )
    .await;
    let revoked = create(
        &server,
        &admin,
        json!({"name": "old", "databases": ["*"], "permissions": ["read", "write"]}),
    )
    .await;
    let resp = server
        .client
        .delete(server.url("/api/v3/tokens/old"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    (
        server,
        Tokens {
            admin,
            reader,
            writer,
            other,
            expired,
            revoked,
        },
    )
}

pub(crate) async fn http_write(
    server: &TestServer,
    token: Option<&str>,
    line: &str,
) -> reqwest::Response {
    let mut request = server
        .client
        .post(server.url("/api/v3/write_lp"))
        .query(&[("db", "plant")])
        .body(line.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn http_query(server: &TestServer, token: Option<&str>, sql: &str) -> reqwest::Response {
    let mut request = server
        .client
        .get(server.url("/api/v3/query_sql"))
        .query(&[("db", "plant"), ("q", sql)]);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn count(server: &TestServer, admin: &str) -> i64 {
    let resp = http_query(server, Some(admin), "SELECT count(*) AS n FROM m").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    v[0]["n"].as_i64().unwrap()
}

#[tokio::test]
async fn every_http_credential_and_scope_gets_its_exact_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (server, t) = start(dir.path()).await;

    // Writes: only a token that may write plant writes.
    for (token, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some("kiln_wrong"), StatusCode::UNAUTHORIZED),
        (Some(t.revoked.as_str()), StatusCode::UNAUTHORIZED),
        (Some(t.expired.as_str()), StatusCode::UNAUTHORIZED),
        (Some(t.reader.as_str()), StatusCode::FORBIDDEN),
        (Some(t.other.as_str()), StatusCode::FORBIDDEN),
        (Some(t.writer.as_str()), StatusCode::NO_CONTENT),
        (Some(t.admin.as_str()), StatusCode::NO_CONTENT),
    ] {
        let resp = http_write(&server, token, "m,k=v v=1 1").await;
        assert_eq!(resp.status(), status, "write with {token:?}");
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(
                resp.headers()["www-authenticate"],
                "Bearer realm=\"kiln\"",
                "{token:?}"
            );
        }
        let body = resp.text().await.unwrap();
        if let Some(token) = token {
            assert!(
                !body.contains(token),
                "the answer repeats the token: {body}"
            );
        }
    }
    let expired: Value = http_write(&server, Some(&t.expired), "m v=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(expired["error"], json!("token \"temp\" has expired"));
    // The same row twice (same identity): one row, and nothing from the refused writes.
    assert_eq!(count(&server, &t.admin).await, 1);

    // The credential forms InfluxDB clients send.
    let telegraf = server
        .client
        .post(server.url("/api/v2/write"))
        .query(&[("bucket", "plant"), ("org", "any")])
        .header("Authorization", format!("Token {}", t.writer))
        .body("m,k=telegraf v=2")
        .send()
        .await
        .unwrap();
    assert_eq!(telegraf.status(), StatusCode::NO_CONTENT);
    let v1 = server
        .client
        .post(server.url("/write"))
        .query(&[("db", "plant"), ("u", "gateway"), ("p", t.writer.as_str())])
        .body("m,k=v1 v=3")
        .send()
        .await
        .unwrap();
    assert_eq!(v1.status(), StatusCode::NO_CONTENT);
    let basic = server
        .client
        .post(server.url("/write"))
        .query(&[("db", "plant")])
        .basic_auth("gateway", Some(&t.writer))
        .body("m,k=basic v=4")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::NO_CONTENT);
    assert_eq!(count(&server, &t.admin).await, 4);

    // Queries: a reader reads plant and nothing else, even by qualifying the name.
    for (token, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(t.writer.as_str()), StatusCode::FORBIDDEN),
        (Some(t.other.as_str()), StatusCode::FORBIDDEN),
        (Some(t.reader.as_str()), StatusCode::OK),
    ] {
        let resp = http_query(&server, token, "SELECT count(*) FROM m").await;
        assert_eq!(resp.status(), status, "query with {token:?}");
    }
    let resp = server
        .client
        .post(server.url("/api/v3/write_lp"))
        .query(&[("db", "lab")])
        .bearer_auth(&t.other)
        .body("secret v=42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = http_query(&server, Some(&t.reader), "SELECT * FROM lab.secret").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Configuration and tokens are an admin's.
    for (method, path) in [
        (reqwest::Method::POST, "/api/v3/compact"),
        (reqwest::Method::GET, "/api/v3/tokens"),
        (reqwest::Method::GET, "/api/v3/kafka"),
    ] {
        let resp = server
            .client
            .request(method.clone(), server.url(path))
            .bearer_auth(&t.reader)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let list: Value = server
        .client
        .get(server.url("/api/v3/tokens"))
        .bearer_auth(&t.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["grafana", "gateway", "lab", "temp"]);
    assert!(
        !list.to_string().contains("kiln_"),
        "listing shows no token"
    );
    assert_eq!(list["tokens"][3]["expired"], json!(true));

    // Probes and scrapers need no token; failures are counted by door and reason.
    for path in ["/health", "/ready", "/metrics"] {
        let resp = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let metrics = server.metrics().await;
    for reason in ["missing", "invalid", "expired", "forbidden"] {
        let line = format!("kiln_auth_failures_total{{door=\"http\",reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

fn lp(database: &str, text: &str) -> WriteRequest {
    WriteRequest {
        batch_id: 1,
        database: database.into(),
        payload: Some(write_request::Payload::LineProtocol(LineProtocol {
            text: text.into(),
            precision: String::new(),
        })),
        accept_partial: false,
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn grpc_flight_sql_and_postgres_refuse_what_the_token_may_not_do() {
    let dir = tempfile::tempdir().unwrap();
    let (server, t) = start(dir.path()).await;
    let channel = Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    // gRPC WriteService.
    let mut grpc = WriteServiceClient::new(channel.clone());
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("kiln_wrong"), Code::Unauthenticated),
        (Some(t.revoked.as_str()), Code::Unauthenticated),
        (Some(t.expired.as_str()), Code::Unauthenticated),
        (Some(t.reader.as_str()), Code::PermissionDenied),
        (Some(t.other.as_str()), Code::PermissionDenied),
    ] {
        let err = grpc
            .write(with_token(lp("plant", "m,k=grpc v=1"), token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{token:?}: {err}");
    }
    grpc.write(with_token(lp("plant", "m,k=grpc v=1"), Some(&t.writer)))
        .await
        .unwrap();
    // A stream whose token may not write gets a refused ack, not a write.
    let acks = grpc
        .write_stream(with_token(
            futures::stream::iter([lp("plant", "m,k=stream v=1")]),
            Some(&t.reader),
        ))
        .await
        .unwrap()
        .into_inner();
    let acks: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(acks)
        .await
        .unwrap();
    assert_eq!(acks.len(), 1);
    assert!(!acks[0].durable);
    assert_eq!(acks[0].code, Code::PermissionDenied as i32);
    assert_eq!(count(&server, &t.admin).await, 1);

    // Flight SQL: Bearer on every call, or a handshake with Basic that answers a bearer.
    let flight = |token: Option<&str>| {
        let mut client = FlightSqlServiceClient::new(channel.clone());
        client.set_header("database", "plant");
        if let Some(token) = token {
            client.set_token(token.to_owned());
        }
        client
    };
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("kiln_wrong"), Code::Unauthenticated),
        (Some(t.expired.as_str()), Code::Unauthenticated),
        (Some(t.writer.as_str()), Code::PermissionDenied),
        (Some(t.other.as_str()), Code::PermissionDenied),
    ] {
        let err = flight(token)
            .execute("SELECT count(*) FROM m".into(), None)
            .await
            .unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains(&format!("{code:?}")), "{token:?}: {text}");
    }
    let mut reader = flight(Some(&t.reader));
    let info = reader
        .execute("SELECT count(*) AS n FROM m".into(), None)
        .await
        .unwrap();
    assert_eq!(info.endpoint.len(), 1);
    let mut basic = flight(None);
    basic.handshake("grafana", &t.reader).await.unwrap();
    basic
        .execute("SELECT 1".into(), None)
        .await
        .expect("the handshake's bearer token is used from then on");
    assert!(
        flight(None)
            .handshake("grafana", "kiln_wrong")
            .await
            .is_err()
    );
    let schemas = reader
        .get_db_schemas(arrow_flight::sql::CommandGetDbSchemas::default())
        .await
        .unwrap();
    let ticket = schemas.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<_> =
        futures::TryStreamExt::try_collect::<Vec<_>>(reader.do_get(ticket).await.unwrap())
            .await
            .unwrap();
    let listed: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(listed, 1, "a reader of plant sees only plant");

    // PostgreSQL: the token is the password (from loopback, without TLS).
    let (host, port) = server.pg.rsplit_once(':').unwrap();
    let connect = |password: Option<&str>, database: &str| {
        let mut config = format!("host={host} port={port} user=grafana dbname={database}");
        if let Some(p) = password {
            config.push_str(&format!(" password={p}"));
        }
        async move {
            let (client, connection) =
                tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    for (password, database, state) in [
        (Some("kiln_wrong"), "plant", "28P01"),
        (Some(t.revoked.as_str()), "plant", "28P01"),
        (Some(t.expired.as_str()), "plant", "28P01"),
        (Some(t.writer.as_str()), "plant", "42501"),
        (Some(t.reader.as_str()), "lab", "42501"),
    ] {
        let err = connect(password, database).await.unwrap_err();
        let code = err.as_db_error().map(|e| e.code().code().to_owned());
        assert_eq!(
            code.as_deref(),
            Some(state),
            "{password:?} on {database}: {err}"
        );
    }
    // Without a password the client cannot answer the server's request for one.
    let err = connect(None, "plant").await.unwrap_err();
    assert!(format!("{err:?}").contains("password"), "{err:?}");
    let client = connect(Some(&t.reader), "plant").await.unwrap();
    let rows = client.simple_query("SELECT count(*) FROM m").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))
    );
}

/// Every file under `dir`, as bytes.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
    }
    out
}

#[tokio::test]
async fn tokens_survive_a_restart_and_their_text_is_stored_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The first admin token, made offline on the data directory.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["token", "create", "--admin", "--name", "ops", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let admin = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(admin.starts_with("kiln_"), "{admin}");
    // With it, tokens are enforced from the first start.
    let mut server = TestServer::start(&data, &[]);
    let writer = create(
        &server,
        &admin,
        json!({"name": "gateway", "databases": ["plant"], "permissions": ["write"]}),
    )
    .await;
    assert_eq!(
        http_write(&server, Some(&writer), "m v=1 1").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        http_write(&server, Some("kiln_bad"), "m v=2 2")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    server.kill9();

    let server = TestServer::start(&data, &[]);
    assert_eq!(
        http_write(&server, None, "m v=3 3").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http_write(&server, Some(&writer), "m v=4 4").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(count(&server, &admin).await, 2);
    drop(server);

    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    for token in [&admin, &writer] {
        assert!(!log.contains(token.as_str()), "the log holds a token");
        for (path, bytes) in files(&data) {
            let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
            assert!(!found, "{} holds a token", path.display());
        }
    }
}

#[tokio::test]
async fn a_server_beyond_loopback_needs_a_token_or_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-bind", "0.0.0.0:0", "--grpc-bind", "127.0.0.1:0"])
        .args(["--pg-bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("without authentication") && stderr.contains("--admin-token-file"),
        "{stderr}"
    );
    // Told so, it serves without tokens.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-bind", "0.0.0.0:0", "--grpc-bind", "127.0.0.1:0"])
        .args(["--pg-bind", "127.0.0.1:0", "--without-auth"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        line.starts_with("Kiln HTTP listening on http://0.0.0.0:"),
        "{line}"
    );
}

#[tokio::test]
async fn deletes_need_write_and_managing_databases_and_views_needs_admin() {
    let dir = tempfile::tempdir().unwrap();
    let (server, t) = start(dir.path()).await;
    let resp = http_write(&server, Some(&t.writer), "m,k=v v=1 1\nm,k=w v=1 1").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    for (token, status) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(t.reader.as_str()), StatusCode::FORBIDDEN),
        (Some(t.other.as_str()), StatusCode::FORBIDDEN),
        (Some(t.writer.as_str()), StatusCode::OK),
    ] {
        let resp = http_query(&server, token, "DELETE FROM m WHERE k = 'v'").await;
        assert_eq!(resp.status(), status, "delete with {token:?}");
    }
    assert_eq!(count(&server, &t.admin).await, 1);
    // A materialized view changes the database's tables: admin; refreshing it writes.
    let create = "CREATE MATERIALIZED VIEW m_1h AS SELECT time_bucket('1 hour', time) AS time, \
                  k, count(*) FROM m GROUP BY 1, 2";
    for (token, sql, status) in [
        (t.writer.as_str(), create, StatusCode::FORBIDDEN),
        (t.admin.as_str(), create, StatusCode::OK),
        (
            t.reader.as_str(),
            "REFRESH MATERIALIZED VIEW m_1h",
            StatusCode::FORBIDDEN,
        ),
        (
            t.writer.as_str(),
            "REFRESH MATERIALIZED VIEW m_1h",
            StatusCode::OK,
        ),
        (
            t.reader.as_str(),
            "SELECT count(*) FROM m_1h",
            StatusCode::OK,
        ),
        (
            t.writer.as_str(),
            "DROP MATERIALIZED VIEW m_1h",
            StatusCode::FORBIDDEN,
        ),
        (
            t.admin.as_str(),
            "DROP MATERIALIZED VIEW m_1h",
            StatusCode::OK,
        ),
    ] {
        let resp = http_query(&server, Some(token), sql).await;
        assert_eq!(resp.status(), status, "{sql}");
    }
    for (token, status) in [
        (t.writer.as_str(), StatusCode::FORBIDDEN),
        (t.admin.as_str(), StatusCode::CREATED),
    ] {
        let resp = server
            .client
            .post(server.url("/api/v3/configure/database"))
            .bearer_auth(token)
            .json(&json!({"db": "archive", "retention_period": "30d"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
    }
    // A reader lists the databases it reads, and nothing of the others.
    let listed: Value = server
        .client
        .get(server.url("/api/v3/configure/database"))
        .bearer_auth(&t.reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["plant"]);
}

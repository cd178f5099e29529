//! SQL reaches none of the server's files or state, over HTTP, Flight SQL and PostgreSQL;
//! names that could become paths are refused at write time on every write door.

use arrow_flight::sql::client::FlightSqlServiceClient;
use kiln_proto::ingest::v1::write_service_client::WriteServiceClient;
use kiln_proto::ingest::v1::{LineProtocol, WriteRequest, write_request};
use reqwest::StatusCode;
use serde_json::Value;
use tonic::transport::Channel;

use crate::support::TestServer;

#[tokio::test]
async fn sql_cannot_write_or_read_files_or_leave_the_shared_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", "m,k=a v=1 1").await;
    let target = dir.path().join("copied.csv");
    let secret = dir.path().join("secret.csv");
    std::fs::write(&secret, "a,b\n1,2\n").unwrap();
    let statements = [
        format!("COPY (SELECT 1 AS x) TO '{}'", target.display()),
        format!("COPY m TO '{}' STORED AS CSV", target.display()),
        format!(
            "CREATE EXTERNAL TABLE leak STORED AS CSV LOCATION '{}'",
            secret.display()
        ),
        "CREATE VIEW v AS SELECT 1".to_owned(),
        "CREATE TABLE t AS SELECT 1 AS x".to_owned(),
        "SET datafusion.runtime.memory_limit = '100G'".to_owned(),
        format!("SELECT * FROM '{}'", secret.display()),
        "INSERT INTO m (k, v, time) VALUES ('b', 2, now())".to_owned(),
    ];

    // HTTP: 400, nothing done.
    for sql in &statements {
        let (status, body) = server.query("plant", sql, "json").await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND,
            "{sql}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    // Flight SQL: refused while planning.
    let channel = Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut flight = FlightSqlServiceClient::new(channel.clone());
    flight.set_header("database", "plant");
    for sql in &statements {
        let result = flight.execute(sql.clone(), None).await;
        assert!(result.is_err(), "Flight SQL ran {sql}");
    }

    // PostgreSQL: refused with 42501 (or a planning error), the connection keeps serving.
    let client = crate::postgres::connect(&server, "plant").await.unwrap();
    for sql in &statements {
        let err = client
            .simple_query(sql)
            .await
            .expect_err(&format!("PostgreSQL ran {sql}"));
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert!(
            ["42501", "42P01", "42601", "42000"].contains(&db.code().code()),
            "{sql}: {} {}",
            db.code().code(),
            db.message()
        );
    }
    for sql in ["CREATE SCHEMA s", "DROP TABLE m", "COPY m TO STDOUT"] {
        let err = client.simple_query(sql).await.unwrap_err();
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("42501"),
            "{sql}: {err}"
        );
    }
    let err = client
        .simple_query("SET datafusion.runtime.memory_limit = '100G'")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("limits hold for every session"),
        "{err}"
    );
    let rows = crate::postgres::simple_rows(&client, "SELECT count(*) FROM m").await;
    assert_eq!(rows, [[Some("1".to_owned())]]);

    assert!(!target.exists(), "COPY wrote a file");
    let (status, body) = server
        .query(
            "plant",
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'plant'",
            "json",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let tables: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(tables.as_array().unwrap().len(), 1, "{tables}");
}

#[tokio::test]
async fn names_that_could_be_paths_are_refused_on_every_write_door() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    for db in ["../etc", "a/b", "nul\u{0}byte"] {
        let (status, text) = server.write(db, "m v=1".to_owned(), &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{db:?}: {text}");
        assert!(text.contains("invalid name"), "{text}");
    }
    // A table or column name: the line is refused, the others written.
    let (status, text) = server
        .write(
            "plant",
            "../m v=1 1\nm,a\u{7}b=x v=1 2\nm v=3 3\n".to_owned(),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let lines: Vec<u64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line_number"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [1, 2]);
    let rows = server.query_json("plant", "SELECT v FROM m").await;
    assert_eq!(rows.len(), 1);

    let channel = Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = WriteServiceClient::new(channel);
    let err = grpc
        .write(WriteRequest {
            batch_id: 1,
            database: "../etc".into(),
            payload: Some(write_request::Payload::LineProtocol(LineProtocol {
                text: "m v=1".into(),
                precision: String::new(),
            })),
            accept_partial: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn writes_beyond_the_schema_limits_are_refused_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--max-databases",
            "1",
            "--max-tables",
            "2",
            "--max-columns-per-table",
            "3",
        ],
    );
    server.write_ok("plant", "a x=1 1\nb x=1 1").await;
    for (db, body, says) in [
        ("other", "a x=1 1", "--max-databases"),
        ("plant", "c x=1 1", "--max-tables"),
        ("plant", "a y=1,z=2 1", "--max-columns-per-table"),
    ] {
        let (status, text) = server.write(db, body.to_owned(), &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains(says), "{text}");
    }
    server.write_ok("plant", "a y=1 2").await;
    let rows = server
        .query_json("plant", "SELECT count(*) AS n FROM a")
        .await;
    assert_eq!(rows[0]["n"], 2);
}

/// Junk on every port: random bytes, a PostgreSQL startup claiming a huge length, an
/// HTTP/2 preface followed by garbage. The server answers or hangs up, and keeps serving.
#[tokio::test]
async fn junk_on_every_port_leaves_the_server_serving() {
    use rand::{Rng, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let http = server.base.trim_start_matches("http://").to_owned();
    let grpc = server.grpc.trim_start_matches("http://").to_owned();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(19);
    let mut payloads: Vec<Vec<u8>> = (0..8)
        .map(|_| {
            let len = rng.random_range(1..65_536);
            (0..len).map(|_| rng.random()).collect()
        })
        .collect();
    // PostgreSQL startup and SSLRequest framing with absurd lengths.
    payloads.push([0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0].to_vec());
    payloads.push([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, 0xff, 0xff].to_vec());
    // An HTTP/2 connection preface, then garbage frames.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend([0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
    payloads.push(h2);
    for addr in [&http, &grpc, &server.pg] {
        for payload in &payloads {
            let Ok(mut socket) = tokio::net::TcpStream::connect(addr.as_str()).await else {
                panic!("{addr} stopped accepting connections");
            };
            let _ = socket.write_all(payload).await;
            let mut answer = [0u8; 1024];
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(300),
                socket.read(&mut answer),
            )
            .await;
        }
    }
    server.write_ok("plant", "m v=1 1").await;
    let rows = server
        .query_json("plant", "SELECT count(*) AS n FROM m")
        .await;
    assert_eq!(rows[0]["n"], 1);
    let client = crate::postgres::connect(&server, "plant").await.unwrap();
    let rows = crate::postgres::simple_rows(&client, "SELECT count(*) FROM m").await;
    assert_eq!(rows, [[Some("1".to_owned())]]);
}

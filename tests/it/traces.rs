//! `--otlp-endpoint`: spans of writes and queries reach a collector (an OTLP receiver this
//! test runs, over plain gRPC and over TLS), continue the trace a client sends, and follow
//! a query from a querier to the writer it asks for unpersisted rows.

use std::time::Duration;

use reqwest::StatusCode;

use crate::object_storage::{BUCKET, rows, s3_args};
use crate::support::otlp::{OtlpReceiver, ReceivedSpan};
use crate::support::s3::S3Server;
use crate::support::{TestServer, eventually};

const WRITE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const QUERY_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
/// The client's own span in each trace.
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str) -> String {
    format!("00-{trace}-{CLIENT_SPAN}-01")
}

fn named<'a>(spans: &'a [ReceivedSpan], role: &str, name: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| s.role() == role && s.name == name)
}

/// `name` of `role` in `spans`, or a failure listing what did arrive.
fn span<'a>(spans: &'a [ReceivedSpan], role: &str, name: &str) -> &'a ReceivedSpan {
    named(spans, role, name).unwrap_or_else(|| {
        let arrived: Vec<String> = spans
            .iter()
            .map(|s| format!("{}: {}", s.role(), s.name))
            .collect();
        panic!("no span {name:?} from role {role}; arrived: {arrived:#?}")
    })
}

/// Whether `child` is below `ancestor` in `spans`.
fn below(spans: &[ReceivedSpan], child: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
    let mut parent = child.parent_span_id.as_str();
    while !parent.is_empty() {
        if parent == ancestor.span_id {
            return true;
        }
        parent = spans
            .iter()
            .find(|s| s.span_id == parent)
            .map_or("", |s| s.parent_span_id.as_str());
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_writes_and_queries_reach_the_collector_and_follow_a_query_to_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), BUCKET);
    let ca = crate::tls::ca("collector CA");
    let (cert, key) = crate::tls::leaf(&ca, &["127.0.0.1"]);
    let ca_file = crate::tls::write(dir.path(), "collector-ca.pem", &ca.pem);
    let collector = OtlpReceiver::start(&cert, &key).await;
    let token_file = dir.path().join("admin-token");
    let admin = "kiln_".to_owned() + &"ef".repeat(32);
    std::fs::write(&token_file, &admin).unwrap();
    let token_path = token_file.to_str().unwrap();

    // The writer keeps rows in its buffer, exports over plain gRPC every 100 ms, and starts
    // no trace of its own (ratio 0): it exports only what its clients sampled.
    let mut args = s3_args(&s3);
    args.extend(
        [
            "--persist-interval",
            "1h",
            "--admin-token-file",
            token_path,
            "--otlp-endpoint",
            &collector.endpoint,
            "--otlp-sample-ratio",
            "0",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let writer = TestServer::start_with(&dir.path().join("writer"), &args, |c| {
        S3Server::credentials(c);
        c.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    });
    // The querier exports over TLS, only when it stops (its batches wait 10 minutes): what
    // arrives from it was sent by the flush at shutdown.
    let mut args = s3_args(&s3);
    args.extend(
        [
            "--role",
            "querier",
            "--ingesters",
            &writer.grpc,
            "--ingester-token-file",
            token_path,
            "--otlp-endpoint",
            &collector.tls_endpoint,
            "--otlp-tls-ca",
            ca_file.to_str().unwrap(),
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut querier = TestServer::start_with(&dir.path().join("querier"), &args, |c| {
        S3Server::credentials(c);
        c.env("OTEL_BSP_SCHEDULE_DELAY", "600000");
    });

    // A write no client traced: not exported at ratio 0.
    let write = |lp: String, traceparent: Option<String>| {
        let mut request = writer
            .client
            .post(writer.url("/api/v3/write_lp"))
            .query(&[("db", "plant")])
            .bearer_auth(&admin)
            .body(lp);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.send()
    };
    assert_eq!(
        write(rows(0, 10), None).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    // A write in the client's sampled trace: its steps arrive in that trace, below the
    // client's span.
    assert_eq!(
        write(rows(10, 5), Some(traceparent(WRITE_TRACE)))
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    let spans = collector
        .trace(WRITE_TRACE, Duration::from_secs(30), |spans| {
            named(spans, "all", "WAL append").is_some()
                && named(spans, "all", "POST /api/v3/write_lp").is_some()
        })
        .await;
    let request = span(&spans, "all", "POST /api/v3/write_lp");
    assert_eq!(request.parent_span_id, CLIENT_SPAN);
    assert_eq!(request.attribute("http.response.status_code"), Some("204"));
    assert_eq!(request.attribute("http.route"), Some("/api/v3/write_lp"));
    let written = span(&spans, "all", "write");
    assert_eq!(written.parent_span_id, request.span_id);
    assert_eq!(written.attribute("rows"), Some("5"));
    assert_eq!(written.attribute("db.namespace"), Some("plant"));
    for step in ["validate", "WAL append"] {
        assert_eq!(
            span(&spans, "all", step).parent_span_id,
            written.span_id,
            "{step}"
        );
    }

    // A query through the querier, in the client's trace, once it has followed the
    // catalog to the table: the querier asks the writer, and the writer's side of that
    // call joins the same trace.
    assert!(
        eventually(Duration::from_secs(30), || async {
            querier
                .query("plant", "SELECT count(*) FROM temp", "json")
                .await
                .0
                == StatusCode::OK
        })
        .await,
        "the querier never saw the table"
    );
    let resp = querier
        .client
        .get(querier.url("/api/v3/query_sql"))
        .query(&[("db", "plant"), ("q", "SELECT count(*) AS n FROM temp")])
        .header("traceparent", traceparent(QUERY_TRACE))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), r#"[{"n":15}]"#);
    // A PostgreSQL query starts a trace of its own.
    let pg = crate::postgres::connect(&querier, "plant").await.unwrap();
    let n: i64 = pg
        .query_one("SELECT count(*) FROM temp WHERE machine = 'press-1'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 0);
    drop(pg);
    let writer_side = collector
        .trace(QUERY_TRACE, Duration::from_secs(30), |spans| {
            named(spans, "all", "read buffer").is_some()
                && named(spans, "all", "arrow.flight.protocol.FlightService/DoGet").is_some()
        })
        .await;
    let read = span(&writer_side, "all", "read buffer");
    assert_eq!(read.attribute("rows"), Some("15"));
    assert_eq!(read.attribute("db.collection.name"), Some("temp"));
    let call = span(
        &writer_side,
        "all",
        "arrow.flight.protocol.FlightService/DoGet",
    );
    assert_eq!(read.parent_span_id, call.span_id);
    assert!(
        named(&writer_side, "querier", "GET /api/v3/query_sql").is_none(),
        "the querier's spans wait for its batch"
    );

    // Stopping flushes the querier's spans: they are there once it has exited.
    querier.terminate();
    let spans: Vec<ReceivedSpan> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == QUERY_TRACE)
        .collect();
    let request = span(&spans, "querier", "GET /api/v3/query_sql");
    assert_eq!(request.parent_span_id, CLIENT_SPAN);
    assert_eq!(request.attribute("http.response.status_code"), Some("200"));
    let plan = span(&spans, "querier", "plan");
    assert_eq!(plan.parent_span_id, request.span_id);
    assert_eq!(
        plan.attribute("db.query.text"),
        Some("SELECT count(*) AS n FROM temp")
    );
    let execute = span(&spans, "querier", "execute");
    assert_eq!(execute.parent_span_id, request.span_id);
    let scan = span(&spans, "querier", "scan");
    assert!(below(&spans, scan, execute), "{scan:?}");
    assert_eq!(scan.attribute("db.collection.name"), Some("temp"));
    let asked = span(&spans, "querier", "unpersisted rows");
    assert_eq!(asked.parent_span_id, scan.span_id);
    assert_eq!(asked.attribute("rows"), Some("15"));
    let client = span(&spans, "querier", "writer");
    assert_eq!(client.parent_span_id, asked.span_id);
    assert_eq!(
        client.attribute("server.address"),
        Some(writer.grpc.as_str())
    );
    // The writer's server span is the child of the querier's client span.
    assert_eq!(call.parent_span_id, client.span_id);
    // The PostgreSQL query's trace: its statement, and the scan below it.
    let all = collector.spans();
    let statement = all
        .iter()
        .find(|s| s.role() == "querier" && s.name == "PostgreSQL query")
        .expect("the PostgreSQL query's span");
    assert!(statement.parent_span_id.is_empty());
    assert!(
        statement
            .attribute("db.query.text")
            .is_some_and(|q| q.contains("machine = 'press-1'")),
        "{statement:?}"
    );
    assert!(
        all.iter().any(|s| s.trace_id == statement.trace_id
            && s.name == "scan"
            && below(&all, s, statement)),
        "no scan below the PostgreSQL query"
    );
    // The writer exported nothing of its own (ratio 0), only its clients' traces: the
    // traced write and the querier's calls, not the first write.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = collector.spans();
    let own: Vec<&str> = all
        .iter()
        .filter(|s| s.role() == "all" && s.trace_id != WRITE_TRACE)
        .filter(|s| {
            !all.iter()
                .any(|q| q.role() == "querier" && q.trace_id == s.trace_id)
        })
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        own.is_empty(),
        "the writer exported traces no client sampled: {own:?}"
    );
}

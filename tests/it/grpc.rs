//! `kiln.ingest.v1.WriteService` end to end: tonic clients against a real `kiln serve`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use kiln_proto::ingest::v1::write_service_client::WriteServiceClient;
use kiln_proto::ingest::v1::{
    ArrowBatch, Field, LineProtocol, Row, Rows, WriteAck, WriteRequest, WriteResponse, field,
    write_request,
};
use prost::Message;
use serde_json::json;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;

use crate::support::TestServer;

pub(crate) async fn client(server: &TestServer) -> WriteServiceClient<Channel> {
    WriteServiceClient::connect(server.grpc.clone())
        .await
        .expect("connect gRPC")
}

pub(crate) fn float(name: &str, v: f64) -> Field {
    Field {
        name: name.into(),
        value: Some(field::Value::Float(v)),
    }
}

pub(crate) fn row(table: &str, tags: &[(&str, &str)], fields: Vec<Field>, time: i64) -> Row {
    Row {
        table: table.into(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fields,
        time_unix_nano: time,
    }
}

pub(crate) fn rows_request(batch_id: u64, db: &str, rows: Vec<Row>) -> WriteRequest {
    WriteRequest {
        batch_id,
        database: db.into(),
        payload: Some(write_request::Payload::Rows(Rows { rows })),
        accept_partial: false,
    }
}

pub(crate) fn arrow_request(
    batch_id: u64,
    db: &str,
    table: &str,
    batch: &RecordBatch,
    tags: &[&str],
) -> WriteRequest {
    let mut ipc = Vec::new();
    {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &batch.schema()).unwrap();
        w.write(batch).unwrap();
        w.finish().unwrap();
    }
    WriteRequest {
        batch_id,
        database: db.into(),
        payload: Some(write_request::Payload::Arrow(ArrowBatch {
            table: table.into(),
            ipc_stream: ipc.into(),
            tag_columns: tags.iter().map(|t| t.to_string()).collect(),
        })),
        accept_partial: false,
    }
}

fn lp_request(batch_id: u64, db: &str, text: &str) -> WriteRequest {
    WriteRequest {
        batch_id,
        database: db.into(),
        payload: Some(write_request::Payload::LineProtocol(LineProtocol {
            text: text.into(),
            precision: "ns".into(),
        })),
        accept_partial: false,
    }
}

#[tokio::test]
async fn unary_writes_with_each_payload_kind_are_queryable() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let mut c = client(&server).await;

    let resp = c
        .write(rows_request(
            1,
            "edge",
            vec![
                row(
                    "plc",
                    &[("line", "l1"), ("cell", "c1")],
                    vec![float("temp", 20.5)],
                    1_000,
                ),
                row(
                    "plc",
                    &[("line", "l1"), ("cell", "c2")],
                    vec![
                        float("temp", 21.5),
                        Field {
                            name: "ok".into(),
                            value: Some(field::Value::Boolean(true)),
                        },
                    ],
                    2_000,
                ),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (resp.batch_id, resp.rows_written, resp.errors.len()),
        (1, 2, 0)
    );

    let batch = RecordBatch::try_from_iter(vec![
        (
            "time",
            Arc::new(TimestampNanosecondArray::from(vec![3_000, 4_000])) as ArrayRef,
        ),
        ("line", Arc::new(StringArray::from(vec!["l2", "l2"]))),
        ("cell", Arc::new(StringArray::from(vec!["c1", "c2"]))),
        ("temp", Arc::new(Float64Array::from(vec![22.5, 23.5]))),
    ])
    .unwrap();
    let resp = c
        .write(arrow_request(2, "edge", "plc", &batch, &["line", "cell"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.rows_written, 2);

    // Line protocol, gzip-compressed on the wire.
    let mut gz = client(&server)
        .await
        .send_compressed(CompressionEncoding::Gzip);
    let resp = gz
        .write(lp_request(3, "edge", "plc,line=l3,cell=c1 temp=24.5 5000"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.rows_written, 1);

    let rows = server
        .query_json("edge", "SELECT line, cell, temp, ok FROM plc ORDER BY time")
        .await;
    let temps: Vec<_> = rows.iter().map(|r| r["temp"].as_f64().unwrap()).collect();
    assert_eq!(temps, [20.5, 21.5, 22.5, 23.5, 24.5]);
    assert_eq!(rows[1]["ok"], json!(true));
    assert_eq!(rows[3]["line"], json!("l2"));

    // Health service, as load balancers and grpcurl use it.
    let channel = Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "kiln.ingest.v1.WriteService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}

#[tokio::test]
async fn bad_rows_are_invalid_argument_with_per_row_details() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let mut c = client(&server).await;
    c.write(rows_request(
        1,
        "edge",
        vec![row("m", &[("k", "a")], vec![float("v", 1.0)], 1)],
    ))
    .await
    .unwrap();

    let conflicting = vec![
        row("m", &[("k", "b")], vec![float("v", 2.0)], 2),
        row(
            "m",
            &[("k", "c")],
            vec![Field {
                name: "v".into(),
                value: Some(field::Value::String("high".into())),
            }],
            3,
        ),
        row("m", &[("k", "d")], vec![], 4),
    ];
    let status = c
        .write(rows_request(2, "edge", conflicting.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("\"v\""), "{}", status.message());
    let details = WriteResponse::decode(status.details()).unwrap();
    let bad: Vec<u64> = details.errors.iter().map(|e| e.row).collect();
    assert_eq!(bad, vec![2, 3]);
    let rows = server
        .query_json("edge", "SELECT count(*) AS n FROM m")
        .await;
    assert_eq!(
        rows[0]["n"],
        json!(1),
        "nothing of a rejected batch is written"
    );

    let mut partial = rows_request(3, "edge", conflicting);
    partial.accept_partial = true;
    let resp = c.write(partial).await.unwrap().into_inner();
    assert_eq!(resp.rows_written, 1);
    assert_eq!(
        resp.errors.iter().map(|e| e.row).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(resp.errors[1].message.contains("no fields"));

    let mut no_db = rows_request(4, "", vec![row("m", &[], vec![float("v", 1.0)], 1)]);
    no_db.database.clear();
    assert_eq!(
        c.write(no_db).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let status = c
        .write(WriteRequest {
            batch_id: 5,
            database: "edge".into(),
            payload: Some(write_request::Payload::Arrow(ArrowBatch {
                table: "m".into(),
                ipc_stream: b"not arrow".to_vec().into(),
                tag_columns: vec![],
            })),
            accept_partial: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("Arrow IPC"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn oversized_messages_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--max-request-bytes", "10000"]);
    let mut c = client(&server).await;
    let big = "m v=1 1\n".repeat(5000);
    let status = c.write(lp_request(1, "edge", &big)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{}",
        status.message()
    );
    // The server keeps serving.
    c.write(lp_request(2, "edge", "m v=1 1")).await.unwrap();
}

/// Sends `requests` on one stream and returns the acks.
async fn stream_all(server: &TestServer, requests: Vec<WriteRequest>) -> Vec<WriteAck> {
    let mut c = client(server).await;
    let acks = c
        .write_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    futures::StreamExt::collect::<Vec<_>>(acks)
        .await
        .into_iter()
        .map(|a| a.unwrap())
        .collect()
}

fn lp_batch(batch: u64, rows: u64) -> String {
    (0..rows)
        .map(|r| {
            format!(
                "s,gw=g1 batch={batch}i,row={r}i {}\n",
                batch * 1_000_000 + r
            )
        })
        .collect()
}

#[tokio::test]
async fn streamed_batches_are_acked_in_order_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    // Every payload kind on one stream: line protocol, typed rows and Arrow in turn.
    let requests: Vec<_> = (0..30)
        .map(|b| match b % 3 {
            0 => lp_request(b, "edge", &lp_batch(b, 100)),
            1 => rows_request(
                b,
                "edge",
                (0..100)
                    .map(|r| {
                        let fields = vec![
                            Field {
                                name: "batch".into(),
                                value: Some(field::Value::Integer(b as i64)),
                            },
                            Field {
                                name: "row".into(),
                                value: Some(field::Value::Integer(r)),
                            },
                        ];
                        row("s", &[("gw", "g1")], fields, (b * 1_000_000) as i64 + r)
                    })
                    .collect(),
            ),
            _ => {
                let n = 100i64;
                let batch = RecordBatch::try_from_iter(vec![
                    (
                        "time",
                        Arc::new(TimestampNanosecondArray::from_iter_values(
                            (0..n).map(|r| b as i64 * 1_000_000 + r),
                        )) as ArrayRef,
                    ),
                    ("gw", Arc::new(StringArray::from(vec!["g1"; n as usize]))),
                    (
                        "batch",
                        Arc::new(arrow::array::Int64Array::from(vec![b as i64; n as usize])),
                    ),
                    (
                        "row",
                        Arc::new(arrow::array::Int64Array::from_iter_values(0..n)),
                    ),
                ])
                .unwrap();
                arrow_request(b, "edge", "s", &batch, &["gw"])
            }
        })
        .collect();
    let acks = stream_all(&server, requests).await;
    let ids: Vec<u64> = acks.iter().map(|a| a.batch_id).collect();
    assert_eq!(ids, (0..30).collect::<Vec<_>>());
    assert!(
        acks.iter()
            .all(|a| a.durable && a.rows_written == 100 && a.code == 0)
    );
    // A bad batch in the middle gets its own failed ack; the stream goes on.
    let acks = stream_all(
        &server,
        vec![
            lp_request(100, "edge", "s,gw=g2 batch=1i 1"),
            lp_request(101, "edge", "s,gw=g2 batch=oops 2"),
            lp_request(102, "edge", "s,gw=g2 batch=3i 3"),
        ],
    )
    .await;
    assert_eq!(acks.len(), 3);
    assert!(acks[0].durable && acks[2].durable);
    assert!(!acks[1].durable);
    assert_eq!(acks[1].code, Code::InvalidArgument as i32);
    assert_eq!(acks[1].errors[0].row, 1);
    let rows = server
        .query_json("edge", "SELECT count(*) AS n FROM s")
        .await;
    assert_eq!(rows[0]["n"], json!(3002));
    let rows = server
        .query_json(
            "edge",
            "SELECT count(DISTINCT batch) AS batches, sum(row) AS rows FROM s WHERE gw = 'g1'",
        )
        .await;
    assert_eq!(rows[0]["batches"], json!(30));
    assert_eq!(rows[0]["rows"], json!(30 * 4950));
}

#[tokio::test]
async fn a_full_buffer_pauses_the_stream_and_unary_writes_get_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--max-buffer-bytes", "200000"]);
    let requests: Vec<_> = (0..60)
        .map(|b| lp_request(b, "edge", &lp_batch(b, 500)))
        .collect();
    let acks = stream_all(&server, requests).await;
    assert_eq!(acks.len(), 60);
    assert!(
        acks.iter().all(|a| a.durable && a.code == 0),
        "{:?}",
        acks.iter().find(|a| !a.durable)
    );
    let rows = server
        .query_json("edge", "SELECT count(*) AS n FROM s")
        .await;
    assert_eq!(rows[0]["n"], json!(30_000));
    assert!(
        server
            .metric("kiln_grpc_stream_backpressure_waits_total")
            .await
            >= 1.0
    );

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &dir.path().join("data"),
        &["--max-buffer-bytes", "1", "--persist-interval", "1h"],
    );
    let mut c = client(&server).await;
    c.write(lp_request(1, "edge", "m v=1 1")).await.unwrap();
    // Nothing persists the buffer on its own here, so the next unary write is refused.
    let status = c.write(lp_request(2, "edge", "m v=2 2")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("retry later"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_mid_stream_and_resending_unacked_batches_gives_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--persist-buffer-bytes", "200000"];
    const BATCHES: u64 = 400;
    let mut server = TestServer::start(&data, &args);
    let mut acked: BTreeMap<u64, bool> = BTreeMap::new();

    // First connection: stream until the server dies.
    {
        let mut c = client(&server).await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let feeder = tokio::spawn(async move {
            for b in 0..BATCHES {
                if tx
                    .send(lp_request(b, "edge", &lp_batch(b, 50)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut acks = c
            .write_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut killed = false;
        while let Ok(Some(ack)) = acks.message().await {
            assert!(ack.durable, "{ack:?}");
            acked.insert(ack.batch_id, true);
            if acked.len() == 60 && !killed {
                server.kill9();
                killed = true;
            }
        }
        feeder.abort();
        assert!(killed, "the stream ended before the kill");
    }
    assert!(
        acked.len() >= 60 && (acked.len() as u64) < BATCHES,
        "{}",
        acked.len()
    );

    // Reconnect and resend every batch without an ack (including ones that were durable
    // but whose ack was lost).
    let server = TestServer::start(&data, &args);
    let unacked: Vec<_> = (0..BATCHES)
        .filter(|b| !acked.contains_key(b))
        .map(|b| lp_request(b, "edge", &lp_batch(b, 50)))
        .collect();
    let acks = stream_all(&server, unacked).await;
    assert!(acks.iter().all(|a| a.durable));
    assert_eq!(acks.len() + acked.len(), BATCHES as usize);

    let (_, body) = server
        .query("edge", "SELECT batch, row FROM s", "csv")
        .await;
    let mut reader = csv::Reader::from_reader(&body[..]);
    let ids: Vec<(u64, u64)> = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].parse().unwrap(), r[1].parse().unwrap())
        })
        .collect();
    let unique: HashSet<_> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate rows");
    assert_eq!(ids.len() as u64, BATCHES * 50, "missing rows");
}

#[tokio::test]
async fn deadlines_are_honoured_and_shutdown_ends_streams_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("data"), &[]);
    let mut c = client(&server).await;

    // A deadline that has passed before the server starts on the request.
    let mut late = tonic::Request::new(lp_request(1, "edge", "m v=1 1"));
    late.set_timeout(std::time::Duration::from_nanos(1));
    let status = c.write(late).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // An open stream: one batch acknowledged, then the server is asked to stop.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(lp_request(1, "edge", "m v=1 1")).await.unwrap();
    let mut acks = c
        .write_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = acks.message().await.unwrap().unwrap();
    assert!(first.durable, "{first:?}");
    // Off the runtime: the client's connection task must keep running to take part in
    // the server's HTTP/2 graceful shutdown.
    let stopper = tokio::task::spawn_blocking(move || server.terminate());
    let end = acks.message().await;
    let status = end.expect_err("the stream should end with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("resend"), "{status:?}");
    drop(tx);
    stopper.await.unwrap();
}

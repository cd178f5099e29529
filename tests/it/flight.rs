//! Arrow Flight SQL and InfluxDB 3 JSON tickets end to end, with arrow-flight's clients.

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables, SqlInfo};
use arrow_flight::{FlightInfo, Ticket};
use futures::TryStreamExt;
use tonic::transport::Channel;

use crate::support::TestServer;

const LINES: &str = "\
cpu,host=a,region=eu usage=1.5,load=3i 1700000000000000000
cpu,host=b,region=us usage=2.5,load=4i 1700000010000000000
cpu,host=a,region=eu usage=3.5 1700000020000000000
mem,host=a used=10i 1700000000000000000
";

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn flight_sql(
    server: &TestServer,
    database: Option<&str>,
) -> FlightSqlServiceClient<Channel> {
    let mut client = FlightSqlServiceClient::new(channel(server).await);
    if let Some(db) = database {
        client.set_header("database", db);
    }
    client
}

/// Every batch of every endpoint of `info`.
async fn fetch(client: &mut FlightSqlServiceClient<Channel>, info: FlightInfo) -> Vec<RecordBatch> {
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.expect("endpoint has a ticket");
        let stream = client.do_get(ticket).await.unwrap();
        batches.extend(stream.try_collect::<Vec<_>>().await.unwrap());
    }
    batches
}

fn strings(batches: &[RecordBatch], column: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let col =
                arrow::compute::cast(b.column_by_name(column).unwrap(), &DataType::Utf8).unwrap();
            col.as_string::<i32>()
                .iter()
                .map(|v| v.unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn statements_and_prepared_statements_stream_arrow() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let mut client = flight_sql(&server, Some("plant")).await;

    let sql = "SELECT host, usage, load FROM cpu ORDER BY time";
    let info = client.execute(sql.to_owned(), None).await.unwrap();
    let schema = info.clone().try_decode_schema().unwrap();
    assert_eq!(
        schema.field_with_name("usage").unwrap().data_type(),
        &DataType::Float64
    );
    let batches = fetch(&mut client, info).await;
    assert_eq!(batches[0].schema().as_ref(), &schema);
    assert_eq!(strings(&batches, "host"), ["a", "b", "a"]);
    let usage: Vec<f64> = batches
        .iter()
        .flat_map(|b| b.column(1).as_primitive::<Float64Type>().values().to_vec())
        .collect();
    assert_eq!(usage, [1.5, 2.5, 3.5]);

    // Prepared statement, as ADBC always makes one: schema up front, executed twice.
    let mut prepared = client
        .prepare(
            "SELECT count(*) AS n, sum(load) AS load FROM cpu".to_owned(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        prepared.dataset_schema().unwrap().field(0).data_type(),
        &DataType::Int64
    );
    for _ in 0..2 {
        let info = prepared.execute().await.unwrap();
        let batches = fetch(&mut client, info).await;
        assert_eq!(batches[0].column(0).as_primitive::<Int64Type>().value(0), 3);
        assert_eq!(batches[0].column(1).as_primitive::<Int64Type>().value(0), 7);
    }
    prepared.close().await.unwrap();

    // Parameters: announced by the prepared statement, bound per execution.
    let mut prepared = client
        .prepare(
            "SELECT host, usage FROM cpu WHERE host = $1 AND usage > $2 ORDER BY time".to_owned(),
            None,
        )
        .await
        .unwrap();
    let params = prepared.parameter_schema().unwrap().clone();
    assert_eq!(params.fields().len(), 2);
    assert_eq!(params.field(0).name(), "$1");
    assert_eq!(params.field(1).data_type(), &DataType::Float64);
    for (host, min, expected) in [
        ("a", 0.0, vec![1.5, 3.5]),
        ("a", 2.0, vec![3.5]),
        ("b", 0.0, vec![2.5]),
    ] {
        let values = RecordBatch::try_new(
            std::sync::Arc::new(params.clone()),
            vec![
                std::sync::Arc::new(arrow::array::StringArray::from(vec![host])),
                std::sync::Arc::new(arrow::array::Float64Array::from(vec![min])),
            ],
        )
        .unwrap();
        prepared.set_parameters(values).unwrap();
        let info = prepared.execute().await.unwrap();
        let batches = fetch(&mut client, info).await;
        let usage: Vec<f64> = batches
            .iter()
            .flat_map(|b| b.column(1).as_primitive::<Float64Type>().values().to_vec())
            .collect();
        assert_eq!(usage, expected, "host {host}, usage > {min}");
    }
    // Two rows of parameters are refused at the second row, not gathered first.
    let two = RecordBatch::try_new(
        std::sync::Arc::new(params.clone()),
        vec![
            std::sync::Arc::new(arrow::array::StringArray::from(vec!["a", "b"])),
            std::sync::Arc::new(arrow::array::Float64Array::from(vec![0.0, 1.0])),
        ],
    )
    .unwrap();
    prepared.set_parameters(two).unwrap();
    let e = prepared.execute().await.unwrap_err().to_string();
    assert!(
        e.contains("bind one row of parameters per execution"),
        "{e}"
    );
    prepared.close().await.unwrap();

    // Errors: a bad table, bad SQL, and no database header.
    let e = client
        .execute("SELECT * FROM nope".to_owned(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    let e = client
        .execute("SELEC 1".to_owned(), None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("InvalidArgument") || e.to_string().contains("invalid"),
        "{e}"
    );
    let mut anonymous = flight_sql(&server, None).await;
    let e = anonymous.execute(sql.to_owned(), None).await.unwrap_err();
    assert!(e.to_string().contains("database"), "{e}");
}

#[tokio::test]
async fn catalog_metadata_lists_databases_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    server
        .write_ok("lab", "temp,room=1 c=21.5 1700000000000000000\n")
        .await;
    let mut client = flight_sql(&server, None).await;

    let info = client.get_catalogs().await.unwrap();
    let batches = fetch(&mut client, info).await;
    assert_eq!(strings(&batches, "catalog_name"), ["kiln"]);

    let info = client
        .get_db_schemas(CommandGetDbSchemas {
            catalog: None,
            db_schema_filter_pattern: None,
        })
        .await
        .unwrap();
    let batches = fetch(&mut client, info).await;
    let mut schemas = strings(&batches, "db_schema_name");
    schemas.sort();
    assert_eq!(schemas, ["lab", "plant"]);

    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: Some("plant".to_owned()),
            table_name_filter_pattern: Some("c%".to_owned()),
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let batches = fetch(&mut client, info).await;
    assert_eq!(strings(&batches, "table_name"), ["cpu"]);
    assert_eq!(strings(&batches, "table_type"), ["TABLE"]);
    // The table's Arrow schema comes along, IPC-encoded.
    let schema_bytes = batches[0]
        .column_by_name("table_schema")
        .unwrap()
        .as_binary::<i32>()
        .value(0)
        .to_vec();
    let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(&schema_bytes).unwrap();
    assert!(schema.field_with_name("usage").is_ok());

    let info = client
        .get_sql_info(vec![SqlInfo::FlightSqlServerName])
        .await
        .unwrap();
    let batches = fetch(&mut client, info).await;
    assert_eq!(batches[0].num_rows(), 1);
    let value = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    assert!(value.contains("Kiln"), "{value}");
}

#[tokio::test]
async fn influxdb3_json_tickets_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let mut client = FlightServiceClient::new(channel(&server).await);

    let ticket = serde_json::json!({
        "database": "plant",
        "sql_query": "SELECT host, used FROM mem",
        "query_type": "sql",
    });
    let stream = client
        .do_get(Ticket::new(serde_json::to_vec(&ticket).unwrap()))
        .await
        .unwrap()
        .into_inner();
    let batches: Vec<RecordBatch> =
        arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
            stream.map_err(arrow_flight::error::FlightError::from),
        )
        .try_collect()
        .await
        .unwrap();
    assert_eq!(strings(&batches, "host"), ["a"]);
    assert_eq!(strings(&batches, "used"), ["10"]);

    // InfluxQL is not spoken, and an unknown database is NOT_FOUND.
    let influxql = serde_json::json!({"database": "plant", "sql_query": "SHOW MEASUREMENTS", "query_type": "influxql"});
    let e = client
        .do_get(Ticket::new(serde_json::to_vec(&influxql).unwrap()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let unknown = serde_json::json!({"database": "nope", "sql_query": "SELECT 1"});
    let e = client
        .do_get(Ticket::new(serde_json::to_vec(&unknown).unwrap()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}

/// `kiln-dictionaries: keep` sends tags as the dictionaries Kiln stores, in the announced
/// schema and the data alike; without it they are strings. The values are the same.
#[tokio::test]
async fn tags_come_as_dictionaries_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let sql = "SELECT host, region, usage FROM cpu ORDER BY time";
    let dictionary = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let mut answers = Vec::new();
    for (keep, tag_type) in [(false, DataType::Utf8), (true, dictionary)] {
        let mut client = flight_sql(&server, Some("plant")).await;
        if keep {
            client.set_header("kiln-dictionaries", "keep");
        }
        let info = client.execute(sql.to_owned(), None).await.unwrap();
        let schema = info.clone().try_decode_schema().unwrap();
        let batches = fetch(&mut client, info).await;
        for field in ["host", "region"] {
            assert_eq!(
                schema.field_with_name(field).unwrap().data_type(),
                &tag_type
            );
            for b in &batches {
                assert_eq!(b.column_by_name(field).unwrap().data_type(), &tag_type);
            }
        }
        assert_eq!(
            schema.field_with_name("usage").unwrap().data_type(),
            &DataType::Float64
        );
        let prepared = client.prepare(sql.to_owned(), None).await.unwrap();
        assert_eq!(
            prepared
                .dataset_schema()
                .unwrap()
                .field_with_name("host")
                .unwrap()
                .data_type(),
            &tag_type
        );
        answers.push((strings(&batches, "host"), strings(&batches, "region")));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].0, ["a", "b", "a"]);
    assert_eq!(answers[0].1, ["eu", "us", "eu"]);
}

/// The plan `GetFlightInfo` made is run by the `DoGet` that follows, but the data is read
/// then: rows written in between are in the answer. A ticket fetched twice runs twice.
#[tokio::test]
async fn a_ticket_reads_the_data_as_of_its_do_get() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let mut client = flight_sql(&server, Some("plant")).await;
    let info = client
        .execute("SELECT count(*) AS n FROM cpu".to_owned(), None)
        .await
        .unwrap();
    server
        .write_ok("plant", "cpu,host=c usage=9.5 1700000030000000000\n")
        .await;
    let count =
        |batches: Vec<RecordBatch>| batches[0].column(0).as_primitive::<Int64Type>().value(0);
    assert_eq!(count(fetch(&mut client, info.clone()).await), 4);
    server
        .write_ok("plant", "cpu,host=d usage=1.5 1700000040000000000\n")
        .await;
    assert_eq!(
        count(fetch(&mut client, info).await),
        5,
        "planned again, read again"
    );
}

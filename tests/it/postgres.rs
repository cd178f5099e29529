//! The PostgreSQL wire protocol end to end: `tokio-postgres` against a real `kiln serve`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::support::TestServer;

const LINES: &str = "\
cpu,host=a,region=eu usage=1.5,load=3i,ok=true,note=\"fine\" 1700000000000000000
cpu,host=b,region=us usage=2.5,load=4i,ok=false,note=\"hot, very\" 1700000010000000000
cpu,host=a,region=eu usage=3.5 1700000020000000000
";

pub async fn connect(server: &TestServer, database: &str) -> Result<Client, tokio_postgres::Error> {
    let (host, port) = server.pg.rsplit_once(':').expect("host:port");
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host={host} port={port} user=grafana dbname={database} application_name=kiln-tests"
        ),
        NoTls,
    )
    .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Text values of every row of a simple-protocol query.
pub async fn simple_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn sqlstate(e: &tokio_postgres::Error) -> SqlState {
    e.code()
        .unwrap_or_else(|| panic!("no SQLSTATE in {e:?}"))
        .clone()
}

#[tokio::test]
async fn simple_and_extended_queries_return_typed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let client = connect(&server, "plant").await.unwrap();

    // Simple protocol: text values.
    let rows = simple_rows(
        &client,
        "SELECT host, usage, load, ok, time FROM cpu ORDER BY time",
    )
    .await;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0][0].as_deref(), Some("a"));
    assert_eq!(rows[0][1].as_deref(), Some("1.5"));
    assert_eq!(rows[0][2].as_deref(), Some("3"));
    assert_eq!(rows[0][3].as_deref(), Some("t"));
    assert_eq!(rows[0][4].as_deref(), Some("2023-11-14 22:13:20.000000+00"));
    assert_eq!(rows[2][2], None, "a missing field is NULL");

    // Extended protocol: a prepared statement with a parameter, binary results, standard OIDs.
    let stmt = client
        .prepare("SELECT host, usage, load, ok, note, time FROM cpu WHERE host = $1 ORDER BY time")
        .await
        .unwrap();
    let types: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
    assert_eq!(
        types,
        [
            Type::TEXT,
            Type::FLOAT8,
            Type::INT8,
            Type::BOOL,
            Type::TEXT,
            Type::TIMESTAMPTZ
        ]
    );
    assert_eq!(stmt.params(), [Type::TEXT]);
    let rows = client.query(&stmt, &[&"a"]).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>("host"), "a");
    assert_eq!(rows[0].get::<_, f64>("usage"), 1.5);
    assert_eq!(rows[0].get::<_, Option<i64>>("load"), Some(3));
    assert_eq!(rows[0].get::<_, Option<bool>>("ok"), Some(true));
    assert_eq!(
        rows[0].get::<_, Option<String>>("note").as_deref(),
        Some("fine")
    );
    assert_eq!(
        rows[1].get::<_, DateTime<Utc>>("time"),
        DateTime::from_timestamp(1_700_000_020, 0).unwrap()
    );
    assert_eq!(rows[1].get::<_, Option<i64>>("load"), None);
    // The same statement again with another parameter.
    let rows = client.query(&stmt, &[&"b"]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].get::<_, Option<String>>("note").as_deref(),
        Some("hot, very")
    );

    // Parameters of other types, and an aggregate over a time range.
    let row = client
        .query_one(
            "SELECT count(*) AS n, max(usage) AS top FROM cpu WHERE usage > $1 AND time >= $2",
            &[
                &1.0f64,
                &DateTime::from_timestamp(1_700_000_005, 0).unwrap(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>("n"), 2);
    assert_eq!(row.get::<_, f64>("top"), 3.5);
}

#[tokio::test]
async fn what_tools_send_on_connect_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let client = connect(&server, "plant").await.unwrap();

    // Settings tools send first, and what they read back.
    client
        .batch_execute("SET extra_float_digits = 3; SET application_name = 'dbeaver'")
        .await
        .unwrap();
    let rows = simple_rows(&client, "SHOW application_name").await;
    assert_eq!(rows, [[Some("dbeaver".to_owned())]]);
    let rows = simple_rows(&client, "SELECT version()").await;
    let version = rows[0][0].clone().unwrap();
    assert!(version.starts_with("PostgreSQL 16.6 (Kiln "), "{version}");
    let rows = simple_rows(&client, "SELECT current_database(), current_schema()").await;
    assert_eq!(
        rows,
        [[Some("plant".to_owned()), Some("public".to_owned())]]
    );
    // A connection check that is only a comment gets an empty query response.
    let messages = client.simple_query("-- ping").await.unwrap();
    assert!(
        !messages
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(_))),
        "{messages:?}"
    );

    // Schema browsing: the database's tables are in `public`.
    let rows = simple_rows(
        &client,
        "SELECT c.relname FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1",
    )
    .await;
    assert_eq!(rows, [[Some("cpu".to_owned())]]);
    let rows = simple_rows(
        &client,
        "SELECT column_name, data_type FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = 'cpu' ORDER BY column_name",
    )
    .await;
    let columns: Vec<String> = rows.iter().map(|r| r[0].clone().unwrap()).collect();
    assert_eq!(
        columns,
        ["host", "load", "note", "ok", "region", "time", "usage"]
    );
    // Fully qualified names work too.
    let rows = simple_rows(&client, "SELECT count(*) FROM plant.public.cpu").await;
    assert_eq!(rows, [[Some("3".to_owned())]]);
}

#[tokio::test]
async fn errors_carry_sqlstates_and_the_connection_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let client = connect(&server, "plant").await.unwrap();

    let cases = [
        ("SELECT * FROM nope", SqlState::UNDEFINED_TABLE),
        ("SELECT nope FROM cpu", SqlState::UNDEFINED_COLUMN),
        ("SELEC 1", SqlState::SYNTAX_ERROR),
        ("SELECT 1 +", SqlState::SYNTAX_ERROR),
        (
            "SELECT no_such_function(usage) FROM cpu",
            SqlState::UNDEFINED_FUNCTION,
        ),
    ];
    for (sql, code) in &cases {
        let e = client.simple_query(sql).await.unwrap_err();
        assert_eq!(&sqlstate(&e), code, "simple {sql}: {e:?}");
        let e = client.prepare(sql).await.unwrap_err();
        assert_eq!(&sqlstate(&e), code, "extended {sql}: {e:?}");
        let e = e.as_db_error().unwrap();
        assert!(!e.message().is_empty());
    }
    // Still serving, on the same connection.
    let rows = simple_rows(&client, "SELECT count(*) FROM cpu").await;
    assert_eq!(rows, [[Some("3".to_owned())]]);

    // The database in the connection must exist, as in PostgreSQL.
    let e = connect(&server, "nosuchdb").await.unwrap_err();
    assert_eq!(sqlstate(&e), SqlState::INVALID_CATALOG_NAME, "{e:?}");
    let message = e.as_db_error().unwrap().message();
    assert_eq!(message, "database \"nosuchdb\" does not exist");
}

/// A query that takes many seconds before its first (only) row.
const SLOW: &str = "SELECT sum(value) FROM generate_series(1, 5000000000)";

#[tokio::test]
async fn a_cancel_request_and_statement_timeout_stop_a_running_query() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let client = connect(&server, "plant").await.unwrap();

    let cancel = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cancel.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let result = client.simple_query(SLOW).await;
    canceller.await.unwrap().unwrap();
    let e = result.unwrap_err();
    assert_eq!(sqlstate(&e), SqlState::QUERY_CANCELED, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(30));

    client
        .batch_execute("SET statement_timeout = '300ms'")
        .await
        .unwrap();
    let e = client.query(SLOW, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), SqlState::QUERY_CANCELED, "{e:?}");

    // The connection is usable afterwards.
    let rows = simple_rows(&client, "SELECT count(*) FROM cpu").await;
    assert_eq!(rows, [[Some("3".to_owned())]]);
}

/// Grafana's PostgreSQL data source expands its macros client-side and sends plain SQL
/// over the simple protocol; these are the statements of a time-series panel, a table
/// panel, a template variable and the table picker, as Grafana expands them.
#[tokio::test]
async fn grafana_panels_replayed_get_typed_regular_series() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    // Two hosts, a reading every 10 s from 10:00 to 10:59:50 on 2024-05-01.
    let start = 1_714_557_600i64; // 2024-05-01T10:00:00Z
    let mut lines = String::new();
    for i in 0..360i64 {
        for (host, offset) in [("host_0", 0.0), ("host_1", 50.0)] {
            let usage = offset + (i % 6) as f64;
            lines.push_str(&format!(
                "cpu,hostname={host},region=eu usage_user={usage} {}\n",
                (start + i * 10) * 1_000_000_000
            ));
        }
    }
    server.write_ok("benchmark", &lines).await;
    let client = connect(&server, "benchmark").await.unwrap();

    // Data source health check.
    assert_eq!(
        simple_rows(&client, "SELECT 1").await,
        [[Some("1".to_owned())]]
    );

    let time_filter = "time BETWEEN '2024-05-01T10:00:00Z' AND '2024-05-01T11:00:00Z'";
    // Time series panel, `$__timeGroupAlias(time,'1m')` in both of Grafana's spellings.
    for group in [
        r#"floor(extract(epoch from time)/60)*60 AS "time""#,
        r#"time_bucket('60.000s',time) AS "time""#,
    ] {
        let sql = format!(
            "SELECT {group}, hostname AS metric, max(usage_user) AS \"usage_user\" \
             FROM cpu WHERE {time_filter} GROUP BY 1, 2 ORDER BY 1, 2"
        );
        let rows = simple_rows(&client, &sql).await;
        assert_eq!(rows.len(), 120, "{sql}: one row per minute and host");
        assert_eq!(rows[0][1].as_deref(), Some("host_0"));
        let usage = |row: &Vec<Option<String>>| row[2].as_deref().unwrap().parse::<f64>().unwrap();
        assert_eq!(usage(&rows[0]), 5.0);
        assert_eq!(usage(&rows[1]), 55.0);
        // Regular: consecutive minutes.
        let stmt = client.prepare(&sql).await.unwrap();
        let typed = client.query(&stmt, &[]).await.unwrap();
        let column = &stmt.columns()[0];
        assert_eq!(column.name(), "time");
        match column.type_() {
            &Type::FLOAT8 => {
                let t: Vec<f64> = typed.iter().step_by(2).map(|r| r.get(0)).collect();
                assert_eq!(t[0], start as f64);
                assert!(t.windows(2).all(|w| w[1] - w[0] == 60.0), "{t:?}");
            }
            &Type::TIMESTAMPTZ => {
                let t: Vec<DateTime<Utc>> = typed.iter().step_by(2).map(|r| r.get(0)).collect();
                assert_eq!(t[0].timestamp(), start);
                assert!(
                    t.windows(2).all(|w| (w[1] - w[0]).num_seconds() == 60),
                    "{t:?}"
                );
            }
            other => panic!("time column of type {other}"),
        }
        assert_eq!(stmt.columns()[1].type_(), &Type::TEXT);
        assert_eq!(stmt.columns()[2].type_(), &Type::FLOAT8);
    }

    // Table panel.
    let sql = format!(
        "SELECT time, hostname, usage_user FROM cpu WHERE {time_filter} ORDER BY time DESC LIMIT 3"
    );
    let rows = simple_rows(&client, &sql).await;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0][0].as_deref(), Some("2024-05-01 10:59:50.000000+00"));
    let stmt = client.prepare(&sql).await.unwrap();
    assert_eq!(stmt.columns()[0].type_(), &Type::TIMESTAMPTZ);

    // Template variable.
    let rows = simple_rows(&client, "SELECT DISTINCT hostname FROM cpu ORDER BY 1").await;
    assert_eq!(
        rows,
        [[Some("host_0".to_owned())], [Some("host_1".to_owned())]]
    );

    // The query builder's table and column pickers.
    let rows = simple_rows(
        &client,
        "SELECT quote_ident(table_name) AS \"table\" FROM information_schema.tables \
         WHERE quote_ident(table_schema) NOT IN ('information_schema', 'pg_catalog') \
         ORDER BY 1",
    )
    .await;
    // Kiln's own tables are in schema `system`; Grafana's picker shows them qualified
    // (`system.alerts`), as it does every table outside the search path.
    let expected = [
        "alert_events",
        "alert_rules",
        "alerts",
        "cpu",
        "data_quality",
        "deletes",
        "devices",
        "ingesters",
        "series",
        "views",
    ];
    assert_eq!(rows, expected.map(|t| [Some(t.to_owned())]));
    let rows = simple_rows(
        &client,
        "SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\" \
         FROM information_schema.columns WHERE quote_ident(table_name) = 'cpu' ORDER BY 1",
    )
    .await;
    let columns: Vec<&str> = rows.iter().map(|r| r[0].as_deref().unwrap()).collect();
    assert_eq!(columns, ["hostname", "region", "time", "usage_user"]);
}

/// Every query of the dashboard in `deploy/grafana/`, with its macros and variable expanded
/// as Grafana expands them, runs and returns rows.
#[tokio::test]
async fn the_shipped_grafana_dashboard_queries_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let start = 1_451_606_400i64; // 2016-01-01T00:00:00Z, where kiln-bench's data starts
    let mut lines = String::new();
    for i in 0..120i64 {
        for host in ["host_0", "host_1", "host_2"] {
            lines.push_str(&format!(
                "cpu,hostname={host},region=eu-west-1 usage_user={}i,usage_system={}i,usage_idle={}i {}\n",
                i % 100,
                (i * 7) % 100,
                100 - i % 100,
                (start + i * 10) * 1_000_000_000
            ));
        }
    }
    server.write_ok("benchmark", &lines).await;
    let client = connect(&server, "benchmark").await.unwrap();

    let expand = |sql: &str| {
        sql.replace(
            "$__timeGroupAlias(time, '1m')",
            r#"floor(extract(epoch from time)/60)*60 AS "time""#,
        )
        .replace(
            "$__timeFilter(time)",
            "time BETWEEN '2016-01-01T00:00:00Z' AND '2016-01-01T06:00:00Z'",
        )
        .replace("$host", "'host_0','host_1'")
    };
    let panels = dashboard_queries(&client, "tsbs-cpu.json", expand, 3).await;
    assert!(panels.len() >= 4);
}

/// Runs every query of the dashboard `file` in `deploy/grafana/dashboards/`, its macros
/// expanded by `expand`, as Grafana's PostgreSQL data source sends them (prepared);
/// checks each returns rows and a time series' columns, and that its host variable lists
/// `hosts` values. Returns each panel query with its rows.
async fn dashboard_queries(
    client: &tokio_postgres::Client,
    file: &str,
    expand: impl Fn(&str) -> String,
    hosts: usize,
) -> Vec<(String, Vec<tokio_postgres::Row>)> {
    let path = format!(
        "{}/../deploy/grafana/dashboards/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let variable = dashboard["templating"]["list"][0]["query"]
        .as_str()
        .unwrap();
    assert_eq!(
        simple_rows(client, variable).await.len(),
        hosts,
        "{variable}"
    );
    let mut answers = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let sql = expand(target["rawSql"].as_str().unwrap());
            assert!(!sql.contains('$'), "unexpanded macro in {sql}");
            let stmt = client
                .prepare(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            let rows = client.query(&stmt, &[]).await.unwrap();
            assert!(!rows.is_empty(), "no rows from {sql}");
            if target["format"] == "time_series" {
                assert_eq!(stmt.columns()[0].name(), "time", "{sql}");
                assert_eq!(stmt.columns()[1].name(), "metric", "{sql}");
            }
            answers.push((sql, rows));
        }
    }
    answers
}

/// The 30-day dashboard reads the 1-minute roll-up (`cpu_1m`, a materialized view), not
/// the raw table, and shows what the raw table would.
#[tokio::test]
async fn the_30_day_grafana_dashboard_reads_the_roll_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let start = 1_451_606_400i64; // 2016-01-01T00:00:00Z
    // 30 days, 3 hosts, a reading every 5 minutes.
    for day in 0..30i64 {
        let mut lines = String::new();
        for i in 0..288i64 {
            for (h, host) in ["host_0", "host_1", "host_2"].iter().enumerate() {
                let t = start + day * 86_400 + i * 300;
                lines.push_str(&format!(
                    "cpu,hostname={host},region=eu-west-1 usage_user={}i {}\n",
                    (i * 7 + day + h as i64 * 11) % 100,
                    t * 1_000_000_000
                ));
            }
        }
        server.write_ok("benchmark", &lines).await;
    }
    let client = connect(&server, "benchmark").await.unwrap();
    client
        .simple_query(
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT time_bucket('1 minute', time) AS time, \
             hostname, avg(usage_user) AS usage_user, max(usage_user) AS max_usage_user, \
             count(*) AS readings FROM cpu GROUP BY 1, 2",
        )
        .await
        .unwrap();
    let expand = |sql: &str| {
        sql.replace(
            "$__timeGroupAlias(time, '1h')",
            r#"floor(extract(epoch from time)/3600)*3600 AS "time""#,
        )
        .replace(
            "$__timeFilter(time)",
            "time BETWEEN '2016-01-01T00:00:00Z' AND '2016-01-31T00:00:00Z'",
        )
        .replace("$host", "'host_0','host_1'")
    };
    let panels = dashboard_queries(&client, "tsbs-cpu-30d.json", expand, 3).await;
    assert_eq!(panels.len(), 3);
    for (sql, _) in &panels {
        let plan: Vec<String> = simple_rows(&client, &format!("EXPLAIN {sql}"))
            .await
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("KilnScanExec: cpu_1m,"), "{plan}");
        assert!(
            !plan.contains("KilnScanExec: cpu,"),
            "reads the raw table: {plan}"
        );
    }
    // The hourly maximum of 2 hosts over 30 days, as the raw table gives it.
    let raw = panels[0]
        .0
        .replace("max(max_usage_user)", "max(usage_user)")
        .replace("FROM cpu_1m", "FROM cpu");
    let raw = client.query(&raw, &[]).await.unwrap();
    let values = |rows: &[tokio_postgres::Row]| -> Vec<(String, i64)> {
        rows.iter()
            .map(|r| (r.get::<_, String>(1), r.get::<_, i64>(2)))
            .collect()
    };
    assert_eq!(panels[0].1.len(), 30 * 24 * 2);
    assert_eq!(values(&panels[0].1), values(&raw));
    let readings: i64 = panels[2].1[0].get(0);
    assert_eq!(readings, 30 * 288 * 3);
}

/// Tools keep PostgreSQL connections open for hours; a stop must not wait for them (they
/// only read, so closing them loses nothing). With an hour of shutdown timeout, waiting
/// for the idle connection would hang this test.
#[tokio::test]
async fn shutdown_closes_open_postgres_connections() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &["--shutdown-timeout", "1h"]);
    server.write_ok("plant", LINES).await;
    let client = connect(&server, "plant").await.unwrap();
    assert_eq!(
        simple_rows(&client, "SELECT count(*) FROM cpu").await,
        [[Some("3".to_owned())]]
    );

    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || server.terminate()),
    )
    .await;
    assert!(
        stopped.is_ok(),
        "the server waited for an idle PostgreSQL connection"
    );
    stopped.unwrap().unwrap();
    assert!(client.simple_query("SELECT 1").await.is_err());
    assert!(client.is_closed());
}

/// DBeaver, Metabase and Tableau browse schemas through the PostgreSQL JDBC driver, whose
/// `getTables` and `getColumns` are these queries over `pg_catalog` (as pgJDBC 42 sends
/// them, for schema `public` and table `cpu`).
#[tokio::test]
async fn jdbc_schema_browsing_queries_list_tables_and_typed_columns() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    server.write_ok("plant", LINES).await;
    let client = connect(&server, "plant").await.unwrap();

    let get_tables = include_str!("fixtures/pgjdbc_get_tables.sql");
    let rows = client.query(get_tables, &[]).await.unwrap();
    let tables: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.get("table_name"), r.get("table_type")))
        .collect();
    assert_eq!(tables, [("cpu".to_owned(), "TABLE".to_owned())]);

    let get_columns = include_str!("fixtures/pgjdbc_get_columns.sql");
    let stmt = client.prepare(get_columns).await.unwrap();
    let [name, type_id] = ["attname", "atttypid"].map(|c| {
        stmt.columns()
            .iter()
            .position(|col| col.name() == c)
            .unwrap()
    });
    let rows = simple_rows(&client, get_columns).await;
    let columns: Vec<(String, u32)> = rows
        .iter()
        .map(|r| {
            let oid = r[type_id].as_deref().unwrap().parse().unwrap();
            (r[name].clone().unwrap(), oid)
        })
        .collect();
    let oid = |name: &str| columns.iter().find(|(n, _)| n == name).map(|(_, o)| *o);
    assert_eq!(columns.len(), 7, "{columns:?}");
    assert_eq!(oid("time"), Some(Type::TIMESTAMPTZ.oid()));
    assert_eq!(oid("host"), Some(Type::TEXT.oid()));
    assert_eq!(oid("usage"), Some(Type::FLOAT8.oid()));
    assert_eq!(oid("load"), Some(Type::INT8.oid()));
    assert_eq!(oid("ok"), Some(Type::BOOL.oid()));
}

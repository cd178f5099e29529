//! A view equals its query over the source after every refresh, whatever mix of writes,
//! late writes, rewrites of rows, deletes and persistences came before.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, DictionaryArray, Float64Array, RecordBatch, TimestampNanosecondArray,
};
use arrow::datatypes::Int32Type;
use arrow::util::pretty::pretty_format_batches;
use futures::TryStreamExt;
use kiln_storage::Engine;
use kiln_storage::catalog::ColumnType;
use kiln_storage::catalog::tombstones::{DeletePredicate, TagCondition};
use kiln_storage::write::{TableWrite, WriteBatch};
use proptest::prelude::*;

use crate::QueryEngine;

/// 2024-01-01T00:00:00Z.
const T0: i64 = 1_704_067_200_000_000_000;
const MINUTE: i64 = 60_000_000_000;
const HOSTS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    /// Rows (host, minute after T0, value); a minute written before is a rewrite.
    Write(Vec<(usize, i64, i32)>),
    /// Rows of one host (or all), in a span of minutes (or all time).
    Delete(Option<usize>, Option<(i64, i64)>),
    Persist,
    /// The view is refreshed and compared with its query.
    Refresh,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0..3usize, 0..240i64, -50..50i32), 1..20).prop_map(Op::Write),
        1 => (prop::option::of(0..3usize), prop::option::of((0..240i64, 1..90i64)))
            .prop_map(|(h, span)| Op::Delete(h, span.map(|(a, len)| (a, a + len)))),
        1 => Just(Op::Persist),
        2 => Just(Op::Refresh),
    ]
}

async fn write(engine: &Engine, rows: &[(usize, i64, i32)]) {
    let state = engine.catalog_state();
    let def = state.table("db", "m").unwrap();
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("time", ColumnType::Time.arrow_type(), false),
        arrow::datatypes::Field::new("host", ColumnType::Tag.arrow_type(), true),
        arrow::datatypes::Field::new("v", ColumnType::Float.arrow_type(), true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampNanosecondArray::from_iter_values(
            rows.iter().map(|r| T0 + r.1 * MINUTE),
        )),
        Arc::new(
            rows.iter()
                .map(|r| HOSTS[r.0])
                .collect::<DictionaryArray<Int32Type>>(),
        ),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| f64::from(r.2)),
        )),
    ];
    engine
        .write(WriteBatch {
            database: def.database,
            tables: vec![TableWrite {
                table: def.id,
                batch: RecordBatch::try_new(schema, columns).unwrap(),
            }],
            sources: Vec::new(),
        })
        .await
        .unwrap();
}

async fn text(query: &QueryEngine, sql: &str) -> String {
    let batches: Vec<RecordBatch> = query
        .sql("db", sql)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    pretty_format_batches(&batches).unwrap().to_string()
}

const VIEW: &str = "CREATE MATERIALIZED VIEW mv AS SELECT time_bucket('15 minutes', time) AS time, \
     host, sum(v) AS s, count(*) AS n, max(v) AS mx FROM m GROUP BY 1, 2";
const OF_VIEW: &str = "SELECT time, host, s, n, mx FROM mv ORDER BY time, host";
const OF_SOURCE: &str = "SELECT time_bucket('15 minutes', time) AS time, host, sum(v) AS s, \
     count(*) AS n, max(v) AS mx FROM m GROUP BY 1, 2 ORDER BY time, host";

async fn run(ops: Vec<Op>, create_at: usize) {
    let dir = tempfile::tempdir().unwrap();
    let query = crate::test_query_engine(dir.path()).await;
    let engine = Arc::clone(query.engine());
    let mut created = false;
    for (i, op) in ops.iter().chain([&Op::Refresh]).enumerate() {
        if i == create_at.min(ops.len()) {
            query.view_statement("db", VIEW).await.unwrap();
            created = true;
        }
        match op {
            Op::Write(rows) => write(&engine, rows).await,
            Op::Delete(host, span) => {
                let predicate = DeletePredicate {
                    tags: host
                        .map(|h| TagCondition {
                            tag: "host".into(),
                            values: vec![HOSTS[h].into()],
                            negated: false,
                        })
                        .into_iter()
                        .collect(),
                    min_time: span.map_or(i64::MIN, |s| T0 + s.0 * MINUTE),
                    max_time: span.map_or(i64::MAX, |s| T0 + s.1 * MINUTE),
                };
                engine.delete_rows("db", "m", predicate).await.unwrap();
            }
            Op::Persist => {
                engine.persist().await.unwrap();
            }
            Op::Refresh if created => {
                query
                    .view_statement("db", "REFRESH MATERIALIZED VIEW mv")
                    .await
                    .unwrap();
                assert_eq!(
                    text(&query, OF_VIEW).await,
                    text(&query, OF_SOURCE).await,
                    "after {:?}",
                    &ops[..i.min(ops.len())]
                );
            }
            Op::Refresh => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_view_equals_its_query_after_each_refresh(
        ops in prop::collection::vec(op(), 1..25),
        create_at in 0..25usize,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(ops, create_at));
    }
}

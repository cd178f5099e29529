use std::sync::Arc;

use arrow::array::{Array, Int64Array};

async fn count(session: &super::PostgresSession, sql: &str) -> i64 {
    let batches = session
        .context
        .sql(sql)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let column = batches[0].column(0);
    column
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

/// A PostgreSQL session is freed with its connection, `pg_catalog` and
/// `information_schema` (which list the session's own catalogs) included.
#[tokio::test]
async fn a_session_is_freed_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let query = crate::test_query_engine(dir.path()).await;
    let session = query.postgres_session("db").unwrap();
    // Both schemas answer over the session's catalogs while it lives.
    let sql = "SELECT count(*) FROM pg_catalog.pg_class WHERE relname = 'm'";
    assert_eq!(count(&session, sql).await, 1);
    let sql = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'm'";
    assert_eq!(count(&session, sql).await, 3);
    let catalogs = Arc::downgrade(session.context.state().catalog_list());
    let settings = Arc::downgrade(&session.settings);
    drop(session);
    assert!(
        catalogs.upgrade().is_none(),
        "the session's catalogs outlive it"
    );
    assert!(
        settings.upgrade().is_none(),
        "the session's settings outlive it"
    );
}

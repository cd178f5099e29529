//! Databases and tables as managed objects, and their retention, over HTTP and the CLI
//! (the catalog's [`lifecycle`](kiln_storage::catalog::lifecycle) events).
//!
//! | method and path | what | needs |
//! |---|---|---|
//! | `GET /api/v3/configure/database` | every database (with `?deleted=true`, the soft-deleted ones too) | read (the databases the token reads) |
//! | `POST /api/v3/configure/database` | create a database (JSON [`CreateDatabase`]) | admin |
//! | `PATCH /api/v3/configure/database` | change its retention ([`SetRetention`] without `table`) | admin |
//! | `DELETE /api/v3/configure/database?db=&hard_delete=` | soft-delete a database | admin |
//! | `PATCH /api/v3/configure/table` | change a table's retention ([`SetRetention`]) | admin |
//! | `DELETE /api/v3/configure/table?db=&table=&hard_delete=` | soft-delete a table | admin |
//!
//! | `GET`/`POST /api/v3/query_sql` with `q=DELETE FROM …` | delete rows ([`delete_rows`]) | write on the database |
//! | the same with `q=CREATE`/`DROP MATERIALIZED VIEW …` | a continuous aggregate ([`view_statement`]) | admin |
//! | the same with `q=REFRESH MATERIALIZED VIEW …` | refresh it now | write on the database |
//!
//! `hard_delete` says when the files go: `now`, a duration (`24h`), or absent for the
//! server's `--hard-delete-default-duration`.

pub mod cli;

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_storage::catalog::lifecycle::{
    DroppedDatabase, DroppedTable, format_retention, parse_retention,
};
use kiln_storage::catalog::{CatalogState, DatabaseDef};
use serde::{Deserialize, Serialize};

use crate::auth::http::{refusal, require};
use crate::auth::{Action, Principal};
use crate::http::{AppState, error_response as error};

/// `POST /api/v3/configure/database`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDatabase {
    pub db: String,
    /// A duration (`30d`) or `none` (the default: keep forever).
    #[serde(default)]
    pub retention_period: Option<String>,
}

/// `PATCH /api/v3/configure/database` (no `table`) and `/api/v3/configure/table`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRetention {
    pub db: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// A duration (`30d`), or `none`: forever (for a table: as its database).
    pub retention_period: String,
}

/// A database as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseInfo {
    pub name: String,
    /// `none` or a duration.
    pub retention_period: String,
    pub tables: Vec<TableInfo>,
    /// For soft-deleted databases: when they were deleted and when their files go (RFC
    /// 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_delete_at: Option<String>,
}

/// A table as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableInfo {
    pub name: String,
    /// Its own retention, if it has one (`none`: as its database).
    pub retention_period: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_delete_at: Option<String>,
}

/// `?deleted=true` on the list.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    #[serde(default)]
    pub deleted: bool,
}

/// The query of the deletes.
#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    pub db: String,
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub hard_delete: Option<String>,
}

fn time(nanos: i64) -> String {
    kiln_storage::time::rfc3339(nanos)
}

fn describe(state: &CatalogState, db: &DatabaseDef) -> DatabaseInfo {
    DatabaseInfo {
        name: db.name.clone(),
        retention_period: format_retention(db.retention_nanos),
        tables: db
            .tables
            .values()
            .filter_map(|id| state.table_by_id(*id))
            .map(|t| TableInfo {
                name: t.name.clone(),
                retention_period: format_retention(t.retention_nanos),
                deleted_at: None,
                hard_delete_at: None,
            })
            .collect(),
        deleted_at: None,
        hard_delete_at: None,
    }
}

/// A soft-deleted database as listed.
fn dropped_database(db: &DroppedDatabase) -> DatabaseInfo {
    DatabaseInfo {
        name: db.name.clone(),
        retention_period: "none".into(),
        tables: Vec::new(),
        deleted_at: Some(time(db.deleted_at)),
        hard_delete_at: Some(time(db.hard_delete_at)),
    }
}

/// A soft-deleted table as listed.
fn dropped_table(t: &DroppedTable) -> TableInfo {
    TableInfo {
        name: t.def.name.clone(),
        retention_period: format_retention(t.def.retention_nanos),
        deleted_at: Some(time(t.deleted_at)),
        hard_delete_at: Some(time(t.hard_delete_at)),
    }
}

/// Every database `principal` reads, with (when `deleted`) the soft-deleted databases and
/// tables, each as a database of its own entry.
pub fn list_databases(
    state: &CatalogState,
    principal: &Principal,
    deleted: bool,
) -> Vec<DatabaseInfo> {
    let mut out: Vec<DatabaseInfo> = state
        .databases
        .values()
        .filter(|db| principal.allows(Action::Read(&db.name)))
        .map(|db| describe(state, db))
        .collect();
    if !deleted {
        return out;
    }
    for db in state.dropped_databases.values() {
        if !principal.allows(Action::Read(&db.name)) {
            continue;
        }
        out.push(dropped_database(db));
    }
    // Tables deleted on their own, under their database (live or deleted) by id.
    for t in state.dropped_tables.values() {
        let with_database = state
            .dropped_databases
            .values()
            .any(|d| d.tables.contains(&t.def.id));
        if with_database || !principal.allows(Action::Read(&t.database)) {
            continue;
        }
        let info = dropped_table(t);
        let live = state
            .databases
            .values()
            .find(|d| d.id == t.def.database)
            .map(|d| d.name.clone());
        let deleted = state
            .dropped_databases
            .get(&t.def.database)
            .map(|d| time(d.deleted_at));
        let entry = out.iter_mut().find(|d| {
            d.name == t.database
                && match (&live, &deleted) {
                    (Some(_), _) => d.deleted_at.is_none(),
                    (None, Some(at)) => d.deleted_at.as_ref() == Some(at),
                    (None, None) => false,
                }
        });
        match entry {
            Some(db) => db.tables.push(info),
            // Its database is gone for good: the table is listed on its own.
            None => out.push(DatabaseInfo {
                name: t.database.clone(),
                retention_period: "none".into(),
                tables: vec![info],
                deleted_at: Some(time(t.deleted_at)),
                hard_delete_at: None,
            }),
        }
    }
    out
}

/// When the files of the delete `params` asks for go.
fn hard_delete_of(s: &AppState, params: &DeleteParams) -> Result<i64, String> {
    hard_delete_at(
        params.hard_delete.as_deref(),
        s.hard_delete_default,
        kiln_storage::now_nanos(),
    )
}

/// When a delete's files go: `now`, after a duration, or after the server's default.
pub fn hard_delete_at(text: Option<&str>, default: Duration, now: i64) -> Result<i64, String> {
    let after = match text.map(str::trim) {
        None | Some("") | Some("default") => default,
        Some("now") => Duration::ZERO,
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            format!("invalid hard_delete {text:?} (now, default, or a duration like 24h): {e}")
        })?,
    };
    let after = i64::try_from(after.as_nanos()).unwrap_or(i64::MAX);
    Ok(now.saturating_add(after))
}

fn catalog_error(e: kiln_storage::catalog::Error) -> Response {
    use kiln_storage::catalog::Error as E;
    match e {
        E::DatabaseNotFound(_) | E::TableNotFound { .. } => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        E::DatabaseExists(_) => error(StatusCode::CONFLICT, e.to_string()),
        E::InvalidName { .. } | E::InvalidRetention(_) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        E::LimitExceeded(_) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        e => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            kiln_storage::error_chain(&e),
        ),
    }
}

fn engine_error(e: kiln_storage::engine::Error) -> Response {
    match e {
        kiln_storage::engine::Error::Catalog(e) => catalog_error(e),
        e => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            kiln_storage::error_chain(&e),
        ),
    }
}

/// `GET /api/v3/configure/database`.
pub async fn list(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(params): Query<ListParams>,
) -> Response {
    let state = s.engine.catalog_state();
    Json(list_databases(&state, &principal, params.deleted)).into_response()
}

/// `POST /api/v3/configure/database`.
pub async fn create(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Json(request): Json<CreateDatabase>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let retention = match request.retention_period.as_deref().map(parse_retention) {
        None => None,
        Some(Ok(r)) => r,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    match s
        .engine
        .catalog()
        .create_database(&request.db, retention)
        .await
    {
        Ok(db) => (
            StatusCode::CREATED,
            Json(describe(&s.engine.catalog_state(), &db)),
        )
            .into_response(),
        Err(e) => catalog_error(e),
    }
}

/// `PATCH /api/v3/configure/database` and `/api/v3/configure/table`.
pub async fn set_retention(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Json(request): Json<SetRetention>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let retention = match parse_retention(&request.retention_period) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match s
        .engine
        .catalog()
        .set_retention(&request.db, request.table.as_deref(), retention)
        .await
    {
        Ok(state) => match state.database(&request.db) {
            Some(db) => Json(describe(&state, db)).into_response(),
            None => error(StatusCode::NOT_FOUND, "the database was deleted meanwhile"),
        },
        Err(e) => catalog_error(e),
    }
}

/// `DELETE /api/v3/configure/database`.
pub async fn delete_database(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(params): Query<DeleteParams>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let at = match hard_delete_of(&s, &params) {
        Ok(at) => at,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match s.engine.delete_database(&params.db, at).await {
        Ok(db) => Json(dropped_database(&db)).into_response(),
        Err(e) => engine_error(e),
    }
}

/// `DELETE /api/v3/configure/table`.
pub async fn delete_table(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(params): Query<DeleteParams>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let Some(table) = params.table.as_deref() else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter `table`");
    };
    let at = match hard_delete_of(&s, &params) {
        Ok(at) => at,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match s.engine.delete_table(&params.db, table, at).await {
        Ok(t) => Json(dropped_table(&t)).into_response(),
        Err(e) => engine_error(e),
    }
}

/// What a `DELETE` over HTTP answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteAnswer {
    pub table: String,
    /// Rows it matched (and deleted); 0: nothing matched, nothing was recorded.
    pub deleted: u64,
    /// The delete as Kiln understood it (`sensor IN ('s1') AND time >= …`).
    pub predicate: String,
}

/// `DELETE FROM t WHERE …` sent to `/api/v3/query_sql`: needs the right to write `db`.
pub async fn delete_rows(s: &AppState, principal: &Principal, db: &str, sql: &str) -> Response {
    if let Err(e) = require(&s.auth, principal, Action::Write(db)) {
        return refusal(&e);
    }
    // Counting the rows it matches reads the database: allowed by the right to write it.
    match s.query.delete(db, sql).await {
        Ok(deleted) => Json(DeleteAnswer {
            table: deleted.table,
            deleted: deleted.rows,
            predicate: deleted.predicate.to_string(),
        })
        .into_response(),
        Err(e) => crate::http::query_error(e).into_response(),
    }
}

/// What `/api/v3/query_sql` answers to a view statement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewStatementAnswer {
    /// `CREATE MATERIALIZED VIEW`, `DROP …` or `REFRESH …`.
    pub statement: String,
    pub view: String,
    /// Rows written to the view (its first refresh, or this refresh).
    pub rows: u64,
}

/// `CREATE`, `DROP` or `REFRESH MATERIALIZED VIEW` sent to `/api/v3/query_sql`.
pub async fn view_statement(
    s: &AppState,
    principal: &Principal,
    db: &str,
    sql: &str,
    statement: kiln_query::views::ViewStatement,
) -> Response {
    if let Err(e) = require(&s.auth, principal, Action::of_view_statement(statement, db)) {
        return refusal(&e);
    }
    match s.query.view_statement(db, sql).await {
        Ok(answer) => Json(ViewStatementAnswer {
            statement: answer.statement.tag().to_owned(),
            view: answer.view,
            rows: answer.rows,
        })
        .into_response(),
        Err(e) => crate::http::query_error(e).into_response(),
    }
}

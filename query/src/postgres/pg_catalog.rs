//! `pg_catalog` tables whose shape tools depend on.
//!
//! `datafusion-pg-catalog` serves `pg_index` and `pg_constraint` as dumped from a
//! PostgreSQL server: its own system indexes and constraints, with their `int2vector`,
//! `oidvector` and array columns as text. Tools unnest those columns (SQLAlchemy's primary
//! key, unique constraint and index reflection: `unnest(pg_index.indkey)`), which text
//! cannot plan, and the rows describe PostgreSQL's tables, not Kiln's. Kiln has no indexes
//! or constraints, so a PostgreSQL session sees both tables empty, with PostgreSQL's
//! array types. `pg_class` gains the columns it lacks that tools select (`reloptions`,
//! `relacl`: NULL, as for a table created without options or grants). `pg_settings` lists
//! the connection's [`PgSettings`], the values `current_setting()` and `SHOW` give (pgJDBC
//! reads `max_index_keys` there before reflecting keys). Every other table is as the crate
//! serves it.
//!
//! [`install`] sets a session up as the crate's `setup_pg_catalog` does, except that the
//! crate's static tables (PostgreSQL's own rows of `pg_proc`, `pg_type`, … some
//! megabytes once decoded) are decoded once per process and shared by every session, and
//! the session's catalogs are seen weakly (see `WeakCatalogList`).

use std::sync::{Arc, OnceLock};

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema};
use async_trait::async_trait;
use datafusion::catalog::view::ViewTable;
use datafusion::catalog::{CatalogProviderList, MemTable, SchemaProvider, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::provider_as_source;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};
use datafusion::prelude::SessionContext;
use datafusion_pg_catalog::pg_catalog as crate_pg;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::{PgCatalogSchemaProvider, PgCatalogStaticTables};

use super::settings::PgSettings;

/// Gives `ctx` the schema `pg_catalog` in catalog `database` (the crate's tables as
/// [`KilnPgCatalog`] amends them, over `catalogs`) and the crate's functions and type
/// names, as `datafusion_pg_catalog::setup_pg_catalog` does.
pub fn install(
    ctx: &SessionContext,
    database: &str,
    catalogs: Arc<dyn CatalogProviderList>,
    settings: Arc<PgSettings>,
) -> Result<()> {
    let tables = static_tables()?;
    let crate_schema =
        PgCatalogSchemaProvider::try_new(catalogs, Arc::clone(&tables), EmptyContextProvider)?;
    ctx.catalog(database)
        .ok_or_else(|| DataFusionError::Plan(format!("no catalog {database}")))?
        .register_schema(
            "pg_catalog",
            Arc::new(KilnPgCatalog::new(Arc::new(crate_schema), settings)),
        )?;
    for udf in [
        crate_pg::create_current_database_udf(database),
        crate_pg::create_current_schema_udf(),
        crate_pg::create_current_schemas_udf(),
        crate_pg::create_pg_get_userbyid_udf(),
        crate_pg::has_privilege_udf::create_has_privilege_udf("has_table_privilege"),
        crate_pg::has_privilege_udf::create_has_privilege_udf("has_schema_privilege"),
        crate_pg::has_privilege_udf::create_has_privilege_udf("has_database_privilege"),
        crate_pg::has_privilege_udf::create_has_privilege_udf("has_any_column_privilege"),
        crate_pg::create_pg_table_is_visible(),
        crate_pg::format_type::create_format_type_udf(),
        crate_pg::create_session_user_udf(),
        crate_pg::pg_get_expr_udf::create_pg_get_expr_udf(),
        crate_pg::create_pg_get_partkeydef_udf(),
        crate_pg::create_pg_relation_is_publishable_udf(),
        crate_pg::create_pg_get_statisticsobjdef_columns_udf(),
        crate_pg::create_pg_encoding_to_char_udf(),
        crate_pg::create_pg_backend_pid_udf(),
        crate_pg::create_pg_relation_size_udf(),
        crate_pg::create_pg_total_relation_size_udf(),
        crate_pg::create_pg_stat_get_numscans(),
        crate_pg::create_pg_get_constraintdef(),
        crate_pg::create_pg_get_partition_ancestors_udf(),
        crate_pg::quote_ident_udf::create_quote_ident_udf(),
        crate_pg::quote_ident_udf::create_parse_ident_udf(),
        crate_pg::array_bounds_udf::create_array_upper_udf(),
        crate_pg::array_bounds_udf::create_array_lower_udf(),
    ] {
        ctx.register_udf(udf);
    }
    ctx.register_udtf("pg_get_keywords", Arc::clone(&tables.pg_get_keywords) as _);
    // `regclass`, `regproc` and the other oid alias types parse (as int4).
    let state = ctx.state_ref();
    let with_oid_types = SessionStateBuilder::new_from_existing(state.read().clone())
        .with_type_planner(Arc::new(crate_pg::oid_type_planner::PgOidTypePlanner))
        .build();
    *state.write() = with_oid_types;
    // `generate_series` and `range` take int4 bounds.
    crate_pg::generate_series_arg_coercion::CoerceIntArgsToBigInt::widen(ctx);
    Ok(())
}

/// The crate's static tables, decoded on first use and shared by every session.
fn static_tables() -> Result<Arc<PgCatalogStaticTables>> {
    static TABLES: OnceLock<Arc<PgCatalogStaticTables>> = OnceLock::new();
    if let Some(tables) = TABLES.get() {
        return Ok(Arc::clone(tables));
    }
    let tables = Arc::new(PgCatalogStaticTables::try_new()?);
    Ok(Arc::clone(TABLES.get_or_init(|| tables)))
}

/// Array columns of the tables Kiln serves empty, with their element type.
const ARRAY_COLUMNS: &[(&str, &[(&str, DataType)])] = &[
    (
        "pg_index",
        &[
            ("indkey", DataType::Int16),
            ("indcollation", DataType::Int32),
            ("indclass", DataType::Int32),
            ("indoption", DataType::Int16),
        ],
    ),
    (
        "pg_constraint",
        &[
            ("conkey", DataType::Int16),
            ("confkey", DataType::Int16),
            ("conpfeqop", DataType::Int32),
            ("conppeqop", DataType::Int32),
            ("conffeqop", DataType::Int32),
            ("confdelsetcols", DataType::Int16),
            ("conexclop", DataType::Int32),
        ],
    ),
];

/// Columns of PostgreSQL's `pg_class` the crate's lacks, with their types.
fn pg_class_missing() -> Vec<(&'static str, DataType)> {
    vec![
        ("relacl", DataType::Utf8),
        ("reloptions", DataType::new_list(DataType::Utf8, true)),
    ]
}

/// `table` with NULL columns added after its own.
fn with_null_columns(
    table: Arc<dyn TableProvider>,
    columns: &[(&str, DataType)],
) -> Result<Arc<dyn TableProvider>> {
    let mut exprs: Vec<Expr> = table
        .schema()
        .fields()
        .iter()
        .map(|f| col(f.name()))
        .collect();
    for (name, data_type) in columns {
        exprs.push(lit(ScalarValue::try_from(data_type)?).alias(*name));
    }
    let plan = LogicalPlanBuilder::scan("pg_class", provider_as_source(table), None)?
        .project(exprs)?
        .build()?;
    Ok(Arc::new(ViewTable::new(plan, None)))
}

/// An empty table with `table`'s columns (and their oid metadata), `arrays` typed as
/// arrays of their element type.
fn empty_with_arrays(
    table: &dyn TableProvider,
    arrays: &[(&str, DataType)],
) -> Result<Arc<dyn TableProvider>> {
    let fields: Vec<Field> = table
        .schema()
        .fields()
        .iter()
        .map(|f| match arrays.iter().find(|(c, _)| c == f.name()) {
            Some((_, element)) => {
                Field::new(f.name(), DataType::new_list(element.clone(), true), true)
                    .with_metadata(f.metadata().clone())
            }
            None => f.as_ref().clone(),
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?))
}

/// `pg_catalog` with Kiln's `pg_index` and `pg_constraint` (see the module docs).
#[derive(Debug)]
pub struct KilnPgCatalog {
    inner: Arc<dyn SchemaProvider>,
    settings: Arc<PgSettings>,
}

impl KilnPgCatalog {
    pub fn new(inner: Arc<dyn SchemaProvider>, settings: Arc<PgSettings>) -> Self {
        Self { inner, settings }
    }

    /// `pg_settings` as of now, in the crate's columns: name, setting and source given.
    fn settings_table(&self, table: &dyn TableProvider) -> Result<Arc<dyn TableProvider>> {
        let schema = table.schema();
        let all = self.settings.all();
        let strings = |values: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(values)) };
        let columns = schema
            .fields()
            .iter()
            .map(|field| match field.name().as_str() {
                "name" => strings(all.iter().map(|(name, ..)| name.as_str()).collect()),
                "setting" | "reset_val" => {
                    strings(all.iter().map(|(_, value, _)| value.as_str()).collect())
                }
                "source" => strings(all.iter().map(|(.., source)| *source).collect()),
                _ => new_null_array(field.data_type(), all.len()),
            })
            .collect();
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
        Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
    }
}

#[async_trait]
impl SchemaProvider for KilnPgCatalog {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let Some(table) = self.inner.table(name).await? else {
            return Ok(None);
        };
        let lower = name.to_ascii_lowercase();
        if lower == "pg_class" {
            return Ok(Some(with_null_columns(table, &pg_class_missing())?));
        }
        if lower == "pg_settings" {
            return Ok(Some(self.settings_table(table.as_ref())?));
        }
        match ARRAY_COLUMNS.iter().find(|(t, _)| *t == lower) {
            Some((_, arrays)) => Ok(Some(empty_with_arrays(table.as_ref(), arrays)?)),
            None => Ok(Some(table)),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

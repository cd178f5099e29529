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

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema};
use async_trait::async_trait;
use datafusion::catalog::view::ViewTable;
use datafusion::catalog::{MemTable, SchemaProvider, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::provider_as_source;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};

use super::settings::PgSettings;

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

//! `information_schema` as PostgreSQL clients read it.
//!
//! DataFusion's `information_schema` names column types as Arrow does (`Float64`,
//! `Timestamp(ns, "UTC")`, `Dictionary(Int32, Utf8)`) and counts columns from 0. Tools that
//! speak PostgreSQL read `information_schema.columns` for PostgreSQL's names: Grafana's
//! query builder finds the time column by `data_type = 'timestamp with time zone'` and
//! offers number columns by `double precision` or `bigint`. In a PostgreSQL session this
//! schema answers `columns` itself, with the type PostgreSQL clients receive on the wire
//! (`arrow-pg`'s mapping, the one results are encoded with), and leaves every other table
//! (`tables`, `schemata`, `views`, `df_settings`, …) to DataFusion's.

use std::sync::Arc;

use arrow::array::{Int32Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::information_schema::{INFORMATION_SCHEMA, InformationSchemaProvider};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, SchemaProvider, TableProvider,
};
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;

/// A PostgreSQL session's catalog: its schemas, and [`PgInformationSchema`] when asked for
/// `information_schema` by name. That schema is not listed among the schemas, so
/// `pg_namespace` and `pg_class` (which list them) show the database's own, as with
/// DataFusion's `information_schema`.
#[derive(Debug, Default)]
pub struct PgDatabaseCatalog {
    schemas: MemoryCatalogProvider,
    information_schema: std::sync::OnceLock<Arc<dyn SchemaProvider>>,
}

impl PgDatabaseCatalog {
    /// Answers `information_schema` with PostgreSQL's column types for the catalogs of
    /// `catalogs` (the session's).
    pub fn set_information_schema(&self, catalogs: Arc<dyn CatalogProviderList>) {
        let _ = self
            .information_schema
            .set(Arc::new(PgInformationSchema::new(catalogs)));
    }
}

impl CatalogProvider for PgDatabaseCatalog {
    fn schema_names(&self) -> Vec<String> {
        self.schemas.schema_names()
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name.eq_ignore_ascii_case(INFORMATION_SCHEMA)
            && let Some(schema) = self.information_schema.get()
        {
            return Some(Arc::clone(schema));
        }
        self.schemas.schema(name)
    }

    fn register_schema(
        &self,
        name: &str,
        schema: Arc<dyn SchemaProvider>,
    ) -> Result<Option<Arc<dyn SchemaProvider>>> {
        self.schemas.register_schema(name, schema)
    }
}

/// The `information_schema` of a PostgreSQL session (see the module docs).
#[derive(Debug)]
pub struct PgInformationSchema {
    catalogs: Arc<dyn CatalogProviderList>,
    datafusion: InformationSchemaProvider,
}

impl PgInformationSchema {
    pub fn new(catalogs: Arc<dyn CatalogProviderList>) -> Self {
        Self {
            datafusion: InformationSchemaProvider::new(Arc::clone(&catalogs)),
            catalogs,
        }
    }
}

#[async_trait]
impl SchemaProvider for PgInformationSchema {
    fn table_names(&self) -> Vec<String> {
        self.datafusion.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if !name.eq_ignore_ascii_case("columns") {
            return self.datafusion.table(name).await;
        }
        let columns = Arc::new(Columns {
            schema: columns_schema(),
            catalogs: Arc::clone(&self.catalogs),
        });
        Ok(Some(Arc::new(StreamingTable::try_new(
            columns_schema(),
            vec![columns],
        )?)))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.datafusion.table_exist(name)
    }
}

/// PostgreSQL's `information_schema.columns`, the columns tools read.
fn columns_schema() -> SchemaRef {
    let text = |name| Field::new(name, DataType::Utf8, false);
    let optional_text = |name| Field::new(name, DataType::Utf8, true);
    let number = |name| Field::new(name, DataType::Int32, true);
    Arc::new(Schema::new(vec![
        text("table_catalog"),
        text("table_schema"),
        text("table_name"),
        text("column_name"),
        Field::new("ordinal_position", DataType::Int32, false),
        optional_text("column_default"),
        text("is_nullable"),
        text("data_type"),
        number("character_maximum_length"),
        number("character_octet_length"),
        number("numeric_precision"),
        number("numeric_precision_radix"),
        number("numeric_scale"),
        number("datetime_precision"),
        optional_text("interval_type"),
        text("udt_catalog"),
        text("udt_schema"),
        text("udt_name"),
        text("is_identity"),
        text("is_generated"),
        text("is_updatable"),
    ]))
}

/// How PostgreSQL describes a column of an Arrow type: `(data_type, udt_name)`.
pub fn postgres_type_names(data_type: &DataType) -> (&'static str, String) {
    let udt = arrow_pg::datatypes::into_pg_type(data_type)
        .map(|t| t.name().to_owned())
        .unwrap_or_else(|_| "text".to_owned());
    let sql = match udt.as_str() {
        "bool" => "boolean",
        "int2" => "smallint",
        "int4" => "integer",
        "int8" => "bigint",
        "float4" => "real",
        "float8" => "double precision",
        "numeric" => "numeric",
        "text" => "text",
        "varchar" => "character varying",
        "bytea" => "bytea",
        "date" => "date",
        "time" => "time without time zone",
        "timestamp" => "timestamp without time zone",
        "timestamptz" => "timestamp with time zone",
        "interval" => "interval",
        name if name.starts_with('_') => "ARRAY",
        _ => "USER-DEFINED",
    };
    (sql, udt)
}

#[derive(Debug)]
struct Columns {
    schema: SchemaRef,
    catalogs: Arc<dyn CatalogProviderList>,
}

impl PartitionStream for Columns {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let catalogs = Arc::clone(&self.catalogs);
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::once(async move { columns(schema, catalogs).await }),
        ))
    }
}

async fn columns(schema: SchemaRef, catalogs: Arc<dyn CatalogProviderList>) -> Result<RecordBatch> {
    let mut rows = ColumnsBuilder::default();
    for catalog_name in catalogs.catalog_names() {
        let Some(catalog) = catalogs.catalog(&catalog_name) else {
            continue;
        };
        for schema_name in catalog.schema_names() {
            if schema_name == INFORMATION_SCHEMA {
                continue;
            }
            let Some(tables) = catalog.schema(&schema_name) else {
                continue;
            };
            let mut names = tables.table_names();
            names.sort();
            for table_name in names {
                let Some(table) = tables.table(&table_name).await? else {
                    continue;
                };
                for (i, field) in table.schema().fields().iter().enumerate() {
                    rows.add([&catalog_name, &schema_name, &table_name], i + 1, field);
                }
            }
        }
    }
    rows.finish(schema)
}

/// The rows of [`columns_schema`], column by column.
#[derive(Default)]
struct ColumnsBuilder {
    table_catalog: StringBuilder,
    table_schema: StringBuilder,
    table_name: StringBuilder,
    column_name: StringBuilder,
    ordinal_position: Int32Builder,
    column_default: StringBuilder,
    is_nullable: StringBuilder,
    data_type: StringBuilder,
    character_maximum_length: Int32Builder,
    character_octet_length: Int32Builder,
    numeric_precision: Int32Builder,
    numeric_precision_radix: Int32Builder,
    numeric_scale: Int32Builder,
    datetime_precision: Int32Builder,
    interval_type: StringBuilder,
    udt_catalog: StringBuilder,
    udt_schema: StringBuilder,
    udt_name: StringBuilder,
    is_identity: StringBuilder,
    is_generated: StringBuilder,
    is_updatable: StringBuilder,
}

impl ColumnsBuilder {
    /// One column, `position` counted from 1 as PostgreSQL does.
    fn add(&mut self, [catalog, schema, table]: [&str; 3], position: usize, field: &Field) {
        let (data_type, udt_name) = postgres_type_names(field.data_type());
        // Binary precision of integers and floats, as PostgreSQL gives it; integers have
        // scale 0.
        let (precision, scale) = match udt_name.as_str() {
            "int2" => (Some(16), Some(0)),
            "int4" => (Some(32), Some(0)),
            "int8" => (Some(64), Some(0)),
            "float4" => (Some(24), None),
            "float8" => (Some(53), None),
            _ => (None, None),
        };
        let datetime_precision = match udt_name.as_str() {
            "date" => Some(0),
            "time" | "timestamp" | "timestamptz" | "interval" => Some(6),
            _ => None,
        };
        self.table_catalog.append_value(catalog);
        self.table_schema.append_value(schema);
        self.table_name.append_value(table);
        self.column_name.append_value(field.name());
        self.ordinal_position
            .append_value(i32::try_from(position).unwrap_or(i32::MAX));
        self.column_default.append_null();
        self.is_nullable
            .append_value(if field.is_nullable() { "YES" } else { "NO" });
        self.data_type.append_value(data_type);
        self.character_maximum_length.append_null();
        // PostgreSQL's largest text value, 1 GiB.
        self.character_octet_length
            .append_option((udt_name == "text").then_some(1 << 30));
        self.numeric_precision.append_option(precision);
        self.numeric_precision_radix
            .append_option(precision.map(|_| 2));
        self.numeric_scale.append_option(scale);
        self.datetime_precision.append_option(datetime_precision);
        self.interval_type.append_null();
        self.udt_catalog.append_value(catalog);
        self.udt_schema.append_value("pg_catalog");
        self.udt_name.append_value(&udt_name);
        self.is_identity.append_value("NO");
        self.is_generated.append_value("NEVER");
        self.is_updatable.append_value("NO");
    }

    fn finish(mut self, schema: SchemaRef) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(self.table_catalog.finish()),
                Arc::new(self.table_schema.finish()),
                Arc::new(self.table_name.finish()),
                Arc::new(self.column_name.finish()),
                Arc::new(self.ordinal_position.finish()),
                Arc::new(self.column_default.finish()),
                Arc::new(self.is_nullable.finish()),
                Arc::new(self.data_type.finish()),
                Arc::new(self.character_maximum_length.finish()),
                Arc::new(self.character_octet_length.finish()),
                Arc::new(self.numeric_precision.finish()),
                Arc::new(self.numeric_precision_radix.finish()),
                Arc::new(self.numeric_scale.finish()),
                Arc::new(self.datetime_precision.finish()),
                Arc::new(self.interval_type.finish()),
                Arc::new(self.udt_catalog.finish()),
                Arc::new(self.udt_schema.finish()),
                Arc::new(self.udt_name.finish()),
                Arc::new(self.is_identity.finish()),
                Arc::new(self.is_generated.finish()),
                Arc::new(self.is_updatable.finish()),
            ],
        )?)
    }
}

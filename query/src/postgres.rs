//! Sessions laid out the way PostgreSQL clients expect.
//!
//! A PostgreSQL client connects to one database and finds its tables in schema `public`,
//! next to `pg_catalog` and `information_schema`. So a PostgreSQL session has a single
//! catalog named after the Kiln database, whose `public` schema is that database's tables:
//!
//! ```text
//!  catalog <database> ─┬─ public              (Kiln's tables: cpu, mem, …)
//!                      ├─ pg_catalog          (pg_class, pg_namespace, pg_type, …)
//!                      └─ information_schema  (tables, columns, …)
//! ```
//!
//! That is what psql's `\dt` and `\d cpu`, DBeaver's, Metabase's and Superset's schema
//! browsers, and Grafana's PostgreSQL data source query. `version()` answers as a
//! PostgreSQL server does, since tools read it to pick their SQL dialect.

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::setup_pg_catalog;

use crate::provider::KilnSchema;
use crate::{Error, QueryEngine};

/// The schema that holds a database's tables in a PostgreSQL session.
pub const PUBLIC_SCHEMA: &str = "public";

/// The PostgreSQL version Kiln reports; its SQL is closest to this release's.
pub const POSTGRES_VERSION: &str = "16.6";

/// `server_version` as sent in the startup parameters.
pub fn server_version() -> String {
    format!("{POSTGRES_VERSION} (Kiln {})", env!("CARGO_PKG_VERSION"))
}

impl QueryEngine {
    /// A session for a PostgreSQL client connected to `database` (see the module docs).
    pub fn postgres_session(&self, database: &str) -> Result<SessionContext, Error> {
        self.require_database(database)?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema(database, PUBLIC_SCHEMA)
            .with_create_default_catalog_and_schema(false);
        let ctx = self.context(config);
        let catalog = MemoryCatalogProvider::new();
        catalog.register_schema(
            PUBLIC_SCHEMA,
            Arc::new(KilnSchema::new(Arc::clone(&self.engine), database)),
        )?;
        ctx.register_catalog(database, Arc::new(catalog));
        self.register_storage_and_functions(&ctx);
        setup_pg_catalog(&ctx, database, EmptyContextProvider)
            .map_err(|e| Error::Internal(format!("setting up pg_catalog: {e}")))?;
        ctx.register_udf(version());
        Ok(ctx)
    }
}

/// `version()` as PostgreSQL words it: `PostgreSQL 16.6 (Kiln 0.1.0) on …`.
fn version() -> ScalarUDF {
    let text = format!(
        "PostgreSQL {} on {}-{}, 64-bit",
        server_version(),
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(text.clone()))))),
    )
}

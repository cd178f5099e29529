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
//! browsers, Grafana's PostgreSQL data source and SQLAlchemy's inspector query. What Kiln
//! adds to `datafusion-pg-catalog`'s catalog:
//!
//! * [`information_schema`]: column types by their PostgreSQL names;
//! * [`pg_catalog`]: `pg_index` and `pg_constraint` with PostgreSQL's array types;
//! * [`settings`]: `current_setting()` and `SHOW`, per connection;
//! * [`functions`]: reflection functions about objects Kiln does not have;
//! * [`rewrite`]: PostgreSQL spellings DataFusion reads differently;
//! * `version()` answering as a PostgreSQL server does, since tools read it to pick their
//!   SQL dialect.

pub mod functions;
pub mod information_schema;
pub mod pg_catalog;
pub mod rewrite;
pub mod settings;

use std::borrow::Cow;
use std::sync::{Arc, Weak};

use arrow::datatypes::DataType;
use datafusion::catalog::{CatalogProvider, CatalogProviderList};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::provider::KilnSchema;
use crate::{Error, QueryEngine};
use information_schema::PgDatabaseCatalog;
use settings::PgSettings;

/// The schema that holds a database's tables in a PostgreSQL session.
pub const PUBLIC_SCHEMA: &str = "public";

/// The PostgreSQL version Kiln reports; its SQL is closest to this release's.
pub const POSTGRES_VERSION: &str = "16.6";

/// `server_version` as sent in the startup parameters.
pub fn server_version() -> String {
    format!("{POSTGRES_VERSION} (Kiln {})", env!("CARGO_PKG_VERSION"))
}

/// A PostgreSQL connection's session: the DataFusion context, the connection's settings
/// and what [`Self::rewrite`] needs.
pub struct PostgresSession {
    pub context: Arc<SessionContext>,
    /// `current_setting()` and `SHOW` read these; the protocol layer keeps them in step
    /// with the client's (see [`PgSettings::sync`]).
    pub settings: Arc<PgSettings>,
}

impl PostgresSession {
    /// `sql` as DataFusion should read it (see [`rewrite`]), or why the session does not
    /// run it ([`rewrite::allowed`]).
    pub fn rewrite<'a>(&self, sql: &'a str) -> Result<Cow<'a, str>, rewrite::Refused> {
        rewrite::rewrite(sql, &self.settings)
    }
}

/// Why a session's `pg_catalog` could not be made.
#[derive(Debug, thiserror::Error)]
#[error("setting up pg_catalog")]
struct PgCatalogSetup(#[source] DataFusionError);

impl QueryEngine {
    /// A session for a PostgreSQL client connected to `database` (see the module docs).
    pub fn postgres_session(&self, database: &str) -> Result<PostgresSession, Error> {
        self.require_database(database)?;
        // `information_schema` is this module's, registered as a schema of the catalog
        // (DataFusion's own would answer in its place if enabled).
        let config = SessionConfig::new()
            .with_information_schema(false)
            .with_default_catalog_and_schema(database, PUBLIC_SCHEMA)
            .with_create_default_catalog_and_schema(false);
        let ctx = self.context(config);
        let catalog = Arc::new(PgDatabaseCatalog::default());
        catalog.register_schema(
            PUBLIC_SCHEMA,
            Arc::new(KilnSchema::new(Arc::clone(&self.engine), database)),
        )?;
        catalog.register_schema(crate::system::SYSTEM_SCHEMA, Arc::new(self.system_schema()))?;
        ctx.register_catalog(database, Arc::clone(&catalog) as _);
        // The session's catalog list holds this catalog, whose `information_schema` and
        // `pg_catalog` list the session's catalogs: they see the list weakly, or the
        // session would never be freed (see [`WeakCatalogList`]).
        let catalogs = WeakCatalogList::of(ctx.state().catalog_list());
        catalog.set_information_schema(Arc::clone(&catalogs));
        self.register_last_cache_function(&ctx);
        let settings = Arc::new(PgSettings::default());
        pg_catalog::install(&ctx, database, catalogs, Arc::clone(&settings))
            .map_err(|e| Error::Internal(Box::new(PgCatalogSetup(e))))?;
        ctx.register_udf(version());
        ctx.register_udf(settings::current_setting(Arc::clone(&settings)));
        for f in functions::functions() {
            ctx.register_udf(f);
        }
        Ok(PostgresSession {
            context: Arc::new(ctx),
            settings,
        })
    }
}

/// A session's catalog list as the catalogs in it see it. `information_schema` and
/// `pg_catalog` list every catalog of the session, and they are themselves schemas of a
/// catalog in that list: holding the list strongly would make a cycle, and every session
/// (its tables, its `pg_catalog`) would outlive its connection. Once the session is gone
/// the list is empty.
#[derive(Debug)]
struct WeakCatalogList(Weak<dyn CatalogProviderList>);

impl WeakCatalogList {
    fn of(catalogs: &Arc<dyn CatalogProviderList>) -> Arc<dyn CatalogProviderList> {
        Arc::new(Self(Arc::downgrade(catalogs)))
    }
}

impl CatalogProviderList for WeakCatalogList {
    fn register_catalog(
        &self,
        name: String,
        catalog: Arc<dyn CatalogProvider>,
    ) -> Option<Arc<dyn CatalogProvider>> {
        self.0.upgrade()?.register_catalog(name, catalog)
    }

    fn catalog_names(&self) -> Vec<String> {
        self.0
            .upgrade()
            .map(|list| list.catalog_names())
            .unwrap_or_default()
    }

    fn catalog(&self, name: &str) -> Option<Arc<dyn CatalogProvider>> {
        self.0.upgrade()?.catalog(name)
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

#[cfg(test)]
mod tests;

//! Continuous aggregates: `CREATE MATERIALIZED VIEW`, `DROP MATERIALIZED VIEW` and
//! `REFRESH MATERIALIZED VIEW`.
//!
//! A view is a table of its own (queryable, with its own retention) whose rows are a
//! `GROUP BY` of one time bucket and tags over one source table:
//!
//! ```sql
//! CREATE MATERIALIZED VIEW cpu_1m WITH (lag = '1 minute', realtime = true) AS
//!   SELECT time_bucket('1 minute', time) AS time, host,
//!          avg(usage_user), max(usage_user), count(*)
//!   FROM cpu GROUP BY 1, 2
//! ```
//!
//! Every aggregate is allowed: a refresh **recomputes whole buckets** from the source (the
//! buckets the catalog's invalidations name, see [`kiln_storage::catalog::views`]), so no
//! aggregate needs to be combinable from partial states. What is refused, naming the
//! part: more than one table, joins, subqueries in `FROM` other than of that table,
//! `HAVING`, `ORDER BY`, `LIMIT`, `DISTINCT`, window functions, volatile functions
//! (`now()`, `random()`), a `GROUP BY` of anything but one `time_bucket` / `date_bin` of
//! `time` (a fixed width, no time zone) and tags, a group key not selected, and results of
//! types a table cannot hold. Options (`WITH (…)`): `lag` (default 0: buckets
//! ending after `now − lag` are left for later), `realtime` (default false: see
//! [`realtime`]), `retention` (the view table's).

mod define;
pub mod realtime;
pub mod refresh;

use std::sync::Arc;

use datafusion::sql::sqlparser::ast::{ObjectName, ObjectType, Statement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::{Error, QueryEngine};

pub use define::Definition;
pub use refresh::{RefreshOutcome, run_refresher};

/// A statement about materialized views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewStatement {
    Create,
    Drop,
    Refresh,
}

impl ViewStatement {
    /// The statement `sql` is, by its first words.
    pub fn of(sql: &str) -> Option<Self> {
        let mut words = sql
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty());
        let first = words.next()?.to_ascii_lowercase();
        let (second, third) = (words.next()?, words.next()?);
        if !second.eq_ignore_ascii_case("materialized") || !third.eq_ignore_ascii_case("view") {
            return None;
        }
        match first.as_str() {
            "create" => Some(Self::Create),
            "drop" => Some(Self::Drop),
            "refresh" => Some(Self::Refresh),
            _ => None,
        }
    }

    /// Its command tag (as PostgreSQL names it).
    pub fn tag(self) -> &'static str {
        match self {
            Self::Create => "CREATE MATERIALIZED VIEW",
            Self::Drop => "DROP MATERIALIZED VIEW",
            Self::Refresh => "REFRESH MATERIALIZED VIEW",
        }
    }

    /// Creating and dropping a view change the database's tables (as `kiln table delete`
    /// does); a refresh only writes it.
    pub fn manages_tables(self) -> bool {
        !matches!(self, Self::Refresh)
    }
}

/// What a view statement did.
#[derive(Debug, Clone)]
pub struct ViewAnswer {
    pub statement: ViewStatement,
    pub view: String,
    /// Rows the statement wrote to the view (created: its first refresh; refreshed).
    pub rows: u64,
}

impl QueryEngine {
    /// Runs a view statement against `database`. The caller checks the rights it needs
    /// (see [`ViewStatement::manages_tables`]).
    pub async fn view_statement(&self, database: &str, sql: &str) -> Result<ViewAnswer, Error> {
        Error::refuse_if_read_only(&self.engine)?;
        self.require_database(database)?;
        let statement = ViewStatement::of(sql)
            .ok_or_else(|| Error::Invalid("not a materialized view statement".into()))?;
        match statement {
            ViewStatement::Create => self.create_view(database, sql).await,
            ViewStatement::Drop => self.drop_view(database, sql).await,
            ViewStatement::Refresh => {
                // After the three words (checked above): the view's name.
                let mut rest = sql;
                for _ in 0..3 {
                    rest = rest
                        .trim_start()
                        .trim_start_matches(|c: char| c.is_ascii_alphabetic());
                }
                let name = parse_name(rest.trim().trim_end_matches(';'), database)?;
                let outcome = self.refresh_view_named(database, &name).await?;
                Ok(ViewAnswer {
                    statement,
                    view: name,
                    rows: outcome.rows,
                })
            }
        }
    }

    async fn create_view(&self, database: &str, sql: &str) -> Result<ViewAnswer, Error> {
        let Statement::CreateView(create) = parse_one(sql)? else {
            return Err(Error::Invalid(
                "expected CREATE MATERIALIZED VIEW <name> [WITH (…)] AS SELECT …".into(),
            ));
        };
        if !create.materialized || create.or_replace || create.or_alter || create.temporary {
            return Err(Error::Invalid(
                "only CREATE MATERIALIZED VIEW <name> [WITH (…)] AS SELECT … is supported".into(),
            ));
        }
        if !create.columns.is_empty() {
            return Err(Error::Invalid(
                "name a view's columns with AS in its SELECT, not in a column list".into(),
            ));
        }
        let name = object_name(&create.name, database)?;
        let state = self.engine.catalog_state();
        if create.if_not_exists
            && state
                .table(database, &name)
                .is_some_and(|t| state.view(t.id).is_some())
        {
            return Ok(ViewAnswer {
                statement: ViewStatement::Create,
                view: name,
                rows: 0,
            });
        }
        let options = define::Options::parse(&create.options)?;
        let query = create.query.to_string();
        let definition = self.define(database, &query).await?;
        self.create_defined_view(database, &name, &query, definition, options)
            .await?;
        // Materialized at once (as `WITH DATA`): the view answers as soon as it exists.
        let outcome = self.refresh_view_named(database, &name).await?;
        Ok(ViewAnswer {
            statement: ViewStatement::Create,
            view: name,
            rows: outcome.rows,
        })
    }

    async fn drop_view(&self, database: &str, sql: &str) -> Result<ViewAnswer, Error> {
        let Statement::Drop {
            object_type: ObjectType::MaterializedView,
            if_exists,
            names,
            ..
        } = parse_one(sql)?
        else {
            return Err(Error::Invalid(
                "expected DROP MATERIALIZED VIEW [IF EXISTS] <name>".into(),
            ));
        };
        let [name] = names.as_slice() else {
            return Err(Error::Invalid(
                "DROP MATERIALIZED VIEW drops one view".into(),
            ));
        };
        let name = object_name(name, database)?;
        let state = self.engine.catalog_state();
        let is_view = state
            .table(database, &name)
            .is_some_and(|t| state.view(t.id).is_some());
        if !is_view {
            if if_exists {
                return Ok(ViewAnswer {
                    statement: ViewStatement::Drop,
                    view: name,
                    rows: 0,
                });
            }
            return Err(Error::TableNotFound(format!(
                "materialized view {name:?} not found in database {database:?}"
            )));
        }
        // Its rows can be computed again from the source: they go at the next retention
        // pass, as a hard delete's would.
        let _guard = self.refreshing.lock().await;
        self.engine
            .delete_table(database, &name, kiln_storage::now_nanos())
            .await
            .map_err(|e| Error::Internal(Box::new(e)))?;
        Ok(ViewAnswer {
            statement: ViewStatement::Drop,
            view: name,
            rows: 0,
        })
    }
}

/// The one statement `sql` holds, as PostgreSQL's dialect parses it.
fn parse_one(sql: &str) -> Result<Statement, Error> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| Error::Invalid(format!("SQL error: {e}")))?;
    match (statements.pop(), statements.is_empty()) {
        (Some(statement), true) => Ok(statement),
        _ => Err(Error::Invalid("expected exactly one statement".into())),
    }
}

/// A view's name: `name`, or `database.name` of the database the statement runs in.
fn object_name(name: &ObjectName, database: &str) -> Result<String, Error> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| {
            p.as_ident()
                .map(|i| i.value.clone())
                .ok_or_else(|| Error::Invalid(format!("invalid view name {name}")))
        })
        .collect::<Result<_, _>>()?;
    match parts.as_slice() {
        [name] => Ok(name.clone()),
        [db, name] if db == database => Ok(name.clone()),
        _ => Err(Error::Invalid(format!(
            "a view of database {database:?} is named <name> or {database}.<name>, not {name}"
        ))),
    }
}

fn parse_name(text: &str, database: &str) -> Result<String, Error> {
    let name = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(text)
        .and_then(|mut p| {
            let name = p.parse_object_name(false)?;
            p.expect_token(&datafusion::sql::sqlparser::tokenizer::Token::EOF)?;
            Ok(name)
        })
        .map_err(|e| Error::Invalid(format!("expected REFRESH MATERIALIZED VIEW <name>: {e}")))?;
    object_name(&name, database)
}

/// Shared by the engine's clones: one refresh (or drop) of views at a time, so two never
/// take the same invalidations.
pub(crate) type RefreshLock = Arc<tokio::sync::Mutex<()>>;

#[cfg(test)]
mod tests;

//! Last-value caches in SQL: the table function `last_cache('db', 'table')`, and the rule
//! [`UseLastCache`] that answers "latest row per series" queries from the cache.
//!
//! A table's cache (see `kiln_storage::last_cache`) holds the latest row of every value
//! of its key columns. The rule rewrites
//!
//! ```sql
//! SELECT DISTINCT ON (<key columns>) … FROM t [WHERE <only key columns>]
//! ORDER BY <key columns>, time DESC
//! ```
//!
//! to read the cache instead of the table, when the `ON` columns are some or all of the
//! cache's key columns, the filter reads nothing but key columns (so it keeps or drops
//! whole series, never a series' latest row alone) and the cache is warm: the answer is
//! the same row for every key (with fewer `ON` columns than keys, the read keeps the latest
//! of the cached rows of each `ON` value: `EXPLAIN` adds `latest per <columns>`). Filters
//! on key columns pick series before the cache's rows are read. Every table has a cache
//! keyed by all its tags unless one is defined or `--no-default-last-caches` is set. `EXPLAIN` shows
//! `LastCacheExec: t, last-value cache (N series held)`; the cache is read when the plan
//! runs ([`LastCacheExec`]), and `EXPLAIN ANALYZE` counts the series read (`output_rows`).

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::Transformed;
use datafusion::common::{DFSchema, ScalarValue, plan_err};
use datafusion::datasource::TableType;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{
    Distinct, DistinctOn, Expr, LogicalPlan, Operator, Projection, Sort,
    TableProviderFilterPushDown, TableScanBuilder,
};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::physical_plan::ExecutionPlan;
use kiln_storage::Engine;
use kiln_storage::catalog::{TIME_COLUMN, TableDef};
use kiln_storage::ids::TableId;
use kiln_storage::last_cache::{KeyValues, LastCache};

use crate::provider::{KilnTable, query_schema};

mod exec;

pub use exec::{LastCacheExec, Selection};

/// `last_cache('db', 'table')`: the latest row of every series of the table.
#[derive(Debug)]
pub struct LastCacheFunction {
    engine: Arc<Engine>,
    visible: crate::Visible,
}

impl LastCacheFunction {
    /// Reads the caches of the databases `visible` shows.
    pub fn new(engine: Arc<Engine>, visible: crate::Visible) -> Self {
        Self { engine, visible }
    }
}

fn string_literal(e: &Expr) -> Option<&str> {
    match e {
        Expr::Literal(ScalarValue::Utf8(Some(s)), _)
        | Expr::Literal(ScalarValue::Utf8View(Some(s)), _)
        | Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _) => Some(s),
        _ => None,
    }
}

impl TableFunctionImpl for LastCacheFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let (Some(database), Some(table)) = (
            args.exprs().first().and_then(string_literal),
            args.exprs().get(1).and_then(string_literal),
        ) else {
            return plan_err!(
                "last_cache takes the database and table names: last_cache('db', 'table')"
            );
        };
        if args.exprs().len() != 2 {
            return plan_err!("last_cache takes two arguments: last_cache('db', 'table')");
        }
        let state = self.engine.catalog_state();
        let Some(def) = state
            .table(database, table)
            .filter(|_| self.visible.allows(database))
        else {
            return plan_err!("table {table:?} not found in database {database:?}");
        };
        let Some(cache) = self.engine.last_cache(def.id) else {
            return plan_err!(
                "table {table:?} has no last-value cache; create one with \
                 `kiln last-cache create --database {database} --table {table}`"
            );
        };
        Ok(Arc::new(LastCacheTable::new(
            Arc::clone(&self.engine),
            def,
            cache,
        )))
    }
}

/// A table's last-value cache as a table: its schema is the table's.
#[derive(Debug)]
pub struct LastCacheTable {
    engine: Arc<Engine>,
    table: TableId,
    name: String,
    schema: SchemaRef,
    cache: Arc<LastCache>,
    /// Columns whose values each get only their latest row (see [`Self::latest_per`]).
    latest_per: Vec<usize>,
}

impl LastCacheTable {
    fn new(engine: Arc<Engine>, def: &TableDef, cache: Arc<LastCache>) -> Self {
        Self {
            engine,
            table: def.id,
            name: def.name.clone(),
            schema: query_schema(def),
            cache,
            latest_per: Vec::new(),
        }
    }

    /// The cache read as `DISTINCT ON (columns) … ORDER BY columns, time DESC` reads it
    /// when `columns` are fewer than its key: the latest of the cached rows of each value
    /// of `columns`, after filters have picked the series.
    fn latest_per(mut self, columns: &BTreeSet<&str>) -> Result<Self> {
        self.latest_per = (columns.iter())
            .map(|c| self.schema.index_of(c))
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// The table whose cache this is.
    pub fn table_id(&self) -> TableId {
        self.table
    }

    pub fn cache(&self) -> &Arc<LastCache> {
        &self.cache
    }
}

#[async_trait]
impl TableProvider for LastCacheTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    /// Filters over key columns alone select whole series: the scan applies them to the
    /// keys before it reads any row.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                let columns = f.column_refs();
                let on_keys = !columns.is_empty()
                    && columns
                        .iter()
                        .all(|c| self.cache.key_columns.contains(&c.name));
                if on_keys {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.cache.warmed().await.map_err(|reason| {
            DataFusionError::Execution(format!(
                "the last-value cache of {} cannot answer: {reason}; drop it and create it \
                 again (kiln last-cache), or query the table",
                self.name
            ))
        })?;
        let selection = match conjunction(filters.iter().cloned()) {
            None => None,
            Some(predicate) => {
                let shown: Vec<String> = predicate
                    .column_refs()
                    .iter()
                    .map(|c| c.name.clone())
                    .collect();
                let names: Vec<&str> = shown.iter().map(String::as_str).collect();
                let keys = DFSchema::try_from(self.cache.key_schema(&self.schema, &names)?)?;
                Some(Selection {
                    predicate: state.create_physical_expr(predicate, &keys)?,
                    // The fewest series one filter names by value, if any does: only
                    // they are looked at.
                    among: filters
                        .iter()
                        .filter_map(named_values)
                        .min_by_key(|k| k.values.len()),
                    shown,
                })
            }
        };
        Ok(Arc::new(LastCacheExec::try_new(
            Arc::clone(&self.engine),
            (self.table, self.name.clone()),
            Arc::clone(&self.cache),
            Arc::clone(&self.schema),
            projection.cloned(),
            selection,
            self.latest_per.clone(),
        )?))
    }
}

/// The values of one column that `filter` keeps rows only of (`c = 'v'`, `c IN ('v', …)`,
/// and ORs of those over one column); `None` when it is not of that shape. NULL literals
/// keep nothing (`c = NULL` is never true).
fn named_values(filter: &Expr) -> Option<KeyValues> {
    let column = |e: &Expr| match e {
        Expr::Column(c) => Some(c.name.clone()),
        Expr::Cast(cast) if cast.field.data_type().is_string() => match cast.expr.as_ref() {
            Expr::Column(c) => Some(c.name.clone()),
            _ => None,
        },
        _ => None,
    };
    let literal = |e: &Expr| match e {
        Expr::Literal(value, _) => string_value(value),
        _ => None,
    };
    match filter {
        Expr::BinaryExpr(b) if b.op == Operator::Eq => {
            let (column, value) = match (column(&b.left), column(&b.right)) {
                (Some(c), None) => (c, literal(&b.right)?),
                (None, Some(c)) => (c, literal(&b.left)?),
                _ => return None,
            };
            Some(KeyValues {
                column,
                values: value.into_iter().map(Some).collect(),
            })
        }
        Expr::BinaryExpr(b) if b.op == Operator::Or => {
            let (mut left, right) = (named_values(&b.left)?, named_values(&b.right)?);
            (left.column == right.column).then(|| {
                left.values.extend(right.values);
                left
            })
        }
        Expr::InList(list) if !list.negated => Some(KeyValues {
            column: column(&list.expr)?,
            values: list
                .list
                .iter()
                .map(literal)
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .flatten()
                .map(Some)
                .collect(),
        }),
        _ => None,
    }
}

/// A string literal's value: `Some(None)` for a NULL one, `None` when not a string.
fn string_value(value: &ScalarValue) -> Option<Option<String>> {
    match value {
        ScalarValue::Utf8(v) | ScalarValue::Utf8View(v) | ScalarValue::LargeUtf8(v) => {
            Some(v.clone())
        }
        ScalarValue::Dictionary(_, inner) => string_value(inner),
        _ => None,
    }
}

/// Answers `DISTINCT ON (keys) … ORDER BY keys, time DESC` from the last-value cache (see
/// the module docs).
#[derive(Debug)]
pub struct UseLastCache {
    engine: Arc<Engine>,
}

impl UseLastCache {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    fn rewrite_distinct_on(&self, d: &DistinctOn) -> Result<Option<LogicalPlan>> {
        let Some(sort) = &d.sort_expr else {
            return Ok(None);
        };
        // ON columns.
        let mut on = Vec::new();
        for e in &d.on_expr {
            let Expr::Column(c) = e else { return Ok(None) };
            on.push(c.name.clone());
        }
        // ORDER BY the ON columns, then time descending, nothing else.
        let n = d.on_expr.len();
        if sort.len() != n + 1
            || sort[..n].iter().zip(&d.on_expr).any(|(s, e)| &s.expr != e)
            || sort[n].asc
            || !matches!(&sort[n].expr, Expr::Column(c) if c.name == TIME_COLUMN)
        {
            return Ok(None);
        }
        // Filters over key columns only, then the table.
        let mut filters = Vec::new();
        let mut node = d.input.as_ref();
        while let LogicalPlan::Filter(f) = node {
            filters.push(f.predicate.clone());
            node = f.input.as_ref();
        }
        let LogicalPlan::TableScan(scan) = node else {
            return Ok(None);
        };
        if scan.fetch.is_some() || !scan.filters.is_empty() {
            return Ok(None);
        }
        let provider = source_as_provider(&scan.source)?;
        let any: &dyn Any = provider.as_ref();
        let Some(table) = any.downcast_ref::<KilnTable>() else {
            return Ok(None);
        };
        let Some(cache) = self.engine.last_cache(table.table_id()) else {
            return Ok(None);
        };
        let keys: BTreeSet<&str> = cache.key_columns.iter().map(String::as_str).collect();
        let on: BTreeSet<&str> = on.iter().map(String::as_str).collect();
        if !cache.is_warm() || !on.is_subset(&keys) {
            return Ok(None);
        }
        if filters.iter().any(|f| {
            f.column_refs()
                .iter()
                .any(|c| !keys.contains(c.name.as_str()))
        }) {
            return Ok(None);
        }
        let state = self.engine.catalog_state();
        let Some(def) = state.table_by_id(table.table_id()) else {
            return Ok(None);
        };
        let mut cached = LastCacheTable::new(Arc::clone(&self.engine), def, Arc::clone(&cache));
        if on != keys {
            // Several cached series share an ON value: the latest row of each ON value is
            // the latest of its series' latest rows, picked as the cache is read.
            cached = cached.latest_per(&on)?;
        }
        if cached.schema() != provider.schema() {
            return Ok(None);
        }
        // The filters pick series before the rows are read (and, with fewer ON columns
        // than keys, before the latest of each ON value is picked): they are the scan's.
        let plan = LogicalPlan::TableScan(
            TableScanBuilder::new(
                scan.table_name.clone(),
                provider_as_source(Arc::new(cached)),
            )
            .with_projection(scan.projection.clone())
            .with_filters(filters)
            .build()?,
        );
        let plan = LogicalPlan::Sort(Sort {
            expr: sort[..n].to_vec(),
            input: Arc::new(plan),
            fetch: None,
        });
        let projection = Projection::try_new(d.select_expr.clone(), Arc::new(plan))?;
        if projection.schema.as_ref() != d.schema.as_ref() {
            return Ok(None);
        }
        Ok(Some(LogicalPlan::Projection(projection)))
    }
}

impl OptimizerRule for UseLastCache {
    fn name(&self) -> &str {
        "use_last_cache"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        plan.transform_up_with_subqueries(|node| {
            let LogicalPlan::Distinct(Distinct::On(d)) = &node else {
                return Ok(Transformed::no(node));
            };
            match self.rewrite_distinct_on(d)? {
                Some(rewritten) => Ok(Transformed::yes(rewritten)),
                None => Ok(Transformed::no(node)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit};

    use super::*;

    fn named(e: Expr) -> Option<(String, Vec<Option<String>>)> {
        named_values(&e).map(|k| (k.column, k.values))
    }

    fn values(column: &str, values: &[&str]) -> Option<(String, Vec<Option<String>>)> {
        Some((
            column.to_owned(),
            values.iter().map(|v| Some((*v).to_owned())).collect(),
        ))
    }

    #[test]
    fn filters_naming_a_columns_values_are_recognized() {
        let dict = |v: &str| {
            lit(ScalarValue::Dictionary(
                Box::new(arrow::datatypes::DataType::Int32),
                Box::new(ScalarValue::from(v)),
            ))
        };
        assert_eq!(named(col("host").eq(lit("a"))), values("host", &["a"]));
        assert_eq!(named(lit("a").eq(col("host"))), values("host", &["a"]));
        assert_eq!(named(col("host").eq(dict("a"))), values("host", &["a"]));
        assert_eq!(
            named(col("host").in_list(
                vec![lit("a"), lit(ScalarValue::Utf8(None)), dict("b")],
                false
            )),
            values("host", &["a", "b"])
        );
        assert_eq!(
            named(
                col("host")
                    .eq(lit("a"))
                    .or(col("host").in_list(vec![lit("b")], false))
            ),
            values("host", &["a", "b"])
        );
        // `host = NULL` keeps nothing.
        assert_eq!(
            named(col("host").eq(lit(ScalarValue::Utf8(None)))),
            values("host", &[])
        );
        // Not of the shape: another operator, two columns, a negated list, non-strings.
        assert_eq!(named(col("host").not_eq(lit("a"))), None);
        assert_eq!(
            named(col("host").eq(lit("a")).or(col("dc").eq(lit("b")))),
            None
        );
        assert_eq!(named(col("host").in_list(vec![lit("a")], true)), None);
        assert_eq!(named(col("host").eq(col("dc"))), None);
        assert_eq!(named(col("n").eq(lit(3))), None);
    }
}

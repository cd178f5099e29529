//! `DELETE FROM t [WHERE <tags> [AND <time range>]]`: SQL turned into a delete of rows
//! (a [tombstone](kiln_storage::catalog::tombstones)).
//!
//! The statement is planned as DataFusion plans it (never run: Kiln's physical planner
//! refuses DML), its filter optimized as a query's would be (so `now() - INTERVAL '1
//! day'` is a timestamp and `host = 'a' OR host = 'b'` may be either shape), then read
//! as conjunctions of: a tag `=`, `<>`, `IN`, `NOT IN` string literals (ORs of `=` over
//! one tag), and bounds on `time`. Anything else (a field, a function of a tag) is
//! refused with the condition named. The rows it matches are counted first: a delete that
//! matches nothing records nothing and says so.

use std::sync::Arc;

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::functions_aggregate::count::count_all;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    BinaryExpr, DmlStatement, Expr, LogicalPlan, LogicalPlanBuilder, Operator, WriteOp,
};
use datafusion::prelude::DataFrame;
use futures::TryStreamExt;
use kiln_storage::catalog::tombstones::{DeletePredicate, TagCondition};
use kiln_storage::catalog::{ColumnType, TIME_COLUMN};

use crate::provider::TimeBounds;
use crate::{Error, QueryEngine};

/// What a `DELETE` did.
#[derive(Debug, Clone)]
pub struct Deleted {
    pub table: String,
    /// Rows it matched when it was made (0: nothing was recorded).
    pub rows: u64,
    /// The delete, as recorded.
    pub predicate: DeletePredicate,
}

/// Whether `sql` is a `DELETE` statement (its first word).
pub fn is_delete(sql: &str) -> bool {
    let words = sql.trim_start().split(|c: char| !c.is_ascii_alphabetic());
    words.take(1).any(|w| w.eq_ignore_ascii_case("delete"))
}

impl QueryEngine {
    /// Runs the `DELETE` statement `sql` against `database`: its rows are gone for every
    /// query made after it returns. The caller checks the right to write `database`.
    pub async fn delete(&self, database: &str, sql: &str) -> Result<Deleted, Error> {
        Error::refuse_if_read_only(&self.engine)?;
        self.require_database(database)?;
        let session = self.session(database);
        let state = session.state();
        let plan = state.create_logical_plan(sql).await?;
        let LogicalPlan::Dml(DmlStatement {
            table_name,
            op: WriteOp::Delete,
            input,
            ..
        }) = plan
        else {
            return Err(Error::Invalid(
                "only DELETE FROM <table> [WHERE …] is a delete".into(),
            ));
        };
        let table = table_name.table().to_owned();
        if table_name.schema().is_some_and(|s| s != database) {
            return Err(Error::Invalid(format!(
                "DELETE deletes from tables of database {database:?}, not {table_name}"
            )));
        }
        let catalog = self.engine.catalog_state();
        let def = catalog
            .table(database, &table)
            .ok_or_else(|| Error::TableNotFound(format!("table {table:?} not found")))?
            .clone();
        let optimized = state.optimize(&input)?;
        let predicate = predicate_of(&optimized, &def)?;

        let counting = LogicalPlanBuilder::from(Arc::unwrap_or_clone(input))
            .aggregate(Vec::<Expr>::new(), vec![count_all()])?
            .build()?;
        let batches: Vec<_> = self
            .execute(DataFrame::new(state, counting))
            .await?
            .try_collect()
            .await
            .map_err(Error::from)?;
        let rows = batches
            .first()
            .and_then(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
            })
            .map_or(0, |c| c.value(0).max(0) as u64);
        if rows > 0 {
            self.engine
                .delete_rows(database, &table, predicate.clone())
                .await
                .map_err(|e| match e {
                    kiln_storage::engine::Error::InvalidDelete(text) => Error::Invalid(text),
                    e => Error::Internal(Box::new(e)),
                })?;
        }
        Ok(Deleted {
            table,
            rows,
            predicate,
        })
    }
}

/// The delete the filters of `plan` (a scan of `def`, filtered) state.
fn predicate_of(
    plan: &LogicalPlan,
    def: &kiln_storage::catalog::TableDef,
) -> Result<DeletePredicate, Error> {
    let mut conditions: Vec<Expr> = Vec::new();
    plan.apply(|node| {
        match node {
            LogicalPlan::Filter(f) => {
                conditions.extend(split_conjunction(&f.predicate).into_iter().cloned())
            }
            LogicalPlan::TableScan(scan) => {
                for f in &scan.filters {
                    conditions.extend(split_conjunction(f).into_iter().cloned());
                }
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    conditions.dedup();
    let mut predicate = DeletePredicate::all();
    for condition in &conditions {
        if let Some(bounds) = TimeBounds::exact(condition) {
            predicate.min_time = predicate.min_time.max(bounds.min);
            predicate.max_time = predicate.max_time.min(bounds.max);
            continue;
        }
        match tag_condition(condition) {
            Some(c) => match def.column(&c.tag) {
                Some(col) if col.ty == ColumnType::Tag => {
                    // The same tag twice: both must hold (`IN` lists intersect).
                    match predicate
                        .tags
                        .iter_mut()
                        .find(|p| p.tag == c.tag && !p.negated && !c.negated)
                    {
                        Some(p) => p.values.retain(|v| c.values.contains(v)),
                        None => predicate.tags.push(c),
                    }
                }
                Some(_) => return Err(field_refused(&c.tag, condition)),
                None => {
                    return Err(Error::Invalid(format!(
                        "table {:?} has no column {:?}",
                        def.name, c.tag
                    )));
                }
            },
            None => {
                let field = condition
                    .column_refs()
                    .into_iter()
                    .find(|c| def.column(&c.name).is_some_and(|d| d.ty.is_field()));
                return Err(match field {
                    Some(f) => field_refused(&f.name, condition),
                    None => Error::Invalid(format!(
                        "DELETE filters on tags (=, <>, IN, NOT IN with strings) and on time \
                         (comparisons with timestamps), joined by AND; cannot delete where {condition}"
                    )),
                });
            }
        }
    }
    Ok(predicate)
}

fn field_refused(field: &str, condition: &Expr) -> Error {
    Error::Invalid(format!(
        "DELETE filters on tags and time only: {field:?} is a field (in {condition})"
    ))
}

/// A condition on one tag: `tag = 'v'`, `tag <> 'v'`, `tag [NOT] IN ('v', …)`, or ORs of
/// `=` over one tag.
fn tag_condition(e: &Expr) -> Option<TagCondition> {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Eq | Operator::NotEq => {
                let (tag, value) = match (column(left), string(right)) {
                    (Some(c), Some(v)) => (c, v),
                    _ => (column(right)?, string(left)?),
                };
                Some(TagCondition {
                    tag,
                    values: vec![value],
                    negated: *op == Operator::NotEq,
                })
            }
            Operator::Or => {
                let (mut a, b) = (tag_condition(left)?, tag_condition(right)?);
                if a.negated || b.negated || a.tag != b.tag {
                    return None;
                }
                a.values.extend(b.values);
                Some(a)
            }
            _ => None,
        },
        Expr::InList(list) => Some(TagCondition {
            tag: column(&list.expr)?,
            values: list.list.iter().map(string).collect::<Option<Vec<_>>>()?,
            negated: list.negated,
        }),
        _ => None,
    }
}

/// The column `e` names, through casts.
fn column(e: &Expr) -> Option<String> {
    match e {
        Expr::Column(c) if c.name != TIME_COLUMN => Some(c.name.clone()),
        Expr::Cast(c) => column(&c.expr),
        Expr::TryCast(c) => column(&c.expr),
        _ => None,
    }
}

/// The string literal `e` is, through casts and dictionary values.
fn string(e: &Expr) -> Option<String> {
    fn scalar(v: &ScalarValue) -> Option<String> {
        match v {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
            ScalarValue::Dictionary(_, inner) => scalar(inner),
            _ => None,
        }
    }
    match e {
        Expr::Literal(v, _) => scalar(v),
        Expr::Cast(c) => string(&c.expr),
        Expr::TryCast(c) => string(&c.expr),
        _ => None,
    }
}

//! Queries planned once and run many times, as alert rules are: the same SQL at every
//! evaluation. Parsing, analysis and logical optimization are done once and the optimized
//! plan kept; each run makes the physical plan from it (which reads the tables and caches
//! as they are then) and executes it. A physical plan that reads nothing when it is made
//! — its only sources are last-value caches, which [`LastCacheExec`] reads when run — is
//! kept too, and run again with its operators' state reset.
//!
//! A kept plan is used again only while planning the SQL again would give the same plan:
//!
//! - the query calls no function whose result depends on when it runs (the optimizer
//!   folds `now()` and the like into constants), checked once, before optimization;
//! - every Kiln table it reads still has the definition it had (its columns make the
//!   plan's), and the same last-value cache, as warm as it was (the optimizer chose
//!   between the table and its cache).
//!
//! Otherwise the SQL is planned again, and a table that is gone fails the query with the
//! planner's error. Sessions that run prepared queries make plans without dynamic filters
//! (see [`QueryEngine::serial_session`]).

use std::any::Any;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::source_as_provider;
use datafusion::execution::session_state::SessionState;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;
use datafusion::prelude::SessionContext;
use kiln_storage::Engine;
use kiln_storage::ids::TableId;
use kiln_storage::last_cache::LastCache;
use parking_lot::Mutex;

use crate::last_cache::{LastCacheExec, LastCacheTable};
use crate::provider::{KilnTable, query_schema};
use crate::{Error, QueryEngine};

/// One SQL query, run again and again in one session.
#[derive(Debug)]
pub struct PreparedQuery {
    sql: String,
    kept: Mutex<Option<Arc<Kept>>>,
}

/// An optimized plan and what it was planned against.
#[derive(Debug)]
struct Kept {
    plan: LogicalPlan,
    reads: Vec<Read>,
    /// Its physical plan, when that can be run again.
    physical: Mutex<Option<Rerun>>,
}

/// A physical plan kept to be run again, and the context it runs in.
type Rerun = (Arc<dyn ExecutionPlan>, Arc<TaskContext>);

/// A Kiln table a kept plan reads, as it was when planned.
#[derive(Debug)]
struct Read {
    table: TableId,
    schema: SchemaRef,
    /// The table's last-value cache then, and whether it was warm.
    cache: Option<(Arc<LastCache>, bool)>,
}

impl PreparedQuery {
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            kept: Mutex::default(),
        }
    }

    /// Plans the query in `session` (or takes the kept plan) and starts it under the
    /// engine's limits.
    pub async fn run(
        &self,
        query: &QueryEngine,
        session: &SessionContext,
    ) -> Result<SendableRecordBatchStream, Error> {
        let kept = self.kept.lock().clone();
        if let Some(kept) = kept.filter(|k| k.holds(query.engine())) {
            let physical = kept.physical.lock().clone();
            if let Some((plan, task_context)) = physical {
                return query
                    .execute_physical(reset_plan_states(plan)?, task_context)
                    .await;
            }
            return kept.start(query, session.state(), session).await;
        }
        let (state, plan) = query.plan_in(session, &self.sql).await?.into_parts();
        let depends_on_time = depends_on_time(&plan)?;
        let plan = state.optimize(&plan)?;
        if depends_on_time {
            *self.kept.lock() = None;
            return Ok(query.execute_optimized(state, plan).await?.0);
        }
        let kept = Arc::new(Kept::new(plan, query.engine())?);
        *self.kept.lock() = Some(Arc::clone(&kept));
        kept.start(query, state, session).await
    }

    pub fn sql(&self) -> &str {
        &self.sql
    }
}

impl Kept {
    fn new(plan: LogicalPlan, engine: &Engine) -> datafusion::error::Result<Self> {
        let mut reads = Vec::new();
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let provider = source_as_provider(&scan.source)?;
                let any: &dyn Any = provider.as_ref();
                if let Some(table) = any.downcast_ref::<KilnTable>() {
                    let cache = engine.last_cache(table.table_id()).map(|c| {
                        let warm = c.is_warm();
                        (c, warm)
                    });
                    reads.push(Read {
                        table: table.table_id(),
                        schema: provider.schema(),
                        cache,
                    });
                } else if let Some(cached) = any.downcast_ref::<LastCacheTable>() {
                    reads.push(Read {
                        table: cached.table_id(),
                        schema: provider.schema(),
                        cache: Some((Arc::clone(cached.cache()), true)),
                    });
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(Self {
            plan,
            reads,
            physical: Mutex::default(),
        })
    }

    /// Makes the physical plan in `state` (of `session`) and starts it, keeping it if it
    /// can be run again.
    async fn start(
        &self,
        query: &QueryEngine,
        state: SessionState,
        session: &SessionContext,
    ) -> Result<SendableRecordBatchStream, Error> {
        let (stream, physical) = query.execute_optimized(state, self.plan.clone()).await?;
        if reads_when_run(&physical) {
            *self.physical.lock() = Some((physical, session.task_ctx()));
        }
        Ok(stream)
    }

    /// Whether planning again now would give this plan (see the module docs).
    fn holds(&self, engine: &Engine) -> bool {
        let state = engine.catalog_state();
        self.reads.iter().all(|read| {
            let Some(def) = state.table_by_id(read.table) else {
                return false;
            };
            let cache = engine.last_cache(read.table);
            let same_cache = match (&read.cache, &cache) {
                (None, None) => true,
                (Some((then, warm)), Some(now)) => Arc::ptr_eq(then, now) && *warm == now.is_warm(),
                _ => false,
            };
            same_cache && query_schema(def) == read.schema
        })
    }
}

/// Whether every source of `plan` reads its data when the plan runs, not when it was made
/// (a table's scan lists its segments and buffer at planning, and is empty if they were).
fn reads_when_run(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let children = plan.children();
    if children.is_empty() {
        let any: &dyn Any = plan.as_ref();
        return any.is::<LastCacheExec>() || any.is::<PlaceholderRowExec>();
    }
    children.into_iter().all(reads_when_run)
}

/// Whether `plan` calls a function whose result depends on when (or how often) it runs.
fn depends_on_time(plan: &LogicalPlan) -> datafusion::error::Result<bool> {
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && f.func.signature().volatility != Volatility::Immutable
                {
                    found = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    Ok(found)
}

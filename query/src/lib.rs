//! Kiln's SQL layer: Apache DataFusion over the storage engine.
//!
//! ```text
//!  SQL ──▶ SessionContext ──▶ catalog `kiln` ──▶ schema per database ──▶ KilnTable
//!                                                                        │ scan (KilnScanExec)
//!                       Parquet segments (pruned: time, statistics, ◀───┤
//!                       page index, bloom filters)                      │
//!                       partitions in several sources (DedupExec)  ◀───┤
//!                       write buffer (in memory)                   ◀───┘
//! ```
//!
//! [`QueryEngine::session`] makes a session whose default schema is the database being
//! queried, with `information_schema` (and so `SHOW TABLES`) enabled and Kiln's
//! time-series SQL: `time_bucket` ([`time_bucket`], local time per [`zone`]), the selectors
//! `first(value, time)` and `last(value, time)` ([`selectors`]), gap filling
//! ([`gapfill`]: `date_bin_gapfill`, `time_bucket_gapfill`, `locf`, `interpolate`, planned
//! by an optimizer rule and an extension planner), and last-value caches ([`last_cache`]:
//! the `last_cache('db', 'table')` table function and a rule answering latest-row queries
//! from it). [`QueryEngine::postgres_session`] lays a database out the way PostgreSQL
//! clients expect (see [`postgres`]). All sessions share one runtime, so the limits of
//! [`QueryConfig`] (memory pool with spilling, timeout) hold across queries.

pub mod alerts;
mod avg;
pub mod cluster;
mod coarse;
pub mod dedup;
pub mod delete;
pub mod executor;
pub mod gapfill;
mod int_compare;
pub mod last_cache;
pub mod like_escape;
pub mod limits;
pub mod postgres;
pub mod prepared;
pub mod provider;
pub mod scan;
pub mod selectors;
pub mod system;
#[cfg(test)]
mod time_arith_tests;
pub mod time_bucket;
pub mod views;
pub mod zone;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::datatypes::DataType;
use datafusion::catalog::{MemoryCatalogProviderList, Session};
use datafusion::common::Column;
use datafusion::error::DataFusionError;
use datafusion::execution::context::{ExecutionProps, QueryPlanner};
use datafusion::execution::registry::FunctionRegistry;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan};
use datafusion::optimizer::{Optimizer, OptimizerRule};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use kiln_storage::Engine;

pub use limits::QueryConfig;
pub use provider::{KilnCatalog, KilnTable, TimeBounds};

/// Name of the DataFusion catalog that holds every database.
pub const CATALOG_NAME: &str = "kiln";

/// The databases a session shows: all, or only some (those a token may read). A database
/// it does not show is, to SQL, one that does not exist.
#[derive(Debug, Clone, Default)]
pub struct Visible(Option<Arc<std::collections::BTreeSet<String>>>);

impl Visible {
    /// Every database.
    pub fn all() -> Self {
        Self(None)
    }

    /// Whether every database is visible.
    pub fn is_all(&self) -> bool {
        self.0.is_none()
    }

    /// Only `databases`.
    pub fn only(databases: impl IntoIterator<Item = String>) -> Self {
        Self(Some(Arc::new(databases.into_iter().collect())))
    }

    pub fn allows(&self, database: &str) -> bool {
        self.0.as_ref().is_none_or(|only| only.contains(database))
    }
}

/// What went wrong with a query, sorted by what the client can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database {0:?} not found")]
    DatabaseNotFound(String),
    #[error("{0}")]
    TableNotFound(String),
    /// The query is wrong (syntax, unknown column, bad cast, …): fix it and retry.
    #[error("{0}")]
    Invalid(String),
    /// The query ran out of time (`QueryConfig::timeout`).
    #[error("{0}")]
    Timeout(String),
    /// The query needs more memory than the pool has left: narrow it, or retry when
    /// fewer queries run.
    #[error("{0}")]
    ResourcesExhausted(String),
    /// The statement changes data or the catalog, and this server only reads
    /// (`--role querier`): send it to the server that writes.
    #[error("{0}")]
    ReadOnly(String),
    /// A server the answer needs did not answer (a querier's writer): retry, or ask for
    /// partial results.
    #[error("{0}")]
    Unavailable(String),
    /// Kiln failed (storage, I/O): not the query's fault. The cause is kept, for logs.
    #[error("{0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// [`Error::ReadOnly`] when the engine only reads: checked before a statement that
    /// would change something does any work.
    pub(crate) fn refuse_if_read_only(engine: &kiln_storage::Engine) -> Result<(), Error> {
        match engine.is_read_only() {
            true => Err(Error::ReadOnly(
                kiln_storage::engine::Error::ReadOnly.to_string(),
            )),
            false => Ok(()),
        }
    }
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        let text = e.strip_backtrace();
        let internal = match e.find_root() {
            DataFusionError::Plan(msg) if is_missing_table(msg) => {
                return Error::TableNotFound(msg.clone());
            }
            DataFusionError::External(inner) if inner.is::<limits::TimedOut>() => {
                return Error::Timeout(inner.to_string());
            }
            DataFusionError::External(inner) if inner.is::<cluster::WriterError>() => {
                return Error::Unavailable(kiln_storage::error_chain(inner.as_ref()));
            }
            DataFusionError::ResourcesExhausted(_) => return Error::ResourcesExhausted(text),
            DataFusionError::ObjectStore(_)
            | DataFusionError::IoError(_)
            | DataFusionError::ParquetError(_)
            | DataFusionError::Internal(_)
            | DataFusionError::External(_) => true,
            _ => false,
        };
        if internal {
            Error::Internal(Box::new(e))
        } else {
            Error::Invalid(text)
        }
    }
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether a DataFusion planning error says a table does not exist (DataFusion has no
/// variant of its own for it).
pub fn is_missing_table(plan_error: &str) -> bool {
    plan_error.starts_with("table") && plan_error.contains("not found")
}

/// SQL reads; it writes no file and no table, whatever protocol it came in on: `COPY …
/// TO` and `INSERT`/`UPDATE`/`DELETE` plans are refused before they run (writes go through
/// the write APIs).
fn refuse_writes(plan: &LogicalPlan) -> datafusion::error::Result<()> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut refused = None;
    plan.apply_with_subqueries(|node| {
        Ok(match node {
            LogicalPlan::Copy(_) => {
                refused = Some("COPY … TO");
                TreeNodeRecursion::Stop
            }
            LogicalPlan::Dml(_) => {
                refused = Some("INSERT, UPDATE and DELETE");
                TreeNodeRecursion::Stop
            }
            _ => TreeNodeRecursion::Continue,
        })
    })?;
    match refused {
        Some(what) => datafusion::common::plan_err!(
            "{what} is not allowed: Kiln's SQL reads data; write through the write APIs"
        ),
        None => Ok(()),
    }
}

/// What SQL may do over HTTP and Flight SQL: queries only, no DDL (`CREATE EXTERNAL
/// TABLE`, `CREATE VIEW`), no DML, no `SET` (each request is its own session).
pub fn read_only_sql() -> datafusion::execution::context::SQLOptions {
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// DataFusion's physical planner, which also plans Kiln's logical nodes.
#[derive(Debug)]
struct KilnQueryPlanner;

#[async_trait::async_trait]
impl QueryPlanner for KilnQueryPlanner {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        session: &dyn Session,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        refuse_writes(plan)?;
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(gapfill::GapFillPlanner)])
            .create_physical_plan(plan, session)
            .await
    }
}

#[derive(Debug, Clone)]
pub struct QueryEngine {
    engine: Arc<Engine>,
    catalog: Arc<KilnCatalog>,
    /// The databases this engine's sessions show (see [`Self::visible_to`]).
    visible: Visible,
    /// Memory pool and spill files, shared by every session.
    runtime: Arc<RuntimeEnv>,
    /// Where queries execute.
    executor: executor::QueryExecutor,
    config: QueryConfig,
    /// Queries started by [`Self::execute`] whose stream is still alive.
    running: Arc<AtomicUsize>,
    /// How alert rules' latest evaluations went (for the `system` tables).
    rule_status: Arc<alerts::scheduler::RuleStatuses>,
    /// Held while a view is refreshed or dropped.
    refreshing: views::RefreshLock,
    /// What every session starts from (see [`Self::context`]).
    base: Arc<SessionState>,
    /// Sessions answer without the writers that do not answer (see [`cluster`]).
    partial_results: bool,
}

impl QueryEngine {
    pub fn new(engine: Arc<Engine>, config: QueryConfig) -> Result<Self, Error> {
        let rule_status = Arc::<alerts::scheduler::RuleStatuses>::default();
        let runtime = config.runtime()?;
        Ok(Self {
            base: Arc::new(base_state(&engine, &runtime, &config)?),
            catalog: Arc::new(KilnCatalog::new(
                Arc::clone(&engine),
                Visible::all(),
                Arc::clone(&rule_status),
            )),
            rule_status,
            visible: Visible::all(),
            runtime,
            executor: config
                .executor
                .clone()
                .unwrap_or_else(executor::QueryExecutor::current),
            config,
            running: Arc::default(),
            refreshing: Arc::default(),
            partial_results: false,
            engine,
        })
    }

    /// This engine, with sessions that answer without a writer that does not answer (a
    /// querier's; see [`cluster`]), as `SET kiln.partial_results = true` asks.
    pub fn with_partial_results(mut self, partial: bool) -> Self {
        self.partial_results = partial;
        self
    }

    /// This engine, with sessions that show only the databases `visible` allows (those a
    /// token may read): cheap, everything else is shared.
    pub fn visible_to(&self, visible: Visible) -> Self {
        Self {
            catalog: Arc::new(KilnCatalog::new(
                Arc::clone(&self.engine),
                visible.clone(),
                Arc::clone(&self.rule_status),
            )),
            visible,
            ..self.clone()
        }
    }

    /// A session context on the shared runtime, with Kiln's planning (see
    /// [`base_state`]) and `config`.
    ///
    /// Building a session state from nothing registers DataFusion's few hundred functions
    /// and makes its optimizer rules anew, a fixed cost every HTTP query paid before its
    /// planning started: a session is instead a copy of the engine's base state with its
    /// own configuration and catalog list. Functions that read the configuration (`now()`,
    /// `to_timestamp` read the time zone) are made for it when it differs from the base's.
    fn context(&self, config: SessionConfig) -> SessionContext {
        // A `min`/`max` aggregate's dynamic filter, pushed into a table's scan, gives wrong
        // answers when a partition is read from a segment and the buffer at once (the
        // segment's oldest rows were dropped: `tests/sql/aggregates.slt`). The other
        // dynamic filters (TopK, joins) stay.
        let config = config
            .set_bool(
                "datafusion.optimizer.enable_aggregate_dynamic_filter_pushdown",
                false,
            )
            // A table's scan spreads its segments over the partitions itself
            // (`provider::parquet_exec`). DataFusion would also cut a segment of more than
            // a megabyte into byte ranges, one per partition: each range opens the file
            // (its footer, statistics, page index: 0.5 ms) and the ranges without a row
            // group then read nothing, the common case for an hour's segment.
            .set_bool("datafusion.optimizer.repartition_file_scans", false);
        let mut config = match config.options().extensions.get::<cluster::KilnOptions>() {
            Some(_) => config,
            None => config.with_option_extension(cluster::KilnOptions {
                partial_results: self.partial_results,
            }),
        };
        if let Some(writers) = &self.config.writers {
            config = config.with_extension(Arc::new(cluster::SessionWriters(Arc::clone(writers))));
        }
        let mut state = SessionState::clone(&self.base);
        let zone_changed =
            config.options().execution.time_zone != state.config().options().execution.time_zone;
        *state.config_mut() = config;
        // Its own catalogs, and its own generator of names for common subexpressions.
        state.register_catalog_list(Arc::new(MemoryCatalogProviderList::new()));
        *state.execution_props_mut() = ExecutionProps::new();
        if zone_changed {
            let updated: Vec<_> = state
                .scalar_functions()
                .values()
                .filter_map(|f| f.inner().with_updated_config(state.config().options()))
                .collect();
            for f in updated {
                // Registering replaces the function of that name; it cannot fail.
                let _ = state.register_udf(Arc::new(f));
            }
        }
        SessionContext::new_with_state(state)
    }

    /// A session whose unqualified table names resolve in `database`.
    pub fn session(&self, database: &str) -> SessionContext {
        self.session_config(database, SessionConfig::new())
    }

    fn session_config(&self, database: &str, config: SessionConfig) -> SessionContext {
        let config = config
            .with_information_schema(true)
            .with_default_catalog_and_schema(CATALOG_NAME, database)
            .with_create_default_catalog_and_schema(false);
        let ctx = self.context(config);
        ctx.register_catalog(CATALOG_NAME, Arc::clone(&self.catalog) as _);
        self.register_last_cache_function(&ctx);
        ctx
    }

    /// The `last_cache()` table function, which shows the databases this engine shows (the
    /// rest of what a session needs is in the base state).
    fn register_last_cache_function(&self, ctx: &SessionContext) {
        ctx.register_udtf(
            "last_cache",
            Arc::new(last_cache::LastCacheFunction::new(
                Arc::clone(&self.engine),
                self.visible.clone(),
            )),
        );
    }

    /// `DatabaseNotFound` unless `database` exists and this engine shows it.
    fn require_database(&self, database: &str) -> Result<(), Error> {
        match self.engine.catalog_state().database(database) {
            Some(_) if self.visible.allows(database) => Ok(()),
            _ => Err(Error::DatabaseNotFound(database.to_owned())),
        }
    }

    /// A session for many small queries of `database` run one after another, as alert
    /// rules are: each plan runs in one partition (their parallelism is across queries),
    /// and the session is made once and kept (see [`Self::plan_in`]). Its plans may be
    /// run again ([`prepared`]), so they carry no dynamic filters (a filter one run
    /// narrows would hold for the next).
    pub fn serial_session(&self, database: &str) -> Result<SessionContext, Error> {
        self.require_database(database)?;
        // This key turns off the TopK, join and aggregate dynamic filters together.
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .set_bool("datafusion.optimizer.enable_dynamic_filter_pushdown", false);
        Ok(self.session_config(database, config))
    }

    /// Plans `sql` in a session of this engine's (see [`Self::serial_session`]).
    pub async fn plan_in(&self, session: &SessionContext, sql: &str) -> Result<DataFrame, Error> {
        Ok(session.sql_with_options(sql, read_only_sql()).await?)
    }

    /// Plans `sql` against `database` without running it (its schema is the result's).
    pub async fn plan(&self, database: &str, sql: &str) -> Result<DataFrame, Error> {
        self.plan_in_zone(database, sql, None).await
    }

    /// Plans `sql` as [`Self::plan`] does, in the time zone `zone` if given: the session's
    /// zone is `zone` (so `time_bucket` and `time_bucket_gapfill` bucket in its local time,
    /// see [`zone`]), and the result's timestamps are shown in it.
    #[tracing::instrument(
        name = "plan",
        level = "debug",
        skip_all,
        fields(db.namespace = database, db.query.text = sql)
    )]
    pub async fn plan_in_zone(
        &self,
        database: &str,
        sql: &str,
        zone: Option<&str>,
    ) -> Result<DataFrame, Error> {
        self.require_database(database)?;
        let Some(zone) = zone else {
            return Ok(self
                .session(database)
                .sql_with_options(sql, read_only_sql())
                .await?);
        };
        zone::parse(zone)?;
        let mut config = SessionConfig::new();
        config.options_mut().execution.time_zone = Some(zone.to_owned());
        let df = self
            .session_config(database, config)
            .sql_with_options(sql, read_only_sql())
            .await?;
        // Relabel the result's instants: same values, shown in `zone`.
        let zone: Arc<str> = Arc::from(zone);
        let columns: Vec<Expr> = df
            .schema()
            .iter()
            .map(|(qualifier, field)| {
                let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
                match field.data_type() {
                    DataType::Timestamp(unit, Some(_)) => column
                        .cast_to(
                            &DataType::Timestamp(*unit, Some(Arc::clone(&zone))),
                            df.schema(),
                        )
                        .map(|e| e.alias(field.name())),
                    _ => Ok(column),
                }
            })
            .collect::<datafusion::error::Result<_>>()?;
        Ok(df.select(columns)?)
    }

    /// Plans and starts `sql` against `database`.
    pub async fn sql(&self, database: &str, sql: &str) -> Result<SendableRecordBatchStream, Error> {
        self.execute(self.plan(database, sql).await?).await
    }

    /// Plans and starts `sql` against `database` in the time zone `zone` (see
    /// [`Self::plan_in_zone`]).
    pub async fn sql_in_zone(
        &self,
        database: &str,
        sql: &str,
        zone: Option<&str>,
    ) -> Result<SendableRecordBatchStream, Error> {
        self.execute(self.plan_in_zone(database, sql, zone).await?)
            .await
    }

    /// Starts a planned query under the engine's time limit, which physical planning
    /// (opening segments, waiting for a last-value cache to warm) counts against too.
    pub async fn execute(&self, df: DataFrame) -> Result<SendableRecordBatchStream, Error> {
        self.limited(self.executor.execute(df))
            .await
            .map(|(stream, _)| stream)
    }

    /// Starts an optimized plan of `state`'s (see [`prepared`]) as [`Self::execute`]
    /// starts a planned one; its physical plan comes back with the stream.
    pub async fn execute_optimized(
        &self,
        state: SessionState,
        plan: LogicalPlan,
    ) -> Result<(SendableRecordBatchStream, Arc<dyn ExecutionPlan>), Error> {
        self.limited(self.executor.execute_optimized(state, plan))
            .await
    }

    /// Runs a physical plan made before (see [`prepared`]) under the engine's limits, in
    /// `task_context` (its session's).
    pub async fn execute_physical(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        task_context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream, Error> {
        self.limited(self.executor.execute_physical(plan, task_context))
            .await
            .map(|(stream, _)| stream)
    }

    /// A query being started, under the engine's time limit.
    async fn limited<T>(
        &self,
        starting: impl std::future::Future<
            Output = datafusion::error::Result<(SendableRecordBatchStream, T)>,
        >,
    ) -> Result<(SendableRecordBatchStream, T), Error> {
        let started = std::time::Instant::now();
        let (stream, started_with) = match self.config.timeout {
            Some(limit) => tokio::time::timeout(limit, starting)
                .await
                .map_err(|_| Error::Timeout(limits::TimedOut(limit).to_string()))??,
            None => starting.await?,
        };
        let left = self
            .config
            .timeout
            .map(|limit| limit.saturating_sub(started.elapsed()));
        let stream: SendableRecordBatchStream = Box::pin(limits::Running::new(
            stream,
            self.config.timeout,
            left,
            &self.running,
        ));
        Ok((stream, started_with))
    }

    /// Queries (HTTP and Flight SQL) running now: a query stops when its client drops it.
    /// The memory pool all queries share: what a front end holds of a result on a
    /// query's behalf is counted here too.
    pub fn memory_pool(&self) -> &Arc<dyn datafusion::execution::memory_pool::MemoryPool> {
        &self.runtime.memory_pool
    }

    pub fn running_queries(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Where queries execute: a PostgreSQL connection, whose statements
    /// `datafusion-postgres` executes itself, is served there whole.
    pub fn executor(&self) -> &executor::QueryExecutor {
        &self.executor
    }

    /// The limits queries run under.
    pub fn config(&self) -> &QueryConfig {
        &self.config
    }

    /// The `system` schema as this engine shows it.
    pub fn system_schema(&self) -> system::SystemSchema {
        system::SystemSchema::new(
            Arc::clone(&self.engine),
            self.visible.clone(),
            Arc::clone(&self.rule_status),
        )
    }

    /// How alert rules' latest evaluations went.
    pub fn rule_statuses(&self) -> &alerts::scheduler::RuleStatuses {
        &self.rule_status
    }

    /// The storage engine the sessions read.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

/// The state every session of an engine copies: DataFusion's functions and rules with
/// Kiln's (gap filling and the last-value cache rule run before DataFusion's optimizer
/// rules: they match plans as SQL builds them; gap filling is planned by
/// [`gapfill::GapFillPlanner`]), the shared runtime, the engine's object store (segments
/// are read through it) and Kiln's time-series functions.
fn base_state(
    engine: &Arc<Engine>,
    runtime: &Arc<RuntimeEnv>,
    config: &QueryConfig,
) -> datafusion::error::Result<SessionState> {
    let mut rules: Vec<Arc<dyn OptimizerRule + Send + Sync>> =
        vec![Arc::new(gapfill::HandleGapFill)];
    // A querier that asks writers for their unpersisted rows answers "latest per series"
    // from them and the segments: its caches are the writer's at its last persistence.
    if config.writers.is_none() {
        rules.push(Arc::new(last_cache::UseLastCache::new(Arc::clone(engine))));
    }
    rules.extend([
        Arc::new(int_compare::IntCompare) as Arc<dyn OptimizerRule + Send + Sync>,
        Arc::new(like_escape::LikeEscape),
    ]);
    rules.extend(Optimizer::new().rules);
    let mut state = SessionStateBuilder::new()
        .with_config(SessionConfig::new().with_create_default_catalog_and_schema(false))
        .with_runtime_env(Arc::clone(runtime))
        .with_default_features()
        .with_optimizer_rules(rules)
        .with_query_planner(Arc::new(KilnQueryPlanner))
        .with_object_store(
            provider::object_store_url().as_ref(),
            Arc::clone(engine.store()) as _,
        )
        .build();
    for f in gapfill::functions()
        .into_iter()
        .chain([time_bucket::time_bucket()])
    {
        state.register_udf(Arc::new(f))?;
    }
    for f in [avg::avg(), selectors::first(), selectors::last()] {
        state.register_udaf(Arc::new(f))?;
    }
    Ok(state)
}

/// A query engine over a fresh data directory with table `db.m` (tag `host`, field `v`).
#[cfg(test)]
pub(crate) async fn test_query_engine(dir: &std::path::Path) -> QueryEngine {
    use kiln_storage::catalog::{ColumnType, SchemaChange};
    use kiln_storage::durable_store::DurableLocalStore;
    let store = Arc::new(DurableLocalStore::new(dir.join("objects")).unwrap());
    let engine = Engine::open(
        kiln_storage::EngineConfig::new(dir.join("wal")),
        store,
        None,
    )
    .await
    .unwrap();
    let changes =
        [("host", ColumnType::Tag), ("v", ColumnType::Float)].map(|(column, ty)| SchemaChange {
            table: "m".into(),
            column: column.into(),
            ty,
        });
    engine
        .catalog()
        .ensure_schema("db", &changes)
        .await
        .unwrap();
    QueryEngine::new(engine, QueryConfig::default()).unwrap()
}

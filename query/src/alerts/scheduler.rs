//! Runs every rule on its interval.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use datafusion::execution::context::SessionContext;
use futures::TryStreamExt;
use kiln_storage::catalog::alerts::{AlertRuleDef, AlertRuleKind};
use kiln_storage::catalog::{CatalogEvent, CatalogState};
use kiln_storage::ids::AlertRuleId;
use parking_lot::{Mutex, RwLock};
use tokio::task::JoinSet;

use super::eval;
use crate::QueryEngine;
use crate::prepared::PreparedQuery;

/// How the latest evaluations of a rule went (kept in memory: a restart starts afresh).
#[derive(Debug, Clone, Default)]
pub struct RuleStatus {
    /// Nanoseconds since the epoch.
    pub last_evaluated_at: Option<i64>,
    pub last_duration: Duration,
    /// Why the latest evaluation failed (`None` once one succeeds).
    pub last_error: Option<String>,
    /// Series the latest successful evaluation saw.
    pub series: usize,
    pub evaluations: u64,
    pub failures: u64,
}

/// Every rule's [`RuleStatus`], shared by the scheduler and the `system` tables.
#[derive(Debug, Default)]
pub struct RuleStatuses(RwLock<BTreeMap<AlertRuleId, RuleStatus>>);

impl RuleStatuses {
    pub fn get(&self, rule: AlertRuleId) -> Option<RuleStatus> {
        self.0.read().get(&rule).cloned()
    }

    pub fn all(&self) -> BTreeMap<AlertRuleId, RuleStatus> {
        self.0.read().clone()
    }

    fn update(&self, rule: AlertRuleId, f: impl FnOnce(&mut RuleStatus)) {
        f(self.0.write().entry(rule).or_default());
    }

    fn retain(&self, live: impl Fn(&AlertRuleId) -> bool) {
        self.0.write().retain(|id, _| live(id));
    }
}

/// How many rules evaluate at once: rule queries share the query pool with users' and
/// must leave cores to the write path.
const CONCURRENT_EVALUATIONS: usize = 2;

/// How often the scheduler looks for due rules when none finishes meanwhile.
const TICK: Duration = Duration::from_millis(100);

/// Evaluates every rule of the catalog on its interval and records the transitions.
#[derive(Debug, Clone)]
pub struct AlertScheduler {
    query: QueryEngine,
    clock: fn() -> i64,
    planned: Arc<Mutex<Planned>>,
}

/// What evaluations keep from one to the next.
#[derive(Default)]
struct Planned {
    /// A session per database, made at its first rule's evaluation.
    sessions: HashMap<String, SessionContext>,
    /// Each rule's query, with its plan when it can be kept (see [`PreparedQuery`]).
    queries: HashMap<AlertRuleId, Arc<PreparedQuery>>,
}

impl std::fmt::Debug for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planned")
            .field("sessions", &self.sessions.keys().collect::<Vec<_>>())
            .field("queries", &self.queries)
            .finish()
    }
}

/// When each rule is due next, the earliest first.
#[derive(Debug, Default)]
struct Agenda {
    /// Rules waiting for their turn (not running) and when it comes.
    due: HashMap<AlertRuleId, Instant>,
    /// The same times in order; an entry whose time `due` no longer holds is stale.
    queue: BinaryHeap<Reverse<(Instant, AlertRuleId)>>,
    running: HashSet<AlertRuleId>,
}

impl Agenda {
    fn schedule(&mut self, rule: AlertRuleId, at: Instant) {
        self.due.insert(rule, at);
        self.queue.push(Reverse((at, rule)));
    }

    /// Follows the catalog's rules: new ones are due now, deleted ones are forgotten.
    fn follow(&mut self, rules: &BTreeMap<AlertRuleId, AlertRuleDef>, now: Instant) {
        self.due.retain(|id, _| rules.contains_key(id));
        for id in rules.keys() {
            if !self.due.contains_key(id) && !self.running.contains(id) {
                self.schedule(*id, now);
            }
        }
    }

    /// The rule due longest ago if it is due by `now`, marked running.
    fn next(&mut self, now: Instant) -> Option<AlertRuleId> {
        while let Some(&Reverse((at, id))) = self.queue.peek() {
            if at > now {
                return None;
            }
            self.queue.pop();
            if self.due.get(&id) == Some(&at) {
                self.due.remove(&id);
                self.running.insert(id);
                return Some(id);
            }
        }
        None
    }
}

impl AlertScheduler {
    /// A scheduler running rules through `query` (which must show every database).
    pub fn new(query: QueryEngine) -> Self {
        Self {
            query,
            clock: kiln_storage::now_nanos,
            planned: Arc::default(),
        }
    }

    /// Runs until `shutdown` resolves; evaluations in flight then finish. Evaluations
    /// run on the query executor, at queries' priority; a rule is due its interval after
    /// its previous evaluation started, and the rule due longest ago starts first, as
    /// soon as an evaluation slot is free.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut agenda = Agenda::default();
        let mut followed: Option<Arc<CatalogState>> = None;
        let mut tasks = JoinSet::new();
        let mut evaluating: HashMap<tokio::task::Id, (AlertRuleId, Instant)> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let task = match &done {
                        Ok((task, ())) => *task,
                        Err(e) => e.id(),
                    };
                    if let Some((id, next)) = evaluating.remove(&task) {
                        agenda.running.remove(&id);
                        agenda.schedule(id, next);
                    }
                }
                _ = tick.tick() => {}
            }
            let state = self.query.engine().catalog_state();
            let now = Instant::now();
            if !followed.as_ref().is_some_and(|f| Arc::ptr_eq(f, &state)) {
                let rules = &state.alerts.rules;
                agenda.follow(rules, now);
                self.query.rule_status.retain(|id| rules.contains_key(id));
                self.planned
                    .lock()
                    .queries
                    .retain(|id, _| rules.contains_key(id));
                followed = Some(Arc::clone(&state));
            }
            while agenda.running.len() < CONCURRENT_EVALUATIONS {
                let Some(id) = agenda.next(now) else { break };
                let Some(rule) = state.alerts.rules.get(&id).cloned() else {
                    agenda.running.remove(&id);
                    continue;
                };
                let every = Duration::from_nanos(u64::try_from(rule.every_nanos).unwrap_or(0));
                let this = self.clone();
                let task = tasks.spawn_on(
                    async move { this.evaluate_and_record(&rule).await },
                    self.query.executor().handle(),
                );
                // A rule whose evaluation panicked is due again all the same.
                evaluating.insert(task.id(), (id, now + every));
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    #[tracing::instrument(
        name = "alert rule",
        level = "debug",
        skip_all,
        fields(rule = %rule.name, db.namespace = %rule.database)
    )]
    async fn evaluate_and_record(&self, rule: &AlertRuleDef) {
        let started = Instant::now();
        let now = (self.clock)();
        let result = self.evaluate(rule, now).await;
        let statuses = &self.query.rule_status;
        match result {
            Ok(series) => statuses.update(rule.id, |s| {
                s.last_error = None;
                s.series = series;
            }),
            Err(e) => {
                tracing::warn!(rule = %rule.name, error = %e, "alert rule evaluation failed");
                statuses.update(rule.id, |s| {
                    s.last_error = Some(e);
                    s.failures += 1;
                });
            }
        }
        statuses.update(rule.id, |s| {
            s.last_evaluated_at = Some(now);
            s.last_duration = started.elapsed();
            s.evaluations += 1;
        });
    }

    /// The session `rule` is planned in and its query (the same as the last evaluation's
    /// unless `sql` differs).
    fn prepared(
        &self,
        rule: &AlertRuleDef,
        sql: String,
    ) -> Result<(SessionContext, Arc<PreparedQuery>), String> {
        let mut planned = self.planned.lock();
        let session = match planned.sessions.get(&rule.database) {
            Some(session) => session.clone(),
            None => {
                let session = self
                    .query
                    .serial_session(&rule.database)
                    .map_err(|e| e.to_string())?;
                planned
                    .sessions
                    .insert(rule.database.clone(), session.clone());
                session
            }
        };
        let query = match planned.queries.get(&rule.id) {
            Some(query) if query.sql() == sql => Arc::clone(query),
            _ => {
                let query = Arc::new(PreparedQuery::new(sql));
                planned.queries.insert(rule.id, Arc::clone(&query));
                query
            }
        };
        Ok((session, query))
    }

    /// Evaluates `rule` once at `now` and records its transitions; the series seen.
    pub async fn evaluate(&self, rule: &AlertRuleDef, now: i64) -> Result<usize, String> {
        let state = self.query.engine().catalog_state();
        let (sql, value_column) = match &rule.kind {
            AlertRuleKind::Threshold {
                sql, value_column, ..
            } => (sql.clone(), value_column.as_str()),
            AlertRuleKind::NoData { table, .. } => (
                super::no_data_sql(&state, rule).ok_or_else(|| {
                    format!("table {table:?} not found in database {:?}", rule.database)
                })?,
                "last_seen",
            ),
        };
        let (session, query) = self.prepared(rule, sql)?;
        let stream = query
            .run(&self.query, &session)
            .await
            .map_err(|e| e.to_string())?;
        let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(|e| e.to_string())?;
        let mut observed = eval::observations(&batches, value_column)?;
        if matches!(rule.kind, AlertRuleKind::NoData { .. }) {
            // Seconds since each series' last row (`last_seen` is in nanoseconds).
            for o in &mut observed {
                o.value = o.value.map(|last_nanos| (now as f64 - last_nanos) / 1e9);
            }
        }
        let transitions =
            eval::evaluate(rule, state.alerts.instances.get(&rule.id), &observed, now)?;
        if !transitions.is_empty() {
            for t in &transitions {
                tracing::info!(rule = %rule.name, series = ?t.series, from = t.from.as_str(), to = t.to.as_str(), value = ?t.value, "alert transition");
            }
            self.query
                .engine()
                .catalog()
                .record_alerts(
                    transitions
                        .into_iter()
                        .map(CatalogEvent::AlertTransitioned)
                        .collect(),
                )
                .await
                .map_err(|e| format!("recording the rule's alerts: {e}"))?;
        }
        Ok(observed.len())
    }
}

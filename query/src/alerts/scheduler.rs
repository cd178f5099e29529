//! Runs every rule on its interval.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use kiln_storage::catalog::CatalogEvent;
use kiln_storage::catalog::alerts::{AlertRuleDef, AlertRuleKind};
use kiln_storage::ids::AlertRuleId;
use parking_lot::RwLock;
use tokio::task::JoinSet;

use super::eval;
use crate::QueryEngine;

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

/// How often the scheduler looks for due rules.
const TICK: Duration = Duration::from_millis(100);

/// Evaluates every rule of the catalog on its interval and records the transitions.
#[derive(Debug, Clone)]
pub struct AlertScheduler {
    query: QueryEngine,
    clock: fn() -> i64,
}

impl AlertScheduler {
    /// A scheduler running rules through `query` (which must show every database).
    pub fn new(query: QueryEngine) -> Self {
        Self {
            query,
            clock: kiln_storage::now_nanos,
        }
    }

    /// Runs until `shutdown` resolves; evaluations in flight then finish.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut next_due: HashMap<AlertRuleId, Instant> = HashMap::new();
        let mut running: HashSet<AlertRuleId> = HashSet::new();
        let mut tasks = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((id, started, every)) = done {
                        running.remove(&id);
                        next_due.insert(id, started + every);
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            let state = self.query.engine().catalog_state();
            let rules = &state.alerts.rules;
            next_due.retain(|id, _| rules.contains_key(id));
            self.query.rule_status.retain(|id| rules.contains_key(id));
            let now = Instant::now();
            // Due rules, the longest overdue first (a rule not yet evaluated is due since
            // it was first seen), so that rules that take long cannot starve the others.
            for rule in rules.values() {
                next_due.entry(rule.id).or_insert(now);
            }
            let mut due: Vec<(Instant, &AlertRuleDef)> = rules
                .values()
                .filter(|r| !running.contains(&r.id))
                .filter_map(|r| next_due.get(&r.id).filter(|t| **t <= now).map(|t| (*t, r)))
                .collect();
            due.sort_by_key(|(t, r)| (*t, r.id));
            for (_, rule) in due {
                if running.len() >= CONCURRENT_EVALUATIONS {
                    break;
                }
                running.insert(rule.id);
                let this = self.clone();
                let rule = rule.clone();
                tasks.spawn(async move {
                    let every = Duration::from_nanos(u64::try_from(rule.every_nanos).unwrap_or(0));
                    this.evaluate_and_record(&rule).await;
                    (rule.id, now, every)
                });
            }
        }
        while tasks.join_next().await.is_some() {}
    }

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
        let stream = self
            .query
            .sql(&rule.database, &sql)
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

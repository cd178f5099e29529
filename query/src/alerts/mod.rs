//! Alert rules: checking a new rule, evaluating rules on their interval, and the state
//! machine each series' alert follows.
//!
//! ```text
//!  AlertScheduler ──every rule's interval──▶ QueryEngine (the rule's SQL, normal limits)
//!        │                                        │ one row per series: labels + value
//!        ▼                                        ▼
//!  evaluate (eval.rs): inactive → pending → firing → resolved, `for`, recovery
//!        │ transitions
//!        ▼
//!  Catalog::record_alerts ── AlertTransitioned events (state survives kill -9) + outbox
//! ```
//!
//! The rules and the alerts' state are catalog events (`kiln_storage::catalog::alerts`);
//! nothing here keeps state a restart needs. Notifications are the server's: it reads the
//! outbox. `system.alerts`, `system.alert_rules` and `system.alert_events`
//! ([`crate::system`]) show the state in SQL.

pub mod eval;
pub mod scheduler;
pub mod template;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use arrow::datatypes::DataType;
use kiln_storage::catalog::alerts::{AlertRuleDef, AlertRuleKind, Condition};
use kiln_storage::catalog::{CatalogState, TIME_COLUMN};
use kiln_storage::ids::AlertRuleId;

pub use scheduler::{AlertScheduler, RuleStatus, RuleStatuses};

use crate::QueryEngine;

/// Why a rule was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rule's SQL does not plan (the planner's error follows).
    #[error("the rule's query does not plan: {0}")]
    Sql(#[source] crate::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A rule as asked for, before it is checked.
#[derive(Debug, Clone)]
pub struct NewRule {
    pub name: String,
    pub database: String,
    pub kind: NewRuleKind,
    pub every: Duration,
    pub for_: Duration,
    pub severity: String,
    pub summary: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub receiver: Option<String>,
}

#[derive(Debug, Clone)]
pub enum NewRuleKind {
    Threshold {
        sql: String,
        /// `None`: the column named `value`, or else the only numeric column.
        value_column: Option<String>,
        condition: String,
        recovery: Option<String>,
    },
    NoData {
        table: String,
        after: Duration,
        lookback: Duration,
    },
}

/// Shortest evaluation interval.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn is_numeric(t: &DataType) -> bool {
    t.is_numeric() || matches!(t, DataType::Dictionary(_, v) if v.is_numeric())
}

/// Checks `rule` against `query` (its SQL must plan in its database and return a numeric
/// value column) and turns it into a catalog definition (id and creation time are the
/// catalog's to set).
pub async fn check_rule(query: &QueryEngine, rule: NewRule) -> Result<AlertRuleDef, RuleError> {
    let invalid = |m: String| Err(RuleError::Invalid(m));
    if rule.every < MIN_EVERY {
        return invalid(format!(
            "the evaluation interval must be at least {}",
            humantime::format_duration(MIN_EVERY)
        ));
    }
    if rule.severity.trim().is_empty() {
        return invalid("the severity must not be empty".into());
    }
    for (what, text) in [
        ("summary", &rule.summary),
        ("description", &rule.description),
    ] {
        template::check(text).map_err(|e| RuleError::Invalid(format!("{what}: {e}")))?;
    }
    if let Some(url) = &rule.receiver
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return invalid(format!(
            "the receiver {url:?} is not an http:// or https:// URL"
        ));
    }
    let kind = match rule.kind {
        NewRuleKind::Threshold {
            sql,
            value_column,
            condition,
            recovery,
        } => {
            let parse = |text: &str, what: &str| {
                text.parse::<Condition>()
                    .map(|c| c.to_string())
                    .map_err(|e| RuleError::Invalid(format!("{what}: {e}")))
            };
            let condition = parse(&condition, "condition")?;
            let recovery = recovery.map(|r| parse(&r, "recovery")).transpose()?;
            let df = query
                .plan(&rule.database, &sql)
                .await
                .map_err(RuleError::Sql)?;
            let schema = df.schema();
            let columns: Vec<_> = schema.fields().iter().map(|f| f.name().clone()).collect();
            let value_column = match value_column {
                Some(name) => name,
                None if columns.iter().any(|c| c == "value") => "value".to_owned(),
                None => {
                    let numeric: Vec<_> = schema
                        .fields()
                        .iter()
                        .filter(|f| is_numeric(f.data_type()))
                        .collect();
                    match numeric.as_slice() {
                        [only] => only.name().clone(),
                        _ => {
                            return invalid(format!(
                                "the query returns no column named \"value\" and {} numeric \
                                 columns ({columns:?}): name the value column",
                                numeric.len()
                            ));
                        }
                    }
                }
            };
            let Some(field) = schema.fields().iter().find(|f| *f.name() == value_column) else {
                return invalid(format!(
                    "the query returns no column {value_column:?}; it returns {columns:?}"
                ));
            };
            if !is_numeric(field.data_type()) {
                return invalid(format!(
                    "the value column {value_column:?} is {}, not a number",
                    field.data_type()
                ));
            }
            AlertRuleKind::Threshold {
                sql,
                value_column,
                condition,
                recovery,
            }
        }
        NewRuleKind::NoData {
            table,
            after,
            lookback,
        } => {
            if after.is_zero() {
                return invalid("the no-data duration must be above zero".into());
            }
            if lookback < after {
                return invalid(format!(
                    "the lookback ({}) must be at least the no-data duration ({})",
                    humantime::format_duration(lookback),
                    humantime::format_duration(after)
                ));
            }
            let state = query.engine().catalog_state();
            if state.table(&rule.database, &table).is_none()
                || !query.visible.allows(&rule.database)
            {
                return invalid(format!(
                    "table {table:?} not found in database {:?}",
                    rule.database
                ));
            }
            AlertRuleKind::NoData {
                table,
                after_nanos: nanos(after),
                lookback_nanos: nanos(lookback),
            }
        }
    };
    Ok(AlertRuleDef {
        id: AlertRuleId(0),
        name: rule.name,
        database: rule.database,
        kind,
        every_nanos: nanos(rule.every),
        for_nanos: nanos(rule.for_),
        severity: rule.severity,
        summary: rule.summary,
        description: rule.description,
        labels: rule.labels,
        receiver: rule.receiver,
        created_at: 0,
    })
}

/// The SQL a no-data rule runs: the last time of each series of `table` seen within the
/// lookback, as `last_seen`.
pub fn no_data_sql(state: &CatalogState, rule: &AlertRuleDef) -> Option<String> {
    let AlertRuleKind::NoData {
        table,
        lookback_nanos,
        ..
    } = &rule.kind
    else {
        return None;
    };
    let def = state.table(&rule.database, table)?;
    let tags: Vec<String> = def
        .tag_columns()
        .map(|c| crate::quote_ident(&c.name))
        .collect();
    let select = tags.iter().map(|t| format!("{t}, ")).collect::<String>();
    let group = if tags.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {}", tags.join(", "))
    };
    Some(format!(
        "SELECT {select}max({time}) AS last_seen FROM {table} \
         WHERE {time} > now() - arrow_cast({lookback_nanos}, 'Duration(Nanosecond)'){group}",
        time = crate::quote_ident(TIME_COLUMN),
        table = crate::quote_ident(table),
    ))
}

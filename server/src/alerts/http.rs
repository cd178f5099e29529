//! The alert rules' HTTP API (see the module table in [`super`]).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_query::alerts::{NewRule, NewRuleKind, RuleError, check_rule};
use kiln_storage::catalog::CatalogState;
use kiln_storage::catalog::alerts::{AlertRuleDef, AlertRuleKind, AlertState, series_key};
use serde::{Deserialize, Serialize};

use crate::auth::http::{refusal, require};
use crate::auth::{Action, Principal};
use crate::http::{AppState, error_response as error, query_engine};

/// `POST /api/v3/alerts/rules`: a threshold rule (`sql` and `condition`) or a no-data
/// rule (`table` and `no_data_after`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRule {
    pub name: String,
    pub database: String,
    /// Threshold rules: one row per series, its non-value columns the labels.
    pub sql: Option<String>,
    /// The value column (default: `value`, or the only numeric column).
    pub value_column: Option<String>,
    /// `> 90`, `< 5`, `between 10 and 20`, …
    pub condition: Option<String>,
    /// Resolve only once this holds (hysteresis).
    pub recovery: Option<String>,
    /// No-data rules: the table whose series must keep sending.
    pub table: Option<String>,
    /// No-data rules: a series silent this long fires (`5m`).
    pub no_data_after: Option<String>,
    /// No-data rules: series seen within this window are watched (default 24h).
    pub lookback: Option<String>,
    /// Evaluation interval (default 30s).
    pub every: Option<String>,
    /// How long the condition holds before the alert fires (default 0s).
    #[serde(rename = "for")]
    pub for_: Option<String>,
    /// Default `warning`.
    pub severity: Option<String>,
    pub summary: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Webhook URL for this rule instead of the server's `--alert-webhook-url`.
    pub receiver: Option<String>,
}

/// A rule as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleInfo {
    pub name: String,
    pub database: String,
    /// `threshold` or `no_data`.
    pub kind: String,
    pub sql: Option<String>,
    pub value_column: Option<String>,
    pub condition: Option<String>,
    pub recovery: Option<String>,
    pub table: Option<String>,
    pub no_data_after: Option<String>,
    pub lookback: Option<String>,
    pub every: String,
    #[serde(rename = "for")]
    pub for_: String,
    pub severity: String,
    pub summary: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub receiver: Option<String>,
    pub pending: usize,
    pub firing: usize,
    pub last_evaluated_at: Option<String>,
    pub last_error: Option<String>,
}

/// A pending or firing alert as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertInfo {
    pub rule: String,
    pub database: String,
    pub labels: BTreeMap<String, String>,
    pub series: String,
    pub state: String,
    pub severity: String,
    pub value: Option<f64>,
    pub active_at: String,
    pub fired_at: Option<String>,
    pub summary: String,
    pub description: String,
}

fn duration(nanos: i64) -> String {
    humantime::format_duration(Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))).to_string()
}

fn rfc3339(nanos: i64) -> String {
    crate::http::rfc3339(nanos, chrono::SecondsFormat::Millis)
}

fn info(s: &AppState, state: &CatalogState, rule: &AlertRuleDef) -> RuleInfo {
    let mut out = RuleInfo {
        name: rule.name.clone(),
        database: rule.database.clone(),
        kind: String::new(),
        sql: None,
        value_column: None,
        condition: None,
        recovery: None,
        table: None,
        no_data_after: None,
        lookback: None,
        every: duration(rule.every_nanos),
        for_: duration(rule.for_nanos),
        severity: rule.severity.clone(),
        summary: rule.summary.clone(),
        description: rule.description.clone(),
        labels: rule.labels.clone(),
        receiver: rule.receiver.clone(),
        pending: state.alerts.count(rule.id, AlertState::Pending),
        firing: state.alerts.count(rule.id, AlertState::Firing),
        last_evaluated_at: None,
        last_error: None,
    };
    match &rule.kind {
        AlertRuleKind::Threshold {
            sql,
            value_column,
            condition,
            recovery,
        } => {
            out.kind = "threshold".into();
            out.sql = Some(sql.clone());
            out.value_column = Some(value_column.clone());
            out.condition = Some(condition.clone());
            out.recovery = recovery.clone();
        }
        AlertRuleKind::NoData {
            table,
            after_nanos,
            lookback_nanos,
        } => {
            out.kind = "no_data".into();
            out.table = Some(table.clone());
            out.no_data_after = Some(duration(*after_nanos));
            out.lookback = Some(duration(*lookback_nanos));
        }
    }
    if let Some(status) = s.query.rule_statuses().get(rule.id) {
        out.last_evaluated_at = status.last_evaluated_at.map(rfc3339);
        out.last_error = status.last_error;
    }
    out
}

fn parse_duration(what: &str, text: Option<&str>, default: Duration) -> Result<Duration, String> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t).map_err(|e| format!("invalid {what} {t:?}: {e}")),
    }
}

/// The rule `request` asks for, before the query engine checks it.
pub fn new_rule(request: CreateRule) -> Result<NewRule, String> {
    let kind = match (&request.sql, &request.no_data_after) {
        (Some(sql), None) => {
            let Some(condition) = request.condition.clone() else {
                return Err("a threshold rule needs a condition (\"> 90\")".into());
            };
            if request.table.is_some() || request.lookback.is_some() {
                return Err("table and lookback are for no-data rules, not rules with sql".into());
            }
            NewRuleKind::Threshold {
                sql: sql.clone(),
                value_column: request.value_column.clone(),
                condition,
                recovery: request.recovery.clone(),
            }
        }
        (None, Some(after)) => {
            let Some(table) = request.table.clone() else {
                return Err("a no-data rule needs the table whose series it watches".into());
            };
            if request.condition.is_some()
                || request.recovery.is_some()
                || request.value_column.is_some()
            {
                return Err(
                    "condition, recovery and value_column are for rules with sql, not no-data \
                     rules"
                        .into(),
                );
            }
            NewRuleKind::NoData {
                table,
                after: parse_duration("no_data_after", Some(after), Duration::ZERO)?,
                lookback: parse_duration(
                    "lookback",
                    request.lookback.as_deref(),
                    Duration::from_secs(24 * 3600),
                )?,
            }
        }
        (Some(_), Some(_)) => {
            return Err("a rule has either sql (threshold) or no_data_after, not both".into());
        }
        (None, None) => {
            return Err(
                "a rule needs sql and a condition (threshold), or a table and no_data_after \
                 (no data)"
                    .into(),
            );
        }
    };
    Ok(NewRule {
        name: request.name,
        database: request.database,
        kind,
        every: parse_duration("every", request.every.as_deref(), Duration::from_secs(30))?,
        for_: parse_duration("for", request.for_.as_deref(), Duration::ZERO)?,
        severity: request.severity.unwrap_or_else(|| "warning".into()),
        summary: request.summary.unwrap_or_default(),
        description: request.description.unwrap_or_default(),
        labels: request.labels,
        receiver: request.receiver,
    })
}

/// `POST /api/v3/alerts/rules`.
pub async fn create(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Json(request): Json<CreateRule>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Write(&request.database)) {
        return refusal(&e);
    }
    let rule = match new_rule(request) {
        Ok(rule) => rule,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // The rule's query may read only what its creator may.
    let def = match check_rule(&query_engine(&s, &principal), rule).await {
        Ok(def) => def,
        Err(e @ RuleError::Sql(_)) | Err(e @ RuleError::Invalid(_)) => {
            return error(StatusCode::BAD_REQUEST, crate::client::chain(&e));
        }
    };
    let mut def = def;
    def.created_at = kiln_storage::now_nanos();
    match s.engine.catalog().create_alert_rule(def).await {
        Ok(def) => {
            let state = s.engine.catalog_state();
            (StatusCode::CREATED, Json(info(&s, &state, &def))).into_response()
        }
        Err(e @ kiln_storage::catalog::Error::InvalidAlert(_))
        | Err(e @ kiln_storage::catalog::Error::InvalidName { .. }) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store the rule: {e}"),
        ),
    }
}

/// `GET /api/v3/alerts/rules`.
pub async fn list(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Response {
    let state = s.engine.catalog_state();
    let rules: Vec<RuleInfo> = state
        .alerts
        .rules
        .values()
        .filter(|r| principal.allows(Action::Read(&r.database)))
        .map(|r| info(&s, &state, r))
        .collect();
    Json(rules).into_response()
}

/// `GET /api/v3/alerts/rules/{name}`.
pub async fn show(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    let state = s.engine.catalog_state();
    match state.alerts.rule(&name) {
        Some(r) if principal.allows(Action::Read(&r.database)) => {
            Json(info(&s, &state, r)).into_response()
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no alert rule named {name:?}"),
        ),
    }
}

/// `DELETE /api/v3/alerts/rules/{name}`.
pub async fn delete(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    let state = s.engine.catalog_state();
    let Some(rule) = state.alerts.rule(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no alert rule named {name:?}"),
        );
    };
    if let Err(e) = require(&s.auth, &principal, Action::Write(&rule.database)) {
        return refusal(&e);
    }
    let now = kiln_storage::now_nanos();
    match s
        .engine
        .catalog()
        .delete_alert_rule(&name, move |rule, i| {
            kiln_query::alerts::eval::ending(rule, i, now)
        })
        .await
    {
        Ok(Some(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no alert rule named {name:?}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot delete the rule: {e}"),
        ),
    }
}

/// `GET /api/v3/alerts`.
pub async fn alerts(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Response {
    let state = s.engine.catalog_state();
    let mut out = Vec::new();
    for (id, instances) in &state.alerts.instances {
        let Some(rule) = state.alerts.rules.get(id) else {
            continue;
        };
        if !principal.allows(Action::Read(&rule.database)) {
            continue;
        }
        for i in instances.values() {
            out.push(AlertInfo {
                rule: rule.name.clone(),
                database: rule.database.clone(),
                labels: kiln_storage::catalog::alerts::alert_labels(rule, &i.series),
                series: series_key(&i.series),
                state: i.state.as_str().to_owned(),
                severity: rule.severity.clone(),
                value: i.value,
                active_at: rfc3339(i.active_at),
                fired_at: i.fired_at.map(rfc3339),
                summary: i.summary.clone(),
                description: i.description.clone(),
            });
        }
    }
    Json(out).into_response()
}

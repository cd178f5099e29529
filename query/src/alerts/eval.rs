//! The state machine of one rule's alerts: from the rows of one evaluation and the alerts'
//! current state, the transitions to record.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use kiln_storage::catalog::alerts::{
    AlertInstance, AlertRuleDef, AlertRuleKind, AlertState, AlertTransition, Condition,
    alert_labels, series_key,
};
use kiln_storage::ids::AlertEventId;

use super::template;

/// One series as an evaluation saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub series: BTreeMap<String, String>,
    /// `None`: the query returned NULL (the condition does not hold).
    pub value: Option<f64>,
}

/// Turns a rule query's rows into observations: `value_column` is the value (cast to a
/// float), every other column a label (NULL labels are left out). Two rows of one series
/// are an error: a rule's query returns one row per series.
pub fn observations(
    batches: &[RecordBatch],
    value_column: &str,
) -> Result<Vec<Observation>, String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let options = FormatOptions::default();
    for batch in batches {
        let schema = batch.schema();
        let Ok(value_index) = schema.index_of(value_column) else {
            return Err(format!("the query returned no column {value_column:?}"));
        };
        let values = arrow::compute::cast(batch.column(value_index), &DataType::Float64)
            .map_err(|e| format!("the value column {value_column:?} is not a number: {e}"))?;
        let values = values.as_primitive::<Float64Type>();
        let labels: Vec<(String, ArrayFormatter<'_>)> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != value_index)
            .map(|(i, f)| {
                ArrayFormatter::try_new(batch.column(i).as_ref(), &options)
                    .map(|fmt| (f.name().clone(), fmt))
                    .map_err(|e| format!("column {:?} cannot be a label: {e}", f.name()))
            })
            .collect::<Result<_, _>>()?;
        for row in 0..batch.num_rows() {
            let mut series = BTreeMap::new();
            for (i, (name, fmt)) in labels.iter().enumerate() {
                let index = if i < value_index { i } else { i + 1 };
                if batch.column(index).is_valid(row) {
                    series.insert(name.clone(), fmt.value(row).to_string());
                }
            }
            let key = series_key(&series);
            if !seen.insert(key.clone()) {
                return Err(format!(
                    "the query returned several rows for the series {{{key}}}; a rule's query \
                     returns one row per series (group by its labels)"
                ));
            }
            let value = values.is_valid(row).then(|| values.value(row));
            out.push(Observation { series, value });
        }
    }
    Ok(out)
}

/// What decides a rule's alerts, parsed from its definition.
#[derive(Debug, Clone, Copy)]
struct Conditions {
    fire: Condition,
    recovery: Option<Condition>,
    /// No-data rules: a series no longer returned is still silent.
    absent_holds: bool,
}

fn conditions(rule: &AlertRuleDef) -> Result<Conditions, String> {
    Ok(match &rule.kind {
        AlertRuleKind::Threshold {
            condition,
            recovery,
            ..
        } => Conditions {
            fire: condition.parse()?,
            recovery: recovery.as_deref().map(str::parse).transpose()?,
            absent_holds: false,
        },
        AlertRuleKind::NoData { after_nanos, .. } => Conditions {
            fire: Condition::Above(*after_nanos as f64 / 1e9),
            recovery: None,
            absent_holds: true,
        },
    })
}

/// The transitions one evaluation at `now` makes, given the rule's current alerts.
/// Transition ids are the catalog's to assign.
pub fn evaluate(
    rule: &AlertRuleDef,
    current: Option<&BTreeMap<String, AlertInstance>>,
    observed: &[Observation],
    now: i64,
) -> Result<Vec<AlertTransition>, String> {
    let c = conditions(rule)?;
    let empty = BTreeMap::new();
    let current = current.unwrap_or(&empty);
    let mut out = Vec::new();
    let mut make = |series: &BTreeMap<String, String>,
                    from: AlertState,
                    to: AlertState,
                    value: Option<f64>,
                    active_at: i64| {
        let labels = alert_labels(rule, series);
        out.push(AlertTransition {
            id: AlertEventId(0),
            rule: rule.id,
            series: series.clone(),
            rule_name: rule.name.clone(),
            severity: rule.severity.clone(),
            receiver: rule.receiver.clone(),
            from,
            to,
            value: value.filter(|v| v.is_finite()),
            at: now,
            active_at,
            summary: template::render(&rule.summary, &labels, value),
            description: template::render(&rule.description, &labels, value),
            labels,
        });
    };
    let due = |active_at: i64| now.saturating_sub(active_at) >= rule.for_nanos;
    let mut present = std::collections::BTreeSet::new();
    for o in observed {
        let key = series_key(&o.series);
        let holds = o.value.is_some_and(|v| c.fire.holds(v));
        let instance = current.get(&key);
        present.insert(key);
        match instance.map(|i| (i.state, i.active_at)) {
            None | Some((AlertState::Inactive | AlertState::Resolved, _)) => {
                if holds {
                    let to = if rule.for_nanos <= 0 {
                        AlertState::Firing
                    } else {
                        AlertState::Pending
                    };
                    make(&o.series, AlertState::Inactive, to, o.value, now);
                }
            }
            Some((AlertState::Pending, active_at)) => {
                if !holds {
                    make(
                        &o.series,
                        AlertState::Pending,
                        AlertState::Inactive,
                        o.value,
                        active_at,
                    );
                } else if due(active_at) {
                    make(
                        &o.series,
                        AlertState::Pending,
                        AlertState::Firing,
                        o.value,
                        active_at,
                    );
                }
            }
            Some((AlertState::Firing, active_at)) => {
                let clear = match c.recovery {
                    Some(r) => o.value.is_some_and(|v| r.holds(v)),
                    None => !holds,
                };
                if clear {
                    make(
                        &o.series,
                        AlertState::Firing,
                        AlertState::Resolved,
                        o.value,
                        active_at,
                    );
                }
            }
        }
    }
    for (key, i) in current {
        if present.contains(key) {
            continue;
        }
        match (i.state, c.absent_holds) {
            (AlertState::Pending, true) if due(i.active_at) => make(
                &i.series,
                AlertState::Pending,
                AlertState::Firing,
                i.value,
                i.active_at,
            ),
            (AlertState::Pending, false) => make(
                &i.series,
                AlertState::Pending,
                AlertState::Inactive,
                None,
                i.active_at,
            ),
            (AlertState::Firing, false) => make(
                &i.series,
                AlertState::Firing,
                AlertState::Resolved,
                None,
                i.active_at,
            ),
            _ => {}
        }
    }
    Ok(out)
}

/// The transition that ends alert `i` of `rule` (the rule is being deleted).
pub fn ending(rule: &AlertRuleDef, i: &AlertInstance, now: i64) -> AlertTransition {
    AlertTransition {
        id: AlertEventId(0),
        rule: i.rule,
        series: i.series.clone(),
        rule_name: rule.name.clone(),
        severity: rule.severity.clone(),
        labels: alert_labels(rule, &i.series),
        receiver: rule.receiver.clone(),
        from: i.state,
        to: if i.state == AlertState::Firing {
            AlertState::Resolved
        } else {
            AlertState::Inactive
        },
        value: None,
        at: now,
        active_at: i.active_at,
        summary: i.summary.clone(),
        description: i.description.clone(),
    }
}

//! Alert rules and alert state, as catalog events.
//!
//! A rule ([`AlertRuleDef`]) is created and deleted by events. Each series a rule watches
//! has an [`AlertInstance`] while it is pending or firing; every change of state is an
//! [`AlertTransition`] event, so the state after a restart is the state before it. A
//! transition that someone must hear of (firing, resolved) waits in the outbox
//! ([`Outbox`]) until every receiver has taken it ([`CatalogEvent::AlertDelivered`]): the
//! notifier reads the outbox again after a restart, so nothing is announced twice and
//! nothing is lost short of a crash between a receiver's answer and its record (then the
//! transition is sent again with the same key).
//!
//! [`CatalogEvent::AlertDelivered`]: super::CatalogEvent::AlertDelivered

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::ids::{AlertEventId, AlertRuleId};

/// Transitions [`AlertsState::history`] keeps (older ones leave it).
pub const HISTORY_LEN: usize = 10_000;

/// A comparison a value passes or fails: `> 90`, `>= 90`, `< 5`, `<= 5`, `== 1`, `!= 0`,
/// `between 10 and 20`, `outside 10 and 20` (bounds included in `between`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    Above(f64),
    AtLeast(f64),
    Below(f64),
    AtMost(f64),
    Equal(f64),
    NotEqual(f64),
    Between(f64, f64),
    Outside(f64, f64),
}

impl Condition {
    pub fn holds(self, v: f64) -> bool {
        match self {
            Self::Above(t) => v > t,
            Self::AtLeast(t) => v >= t,
            Self::Below(t) => v < t,
            Self::AtMost(t) => v <= t,
            Self::Equal(t) => v == t,
            Self::NotEqual(t) => v != t,
            Self::Between(lo, hi) => lo <= v && v <= hi,
            Self::Outside(lo, hi) => v < lo || v > hi,
        }
    }
}

impl std::str::FromStr for Condition {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = |s: &str| -> Result<f64, String> {
            let v: f64 = s
                .trim()
                .parse()
                .map_err(|_| format!("{:?} is not a number", s.trim()))?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(format!("{:?} is not a finite number", s.trim()))
            }
        };
        let t = text.trim();
        let lower = t.to_ascii_lowercase();
        for (word, make) in [
            ("between", Self::Between as fn(f64, f64) -> Self),
            ("outside", Self::Outside),
        ] {
            if let Some(rest) = lower.strip_prefix(word) {
                let Some((lo, hi)) = rest.split_once(" and ") else {
                    return Err(format!("expected \"{word} LOW and HIGH\", got {t:?}"));
                };
                let (lo, hi) = (number(lo)?, number(hi)?);
                if lo > hi {
                    return Err(format!("{word}: {lo} is above {hi}"));
                }
                return Ok(make(lo, hi));
            }
        }
        for (op, make) in [
            (">=", Self::AtLeast as fn(f64) -> Self),
            ("<=", Self::AtMost),
            ("==", Self::Equal),
            ("!=", Self::NotEqual),
            (">", Self::Above),
            ("<", Self::Below),
            ("=", Self::Equal),
        ] {
            if let Some(rest) = t.strip_prefix(op) {
                return Ok(make(number(rest)?));
            }
        }
        Err(format!(
            "unknown condition {t:?}: use > N, >= N, < N, <= N, == N, != N, \
             between LOW and HIGH, or outside LOW and HIGH"
        ))
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Above(t) => write!(f, "> {t}"),
            Self::AtLeast(t) => write!(f, ">= {t}"),
            Self::Below(t) => write!(f, "< {t}"),
            Self::AtMost(t) => write!(f, "<= {t}"),
            Self::Equal(t) => write!(f, "== {t}"),
            Self::NotEqual(t) => write!(f, "!= {t}"),
            Self::Between(lo, hi) => write!(f, "between {lo} and {hi}"),
            Self::Outside(lo, hi) => write!(f, "outside {lo} and {hi}"),
        }
    }
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AlertRuleKind {
    /// `sql` returns one row per series: `value_column` is the value, every other column
    /// a label. A series fires while `condition` holds; with `recovery` it resolves only
    /// once `recovery` holds (hysteresis), otherwise once `condition` no longer holds or
    /// the series is no longer returned.
    Threshold {
        sql: String,
        value_column: String,
        /// A [`Condition`], as written.
        condition: String,
        recovery: Option<String>,
    },
    /// Each series of `table` (its tag set) that has sent nothing for `after_nanos`
    /// fires, and resolves when it sends again. Series are those seen within
    /// `lookback_nanos`; one that fired stays firing after it leaves that window.
    NoData {
        table: String,
        after_nanos: i64,
        lookback_nanos: i64,
    },
}

/// An alert rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRuleDef {
    pub id: AlertRuleId,
    /// Unique among rules; the alert's `alertname` label.
    pub name: String,
    /// The database its query runs in.
    pub database: String,
    #[serde(flatten)]
    pub kind: AlertRuleKind,
    /// Evaluation interval, nanoseconds.
    pub every_nanos: i64,
    /// How long the condition must hold before the alert fires (pending until then).
    pub for_nanos: i64,
    pub severity: String,
    /// Templates: `{{ $labels.NAME }}` and `{{ $value }}` are replaced.
    pub summary: String,
    pub description: String,
    /// Labels added to every alert of the rule.
    pub labels: BTreeMap<String, String>,
    /// Webhook URL for this rule's notifications, instead of the server's default.
    pub receiver: Option<String>,
    pub created_at: i64,
}

/// Where a series' alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Inactive,
    Pending,
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inactive => "inactive",
            Self::Pending => "pending",
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// One series' alert moving from one state to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertTransition {
    /// Assigned when committed (any value given is replaced); the notifications'
    /// idempotency key is derived from it.
    pub id: AlertEventId,
    pub rule: AlertRuleId,
    /// The series' labels as the rule's query returned them: the alert's key.
    pub series: BTreeMap<String, String>,
    /// What receivers are told, so that a transition can be delivered after its rule is
    /// gone: the rule's name, severity and receiver, and every label of the alert
    /// ([`alert_labels`]).
    pub rule_name: String,
    pub severity: String,
    pub labels: BTreeMap<String, String>,
    pub receiver: Option<String>,
    pub from: AlertState,
    pub to: AlertState,
    /// The value that caused it (`None` when absent or not finite).
    pub value: Option<f64>,
    /// When it happened, nanoseconds since the epoch.
    pub at: i64,
    /// When the alert became active (pending or firing), for `for` and `startsAt`.
    pub active_at: i64,
    /// `summary` and `description`, rendered.
    pub summary: String,
    pub description: String,
}

impl AlertTransition {
    /// Whether receivers hear of it (they hear of firing and resolution only).
    pub fn is_notified(&self) -> bool {
        matches!(self.to, AlertState::Firing | AlertState::Resolved)
    }

    /// The idempotency key its notifications carry: the same on every attempt and after
    /// a restart, different for every transition.
    pub fn key(&self) -> String {
        format!("kiln-{}-{}-{}", self.rule, self.id, self.to.as_str())
    }
}

/// A series' alert while it is pending or firing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertInstance {
    pub rule: AlertRuleId,
    pub series: BTreeMap<String, String>,
    pub state: AlertState,
    pub active_at: i64,
    /// When it fired, if it has.
    pub fired_at: Option<i64>,
    pub value: Option<f64>,
    pub summary: String,
    pub description: String,
}

/// A notified transition some receiver has not yet taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outbox {
    pub transition: AlertTransition,
    /// Receivers that took it.
    pub delivered: BTreeSet<String>,
}

/// Every alert rule and the state of its alerts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertsState {
    pub rules: BTreeMap<AlertRuleId, AlertRuleDef>,
    pub next_rule_id: u32,
    pub next_event_id: u64,
    /// Pending and firing alerts, by rule and series key ([`series_key`]).
    pub instances: BTreeMap<AlertRuleId, BTreeMap<String, AlertInstance>>,
    /// The latest [`HISTORY_LEN`] transitions, oldest first.
    pub history: VecDeque<AlertTransition>,
    /// Notified transitions not yet taken by every receiver, by id.
    pub outbox: BTreeMap<AlertEventId, Outbox>,
}

/// Every label of an alert: the rule's labels, the series', then `alertname` (the rule's
/// name) and `severity`.
pub fn alert_labels(
    rule: &AlertRuleDef,
    series: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = rule.labels.clone();
    labels.extend(series.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert("alertname".into(), rule.name.clone());
    labels.insert("severity".into(), rule.severity.clone());
    labels
}

/// A series' key among a rule's alerts: its labels, `name=value` joined by `,`, with `,`,
/// `=` and `\` escaped.
pub fn series_key(series: &BTreeMap<String, String>) -> String {
    let escape = |s: &str| {
        s.replace('\\', "\\\\")
            .replace(',', "\\,")
            .replace('=', "\\=")
    };
    series
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

impl AlertsState {
    pub fn rule(&self, name: &str) -> Option<&AlertRuleDef> {
        self.rules.values().find(|r| r.name == name)
    }

    /// How many of `rule`'s alerts are in `state`.
    pub fn count(&self, rule: AlertRuleId, state: AlertState) -> usize {
        self.instances
            .get(&rule)
            .map_or(0, |m| m.values().filter(|i| i.state == state).count())
    }

    pub fn create_rule(&mut self, def: &AlertRuleDef) -> Result<(), String> {
        if self.rule(&def.name).is_some() {
            return Err(format!("an alert rule named {:?} exists already", def.name));
        }
        self.next_rule_id = self.next_rule_id.max(def.id.get() + 1);
        self.rules.insert(def.id, def.clone());
        Ok(())
    }

    /// Forgets the rule and its alerts (their resolution is recorded before, by the
    /// deleter); transitions of it already in the outbox are still delivered.
    pub fn delete_rule(&mut self, id: AlertRuleId) {
        self.rules.remove(&id);
        self.instances.remove(&id);
    }

    pub fn transition(&mut self, t: &AlertTransition) -> Result<(), String> {
        if !self.rules.contains_key(&t.rule) {
            return Err(format!("alert rule {} does not exist", t.rule));
        }
        let key = series_key(&t.series);
        let instances = self.instances.entry(t.rule).or_default();
        let current = instances
            .get(&key)
            .map_or(AlertState::Inactive, |i| i.state);
        if current != t.from {
            return Err(format!(
                "alert {key:?} of rule {} is {}, not {}",
                t.rule,
                current.as_str(),
                t.from.as_str()
            ));
        }
        match t.to {
            AlertState::Pending | AlertState::Firing => {
                let fired_at = instances.get(&key).and_then(|i| i.fired_at);
                instances.insert(
                    key,
                    AlertInstance {
                        rule: t.rule,
                        series: t.series.clone(),
                        state: t.to,
                        active_at: t.active_at,
                        fired_at: if t.to == AlertState::Firing {
                            fired_at.or(Some(t.at))
                        } else {
                            None
                        },
                        value: t.value,
                        summary: t.summary.clone(),
                        description: t.description.clone(),
                    },
                );
            }
            AlertState::Inactive | AlertState::Resolved => {
                instances.remove(&key);
            }
        }
        if instances.is_empty() {
            self.instances.remove(&t.rule);
        }
        self.next_event_id = self.next_event_id.max(t.id.get() + 1);
        if t.is_notified() {
            self.outbox.insert(
                t.id,
                Outbox {
                    transition: t.clone(),
                    delivered: BTreeSet::new(),
                },
            );
        }
        self.history.push_back(t.clone());
        while self.history.len() > HISTORY_LEN {
            self.history.pop_front();
        }
        Ok(())
    }

    /// Records that `receiver` took transition `id`; `done` drops it from the outbox.
    pub fn delivered(&mut self, id: AlertEventId, receiver: &str, done: bool) {
        if done {
            self.outbox.remove(&id);
        } else if let Some(entry) = self.outbox.get_mut(&id) {
            entry.delivered.insert(receiver.to_owned());
        }
    }
}

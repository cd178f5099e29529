//! The `system` schema: Kiln's own state as SQL tables, built from the catalog and the
//! engine when a query reads them, showing only the databases the session shows.
//!
//! | table | a row per |
//! |---|---|
//! | `system.alert_rules` | rule: its definition and how its latest evaluation went |
//! | `system.alerts` | pending or firing alert (rule and series), and rule whose latest evaluation failed (state `error`) |
//! | `system.alert_events` | transition, the latest 10,000 |
//! | `system.series` | series (table and tag set): first and last seen, recent rows, status ([`devices`]) |
//! | `system.devices` | device (a tag value) with attributes, one column per attribute name |
//! | `system.data_quality` | table written since start: rows, rejected lines, late and out-of-order rows |
//! | `system.deletes` | delete of rows not yet made physical |
//! | `system.views` | materialized view: definition, watermark, last refresh, buckets still to refresh |
//! | `system.ingesters` | ingester that joined a cluster's catalog: address, when it joined, its persisted WAL position |

mod deletes;
mod devices;
mod ingesters;
mod views;

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Builder, RecordBatch, StringBuilder, TimestampNanosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use kiln_storage::Engine;
use kiln_storage::catalog::CatalogState;
use kiln_storage::catalog::alerts::{AlertRuleKind, series_key};

use crate::Visible;
use crate::alerts::scheduler::RuleStatuses;

pub use kiln_storage::catalog::SYSTEM_SCHEMA;

const TABLES: &[&str] = &[
    "alert_events",
    "alert_rules",
    "alerts",
    "data_quality",
    "deletes",
    "devices",
    "ingesters",
    "series",
    "views",
];

/// The `system` schema.
#[derive(Debug)]
pub struct SystemSchema {
    engine: Arc<Engine>,
    visible: Visible,
    statuses: Arc<RuleStatuses>,
}

impl SystemSchema {
    pub fn new(engine: Arc<Engine>, visible: Visible, statuses: Arc<RuleStatuses>) -> Self {
        Self {
            engine,
            visible,
            statuses,
        }
    }
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        TABLES.iter().map(|t| (*t).to_owned()).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if !TABLES.contains(&name) {
            return Ok(None);
        }
        Ok(Some(Arc::new(SystemTable {
            name: name.to_owned(),
            schema: schema_of(name, &self.engine.catalog_state(), &self.visible),
            engine: Arc::clone(&self.engine),
            visible: self.visible.clone(),
            statuses: Arc::clone(&self.statuses),
        })))
    }

    fn table_exist(&self, name: &str) -> bool {
        TABLES.contains(&name)
    }
}

fn ts(name: &str) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
        true,
    )
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn schema_of(name: &str, state: &CatalogState, visible: &Visible) -> SchemaRef {
    let fields = match name {
        "series" | "devices" | "data_quality" => return devices::schema(name, state, visible),
        "deletes" => deletes::schema(),
        "views" => views::schema(),
        "ingesters" => ingesters::schema(),
        "alert_rules" => vec![
            text("rule", false),
            text("database", false),
            text("kind", false),
            text("query", true),
            text("condition", true),
            text("recovery", true),
            text("table_name", true),
            Field::new("no_data_after_s", DataType::Float64, true),
            Field::new("every_s", DataType::Float64, false),
            Field::new("for_s", DataType::Float64, false),
            text("severity", false),
            text("receiver", true),
            ts("last_evaluated_at"),
            Field::new("last_duration_ms", DataType::Float64, true),
            text("last_error", true),
            Field::new("evaluations", DataType::UInt64, false),
            Field::new("failures", DataType::UInt64, false),
            Field::new("pending", DataType::UInt64, false),
            Field::new("firing", DataType::UInt64, false),
        ],
        "alerts" => vec![
            text("rule", false),
            text("database", false),
            text("labels", false),
            text("state", false),
            text("severity", false),
            Field::new("value", DataType::Float64, true),
            ts("active_at"),
            ts("fired_at"),
            text("summary", false),
            text("description", false),
            text("error", true),
        ],
        _ => vec![
            Field::new("id", DataType::UInt64, false),
            text("rule", false),
            text("database", true),
            text("labels", false),
            text("from_state", false),
            text("to_state", false),
            Field::new("value", DataType::Float64, true),
            ts("time"),
            ts("active_at"),
            text("summary", false),
            text("key", false),
        ],
    };
    Arc::new(Schema::new(fields))
}

#[derive(Debug)]
struct SystemTable {
    name: String,
    schema: SchemaRef,
    engine: Arc<Engine>,
    visible: Visible,
    statuses: Arc<RuleStatuses>,
}

fn secs(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

impl SystemTable {
    fn batch(&self) -> Result<RecordBatch, arrow::error::ArrowError> {
        let state = self.engine.catalog_state();
        let columns = match self.name.as_str() {
            "series" => devices::series(&self.engine, &state, &self.visible),
            "devices" => devices::devices(&state, &self.visible, &self.schema),
            "data_quality" => devices::quality(&self.engine, &state, &self.visible),
            "alert_rules" => self.rules(&state),
            "alerts" => self.alerts(&state),
            "deletes" => deletes::rows(&state, &self.visible),
            "views" => views::rows(&state, &self.visible),
            "ingesters" => ingesters::rows(&state, &self.visible),
            _ => self.events(&state),
        };
        RecordBatch::try_new(Arc::clone(&self.schema), columns)
    }

    fn rules(&self, state: &CatalogState) -> Vec<ArrayRef> {
        let mut c: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
        let (mut after, mut every, mut for_) = (
            Float64Builder::new(),
            Float64Builder::new(),
            Float64Builder::new(),
        );
        let (mut severity, mut receiver) = (StringBuilder::new(), StringBuilder::new());
        let mut last_at = TimestampNanosecondBuilder::new().with_timezone("UTC");
        let (mut duration, mut error) = (Float64Builder::new(), StringBuilder::new());
        let mut counts: Vec<UInt64Builder> = (0..4).map(|_| UInt64Builder::new()).collect();
        for rule in state.alerts.rules.values() {
            if !self.visible.allows(&rule.database) {
                continue;
            }
            c[0].append_value(&rule.name);
            c[1].append_value(&rule.database);
            match &rule.kind {
                AlertRuleKind::Threshold {
                    sql,
                    condition,
                    recovery,
                    ..
                } => {
                    c[2].append_value("threshold");
                    c[3].append_value(sql);
                    c[4].append_value(condition);
                    c[5].append_option(recovery.as_deref());
                    c[6].append_null();
                    after.append_null();
                }
                AlertRuleKind::NoData {
                    table, after_nanos, ..
                } => {
                    c[2].append_value("no_data");
                    c[3].append_null();
                    c[4].append_null();
                    c[5].append_null();
                    c[6].append_value(table);
                    after.append_value(secs(*after_nanos));
                }
            }
            every.append_value(secs(rule.every_nanos));
            for_.append_value(secs(rule.for_nanos));
            severity.append_value(&rule.severity);
            receiver.append_option(rule.receiver.as_deref());
            let status = self.statuses.get(rule.id).unwrap_or_default();
            last_at.append_option(status.last_evaluated_at);
            duration.append_option(
                status
                    .last_evaluated_at
                    .map(|_| status.last_duration.as_secs_f64() * 1e3),
            );
            error.append_option(status.last_error.as_deref());
            let count = |s| state.alerts.count(rule.id, s) as u64;
            counts[0].append_value(status.evaluations);
            counts[1].append_value(status.failures);
            counts[2].append_value(count(kiln_storage::catalog::alerts::AlertState::Pending));
            counts[3].append_value(count(kiln_storage::catalog::alerts::AlertState::Firing));
        }
        let mut out: Vec<ArrayRef> = c.iter_mut().map(|b| Arc::new(b.finish()) as _).collect();
        out.push(Arc::new(after.finish()));
        out.push(Arc::new(every.finish()));
        out.push(Arc::new(for_.finish()));
        out.push(Arc::new(severity.finish()));
        out.push(Arc::new(receiver.finish()));
        out.push(Arc::new(last_at.finish()));
        out.push(Arc::new(duration.finish()));
        out.push(Arc::new(error.finish()));
        out.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        out
    }

    fn alerts(&self, state: &CatalogState) -> Vec<ArrayRef> {
        let mut s: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut value = Float64Builder::new();
        let mut active = TimestampNanosecondBuilder::new().with_timezone("UTC");
        let mut fired = TimestampNanosecondBuilder::new().with_timezone("UTC");
        let (mut summary, mut description, mut error) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let statuses = self.statuses.all();
        for rule in state.alerts.rules.values() {
            if !self.visible.allows(&rule.database) {
                continue;
            }
            let rule_error = statuses.get(&rule.id).and_then(|s| s.last_error.clone());
            let mut row = |labels: &str, st: &str| {
                s[0].append_value(&rule.name);
                s[1].append_value(&rule.database);
                s[2].append_value(labels);
                s[3].append_value(st);
                s[4].append_value(&rule.severity);
                error.append_option(rule_error.as_deref());
            };
            if rule_error.is_some() {
                row("", "error");
                value.append_null();
                active.append_null();
                fired.append_null();
                summary.append_value("");
                description.append_value("");
            }
            for i in state
                .alerts
                .instances
                .get(&rule.id)
                .into_iter()
                .flat_map(|m| m.values())
            {
                row(&series_key(&i.series), i.state.as_str());
                value.append_option(i.value);
                active.append_value(i.active_at);
                fired.append_option(i.fired_at);
                summary.append_value(&i.summary);
                description.append_value(&i.description);
            }
        }
        let mut out: Vec<ArrayRef> = s.iter_mut().map(|b| Arc::new(b.finish()) as _).collect();
        out.push(Arc::new(value.finish()));
        out.push(Arc::new(active.finish()));
        out.push(Arc::new(fired.finish()));
        out.push(Arc::new(summary.finish()));
        out.push(Arc::new(description.finish()));
        out.push(Arc::new(error.finish()));
        out
    }

    fn events(&self, state: &CatalogState) -> Vec<ArrayRef> {
        let mut id = UInt64Builder::new();
        let mut s: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut value = Float64Builder::new();
        let mut at = TimestampNanosecondBuilder::new().with_timezone("UTC");
        let mut active = TimestampNanosecondBuilder::new().with_timezone("UTC");
        let (mut summary, mut key) = (StringBuilder::new(), StringBuilder::new());
        for t in &state.alerts.history {
            let rule = state.alerts.rules.get(&t.rule);
            // A deleted rule's events stay, under its id; they show only to those who
            // see every database.
            match rule {
                Some(r) if !self.visible.allows(&r.database) => continue,
                None if self.visible.0.is_some() => continue,
                _ => {}
            }
            id.append_value(t.id.get());
            match rule {
                Some(r) => {
                    s[0].append_value(&r.name);
                    s[1].append_value(&r.database);
                }
                None => {
                    s[0].append_value(&t.rule_name);
                    s[1].append_null();
                }
            }
            s[2].append_value(series_key(&t.series));
            s[3].append_value(t.from.as_str());
            s[4].append_value(t.to.as_str());
            value.append_option(t.value);
            at.append_value(t.at);
            active.append_value(t.active_at);
            summary.append_value(&t.summary);
            key.append_value(t.key());
        }
        let mut out: Vec<ArrayRef> = vec![Arc::new(id.finish())];
        out.extend(s.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        out.push(Arc::new(value.finish()));
        out.push(Arc::new(at.finish()));
        out.push(Arc::new(active.finish()));
        out.push(Arc::new(summary.finish()));
        out.push(Arc::new(key.finish()));
        out
    }
}

#[async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = self
            .batch()
            .map_err(|e| DataFusionError::Internal(format!("system.{}: {e}", self.name)))?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            Arc::clone(&self.schema),
            projection.cloned(),
        )?)
    }
}

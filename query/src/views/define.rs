//! Reading a view's defining `SELECT`: what it aggregates, its buckets, its columns; and
//! its options.

use arrow::datatypes::{DataType, IntervalUnit, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::sqlparser::ast::{CreateTableOptions, SqlOption};
use kiln_storage::catalog::views::{NewView, ViewDef};
use kiln_storage::catalog::{ColumnType, TIME_COLUMN, TableDef};

use crate::time_bucket::TIMESCALE_ORIGIN_NANOS;
use crate::{Error, QueryEngine};

/// What a defining `SELECT` computes.
#[derive(Debug, Clone)]
pub struct Definition {
    pub source: TableDef,
    pub bucket_nanos: i64,
    pub origin_nanos: i64,
    /// The view's columns in the order the `SELECT` gives them (`time` among them).
    pub columns: Vec<(String, ColumnType)>,
}

/// `WITH (lag = '…', realtime = …, retention = '…')`.
#[derive(Debug, Clone, Default)]
pub(super) struct Options {
    lag_nanos: Option<i64>,
    realtime: bool,
    retention_nanos: Option<i64>,
}

impl Options {
    pub(super) fn parse(options: &CreateTableOptions) -> Result<Self, Error> {
        let list: &[SqlOption] = match options {
            CreateTableOptions::None => &[],
            CreateTableOptions::With(list) => list,
            other => {
                return Err(Error::Invalid(format!(
                    "a view's options are given as WITH (lag = '1 minute', realtime = true, \
                     retention = '365d'), not {other}"
                )));
            }
        };
        let mut parsed = Self::default();
        for option in list {
            let SqlOption::KeyValue { key, value } = option else {
                return Err(Error::Invalid(format!("unsupported view option {option}")));
            };
            let text = value.to_string();
            let text = text.trim_matches('\'');
            match key.value.to_ascii_lowercase().as_str() {
                "lag" => {
                    let lag = humantime::parse_duration(text)
                        .ok()
                        .and_then(|d| i64::try_from(d.as_nanos()).ok())
                        .or((text == "0").then_some(0))
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "option lag: a duration such as '1 minute', not {text:?}"
                            ))
                        })?;
                    parsed.lag_nanos = Some(lag);
                }
                "realtime" | "timescaledb.materialized_only" => {
                    let on = match text.to_ascii_lowercase().as_str() {
                        "true" | "on" => true,
                        "false" | "off" => false,
                        _ => {
                            return Err(Error::Invalid(format!(
                                "option {}: true or false, not {text}",
                                key.value
                            )));
                        }
                    };
                    // TimescaleDB's option says the opposite.
                    parsed.realtime = if key.value.eq_ignore_ascii_case("realtime") {
                        on
                    } else {
                        !on
                    };
                }
                "retention" => {
                    parsed.retention_nanos =
                        kiln_storage::catalog::lifecycle::parse_retention(text)
                            .map_err(|e| Error::Invalid(format!("option retention: {e}")))?;
                }
                other => {
                    return Err(Error::Invalid(format!(
                        "unknown view option {other:?} (lag, realtime, retention)"
                    )));
                }
            }
        }
        Ok(parsed)
    }
}

impl QueryEngine {
    /// Reads the defining `query` of a view of `database`, refusing what a refresh cannot
    /// recompute bucket by bucket.
    pub async fn define(&self, database: &str, query: &str) -> Result<Definition, Error> {
        let session = self.session(database);
        let plan = session.state().create_logical_plan(query).await?;
        let state = self.engine.catalog_state();
        shape(&plan, database, |name| state.table(database, name).cloned())
    }

    pub(super) async fn create_defined_view(
        &self,
        database: &str,
        name: &str,
        query: &str,
        definition: Definition,
        options: Options,
    ) -> Result<(), Error> {
        // The source's rows span these times now: the view starts with them invalid.
        let initial = self.engine.time_range(definition.source.id);
        let new = NewView {
            database: database.to_owned(),
            name: name.to_owned(),
            columns: definition
                .columns
                .iter()
                .filter(|(_, ty)| *ty != ColumnType::Time)
                .cloned()
                .collect(),
            def: ViewDef {
                table: definition.source.id,
                source: definition.source.id,
                query: query.to_owned(),
                bucket_nanos: definition.bucket_nanos,
                origin_nanos: definition.origin_nanos,
                lag_nanos: options.lag_nanos.unwrap_or(0),
                realtime: options.realtime,
                created_at: kiln_storage::now_nanos(),
            },
            initial,
            retention_nanos: options.retention_nanos,
        };
        self.engine
            .catalog()
            .create_view(new)
            .await
            .map_err(|e| match e {
                e @ (kiln_storage::catalog::Error::InvalidView(_)
                | kiln_storage::catalog::Error::InvalidName { .. }
                | kiln_storage::catalog::Error::LimitExceeded(_)) => Error::Invalid(e.to_string()),
                e => Error::Internal(Box::new(e)),
            })?;
        Ok(())
    }
}

fn refuse<T>(what: impl std::fmt::Display) -> Result<T, Error> {
    Err(Error::Invalid(format!(
        "a materialized view is SELECT time_bucket(<width>, time) AS time, <tags>, \
         <aggregates> FROM <table> [WHERE …] GROUP BY <bucket>, <tags>: {what}"
    )))
}

/// Reads the plan of a defining query; `table` resolves a table of its database.
fn shape(
    plan: &LogicalPlan,
    database: &str,
    table: impl Fn(&str) -> Option<TableDef>,
) -> Result<Definition, Error> {
    let mut volatile = None;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            if e.is_volatile() {
                volatile = Some(e.to_string());
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })
    })?;
    if let Some(e) = volatile {
        return refuse(format!(
            "{e} is volatile (it may give another answer when a bucket is recomputed)"
        ));
    }
    let LogicalPlan::Projection(projection) = plan else {
        return refuse(format!("{} is not allowed here", plan.display()));
    };
    let LogicalPlan::Aggregate(aggregate) = projection.input.as_ref() else {
        return match projection.input.as_ref() {
            LogicalPlan::Filter(_) => {
                refuse("HAVING is not allowed (filter when querying the view)")
            }
            other => refuse(format!(
                "{} is not allowed; the query must aggregate with GROUP BY",
                other.display()
            )),
        };
    };
    let source = source_of(&aggregate.input, database, &table)?;
    let n_groups = aggregate.group_expr.len();
    let mut bucket: Option<(usize, i64, i64)> = None;
    let mut tag_groups = Vec::new();
    for (i, group) in aggregate.group_expr.iter().enumerate() {
        match group.clone().unalias() {
            Expr::Column(c)
                if source
                    .column(&c.name)
                    .is_some_and(|d| d.ty == ColumnType::Tag) =>
            {
                tag_groups.push(i);
            }
            Expr::ScalarFunction(f) if matches!(f.name(), "time_bucket" | "date_bin") => {
                if bucket.is_some() {
                    return refuse("it groups by more than one time bucket");
                }
                let (width, origin) = bucket_of(f.name(), &f.args)?;
                bucket = Some((i, width, origin));
            }
            other => {
                return refuse(format!(
                    "GROUP BY {other}: a view groups by one time bucket and tags of {:?}",
                    source.name
                ));
            }
        }
    }
    let Some((bucket_group, bucket_nanos, origin_nanos)) = bucket else {
        return refuse("it does not group by time_bucket(<width>, time)");
    };

    let mut columns = Vec::new();
    let mut selected_groups = Vec::new();
    for (expr, field) in projection.expr.iter().zip(projection.schema.fields()) {
        let group = match expr.clone().unalias() {
            Expr::Column(c) => aggregate
                .schema
                .index_of_column(&c)
                .ok()
                .filter(|&i| i < n_groups),
            _ => None,
        };
        let name = column_name(field.name());
        let ty = match group {
            Some(i) if i == bucket_group => {
                if name != TIME_COLUMN {
                    return refuse(format!(
                        "select the time bucket AS time (it is named {:?})",
                        field.name()
                    ));
                }
                ColumnType::Time
            }
            Some(_) => ColumnType::Tag,
            None => field_type(field.data_type()).ok_or_else(|| {
                Error::Invalid(format!(
                    "column {:?} of a view is {}: a view's aggregates must be numbers, \
                     booleans or strings",
                    field.name(),
                    field.data_type()
                ))
            })?,
        };
        if let Some(i) = group {
            selected_groups.push(i);
        }
        if ty != ColumnType::Time && name == TIME_COLUMN {
            return refuse("only the time bucket may be named time");
        }
        if columns.iter().any(|(n, _)| *n == name) {
            return refuse(format!(
                "two columns are named {name:?}: name them apart with AS"
            ));
        }
        columns.push((name, ty));
    }
    for i in std::iter::once(bucket_group).chain(tag_groups) {
        if !selected_groups.contains(&i) {
            return refuse(format!(
                "select every GROUP BY key ({} is not selected)",
                aggregate.schema.field(i).name()
            ));
        }
    }
    Ok(Definition {
        source,
        bucket_nanos,
        origin_nanos,
        columns,
    })
}

/// The one table the aggregate reads, through filters and projections only.
fn source_of(
    plan: &LogicalPlan,
    database: &str,
    table: &impl Fn(&str) -> Option<TableDef>,
) -> Result<TableDef, Error> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let name = scan.table_name.table();
            let here = scan.table_name.schema().is_none_or(|s| s == database)
                && scan
                    .table_name
                    .catalog()
                    .is_none_or(|c| c == crate::CATALOG_NAME);
            here.then(|| table(name)).flatten().ok_or_else(|| {
                Error::Invalid(format!(
                    "a view aggregates a table of its own database; {} is not one",
                    scan.table_name
                ))
            })
        }
        LogicalPlan::Filter(f) => {
            // A subquery's answer may change while the table's rows do not.
            if f.predicate.exists(|e| {
                Ok(matches!(
                    e,
                    Expr::ScalarSubquery(_)
                        | Expr::InSubquery(_)
                        | Expr::Exists(_)
                        | Expr::SetComparison(_)
                ))
            })? {
                return refuse(format!("WHERE {}: subqueries are not allowed", f.predicate));
            }
            source_of(&f.input, database, table)
        }
        // Columns passed through as they are: a computed `time` or tag would not be the
        // table's (invalidations and refreshes bound the table's own `time`).
        LogicalPlan::Projection(p) => {
            for e in &p.expr {
                let plain = match e {
                    Expr::Column(_) => true,
                    Expr::Alias(a) => {
                        matches!(a.expr.as_ref(), Expr::Column(c) if c.name == a.name)
                    }
                    _ => false,
                };
                if !plain {
                    return refuse(format!(
                        "{e} in a subquery: the table's columns may only be passed through"
                    ));
                }
            }
            source_of(&p.input, database, table)
        }
        LogicalPlan::SubqueryAlias(a) => source_of(&a.input, database, table),
        other => refuse(format!("{} is not allowed", other.display())),
    }
}

/// Width and origin (nanoseconds) of `time_bucket(width, time)` or `date_bin(width, time
/// [, origin])`.
fn bucket_of(function: &str, args: &[Expr]) -> Result<(i64, i64), Error> {
    let time_arg =
        |e: &Expr| matches!(e.clone().unalias(), Expr::Column(c) if c.name == TIME_COLUMN);
    let (width, origin) = match (function, args) {
        ("time_bucket", [width, time]) if time_arg(time) => (width, TIMESCALE_ORIGIN_NANOS),
        ("time_bucket", [_, _, _]) => {
            return refuse(
                "time_bucket with a time zone has buckets of varying width; bucket in UTC",
            );
        }
        ("date_bin", [width, time]) if time_arg(time) => (width, 0),
        ("date_bin", [width, time, origin]) if time_arg(time) => {
            let origin = literal(origin)
                .and_then(|v| {
                    v.cast_to(&DataType::Timestamp(TimeUnit::Nanosecond, None))
                        .ok()
                })
                .and_then(|v| match v {
                    ScalarValue::TimestampNanosecond(Some(n), _) => Some(n),
                    _ => None,
                });
            let Some(origin) = origin else {
                return refuse("date_bin's origin must be a timestamp literal");
            };
            (width, origin)
        }
        _ => return refuse(format!("{function} must bucket the column time")),
    };
    let width = literal(width).and_then(|v| {
        v.cast_to(&DataType::Interval(IntervalUnit::MonthDayNano))
            .ok()
    });
    let nanos = match width {
        Some(ScalarValue::IntervalMonthDayNano(Some(v))) if v.months == 0 => i64::from(v.days)
            .checked_mul(86_400_000_000_000)
            .and_then(|d| d.checked_add(v.nanoseconds)),
        Some(ScalarValue::IntervalMonthDayNano(Some(_))) => {
            return refuse("buckets of months vary in width; use days");
        }
        _ => None,
    };
    match nanos {
        Some(n) if n > 0 => Ok((n, origin)),
        _ => refuse(format!(
            "{function}'s width must be a positive interval literal"
        )),
    }
}

fn literal(e: &Expr) -> Option<ScalarValue> {
    match e.clone().unalias() {
        Expr::Literal(v, _) => Some(v),
        Expr::Cast(c) => literal(&c.expr).and_then(|v| v.cast_to(c.field.data_type()).ok()),
        _ => None,
    }
}

/// A column name for a result column: as it is when it is a plain name, else made of its
/// words (`avg(cpu.usage_user)` → `avg_usage_user`, `count(*)` → `count`).
pub(super) fn column_name(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        return name.to_owned();
    }
    let mut out = String::new();
    for word in name.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.')) {
        // Qualified names lose their qualifier: cpu.usage_user → usage_user.
        let word = word.rsplit('.').next().unwrap_or(word);
        if word.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('_');
        }
        out.push_str(word);
    }
    if out.is_empty() { name.to_owned() } else { out }
}

fn field_type(ty: &DataType) -> Option<ColumnType> {
    Some(match ty {
        DataType::Float16 | DataType::Float32 | DataType::Float64 => ColumnType::Float,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => ColumnType::Integer,
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
            ColumnType::UInteger
        }
        DataType::Boolean => ColumnType::Boolean,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnType::String,
        DataType::Dictionary(_, v) if field_type(v) == Some(ColumnType::String) => {
            ColumnType::String
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::column_name;

    #[test]
    fn result_columns_get_plain_names() {
        assert_eq!(column_name("host"), "host");
        assert_eq!(column_name("avg(cpu.usage_user)"), "avg_usage_user");
        assert_eq!(column_name("count(*)"), "count");
        assert_eq!(
            column_name("max(cpu.usage_user) - min(cpu.usage_user)"),
            "max_usage_user_min_usage_user"
        );
    }
}

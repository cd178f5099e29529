//! The [`GapFill`] logical node and the [`HandleGapFill`] rule that puts it in plans.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::Field;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{
    Column, DFSchema, DFSchemaRef, ScalarValue, plan_datafusion_err, plan_err,
};
use datafusion::error::Result;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, Extension, LogicalPlan, Operator, Projection,
    UserDefinedLogicalNodeCore, lit,
};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

use super::{Kind, kind_of};
use crate::time_bucket::{TIMESCALE_ORIGIN_NANOS, time_bucket};

/// How a filled column gets values for the buckets that had no rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
pub enum Fill {
    /// `locf(x)`: the series' previous bucket; with `skip_nulls`, its previous non-NULL one.
    Locf { skip_nulls: bool },
    /// `interpolate(x)`: linear between the series' neighbouring buckets with a value.
    Interpolate,
}

/// An extra output column of [`GapFill`]: `source` (an input column) filled by `fill`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct FillColumn {
    pub source: Column,
    pub fill: Fill,
    /// The output column's name: the `locf(…)` / `interpolate(…)` call it stands for.
    pub name: String,
}

/// One end of the time range to fill: a constant expression and whether it is included.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct Bound {
    pub expr: Expr,
    pub inclusive: bool,
}

/// Which buckets to fill: the columns they are in and the range they cover.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct BucketSpec {
    /// The input columns that identify a series.
    pub series: Vec<Column>,
    /// The input column holding the bucket (its start time).
    pub time: Column,
    /// The bucket width, an interval.
    pub stride: Expr,
    /// A bucket start: buckets are `origin + k * stride`.
    pub origin: Expr,
    pub start: Bound,
    pub end: Bound,
    /// Whether buckets follow local time (`time_bucket_gapfill`, see [`crate::zone`]) or
    /// UTC (`date_bin_gapfill`).
    pub local: bool,
}

/// Fills the gaps in the output of an aggregate grouped by a time bucket.
///
/// Its output is its input's columns, the bucket column filled in for every bucket of the
/// range in each series (other input columns NULL in new rows), followed by one column per
/// [`FillColumn`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GapFill {
    pub input: Arc<LogicalPlan>,
    pub buckets: BucketSpec,
    pub fills: Vec<FillColumn>,
    schema: DFSchemaRef,
}

impl PartialOrd for GapFill {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        (&self.input, &self.buckets, &self.fills).partial_cmp(&(
            &other.input,
            &other.buckets,
            &other.fills,
        ))
    }
}

impl GapFill {
    pub fn try_new(
        input: Arc<LogicalPlan>,
        buckets: BucketSpec,
        fills: Vec<FillColumn>,
    ) -> Result<Self> {
        let in_schema = input.schema();
        // New rows have NULL where the input had a value: those columns become nullable.
        let mut keep = vec![in_schema.index_of_column(&buckets.time)?];
        for c in &buckets.series {
            keep.push(in_schema.index_of_column(c)?);
        }
        let mut fields: Vec<_> = in_schema
            .iter()
            .enumerate()
            .map(|(i, (q, f))| {
                let f = if keep.contains(&i) || f.is_nullable() {
                    Arc::clone(f)
                } else {
                    Arc::new(f.as_ref().clone().with_nullable(true))
                };
                (q.cloned(), f)
            })
            .collect();
        for fill in &fills {
            let (_, source) = in_schema.qualified_field_from_column(&fill.source)?;
            fields.push((
                None,
                Arc::new(Field::new(&fill.name, source.data_type().clone(), true)),
            ));
        }
        let schema = DFSchema::new_with_metadata(fields, in_schema.metadata().clone())?;
        Ok(Self {
            input,
            buckets,
            fills,
            schema: Arc::new(schema),
        })
    }

    /// This node with `fill` of `source` as an extra column named `name` (once).
    fn with_fill(&self, source: Column, fill: Fill, name: String) -> Result<Self> {
        let mut fills = self.fills.clone();
        if !fills.iter().any(|f| f.name == name) {
            fills.push(FillColumn { source, fill, name });
        }
        Self::try_new(Arc::clone(&self.input), self.buckets.clone(), fills)
    }
}

impl UserDefinedLogicalNodeCore for GapFill {
    fn name(&self) -> &str {
        "GapFill"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    /// The constants (stride, origin, range), so that the optimizer folds them; columns
    /// are not expressions here.
    fn expressions(&self) -> Vec<Expr> {
        let b = &self.buckets;
        vec![
            b.stride.clone(),
            b.origin.clone(),
            b.start.expr.clone(),
            b.end.expr.clone(),
        ]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let b = &self.buckets;
        let series: Vec<String> = b.series.iter().map(|c| c.flat_name()).collect();
        write!(
            f,
            "GapFill: series=[{}], time={}, stride={}, origin={}{}, range={}{}, {}{}",
            series.join(", "),
            b.time.flat_name(),
            b.stride,
            b.origin,
            if b.local { " (local time)" } else { "" },
            if b.start.inclusive { "[" } else { "(" },
            b.start.expr,
            b.end.expr,
            if b.end.inclusive { "]" } else { ")" },
        )?;
        for fill in &self.fills {
            write!(f, ", {}", fill.name)?;
        }
        Ok(())
    }

    fn with_exprs_and_inputs(&self, exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> Result<Self> {
        let ([stride, origin, start, end], [input]) = (
            <[Expr; 4]>::try_from(exprs)
                .map_err(|_| plan_datafusion_err!("GapFill: 4 expressions"))?,
            <[LogicalPlan; 1]>::try_from(inputs)
                .map_err(|_| plan_datafusion_err!("GapFill: one input"))?,
        );
        let buckets = BucketSpec {
            stride,
            origin,
            start: Bound {
                expr: start,
                inclusive: self.buckets.start.inclusive,
            },
            end: Bound {
                expr: end,
                inclusive: self.buckets.end.inclusive,
            },
            ..self.buckets.clone()
        };
        Self::try_new(Arc::new(input), buckets, self.fills.clone())
    }
}

/// Plans gap filling: see the [module docs](super). Runs before DataFusion's optimizer
/// rules, so that it sees the plan as SQL built it.
#[derive(Debug, Default)]
pub struct HandleGapFill;

impl OptimizerRule for HandleGapFill {
    fn name(&self) -> &str {
        "handle_gap_fill"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        plan.transform_up_with_subqueries(|node| match node {
            LogicalPlan::Aggregate(aggregate) if aggregate.group_expr.iter().any(calls_gapfill) => {
                Ok(Transformed::yes(gap_fill_aggregate(aggregate)?))
            }
            LogicalPlan::Projection(projection) if gap_fill_input(&projection).is_some() => {
                fill_projection(projection)
            }
            other => Ok(Transformed::no(other)),
        })
    }
}

fn calls_gapfill(expr: &Expr) -> bool {
    expr.exists(|e| Ok(matches!(kind_of(e), Some(Kind::DateBin | Kind::TimeBucket))))
        .unwrap_or(false)
}

fn gap_fill_input(projection: &Projection) -> Option<&GapFill> {
    match projection.input.as_ref() {
        LogicalPlan::Extension(e) => e.node.as_any().downcast_ref::<GapFill>(),
        _ => None,
    }
}

/// `Aggregate(group by date_bin_gapfill(…), …)` → `GapFill(Aggregate(group by date_bin(…), …))`.
fn gap_fill_aggregate(aggregate: Aggregate) -> Result<LogicalPlan> {
    let mut bucket = None;
    for (i, e) in aggregate.group_expr.iter().enumerate() {
        let e = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            e => e,
        };
        match kind_of(e) {
            Some(kind @ (Kind::DateBin | Kind::TimeBucket)) if bucket.is_none() => {
                let Expr::ScalarFunction(f) = e else {
                    unreachable!("kind_of matches functions only")
                };
                bucket = Some((i, kind, f.args.clone()));
            }
            Some(Kind::DateBin | Kind::TimeBucket) => {
                return plan_err!("a query can group by one gap-filling time bucket only");
            }
            _ if calls_gapfill(e) => {
                return plan_err!(
                    "date_bin_gapfill / time_bucket_gapfill must be a GROUP BY expression of \
                     its own, not part of {e}"
                );
            }
            _ => {}
        }
    }
    let (index, kind, args) = bucket.expect("the caller saw a gap-filling call");
    let name = kind.name();
    let (stride, time_expr) = (args[0].clone(), args[1].clone());

    let (origin, binned) = match kind {
        Kind::DateBin => (
            args.get(2)
                .cloned()
                .unwrap_or_else(|| lit(ScalarValue::TimestampNanosecond(Some(0), None))),
            Expr::ScalarFunction(ScalarFunction::new_udf(
                datafusion::functions::datetime::date_bin(),
                args.clone(),
            )),
        ),
        _ => (
            lit(ScalarValue::TimestampNanosecond(
                Some(TIMESCALE_ORIGIN_NANOS),
                None,
            )),
            Expr::ScalarFunction(ScalarFunction::new_udf(
                Arc::new(time_bucket()),
                args[..2].to_vec(),
            )),
        ),
    };

    let (mut start, mut end) = range_from_where(&aggregate.input, &time_expr)?;
    if kind == Kind::TimeBucket {
        if let Some(s) = args.get(2) {
            start = Some(Bound {
                expr: s.clone(),
                inclusive: true,
            });
        }
        if let Some(e) = args.get(3) {
            end = Some(Bound {
                expr: e.clone(),
                inclusive: false,
            });
        }
    }
    let (Some(start), Some(end)) = (start, end) else {
        return plan_err!(
            "{name} needs a bounded time range: add WHERE {time_expr} >= <start> AND \
             {time_expr} < <end> (both constant)"
        );
    };

    let mut group_expr = aggregate.group_expr.clone();
    let original = group_expr[index].schema_name().to_string();
    group_expr[index] = binned.alias(original);
    let binned = Aggregate::try_new(aggregate.input, group_expr, aggregate.aggr_expr)?;

    let columns: Vec<Column> = (0..binned.group_expr.len())
        .map(|i| Column::from(binned.schema.qualified_field(i)))
        .collect();
    let time = columns[index].clone();
    let series = columns
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| (i != index).then_some(c))
        .collect();
    let buckets = BucketSpec {
        series,
        time,
        stride,
        origin,
        start,
        end,
        local: kind == Kind::TimeBucket,
    };
    let node = GapFill::try_new(
        Arc::new(LogicalPlan::Aggregate(binned)),
        buckets,
        Vec::new(),
    )?;
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    }))
}

/// The bounds `WHERE` puts on `time`: conjuncts `time >= c`, `time < c`, `time BETWEEN a
/// AND b`, … with constant `c`, in the filters right under the aggregate.
fn range_from_where(input: &LogicalPlan, time: &Expr) -> Result<(Option<Bound>, Option<Bound>)> {
    let mut lower: Option<Bound> = None;
    let mut upper: Option<Bound> = None;
    let set = |slot: &mut Option<Bound>, expr: &Expr, inclusive: bool, which: &str| {
        if slot.is_some() {
            return plan_err!(
                "gap filling needs one {which} bound on {time}, found several; keep one"
            );
        }
        *slot = Some(Bound {
            expr: expr.clone(),
            inclusive,
        });
        Ok(())
    };
    let constant = |e: &Expr| e.column_refs().is_empty();
    // A bound on `time` bounds `time AT TIME ZONE …` (a cast between zones) as well.
    let time = without_casts(time);
    let is_time = |e: &Expr| without_casts(e) == time;
    let mut node = input;
    while let LogicalPlan::Filter(filter) = node {
        for conjunct in split_conjunction(&filter.predicate) {
            match conjunct {
                Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                    let (op, bound) = if is_time(left) && constant(right) {
                        (*op, right.as_ref())
                    } else if is_time(right) && constant(left) {
                        match op.swap() {
                            Some(op) => (op, left.as_ref()),
                            None => continue,
                        }
                    } else {
                        continue;
                    };
                    match op {
                        Operator::Gt => set(&mut lower, bound, false, "lower")?,
                        Operator::GtEq => set(&mut lower, bound, true, "lower")?,
                        Operator::Lt => set(&mut upper, bound, false, "upper")?,
                        Operator::LtEq => set(&mut upper, bound, true, "upper")?,
                        Operator::Eq => {
                            set(&mut lower, bound, true, "lower")?;
                            set(&mut upper, bound, true, "upper")?;
                        }
                        _ => {}
                    }
                }
                Expr::Between(b)
                    if !b.negated && is_time(&b.expr) && constant(&b.low) && constant(&b.high) =>
                {
                    set(&mut lower, &b.low, true, "lower")?;
                    set(&mut upper, &b.high, true, "upper")?;
                }
                _ => {}
            }
        }
        node = filter.input.as_ref();
    }
    Ok((lower, upper))
}

/// `e` without the casts around it.
fn without_casts(mut e: &Expr) -> &Expr {
    while let Expr::Cast(c) = e {
        e = c.expr.as_ref();
    }
    e
}

/// Turns `locf(x)` / `interpolate(x)` in a projection over [`GapFill`] into the node's
/// filled columns.
fn fill_projection(projection: Projection) -> Result<Transformed<LogicalPlan>> {
    let mut node = gap_fill_input(&projection)
        .expect("the caller checked the input")
        .clone();
    let mut changed = false;
    let mut exprs = Vec::with_capacity(projection.expr.len());
    for expr in projection.expr {
        let rewritten = expr.transform_down(|e| {
            let fill = match kind_of(&e) {
                Some(Kind::Locf | Kind::Interpolate) => fill_of(&e)?,
                _ => return Ok(Transformed::no(e)),
            };
            let Expr::ScalarFunction(f) = &e else {
                unreachable!("kind_of matches functions only")
            };
            let Expr::Column(source) = &f.args[0] else {
                return plan_err!(
                    "{e}: the value to fill must be an aggregate of the query, such as \
                     locf(avg(value))"
                );
            };
            let name = e.schema_name().to_string();
            node = node.with_fill(source.clone(), fill, name.clone())?;
            Ok(Transformed::new(
                Expr::Column(Column::from_name(name)),
                true,
                TreeNodeRecursion::Jump,
            ))
        })?;
        changed |= rewritten.transformed;
        exprs.push(rewritten.data);
    }
    let input = Arc::new(LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    }));
    let plan = LogicalPlan::Projection(Projection::try_new(exprs, input)?);
    Ok(if changed {
        Transformed::yes(plan)
    } else {
        Transformed::no(plan)
    })
}

fn fill_of(call: &Expr) -> Result<Fill> {
    let Expr::ScalarFunction(f) = call else {
        unreachable!("called on gap-filling calls only")
    };
    Ok(match kind_of(call) {
        Some(Kind::Interpolate) => Fill::Interpolate,
        _ => match f.args.get(1) {
            None => Fill::Locf { skip_nulls: false },
            Some(Expr::Literal(ScalarValue::Boolean(Some(b)), _)) => Fill::Locf { skip_nulls: *b },
            Some(other) => {
                return plan_err!("locf: treat_null_as_missing must be true or false, not {other}");
            }
        },
    })
}

//! [`GapFillExec`]: fills the gaps of an aggregate's output, sorted by series and time.

use std::fmt;
use std::sync::Arc;

use arrow::array::timezone::Tz;
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch,
    RecordBatchOptions, UInt32Array, new_null_array,
};
use arrow::compute::SortOptions;
use arrow::compute::kernels::zip::zip;
use arrow::compute::{cast, concat_batches, partition, take};
use arrow::datatypes::{DataType, Float64Type, Int64Type, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{ScalarValue, plan_datafusion_err, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{ColumnarValue, Expr, LogicalPlan, UserDefinedLogicalNode};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{
    EquivalenceProperties, LexRequirement, OrderingRequirements, PhysicalExpr, PhysicalSortExpr,
    PhysicalSortRequirement,
};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use futures::{StreamExt, TryStreamExt};

use super::plan::{Bound, Fill, GapFill};
use crate::zone;

/// Most buckets gap filling makes per series; more means the interval is too small for
/// the range.
pub const MAX_BUCKETS: i64 = 10_000_000;

/// Plans [`GapFill`] nodes as [`GapFillExec`].
#[derive(Debug, Default)]
pub struct GapFillPlanner;

#[async_trait]
impl ExtensionPlanner for GapFillPlanner {
    async fn plan_extension(
        &self,
        planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        session: &dyn Session,
        planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<GapFill>() else {
            return Ok(None);
        };
        let (Some(logical), Some(input)) = (logical_inputs.first(), physical_inputs.first()) else {
            return plan_err!("GapFill has one input");
        };
        let in_schema = logical.schema();
        let constant = |expr: &Expr| -> Result<ScalarValue> {
            let physical = planner.create_physical_expr(expr, in_schema, session, planning_ctx)?;
            evaluate_constant(&physical)
        };
        let time = in_schema.index_of_column(&node.buckets.time)?;
        let series = node
            .buckets
            .series
            .iter()
            .map(|c| in_schema.index_of_column(c))
            .collect::<Result<Vec<_>>>()?;
        let fills = node
            .fills
            .iter()
            .map(|f| Ok((in_schema.index_of_column(&f.source)?, f.fill)))
            .collect::<Result<Vec<_>>>()?;

        let DataType::Timestamp(unit, time_zone) = in_schema.field(time).data_type() else {
            return plan_err!("gap filling needs a timestamp bucket column");
        };
        // time_bucket_gapfill's buckets follow local time as time_bucket's do.
        let zone = if node.buckets.local {
            let session = &session.config_options().execution.time_zone;
            zone::resolve(None, time_zone.as_deref(), session.as_deref())?
        } else {
            None
        };
        let per_unit = zone::nanos_per(*unit);
        let stride = match constant(&node.buckets.stride)? {
            ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
                zone::fixed_interval_nanos(v).ok_or_else(|| {
                    plan_datafusion_err!("gap filling: the interval {v:?} is too long")
                })?
            }
            ScalarValue::IntervalMonthDayNano(Some(_)) => {
                return plan_err!(
                    "gap filling needs an interval of fixed length; months and years vary"
                );
            }
            other => return plan_err!("gap filling: {other} is not an interval"),
        };
        if stride <= 0 || stride % per_unit != 0 {
            return plan_err!("gap filling: the interval must be positive and whole {unit:?}s");
        }
        let origin = timestamp_nanos(&constant(&node.buckets.origin)?, "origin")?;
        let start = bound_nanos(&node.buckets.start, true, &constant)?;
        let end = bound_nanos(&node.buckets.end, false, &constant)?;
        let buckets = Buckets::new(origin, stride, start, end, per_unit, zone)?;

        let schema = Arc::new(node.schema().as_arrow().clone());
        Ok(Some(Arc::new(GapFillExec::new(
            Arc::clone(input),
            schema,
            series,
            time,
            fills,
            buckets,
        ))))
    }
}

/// The value of an expression that reads no column.
fn evaluate_constant(expr: &Arc<dyn PhysicalExpr>) -> Result<ScalarValue> {
    let one_row = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        vec![],
        &RecordBatchOptions::new().with_row_count(Some(1)),
    )?;
    match expr.evaluate(&one_row)? {
        ColumnarValue::Scalar(v) => Ok(v),
        ColumnarValue::Array(a) => ScalarValue::try_from_array(&a, 0),
    }
}

fn timestamp_nanos(value: &ScalarValue, what: &str) -> Result<i64> {
    crate::provider::scalar_nanos(value)
        .ok_or_else(|| plan_datafusion_err!("gap filling: the {what} {value} is not a timestamp"))
}

/// The first (`lower`) or last instant a bound lets in, in nanoseconds.
fn bound_nanos(
    bound: &Bound,
    lower: bool,
    constant: &dyn Fn(&Expr) -> Result<ScalarValue>,
) -> Result<i64> {
    let what = if lower { "start" } else { "end" };
    let v = timestamp_nanos(&constant(&bound.expr)?, what)?;
    Ok(match (bound.inclusive, lower) {
        (true, _) => v,
        (false, true) => v.saturating_add(1),
        (false, false) => v.saturating_sub(1),
    })
}

/// The buckets to fill: `first`, `first + stride`, … `last`, in nanoseconds of wall-clock
/// time in `zone` (of UTC without one).
#[derive(Debug, Clone)]
pub struct Buckets {
    first: i64,
    last: i64,
    stride: i64,
    zone: Option<Tz>,
    /// Nanoseconds per unit of the bucket column.
    per_unit: i64,
}

impl Buckets {
    /// The buckets holding the instants `start..=end` (nanoseconds), for buckets of
    /// `stride` nanoseconds aligned on `origin` (in `zone`'s wall-clock time if any).
    fn new(
        origin: i64,
        stride: i64,
        start: i64,
        end: i64,
        per_unit: i64,
        zone: Option<Tz>,
    ) -> Result<Self> {
        let local = |t: i64| match &zone {
            Some(z) => zone::to_local(z, t),
            None => t,
        };
        let first = zone::floor(local(start), origin, stride);
        let last = if end >= start {
            zone::floor(local(end), origin, stride)
        } else {
            // An empty range: no bucket to make.
            first.saturating_sub(1)
        };
        if (i128::from(last) - i128::from(first)) / i128::from(stride) >= i128::from(MAX_BUCKETS) {
            return plan_err!(
                "gap filling would make more than {MAX_BUCKETS} buckets per series; \
                 widen the interval or narrow the time range"
            );
        }
        Ok(Self {
            first,
            last,
            stride,
            zone,
            per_unit,
        })
    }

    /// The first bucket (wall-clock), if the range has any.
    fn start(&self) -> Option<i64> {
        (self.first <= self.last).then_some(self.first)
    }

    /// The bucket after `bucket`, if in the range.
    fn after(&self, bucket: i64) -> Option<i64> {
        bucket.checked_add(self.stride).filter(|b| *b <= self.last)
    }

    /// Where `bucket` starts, in the bucket column's unit.
    fn instant(&self, bucket: i64) -> i64 {
        let nanos = match &self.zone {
            Some(z) => zone::from_local(z, bucket),
            None => bucket,
        };
        nanos.div_euclid(self.per_unit)
    }
}

impl fmt::Display for Buckets {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}..={} step {}ns", self.first, self.last, self.stride)?;
        if let Some(z) = &self.zone {
            write!(f, " in {z:?}")?;
        }
        Ok(())
    }
}

/// Reads an aggregate's output sorted by series then bucket, and writes every bucket of
/// [`Buckets`] for each series, with the [`Fill`] columns after the input's.
#[derive(Debug)]
pub struct GapFillExec {
    input: Arc<dyn ExecutionPlan>,
    series: Vec<usize>,
    time: usize,
    fills: Vec<(usize, Fill)>,
    buckets: Buckets,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl GapFillExec {
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        schema: SchemaRef,
        series: Vec<usize>,
        time: usize,
        fills: Vec<(usize, Fill)>,
        buckets: Buckets,
    ) -> Self {
        let mut eq = EquivalenceProperties::new(Arc::clone(&schema));
        eq.add_ordering(Self::sort_exprs(&schema, &series, time));
        let properties = PlanProperties::new(
            eq,
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            input,
            series,
            time,
            fills,
            buckets,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// Series columns then the bucket, ascending: the order read and written. (Bucket
    /// columns are never NULL in practice; where one is, its row is written when met.)
    fn sort_exprs(schema: &Schema, series: &[usize], time: usize) -> Vec<PhysicalSortExpr> {
        series
            .iter()
            .chain(std::iter::once(&time))
            .map(|&i| {
                PhysicalSortExpr::new(
                    Arc::new(Column::new(schema.field(i).name(), i)),
                    // SQL's `ORDER BY series, time` (NULLS LAST), so it costs nothing.
                    SortOptions::new(false, false),
                )
            })
            .collect()
    }
}

impl DisplayAs for GapFillExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let schema = self.properties.eq_properties.schema();
        let name = |i: usize| format!("{}@{i}", schema.field(i).name());
        let series: Vec<String> = self.series.iter().map(|&i| name(i)).collect();
        write!(
            f,
            "GapFillExec: series=[{}], time={}, buckets={}",
            series.join(", "),
            name(self.time),
            self.buckets,
        )?;
        for (i, (source, fill)) in self.fills.iter().enumerate() {
            let output = schema.fields().len() - self.fills.len() + i;
            write!(f, ", {}={fill:?}({})", name(output), name(*source))?;
        }
        Ok(())
    }
}

impl ExecutionPlan for GapFillExec {
    fn name(&self) -> &str {
        "GapFillExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        let schema = self.input.schema();
        let requirement = LexRequirement::new(
            Self::sort_exprs(&schema, &self.series, self.time)
                .into_iter()
                .map(PhysicalSortRequirement::from),
        );
        vec![requirement.map(OrderingRequirements::new)]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return plan_err!("GapFillExec has one input");
        }
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            self.schema(),
            self.series.clone(),
            self.time,
            self.fills.clone(),
            self.buckets.clone(),
        )))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return plan_err!("GapFillExec has one partition, not {partition}");
        }
        let input = self.input.execute(0, Arc::clone(&context))?;
        let reservation = MemoryConsumer::new("GapFillExec").register(context.memory_pool());
        let output_rows = MetricBuilder::new(&self.metrics).output_rows(partition);
        let filler = Filler {
            schema: self.schema(),
            input_schema: self.input.schema(),
            series: self.series.clone(),
            time: self.time,
            fills: self.fills.clone(),
            buckets: self.buckets.clone(),
        };
        let batch_size = context.session_config().batch_size();
        let schema = self.schema();
        let stream = futures::stream::once(async move {
            let batches: Vec<RecordBatch> = input
                .and_then(|b| {
                    let grown = reservation.try_grow(b.get_array_memory_size()).map(|_| b);
                    futures::future::ready(grown)
                })
                .try_collect()
                .await?;
            let filled = filler.fill(&batches)?;
            reservation.try_grow(filled.get_array_memory_size())?;
            output_rows.add(filled.num_rows());
            let chunks: Vec<RecordBatch> = (0..filled.num_rows())
                .step_by(batch_size.max(1))
                .map(|at| filled.slice(at, batch_size.min(filled.num_rows() - at)))
                .collect();
            // The memory stays reserved until the last chunk is handed on.
            Ok::<_, DataFusionError>(futures::stream::iter(chunks).map(move |b| {
                let _held = &reservation;
                Ok(b)
            }))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Where an output row comes from.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// The input row, or `None` for a bucket that had none.
    existing: Option<u32>,
    /// A row of the series (the first), for the series columns of new rows.
    series_row: u32,
    /// The bucket (`None` where the input's was NULL).
    time: Option<i64>,
}

struct Filler {
    schema: SchemaRef,
    input_schema: SchemaRef,
    series: Vec<usize>,
    time: usize,
    fills: Vec<(usize, Fill)>,
    buckets: Buckets,
}

impl Filler {
    fn fill(&self, batches: &[RecordBatch]) -> Result<RecordBatch> {
        let input = concat_batches(&self.input_schema, batches)?;
        let n = input.num_rows();
        if u32::try_from(n).is_err() {
            return plan_err!("gap filling: {n} input rows are too many");
        }
        let times = cast(input.column(self.time), &DataType::Int64)?;
        let times = times.as_primitive::<Int64Type>();
        let ranges = if self.series.is_empty() {
            // One series, filled even when no row matched.
            std::iter::once(0..n).collect()
        } else {
            let columns: Vec<ArrayRef> = self
                .series
                .iter()
                .map(|&i| Arc::clone(input.column(i)))
                .collect();
            partition(&columns)?.ranges()
        };

        let mut rows = Vec::with_capacity(n);
        for range in ranges {
            self.merge_series(range, times, &mut rows);
        }

        let mut columns = Vec::with_capacity(self.schema.fields().len());
        let existing: Vec<Option<u32>> = rows.iter().map(|r| r.existing).collect();
        let series_rows: Vec<Option<u32>> = rows.iter().map(|r| Some(r.series_row)).collect();
        for (i, column) in input.columns().iter().enumerate() {
            columns.push(if i == self.time {
                let t: Int64Array = rows.iter().map(|r| r.time).collect();
                cast(&t, column.data_type())?
            } else if self.series.contains(&i) {
                take_rows(column, &series_rows)?
            } else {
                take_rows(column, &existing)?
            });
        }
        for &(source, fill) in &self.fills {
            let values = input.column(source);
            columns.push(match fill {
                Fill::Locf { skip_nulls } => take_rows(values, &locf(&rows, values, skip_nulls))?,
                Fill::Interpolate => interpolate(&rows, values, &existing)?,
            });
        }
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows.len())),
        )?)
    }

    /// The rows of one series: its input rows merged in time order with the buckets it
    /// lacks.
    fn merge_series(&self, range: std::ops::Range<usize>, times: &Int64Array, out: &mut Vec<Row>) {
        let buckets = &self.buckets;
        let series_row = range.start as u32;
        let mut next = buckets.start();
        let existing = |i: usize| Row {
            existing: Some(i as u32),
            series_row,
            time: times.is_valid(i).then(|| times.value(i)),
        };
        let mut i = range.start;
        loop {
            let input_time = (i < range.end).then(|| times.is_valid(i).then(|| times.value(i)));
            match (input_time, next) {
                (Some(None), _) => {
                    out.push(existing(i));
                    i += 1;
                }
                (Some(Some(t)), Some(b)) if t <= buckets.instant(b) => {
                    out.push(existing(i));
                    i += 1;
                    if t == buckets.instant(b) {
                        next = buckets.after(b);
                    }
                }
                (Some(Some(_)), None) => {
                    out.push(existing(i));
                    i += 1;
                }
                (_, Some(b)) => {
                    out.push(Row {
                        existing: None,
                        series_row,
                        time: Some(buckets.instant(b)),
                    });
                    next = buckets.after(b);
                }
                (None, None) => break,
            }
        }
    }
}

/// `values` at `rows`, NULL where a row is `None`.
fn take_rows(values: &ArrayRef, rows: &[Option<u32>]) -> Result<ArrayRef> {
    if values.is_empty() {
        // Only new rows, of a range with no input at all.
        return Ok(new_null_array(values.data_type(), rows.len()));
    }
    Ok(take(values, &UInt32Array::from(rows.to_vec()), None)?)
}

/// For each output row, the input row whose value `locf` gives it.
fn locf(rows: &[Row], values: &ArrayRef, skip_nulls: bool) -> Vec<Option<u32>> {
    let mut carried: Option<u32> = None;
    let mut series = None;
    rows.iter()
        .map(|r| {
            if series != Some(r.series_row) {
                series = Some(r.series_row);
                carried = None;
            }
            if let Some(i) = r.existing
                && (!skip_nulls || values.is_valid(i as usize))
            {
                carried = Some(i);
            }
            carried
        })
        .collect()
}

/// Existing rows keep their value; new rows between two rows of the series with a value
/// get the linear interpolation at their bucket.
fn interpolate(rows: &[Row], values: &ArrayRef, existing: &[Option<u32>]) -> Result<ArrayRef> {
    let as_f64 = cast(values, &DataType::Float64)?;
    let as_f64 = as_f64.as_primitive::<Float64Type>();
    // The nearest row with a value before (after) each output row, in its series.
    let known = |r: &Row| -> Option<(f64, f64)> {
        let i = r.existing? as usize;
        (as_f64.is_valid(i) && r.time.is_some())
            .then(|| (r.time.unwrap_or(0) as f64, as_f64.value(i)))
    };
    let mut before = vec![None; rows.len()];
    let mut carried = None;
    for (k, r) in rows.iter().enumerate() {
        if k > 0 && rows[k - 1].series_row != r.series_row {
            carried = None;
        }
        before[k] = carried;
        if let Some(p) = known(r) {
            carried = Some(p);
        }
    }
    let mut filled: Vec<Option<f64>> = vec![None; rows.len()];
    let mut carried = None;
    for k in (0..rows.len()).rev() {
        let r = &rows[k];
        if k + 1 < rows.len() && rows[k + 1].series_row != r.series_row {
            carried = None;
        }
        if r.existing.is_none()
            && let (Some((t0, v0)), Some((t1, v1)), Some(t)) = (before[k], carried, r.time)
        {
            filled[k] = Some(v0 + (v1 - v0) * (t as f64 - t0) / (t1 - t0));
        }
        if let Some(p) = known(r) {
            carried = Some(p);
        }
    }
    let mut filled = Float64Array::from(filled);
    if values.data_type().is_integer() {
        filled = filled.unary(f64::round);
    }
    let filled = cast(&filled, values.data_type())?;
    let kept = take_rows(values, existing)?;
    let is_kept: BooleanArray = existing.iter().map(|e| Some(e.is_some())).collect();
    Ok(zip(&is_kept, &kept, &filled)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_on_the_origin() {
        let minute = 60_000_000_000;
        // [00:00:30, 00:03:00) → 00:00, 00:01, 00:02.
        let b = Buckets::new(0, minute, 30_000_000_000, 3 * minute - 1, 1, None).unwrap();
        assert_eq!((b.first, b.last, b.stride), (0, 2 * minute, minute));
        assert_eq!(b.after(2 * minute), None);
        // Before the origin, buckets still start on it (floor, not truncation).
        let b = Buckets::new(0, minute, -1, -1, 1, None).unwrap();
        assert_eq!(b.first, -minute);
        // An empty range makes no bucket.
        let b = Buckets::new(0, minute, 10, 5, 1, None).unwrap();
        assert_eq!(b.start(), None);
        assert!(Buckets::new(0, 1, 0, MAX_BUCKETS * 10, 1, None).is_err());
        // Hours in +05:30 start at half past the UTC hour.
        let hour = 60 * minute;
        let india = zone::parse("+05:30").unwrap();
        let b = Buckets::new(0, hour, 0, 2 * hour, 1, india).unwrap();
        assert_eq!(b.instant(b.first), -hour / 2);
    }
}

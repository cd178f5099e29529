//! [`LastCacheExec`]: reads a last-value cache when run, not when planned, so a plan made
//! once can be run again and read the cache as it is then (kept alert rule plans, see
//! `crate::prepared`).

use std::fmt;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::common::plan_err;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use kiln_storage::Engine;
use kiln_storage::catalog::TIME_COLUMN;
use kiln_storage::ids::TableId;
use kiln_storage::last_cache::{KeyValues, LastCache};

/// Series picked by key columns before any row is read.
#[derive(Debug)]
pub struct Selection {
    /// The key columns `predicate` reads.
    pub shown: Vec<String>,
    /// Over [`LastCache::key_schema`] of `shown`.
    pub predicate: Arc<dyn PhysicalExpr>,
    /// Values of one key column that the predicate keeps rows only of, if it names any:
    /// only those series are looked at.
    pub among: Option<KeyValues>,
}

/// The latest row of every series of a table (those `selection` keeps), from its cache.
#[derive(Debug)]
pub struct LastCacheExec {
    table: String,
    read: Arc<Read>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

/// What the scan reads of which cache.
#[derive(Debug)]
struct Read {
    cache: Arc<LastCache>,
    /// The table's columns, which the cache's rows are aligned to.
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    selection: Option<Selection>,
    /// Columns (of `schema`) to keep only the latest row of each of their values for
    /// (`DISTINCT ON` fewer columns than the cache's key); none: every series' row.
    latest_per: Vec<usize>,
    /// The table, whose retention (as it is when the plan runs) hides expired rows.
    engine: Arc<Engine>,
    table: TableId,
}

impl LastCacheExec {
    pub fn try_new(
        engine: Arc<Engine>,
        table: (TableId, String),
        cache: Arc<LastCache>,
        schema: SchemaRef,
        projection: Option<Vec<usize>>,
        selection: Option<Selection>,
        latest_per: Vec<usize>,
    ) -> Result<Self> {
        let projected = match &projection {
            Some(columns) => Arc::new(schema.project(columns)?),
            None => Arc::clone(&schema),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(projected),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        let (id, table) = table;
        Ok(Self {
            table,
            read: Arc::new(Read {
                cache,
                schema,
                projection,
                selection,
                latest_per,
                engine,
                table: id,
            }),
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }
}

impl Read {
    /// The rows the cache holds now of the series selected, projected.
    fn rows(&self) -> Result<RecordBatch> {
        let rows = match &self.selection {
            None => self.cache.rows(&self.schema)?,
            Some(selection) => {
                let shown: Vec<&str> = selection.shown.iter().map(String::as_str).collect();
                self.cache
                    .rows_where(&self.schema, &shown, selection.among.as_ref(), |keys| {
                        let kept = selection
                            .predicate
                            .evaluate(keys)?
                            .into_array(keys.num_rows())?;
                        kept.as_boolean_opt().cloned().ok_or_else(|| {
                            DataFusionError::Internal(format!(
                                "a filter evaluated to {}",
                                kept.data_type()
                            ))
                        })
                    })?
            }
        };
        let cutoff = self
            .engine
            .catalog_state()
            .retention_cutoff(self.table, kiln_storage::now_nanos());
        let rows = match cutoff {
            Some(cutoff) => unexpired(&rows, cutoff)?,
            None => rows,
        };
        let rows = match self.latest_per.is_empty() {
            true => rows,
            false => latest_per(&rows, &self.latest_per)?,
        };
        Ok(match &self.projection {
            Some(columns) => rows.project(columns)?,
            None => rows,
        })
    }
}

/// Of the rows sharing the values of `columns`, the one with the greatest `time` (of equal
/// times, the first), in the order each value is first met.
fn latest_per(rows: &RecordBatch, columns: &[usize]) -> Result<RecordBatch> {
    use arrow::row::{RowConverter, SortField};
    let times = rows
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>())
        .ok_or_else(|| DataFusionError::Internal("cached rows without a time".into()))?;
    let keys: Vec<_> = columns
        .iter()
        .map(|&c| Arc::clone(rows.column(c)))
        .collect();
    let converter = RowConverter::new(
        keys.iter()
            .map(|k| SortField::new(k.data_type().clone()))
            .collect(),
    )?;
    let keys = converter.convert_columns(&keys)?;
    let mut latest: std::collections::HashMap<_, usize> = std::collections::HashMap::new();
    let mut order = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        match latest.entry(key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
                order.push(key);
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if times.value(i) > times.value(*o.get()) {
                    o.insert(i);
                }
            }
        }
    }
    let picked: arrow::array::UInt32Array = order.iter().map(|k| latest[k] as u32).collect();
    Ok(arrow::compute::take_record_batch(rows, &picked)?)
}

/// The rows of `rows` at or after `cutoff`: a series whose latest row has expired has
/// none left in the table either.
fn unexpired(rows: &RecordBatch, cutoff: i64) -> Result<RecordBatch> {
    let Some(times) = rows
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>())
    else {
        return Ok(rows.clone());
    };
    if times.values().iter().all(|t| *t >= cutoff) {
        return Ok(rows.clone());
    }
    let keep: arrow::array::BooleanArray = times
        .iter()
        .map(|t| Some(t.is_some_and(|t| t >= cutoff)))
        .collect();
    Ok(arrow::compute::filter_record_batch(rows, &keep)?)
}

impl DisplayAs for LastCacheExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LastCacheExec: {}, last-value cache ({} series held)",
            self.table,
            self.read.cache.len()
        )?;
        if !self.read.latest_per.is_empty() {
            let names: Vec<&str> = (self.read.latest_per.iter())
                .map(|&c| self.read.schema.field(c).name().as_str())
                .collect();
            write!(f, ", latest per {}", names.join(", "))?;
        }
        if let Some(selection) = &self.read.selection {
            write!(f, ", series where {}", selection.predicate)?;
        }
        Ok(())
    }
}

impl ExecutionPlan for LastCacheExec {
    fn name(&self) -> &str {
        "LastCacheExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        match &self.read.selection {
            Some(selection) => f(&selection.predicate),
            None => Ok(TreeNodeRecursion::Continue),
        }
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !children.is_empty() {
            return plan_err!("LastCacheExec has no inputs");
        }
        Ok(self)
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

    /// A plan run again counts its rows afresh.
    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self {
            table: self.table.clone(),
            read: Arc::clone(&self.read),
            properties: Arc::clone(&self.properties),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return plan_err!("LastCacheExec has one partition, not {partition}");
        }
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let read = Arc::clone(&self.read);
        let stream = futures::stream::once(async move {
            let timer = metrics.elapsed_compute().timer();
            let rows = read.rows();
            timer.done();
            rows.inspect(|rows| metrics.record_output(rows.num_rows()))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            stream,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

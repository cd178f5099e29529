//! [`DedupExec`]: the streaming sort-merge deduplication of one time partition whose rows
//! are in several sources (segments persisted at different times, and the buffer).
//!
//! Every source is sorted by the row identity (tags, then time) and has each identity at
//! most once: segments are written so, the buffer is merged so before it is read. The
//! sources, oldest write first, are merged into one stream in identity order; where
//! sources tie, the older comes first (a stable merge). Consecutive rows with the same
//! identity are then folded into one, each field taken from the newest version that set
//! it: the last-write-wins rule of `kiln_storage::dedup`, applied as the rows stream by,
//! in memory bounded by a batch.
//!
//! Only partitions whose sources overlap are read through it; the others stay plain,
//! parallel scans.

use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::plan_err;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{
    EquivalenceProperties, LexOrdering, LexRequirement, OrderingRequirements, PhysicalExpr,
    PhysicalSortRequirement,
};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::sorts::streaming_merge::StreamingMergeBuilder;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use futures::StreamExt;
use kiln_storage::dedup::fold_runs;

#[derive(Debug)]
pub struct DedupExec {
    /// The sources, oldest write first, each sorted by `ordering`.
    inputs: Vec<Arc<dyn ExecutionPlan>>,
    /// The row identity, ascending: tags, then time.
    ordering: LexOrdering,
    /// The identity's columns.
    key: Vec<usize>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl DedupExec {
    pub fn try_new(
        inputs: Vec<Arc<dyn ExecutionPlan>>,
        ordering: LexOrdering,
        key: Vec<usize>,
    ) -> Result<Self> {
        let Some(first) = inputs.first() else {
            return plan_err!("DedupExec needs at least one input");
        };
        let schema = first.schema();
        if inputs
            .iter()
            .any(|i| i.schema().fields() != schema.fields())
        {
            return plan_err!("DedupExec inputs must share one schema");
        }
        let eq = EquivalenceProperties::new_with_orderings(
            Arc::clone(&schema),
            [ordering.iter().cloned().collect::<Vec<_>>()],
        );
        let properties = PlanProperties::new(
            eq,
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Self {
            inputs,
            ordering,
            key,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }
}

impl DisplayAs for DedupExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "DedupExec: {} sources merged on [{}], last write wins",
            self.inputs.len(),
            self.ordering
        )
    }
}

impl ExecutionPlan for DedupExec {
    fn name(&self) -> &str {
        "DedupExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.inputs.iter().collect()
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition; self.inputs.len()]
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        let requirement = LexRequirement::new(
            self.ordering
                .iter()
                .cloned()
                .map(PhysicalSortRequirement::from),
        )
        .map(OrderingRequirements::new);
        vec![requirement; self.inputs.len()]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true; self.inputs.len()]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false; self.inputs.len()]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::try_new(
            children,
            self.ordering.clone(),
            self.key.clone(),
        )?))
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
            return plan_err!("DedupExec has one partition, not {partition}");
        }
        let schema = self.schema();
        let streams = self
            .inputs
            .iter()
            .map(|i| i.execute(0, Arc::clone(&context)))
            .collect::<Result<Vec<_>>>()?;
        let reservation = MemoryConsumer::new("DedupExec").register(context.memory_pool());
        // Ties go to the older source first: the merge must be stable for last write wins.
        let merged = StreamingMergeBuilder::new()
            .with_streams(streams)
            .with_schema(Arc::clone(&schema))
            .with_expressions(&self.ordering)
            .with_metrics(BaselineMetrics::new(&self.metrics, partition))
            .with_batch_size(context.session_config().batch_size())
            .with_reservation(reservation)
            .with_round_robin_tie_breaker(false)
            .build()?;
        let folder = Folder::new(&schema, &self.key)?;
        let state = (merged, folder, false);
        let stream = futures::stream::unfold(state, |(mut input, mut folder, done)| async move {
            if done {
                return None;
            }
            loop {
                match input.next().await {
                    Some(Ok(batch)) => match folder.push(batch) {
                        Ok(Some(out)) => return Some((Ok(out), (input, folder, false))),
                        Ok(None) => continue,
                        Err(e) => return Some((Err(e), (input, folder, true))),
                    },
                    Some(Err(e)) => return Some((Err(e), (input, folder, true))),
                    None => {
                        return match folder.finish() {
                            Ok(Some(out)) => Some((Ok(out), (input, folder, true))),
                            Ok(None) => None,
                            Err(e) => Some((Err(e), (input, folder, true))),
                        };
                    }
                }
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Folds runs of rows with one identity, carrying the last run of each batch into the
/// next (it may go on there).
struct Folder {
    schema: SchemaRef,
    key: Vec<usize>,
    converter: RowConverter,
    carry: Option<RecordBatch>,
}

impl Folder {
    fn new(schema: &SchemaRef, key: &[usize]) -> Result<Self> {
        let converter = RowConverter::new(
            key.iter()
                .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            schema: Arc::clone(schema),
            key: key.to_vec(),
            converter,
            carry: None,
        })
    }

    fn rows(&self, batch: &RecordBatch) -> Result<Rows> {
        let columns: Vec<ArrayRef> = self
            .key
            .iter()
            .map(|&i| Arc::clone(batch.column(i)))
            .collect();
        Ok(self.converter.convert_columns(&columns)?)
    }

    /// Takes the next merged batch; returns the folded rows that are complete.
    fn push(&mut self, batch: RecordBatch) -> Result<Option<RecordBatch>> {
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        let batch = match self.carry.take() {
            Some(carry) => concat_batches(&self.schema, [&carry, &batch])?,
            None => batch,
        };
        let rows = self.rows(&batch)?;
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..batch.num_rows() {
            if rows.row(i) != rows.row(i - 1) {
                runs.push((start, i));
                start = i;
            }
        }
        // The last run may continue in the next batch.
        self.carry = Some(batch.slice(start, batch.num_rows() - start));
        if runs.is_empty() {
            return Ok(None);
        }
        fold(&batch, &runs, &self.key).map(Some)
    }

    /// The last run, folded.
    fn finish(&mut self) -> Result<Option<RecordBatch>> {
        match self.carry.take() {
            Some(carry) if carry.num_rows() > 0 => {
                fold(&carry, &[(0, carry.num_rows())], &self.key).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// One row per run of `batch` (runs of consecutive rows), folded last write wins.
fn fold(batch: &RecordBatch, runs: &[(usize, usize)], key: &[usize]) -> Result<RecordBatch> {
    let end = runs.last().map_or(0, |r| r.1);
    if runs.len() == end {
        // No identity repeats: the rows as they are.
        return Ok(batch.slice(0, end));
    }
    let order: Vec<u32> = (0..end as u32).collect();
    let columns = fold_runs(batch, &order, runs, key)?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray, Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};

    use super::*;

    fn batch(rows: &[(&str, i64, Option<f64>)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("host", DataType::Utf8, true),
            Field::new("time", DataType::Int64, false),
            Field::new("v", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn values(b: &RecordBatch) -> Vec<(String, i64, Option<f64>)> {
        let v = b.column(2).as_primitive::<Float64Type>();
        (0..b.num_rows())
            .map(|i| {
                (
                    b.column(0).as_string::<i32>().value(i).to_owned(),
                    b.column(1).as_primitive::<Int64Type>().value(i),
                    v.is_valid(i).then(|| v.value(i)),
                )
            })
            .collect()
    }

    #[test]
    fn runs_fold_across_batches_newest_set_field_winning() {
        let first = batch(&[("a", 1, Some(1.0)), ("a", 2, Some(2.0)), ("a", 2, None)]);
        let mut folder = Folder::new(&first.schema(), &[0, 1]).unwrap();
        let out = folder.push(first).unwrap().unwrap();
        assert_eq!(values(&out), [("a".into(), 1, Some(1.0))]);
        // (a, 2) goes on into the next batch: its newest version sets nothing, the one
        // before it set 2.0, and the newest with a value wins.
        let out = folder
            .push(batch(&[
                ("a", 2, None),
                ("a", 2, Some(22.0)),
                ("b", 1, Some(5.0)),
            ]))
            .unwrap()
            .unwrap();
        assert_eq!(values(&out), [("a".into(), 2, Some(22.0))]);
        let out = folder.finish().unwrap().unwrap();
        assert_eq!(values(&out), [("b".into(), 1, Some(5.0))]);
        assert!(folder.finish().unwrap().is_none());
    }
}

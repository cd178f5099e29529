//! [`KilnScanExec`]: the top of a table scan, saying in `EXPLAIN` what the scan skipped.
//!
//! ```text
//! KilnScanExec: cpu, segments 1 of 24 (23 outside the time range), buffer partitions 0 of 1, merged 0
//!   DataSourceExec: file_groups={…}, predicate=…          ← row groups and pages pruned (ANALYZE)
//! ```
//!
//! It passes everything through unchanged (batches, ordering, statistics, filter, limit,
//! projection and sort push-down) so that it costs nothing and hides nothing from the
//! optimizer.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Statistics, plan_err};
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_expr_common::physical_expr::snapshot_physical_expr_opt;
use datafusion::physical_plan::execution_plan::CardinalityEffect;
use datafusion::physical_plan::filter_pushdown::{
    ChildFilterDescription, ChildPushdownResult, FilterDescription, FilterPushdownPhase,
    FilterPushdownPropagation,
};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildStats, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions, SortOrderPushdownResult, StatisticsArgs, replace_children_if_necessary,
};
use futures::StreamExt;
use kiln_storage::ReadLease;

/// What a scan read, out of what the table has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary {
    pub table: String,
    /// Segments read, and the table's segments.
    pub segments: usize,
    pub segments_total: usize,
    /// Write-buffer partitions read, and the table's.
    pub buffer_partitions: usize,
    pub buffer_partitions_total: usize,
    /// Time partitions with several sources, merged last-write-wins.
    pub merged: usize,
}

impl fmt::Display for ScanSummary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}, segments {} of {} ({} outside the time range), buffer partitions {} of {}, \
             merged {}",
            self.table,
            self.segments,
            self.segments_total,
            self.segments_total - self.segments,
            self.buffer_partitions,
            self.buffer_partitions_total,
            self.merged
        )
    }
}

#[derive(Debug, Clone)]
pub struct KilnScanExec {
    input: Arc<dyn ExecutionPlan>,
    /// What was read ([`ScanSummary`] for tables).
    description: String,
    properties: Arc<PlanProperties>,
    /// Keeps the segment files the scan reads until the plan and its streams are dropped.
    lease: Option<ReadLease>,
}

impl KilnScanExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, description: String) -> Self {
        let properties = Arc::clone(input.properties());
        Self {
            input,
            description,
            properties,
            lease: None,
        }
    }

    /// Holds `lease` for as long as the plan or any of its output streams lives.
    pub fn with_lease(mut self, lease: ReadLease) -> Self {
        self.lease = Some(lease);
        self
    }

    fn with_input(&self, input: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        let mut scan = Self::new(input, self.description.clone());
        scan.lease = self.lease.clone();
        Arc::new(scan)
    }
}

impl DisplayAs for KilnScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "KilnScanExec: {}", self.description)
    }
}

impl ExecutionPlan for KilnScanExec {
    fn name(&self) -> &str {
        "KilnScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
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
            return plan_err!("KilnScanExec has one input");
        }
        Ok(self.with_input(children.swap_remove(0)))
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
        let stream = self.input.execute(partition, context)?;
        let Some(lease) = self.lease.clone() else {
            return Ok(stream);
        };
        let schema = stream.schema();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.map(move |batch| {
                let _held = &lease;
                batch
            }),
        )))
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        vec![ChildStats::At(partition)]
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        _args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        Ok(Arc::clone(&input_stats[0]))
    }

    fn supports_limit_pushdown(&self) -> bool {
        true
    }

    fn cardinality_effect(&self) -> CardinalityEffect {
        CardinalityEffect::Equal
    }

    fn try_swapping_with_projection(
        &self,
        projection: &ProjectionExec,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        // The scan passes its input's rows through, so `projection` of the scan is the scan
        // of the same projection of its input; offered to the input as such (its input is
        // the input, not the scan: a projection below would otherwise be handed one that
        // is not over it).
        let below = ProjectionExec::try_new(projection.expr().to_vec(), Arc::clone(&self.input))?;
        Ok(self
            .input
            .try_swapping_with_projection(&below)?
            .map(|input| self.with_input(input)))
    }

    fn gather_filters_for_pushdown(
        &self,
        _phase: FilterPushdownPhase,
        parent_filters: Vec<Arc<dyn PhysicalExpr>>,
        _config: &ConfigOptions,
    ) -> Result<FilterDescription> {
        // A filter of the query is already the scan's (see `KilnTable::scan`), where the
        // reader applies it coarsely (`coarse`); it stays above the scan, exact. Filters
        // that change as the query runs (a `TopK`'s bound, a join's keys) go down.
        let dynamic: HashSet<usize> = parent_filters
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match snapshot_physical_expr_opt(Arc::clone(f)) {
                Ok(s) if s.transformed => Some(i),
                _ => None,
            })
            .collect();
        Ok(FilterDescription::new().with_child(
            ChildFilterDescription::from_child_with_allowed_indices(
                &parent_filters,
                dynamic,
                &self.input,
            )?,
        ))
    }

    fn handle_child_pushdown_result(
        &self,
        _phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        Ok(FilterPushdownPropagation::if_all(child_pushdown_result))
    }

    fn try_pushdown_sort(
        &self,
        order: &[PhysicalSortExpr],
    ) -> Result<SortOrderPushdownResult<Arc<dyn ExecutionPlan>>> {
        Ok(match self.input.try_pushdown_sort(order)? {
            SortOrderPushdownResult::Exact { inner } => SortOrderPushdownResult::Exact {
                inner: replace_children_if_necessary(Arc::new(self.clone()), vec![inner])?,
            },
            SortOrderPushdownResult::Inexact { inner } => SortOrderPushdownResult::Inexact {
                inner: replace_children_if_necessary(Arc::new(self.clone()), vec![inner])?,
            },
            SortOrderPushdownResult::Unsupported => SortOrderPushdownResult::Unsupported,
        })
    }
}

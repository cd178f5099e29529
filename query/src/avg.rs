//! `avg` that adds a run of rows of one group in a register.
//!
//! Segments are sorted by tag and then time, so a `GROUP BY time_bucket(..), host` sees
//! each group's rows one after another (hundreds per batch). DataFusion's grouped `avg`
//! adds every row to its group's sum in memory, and on such input each addition waits for
//! the store of the one before: about 3 ns a row. Here a batch whose groups come in runs
//! is first reduced to one (count, sum) per run, the sum added in a register, and the
//! runs merged into DataFusion's own accumulator as partial states: about 1 ns a row.
//! Everything else (types, nulls, `FILTER`, `DISTINCT`, windows, state, output) is
//! DataFusion's `avg`, unchanged.
//!
//! The sum of a run is added on its own before it joins the group's sum, as partial
//! aggregates from different partitions already are, so the last bits of a float average
//! may differ from adding every row in order.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, UInt64Array};
use arrow::datatypes::{DataType, FieldRef, Float64Type};
use datafusion::common::ScalarValue;
use datafusion::error::Result;
use datafusion::functions_aggregate::average::avg_udaf;
use datafusion::logical_expr::expr::{AggregateFunctionParams, WindowFunctionParams};
use datafusion::logical_expr::function::{
    AccumulatorArgs, AggregateFunctionSimplification, StateFieldsArgs,
};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, EmitTo, GroupsAccumulator,
    ReversedUDAF, SetMonotonicity, Signature, StatisticsArgs,
};

/// Batches whose rows average fewer than this many per run are passed through as they
/// are: finding the runs would cost more than it saves.
const MIN_MEAN_RUN: usize = 4;

/// DataFusion's `avg` (and its alias `mean`) with a grouped accumulator that adds runs.
pub fn avg() -> AggregateUDF {
    AggregateUDF::new_from_impl(Avg { inner: avg_udaf() })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Avg {
    inner: Arc<AggregateUDF>,
}

impl Avg {
    fn inner(&self) -> &dyn AggregateUDFImpl {
        self.inner.inner().as_ref()
    }
}

impl AggregateUDFImpl for Avg {
    fn name(&self) -> &str {
        self.inner().name()
    }

    fn aliases(&self) -> &[String] {
        self.inner().aliases()
    }

    fn schema_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner().schema_name(params)
    }

    fn human_display(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner().human_display(params)
    }

    fn display_name(&self, params: &AggregateFunctionParams) -> Result<String> {
        self.inner().display_name(params)
    }

    fn window_function_schema_name(&self, params: &WindowFunctionParams) -> Result<String> {
        self.inner().window_function_schema_name(params)
    }

    fn window_function_display_name(&self, params: &WindowFunctionParams) -> Result<String> {
        self.inner().window_function_display_name(params)
    }

    fn signature(&self) -> &Signature {
        self.inner().signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner().return_type(arg_types)
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        self.inner().return_field(arg_fields)
    }

    fn is_nullable(&self) -> bool {
        self.inner().is_nullable()
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner().accumulator(args)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.inner().state_fields(args)
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.inner().groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        let runs = !args.is_distinct
            && args.expr_fields[0].data_type() == &DataType::Float64
            && args.return_field.data_type() == &DataType::Float64;
        let inner = self.inner().create_groups_accumulator(args)?;
        Ok(if runs {
            Box::new(RunAvg { inner })
        } else {
            inner
        })
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner().create_sliding_accumulator(args)
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.inner().order_sensitivity()
    }

    fn simplify(&self) -> Option<AggregateFunctionSimplification> {
        self.inner().simplify()
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        self.inner().reverse_expr()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner().coerce_types(arg_types)
    }

    fn is_descending(&self) -> Option<bool> {
        self.inner().is_descending()
    }

    fn value_from_stats(&self, args: &StatisticsArgs) -> Option<ScalarValue> {
        self.inner().value_from_stats(args)
    }

    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.inner().default_value(data_type)
    }

    fn supports_null_handling_clause(&self) -> bool {
        self.inner().supports_null_handling_clause()
    }

    fn supports_within_group_clause(&self) -> bool {
        self.inner().supports_within_group_clause()
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner().documentation()
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner().set_monotonicity(data_type)
    }
}

/// DataFusion's grouped `avg` over `Float64`, fed runs as partial states.
struct RunAvg {
    inner: Box<dyn GroupsAccumulator>,
}

impl GroupsAccumulator for RunAvg {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let column = values[0].as_primitive::<Float64Type>();
        // Runs only where every row counts (no NULLs, no FILTER) and they are long enough.
        let runs = (opt_filter.is_none() && column.null_count() == 0)
            .then(|| 1 + group_indices.windows(2).filter(|w| w[0] != w[1]).count())
            .filter(|runs| runs * MIN_MEAN_RUN <= group_indices.len());
        let Some(runs) = runs else {
            return self
                .inner
                .update_batch(values, group_indices, opt_filter, total_num_groups);
        };
        let values = column.values();
        let mut groups = Vec::with_capacity(runs);
        let mut counts = Vec::with_capacity(runs);
        let mut sums = Vec::with_capacity(runs);
        let mut start = 0;
        for end in 1..=group_indices.len() {
            if end < group_indices.len() && group_indices[end] == group_indices[start] {
                continue;
            }
            groups.push(group_indices[start]);
            counts.push((end - start) as u64);
            sums.push(
                values[start..end]
                    .iter()
                    .fold(0.0, |sum, value| sum + value),
            );
            start = end;
        }
        let state: [ArrayRef; 2] = [
            Arc::new(UInt64Array::from(counts)),
            Arc::new(Float64Array::from(sums)),
        ];
        self.inner.merge_batch(&state, &groups, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.inner.evaluate(emit_to)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.inner.state(emit_to)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(values, opt_filter)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::PhysicalExpr;
    use datafusion::physical_expr::expressions::Column;
    use proptest::prelude::*;

    use super::*;

    /// Kiln's grouped `avg` over a nullable `Float64` column, and DataFusion's.
    fn accumulators() -> (Box<dyn GroupsAccumulator>, Box<dyn GroupsAccumulator>) {
        let field: FieldRef = Arc::new(Field::new("v", DataType::Float64, true));
        let schema = Schema::new(vec![field.as_ref().clone()]);
        let exprs: Vec<Arc<dyn PhysicalExpr>> = vec![Arc::new(Column::new("v", 0))];
        let fields = vec![field];
        let args = || AccumulatorArgs {
            return_field: Arc::new(Field::new("avg(v)", DataType::Float64, true)),
            schema: &schema,
            ignore_nulls: false,
            order_bys: &[],
            is_reversed: false,
            name: "avg(v)",
            is_distinct: false,
            exprs: &exprs,
            expr_fields: &fields,
        };
        let kiln = avg().inner().create_groups_accumulator(args()).unwrap();
        let datafusion = avg_udaf()
            .inner()
            .create_groups_accumulator(args())
            .unwrap();
        (kiln, datafusion)
    }

    /// A batch: runs of (group, rows), values (`None` = NULL), and whether rows are
    /// filtered (every third row dropped).
    type Batch = (Vec<(usize, usize)>, Vec<Option<f64>>, bool);

    fn batch() -> impl Strategy<Value = Batch> {
        (
            prop::collection::vec((0usize..40, 1usize..30), 1..20),
            any::<bool>(),
            0..4u8,
        )
            .prop_flat_map(|(runs, nulls, filter)| {
                let rows = runs.iter().map(|(_, n)| n).sum::<usize>();
                let value = (-4000i32..4000).prop_map(|v| f64::from(v) / 8.0);
                let values = if nulls {
                    prop::collection::vec(prop::option::weighted(0.8, value), rows).boxed()
                } else {
                    prop::collection::vec(value.prop_map(Some), rows).boxed()
                };
                (Just(runs), values, Just(filter == 0))
            })
    }

    proptest! {
        /// Whatever the runs, NULLs and filters, Kiln's `avg` has DataFusion's groups,
        /// counts, NULLs and averages.
        #[test]
        fn averages_as_datafusion_does(batches in prop::collection::vec(batch(), 1..6)) {
            let (mut kiln, mut datafusion) = accumulators();
            let mut total_num_groups = 0;
            for (runs, values, filtered) in &batches {
                let groups: Vec<usize> = runs
                    .iter()
                    .flat_map(|&(group, rows)| std::iter::repeat_n(group, rows))
                    .collect();
                total_num_groups = groups.iter().fold(total_num_groups, |n, g| n.max(g + 1));
                let values: [ArrayRef; 1] = [Arc::new(Float64Array::from(values.clone()))];
                let filter = filtered
                    .then(|| BooleanArray::from_iter((0..groups.len()).map(|i| Some(i % 3 != 0))));
                for accumulator in [&mut kiln, &mut datafusion] {
                    accumulator
                        .update_batch(&values, &groups, filter.as_ref(), total_num_groups)
                        .unwrap();
                }
            }
            let state = |a: &mut Box<dyn GroupsAccumulator>| a.state(EmitTo::All).unwrap();
            let (kiln_state, datafusion_state) = (state(&mut kiln), state(&mut datafusion));
            prop_assert_eq!(&kiln_state[0], &datafusion_state[0], "counts");
            let sums = |s: &[ArrayRef]| s[1].as_primitive::<Float64Type>().clone();
            let (kiln_sums, datafusion_sums) = (sums(&kiln_state), sums(&datafusion_state));
            prop_assert_eq!(kiln_sums.nulls(), datafusion_sums.nulls());
            for (k, d) in kiln_sums.iter().zip(datafusion_sums.iter()) {
                // Values are multiples of 1/8 well inside f64's exact range: no rounding.
                prop_assert_eq!(k, d);
            }
        }
    }
}

//! Selector aggregates: `first(value, time)` and `last(value, time)`.
//!
//! `last(value, time)` is the `value` of the row with the greatest `time` in each group,
//! `first` that of the smallest, as TimescaleDB defines them: rows whose `time` is NULL
//! are skipped; the selected row's `value` is returned even when it is NULL; of rows that
//! tie on `time`, the one seen first is kept. Any value type; `time` a timestamp or an
//! integer.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};

/// Which end of the time range a selector keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    First,
    Last,
}

impl End {
    /// Whether a row at `candidate` replaces the one kept at `kept`.
    fn replaces(self, candidate: i64, kept: i64) -> bool {
        match self {
            End::First => candidate < kept,
            End::Last => candidate > kept,
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    end: End,
    signature: Signature,
}

/// `first(value, time)`.
pub fn first() -> AggregateUDF {
    AggregateUDF::new_from_impl(Selector::new(End::First))
}

/// `last(value, time)`.
pub fn last() -> AggregateUDF {
    AggregateUDF::new_from_impl(Selector::new(End::Last))
}

impl Selector {
    fn new(end: End) -> Self {
        Self {
            end,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for Selector {
    fn name(&self) -> &str {
        match self.end {
            End::First => "first",
            End::Last => "last",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let [value, time] = arg_types else {
            return plan_err!("{0} takes two arguments: {0}(value, time)", self.name());
        };
        match time {
            DataType::Timestamp(..)
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32 => Ok(vec![value.clone(), time.clone()]),
            other => plan_err!(
                "{}: the second argument orders the rows and must be a timestamp or an integer, not {other}",
                self.name()
            ),
        }
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let value = args.input_fields[0].data_type().clone();
        let time = args.input_fields[1].data_type().clone();
        Ok(vec![
            Arc::new(Field::new(
                format_state_name(args.name, "value"),
                value,
                true,
            )),
            Arc::new(Field::new(format_state_name(args.name, "time"), time, true)),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let value_type = args.return_field.data_type();
        Ok(Box::new(SelectorAccumulator {
            end: self.end,
            value: ScalarValue::try_from(value_type)?,
            time: None,
            time_type: args.exprs[1].data_type(args.schema)?,
        }))
    }
}

#[derive(Debug)]
struct SelectorAccumulator {
    end: End,
    value: ScalarValue,
    /// The kept row's time, as i64 in the time column's unit; `None` until a row is seen.
    time: Option<i64>,
    time_type: DataType,
}

impl SelectorAccumulator {
    /// Keeps the row of `values`/`times` at the selected end, if it beats the kept one.
    fn consider(&mut self, values: &ArrayRef, times: &ArrayRef) -> Result<()> {
        let times = arrow::compute::cast(times, &DataType::Int64)?;
        let times = times.as_primitive::<Int64Type>();
        let mut best: Option<(usize, i64)> = None;
        for (i, t) in times.iter().enumerate() {
            let Some(t) = t else { continue };
            if best.is_none_or(|(_, b)| self.end.replaces(t, b)) {
                best = Some((i, t));
            }
        }
        if let Some((i, t)) = best
            && self.time.is_none_or(|kept| self.end.replaces(t, kept))
        {
            self.value = ScalarValue::try_from_array(values, i)?;
            self.time = Some(t);
        }
        Ok(())
    }
}

impl Accumulator for SelectorAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [value, time] = values else {
            return exec_err!(
                "selector: expected (value, time), got {} arrays",
                values.len()
            );
        };
        self.consider(value, time)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let time = ScalarValue::Int64(self.time).cast_to(&self.time_type)?;
        Ok(vec![self.value.clone(), time])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(self.value.clone())
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.value.size() - size_of_val(&self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, TimestampNanosecondArray};

    /// A batch of (values, times).
    type Batch = (Vec<Option<f64>>, Vec<Option<i64>>);

    fn run(end: End, batches: &[Batch]) -> ScalarValue {
        let mut acc = SelectorAccumulator {
            end,
            value: ScalarValue::Float64(None),
            time: None,
            time_type: DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
        };
        for (v, t) in batches {
            let v: ArrayRef = Arc::new(Float64Array::from(v.clone()));
            let t: ArrayRef = Arc::new(TimestampNanosecondArray::from(t.clone()));
            acc.update_batch(&[v, t]).unwrap();
        }
        acc.evaluate().unwrap()
    }

    #[test]
    fn the_row_at_the_extreme_time_wins_across_batches() {
        let batches = [
            (vec![Some(1.0), Some(2.0)], vec![Some(20), Some(10)]),
            (vec![Some(3.0), Some(4.0)], vec![Some(30), None]),
        ];
        assert_eq!(run(End::First, &batches), ScalarValue::Float64(Some(2.0)));
        assert_eq!(run(End::Last, &batches), ScalarValue::Float64(Some(3.0)));
    }

    #[test]
    fn a_null_value_at_the_extreme_is_the_answer_and_ties_keep_the_first_seen() {
        let batches = [(
            vec![Some(1.0), None, Some(5.0)],
            vec![Some(5), Some(9), Some(9)],
        )];
        assert_eq!(run(End::Last, &batches), ScalarValue::Float64(None));
        let ties = [(vec![Some(1.0), Some(2.0)], vec![Some(5), Some(5)])];
        assert_eq!(run(End::First, &ties), ScalarValue::Float64(Some(1.0)));
        assert_eq!(run(End::Last, &[]), ScalarValue::Float64(None));
    }
}

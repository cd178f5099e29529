//! `time_bucket(interval, time)`: TimescaleDB's spelling of `date_bin`.
//!
//! Buckets are aligned to TimescaleDB's default origin, Monday 2000-01-03 00:00:00 UTC,
//! so weekly buckets start on Mondays; for intervals that divide a day this gives the same
//! buckets as `date_bin(interval, time)`. The interval may be an `INTERVAL` or a string
//! such as `'5 minutes'`.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, IntervalUnit, TimeUnit};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The type a bucketing function's interval argument is coerced to: an `INTERVAL`, or a
/// string such as `'5 minutes'`.
pub(crate) fn coerce_interval(function: &str, arg: &DataType) -> Result<DataType> {
    match arg {
        DataType::Interval(_)
        | DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Null => Ok(DataType::Interval(IntervalUnit::MonthDayNano)),
        other => plan_err!("{function}: the first argument must be an interval, not {other}"),
    }
}

/// The type a bucketing function's timestamp argument (the `nth` one) is coerced to:
/// timestamps stay as they are, strings are parsed as nanosecond timestamps.
pub(crate) fn coerce_timestamp(function: &str, nth: &str, arg: &DataType) -> Result<DataType> {
    match arg {
        DataType::Timestamp(..) => Ok(arg.clone()),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null => {
            Ok(DataType::Timestamp(TimeUnit::Nanosecond, None))
        }
        other => plan_err!("{function}: the {nth} argument must be a timestamp, not {other}"),
    }
}

/// 2000-01-03T00:00:00Z in nanoseconds since the epoch.
pub const TIMESCALE_ORIGIN_NANOS: i64 = 946_857_600_000_000_000;

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TimeBucket {
    signature: Signature,
}

impl Default for TimeBucket {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

pub fn time_bucket() -> ScalarUDF {
    ScalarUDF::new_from_impl(TimeBucket::default())
}

impl ScalarUDFImpl for TimeBucket {
    fn name(&self) -> &str {
        "time_bucket"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let [interval, time] = arg_types else {
            return plan_err!("time_bucket takes two arguments: time_bucket(interval, time)");
        };
        Ok(vec![
            coerce_interval("time_bucket", interval)?,
            coerce_timestamp("time_bucket", "second", time)?,
        ])
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types.get(1) {
            Some(t @ DataType::Timestamp(..)) => Ok(t.clone()),
            _ => Ok(DataType::Timestamp(TimeUnit::Nanosecond, None)),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(DataType::Timestamp(unit, tz)) =
            args.arg_fields.get(1).map(|f| f.data_type().clone())
        else {
            return exec_err!("time_bucket: the second argument must be a timestamp");
        };
        let origin = match unit {
            TimeUnit::Nanosecond => {
                ScalarValue::TimestampNanosecond(Some(TIMESCALE_ORIGIN_NANOS), tz)
            }
            TimeUnit::Microsecond => {
                ScalarValue::TimestampMicrosecond(Some(TIMESCALE_ORIGIN_NANOS / 1_000), tz)
            }
            TimeUnit::Millisecond => {
                ScalarValue::TimestampMillisecond(Some(TIMESCALE_ORIGIN_NANOS / 1_000_000), tz)
            }
            TimeUnit::Second => {
                ScalarValue::TimestampSecond(Some(TIMESCALE_ORIGIN_NANOS / 1_000_000_000), tz)
            }
        };
        let origin_field = Arc::new(Field::new("origin", origin.data_type(), true));
        let mut args = args;
        args.args.push(ColumnarValue::Scalar(origin));
        args.arg_fields.push(origin_field);
        datafusion::functions::datetime::date_bin().invoke_with_args(args)
    }
}

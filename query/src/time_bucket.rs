//! `time_bucket(interval, time [, timezone])`: TimescaleDB's spelling of `date_bin`.
//!
//! Buckets are aligned to TimescaleDB's default origin, Monday 2000-01-03 00:00:00, so
//! weekly buckets start on Mondays; for intervals that divide a day this gives the same
//! buckets as `date_bin(interval, time)`. The interval may be an `INTERVAL` or a string
//! such as `'5 minutes'`. In a time zone (see [`crate::zone`] for which applies) the origin
//! and the buckets are local wall-clock time.

use std::sync::Arc;

use crate::zone;
use arrow::array::{AsArray, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, IntervalUnit, TimeUnit};
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
        let (interval, time, zone) = match arg_types {
            [interval, time] => (interval, time, None),
            [interval, time, zone] => (interval, time, Some(zone)),
            _ => {
                return plan_err!("time_bucket takes time_bucket(interval, time [, timezone])");
            }
        };
        let mut types = vec![
            coerce_interval("time_bucket", interval)?,
            coerce_timestamp("time_bucket", "second", time)?,
        ];
        match zone {
            Some(DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null) => {
                types.push(DataType::Utf8)
            }
            Some(other) => {
                return plan_err!(
                    "time_bucket: the third argument must be a time zone name, not {other}"
                );
            }
            None => {}
        }
        Ok(types)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types.get(1) {
            Some(t @ DataType::Timestamp(..)) => Ok(t.clone()),
            _ => Ok(DataType::Timestamp(TimeUnit::Nanosecond, None)),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let time_type = args.arg_fields.get(1).map(|f| f.data_type().clone());
        let Some(DataType::Timestamp(unit, tz)) = time_type.clone() else {
            return exec_err!("time_bucket: the second argument must be a timestamp");
        };
        let time_type = time_type.expect("matched above");
        let explicit = match args.args.get(2) {
            Some(ColumnarValue::Scalar(ScalarValue::Utf8(Some(name)))) => Some(name.clone()),
            Some(_) => return exec_err!("time_bucket: the time zone must be a constant string"),
            None => None,
        };
        let session = args.config_options.execution.time_zone.clone();
        let zone = zone::resolve(explicit.as_deref(), tz.as_deref(), session.as_deref())?;
        let fixed = match &args.args[0] {
            ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(Some(v))) if v.months == 0 => {
                match zone::fixed_interval_nanos(*v) {
                    Some(n) if n > 0 => Some(n),
                    Some(_) => return exec_err!("time_bucket: the interval must be positive"),
                    None => return exec_err!("time_bucket: the interval {v:?} is too long"),
                }
            }
            ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(Some(_))) => None,
            _ => return exec_err!("time_bucket: the interval must be a constant"),
        };
        match (fixed, zone) {
            (Some(stride), Some(zone)) => {
                let bins = zone::LocalBins {
                    zone,
                    origin: TIMESCALE_ORIGIN_NANOS,
                    stride,
                };
                bucket_each(&args, unit, &time_type, |t| bins.bin(t))
            }
            (Some(stride), None) => bucket_each(&args, unit, &time_type, |t| {
                zone::floor(t, TIMESCALE_ORIGIN_NANOS, stride)
            }),
            (None, Some(_)) => exec_err!(
                "time_bucket in a time zone needs an interval of fixed length (days, hours, …), \
                 not months"
            ),
            // Months: calendar arithmetic, as date_bin does it.
            (None, None) => {
                let origin = Some(TIMESCALE_ORIGIN_NANOS / zone::nanos_per(unit));
                let origin = match unit {
                    TimeUnit::Nanosecond => ScalarValue::TimestampNanosecond(origin, tz),
                    TimeUnit::Microsecond => ScalarValue::TimestampMicrosecond(origin, tz),
                    TimeUnit::Millisecond => ScalarValue::TimestampMillisecond(origin, tz),
                    TimeUnit::Second => ScalarValue::TimestampSecond(origin, tz),
                };
                let origin_field = Arc::new(Field::new("origin", origin.data_type(), true));
                let mut args = args;
                args.args.truncate(2);
                args.arg_fields.truncate(2);
                args.args.push(ColumnarValue::Scalar(origin));
                args.arg_fields.push(origin_field);
                datafusion::functions::datetime::date_bin().invoke_with_args(args)
            }
        }
    }
}

/// Applies `bin` (instant in nanoseconds → start of its bucket in nanoseconds) to every
/// time of the second argument, kept in its unit. A time whose bucket is outside the
/// timestamp range is an error, not a wrapped value.
fn bucket_each(
    args: &ScalarFunctionArgs,
    unit: TimeUnit,
    time_type: &DataType,
    bin: impl Fn(i64) -> i64,
) -> Result<ColumnarValue> {
    let per_unit = zone::nanos_per(unit);
    let times = args.args[1].to_array(args.number_rows)?;
    let times = cast(&times, &DataType::Int64)?;
    let binned: Int64Array = times.as_primitive::<Int64Type>().try_unary(|t| {
        // Instants beyond what nanoseconds hold (seconds near i64's edges) cannot be
        // binned in nanoseconds; neither can a bucket that starts beyond them.
        let nanos = t
            .checked_mul(per_unit)
            .filter(|n| *n != i64::MIN && *n != i64::MAX);
        match nanos.map(&bin) {
            Some(b) if b != i64::MIN && b != i64::MAX => Ok(b.div_euclid(per_unit)),
            _ => Err(arrow::error::ArrowError::ComputeError(format!(
                "time_bucket: the bucket of {t} ({unit:?}s) is outside the timestamp range"
            ))),
        }
    })?;
    let binned = cast(&binned, time_type)?;
    Ok(match &args.args[1] {
        ColumnarValue::Scalar(_) => ColumnarValue::Scalar(ScalarValue::try_from_array(&binned, 0)?),
        ColumnarValue::Array(_) => ColumnarValue::Array(binned),
    })
}

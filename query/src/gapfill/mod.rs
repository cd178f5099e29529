//! Gap filling: `date_bin_gapfill` / `time_bucket_gapfill`, with `locf` and `interpolate`.
//!
//! ```sql
//! SELECT time_bucket_gapfill('1 minute', time) AS minute, host,
//!        max(usage) AS peak, locf(max(usage)), interpolate(avg(usage))
//! FROM cpu
//! WHERE time >= '2026-11-24T08:00:00Z' AND time < '2026-11-24T09:00:00Z'
//! GROUP BY minute, host
//! ```
//!
//! returns one row per minute of the hour for every host that has data in it: minutes
//! without data get a row whose plain aggregates are NULL, whose `locf(…)` carries the
//! host's previous minute forward and whose `interpolate(…)` is linear between the host's
//! neighbouring minutes that have a value. The semantics are TimescaleDB's:
//!
//! * the buckets run from the bucket holding the range's start to the one holding its end
//!   (`time < end` excludes `end`, `time <= end` includes it); the range comes from the
//!   `WHERE` clause's bounds on the bucketed column, or from `time_bucket_gapfill`'s own
//!   `start` and `finish` arguments, which take precedence;
//! * series are the other `GROUP BY` columns; with none, the whole range is returned even
//!   when no row matched;
//! * `locf(value)` carries the last bucket's value forward, NULL included;
//!   `locf(value, true)` (TimescaleDB's `treat_null_as_missing`) skips NULLs, so a bucket
//!   whose aggregate is NULL is filled too; before a series' first bucket with a value
//!   there is nothing to carry and the result is NULL;
//! * `interpolate(value)` fills missing buckets of numeric aggregates only; at the edges
//!   of a series, where one neighbour is missing, the result is NULL.
//!
//! `date_bin_gapfill(interval, time [, origin])` bins like `date_bin` (origin 1970-01-01);
//! `time_bucket_gapfill(interval, time [, start [, finish]])` like `time_bucket` (origin
//! Monday 2000-01-03). Intervals must have a fixed length (no months or years).
//!
//! ## How it runs
//!
//! The functions are placeholders until [`HandleGapFill`], an optimizer rule run before
//! DataFusion's own, finds an aggregate grouped by one of them. It bins with `date_bin` /
//! `time_bucket` in the aggregate and puts a [`GapFill`] logical node above it; `locf(x)` and
//! `interpolate(x)` in the projection above become extra columns of that node. The node is
//! planned as [`GapFillExec`], which reads the aggregate's rows sorted by series and time
//! and writes each series' buckets in order, filled.

mod exec;
mod plan;

use std::any::Any;

use arrow::datatypes::DataType;
use datafusion::common::{exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

pub use exec::{GapFillExec, GapFillPlanner};
pub use plan::{Fill, GapFill, HandleGapFill};

use crate::time_bucket::{coerce_interval, coerce_timestamp};

/// An instant argument (origin, start, finish): strings are read as the bucketed column's
/// type, so that they compare with it in the same zone.
fn coerce_instant(name: &str, nth: &str, arg: &DataType, time: &DataType) -> Result<DataType> {
    match coerce_timestamp(name, nth, arg)? {
        DataType::Timestamp(..) if !matches!(arg, DataType::Timestamp(..)) => Ok(time.clone()),
        t => Ok(t),
    }
}

/// The functions users write; all planned away by [`HandleGapFill`].
pub fn functions() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(Placeholder::new(Kind::DateBin)),
        ScalarUDF::new_from_impl(Placeholder::new(Kind::TimeBucket)),
        ScalarUDF::new_from_impl(Placeholder::new(Kind::Locf)),
        ScalarUDF::new_from_impl(Placeholder::new(Kind::Interpolate)),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// `date_bin_gapfill(interval, time [, origin])`
    DateBin,
    /// `time_bucket_gapfill(interval, time [, start [, finish]])`
    TimeBucket,
    /// `locf(value [, treat_null_as_missing])`
    Locf,
    /// `interpolate(value)`
    Interpolate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::DateBin => "date_bin_gapfill",
            Kind::TimeBucket => "time_bucket_gapfill",
            Kind::Locf => "locf",
            Kind::Interpolate => "interpolate",
        }
    }
}

/// A gap-filling function: typed like the real thing, never evaluated.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct Placeholder {
    kind: Kind,
    signature: Signature,
}

impl Placeholder {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

/// Which gap-filling function `expr` calls, if it calls one.
pub(crate) fn kind_of(expr: &Expr) -> Option<Kind> {
    let Expr::ScalarFunction(f) = expr else {
        return None;
    };
    let inner: &dyn Any = f.func.inner().as_ref();
    inner.downcast_ref::<Placeholder>().map(|p| p.kind)
}

impl ScalarUDFImpl for Placeholder {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        let name = self.kind.name();
        match (self.kind, args) {
            (Kind::DateBin, [interval, time, rest @ ..]) if rest.len() <= 1 => {
                let time = coerce_timestamp(name, "second", time)?;
                let mut types = vec![coerce_interval(name, interval)?, time.clone()];
                for origin in rest {
                    types.push(coerce_instant(name, "third (origin)", origin, &time)?);
                }
                Ok(types)
            }
            (Kind::DateBin, _) => {
                plan_err!("date_bin_gapfill takes date_bin_gapfill(interval, time [, origin])")
            }
            (Kind::TimeBucket, [interval, time, rest @ ..]) if rest.len() <= 2 => {
                let time = coerce_timestamp(name, "second", time)?;
                let mut types = vec![coerce_interval(name, interval)?, time.clone()];
                for (bound, nth) in rest.iter().zip(["third (start)", "fourth (finish)"]) {
                    types.push(coerce_instant(name, nth, bound, &time)?);
                }
                Ok(types)
            }
            (Kind::TimeBucket, _) => plan_err!(
                "time_bucket_gapfill takes time_bucket_gapfill(interval, time [, start [, finish]])"
            ),
            (Kind::Locf, [value]) => Ok(vec![value.clone()]),
            (Kind::Locf, [value, _]) => Ok(vec![value.clone(), DataType::Boolean]),
            (Kind::Locf, _) => plan_err!("locf takes locf(value [, treat_null_as_missing])"),
            (Kind::Interpolate, [value]) if value.is_numeric() || value.is_null() => {
                Ok(vec![value.clone()])
            }
            (Kind::Interpolate, [other]) => {
                plan_err!("interpolate needs a numeric value, not {other}")
            }
            (Kind::Interpolate, _) => {
                plan_err!("interpolate takes one argument: interpolate(value)")
            }
        }
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        let i = match self.kind {
            Kind::DateBin | Kind::TimeBucket => 1,
            Kind::Locf | Kind::Interpolate => 0,
        };
        Ok(args[i].clone())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        match self.kind {
            Kind::DateBin | Kind::TimeBucket => exec_err!(
                "{} must be used in an aggregate query, grouped by it, with the time range \
                 bounded in WHERE",
                self.kind.name()
            ),
            Kind::Locf | Kind::Interpolate => exec_err!(
                "{} takes an aggregate of a query grouped by date_bin_gapfill or \
                 time_bucket_gapfill, such as {}(avg(value))",
                self.kind.name(),
                self.kind.name()
            ),
        }
    }
}

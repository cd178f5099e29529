//! Property tests: any time, interval, range and time zone given to `time_bucket` and gap
//! filling is answered or refused with an error, never a panic or a wrapped value.

use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, IntervalMonthDayNano, Schema, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::optimizer::{Optimizer, OptimizerRule};
use datafusion::prelude::{SessionConfig, SessionContext, col, lit};
use proptest::prelude::*;

use crate::{KilnQueryPlanner, gapfill, time_bucket};

/// A session in `zone` (UTC if none) with Kiln's time functions and gap-fill planning,
/// and table `cpu` holding `times` for hosts a and b.
fn session(times: &[i64], zone: Option<&str>) -> SessionContext {
    let mut config = SessionConfig::new();
    config.options_mut().execution.time_zone = zone.map(str::to_owned);
    let mut rules: Vec<Arc<dyn OptimizerRule + Send + Sync>> =
        vec![Arc::new(gapfill::HandleGapFill)];
    rules.extend(Optimizer::new().rules);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .with_optimizer_rules(rules)
        .with_query_planner(Arc::new(KilnQueryPlanner))
        .build();
    let ctx = SessionContext::new_with_state(state);
    ctx.register_udf(time_bucket::time_bucket());
    for f in gapfill::functions() {
        ctx.register_udf(f);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("host", DataType::Utf8, false),
        Field::new("usage", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(TimestampNanosecondArray::from(times.to_vec())),
            Arc::new(StringArray::from_iter_values(
                (0..times.len()).map(|i| if i % 2 == 0 { "a" } else { "b" }),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..times.len()).map(|i| i as f64),
            )),
        ],
    )
    .unwrap();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    ctx.register_table("cpu", Arc::new(table)).unwrap();
    ctx
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Times anywhere in `i64`, with the edges and the accepted range's edges likely.
fn any_time() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(kiln_storage::time::MIN_TIME),
        Just(kiln_storage::time::MAX_TIME),
        kiln_storage::time::MIN_TIME..=kiln_storage::time::MAX_TIME,
    ]
}

/// Intervals of any length, sign and shape, months included.
fn any_interval() -> impl Strategy<Value = IntervalMonthDayNano> {
    prop_oneof![
        (any::<i32>(), any::<i64>()).prop_map(|(d, n)| IntervalMonthDayNano::new(0, d, n)),
        (0..400i32, 0..86_400_000_000_000i64).prop_map(|(d, n)| IntervalMonthDayNano::new(0, d, n)),
        (any::<i32>(), any::<i32>(), any::<i64>())
            .prop_map(|(m, d, n)| IntervalMonthDayNano::new(m, d, n)),
    ]
}

/// Gap-fills `max` and `avg` of `cpu` holding `times` over `start..end` in buckets of
/// `days` and `nanos`, in `zone`.
fn gap_fill(
    times: &[i64],
    start: i64,
    end: i64,
    days: i32,
    nanos: i64,
    zone: Option<&str>,
) -> datafusion::error::Result<Vec<RecordBatch>> {
    let ctx = session(times, zone);
    let ts = |n: i64| format!("arrow_cast({n}, 'Timestamp(Nanosecond, None)')");
    let sql = format!(
        "SELECT time_bucket_gapfill(INTERVAL '{days} days {nanos} nanoseconds', time, {}, {}) AS b, \
         host, locf(max(usage)), interpolate(avg(usage)) FROM cpu \
         WHERE time >= {} AND time < {} GROUP BY b, host",
        ts(start),
        ts(end),
        ts(start),
        ts(end),
    );
    runtime().block_on(async { ctx.sql(&sql).await?.collect().await })
}

/// The properties' queries do run: an hour of minutes for two hosts.
#[test]
fn the_gap_fill_query_of_the_property_fills() {
    let minute = 60_000_000_000;
    let rows: usize = gap_fill(
        &[0, minute, 5 * minute],
        0,
        60 * minute,
        0,
        minute,
        Some("UTC"),
    )
    .unwrap()
    .iter()
    .map(RecordBatch::num_rows)
    .sum();
    assert_eq!(rows, 2 * 60);
    // Near the edges of the stored range too.
    let edge = kiln_storage::time::MIN_TIME;
    let rows: usize = gap_fill(&[edge], edge, edge + 10 * minute, 0, minute, None)
        .unwrap()
        .iter()
        .map(RecordBatch::num_rows)
        .sum();
    assert_eq!(rows, 10);
}

const ZONES: [Option<&str>; 4] = [None, Some("UTC"), Some("Europe/Berlin"), Some("+05:30")];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// `time_bucket(interval, time [, zone])` over any times: a bucket or an error. In
    /// UTC, for an accepted time and a positive fixed interval, the bucket holds the time.
    #[test]
    fn time_bucket_never_panics(
        times in prop::collection::vec(any_time(), 1..8),
        interval in any_interval(),
        zone in 0..ZONES.len(),
    ) {
        let ctx = session(&times, None);
        let mut args = vec![lit(ScalarValue::IntervalMonthDayNano(Some(interval))), col("time")];
        if let Some(z) = ZONES[zone] {
            args.push(lit(z));
        }
        let result = runtime().block_on(async {
            ctx.table("cpu")
                .await?
                .select(vec![col("time"), time_bucket::time_bucket().call(args).alias("b")])?
                .collect()
                .await
        });
        let fixed = crate::zone::fixed_interval_nanos(interval).filter(|n| *n > 0);
        let stored = times.iter().all(|t| kiln_storage::time::check(*t).is_ok());
        // Buckets up to a week wide start inside the timestamp range for every stored time.
        let week = kiln_storage::time::MAX_PARTITION_NANOS;
        if stored && interval.months == 0 && fixed.is_some_and(|n| n <= week) {
            prop_assert!(result.is_ok(), "{result:?}");
        }
        if let (Ok(batches), Some(stride), None) = (&result, fixed.filter(|_| interval.months == 0), ZONES[zone]) {
            for batch in batches {
                let t = batch.column(0).as_any().downcast_ref::<TimestampNanosecondArray>().unwrap();
                let b = batch.column(1).as_any().downcast_ref::<TimestampNanosecondArray>().unwrap();
                for i in 0..batch.num_rows() {
                    let (t, b) = (t.value(i), b.value(i));
                    if kiln_storage::time::check(t).is_ok() && b.checked_add(stride).is_some() {
                        prop_assert!(b <= t && t - b < stride, "time {t} bucket {b} stride {stride}");
                    }
                }
            }
        }
    }

    /// Gap filling over any range and interval: rows or an error (too many buckets, an
    /// interval that does not fit), never a panic.
    #[test]
    fn gap_filling_never_panics(
        times in prop::collection::vec(any_time(), 1..6),
        start in any_time(),
        end in any_time(),
        days in prop_oneof![any::<i32>(), 0..30i32],
        nanos in prop_oneof![any::<i64>(), 1..3_600_000_000_000i64],
        zone in 0..ZONES.len(),
    ) {
        let _ = gap_fill(&times, start, end, days, nanos, ZONES[zone]);
    }

    /// The interval arithmetic itself: exact when it fits, `None` when it does not.
    #[test]
    fn fixed_intervals_are_exact_or_refused(days: i32, nanos: i64) {
        let exact = i128::from(days) * 86_400_000_000_000 + i128::from(nanos);
        let got = crate::zone::fixed_interval_nanos(IntervalMonthDayNano::new(0, days, nanos));
        prop_assert_eq!(got.map(i128::from), i64::try_from(exact).ok().map(i128::from));
    }
}

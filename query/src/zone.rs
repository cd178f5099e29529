//! Local time: time zones for bucketing in the wall-clock time of a plant.
//!
//! Kiln's timestamps are instants. Buckets of `time_bucket` and `time_bucket_gapfill` are
//! laid on UTC unless a zone is in play, in this order: the function's `timezone` argument,
//! the zone of the timestamp it buckets (`time AT TIME ZONE 'Europe/Berlin'`), the
//! session's zone (the HTTP query API's `tz`). In a zone, buckets start
//! at local wall-clock boundaries: a day is local midnight to local midnight, 23 or 25 hours
//! long when daylight saving time starts or ends.

use std::str::FromStr;

use arrow::array::timezone::Tz;
use chrono::{DateTime, Offset, TimeZone};
use datafusion::common::plan_err;
use datafusion::error::Result;

/// `name` as a zone, `None` for UTC itself; an error names what is accepted.
pub fn parse(name: &str) -> Result<Option<Tz>> {
    let trimmed = name.trim();
    if matches!(
        trimmed.to_ascii_uppercase().as_str(),
        "UTC" | "Z" | "+00:00" | "+00" | "ETC/UTC" | "GMT" | "ETC/GMT" | "UCT"
    ) {
        return Ok(None);
    }
    match Tz::from_str(trimmed) {
        Ok(tz) => Ok(Some(tz)),
        Err(_) => plan_err!(
            "unknown time zone {name:?}: use an IANA name such as 'Europe/Berlin' or an offset \
             such as '+01:00'"
        ),
    }
}

/// The zone buckets are laid in (`None`: UTC): the function's own `explicit` zone if
/// given, else the zone of the timestamp bucketed if it is not UTC, else the session's.
pub fn resolve(
    explicit: Option<&str>,
    time_zone: Option<&str>,
    session: Option<&str>,
) -> Result<Option<Tz>> {
    if let Some(name) = explicit {
        return parse(name);
    }
    if let Some(name) = time_zone
        && let Some(zone) = parse(name)?
    {
        return Ok(Some(zone));
    }
    session.map_or(Ok(None), parse)
}

/// Nanoseconds in one `unit`.
/// The length of an interval without months (`days` of 24 hours plus `nanoseconds`), if
/// it fits in nanoseconds: `INTERVAL '2147483647 days'` does not.
pub fn fixed_interval_nanos(v: arrow::datatypes::IntervalMonthDayNano) -> Option<i64> {
    i64::from(v.days)
        .checked_mul(86_400_000_000_000)
        .and_then(|d| d.checked_add(v.nanoseconds))
}

pub fn nanos_per(unit: arrow::datatypes::TimeUnit) -> i64 {
    use arrow::datatypes::TimeUnit;
    match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    }
}

/// Seconds `zone` is ahead of UTC at the instant `nanos`.
fn offset_at(zone: &Tz, nanos: i64) -> i64 {
    let utc = DateTime::from_timestamp_nanos(nanos).naive_utc();
    i64::from(zone.offset_from_utc_datetime(&utc).fix().local_minus_utc())
}

/// The instant `nanos` as local wall-clock nanoseconds (as if the wall clock were UTC).
pub fn to_local(zone: &Tz, nanos: i64) -> i64 {
    nanos.saturating_add(offset_at(zone, nanos) * 1_000_000_000)
}

/// The instant at which the wall clock in `zone` reads `local` (nanoseconds, as if UTC).
/// A wall-clock time that happens twice (clocks going back) is its first instant; one that
/// never happens (clocks going forward) is read with the offset before the change.
pub fn from_local(zone: &Tz, local: i64) -> i64 {
    let naive = DateTime::from_timestamp_nanos(local).naive_utc();
    let offset = match zone.offset_from_local_datetime(&naive).earliest() {
        Some(o) => i64::from(o.fix().local_minus_utc()),
        // In the gap: the offset an hour before, when the clock still ran on the old one.
        None => offset_at(
            zone,
            local.saturating_sub(offset_at(zone, local) * 1_000_000_000 + 3_600_000_000_000),
        ),
    };
    local.saturating_sub(offset * 1_000_000_000)
}

/// Buckets of `stride` nanoseconds laid on `origin` (both in local wall-clock time).
#[derive(Debug, Clone)]
pub struct LocalBins {
    pub zone: Tz,
    pub origin: i64,
    pub stride: i64,
}

impl LocalBins {
    /// The local wall-clock start of the bucket holding local time `local`.
    pub fn floor_local(&self, local: i64) -> i64 {
        floor(local, self.origin, self.stride)
    }

    /// The instant the bucket holding instant `nanos` starts.
    pub fn bin(&self, nanos: i64) -> i64 {
        from_local(&self.zone, self.floor_local(to_local(&self.zone, nanos)))
    }
}

/// `origin + k * stride`, the greatest such value not after `t` (no overflow).
pub fn floor(t: i64, origin: i64, stride: i64) -> i64 {
    let (t, origin, stride) = (i128::from(t), i128::from(origin), i128::from(stride));
    let b = origin + (t - origin).div_euclid(stride) * stride;
    b.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000_000_000;

    #[test]
    fn days_follow_local_midnight_across_daylight_saving() {
        let berlin = parse("Europe/Berlin").unwrap().unwrap();
        let bins = LocalBins {
            zone: berlin,
            origin: 0,
            stride: 24 * HOUR,
        };
        // 2024-03-31 is 23 hours long in Berlin (clocks go 02:00 → 03:00).
        let mar31_start = 1_711_839_600_000_000_000; // 2024-03-31T00:00 CET = 03-30T23:00Z
        let mar31_noon = 1_711_879_200_000_000_000; // 2024-03-31T10:00:00Z = 12:00 CEST
        assert_eq!(bins.bin(mar31_noon), mar31_start);
        // The next local midnight is 23 hours later.
        assert_eq!(bins.bin(mar31_noon + 24 * HOUR), mar31_start + 23 * HOUR);
        assert!(parse("UTC").unwrap().is_none());
        assert!(parse("Mars/Olympus").is_err());
        let fixed = parse("+05:30").unwrap().unwrap();
        assert_eq!(to_local(&fixed, 0), 5 * HOUR + HOUR / 2);
    }

    #[test]
    fn wall_clock_times_that_never_happen_or_happen_twice() {
        let berlin = parse("Europe/Berlin").unwrap().unwrap();
        // 2024-03-31 02:30 does not exist in Berlin: read with CET (+01:00) → 01:30Z.
        let gap_local = 1_711_852_200_000_000_000; // 2024-03-31T02:30:00 as if UTC
        assert_eq!(from_local(&berlin, gap_local), gap_local - HOUR);
        // 2024-10-27 02:30 happens twice: the first (CEST, +02:00) → 00:30Z.
        let twice_local = 1_729_996_200_000_000_000; // 2024-10-27T02:30:00 as if UTC
        assert_eq!(from_local(&berlin, twice_local), twice_local - 2 * HOUR);
    }
}

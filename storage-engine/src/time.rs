//! The instants Kiln stores: the range a row's time may take, and the arithmetic that
//! meets partition widths without overflowing.
//!
//! A row's time is an `i64` of nanoseconds since the Unix epoch, which reaches from
//! 1677-09-21 to 2262-04-11. Kiln accepts the whole years in between, 1678 through 2261,
//! and keeps about a hundred days of headroom at either end: a partition start (`time`
//! rounded down to a width of at most [`MAX_PARTITION_NANOS`]) and a partition end (start
//! plus width) of any accepted time are therefore `i64`s too. Every front end refuses a
//! row outside the range with an error for that row, and the engine checks again before a
//! write is logged.

use std::fmt;

/// Nanoseconds in a day.
pub const DAY_NANOS: i64 = 86_400_000_000_000;

/// The earliest time a row may have: 1678-01-01T00:00:00Z.
pub const MIN_TIME: i64 = -9_214_560_000_000_000_000;

/// The latest time a row may have: 2261-12-31T23:59:59.999999999Z.
pub const MAX_TIME: i64 = 9_214_646_400_000_000_000 - 1;

/// The widest time partition a table may have: seven days.
pub const MAX_PARTITION_NANOS: i64 = 7 * DAY_NANOS;

// The headroom that makes partition arithmetic on accepted times overflow-free.
const _: () = assert!(MIN_TIME - i64::MIN > MAX_PARTITION_NANOS);
const _: () = assert!(i64::MAX - MAX_TIME > MAX_PARTITION_NANOS);

/// Now, in nanoseconds since the Unix epoch (the wall clock every part of Kiln reads).
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// `time` as RFC 3339 in UTC (`2026-12-05T18:00:00Z`, with fractions of a second when
/// it has them), for messages.
pub fn rfc3339(time: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(time)
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A time outside [`MIN_TIME`]`..=`[`MAX_TIME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct OutOfRange {
    /// The refused time, in nanoseconds since the epoch.
    pub time: i64,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "time {} ns is outside the range Kiln stores \
             (1678-01-01T00:00:00Z to 2261-12-31T23:59:59.999999999Z)",
            self.time
        )
    }
}

/// `time` itself if Kiln stores it.
pub fn check(time: i64) -> Result<i64, OutOfRange> {
    if (MIN_TIME..=MAX_TIME).contains(&time) {
        Ok(time)
    } else {
        Err(OutOfRange { time })
    }
}

/// Start of the partition of width `width` (positive) that `time` falls in: `time` rounded
/// down to a multiple of `width`. Exact for accepted times and widths up to
/// [`MAX_PARTITION_NANOS`]; saturates (never panics) for anything else.
pub fn partition_start(time: i64, width: i64) -> i64 {
    let width = width.max(1);
    time.saturating_sub(time.rem_euclid(width))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_the_first_and_last_instants_of_the_accepted_years() {
        use chrono::{DateTime, Utc};
        let at = |nanos| DateTime::<Utc>::from_timestamp_nanos(nanos).to_rfc3339();
        assert_eq!(at(MIN_TIME), "1678-01-01T00:00:00+00:00");
        assert_eq!(at(MAX_TIME), "2261-12-31T23:59:59.999999999+00:00");
        assert_eq!(check(MIN_TIME), Ok(MIN_TIME));
        assert_eq!(check(MAX_TIME), Ok(MAX_TIME));
        assert!(check(MIN_TIME - 1).is_err());
        assert!(check(MAX_TIME + 1).is_err());
        assert!(check(i64::MIN).is_err());
        assert!(check(i64::MAX).is_err());
    }

    proptest::proptest! {
        #[test]
        fn partitions_of_accepted_times_are_exact(
            time in MIN_TIME..=MAX_TIME,
            width in 1..=MAX_PARTITION_NANOS,
        ) {
            let start = partition_start(time, width);
            proptest::prop_assert!(start <= time);
            proptest::prop_assert!(time - start < width);
            proptest::prop_assert_eq!(start.rem_euclid(width), 0);
            proptest::prop_assert!(start.checked_add(width).is_some());
        }

        #[test]
        fn partition_start_never_panics(time: i64, width: i64) {
            let start = partition_start(time, width);
            proptest::prop_assert!(start <= time);
        }
    }
}

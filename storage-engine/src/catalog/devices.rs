//! Device attributes and series staleness, as catalog events.
//!
//! A device is a tag value (`host=m1`) in a database: its attributes (location, model,
//! firmware, owner, anything) are set and removed by [`DeviceAttributesSet`] events and
//! joined with readings in SQL through `system.devices`. A table's staleness says when
//! its series count as `stale` and `offline` in `system.series`.
//!
//! [`DeviceAttributesSet`]: super::CatalogEvent::DeviceAttributesSet

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When a table's series are stale and offline: nothing newer than this long ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staleness {
    pub stale_after_nanos: i64,
    pub offline_after_nanos: i64,
}

impl Default for Staleness {
    /// Stale after 5 minutes of silence, offline after an hour.
    fn default() -> Self {
        Self {
            stale_after_nanos: 300_000_000_000,
            offline_after_nanos: 3_600_000_000_000,
        }
    }
}

impl Staleness {
    /// `online`, `stale` or `offline`, for a series whose latest row is at `last_seen`.
    pub fn status(self, last_seen: i64, now: i64) -> &'static str {
        let silent = now.saturating_sub(last_seen);
        if silent >= self.offline_after_nanos {
            "offline"
        } else if silent >= self.stale_after_nanos {
            "stale"
        } else {
            "online"
        }
    }
}

/// Attributes by database, tag, tag value, then attribute name.
pub type Devices = BTreeMap<String, BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>>;

/// Applies a change of one device's attributes (`None` removes one).
pub fn set_attributes(
    devices: &mut Devices,
    database: &str,
    tag: &str,
    value: &str,
    attributes: &BTreeMap<String, Option<String>>,
) {
    let by_value = devices
        .entry(database.to_owned())
        .or_default()
        .entry(tag.to_owned())
        .or_default();
    let attrs = by_value.entry(value.to_owned()).or_default();
    for (name, v) in attributes {
        match v {
            Some(v) => {
                attrs.insert(name.clone(), v.clone());
            }
            None => {
                attrs.remove(name);
            }
        }
    }
    if attrs.is_empty() {
        by_value.remove(value);
    }
}

//! `system.ingesters`: the ingesters that joined a cluster's catalog and have not left,
//! one row each: where queriers reach them, since when, and how far their WAL is
//! persisted. Shown to sessions that see every database (the cluster's layout is not a
//! database's).

use std::sync::Arc;

use arrow::array::{ArrayRef, StringBuilder, TimestampNanosecondBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field};
use kiln_storage::catalog::CatalogState;

use super::{text, ts};
use crate::Visible;

pub(super) fn schema() -> Vec<Field> {
    vec![
        text("name", false),
        text("address", false),
        ts("joined_at"),
        Field::new("persisted_sequence", DataType::UInt64, true),
    ]
}

pub(super) fn rows(state: &CatalogState, visible: &Visible) -> Vec<ArrayRef> {
    let (mut name, mut address) = (StringBuilder::new(), StringBuilder::new());
    let mut joined = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut persisted = UInt64Builder::new();
    if visible.is_all() {
        for (n, ingester) in &state.ingesters {
            name.append_value(n);
            address.append_value(&ingester.address);
            joined.append_option(Some(ingester.joined_at).filter(|t| *t > 0));
            persisted.append_option(state.writers_persisted.get(n).map(|s| s.0));
        }
    }
    vec![
        Arc::new(name.finish()),
        Arc::new(address.finish()),
        Arc::new(joined.finish()),
        Arc::new(persisted.finish()),
    ]
}

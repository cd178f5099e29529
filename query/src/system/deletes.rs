//! `system.deletes`: deletes of rows not yet made physical (tombstones), one row each,
//! with how many segments compaction has left to rewrite for it.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringBuilder, TimestampNanosecondBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field};
use kiln_storage::catalog::CatalogState;

use super::{text, ts};
use crate::Visible;

pub(super) fn schema() -> Vec<Field> {
    vec![
        Field::new("id", DataType::UInt64, false),
        text("database", false),
        text("table_name", false),
        text("predicate", false),
        ts("created_at"),
        Field::new("segments_pending", DataType::UInt64, false),
    ]
}

pub(super) fn rows(state: &CatalogState, visible: &Visible) -> Vec<ArrayRef> {
    let mut id = UInt64Builder::new();
    let (mut database, mut table, mut predicate) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let mut created = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut pending = UInt64Builder::new();
    for t in state.tombstones.values() {
        let Some(def) = state.table_by_id(t.table) else {
            continue;
        };
        let Some(db) = state.database_by_id(def.database) else {
            continue;
        };
        if !visible.allows(&db.name) {
            continue;
        }
        id.append_value(t.id.get());
        database.append_value(&db.name);
        table.append_value(&def.name);
        predicate.append_value(t.predicate.to_string());
        created.append_value(t.created_at);
        let left = state
            .segments(t.table)
            .iter()
            .filter(|s| t.applies_to_segment(s.id, s.min_time, s.max_time))
            .count();
        pending.append_value(left as u64);
    }
    vec![
        Arc::new(id.finish()),
        Arc::new(database.finish()),
        Arc::new(table.finish()),
        Arc::new(predicate.finish()),
        Arc::new(created.finish()),
        Arc::new(pending.finish()),
    ]
}

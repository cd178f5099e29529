//! `system.views`: materialized views, one row each, with what they have still to
//! refresh.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, StringBuilder, TimestampNanosecondBuilder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field};
use kiln_storage::catalog::CatalogState;

use super::{secs, text, ts};
use crate::Visible;

pub(super) fn schema() -> Vec<Field> {
    vec![
        text("database", false),
        text("view_name", false),
        text("source", true),
        text("query", false),
        Field::new("bucket_s", DataType::Float64, false),
        Field::new("lag_s", DataType::Float64, false),
        Field::new("realtime", DataType::Boolean, false),
        ts("watermark"),
        ts("refreshed_at"),
        Field::new("pending_buckets", DataType::UInt64, false),
    ]
}

pub(super) fn rows(state: &CatalogState, visible: &Visible) -> Vec<ArrayRef> {
    let mut texts: Vec<StringBuilder> = (0..4).map(|_| StringBuilder::new()).collect();
    let (mut bucket, mut lag) = (Float64Builder::new(), Float64Builder::new());
    let mut realtime = BooleanBuilder::new();
    let mut watermark = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut refreshed = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut pending = UInt64Builder::new();
    for view in state.views.values() {
        let Some(def) = state.table_by_id(view.def.table) else {
            continue;
        };
        let Some(db) = state.database_by_id(def.database) else {
            continue;
        };
        if !visible.allows(&db.name) {
            continue;
        }
        texts[0].append_value(&db.name);
        texts[1].append_value(&def.name);
        texts[2].append_option(state.table_by_id(view.def.source).map(|s| &s.name));
        texts[3].append_value(&view.def.query);
        bucket.append_value(secs(view.def.bucket_nanos));
        lag.append_value(secs(view.def.lag_nanos));
        realtime.append_value(view.def.realtime);
        watermark.append_option(view.watermark);
        refreshed.append_option(view.refreshed_at);
        let buckets: i64 = view
            .invalid_spans()
            .iter()
            .map(|(start, end, _)| (end - start) / view.def.bucket_nanos)
            .sum();
        pending.append_value(buckets as u64);
    }
    let mut columns: Vec<ArrayRef> = texts
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    columns.extend([
        Arc::new(bucket.finish()) as ArrayRef,
        Arc::new(lag.finish()),
        Arc::new(realtime.finish()),
        Arc::new(watermark.finish()),
        Arc::new(refreshed.finish()),
        Arc::new(pending.finish()),
    ]);
    columns
}

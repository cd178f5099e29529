//! `system.series`, `system.devices` and `system.data_quality`: device health from the
//! engine's series inventory (`kiln_storage::series`) and the catalog's device attributes.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, StringBuilder, TimestampNanosecondBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use kiln_storage::Engine;
use kiln_storage::catalog::CatalogState;
use kiln_storage::catalog::alerts::series_key;

use super::{text, ts};
use crate::Visible;

fn count(name: &str) -> Field {
    Field::new(name, DataType::UInt64, false)
}

/// The first columns of `system.devices`; attribute columns follow, sorted by name.
const DEVICE_KEY: [&str; 3] = ["database", "tag", "value"];

pub(super) fn schema(name: &str, state: &CatalogState, visible: &Visible) -> SchemaRef {
    let fields = match name {
        "series" => vec![
            text("database", false),
            text("table_name", false),
            text("series", false),
            ts("first_seen"),
            ts("last_seen"),
            count("rows_last_minute"),
            count("rows_last_hour"),
            text("status", false),
        ],
        "data_quality" => vec![
            text("database", false),
            text("table_name", false),
            count("rows"),
            count("rejected_lines"),
            count("late_rows"),
            count("out_of_order_rows"),
        ],
        _ => {
            let attributes: BTreeSet<&String> = state
                .devices
                .iter()
                .filter(|(db, _)| visible.allows(db))
                .flat_map(|(_, tags)| tags.values())
                .flat_map(|values| values.values())
                .flat_map(|attrs| attrs.keys())
                .filter(|a| !DEVICE_KEY.contains(&a.as_str()))
                .collect();
            DEVICE_KEY
                .iter()
                .map(|k| text(k, false))
                .chain(attributes.into_iter().map(|a| text(a, true)))
                .collect()
        }
    };
    Arc::new(Schema::new(fields))
}

/// The database and table names of table `id`, if `visible` shows its database.
fn names<'a>(
    state: &'a CatalogState,
    visible: &Visible,
    id: kiln_storage::ids::TableId,
) -> Option<(&'a str, &'a str)> {
    let table = state.table_by_id(id)?;
    let db = state.databases.values().find(|d| d.id == table.database)?;
    visible
        .allows(&db.name)
        .then_some((db.name.as_str(), table.name.as_str()))
}

pub(super) fn series(engine: &Engine, state: &CatalogState, visible: &Visible) -> Vec<ArrayRef> {
    let now = engine.series().now();
    let mut rows: Vec<_> = engine
        .series()
        .series()
        .into_iter()
        .filter_map(|s| names(state, visible, s.table).map(|(db, t)| (db, t, s)))
        .collect();
    rows.sort_by(|a, b| (a.0, a.1, &a.2.tags).cmp(&(b.0, b.1, &b.2.tags)));
    let (mut db, mut table, mut key, mut status) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let mut first = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut last = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let (mut minute, mut hour) = (UInt64Builder::new(), UInt64Builder::new());
    for (d, t, s) in rows {
        db.append_value(d);
        table.append_value(t);
        key.append_value(series_key(&s.tags));
        first.append_value(s.first_seen);
        last.append_value(s.last_seen);
        let (m, h) = s.recent_rows(now);
        minute.append_value(m);
        hour.append_value(h);
        let staleness = state.staleness.get(&s.table).copied().unwrap_or_default();
        status.append_value(staleness.status(s.last_seen, now));
    }
    vec![
        Arc::new(db.finish()),
        Arc::new(table.finish()),
        Arc::new(key.finish()),
        Arc::new(first.finish()),
        Arc::new(last.finish()),
        Arc::new(minute.finish()),
        Arc::new(hour.finish()),
        Arc::new(status.finish()),
    ]
}

pub(super) fn quality(engine: &Engine, state: &CatalogState, visible: &Visible) -> Vec<ArrayRef> {
    let mut rows: Vec<_> = engine
        .series()
        .quality()
        .into_iter()
        .filter_map(|(id, q)| names(state, visible, id).map(|(db, t)| (db, t, q)))
        .collect();
    rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let (mut db, mut table) = (StringBuilder::new(), StringBuilder::new());
    let mut counts: Vec<UInt64Builder> = (0..4).map(|_| UInt64Builder::new()).collect();
    for (d, t, q) in rows {
        db.append_value(d);
        table.append_value(t);
        for (b, v) in
            counts
                .iter_mut()
                .zip([q.rows, q.rejected_lines, q.late_rows, q.out_of_order_rows])
        {
            b.append_value(v);
        }
    }
    let mut out: Vec<ArrayRef> = vec![Arc::new(db.finish()), Arc::new(table.finish())];
    out.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    out
}

/// The rows of `system.devices` in the columns of `schema` (which the planner saw).
pub(super) fn devices(
    state: &CatalogState,
    visible: &Visible,
    schema: &SchemaRef,
) -> Vec<ArrayRef> {
    let mut builders: Vec<StringBuilder> = schema
        .fields()
        .iter()
        .map(|_| StringBuilder::new())
        .collect();
    for (db, tags) in state.devices.iter().filter(|(db, _)| visible.allows(db)) {
        for (tag, values) in tags {
            for (value, attrs) in values {
                for (field, b) in schema.fields().iter().zip(&mut builders) {
                    match field.name().as_str() {
                        "database" => b.append_value(db),
                        "tag" => b.append_value(tag),
                        "value" => b.append_value(value),
                        name => b.append_option(attrs.get(name)),
                    }
                }
            }
        }
    }
    builders
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect()
}

//! Continuous aggregates (materialized views): a table of its own whose rows are a
//! `GROUP BY time_bucket(…), tags` over a source table, kept up to date from the catalog's
//! events.
//!
//! * [`ViewCreated`] records the definition (the view's table is created by the same
//!   transaction) and invalidates the buckets the source held then.
//! * **Invalidations** are derived from the log, so a replay rebuilds them exactly: every
//!   segment of the source that *persistence* records ([`SegmentPersisted`]) invalidates
//!   the buckets its time range spans, and every delete of the source's rows
//!   ([`RowsDeleted`]) the buckets its time range spans (marked: groups may vanish there).
//!   Compaction and retention change no bucket's rows and invalidate nothing.
//! * A refresh takes every invalidation below an id, recomputes the buckets they span up to
//!   `now − lag` from the source, writes them to the view's table (last write wins per
//!   bucket and group), then commits [`ViewRefreshed`], which removes the invalidations
//!   taken and keeps what lay past `now − lag`. A crash before that commit leaves the
//!   invalidations in place: the next refresh recomputes the same buckets and overwrites
//!   the same rows, so nothing is lost or counted twice.
//!
//! [`ViewCreated`]: super::CatalogEvent::ViewCreated
//! [`ViewRefreshed`]: super::CatalogEvent::ViewRefreshed
//! [`SegmentPersisted`]: super::CatalogEvent::SegmentPersisted
//! [`RowsDeleted`]: super::CatalogEvent::RowsDeleted

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Catalog, CatalogEvent, CatalogState, ColumnType, Error, Result, SchemaChange, TableDef,
    run_to_completion,
};
use crate::ids::TableId;

/// What a view is: its table, its source and how its rows are computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewDef {
    /// The view's own table (its rows).
    pub table: TableId,
    /// The table it aggregates.
    pub source: TableId,
    /// The defining `SELECT`, as given.
    pub query: String,
    /// Width of its time buckets (nanoseconds).
    pub bucket_nanos: i64,
    /// A bucket boundary (nanoseconds since the epoch): buckets are
    /// `origin + k × width`.
    pub origin_nanos: i64,
    /// Buckets ending after `now − lag` are not materialized yet.
    pub lag_nanos: i64,
    /// Whether a query of the view adds the source's rows not yet materialized.
    pub realtime: bool,
    pub created_at: i64,
}

impl ViewDef {
    /// The start of the bucket holding `time`.
    pub fn bucket_start(&self, time: i64) -> i64 {
        let offset =
            (time as i128 - self.origin_nanos as i128).rem_euclid(self.bucket_nanos as i128);
        (time as i128 - offset).clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// The end (exclusive) of the bucket holding `time`.
    pub fn bucket_end(&self, time: i64) -> i64 {
        self.bucket_start(time).saturating_add(self.bucket_nanos)
    }

    /// The buckets rows at times `min..=max` fall in, as `[start, end)`.
    pub fn buckets_of(&self, min: i64, max: i64) -> (i64, i64) {
        (self.bucket_start(min), self.bucket_end(max))
    }

    /// Buckets before it are complete at `now`: they ended at or before `now − lag`.
    pub fn horizon(&self, now: i64) -> i64 {
        self.bucket_start(now.saturating_sub(self.lag_nanos))
    }

    /// The first bucket wholly at or after `time` (a retention cutoff).
    pub fn first_whole_bucket(&self, time: i64) -> i64 {
        match self.bucket_start(time) {
            start if start == time => time,
            _ => self.bucket_end(time),
        }
    }
}

/// Buckets `[start, end)` whose rows changed since they were last materialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    pub id: u64,
    pub start: i64,
    pub end: i64,
    /// Rows were deleted there: groups may have vanished from these buckets.
    pub deleted: bool,
}

/// A view with what it has still to materialize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub def: ViewDef,
    /// Oldest first (by id).
    pub invalid: Vec<Invalidation>,
    pub next_invalidation: u64,
    /// Every bucket before it had been materialized, with every row persisted by then
    /// and every row buffered then, at the last refresh (absent: never refreshed). A
    /// real-time query computes the buckets from it on.
    pub watermark: Option<i64>,
    /// The buckets ever materialized span `[start, end)`.
    pub extent: Option<(i64, i64)>,
    pub refreshed_at: Option<i64>,
}

/// A span of buckets a refresh did not materialize (it lay past `now − lag`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub start: i64,
    pub end: i64,
    pub deleted: bool,
}

/// What one refresh did, recorded by [`ViewRefreshed`](super::CatalogEvent::ViewRefreshed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    pub view: TableId,
    /// Invalidations with an id below it were taken.
    pub through: u64,
    /// Parts of them it left for later.
    pub pending: Vec<Pending>,
    /// Buckets before it are materialized (see [`View::watermark`]).
    pub watermark: i64,
    /// The buckets it recomputed span `[start, end)` (absent: none).
    pub done: Option<(i64, i64)>,
    pub at: i64,
}

impl View {
    /// Its invalidations as disjoint spans `[start, end)` in order, each marked if rows
    /// were deleted anywhere in it.
    pub fn invalid_spans(&self) -> Vec<(i64, i64, bool)> {
        let mut spans: Vec<(i64, i64, bool)> = self
            .invalid
            .iter()
            .map(|i| (i.start, i.end, i.deleted))
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(i64, i64, bool)> = Vec::new();
        for (start, end, deleted) in spans {
            match merged.last_mut() {
                Some(last) if start <= last.1 => {
                    last.1 = last.1.max(end);
                    last.2 |= deleted;
                }
                _ => merged.push((start, end, deleted)),
            }
        }
        merged
    }

    fn invalidate(&mut self, start: i64, end: i64, deleted: bool) {
        if start >= end {
            return;
        }
        self.invalid.push(Invalidation {
            id: self.next_invalidation,
            start,
            end,
            deleted,
        });
        self.next_invalidation += 1;
    }
}

impl CatalogState {
    /// The view whose rows table `table` holds.
    pub fn view(&self, table: TableId) -> Option<&View> {
        self.views.get(&table)
    }

    /// Views over `source`.
    fn views_of(&mut self, source: TableId) -> impl Iterator<Item = &mut View> {
        self.views
            .values_mut()
            .filter(move |v| v.def.source == source)
    }

    pub(super) fn create_view(&mut self, def: &ViewDef, initial: Option<(i64, i64)>) -> Result<()> {
        for id in [def.table, def.source] {
            if !self.tables.contains_key(&id) {
                return Err(Error::UnknownTable(id));
            }
        }
        if def.bucket_nanos <= 0 {
            return Err(Error::InvalidView(
                "a view's time buckets must be wider than zero".into(),
            ));
        }
        let mut view = View {
            def: def.clone(),
            invalid: Vec::new(),
            next_invalidation: 0,
            watermark: None,
            extent: None,
            refreshed_at: None,
        };
        if let Some((min, max)) = initial {
            let (start, end) = def.buckets_of(min, max);
            view.invalidate(start, end, false);
        }
        self.views.insert(def.table, view);
        Ok(())
    }

    /// Persistence wrote rows of `table` at times `min..=max`.
    pub(super) fn invalidate_persisted(&mut self, table: TableId, min: i64, max: i64) {
        for view in self.views_of(table) {
            let (start, end) = view.def.buckets_of(min, max);
            view.invalidate(start, end, false);
        }
    }

    /// Rows of `table` at times `min..=max` were deleted.
    pub(super) fn invalidate_deleted(&mut self, table: TableId, min: i64, max: i64) {
        // An open-ended delete reaches only as far as rows were ever persisted or
        // materialized (rows only buffered are invalidated when they are persisted).
        let held = self.segments_span(table);
        for view in self.views_of(table) {
            let mut span = held;
            if let Some((a, b)) = view.extent {
                span = Some(span.map_or((a, b - 1), |(x, y)| (x.min(a), y.max(b - 1))));
            }
            let Some((lo, hi)) = span else { continue };
            let (min, max) = (min.max(lo), max.min(hi));
            if min <= max {
                let (start, end) = view.def.buckets_of(min, max);
                view.invalidate(start, end, true);
            }
        }
    }

    pub(super) fn record_refresh(&mut self, refresh: &Refresh) -> Result<()> {
        let view = self
            .views
            .get_mut(&refresh.view)
            .ok_or(Error::UnknownTable(refresh.view))?;
        view.invalid.retain(|i| i.id >= refresh.through);
        for p in &refresh.pending {
            view.invalidate(p.start, p.end, p.deleted);
        }
        view.watermark = Some(refresh.watermark);
        if let Some((a, b)) = refresh.done {
            view.extent = Some(view.extent.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        }
        view.refreshed_at = Some(refresh.at);
        Ok(())
    }
}

/// A view to create: its table's columns besides `time`, and its definition (whose
/// `table` the catalog assigns).
#[derive(Debug, Clone)]
pub struct NewView {
    pub database: String,
    pub name: String,
    /// In order: the group's tags, then the aggregates' fields.
    pub columns: Vec<(String, ColumnType)>,
    pub def: ViewDef,
    /// The source's rows span these times now (absent: it holds none).
    pub initial: Option<(i64, i64)>,
    /// The view table's retention (absent: its database's).
    pub retention_nanos: Option<i64>,
}

impl Catalog {
    /// Creates a view with its table in one transaction; refuses a name in use.
    pub async fn create_view(self: &Arc<Self>, new: NewView) -> Result<(TableDef, View)> {
        let this = Arc::clone(self);
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (state, ()) = this
                .commit_locked(|state| {
                    if state.table(&new.database, &new.name).is_some() {
                        return Err(Error::InvalidView(format!(
                            "a table named {:?} exists already in database {:?}",
                            new.name, new.database
                        )));
                    }
                    let changes: Vec<SchemaChange> = new
                        .columns
                        .iter()
                        .map(|(column, ty)| SchemaChange {
                            table: new.name.clone(),
                            column: column.clone(),
                            ty: *ty,
                        })
                        .collect();
                    let mut events = this.schema_events(state, &new.database, &changes)?;
                    let table = events
                        .iter()
                        .find_map(|e| match e {
                            CatalogEvent::TableCreated { id, name, .. } if *name == new.name => {
                                Some(*id)
                            }
                            _ => None,
                        })
                        .ok_or_else(|| {
                            Error::InvalidView("the view's table was not created".into())
                        })?;
                    events.push(CatalogEvent::ViewCreated {
                        def: ViewDef {
                            table,
                            ..new.def.clone()
                        },
                        initial: new.initial,
                    });
                    if new.retention_nanos.is_some() {
                        let database = state
                            .database(&new.database)
                            .map(|d| d.id)
                            .ok_or_else(|| Error::DatabaseNotFound(new.database.clone()))?;
                        events.push(CatalogEvent::RetentionSet {
                            database,
                            table: Some(table),
                            retention_nanos: new.retention_nanos,
                        });
                    }
                    Ok((events, ()))
                })
                .await?;
            let def = state
                .table(&new.database, &new.name)
                .cloned()
                .ok_or_else(|| Error::InvalidView("the view's table was not created".into()))?;
            let view = state
                .view(def.id)
                .cloned()
                .ok_or(Error::UnknownTable(def.id))?;
            Ok((def, view))
        })
        .await
    }

    /// Records a refresh of a view.
    pub async fn record_refresh(self: &Arc<Self>, refresh: Refresh) -> Result<Arc<CatalogState>> {
        self.commit(vec![CatalogEvent::ViewRefreshed(refresh)])
            .await
    }
}

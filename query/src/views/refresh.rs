//! Refreshing a view: recompute the buckets its invalidations name, write them to its
//! table, record the refresh (see [`kiln_storage::catalog::views`] for why this order
//! loses and double-counts nothing across a crash).

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::{Expr, Filter, LogicalPlan, lit};
use datafusion::prelude::DataFrame;
use futures::TryStreamExt;
use kiln_storage::catalog::views::{Pending, Refresh, View};
use kiln_storage::catalog::{CatalogState, TIME_COLUMN, TableDef};
use kiln_storage::ids::TableId;
use kiln_storage::write::{TableWrite, WriteBatch};

use crate::provider::utc_nanos;
use crate::{Error, QueryEngine};

/// What a refresh did.
#[derive(Debug, Clone, Default)]
pub struct RefreshOutcome {
    /// Rows written to the view.
    pub rows: u64,
    /// Buckets recomputed.
    pub buckets: u64,
}

/// Rows of the view written to the WAL at once.
const WRITE_ROWS: usize = 50_000;

impl QueryEngine {
    /// Refreshes the view `name` of `database` now.
    pub async fn refresh_view_named(
        &self,
        database: &str,
        name: &str,
    ) -> Result<RefreshOutcome, Error> {
        let state = self.engine.catalog_state();
        let not_found = || {
            Error::TableNotFound(format!(
                "materialized view {name:?} not found in database {database:?}"
            ))
        };
        let table = state.table(database, name).ok_or_else(not_found)?;
        let view = state.view(table.id).ok_or_else(not_found)?;
        if state.table_by_id(view.def.source).is_none() {
            return Err(Error::Invalid(format!(
                "the source table of view {name:?} was deleted: the view keeps its rows and \
                 is refreshed no more"
            )));
        }
        // Everything written before the statement is then in segments the catalog
        // names, and so in the view once its buckets are complete.
        self.engine
            .persist()
            .await
            .map_err(|e| Error::Internal(Box::new(e)))?;
        self.refresh_view(table.id, kiln_storage::now_nanos()).await
    }

    /// Recomputes the buckets of view `view` invalidated and complete at `now` (those
    /// ending at or before `now − lag`, within its source's retention).
    #[tracing::instrument(name = "refresh view", level = "debug", skip(self, now))]
    pub async fn refresh_view(&self, view: TableId, now: i64) -> Result<RefreshOutcome, Error> {
        let _guard = self.refreshing.lock().await;
        // Before the catalog is read: a row persisted in between is in its segments.
        let buffered = self
            .engine
            .catalog_state()
            .view(view)
            .and_then(|v| self.engine.buffered_time_range(v.def.source).map(|r| r.0));
        let state = self.engine.catalog_state();
        let (Some(v), Some(table), Some(source)) = (
            state.view(view).cloned(),
            state.table_by_id(view).cloned(),
            state
                .view(view)
                .and_then(|v| state.table_by_id(v.def.source)),
        ) else {
            // Dropped meanwhile, or its source was.
            return Ok(RefreshOutcome::default());
        };
        let Some(database) = state.database_by_id(table.database).map(|d| d.name.clone()) else {
            return Ok(RefreshOutcome::default());
        };
        let work = Work::plan(&v, &state, now, buffered);
        let mut outcome = RefreshOutcome::default();
        let chunk = chunk_nanos(
            v.def.bucket_nanos,
            source.partition_nanos,
            state.segments(source.id),
        );
        let spans = work.todo.len();
        let schema = match spans {
            0 => None,
            _ => Some(self.written_schema(&database, &v, &table).await?),
        };
        for (n, &(start, end, deleted)) in work.todo.iter().enumerate() {
            let mut from = start;
            while from < end {
                let to = from.saturating_add(chunk).min(end);
                if spans > 1 || end - start > chunk {
                    tracing::info!(
                        view = %table.name,
                        span = n + 1,
                        of = spans,
                        from = %kiln_storage::time::rfc3339(from),
                        to = %kiln_storage::time::rfc3339(to),
                        "refreshing materialized view"
                    );
                }
                if deleted {
                    self.clear(&database, &table, from, to).await?;
                }
                let schema = schema.as_ref().expect("read when there is work");
                outcome.rows += self
                    .recompute(&database, &v, &table, schema, (from, to))
                    .await?;
                outcome.buckets += ((to - from) / v.def.bucket_nanos) as u64;
                from = to;
            }
        }
        self.engine
            .catalog()
            .record_refresh(Refresh {
                view,
                through: v.next_invalidation,
                pending: work.pending,
                watermark: work.watermark,
                done: work.done,
                at: now,
            })
            .await
            .map_err(|e| Error::Internal(Box::new(e)))?;
        Ok(outcome)
    }

    /// Deletes the view's rows in `[from, to)`: groups may have vanished there (before the
    /// recomputed rows are written, so they are not deleted). A span holding no rows
    /// records nothing (as any `DELETE`).
    async fn clear(
        &self,
        database: &str,
        table: &TableDef,
        from: i64,
        to: i64,
    ) -> Result<(), Error> {
        let sql = format!(
            "DELETE FROM {} WHERE time >= '{}' AND time < '{}'",
            crate::quote_ident(&table.name),
            kiln_storage::time::rfc3339(from),
            kiln_storage::time::rfc3339(to),
        );
        self.delete(database, &sql).await.map(|_| ())
    }

    /// The view's columns in the order its query gives them, typed as its table holds
    /// them (its query is planned again: a refresh fails if it no longer fits).
    async fn written_schema(
        &self,
        database: &str,
        v: &View,
        table: &TableDef,
    ) -> Result<SchemaRef, Error> {
        let definition = self.define(database, &v.def.query).await?;
        let fields = definition
            .columns
            .iter()
            .map(|(name, _)| {
                let ty = table
                    .column(name)
                    .map(|c| c.ty.arrow_type())
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "view {:?} has no column {name:?}: its query no longer gives the \
                         columns it was created with",
                            table.name
                        ))
                    })?;
                Ok(Field::new(name, ty, name != TIME_COLUMN))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Arc::new(Schema::new(fields)))
    }

    /// Computes the view's buckets in `[from, to)` from its source and writes them as
    /// `schema` (see [`Self::written_schema`]) says.
    async fn recompute(
        &self,
        database: &str,
        v: &View,
        table: &TableDef,
        schema: &SchemaRef,
        (from, to): (i64, i64),
    ) -> Result<u64, Error> {
        let session = self.session(database);
        let state = session.state();
        let plan = state.create_logical_plan(&v.def.query).await?;
        let plan = within(plan, from, to)?;
        let batches: Vec<RecordBatch> = self
            .execute(DataFrame::new(state, plan))
            .await?
            .try_collect()
            .await?;
        let mut converted = Vec::with_capacity(batches.len());
        for batch in &batches {
            if batch.num_rows() == 0 {
                continue;
            }
            if batch.num_columns() != schema.fields().len() {
                return Err(Error::Invalid(format!(
                    "view {:?}: its query gives {} columns, the view has {}",
                    table.name,
                    batch.num_columns(),
                    schema.fields().len()
                )));
            }
            let arrays: Vec<ArrayRef> = batch
                .columns()
                .iter()
                .zip(schema.fields())
                .map(|(array, field)| cast(array, field.data_type()))
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Internal(Box::new(e)))?;
            converted.push(
                RecordBatch::try_new(Arc::clone(schema), arrays)
                    .map_err(|e| Error::Internal(Box::new(e)))?,
            );
        }
        let all = concat_batches(schema, &converted).map_err(|e| Error::Internal(Box::new(e)))?;
        // Up to WRITE_ROWS rows per WAL record.
        for at in (0..all.num_rows()).step_by(WRITE_ROWS) {
            let len = WRITE_ROWS.min(all.num_rows() - at);
            self.write_view_rows(table, all.slice(at, len)).await?;
        }
        Ok(all.num_rows() as u64)
    }

    /// Writes rows to a view's table, waiting while the write buffer is full.
    async fn write_view_rows(&self, table: &TableDef, batch: RecordBatch) -> Result<(), Error> {
        let mut waited = Duration::ZERO;
        loop {
            let write = WriteBatch {
                database: table.database,
                tables: vec![TableWrite {
                    table: table.id,
                    batch: batch.clone(),
                }],
                sources: Vec::new(),
            };
            match self.engine.write(write).await {
                Ok(_) => return Ok(()),
                Err(kiln_storage::engine::Error::BufferFull { .. })
                    if waited < Duration::from_secs(120) =>
                {
                    let pause = Duration::from_millis(200);
                    tokio::time::sleep(pause).await;
                    waited += pause;
                }
                Err(e) => return Err(Error::Internal(Box::new(e))),
            }
        }
    }
}

/// What a refresh at `now` does of a view's invalidations.
struct Work {
    /// Spans `[start, end)` to recompute (`true`: rows were deleted there), in order.
    todo: Vec<(i64, i64, bool)>,
    /// What lay past the horizon.
    pending: Vec<Pending>,
    /// Buckets before it are materialized once this refresh is done.
    watermark: i64,
    /// The span of `todo`.
    done: Option<(i64, i64)>,
}

impl Work {
    fn plan(v: &View, state: &CatalogState, now: i64, buffered: Option<i64>) -> Self {
        let def = &v.def;
        let horizon = def.horizon(now);
        // Rows not yet persisted are in no invalidation yet: the view is complete only
        // before the bucket of the oldest of them.
        let watermark = buffered.map_or(horizon, |t| horizon.min(def.bucket_start(t)));
        // Buckets partly past the source's retention cannot be recomputed whole; those
        // past the view's own would be written only to expire.
        let source_floor = state
            .retention_cutoff(def.source, now)
            .map(|cutoff| def.first_whole_bucket(cutoff));
        let view_floor = state
            .retention_cutoff(def.table, now)
            .map(|cutoff| def.bucket_start(cutoff));
        let floor = source_floor.into_iter().chain(view_floor).max();
        let (mut todo, mut pending) = (Vec::new(), Vec::new());
        for (start, end, deleted) in v.invalid_spans() {
            let lo = floor.map_or(start, |f| start.max(f));
            let hi = end.min(horizon);
            if lo < hi {
                todo.push((lo, hi, deleted));
            }
            if end > horizon {
                pending.push(Pending {
                    start: start.max(horizon),
                    end,
                    deleted,
                });
            }
        }
        let done = match (todo.first(), todo.last()) {
            (Some(first), Some(last)) => Some((first.0, last.1)),
            _ => None,
        };
        Self {
            todo,
            pending,
            watermark,
            done,
        }
    }
}

/// Source rows one query of a refresh reads, about: what it holds is bounded by them.
const CHUNK_ROWS: f64 = 2_000_000.0;

/// How much time one query of a refresh covers: a day of buckets, fewer where the
/// source's fullest time partition holds more than [`CHUNK_ROWS`] a day (at least one
/// bucket).
fn chunk_nanos(
    bucket: i64,
    partition_nanos: i64,
    segments: &[kiln_storage::catalog::SegmentMeta],
) -> i64 {
    const DAY: i64 = 86_400_000_000_000;
    let mut per_partition: std::collections::HashMap<i64, u64> = Default::default();
    for s in segments {
        *per_partition.entry(s.partition).or_default() += s.rows;
    }
    let fullest = per_partition.values().copied().max().unwrap_or(0);
    let per_day = fullest as f64 * DAY as f64 / partition_nanos.max(1) as f64;
    let day = if per_day > CHUNK_ROWS {
        (DAY as f64 * CHUNK_ROWS / per_day) as i64
    } else {
        DAY
    };
    (day / bucket).max(1) * bucket
}

#[cfg(test)]
#[test]
fn a_refresh_query_reads_about_two_million_rows_at_most() {
    use kiln_storage::catalog::SegmentMeta;
    use kiln_storage::ids::{SegmentId, SequenceNumber, TableId};
    const HOUR: i64 = 3_600_000_000_000;
    const MINUTE: i64 = 60_000_000_000;
    let segment = |partition: i64, rows: u64| SegmentMeta {
        id: SegmentId(0),
        table: TableId(0),
        partition,
        path: String::new(),
        min_time: partition,
        max_time: partition + HOUR - 1,
        rows,
        bytes: 0,
        max_sequence: SequenceNumber(0),
    };
    // 100 hosts every 10 s: 36,000 rows an hour, 864,000 a day: a day at once.
    assert_eq!(chunk_nanos(MINUTE, HOUR, &[segment(0, 36_000)]), 24 * HOUR);
    // 4,000 hosts: 1.44 M an hour (two segments of one partition): 83 minutes.
    let big = [segment(0, 720_000), segment(0, 720_000), segment(HOUR, 10)];
    assert_eq!(chunk_nanos(MINUTE, HOUR, &big), 83 * MINUTE);
    // Never less than a bucket.
    assert_eq!(chunk_nanos(24 * HOUR, HOUR, &big), 24 * HOUR);
}

/// `plan` reading only its source's rows in `[from, to)`.
pub(super) fn within(plan: LogicalPlan, from: i64, to: i64) -> Result<LogicalPlan, Error> {
    let at = |t: i64| lit(utc_nanos(t));
    Ok(plan
        .transform_up(|node| match node {
            LogicalPlan::TableScan(scan) => {
                let time = Expr::Column(Column::new(Some(scan.table_name.clone()), TIME_COLUMN));
                let range = time.clone().gt_eq(at(from)).and(time.lt(at(to)));
                let scan = Arc::new(LogicalPlan::TableScan(scan));
                Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                    range, scan,
                )?)))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data)
}

/// Refreshes every view whose invalidations hold complete buckets, every `interval`,
/// until `shutdown` resolves.
pub async fn run_refresher(
    query: QueryEngine,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let now = kiln_storage::now_nanos();
        let state = query.engine.catalog_state();
        let due: Vec<TableId> = state
            .views
            .values()
            .filter(|v| state.table_by_id(v.def.source).is_some())
            .filter(|v| v.invalid.iter().any(|i| i.start < v.def.horizon(now)))
            .map(|v| v.def.table)
            .collect();
        for view in due {
            let refresh = query.refresh_view(view, now);
            tokio::select! {
                _ = &mut shutdown => return,
                result = refresh => if let Err(e) = result {
                    tracing::warn!(
                        view = %view,
                        error = %kiln_storage::error_chain(&e),
                        "refreshing a materialized view failed; it is tried again"
                    );
                }
            }
        }
    }
}

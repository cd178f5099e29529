//! Real-time views: a query of a view created `WITH (realtime = true)` reads its
//! materialized buckets before the watermark (see
//! [`View::watermark`](kiln_storage::catalog::views::View::watermark)) and, from the
//! watermark on, the view's query run over its source when the query runs, as
//! TimescaleDB's real-time aggregates do. The watermark a query uses is moved back to the
//! oldest bucket whose materialized rows may be stale (rows buffered, persisted or
//! deleted since the last refresh), so a real-time view always equals its query over the
//! source (within the source's retention).

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, col, lit};
use datafusion::physical_expr::expressions::{CastExpr, Column};
use datafusion::physical_expr::projection::ProjectionExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::prelude::SessionConfig;
use kiln_storage::Engine;
use kiln_storage::catalog::TIME_COLUMN;
use kiln_storage::ids::TableId;

use crate::provider::{KilnTable, project, utc_nanos};

/// A real-time view's table: its materialized rows, and its newest buckets computed.
#[derive(Debug)]
pub struct RealtimeView {
    engine: Arc<Engine>,
    materialized: KilnTable,
    view: TableId,
}

impl RealtimeView {
    pub fn new(engine: Arc<Engine>, materialized: KilnTable) -> Self {
        Self {
            view: materialized.table_id(),
            engine,
            materialized,
        }
    }

    /// The view's query over its source from `watermark` on, its columns those of
    /// `schema` (the view's, projected).
    async fn computed(
        &self,
        state: &dyn Session,
        query: &str,
        watermark: Option<i64>,
        schema: &SchemaRef,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let session = state
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| DataFusionError::Internal("a real-time view needs a session".into()))?;
        // Buckets in UTC, as the refresh computes them, whatever zone the query is in.
        let mut session = session.clone();
        session.config_mut().options_mut().execution.time_zone =
            SessionConfig::new().options().execution.time_zone.clone();
        let plan = session.create_logical_plan(query).await?;
        let plan = match watermark {
            Some(w) => super::refresh::within(plan, w, i64::MAX)
                .map_err(|e| DataFusionError::External(Box::new(e)))?,
            None => plan,
        };
        let input = session.create_physical_plan(&plan).await?;
        let input_schema = input.schema();
        let names: Vec<String> = input_schema
            .fields()
            .iter()
            .map(|f| super::define::column_name(f.name()))
            .collect();
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                let i = names.iter().position(|n| n == f.name()).ok_or_else(|| {
                    DataFusionError::Plan(format!(
                        "the view's query no longer gives its column {:?}",
                        f.name()
                    ))
                })?;
                let column = Arc::new(Column::new(input_schema.field(i).name(), i));
                let cast = Arc::new(CastExpr::new(column, f.data_type().clone(), None));
                Ok(ProjectionExpr::new(cast, f.name().clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(ProjectionExec::try_new(columns, input)?))
    }
}

#[async_trait]
impl TableProvider for RealtimeView {
    fn schema(&self) -> SchemaRef {
        self.materialized.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Offered to the materialized rows' scan (for pruning); applied again above both.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let catalog = self.engine.catalog_state();
        let Some(view) = catalog.view(self.view) else {
            return self
                .materialized
                .scan(state, projection, filters, None)
                .await;
        };
        // From the oldest bucket whose materialized rows may be stale: rows buffered or
        // persisted (invalidated) since the last refresh, deletes since then.
        let def = &view.def;
        let stale = view
            .invalid
            .iter()
            .map(|i| i.start)
            .chain(
                self.engine
                    .buffered_time_range(def.source)
                    .map(|(t, _)| def.bucket_start(t)),
            )
            .min();
        let watermark = match (view.watermark, stale) {
            (Some(w), Some(s)) => Some(w.min(s)),
            (w, _) => w,
        };
        // Below the source's retention only the materialized rows remain.
        let floor = catalog
            .retention_cutoff(def.source, kiln_storage::now_nanos())
            .map(|c| def.first_whole_bucket(c));
        let watermark = match (watermark, floor) {
            (Some(w), Some(f)) => Some(w.max(f)),
            (w, _) => w,
        };
        let mut before = filters.to_vec();
        if let Some(w) = watermark {
            before.push(col(TIME_COLUMN).lt(lit(utc_nanos(w))));
        }
        let schema = project(&self.materialized.schema(), projection)?;
        let computed = self
            .computed(state, &view.def.query, watermark, &schema)
            .await?;
        if watermark.is_none() {
            return Ok(computed);
        }
        let materialized = self
            .materialized
            .scan(state, projection, &before, None)
            .await?;
        UnionExec::try_new(vec![materialized, computed])
    }
}

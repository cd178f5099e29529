//! DataFusion catalog, schema and table providers over Kiln's storage engine.
//!
//! One catalog (`kiln`); each database is a schema; each table a [`KilnTable`] whose scan
//! unions persisted Parquet segments with the write buffer.
//!
//! ## How a scan is planned
//!
//! Rows can only share an identity (tags, time) within one time partition, so the scan
//! groups sources by partition, after dropping every source whose time range misses the
//! query's `time` bounds:
//!
//! * a partition with a single source (one segment, or one buffer chunk) is read as is:
//!   segments through DataFusion's Parquet reader (row-group and page pruning with the
//!   pushed-down filters), buffer chunks from memory;
//! * a partition with several sources (segments persisted at different times, or a segment
//!   plus newer buffered writes) is merged last-write-wins as it streams by [`DedupExec`]:
//!   each segment read in identity order (tags, then time, as it is stored), the buffer
//!   merged in memory, only the query's columns plus the identity, and only the rows that
//!   filters on the identity keep (a filter on a field could drop a row's newest version
//!   and leave an older one, so it is applied after the merge);
//! * a partition with only buffer chunks is merged in memory.
//!
//! [`DedupExec`]: crate::dedup::DedupExec
//!
//! Bounds on `time` (comparisons with timestamp literals) are `Exact` filters: the scan
//! applies them itself, and only to the sources that straddle them (a window's first and
//! last segments, buffer chunks); the readers of the segments within them are given no
//! filter on time. Every other filter is `Inexact`: DataFusion re-applies it above the scan.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::compute::SortOptions;
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, Session, TableProvider};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, col, lit};
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
use datafusion::physical_expr::projection::ProjectionExpr;
use datafusion::physical_expr::{LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::union::UnionExec;
use kiln_storage::Engine;
use kiln_storage::catalog::SYSTEM_SCHEMA;
pub use kiln_storage::catalog::TIME_ZONE;
use kiln_storage::catalog::tombstones::{DeletePredicate, for_segment};
use kiln_storage::catalog::{SegmentMeta, TIME_COLUMN, TableDef};
use kiln_storage::dedup::merge_last_write_wins;
use kiln_storage::ids::TableId;
use kiln_storage::persist::{sort_key, utc_schema};

use crate::coarse::coarse;
use crate::dedup::DedupExec;
use crate::scan::{KilnScanExec, ScanSummary};
use tracing::Instrument;
use tracing::field::Empty;

/// The URL the engine's object store is registered under in every session.
pub const OBJECT_STORE_URL: &str = "kiln://objects";

pub fn object_store_url() -> ObjectStoreUrl {
    ObjectStoreUrl::parse(OBJECT_STORE_URL).expect("constant URL parses")
}

/// A table's schema as SQL sees it: `time` a `TIMESTAMP WITH TIME ZONE` in UTC, as segments
/// store it (the buffer holds it without a zone; reading relabels it at no cost), so that
/// `AT TIME ZONE` and clients convert it as the instant it is.
pub fn query_schema(def: &TableDef) -> SchemaRef {
    utc_schema(&def.schema())
}

/// The `kiln` catalog: one schema per database.
#[derive(Debug)]
pub struct KilnCatalog {
    engine: Arc<Engine>,
    visible: crate::Visible,
    rule_status: Arc<crate::alerts::scheduler::RuleStatuses>,
}

impl KilnCatalog {
    /// Every database of `engine` that `visible` shows, as a schema, and the `system`
    /// schema (alerts; see [`crate::alerts::system`]).
    pub fn new(
        engine: Arc<Engine>,
        visible: crate::Visible,
        rule_status: Arc<crate::alerts::scheduler::RuleStatuses>,
    ) -> Self {
        Self {
            engine,
            visible,
            rule_status,
        }
    }
}

impl CatalogProvider for KilnCatalog {
    fn schema_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .engine
            .catalog_state()
            .databases
            .keys()
            .filter(|d| self.visible.allows(d))
            .cloned()
            .collect();
        names.push(SYSTEM_SCHEMA.to_owned());
        names
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name == SYSTEM_SCHEMA {
            return Some(Arc::new(crate::system::SystemSchema::new(
                Arc::clone(&self.engine),
                self.visible.clone(),
                Arc::clone(&self.rule_status),
            )));
        }
        if !self.visible.allows(name) {
            return None;
        }
        self.engine.catalog_state().database(name)?;
        Some(Arc::new(KilnSchema::new(Arc::clone(&self.engine), name)))
    }
}

/// A database as a DataFusion schema.
#[derive(Debug)]
pub struct KilnSchema {
    engine: Arc<Engine>,
    database: String,
}

impl KilnSchema {
    pub fn new(engine: Arc<Engine>, database: &str) -> Self {
        Self {
            engine,
            database: database.to_owned(),
        }
    }
}

#[async_trait]
impl SchemaProvider for KilnSchema {
    fn table_names(&self) -> Vec<String> {
        self.engine
            .catalog_state()
            .database(&self.database)
            .map(|db| db.tables.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        let state = self.engine.catalog_state();
        Ok(state.table(&self.database, name).map(|def| {
            let table = KilnTable {
                engine: Arc::clone(&self.engine),
                database: self.database.clone(),
                name: def.name.clone(),
                table: def.id,
                schema: query_schema(def),
            };
            match state.view(def.id) {
                Some(view) if view.def.realtime && state.table_by_id(view.def.source).is_some() => {
                    Arc::new(crate::views::realtime::RealtimeView::new(
                        Arc::clone(&self.engine),
                        table,
                    )) as Arc<dyn TableProvider>
                }
                _ => Arc::new(table) as Arc<dyn TableProvider>,
            }
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.engine
            .catalog_state()
            .table(&self.database, name)
            .is_some()
    }
}

/// A table: persisted segments plus the write buffer.
#[derive(Debug)]
pub struct KilnTable {
    engine: Arc<Engine>,
    database: String,
    /// The table's name, as a querier asks its writers for the table's rows.
    name: String,
    table: TableId,
    schema: SchemaRef,
}

impl KilnTable {
    pub fn table_id(&self) -> TableId {
        self.table
    }
}

/// Inclusive bounds on `time` implied by a conjunction of filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    pub min: i64,
    pub max: i64,
}

impl Default for TimeBounds {
    fn default() -> Self {
        Self {
            min: i64::MIN,
            max: i64::MAX,
        }
    }
}

impl TimeBounds {
    /// The bounds the conjunction `filters` implies (what it keeps lies within them).
    pub fn from_filters(filters: &[Expr]) -> Self {
        let mut b = Self::default();
        for f in filters {
            b.narrow(f);
        }
        b
    }

    /// The bounds `expr` states exactly, if it does: it keeps a row if and only if the
    /// row's time lies within them. So do comparisons of `time` with a timestamp literal
    /// (`=`, `<`, `<=`, `>`, `>=`), `time BETWEEN` two literals, and conjunctions of them.
    pub fn exact(expr: &Expr) -> Option<Self> {
        if let Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) = expr
        {
            let mut b = Self::exact(left)?;
            b.intersect(Self::exact(right)?);
            return Some(b);
        }
        match Self::implied(expr)? {
            (b, true) => Some(b),
            (_, false) => None,
        }
    }

    /// Whether every instant from `min` to `max` (inclusive) lies within these bounds.
    pub fn contains(&self, min: i64, max: i64) -> bool {
        self.min <= min && max <= self.max
    }

    pub fn overlaps(&self, min: i64, max: i64) -> bool {
        min <= self.max && max >= self.min
    }

    fn narrow(&mut self, expr: &Expr) {
        match expr {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.narrow(left);
                self.narrow(right);
            }
            _ => {
                if let Some((b, _)) = Self::implied(expr) {
                    self.intersect(b);
                }
            }
        }
    }

    fn intersect(&mut self, other: Self) {
        self.min = self.min.max(other.min);
        self.max = self.max.min(other.max);
    }

    /// The bounds one comparison of `time` with literals implies, and whether they are
    /// exactly what it keeps.
    fn implied(expr: &Expr) -> Option<(Self, bool)> {
        let all = Self::default();
        match expr {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (op, value) = match (is_time(left), nanos(right), is_time(right), nanos(left)) {
                    (true, Some(v), _, _) => (*op, v),
                    (_, _, true, Some(v)) => (op.swap()?, v),
                    _ => return None,
                };
                let (min, max) = match op {
                    Operator::Eq => (value, value),
                    Operator::Gt => (value.checked_add(1)?, i64::MAX),
                    Operator::GtEq => (value, i64::MAX),
                    Operator::Lt => (i64::MIN, value.checked_sub(1)?),
                    Operator::LtEq => (i64::MIN, value),
                    _ => return None,
                };
                Some((Self { min, max }, true))
            }
            Expr::Between(between) if !between.negated && is_time(&between.expr) => {
                let (low, high) = (nanos(&between.low), nanos(&between.high));
                let exact = low.is_some() && high.is_some();
                let b = Self {
                    min: low.unwrap_or(all.min),
                    max: high.unwrap_or(all.max),
                };
                Some((b, exact))
            }
            _ => None,
        }
    }
}

fn is_time(e: &Expr) -> bool {
    matches!(e, Expr::Column(c) if c.name == TIME_COLUMN)
}

fn nanos(e: &Expr) -> Option<i64> {
    match e {
        Expr::Literal(v, _) => scalar_nanos(v),
        _ => None,
    }
}

/// A timestamp value in nanoseconds since the epoch (`None` if not a timestamp).
pub fn scalar_nanos(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => v.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000_000),
        _ => None,
    }
}

/// What to read of some segments: columns (of the table schema), filters for pruning, a
/// row limit, and the order the rows are stored in, if the reader should know it.
struct SegmentRead<'a> {
    projection: Option<&'a Vec<usize>>,
    filters: &'a [Expr],
    limit: Option<usize>,
    ordering: Option<LexOrdering>,
    /// Apply `filters` while decoding (read the filter columns first, then only the
    /// matching rows of the others), not only to skip row groups and pages.
    decode_filtered: bool,
}

#[derive(Default)]
struct PartitionSources {
    segments: Vec<SegmentMeta>,
    buffer: Vec<RecordBatch>,
    /// The time range of the buffer's rows.
    buffer_times: Option<(i64, i64)>,
}

impl KilnTable {
    fn parquet_exec(
        &self,
        state: &dyn Session,
        def: &TableDef,
        segments: &[SegmentMeta],
        read: SegmentRead<'_>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let SegmentRead {
            projection,
            filters,
            limit,
            ordering,
            decode_filtered,
        } = read;
        let schema = query_schema(def);
        // A segment never changes once committed (a new one gets a new id, so a new name):
        // its footer and page index are read once and kept in the session runtime's
        // metadata cache (`datafusion.runtime.metadata_cache_limit`), not read again by
        // every query.
        let metadata = CachedParquetFileReaderFactory::new(
            Arc::clone(self.engine.store()),
            state.runtime_env().cache_manager.get_file_metadata_cache(),
        );
        let mut source = ParquetSource::new(Arc::clone(&schema))
            .with_parquet_file_reader_factory(Arc::new(metadata))
            .with_enable_page_index(true)
            // Segments keep a bloom filter per tag, but a filter is read from the file by
            // every query (the metadata cache does not hold it) and rarely prunes: an
            // hour's segment holds nearly every series, and min/max statistics on the
            // sorted tags prune the rest. Reading them cost a small query about 0.2 ms
            // per segment.
            .with_bloom_filter_on_read(false)
            .with_pushdown_filters(decode_filtered);
        if let Some(predicate) = conjunction(filters.iter().cloned()) {
            let df_schema = DFSchema::try_from(schema)?;
            match state.create_physical_expr(predicate, &df_schema) {
                // The reader keeps short gaps between matching rows (`coarse`); the
                // exact filter runs above the scan.
                Ok(p) if decode_filtered => source = source.with_predicate(coarse(p)),
                Ok(p) => source = source.with_predicate(p),
                Err(e) => tracing::debug!(error = %e, "filter not usable for Parquet pruning"),
            }
        }
        let target = state.config().target_partitions().max(1);
        let mut groups: Vec<Vec<PartitionedFile>> =
            vec![Vec::new(); target.min(segments.len()).max(1)];
        for (i, s) in segments.iter().enumerate() {
            let n = groups.len();
            groups[i % n].push(PartitionedFile::new(s.path.clone(), s.bytes));
        }
        let config = FileScanConfigBuilder::new(object_store_url(), Arc::new(source))
            .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .with_output_ordering(ordering.into_iter().collect())
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

#[async_trait]
impl TableProvider for KilnTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // A bound on time the scan applies itself, and only to the sources that straddle
        // it (see `scan`); DataFusion re-applies every other filter above the scan.
        Ok(filters
            .iter()
            .map(|f| match TimeBounds::exact(f) {
                Some(_) => TableProviderFilterPushDown::Exact,
                None => TableProviderFilterPushDown::Inexact,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Rows older than the table's retention are gone for every query, as if it had
        // asked for `time >= cutoff`: segments and buffered rows before it are not read,
        // those that straddle it are filtered.
        let cutoff = self
            .engine
            .catalog_state()
            .retention_cutoff(self.table, kiln_storage::now_nanos());
        let with_retention: Vec<Expr>;
        let filters = match cutoff {
            Some(cutoff) => {
                with_retention = filters
                    .iter()
                    .cloned()
                    .chain([col(TIME_COLUMN).gt_eq(lit(utc_nanos(cutoff)))])
                    .collect();
                &with_retention[..]
            }
            None => filters,
        };
        let bounds = TimeBounds::from_filters(filters);
        let span = tracing::debug_span!(
            "scan",
            db.namespace = %self.database,
            db.collection.name = %self.name,
            segments = Empty,
            buffer_partitions = Empty,
        );
        let data = crate::cluster::table_data(
            &self.engine,
            state,
            &self.database,
            &self.name,
            self.table,
            bounds.min,
            bounds.max,
        )
        .instrument(span.clone())
        .await?;
        let Some(data) = data else {
            return Ok(Arc::new(EmptyExec::new(project(&self.schema, projection)?)));
        };
        span.record("segments", data.segments.len());
        span.record("buffer_partitions", data.buffer.len());
        // Bounds on time are `Exact` filters: applied here, to the rows of the sources that
        // straddle them. A source within them needs no filter on time, and its reader is
        // not given one either (it would test every row's time).
        let needed = |filters: &[Expr], min: i64, max: i64| -> Vec<Expr> {
            filters
                .iter()
                .filter(|f| !TimeBounds::exact(f).is_some_and(|b| b.contains(min, max)))
                .cloned()
                .collect()
        };
        let time_filter = conjunction(
            filters
                .iter()
                .filter(|f| TimeBounds::exact(f).is_some())
                .cloned(),
        );
        let within = |predicate: Expr, s: &SegmentMeta| -> Expr {
            match &time_filter {
                Some(time) if !bounds.contains(s.min_time, s.max_time) => {
                    predicate.and(time.clone())
                }
                _ => predicate,
            }
        };
        let mut summary = ScanSummary {
            table: data.def.name.clone(),
            segments: data.segments.len(),
            segments_total: data.segments_total,
            buffer_partitions: data.buffer.len(),
            buffer_partitions_total: data.buffer_partitions_total,
            merged: 0,
        };
        // The table may have gained columns since planning started; read with the schema
        // the plan was made for.
        let mut def = data.def.clone();
        def.columns
            .retain(|c| self.schema.field_with_name(&c.name).is_ok());

        let mut partitions: BTreeMap<i64, PartitionSources> = BTreeMap::new();
        for s in &data.segments {
            partitions
                .entry(s.partition)
                .or_default()
                .segments
                .push(s.clone());
        }
        for p in &data.buffer {
            let sources = partitions.entry(p.partition).or_default();
            for c in &p.chunks {
                // Buffered rows outside the bounds on time go here, before any merge (all
                // versions of a row share its time): every path below then has only rows
                // within them.
                sources.buffer.push(match time_filter {
                    Some(_) if !bounds.contains(c.min_time, c.max_time) => {
                        filter_times(&c.batch, |t| bounds.contains(t, t))?
                    }
                    _ => c.batch.clone(),
                });
                let (lo, hi) = sources.buffer_times.unwrap_or((c.min_time, c.max_time));
                sources.buffer_times = Some((lo.min(c.min_time), hi.max(c.max_time)));
            }
        }

        let mut single_segments = Vec::new();
        let mut memory: Vec<RecordBatch> = Vec::new();
        let mut to_merge = Vec::new();
        for (_, sources) in partitions {
            match (sources.segments.len(), sources.buffer.len()) {
                (1, 0) => single_segments.extend(sources.segments),
                (0, 1) => memory.extend(sources.buffer),
                _ => to_merge.push(sources),
            }
        }

        let schema = query_schema(&def);
        let key = sort_key(&def);
        // What a merged partition needs read: the query's columns plus the row identity,
        // and only rows that filters on identity columns (tags, time) keep. Such a filter
        // keeps or drops every version of a row alike, so merging what it keeps gives the
        // rows the whole merge would; a filter on a field would not (it could drop the
        // newest version and leave an older one).
        let read = with_columns(projection, &schema, &key);
        let read_schema = project(&schema, read.as_ref())?;
        let identity_filters: Vec<Expr> = filters
            .iter()
            .filter(|f| {
                f.column_refs()
                    .iter()
                    .all(|c| key.contains(&c.name.as_str()))
            })
            .cloned()
            .collect();
        // Segments are sorted by identity (tags, then time) on disk.
        let identity_order = |over: &SchemaRef| -> Result<Option<LexOrdering>> {
            let exprs = key
                .iter()
                .map(|k| {
                    Ok(PhysicalSortExpr::new(
                        Arc::new(PhysicalColumn::new(k, over.index_of(k)?)),
                        SortOptions::new(false, true),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(LexOrdering::new(exprs))
        };
        let out_schema = project(&schema, projection)?;
        // Deletes not yet made physical: a segment persisted before one is read without
        // the rows it matches (tags and time: every version of a row goes alike, so the
        // merge of versions is unaffected).
        let mut delete_columns: Vec<&str> = vec![TIME_COLUMN];
        for t in &data.tombstones {
            for c in &t.predicate.tags {
                if !delete_columns.contains(&c.tag.as_str()) {
                    delete_columns.push(&c.tag);
                }
            }
        }
        let undeleted = |s: &SegmentMeta| -> Option<Expr> {
            conjunction(
                for_segment(&data.tombstones, s.id, s.min_time, s.max_time)
                    .iter()
                    .map(|t| deleted_rows(&t.predicate).is_not_true()),
            )
        };
        let and_undeleted = |predicate: Expr, s: &SegmentMeta| -> Expr {
            match undeleted(s) {
                Some(kept) => predicate.and(kept),
                None => predicate,
            }
        };
        // Plain reads of a partition's rows outside its overlap: the query's columns and
        // time (to filter on), and what deletes filter on.
        let plain_read = with_columns(projection, &schema, &delete_columns);
        // Segments are stored, and the buffer merged, in identity order.
        let segment_order = identity_order(&schema)?;
        let Some(merge_order) = identity_order(&read_schema)? else {
            return Err(DataFusionError::Internal(
                "a table without a time column".into(),
            ));
        };
        let key_indices = key
            .iter()
            .map(|k| read_schema.index_of(k))
            .collect::<Result<Vec<_>, _>>()?;
        let mut merged_parts: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        for sources in to_merge {
            let mut buffered = Vec::new();
            for b in &sources.buffer {
                buffered.push(fit(b, &read_schema)?);
            }
            if sources.segments.is_empty() {
                // Only buffer chunks: merged in memory.
                memory.push(merge_last_write_wins(&buffered, &read_schema, &key)?);
                continue;
            }
            let buffer = match buffered.is_empty() {
                true => None,
                false => Some(merge_last_write_wins(&buffered, &read_schema, &key)?),
            };
            let mut ranges: Vec<(i64, i64)> = sources
                .segments
                .iter()
                .map(|s| (s.min_time, s.max_time))
                .collect();
            ranges.extend(sources.buffer_times);
            let Some((lo, hi)) = overlap_hull(&ranges) else {
                // No two sources hold the same instant, so no row twice: plain reads.
                single_segments.extend(sources.segments);
                memory.extend(buffer);
                continue;
            };
            summary.merged += 1;
            // Outside [lo, hi] every row has one version: plain reads, in parallel.
            let outside = col(TIME_COLUMN)
                .lt(lit(utc_nanos(lo)))
                .or(col(TIME_COLUMN).gt(lit(utc_nanos(hi))));
            let inside = col(TIME_COLUMN).between(lit(utc_nanos(lo)), lit(utc_nanos(hi)));
            for segment in &sources.segments {
                let mut plain_filters = needed(filters, segment.min_time, segment.max_time);
                plain_filters.push(outside.clone());
                let scan = self.parquet_exec(
                    state,
                    &def,
                    std::slice::from_ref(segment),
                    SegmentRead {
                        projection: plain_read.as_ref(),
                        filters: &plain_filters,
                        limit: None,
                        ordering: None,
                        decode_filtered: false,
                    },
                )?;
                let kept = filter_exec(
                    state,
                    scan,
                    and_undeleted(within(outside.clone(), segment), segment),
                )?;
                merged_parts.push(select(kept, &out_schema)?);
            }
            if let Some(b) = &buffer {
                memory.push(filter_times(b, |t| t < lo || t > hi)?);
            }
            // Inside it, the versions of a row are merged as they stream (see
            // `DedupExec`): each source sorted and free of repeats, oldest write first.
            let mut inputs = Vec::new();
            for segment in &sources.segments {
                let mut inside_filters =
                    needed(&identity_filters, segment.min_time, segment.max_time);
                inside_filters.push(inside.clone());
                let scan = self.parquet_exec(
                    state,
                    &def,
                    std::slice::from_ref(segment),
                    SegmentRead {
                        projection: read.as_ref(),
                        filters: &inside_filters,
                        limit: None,
                        ordering: segment_order.clone(),
                        decode_filtered: true,
                    },
                )?;
                inputs.push(filter_exec(
                    state,
                    scan,
                    and_undeleted(within(inside.clone(), segment), segment),
                )?);
            }
            if let Some(b) = &buffer {
                let rows = filter_times(b, |t| t >= lo && t <= hi)?;
                let source =
                    MemorySourceConfig::try_new(&[vec![rows]], Arc::clone(&read_schema), None)?
                        .try_with_sort_information(vec![merge_order.clone()])?;
                inputs.push(DataSourceExec::from_data_source(source));
            }
            let dedup = Arc::new(DedupExec::try_new(
                inputs,
                merge_order.clone(),
                key_indices.clone(),
            )?);
            merged_parts.push(select(dedup, &out_schema)?);
        }

        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = merged_parts;
        // A filter on a tag or field (`usage_user > 90`) is applied while decoding, so the
        // other columns are decoded only for the rows it keeps and the short gaps between
        // them (`coarse`; the exact filter runs above the scan). Time alone is left to
        // row-group and page pruning: a window keeps whole runs of every series.
        let decode_filtered = filters
            .iter()
            .any(|f| f.column_refs().iter().any(|c| c.name != TIME_COLUMN));
        // Segments whose rows are filtered above the scan: read with their time and what
        // deletes filter on, and no row limit (it would count rows before the filter).
        let filtered_read = |segments: &[SegmentMeta]| {
            self.parquet_exec(
                state,
                &def,
                segments,
                SegmentRead {
                    projection: plain_read.as_ref(),
                    filters,
                    limit: None,
                    ordering: None,
                    decode_filtered,
                },
            )
        };
        // A segment some delete applies to: read on its own, through its deletes.
        let mut plain = Vec::with_capacity(single_segments.len());
        for segment in single_segments {
            let Some(kept) = undeleted(&segment) else {
                plain.push(segment);
                continue;
            };
            let kept = match &time_filter {
                Some(time) => time.clone().and(kept),
                None => kept,
            };
            let scan = filtered_read(std::slice::from_ref(&segment))?;
            inputs.push(select(filter_exec(state, scan, kept)?, &out_schema)?);
        }
        let (inner, straddling): (Vec<SegmentMeta>, Vec<SegmentMeta>) = plain
            .into_iter()
            .partition(|s| bounds.contains(s.min_time, s.max_time));
        if !inner.is_empty() {
            inputs.push(self.parquet_exec(
                state,
                &def,
                &inner,
                SegmentRead {
                    projection,
                    filters: &needed(filters, bounds.min, bounds.max),
                    limit,
                    ordering: None,
                    decode_filtered,
                },
            )?);
        }
        if !straddling.is_empty() {
            // The first and last segments of a window, filtered on time.
            let scan = filtered_read(&straddling)?;
            let scan = match &time_filter {
                Some(time) => filter_exec(state, scan, time.clone())?,
                None => scan,
            };
            inputs.push(select(scan, &out_schema)?);
        }
        if !memory.is_empty() {
            let memory = memory
                .iter()
                .map(|b| fit(b, &out_schema))
                .collect::<Result<Vec<_>, _>>()?;
            let target = state.config().target_partitions().max(1);
            let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); target.min(memory.len())];
            for (i, b) in memory.into_iter().enumerate() {
                let n = parts.len();
                parts[i % n].push(b);
            }
            inputs.push(MemorySourceConfig::try_new_exec(&parts, out_schema, None)?);
        }
        let scan = match inputs.len() {
            0 => Arc::new(EmptyExec::new(project(&schema, projection)?)),
            1 => inputs.remove(0),
            _ => UnionExec::try_new(inputs)?,
        };
        Ok(Arc::new(
            KilnScanExec::new(scan, summary.to_string()).with_lease(data.lease),
        ))
    }
}

/// `projection` (of `schema`) with the columns `names` added, in schema order; `None`
/// (every column) stays `None`.
fn with_columns(
    projection: Option<&Vec<usize>>,
    schema: &SchemaRef,
    names: &[&str],
) -> Option<Vec<usize>> {
    projection.map(|p| {
        let mut columns = p.clone();
        for name in names {
            if let Ok(i) = schema.index_of(name)
                && !columns.contains(&i)
            {
                columns.push(i);
            }
        }
        columns.sort_unstable();
        columns
    })
}

/// The hull of the instants at which two of `ranges` (inclusive) overlap: where a row can
/// have versions in two sources. `None` if no two overlap.
fn overlap_hull(ranges: &[(i64, i64)]) -> Option<(i64, i64)> {
    let mut hull: Option<(i64, i64)> = None;
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            let (lo, hi) = (a.0.max(b.0), a.1.min(b.1));
            if lo <= hi {
                hull = Some(hull.map_or((lo, hi), |(l, h)| (l.min(lo), h.max(hi))));
            }
        }
    }
    hull
}

/// The rows a delete's predicate matches, as a filter expression.
pub fn deleted_rows(predicate: &DeletePredicate) -> Expr {
    let mut parts: Vec<Expr> = predicate
        .tags
        .iter()
        .map(|c| {
            col(c.tag.as_str()).in_list(
                c.values.iter().map(|v| lit(v.as_str())).collect(),
                c.negated,
            )
        })
        .collect();
    if predicate.min_time != i64::MIN {
        parts.push(col(TIME_COLUMN).gt_eq(lit(utc_nanos(predicate.min_time))));
    }
    if predicate.max_time != i64::MAX {
        parts.push(col(TIME_COLUMN).lt_eq(lit(utc_nanos(predicate.max_time))));
    }
    conjunction(parts).unwrap_or(lit(true))
}

/// A time literal of the type SQL sees `time` as.
pub(crate) fn utc_nanos(nanos: i64) -> ScalarValue {
    ScalarValue::TimestampNanosecond(Some(nanos), Some(TIME_ZONE.into()))
}

/// `input`'s rows for which `predicate` holds.
fn filter_exec(
    state: &dyn Session,
    input: Arc<dyn ExecutionPlan>,
    predicate: Expr,
) -> Result<Arc<dyn ExecutionPlan>> {
    let df_schema = DFSchema::try_from(input.schema())?;
    let predicate = state.create_physical_expr(predicate, &df_schema)?;
    Ok(Arc::new(FilterExec::try_new(predicate, input)?))
}

/// `input`'s columns named in `out`, in `out`'s order.
fn select(input: Arc<dyn ExecutionPlan>, out: &SchemaRef) -> Result<Arc<dyn ExecutionPlan>> {
    let schema = input.schema();
    let columns = out
        .fields()
        .iter()
        .map(|f| {
            let i = schema.index_of(f.name())?;
            Ok(ProjectionExpr::new(
                Arc::new(PhysicalColumn::new(f.name(), i)) as Arc<dyn PhysicalExpr>,
                f.name().clone(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(ProjectionExec::try_new(columns, input)?))
}

/// The rows of `batch` whose time `keep` keeps.
fn filter_times(batch: &RecordBatch, keep: impl Fn(i64) -> bool) -> Result<RecordBatch> {
    let times = arrow::compute::cast(
        batch
            .column_by_name(TIME_COLUMN)
            .ok_or_else(|| DataFusionError::Internal("rows without time".into()))?,
        &DataType::Int64,
    )?;
    let times = times.as_primitive::<arrow::datatypes::Int64Type>();
    let mask: BooleanArray = times.iter().map(|t| Some(t.is_some_and(&keep))).collect();
    Ok(arrow::compute::filter_record_batch(batch, &mask)?)
}

/// `batch`'s columns that `schema` has, in `schema`'s order and types (NULL where the
/// batch lacks one).
fn fit(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let keep: Vec<usize> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| schema.field_with_name(f.name()).is_ok())
        .map(|(i, _)| i)
        .collect();
    Ok(kiln_storage::dedup::align_to_schema(
        &batch.project(&keep)?,
        schema,
    )?)
}

pub(crate) fn project(schema: &SchemaRef, projection: Option<&Vec<usize>>) -> Result<SchemaRef> {
    Ok(match projection {
        Some(p) => Arc::new(schema.project(p)?),
        None => Arc::clone(schema),
    })
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit};

    use super::*;

    fn ts(v: i64) -> Expr {
        lit(ScalarValue::TimestampNanosecond(Some(v), None))
    }

    #[test]
    fn time_bounds_from_comparisons_between_and_conjunctions() {
        let b = TimeBounds::from_filters(&[col("time").gt_eq(ts(10)), col("time").lt(ts(20))]);
        assert_eq!(b, TimeBounds { min: 10, max: 19 });
        let b = TimeBounds::from_filters(&[ts(10).lt(col("time")).and(col("host").eq(lit("a")))]);
        assert_eq!(
            b,
            TimeBounds {
                min: 11,
                max: i64::MAX
            }
        );
        let b = TimeBounds::from_filters(&[col("time").between(ts(5), ts(7))]);
        assert_eq!(b, TimeBounds { min: 5, max: 7 });
        let b = TimeBounds::from_filters(&[
            col("time").eq(lit(ScalarValue::TimestampSecond(Some(2), None)))
        ]);
        assert_eq!(
            b,
            TimeBounds {
                min: 2_000_000_000,
                max: 2_000_000_000
            }
        );
        // Disjunctions and other columns say nothing about time.
        let b = TimeBounds::from_filters(&[
            col("time").gt(ts(1)).or(col("time").lt(ts(0))),
            col("other").gt(ts(3)),
        ]);
        assert_eq!(b, TimeBounds::default());
        assert!(b.overlaps(i64::MIN, i64::MIN));
    }

    #[test]
    fn exact_time_bounds_only_for_what_they_state_whole() {
        let exact = |e: Expr| TimeBounds::exact(&e);
        assert_eq!(
            exact(col("time").gt_eq(ts(10)).and(ts(20).gt(col("time")))),
            Some(TimeBounds { min: 10, max: 19 })
        );
        assert_eq!(
            exact(col("time").between(ts(5), ts(7))),
            Some(TimeBounds { min: 5, max: 7 })
        );
        assert_eq!(
            exact(col("time").eq(ts(3))),
            Some(TimeBounds { min: 3, max: 3 })
        );
        // Implied bounds, but the filter keeps fewer rows (or other columns decide).
        assert_eq!(exact(col("time").between(ts(5), col("other"))), None);
        assert_eq!(exact(col("time").not_eq(ts(3))), None);
        assert_eq!(
            exact(col("time").gt(ts(1)).and(col("host").eq(lit("a")))),
            None
        );
        assert_eq!(exact(col("time").gt(ts(1)).or(col("time").lt(ts(0)))), None);
        assert_eq!(exact(col("time").not_between(ts(5), ts(7))), None);
        assert_eq!(exact(col("time").gt(ts(i64::MAX))), None);
        assert_eq!(exact(col("time").lt(ts(i64::MIN))), None);
        assert_eq!(
            exact(col("time").gt_eq(lit(ScalarValue::TimestampNanosecond(None, None)))),
            None
        );

        let b = TimeBounds { min: 10, max: 19 };
        assert!(b.contains(10, 19) && b.contains(12, 12));
        assert!(!b.contains(9, 12) && !b.contains(12, 20));
    }
}

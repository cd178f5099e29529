//! The catalog: databases, tables, columns and persisted segments, event-sourced.
//!
//! Every change is a [`CatalogEvent`]; a commit appends one transaction (a list of events)
//! to the catalog log in the object store as `catalog/log/{sequence:020}.json`, written with
//! a create-if-absent put so two writers can never both commit the same sequence. The
//! current [`CatalogState`] is the fold of all transactions. Every
//! [`SNAPSHOT_INTERVAL`] transactions the whole state is written to
//! `catalog/snapshots/{sequence:020}.json` (in the background, not by the commit);
//! loading starts from the newest snapshot and replays the log after it, and what a
//! newer snapshot covers is pruned ([`log`]). The encodings are in [`format`].
//!
//! A commit that finds its sequence taken (another writer's transaction, or its own
//! earlier one whose put reported an error after the entry landed) reads the log up to
//! date and tries again, computing its events afresh.
//!
//! Access tokens live here too ([`TokenDef`]): created and revoked by events, so they
//! survive restarts and reach every process that follows the catalog. A token is kept only
//! as the hash its holder's secret gives; the catalog never sees the secret.

pub mod alerts;
pub mod devices;
pub mod format;
pub mod ingesters;
pub mod lifecycle;
mod log;
pub mod tombstones;
pub mod views;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::ids::{
    AlertEventId, AlertRuleId, CatalogSequence, DatabaseId, SegmentId, SequenceNumber, TableId,
    TokenId, TombstoneId,
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fewest transactions between two snapshots. A large state is snapshotted less often
/// (see [`snapshot_interval`]): writing it costs more, replaying a transaction does not.
pub const SNAPSHOT_INTERVAL: u64 = 100;

/// Transactions between two snapshots of `state`: [`SNAPSHOT_INTERVAL`], or one per 20
/// live segments if that is more (a segment is most of a snapshot's bytes).
pub fn snapshot_interval(state: &CatalogState) -> u64 {
    let segments: usize = state.segments.values().map(|s| s.len()).sum();
    SNAPSHOT_INTERVAL.max(segments as u64 / 20)
}

/// Name of the schema of Kiln's own tables (`system.alerts`, …): no database takes it.
pub const SYSTEM_SCHEMA: &str = "system";

/// Name of the timestamp column every table has.
pub const TIME_COLUMN: &str = "time";

/// The zone of `time`: instants, nanoseconds since the epoch in UTC. The buffer holds it
/// without a zone label, segments and SQL with this one; relabelling costs nothing.
pub const TIME_ZONE: &str = "UTC";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object store error on {path}: {source}")]
    Store {
        path: String,
        source: object_store::Error,
    },
    #[error("catalog entry {path} is not valid")]
    Decode {
        path: String,
        #[source]
        source: format::DecodeError,
    },
    #[error("catalog transaction {sequence} was written by another writer")]
    Conflict { sequence: CatalogSequence },
    #[error(
        "this server only reads the catalog (--role querier): make changes through the server \
         that writes it"
    )]
    ReadOnly,
    #[error("column {column:?} of table {table:?} is {existing}, not {requested}")]
    TypeConflict {
        table: String,
        column: String,
        existing: ColumnType,
        requested: ColumnType,
    },
    #[error("unknown database id {0}")]
    UnknownDatabase(DatabaseId),
    #[error("compaction does not fit the catalog: {0}")]
    Compaction(String),
    #[error("unknown table id {0}")]
    UnknownTable(TableId),
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A write would create more databases, tables or columns than the limits allow.
    #[error("{0}")]
    LimitExceeded(String),
    #[error("catalog task failed: {0}")]
    Task(String),
    #[error("table {table:?} not found in database {database:?}")]
    TableNotFound { database: String, table: String },
    #[error("{0}")]
    InvalidLastCache(String),
    /// A token cannot be created or revoked as asked (a duplicate name, the last admin).
    #[error("{0}")]
    InvalidToken(String),
    /// An alert rule or transition does not fit the catalog (a duplicate name, a
    /// transition from a state the alert is not in).
    #[error("{0}")]
    InvalidAlert(String),
    /// A retention that cannot be set (not above zero).
    #[error("{0}")]
    InvalidRetention(String),
    /// An explicit create of a database that exists.
    #[error("database {0:?} exists already")]
    DatabaseExists(String),
    #[error("database {0:?} not found")]
    DatabaseNotFound(String),
    /// A materialized view cannot be created or refreshed as asked.
    #[error("{0}")]
    InvalidView(String),
}

/// The type of a column: its role (tag, time, field) and, for fields, the value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Tag,
    Time,
    Float,
    Integer,
    UInteger,
    Boolean,
    String,
}

impl ColumnType {
    pub fn arrow_type(self) -> DataType {
        match self {
            Self::Tag => DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            Self::Time => DataType::Timestamp(TimeUnit::Nanosecond, None),
            Self::Float => DataType::Float64,
            Self::Integer => DataType::Int64,
            Self::UInteger => DataType::UInt64,
            Self::Boolean => DataType::Boolean,
            Self::String => DataType::Utf8,
        }
    }

    pub fn is_field(self) -> bool {
        !matches!(self, Self::Tag | Self::Time)
    }
}

impl std::fmt::Display for ColumnType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tag => "a tag",
            Self::Time => "the time column",
            Self::Float => "a float field",
            Self::Integer => "an integer field",
            Self::UInteger => "an unsigned integer field",
            Self::Boolean => "a boolean field",
            Self::String => "a string field",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    pub ty: ColumnType,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    pub id: TableId,
    pub database: DatabaseId,
    pub name: String,
    /// Width of a time partition, in nanoseconds.
    pub partition_nanos: i64,
    pub columns: Vec<ColumnDef>,
    /// How long the table keeps rows, overriding its database's (nanoseconds; absent
    /// from catalogs written before retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_nanos: Option<i64>,
}

impl TableDef {
    pub fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The Arrow schema: columns in the order they were added.
    pub fn schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.ty != ColumnType::Time))
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// Columns that identify a row besides time: the tags, in column order.
    pub fn tag_columns(&self) -> impl Iterator<Item = &ColumnDef> {
        self.columns.iter().filter(|c| c.ty == ColumnType::Tag)
    }

    /// Start of the partition `time` falls in.
    pub fn partition_of(&self, time: i64) -> i64 {
        crate::time::partition_start(time, self.partition_nanos)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseDef {
    pub id: DatabaseId,
    pub name: String,
    pub tables: BTreeMap<String, TableId>,
    /// How long the database's tables keep rows (nanoseconds; `None`: forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_nanos: Option<i64>,
}

/// A persisted Parquet segment: one time partition of one table, as of `max_sequence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    pub id: SegmentId,
    pub table: TableId,
    pub partition: i64,
    pub path: String,
    pub min_time: i64,
    pub max_time: i64,
    pub rows: u64,
    pub bytes: u64,
    pub max_sequence: SequenceNumber,
}

/// One change to the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CatalogEvent {
    DatabaseCreated {
        id: DatabaseId,
        name: String,
    },
    TableCreated {
        id: TableId,
        database: DatabaseId,
        name: String,
        partition_nanos: i64,
    },
    ColumnAdded {
        table: TableId,
        column: ColumnDef,
    },
    SegmentPersisted(SegmentMeta),
    /// The segments `replaced`, all of one time partition of `segment.table`, were merged
    /// (last write wins) into `segment`, which takes their place among the table's
    /// segments: after every older segment of the partition, before every newer one.
    SegmentsCompacted {
        replaced: Vec<SegmentId>,
        segment: SegmentMeta,
    },
    /// Every WAL record at or below `sequence` is in persisted segments: of the WAL of
    /// `writer` when several servers write the catalog, each with a WAL of its own
    /// (`EngineConfig::writer`), of the only one otherwise.
    WalPersisted {
        sequence: SequenceNumber,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        writer: Option<String>,
    },
    /// The table keeps its latest row per value of `key_columns` in memory.
    LastCacheCreated {
        table: TableId,
        key_columns: Vec<String>,
    },
    LastCacheDropped {
        table: TableId,
    },
    /// Outside sources (Kafka topic partitions) consumed through these positions; written
    /// with `WalPersisted` so positions outlive the WAL files that recorded them.
    SourcePositions {
        positions: Vec<SourcePosition>,
    },
    /// A token was created; its name and hash are unique among the live tokens.
    TokenCreated(TokenDef),
    /// A token was revoked: it is refused from then on.
    TokenRevoked {
        id: TokenId,
    },
    /// An alert rule was created; its name is unique among rules.
    AlertRuleCreated(alerts::AlertRuleDef),
    /// An alert rule was deleted, with its alerts.
    AlertRuleDeleted {
        id: AlertRuleId,
    },
    /// A series' alert changed state.
    AlertTransitioned(alerts::AlertTransition),
    /// `receiver` took the notification of transition `id`; with `done`, every receiver
    /// has, and it leaves the outbox.
    AlertDelivered {
        id: AlertEventId,
        receiver: String,
        done: bool,
    },
    /// Attributes of the device `tag`=`value` in `database` set (`None`: removed).
    DeviceAttributesSet {
        database: String,
        tag: String,
        value: String,
        attributes: BTreeMap<String, Option<String>>,
    },
    /// When the table's series count as stale and offline.
    SeriesStalenessSet {
        table: TableId,
        staleness: devices::Staleness,
    },
    /// The database (with its tables) was soft-deleted: its name is free, its files stay
    /// until `hard_delete_at` (nanoseconds since the epoch).
    DatabaseDeleted {
        id: DatabaseId,
        deleted_at: i64,
        hard_delete_at: i64,
    },
    /// The table was soft-deleted (see `DatabaseDeleted`).
    TableDeleted {
        id: TableId,
        deleted_at: i64,
        hard_delete_at: i64,
    },
    /// Dropped databases and tables forgotten: their files are deleted once no query
    /// reads them.
    DroppedPurged {
        databases: Vec<DatabaseId>,
        tables: Vec<TableId>,
    },
    /// How long a database (`table` absent) or a table keeps rows (`None`: forever, or
    /// for a table, as its database).
    RetentionSet {
        database: DatabaseId,
        table: Option<TableId>,
        retention_nanos: Option<i64>,
    },
    /// Segments of `table` whose every row is older than `cutoff` were removed.
    SegmentsExpired {
        table: TableId,
        segments: Vec<SegmentId>,
        cutoff: i64,
    },
    /// Segments of `table` were removed: deletes had left no row in them.
    SegmentsDeleted {
        table: TableId,
        segments: Vec<SegmentId>,
    },
    /// Rows were deleted (a tombstone; its id is the next one).
    RowsDeleted(tombstones::Tombstone),
    /// Tombstones compaction has made physical.
    TombstonesRetired {
        ids: Vec<TombstoneId>,
    },
    /// A materialized view was defined over its (just created) table; the source's rows
    /// spanned `initial` then.
    ViewCreated {
        def: views::ViewDef,
        initial: Option<(i64, i64)>,
    },
    /// A view's invalidated buckets were recomputed.
    ViewRefreshed(views::Refresh),
    /// The ingester `name` takes writes and answers queriers at `address` (its gRPC
    /// address); see [`ingesters`].
    IngesterJoined {
        name: String,
        address: String,
        #[serde(default)]
        joined_at: i64,
    },
    /// The ingester `name` stopped with every row it took persisted: queriers no longer
    /// ask it.
    IngesterLeft {
        name: String,
    },
}

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenPermissions {
    /// Everything, token management and configuration included.
    Admin,
    /// Reading and/or writing the named databases (`*`: every database).
    Database {
        databases: Vec<String>,
        read: bool,
        write: bool,
    },
}

/// An access token: its name, what it may do, and the hash of its secret (never the
/// secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDef {
    pub id: TokenId,
    pub name: String,
    /// Hex SHA-256 of the token's text.
    pub hash: String,
    pub permissions: TokenPermissions,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// Nanoseconds since the epoch; the token is refused from then on.
    pub expires_at: Option<i64>,
}

/// The last position of one partition of an outside source whose data is durable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourcePosition {
    pub source: String,
    pub partition: i32,
    pub last: i64,
}

/// A table's last-value cache: the latest row for each value of its key columns (tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCacheDef {
    pub table: TableId,
    pub key_columns: Vec<String>,
}

/// The fold of every catalog event so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CatalogState {
    pub sequence: CatalogSequence,
    pub databases: BTreeMap<String, DatabaseDef>,
    pub tables: BTreeMap<TableId, TableDef>,
    /// Per table, segments in the order they were persisted. Shared between states: a
    /// commit copies only the lists it changes.
    pub segments: BTreeMap<TableId, Arc<Vec<SegmentMeta>>>,
    pub persisted_sequence: SequenceNumber,
    /// Per writer of several (`EngineConfig::writer`), the last WAL sequence of its own
    /// WAL in persisted segments (absent from catalogs written by one writer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub writers_persisted: BTreeMap<String, SequenceNumber>,
    pub next_database_id: u32,
    pub next_table_id: u32,
    pub next_segment_id: u64,
    /// Tables with a last-value cache (absent from catalogs written before caches existed).
    #[serde(default)]
    pub last_caches: BTreeMap<TableId, LastCacheDef>,
    /// Per source partition, the last position recorded when the WAL was last persisted
    /// (sorted by source and partition; absent from catalogs written before sources).
    #[serde(default)]
    pub source_positions: Vec<SourcePosition>,
    /// Live (not revoked) access tokens (absent from catalogs written before tokens).
    #[serde(default)]
    pub tokens: BTreeMap<TokenId, TokenDef>,
    #[serde(default)]
    pub next_token_id: u32,
    /// Alert rules and their alerts (absent from catalogs written before alerts).
    #[serde(default)]
    pub alerts: alerts::AlertsState,
    /// Device attributes (absent from catalogs written before devices).
    #[serde(default)]
    pub devices: devices::Devices,
    /// Tables whose series go stale on a schedule of their own.
    #[serde(default)]
    pub staleness: BTreeMap<TableId, devices::Staleness>,
    /// Soft-deleted databases and tables, until their hard delete (absent from catalogs
    /// written before deletes).
    #[serde(default)]
    pub dropped_databases: BTreeMap<DatabaseId, lifecycle::DroppedDatabase>,
    #[serde(default)]
    pub dropped_tables: BTreeMap<TableId, lifecycle::DroppedTable>,
    /// Deletes of rows not yet made physical (absent from catalogs written before
    /// deletes).
    #[serde(default)]
    pub tombstones: BTreeMap<TombstoneId, tombstones::Tombstone>,
    #[serde(default)]
    pub next_tombstone_id: u64,
    /// Materialized views, by their table (absent from catalogs written before views).
    #[serde(default)]
    pub views: BTreeMap<TableId, views::View>,
    /// Ingesters that joined and have not left, by name (absent from catalogs no
    /// ingester announced itself in).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ingesters: BTreeMap<String, ingesters::Ingester>,
}

impl CatalogState {
    /// The last sequence of `writer`'s WAL in persisted segments (`None`: the only
    /// writer's; see [`CatalogEvent::WalPersisted`]).
    pub fn persisted_by(&self, writer: Option<&str>) -> SequenceNumber {
        match writer {
            None => self.persisted_sequence,
            Some(w) => self.writers_persisted.get(w).copied().unwrap_or_default(),
        }
    }

    pub fn database(&self, name: &str) -> Option<&DatabaseDef> {
        self.databases.get(name)
    }

    /// The live database with id `id`.
    pub fn database_by_id(&self, id: DatabaseId) -> Option<&DatabaseDef> {
        self.databases.values().find(|d| d.id == id)
    }

    /// The oldest and newest times `table`'s segments hold.
    pub fn segments_span(&self, table: TableId) -> Option<(i64, i64)> {
        self.segments(table)
            .iter()
            .map(|s| (s.min_time, s.max_time))
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
    }

    pub fn table(&self, database: &str, table: &str) -> Option<&TableDef> {
        let id = self.databases.get(database)?.tables.get(table)?;
        self.tables.get(id)
    }

    /// The last recorded position of `partition` of `source`.
    pub fn source_position(&self, source: &str, partition: i32) -> Option<i64> {
        self.source_positions
            .iter()
            .find(|p| p.source == source && p.partition == partition)
            .map(|p| p.last)
    }

    /// The live token named `name`.
    pub fn token(&self, name: &str) -> Option<&TokenDef> {
        self.tokens.values().find(|t| t.name == name)
    }

    /// Whether any live token is an admin token (expired or not).
    pub fn has_admin_token(&self) -> bool {
        self.tokens
            .values()
            .any(|t| t.permissions == TokenPermissions::Admin)
    }

    pub fn table_by_id(&self, id: TableId) -> Option<&TableDef> {
        self.tables.get(&id)
    }

    /// The tombstones of `table`, oldest first.
    pub fn tombstones_of(&self, table: TableId) -> Vec<std::sync::Arc<tombstones::Tombstone>> {
        self.tombstones
            .values()
            .filter(|t| t.table == table)
            .map(|t| std::sync::Arc::new(t.clone()))
            .collect()
    }

    pub fn segments(&self, table: TableId) -> &[SegmentMeta] {
        self.segments.get(&table).map_or(&[], |s| s.as_slice())
    }

    /// Applies one event, checking it against the current state.
    pub fn apply(&mut self, event: &CatalogEvent) -> Result<()> {
        match event {
            CatalogEvent::DatabaseCreated { id, name } => {
                self.databases
                    .entry(name.clone())
                    .or_insert_with(|| DatabaseDef {
                        id: *id,
                        name: name.clone(),
                        tables: BTreeMap::new(),
                        retention_nanos: None,
                    });
                self.next_database_id = self.next_database_id.max(id.get() + 1);
            }
            CatalogEvent::TableCreated {
                id,
                database,
                name,
                partition_nanos,
            } => {
                let db = self
                    .databases
                    .values_mut()
                    .find(|d| d.id == *database)
                    .ok_or(Error::UnknownDatabase(*database))?;
                db.tables.insert(name.clone(), *id);
                self.tables.insert(
                    *id,
                    TableDef {
                        id: *id,
                        database: *database,
                        name: name.clone(),
                        partition_nanos: *partition_nanos,
                        columns: vec![ColumnDef {
                            name: TIME_COLUMN.into(),
                            ty: ColumnType::Time,
                        }],
                        retention_nanos: None,
                    },
                );
                self.next_table_id = self.next_table_id.max(id.get() + 1);
            }
            CatalogEvent::ColumnAdded { table, column } => {
                let def = self
                    .tables
                    .get_mut(table)
                    .ok_or(Error::UnknownTable(*table))?;
                match def.column(&column.name) {
                    Some(existing) if existing.ty == column.ty => {}
                    Some(existing) => {
                        return Err(Error::TypeConflict {
                            table: def.name.clone(),
                            column: column.name.clone(),
                            existing: existing.ty,
                            requested: column.ty,
                        });
                    }
                    None => def.columns.push(column.clone()),
                }
            }
            CatalogEvent::SegmentPersisted(meta) => {
                self.next_segment_id = self.next_segment_id.max(meta.id.get() + 1);
                // A persistence that began before its table was deleted: the file is
                // named by nothing, and a start's sweep removes it.
                if self.is_dropped_table(meta.table) {
                    return Ok(());
                }
                if !self.tables.contains_key(&meta.table) {
                    return Err(Error::UnknownTable(meta.table));
                }
                Arc::make_mut(self.segments.entry(meta.table).or_default()).push(meta.clone());
                self.next_segment_id = self.next_segment_id.max(meta.id.get() + 1);
                self.invalidate_persisted(meta.table, meta.min_time, meta.max_time);
            }
            CatalogEvent::SegmentsCompacted { replaced, segment } => {
                let list = Arc::make_mut(
                    self.segments
                        .get_mut(&segment.table)
                        .ok_or(Error::UnknownTable(segment.table))?,
                );
                let mut places = Vec::with_capacity(replaced.len());
                for id in replaced {
                    let i = list
                        .iter()
                        .position(|s| s.id == *id && s.partition == segment.partition)
                        .ok_or_else(|| {
                            Error::Compaction(format!(
                                "segment {id} is not in partition {} of table {}",
                                segment.partition, segment.table
                            ))
                        })?;
                    places.push(i);
                }
                let (Some(&first), Some(&last)) = (places.iter().min(), places.iter().max()) else {
                    return Err(Error::Compaction("a compaction replaced no segment".into()));
                };
                // The merged segment takes the first one's place, which keeps the
                // partition's order only if no other segment of it lies in between.
                if list[first..=last]
                    .iter()
                    .any(|s| s.partition == segment.partition && !replaced.contains(&s.id))
                {
                    return Err(Error::Compaction(format!(
                        "segments {replaced:?} are not consecutive in partition {} of table {}",
                        segment.partition, segment.table
                    )));
                }
                list.retain(|s| !replaced.contains(&s.id));
                list.insert(first, segment.clone());
                self.next_segment_id = self.next_segment_id.max(segment.id.get() + 1);
            }
            CatalogEvent::WalPersisted {
                sequence,
                writer: None,
            } => {
                self.persisted_sequence = self.persisted_sequence.max(*sequence);
            }
            CatalogEvent::WalPersisted {
                sequence,
                writer: Some(writer),
            } => {
                let persisted = self.writers_persisted.entry(writer.clone()).or_default();
                *persisted = (*persisted).max(*sequence);
            }
            CatalogEvent::LastCacheCreated { table, key_columns } => {
                let def = self.tables.get(table).ok_or(Error::UnknownTable(*table))?;
                for name in key_columns {
                    match def.column(name) {
                        Some(c) if c.ty == ColumnType::Tag => {}
                        _ => {
                            return Err(Error::InvalidLastCache(format!(
                                "{name:?} is not a tag of table {:?}; key columns must be tags",
                                def.name
                            )));
                        }
                    }
                }
                self.last_caches.insert(
                    *table,
                    LastCacheDef {
                        table: *table,
                        key_columns: key_columns.clone(),
                    },
                );
            }
            CatalogEvent::LastCacheDropped { table } => {
                self.last_caches.remove(table);
            }
            CatalogEvent::TokenCreated(def) => {
                if self.token(&def.name).is_some() {
                    return Err(Error::InvalidToken(format!(
                        "a token named {:?} exists already",
                        def.name
                    )));
                }
                if self.tokens.values().any(|t| t.hash == def.hash) {
                    return Err(Error::InvalidToken("the token's hash is in use".into()));
                }
                self.tokens.insert(def.id, def.clone());
                self.next_token_id = self.next_token_id.max(def.id.get() + 1);
            }
            CatalogEvent::TokenRevoked { id } => {
                self.tokens.remove(id);
            }
            CatalogEvent::AlertRuleCreated(def) => {
                self.alerts.create_rule(def).map_err(Error::InvalidAlert)?;
            }
            CatalogEvent::AlertRuleDeleted { id } => self.alerts.delete_rule(*id),
            CatalogEvent::AlertTransitioned(t) => {
                self.alerts.transition(t).map_err(Error::InvalidAlert)?;
            }
            CatalogEvent::AlertDelivered { id, receiver, done } => {
                self.alerts.delivered(*id, receiver, *done);
            }
            CatalogEvent::DeviceAttributesSet {
                database,
                tag,
                value,
                attributes,
            } => devices::set_attributes(&mut self.devices, database, tag, value, attributes),
            CatalogEvent::SeriesStalenessSet { table, staleness } => {
                if !self.tables.contains_key(table) {
                    return Err(Error::UnknownTable(*table));
                }
                self.staleness.insert(*table, *staleness);
            }
            CatalogEvent::DatabaseDeleted {
                id,
                deleted_at,
                hard_delete_at,
            } => self.delete_database(*id, *deleted_at, *hard_delete_at)?,
            CatalogEvent::TableDeleted {
                id,
                deleted_at,
                hard_delete_at,
            } => self.delete_table(*id, *deleted_at, *hard_delete_at)?,
            CatalogEvent::DroppedPurged { databases, tables } => self.purge(databases, tables),
            CatalogEvent::RetentionSet {
                database,
                table,
                retention_nanos,
            } => self.set_retention(*database, *table, *retention_nanos)?,
            CatalogEvent::SegmentsExpired {
                table, segments, ..
            } => self.expire(*table, segments)?,
            CatalogEvent::SegmentsDeleted { table, segments } => self.expire(*table, segments)?,
            CatalogEvent::RowsDeleted(tombstone) => {
                if !self.tables.contains_key(&tombstone.table) {
                    return Err(Error::UnknownTable(tombstone.table));
                }
                self.tombstones.insert(tombstone.id, tombstone.clone());
                self.next_tombstone_id = self.next_tombstone_id.max(tombstone.id.get() + 1);
                let p = &tombstone.predicate;
                self.invalidate_deleted(tombstone.table, p.min_time, p.max_time);
            }
            CatalogEvent::TombstonesRetired { ids } => {
                for id in ids {
                    self.tombstones.remove(id);
                }
            }
            CatalogEvent::ViewCreated { def, initial } => self.create_view(def, *initial)?,
            CatalogEvent::ViewRefreshed(refresh) => self.record_refresh(refresh)?,
            CatalogEvent::SourcePositions { positions } => {
                for p in positions {
                    let at = self.source_positions.binary_search_by(|q| {
                        (&q.source, q.partition).cmp(&(&p.source, p.partition))
                    });
                    match at {
                        Ok(i) => {
                            let q = &mut self.source_positions[i];
                            q.last = q.last.max(p.last);
                        }
                        Err(i) => self.source_positions.insert(i, p.clone()),
                    }
                }
            }
            CatalogEvent::IngesterJoined {
                name,
                address,
                joined_at,
            } => {
                self.ingesters.insert(
                    name.clone(),
                    ingesters::Ingester {
                        address: address.clone(),
                        joined_at: *joined_at,
                    },
                );
            }
            CatalogEvent::IngesterLeft { name } => {
                self.ingesters.remove(name);
            }
        }
        Ok(())
    }
}

/// How many databases, tables and columns the catalog takes: a bound on what client
/// writes can make it hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaLimits {
    pub max_databases: usize,
    /// Across all databases.
    pub max_tables: usize,
    /// Per table, `time` included.
    pub max_columns_per_table: usize,
}

impl Default for SchemaLimits {
    fn default() -> Self {
        Self {
            max_databases: 100,
            max_tables: 10_000,
            max_columns_per_table: 1_000,
        }
    }
}

/// A change to a table's schema that a write needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaChange {
    pub table: String,
    pub column: String,
    pub ty: ColumnType,
}

/// The catalog: current state plus its log in the object store.
#[derive(Debug)]
pub struct Catalog {
    store: Arc<dyn ObjectStore>,
    state: RwLock<Arc<CatalogState>>,
    commit: tokio::sync::Mutex<()>,
    /// Held while a snapshot is written in the background (one at a time).
    snapshotting: Arc<tokio::sync::Mutex<()>>,
    /// The sequence of the last snapshot started (or of the state loaded).
    last_snapshot: std::sync::atomic::AtomicU64,
    default_partition_nanos: i64,
    limits: SchemaLimits,
    /// Calls of [`Catalog::follow`] that found nothing new, to look for snapshots now and
    /// then.
    idle_follows: std::sync::atomic::AtomicU64,
    /// A catalog that follows what others write ([`Catalog::read_only`]): commits are
    /// refused.
    read_only: bool,
}

/// How often a commit finds its sequence taken, catches up and tries again.
const COMMIT_ATTEMPTS: usize = 5;

/// Every this many calls that find nothing new, [`Catalog::follow`] also lists the
/// snapshots, to notice that it fell behind the log's pruning.
pub const FOLLOW_SNAPSHOT_CHECK_EVERY: u64 = 10;

impl Catalog {
    /// Loads the catalog from `store`: the newest snapshot, then the log after it.
    pub async fn load(store: Arc<dyn ObjectStore>, default_partition_nanos: i64) -> Result<Self> {
        let (state, snapshot) = log::load_state(&store).await?;
        Ok(Self {
            store,
            state: RwLock::new(Arc::new(state)),
            commit: tokio::sync::Mutex::new(()),
            snapshotting: Arc::default(),
            last_snapshot: snapshot.get().into(),
            default_partition_nanos,
            limits: SchemaLimits::default(),
            idle_follows: 0.into(),
            read_only: false,
        })
    }

    /// The catalog of a server that only reads it (a querier): every commit is refused
    /// with [`Error::ReadOnly`]; [`Catalog::follow`] brings in what others write.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// For a server that only reads the catalog (a querier): applies the transactions other
    /// servers added to the log since the current state, and makes the result current.
    /// Every [`FOLLOW_SNAPSHOT_CHECK_EVERY`] calls that find no next entry it also lists the
    /// snapshots: one newer than the state means the entries it needs were pruned (it fell
    /// that far behind), and the state is loaded again from the newest snapshot. Whether
    /// the state changed.
    pub async fn follow(&self) -> Result<bool> {
        use std::sync::atomic::Ordering;
        let _guard = self.commit.lock().await;
        let current = self.snapshot();
        let mut next = CatalogState::clone(&current);
        if log::catch_up(&self.store, &mut next).await? {
            *self.state.write() = Arc::new(next);
            return Ok(true);
        }
        let idle = self.idle_follows.fetch_add(1, Ordering::Relaxed) + 1;
        if !idle.is_multiple_of(FOLLOW_SNAPSHOT_CHECK_EVERY) {
            return Ok(false);
        }
        let snapshots = log::list_sequences(&self.store, log::SNAPSHOT_PREFIX).await?;
        if snapshots
            .last()
            .is_none_or(|newest| *newest <= current.sequence)
        {
            return Ok(false);
        }
        let (loaded, _) = log::load_state(&self.store).await?;
        if loaded.sequence <= current.sequence {
            return Ok(false);
        }
        tracing::info!(
            from = %current.sequence,
            to = %loaded.sequence,
            "fell behind the catalog log's pruning; loaded the newest snapshot"
        );
        *self.state.write() = Arc::new(loaded);
        Ok(true)
    }

    /// The catalog with other bounds on what writes may create (existing objects stay).
    pub fn with_limits(mut self, limits: SchemaLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The current state; cheap, and unaffected by later commits.
    pub fn snapshot(&self) -> Arc<CatalogState> {
        Arc::clone(&self.state.read())
    }

    /// Validates `events` against the current state, writes them as one transaction and
    /// makes them current. Nothing is applied if any event is invalid.
    ///
    /// The commit runs to completion even if the caller stops waiting: a commit cut short
    /// between writing the log entry and publishing the new state would leave the two
    /// apart.
    pub async fn commit(self: &Arc<Self>, events: Vec<CatalogEvent>) -> Result<Arc<CatalogState>> {
        let this = Arc::clone(self);
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (state, ()) = this.commit_locked(|_| Ok((events.clone(), ()))).await?;
            Ok(state)
        })
        .await
    }

    /// Commits the events `compute` makes from the current state. On a conflict (another
    /// writer took the sequence, or an earlier attempt of ours landed although it reported
    /// an error) it catches up with the log and computes them again: what depends on the
    /// state, segment ids above all, is never taken from a state the log has moved past.
    pub async fn commit_with(
        self: &Arc<Self>,
        compute: impl FnMut(&CatalogState) -> Result<Vec<CatalogEvent>> + Send + 'static,
    ) -> Result<Arc<CatalogState>> {
        let this = Arc::clone(self);
        let mut compute = compute;
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (state, ()) = this
                .commit_locked(|state| compute(state).map(|events| (events, ())))
                .await?;
            Ok(state)
        })
        .await
    }

    /// With the commit lock held: computes events from the current state with `compute`
    /// (which also returns what the caller wants back) and commits them. If the log
    /// already holds the sequence, catches up with it and computes again, so events are
    /// always checked against the state they follow.
    async fn commit_locked<T>(
        &self,
        mut compute: impl FnMut(&CatalogState) -> Result<(Vec<CatalogEvent>, T)>,
    ) -> Result<(Arc<CatalogState>, T)> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.snapshot();
            let (events, out) = compute(&current)?;
            match self.append(&current, events).await {
                Ok(next) => return Ok((next, out)),
                Err(Error::Conflict { sequence }) => {
                    let mut caught_up = CatalogState::clone(&current);
                    log::catch_up(&self.store, &mut caught_up).await?;
                    if caught_up.sequence < sequence {
                        // The entry vanished between the put and the read: not a writer
                        // this catalog can follow.
                        return Err(Error::Conflict { sequence });
                    }
                    tracing::info!(
                        from = %current.sequence,
                        to = %caught_up.sequence,
                        "catalog sequence taken; caught up with the log and retrying"
                    );
                    *self.state.write() = Arc::new(caught_up);
                    if attempt >= COMMIT_ATTEMPTS {
                        return Err(Error::Conflict { sequence });
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `events` as the transaction after `current` and makes the result current.
    async fn append(
        &self,
        current: &Arc<CatalogState>,
        events: Vec<CatalogEvent>,
    ) -> Result<Arc<CatalogState>> {
        if events.is_empty() {
            return Ok(Arc::clone(current));
        }
        let mut next = CatalogState::clone(current);
        for event in &events {
            next.apply(event)?;
        }
        next.sequence = current.sequence.next();
        let tx = format::Transaction {
            sequence: next.sequence,
            events,
        };
        let path = log::log_path(next.sequence);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(
                &path,
                PutPayload::from(format::encode_transaction(&tx)),
                opts,
            )
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(Error::Conflict {
                    sequence: next.sequence,
                });
            }
            Err(source) => {
                return Err(Error::Store {
                    path: path.to_string(),
                    source,
                });
            }
        }
        let next = Arc::new(next);
        *self.state.write() = Arc::clone(&next);
        let since = next.sequence.get() - self.last_snapshot.load(Ordering::Relaxed);
        if since >= snapshot_interval(&next) {
            // Off the commit path; put off if the previous one is still being written.
            if let Ok(guard) = Arc::clone(&self.snapshotting).try_lock_owned() {
                self.last_snapshot
                    .store(next.sequence.get(), Ordering::Relaxed);
                let (store, state) = (Arc::clone(&self.store), Arc::clone(&next));
                tokio::spawn(async move {
                    log::snapshot_and_prune(store, state).await;
                    drop(guard);
                });
            }
        }
        Ok(next)
    }

    /// Gives table `table` of `database` a last-value cache keyed by `key_columns` (all its
    /// tags if empty). Replaces the table's cache if it has one.
    pub async fn create_last_cache(
        self: &Arc<Self>,
        database: &str,
        table: &str,
        key_columns: &[String],
    ) -> Result<LastCacheDef> {
        let state = self.snapshot();
        let Some(def) = state.table(database, table) else {
            return Err(Error::TableNotFound {
                database: database.to_owned(),
                table: table.to_owned(),
            });
        };
        let key_columns = if key_columns.is_empty() {
            def.tag_columns().map(|c| c.name.clone()).collect()
        } else {
            key_columns.to_vec()
        };
        let id = def.id;
        let state = self
            .commit(vec![CatalogEvent::LastCacheCreated {
                table: id,
                key_columns,
            }])
            .await?;
        Ok(state.last_caches[&id].clone())
    }

    /// Drops the last-value cache of `table`; `false` if it had none.
    pub async fn drop_last_cache(self: &Arc<Self>, database: &str, table: &str) -> Result<bool> {
        let state = self.snapshot();
        let Some(id) = state
            .table(database, table)
            .map(|t| t.id)
            .filter(|id| state.last_caches.contains_key(id))
        else {
            return Ok(false);
        };
        self.commit(vec![CatalogEvent::LastCacheDropped { table: id }])
            .await?;
        Ok(true)
    }

    /// Records a new token (its id is assigned here): `def.id` is ignored.
    pub async fn create_token(self: &Arc<Self>, mut def: TokenDef) -> Result<TokenDef> {
        let this = Arc::clone(self);
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            validate_name(&def.name)?;
            let (state, id) = this
                .commit_locked(|state| {
                    def.id = TokenId(state.next_token_id);
                    Ok((vec![CatalogEvent::TokenCreated(def.clone())], def.id))
                })
                .await?;
            Ok(state.tokens[&id].clone())
        })
        .await
    }

    /// Revokes the token named `name`; `None` if there is none. The last admin token is
    /// revoked only with `allow_last_admin` (a server started with an admin token file
    /// has another).
    pub async fn revoke_token(
        self: &Arc<Self>,
        name: &str,
        allow_last_admin: bool,
    ) -> Result<Option<TokenDef>> {
        let this = Arc::clone(self);
        let name = name.to_owned();
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (_, revoked) = this
                .commit_locked(|state| {
                    let Some(def) = state.token(&name).cloned() else {
                        return Ok((vec![], None));
                    };
                    let admins = state
                        .tokens
                        .values()
                        .filter(|t| t.permissions == TokenPermissions::Admin)
                        .count();
                    if def.permissions == TokenPermissions::Admin
                        && admins == 1
                        && !allow_last_admin
                    {
                        return Err(Error::InvalidToken(format!(
                            "{name:?} is the last admin token: create another admin token first"
                        )));
                    }
                    Ok((vec![CatalogEvent::TokenRevoked { id: def.id }], Some(def)))
                })
                .await?;
            Ok(revoked)
        })
        .await
    }

    /// Records a new alert rule (its id is assigned here: `def.id` is ignored).
    pub async fn create_alert_rule(
        self: &Arc<Self>,
        mut def: alerts::AlertRuleDef,
    ) -> Result<alerts::AlertRuleDef> {
        let this = Arc::clone(self);
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            validate_name(&def.name)?;
            let (state, id) = this
                .commit_locked(|state| {
                    def.id = AlertRuleId(state.alerts.next_rule_id);
                    Ok((vec![CatalogEvent::AlertRuleCreated(def.clone())], def.id))
                })
                .await?;
            Ok(state.alerts.rules[&id].clone())
        })
        .await
    }

    /// Deletes the alert rule named `name` (`None` if there is none). Its pending and
    /// firing alerts are resolved first, in the same transaction, by `resolve`, which
    /// turns an alert into its resolving transition.
    pub async fn delete_alert_rule(
        self: &Arc<Self>,
        name: &str,
        resolve: impl Fn(&alerts::AlertRuleDef, &alerts::AlertInstance) -> alerts::AlertTransition
        + Send
        + Sync
        + 'static,
    ) -> Result<Option<alerts::AlertRuleDef>> {
        let this = Arc::clone(self);
        let name = name.to_owned();
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (_, deleted) = this
                .commit_locked(|state| {
                    let Some(def) = state.alerts.rule(&name).cloned() else {
                        return Ok((vec![], None));
                    };
                    let mut events: Vec<_> = state
                        .alerts
                        .instances
                        .get(&def.id)
                        .into_iter()
                        .flat_map(|m| m.values())
                        .map(|i| CatalogEvent::AlertTransitioned(resolve(&def, i)))
                        .collect();
                    number_transitions(state, &mut events);
                    events.push(CatalogEvent::AlertRuleDeleted { id: def.id });
                    Ok((events, Some(def)))
                })
                .await?;
            Ok(deleted)
        })
        .await
    }

    /// Sets (or, with `None`, removes) attributes of the device `tag`=`value` of `database`.
    pub async fn set_device_attributes(
        self: &Arc<Self>,
        database: &str,
        tag: &str,
        value: &str,
        attributes: BTreeMap<String, Option<String>>,
    ) -> Result<Arc<CatalogState>> {
        self.set_devices_attributes(database, vec![(tag.into(), value.into(), attributes)])
            .await
    }

    /// [`Self::set_device_attributes`] for several devices `(tag, value, attributes)` of
    /// `database`, in one transaction.
    pub async fn set_devices_attributes(
        self: &Arc<Self>,
        database: &str,
        devices: Vec<(String, String, BTreeMap<String, Option<String>>)>,
    ) -> Result<Arc<CatalogState>> {
        for (tag, _, attributes) in &devices {
            for name in [tag.as_str()]
                .into_iter()
                .chain(attributes.keys().map(String::as_str))
            {
                validate_column_name(name)?;
            }
        }
        if self.snapshot().database(database).is_none() {
            return Err(Error::InvalidName {
                name: database.to_owned(),
                reason: "no database has this name",
            });
        }
        let events = devices
            .into_iter()
            .map(
                |(tag, value, attributes)| CatalogEvent::DeviceAttributesSet {
                    database: database.to_owned(),
                    tag,
                    value,
                    attributes,
                },
            )
            .collect();
        self.commit(events).await
    }

    /// Sets when the series of table `table` of `database` count as stale and offline.
    pub async fn set_staleness(
        self: &Arc<Self>,
        database: &str,
        table: &str,
        staleness: devices::Staleness,
    ) -> Result<Arc<CatalogState>> {
        let Some(id) = self.snapshot().table(database, table).map(|t| t.id) else {
            return Err(Error::TableNotFound {
                database: database.to_owned(),
                table: table.to_owned(),
            });
        };
        self.commit(vec![CatalogEvent::SeriesStalenessSet {
            table: id,
            staleness,
        }])
        .await
    }

    /// Records alert transitions (and deliveries) as one transaction, numbering the
    /// transitions.
    pub async fn record_alerts(self: &Arc<Self>, events: Vec<CatalogEvent>) -> Result<()> {
        let this = Arc::clone(self);
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            this.commit_locked(|state| {
                let mut events = events.clone();
                number_transitions(state, &mut events);
                Ok((events, ()))
            })
            .await
            .map(drop)
        })
        .await
    }

    /// Creates the database, tables and columns `changes` name, as one transaction.
    /// Changes already in the catalog are skipped; a column that exists with another type
    /// is a [`Error::TypeConflict`] and nothing is committed.
    pub async fn ensure_schema(
        self: &Arc<Self>,
        database: &str,
        changes: &[SchemaChange],
    ) -> Result<Arc<CatalogState>> {
        let this = Arc::clone(self);
        let database = database.to_owned();
        let changes = changes.to_vec();
        run_to_completion(async move { this.ensure_schema_locked(&database, &changes).await }).await
    }

    async fn ensure_schema_locked(
        &self,
        database: &str,
        changes: &[SchemaChange],
    ) -> Result<Arc<CatalogState>> {
        let _guard = self.commit.lock().await;
        let (state, ()) = self
            .commit_locked(|state| Ok((self.schema_events(state, database, changes)?, ())))
            .await?;
        Ok(state)
    }

    /// The events that add to `state` what `changes` name and it lacks.
    fn schema_events(
        &self,
        state: &CatalogState,
        database: &str,
        changes: &[SchemaChange],
    ) -> Result<Vec<CatalogEvent>> {
        let mut events = Vec::new();
        let db_id = match state.database(database) {
            Some(db) => db.id,
            None => {
                validate_name(database)?;
                if database == SYSTEM_SCHEMA {
                    return Err(Error::InvalidName {
                        name: database.to_owned(),
                        reason: "the name is reserved for Kiln's system tables",
                    });
                }
                if state.databases.len() >= self.limits.max_databases {
                    return Err(Error::LimitExceeded(format!(
                        "cannot create database {database:?}: the server holds {} databases, \
                         its limit (--max-databases)",
                        state.databases.len()
                    )));
                }
                let id = DatabaseId(state.next_database_id);
                events.push(CatalogEvent::DatabaseCreated {
                    id,
                    name: database.to_owned(),
                });
                id
            }
        };
        let mut new_tables: BTreeMap<&str, TableId> = BTreeMap::new();
        let mut next_table = state.next_table_id;
        let mut added: BTreeMap<(TableId, &str), ColumnType> = BTreeMap::new();
        for change in changes {
            let table_id = match state.table(database, &change.table) {
                Some(t) => {
                    if let Some(existing) = t.column(&change.column) {
                        if existing.ty != change.ty {
                            return Err(Error::TypeConflict {
                                table: change.table.clone(),
                                column: change.column.clone(),
                                existing: existing.ty,
                                requested: change.ty,
                            });
                        }
                        continue;
                    }
                    t.id
                }
                None => match new_tables.get(change.table.as_str()) {
                    Some(id) => *id,
                    None => {
                        validate_name(&change.table)?;
                        let tables = state.tables.len() + new_tables.len();
                        if tables >= self.limits.max_tables {
                            return Err(Error::LimitExceeded(format!(
                                "cannot create table {:?}: the server holds {tables} tables, its \
                                 limit (--max-tables)",
                                change.table
                            )));
                        }
                        let id = TableId(next_table);
                        next_table += 1;
                        new_tables.insert(&change.table, id);
                        events.push(CatalogEvent::TableCreated {
                            id,
                            database: db_id,
                            name: change.table.clone(),
                            partition_nanos: self.default_partition_nanos,
                        });
                        id
                    }
                },
            };
            match added.get(&(table_id, change.column.as_str())) {
                Some(ty) if *ty == change.ty => continue,
                Some(ty) => {
                    return Err(Error::TypeConflict {
                        table: change.table.clone(),
                        column: change.column.clone(),
                        existing: *ty,
                        requested: change.ty,
                    });
                }
                None => {}
            }
            validate_column_name(&change.column)?;
            let existing = state.table_by_id(table_id).map_or(1, |t| t.columns.len());
            let new = added.keys().filter(|(t, _)| *t == table_id).count();
            if existing + new >= self.limits.max_columns_per_table {
                return Err(Error::LimitExceeded(format!(
                    "cannot add column {:?} to table {:?}: it has {} columns, the limit \
                     (--max-columns-per-table)",
                    change.column,
                    change.table,
                    existing + new
                )));
            }
            added.insert((table_id, &change.column), change.ty);
            events.push(CatalogEvent::ColumnAdded {
                table: table_id,
                column: ColumnDef {
                    name: change.column.clone(),
                    ty: change.ty,
                },
            });
        }
        Ok(events)
    }
}

/// Gives each transition among `events` the next event id after `state`'s.
fn number_transitions(state: &CatalogState, events: &mut [CatalogEvent]) {
    let mut next = state.alerts.next_event_id;
    for event in events {
        if let CatalogEvent::AlertTransitioned(t) = event {
            t.id = AlertEventId(next);
            next += 1;
        }
    }
}

/// Runs `f` on its own task so that dropping the caller's future does not cancel it.
async fn run_to_completion<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// The longest database, table or column name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// Checks a database or table name: not empty, at most [`MAX_NAME_BYTES`], no control
/// characters (NUL included), no `/` and no `..` (names may one day be paths in an object
/// store).
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.contains('/') {
        "names must not contain '/'"
    } else if name.contains("..") {
        "names must not contain '..'"
    } else {
        return validate_column_name(name);
    };
    Err(Error::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Checks a column name: not empty, at most [`MAX_NAME_BYTES`], no control characters.
pub fn validate_column_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "names must not be empty"
    } else if name.len() > MAX_NAME_BYTES {
        "names must be at most 255 bytes"
    } else if name.chars().any(char::is_control) {
        "names must not contain control characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.chars().take(64).collect(),
        reason,
    })
}

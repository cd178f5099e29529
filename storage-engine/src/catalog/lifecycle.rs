//! Databases and tables as managed objects, and retention: what the catalog keeps of
//! them and the events that change it.
//!
//! * A database or table is created by a write (as always) or explicitly, and **deleted in
//!   two steps**. [`DatabaseDeleted`] / [`TableDeleted`] (soft delete) take it out of every
//!   name lookup at once (its name is free for a new object, which gets new ids) and keep
//!   its definition and segment list among the *dropped* objects until its hard-delete
//!   time; [`DroppedPurged`] (hard delete) forgets it, after which its files go once no
//!   running query reads them. Ids are never reused, so a WAL record or any other
//!   reference to an id below the next one that names no live object names a dropped one.
//! * A **retention** (per database, optionally overridden per table, [`RetentionSet`])
//!   makes rows older than `now − retention` invisible to queries and refused by writes;
//!   [`SegmentsExpired`] removes segments whose every row is older than that.
//!
//! [`DatabaseDeleted`]: super::CatalogEvent::DatabaseDeleted
//! [`TableDeleted`]: super::CatalogEvent::TableDeleted
//! [`DroppedPurged`]: super::CatalogEvent::DroppedPurged
//! [`RetentionSet`]: super::CatalogEvent::RetentionSet
//! [`SegmentsExpired`]: super::CatalogEvent::SegmentsExpired

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Catalog, CatalogEvent, CatalogState, DatabaseDef, Error, Result, SegmentMeta, TableDef,
    run_to_completion,
};
use crate::ids::{DatabaseId, SegmentId, TableId};

/// A soft-deleted database, listed until its hard delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedDatabase {
    pub id: DatabaseId,
    pub name: String,
    /// Nanoseconds since the epoch.
    pub deleted_at: i64,
    /// When its files are deleted (nanoseconds since the epoch).
    pub hard_delete_at: i64,
    pub tables: Vec<TableId>,
}

/// A soft-deleted table (alone or with its database): what its files are, until its hard
/// delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedTable {
    pub def: TableDef,
    pub database: String,
    pub deleted_at: i64,
    pub hard_delete_at: i64,
    pub segments: Vec<SegmentMeta>,
}

impl CatalogState {
    /// Whether `id` was a table that has been deleted (soft or hard).
    pub fn is_dropped_table(&self, id: TableId) -> bool {
        id.get() < self.next_table_id && !self.tables.contains_key(&id)
    }

    /// Whether `id` was a database that has been deleted (soft or hard).
    pub fn is_dropped_database(&self, id: DatabaseId) -> bool {
        id.get() < self.next_database_id && !self.databases.values().any(|d| d.id == id)
    }

    /// How long `table` keeps rows: its own retention, else its database's (`None`:
    /// forever).
    pub fn retention(&self, table: TableId) -> Option<i64> {
        let def = self.tables.get(&table)?;
        def.retention_nanos.or_else(|| {
            self.databases
                .values()
                .find(|d| d.id == def.database)?
                .retention_nanos
        })
    }

    /// How long table `table` of `database` keeps rows, or would once a write creates it
    /// (its database's retention).
    pub fn retention_by_name(&self, database: &str, table: &str) -> Option<i64> {
        match self.table(database, table) {
            Some(def) => self.retention(def.id),
            None => self.database(database)?.retention_nanos,
        }
    }

    /// The oldest time `table` still holds at `now`: rows before it are expired.
    pub fn retention_cutoff(&self, table: TableId, now: i64) -> Option<i64> {
        self.retention(table).map(|r| now.saturating_sub(r))
    }

    /// Soft-deletes the database `id` with all its tables.
    pub(super) fn delete_database(
        &mut self,
        id: DatabaseId,
        deleted_at: i64,
        hard_delete_at: i64,
    ) -> Result<()> {
        let name = self
            .databases
            .values()
            .find(|d| d.id == id)
            .map(|d| d.name.clone())
            .ok_or(Error::UnknownDatabase(id))?;
        let Some(db) = self.databases.remove(&name) else {
            return Err(Error::UnknownDatabase(id));
        };
        let hard_delete_at = hard_delete_at.max(deleted_at);
        let tables: Vec<TableId> = db.tables.values().copied().collect();
        for &table in &tables {
            self.drop_table(table, &name, deleted_at, hard_delete_at);
        }
        self.devices.remove(&name);
        self.dropped_databases.insert(
            id,
            DroppedDatabase {
                id,
                name,
                deleted_at,
                hard_delete_at,
                tables,
            },
        );
        Ok(())
    }

    /// Soft-deletes the table `id`.
    pub(super) fn delete_table(
        &mut self,
        id: TableId,
        deleted_at: i64,
        hard_delete_at: i64,
    ) -> Result<()> {
        let def = self.tables.get(&id).ok_or(Error::UnknownTable(id))?;
        let db = self
            .databases
            .values_mut()
            .find(|d| d.id == def.database)
            .ok_or(Error::UnknownDatabase(def.database))?;
        db.tables.remove(&def.name);
        let name = db.name.clone();
        self.drop_table(id, &name, deleted_at, hard_delete_at.max(deleted_at));
        Ok(())
    }

    /// Moves table `id` (already out of its database's names) among the dropped ones.
    fn drop_table(&mut self, id: TableId, database: &str, deleted_at: i64, hard_delete_at: i64) {
        let Some(def) = self.tables.remove(&id) else {
            return;
        };
        let segments = self
            .segments
            .remove(&id)
            .map(Arc::unwrap_or_clone)
            .unwrap_or_default();
        self.last_caches.remove(&id);
        self.staleness.remove(&id);
        self.tombstones.retain(|_, t| t.table != id);
        // A deleted view's definition goes with its table; a view of a deleted source
        // keeps its rows and is refreshed no more.
        self.views.remove(&id);
        self.dropped_tables.insert(
            id,
            DroppedTable {
                def,
                database: database.to_owned(),
                deleted_at,
                hard_delete_at,
                segments,
            },
        );
    }

    /// Forgets dropped databases and tables (their files are being deleted).
    pub(super) fn purge(&mut self, databases: &[DatabaseId], tables: &[TableId]) {
        for id in databases {
            self.dropped_databases.remove(id);
        }
        for id in tables {
            self.dropped_tables.remove(id);
        }
    }

    /// Sets the retention of a database, or of one of its tables.
    pub(super) fn set_retention(
        &mut self,
        database: DatabaseId,
        table: Option<TableId>,
        retention: Option<i64>,
    ) -> Result<()> {
        if retention.is_some_and(|r| r <= 0) {
            return Err(Error::InvalidRetention(
                "a retention must be longer than zero".into(),
            ));
        }
        match table {
            Some(id) => {
                let def = self.tables.get_mut(&id).ok_or(Error::UnknownTable(id))?;
                if def.database != database {
                    return Err(Error::UnknownTable(id));
                }
                def.retention_nanos = retention;
            }
            None => {
                let db = self
                    .databases
                    .values_mut()
                    .find(|d| d.id == database)
                    .ok_or(Error::UnknownDatabase(database))?;
                db.retention_nanos = retention;
            }
        }
        Ok(())
    }

    /// Removes `segments` of `table` (expired, or emptied by deletes).
    pub(super) fn expire(&mut self, table: TableId, segments: &[SegmentId]) -> Result<()> {
        let list = Arc::make_mut(
            self.segments
                .get_mut(&table)
                .ok_or(Error::UnknownTable(table))?,
        );
        list.retain(|s| !segments.contains(&s.id));
        Ok(())
    }
}

impl Catalog {
    /// Creates the database `name` (with a retention), refusing one that exists.
    pub async fn create_database(
        self: &Arc<Self>,
        name: &str,
        retention: Option<i64>,
    ) -> Result<DatabaseDef> {
        let this = Arc::clone(self);
        let name = name.to_owned();
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (state, ()) = this
                .commit_locked(|state| {
                    if state.database(&name).is_some() {
                        return Err(Error::DatabaseExists(name.clone()));
                    }
                    let mut events = this.schema_events(state, &name, &[])?;
                    if let Some(CatalogEvent::DatabaseCreated { id, .. }) = events.first() {
                        let id = *id;
                        events.push(CatalogEvent::RetentionSet {
                            database: id,
                            table: None,
                            retention_nanos: retention,
                        });
                    }
                    Ok((events, ()))
                })
                .await?;
            state
                .database(&name)
                .cloned()
                .ok_or_else(|| Error::DatabaseNotFound(name.clone()))
        })
        .await
    }

    /// Sets the retention of database `database` or, with `table`, of that table (`None`:
    /// forever, or for a table, as its database).
    pub async fn set_retention(
        self: &Arc<Self>,
        database: &str,
        table: Option<&str>,
        retention: Option<i64>,
    ) -> Result<Arc<CatalogState>> {
        let state = self.snapshot();
        let db = state
            .database(database)
            .ok_or_else(|| Error::DatabaseNotFound(database.to_owned()))?;
        let table = match table {
            Some(t) => Some(
                state
                    .table(database, t)
                    .ok_or_else(|| Error::TableNotFound {
                        database: database.to_owned(),
                        table: t.to_owned(),
                    })?
                    .id,
            ),
            None => None,
        };
        self.commit(vec![CatalogEvent::RetentionSet {
            database: db.id,
            table,
            retention_nanos: retention,
        }])
        .await
    }

    /// Soft-deletes database `name` (see the module docs); its files are deleted from
    /// `hard_delete_at` on.
    pub async fn delete_database(
        self: &Arc<Self>,
        name: &str,
        now: i64,
        hard_delete_at: i64,
    ) -> Result<DroppedDatabase> {
        let id = self
            .snapshot()
            .database(name)
            .map(|d| d.id)
            .ok_or_else(|| Error::DatabaseNotFound(name.to_owned()))?;
        let state = self
            .commit(vec![CatalogEvent::DatabaseDeleted {
                id,
                deleted_at: now,
                hard_delete_at,
            }])
            .await?;
        state
            .dropped_databases
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownDatabase(id))
    }

    /// Soft-deletes table `table` of `database` (see the module docs).
    pub async fn delete_table(
        self: &Arc<Self>,
        database: &str,
        table: &str,
        now: i64,
        hard_delete_at: i64,
    ) -> Result<DroppedTable> {
        let state = self.snapshot();
        if state.database(database).is_none() {
            return Err(Error::DatabaseNotFound(database.to_owned()));
        }
        let id =
            state
                .table(database, table)
                .map(|t| t.id)
                .ok_or_else(|| Error::TableNotFound {
                    database: database.to_owned(),
                    table: table.to_owned(),
                })?;
        let state = self
            .commit(vec![CatalogEvent::TableDeleted {
                id,
                deleted_at: now,
                hard_delete_at,
            }])
            .await?;
        state
            .dropped_tables
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownTable(id))
    }

    /// Forgets the dropped databases and tables whose hard-delete time is at or before
    /// `now`, and returns the tables forgotten (whose files the caller deletes).
    pub async fn purge_dropped(self: &Arc<Self>, now: i64) -> Result<Vec<DroppedTable>> {
        let state = self.snapshot();
        let tables: Vec<DroppedTable> = state
            .dropped_tables
            .values()
            .filter(|t| t.hard_delete_at <= now)
            .cloned()
            .collect();
        let databases: Vec<DatabaseId> = state
            .dropped_databases
            .values()
            .filter(|d| d.hard_delete_at <= now)
            .map(|d| d.id)
            .collect();
        if tables.is_empty() && databases.is_empty() {
            return Ok(Vec::new());
        }
        self.commit(vec![CatalogEvent::DroppedPurged {
            databases,
            tables: tables.iter().map(|t| t.def.id).collect(),
        }])
        .await?;
        Ok(tables)
    }
}

/// What a retention pass may expire of one table at `now`: its segments wholly older than
/// the cutoff, and the cutoff.
pub fn expired_segments(
    state: &CatalogState,
    table: TableId,
    now: i64,
) -> Option<(i64, Vec<SegmentMeta>)> {
    let cutoff = state.retention_cutoff(table, now)?;
    let expired: Vec<SegmentMeta> = state
        .segments(table)
        .iter()
        .filter(|s| s.max_time < cutoff)
        .cloned()
        .collect();
    Some((cutoff, expired))
}

/// Parses a retention as the API and CLI take it: a duration (`30d`, `12h`, `1w`) or
/// `none` (keep forever).
pub fn parse_retention(text: &str) -> Result<Option<i64>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") || text.eq_ignore_ascii_case("infinite") {
        return Ok(None);
    }
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid retention {text:?} (a duration like 30d, or none): {e}"))?;
    if d.is_zero() {
        return Err("a retention must be longer than zero".into());
    }
    i64::try_from(d.as_nanos())
        .map(Some)
        .map_err(|_| format!("retention {text:?} is too long"))
}

/// A retention in the form [`parse_retention`] reads (`30days`, `none`).
pub fn format_retention(retention: Option<i64>) -> String {
    match retention {
        Some(n) => {
            humantime::format_duration(std::time::Duration::from_nanos(n as u64)).to_string()
        }
        None => "none".into(),
    }
}

impl Catalog {
    /// Records the delete logged as WAL sequence `through`, as a tombstone of `table` (its
    /// id, and the first segment id it does not apply to, are assigned here). The caller
    /// holds the engine's persistence lock, so no segment is being committed meanwhile.
    pub async fn record_delete(
        self: &Arc<Self>,
        table: TableId,
        predicate: super::tombstones::DeletePredicate,
        through: crate::ids::SequenceNumber,
        now: i64,
    ) -> Result<super::tombstones::Tombstone> {
        let this = Arc::clone(self);
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (state, id) = this
                .commit_locked(|state| {
                    let tombstone = super::tombstones::Tombstone {
                        id: crate::ids::TombstoneId(state.next_tombstone_id),
                        table,
                        predicate: predicate.clone(),
                        through,
                        segments_before: SegmentId(state.next_segment_id),
                        created_at: now,
                    };
                    let id = tombstone.id;
                    Ok((vec![CatalogEvent::RowsDeleted(tombstone)], id))
                })
                .await?;
            state
                .tombstones
                .get(&id)
                .cloned()
                .ok_or(Error::UnknownTable(table))
        })
        .await
    }
}

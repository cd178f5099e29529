//! Encodings of the catalog log and snapshots. Both are JSON objects with a `version`
//! field; version 1 is below. A reader refuses versions it does not know and names the
//! ones it supports.
//!
//! Transaction (`catalog/log/{sequence:020}.json`):
//! `{"version": 1, "sequence": N, "events": [CatalogEvent, …]}` where each event is an
//! object tagged by `"type"` (`database_created`, `table_created`, `column_added`,
//! `segment_persisted`, `segments_compacted`, `wal_persisted`, `last_cache_created`,
//! `last_cache_dropped`, `source_positions`, `token_created`, `token_revoked`,
//! `alert_rule_created`, `alert_rule_deleted`, `alert_transitioned`, `alert_delivered`,
//! `device_attributes_set`, `series_staleness_set`).
//!
//! Snapshot (`catalog/snapshots/{sequence:020}.json`):
//! `{"version": 1, "state": CatalogState}`.

use serde::{Deserialize, Serialize};

use super::{CatalogEvent, CatalogState};
use crate::ids::CatalogSequence;

pub const VERSION: u32 = 1;
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    pub sequence: CatalogSequence,
    pub events: Vec<CatalogEvent>,
}

/// Read after [`check_version`] has checked `version`.
#[derive(Deserialize)]
struct TransactionV1 {
    #[serde(flatten)]
    tx: Transaction,
}

#[derive(Serialize)]
struct TransactionV1Ref<'a> {
    version: u32,
    #[serde(flatten)]
    tx: &'a Transaction,
}

/// Read after [`check_version`] has checked `version`.
#[derive(Deserialize)]
struct SnapshotV1 {
    state: CatalogState,
}

/// Written without copying the state (a snapshot can be large).
#[derive(Serialize)]
struct SnapshotV1Ref<'a> {
    version: u32,
    state: &'a CatalogState,
}

#[derive(Deserialize)]
struct Versioned {
    version: u32,
}

/// Why bytes from the catalog's log or snapshots cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a catalog entry")]
    Json(#[from] serde_json::Error),
    #[error(
        "unsupported catalog format version {found}; supported versions: {SUPPORTED_VERSIONS:?}"
    )]
    Version { found: u32 },
    #[error(
        "the log starts at transaction {first} but the newest readable snapshot is of \
         {snapshot}; the transactions in between are missing"
    )]
    Missing {
        first: CatalogSequence,
        snapshot: CatalogSequence,
    },
    #[error("transaction {found} follows {previous}; the log has a gap")]
    Gap {
        found: CatalogSequence,
        previous: CatalogSequence,
    },
}

fn check_version(bytes: &[u8]) -> Result<(), DecodeError> {
    let v: Versioned = serde_json::from_slice(bytes)?;
    if SUPPORTED_VERSIONS.contains(&v.version) {
        Ok(())
    } else {
        Err(DecodeError::Version { found: v.version })
    }
}

pub fn encode_transaction(tx: &Transaction) -> Vec<u8> {
    serde_json::to_vec(&TransactionV1Ref {
        version: VERSION,
        tx,
    })
    .expect("catalog types always serialize")
}

pub fn decode_transaction(bytes: &[u8]) -> Result<Transaction, DecodeError> {
    check_version(bytes)?;
    let v: TransactionV1 = serde_json::from_slice(bytes)?;
    Ok(v.tx)
}

pub fn encode_snapshot(state: &CatalogState) -> Vec<u8> {
    serde_json::to_vec(&SnapshotV1Ref {
        version: VERSION,
        state,
    })
    .expect("catalog types always serialize")
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<CatalogState, DecodeError> {
    check_version(bytes)?;
    let v: SnapshotV1 = serde_json::from_slice(bytes)?;
    Ok(v.state)
}

//! Device health over HTTP and the CLI: device attributes and series staleness (catalog
//! events); the inventory itself is SQL (`system.series`, `system.devices`,
//! `system.data_quality`).
//!
//! | method and path | what | needs |
//! |---|---|---|
//! | `PUT /api/v3/devices` | set attributes of a device (JSON, see [`SetDevice`]); `null` removes one | write on the database |
//! | `GET /api/v3/devices` | every device with attributes | read (the databases the token reads) |
//! | `PUT /api/v3/series/staleness` | when a table's series are stale and offline (see [`SetStaleness`]) | write on the database |

pub mod cli;

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_storage::catalog::devices::Staleness;
use serde::{Deserialize, Serialize};

use crate::auth::http::{refusal, require};
use crate::auth::{Action, Principal};
use crate::http::{AppState, error_response as error};

/// `PUT /api/v3/devices`: the device `tag`=`value` of `database`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDevice {
    pub database: String,
    pub tag: String,
    pub value: String,
    /// Attribute name → value; `null` removes the attribute.
    pub attributes: BTreeMap<String, Option<String>>,
}

/// A device as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub database: String,
    pub tag: String,
    pub value: String,
    pub attributes: BTreeMap<String, String>,
}

/// `PUT /api/v3/series/staleness`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetStaleness {
    pub database: String,
    pub table: String,
    /// A duration (`5m`): series silent this long are `stale`.
    pub stale_after: String,
    /// A duration (`1h`), at least `stale_after`: series silent this long are `offline`.
    pub offline_after: String,
}

fn catalog_error(e: kiln_storage::catalog::Error) -> Response {
    use kiln_storage::catalog::Error as E;
    match e {
        E::InvalidName { .. } | E::TableNotFound { .. } => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        e => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `PUT /api/v3/devices`.
pub async fn set(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Json(request): Json<SetDevice>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Write(&request.database)) {
        return refusal(&e);
    }
    if request.attributes.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no attributes to set or remove");
    }
    match s
        .engine
        .catalog()
        .set_device_attributes(
            &request.database,
            &request.tag,
            &request.value,
            request.attributes,
        )
        .await
    {
        Ok(state) => {
            let attributes = state
                .devices
                .get(&request.database)
                .and_then(|t| t.get(&request.tag))
                .and_then(|v| v.get(&request.value))
                .cloned()
                .unwrap_or_default();
            Json(DeviceInfo {
                database: request.database,
                tag: request.tag,
                value: request.value,
                attributes,
            })
            .into_response()
        }
        Err(e) => catalog_error(e),
    }
}

/// `GET /api/v3/devices`.
pub async fn list(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Response {
    let state = s.engine.catalog_state();
    let mut out = Vec::new();
    for (db, tags) in &state.devices {
        if !principal.allows(Action::Read(db)) {
            continue;
        }
        for (tag, values) in tags {
            for (value, attributes) in values {
                out.push(DeviceInfo {
                    database: db.clone(),
                    tag: tag.clone(),
                    value: value.clone(),
                    attributes: attributes.clone(),
                });
            }
        }
    }
    Json(out).into_response()
}

fn nanos(what: &str, text: &str) -> Result<i64, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("invalid {what} {text:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{what} must be above zero"));
    }
    i64::try_from(d.as_nanos()).map_err(|_| format!("{what} {text:?} is too long"))
}

/// `PUT /api/v3/series/staleness`.
pub async fn set_staleness(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Json(request): Json<SetStaleness>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Write(&request.database)) {
        return refusal(&e);
    }
    let staleness = match (
        nanos("stale_after", &request.stale_after),
        nanos("offline_after", &request.offline_after),
    ) {
        (Ok(stale), Ok(offline)) if offline >= stale => Staleness {
            stale_after_nanos: stale,
            offline_after_nanos: offline,
        },
        (Ok(_), Ok(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "offline_after must be at least stale_after",
            );
        }
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    match s
        .engine
        .catalog()
        .set_staleness(&request.database, &request.table, staleness)
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => catalog_error(e),
    }
}

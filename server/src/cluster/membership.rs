//! An ingester's membership of a cluster (see `kiln_storage::catalog::ingesters`).
//!
//! With `--advertise-address`, an ingester joins the shared catalog before it takes a
//! write, and leaves it once a clean stop has persisted every row it took. Queriers ask
//! every joined ingester: one killed, or stopped with rows it could not persist, stays
//! joined, and queries fail naming it until it is back (or ask for partial results); one
//! that left has nothing they need.

use std::time::Duration;

use kiln_storage::Engine;

use super::ClusterArgs;
use crate::role::{FOLLOW_EVERY, Role};

/// How long an ingester that has just joined waits before it takes a write: queriers
/// follow the catalog every [`FOLLOW_EVERY`], and must have seen the join by then. One that
/// restarts still joined (after `kill -9`) does not wait: queriers were asking it all along.
const JOIN_SETTLE: Duration = FOLLOW_EVERY.saturating_mul(3);

/// An ingester that joined the catalog.
#[derive(Debug)]
pub struct Membership {
    name: String,
}

/// Refuses an `--advertise-address` a querier could not use, or given to a server that is
/// not an ingester.
pub fn check(role: Role, args: &ClusterArgs) -> Result<(), String> {
    let Some(address) = &args.advertise_address else {
        return Ok(());
    };
    if role != Role::Ingester {
        return Err(format!(
            "--advertise-address is the address an ingester joins the catalog with: give it \
             to servers of --role ingester, not {}",
            role.name()
        ));
    }
    let uri: axum::http::Uri = address.parse().map_err(|e| {
        format!("--advertise-address {address:?} is not a URL (http://host:port): {e}")
    })?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.authority().is_none() {
        return Err(format!(
            "--advertise-address {address:?} is not an http:// or https:// URL with a host, \
             such as http://kiln-ingester-0.kiln-ingester:50051"
        ));
    }
    Ok(())
}

/// Joins the catalog under `--node-name` with `--advertise-address`, if it is given.
pub async fn join(engine: &Engine, args: &ClusterArgs) -> Result<Option<Membership>, String> {
    let (Some(address), Some(name)) = (&args.advertise_address, &args.node_name) else {
        return Ok(None);
    };
    let joined_now = engine
        .catalog()
        .ingester_joined(name, address, kiln_storage::time::now_nanos())
        .await
        .map_err(|e| {
            format!(
                "cannot join the catalog as ingester {name}: {}",
                kiln_storage::error_chain(&e)
            )
        })?;
    tracing::info!(ingester = %name, %address, "joined the cluster's catalog: queriers ask this ingester");
    if joined_now {
        // A querier that has not followed the join would not ask for rows written now.
        tracing::info!(wait = ?JOIN_SETTLE, "waiting for queriers to follow the catalog before taking writes");
        tokio::time::sleep(JOIN_SETTLE).await;
    }
    Ok(Some(Membership { name: name.clone() }))
}

impl Membership {
    /// After a clean [`Engine::shutdown`]: leaves the catalog, unless rows remain that only
    /// this ingester's WAL holds (then queriers must go on failing without it).
    pub async fn leave(self, engine: &Engine) {
        let buffered = engine.buffer_bytes();
        if buffered > 0 {
            tracing::warn!(
                ingester = %self.name,
                buffered,
                "rows still unpersisted: staying in the catalog, so queriers fail naming this ingester until it is back"
            );
            return;
        }
        match engine.catalog().ingester_left(&self.name).await {
            Ok(_) => tracing::info!(ingester = %self.name, "left the cluster's catalog"),
            Err(e) => tracing::warn!(
                ingester = %self.name,
                error = %kiln_storage::error_chain(&e),
                "cannot leave the catalog: queriers fail naming this ingester until it is back"
            ),
        }
    }
}

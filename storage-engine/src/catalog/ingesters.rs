//! Ingesters announcing themselves in a cluster's catalog.
//!
//! An ingester started with an address to advertise records [`IngesterJoined`] before it
//! takes writes, and [`IngesterLeft`] once it stopped cleanly with every row it took
//! persisted. A querier asks every joined ingester for the rows it has not persisted: one
//! that does not answer is missing (its rows exist only in its WAL, and the query fails
//! naming it), one that left has nothing a querier needs.
//!
//! [`IngesterJoined`]: super::CatalogEvent::IngesterJoined
//! [`IngesterLeft`]: super::CatalogEvent::IngesterLeft

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Catalog, CatalogEvent, CatalogState, Result, run_to_completion};

/// A joined ingester: where queriers reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ingester {
    /// Its gRPC address (`http://kiln-ingester-0.kiln-ingester:50051`).
    pub address: String,
    /// When it joined with that address (nanoseconds since the epoch).
    #[serde(default)]
    pub joined_at: i64,
}

impl Catalog {
    /// Records that the ingester `name` takes writes and answers queriers at `address`
    /// (replacing the address it joined with before), from `at` (nanoseconds since the
    /// epoch). Commits nothing if the catalog says so already: `false` then, `true` if it
    /// joined now.
    pub async fn ingester_joined(
        self: &Arc<Self>,
        name: &str,
        address: &str,
        at: i64,
    ) -> Result<bool> {
        let (name, address) = (name.to_owned(), address.to_owned());
        let this = Arc::clone(self);
        run_to_completion(async move {
            let _guard = this.commit.lock().await;
            let (_, joined_now) = this
                .commit_locked(|state| {
                    Ok(match state.ingesters.get(&name) {
                        Some(joined) if joined.address == address => (Vec::new(), false),
                        _ => (
                            vec![CatalogEvent::IngesterJoined {
                                name: name.clone(),
                                address: address.clone(),
                                joined_at: at,
                            }],
                            true,
                        ),
                    })
                })
                .await?;
            Ok(joined_now)
        })
        .await
    }

    /// Records that the ingester `name` left: it has no rows a querier needs. Commits
    /// nothing if it had not joined.
    pub async fn ingester_left(self: &Arc<Self>, name: &str) -> Result<Arc<CatalogState>> {
        let name = name.to_owned();
        self.commit_with(move |state| {
            Ok(match state.ingesters.contains_key(&name) {
                true => vec![CatalogEvent::IngesterLeft { name: name.clone() }],
                false => Vec::new(),
            })
        })
        .await
    }
}

//! Newtypes for every sequence number and id the storage engine hands out.

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            pub const fn get(self) -> $inner {
                self.0
            }

            pub const fn next(self) -> Self {
                Self(self.0 + 1)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// Position of a record in the write-ahead log. Strictly increasing, never reused,
    /// and the order in which writes win (last write wins by sequence).
    SequenceNumber(u64)
);
id_type!(
    /// Number of a WAL segment file; the file is named after it.
    WalFileId(u64)
);
id_type!(
    /// A database in the catalog.
    DatabaseId(u32)
);
id_type!(
    /// A table in the catalog, unique across databases.
    TableId(u32)
);
id_type!(
    /// A persisted Parquet segment.
    SegmentId(u64)
);
id_type!(
    /// Position of a transaction in the catalog log.
    CatalogSequence(u64)
);
id_type!(
    /// An access token in the catalog.
    TokenId(u32)
);
id_type!(
    /// An alert rule in the catalog.
    AlertRuleId(u32)
);
id_type!(
    /// An alert transition, in the order they were recorded; never reused.
    AlertEventId(u64)
);
id_type!(
    /// A delete of rows (a tombstone), in the order they were made; never reused.
    TombstoneId(u64)
);

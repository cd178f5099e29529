//! Built-in profiles: settings for a kind of machine, under the configuration file's.

/// A built-in set of settings (`--profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// A 512 MiB gateway or K3s node: memory sized for it (see `config::memory`), a
    /// smaller compaction unit, request and result, and the gateway's role in the plant
    /// (it writes much and is queried little).
    Edge,
}

impl Profile {
    /// The profile's settings, as a configuration file would hold them.
    pub fn toml(self) -> &'static str {
        match self {
            Self::Edge => include_str!("../../../deploy/profiles/edge.toml"),
        }
    }

    /// How much memory the profile is for, when the process finds no limit of its own.
    pub fn memory_budget(self) -> u64 {
        match self {
            Self::Edge => 512 << 20,
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Edge => "edge",
        })
    }
}

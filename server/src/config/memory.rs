//! Memory sizes that fit the box: the write buffer and the query pool sized from the
//! memory the process may use, when no flag, variable, file or profile sets them.
//!
//! The budget is the cgroup v2 limit of the process (`/sys/fs/cgroup/memory.max`: a
//! container's or a Kubernetes pod's limit) or, without one, the profile's. Of the
//! budget, a quarter may sit in the write buffer before writes are refused, an eighth
//! makes the buffer persist, and a quarter is the queries' shared pool; the rest is the
//! process itself, Parquet encoding and the caches. Without a limit and a profile, the
//! flags' defaults stand (1 GiB, 256 MiB, 2 GiB).

use super::profile::Profile;

/// Where cgroup v2 keeps a process's memory limit (in a container, its own).
const CGROUP_MEMORY_MAX: &str = "/sys/fs/cgroup/memory.max";
/// Where cgroup v1 keeps it, on hosts that still run v1.
const CGROUP_V1_LIMIT: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";

/// The memory budget and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    pub budget: u64,
    pub source: String,
}

/// The memory limit of this process's cgroup, if it has one.
pub fn cgroup_limit() -> Option<(u64, &'static str)> {
    [CGROUP_MEMORY_MAX, CGROUP_V1_LIMIT]
        .into_iter()
        .find_map(|path| {
            let text = std::fs::read_to_string(path).ok()?;
            Some((parse_limit(&text)?, path))
        })
}

impl Sizing {
    /// The budget: the cgroup's limit, else the profile's.
    pub fn choose(cgroup: Option<(u64, &str)>, profile: Option<Profile>) -> Option<Self> {
        match (cgroup, profile) {
            (Some((limit, path)), _) => Some(Self {
                budget: limit,
                source: format!("the cgroup limit in {path}"),
            }),
            (None, Some(profile)) => Some(Self {
                budget: profile.memory_budget(),
                source: format!("the {profile} profile"),
            }),
            (None, None) => None,
        }
    }

    /// The sizes for this budget, by flag, never above the flags' own defaults.
    pub fn defaults(&self) -> [(&'static str, u64); 3] {
        let quarter = self.budget / 4;
        let max_buffer = quarter.min(1 << 30);
        [
            ("max-buffer-bytes", max_buffer),
            ("persist-buffer-bytes", (max_buffer / 2).min(256 << 20)),
            ("query-memory-limit", quarter.min(2 << 30)),
        ]
    }
}

/// The limit in `memory.max`'s text; `None` for `max` (no limit), and for cgroup v1's
/// way of saying the same (a number near `i64::MAX`).
fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse()
        .ok()
        .filter(|limit| *limit > 0 && *limit < 1 << 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_or_a_profile_sizes_the_buffer_and_the_query_pool() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(Sizing::choose(None, None), None);
        let edge = Sizing::choose(None, Some(Profile::Edge)).unwrap();
        assert_eq!(
            edge.defaults(),
            [
                ("max-buffer-bytes", 128 << 20),
                ("persist-buffer-bytes", 64 << 20),
                ("query-memory-limit", 128 << 20),
            ]
        );
        // The cgroup's limit wins over the profile's budget.
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        let pod = Sizing::choose(Some((2 << 30, CGROUP_MEMORY_MAX)), Some(Profile::Edge)).unwrap();
        assert_eq!(pod.budget, 2 << 30);
        assert!(pod.source.contains("cgroup"));
        // A big machine keeps the flags' defaults.
        let big = Sizing::choose(Some((64 << 30, CGROUP_MEMORY_MAX)), None).unwrap();
        assert_eq!(
            big.defaults(),
            [
                ("max-buffer-bytes", 1 << 30),
                ("persist-buffer-bytes", 256 << 20),
                ("query-memory-limit", 2 << 30),
            ]
        );
    }
}

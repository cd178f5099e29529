//! Memory sizes that fit the box: the write buffer and the query pool sized from the
//! memory the process may use, when no flag, variable, file or profile sets them.
//!
//! The budget is the smallest memory limit of the process's cgroup and its ancestors
//! (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`: a container's, a Kubernetes pod's,
//! a systemd unit's `MemoryMax=`) or, without one, the profile's. Of the
//! budget, an eighth may sit in the write buffer before writes are refused, a sixteenth
//! makes the buffer persist, and a quarter is the queries' shared pool; the rest is the
//! process itself, the buffer being persisted and its Parquet encoding, compaction and
//! the caches. Without a limit and a profile, the flags' defaults stand (1 GiB, 256 MiB,
//! 2 GiB). How the process gives freed memory back is `crate::allocator`'s.
//!
//! The fractions come from `benches/footprint.sh` (100k rows/s of line protocol in a
//! 512 MiB cgroup, see `benches/RESULTS.md`).

use super::profile::Profile;

/// Where the cgroup hierarchies are mounted: v2 (unified) and v1's memory controller.
const CGROUP_V2: &str = "/sys/fs/cgroup";
const CGROUP_V1_MEMORY: &str = "/sys/fs/cgroup/memory";

/// The memory budget and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    pub budget: u64,
    pub source: String,
}

/// The memory limit of this process's cgroup, if it has one, and the file that set it.
pub fn cgroup_limit() -> Option<(u64, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    limit_of(&own, |path| std::fs::read_to_string(path).ok())
}

/// The smallest memory limit on the way from the process's cgroups (as `/proc/self/cgroup`
/// lists them) up to the root: a container's own (its namespace shows it as `/`), a pod's,
/// or a systemd unit's `MemoryMax=`.
fn limit_of(proc_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<(u64, String)> {
    let mut files = Vec::new();
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (root, file) = if id == "0" && controllers.is_empty() {
            (CGROUP_V2, "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (CGROUP_V1_MEMORY, "memory.limit_in_bytes")
        } else {
            continue;
        };
        // The cgroup and each of its ancestors.
        let mut dir = path.trim_end_matches('/').to_owned();
        loop {
            files.push(format!("{root}{dir}/{file}"));
            match dir.rfind('/') {
                Some(i) => dir.truncate(i),
                None => break,
            }
        }
    }
    files
        .into_iter()
        .filter_map(|path| Some((parse_limit(&read(&path)?)?, path)))
        .min_by_key(|(limit, _)| *limit)
}

impl Sizing {
    /// The budget: the cgroup's limit, else the profile's.
    pub fn choose(cgroup: Option<(u64, String)>, profile: Option<Profile>) -> Option<Self> {
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
        let max_buffer = (self.budget / 8).min(1 << 30);
        [
            ("max-buffer-bytes", max_buffer),
            ("persist-buffer-bytes", (max_buffer / 2).min(256 << 20)),
            ("query-memory-limit", (self.budget / 4).min(2 << 30)),
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
                ("max-buffer-bytes", 64 << 20),
                ("persist-buffer-bytes", 32 << 20),
                ("query-memory-limit", 128 << 20),
            ]
        );
        // The cgroup's limit wins over the profile's budget.
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        let pod =
            Sizing::choose(Some((2 << 30, "memory.max".into())), Some(Profile::Edge)).unwrap();
        assert_eq!(pod.budget, 2 << 30);
        assert!(pod.source.contains("cgroup"));
        // A big machine keeps the flags' defaults.
        let big = Sizing::choose(Some((64 << 30, "memory.max".into())), None).unwrap();
        assert_eq!(
            big.defaults(),
            [
                ("max-buffer-bytes", 1 << 30),
                ("persist-buffer-bytes", 256 << 20),
                ("query-memory-limit", 2 << 30),
            ]
        );
    }

    #[test]
    fn the_smallest_limit_from_the_cgroup_up() {
        let files = |path: &str| -> Option<String> {
            match path {
                // cgroup v1 on a host: a systemd unit's limit on its slice, none on it.
                "/sys/fs/cgroup/memory/system.slice/memory.limit_in_bytes" => {
                    Some("1073741824\n".into())
                }
                "/sys/fs/cgroup/memory/system.slice/kiln.service/memory.limit_in_bytes"
                | "/sys/fs/cgroup/memory/memory.limit_in_bytes" => {
                    Some("9223372036854771712\n".into())
                }
                // cgroup v2 in a container: its namespace's root is its own cgroup.
                "/sys/fs/cgroup/memory.max" => Some("536870912\n".into()),
                _ => None,
            }
        };
        let v1 = "4:memory:/system.slice/kiln.service\n1:cpu:/\n";
        assert_eq!(
            limit_of(v1, files),
            Some((
                1 << 30,
                "/sys/fs/cgroup/memory/system.slice/memory.limit_in_bytes".into()
            ))
        );
        assert_eq!(
            limit_of("0::/\n", files),
            Some((512 << 20, "/sys/fs/cgroup/memory.max".into()))
        );
        assert_eq!(limit_of("0::/user.slice\n", |_| Some("max".into())), None);
        assert_eq!(limit_of("", files), None);
    }
}

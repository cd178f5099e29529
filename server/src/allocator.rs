//! How `kiln serve` gives memory it has freed back to the system.
//!
//! Kiln allocates through glibc's malloc, whose defaults suit short-lived programs better
//! than a server that persists and compacts for years (`benches/soak.sh`,
//! `benches/footprint.sh`; figures in `benches/RESULTS.md`, "Soak" and "Edge footprint"):
//! - 8 arenas per core let memory freed by one thread sit idle in its arena while
//!   another's grows: capped at the CPU count (at least 2);
//! - the mmap threshold rises after each large free, up to 32 MiB, so that the buffers
//!   of persistence and compaction come from the heap and stay there: fixed at 1 MiB, and
//!   larger blocks go back to the kernel when freed;
//! - free memory inside the heap is returned only from its top, so a few live blocks
//!   above a freed persist buffer keep all of it resident (after five minutes of 150,000
//!   rows/s, 994 MB held from the system for 185 MB in use): every [`TRIM_EVERY`] a
//!   thread asks malloc to hand the free pages of every arena back (`malloc_trim`).
//!
//! The environment's `MALLOC_ARENA_MAX` and `MALLOC_MMAP_THRESHOLD_` win over the first
//! two. Elsewhere than glibc this module does nothing.

use std::time::Duration;

/// How often free pages are handed back to the system.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Sets glibc's arena count and mmap threshold, unless the environment does; what was set.
/// Called before any thread starts.
pub fn tune() -> Vec<String> {
    let mut set = Vec::new();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            let arenas = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
            // SAFETY: mallopt only sets an allocator parameter; no thread allocates yet.
            if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas as libc::c_int) } == 1 {
                set.push(format!("malloc arenas capped at {arenas}"));
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) } == 1 {
                set.push("malloc's mmap threshold fixed at 1 MiB".to_owned());
            }
        }
    }
    set
}

/// Starts the thread (`kiln-trim`) that hands free pages back every [`TRIM_EVERY`]. It
/// lives as long as the process.
pub fn start_trimming() -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    std::thread::Builder::new()
        .name("kiln-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_EVERY);
                let started = std::time::Instant::now();
                let released = trim();
                tracing::debug!(
                    released,
                    took_us = started.elapsed().as_micros() as u64,
                    "free heap pages handed back"
                );
            }
        })?;
    Ok(())
}

/// Hands the free pages of every malloc arena back to the system; whether any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim takes each arena's lock itself; it frees nothing in use.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// This process's resident memory, in bytes.
    fn rss() -> u64 {
        kiln_bench::footprint::memory_of(std::process::id())
            .unwrap()
            .0
    }

    #[test]
    fn freed_memory_inside_the_heap_goes_back_to_the_system() {
        // 64 MiB in 64 KiB blocks (under any mmap threshold, so on the heap), each
        // followed by a small block that stays: freeing the large ones leaves holes that
        // only a trim returns.
        let mut large = Vec::new();
        let mut pins = Vec::new();
        for i in 0..1024u32 {
            large.push(std::hint::black_box(vec![i as u8 | 1; 64 << 10]));
            pins.push(std::hint::black_box(vec![i as u8; 64]));
        }
        drop(large);
        let before = rss();
        trim();
        let after = rss();
        assert!(
            before.saturating_sub(after) >= 32 << 20,
            "trim handed back {} MiB of 64 freed (RSS {} -> {} MiB)",
            before.saturating_sub(after) >> 20,
            before >> 20,
            after >> 20
        );
        drop(pins);
    }
}

//! Kiln's load generator: the TSBS cpu-only workload as line protocol.
//!
//! Table `cpu`, one row per host every 10 s; tags hostname, region, datacenter, rack, os,
//! arch, team, service, service_version, service_environment; ten integer fields
//! `usage_user` … `usage_guest_nice`, each a random walk clamped to 0..=100 with standard
//! normal steps, as TSBS generates them. Seeded: the same `--seed` gives the same data.

pub mod cluster;
pub mod footprint;
pub mod kafka;
pub mod load;
pub mod mqtt;
pub mod otlp_sink;
pub mod queries;
pub mod results;
pub mod security;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub const FIELDS: [&str; 10] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
];

const REGIONS: [(&str, &[&str]); 9] = [
    (
        "us-east-1",
        &["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1e"],
    ),
    ("us-west-1", &["us-west-1a", "us-west-1b"]),
    ("us-west-2", &["us-west-2a", "us-west-2b", "us-west-2c"]),
    ("eu-west-1", &["eu-west-1a", "eu-west-1b", "eu-west-1c"]),
    ("eu-central-1", &["eu-central-1a", "eu-central-1b"]),
    ("ap-southeast-1", &["ap-southeast-1a", "ap-southeast-1b"]),
    ("ap-southeast-2", &["ap-southeast-2a", "ap-southeast-2b"]),
    ("ap-northeast-1", &["ap-northeast-1a", "ap-northeast-1c"]),
    ("sa-east-1", &["sa-east-1a", "sa-east-1b", "sa-east-1c"]),
];
const OS: [&str; 3] = ["Ubuntu16.10", "Ubuntu16.04LTS", "Ubuntu15.10"];
const ARCH: [&str; 2] = ["x64", "x86"];
const TEAM: [&str; 4] = ["SF", "NYC", "LON", "CHI"];
const ENV: [&str; 3] = ["production", "staging", "test"];

/// TSBS's default start: 2016-01-01T00:00:00Z.
pub const DEFAULT_START_NANOS: i64 = 1_451_606_400_000_000_000;
pub const INTERVAL_NANOS: i64 = 10_000_000_000;

pub const TAGS: [&str; 10] = [
    "hostname",
    "region",
    "datacenter",
    "rack",
    "os",
    "arch",
    "team",
    "service",
    "service_version",
    "service_environment",
];

struct Host {
    /// Tag values in [`TAGS`] order.
    tag_values: Vec<String>,
    /// The same tags as line protocol: `hostname=host_0,region=…`.
    tags: String,
    values: [f64; 10],
}

/// One row of the workload in structured form.
#[derive(Debug, Clone, Copy)]
pub struct CpuRow<'a> {
    pub tag_values: &'a [String],
    /// The tags as line protocol (`hostname=host_0,region=…`).
    pub tags_lp: &'a str,
    pub time: i64,
    pub fields: [i64; 10],
}

/// Generates the workload one timestamp (one row per host) at a time.
pub struct CpuOnly {
    rng: SmallRng,
    hosts: Vec<Host>,
    next_time: i64,
}

impl CpuOnly {
    pub fn new(scale: usize, seed: u64, start_nanos: i64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let hosts = (0..scale)
            .map(|i| {
                let (region, zones) = REGIONS[rng.random_range(0..REGIONS.len())];
                let tag_values: Vec<String> = vec![
                    format!("host_{i}"),
                    region.to_owned(),
                    zones[rng.random_range(0..zones.len())].to_owned(),
                    rng.random_range(0..100).to_string(),
                    OS[rng.random_range(0..OS.len())].to_owned(),
                    ARCH[rng.random_range(0..ARCH.len())].to_owned(),
                    TEAM[rng.random_range(0..TEAM.len())].to_owned(),
                    rng.random_range(0..20).to_string(),
                    rng.random_range(0..2).to_string(),
                    ENV[rng.random_range(0..ENV.len())].to_owned(),
                ];
                let tags = TAGS
                    .iter()
                    .zip(&tag_values)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let values = std::array::from_fn(|_| rng.random_range(0.0..100.0));
                Host {
                    tag_values,
                    tags,
                    values,
                }
            })
            .collect();
        Self {
            rng,
            hosts,
            next_time: start_nanos,
        }
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Advances every host's random walk by one interval and hands each row to `f`.
    pub fn next_rows(&mut self, mut f: impl FnMut(CpuRow<'_>)) {
        let time = self.next_time;
        self.next_time += INTERVAL_NANOS;
        for h in &mut self.hosts {
            let mut fields = [0i64; 10];
            for (v, out) in h.values.iter_mut().zip(&mut fields) {
                *v = (*v + standard_normal(&mut self.rng)).clamp(0.0, 100.0);
                *out = *v as i64;
            }
            f(CpuRow {
                tag_values: &h.tag_values,
                tags_lp: &h.tags,
                time,
                fields,
            });
        }
    }

    /// Appends one line per host for the next timestamp to `out`.
    pub fn next_interval(&mut self, out: &mut String) {
        use std::fmt::Write;
        self.next_rows(|row| {
            out.push_str("cpu,");
            out.push_str(row.tags_lp);
            for (i, v) in row.fields.iter().enumerate() {
                out.push(if i == 0 { ' ' } else { ',' });
                out.push_str(FIELDS[i]);
                let _ = write!(out, "={v}i");
            }
            let _ = writeln!(out, " {}", row.time);
        });
    }

    /// Line-protocol batches of `batch_lines` lines covering `intervals` timestamps.
    pub fn batches(&mut self, intervals: usize, batch_lines: usize) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let mut current = String::new();
        let mut lines = 0;
        let mut interval = String::new();
        for _ in 0..intervals {
            interval.clear();
            self.next_interval(&mut interval);
            for line in interval.split_inclusive('\n') {
                current.push_str(line);
                lines += 1;
                if lines == batch_lines {
                    out.push((lines, std::mem::take(&mut current)));
                    lines = 0;
                }
            }
        }
        if lines > 0 {
            out.push((lines, current));
        }
        out
    }
}

/// A standard normal sample (Box–Muller).
fn standard_normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A gRPC channel for reading large Flight SQL results: 1 MiB HTTP/2 frames and 16 MiB
/// flow-control windows. With h2's defaults (16 KiB frames, 64 KiB windows) a 1.7 M-row
/// result (TSBS high-cpu-all) took about a fifth longer, spent on frames and window updates.
pub async fn flight_channel(url: &str) -> Result<tonic::transport::Channel, String> {
    tonic::transport::Channel::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .max_frame_size(1u32 << 20)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .connect()
        .await
        .map_err(|e| format!("Flight SQL connect to {url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data_and_one_line_per_host_per_interval() {
        let a = CpuOnly::new(3, 7, DEFAULT_START_NANOS).batches(4, 5);
        let b = CpuOnly::new(3, 7, DEFAULT_START_NANOS).batches(4, 5);
        assert_eq!(a, b);
        let lines: Vec<&str> = a.iter().flat_map(|(_, s)| s.lines()).collect();
        assert_eq!(lines.len(), 12);
        assert_eq!(a.iter().map(|(n, _)| n).sum::<usize>(), 12);
        assert!(lines[0].starts_with("cpu,hostname=host_0,region="));
        assert!(lines[0].contains(" usage_user=") && lines[0].contains(",usage_guest_nice="));
        assert!(lines[3].ends_with(&format!(" {}", DEFAULT_START_NANOS + INTERVAL_NANOS)));
    }
}

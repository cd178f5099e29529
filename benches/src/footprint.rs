//! `kiln-bench sustain`: line protocol at a fixed rate for a fixed time, with the server's
//! resident memory sampled once a second, for the edge footprint benchmark
//! (`benches/footprint.sh`).

use std::time::{Duration, Instant};

use crate::{CpuOnly, DEFAULT_START_NANOS};

/// What a sustained run saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Sustained {
    pub rows: usize,
    pub seconds: f64,
    /// Requests answered 429 (buffer full) and sent again.
    pub refused: usize,
    /// The server's resident memory, sampled each second (bytes).
    pub rss: Vec<u64>,
    /// The server's peak resident memory as the kernel counts it (`VmHWM`).
    pub hwm: u64,
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
pub fn memory_of(pid: u32) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> Result<u64, String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Sends `rate` rows a second of the TSBS cpu-only workload (`scale` hosts) to `url`
/// (`…/api/v3/write_lp?db=…`) for `seconds`, over `connections` connections, sampling
/// `pid`'s memory each second.
pub async fn sustain(
    http: reqwest::Client,
    url: &str,
    scale: usize,
    rate: usize,
    seconds: u64,
    connections: usize,
    pid: u32,
) -> Result<Sustained, String> {
    let batch_lines = scale.max(1);
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(connections * 2);
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..connections {
        let rx = std::sync::Arc::clone(&rx);
        let http = http.clone();
        let url = url.to_owned();
        let refused = std::sync::Arc::clone(&refused);
        senders.push(tokio::spawn(async move {
            loop {
                let Some(body) = rx.lock().await.recv().await else {
                    return Ok::<(), String>(());
                };
                loop {
                    let resp = http
                        .post(&url)
                        .body(body.clone())
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    match resp.status() {
                        s if s.is_success() => break,
                        reqwest::StatusCode::TOO_MANY_REQUESTS => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        s => {
                            return Err(format!(
                                "write failed: {s}: {}",
                                resp.text().await.unwrap_or_default()
                            ));
                        }
                    }
                }
            }
        }));
    }

    // One interval of every host per request; requests paced to the rate.
    let mut generator = CpuOnly::new(scale, 7, DEFAULT_START_NANOS);
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut rows = 0usize;
    let mut rss = Vec::new();
    let mut next_sample = start;
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            rss.push(memory_of(pid)?.0);
            next_sample += Duration::from_secs(1);
        }
        let due = start + Duration::from_secs_f64(rows as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (lines, body) = generator
            .batches(1, batch_lines)
            .into_iter()
            .next()
            .ok_or("the generator made nothing")?;
        if tx.send(body).await.is_err() {
            break;
        }
        rows += lines;
    }
    drop(tx);
    for s in senders {
        s.await.map_err(|e| e.to_string())??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let hwm = memory_of(pid)?.1;
    Ok(Sustained {
        rows,
        seconds,
        refused: refused.load(std::sync::atomic::Ordering::Relaxed),
        rss,
        hwm,
    })
}

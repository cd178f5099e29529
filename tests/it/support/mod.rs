//! A real `kiln serve` process on an ephemeral port, and an HTTP client for it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;

pub mod mosquitto;
pub mod otlp;
pub mod s3;

pub struct TestServer {
    child: Option<Child>,
    pub base: String,
    /// `http://host:port` of the gRPC listener.
    pub grpc: String,
    /// `host:port` of the PostgreSQL listener.
    pub pg: String,
    pub client: reqwest::Client,
    /// Where the server's log goes.
    log: std::path::PathBuf,
}

/// Makes ring the TLS provider of the test process (reqwest and tonic clients need one).
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TestServer {
    /// Starts `kiln serve` on `data_dir` with extra flags; waits until it listens.
    pub fn start(data_dir: &Path, args: &[&str]) -> Self {
        Self::start_with(data_dir, args, |_| {})
    }

    /// Like [`Self::start`], letting the caller adjust the command (limits, environment).
    pub fn start_with(
        data_dir: &Path,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        Self::start_on("127.0.0.1:0", data_dir, args, configure)
    }

    /// Like [`Self::start_with`], with the gRPC listener on `grpc_bind` (the address a
    /// server restarted after `kill -9` keeps, where other servers reach it).
    pub fn start_on(
        grpc_bind: &str,
        data_dir: &Path,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .expect("open server log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http-bind", "127.0.0.1:0", "--grpc-bind", grpc_bind])
            .args(["--pg-bind", "127.0.0.1:0"])
            .args(args)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        configure(&mut command);
        let mut child = command.spawn().expect("spawn kiln");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut reader = BufReader::new(stdout);
        let mut read_url = |prefix: &str| {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read kiln stdout");
            match line.trim().strip_prefix(prefix) {
                Some(url) => url.to_owned(),
                None => {
                    let log =
                        std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default();
                    panic!("kiln did not start; stdout {line:?}; log:\n{log}");
                }
            }
        };
        tls_provider();
        let url = read_url("Kiln HTTP listening on ");
        let grpc = read_url("Kiln gRPC listening on ");
        let pg = read_url("Kiln PostgreSQL listening on postgres://");
        Self {
            child: Some(child),
            base: url,
            grpc,
            pg,
            log: data_dir.with_extension("log"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        }
    }

    /// `kill -9`: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sending a signal to our own child process by pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let status = child.wait().expect("wait");
            if !status.success() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "kiln exited with {status}; its log ends:\n{}",
                    tail.join("\n")
                );
            }
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path`, read as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST line protocol to `/api/v3/write_lp` with extra query parameters.
    pub async fn write(
        &self,
        db: &str,
        body: impl Into<reqwest::Body>,
        params: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let mut query = vec![("db", db)];
        query.extend_from_slice(params);
        let resp = self
            .client
            .post(self.url("/api/v3/write_lp"))
            .query(&query)
            .body(body)
            .send()
            .await
            .expect("write request");
        (resp.status(), resp.text().await.unwrap_or_default())
    }

    pub async fn write_ok(&self, db: &str, body: &str) {
        let (status, text) = self.write(db, body.to_owned(), &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{text}");
    }

    pub async fn query(&self, db: &str, sql: &str, format: &str) -> (StatusCode, bytes::Bytes) {
        let resp = self
            .client
            .get(self.url("/api/v3/query_sql"))
            .query(&[("db", db), ("q", sql), ("format", format)])
            .send()
            .await
            .expect("query request");
        (resp.status(), resp.bytes().await.unwrap_or_default())
    }

    /// Runs `sql` and returns the rows as JSON objects.
    pub async fn query_json(
        &self,
        db: &str,
        sql: &str,
    ) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let (status, body) = self.query(db, sql, "json").await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("JSON array of objects")
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default()
    }

    /// A metric's value; 0 when the server does not show it.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// WAL files in a data directory, sorted.
pub fn wal_files(data_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir.join("wal"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".wal"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! A real S3 server on a free loopback port: `s3s-fs` from crates.io, which keeps each
//! object as a file under a directory (so it can be stopped and started again over the same
//! objects) and honours conditional writes (`If-None-Match: *`). It is installed with
//! `cargo install` into the test tools directory (`KILN_TOOLS_DIR`, else
//! `~/.cache/kiln-tools`) the first time a test needs it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const VERSION: &str = "0.14.1";
pub const ACCESS_KEY: &str = "kiln-test";
pub const SECRET_KEY: &str = "kiln-test-secret";

/// The server program, installed once per test run if the machine lacks it.
fn program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let tools = std::env::var_os("KILN_TOOLS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kiln-tools")
            });
        let path = tools.join("bin/s3s-fs");
        let installed = Command::new(&path)
            .arg("--version")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(VERSION));
        if !installed {
            eprintln!(
                "installing s3s-fs {VERSION} into {} (once)",
                tools.display()
            );
            let status = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
                .args(["install", "--quiet", "--locked", "--root"])
                .arg(&tools)
                .arg(format!("s3s-fs@{VERSION}"))
                .args(["--features", "binary"])
                // Its own build, not this workspace's target directory or profile.
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("CARGO_BUILD_TARGET_DIR")
                .status()
                .expect("run cargo install");
            assert!(status.success(), "installing s3s-fs failed");
        }
        path
    })
}

/// A free TCP port on loopback (free when asked; the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    /// The directory whose subdirectories are the buckets.
    root: PathBuf,
    log: PathBuf,
}

impl S3Server {
    /// A server on a free port keeping its objects under `dir`, with bucket `bucket`.
    pub fn start(dir: &Path, bucket: &str) -> Self {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let mut server = Self {
            child: None,
            port: free_port(),
            log: dir.join("s3s-fs.log"),
            root,
        };
        server.resume();
        server
    }

    /// Starts the server again on the same port and objects; waits until it listens.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the S3 server is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(program())
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (`kill -9`): every request fails until [`Self::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding `bucket`'s objects as files, one per key.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    /// The objects of `bucket` under `prefix`, by their keys.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let base = self.bucket_dir(bucket);
        let mut keys = Vec::new();
        let mut dirs = vec![base.join(prefix)];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let key = path.strip_prefix(&base).unwrap();
                    keys.push(key.to_string_lossy().into_owned());
                }
            }
        }
        keys.sort();
        keys
    }

    /// Sets the credentials on a `kiln` command, in the environment as a deployment would.
    pub fn credentials(command: &mut Command) {
        command
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

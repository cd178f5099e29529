//! `kiln write` and `kiln query` against a real server.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::TestServer;

pub(crate) fn kiln(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    kiln_env(args, stdin, &[])
}

/// [`kiln`] with extra environment variables.
pub(crate) fn kiln_env(
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_writes_from_stdin_files_and_flags_and_prints_tables() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &[]);
    let host = server.base.clone();
    let h = host.as_str();

    let (ok, _, err) = kiln(
        &["write", "--host", h, "-d", "plant", "--precision", "s"],
        Some("temp,line=l1 c=1.5 1700000000\n"),
    );
    assert!(ok, "{err}");
    let file = dir.path().join("lines.lp");
    std::fs::write(&file, "temp,line=l2 c=2.5 1700000001\n").unwrap();
    let (ok, _, err) = kiln(
        &[
            "write",
            "--host",
            h,
            "-d",
            "plant",
            "--precision",
            "s",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = kiln(
        &[
            "write",
            "--host",
            h,
            "-d",
            "plant",
            "-l",
            "temp,line=l3 c=3.5 1700000002000000000",
        ],
        None,
    );
    assert!(ok, "{err}");

    let g = server.grpc.clone();
    let grpc_write = |line: &str| {
        kiln(
            &[
                "write",
                "--grpc",
                "--grpc-host",
                &g,
                "-d",
                "plant",
                "-l",
                line,
            ],
            None,
        )
    };
    let (ok, _, err) = grpc_write("temp,line=l4 c=4.5 1700000003000000000");
    assert!(ok, "{err}");
    let (ok, _, err) = grpc_write("temp,line=l5 c=bad");
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("line 1, column 16"),
        "{err}"
    );

    let (ok, out, err) = kiln(
        &[
            "query",
            "--host",
            h,
            "-d",
            "plant",
            "SELECT line, c FROM temp ORDER BY line",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(out.contains("| line | c   |"), "{out}");
    assert!(out.contains("| l3   | 3.5 |"), "{out}");
    let (ok, out, _) = kiln(
        &[
            "query",
            "--host",
            h,
            "-d",
            "plant",
            "-f",
            "csv",
            "SELECT count(*) AS n FROM temp",
        ],
        None,
    );
    assert!(ok);
    assert_eq!(out, "n\n4\n");

    // Errors are printed with line and column, and the exit status says so.
    let (ok, _, err) = kiln(
        &[
            "write",
            "--host",
            h,
            "-d",
            "plant",
            "-l",
            "temp,line=l4 c=oops",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("line 1, column 16"), "{err}");
    let (ok, _, err) = kiln(
        &["query", "--host", h, "-d", "plant", "SELECT * FROM nothing"],
        None,
    );
    assert!(!ok);
    assert!(err.contains("404") && err.contains("nothing"), "{err}");
}

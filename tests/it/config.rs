//! `kiln serve`'s settings from a file, the environment and secret files, `--check`, and
//! `kiln probe`, on the real binary.

use reqwest::StatusCode;

use crate::support::TestServer;

/// Runs `kiln ARGS` with extra environment variables: (success, stdout, stderr).
fn kiln_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    crate::cli::kiln_env(args, None, env)
}

#[test]
fn check_shows_flag_over_environment_over_file_over_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "http-bind = \"127.0.0.1:1111\"\ngrpc-bind = \"127.0.0.1:2111\"\n\
         pg-bind = \"127.0.0.1:3111\"\npersist-buffer-bytes = \"8GiB\"\n",
    )
    .unwrap();
    let secret = dir.path().join("pg-bind");
    std::fs::write(&secret, "127.0.0.1:3444\n").unwrap();
    let config = config.to_str().unwrap();
    let env = [
        ("KILN_GRPC_BIND", "127.0.0.1:2222"),
        ("KILN_PG_BIND_FILE", secret.to_str().unwrap()),
    ];
    let (ok, out, err) = kiln_env(
        &[
            "serve",
            "--config",
            config,
            "--check",
            "--http-bind",
            "127.0.0.1:1333",
        ],
        &env,
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("configuration OK"), "{out}");
    assert!(out.contains("HTTP 127.0.0.1:1333"), "the flag wins: {out}");
    assert!(
        out.contains("gRPC 127.0.0.1:2222"),
        "the variable wins: {out}"
    );
    assert!(
        out.contains("PostgreSQL 127.0.0.1:3444"),
        "the secret file wins: {out}"
    );
    assert!(out.contains("persists at 8 GiB"), "{out}");
    assert!(
        out.contains("refuses writes at 1 GiB"),
        "the default: {out}"
    );
    assert!(!dir.path().join("kiln-data").exists());

    // The edge profile sizes memory for 512 MiB (this test machine has no cgroup limit
    // set, or a larger one than the profile's: either way the profile's sizes are at most
    // these).
    let (ok, out, err) = kiln_env(&["serve", "--profile", "edge", "--check"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("memory for this process"), "{out}");
}

#[test]
fn check_refuses_a_bad_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "http-bind = \"127.0.0.1:0\"\npersist-bufer-bytes = 1\n",
    )
    .unwrap();
    let (ok, _, err) = kiln_env(
        &["serve", "--config", config.to_str().unwrap(), "--check"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("unknown key `persist-bufer-bytes`"), "{err}");

    std::fs::write(&config, "max-request-bytes = \"lots\"\n").unwrap();
    let (ok, _, err) = kiln_env(
        &["serve", "--config", config.to_str().unwrap(), "--check"],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("`max-request-bytes`") && err.contains("lots"),
        "{err}"
    );

    // Units on the command line, and the error for a size that is not one.
    let (ok, _, err) = kiln_env(&["serve", "--persist-buffer-bytes", "8GiB", "--check"], &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = kiln_env(
        &["serve", "--persist-buffer-bytes", "8 gallons", "--check"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("is not a size"), "{err}");

    // TLS files are loaded by the check.
    let (ok, _, err) = kiln_env(
        &[
            "serve",
            "--check",
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.key",
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("TLS"), "{err}");
}

#[test]
fn check_shows_where_spans_go_and_refuses_a_bad_collector() {
    let (ok, out, err) = kiln_env(&["serve", "--check"], &[]);
    assert!(ok, "{err}");
    assert!(!out.contains("OTLP"), "{out}");
    let env = [
        ("KILN_OTLP_ENDPOINT", "http://otel-collector:4317"),
        ("KILN_OTLP_SAMPLE_RATIO", "0.25"),
    ];
    let (ok, out, err) = kiln_env(&["serve", "--check"], &env);
    assert!(ok, "{err}");
    assert!(
        out.contains("spans exported over OTLP to http://otel-collector:4317, 0.25 of the traces"),
        "{out}"
    );
    let (ok, _, err) = kiln_env(
        &["serve", "--check", "--otlp-endpoint", "otel-collector:4317"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("must start with http:// or https://"), "{err}");
    let (ok, _, err) = kiln_env(&["serve", "--check", "--otlp-sample-ratio", "2"], &[]);
    assert!(!ok);
    assert!(err.contains("not a ratio from 0 to 1"), "{err}");
    let (ok, _, err) = kiln_env(
        &[
            "serve",
            "--check",
            "--otlp-endpoint",
            "https://otel-collector:4317",
            "--otlp-tls-ca",
            "/nonexistent-ca.pem",
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("cannot read --otlp-tls-ca"), "{err}");
}

#[tokio::test]
async fn a_running_server_takes_its_settings_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, "max-request-bytes = \"1KiB\"\nmax-tables = 1\n").unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data, &["--config", config.to_str().unwrap()]);
    server.write_ok("plant", "t v=1 1\n").await;
    let big = "t v=1 1\n".repeat(200);
    let (status, _) = server.write("plant", big, &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, text) = server.write("plant", "u v=1 1\n", &[]).await;
    assert!(
        status.is_client_error(),
        "max-tables = 1 holds: {status} {text}"
    );

    // `kiln probe` answers for the running server, and fails for a closed port.
    let (ok, out, err) = kiln_env(&["probe", "--host", &server.base], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("/health"), "{out}");
    let (ok, _, err) = kiln_env(&["probe", "--ready", "--host", &server.base], &[]);
    assert!(ok, "{err}");
    // Without --host: the port of the server's own KILN_HTTP_BIND, as in its container.
    let port = server.base.rsplit(':').next().unwrap();
    let bind = format!("0.0.0.0:{port}");
    let (ok, out, err) = kiln_env(&["probe"], &[("KILN_HTTP_BIND", &bind)]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("http://127.0.0.1:{port}/health")),
        "{out}"
    );
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (ok, _, err) = kiln_env(
        &[
            "probe",
            "--timeout",
            "2s",
            "--host",
            &format!("http://{closed}"),
        ],
        &[],
    );
    assert!(!ok, "a closed port is not healthy");
    assert!(!err.is_empty());
}

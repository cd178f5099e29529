use std::ffi::OsString;

use clap::{CommandFactory, Parser};

use super::{ConfigError, resolve_with};
use crate::Cli;

/// `kiln serve ARGS` with the layers laid under it, parsed for good.
fn serve(
    args: &[&str],
    env: &[(&str, &str)],
    cgroup: Option<u64>,
) -> Result<(crate::serve::ServeConfig, Vec<String>), ConfigError> {
    let argv = ["kiln", "serve"]
        .iter()
        .chain(args)
        .map(OsString::from)
        .collect();
    let env = env.iter().map(|(k, v)| (k.into(), v.into()));
    let (argv, notes) = resolve_with(
        Cli::command(),
        argv,
        env,
        cgroup.map(|limit| (limit, "/sys/fs/cgroup/memory.max".to_owned())),
    )?;
    let cli = Cli::try_parse_from(argv).expect("the resolved command line parses");
    match cli.command {
        crate::Command::Serve(config) => Ok((*config, notes)),
        _ => unreachable!("a serve command line"),
    }
}

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_file_sets_any_flag_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        &dir,
        "kiln.toml",
        r#"
        http-bind = "0.0.0.0:8080"
        persist_buffer_bytes = "8GiB"
        max-tables = 7
        wal-sync = "100ms"
        without-auth = true
        kafka-option = ["security.protocol=SASL_SSL", "sasl.mechanism=PLAIN"]
        "#,
    );
    let (config, _) = serve(&["--config", &path, "--max-tables", "9"], &[], None).unwrap();
    assert_eq!(config.http_bind.to_string(), "0.0.0.0:8080");
    assert_eq!(config.persist_buffer_bytes, 8 << 30);
    assert_eq!(config.max_tables, 9, "the flag wins over the file");
    assert!(config.without_auth);
    assert_eq!(
        config.kafka.kafka_options,
        ["security.protocol=SASL_SSL", "sasl.mechanism=PLAIN"]
    );

    let path = file(&dir, "off.toml", "without-auth = false\n");
    let (config, _) = serve(&["--config", &path], &[], None).unwrap();
    assert!(!config.without_auth);
}

#[test]
fn a_file_refuses_what_is_no_setting() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = file(
        &dir,
        "a.toml",
        "http-bind = \"0.0.0.0:1\"\nbuffer-size = 3\n",
    );
    let err = serve(&["--config", &unknown], &[], None).unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, .. } if key == "buffer-size"),
        "{err}"
    );
    assert!(err.to_string().contains(&unknown), "names the file: {err}");

    let nested = file(&dir, "b.toml", "config = \"other.toml\"\n");
    let err = serve(&["--config", &nested], &[], None).unwrap_err();
    assert!(matches!(err, ConfigError::NotInFiles { .. }), "{err}");

    let flag = file(&dir, "c.toml", "without-auth = \"yes\"\n");
    let err = serve(&["--config", &flag], &[], None).unwrap_err();
    assert!(matches!(err, ConfigError::NotABool { .. }), "{err}");

    let bad = file(&dir, "bad.toml", "wal-sync = \"batch\"\n");
    let err = serve(&["--config", &bad], &[], None).unwrap_err();
    let text = crate::client::chain(&err);
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "wal-sync"),
        "{text}"
    );
    assert!(text.contains(&bad) && text.contains("batch"), "{text}");

    let table = file(&dir, "d.toml", "[http]\nbind = \"x\"\n");
    assert!(serve(&["--config", &table], &[], None).is_err());

    let broken = file(&dir, "e.toml", "http-bind = \n");
    let err = serve(&["--config", &broken], &[], None).unwrap_err();
    assert!(matches!(err, ConfigError::Toml { .. }), "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the TOML error is kept as the cause"
    );

    let missing = dir.path().join("none.toml").display().to_string();
    let err = serve(&["--config", &missing], &[], None).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

#[test]
fn a_secret_file_sets_its_flag_at_the_environments_rank() {
    let dir = tempfile::tempdir().unwrap();
    let secret = file(&dir, "options", "sasl.password=hunter2\n");
    let config_file = file(&dir, "kiln.toml", "kafka-option = [\"acks=all\"]\n");
    let env = [("KILN_KAFKA_OPTIONS_FILE", secret.as_str())];
    let (config, _) = serve(&["--config", &config_file], &env, None).unwrap();
    assert_eq!(
        config.kafka.kafka_options,
        ["sasl.password=hunter2"],
        "the secret wins over the file, without its newline"
    );

    // A flag of its own named `…_FILE` is left to clap.
    let token = file(&dir, "token", "kiln_abc\n");
    let env = [("KILN_ADMIN_TOKEN_FILE", token.as_str())];
    let (config, _) = serve(&[], &env, None).unwrap();
    assert_eq!(
        config.admin_token_file, None,
        "clap reads the real environment"
    );

    let env = [("KILN_MAX_TABLES_FILE", "/nonexistent/kiln-secret")];
    let err = serve(&[], &env, None).unwrap_err();
    assert!(err.to_string().contains("KILN_MAX_TABLES_FILE"), "{err}");
}

#[test]
fn memory_follows_the_limit_under_everything_else() {
    let (plain, notes) = serve(&[], &[], None).unwrap();
    assert!(notes.is_empty());
    assert_eq!(plain.max_buffer_bytes, 1 << 30);
    assert_eq!(plain.persist_buffer_bytes, 256 << 20);
    assert_eq!(plain.query_memory_limit, 2 << 30);

    let (edge, notes) = serve(&["--profile", "edge"], &[], None).unwrap();
    assert_eq!(edge.max_buffer_bytes, 64 << 20);
    assert_eq!(edge.persist_buffer_bytes, 32 << 20);
    assert_eq!(edge.query_memory_limit, 128 << 20);
    assert_eq!(edge.compaction_max_bytes, 64 << 20, "from edge.toml");
    assert_eq!(edge.pg_max_connections, 32, "from edge.toml");
    assert_eq!(edge.last_cache_max_series, 100_000, "from edge.toml");
    assert!(notes[0].contains("the edge profile"), "{notes:?}");

    // A pod of 1 GiB: the cgroup decides; the profile's other settings stay.
    let (pod, notes) = serve(&["--profile", "edge"], &[], Some(1 << 30)).unwrap();
    assert_eq!(pod.max_buffer_bytes, 128 << 20);
    assert_eq!(pod.persist_buffer_bytes, 64 << 20);
    assert!(notes[0].contains("cgroup"), "{notes:?}");

    // What is set by hand stays, and is not reported as chosen.
    let dir = tempfile::tempdir().unwrap();
    let path = file(&dir, "kiln.toml", "max-buffer-bytes = \"300MiB\"\n");
    let (mixed, notes) = serve(
        &["--config", &path, "--query-memory-limit", "1GiB"],
        &[],
        Some(512 << 20),
    )
    .unwrap();
    assert_eq!(mixed.max_buffer_bytes, 300 << 20);
    assert_eq!(mixed.query_memory_limit, 1 << 30);
    assert_eq!(mixed.persist_buffer_bytes, 32 << 20);
    assert!(
        notes[0].contains("--persist-buffer-bytes 32 MiB"),
        "{notes:?}"
    );
    assert!(!notes[0].contains("query-memory-limit"), "{notes:?}");
}

#[test]
fn every_setting_of_the_edge_profile_is_a_flag() {
    // The profile is a file like any other: its keys must all be flags.
    let (config, _) = serve(&["--profile", "edge"], &[], None).unwrap();
    assert_eq!(config.wal_max_file_bytes, 16 << 20);
}

#[test]
fn other_commands_pass_through() {
    let argv: Vec<OsString> = ["kiln", "query", "--db", "x", "SELECT 1"]
        .iter()
        .map(OsString::from)
        .collect();
    let (out, notes) = resolve_with(
        Cli::command(),
        argv.clone(),
        [],
        Some((1 << 30, "x".into())),
    )
    .unwrap();
    assert_eq!(out, argv);
    assert!(notes.is_empty());
}

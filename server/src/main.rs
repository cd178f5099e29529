//! `kiln`: Kiln's single binary.
//!
//! * `kiln serve` runs the server (see [`serve::ServeConfig`] for every flag).
//! * `kiln write`, `kiln query` and the other commands talk to a running server;
//!   `kiln token create --data-dir` also works on a stopped one's data directory.

mod alerts;
mod allocator;
mod auth;
mod client;
mod cluster;
mod config;
mod devices;
mod flight;
mod grpc;
mod http;
mod kafka;
mod lifecycle;
mod metrics;
mod mqtt;
mod postgres;
mod results;
mod role;
mod serve;
mod sources;
mod store;
mod telemetry;
mod tls;
mod write;

use clap::{CommandFactory, Parser, Subcommand};

/// Kiln: an event-sourced time-series database for industrial IoT.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: HTTP writes and SQL queries over a durable WAL and Parquet.
    Serve(Box<serve::ServeConfig>),
    /// Send line protocol to a running server.
    Write(client::WriteArgs),
    /// Run a SQL query on a running server and print the result.
    Query(client::QueryArgs),
    /// Create or drop a table's last-value cache on a running server.
    #[command(subcommand)]
    LastCache(client::LastCacheCommand),
    /// Kafka sources of a running server.
    #[command(subcommand)]
    Kafka(client::KafkaCommand),
    /// MQTT sources of a running server.
    #[command(subcommand)]
    Mqtt(mqtt::MqttCommand),
    /// Merge now every time partition persisted in several segments (and not being
    /// written) into one segment, on a running server.
    Compact {
        #[command(flatten)]
        server: client::ServerOptions,
    },
    /// Check that a server answers `/health` (or `/ready`): exit status 0 if so. For
    /// container health checks and probes without a shell.
    Probe(client::ProbeArgs),
    /// Create, list and revoke access tokens.
    #[command(subcommand)]
    Token(auth::cli::TokenCommand),
    /// Create, list, show and delete alert rules on a running server.
    #[command(subcommand)]
    Alert(alerts::cli::AlertCommand),
    /// Device attributes and series staleness on a running server.
    #[command(subcommand)]
    Device(devices::cli::DeviceCommand),
    /// Create, list, delete databases and set their retention on a running server.
    #[command(subcommand)]
    Database(lifecycle::cli::DatabaseCommand),
    /// Delete tables and set their retention on a running server.
    #[command(subcommand)]
    Table(lifecycle::cli::TableCommand),
}

fn main() -> std::process::ExitCode {
    // `serve`'s settings from files, profiles and the memory limit become flags first
    // (see `config`), then the command line is parsed once with all of them.
    let (argv, mut notes) = match config::resolve(Cli::command(), std::env::args_os().collect()) {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("error: {}", client::chain(&e));
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    if let Command::Serve(_) = cli.command {
        // Before any thread starts (see `allocator`).
        notes.extend(allocator::tune());
        if let Err(e) = allocator::start_trimming() {
            notes.push(format!(
                "freed memory is not handed back: no thread for it: {e}"
            ));
        }
    }
    // Every TLS client and server of the process uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(config) => {
                let telemetry = telemetry::init(
                    &config.telemetry,
                    telemetry::Identity {
                        role: config.role.name(),
                        node_name: config.cluster.node_name.as_deref(),
                    },
                )?;
                let served = serve::run(*config, notes).await;
                telemetry.shutdown().await;
                served
            }
            Command::Write(args) => client::write(args).await,
            Command::Query(args) => client::query(args).await,
            Command::LastCache(command) => client::last_cache(command).await,
            Command::Kafka(command) => client::kafka(command).await,
            Command::Mqtt(command) => mqtt::command(command).await,
            Command::Compact { server } => client::compact(server).await,
            Command::Token(command) => auth::cli::run(command).await,
            Command::Alert(command) => alerts::cli::run(command).await,
            Command::Device(command) => devices::cli::run(command).await,
            Command::Database(command) => lifecycle::cli::database(command).await,
            Command::Table(command) => lifecycle::cli::table(command).await,
            Command::Probe(args) => client::probe(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

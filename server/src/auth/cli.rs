//! `kiln token create|list|revoke`: tokens through a running server's API, or, with
//! `--data-dir`, straight into a stopped server's catalog (how the first admin token of a
//! server that listens beyond loopback is made).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Subcommand;
use kiln_storage::catalog::Catalog;

use super::http::{CreatedToken, TokenInfo};
use super::{NewToken, issue_token, permissions};
use crate::client::{ServerOptions, percent_encode};

#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (shown this once; the server keeps only its hash).
    Create {
        #[command(flatten)]
        server: ServerOptions,
        /// A name for the token, unique among the live ones (`grafana`, `gateway-7`).
        #[arg(long)]
        name: String,
        /// An admin token: everything, token management and configuration included.
        #[arg(long)]
        admin: bool,
        /// A database the token may use (repeat, or comma-separated; `*` for all).
        #[arg(long = "database", short = 'd', value_delimiter = ',')]
        databases: Vec<String>,
        /// The token may query the databases.
        #[arg(long)]
        read: bool,
        /// The token may write to the databases.
        #[arg(long)]
        write: bool,
        /// The token is refused after this long (`30d`, `12h`); it never expires without.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Create it in the catalog under this data directory instead of through a server
        /// (the server must be stopped).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// With --data-dir: where that server keeps its catalog (the same flags as
        /// `kiln serve`'s).
        #[command(flatten)]
        store: crate::store::StoreArgs,
    },
    /// List the live tokens: names, permissions, creation and expiry.
    List {
        #[command(flatten)]
        server: ServerOptions,
    },
    /// Revoke a token: it is refused from then on.
    Revoke {
        #[command(flatten)]
        server: ServerOptions,
        /// The token's name.
        name: String,
    },
}

pub async fn run(command: TokenCommand) -> Result<(), String> {
    match command {
        TokenCommand::Create {
            server,
            name,
            admin,
            databases,
            read,
            write,
            expires_in,
            data_dir,
            store,
        } => {
            let new = NewToken {
                name,
                permissions: permissions(admin, &databases, read, write)?,
                expires_in,
            };
            let created = match data_dir {
                Some(dir) => create_offline(&dir, &store, new).await?,
                None => create_online(&server, new, databases, read, write, expires_in).await?,
            };
            print_created(&created);
            Ok(())
        }
        TokenCommand::List { server } => {
            let request = server.request(reqwest::Method::GET, "/api/v3/tokens")?;
            let v: serde_json::Value = server
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let tokens: Vec<TokenInfo> =
                serde_json::from_value(v["tokens"].clone()).map_err(|e| e.to_string())?;
            print_list(&tokens);
            Ok(())
        }
        TokenCommand::Revoke { server, name } => {
            let path = format!("/api/v3/tokens/{}", percent_encode(&name));
            let request = server.request(reqwest::Method::DELETE, &path)?;
            server.send(request).await?;
            println!("token {name:?} revoked");
            Ok(())
        }
    }
}

async fn create_online(
    server: &ServerOptions,
    new: NewToken,
    databases: Vec<String>,
    read: bool,
    write: bool,
    expires_in: Option<std::time::Duration>,
) -> Result<CreatedToken, String> {
    let mut permissions = Vec::new();
    if read {
        permissions.push("read");
    }
    if write {
        permissions.push("write");
    }
    let body = serde_json::json!({
        "name": new.name,
        "admin": new.permissions == kiln_storage::catalog::TokenPermissions::Admin,
        "databases": databases,
        "permissions": permissions,
        "expires_in": expires_in.map(|d| humantime::format_duration(d).to_string()),
    });
    let request = server
        .request(reqwest::Method::POST, "/api/v3/tokens")?
        .json(&body);
    server
        .send(request)
        .await?
        .json()
        .await
        .map_err(|e| e.to_string())
}

/// Creates the token in the catalog of the stopped server whose data directory is `dir`.
async fn create_offline(
    dir: &Path,
    store: &crate::store::StoreArgs,
    new: NewToken,
) -> Result<CreatedToken, String> {
    // A data directory made for the server that will start on it (a volume's init step).
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    let lock_path = dir.join("LOCK");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        format!(
            "data directory {} is in use by a running server: create the token through it \
             (without --data-dir), or stop it first",
            dir.display()
        )
    })?;
    let opened = store
        .open(dir, false)
        .await
        .map_err(|e| kiln_storage::error_chain(&e))?;
    // The partition width only matters for tables created, and none is.
    let catalog = Arc::new(
        Catalog::load(opened.store, 3_600_000_000_000)
            .await
            .map_err(|e| format!("cannot load the catalog in {}: {e}", opened.url))?,
    );
    let admin_exists = catalog.snapshot().has_admin_token();
    let (def, token) = issue_token(&catalog, new, admin_exists)
        .await
        .map_err(|e| e.to_string())?;
    drop(lock);
    Ok(CreatedToken {
        info: super::http::info(&def, kiln_ingest::write::now_nanos()),
        token,
    })
}

fn print_created(created: &CreatedToken) {
    println!("{}", created.token);
    eprintln!(
        "token {:?} created ({}); it is shown only this once: store it now",
        created.info.name,
        describe(&created.info)
    );
}

fn describe(info: &TokenInfo) -> String {
    if info.admin {
        return "admin".to_owned();
    }
    format!(
        "{} on {}",
        info.permissions.join(" and "),
        info.databases.join(", ")
    )
}

fn print_list(tokens: &[TokenInfo]) {
    if tokens.is_empty() {
        println!("no tokens: the server is open on loopback until an admin token exists");
        return;
    }
    let rows: Vec<[String; 4]> = tokens
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                describe(t),
                t.created_at.clone(),
                match (&t.expires_at, t.expired) {
                    (None, _) => "never".to_owned(),
                    (Some(at), true) => format!("{at} (expired)"),
                    (Some(at), false) => at.clone(),
                },
            ]
        })
        .collect();
    let header = ["name", "permissions", "created", "expires"].map(String::from);
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

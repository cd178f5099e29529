//! `kiln database create|list|update|delete` and `kiln table update|delete`: managed
//! databases and tables through a running server's API.

use clap::Subcommand;

use super::{CreateDatabase, DatabaseInfo, SetRetention, TableInfo};
use crate::client::ServerOptions;

#[derive(Debug, Clone, Subcommand)]
pub enum DatabaseCommand {
    /// Create a database (writes also create the databases they name).
    Create {
        #[command(flatten)]
        server: ServerOptions,
        name: String,
        /// Rows older than this are expired: never returned, refused by writes, their
        /// segments dropped (`30d`, `12h`; `none`: forever).
        #[arg(long)]
        retention: Option<String>,
    },
    /// List the databases, their tables and retention.
    List {
        #[command(flatten)]
        server: ServerOptions,
        /// Also the deleted databases and tables whose files are not yet deleted.
        #[arg(long)]
        deleted: bool,
    },
    /// Change a database's retention.
    Update {
        #[command(flatten)]
        server: ServerOptions,
        name: String,
        /// `30d`, `12h`, or `none` (forever).
        #[arg(long)]
        retention: String,
    },
    /// Delete a database: at once for queries and writes (its name can be used again),
    /// its files after `--hard-delete`.
    Delete {
        #[command(flatten)]
        server: ServerOptions,
        name: String,
        /// When its files are deleted: `now`, a duration (`24h`), or `default` (the
        /// server's `--hard-delete-default-duration`).
        #[arg(long)]
        hard_delete: Option<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TableCommand {
    /// Change a table's retention (it overrides its database's).
    Update {
        #[command(flatten)]
        server: ServerOptions,
        #[arg(long, short = 'd', env = "KILN_DATABASE")]
        database: String,
        name: String,
        /// `7d`, `12h`, or `none` (as its database).
        #[arg(long)]
        retention: String,
    },
    /// Delete a table (see `kiln database delete`).
    Delete {
        #[command(flatten)]
        server: ServerOptions,
        #[arg(long, short = 'd', env = "KILN_DATABASE")]
        database: String,
        name: String,
        #[arg(long)]
        hard_delete: Option<String>,
    },
}

const DATABASES: &str = "/api/v3/configure/database";
const TABLES: &str = "/api/v3/configure/table";

fn print_database(db: &DatabaseInfo) {
    match (&db.deleted_at, &db.hard_delete_at) {
        (Some(deleted), Some(hard)) => {
            println!("{}\tdeleted {deleted}, files deleted from {hard}", db.name)
        }
        (Some(_), None) => println!("{}\tdeleted", db.name),
        _ => println!("{}\tretention {}", db.name, db.retention_period),
    }
    for t in &db.tables {
        print_table("  ", t);
    }
}

fn print_table(indent: &str, t: &TableInfo) {
    match (&t.deleted_at, &t.hard_delete_at) {
        (Some(deleted), Some(hard)) => println!(
            "{indent}{}\tdeleted {deleted}, files deleted from {hard}",
            t.name
        ),
        _ if t.retention_period == "none" => println!("{indent}{}", t.name),
        _ => println!("{indent}{}\tretention {}", t.name, t.retention_period),
    }
}

pub async fn database(command: DatabaseCommand) -> Result<(), String> {
    match command {
        DatabaseCommand::Create {
            server,
            name,
            retention,
        } => {
            let body = CreateDatabase {
                db: name,
                retention_period: retention,
            };
            let request = server
                .request(reqwest::Method::POST, DATABASES)?
                .json(&body);
            print_database(&server.send_json(request).await?);
        }
        DatabaseCommand::List { server, deleted } => {
            let path = if deleted {
                format!("{DATABASES}?deleted=true")
            } else {
                DATABASES.to_owned()
            };
            let request = server.request(reqwest::Method::GET, &path)?;
            let databases: Vec<DatabaseInfo> = server.send_json(request).await?;
            for db in &databases {
                print_database(db);
            }
        }
        DatabaseCommand::Update {
            server,
            name,
            retention,
        } => {
            let body = SetRetention {
                db: name,
                table: None,
                retention_period: retention,
            };
            let request = server
                .request(reqwest::Method::PATCH, DATABASES)?
                .json(&body);
            print_database(&server.send_json(request).await?);
        }
        DatabaseCommand::Delete {
            server,
            name,
            hard_delete,
        } => {
            let mut query = vec![("db", name)];
            query.extend(hard_delete.map(|h| ("hard_delete", h)));
            let request = server
                .request(reqwest::Method::DELETE, DATABASES)?
                .query(&query);
            print_database(&server.send_json(request).await?);
        }
    }
    Ok(())
}

pub async fn table(command: TableCommand) -> Result<(), String> {
    match command {
        TableCommand::Update {
            server,
            database,
            name,
            retention,
        } => {
            let body = SetRetention {
                db: database,
                table: Some(name.clone()),
                retention_period: retention,
            };
            let request = server.request(reqwest::Method::PATCH, TABLES)?.json(&body);
            let db: DatabaseInfo = server.send_json(request).await?;
            if let Some(t) = db.tables.iter().find(|t| t.name == name) {
                print_table("", t);
            }
        }
        TableCommand::Delete {
            server,
            database,
            name,
            hard_delete,
        } => {
            let mut query = vec![("db", database), ("table", name)];
            query.extend(hard_delete.map(|h| ("hard_delete", h)));
            let request = server
                .request(reqwest::Method::DELETE, TABLES)?
                .query(&query);
            print_table("", &server.send_json(request).await?);
        }
    }
    Ok(())
}

//! `kiln device set|list|staleness`: device attributes and series staleness through a
//! running server's API.

use std::collections::BTreeMap;

use clap::Subcommand;

use super::{DeviceInfo, SetDevice, SetStaleness};
use crate::client::{ServerOptions, name_value};

#[derive(Debug, Clone, Subcommand)]
pub enum DeviceCommand {
    /// Set (or remove) attributes of a device: the tag value its readings carry.
    Set {
        #[command(flatten)]
        server: ServerOptions,
        #[arg(long, short = 'd', env = "KILN_DATABASE")]
        database: String,
        /// The device, as the tag its readings carry: `host=m1`.
        #[arg(long, value_parser = name_value)]
        tag: (String, String),
        /// An attribute, `name=value` (repeat): `location=hall-2`, `firmware=4.1`.
        #[arg(long = "attr", value_parser = name_value)]
        attributes: Vec<(String, String)>,
        /// An attribute to remove (repeat).
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
    /// List the devices that have attributes.
    List {
        #[command(flatten)]
        server: ServerOptions,
    },
    /// When the series of a table count as stale and offline in `system.series`.
    Staleness {
        #[command(flatten)]
        server: ServerOptions,
        #[arg(long, short = 'd', env = "KILN_DATABASE")]
        database: String,
        #[arg(long)]
        table: String,
        /// Silent this long: `stale` (`5m`).
        #[arg(long)]
        stale_after: String,
        /// Silent this long: `offline` (`1h`).
        #[arg(long)]
        offline_after: String,
    },
}

pub async fn run(command: DeviceCommand) -> Result<(), String> {
    match command {
        DeviceCommand::Set {
            server,
            database,
            tag,
            attributes,
            remove,
        } => {
            let mut changes: BTreeMap<String, Option<String>> =
                attributes.into_iter().map(|(k, v)| (k, Some(v))).collect();
            changes.extend(remove.into_iter().map(|k| (k, None)));
            let body = SetDevice {
                database,
                tag: tag.0,
                value: tag.1,
                attributes: changes,
            };
            let request = server
                .request(reqwest::Method::PUT, "/api/v3/devices")?
                .json(&body);
            let device: DeviceInfo = server
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let attrs: Vec<String> = device
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("{}={}: {}", device.tag, device.value, attrs.join(", "));
        }
        DeviceCommand::List { server } => {
            let request = server.request(reqwest::Method::GET, "/api/v3/devices")?;
            let devices: Vec<DeviceInfo> = server
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            for d in devices {
                let attrs: Vec<String> = d
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{}\t{}={}\t{}",
                    d.database,
                    d.tag,
                    d.value,
                    attrs.join(", ")
                );
            }
        }
        DeviceCommand::Staleness {
            server,
            database,
            table,
            stale_after,
            offline_after,
        } => {
            let body = SetStaleness {
                database,
                table,
                stale_after,
                offline_after,
            };
            let request = server
                .request(reqwest::Method::PUT, "/api/v3/series/staleness")?
                .json(&body);
            server.send(request).await?;
            println!(
                "series of {:?} are stale after {} and offline after {}",
                body.table, body.stale_after, body.offline_after
            );
        }
    }
    Ok(())
}

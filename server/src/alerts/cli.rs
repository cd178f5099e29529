//! `kiln alert create|list|show|delete`: alert rules through a running server's API.

use clap::{Args, Subcommand};

use super::http::{CreateRule, RuleInfo};
use crate::client::{ServerOptions, name_value, percent_encode};

#[derive(Debug, Clone, Subcommand)]
pub enum AlertCommand {
    /// Create a rule: a threshold rule (`--sql` and `--condition`) or a no-data rule
    /// (`--no-data-table` and `--no-data-after`).
    Create(Box<CreateArgs>),
    /// List the rules with their pending and firing counts.
    List {
        #[command(flatten)]
        server: ServerOptions,
    },
    /// Show a rule and its current alerts as JSON.
    Show {
        #[command(flatten)]
        server: ServerOptions,
        name: String,
    },
    /// Delete a rule; its firing alerts are resolved.
    Delete {
        #[command(flatten)]
        server: ServerOptions,
        name: String,
    },
}

/// `kiln alert create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    server: ServerOptions,
    /// The rule's name, unique among rules (the alerts' `alertname` label).
    name: String,
    /// The database its query runs in.
    #[arg(long, short = 'd', env = "KILN_DATABASE")]
    database: String,
    /// A query returning one row per series: its value column and labels.
    #[arg(long, conflicts_with_all = ["no_data_table", "no_data_after"])]
    sql: Option<String>,
    /// The value column (default: `value`, or the only numeric column).
    #[arg(long)]
    value_column: Option<String>,
    /// When a series fires: `> 90`, `>= 90`, `< 5`, `<= 5`, `== 1`, `!= 0`,
    /// `between 10 and 20`, `outside 10 and 20`.
    #[arg(long, requires = "sql")]
    condition: Option<String>,
    /// Resolve a firing series only once this holds (`< 85` for `> 90`).
    #[arg(long, requires = "sql")]
    recovery: Option<String>,
    /// No-data rule: the table whose series must keep sending.
    #[arg(long, requires = "no_data_after")]
    no_data_table: Option<String>,
    /// No-data rule: a series silent this long fires (`5m`).
    #[arg(long, requires = "no_data_table")]
    no_data_after: Option<String>,
    /// No-data rule: series seen within this window are watched (default 24h).
    #[arg(long, requires = "no_data_table")]
    lookback: Option<String>,
    /// Evaluation interval (default 30s).
    #[arg(long)]
    every: Option<String>,
    /// How long the condition must hold before the alert fires (default 0s).
    #[arg(long = "for")]
    for_: Option<String>,
    /// Default `warning`.
    #[arg(long)]
    severity: Option<String>,
    /// Template: `{{ $labels.host }}` and `{{ $value }}` are replaced.
    #[arg(long)]
    summary: Option<String>,
    #[arg(long)]
    description: Option<String>,
    /// A label added to the rule's alerts, `name=value` (repeat).
    #[arg(long = "label", value_parser = name_value)]
    labels: Vec<(String, String)>,
    /// Webhook URL for this rule instead of the server's.
    #[arg(long)]
    receiver: Option<String>,
}

pub async fn run(command: AlertCommand) -> Result<(), String> {
    match command {
        AlertCommand::Create(args) => {
            let CreateArgs {
                server,
                name,
                database,
                sql,
                value_column,
                condition,
                recovery,
                no_data_table,
                no_data_after,
                lookback,
                every,
                for_,
                severity,
                summary,
                description,
                labels,
                receiver,
            } = *args;
            let body = CreateRule {
                name,
                database,
                sql,
                value_column,
                condition,
                recovery,
                table: no_data_table,
                no_data_after,
                lookback,
                every,
                for_,
                severity,
                summary,
                description,
                labels: labels.into_iter().collect(),
                receiver,
            };
            let request = server
                .request(reqwest::Method::POST, "/api/v3/alerts/rules")?
                .json(&body);
            let rule: RuleInfo = server
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "created alert rule {:?} in database {:?}: evaluated every {}",
                rule.name, rule.database, rule.every
            );
        }
        AlertCommand::List { server } => {
            let request = server.request(reqwest::Method::GET, "/api/v3/alerts/rules")?;
            let rules: Vec<RuleInfo> = server
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            println!("rule\tdatabase\tkind\tevery\tpending\tfiring\tlast error");
            for r in rules {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    r.name,
                    r.database,
                    r.kind,
                    r.every,
                    r.pending,
                    r.firing,
                    r.last_error.as_deref().unwrap_or("-")
                );
            }
        }
        AlertCommand::Show { server, name } => {
            let path = format!("/api/v3/alerts/rules/{}", percent_encode(&name));
            let request = server.request(reqwest::Method::GET, &path)?;
            let rule: serde_json::Value = server
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let request = server.request(reqwest::Method::GET, "/api/v3/alerts")?;
            let alerts: Vec<serde_json::Value> = server
                .send(request)
                .await?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let alerts: Vec<_> = alerts
                .into_iter()
                .filter(|a| a["rule"].as_str() == Some(name.as_str()))
                .collect();
            let out = serde_json::json!({ "rule": rule, "alerts": alerts });
            println!(
                "{}",
                serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
            );
        }
        AlertCommand::Delete { server, name } => {
            let path = format!("/api/v3/alerts/rules/{}", percent_encode(&name));
            let request = server.request(reqwest::Method::DELETE, &path)?;
            server.send(request).await?;
            println!("deleted alert rule {name:?}");
        }
    }
    Ok(())
}

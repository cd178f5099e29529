//! Where `kiln serve`'s settings come from, highest first:
//!
//! 1. command-line flags;
//! 2. `KILN_*` environment variables, and `KILN_*_FILE` naming a file that holds the value
//!    (a mounted Kubernetes Secret: the value never sits in the environment or the image);
//! 3. the TOML file of `--config` (a ConfigMap): one key per flag, named as the flag
//!    without its dashes (`persist-buffer-bytes = "64MiB"`; `persist_buffer_bytes` too);
//!    a key that is no flag stops start-up with its name;
//! 4. the built-in profile of `--profile` ([`profile`]: `edge`, for 512 MiB devices);
//! 5. the memory the process may use, for the three memory sizes left unset
//!    ([`memory`]: a cgroup v2 limit, or the profile's budget);
//! 6. the flags' own defaults.
//!
//! Layers 2–5 are laid under the command line as flags, in [`resolve`], before the
//! command line is parsed for good: clap then checks every value the same way, whatever
//! layer it came from, and `kiln serve --check` can validate a ConfigMap.

pub mod memory;
pub mod profile;
pub mod size;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Why the settings could not be put together; start-up stops with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} ({path})")]
    Read {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not valid TOML")]
    Toml {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("unknown key `{key}` in {origin}: see `kiln serve --help` for the settings")]
    UnknownKey { key: String, origin: String },
    #[error("`{key}` cannot be set in {origin}, only on the command line")]
    NotInFiles { key: String, origin: String },
    #[error("`{key}` in {origin} is true or false, not {value:?}")]
    NotABool {
        key: String,
        origin: String,
        value: String,
    },
    #[error("`{key}` in {origin}")]
    Invalid {
        key: String,
        origin: String,
        #[source]
        source: Rejected,
    },
    #[error("`{key}` in {origin} is a string, number, boolean or a list of them")]
    BadValue { key: String, origin: String },
}

/// Why the flag's parser refused a value, in its first line (without clap's usage tips).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(String);

impl From<clap::Error> for Rejected {
    fn from(e: clap::Error) -> Self {
        let text = e.render().to_string();
        let line = text.lines().next().unwrap_or_default();
        Self(line.trim_start_matches("error: ").to_owned())
    }
}

/// The flags `serve` takes settings from but that no file or profile may set.
const NOT_IN_FILES: &[&str] = &["config", "check", "profile"];

/// `argv` with the settings of layers 2–5 added as flags, and what was decided about
/// memory (to log once logging runs). `argv` as given when it is not a `serve` command
/// line, or when it does not parse (clap then says why).
pub fn resolve(
    cli: Command,
    argv: Vec<OsString>,
) -> Result<(Vec<OsString>, Vec<String>), ConfigError> {
    resolve_with(cli, argv, std::env::vars_os(), memory::cgroup_limit())
}

/// [`resolve`] with the environment's `KILN_*_FILE` variables and the cgroup's memory
/// limit given.
fn resolve_with(
    cli: Command,
    argv: Vec<OsString>,
    env: impl IntoIterator<Item = (OsString, OsString)>,
    cgroup: Option<(u64, String)>,
) -> Result<(Vec<OsString>, Vec<String>), ConfigError> {
    let Ok(matches) = cli.clone().try_get_matches_from(&argv) else {
        return Ok((argv, Vec::new()));
    };
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok((argv, Vec::new()));
    };
    let Some(serve_cmd) = cli.find_subcommand("serve") else {
        return Ok((argv, Vec::new()));
    };
    let mut layers = Layers {
        command: serve_cmd,
        matches: serve,
        set: BTreeSet::new(),
        added: Vec::new(),
    };
    layers.secret_files(env)?;
    if let Some(path) = serve.get_one::<std::path::PathBuf>("config") {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "the configuration file".into(),
            path: path.display().to_string(),
            source,
        })?;
        layers.file(&text, &path.display().to_string())?;
    }
    let profile = serve.get_one::<profile::Profile>("profile").copied();
    if let Some(profile) = profile {
        layers.file(profile.toml(), &format!("the {profile} profile"))?;
    }
    let sizing = memory::Sizing::choose(cgroup, profile);
    let mut notes = Vec::new();
    if let Some(sizing) = sizing {
        let mut chosen = Vec::new();
        for (key, value) in sizing.defaults() {
            if layers.add(key, &[value.to_string()], "memory sizing")? {
                chosen.push(format!("--{key} {}", size::display(value)));
            }
        }
        if !chosen.is_empty() {
            notes.push(format!(
                "memory for this process: {} ({}); chose {}",
                size::display(sizing.budget),
                sizing.source,
                chosen.join(", ")
            ));
        }
    }
    let mut out = argv;
    out.extend(layers.added);
    Ok((out, notes))
}

struct Layers<'a> {
    command: &'a Command,
    matches: &'a ArgMatches,
    /// Flags a layer above has set.
    set: BTreeSet<String>,
    added: Vec<OsString>,
}

impl<'a> Layers<'a> {
    /// The argument a key names.
    fn arg(&self, key: &str) -> Option<&'a clap::Arg> {
        let key = key.replace('_', "-");
        self.command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
    }

    /// Whether the flag `id` came from the command line or the environment.
    fn given(&self, id: &str) -> bool {
        matches!(
            self.matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }

    /// Adds `--key value` for each value (a list sets a flag that repeats, such as
    /// `kafka-option`) unless a layer above set the flag; `false` if one did.
    fn add(&mut self, key: &str, values: &[String], origin: &str) -> Result<bool, ConfigError> {
        if values.is_empty() {
            return Ok(false);
        }
        let Some(arg) = self.arg(key) else {
            return Err(ConfigError::UnknownKey {
                key: key.into(),
                origin: origin.into(),
            });
        };
        let id = arg.get_id().to_string();
        let long = arg.get_long().unwrap_or(key).to_owned();
        if NOT_IN_FILES.contains(&long.as_str()) {
            return Err(ConfigError::NotInFiles {
                key: key.into(),
                origin: origin.into(),
            });
        }
        if self.given(&id) || self.set.contains(&id) {
            return Ok(false);
        }
        self.set.insert(id);
        for value in values {
            if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
                match value.as_str() {
                    "true" => self.added.push(format!("--{long}").into()),
                    "false" => {}
                    other => {
                        return Err(ConfigError::NotABool {
                            key: key.into(),
                            origin: origin.into(),
                            value: other.into(),
                        });
                    }
                }
            } else {
                self.check(arg, key, value, origin)?;
                self.added.push(format!("--{long}={value}").into());
            }
        }
        Ok(true)
    }

    /// Parses `--key value` alone, as the command line would, so that a bad value names
    /// its file.
    fn check(
        &self,
        arg: &clap::Arg,
        key: &str,
        value: &str,
        origin: &str,
    ) -> Result<(), ConfigError> {
        let long = arg.get_long().unwrap_or(key);
        self.command
            .clone()
            .try_get_matches_from(["serve".to_owned(), format!("--{long}={value}")])
            .map_err(|source| ConfigError::Invalid {
                key: key.into(),
                origin: origin.into(),
                source: Rejected::from(source),
            })?;
        Ok(())
    }

    /// `KILN_X_FILE=path` for a flag whose variable is `KILN_X`: the value is the file's
    /// contents (without a trailing newline), at the environment's precedence.
    fn secret_files(
        &mut self,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<(), ConfigError> {
        for (name, path) in env {
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix("_FILE") else {
                continue;
            };
            // (`KILN_ADMIN_TOKEN_FILE`, a flag's own variable, names no flag by its stem.)
            let command = self.command;
            let Some(arg) = command
                .get_arguments()
                .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(stem))
            else {
                continue;
            };
            let id = arg.get_id().to_string();
            if self.given(&id) {
                continue;
            }
            let value =
                std::fs::read_to_string(Path::new(&path)).map_err(|source| ConfigError::Read {
                    what: name.to_owned(),
                    path: Path::new(&path).display().to_string(),
                    source,
                })?;
            let long = arg.get_long().unwrap_or_default().to_owned();
            self.set.insert(id);
            self.added
                .push(format!("--{long}={}", value.trim_end_matches(['\n', '\r'])).into());
        }
        Ok(())
    }

    /// The keys of a TOML text, as flags.
    fn file(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Toml {
            origin: origin.into(),
            source,
        })?;
        for (key, value) in &table {
            let values = match value {
                toml::Value::Array(items) => items.iter().collect::<Vec<_>>(),
                other => vec![other],
            };
            let mut texts = Vec::with_capacity(values.len());
            for v in values {
                texts.push(match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    _ => {
                        return Err(ConfigError::BadValue {
                            key: key.clone(),
                            origin: origin.into(),
                        });
                    }
                });
            }
            self.add(key, &texts, origin)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

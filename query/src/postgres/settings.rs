//! PostgreSQL settings as a PostgreSQL session reads them: `current_setting(name [,
//! missing_ok])` and `SHOW name`.
//!
//! Clients ask for settings to learn what server they talk to: Grafana reads
//! `server_version_num` to pick its SQL, JDBC drivers read `TimeZone` and
//! `standard_conforming_strings`, Grafana's table picker splits `search_path`. Each
//! connection has its own [`PgSettings`]: Kiln's fixed values, overlaid with what the client
//! sent at startup or changed with `SET` (the protocol layer copies those in with
//! [`PgSettings::sync`] before each statement). A name Kiln does not know is an error
//! (`unrecognized configuration parameter`), or NULL with `missing_ok` true, as in
//! PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::datatypes::DataType;
use datafusion::common::{ScalarValue, exec_err};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};

use super::{POSTGRES_VERSION, server_version};

/// The message of the error for a setting Kiln does not know; the protocol layer gives it
/// PostgreSQL's SQLSTATE 42704.
pub const UNRECOGNIZED: &str = "unrecognized configuration parameter";

/// Settings whose value the client chooses (at startup or with `SET`), by the lowercase name
/// the protocol layer keeps them under, with the name PostgreSQL spells them.
const CLIENT_SETTINGS: &[(&str, &str)] = &[
    ("application_name", "application_name"),
    ("bytea_output", "bytea_output"),
    ("client_encoding", "client_encoding"),
    ("datestyle", "DateStyle"),
    ("extra_float_digits", "extra_float_digits"),
    ("intervalstyle", "IntervalStyle"),
    ("search_path", "search_path"),
    ("timezone", "TimeZone"),
];

/// Where the protocol layer keeps the user of the startup message.
const USER_KEY: &str = "user";

/// Where the protocol layer keeps `SET statement_timeout` (milliseconds).
const STATEMENT_TIMEOUT_KEY: &str = "statement_timeout_ms";

/// `server_version_num`: major × 10000 + minor, as PostgreSQL 10 and later count.
fn server_version_num() -> String {
    let mut parts = POSTGRES_VERSION
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major * 10_000 + minor).to_string()
}

/// Kiln's values, by lowercase name. Nothing here reveals the server's files.
fn defaults() -> HashMap<String, String> {
    let fixed: &[(&str, &str)] = &[
        ("application_name", ""),
        ("block_size", "8192"),
        ("bytea_output", "hex"),
        ("client_encoding", "UTF8"),
        ("client_min_messages", "notice"),
        ("datestyle", "ISO, MDY"),
        ("default_transaction_isolation", "read committed"),
        ("default_transaction_read_only", "off"),
        ("extra_float_digits", "1"),
        ("in_hot_standby", "off"),
        ("integer_datetimes", "on"),
        ("intervalstyle", "postgres"),
        ("is_superuser", "off"),
        ("lc_collate", "C.UTF-8"),
        ("lc_ctype", "C.UTF-8"),
        ("lc_messages", "C"),
        ("lc_monetary", "C"),
        ("lc_numeric", "C"),
        ("lc_time", "C"),
        ("max_identifier_length", "63"),
        ("max_index_keys", "32"),
        ("search_path", "\"$user\", public"),
        ("server_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("statement_timeout", "0"),
        ("timezone", "UTC"),
        ("transaction_isolation", "read committed"),
        ("transaction_read_only", "off"),
    ];
    let mut values: HashMap<String, String> = fixed
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    values.insert("server_version".to_owned(), server_version());
    values.insert("server_version_num".to_owned(), server_version_num());
    values
}

/// One connection's settings (see the module docs).
#[derive(Debug)]
pub struct PgSettings {
    defaults: HashMap<String, String>,
    /// What the client chose, by lowercase name.
    client: RwLock<HashMap<String, String>>,
    /// The user the client connected as.
    user: RwLock<String>,
}

impl Default for PgSettings {
    fn default() -> Self {
        Self {
            defaults: defaults(),
            client: RwLock::default(),
            user: RwLock::default(),
        }
    }
}

impl PgSettings {
    /// The value of `name` (any case), or `None` if Kiln has no such setting.
    pub fn get(&self, name: &str) -> Option<String> {
        let name = name.trim().to_ascii_lowercase();
        let name = match name.as_str() {
            // `SHOW TIME ZONE` is `SHOW TimeZone`.
            "time zone" => "timezone".to_owned(),
            _ => name,
        };
        let client = self.client.read().unwrap_or_else(|e| e.into_inner());
        client
            .get(&name)
            .or_else(|| self.defaults.get(&name))
            .cloned()
    }

    /// The user the client connected as (`user` in its startup message).
    pub fn user(&self) -> String {
        self.user.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Copies what the client chose from the connection's metadata: the startup parameters
    /// (any case), the user, and what `SET` recorded.
    pub fn sync(&self, metadata: &HashMap<String, String>) {
        if let Some(user) = metadata.get(USER_KEY) {
            let mut current = self.user.write().unwrap_or_else(|e| e.into_inner());
            if *current != *user {
                current.clone_from(user);
            }
        }
        let mut chosen = HashMap::new();
        for (key, value) in metadata {
            let lower = key.to_ascii_lowercase();
            if CLIENT_SETTINGS.iter().any(|(name, _)| *name == lower) {
                chosen.insert(lower, value.clone());
            }
        }
        if let Some(ms) = metadata.get(STATEMENT_TIMEOUT_KEY) {
            chosen.insert("statement_timeout".to_owned(), format!("{ms}ms"));
        }
        let mut client = self.client.write().unwrap_or_else(|e| e.into_inner());
        if *client != chosen {
            *client = chosen;
        }
    }

    /// Every setting: its name as PostgreSQL spells it, its value, and whether the client
    /// chose it (`client`) or it is Kiln's (`default`), sorted by name.
    pub fn all(&self) -> Vec<(String, String, &'static str)> {
        let client = self.client.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = self
            .defaults
            .iter()
            .map(|(name, value)| match client.get(name) {
                Some(chosen) => (Self::display_name(name), chosen.clone(), "client"),
                None => (Self::display_name(name), value.clone(), "default"),
            })
            .collect();
        all.sort_by_key(|(name, ..)| name.to_ascii_lowercase());
        all
    }

    /// The name PostgreSQL shows for a setting (`TimeZone`, `DateStyle`), for `SHOW`'s
    /// column.
    pub fn display_name(name: &str) -> String {
        let lower = name.trim().to_ascii_lowercase();
        CLIENT_SETTINGS
            .iter()
            .find(|(key, _)| *key == lower)
            .map_or(lower.clone(), |(_, shown)| (*shown).to_owned())
    }
}

/// `current_setting(name [, missing_ok])` over `settings`.
pub fn current_setting(settings: Arc<PgSettings>) -> ScalarUDF {
    ScalarUDF::new_from_impl(CurrentSetting {
        settings,
        signature: Signature::one_of(
            vec![
                TypeSignature::Exact(vec![DataType::Utf8]),
                TypeSignature::Exact(vec![DataType::Utf8, DataType::Boolean]),
            ],
            Volatility::Stable,
        ),
    })
}

#[derive(Debug)]
struct CurrentSetting {
    settings: Arc<PgSettings>,
    signature: Signature,
}

impl PartialEq for CurrentSetting {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.settings, &other.settings)
    }
}

impl Eq for CurrentSetting {}

impl std::hash::Hash for CurrentSetting {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.settings).hash(state);
    }
}

impl ScalarUDFImpl for CurrentSetting {
    fn name(&self) -> &str {
        "current_setting"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let scalar_only = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let names = arrays[0].as_string::<i32>();
        let missing_ok = arrays.get(1).map(|a| a.as_boolean().clone());
        let mut out = StringBuilder::with_capacity(rows, rows * 8);
        for row in 0..names.len() {
            if names.is_null(row) {
                out.append_null();
                continue;
            }
            let name = names.value(row);
            match self.settings.get(name) {
                Some(value) => out.append_value(value),
                None if missing_ok
                    .as_ref()
                    .is_some_and(|m| m.is_valid(row) && m.value(row)) =>
                {
                    out.append_null()
                }
                None => return exec_err!("{UNRECOGNIZED} \"{name}\""),
            }
        }
        let array: ArrayRef = Arc::new(out.finish());
        if scalar_only {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                &array, 0,
            )?));
        }
        Ok(ColumnarValue::Array(array))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_choices_overlay_kiln_values_and_unknown_names_are_none() {
        let settings = PgSettings::default();
        assert_eq!(
            settings.get("server_version_num").as_deref(),
            Some("160006")
        );
        assert_eq!(settings.get("TimeZone").as_deref(), Some("UTC"));
        assert_eq!(settings.get("no_such_thing"), None);
        let metadata = HashMap::from([
            ("TimeZone".to_owned(), "Europe/Berlin".to_owned()),
            ("search_path".to_owned(), "public".to_owned()),
            ("statement_timeout_ms".to_owned(), "5000".to_owned()),
            ("user".to_owned(), "grafana".to_owned()),
        ]);
        settings.sync(&metadata);
        assert_eq!(settings.get("timezone").as_deref(), Some("Europe/Berlin"));
        assert_eq!(settings.get("time zone").as_deref(), Some("Europe/Berlin"));
        assert_eq!(settings.get("search_path").as_deref(), Some("public"));
        assert_eq!(settings.get("statement_timeout").as_deref(), Some("5000ms"));
        // What the client does not choose is not taken from its metadata.
        assert_eq!(settings.get("user"), None);
        settings.sync(&HashMap::new());
        assert_eq!(settings.get("timezone").as_deref(), Some("UTC"));
        assert_eq!(PgSettings::display_name("timezone"), "TimeZone");
    }
}

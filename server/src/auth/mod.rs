//! Who may do what: access tokens, checked by one [`Authorizer`] that every door asks.
//!
//! ```text
//!  HTTP (Bearer, Token, Basic, v1 u/p) ─┐
//!  gRPC WriteService (authorization)  ──┤                       ┌─ catalog: TokenDef by hash
//!  Flight SQL (Bearer; handshake Basic)─┼─▶ Authorizer ─────────┤  (TokenCreated/TokenRevoked)
//!  PostgreSQL (password = token)      ──┘   ▶ Principal         └─ --admin-token-file
//!                                            ▶ require(Action)
//! ```
//!
//! A token is `kiln_` and 64 hex digits (256 random bits), shown once when created; the
//! catalog keeps its SHA-256 ([`token::hash`]), its name, what it may do and its expiry.
//! Admin tokens may do everything; database tokens read and/or write the databases they
//! name (`*`: all).
//!
//! Tokens are enforced once an admin token exists: one in the catalog, or one given to
//! the server as a file (`--admin-token-file`, a mounted Kubernetes Secret). Until then a
//! server whose listeners are all on loopback is open, as a first start on a laptop is;
//! one that listens elsewhere refuses to start unless `--without-auth` says it may serve
//! without tokens ([`Authorizer::check_startup`]).

pub mod cli;
pub mod grpc;
pub mod http;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_storage::catalog::{Catalog, TokenDef, TokenPermissions};
use kiln_storage::ids::CatalogSequence;
use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Something a request does, checked against its [`Principal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    Read(&'a str),
    Write(&'a str),
    /// Token management and server configuration.
    Admin,
}

impl<'a> Action<'a> {
    /// What a materialized view statement on `database` needs: creating and dropping
    /// change its tables (admin), refreshing writes it.
    pub fn of_view_statement(
        statement: kiln_query::views::ViewStatement,
        database: &'a str,
    ) -> Self {
        match statement.manages_tables() {
            true => Action::Admin,
            false => Action::Write(database),
        }
    }
}

impl std::fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(db) => write!(f, "read database {db:?}"),
            Self::Write(db) => write!(f, "write database {db:?}"),
            Self::Admin => f.write_str("manage the server (an admin token is needed)"),
        }
    }
}

/// Who is asking: the token a request presented, or anyone while tokens are not enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Tokens are not enforced (see the module docs).
    Anyone,
    Token {
        name: String,
        permissions: TokenPermissions,
    },
}

impl Principal {
    pub fn allows(&self, action: Action<'_>) -> bool {
        let Self::Token { permissions, .. } = self else {
            return true;
        };
        match (permissions, action) {
            (TokenPermissions::Admin, _) => true,
            (_, Action::Admin) => false,
            (
                TokenPermissions::Database {
                    databases,
                    read,
                    write,
                },
                Action::Read(db) | Action::Write(db),
            ) => {
                let granted = match action {
                    Action::Read(_) => *read,
                    _ => *write,
                };
                granted && databases.iter().any(|d| d == "*" || d == db)
            }
        }
    }

    /// `Forbidden` unless the principal may do `action`.
    pub fn require(&self, action: Action<'_>) -> Result<(), AuthError> {
        if self.allows(action) {
            return Ok(());
        }
        Err(AuthError::Forbidden {
            token: self.name().to_owned(),
            action: action.to_string(),
        })
    }

    /// The databases this principal may read, for sessions that must not show others
    /// (`None`: all of them).
    pub fn readable_databases(&self) -> Option<Vec<String>> {
        match self {
            Self::Anyone
            | Self::Token {
                permissions: TokenPermissions::Admin,
                ..
            } => None,
            Self::Token {
                permissions:
                    TokenPermissions::Database {
                        databases, read, ..
                    },
                ..
            } => {
                if *read && databases.iter().any(|d| d == "*") {
                    None
                } else if *read {
                    Some(databases.clone())
                } else {
                    Some(Vec::new())
                }
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Anyone => "anyone",
            Self::Token { name, .. } => name,
        }
    }
}

/// Why a request was refused. `Missing`, `Invalid` and `Expired` are "who are you"
/// (HTTP 401, gRPC UNAUTHENTICATED, PostgreSQL 28P01); `Forbidden` is "not allowed"
/// (403, PERMISSION_DENIED, 42501). The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send a token (Authorization: Bearer <token>)")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("token {token:?} has expired")]
    Expired { token: String },
    #[error("token {token:?} may not {action}")]
    Forbidden { token: String, action: String },
}

impl AuthError {
    /// The reason label of `kiln_auth_failures_total`.
    fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::Expired { .. } => "expired",
            Self::Forbidden { .. } => "forbidden",
        }
    }

    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::Forbidden { .. })
    }
}

/// The protocol a request came in on, for the failure counter's `door` label.
#[derive(Debug, Clone, Copy)]
pub enum Door {
    Http,
    Grpc,
    FlightSql,
    Postgres,
}

impl Door {
    fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::FlightSql => "flight_sql",
            Self::Postgres => "postgres",
        }
    }
}

/// Labels of `kiln_auth_failures_total`: door and reason.
pub type FailureLabels = Vec<(&'static str, &'static str)>;

/// Live tokens by hash, as of one catalog sequence.
#[derive(Debug, Default)]
struct TokenIndex {
    sequence: Option<CatalogSequence>,
    by_hash: std::collections::HashMap<String, TokenDef>,
}

/// Checks credentials against the catalog's tokens (see the module docs).
#[derive(Debug)]
pub struct Authorizer {
    catalog: Arc<Catalog>,
    without_auth: bool,
    /// Hash of the admin token given as a file.
    file_admin: Option<String>,
    index: RwLock<TokenIndex>,
    failures: Family<FailureLabels, Counter>,
    /// Nanoseconds since the epoch; a test may stop the clock.
    now: fn() -> i64,
}

/// What the server was told about authentication.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Serve without tokens, even on non-loopback addresses.
    pub without_auth: bool,
    /// The admin token itself (read from `--admin-token-file`).
    pub admin_token: Option<String>,
}

/// The name an admin token given as a file goes by in logs and errors.
pub const FILE_ADMIN_NAME: &str = "admin-token-file";

impl Authorizer {
    pub fn new(catalog: Arc<Catalog>, config: AuthConfig) -> Self {
        Self {
            catalog,
            without_auth: config.without_auth,
            file_admin: config.admin_token.as_deref().map(token::hash),
            index: RwLock::default(),
            failures: Family::default(),
            now: kiln_ingest::write::now_nanos,
        }
    }

    /// Whether requests must present a token (see the module docs).
    pub fn enforced(&self) -> bool {
        !self.without_auth
            && (self.file_admin.is_some() || self.catalog.snapshot().has_admin_token())
    }

    /// Refuses to start a server that would serve a non-loopback address without tokens.
    pub fn check_startup(&self, listeners: &[SocketAddr]) -> Result<(), String> {
        if self.without_auth || self.enforced() {
            return Ok(());
        }
        match listeners.iter().find(|a| !a.ip().is_loopback()) {
            None => Ok(()),
            Some(addr) => Err(format!(
                "refusing to listen on {addr} without authentication: give an admin token with \
                 --admin-token-file (KILN_ADMIN_TOKEN_FILE), create one with `kiln token create \
                 --admin --data-dir …` while the server is stopped, or pass --without-auth to \
                 serve without tokens"
            )),
        }
    }

    /// Who presents `credential` (a token), or why they may not come in.
    pub fn authenticate(
        &self,
        door: Door,
        credential: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let result = self.principal(credential);
        if let Err(e) = &result {
            self.count_failure(door, e);
            tracing::info!(
                door = door.label(),
                reason = e.reason(),
                "request refused: {e}"
            );
        }
        result
    }

    /// `principal.require(action)`, counted and logged when refused.
    pub fn authorize(
        &self,
        door: Door,
        principal: &Principal,
        action: Action<'_>,
    ) -> Result<(), AuthError> {
        let result = principal.require(action);
        if let Err(e) = &result {
            self.count_failure(door, e);
            tracing::info!(
                door = door.label(),
                reason = e.reason(),
                "request refused: {e}"
            );
        }
        result
    }

    /// Authenticates, then authorizes `action`.
    pub fn check(
        &self,
        door: Door,
        credential: Option<&str>,
        action: Action<'_>,
    ) -> Result<Principal, AuthError> {
        let principal = self.authenticate(door, credential)?;
        self.authorize(door, &principal, action)?;
        Ok(principal)
    }

    fn count_failure(&self, door: Door, e: &AuthError) {
        self.failures
            .get_or_create(&vec![("door", door.label()), ("reason", e.reason())])
            .inc();
    }

    /// Refusals by door and reason, for `/metrics`.
    pub fn failures(&self) -> Family<FailureLabels, Counter> {
        self.failures.clone()
    }

    fn principal(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        if !self.enforced() {
            return Ok(Principal::Anyone);
        }
        let credential = credential.map(str::trim).filter(|c| !c.is_empty());
        let Some(credential) = credential else {
            return Err(AuthError::Missing);
        };
        let hash = token::hash(credential);
        if self.file_admin.as_deref() == Some(hash.as_str()) {
            return Ok(Principal::Token {
                name: FILE_ADMIN_NAME.to_owned(),
                permissions: TokenPermissions::Admin,
            });
        }
        let def = self.lookup(&hash).ok_or(AuthError::Invalid)?;
        if def.expires_at.is_some_and(|at| (self.now)() >= at) {
            return Err(AuthError::Expired { token: def.name });
        }
        Ok(Principal::Token {
            name: def.name,
            permissions: def.permissions,
        })
    }

    /// The live token with `hash`, from an index rebuilt when the catalog changed.
    fn lookup(&self, hash: &str) -> Option<TokenDef> {
        let state = self.catalog.snapshot();
        {
            let index = self.index.read();
            if index.sequence == Some(state.sequence) {
                return index.by_hash.get(hash).cloned();
            }
        }
        let mut index = self.index.write();
        index.by_hash = state
            .tokens
            .values()
            .map(|t| (t.hash.clone(), t.clone()))
            .collect();
        index.sequence = Some(state.sequence);
        index.by_hash.get(hash).cloned()
    }

    /// Whether an admin token was given as a file (the catalog's last admin token may then
    /// be revoked).
    pub fn has_file_admin(&self) -> bool {
        self.file_admin.is_some()
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}

/// A token to create: its name, what it may do, and how long it lives.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: String,
    pub permissions: TokenPermissions,
    pub expires_in: Option<std::time::Duration>,
}

/// Why a token cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// A database token while no admin token exists: it would not be enforced.
    #[error("create an admin token first: tokens are enforced once an admin token exists")]
    NoAdmin,
    #[error(transparent)]
    Catalog(#[from] kiln_storage::catalog::Error),
}

/// Creates `new` in `catalog` and returns it with its text (shown this once). A database
/// token needs an admin token to exist (`admin_exists`, the catalog's or a file's).
pub async fn issue_token(
    catalog: &Arc<Catalog>,
    new: NewToken,
    admin_exists: bool,
) -> Result<(TokenDef, String), IssueError> {
    if new.permissions != TokenPermissions::Admin && !admin_exists {
        return Err(IssueError::NoAdmin);
    }
    let now = kiln_ingest::write::now_nanos();
    let expires_at = new
        .expires_in
        .map(|d| now.saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)));
    let text = token::generate();
    let def = catalog
        .create_token(TokenDef {
            id: Default::default(),
            name: new.name,
            hash: token::hash(&text),
            permissions: new.permissions,
            created_at: now,
            expires_at,
        })
        .await?;
    Ok((def, text))
}

/// The permissions of a token from what a user asks: admin, or databases with `read`
/// and/or `write`.
pub fn permissions(
    admin: bool,
    databases: &[String],
    read: bool,
    write: bool,
) -> Result<TokenPermissions, String> {
    if admin {
        if !databases.is_empty() || read || write {
            return Err(
                "an admin token may do everything: give it no databases or permissions".into(),
            );
        }
        return Ok(TokenPermissions::Admin);
    }
    if databases.is_empty() {
        return Err(
            "name the databases the token may use (`*` for all), or make it an admin token".into(),
        );
    }
    if !read && !write {
        return Err("give the token read and/or write permission".into());
    }
    Ok(TokenPermissions::Database {
        databases: databases.to_vec(),
        read,
        write,
    })
}

#[cfg(test)]
mod tests;

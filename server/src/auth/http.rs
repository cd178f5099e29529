//! Tokens over HTTP: who a request is, and the token management API.
//!
//! [`authenticate`] runs before every handler except `/health`, `/ready` and `/metrics`
//! (probes and scrapers, which reveal nothing about data). It reads the token from
//! `Authorization` (`Bearer`, `Token`, `Basic`) or InfluxDB v1's `u`/`p` query parameters,
//! answers 401 with `WWW-Authenticate` when there is none or it is not valid, and hands the
//! [`Principal`] to the handler, which checks what it needs (403 when not allowed).
//!
//! The token API (admin tokens only):
//!
//! | method and path | what |
//! |---|---|
//! | `POST /api/v3/tokens` | `{"name", "admin": true}` or `{"name", "databases": [..], "permissions": ["read", "write"]}`, optionally `"expires_in": "30d"`; answers 201 with the token, shown this once |
//! | `GET /api/v3/tokens` | every live token: name, permissions, creation and expiry, never the token |
//! | `DELETE /api/v3/tokens/{name}` | revokes it (204; 404 if none) |

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_storage::catalog::{TokenDef, TokenPermissions};
use serde::{Deserialize, Serialize};

use super::{
    Action, AuthError, Authorizer, Door, IssueError, NewToken, Principal, issue_token, token,
};

/// Paths anyone may ask, with or without a token.
const OPEN_PATHS: &[&str] = &["/health", "/ready", "/metrics"];

/// The token of a request: its `Authorization` header, or v1's `p` (or `u`) parameter.
fn credential(request: &Request) -> Option<String> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        return value.to_str().ok().and_then(token::from_authorization);
    }
    let query = request.uri().query()?;
    let mut user = None;
    let mut password = None;
    for (key, value) in url_pairs(query) {
        match key.as_str() {
            "p" => password = Some(value),
            "u" => user = Some(value),
            _ => {}
        }
    }
    password.filter(|p| !p.is_empty()).or(user)
}

/// `key=value` pairs of a query string, percent-decoded.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}

/// An authentication or authorization failure as an HTTP answer.
pub fn refusal(e: &AuthError) -> Response {
    let status = if e.is_forbidden() {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut response =
        (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"kiln\""),
        );
    }
    response
}

/// The middleware (see the module docs).
pub async fn authenticate(
    State(auth): State<Arc<Authorizer>>,
    mut request: Request,
    next: Next,
) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    match auth.authenticate(Door::Http, credential(&request).as_deref()) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(e) => refusal(&e),
    }
}

/// `principal` may do `action`, or the refusal to answer (see [`refusal`]).
pub fn require(
    auth: &Authorizer,
    principal: &Principal,
    action: Action<'_>,
) -> Result<(), AuthError> {
    auth.authorize(Door::Http, principal, action)
}

/// `POST /api/v3/tokens`.
#[derive(Debug, Deserialize)]
pub struct CreateToken {
    pub name: String,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub databases: Vec<String>,
    /// `read` and/or `write`.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// A duration such as `30d` or `12h`.
    pub expires_in: Option<String>,
}

/// A token as listed: everything but the token.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub admin: bool,
    pub databases: Vec<String>,
    pub permissions: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    pub expires_at: Option<String>,
    pub expired: bool,
}

/// The answer to a creation: the token, shown this once.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

fn rfc3339(nanos: i64) -> String {
    crate::http::rfc3339(nanos, chrono::SecondsFormat::Secs)
}

pub fn info(def: &TokenDef, now: i64) -> TokenInfo {
    let (admin, databases, permissions) = match &def.permissions {
        TokenPermissions::Admin => (true, Vec::new(), Vec::new()),
        TokenPermissions::Database {
            databases,
            read,
            write,
        } => {
            let mut permissions = Vec::new();
            if *read {
                permissions.push("read".to_owned());
            }
            if *write {
                permissions.push("write".to_owned());
            }
            (false, databases.clone(), permissions)
        }
    };
    TokenInfo {
        name: def.name.clone(),
        admin,
        databases,
        permissions,
        created_at: rfc3339(def.created_at),
        expires_at: def.expires_at.map(rfc3339),
        expired: def.expires_at.is_some_and(|at| now >= at),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// What a creation request asks for, checked.
fn new_token(request: CreateToken) -> Result<NewToken, String> {
    let mut read = false;
    let mut write = false;
    for p in &request.permissions {
        match p.as_str() {
            "read" => read = true,
            "write" => write = true,
            other => {
                return Err(format!(
                    "unknown permission {other:?}; use read and/or write"
                ));
            }
        }
    }
    let permissions = super::permissions(request.admin, &request.databases, read, write)?;
    let expires_in = match request.expires_in.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => return Err(format!("invalid expires_in: {e}")),
    };
    Ok(NewToken {
        name: request.name,
        permissions,
        expires_in,
    })
}

/// `POST /api/v3/tokens`.
pub async fn create(
    State(auth): State<Arc<Authorizer>>,
    axum::Extension(principal): axum::Extension<Principal>,
    Json(request): Json<CreateToken>,
) -> Response {
    if let Err(e) = require(&auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let new = match new_token(request) {
        Ok(new) => new,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match issue_token(auth.catalog(), new, auth.enforced()).await {
        Ok((def, text)) => {
            tracing::info!(token = %def.name, by = principal.name(), "token created");
            (
                StatusCode::CREATED,
                Json(CreatedToken {
                    info: info(&def, kiln_ingest::write::now_nanos()),
                    token: text,
                }),
            )
                .into_response()
        }
        Err(e @ IssueError::NoAdmin) => error(StatusCode::CONFLICT, e.to_string()),
        Err(IssueError::Catalog(kiln_storage::catalog::Error::InvalidToken(e))) => {
            error(StatusCode::CONFLICT, e)
        }
        Err(IssueError::Catalog(e @ kiln_storage::catalog::Error::InvalidName { .. })) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %kiln_storage::error_chain(&e), "creating a token failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "creating the token failed",
            )
        }
    }
}
/// `GET /api/v3/tokens`.
pub async fn list(
    State(auth): State<Arc<Authorizer>>,
    axum::Extension(principal): axum::Extension<Principal>,
) -> Response {
    if let Err(e) = require(&auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let now = kiln_ingest::write::now_nanos();
    let state = auth.catalog().snapshot();
    let tokens: Vec<TokenInfo> = state.tokens.values().map(|t| info(t, now)).collect();
    Json(serde_json::json!({ "tokens": tokens })).into_response()
}

/// `DELETE /api/v3/tokens/{name}`.
pub async fn revoke(
    State(auth): State<Arc<Authorizer>>,
    axum::Extension(principal): axum::Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    if let Err(e) = require(&auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    match auth
        .catalog()
        .revoke_token(&name, auth.has_file_admin())
        .await
    {
        Ok(Some(_)) => {
            tracing::info!(token = %name, by = principal.name(), "token revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no token named {name:?}")),
        Err(kiln_storage::catalog::Error::InvalidToken(e)) => error(StatusCode::CONFLICT, e),
        Err(e) => {
            tracing::error!(error = %kiln_storage::error_chain(&e), "revoking a token failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "revoking the token failed",
            )
        }
    }
}

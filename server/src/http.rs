//! The HTTP API: line protocol writes (InfluxDB v1, v2 and v3 paths), SQL queries,
//! health, readiness and metrics. Every request but health, readiness and metrics carries
//! a token once tokens are enforced ([`crate::auth::http`]); each handler checks what the
//! token may do.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRef, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use axum::{Extension, Router};
use futures::TryStreamExt;
use kiln_ingest::line_protocol::{LineError, Precision, validate_lines};
use kiln_query::QueryEngine;
use kiln_storage::Engine;
use serde::{Deserialize, Serialize};

use crate::auth::http::{refusal, require};
use crate::auth::{Action, Authorizer, Principal};
use crate::metrics::Metrics;
use crate::results::Format;
use crate::write::{FailureKind, WriteError, classify, write_validated};

#[derive(Clone)]
pub struct AppState {
    /// The Kafka sources' live figures.
    pub kafka: Arc<Vec<Arc<kiln_ingest::kafka::SourceStatus>>>,
    /// The MQTT sources' live figures.
    pub mqtt: Arc<Vec<Arc<kiln_ingest::mqtt::SourceStatus>>>,
    pub engine: Arc<Engine>,
    pub query: QueryEngine,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<prometheus_client::registry::Registry>,
    pub max_body_bytes: usize,
    /// Largest query result (bytes of Arrow data) the query API assembles.
    pub max_result_bytes: usize,
    /// Permits for the query API's queries running at once (`--http-max-queries`).
    pub query_permits: Arc<tokio::sync::Semaphore>,
    /// True once the server is shutting down.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub auth: Arc<Authorizer>,
    /// How long a deleted database's or table's files stay when the delete does not say.
    pub hard_delete_default: std::time::Duration,
}

impl FromRef<AppState> for Arc<Authorizer> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.auth)
    }
}

/// The engine as `principal` may query it: only the databases it may read.
pub(crate) fn query_engine(s: &AppState, principal: &Principal) -> QueryEngine {
    match principal.readable_databases() {
        None => s.query.clone(),
        Some(only) => s.query.visible_to(kiln_query::Visible::only(only)),
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let auth = Arc::clone(&state.auth);
    Router::new()
        .route("/api/v3/write_lp", post(write_v3))
        .route("/api/v2/write", post(write_v2))
        .route("/write", post(write_v1))
        .route("/api/v3/query_sql", get(query_get).post(query_post))
        .route(
            "/api/v3/configure/last_cache",
            post(create_last_cache).delete(drop_last_cache),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v3/kafka", get(kafka_status))
        .route("/api/v3/mqtt", get(crate::mqtt::status))
        .route("/api/v3/compact", post(compact))
        .route(
            "/api/v3/tokens",
            post(crate::auth::http::create).get(crate::auth::http::list),
        )
        .route("/api/v3/tokens/{name}", delete(crate::auth::http::revoke))
        .route(
            "/api/v3/alerts/rules",
            post(crate::alerts::http::create).get(crate::alerts::http::list),
        )
        .route(
            "/api/v3/alerts/rules/{name}",
            get(crate::alerts::http::show).delete(crate::alerts::http::delete),
        )
        .route("/api/v3/alerts", get(crate::alerts::http::alerts))
        .route(
            "/api/v3/devices",
            put(crate::devices::set).get(crate::devices::list),
        )
        .route(
            "/api/v3/series/staleness",
            put(crate::devices::set_staleness),
        )
        .route(
            "/api/v3/configure/database",
            get(crate::lifecycle::list)
                .post(crate::lifecycle::create)
                .patch(crate::lifecycle::set_retention)
                .delete(crate::lifecycle::delete_database),
        )
        .route(
            "/api/v3/configure/table",
            patch(crate::lifecycle::set_retention).delete(crate::lifecycle::delete_table),
        )
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::http::authenticate,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// An error answered to a client: status, message and, for writes, the rejected lines.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    lines: Vec<RejectedLine>,
    retry_after: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RejectedLine {
    pub line_number: usize,
    pub column: usize,
    pub error_message: String,
    pub original_line: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "<[RejectedLine]>::is_empty")]
    data: &'a [RejectedLine],
}

/// `{"error": message}` with `status`: the answer of every JSON API's failures.
pub(crate) fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).into_response()
}

/// `nanos` since the epoch as RFC 3339 in UTC, to the precision `format` names.
pub(crate) fn rfc3339(nanos: i64, format: chrono::SecondsFormat) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = u32::try_from(nanos.rem_euclid(1_000_000_000)).unwrap_or(0);
    chrono::DateTime::from_timestamp(secs, sub)
        .map(|t| t.to_rfc3339_opts(format, true))
        .unwrap_or_default()
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            lines: Vec::new(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody {
            error: &self.message,
            data: &self.lines,
        })
        .unwrap_or_default();
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<kiln_storage::engine::Error> for ApiError {
    fn from(e: kiln_storage::engine::Error) -> Self {
        let (kind, message) = classify(&e);
        match kind {
            FailureKind::Invalid => Self::bad_request(message),
            FailureKind::Retry => Self {
                retry_after: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
            },
            FailureKind::Unavailable => Self::new(StatusCode::SERVICE_UNAVAILABLE, message),
            FailureKind::NotHere => Self::new(StatusCode::FORBIDDEN, message),
            FailureKind::Internal => Self::new(StatusCode::INTERNAL_SERVER_ERROR, message),
        }
    }
}

/// Query parameters of the three write paths.
#[derive(Debug, Deserialize)]
pub struct WriteParams {
    /// Database (v1 and v3).
    db: Option<String>,
    /// Database (v2, where InfluxDB calls it a bucket; `org` is accepted and ignored).
    bucket: Option<String>,
    precision: Option<String>,
    /// v3 only: write the valid lines of a request that has bad ones (default true).
    accept_partial: Option<bool>,
}

#[derive(Debug, Clone, Copy)]
enum WriteApi {
    V1,
    V2,
    V3,
}

async fn write_v1(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(p): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_write(s, &principal, WriteApi::V1, p, headers, body).await
}

async fn write_v2(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(p): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_write(s, &principal, WriteApi::V2, p, headers, body).await
}

async fn write_v3(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(p): Query<WriteParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_write(s, &principal, WriteApi::V3, p, headers, body).await
}

async fn handle_write(
    s: AppState,
    principal: &Principal,
    api: WriteApi,
    p: WriteParams,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (db, name) = match api {
        WriteApi::V2 => (p.bucket, "bucket"),
        WriteApi::V1 | WriteApi::V3 => (p.db, "db"),
    };
    let accept_partial = match api {
        WriteApi::V3 => p.accept_partial.unwrap_or(true),
        WriteApi::V1 | WriteApi::V2 => true,
    };
    let db = db.ok_or_else(|| ApiError::bad_request(format!("missing query parameter `{name}`")));
    if let Ok(db) = &db
        && let Err(e) = require(&s.auth, principal, Action::Write(db))
    {
        return refusal(&e);
    }
    match write(s, db, p.precision, accept_partial, headers, body).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Gunzips `body` if the request says it is gzip, refusing to inflate past `limit`.
fn decode_body(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => Ok(body),
        "gzip" | "x-gzip" => {
            let mut out = Vec::new();
            let mut reader = flate2::read::MultiGzDecoder::new(&body[..]).take(limit as u64 + 1);
            reader
                .read_to_end(&mut out)
                .map_err(|e| ApiError::bad_request(format!("invalid gzip body: {e}")))?;
            if out.len() > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("decompressed request body exceeds the {limit}-byte limit"),
                ));
            }
            Ok(Bytes::from(out))
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Encoding {other:?}; use gzip or none"),
        )),
    }
}

/// The first 256 bytes of a line, without its line ending.
fn clip_line(line: &str) -> String {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut end = line.len().min(256);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

fn rejected(body: &str, errors: &[LineError]) -> Vec<RejectedLine> {
    // Errors come in line order, so one pass over the body finds every rejected line.
    let mut lines = body.split('\n').enumerate();
    errors
        .iter()
        .map(|e| RejectedLine {
            line_number: e.line,
            column: e.column,
            error_message: e.message.clone(),
            original_line: lines
                .by_ref()
                .find(|(i, _)| i + 1 == e.line)
                .map_or_else(String::new, |(_, l)| clip_line(l)),
        })
        .collect()
}

async fn write(
    s: AppState,
    db: Result<String, ApiError>,
    precision: Option<String>,
    accept_partial: bool,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(), ApiError> {
    if *s.shutdown.borrow() {
        return Err(kiln_storage::engine::Error::ShuttingDown.into());
    }
    let db = db?;
    let precision: Precision = match precision.as_deref() {
        None => Precision::Nanoseconds,
        Some(p) => p.parse().map_err(ApiError::bad_request)?,
    };
    let body = decode_body(&headers, body, s.max_body_bytes)?;
    s.metrics.ingest_bytes.inc_by(body.len() as u64);
    let text = std::str::from_utf8(&body).map_err(|e| {
        let valid = &body[..e.valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        ApiError::bad_request(format!(
            "line {line}, column {column}: request body is not valid UTF-8"
        ))
    })?;

    let default_time = kiln_ingest::write::now_nanos();
    let result = write_validated(&s.engine, &s.metrics, &db, accept_partial, |catalog| {
        Ok(validate_lines(text, &db, catalog, precision, default_time))
    })
    .await;
    let written = match result {
        Ok(w) => w,
        Err(WriteError::Rejected {
            message,
            rejected: lines,
        }) => {
            return Err(ApiError {
                lines: rejected(text, &lines),
                ..ApiError::bad_request(message)
            });
        }
        Err(WriteError::Invalid(message)) => return Err(ApiError::bad_request(message)),
        Err(WriteError::Engine(e)) => return Err(e.into()),
    };
    if written.rejected.is_empty() {
        return Ok(());
    }
    Err(ApiError {
        lines: rejected(text, &written.rejected),
        ..ApiError::bad_request(format!(
            "partial write: {} lines written, {} rejected",
            written.rows,
            written.rejected.len()
        ))
    })
}

/// `POST /api/v3/configure/last_cache`: `{"db", "table", "key_columns"}` (JSON body or
/// query parameters; `key_columns` defaults to the table's tags).
#[derive(Debug, Deserialize)]
pub struct LastCacheParams {
    db: Option<String>,
    table: Option<String>,
    #[serde(default)]
    key_columns: Option<Vec<String>>,
}

impl LastCacheParams {
    fn names(&self) -> Result<(&str, &str), ApiError> {
        match (&self.db, &self.table) {
            (Some(db), Some(table)) => Ok((db, table)),
            (None, _) => Err(ApiError::bad_request("missing parameter `db`")),
            (_, None) => Err(ApiError::bad_request("missing parameter `table`")),
        }
    }
}

async fn create_last_cache(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(qp): Query<LastCacheParams>,
    body: Bytes,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let params = if body.is_empty() {
        qp
    } else {
        match serde_json::from_slice::<LastCacheParams>(&body) {
            Ok(p) => LastCacheParams {
                db: p.db.or(qp.db),
                table: p.table.or(qp.table),
                key_columns: p.key_columns.or(qp.key_columns),
            },
            Err(e) => {
                return ApiError::bad_request(format!("invalid JSON body: {e}")).into_response();
            }
        }
    };
    let (db, table) = match params.names() {
        Ok(names) => names,
        Err(e) => return e.into_response(),
    };
    let keys = params.key_columns.clone().unwrap_or_default();
    match s.engine.create_last_cache(db, table, &keys).await {
        Ok(def) => (
            StatusCode::CREATED,
            axum::Json(serde_json::json!({
                "db": db,
                "table": table,
                "key_columns": def.key_columns,
            })),
        )
            .into_response(),
        Err(kiln_storage::engine::Error::Catalog(e)) => {
            use kiln_storage::catalog::Error as E;
            let status = match e {
                E::TableNotFound { .. } => StatusCode::NOT_FOUND,
                E::InvalidLastCache(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ApiError::new(status, e.to_string()).into_response()
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `POST /api/v3/compact`: merges now every time partition persisted in several segments
/// that the buffer holds no rows of, the newest partition of each table included; answers
/// with what it did once done.
async fn compact(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    match s.engine.compact(true).await {
        Ok(outcome) => axum::Json(outcome).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("compaction failed: {e}"),
        )
        .into_response(),
    }
}

/// `DELETE /api/v3/configure/last_cache?db=&table=`.
async fn drop_last_cache(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(params): Query<LastCacheParams>,
) -> Response {
    if let Err(e) = require(&s.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let (db, table) = match params.names() {
        Ok(names) => names,
        Err(e) => return e.into_response(),
    };
    match s.engine.drop_last_cache(db, table).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("table {table:?} of database {db:?} has no last-value cache"),
        )
        .into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct QueryParams {
    db: Option<String>,
    q: Option<String>,
    format: Option<String>,
    /// Time zone: buckets in its local time, timestamps shown in it.
    tz: Option<String>,
    /// On a querier: answer without a writer that does not answer (`true`), instead of
    /// failing.
    partial: Option<bool>,
}

async fn query_get(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(p): Query<QueryParams>,
) -> Response {
    run_query(s, &principal, p).await.unwrap_or_else(|e| e)
}

async fn query_post(
    State(s): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Query(qp): Query<QueryParams>,
    body: Bytes,
) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let params = if is_json || (!body.is_empty() && body.first() == Some(&b'{')) {
        match serde_json::from_slice::<QueryParams>(&body) {
            Ok(p) => QueryParams {
                db: p.db.or(qp.db),
                q: p.q.or(qp.q),
                format: p.format.or(qp.format),
                tz: p.tz.or(qp.tz),
                partial: p.partial.or(qp.partial),
            },
            Err(e) => {
                return ApiError::bad_request(format!("invalid JSON body: {e}")).into_response();
            }
        }
    } else {
        qp
    };
    run_query(s, &principal, params).await.unwrap_or_else(|e| e)
}

/// How long a query waits for one of the `--http-max-queries` permits before 429.
const QUERY_PERMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

async fn run_query(
    s: AppState,
    principal: &Principal,
    mut p: QueryParams,
) -> Result<Response, Response> {
    let db =
        p.db.take()
            .ok_or_else(|| ApiError::bad_request("missing parameter `db`").into_response())?;
    if let Some(q) = p.q.as_deref().filter(|q| kiln_query::delete::is_delete(q)) {
        return Ok(crate::lifecycle::delete_rows(&s, principal, &db, q).await);
    }
    if let Some(q) = p.q.as_deref()
        && let Some(statement) = kiln_query::views::ViewStatement::of(q)
    {
        return Ok(crate::lifecycle::view_statement(&s, principal, &db, q, statement).await);
    }
    require(&s.auth, principal, Action::Read(&db)).map_err(|e| refusal(&e))?;
    answer_query(&s, principal, db, p)
        .await
        .map_err(IntoResponse::into_response)
}

async fn answer_query(
    s: &AppState,
    principal: &Principal,
    db: String,
    p: QueryParams,
) -> Result<Response, ApiError> {
    let q =
        p.q.ok_or_else(|| ApiError::bad_request("missing parameter `q`"))?;
    let format =
        Format::parse(p.format.as_deref()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // A result is held whole until it is encoded: bound how many are, waiting a moment
    // for a permit (a dashboard sends its panels' queries together).
    let permit = match tokio::time::timeout(
        QUERY_PERMIT_WAIT,
        Arc::clone(&s.query_permits).acquire_owned(),
    )
    .await
    {
        Ok(Ok(permit)) => permit,
        _ => {
            s.metrics.refused(crate::metrics::limit::HTTP_QUERIES);
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the server is answering as many HTTP queries as it runs at once \
                     (--http-max-queries); retry shortly",
                )
            });
        }
    };
    let start = Instant::now();
    let mut stream = query_engine(s, principal)
        .with_partial_results(p.partial.unwrap_or(false))
        .sql_in_zone(&db, &q, p.tz.as_deref())
        .await
        .map_err(query_error)?;
    let schema = stream.schema();
    // The whole result is encoded at once: bound what one query can hold, and count it
    // in the memory pool queries share.
    let held = datafusion::execution::memory_pool::MemoryConsumer::new("HTTP query result")
        .register(s.query.memory_pool());
    let mut batches: Vec<RecordBatch> = Vec::new();
    let mut bytes = 0;
    while let Some(batch) = stream.try_next().await.map_err(|e| query_error(e.into()))? {
        // By rows spanned: a batch sliced from a bigger one is not charged for all of it.
        let batch_bytes = kiln_storage::buffer::data_bytes(&batch);
        bytes += batch_bytes;
        held.try_grow(batch_bytes).map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the result does not fit in the memory queries share \
                     (--query-memory-limit) with the others running: {}",
                    e.strip_backtrace()
                ),
            )
        })?;
        if bytes > s.max_result_bytes {
            return Err(ApiError::bad_request(format!(
                "the result is larger than --max-result-bytes ({} bytes); narrow the time range, \
                 aggregate, add a LIMIT, or use the PostgreSQL or Flight SQL interface, which stream",
                s.max_result_bytes
            )));
        }
        batches.push(batch);
    }
    s.metrics
        .query_seconds
        .observe(start.elapsed().as_secs_f64());
    // Encoding is query work too: on the query threads' blocking pool, streamed to the
    // client, holding the permit and the memory until it ends.
    let body = crate::results::body(
        format,
        schema,
        batches,
        s.query.executor().handle(),
        (permit, held),
    )
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the result failed: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, format.content_type())], body).into_response())
}

pub(crate) fn query_error(e: kiln_query::Error) -> ApiError {
    use kiln_query::Error as E;
    match e {
        E::DatabaseNotFound(_) | E::TableNotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, e.to_string())
        }
        E::Invalid(_) => ApiError::bad_request(e.to_string()),
        E::ReadOnly(_) => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
        E::Timeout(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        E::ResourcesExhausted(_) | E::Unavailable(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        E::Internal(_) => {
            let message = kiln_storage::error_chain(&e);
            tracing::error!(error = %message, "query failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
        }
    }
}

async fn health() -> &'static str {
    "OK"
}

async fn ready(State(s): State<AppState>) -> Response {
    if *s.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if s.engine.wal().is_poisoned() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "write-ahead log refuses writes",
        )
            .into_response()
    } else {
        "OK".into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /api/v3/kafka`: every Kafka source with its partitions' positions, lag and counts.
async fn kafka_status(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Response {
    if let Err(e) = require(&state.auth, &principal, Action::Admin) {
        return refusal(&e);
    }
    let sources: Vec<_> = state
        .kafka
        .iter()
        .map(|s| s.report(&state.engine))
        .collect();
    axum::Json(serde_json::json!({ "sources": sources })).into_response()
}

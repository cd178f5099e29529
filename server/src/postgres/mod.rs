//! The PostgreSQL wire protocol (`--pg-bind`, default `127.0.0.1:5433`).
//!
//! The protocol itself (startup, simple and extended queries, prepared statements, text and
//! binary results, cancel requests) is `pgwire`'s; planning and the extended protocol's
//! result encoding are `datafusion-postgres`'s. What Kiln adds:
//!
//! * **the token is the password** once tokens are enforced (see [`crate::auth`]): asked as
//!   a cleartext password, so only over TLS or from loopback (a token is a bearer secret;
//!   SCRAM would mean keeping a second, password-derived verifier per token); a wrong one
//!   ends the startup with `28P01`, one that may not read the database with `42501`;
//! * **the database in the connection selects the Kiln database**: every connection gets
//!   its own DataFusion session, made at startup by [`QueryEngine::postgres_session`]
//!   (tables in `public`, plus `pg_catalog` and `information_schema`); an unknown
//!   database ends the startup with `FATAL 3D000`, as PostgreSQL does;
//! * **PostgreSQL's reading of client SQL**: every statement goes through
//!   [`PostgresSession::rewrite`] (Grafana's, SQLAlchemy's and psql's spellings DataFusion
//!   reads differently) with the connection's settings brought up to date for
//!   `current_setting()` and `SHOW`, in the simple protocol and when the extended protocol
//!   parses ([`KilnParser`]);
//! * **SQLSTATE codes** on errors (42P01 undefined table, 42703 undefined column, 42601
//!   syntax error, 57014 canceled, …) so tools show the right message;
//! * **cancel**: a cancel request stops the statement until its first row is ready, which
//!   for an aggregate is the whole computation;
//! * **the simple protocol's result rows encoded a column at a time** ([`rows`]): the
//!   same bytes, a 437,000-row result sent in half the time;
//! * shutdown closes every connection: queries are reads, nothing is lost.

mod rows;

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, Parser, hooks};
use futures::{Sink, SinkExt, StreamExt, stream};
use kiln_query::QueryEngine;
use kiln_query::postgres::settings::UNRECOGNIZED;
use kiln_query::postgres::{PostgresSession, server_version};
use pgwire::api::PgWireConnectionState;
use pgwire::api::Type;
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::Format;
use pgwire::api::portal::Portal;
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionManager, ErrorHandler, METADATA_DATABASE,
    METADATA_USER, PgWireServerHandlers,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::PgWireFrontendMessage;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::Authentication;
use pgwire::messages::startup::SecretKey;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::auth::{Action, Authorizer, Door, Principal};
use crate::serve::stopped;

/// What all connections share.
#[derive(Debug)]
struct Shared {
    query: QueryEngine,
    auth: Arc<Authorizer>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Most connections served at once (`--pg-max-connections`).
    max_connections: usize,
    /// Maps a cancel request's (pid, secret key) to the connection it cancels.
    connections: Arc<ConnectionManager>,
}

/// Where a PostgreSQL listener's connections go, and how many it serves at once.
pub struct Limits {
    pub max_connections: usize,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Accepts PostgreSQL connections on `listener` (TLS after an `SSLRequest` when `tls` is
/// given) until `stop` turns true, then closes them. A connection beyond
/// `limits.max_connections` is ended at startup with `53300`, as PostgreSQL does.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    query: QueryEngine,
    auth: Arc<Authorizer>,
    limits: Limits,
    stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        query,
        auth,
        metrics: limits.metrics,
        max_connections: limits.max_connections,
        connections: Arc::new(ConnectionManager::new()),
    });
    let mut connections = JoinSet::new();
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the open
                        // connections, and give them a moment to close some.
                        tracing::warn!(error = %e, "PostgreSQL accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                // The connections being served, this one not yet among them.
                let over_limit = connections.len() >= shared.max_connections;
                let handlers = Connection(Arc::new(ConnectionState {
                    shared: Arc::clone(&shared),
                    session: OnceLock::new(),
                    over_limit,
                }));
                let tls = tls.clone();
                // `datafusion-postgres` executes statements where the connection is
                // served: on the query threads (see `kiln_query::executor`).
                let connection = async move {
                    if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                        tracing::debug!(%peer, error = %e, "PostgreSQL connection ended with an error");
                    }
                };
                connections.spawn_on(connection, shared.query.executor().handle());
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    connections.shutdown().await;
    Ok(())
}

/// One client connection. pgwire asks for each handler once per connection; all of them
/// are this connection's state.
#[derive(Clone)]
struct Connection(Arc<ConnectionState>);

struct ConnectionState {
    shared: Arc<Shared>,
    /// Made by the startup handler, which pgwire runs before any query message.
    session: OnceLock<Session>,
    /// Accepted beyond the connection limit: ended at startup.
    over_limit: bool,
}

/// A connection's session, and the `datafusion-postgres` service that runs its statements.
struct Session {
    postgres: Arc<PostgresSession>,
    service: Arc<DfSessionService>,
    parser: Arc<KilnParser>,
    /// Who connected, to which database: a `DELETE` needs the right to write it.
    principal: Principal,
    database: String,
}

impl Connection {
    fn session(&self) -> PgWireResult<&Session> {
        self.0.session.get().ok_or(PgWireError::NotReadyForQuery)
    }
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::new(self.clone())
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::new(self.clone())
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(self.clone())
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(SqlStateErrors)
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(Cancels(Arc::clone(&self.0.shared.connections)))
    }
}

#[async_trait]
impl StartupHandler for Connection {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let auth = &self.0.shared.auth;
        match message {
            PgWireFrontendMessage::Startup(startup) => {
                if self.0.over_limit {
                    self.0
                        .shared
                        .metrics
                        .refused(crate::metrics::limit::PG_CONNECTIONS);
                    return Err(fatal(
                        "53300",
                        format!(
                            "sorry, too many clients already: Kiln serves at most {} \
                             PostgreSQL connections at once (--pg-max-connections)",
                            self.0.shared.max_connections
                        ),
                    ));
                }
                protocol_negotiation(client, &startup).await?;
                save_startup_parameters_to_metadata(client, &startup);
                if !auth.enforced() {
                    return self.open_session(client, Principal::Anyone).await;
                }
                // The token travels as a cleartext password: only inside TLS, or on the
                // machine itself.
                if !client.is_secure() && !client.socket_addr().ip().is_loopback() {
                    return Err(fatal(
                        "28000",
                        "Kiln takes the token as the password only over TLS: connect with \
                         sslmode=require (or verify-full)"
                            .to_owned(),
                    ));
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
                Ok(())
            }
            PgWireFrontendMessage::PasswordMessageFamily(password) => {
                let password = password.into_password()?;
                let principal = auth
                    .authenticate(Door::Postgres, Some(&password.password))
                    .map_err(|e| {
                        let user = client.metadata().get(METADATA_USER).cloned();
                        fatal(
                            "28P01",
                            format!(
                                "password authentication failed for user \"{}\": {e}",
                                user.unwrap_or_default()
                            ),
                        )
                    })?;
                self.open_session(client, principal).await
            }
            _ => Ok(()),
        }
    }
}

impl Connection {
    /// Makes the connection's session on its database for `principal`, who must be
    /// allowed to read it, and finishes the startup.
    async fn open_session<C>(&self, client: &mut C, principal: Principal) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        // PostgreSQL's rule: without a database name, the database is the user's name.
        let metadata = client.metadata();
        let database = metadata
            .get(METADATA_DATABASE)
            .or_else(|| metadata.get(METADATA_USER))
            .cloned()
            .unwrap_or_default();
        self.0
            .shared
            .auth
            .authorize(Door::Postgres, &principal, Action::Read(&database))
            .map_err(|e| fatal("42501", e.to_string()))?;
        let postgres = match self.0.shared.query.postgres_session(&database) {
            Ok(session) => Arc::new(session),
            Err(kiln_query::Error::DatabaseNotFound(_)) => {
                return Err(fatal(
                    "3D000",
                    format!("database \"{database}\" does not exist"),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, %database, "cannot make a PostgreSQL session");
                return Err(fatal("XX000", e.to_string()));
            }
        };
        let service = Arc::new(DfSessionService::new_with_hooks(
            Arc::clone(&postgres.context),
            vec![
                // `datafusion-postgres`'s own (cursors, `SET`/`SHOW`, transactions) first.
                Arc::new(hooks::cursor::CursorStatementHook),
                Arc::new(hooks::set_show::SetShowHook),
                Arc::new(hooks::transactions::TransactionStatementHook),
                Arc::new(rows::TextRowsHook),
            ],
        ));
        let parser = Arc::new(KilnParser {
            inner: service.query_parser(),
            postgres: Arc::clone(&postgres),
        });
        let _ = self.0.session.set(Session {
            postgres,
            service,
            parser,
            principal,
            database,
        });

        let (pid, secret_key) = new_backend_key();
        client.set_pid_and_secret_key(pid, secret_key.clone());
        let (handle, guard) = self.0.shared.connections.register(pid, secret_key);
        client.session_extensions().insert(handle);
        client.session_extensions().insert(guard);

        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = server_version();
        parameters.is_superuser = false;
        finish_authentication(client, &parameters).await
    }
}

/// Cancel requests: each arrives on a connection of its own and names its target by
/// process id and secret key.
struct Cancels(Arc<ConnectionManager>);

#[async_trait]
impl CancelHandler for Cancels {
    async fn on_cancel_request(&self, request: CancelRequest) {
        let found = self.0.cancel(request.pid, &request.secret_key).await;
        tracing::debug!(pid = request.pid, found, "PostgreSQL cancel request");
    }
}

/// A backend process id and secret key for cancel requests: random, so one client cannot
/// guess another's key.
fn new_backend_key() -> (i32, SecretKey) {
    use rand::Rng;
    let mut rng = rand::rng();
    (rng.random_range(1..i32::MAX), SecretKey::I32(rng.random()))
}

/// A statement the session does not run: `42501` (insufficient privilege).
fn refused(e: kiln_query::postgres::rewrite::Refused) -> PgWireError {
    error("42501", e.0)
}

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".to_owned(),
        code.to_owned(),
        message,
    )))
}

impl Connection {
    /// `DELETE FROM …` (simple query protocol): `DELETE <rows>`, with the right to write
    /// the connection's database.
    async fn delete(&self, session: &Session, sql: &str) -> PgWireResult<Vec<Response>> {
        self.0
            .shared
            .auth
            .authorize(
                Door::Postgres,
                &session.principal,
                Action::Write(&session.database),
            )
            .map_err(|e| error("42501", e.to_string()))?;
        match self.0.shared.query.delete(&session.database, sql).await {
            Ok(deleted) => Ok(vec![Response::Execution(
                Tag::new("DELETE").with_rows(deleted.rows as usize),
            )]),
            Err(e) => Err(statement_error(e)),
        }
    }
}

impl Connection {
    /// `CREATE`, `DROP` or `REFRESH MATERIALIZED VIEW` (simple query protocol; no time
    /// limit: a first refresh may take long): creating and dropping need an admin token,
    /// refreshing the right to write the connection's database.
    async fn view_statement(
        &self,
        session: &Session,
        sql: &str,
        statement: kiln_query::views::ViewStatement,
    ) -> PgWireResult<Vec<Response>> {
        let action = Action::of_view_statement(statement, &session.database);
        self.0
            .shared
            .auth
            .authorize(Door::Postgres, &session.principal, action)
            .map_err(|e| error("42501", e.to_string()))?;
        match self
            .0
            .shared
            .query
            .view_statement(&session.database, sql)
            .await
        {
            Ok(_) => Ok(vec![Response::Execution(Tag::new(statement.tag()))]),
            Err(e) => Err(statement_error(e)),
        }
    }
}

/// A statement's error with the SQLSTATE PostgreSQL would give.
fn statement_error(e: kiln_query::Error) -> PgWireError {
    match e {
        e @ kiln_query::Error::TableNotFound(_) => error("42P01", e.to_string()),
        e @ kiln_query::Error::Invalid(_) => error("0A000", e.to_string()),
        e @ kiln_query::Error::Timeout(_) => error("57014", e.to_string()),
        // PostgreSQL's "cannot execute … in a read-only transaction".
        e @ kiln_query::Error::ReadOnly(_) => error("25006", e.to_string()),
        // A server the answer needs (a querier's writer) did not answer.
        e @ kiln_query::Error::Unavailable(_) => error("58000", e.to_string()),
        e => error("XX000", kiln_storage::error_chain(&e)),
    }
}

fn error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        code.to_owned(),
        message,
    )))
}

#[async_trait]
impl SimpleQueryHandler for Connection {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = self.session()?;
        let timeout = statement_timeout(client).or(self.0.shared.query.config().timeout);
        if kiln_query::delete::is_delete(query) {
            return within(timeout, self.delete(session, query)).await;
        }
        if let Some(statement) = kiln_query::views::ViewStatement::of(query) {
            return self.view_statement(session, query, statement).await;
        }
        session.postgres.settings.sync(client.metadata());
        let query = session.postgres.rewrite(query).map_err(refused)?;
        let service = Arc::clone(&session.service);
        let span = query_span(&session.database, &query);
        let run = async {
            let mut responses = SimpleQueryHandler::do_query(&*service, client, &query).await?;
            for response in &mut responses {
                first_row_ready(response).await;
            }
            Ok(responses)
        };
        within(timeout, run).instrument(span).await
    }
}

#[async_trait]
impl ExtendedQueryHandler for Connection {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = KilnParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        // pgwire hands query messages to this handler only after startup succeeded.
        Arc::clone(
            &self
                .0
                .session
                .get()
                .expect("the session is made at startup, before any query message")
                .parser,
        )
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = self.session()?;
        let service = Arc::clone(&session.service);
        let timeout = statement_timeout(client).or(self.0.shared.query.config().timeout);
        let span = query_span(&session.database, &portal.statement.statement.0);
        let run = async {
            let mut response =
                ExtendedQueryHandler::do_query(&*service, client, portal, max_rows).await?;
            first_row_ready(&mut response).await;
            Ok(response)
        };
        within(timeout, run).instrument(span).await
    }
}

/// The extended protocol's parser: `datafusion-postgres`'s, on the statement as
/// [`PostgresSession::rewrite`] gives it, with the connection's settings brought up to date
/// first (`current_setting()` is evaluated while planning).
pub struct KilnParser {
    inner: Arc<Parser>,
    postgres: Arc<PostgresSession>,
}

#[async_trait]
impl QueryParser for KilnParser {
    type Statement = <Parser as QueryParser>::Statement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        self.postgres.settings.sync(client.metadata());
        let sql = self.postgres.rewrite(sql).map_err(refused)?;
        self.inner.parse_sql(client, &sql, types).await
    }

    fn get_parameter_types(&self, statement: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.inner.get_parameter_types(statement)
    }

    fn get_result_schema(
        &self,
        statement: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.inner.get_result_schema(statement, column_format)
    }
}

/// A statement's span: the PostgreSQL protocol carries no trace context, so each starts
/// a trace.
fn query_span(database: &str, sql: &str) -> tracing::Span {
    tracing::debug_span!(
        "PostgreSQL query",
        otel.kind = "server",
        db.system.name = "postgresql",
        db.namespace = database,
        db.query.text = sql,
    )
}

/// Where `SET statement_timeout` leaves its value (milliseconds) in the connection's
/// metadata.
const STATEMENT_TIMEOUT_KEY: &str = "statement_timeout_ms";

fn statement_timeout<C: ClientInfo>(client: &C) -> Option<Duration> {
    client
        .metadata()
        .get(STATEMENT_TIMEOUT_KEY)
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
}

/// Runs a statement under `statement_timeout` (the server's `--query-timeout` when the
/// client set none): planning and everything up to its first row (see [`first_row_ready`]).
async fn within<T>(
    timeout: Option<Duration>,
    run: impl Future<Output = PgWireResult<T>>,
) -> PgWireResult<T> {
    let Some(timeout) = timeout else {
        return run.await;
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| {
            Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".to_owned(),
                "57014".to_owned(),
                "canceling statement due to statement timeout".to_owned(),
            ))))
        })
}

/// Waits for a result's first row inside the handler, where pgwire can still cancel the
/// statement (a cancel request or `statement_timeout`); rows are otherwise produced while
/// they are sent, after the handler returned.
async fn first_row_ready(response: &mut Response) {
    let Response::Query(result) = response else {
        return;
    };
    let first = result.data_rows.next().await;
    let rest = std::mem::replace(&mut result.data_rows, Box::pin(stream::empty()));
    result.data_rows = Box::pin(stream::iter(first).chain(rest));
}

/// Gives every error its SQLSTATE before it is sent.
struct SqlStateErrors;

impl ErrorHandler for SqlStateErrors {
    fn on_error<C>(&self, _client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        let PgWireError::ApiError(source) = error else {
            return;
        };
        let info = if let Some(e) = source.downcast_ref::<DataFusionError>() {
            let (code, message) = classify(e);
            if code == "XX000" {
                tracing::error!(error = %message, "PostgreSQL query failed");
            }
            ErrorInfo::new("ERROR".to_owned(), code.to_owned(), message)
        } else if let Some(e) = source.downcast_ref::<ParserError>() {
            ErrorInfo::new("ERROR".to_owned(), "42601".to_owned(), e.to_string())
        } else {
            return;
        };
        *error = PgWireError::UserError(Box::new(info));
    }
}

/// The SQLSTATE for a DataFusion error, and the message to show.
fn classify(e: &DataFusionError) -> (&'static str, String) {
    let message = e.strip_backtrace();
    let code = match e.find_root() {
        DataFusionError::SQL(..) => "42601",
        DataFusionError::SchemaError(schema, _) => match schema.as_ref() {
            datafusion::common::SchemaError::FieldNotFound { .. } => "42703",
            datafusion::common::SchemaError::AmbiguousReference { .. } => "42702",
            _ => "42P10",
        },
        DataFusionError::Plan(msg) if kiln_query::is_missing_table(msg) => "42P01",
        DataFusionError::Plan(msg)
            if msg.contains("No function matches") || msg.contains("Invalid function") =>
        {
            "42883"
        }
        DataFusionError::Plan(_) => "42000",
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::ArrowError(arrow, _) => match arrow.as_ref() {
            arrow::error::ArrowError::DivideByZero => "22012",
            arrow::error::ArrowError::CastError(_)
            | arrow::error::ArrowError::ParseError(_)
            | arrow::error::ArrowError::ComputeError(_)
            | arrow::error::ArrowError::ArithmeticOverflow(_) => "22000",
            _ => "XX000",
        },
        DataFusionError::Execution(msg) if msg.starts_with(UNRECOGNIZED) => "42704",
        DataFusionError::Execution(_) => "22000",
        DataFusionError::ResourcesExhausted(_) => "53200",
        _ => "XX000",
    };
    (code, message)
}

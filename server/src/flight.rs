//! Arrow Flight SQL on the gRPC port, and the JSON tickets of InfluxDB 3 client libraries.
//!
//! Flight SQL sees Kiln's native layout, the same as the HTTP query API: one catalog
//! (`kiln`) whose schemas are the databases. A statement runs in the database named by the
//! `database` request header (`bucket`, `bucket-name` and `iox-namespace-name` are
//! accepted too, as InfluxDB clients send them); other databases are reachable as
//! `<database>.<table>`.
//!
//! Tags are dictionary-encoded in Kiln; results carry them as plain strings, which every
//! client reads, unless the request has the header `kiln-dictionaries: keep`: then they
//! stay dictionaries (schema and data alike), much less to send and to decode.
//!
//! Statements and prepared statements are stateless: their handle carries the database, the
//! SQL and any bound parameters, so any Kiln process can serve the ticket and closing one
//! frees nothing.
//!
//! Once tokens are enforced every call carries one (`authorization: Bearer …`, see
//! [`crate::auth::grpc`]); a statement needs read on its database and sees only the
//! databases its token may read, and the metadata commands list only those. The handshake
//! takes `Basic` credentials (the password is the token) and answers with the token as
//! `authorization: Bearer …`, as ADBC and the JDBC driver expect.
//!
//! ```text
//!  CommandStatementQuery ─▶ FlightInfo(schema, ticket = handle) ─▶ DoGet(ticket) ─▶ batches
//!  {"database","sql_query","query_type":"sql"} ─────────────────▶ DoGet(ticket) ─▶ batches
//! ```

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::IpcWriteOptions;
use arrow::ipc::writer::StreamWriter;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt,
    SqlInfo, SqlSupportedCaseSensitivity, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::DataFrame;
use futures::{Stream, TryStreamExt, stream};
use kiln_query::{CATALOG_NAME, QueryEngine};
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::grpc::{Authenticate, authorize, credential, principal};
use crate::auth::{Action as Access, Authorizer, Door, Principal};
use kiln_query::views::ViewStatement;

/// The request header (value `keep`) that asks for dictionary columns as dictionaries.
const DICTIONARIES_HEADER: &str = "kiln-dictionaries";

/// How dictionary-encoded columns (tags) travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dictionaries {
    /// As their values: what every Flight client reads.
    Hydrate,
    /// As dictionaries, sent with each batch.
    Keep,
}

impl Dictionaries {
    fn of(metadata: &MetadataMap) -> Self {
        match metadata.get(DICTIONARIES_HEADER).map(|v| v.to_str()) {
            Some(Ok(v)) if v.eq_ignore_ascii_case("keep") => Self::Keep,
            _ => Self::Hydrate,
        }
    }

    /// `schema` as the data will carry it.
    fn schema(self, schema: &Schema) -> Schema {
        match self {
            Self::Hydrate => as_sent(schema),
            Self::Keep => schema.clone(),
        }
    }
}

/// Request headers that name the database, in the order they are looked at.
const DATABASE_HEADERS: [&str; 4] = ["database", "bucket", "bucket-name", "iox-namespace-name"];

pub(crate) type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Flight SQL service.
pub struct FlightSql {
    query: QueryEngine,
    sql_info: SqlInfoData,
    planned: Planned,
    auth: Arc<Authorizer>,
}

/// The tonic service with every call authenticated.
pub type FlightServer =
    tonic::service::interceptor::InterceptedService<FlightServiceServer<KilnFlight>, Authenticate>;

/// Plans made to answer `GetFlightInfo`, kept for the `DoGet` of the same ticket that
/// usually follows, so that a statement is planned once. A plan is taken at most once and
/// only while fresh; a `DoGet` that finds none plans the statement itself. The plan is
/// logical: the data is read when it runs, so rows written in between are in the answer.
#[derive(Default)]
struct Planned {
    plans: Mutex<VecDeque<KeptPlan>>,
}

/// A plan made for `principal`'s `ticket`: given back only to the same principal.
struct KeptPlan {
    principal: Principal,
    ticket: Vec<u8>,
    at: Instant,
    plan: DataFrame,
}

impl Planned {
    const KEPT: usize = 64;
    const FRESH: Duration = Duration::from_secs(60);

    fn keep(&self, principal: &Principal, ticket: Vec<u8>, plan: DataFrame) {
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        if plans.len() == Self::KEPT {
            plans.pop_front();
        }
        plans.push_back(KeptPlan {
            principal: principal.clone(),
            ticket,
            at: Instant::now(),
            plan,
        });
    }

    fn take(&self, principal: &Principal, ticket: &[u8]) -> Option<DataFrame> {
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        plans.retain(|kept| kept.at.elapsed() < Self::FRESH);
        let i = plans
            .iter()
            .position(|kept| kept.principal == *principal && kept.ticket == ticket)?;
        plans.remove(i).map(|kept| kept.plan)
    }
}

/// What a statement ticket or prepared-statement handle carries.
#[derive(Debug, Serialize, Deserialize)]
struct StatementHandle {
    database: String,
    sql: String,
    /// Bound parameters (`$1`, `$2`, …): one row, as an Arrow IPC stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<Vec<u8>>,
}

impl StatementHandle {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("two strings serialize")
    }

    fn decode(bytes: &[u8]) -> Result<Self, Status> {
        serde_json::from_slice(bytes)
            .map_err(|e| Status::invalid_argument(format!("not a Kiln statement handle: {e}")))
    }
}

/// The ticket InfluxDB 3 client libraries send to `DoGet`.
#[derive(Debug, Deserialize)]
struct InfluxTicket {
    database: String,
    sql_query: String,
    #[serde(default = "sql")]
    query_type: String,
}

fn sql() -> String {
    "sql".to_owned()
}

impl FlightSql {
    pub fn new(query: QueryEngine, auth: Arc<Authorizer>) -> Self {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Kiln");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        // Unquoted identifiers are folded to lower case; quoted ones are kept as written.
        info.append(
            SqlInfo::SqlIdentifierCase,
            SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
        );
        Self {
            query,
            sql_info: info.build().expect("static SQL info builds"),
            planned: Planned::default(),
            auth,
        }
    }

    /// The tonic service: Flight SQL plus InfluxDB 3's JSON tickets, every call
    /// authenticated.
    pub fn into_server(self, max_message_bytes: usize) -> FlightServer {
        let authenticate = Authenticate::new(Arc::clone(&self.auth), Door::FlightSql);
        let server =
            FlightServiceServer::new(KilnFlight(self)).max_decoding_message_size(max_message_bytes);
        tonic::service::interceptor::InterceptedService::new(server, authenticate)
    }

    /// The databases `principal` may read: the engine its statements run on.
    fn engine_for(&self, principal: &Principal) -> QueryEngine {
        match principal.readable_databases() {
            None => self.query.clone(),
            Some(only) => self.query.visible_to(kiln_query::Visible::only(only)),
        }
    }

    /// Plans `handle` for `principal`, who must be allowed to read its database.
    async fn plan(
        &self,
        principal: &Principal,
        handle: &StatementHandle,
    ) -> Result<DataFrame, Status> {
        authorize(
            &self.auth,
            Door::FlightSql,
            principal,
            Access::Read(&handle.database),
        )?;
        self.engine_for(principal)
            .plan(&handle.database, &handle.sql)
            .await
            .map_err(query_status)
    }

    /// The schema of `handle`'s result; its plan is kept for the `DoGet` of `ticket`.
    async fn schema_of(
        &self,
        principal: &Principal,
        handle: &StatementHandle,
        dictionaries: Dictionaries,
        ticket: Vec<u8>,
    ) -> Result<Schema, Status> {
        let df = self.plan(principal, handle).await?;
        let schema = dictionaries.schema(df.schema().as_arrow());
        self.planned.keep(principal, ticket, df);
        Ok(schema)
    }

    /// Runs `handle`, with the plan `GetFlightInfo` made for `ticket` if it is still kept.
    async fn run(
        &self,
        principal: &Principal,
        handle: &StatementHandle,
        dictionaries: Dictionaries,
        ticket: &[u8],
    ) -> Result<FlightStream<arrow_flight::FlightData>, Status> {
        let mut df = match self.planned.take(principal, ticket) {
            Some(df) => df,
            None => self.plan(principal, handle).await?,
        };
        if let Some(ipc) = &handle.parameters {
            df = df
                .with_param_values(decode_parameters(ipc)?)
                .map_err(|e| query_status(e.into()))?;
        }
        let stream = self.query.execute(df).await.map_err(query_status)?;
        Ok(encode(stream, dictionaries))
    }
}

/// The parameters a statement takes, `$1` first; a parameter whose type the plan leaves
/// open is announced as a string, one compared with a tag as a plain string.
fn parameter_schema(df: &DataFrame) -> Result<Schema, Status> {
    let types = df
        .logical_plan()
        .get_parameter_types()
        .map_err(|e| query_status(e.into()))?;
    let mut params: Vec<(usize, String, DataType)> = types
        .into_iter()
        .map(|(name, ty)| {
            let index = name.trim_start_matches('$').parse().unwrap_or(usize::MAX);
            (index, name, ty.unwrap_or(DataType::Utf8))
        })
        .collect();
    params.sort();
    Ok(as_sent(&Schema::new(
        params
            .into_iter()
            .map(|(_, name, ty)| arrow::datatypes::Field::new(name, ty, true))
            .collect::<Vec<_>>(),
    )))
}

/// One row of parameter values, as bound by `DoPut`, into the encoding a handle carries.
/// The stream is read a message at a time (each bounded by `--max-request-bytes`) and
/// refused at its second row, never gathered whole.
async fn encode_parameters(stream: PeekableFlightDataStream) -> Result<Vec<u8>, Status> {
    use futures::FutureExt;
    let mut batches =
        FlightRecordBatchStream::new_from_flight_data(stream.map_err(FlightError::from));
    let mut row: Option<RecordBatch> = None;
    loop {
        // The client's bytes are decoded here: a malformed stream must not panic the call.
        let next = std::panic::AssertUnwindSafe(batches.try_next())
            .catch_unwind()
            .await
            .map_err(|_| {
                Status::invalid_argument("the parameters are not a valid Arrow IPC stream")
            })?
            .map_err(Status::from)?;
        let Some(batch) = next else { break };
        match (batch.num_rows(), &row) {
            (0, _) => {}
            (1, None) => row = Some(batch),
            _ => {
                return Err(Status::invalid_argument(
                    "bind one row of parameters per execution (got more than one)",
                ));
            }
        }
    }
    let batch = row.ok_or_else(|| {
        Status::invalid_argument("bind one row of parameters per execution (got 0)")
    })?;
    let internal = |e: arrow::error::ArrowError| Status::internal(e.to_string());
    let mut out = Vec::new();
    {
        let mut writer = StreamWriter::try_new(&mut out, &batch.schema()).map_err(internal)?;
        writer.write(&batch).map_err(internal)?;
        writer.finish().map_err(internal)?;
    }
    Ok(out)
}

fn decode_parameters(ipc: &[u8]) -> Result<ParamValues, Status> {
    kiln_storage::ipc::check_framing(ipc).map_err(|e| {
        Status::invalid_argument(format!("bad parameters in the statement handle: {e}"))
    })?;
    let batch = kiln_storage::ipc::guarded("the statement handle's parameters", || {
        StreamReader::try_new(ipc, None)?.next().transpose()
    })
    .map_err(|e| Status::invalid_argument(format!("bad parameters in the statement handle: {e}")))?
    .ok_or_else(|| Status::invalid_argument("no parameter values in the statement handle"))?;
    let values = batch
        .columns()
        .iter()
        .map(|c| ScalarValue::try_from_array(c, 0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| query_status(e.into()))?;
    Ok(values.into())
}

/// A schema as Flight data carries it: the encoder sends dictionary-encoded columns (tags)
/// as their values, so the schema a client is told up front must say so too (ADBC checks).
fn as_sent(schema: &Schema) -> Schema {
    let fields: Vec<arrow::datatypes::FieldRef> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Dictionary(_, values) => {
                std::sync::Arc::new(f.as_ref().clone().with_data_type(values.as_ref().clone()))
            }
            _ => std::sync::Arc::clone(f),
        })
        .collect();
    Schema::new_with_metadata(fields, schema.metadata().clone())
}

/// Streams a query's record batches as Flight data.
fn encode(
    stream: SendableRecordBatchStream,
    dictionaries: Dictionaries,
) -> FlightStream<arrow_flight::FlightData> {
    let schema = stream.schema();
    let batches =
        stream.map_err(|e| FlightError::Tonic(Box::new(query_status(kiln_query::Error::from(e)))));
    flight_data(schema, batches, dictionaries)
}

/// Record batches of `schema` as a stream of Flight data.
fn flight_data(
    schema: arrow::datatypes::SchemaRef,
    batches: impl Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
    dictionaries: Dictionaries,
) -> FlightStream<arrow_flight::FlightData> {
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_dictionary_handling(match dictionaries {
                Dictionaries::Hydrate => DictionaryHandling::Hydrate,
                Dictionaries::Keep => DictionaryHandling::Resend,
            })
            .build(batches)
            .map_err(Status::from),
    )
}

/// Sorts a query error into the gRPC status a client can act on.
fn query_status(e: kiln_query::Error) -> Status {
    use kiln_query::Error as E;
    match e {
        E::DatabaseNotFound(_) | E::TableNotFound(_) => Status::not_found(e.to_string()),
        E::Invalid(_) => Status::invalid_argument(e.to_string()),
        E::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        E::ResourcesExhausted(_) => Status::resource_exhausted(e.to_string()),
        E::ReadOnly(_) => Status::failed_precondition(e.to_string()),
        E::Unavailable(_) => Status::unavailable(e.to_string()),
        E::Internal(_) => {
            let message = kiln_storage::error_chain(&e);
            tracing::error!(error = %message, "Flight SQL query failed");
            Status::internal(message)
        }
    }
}

fn database_header(metadata: &MetadataMap) -> Result<String, Status> {
    DATABASE_HEADERS
        .iter()
        .find_map(|h| metadata.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::to_owned)
        .ok_or_else(|| {
            Status::invalid_argument(
                "no database: send the `database` header with the name of the Kiln database",
            )
        })
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(bytes)
}

/// The `FlightInfo` of a command: the schema of its result, and the command itself as the
/// ticket (statements carry their handle in a `TicketStatementQuery`).
fn command_info(
    schema: &Schema,
    command: &impl ProstMessageExt,
    request: Request<FlightDescriptor>,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(e.to_string()))?
        .with_endpoint(
            FlightEndpoint::new().with_ticket(Ticket::new(command.as_any().encode_to_vec())),
        )
        .with_descriptor(request.into_inner());
    Ok(Response::new(info))
}

/// A metadata command's answer: one batch.
fn one_batch(
    schema: arrow::datatypes::SchemaRef,
    batch: Result<RecordBatch, FlightError>,
) -> Response<FlightStream<arrow_flight::FlightData>> {
    Response::new(flight_data(
        schema,
        stream::once(async { batch }),
        Dictionaries::Hydrate,
    ))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    /// The interceptor has checked the credentials (`Basic`, password = token, or
    /// `Bearer`); the answer gives the token back as the bearer token to send from now on.
    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<FlightStream<HandshakeResponse>>, Status> {
        let token = credential(request.metadata());
        let response = HandshakeResponse::default();
        let mut response = Response::new(
            Box::pin(stream::once(async { Ok(response) })) as FlightStream<HandshakeResponse>
        );
        if let Some(token) = token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = principal(&request)?;
        let handle = StatementHandle {
            database: database_header(request.metadata())?,
            sql: query.query,
            parameters: None,
        };
        let ticket = TicketStatementQuery {
            statement_handle: handle.encode().into(),
        };
        let schema = self
            .schema_of(
                &principal,
                &handle,
                Dictionaries::of(request.metadata()),
                ticket.statement_handle.to_vec(),
            )
            .await?;
        command_info(&schema, &ticket, request)
    }

    /// `kiln.internal.v1.BufferRequest`: a querier asks for a table's unpersisted rows
    /// (admin tokens only; see [`crate::cluster::buffer`]).
    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        message: arrow_flight::sql::Any,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let Some(buffer_request) = crate::cluster::buffer::request_of(&message) else {
            return Err(Status::unimplemented(format!(
                "DoGet of a ticket of type {} is not supported",
                message.type_url
            )));
        };
        authorize(
            &self.auth,
            Door::FlightSql,
            &principal(&request)?,
            Access::Admin,
        )?;
        crate::cluster::buffer::answer(self.query.engine(), &buffer_request?)
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let principal = principal(&request)?;
        let handle = StatementHandle::decode(&ticket.statement_handle)?;
        let dictionaries = Dictionaries::of(request.metadata());
        Ok(Response::new(
            self.run(&principal, &handle, dictionaries, &ticket.statement_handle)
                .await?,
        ))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let principal = principal(&request)?;
        let handle = StatementHandle {
            database: database_header(request.metadata())?,
            sql: query.query,
            parameters: None,
        };
        let df = self.plan(&principal, &handle).await?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.encode().into(),
            dataset_schema: schema_bytes(
                &Dictionaries::of(request.metadata()).schema(df.schema().as_arrow()),
            )?,
            parameter_schema: schema_bytes(&parameter_schema(&df)?)?,
        })
    }

    /// `DELETE FROM …` (the only update Kiln's SQL makes; rows are written through the
    /// write APIs): the rows deleted, with the right to write the database.
    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let principal = principal(&request)?;
        let database = database_header(request.metadata())?;
        if let Some(statement) = ViewStatement::of(&command.query) {
            let action = Access::of_view_statement(statement, &database);
            authorize(&self.auth, Door::FlightSql, &principal, action)?;
            let answer = self
                .query
                .view_statement(&database, &command.query)
                .await
                .map_err(query_status)?;
            return Ok(answer.rows as i64);
        }
        if !kiln_query::delete::is_delete(&command.query) {
            return Err(Status::invalid_argument(
                "the update statements are DELETE FROM <table> [WHERE …] and CREATE, DROP and \
                 REFRESH MATERIALIZED VIEW; write rows through the write APIs",
            ));
        }
        authorize(
            &self.auth,
            Door::FlightSql,
            &principal,
            Access::Write(&database),
        )?;
        let deleted = self
            .query
            .delete(&database, &command.query)
            .await
            .map_err(query_status)?;
        Ok(deleted.rows as i64)
    }

    /// Binds parameters: the new handle carries them (statements hold no server state).
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let mut handle = StatementHandle::decode(&query.prepared_statement_handle)?;
        handle.parameters = Some(encode_parameters(request.into_inner()).await?);
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle.encode().into()),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = principal(&request)?;
        let handle = StatementHandle::decode(&cmd.prepared_statement_handle)?;
        let schema = self
            .schema_of(
                &principal,
                &handle,
                Dictionaries::of(request.metadata()),
                cmd.prepared_statement_handle.to_vec(),
            )
            .await?;
        command_info(&schema, &cmd, request)
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let principal = principal(&request)?;
        let handle = StatementHandle::decode(&cmd.prepared_statement_handle)?;
        let dictionaries = Dictionaries::of(request.metadata());
        Ok(Response::new(
            self.run(
                &principal,
                &handle,
                dictionaries,
                &cmd.prepared_statement_handle,
            )
            .await?,
        ))
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Ok(())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        command_info(
            &query.clone().into_builder(&self.sql_info).schema(),
            &query,
            request,
        )
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let builder = query.into_builder(&self.sql_info);
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        command_info(&query.into_builder().schema(), &query, request)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let mut builder = query.into_builder();
        builder.append(CATALOG_NAME);
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        command_info(&query.clone().into_builder().schema(), &query, request)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let principal = principal(&request)?;
        let mut builder = query.into_builder();
        for database in self.query.engine().catalog_state().databases.keys() {
            if principal.allows(Access::Read(database)) {
                builder.append(CATALOG_NAME, database);
            }
        }
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        command_info(&query.clone().into_builder().schema(), &query, request)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let principal = principal(&request)?;
        let state = self.query.engine().catalog_state();
        let mut builder = query.into_builder();
        for (database, def) in &state.databases {
            if !principal.allows(Access::Read(database)) {
                continue;
            }
            for (name, id) in &def.tables {
                let schema = state
                    .tables
                    .get(id)
                    .map(|t| as_sent(&t.schema()))
                    .unwrap_or_else(Schema::empty);
                builder
                    .append(CATALOG_NAME, database, name, "TABLE", &schema)
                    .map_err(Status::from)?;
            }
        }
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        command_info(&query.into_builder().schema(), &query, request)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let mut builder = query.into_builder();
        builder.append("TABLE");
        Ok(one_batch(builder.schema(), builder.build()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Flight SQL, with `DoGet` also taking InfluxDB 3's JSON tickets (which are not the
/// protobuf `Any` Flight SQL tickets are, so they are told apart before decoding).
pub struct KilnFlight(FlightSql);

#[tonic::async_trait]
impl FlightService for KilnFlight {
    type HandshakeStream = <FlightSql as FlightService>::HandshakeStream;
    type ListFlightsStream = <FlightSql as FlightService>::ListFlightsStream;
    type DoGetStream = <FlightSql as FlightService>::DoGetStream;
    type DoPutStream = <FlightSql as FlightService>::DoPutStream;
    type DoActionStream = <FlightSql as FlightService>::DoActionStream;
    type ListActionsStream = <FlightSql as FlightService>::ListActionsStream;
    type DoExchangeStream = <FlightSql as FlightService>::DoExchangeStream;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket = &request.get_ref().ticket;
        if ticket.first() != Some(&b'{') {
            return FlightService::do_get(&self.0, request).await;
        }
        let ticket: InfluxTicket = serde_json::from_slice(ticket)
            .map_err(|e| Status::invalid_argument(format!("invalid JSON ticket: {e}")))?;
        if !ticket.query_type.eq_ignore_ascii_case("sql") {
            return Err(Status::invalid_argument(format!(
                "query_type {:?} is not supported; Kiln speaks SQL (\"sql\")",
                ticket.query_type
            )));
        }
        let handle = StatementHandle {
            database: ticket.database,
            sql: ticket.sql_query,
            parameters: None,
        };
        let principal = principal(&request)?;
        let dictionaries = Dictionaries::of(request.metadata());
        Ok(Response::new(
            self.0.run(&principal, &handle, dictionaries, &[]).await?,
        ))
    }

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        self.0.handshake(request).await
    }

    async fn list_flights(
        &self,
        request: Request<arrow_flight::Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.0.list_flights(request).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.0.get_flight_info(request).await
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<arrow_flight::PollInfo>, Status> {
        self.0.poll_flight_info(request).await
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<arrow_flight::SchemaResult>, Status> {
        self.0.get_schema(request).await
    }

    async fn do_put(
        &self,
        request: Request<Streaming<arrow_flight::FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        self.0.do_put(request).await
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<arrow_flight::FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.0.do_exchange(request).await
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        self.0.do_action(request).await
    }

    async fn list_actions(
        &self,
        request: Request<arrow_flight::Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.0.list_actions(request).await
    }
}

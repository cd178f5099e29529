//! A writer's side of `kiln.internal.v1.BufferRequest`: one table's rows acknowledged and
//! not yet persisted, for a querier to merge with the segments it reads.

use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::sql::Any;
use futures::{StreamExt, TryStreamExt, stream};
use kiln_proto::internal::v1::BufferRequest;
use kiln_storage::Engine;
use prost::Message;
use tonic::{Response, Status};
use tracing::field::Empty;

use super::CATALOG_SEQUENCE_HEADER;
use crate::flight::FlightStream;

/// `message` decoded, if it is a [`BufferRequest`].
pub fn request_of(message: &Any) -> Option<Result<BufferRequest, Status>> {
    (message.type_url == BufferRequest::TYPE_URL).then(|| {
        BufferRequest::decode(message.value.as_ref())
            .map_err(|e| Status::invalid_argument(format!("invalid BufferRequest: {e}")))
    })
}

/// The ticket that asks for `request`.
pub fn ticket(request: &BufferRequest) -> arrow_flight::Ticket {
    let any = Any {
        type_url: BufferRequest::TYPE_URL.to_owned(),
        value: request.encode_to_vec().into(),
    };
    arrow_flight::Ticket::new(any.encode_to_vec())
}

/// Answers `request` from `engine`'s buffer (the caller has checked the token is an
/// admin's). A table this server does not know has no rows here: the answer is empty.
pub fn answer(
    engine: &Engine,
    request: &BufferRequest,
) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
    if engine.is_read_only() {
        return Err(Status::failed_precondition(
            "this server only reads (--role querier): it buffers no writes; list the servers \
             that take writes in --ingesters",
        ));
    }
    let span = tracing::debug_span!(
        "read buffer",
        db.namespace = %request.database,
        db.collection.name = %request.table,
        rows = Empty,
    );
    let _entered = span.enter();
    let found = engine
        .unpersisted(
            &request.database,
            &request.table,
            request.min_time,
            request.max_time,
        )
        .map_err(|e| Status::internal(kiln_storage::error_chain(&e)))?;
    let (sequence, schema, batches) = match found {
        Some(rows) => {
            span.record(
                "rows",
                rows.chunks.iter().map(|c| c.num_rows()).sum::<usize>(),
            );
            (rows.catalog_sequence, rows.schema, rows.chunks)
        }
        None => (
            engine.catalog_state().sequence,
            std::sync::Arc::new(arrow::datatypes::Schema::empty()),
            Vec::new(),
        ),
    };
    let data = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        // Tags stay dictionaries, as the querier's buffer keeps them.
        .with_dictionary_handling(DictionaryHandling::Resend)
        .build(stream::iter(batches.into_iter().map(Ok)))
        .map_err(Status::from)
        .boxed();
    let mut response = Response::new(data as FlightStream<_>);
    response.metadata_mut().insert(
        CATALOG_SEQUENCE_HEADER,
        sequence
            .0
            .to_string()
            .parse()
            .expect("digits are a header value"),
    );
    Ok(response)
}

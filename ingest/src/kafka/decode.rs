//! A batch of Kafka messages → validated rows. A message is written whole or not at all:
//! one that cannot be decoded, or has any row that fails validation, is set aside (for the
//! dead-letter topic) with its error, and the others are written.

use kiln_proto::ingest::v1::{WriteRequest, write_request};
use kiln_storage::catalog::CatalogState;
use prost::Message as _;

use super::config::Format;
use super::json::CompiledMapping;
use crate::line_protocol::{LineError, Parser, Precision, RowContext, ValidatedLines, Validator};
use crate::rows::push_rows;

/// A message's bytes and what Kafka says of it.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub payload: Option<&'a [u8]>,
    /// The message's timestamp in nanoseconds (create or log-append time), if it has one.
    pub timestamp: Option<i64>,
    /// Table and tags every row of the message takes (from an MQTT topic, say).
    pub context: Option<&'a RowContext>,
}

/// A source's format, ready to decode.
#[derive(Debug, Clone)]
pub enum Decoder {
    LineProtocol(Precision),
    Json(Box<CompiledMapping>),
    Protobuf,
}

impl Decoder {
    pub fn new(
        format: Format,
        precision: Precision,
        json: Option<&super::json::JsonMapping>,
    ) -> Result<Self, String> {
        Ok(match format {
            Format::LineProtocol => Self::LineProtocol(precision),
            Format::Protobuf => Self::Protobuf,
            Format::Json => Self::Json(Box::new(
                json.ok_or("format json needs a json mapping")?.compile()?,
            )),
        })
    }

    /// Pushes one message's rows. `Err` is a problem with the message as a whole.
    fn push(
        &self,
        v: &mut Validator<'_>,
        database: &str,
        msg: &Message<'_>,
        default_time: i64,
    ) -> Result<(), String> {
        let payload = msg.payload.unwrap_or_default();
        if payload.is_empty() {
            return Err("empty message".into());
        }
        let default_time = msg.timestamp.unwrap_or(default_time);
        v.set_context(msg.context.cloned());
        let pushed = self.push_payload(v, database, payload, default_time);
        v.set_context(None);
        pushed
    }

    fn push_payload(
        &self,
        v: &mut Validator<'_>,
        database: &str,
        payload: &[u8],
        default_time: i64,
    ) -> Result<(), String> {
        match self {
            Self::LineProtocol(precision) => {
                let text = std::str::from_utf8(payload)
                    .map_err(|e| format!("line protocol is not UTF-8: {e}"))?;
                push_lines(v, text, *precision, default_time);
                Ok(())
            }
            Self::Json(mapping) => mapping.push(v, payload, default_time),
            Self::Protobuf => {
                let req = WriteRequest::decode(payload)
                    .map_err(|e| format!("not a kiln.ingest.v1.WriteRequest: {e}"))?;
                if !req.database.is_empty() && req.database != database {
                    return Err(format!(
                        "the request is for database {:?}; this source writes to {database:?}",
                        req.database
                    ));
                }
                match req.payload {
                    None => Err("the request has no payload".into()),
                    Some(write_request::Payload::Rows(rows)) => {
                        push_rows(v, &rows);
                        Ok(())
                    }
                    Some(write_request::Payload::LineProtocol(lp)) => {
                        let precision = if lp.precision.is_empty() {
                            Precision::Nanoseconds
                        } else {
                            lp.precision.parse()?
                        };
                        push_lines(v, &lp.text, precision, default_time);
                        Ok(())
                    }
                    Some(write_request::Payload::Arrow(_)) => Err(
                        "Arrow payloads are not read from Kafka; send rows or line_protocol".into(),
                    ),
                }
            }
        }
    }
}

fn push_lines(v: &mut Validator<'_>, text: &str, precision: Precision, default_time: i64) {
    let mut parser = Parser::new(text);
    while let Some(parsed) = parser.next() {
        match parsed {
            Ok(line) => v.push(&line, precision, default_time),
            Err(e) => v.reject(e.into()),
        }
    }
}

/// Describes a message's rejected rows for its dead-letter headers.
fn describe(decoder: &Decoder, rejected: &[LineError]) -> String {
    const SHOWN: usize = 5;
    let mut out = String::new();
    for (i, e) in rejected.iter().take(SHOWN).enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        match decoder {
            Decoder::LineProtocol(_) => out.push_str(&e.to_string()),
            _ if e.column == 0 => out.push_str(&format!("row {}: {}", e.line, e.message)),
            _ => out.push_str(&e.to_string()),
        }
    }
    if rejected.len() > SHOWN {
        out.push_str(&format!(
            "; and {} more rejected rows",
            rejected.len() - SHOWN
        ));
    }
    out
}

/// The rows of the good messages of a batch, and each bad message's index and error.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    pub rows: ValidatedLines,
    pub rejected: Vec<(usize, String)>,
}

/// Payload bytes validated into one set of Arrow builders: batches about this size stay in
/// cache and grow without copying much; a large batch becomes several Arrow batches.
const CHUNK_BYTES: usize = 2 * 1024 * 1024;

/// Validates `messages` against `catalog`'s view of `database`, a chunk of messages at a
/// time. Rows of one chunk share one set of Arrow builders; when a message fails, the
/// others are validated again without it, so none of its rows is written.
pub fn validate_messages(
    decoder: &Decoder,
    messages: &[Message<'_>],
    database: &str,
    catalog: &CatalogState,
    now: i64,
) -> DecodedBatch {
    let mut out = DecodedBatch::default();
    let mut start = 0;
    while start < messages.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < messages.len() && (end == start || bytes < CHUNK_BYTES) {
            bytes += messages[end].payload.map_or(0, <[u8]>::len);
            end += 1;
        }
        let chunk = validate_chunk(decoder, &messages[start..end], database, catalog, now);
        out.rejected
            .extend(chunk.rejected.into_iter().map(|(i, e)| (start + i, e)));
        let rows = chunk.rows;
        out.rows.tables.extend(rows.tables);
        // The catalog takes repeated changes once, and refuses conflicting ones.
        for change in rows.schema_changes {
            if !out.rows.schema_changes.contains(&change) {
                out.rows.schema_changes.push(change);
            }
        }
        out.rows.rejected.extend(rows.rejected);
        out.rows.accepted_lines += rows.accepted_lines;
        start = end;
    }
    out
}

fn validate_chunk(
    decoder: &Decoder,
    messages: &[Message<'_>],
    database: &str,
    catalog: &CatalogState,
    now: i64,
) -> DecodedBatch {
    let mut rejected = Vec::new();
    let mut v = Validator::new(database, catalog);
    for (i, msg) in messages.iter().enumerate() {
        let before = v.rejected().len();
        match decoder.push(&mut v, database, msg, now) {
            Err(e) => rejected.push((i, e)),
            Ok(()) if v.rejected().len() > before => {
                rejected.push((i, describe(decoder, &v.rejected()[before..])))
            }
            Ok(()) => {}
        }
    }
    if rejected.is_empty() {
        return DecodedBatch {
            rows: v.finish(),
            rejected,
        };
    }
    // Without the bad messages no other row can fail: a type set by a removed row was set
    // to the same type by every accepted row that used it.
    let mut v = Validator::new(database, catalog);
    let mut bad = rejected.iter().map(|(i, _)| *i).peekable();
    for (i, msg) in messages.iter().enumerate() {
        if bad.peek() == Some(&i) {
            bad.next();
            continue;
        }
        // Decoded once already: it cannot fail now.
        let _ = decoder.push(&mut v, database, msg, now);
    }
    let rows = v.finish();
    // Kept for the caller to check: empty unless the argument above is wrong.
    if !rows.rejected.is_empty() {
        tracing::error!(
            rejected = rows.rejected.len(),
            "rows rejected only after their batch lost a message"
        );
    }
    DecodedBatch { rows, rejected }
}

#[cfg(test)]
mod tests {
    use kiln_storage::catalog::CatalogState;

    use super::*;
    use crate::kafka::json::JsonMapping;

    fn msg(text: &str) -> Message<'_> {
        Message {
            payload: Some(text.as_bytes()),
            timestamp: Some(7_000),
            context: None,
        }
    }

    #[test]
    fn a_bad_message_is_set_aside_whole_and_the_rest_written() {
        let catalog = CatalogState::default();
        let d = Decoder::LineProtocol(Precision::Nanoseconds);
        let msgs = [
            msg("cpu,host=a usage=1 10"),
            msg("cpu,host=b usage=2 10\ncpu,host=b usage=oops 20"),
            msg("cpu,host=c usage=3"),
            Message {
                payload: None,
                timestamp: None,
                context: None,
            },
            msg("cpu,host=d usage=4i 10"),
        ];
        let out = validate_messages(&d, &msgs, "db", &catalog, 0);
        let bad: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
        assert_eq!(bad, vec![1, 3, 4], "{:?}", out.rejected);
        assert!(
            out.rejected[0].1.starts_with("line 2, column"),
            "{:?}",
            out.rejected
        );
        assert_eq!(out.rejected[1].1, "empty message");
        assert!(
            out.rejected[2].1.contains("is a float field"),
            "{:?}",
            out.rejected
        );
        assert_eq!(out.rows.accepted_lines, 2);
        assert!(out.rows.rejected.is_empty());
        let (_, batch) = &out.rows.tables[0];
        assert_eq!(batch.num_rows(), 2);
        // The line without a timestamp took the message's.
        let time = batch
            .column_by_name("time")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            .unwrap();
        assert_eq!(time.values().to_vec(), vec![10, 7_000]);
    }

    #[test]
    fn json_messages_map_to_rows() {
        let mapping: JsonMapping = toml::from_str(
            r#"
rows = "$.readings"
table = "$.kind"
tags = { device = "$.dev", site = "north" }
fields = { temp = "$.v.t", n = { path = "$.v.n", type = "integer" } }
time = "$.ts"
time_unit = "ms"
"#,
        )
        .unwrap();
        let d = Decoder::new(Format::Json, Precision::Nanoseconds, Some(&mapping)).unwrap();
        let catalog = CatalogState::default();
        let good = r#"{"readings": [
            {"kind": "m", "dev": "p1", "ts": 1000, "v": {"t": 20.5, "n": 3}},
            {"kind": "m", "dev": 7, "ts": "1970-01-01T00:00:02Z", "v": {"t": 21}}]}"#;
        let bad_row = r#"{"readings": [{"kind": "m", "dev": "p1", "v": {"n": 1.5}}]}"#;
        let msgs = [
            msg(good),
            msg(bad_row),
            msg("not json"),
            msg(r#"{"readings": 3}"#),
        ];
        let out = validate_messages(&d, &msgs, "db", &catalog, 0);
        let errors: Vec<&str> = out.rejected.iter().map(|(_, e)| e.as_str()).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(errors[0], "row 1: field \"n\": 1.5 is not a 64-bit integer");
        assert!(errors[1].starts_with("invalid JSON"), "{errors:?}");
        assert_eq!(errors[2], "the rows path does not hold an array");
        let (table, batch) = &out.rows.tables[0];
        assert_eq!(table, "m");
        assert_eq!(batch.num_rows(), 2);
        let pretty = arrow::util::pretty::pretty_format_batches(std::slice::from_ref(batch))
            .unwrap()
            .to_string();
        assert!(pretty.contains("1970-01-01T00:00:01"), "{pretty}");
        assert!(pretty.contains("1970-01-01T00:00:02"), "{pretty}");
        assert!(pretty.contains("| 7 "), "{pretty}");
        assert!(pretty.contains("north"), "{pretty}");
    }

    #[test]
    fn protobuf_requests_decode_rows_and_refuse_another_database() {
        use kiln_proto::ingest::v1::{Field, LineProtocol, Row, Rows, field};
        let rows = WriteRequest {
            database: "db".into(),
            payload: Some(write_request::Payload::Rows(Rows {
                rows: vec![Row {
                    table: "t".into(),
                    tags: [("k".to_string(), "v".to_string())].into(),
                    fields: vec![Field {
                        name: "f".into(),
                        value: Some(field::Value::Integer(5)),
                    }],
                    time_unix_nano: 99,
                }],
            })),
            ..Default::default()
        }
        .encode_to_vec();
        let other = WriteRequest {
            database: "elsewhere".into(),
            payload: Some(write_request::Payload::LineProtocol(LineProtocol {
                text: "t f=1".into(),
                precision: String::new(),
            })),
            ..Default::default()
        }
        .encode_to_vec();
        let msgs = [
            Message {
                payload: Some(&rows),
                timestamp: None,
                context: None,
            },
            Message {
                payload: Some(&other),
                timestamp: None,
                context: None,
            },
            Message {
                payload: Some(b"\xff\xff\xff"),
                timestamp: None,
                context: None,
            },
        ];
        let out = validate_messages(&Decoder::Protobuf, &msgs, "db", &CatalogState::default(), 0);
        assert_eq!(out.rows.accepted_lines, 1);
        assert_eq!(out.rejected.len(), 2);
        assert!(
            out.rejected[0].1.contains("\"elsewhere\""),
            "{:?}",
            out.rejected
        );
        assert!(
            out.rejected[1]
                .1
                .starts_with("not a kiln.ingest.v1.WriteRequest")
        );
    }
}

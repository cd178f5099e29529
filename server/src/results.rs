//! How an HTTP query's result becomes a response body: the `format` parameter's encodings,
//! written as a stream of chunks while the client reads them.
//!
//! The result is held whole before encoding starts (a query error is still a proper error
//! status), but the encoded bytes are not: a 437,000-row JSON answer is 176 MB of text;
//! encoded into one buffer, a fifth of the time went to growing it (copies and page
//! faults), and the client waited for the last byte before it got the first.

use std::io::{self, Write};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use arrow::error::ArrowError;
use arrow::json::WriterBuilder;
use arrow::json::writer::{
    Encoder, EncoderFactory, EncoderOptions, JsonArray, JsonFormat, LineDelimited, NullableEncoder,
};
use axum::body::{Body, Bytes};
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// The encodings of `GET|POST /api/v3/query_sql`'s `format` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    JsonLines,
    Csv,
    Pretty,
    Parquet,
}

/// A format name not among [`Format`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown format {0:?}; use json, jsonl, csv, pretty or parquet")]
pub struct UnknownFormat(String);

impl Format {
    pub fn parse(s: Option<&str>) -> Result<Self, UnknownFormat> {
        Ok(match s.unwrap_or("json") {
            "json" => Self::Json,
            "jsonl" => Self::JsonLines,
            "csv" => Self::Csv,
            "pretty" => Self::Pretty,
            "parquet" => Self::Parquet,
            other => return Err(UnknownFormat(other.to_string())),
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::JsonLines => "application/jsonl",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Pretty => "text/plain; charset=utf-8",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// Bytes handed to the response at a time.
const CHUNK: usize = 256 * 1024;

/// Encodes `batches` as `format` on `runtime`'s blocking pool and answers with a body that
/// streams the encoded chunks, once the first one is ready. `hold` (a memory reservation,
/// a query permit) lives until the encoding ends. An error before any byte is encoded (a
/// type the format cannot write) is returned; one later ends the body early, and is logged.
pub async fn body(
    format: Format,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    runtime: &Handle,
    hold: impl Send + 'static,
) -> Result<Body, io::Error> {
    // A few chunks in flight: the encoder runs ahead of a slow client by at most these.
    let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(4);
    runtime.spawn_blocking(move || {
        let _hold = hold;
        let mut out = Chunks {
            buf: Vec::with_capacity(CHUNK),
            tx,
        };
        let result = encode(format, &schema, &batches, &mut out).and_then(|()| out.send());
        if let Err(e) = result
            && e.kind() != io::ErrorKind::BrokenPipe
        {
            // The client has the chunks sent so far; the body ends with an error.
            let _ = out.tx.blocking_send(Err(e));
        }
    });
    let first = match rx.recv().await {
        Some(chunk) => chunk?,
        None => Bytes::new(),
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        if let Err(e) = &item {
            tracing::warn!(error = %e, "encoding a query result failed after its first bytes were sent");
        }
        Some((item, rx))
    });
    Ok(Body::from_stream(
        futures::stream::once(async { Ok::<_, io::Error>(first) }).chain(rest),
    ))
}

/// A writer that hands its bytes to the response `CHUNK` at a time.
struct Chunks {
    buf: Vec<u8>,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl Chunks {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks go out when full and at the end; a writer's flush between rows would
        // only make them smaller.
        Ok(())
    }
}

fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    out: &mut Chunks,
) -> io::Result<()> {
    let arrow_error = |e: ArrowError| match e {
        ArrowError::IoError(_, e) => e,
        e => io::Error::other(e),
    };
    match format {
        // With no rows, `[]`.
        Format::Json => json::<JsonArray>(batches, out).map_err(arrow_error)?,
        Format::JsonLines => json::<LineDelimited>(batches, out).map_err(arrow_error)?,
        Format::Csv => {
            if batches.is_empty() {
                let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                writeln!(out, "{}", names.join(","))?;
            } else {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut *out);
                for b in batches {
                    w.write(b).map_err(arrow_error)?;
                }
            }
        }
        Format::Pretty => {
            let table = if batches.is_empty() {
                arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(
                    schema.clone(),
                )])
            } else {
                arrow::util::pretty::pretty_format_batches(batches)
            }
            .map_err(arrow_error)?;
            writeln!(out, "{table}")?;
        }
        Format::Parquet => {
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut *out, schema.clone(), None)
                .map_err(io::Error::other)?;
            for b in batches {
                w.write(b).map_err(io::Error::other)?;
            }
            w.close().map_err(io::Error::other)?;
        }
    }
    Ok(())
}

/// `batches` as JSON in framing `F` (an array of rows, or a row a line).
fn json<F: JsonFormat>(batches: &[RecordBatch], out: &mut Chunks) -> Result<(), ArrowError> {
    let mut w = WriterBuilder::new()
        .with_encoder_factory(Arc::new(PreEncodedDictionaries))
        .build::<_, F>(out);
    for b in batches {
        w.write(b)?;
    }
    w.finish()
}

/// JSON for dictionary-encoded strings (tags): each distinct value is escaped once per
/// batch, and a row copies its bytes, instead of escaping the same few strings row after
/// row.
#[derive(Debug)]
struct PreEncodedDictionaries;

impl EncoderFactory for PreEncodedDictionaries {
    fn make_default_encoder<'a>(
        &self,
        _field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> Result<Option<NullableEncoder<'a>>, ArrowError> {
        let DataType::Dictionary(_, value_type) = array.data_type() else {
            return Ok(None);
        };
        let dictionary = array.as_any_dictionary();
        let values: &ArrayRef = dictionary.values();
        if values.is_empty() {
            return Ok(None);
        }
        let strings: Vec<Option<&str>> = match value_type.as_ref() {
            DataType::Utf8 => values.as_string::<i32>().iter().collect(),
            DataType::LargeUtf8 => values.as_string::<i64>().iter().collect(),
            DataType::Utf8View => values.as_string_view().iter().collect(),
            _ => return Ok(None),
        };
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(strings.len() + 1);
        offsets.push(0);
        for s in strings {
            // A null value is never encoded: its rows are null (`logical_nulls`).
            serde_json::to_writer(&mut bytes, s.unwrap_or_default())
                .map_err(|e| ArrowError::JsonError(e.to_string()))?;
            offsets.push(bytes.len());
        }
        let encoder = DictionaryJson {
            keys: dictionary.normalized_keys(),
            offsets,
            bytes,
        };
        Ok(Some(NullableEncoder::new(
            Box::new(encoder),
            array.logical_nulls(),
        )))
    }
}

struct DictionaryJson {
    keys: Vec<usize>,
    offsets: Vec<usize>,
    bytes: Vec<u8>,
}

impl Encoder for DictionaryJson {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let key = self.keys[idx];
        if let (Some(&start), Some(&end)) = (self.offsets.get(key), self.offsets.get(key + 1)) {
            out.extend_from_slice(&self.bytes[start..end]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{DictionaryArray, Float64Array, StringArray};
    use arrow::datatypes::{Field, Int32Type, Schema};

    fn encoded(format: Format, batches: &[RecordBatch], schema: &SchemaRef) -> String {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut out = Chunks {
            buf: Vec::new(),
            tx,
        };
        encode(format, schema, batches, &mut out).unwrap();
        out.send().unwrap();
        drop(out);
        let mut text = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            text.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn dictionary_tags_are_json_strings_with_nulls_left_out() {
        let keys = arrow::array::Int32Array::from(vec![Some(1), None, Some(0), Some(1)]);
        let values = StringArray::from(vec![Some("a\"b"), Some("host\n2")]);
        let tags = DictionaryArray::<Int32Type>::try_new(keys, Arc::new(values)).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("host", tags.data_type().clone(), true),
            Field::new("v", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(tags),
                Arc::new(Float64Array::from(vec![1.5, 2.0, 3.0, 4.0])),
            ],
        )
        .unwrap();
        let text = encoded(Format::Json, &[batch.clone(), batch.slice(2, 2)], &schema);
        let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            rows,
            serde_json::json!([
                {"host": "host\n2", "v": 1.5},
                {"v": 2.0},
                {"host": "a\"b", "v": 3.0},
                {"host": "host\n2", "v": 4.0},
                {"host": "a\"b", "v": 3.0},
                {"host": "host\n2", "v": 4.0},
            ])
        );
        let lines = encoded(Format::JsonLines, &[batch.slice(1, 2)], &schema);
        let lines: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                serde_json::json!({"v": 2.0}),
                serde_json::json!({"host": "a\"b", "v": 3.0})
            ]
        );
    }

    #[test]
    fn an_empty_result_is_an_empty_array_and_a_header() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        assert_eq!(encoded(Format::Json, &[], &schema), "[]");
        assert_eq!(encoded(Format::Csv, &[], &schema), "v\n");
    }
}

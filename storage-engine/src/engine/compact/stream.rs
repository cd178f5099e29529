//! Compaction's merge as a stream: the partition's segments are read from the object store
//! a batch at a time, merged by [`SortedMerge`] and written out as they are merged, through
//! an upload that goes multipart once it is large. It runs on a blocking thread, so the
//! merge's CPU never holds up the runtime that serves writes and queries.
//!
//! Memory is bounded by the number of segments, not by the partition's rows: per segment,
//! the row group being read (compressed column chunks) and one decoded batch; for the
//! output, the row group being encoded and the upload's parts in flight. A first pass over
//! the tag columns alone counts their distinct values, which sizes the bloom filters as a
//! segment written from memory would.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, TryFutureExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::arrow::{AsyncArrowWriter, ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use super::super::{Error, Result, Written};
use crate::buffer::time_range;
use crate::catalog::tombstones::{DeletePredicate, remove_all};
use crate::catalog::{SegmentMeta, TableDef};
use crate::dedup::align_to_schema;
use crate::persist::{sort_key, utc_schema, writer_properties};
use crate::sorted_merge::{self, SortedMerge, Step};

/// Rows per batch read from each segment and per merged batch written.
const BATCH_ROWS: usize = 8192;
/// The upload goes multipart past this many bytes, in parts of 5 MiB.
const UPLOAD_BUFFER: usize = 8 << 20;
/// Parts of a multipart upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 2;

/// Merges `segments` (one partition's, oldest first, each sorted by the table's key) into
/// a new segment at `path`, streaming. [`Error::Merge`] with
/// [`sorted_merge::Error::Unsorted`] means a segment is not sorted and nothing usable was
/// written.
///
/// `deletes[i]` are the deletes (tombstones) that apply to `segments[i]`: its rows they
/// match are left out of the merge.
pub(super) async fn merge_segments(
    store: Arc<dyn ObjectStore>,
    def: TableDef,
    segments: Vec<SegmentMeta>,
    deletes: Vec<Vec<DeletePredicate>>,
    path: String,
) -> Result<Written> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(merge(&store, &def, &segments, &deletes, path))
    })
    .await
    .map_err(Error::Task)?
}

async fn merge(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    segments: &[SegmentMeta],
    deletes: &[Vec<DeletePredicate>],
    path: String,
) -> Result<Written> {
    let distinct = distinct_tags(store, def, segments).await?;
    let props = writer_properties(def, |tag| distinct.get(tag).map_or(0, HashSet::len))?;
    let mut inputs = Vec::with_capacity(segments.len());
    for segment in segments {
        inputs.push(open(store, segment, |_| ProjectionMask::all()).await?);
    }

    let schema = def.schema();
    let file_schema = utc_schema(&schema);
    let location = Path::from(path.as_str());
    let upload = BufWriter::with_capacity(Arc::clone(store), location.clone(), UPLOAD_BUFFER)
        .with_max_concurrency(UPLOAD_CONCURRENCY);
    let write_error = |source| Error::WriteSegment {
        path: path.clone(),
        source,
    };
    let mut writer = AsyncArrowWriter::try_new(upload, Arc::clone(&file_schema), Some(props))
        .map_err(write_error)?;
    let merge_error = |source| Error::Merge {
        path: path.clone(),
        source,
    };
    let mut merge =
        SortedMerge::new(schema, &sort_key(def), inputs.len(), BATCH_ROWS).map_err(merge_error)?;
    let mut merged = Written {
        rows: 0,
        min_time: i64::MAX,
        max_time: i64::MIN,
        bytes: 0,
    };
    loop {
        match merge.step().map_err(merge_error)? {
            Step::Need(i) => {
                let batch = loop {
                    let batch = inputs[i]
                        .try_next()
                        .await
                        .map_err(|source| read_error(&segments[i], source))?;
                    let Some(batch) = batch else { break None };
                    let batch = remove_all(deletes.get(i).into_iter().flatten(), batch)
                        .map_err(Error::ApplyDelete)?;
                    // A batch the deletes emptied: the segment's next one.
                    if batch.num_rows() > 0 {
                        break Some(batch);
                    }
                };
                merge.push(i, batch).map_err(merge_error)?;
            }
            Step::Batch(batch) => {
                let (min, max) = time_range(&batch);
                merged.rows += batch.num_rows() as u64;
                merged.min_time = merged.min_time.min(min);
                merged.max_time = merged.max_time.max(max);
                let labelled = align_to_schema(&batch, &file_schema)
                    .map_err(|e| merge_error(sorted_merge::Error::Arrow(e)))?;
                writer.write(&labelled).await.map_err(write_error)?;
            }
            Step::Done => break,
        }
    }
    writer.close().await.map_err(write_error)?;
    merged.bytes = store
        .head(&location)
        .await
        .map_err(|source| Error::Store {
            path: path.clone(),
            source,
        })?
        .size;
    Ok(merged)
}

/// The distinct values of each tag column over `segments`, read from the tag columns only.
async fn distinct_tags(
    store: &Arc<dyn ObjectStore>,
    def: &TableDef,
    segments: &[SegmentMeta],
) -> Result<HashMap<String, HashSet<String>>> {
    let tags: Vec<&str> = def.tag_columns().map(|c| c.name.as_str()).collect();
    let mut distinct: HashMap<String, HashSet<String>> = HashMap::new();
    if tags.is_empty() {
        return Ok(distinct);
    }
    for segment in segments {
        let mut batches = open(store, segment, |schema| {
            ProjectionMask::columns(schema, tags.iter().copied())
        })
        .await?;
        while let Some(batch) = batches
            .try_next()
            .await
            .map_err(|source| read_error(segment, source))?
        {
            for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
                let seen = distinct.entry(field.name().clone()).or_default();
                let values = match column.data_type() {
                    // A dictionary's values are the distinct values (and fewer than rows).
                    DataType::Dictionary(..) => column.as_any_dictionary().values().clone(),
                    _ => Arc::clone(column),
                };
                let values = arrow::compute::cast(&values, &DataType::Utf8)
                    .map_err(|e| read_error(segment, e.into()))?;
                for value in values.as_string::<i32>().iter().flatten() {
                    if !seen.contains(value) {
                        seen.insert(value.to_owned());
                    }
                }
            }
        }
    }
    Ok(distinct)
}

/// A stream of `segment`'s rows, `BATCH_ROWS` at a time, of the columns `projection`
/// picks from the file's schema.
async fn open(
    store: &Arc<dyn ObjectStore>,
    segment: &SegmentMeta,
    projection: impl FnOnce(&parquet::schema::types::SchemaDescriptor) -> ProjectionMask,
) -> Result<ParquetRecordBatchStream<SegmentReader>> {
    let reader = SegmentReader {
        store: Arc::clone(store),
        path: Path::from(segment.path.as_str()),
        size: segment.bytes,
    };
    let builder =
        ParquetRecordBatchStreamBuilder::new_with_options(reader, ArrowReaderOptions::new())
            .await
            .map_err(|source| read_error(segment, source))?;
    let mask = projection(builder.parquet_schema());
    builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|source| read_error(segment, source))
}

fn read_error(segment: &SegmentMeta, source: parquet::errors::ParquetError) -> Error {
    Error::ReadSegment {
        path: segment.path.clone(),
        source,
    }
}

/// Reads a segment's byte ranges from the object store as the Parquet reader asks for them.
struct SegmentReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    /// The file's size, from the catalog: the footer is read without asking the store.
    size: u64,
}

fn store_error(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for SegmentReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        self.store
            .get_range(&self.path, range)
            .map_err(store_error)
            .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(store_error)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

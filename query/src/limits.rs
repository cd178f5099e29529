//! Limits every query runs under, whatever protocol it came from.
//!
//! * **memory**: all running queries share one pool of `memory_limit` bytes; operators that
//!   can spill (sorts, aggregations) spill to `spill_dir`, the others fail with
//!   [`Error::ResourcesExhausted`](crate::Error::ResourcesExhausted);
//! * **time**: a query stream that is still producing after `timeout` ends with
//!   [`Error::Timeout`](crate::Error::Timeout);
//! * **cancellation**: dropping a query's stream stops its work (DataFusion's tasks are
//!   aborted with it), which is what happens when a client goes away.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use futures::Stream;

/// Limits of the query engine.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Bytes all running queries may hold together.
    pub memory_limit: usize,
    /// Where spilling operators write; the OS temporary directory if `None`.
    pub spill_dir: Option<PathBuf>,
    /// Longest a query may run; `None` for no limit.
    pub timeout: Option<Duration>,
    /// Where queries execute; `None` for the runtime that creates the engine.
    pub executor: Option<crate::executor::QueryExecutor>,
    /// On a querier: the servers whose unpersisted rows every scan merges in.
    pub writers: Option<Arc<dyn crate::cluster::Writers>>,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            memory_limit: 2 * 1024 * 1024 * 1024,
            spill_dir: None,
            timeout: Some(Duration::from_secs(300)),
            executor: None,
            writers: None,
        }
    }
}

impl QueryConfig {
    /// The DataFusion runtime every session shares: the memory pool and the spill files.
    pub(crate) fn runtime(&self) -> Result<Arc<RuntimeEnv>> {
        // Name the five biggest consumers when the pool runs dry.
        let pool = TrackConsumersPool::new(
            FairSpillPool::new(self.memory_limit),
            std::num::NonZeroUsize::new(5).expect("5 is not zero"),
        );
        // SQL reaches no file of the server's: the registry starts without DataFusion's
        // `file://` store; sessions add only the engine's own.
        let registry = datafusion::execution::object_store::DefaultObjectStoreRegistry::new();
        let file = datafusion::execution::object_store::ObjectStoreUrl::local_filesystem();
        let _ = datafusion::execution::object_store::ObjectStoreRegistry::deregister_store(
            &registry,
            file.as_ref(),
        );
        let mut builder = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(pool))
            .with_object_store_registry(Arc::new(registry));
        if let Some(dir) = &self.spill_dir {
            builder = builder.with_temp_file_path(dir);
        }
        Ok(Arc::new(builder.build()?))
    }
}

/// The error a query that ran out of time ends with.
#[derive(Debug, thiserror::Error)]
#[error("the query ran longer than the server's query timeout ({0:?}) and was stopped")]
pub struct TimedOut(pub Duration);

/// A running query's stream: counted while it lives, and ended with [`TimedOut`] once its
/// time is up.
pub(crate) struct Running {
    inner: SendableRecordBatchStream,
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    done: bool,
    _running: RunningGuard,
}

/// Counts a query as running until dropped (finished, failed, or its client gone).
struct RunningGuard(Arc<AtomicUsize>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Running {
    /// `inner` stopped once `left` of its `limit` has passed (planning took the rest).
    pub(crate) fn new(
        inner: SendableRecordBatchStream,
        limit: Option<Duration>,
        left: Option<Duration>,
        running: &Arc<AtomicUsize>,
    ) -> Self {
        running.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            deadline: limit.map(|limit| {
                let left = left.unwrap_or(limit);
                (limit, Box::pin(tokio::time::sleep(left)))
            }),
            done: false,
            _running: RunningGuard(Arc::clone(running)),
        }
    }
}

impl Stream for Running {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some((limit, sleep)) = &mut self.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            let limit = *limit;
            self.done = true;
            return Poll::Ready(Some(Err(DataFusionError::External(Box::new(TimedOut(
                limit,
            ))))));
        }
        self.inner.as_mut().poll_next(cx)
    }
}

impl RecordBatchStream for Running {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

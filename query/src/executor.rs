//! Where queries run: on threads of their own, below the write path's priority.
//!
//! A query is CPU work that can take every core for seconds; a write is short work that a
//! gateway waits on, with a small buffer of its own. On one runtime, a few hundred
//! dashboard queries leave writes a fraction of the CPU, and writes start to be refused.
//! So queries execute on a runtime of their own ([`QueryExecutor::dedicated`]) whose
//! threads run at a lower scheduling priority (a higher nice value): when both want the
//! CPU, writes get it first, and queries take whatever is left, which is all of it when
//! nothing is being written.
//!
//! A query's plan runs on the executor, and its batches reach the caller (the HTTP, Flight
//! SQL or alert code, on the server's runtime) through a small channel; dropping the stream
//! stops the query. PostgreSQL connections run on the executor whole (see
//! [`QueryExecutor::handle`]), since `datafusion-postgres` executes plans itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::array::RecordBatch;
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::session_state::SessionState;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use futures::{Stream, StreamExt};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Batches a query may have ready ahead of its caller.
const AHEAD: usize = 2;

/// Where queries execute (see the module docs).
#[derive(Clone, Debug)]
pub struct QueryExecutor {
    handle: Handle,
    /// The dedicated runtime, when there is one; shut down with the last clone.
    _runtime: Option<Arc<OwnedRuntime>>,
}

impl QueryExecutor {
    /// Queries execute on the runtime of whoever creates this (tests, tools).
    pub fn current() -> Self {
        Self {
            handle: Handle::current(),
            _runtime: None,
        }
    }

    /// A runtime of `threads` workers named `kiln-query`, each at nice value `nice`
    /// (0: the same priority as the rest of the server; 19: the lowest). A nice value
    /// is per thread on Linux; elsewhere it is not set.
    pub fn dedicated(threads: usize, nice: i32) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("kiln-query")
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            _runtime: Some(Arc::new(OwnedRuntime(Some(runtime)))),
        })
    }

    /// The runtime queries run on: work spawned on it runs at queries' priority.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Starts `df` on the executor: the stream of its batches once its physical plan
    /// is made (an error making it is returned here), and that plan.
    pub(crate) async fn execute(
        &self,
        df: DataFrame,
    ) -> Result<(SendableRecordBatchStream, Arc<dyn ExecutionPlan>)> {
        self.start(async move {
            let task_context = Arc::new(df.task_ctx());
            Ok((df.create_physical_plan().await?, task_context))
        })
        .await
    }

    /// Starts an optimized logical plan on the executor (see [`Self::execute`]): only its
    /// physical plan is made, and returned with the stream.
    pub(crate) async fn execute_optimized(
        &self,
        state: SessionState,
        plan: LogicalPlan,
    ) -> Result<(SendableRecordBatchStream, Arc<dyn ExecutionPlan>)> {
        self.start(async move {
            let task_context = Arc::new(TaskContext::from(&state));
            let physical = state
                .query_planner()
                .create_physical_plan(&plan, &state)
                .await?;
            Ok((physical, task_context))
        })
        .await
    }

    /// Runs a physical plan on the executor.
    pub(crate) async fn execute_physical(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        task_context: Arc<TaskContext>,
    ) -> Result<(SendableRecordBatchStream, Arc<dyn ExecutionPlan>)> {
        self.start(async move { Ok((plan, task_context)) }).await
    }

    /// Makes a physical plan with `make` on the executor and runs it there.
    async fn start(
        &self,
        make: impl Future<Output = Result<(Arc<dyn ExecutionPlan>, Arc<TaskContext>)>> + Send + 'static,
    ) -> Result<(SendableRecordBatchStream, Arc<dyn ExecutionPlan>)> {
        let (started, plan) = oneshot::channel();
        let (batches, received) = mpsc::channel(AHEAD);
        // Physical planning (opening segments, asking writers) and running: the span
        // lasts until the last batch is sent.
        let span = tracing::debug_span!("execute");
        let task = Aborting(
            self.handle.spawn(
                async move {
                    let started_plan = make.await.and_then(|(plan, task_context)| {
                        Ok((execute_stream(Arc::clone(&plan), task_context)?, plan))
                    });
                    let (mut stream, plan) = match started_plan {
                        Ok(started_plan) => started_plan,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    if started.send(Ok(plan)).is_err() {
                        return;
                    }
                    while let Some(batch) = stream.next().await {
                        if batches.send(batch).await.is_err() {
                            return;
                        }
                    }
                }
                .instrument(span),
            ),
        );
        let plan = match plan.await {
            Ok(plan) => plan?,
            // The task ended without a word: it panicked.
            Err(_) => return Err(task.ended().await),
        };
        let schema = plan.schema();
        let stream = Remote {
            received,
            task: Some(task),
            _plan: Arc::clone(&plan),
        };
        Ok((
            Box::pin(RecordBatchStreamAdapter::new(schema, stream)),
            plan,
        ))
    }
}

/// Sets the calling thread's nice value.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice != 0 {
        // SAFETY: setpriority only changes the scheduling priority of this thread (on
        // Linux the nice value is per thread, and gettid names the caller).
        let tid = unsafe { libc::gettid() };
        // SAFETY: as above.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
            tracing::warn!(
                nice,
                error = %std::io::Error::last_os_error(),
                "cannot lower the query threads' priority"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// A query's batches as they arrive from its task; the task is aborted when this is
/// dropped, and a task that failed (panicked) ends the stream with an error rather than
/// letting a partial result look complete.
struct Remote {
    received: mpsc::Receiver<Result<RecordBatch>>,
    /// Until the stream has ended.
    task: Option<Aborting>,
    /// The query's plan, kept until the caller is done with the stream: what the plan
    /// holds (the segment files its scans read, see `scan::KilnScanExec`) is held for as
    /// long as the caller reads, not only until the task has produced the last batch.
    _plan: Arc<dyn ExecutionPlan>,
}

impl Stream for Remote {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.received.poll_recv(cx) {
            Poll::Ready(Some(batch)) => return Poll::Ready(Some(batch)),
            Poll::Pending => return Poll::Pending,
            // The task has returned or failed.
            Poll::Ready(None) => {}
        }
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(None);
        };
        let outcome = std::task::ready!(Pin::new(&mut task.0).poll(cx));
        self.task = None;
        Poll::Ready(outcome.err().map(|e| Err(failed(e))))
    }
}

/// The error for a query task that failed (panicked or was cancelled).
fn failed(e: tokio::task::JoinError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// A task aborted when dropped.
struct Aborting(JoinHandle<()>);

impl Aborting {
    /// Why the task ended before it said how its query started.
    async fn ended(mut self) -> DataFusionError {
        match (&mut self.0).await {
            Err(e) => failed(e),
            Ok(()) => DataFusionError::Execution("the query's task ended before its start".into()),
        }
    }
}

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A runtime that may be dropped anywhere, a runtime's thread included (tokio refuses to
/// drop one inside another's context otherwise): it is shut down in the background.
#[derive(Debug)]
struct OwnedRuntime(Option<Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    use datafusion::prelude::SessionContext;
    use futures::TryStreamExt;

    use super::QueryExecutor;

    /// A table of `batches` batches of one row each (column `n`: 0, 1, …) and a function
    /// `fail_at(n)` that panics on the row `n = 2`.
    fn session(batches: i64) -> SessionContext {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let data = (0..batches)
            .map(|n| {
                let column = Arc::new(Int64Array::from(vec![n]));
                RecordBatch::try_new(Arc::clone(&schema), vec![column]).unwrap()
            })
            .collect();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![data]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx.register_udf(create_udf(
            "fail_at",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Immutable,
            Arc::new(|args: &[ColumnarValue]| {
                let ColumnarValue::Array(array) = &args[0] else {
                    panic!("an array")
                };
                let values = array.as_any().downcast_ref::<Int64Array>().unwrap();
                assert!(values.iter().all(|v| v != Some(2)), "row 2");
                Ok(args[0].clone())
            }),
        ));
        ctx
    }

    #[tokio::test]
    async fn batches_arrive_from_the_executor() {
        let executor = QueryExecutor::dedicated(1, 0).unwrap();
        let df = session(5).sql("SELECT n FROM t").await.unwrap();
        let batches: Vec<RecordBatch> = executor
            .execute(df)
            .await
            .unwrap()
            .0
            .try_collect()
            .await
            .unwrap();
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 5);
    }

    /// A query whose task fails midway ends with an error: what came before it never
    /// passes for the whole result.
    #[tokio::test]
    async fn a_query_that_fails_midway_ends_with_an_error() {
        let executor = QueryExecutor::dedicated(1, 0).unwrap();
        let df = session(5).sql("SELECT fail_at(n) FROM t").await.unwrap();
        let (mut stream, _) = executor.execute(df).await.unwrap();
        let mut rows = 0;
        let error = loop {
            match stream.try_next().await {
                Ok(Some(batch)) => rows += batch.num_rows(),
                Ok(None) => panic!("the stream ended as if complete after {rows} rows"),
                Err(e) => break e,
            }
        };
        assert!(rows < 5, "{rows}");
        assert!(error.to_string().contains("panic"), "{error}");
    }
}

//! Ingest sources that run beside the listeners (Kafka consumers, MQTT sessions): each on
//! its own task until shutdown, with live figures for the status endpoints and metrics.

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinHandle;

/// The running sources of one kind and their figures.
pub struct Sources<S> {
    pub statuses: Vec<Arc<S>>,
    tasks: Vec<JoinHandle<()>>,
}

impl<S> Sources<S> {
    /// Runs each source (made already: a bad setting failed start-up) on its own task;
    /// a source that fails is logged as a `kind` source.
    pub fn spawn<T, F>(
        made: Vec<T>,
        kind: &'static str,
        status: impl Fn(&T) -> Arc<S>,
        run: impl Fn(T) -> F,
    ) -> Self
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let statuses = made.iter().map(status).collect();
        let tasks = made
            .into_iter()
            .map(|source| {
                let running = run(source);
                tokio::spawn(async move {
                    if let Err(e) = running.await {
                        tracing::error!(error = %e, "{kind} source failed");
                    }
                })
            })
            .collect();
        Self { statuses, tasks }
    }

    /// Waits for the sources to stop (after the shutdown signal): each finishes what it
    /// is writing and leaves its broker in order.
    pub async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

//! [`DeferredWorker`]: runs deferred invalidations, the second delete of a
//! delayed double-delete ([`Cache::invalidate_twice`](crate::Cache::invalidate_twice)).
//!
//! The queue lives in the store ([`DeferredQueue::defer_invalidate`](cachet_core::DeferredQueue::defer_invalidate)): on Redis it is a
//! pair of sorted sets per shard, so queued deletes survive the process that
//! queued them and any worker, in any process, runs them. A worker claims due
//! items with one script, deletes, then acknowledges; an item whose worker died
//! after claiming it is claimed again after the visibility timeout, so each runs
//! at least once (deleting twice is harmless).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet_core::{Capability, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Settings of a [`DeferredWorker`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeferredWorkerOptions {
    /// The most items claimed per store call (default 100).
    pub batch: usize,
    /// The longest pause between two polls of the queue when nothing is due
    /// sooner (default 100 ms): how late a delete queued by another process may run.
    pub idle_poll: Duration,
    /// The longest pause after a store error (default 1 s); pauses double from 10 ms.
    pub max_error_backoff: Duration,
}

impl Default for DeferredWorkerOptions {
    fn default() -> Self {
        Self {
            batch: 100,
            idle_poll: Duration::from_millis(100),
            max_error_backoff: Duration::from_secs(1),
        }
    }
}

/// A background task that runs a store's due deferred invalidations.
///
/// Run one (or more: they share the queue safely) in every deployment that
/// calls [`Cache::invalidate_twice`](crate::Cache::invalidate_twice); without a
/// worker the second deletes wait in the queue. Dropping the worker stops it;
/// [`shutdown`](Self::shutdown) stops it and waits for the current batch.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), cachet::Error> {
/// use std::time::Duration;
/// use cachet::{Cache, DeferredWorker, MemoryStore};
///
/// let store = MemoryStore::new(10_000);
/// let worker = DeferredWorker::spawn(store.clone());
/// let users: Cache<u64, String> = Cache::builder("users").memory(store).build()?;
/// users.set(&1, "Ada".into()).await?;
/// users.invalidate_twice(&1, Duration::from_millis(500)).await?;
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DeferredWorker {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    ran: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl DeferredWorker {
    /// Starts a worker with default options on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn(store: impl Store) -> Self {
        Self::spawn_with(store, DeferredWorkerOptions::default())
    }

    /// Starts a worker with the given options on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn_with(store: impl Store, options: DeferredWorkerOptions) -> Self {
        let (stop, stopped) = watch::channel(false);
        let ran = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            store,
            options,
            stopped,
            Arc::clone(&ran),
            Arc::clone(&errors),
        ));
        Self {
            stop,
            task: Some(task),
            ran,
            errors,
        }
    }

    /// Deferred invalidations this worker has run.
    pub fn ran(&self) -> u64 {
        self.ran.load(Ordering::Relaxed)
    }

    /// Store errors this worker has met (it retries after each).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Stops the worker and waits for it to finish its current batch.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DeferredWorker {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn run(
    store: impl Store,
    options: DeferredWorkerOptions,
    mut stopped: watch::Receiver<bool>,
    ran: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    let batch = options.batch.max(1);
    let mut backoff = FIRST_BACKOFF;
    let Some(queue) = store.deferred_queue() else {
        errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(store = ?store, "{}; the deferred worker stops",
            crate::Report(&Capability::DeferredQueue.missing()));
        return;
    };
    while !*stopped.borrow() {
        let pause = match queue.run_deferred(batch).await {
            Ok(done) => {
                backoff = FIRST_BACKOFF;
                ran.fetch_add(done.ran as u64, Ordering::Relaxed);
                if done.ran >= batch {
                    Duration::ZERO
                } else {
                    done.next_due_in
                        .unwrap_or(options.idle_poll)
                        .min(options.idle_poll)
                }
            }
            Err(e) => {
                errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %crate::Report(&e), "running deferred invalidations failed; retrying");
                let pause = backoff;
                backoff = (backoff * 2).min(options.max_error_backoff);
                pause
            }
        };
        if pause.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stopped.changed() => {}
        }
    }
}

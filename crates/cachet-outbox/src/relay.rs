//! [`Relay`]: delivers outbox rows to the store.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachet_core::retry::{Backoff, Clipped};
use cachet_core::{Store, StoreError, StoreKey};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::{Error, Outbox};

/// Invalidations of one batch in flight at once.
const CONCURRENCY: usize = 16;
/// First delay after a failure; it doubles up to the configured maximum.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two attempts to (re)connect the listener.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(30);
/// Time limit for connecting the listener and subscribing.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A listener connection that lived this long resets its reconnection backoff.
const LISTEN_HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Most buffered notifications folded into one wake-up.
const MAX_DRAIN: usize = 4096;

/// Delivers the rows of an [`Outbox`] to a [`Store`], at least once.
///
/// A batch is one transaction: lock up to [`batch_size`](Self::batch_size) rows
/// (`SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED`), invalidate each
/// distinct key, delete the rows, commit. If an invalidation fails, the
/// transaction rolls back and every row of the batch stays for the next attempt.
/// A row whose key does not parse as a [`StoreKey`] is logged at `error` level,
/// counted in [`RelayStats::malformed`] and deleted with its batch: it is never
/// retried forever.
///
/// Several relays on one table (in one process or many) share the work: `SKIP
/// LOCKED` gives each batch rows no other relay holds. A relay that dies before
/// its COMMIT leaves its rows to be delivered again, so a key may be invalidated
/// twice, which is harmless.
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`batch_size`](Self::batch_size) | 100 | most rows per batch (one transaction) |
/// | [`poll_interval`](Self::poll_interval) | 1 s | how often [`run`](Self::run) looks without a notification |
/// | [`max_backoff`](Self::max_backoff) | 10 s | longest pause after failed batches |
/// | [`batch_timeout`](Self::batch_timeout) | 30 s | time limit of one batch |
///
/// Cloning is cheap, and clones share their counters ([`stats`](Self::stats)).
#[derive(Clone)]
pub struct Relay {
    outbox: Outbox,
    pool: PgPool,
    store: Arc<dyn Store>,
    config: Config,
    counters: Arc<Counters>,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    batch_size: usize,
    poll_interval: Duration,
    max_backoff: Duration,
    batch_timeout: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    malformed: AtomicU64,
    failed_attempts: AtomicU64,
}

/// A snapshot of a [`Relay`]'s counters, from [`Relay::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows delivered: their key invalidated and the row deleted.
    pub delivered: u64,
    /// Rows deleted without delivery because their key does not parse.
    pub malformed: u64,
    /// Batches that failed (store or database error, timeout) and were rolled back.
    pub failed_attempts: u64,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("table", &self.outbox.table())
            .field("channel", &self.outbox.channel())
            .field("store", &self.store)
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay delivering `outbox`'s rows, read through `pool`, to `store`.
    ///
    /// `pool` must reach the primary (`FOR UPDATE` does not run on a replica).
    /// Each batch holds one of its connections for the batch's duration;
    /// [`run`](Self::run) also opens one connection of its own, outside the pool,
    /// for `LISTEN`.
    pub fn new(outbox: Outbox, pool: PgPool, store: Arc<dyn Store>) -> Self {
        Self {
            outbox,
            pool,
            store,
            config: Config {
                batch_size: 100,
                poll_interval: Duration::from_secs(1),
                max_backoff: Duration::from_secs(10),
                batch_timeout: Duration::from_secs(30),
            },
            counters: Arc::default(),
        }
    }

    /// Most rows per batch (default 100, at least 1).
    #[must_use]
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.config.batch_size = rows.max(1);
        self
    }

    /// How often [`run`](Self::run) looks for rows without being notified
    /// (default 1 s): the longest a row waits when its notification is lost, the
    /// listener is reconnecting, or the row was inserted without one. At least
    /// 10 ms.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The longest pause after failed batches (default 10 s). The pause starts at
    /// 100 ms and doubles with each failure in a row, with jitter.
    #[must_use]
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.config.max_backoff = max.max(MIN_BACKOFF);
        self
    }

    /// Time limit of one batch, store and database calls included (default
    /// 30 s). A batch that exceeds it is abandoned and rolled back.
    #[must_use]
    pub fn batch_timeout(mut self, timeout: Duration) -> Self {
        self.config.batch_timeout = timeout;
        self
    }

    /// The outbox this relay delivers.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// A snapshot of the counters, shared by all clones of this relay.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            delivered: self.counters.delivered.load(Ordering::Relaxed),
            malformed: self.counters.malformed.load(Ordering::Relaxed),
            failed_attempts: self.counters.failed_attempts.load(Ordering::Relaxed),
        }
    }

    /// Delivers one batch: returns how many rows it removed from the outbox
    /// (delivered or malformed), 0 when there was nothing to do (or every pending
    /// row is locked by another relay).
    ///
    /// # Errors
    /// When the database or the store fails, or the batch times out; the batch is
    /// then rolled back, its rows stay, and [`RelayStats::failed_attempts`] counts it.
    pub async fn deliver_once(&self) -> Result<usize, Error> {
        let outcome = match tokio::time::timeout(self.config.batch_timeout, self.batch()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::Timeout {
                table: self.outbox.table().to_owned(),
                after: self.config.batch_timeout,
            }),
        };
        if outcome.is_err() {
            self.counters
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    async fn batch(&self) -> Result<usize, Error> {
        let table = self.outbox.table();
        let sql = self.outbox.sql();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(Error::db(table, "starting a batch"))?;
        let limit = i64::try_from(self.config.batch_size).unwrap_or(i64::MAX);
        let rows: Vec<(i64, String)> = sqlx::query_as(&sql.select_batch)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::db(table, "locking a batch"))?;
        if rows.is_empty() {
            tx.commit()
                .await
                .map_err(Error::db(table, "ending an empty batch"))?;
            return Ok(0);
        }

        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let mut seen = HashSet::with_capacity(rows.len());
        let mut keys = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        for (id, raw) in &rows {
            match StoreKey::parse(raw) {
                Some(key) => {
                    if seen.insert(raw.as_str()) {
                        keys.push(key);
                    }
                }
                None => malformed.push((*id, raw.as_str())),
            }
        }

        if let Err(e) = self.invalidate_all(keys).await {
            // Roll back now, so that the rows are unlocked for the next attempt;
            // the error to report is the store's.
            let _ = tx.rollback().await;
            return Err(e);
        }
        sqlx::query(&sql.delete_batch)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(table, "deleting delivered rows"))?;
        tx.commit()
            .await
            .map_err(Error::db(table, "committing a batch"))?;

        for (id, raw) in &malformed {
            tracing::error!(
                table,
                id,
                store_key = %Clipped(raw),
                "outbox row with a malformed store key deleted without delivery"
            );
        }
        let bad = malformed.len();
        self.counters
            .malformed
            .fetch_add(bad as u64, Ordering::Relaxed);
        self.counters
            .delivered
            .fetch_add((rows.len() - bad) as u64, Ordering::Relaxed);
        tracing::debug!(
            table,
            rows = rows.len(),
            malformed = bad,
            "outbox batch delivered"
        );
        Ok(rows.len())
    }

    /// Invalidates every key, a few at a time; stops at the first failure.
    async fn invalidate_all(&self, keys: Vec<StoreKey>) -> Result<(), Error> {
        let mut pending = keys.into_iter();
        let mut running = JoinSet::new();
        // Each turn waits for one invalidation to finish: at most keys + 1 turns.
        loop {
            while running.len() < CONCURRENCY {
                let Some(key) = pending.next() else { break };
                let store = Arc::clone(&self.store);
                running.spawn(async move {
                    let result = store.invalidate(&key).await;
                    (key, result)
                });
            }
            let Some(joined) = running.join_next().await else {
                return Ok(());
            };
            let (key, source) = match joined {
                Ok((_, Ok(()))) => continue,
                Ok((key, Err(e))) => (key.to_string(), e),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => ("(cancelled)".to_owned(), StoreError::other(e)),
            };
            // Dropping the set aborts the invalidations still running.
            return Err(Error::Store {
                table: self.outbox.table().to_owned(),
                key,
                source,
            });
        }
    }

    /// Delivers batches until `shutdown` completes.
    ///
    /// After a batch it waits for a notification on the outbox's channel or for
    /// the poll interval, whichever comes first; after a full batch it goes on at
    /// once; after a failure it backs off (100 ms doubling to
    /// [`max_backoff`](Self::max_backoff)). The listener runs on its own
    /// connection and reconnects with bounded backoff when it breaks; whenever it
    /// (re)connects, the relay looks for rows, since notifications sent while it
    /// was away are lost. A lost notification or a broken listener only delays
    /// delivery to the next poll.
    ///
    /// Shutdown is honoured between batches: a batch in progress finishes first,
    /// which takes at most the [batch timeout](Self::batch_timeout). Failures are logged with
    /// `tracing` and counted in [`stats`](Self::stats); `run` itself never fails.
    /// Needs a Tokio runtime (it spawns the listener task, stopped when `run`
    /// returns).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let wake = Arc::new(Notify::new());
        let _listener = self.outbox.notifies().then(|| {
            AbortOnDrop(tokio::spawn(listen(
                self.outbox.clone(),
                listener_pool(&self.pool),
                Arc::clone(&wake),
            )))
        });
        let mut failures = Backoff::new(MIN_BACKOFF, self.config.max_backoff);
        let table = self.outbox.table();
        tracing::debug!(table, "outbox relay started");
        // Look at once on start, then after each pause.
        let (mut pause, mut wakeable) = (Duration::ZERO, false);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = wake.notified(), if wakeable => {}
                () = tokio::time::sleep(pause) => {}
            }
            // A batch runs to its end (bounded by the batch timeout) even when
            // shutdown comes meanwhile: what it committed is then also counted.
            (pause, wakeable) = match self.deliver_once().await {
                Ok(rows) if rows >= self.config.batch_size => {
                    failures.reset();
                    (Duration::ZERO, false)
                }
                Ok(_) => {
                    failures.reset();
                    (self.config.poll_interval, true)
                }
                Err(e) => {
                    let pause = failures.next_pause();
                    tracing::warn!(table, error = %cachet_core::Report(&e), retry_in = ?pause, "outbox delivery failed");
                    (pause, false)
                }
            };
        }
        tracing::debug!(table, "outbox relay stopped");
    }
}

/// A one-connection pool with the options of `pool`, for the listener, so that
/// `LISTEN` does not hold one of the application's connections.
fn listener_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(LISTEN_TIMEOUT)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Listens on the outbox's channel and wakes the relay, reconnecting with
/// bounded backoff. Runs until aborted.
async fn listen(outbox: Outbox, pool: PgPool, wake: Arc<Notify>) {
    let (table, channel) = (outbox.table(), outbox.channel());
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_LISTEN_BACKOFF);
    // Each turn connects once and ends with a pause of at least MIN_BACKOFF.
    loop {
        let connected = tokio::time::timeout(LISTEN_TIMEOUT, async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.ignore_pool_close_event(true);
            // Reconnections go through the backoff below, not straight back.
            listener.eager_reconnect(false);
            listener.listen(channel).await?;
            Ok::<_, sqlx::Error>(listener)
        })
        .await;
        match connected {
            Ok(Ok(mut listener)) => {
                let since = Instant::now();
                tracing::debug!(table, channel, "outbox relay listening");
                // Rows committed before LISTEN took effect sent their
                // notifications to nobody: look once now.
                wake.notify_one();
                let failure = loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => {
                            let mut drained = 0;
                            while drained < MAX_DRAIN && listener.next_buffered().is_some() {
                                drained += 1;
                            }
                            wake.notify_one();
                        }
                        Ok(None) => break None,
                        Err(e) => break Some(e),
                    }
                };
                match failure {
                    None => tracing::warn!(
                        table,
                        channel,
                        "outbox listener lost its connection; polling until it reconnects"
                    ),
                    Some(e) => tracing::warn!(table, channel, error = %cachet_core::Report(&e),
                        "outbox listener failed; polling until it reconnects"),
                }
                if since.elapsed() >= LISTEN_HEALTHY_AFTER {
                    backoff.reset();
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(table, channel, error = %cachet_core::Report(&e),
                    "outbox listener cannot connect; polling meanwhile");
            }
            Err(_) => {
                tracing::warn!(table, channel, timeout = ?LISTEN_TIMEOUT,
                    "outbox listener did not connect in time; polling meanwhile");
            }
        }
        tokio::time::sleep(backoff.next_pause()).await;
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

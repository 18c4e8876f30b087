//! [`Flusher`]: applies queued writes to the source of truth.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{BoxError, CacheKey, StoreKey};
use cachet_core::retry::{Backoff, Clipped};
use cachet_core::ttl_millis;
use cachet_redis::RedisConnection;
use redis::Value;
use tokio::time::Instant;

use super::write::unexpected;
use super::{Error, WriteBehind, scripts};

/// First pause after a failed round; it doubles up to the configured maximum.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// After a refused batch, writes tried alone that fail in a row, none having
/// succeeded, before the round stops: the sink is failing, not the writes.
const MAX_SOLO_FAILURES: usize = 3;
/// Longest sink error kept in a dead letter's reason.
const MAX_REASON: usize = 500;
/// Most entries per read: `XACK`/`XDEL` take them as script arguments.
const MAX_BATCH: usize = 1000;

/// One write as the sink receives it: the key, the value's version in the
/// source of truth, and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Write<K, V> {
    /// The key, as the cache's key type owns it.
    pub key: K,
    /// The value's version, from `version_by`.
    pub version: u64,
    /// The value.
    pub value: V,
}

impl<K, V> Write<K, V> {
    /// A write of `value` at `version` under `key`.
    pub fn new(key: K, version: u64, value: V) -> Self {
        Self {
            key,
            version,
            value,
        }
    }
}

/// Where a [`Flusher`] applies writes: the source of truth.
///
/// [`apply`](Self::apply) must write the whole batch in one transaction (all
/// or nothing), and **idempotently by version**: a write whose version is not
/// newer than the row's changes nothing. A batch is applied at least once: a
/// flusher that dies after the sink committed and before it acknowledged the
/// batch leaves it to be applied again, and batches of one key can arrive out
/// of order (a retried batch after a newer one). On PostgreSQL:
///
/// ```sql
/// INSERT INTO items AS t (id, version, value)
/// SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[])
/// ON CONFLICT (id) DO UPDATE SET version = excluded.version, value = excluded.value
/// WHERE t.version < excluded.version
/// ```
///
/// A batch holds at most one write per key (the flusher coalesced it).
///
/// Implement it with `async fn`:
///
/// ```
/// use cachet::BoxError;
/// use cachet::write_behind::{Sink, Write};
///
/// struct Log;
///
/// impl Sink<u64, String> for Log {
///     async fn apply(&self, batch: &[Write<u64, String>]) -> Result<(), BoxError> {
///         for w in batch {
///             println!("{} = {:?} (version {})", w.key, w.value, w.version);
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Sink<K: CacheKey + ?Sized, V>: Send + Sync + 'static {
    /// Applies one batch in one transaction, idempotently by version.
    fn apply(
        &self,
        batch: &[Write<K::Owned, V>],
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Whether `error` (from [`apply`](Self::apply)) is transient, such as a
    /// lost connection: a failure for a reason that is not the batch's.
    /// Transient failures do not count towards `max_attempts`, so an outage of
    /// the source of truth, however long, sends nothing to the dead-letter
    /// stream. Return `true` only for errors that no write can cause, or a
    /// write that always fails would be retried forever. The default: `false`.
    fn is_transient(&self, error: &BoxError) -> bool {
        let _ = error;
        false
    }
}

/// A snapshot of a [`Flusher`]'s counters, from [`Flusher::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlusherStats {
    /// Stream entries acknowledged and deleted after the sink applied them,
    /// or applied a newer version of their key in the same batch.
    pub flushed: u64,
    /// Of those, entries not handed to the sink because a newer write of
    /// their key was in the same batch.
    pub coalesced: u64,
    /// Successful sink calls.
    pub batches: u64,
    /// Entries moved to the dead-letter stream: refused by the sink on their
    /// `max_attempts`-th delivery or later, claimed after more than
    /// `max_deliveries` deliveries, or malformed.
    pub dead_lettered: u64,
    /// Failed sink calls (errors and timeouts).
    pub sink_errors: u64,
    /// Entries claimed after sitting pending for the minimum idle time: left
    /// by a flusher that died, or by a failed batch.
    pub reclaimed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    flushed: AtomicU64,
    coalesced: AtomicU64,
    batches: AtomicU64,
    dead_lettered: AtomicU64,
    sink_errors: AtomicU64,
    reclaimed: AtomicU64,
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug)]
struct Config {
    batch_size: usize,
    block: Duration,
    min_idle: Duration,
    max_attempts: u64,
    max_deliveries: u64,
    max_backoff: Duration,
    sink_timeout: Duration,
    prune_idle: Duration,
}

/// Configures a [`Flusher`]. Start with [`WriteBehind::flusher`].
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`consumer`](Self::consumer) | `flusher-{pid}-{random}` | this flusher's name in the consumer group; unique per flusher |
/// | [`group`](Self::group) | `flushers` | the consumer group, shared by the flushers of one sink |
/// | [`batch_size`](Self::batch_size) | 100 | most entries read (and claimed) at once |
/// | [`block`](Self::block) | 1 s | how long a read waits for new writes |
/// | [`min_idle`](Self::min_idle) | 30 s | how long an entry stays pending before another round or flusher claims it |
/// | [`max_attempts`](Self::max_attempts) | 5 | deliveries after which a write the sink refuses is dead-lettered |
/// | [`max_deliveries`](Self::max_deliveries) | 20 | deliveries after which an entry is dead-lettered untried (it crashes its flushers) |
/// | [`max_backoff`](Self::max_backoff) | 10 s | longest pause after failed rounds |
/// | [`sink_timeout`](Self::sink_timeout) | 30 s | time limit of one sink call |
/// | [`prune_idle`](Self::prune_idle) | 10 min | idle time after which a consumer without pending entries is deleted |
#[must_use = "a builder does nothing until .connect() is called"]
pub struct FlusherBuilder<K: ?Sized + ToOwned, V, S> {
    wb: WriteBehind<K, V>,
    sink: S,
    consumer: Option<String>,
    group: String,
    config: Config,
}

impl<K: ?Sized + ToOwned, V, S> fmt::Debug for FlusherBuilder<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlusherBuilder")
            .field("stream", &self.wb.inner.stream)
            .field("sink", &std::any::type_name::<S>())
            .field("consumer", &self.consumer)
            .field("group", &self.group)
            .field("config", &self.config)
            .finish()
    }
}

impl<K: ?Sized + ToOwned, V, S> FlusherBuilder<K, V, S> {
    pub(crate) fn new(wb: WriteBehind<K, V>, sink: S) -> Self {
        Self {
            wb,
            sink,
            consumer: None,
            group: "flushers".to_owned(),
            config: Config {
                batch_size: 100,
                block: Duration::from_secs(1),
                min_idle: Duration::from_secs(30),
                max_attempts: 5,
                max_deliveries: 20,
                max_backoff: Duration::from_secs(10),
                sink_timeout: Duration::from_secs(30),
                prune_idle: Duration::from_secs(600),
            },
        }
    }

    /// This flusher's consumer name; each running flusher needs its own.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// The consumer group (default `flushers`). Flushers in one group share
    /// the writes: each is applied by one of them (more than one only after a
    /// claim). Two groups would each apply every write.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        self.group = name.into();
        self
    }

    /// Most entries read, or claimed, at once (default 100; 1 to 1000).
    pub fn batch_size(mut self, entries: usize) -> Self {
        self.config.batch_size = entries.clamp(1, MAX_BATCH);
        self
    }

    /// How long a read in [`run`](Flusher::run) waits for new writes (default
    /// 1 s, at least 1 ms). Shutdown is noticed between rounds, so this also
    /// bounds how long it takes.
    pub fn block(mut self, block: Duration) -> Self {
        self.config.block = block.max(Duration::from_millis(1));
        self
    }

    /// How long an entry stays pending, unacknowledged, before it is claimed
    /// again (default 30 s): by another flusher when its flusher died, by any
    /// flusher after its batch failed. Keep it above the longest a sink call
    /// takes ([`sink_timeout`](Self::sink_timeout)), or a slow batch is applied
    /// twice (harmlessly, the sink being idempotent).
    pub fn min_idle(mut self, min_idle: Duration) -> Self {
        self.config.min_idle = min_idle;
        self
    }

    /// Deliveries after which a write the sink refuses is a poison write
    /// (default 5, at least 1): when the sink refuses it, alone in its batch, on
    /// its `max_attempts`-th delivery or later, it goes to the dead-letter
    /// stream. Failures the sink calls [transient](Sink::is_transient) do not
    /// count; deliveries cut short by a flusher's crash do (nothing is
    /// dead-lettered without a refusal, though).
    pub fn max_attempts(mut self, attempts: u64) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// Deliveries after which an entry goes to the dead-letter stream when
    /// claimed, without being tried again (default 20, at least
    /// `max_attempts`): an entry that keeps being claimed and never
    /// acknowledged nor refused probably crashes or stalls the flushers that
    /// take it. Keep it well above the number of flusher crashes an entry may
    /// live through.
    pub fn max_deliveries(mut self, deliveries: u64) -> Self {
        self.config.max_deliveries = deliveries.max(1);
        self
    }

    /// The longest pause after failed rounds (default 10 s). The pause starts
    /// at 100 ms and doubles with each failure in a row, with jitter.
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.config.max_backoff = max.max(MIN_BACKOFF);
        self
    }

    /// Time limit of one sink call (default 30 s). A call that exceeds it
    /// counts as failed; its entries stay pending.
    pub fn sink_timeout(mut self, timeout: Duration) -> Self {
        self.config.sink_timeout = timeout;
        self
    }

    /// How long a consumer of the group must have been idle, without pending
    /// entries, before a flusher deletes it (default 10 min): flushers that
    /// stopped leave their names behind otherwise, one per restart.
    pub fn prune_idle(mut self, idle: Duration) -> Self {
        self.config.prune_idle = idle;
        self
    }
}

impl<K, V, S> FlusherBuilder<K, V, S>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    /// Opens the flusher's own connection to the Redis server at `url` (the
    /// write-behind's server) and creates the consumer group if needed, reading
    /// from the start of the stream, so that writes queued before any flusher
    /// ran are not skipped.
    ///
    /// The flusher needs a connection of its own: a blocking `XREADGROUP` holds
    /// its connection until it returns. It connects within the store's
    /// connection timeout ([`RedisStoreBuilder::connection_timeout`](crate::RedisStoreBuilder::connection_timeout)),
    /// retries included. TLS is as the URL's scheme asks, with the system's
    /// roots: for a CA or a client certificate of the store's, use
    /// [`connect_store`](Self::connect_store).
    ///
    /// # Errors
    /// When the URL is invalid or Redis cannot be reached in time.
    pub async fn connect(self, url: &str) -> Result<Flusher<K, V, S>, Error> {
        let conn = self
            .wb
            .inner
            .store
            .connection_to(url, self.response_timeout())
            .await
            .map_err(|e| self.connect_err(e))?;
        self.with_connection(conn).await
    }

    /// Connects the flusher to the server of the write-behind's
    /// [`RedisStore`](crate::RedisStore), on a connection of its own, with the
    /// store's TLS settings (its CA and client certificate): the way to run a
    /// flusher against a server whose certificate the system does not trust,
    /// or that asks for a client certificate. On a store built with
    /// [`RedisStore::sentinel_builder`](crate::RedisStore::sentinel_builder),
    /// the flusher's connection finds the primary through the sentinels and
    /// follows it across failovers, as the store's own does.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn connect_store(self) -> Result<Flusher<K, V, S>, Error> {
        let conn = self
            .wb
            .inner
            .store
            .own_connection(self.response_timeout())
            .await
            .map_err(|e| self.connect_err(e))?;
        self.with_connection(conn).await
    }

    /// The flusher connection's response timeout: a blocking read takes up
    /// to `block`; scripts and acknowledgements are quick.
    fn response_timeout(&self) -> Duration {
        self.config.block + Duration::from_secs(5)
    }

    fn connect_err(&self, e: cachet_core::StoreError) -> Error {
        Error::Redis {
            stream: self.wb.inner.stream.clone(),
            action: "connecting the flusher",
            key: None,
            source: Box::new(e),
        }
    }

    async fn with_connection(self, conn: RedisConnection) -> Result<Flusher<K, V, S>, Error> {
        let mut config = self.config;
        config.max_deliveries = config.max_deliveries.max(config.max_attempts);
        let consumer = self.consumer.unwrap_or_else(|| {
            format!(
                "flusher-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            )
        });
        let flusher = Flusher {
            inner: Arc::new(Inner {
                wb: self.wb,
                sink: self.sink,
                conn,
                group: self.group,
                consumer,
                config,
                counters: Counters::default(),
                schedule: Mutex::new(Schedule {
                    retry_own: false,
                    cursor: "0-0".to_owned(),
                    next_claim: Instant::now(),
                    next_prune: Instant::now(),
                }),
            }),
        };
        flusher.create_group().await?;
        Ok(flusher)
    }
}

/// Applies the writes of a [`WriteBehind`] stream to a [`Sink`], at least
/// once, in batches coalesced per key. See the [module docs](crate::write_behind#flushing).
///
/// Cloning is cheap; clones share the connection and the counters.
pub struct Flusher<K: ?Sized + ToOwned, V, S> {
    inner: Arc<Inner<K, V, S>>,
}

struct Inner<K: ?Sized + ToOwned, V, S> {
    wb: WriteBehind<K, V>,
    sink: S,
    conn: RedisConnection,
    group: String,
    consumer: String,
    config: Config,
    counters: Counters,
    schedule: Mutex<Schedule>,
}

/// When the next claim and prune are due, and where the claim scan is.
#[derive(Debug)]
struct Schedule {
    /// Whether the next round takes this flusher's own entries again first.
    retry_own: bool,
    cursor: String,
    next_claim: Instant,
    next_prune: Instant,
}

impl<K: ?Sized + ToOwned, V, S> Clone for Flusher<K, V, S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: ?Sized + ToOwned, V, S> fmt::Debug for Flusher<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner;
        f.debug_struct("Flusher")
            .field("stream", &s.wb.inner.stream)
            .field("group", &s.group)
            .field("consumer", &s.consumer)
            .field("sink", &std::any::type_name::<S>())
            .field("config", &s.config)
            .field("counters", &s.counters)
            .finish()
    }
}

/// A stream entry as read.
struct RawEntry {
    id: String,
    /// `None`: deleted from the stream while pending.
    fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// An entry with the number of times it was delivered, including this time.
struct Delivered {
    id: String,
    deliveries: u64,
}

/// The writes of one key in a batch: the newest is handed to the sink, all
/// are acknowledged with it.
struct KeyWrites {
    skey: StoreKey,
    entries: Vec<Delivered>,
}

/// A batch, coalesced: `writes[i]` is the newest write of `keys[i]`.
struct Batch<K, V> {
    writes: Vec<Write<K, V>>,
    keys: Vec<KeyWrites>,
}

impl<K, V, S> Flusher<K, V, S>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: Sink<K, V>,
{
    /// This flusher's consumer name.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.inner.sink
    }

    /// A snapshot of the counters, shared by all clones of this flusher.
    pub fn stats(&self) -> FlusherStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FlusherStats {
            flushed: get(&c.flushed),
            coalesced: get(&c.coalesced),
            batches: get(&c.batches),
            dead_lettered: get(&c.dead_lettered),
            sink_errors: get(&c.sink_errors),
            reclaimed: get(&c.reclaimed),
        }
    }

    fn stream(&self) -> &str {
        &self.inner.wb.inner.stream
    }

    fn conn(&self) -> RedisConnection {
        self.inner.conn.clone()
    }

    async fn create_group(&self) -> Result<(), Error> {
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream())
            .arg(&self.inner.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(Error::redis(
                &self.inner.conn,
                self.stream(),
                "creating the consumer group",
                None,
            )(e)),
            _ => Ok(()),
        }
    }

    /// One round, without waiting for new writes: takes again the entries
    /// this flusher holds after a transient sink failure, claims entries
    /// pending for the minimum idle time (when a claim is due), reads new
    /// ones, applies them, acknowledges what was applied. Returns how many
    /// entries left the stream (applied, coalesced or dead-lettered).
    ///
    /// # Errors
    /// When Redis fails, or the sink fails ([`Error::Sink`]): the entries not
    /// applied stay pending; after a [transient](Sink::is_transient) failure
    /// the next round takes them again, after a refusal they are claimed again
    /// after the minimum idle time.
    pub async fn flush_once(&self) -> Result<usize, Error> {
        self.round(None).await
    }

    /// Flushes until `shutdown` completes.
    ///
    /// Each round takes again the entries this flusher holds after a round
    /// that failed for a reason not theirs (a transient sink failure, a Redis
    /// error), claims entries pending for the minimum idle time (when a
    /// claim is due: every half minimum idle time, and at once while a claim
    /// scan has more), reads up to `batch_size` new entries (waiting up to
    /// [`block`](FlusherBuilder::block) for some), applies them, and
    /// acknowledges them. After a failed round it backs off (100 ms doubling to
    /// [`max_backoff`](FlusherBuilder::max_backoff), with jitter).
    ///
    /// Shutdown is honoured between rounds: a round in progress finishes
    /// first, within `block` plus its sink calls (each within
    /// [`sink_timeout`](FlusherBuilder::sink_timeout)). Failures are
    /// logged with `tracing` and counted in [`stats`](Self::stats); `run`
    /// itself never fails.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failures = Backoff::new(MIN_BACKOFF, self.inner.config.max_backoff);
        let mut pause = Duration::ZERO;
        tracing::debug!(
            stream = self.stream(),
            consumer = self.consumer(),
            "flusher started"
        );
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(pause) => {}
            }
            pause = match self.round(Some(self.inner.config.block)).await {
                Ok(_) => {
                    failures.reset();
                    Duration::ZERO
                }
                Err(e) => {
                    if matches!(e, Error::Redis { .. }) {
                        // Entries may have been delivered to this flusher
                        // in a reply it never got.
                        self.retry_own_later();
                    }
                    let pause = failures.next_pause();
                    tracing::warn!(stream = self.stream(), consumer = self.consumer(),
                        error = %cachet_core::Report(&e), retry_in = ?pause, "write-behind flush failed");
                    pause
                }
            };
        }
        tracing::debug!(
            stream = self.stream(),
            consumer = self.consumer(),
            "flusher stopped"
        );
    }

    async fn round(&self, block: Option<Duration>) -> Result<usize, Error> {
        self.maybe_prune().await;
        let mut removed = 0;
        let mut block = block;
        if self.take_retry_own() {
            let (n, more) = self.claim(Claim::Own).await?;
            removed += n;
            if more {
                self.retry_own_later();
                block = None;
            }
        }
        if let Some(cursor) = self.claim_due() {
            let (n, more) = self.claim(Claim::Idle(&cursor)).await?;
            removed += n;
            if more {
                // More to claim right away: do not wait for new writes.
                block = None;
            }
        }
        let entries = self.read(block).await?;
        if !entries.is_empty() {
            removed += self
                .apply_batch(entries.into_iter().map(|e| (e, 1)).collect())
                .await?;
        }
        Ok(removed)
    }

    /// After a failure that was not the writes' (a transient sink error, a
    /// Redis error): the entries this flusher holds are taken again at the
    /// next round, after the backoff, not left for the minimum idle time.
    fn retry_own_later(&self) {
        self.inner
            .schedule
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retry_own = true;
    }

    /// Whether the entries this flusher holds are to be taken again now.
    fn take_retry_own(&self) -> bool {
        std::mem::take(
            &mut self
                .inner
                .schedule
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retry_own,
        )
    }

    /// The claim cursor, when a claim is due.
    fn claim_due(&self) -> Option<String> {
        let schedule = self
            .inner
            .schedule
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (schedule.cursor != "0-0" || Instant::now() >= schedule.next_claim)
            .then(|| schedule.cursor.clone())
    }

    fn claim_done(&self, next: String) -> bool {
        let mut schedule = self
            .inner
            .schedule
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let more = next != "0-0";
        if !more {
            let every = (self.inner.config.min_idle / 2)
                .clamp(Duration::from_millis(10), Duration::from_secs(30));
            schedule.next_claim = Instant::now() + every;
        }
        schedule.cursor = next;
        more
    }

    /// Deletes idle consumers without pending entries, when due. Failures
    /// are logged: pruning is housekeeping.
    async fn maybe_prune(&self) {
        {
            let mut schedule = self
                .inner
                .schedule
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if now < schedule.next_prune {
                return;
            }
            let every = (self.inner.config.prune_idle / 2)
                .clamp(Duration::from_secs(1), Duration::from_secs(300));
            schedule.next_prune = now + every;
        }
        let pruned: Result<u64, _> = scripts::PRUNE
            .key(self.stream())
            .arg(&self.inner.group)
            .arg(&self.inner.consumer)
            .arg(u64::try_from(self.inner.config.prune_idle.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.conn())
            .await;
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                stream = self.stream(),
                deleted = n,
                "deleted idle consumers without pending entries"
            ),
            Err(e) => tracing::debug!(stream = self.stream(), error = %cachet_core::Report(&e),
                "could not prune idle consumers"),
        }
    }

    /// Claims entries pending for the minimum idle time (or, for
    /// [`Claim::Own`], those this flusher holds), dead-letters those
    /// delivered too often, and applies the others.
    /// Returns how many left the stream, and whether there are more to take.
    async fn claim(&self, what: Claim<'_>) -> Result<(usize, bool), Error> {
        let c = &self.inner.config;
        let (mut invocation, doing) = match what {
            Claim::Idle(_) => (scripts::CLAIM.prepare_invoke(), "claiming idle entries"),
            Claim::Own => (
                scripts::RETRY_OWN.prepare_invoke(),
                "taking its entries again",
            ),
        };
        invocation
            .key(self.stream())
            .key(&self.inner.wb.inner.dead)
            .arg(&self.inner.group)
            .arg(&self.inner.consumer);
        if let Claim::Idle(cursor) = what {
            invocation
                .arg(u64::try_from(c.min_idle.as_millis()).unwrap_or(u64::MAX))
                .arg(cursor);
        }
        invocation.arg(c.batch_size).arg(c.max_deliveries);
        let reply: Result<Value, _> = invocation.invoke_async(&mut self.conn()).await;
        let reply = match reply {
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group().await?;
                if let Claim::Idle(_) = what {
                    self.claim_done("0-0".to_owned());
                }
                return Ok((0, false));
            }
            other => other.map_err(Error::redis(&self.inner.conn, self.stream(), doing, None))?,
        };
        let (next, live, counts, dead) = parse_claim(reply).map_err(Error::redis(
            &self.inner.conn,
            self.stream(),
            doing,
            None,
        ))?;
        let taken = live.len() + dead.len() / 4;
        let more = match what {
            Claim::Idle(_) => {
                add(&self.inner.counters.reclaimed, taken);
                self.claim_done(next)
            }
            Claim::Own => taken >= c.batch_size,
        };
        let mut removed = 0;
        for d in dead.chunks(4) {
            let text = |v: &Value| match v {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::Int(n) => n.to_string(),
                other => format!("{other:?}"),
            };
            tracing::error!(
                stream = self.stream(),
                id = %text(&d[0]),
                store_key = %Clipped(&text(&d[1])),
                version = %text(&d[2]),
                deliveries = %text(&d[3]),
                dead_letters = %self.inner.wb.inner.dead,
                "poison write moved to the dead-letter stream: delivered more than max_deliveries \
                 times, never acknowledged"
            );
            removed += 1;
        }
        add(&self.inner.counters.dead_lettered, removed);
        if !live.is_empty() {
            let delivered = live.into_iter().zip(counts).collect();
            removed += self.apply_batch(delivered).await?;
        }
        Ok((removed, more))
    }

    /// Reads new entries: `XREADGROUP … >`, waiting up to `block` if given.
    async fn read(&self, block: Option<Duration>) -> Result<Vec<RawEntry>, Error> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.inner.group)
            .arg(&self.inner.consumer)
            .arg("COUNT")
            .arg(self.inner.config.batch_size);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(ttl_millis(block));
        }
        cmd.arg("STREAMS").arg(self.stream()).arg(">");
        match cmd.query_async::<Value>(&mut self.conn()).await {
            Ok(reply) => parse_read(reply).map_err(Error::redis(
                &self.inner.conn,
                self.stream(),
                "reading new entries",
                None,
            )),
            // The stream and its group were deleted (a Redis without
            // persistence restarted, say): writes queued since are in a new
            // stream, and a group reading it from the start gets them all.
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(Error::redis(
                &self.inner.conn,
                self.stream(),
                "reading new entries",
                None,
            )(e)),
        }
    }

    /// Applies a batch, all at once; if the sink refuses it, one key at a
    /// time, so that a write the sink refuses fails alone and the others go
    /// through. Returns how many entries left the stream.
    async fn apply_batch(&self, delivered: Vec<(RawEntry, u64)>) -> Result<usize, Error> {
        let (batch, mut removed) = self.prepare(delivered).await?;
        if batch.writes.is_empty() {
            return Ok(removed);
        }
        let source = match self.apply(&batch.writes).await {
            Ok(()) => return Ok(removed + self.acknowledge(&batch.writes, &batch.keys).await?),
            Err((source, true)) => {
                // Not the writes' fault: this delivery was no attempt.
                self.recount(batch.keys.iter()).await?;
                self.retry_own_later();
                return Err(self.sink_error(batch.writes.len(), source));
            }
            Err((source, false)) if batch.writes.len() == 1 => {
                self.refused(&batch.writes[0], &batch.keys[0], &source)
                    .await?;
                return Err(self.sink_error(1, source));
            }
            Err((source, false)) => source,
        };
        let mut last = source;
        let (mut succeeded, mut failed, mut failed_in_row) = (0, 0, 0);
        for i in 0..batch.writes.len() {
            if succeeded == 0 && failed_in_row >= MAX_SOLO_FAILURES {
                // Every write fails alone too: the sink is failing, not the
                // writes. Those not tried had no attempt.
                self.recount(batch.keys[i..].iter()).await?;
                break;
            }
            let one = std::slice::from_ref(&batch.writes[i]);
            match self.apply(one).await {
                Ok(()) => {
                    succeeded += 1;
                    failed_in_row = 0;
                    removed += self
                        .acknowledge(one, std::slice::from_ref(&batch.keys[i]))
                        .await?;
                }
                Err((source, true)) => {
                    self.recount(batch.keys[i..].iter()).await?;
                    self.retry_own_later();
                    failed += 1;
                    last = source;
                    break;
                }
                Err((source, false)) => {
                    removed += self
                        .refused(&batch.writes[i], &batch.keys[i], &source)
                        .await?;
                    failed += 1;
                    failed_in_row += 1;
                    last = source;
                }
            }
        }
        if failed == 0 {
            // The batch failed as a whole, every write alone went through.
            return Ok(removed);
        }
        Err(self.sink_error(failed, last))
    }

    fn sink_error(&self, writes: usize, source: BoxError) -> Error {
        Error::Sink {
            stream: self.stream().to_owned(),
            writes,
            source,
        }
    }

    /// After the sink refused `write` alone: on the key's `max_attempts`-th
    /// delivery or later, its entries go to the dead-letter stream; before,
    /// they stay pending, to be claimed again. Returns how many left.
    async fn refused(
        &self,
        write: &Write<K::Owned, V>,
        key: &KeyWrites,
        error: &BoxError,
    ) -> Result<usize, Error> {
        let deliveries = key.entries.iter().map(|e| e.deliveries).max().unwrap_or(0);
        let max = self.inner.config.max_attempts;
        if deliveries < max {
            return Ok(0);
        }
        let s = &self.inner.wb.inner;
        let mut error = error.to_string();
        if let Some((at, _)) = error.char_indices().nth(MAX_REASON) {
            error.truncate(at);
        }
        let reason = format!(
            "poison: refused by the sink on delivery {deliveries} (max_attempts {max}): {error}"
        );
        tracing::error!(stream = %s.stream, store_key = %Clipped(key.skey.as_str()),
            version = write.version, deliveries, error = %Clipped(&error),
            dead_letters = %s.dead, "poison write moved to the dead-letter stream");
        self.dead_letter(
            key.entries.iter().map(|e| (e, reason.as_str())),
            "dead-lettering a poison write",
        )
        .await
    }

    /// Decodes entries and coalesces them per key; malformed ones go to the
    /// dead-letter stream at once (they would fail every time). Returns the
    /// batch and how many entries were dead-lettered or were already gone.
    async fn prepare(
        &self,
        delivered: Vec<(RawEntry, u64)>,
    ) -> Result<(Batch<K::Owned, V>, usize), Error> {
        let mut batch = Batch {
            writes: Vec::new(),
            keys: Vec::new(),
        };
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut malformed = Vec::new();
        let mut gone = Vec::new();
        for (raw, deliveries) in delivered {
            let Some(fields) = &raw.fields else {
                gone.push(raw.id);
                continue;
            };
            let entry = Delivered {
                id: raw.id.clone(),
                deliveries,
            };
            match self.decode(fields) {
                Ok((skey, write)) => match index.get(skey.as_str()) {
                    Some(&i) => {
                        if write.version >= batch.writes[i].version {
                            batch.writes[i] = write;
                        }
                        batch.keys[i].entries.push(entry);
                    }
                    None => {
                        index.insert(skey.as_str().to_owned(), batch.writes.len());
                        batch.writes.push(write);
                        batch.keys.push(KeyWrites {
                            skey,
                            entries: vec![entry],
                        });
                    }
                },
                Err(reason) => malformed.push((entry, reason)),
            }
        }
        let mut removed = 0;
        if !gone.is_empty() {
            // Deleted while pending: nothing to apply; drop them from the
            // pending list.
            let _: i64 = redis::cmd("XACK")
                .arg(self.stream())
                .arg(&self.inner.group)
                .arg(&gone)
                .query_async(&mut self.conn())
                .await
                .map_err(Error::redis(
                    &self.inner.conn,
                    self.stream(),
                    "acknowledging deleted entries",
                    None,
                ))?;
            removed += gone.len();
        }
        if !malformed.is_empty() {
            removed += self.dead_letter_malformed(&malformed).await?;
        }
        Ok((batch, removed))
    }

    fn decode(
        &self,
        fields: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(StoreKey, Write<K::Owned, V>), String> {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(f, _)| f == name.as_bytes())
                .map(|(_, v)| v.as_slice())
                .ok_or_else(|| format!("malformed: no {name} field"))
        };
        let raw_key = std::str::from_utf8(field("key")?)
            .map_err(|_| "malformed: the key is not UTF-8".to_owned())?;
        let skey = StoreKey::parse(raw_key)
            .ok_or_else(|| "malformed: the key is not a store key".to_owned())?;
        let key = K::decode_key(skey.user_key())
            .ok_or_else(|| "malformed: the key does not decode to the key type".to_owned())?;
        let version = std::str::from_utf8(field("version")?)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| "malformed: the version is not a number".to_owned())?;
        let value = self
            .inner
            .wb
            .inner
            .codec
            .decode(field("value")?)
            .map_err(|e| format!("malformed: the value does not decode: {e}"))?;
        Ok((skey, Write::new(key, version, value)))
    }

    async fn dead_letter_malformed(&self, entries: &[(Delivered, String)]) -> Result<usize, Error> {
        let s = &self.inner.wb.inner;
        for (entry, reason) in entries {
            tracing::error!(stream = %s.stream, id = %entry.id, reason = %Clipped(reason),
                dead_letters = %s.dead, "malformed write moved to the dead-letter stream");
        }
        self.dead_letter(
            entries.iter().map(|(e, reason)| (e, reason.as_str())),
            "dead-lettering malformed entries",
        )
        .await
    }

    /// Moves `entries` to the dead-letter stream, each with its reason, in one
    /// script call; counts and returns how many were still there to move.
    async fn dead_letter<'a>(
        &self,
        entries: impl Iterator<Item = (&'a Delivered, &'a str)>,
        doing: &'static str,
    ) -> Result<usize, Error> {
        let s = &self.inner.wb.inner;
        let mut invocation = scripts::DEAD_LETTER.key(&s.stream);
        invocation
            .key(&s.dead)
            .arg(&self.inner.group)
            .arg(&self.inner.consumer);
        for (entry, reason) in entries {
            invocation.arg(&entry.id).arg(entry.deliveries).arg(reason);
        }
        let moved: usize = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(Error::redis(&self.inner.conn, &s.stream, doing, None))?;
        add(&self.inner.counters.dead_lettered, moved);
        Ok(moved)
    }

    /// Calls the sink with a time limit; on failure, the error and whether it
    /// is transient.
    async fn apply(&self, writes: &[Write<K::Owned, V>]) -> Result<(), (BoxError, bool)> {
        let limit = self.inner.config.sink_timeout;
        let outcome = match tokio::time::timeout(limit, self.inner.sink.apply(writes)).await {
            Ok(Ok(())) => {
                add(&self.inner.counters.batches, 1);
                return Ok(());
            }
            Ok(Err(e)) => {
                let transient = self.inner.sink.is_transient(&e);
                (e, transient)
            }
            Err(_) => (
                format!("the sink did not finish within {limit:?}").into(),
                false,
            ),
        };
        add(&self.inner.counters.sink_errors, 1);
        tracing::warn!(stream = self.stream(), writes = writes.len(), error = %outcome.0,
            transient = outcome.1, "the sink failed; the writes stay pending and are retried");
        Err(outcome)
    }

    /// After the sink applied `writes`: acknowledges and deletes their
    /// entries, and drops older cache entries and leases of their keys (one
    /// script). Returns how many entries left the stream.
    async fn acknowledge(
        &self,
        writes: &[Write<K::Owned, V>],
        keys: &[KeyWrites],
    ) -> Result<usize, Error> {
        let mut invocation = scripts::ACK.key(self.stream());
        for k in keys {
            invocation.key(k.skey.as_str()).key(k.skey.lease_key());
        }
        invocation
            .arg(&self.inner.group)
            .arg(&self.inner.wb.inner.bus)
            .arg(keys.len());
        for w in writes {
            invocation.arg(&w.version.to_be_bytes()[..]);
        }
        let mut ids = 0;
        for k in keys {
            for e in &k.entries {
                invocation.arg(&e.id);
                ids += 1;
            }
        }
        let _: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(Error::redis(
                &self.inner.conn,
                self.stream(),
                "acknowledging a flushed batch",
                None,
            ))?;
        add(&self.inner.counters.flushed, ids);
        add(&self.inner.counters.coalesced, ids - writes.len());
        Ok(ids)
    }

    /// Gives entries back the delivery count they had before this delivery,
    /// which did not count as an attempt.
    async fn recount<'a>(&self, keys: impl Iterator<Item = &'a KeyWrites>) -> Result<(), Error> {
        let mut invocation = scripts::RECOUNT.key(self.stream());
        invocation.arg(&self.inner.group).arg(&self.inner.consumer);
        for k in keys {
            for e in &k.entries {
                invocation.arg(&e.id).arg(e.deliveries.saturating_sub(1));
            }
        }
        let _: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(Error::redis(
                &self.inner.conn,
                self.stream(),
                "restoring delivery counts",
                None,
            ))?;
        Ok(())
    }
}

/// What [`Flusher::claim`] takes.
#[derive(Clone, Copy, Debug)]
enum Claim<'a> {
    /// Entries of any consumer idle for the minimum idle time, scanning from
    /// this cursor.
    Idle(&'a str),
    /// The entries this flusher holds.
    Own,
}

/// Entries of an `XRANGE`-shaped reply: `[[id, [field, value, …]], …]`.
fn entries_of(reply: Value) -> redis::RedisResult<Vec<RawEntry>> {
    let items = match reply {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(unexpected("stream entries", &other)),
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(pair) = item else {
                return Err(unexpected("stream entry", &item));
            };
            let mut pair = pair.into_iter();
            let (Some(Value::BulkString(id)), Some(fields)) = (pair.next(), pair.next()) else {
                return Err(unexpected("stream entry", &Value::Nil));
            };
            let fields = match fields {
                Value::Nil => None,
                Value::Array(flat) => {
                    let mut out = Vec::with_capacity(flat.len() / 2);
                    let mut flat = flat.into_iter();
                    while let (Some(f), Some(v)) = (flat.next(), flat.next()) {
                        match (f, v) {
                            (Value::BulkString(f), Value::BulkString(v)) => out.push((f, v)),
                            (f, _) => return Err(unexpected("stream field", &f)),
                        }
                    }
                    Some(out)
                }
                Value::Map(pairs) => {
                    let mut out = Vec::with_capacity(pairs.len());
                    for pair in pairs {
                        match pair {
                            (Value::BulkString(f), Value::BulkString(v)) => out.push((f, v)),
                            (f, _) => return Err(unexpected("stream field", &f)),
                        }
                    }
                    Some(out)
                }
                other => return Err(unexpected("stream fields", &other)),
            };
            Ok(RawEntry {
                id: String::from_utf8_lossy(&id).into_owned(),
                fields,
            })
        })
        .collect()
}

/// Entries of an `XREADGROUP` reply on one stream: nil, or
/// `[[stream, entries]]` (a map in RESP3).
fn parse_read(reply: Value) -> redis::RedisResult<Vec<RawEntry>> {
    match reply {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::new();
            for s in streams {
                let Value::Array(pair) = s else {
                    return Err(unexpected("XREADGROUP", &s));
                };
                if let Some(entries) = pair.into_iter().nth(1) {
                    out.extend(entries_of(entries)?);
                }
            }
            Ok(out)
        }
        Value::Map(streams) => {
            let mut out = Vec::new();
            for (_, entries) in streams {
                out.extend(entries_of(entries)?);
            }
            Ok(out)
        }
        other => Err(unexpected("XREADGROUP", &other)),
    }
}

type Claimed = (String, Vec<RawEntry>, Vec<u64>, Vec<Value>);

/// The `CLAIM` script's reply: next cursor, live entries, their delivery
/// counts, dead-lettered entries (flat, four values each).
fn parse_claim(reply: Value) -> redis::RedisResult<Claimed> {
    let Value::Array(parts) = reply else {
        return Err(unexpected("claim", &reply));
    };
    let mut parts = parts.into_iter();
    let (Some(Value::BulkString(next)), Some(live), Some(counts), Some(dead)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unexpected("claim", &Value::Nil));
    };
    let live = entries_of(live)?;
    let counts: Vec<u64> = match counts {
        Value::Array(c) => c
            .into_iter()
            .map(|v| match v {
                Value::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
                other => Err(unexpected("delivery count", &other)),
            })
            .collect::<Result<_, _>>()?,
        Value::Nil => Vec::new(),
        other => return Err(unexpected("delivery counts", &other)),
    };
    let dead = match dead {
        Value::Array(d) => d,
        Value::Nil => Vec::new(),
        other => return Err(unexpected("dead letters", &other)),
    };
    if counts.len() != live.len() || dead.len() % 4 != 0 {
        return Err(unexpected("claim", &Value::Nil));
    }
    Ok((
        String::from_utf8_lossy(&next).into_owned(),
        live,
        counts,
        dead,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_reads_in_resp2_and_resp3() {
        let entry = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("key"), bulk("k"), bulk("version"), bulk("3")]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![entry.clone()]),
        ])]);
        let got = parse_read(resp2).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "1-0");
        assert_eq!(got[0].fields.as_ref().unwrap()[1].1, b"3");
        let resp3 = Value::Map(vec![(bulk("s"), Value::Array(vec![entry]))]);
        assert_eq!(parse_read(resp3).unwrap().len(), 1);
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        assert!(parse_read(Value::Int(3)).is_err());
        let deleted = Value::Array(vec![Value::Array(vec![bulk("2-0"), Value::Nil])]);
        assert!(entries_of(deleted).unwrap()[0].fields.is_none());
    }

    #[test]
    fn malformed_claim_replies_are_errors() {
        assert!(parse_claim(Value::Nil).is_err());
        let mismatched = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![Value::Array(vec![bulk("1-0"), Value::Array(vec![])])]),
            Value::Array(vec![]),
            Value::Array(vec![]),
        ]);
        assert!(parse_claim(mismatched).is_err());
        let empty = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Array(vec![]),
        ]);
        let (next, live, counts, dead) = parse_claim(empty).unwrap();
        assert_eq!(
            (next.as_str(), live.len(), counts.len(), dead.len()),
            ("0-0", 0, 0, 0)
        );
    }
}

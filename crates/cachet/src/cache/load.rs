//! Loading: under a lease, in a task of its own, with timeouts, fail-safe and
//! background refreshes.
//!
//! A load always runs in a spawned task that owns the in-process flight of its
//! key, so that it completes and fills even when every caller waiting for it
//! has gone (cancelled, or served a stale value after the soft timeout).

use std::borrow::Borrow;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet_core::{AcquireMode, CacheKey, Fill, FillOf, LeaseToken, StoreKey};

use super::inner::{Claim, Inner, Lookup};
use crate::Error;
use crate::error::BoxError;
use crate::flight::{Leader, Outcome, Role};
use crate::metrics::Histogram;
use tracing::Instrument as _;

/// Acquire attempts in one load that may come without a pause (after a
/// corrupt entry, the next one replaces it), on top of one a millisecond,
/// the shortest pause, for the whole `lease_wait` (see [`max_acquire_rounds`]).
const ROUNDS_WITHOUT_PAUSE: usize = 64;
/// First and largest pause while another process holds the lease. The
/// largest is small: a waiter sees the holder's fill at most this long after
/// it lands, and only one caller per key and process polls.
const FIRST_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(8);

/// The most acquire attempts in one load: the wait for another process's
/// lease ends at the `lease_wait` deadline, and a round that waits pauses at
/// least a millisecond, so the bound only stops a store that misbehaves.
fn max_acquire_rounds(lease_wait: Duration) -> usize {
    usize::try_from(lease_wait.as_millis())
        .unwrap_or(usize::MAX)
        .saturating_add(ROUNDS_WITHOUT_PAUSE)
}

/// A value the cache may serve instead of a failed load, and how far past its
/// soft expiry it is.
pub(crate) type Fallback<V> = Option<(Option<V>, Duration)>;

/// How the load of one flight goes about it.
pub(crate) struct LoadPlan<V> {
    pub(crate) mode: AcquireMode,
    /// False when the store just failed: load without caching.
    pub(crate) store_up: bool,
    pub(crate) hard_timeout: Option<Duration>,
    pub(crate) fallback: Fallback<V>,
}

impl<K, V> Inner<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs the load of a flight this caller leads in a task of its own, and
    /// publishes its outcome to the flight.
    pub(crate) fn spawn_load<F, Fut, E>(
        self: &Arc<Self>,
        key: &K,
        skey: StoreKey,
        plan: LoadPlan<V>,
        loader: F,
        leader: Leader<V>,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let inner = Arc::clone(self);
        let key = key.to_owned();
        tokio::spawn(async move {
            let key: &K = key.borrow();
            let outcome = inner
                .load(
                    key,
                    &skey,
                    plan.mode,
                    plan.store_up,
                    plan.hard_timeout,
                    loader,
                )
                .await;
            let outcome = match (outcome, plan.fallback) {
                (Err(e), Some((value, past)))
                    if (e.is_load() || e.is_timeout()) && inner.s.fresh.fail_safe_allows(past) =>
                {
                    inner.counters.fail_safe_serves.inc();
                    inner.throttle(&skey, value.clone());
                    // Once a second per cache: in an outage of the source, every
                    // hot key fails over within one throttle period.
                    if let Some(held_back) =
                        inner.fail_safe_warnings.allow(inner.s.clock.coarse_ms())
                    {
                        tracing::warn!(cache = inner.namespace(), key = skey.user_key(), error = %crate::Report(&e),
                            stale_for = ?past, held_back, "load failed; serving the last value (fail-safe)");
                    }
                    Ok(value)
                }
                (outcome, _) => outcome,
            };
            leader.finish(&outcome);
        });
    }

    /// Refreshes a present entry in the background (stale-while-revalidate,
    /// refresh-ahead, early refresh): at most one refresh per key in this
    /// process, and none while another process holds the key's lease. The fill
    /// is lease-guarded like any other, so an invalidation during the refresh wins.
    ///
    /// `seen` is the soft expiry of the entry that prompted the refresh: if the
    /// entry has a later one by the time the task runs, another process
    /// refreshed it and this refresh is skipped.
    pub(crate) fn spawn_refresh<F, Fut, E>(
        self: &Arc<Self>,
        key: &K,
        skey: StoreKey,
        seen: u64,
        loader: F,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let Role::Leader(leader) = self.flights.join(skey.as_str()) else {
            return; // A load or refresh of this key is already running here.
        };
        let inner = Arc::clone(self);
        let key = key.to_owned();
        tokio::spawn(async move {
            let key: &K = key.borrow();
            // Another process may have refreshed it since this one saw it.
            if inner.refreshed_since(key, &skey, seen).await {
                return;
            }
            match inner.acquire(key, &skey, AcquireMode::Replace).await {
                Ok(Claim::Leased(token)) => {
                    // The lease may be free because another process's refresh
                    // just filled (and consumed its lease) after the check
                    // above: look again, under the lease, before loading.
                    if inner.refreshed_since(key, &skey, seen).await {
                        inner.release(key, &skey, &token).await;
                        return;
                    }
                    inner.counters.refreshes.inc();
                    let outcome = inner
                        .load_and_fill(key, &skey, token, inner.s.hard_timeout, loader)
                        .await;
                    if let Err(e) = &outcome {
                        tracing::debug!(cache = inner.namespace(), key = skey.user_key(), error = %crate::Report(&e),
                            "background refresh failed; the entry stays until it expires");
                    }
                    leader.finish(&outcome);
                }
                // Another process is refreshing it; dropping the flight lets any
                // caller that joined it start over.
                Ok(_) => {}
                Err(e) => {
                    inner.counters.store_errors.inc();
                    tracing::debug!(cache = inner.namespace(), key = skey.user_key(), error = %crate::Report(&e),
                        "background refresh could not take the lease");
                }
            }
        });
    }

    /// Whether `key`'s entry is fresh with a later soft expiry than `seen`: some
    /// process refreshed it since this one saw it.
    async fn refreshed_since(&self, key: &K, skey: &StoreKey, seen: u64) -> bool {
        matches!(self.lookup(key, skey, false).await,
            Lookup::Fresh(_, meta) if meta.soft_expiry_ms > seen)
    }

    /// Loads a missing value under a lease (or, with the store down, without).
    pub(crate) async fn load<F, Fut, E>(
        &self,
        key: &K,
        skey: &StoreKey,
        mut mode: AcquireMode,
        store_up: bool,
        hard_timeout: Option<Duration>,
        loader: F,
    ) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        if !store_up {
            return self.load_unfilled(skey, hard_timeout, loader).await;
        }
        let deadline = tokio::time::Instant::now() + self.s.lease_wait;
        let mut backoff = FIRST_BACKOFF;
        let mut wait = LeaseWait {
            histogram: &self.histograms.lease_wait,
            since: None,
        };
        for _ in 0..max_acquire_rounds(self.s.lease_wait) {
            let claim = match self.acquire(key, skey, mode).await {
                Ok(claim) => claim,
                Err(e) => {
                    self.counters.store_errors.inc();
                    self.warn_store("taking a lease failed; loading without caching", skey, &e);
                    return self.load_unfilled(skey, hard_timeout, loader).await;
                }
            };
            match claim {
                Claim::Hit(v) => return Ok(v),
                Claim::Corrupt => mode = AcquireMode::Replace,
                Claim::Leased(token) => {
                    wait.end();
                    return self
                        .load_and_fill(key, skey, token, hard_timeout, loader)
                        .await;
                }
                Claim::Busy(expires_in) => {
                    if wait.since.is_none() {
                        self.counters.lease_waits.inc();
                        wait.since = Some(Instant::now());
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        self.counters.lease_wait_timeouts.inc();
                        wait.end();
                        return self.load_unfilled(skey, hard_timeout, loader).await;
                    }
                    let mut pause = backoff.min(deadline - now);
                    if let Some(left) = expires_in {
                        // No point sleeping past the holder's lease expiry.
                        pause = pause.min(left.max(Duration::from_millis(1)));
                    }
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // The holder has probably filled by now; a plain read is cheaper
                    // than another acquire.
                    match self.lookup(key, skey, false).await {
                        Lookup::Fresh(v, _) | Lookup::Stale(v, _) => return Ok(v),
                        Lookup::Missing { corrupt: true } => mode = AcquireMode::Replace,
                        Lookup::Missing { corrupt: false } | Lookup::Expired(..) => {}
                        Lookup::Failed(e) => {
                            self.warn_store(
                                "store read failed while waiting for a lease; loading without caching",
                                skey,
                                &e,
                            );
                            wait.end();
                            return self.load_unfilled(skey, hard_timeout, loader).await;
                        }
                    }
                }
            }
        }
        if wait.since.is_some() {
            // Out of rounds (a store whose leases keep expiring at once): as
            // much a wait that gave up.
            self.counters.lease_wait_timeouts.inc();
        }
        wait.end();
        self.load_unfilled(skey, hard_timeout, loader).await
    }

    /// Calls the loader within the hard timeout, timing it, in a
    /// `cachet.load` span (see [`span`]).
    async fn call<F, Fut, E>(
        &self,
        skey: &StoreKey,
        hard_timeout: Option<Duration>,
        loader: F,
    ) -> Result<(Option<V>, Duration), Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let span = span("cachet.load", self.namespace(), skey);
        let called = self
            .call_timed(skey, hard_timeout, loader)
            .instrument(span.clone())
            .await;
        span.record(
            "outcome",
            match &called {
                Ok((Some(_), _)) => "found",
                Ok((None, _)) => "not_found",
                Err(e) if e.kind() == crate::ErrorKind::Timeout => "timeout",
                Err(_) => "error",
            },
        );
        called
    }

    /// Calls a loader (of one key's value, or of a batch's) within the hard
    /// timeout, catching its panics, timing and counting it; `skey` names the
    /// key (a batch's first) in errors.
    pub(crate) async fn call_timed<T, F, Fut, E>(
        &self,
        skey: &StoreKey,
        hard_timeout: Option<Duration>,
        loader: F,
    ) -> Result<(T, Duration), Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let started = Instant::now();
        let loaded = match hard_timeout {
            None => unwound(loader).await,
            Some(limit) => match tokio::time::timeout(limit, unwound(loader)).await {
                Ok(loaded) => loaded,
                Err(_) => {
                    self.histograms.load.observe(started.elapsed());
                    self.counters.load_timeouts.inc();
                    return Err(Error::timeout(self.namespace(), skey.user_key(), limit));
                }
            },
        };
        let took = started.elapsed();
        self.histograms.load.observe(took);
        match loaded {
            Ok(Ok(value)) => {
                self.counters.loads.inc();
                Ok((value, took))
            }
            Ok(Err(e)) => {
                self.counters.load_errors.inc();
                Err(Error::load(self.namespace(), skey.user_key(), e.into()))
            }
            Err(panic) => {
                self.counters.load_errors.inc();
                let message = match panic.downcast_ref::<&str>() {
                    Some(s) => (*s).to_owned(),
                    None => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
                };
                tracing::error!(cache = self.namespace(), key = skey.user_key(), panic = %message,
                    "the loader panicked");
                Err(Error::with_message(
                    crate::ErrorKind::Load,
                    self.namespace(),
                    Some(skey.user_key()),
                    format!("the loader panicked: {message}"),
                ))
            }
        }
    }

    pub(crate) async fn load_and_fill<F, Fut, E>(
        &self,
        key: &K,
        skey: &StoreKey,
        token: LeaseToken,
        hard_timeout: Option<Duration>,
        loader: F,
    ) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let mut lease = LeaseGuard {
            inner: self,
            key,
            skey,
            token,
            armed: true,
        };
        let loaded = self.call(skey, hard_timeout, loader).await;
        lease.armed = false;
        let (value, load_time) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                self.release(key, skey, &token).await;
                return Err(e);
            }
        };
        self.fill_loaded(key, skey, token, &value, load_time).await;
        Ok(value)
    }

    /// Caches a loaded value under the lease `token` (or releases the lease,
    /// when the expiry policy keeps the value out or the fill fails).
    pub(crate) async fn fill_loaded(
        &self,
        key: &K,
        skey: &StoreKey,
        token: LeaseToken,
        value: &Option<V>,
        load_time: Duration,
    ) {
        let Some((meta, ttl)) = self.placement(key, value.as_ref(), load_time) else {
            // The expiry policy keeps it out (a "not found" without negative caching).
            self.release(key, skey, &token).await;
            return;
        };
        let span = span("cachet.fill", self.namespace(), skey);
        let filled = (self.fill(key, skey, &token, meta, value, ttl))
            .instrument(span.clone())
            .await;
        span.record(
            "outcome",
            match filled {
                Ok(Fill::Filled) => "filled",
                Ok(Fill::Refused) => "refused",
                Err(()) => "failed",
            },
        );
        match filled {
            Ok(Fill::Filled) => self.counters.fills.inc(),
            Ok(Fill::Refused) => {
                self.counters.refused_fills.inc();
                // A lease revoked by a write is gone already (the release is
                // a no-op), but a fill refused because the key's group moved
                // on leaves it in place: other loads would wait it out.
                self.release(key, skey, &token).await;
            }
            // The store just failed: the caller has its value, and does not
            // wait on the store again for the release.
            Err(()) => self.release_soon(key, skey, token),
        }
    }

    /// [`fill_loaded`](Self::fill_loaded) for the keys of a batch load: on a
    /// shared store the fills go as one batch call (on Redis one script per
    /// hash slot); a key whose value the policy keeps out, or that cannot be
    /// encoded, releases its lease instead.
    pub(crate) async fn fill_loaded_many(
        &self,
        loaded: Vec<(&K, &StoreKey, LeaseToken, &Option<V>)>,
        load_time: Duration,
    ) {
        if self.fills_key_by_key() {
            for (key, skey, token, value) in loaded {
                self.fill_loaded(key, skey, token, value, load_time).await;
            }
            return;
        }
        let mut ready = Vec::with_capacity(loaded.len());
        let mut fills = Vec::with_capacity(loaded.len());
        for (key, skey, token, value) in loaded {
            let entry = self
                .placement(key, value.as_ref(), load_time)
                .map(|(meta, ttl)| (self.entry_for(skey, meta, value.as_ref()), ttl));
            match entry {
                Some((Ok(entry), ttl)) => {
                    fills.push((entry, ttl));
                    ready.push((key, skey, token));
                }
                Some((Err(e), _)) => {
                    tracing::error!(error = %crate::Report(&e),
                        "the loaded value is returned but not cached");
                    self.release(key, skey, &token).await;
                }
                // The expiry policy keeps it out (a "not found" without
                // negative caching).
                None => self.release(key, skey, &token).await,
            }
        }
        if ready.is_empty() {
            return;
        }
        let batch: Vec<FillOf<'_>> = ready
            .iter()
            .zip(fills)
            .map(|((_, skey, token), (entry, ttl))| FillOf {
                key: skey,
                lease: token,
                entry,
                ttl,
            })
            .collect();
        let span = span("cachet.fill", self.namespace(), ready[0].1);
        let filled = self
            .s
            .store
            .fill_many(&batch)
            .instrument(span.clone())
            .await;
        span.record("outcome", if filled.is_ok() { "batch" } else { "failed" });
        drop(batch);
        let filled = match filled {
            Ok(filled) => filled.into_iter().map(Some).collect(),
            Err(e) => {
                self.counters.store_errors.inc();
                self.warn_store(
                    "fill failed; the values are returned but not cached",
                    ready[0].1,
                    &e,
                );
                vec![None; ready.len()]
            }
        };
        for ((key, skey, token), filled) in ready.into_iter().zip(filled) {
            match filled {
                Some(Fill::Filled) => self.counters.fills.inc(),
                Some(Fill::Refused) => {
                    self.counters.refused_fills.inc();
                    self.release(key, skey, &token).await;
                }
                None => self.release(key, skey, &token).await,
            }
        }
    }

    async fn load_unfilled<F, Fut, E>(
        &self,
        skey: &StoreKey,
        hard_timeout: Option<Duration>,
        loader: F,
    ) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        self.call(skey, hard_timeout, loader).await.map(|(v, _)| v)
    }
}

/// A span for one load or fill, at debug level: the cache, a hash of the key
/// (keys may hold personal data; the hash still tells one key's spans from
/// another's), and the outcome, recorded when it ends (`found`, `not_found`,
/// `error`, `timeout` for a load; `filled`, `refused`, `failed` for a fill).
pub(crate) fn span(name: &'static str, cache: &str, key: &StoreKey) -> tracing::Span {
    use tracing::field::Empty;
    let span = match name {
        "cachet.fill" => {
            tracing::debug_span!("cachet.fill", cache, key_hash = Empty, outcome = Empty)
        }
        _ => tracing::debug_span!("cachet.load", cache, key_hash = Empty, outcome = Empty),
    };
    if !span.is_disabled() {
        let hash = xxhash_rust::xxh3::xxh3_64(key.as_str().as_bytes());
        span.record("key_hash", format!("{hash:016x}"));
    }
    span
}

/// A wait for another caller's lease, timed into
/// `cachet_lease_wait_duration_seconds` when it ends: explicitly before a load,
/// or when the wait returns what the holder filled.
struct LeaseWait<'a> {
    histogram: &'a Histogram,
    since: Option<Instant>,
}

impl LeaseWait<'_> {
    fn end(&mut self) {
        if let Some(since) = self.since.take() {
            self.histogram.observe(since.elapsed());
        }
    }
}

impl Drop for LeaseWait<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// Calls `loader` and runs its future, catching a panic in either: a loader
/// that panics fails its flight like one that returns an error, and never
/// unwinds into the cache or its callers.
async fn unwound<F, Fut, T>(loader: F) -> Result<T, Box<dyn std::any::Any + Send>>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T>,
{
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let mut load = Box::pin(catch_unwind(AssertUnwindSafe(loader))?);
    std::future::poll_fn(
        |cx| match catch_unwind(AssertUnwindSafe(|| load.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        },
    )
    .await
}

/// Releases a lease if the load holding it is dropped before it ends (its task
/// was aborted by a runtime shutdown), so that others need not wait for its TTL.
struct LeaseGuard<'a, K, V>
where
    K: CacheKey + ?Sized + 'static,
    V: Clone + Send + Sync + 'static,
{
    inner: &'a Inner<K, V>,
    key: &'a K,
    skey: &'a StoreKey,
    token: LeaseToken,
    armed: bool,
}

impl<K, V> Drop for LeaseGuard<'_, K, V>
where
    K: CacheKey + ?Sized + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if self.armed {
            self.inner.release_soon(self.key, self.skey, self.token);
        }
    }
}

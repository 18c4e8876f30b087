//! Store outages: a circuit breaker in front of a shared store, and
//! invalidations kept for retry while the store is unreachable.
//!
//! When the store stops answering, every operation would pay the response
//! timeout before falling back to the source of truth. After a few consecutive
//! failures the breaker *opens*: operations fail at once (reads fall through to
//! the loader immediately) until a cooldown has passed; then one operation probes
//! the store, and its success closes the breaker. Recovery therefore takes at
//! most a cooldown after the store is back.
//!
//! An invalidation that cannot reach the store is reported to its caller, and
//! also kept in this process (up to a bound) and retried until it goes through:
//! an entry that the store still holds after the outage must not outlive the
//! write that invalidated it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use cachet_core::{
    Acquire, AcquireMode, BloomKey, BusEvent, Clock, Deferred, Entry, Fill, GroupKey, LeaseToken,
    PayloadKind, Read, Store, StoreError, StoreFuture, StoreKey, Ttls, Versioned,
};
use parking_lot::Mutex;

/// Settings of the circuit breaker, for [`CacheBuilder::circuit_breaker`](crate::CacheBuilder::circuit_breaker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitBreaker {
    /// Consecutive failures (unreachable or timed out) that open the breaker.
    pub failures: u32,
    /// How long the breaker stays open before a probe.
    pub cooldown: Duration,
    /// The most invalidations kept for retry; beyond it, the oldest entries
    /// are left to their TTL (and counted).
    pub max_pending_invalidations: usize,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failures: 3,
            cooldown: Duration::from_millis(500),
            max_pending_invalidations: 10_000,
        }
    }
}

impl CircuitBreaker {
    /// A breaker that opens after `failures` consecutive failures for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            failures: failures.max(1),
            cooldown,
            ..Self::default()
        }
    }
}

/// What the breaker counted, for `Stats`.
#[derive(Debug, Default)]
pub(crate) struct BreakerCounts {
    pub(crate) opens: AtomicU64,
    pub(crate) short_circuits: AtomicU64,
    pub(crate) retried_invalidations: AtomicU64,
    pub(crate) dropped_invalidations: AtomicU64,
}

/// A [`Store`] behind a circuit breaker.
#[derive(Debug)]
pub(crate) struct Guarded {
    inner: Arc<dyn Store>,
    settings: CircuitBreaker,
    clock: Clock,
    failures: AtomicU32,
    /// 0 when closed; else the Unix ms after which one probe may pass.
    open_until: AtomicU64,
    pending: Mutex<HashSet<StoreKey>>,
    pub(crate) counts: BreakerCounts,
}

impl Guarded {
    /// Wraps `inner`, and starts the retry of kept invalidations on the current
    /// tokio runtime (if there is one).
    pub(crate) fn new(inner: Arc<dyn Store>, settings: CircuitBreaker, clock: Clock) -> Arc<Self> {
        let guarded = Arc::new(Self {
            inner,
            settings,
            clock,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            pending: Mutex::new(HashSet::new()),
            counts: BreakerCounts::default(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(retry_invalidations(Arc::downgrade(&guarded)));
        }
        guarded
    }

    /// Whether an operation may go to the store now.
    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.clock.coarse_ms();
        if now < until {
            return false;
        }
        // Half open: one caller probes; the others wait another cooldown.
        let next = now.saturating_add(millis(self.settings.cooldown));
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn record<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => {
                self.failures.store(0, Ordering::Release);
                self.open_until.store(0, Ordering::Release);
            }
            Err(e) if e.is_outage() => {
                let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= self.settings.failures {
                    let until = self
                        .clock
                        .coarse_ms()
                        .saturating_add(millis(self.settings.cooldown));
                    if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                        self.counts.opens.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(store = ?self.inner, "store unreachable; skipping it for {:?} at a time",
                            self.settings.cooldown);
                    }
                }
            }
            // The store answered: it is up, even if the answer is an error.
            Err(_) => self.failures.store(0, Ordering::Release),
        }
    }

    fn open_error(&self) -> StoreError {
        self.counts.short_circuits.fetch_add(1, Ordering::Relaxed);
        StoreError::new(
            cachet_core::StoreErrorKind::Unavailable,
            "circuit breaker open: the store failed repeatedly",
        )
    }

    /// Runs one store operation through the breaker.
    fn guard<'a, T: Send + 'a>(&'a self, op: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
        if !self.allow() {
            return Box::pin(std::future::ready(Err(self.open_error())));
        }
        Box::pin(async move {
            let result = op.await;
            self.record(&result);
            result
        })
    }

    fn keep(&self, key: &StoreKey) {
        let mut pending = self.pending.lock();
        if pending.len() >= self.settings.max_pending_invalidations {
            self.counts
                .dropped_invalidations
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(key = %key, "too many invalidations waiting for the store; this one is left to the entry's TTL");
            return;
        }
        pending.insert(key.clone());
    }

    /// Invalidations waiting for the store.
    pub(crate) fn pending(&self) -> usize {
        self.pending.lock().len()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Retries kept invalidations while the store is reachable, until the store
/// wrapper is dropped.
async fn retry_invalidations(guarded: Weak<Guarded>) {
    const PERIOD: Duration = Duration::from_millis(100);
    loop {
        tokio::time::sleep(PERIOD).await;
        let Some(g) = guarded.upgrade() else {
            return;
        };
        let batch: Vec<StoreKey> = g.pending.lock().iter().take(256).cloned().collect();
        for key in batch {
            if !g.allow() {
                break;
            }
            let done = g.inner.invalidate(&key).await;
            g.record(&done);
            if done.is_ok() {
                g.pending.lock().remove(&key);
                g.counts
                    .retried_invalidations
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                break;
            }
        }
    }
}

impl Store for Guarded {
    fn payload_kind(&self) -> PayloadKind {
        self.inner.payload_kind()
    }

    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read> {
        self.guard(self.inner.get(key))
    }

    fn get_now(&self, key: &StoreKey) -> Option<Read> {
        self.inner.get_now(key)
    }

    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        self.guard(self.inner.acquire(key, mode, lease_ttl))
    }

    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill> {
        self.guard(self.inner.fill(key, lease, entry, ttl))
    }

    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool> {
        self.guard(self.inner.release(key, lease))
    }

    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let result = self.guard(self.inner.set(key, entry, ttl)).await;
            if result.is_err() {
                // The old value may still be there: make sure it goes.
                self.keep(key);
            }
            result
        })
    }

    fn set_versioned<'a>(
        &'a self,
        key: &'a StoreKey,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Versioned> {
        Box::pin(async move {
            let result = self.guard(self.inner.set_versioned(key, entry, ttl)).await;
            if result.is_err() {
                self.keep(key);
            }
            result
        })
    }

    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let result = self.guard(self.inner.invalidate(key)).await;
            if result.is_err() {
                self.keep(key);
            }
            result
        })
    }

    fn ttl<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Ttls> {
        self.guard(self.inner.ttl(key))
    }

    fn invalidate_group<'a>(&'a self, group: &'a GroupKey) -> StoreFuture<'a, ()> {
        self.guard(self.inner.invalidate_group(group))
    }

    fn subscribe_invalidations<'a>(
        &'a self,
        head: &'a str,
    ) -> StoreFuture<'a, tokio::sync::mpsc::Receiver<BusEvent>> {
        self.inner.subscribe_invalidations(head)
    }

    fn defer_invalidate<'a>(&'a self, key: &'a StoreKey, delay: Duration) -> StoreFuture<'a, ()> {
        self.guard(self.inner.defer_invalidate(key, delay))
    }

    fn run_deferred(&self, max: usize) -> StoreFuture<'_, Deferred> {
        self.guard(self.inner.run_deferred(max))
    }

    fn bloom_check<'a>(
        &'a self,
        filter: &'a BloomKey,
        positions: &'a [u64],
    ) -> StoreFuture<'a, bool> {
        self.guard(self.inner.bloom_check(filter, positions))
    }

    fn bloom_add<'a>(&'a self, filter: &'a BloomKey, positions: &'a [u64]) -> StoreFuture<'a, ()> {
        self.guard(self.inner.bloom_add(filter, positions))
    }

    fn bloom_replace<'a>(&'a self, filter: &'a BloomKey, bits: Bytes) -> StoreFuture<'a, ()> {
        self.guard(self.inner.bloom_replace(filter, bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn opens_after_failures_and_probes_after_the_cooldown() {
        let mock = Clock::mock();
        let g = Guarded::new(
            Arc::new(MemoryStore::new(10)),
            CircuitBreaker::new(2, Duration::from_millis(500)),
            mock.clock(),
        );
        let fail = || Err::<(), _>(StoreError::timeout(Duration::from_millis(1)));
        g.record(&fail());
        assert!(g.allow());
        g.record(&fail());
        assert!(!g.allow(), "open after two failures");
        assert_eq!(g.counts.opens.load(Ordering::Relaxed), 1);
        mock.advance(Duration::from_millis(500));
        assert!(g.allow(), "one probe");
        assert!(!g.allow(), "only one");
        g.record(&Ok(()));
        assert!(g.allow(), "closed after a success");
        // Errors that come from a store that answered do not count.
        for _ in 0..5 {
            g.record(&Err::<(), _>(StoreError::protocol("odd")));
        }
        assert!(g.allow());
    }
}

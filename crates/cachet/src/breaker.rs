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

use cachet_core::{Clock, Layered, Op, Store, StoreError, StoreFuture, StoreKey, StoreLayer};
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
pub(crate) type Guarded = Layered<Breaker>;

/// The circuit breaker: a [`StoreLayer`] that fails calls at once while the
/// store is out, and keeps the invalidations that failed.
#[derive(Debug)]
pub(crate) struct Breaker {
    /// The guarded store, for logs.
    store: String,
    settings: CircuitBreaker,
    clock: Clock,
    failures: AtomicU32,
    /// 0 when closed; else the Unix ms after which one probe may pass.
    open_until: AtomicU64,
    pending: Mutex<HashSet<StoreKey>>,
    pub(crate) counts: BreakerCounts,
}

/// Wraps `inner` in a circuit breaker, and starts the retry of kept
/// invalidations on the current tokio runtime (if there is one).
pub(crate) fn guard(inner: Arc<dyn Store>, settings: CircuitBreaker, clock: Clock) -> Arc<Guarded> {
    let breaker = Breaker {
        store: format!("{inner:?}"),
        settings,
        clock,
        failures: AtomicU32::new(0),
        open_until: AtomicU64::new(0),
        pending: Mutex::new(HashSet::new()),
        counts: BreakerCounts::default(),
    };
    let guarded = Arc::new(Layered::new(breaker, inner));
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(retry_invalidations(Arc::downgrade(&guarded)));
    }
    guarded
}

impl Breaker {
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
                        tracing::warn!(store = %self.store, "store unreachable; skipping it for {:?} at a time",
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
        let Some(guarded) = guarded.upgrade() else {
            return;
        };
        let (g, store) = (guarded.layer(), guarded.inner());
        let batch: Vec<StoreKey> = g.pending.lock().iter().take(256).cloned().collect();
        for key in batch {
            if !g.allow() {
                break;
            }
            let done = store.invalidate(&key).await;
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

impl StoreLayer for Breaker {
    /// Fails at once while the breaker is open, records every outcome, and
    /// keeps the key of a write that failed (its old value may still be there:
    /// it must go). Subscriptions to the bus keep their own reconnection.
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: Op<'a>,
        call: StoreFuture<'a, T>,
    ) -> StoreFuture<'a, T> {
        if let Op::Subscribe(_) = op {
            return call;
        }
        let write = match op {
            Op::Set(key) | Op::SetVersioned(key) | Op::Invalidate(key) => Some(key),
            _ => None,
        };
        if !self.allow() {
            if let Some(key) = write {
                self.keep(key);
            }
            return Box::pin(std::future::ready(Err(self.open_error())));
        }
        Box::pin(async move {
            let result = call.await;
            self.record(&result);
            if let (Err(_), Some(key)) = (&result, write) {
                self.keep(key);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn opens_after_failures_and_probes_after_the_cooldown() {
        let mock = Clock::mock();
        let guarded = guard(
            Arc::new(MemoryStore::new(10)),
            CircuitBreaker::new(2, Duration::from_millis(500)),
            mock.clock(),
        );
        let g = guarded.layer();
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

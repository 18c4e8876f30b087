//! Hit-rate counters, kept in the cache for [`Cache::stats`](crate::Cache::stats)
//! and published through the [`metrics`](crate::metrics) module (which lists
//! the metric names).

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a cache's counters, from [`Cache::stats`](crate::Cache::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Lookups that found a value.
    pub hits: u64,
    /// Lookups that found a cached "not found".
    pub negative_hits: u64,
    /// Lookups that found nothing usable (absent, expired or undecodable).
    pub misses: u64,
    /// Loader calls that returned successfully.
    pub loads: u64,
    /// Loader calls that returned an error.
    pub load_errors: u64,
    /// Lookups that found another caller's lease and waited for it.
    pub lease_waits: u64,
    /// Waits for another caller's lease that gave up and loaded without filling.
    pub lease_wait_timeouts: u64,
    /// Loaded values written to the cache under their lease.
    pub fills: u64,
    /// Fills refused because the lease was revoked or expired meanwhile.
    pub refused_fills: u64,
    /// Stored entries that did not decode (treated as misses and replaced).
    pub decode_errors: u64,
    /// Store operations that failed.
    pub store_errors: u64,
    /// Misses answered "not found" by the Bloom filter, without a load.
    pub bloom_rejections: u64,
    /// Hits on entries past their soft expiry, served while being refreshed
    /// (stale-while-revalidate); also counted in `hits`.
    pub stale_hits: u64,
    /// Background refreshes started (stale-while-revalidate, refresh-ahead,
    /// early refresh).
    pub refreshes: u64,
    /// Calls answered with an expired value because the load failed or timed
    /// out (fail-safe), or because a recent load failed (its throttle).
    pub fail_safe_serves: u64,
    /// Calls answered with the stale value after the soft timeout; the load went
    /// on in the background.
    pub soft_timeouts: u64,
    /// Loader calls abandoned at the hard timeout.
    pub load_timeouts: u64,
    /// Calls that joined another caller's load in this process instead of
    /// running their own.
    pub coalesced: u64,
    /// Write-through values not cached because the cache held a version at
    /// least as new.
    pub stale_writes: u64,
    /// Values answered by the near cache (L1), without a store round trip;
    /// also counted in `hits`. (A cached "not found" answered by L1 counts in
    /// `negative_hits` only.)
    pub near_hits: u64,
    /// Times the near cache was emptied because its invalidation bus broke or
    /// came back.
    pub near_clears: u64,
    /// Times the circuit breaker opened (the store failed repeatedly).
    pub breaker_opens: u64,
    /// Store operations skipped because the breaker was open.
    pub short_circuits: u64,
    /// Invalidations that failed, were kept, and later reached the store.
    pub retried_invalidations: u64,
    /// Invalidations that failed and could not be kept (beyond the bound).
    pub dropped_invalidations: u64,
    /// Invalidations kept now, waiting for the store.
    pub pending_invalidations: u64,
    /// Whether the circuit breaker is open now.
    pub breaker_open: bool,
}

impl Stats {
    /// The counts between `earlier` and this snapshot (each counter's
    /// difference; `pending_invalidations` and `breaker_open`, levels, are kept
    /// as they are now).
    #[must_use]
    pub fn since(&self, earlier: &Stats) -> Stats {
        let d = |now: u64, then: u64| now.saturating_sub(then);
        Stats {
            hits: d(self.hits, earlier.hits),
            negative_hits: d(self.negative_hits, earlier.negative_hits),
            misses: d(self.misses, earlier.misses),
            loads: d(self.loads, earlier.loads),
            load_errors: d(self.load_errors, earlier.load_errors),
            lease_waits: d(self.lease_waits, earlier.lease_waits),
            lease_wait_timeouts: d(self.lease_wait_timeouts, earlier.lease_wait_timeouts),
            fills: d(self.fills, earlier.fills),
            refused_fills: d(self.refused_fills, earlier.refused_fills),
            decode_errors: d(self.decode_errors, earlier.decode_errors),
            store_errors: d(self.store_errors, earlier.store_errors),
            bloom_rejections: d(self.bloom_rejections, earlier.bloom_rejections),
            stale_hits: d(self.stale_hits, earlier.stale_hits),
            refreshes: d(self.refreshes, earlier.refreshes),
            fail_safe_serves: d(self.fail_safe_serves, earlier.fail_safe_serves),
            soft_timeouts: d(self.soft_timeouts, earlier.soft_timeouts),
            load_timeouts: d(self.load_timeouts, earlier.load_timeouts),
            coalesced: d(self.coalesced, earlier.coalesced),
            stale_writes: d(self.stale_writes, earlier.stale_writes),
            near_hits: d(self.near_hits, earlier.near_hits),
            near_clears: d(self.near_clears, earlier.near_clears),
            breaker_opens: d(self.breaker_opens, earlier.breaker_opens),
            short_circuits: d(self.short_circuits, earlier.short_circuits),
            retried_invalidations: d(self.retried_invalidations, earlier.retried_invalidations),
            dropped_invalidations: d(self.dropped_invalidations, earlier.dropped_invalidations),
            pending_invalidations: self.pending_invalidations,
            breaker_open: self.breaker_open,
        }
    }

    /// The sum of two caches' figures (a breaker is open if either one is).
    #[must_use]
    pub(crate) fn plus(&self, other: &Stats) -> Stats {
        Stats {
            hits: self.hits + other.hits,
            negative_hits: self.negative_hits + other.negative_hits,
            misses: self.misses + other.misses,
            loads: self.loads + other.loads,
            load_errors: self.load_errors + other.load_errors,
            lease_waits: self.lease_waits + other.lease_waits,
            lease_wait_timeouts: self.lease_wait_timeouts + other.lease_wait_timeouts,
            fills: self.fills + other.fills,
            refused_fills: self.refused_fills + other.refused_fills,
            decode_errors: self.decode_errors + other.decode_errors,
            store_errors: self.store_errors + other.store_errors,
            bloom_rejections: self.bloom_rejections + other.bloom_rejections,
            stale_hits: self.stale_hits + other.stale_hits,
            refreshes: self.refreshes + other.refreshes,
            fail_safe_serves: self.fail_safe_serves + other.fail_safe_serves,
            soft_timeouts: self.soft_timeouts + other.soft_timeouts,
            load_timeouts: self.load_timeouts + other.load_timeouts,
            coalesced: self.coalesced + other.coalesced,
            stale_writes: self.stale_writes + other.stale_writes,
            near_hits: self.near_hits + other.near_hits,
            near_clears: self.near_clears + other.near_clears,
            breaker_opens: self.breaker_opens + other.breaker_opens,
            short_circuits: self.short_circuits + other.short_circuits,
            retried_invalidations: self.retried_invalidations + other.retried_invalidations,
            dropped_invalidations: self.dropped_invalidations + other.dropped_invalidations,
            pending_invalidations: self.pending_invalidations + other.pending_invalidations,
            breaker_open: self.breaker_open || other.breaker_open,
        }
    }

    /// Lookups in all: hits, negative hits and misses.
    pub fn lookups(&self) -> u64 {
        self.hits + self.negative_hits + self.misses
    }

    /// The fraction of lookups answered by the cache (negative hits count as
    /// hits: they spared the source a query), between 0 and 1; 0 with no lookups.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.lookups();
        if lookups == 0 {
            return 0.0;
        }
        // Counts below 2^53 convert exactly.
        #[allow(clippy::cast_precision_loss)]
        let rate = (self.hits + self.negative_hits) as f64 / lookups as f64;
        rate
    }
}

/// A counter of one event: one shared atomic, for events off the hit path.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The counter for events on every hit path: a cell per thread, on a cache
/// line of its own, that only its thread writes, so a count is a plain load
/// and store (no read-modify-write, no line shared between threads); a read
/// sums the cells. A thread's cell outlives it and goes to the next thread
/// given its id, so no count is lost.
#[derive(Debug, Default)]
pub(crate) struct HitCounter {
    cells: thread_local::ThreadLocal<Cell>,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Cell(AtomicU64);

impl HitCounter {
    #[cfg(test)]
    fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub(crate) fn inc(&self) {
        // `get` first: the creating call is not inlined, and a hit should not
        // pay for a call.
        let cell = match self.cells.get() {
            Some(cell) => &cell.0,
            None => &self.cells.get_or_default().0,
        };
        // Only this thread writes its cell: a load and a store suffice.
        cell.store(cell.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: HitCounter,
    pub(crate) negative_hits: HitCounter,
    /// Hits in the near cache (added to `hits` by `snapshot`).
    pub(crate) near_hits: HitCounter,
    pub(crate) misses: Counter,
    pub(crate) loads: Counter,
    pub(crate) load_errors: Counter,
    pub(crate) lease_waits: Counter,
    pub(crate) lease_wait_timeouts: Counter,
    pub(crate) fills: Counter,
    pub(crate) refused_fills: Counter,
    pub(crate) decode_errors: Counter,
    pub(crate) store_errors: Counter,
    pub(crate) bloom_rejections: Counter,
    pub(crate) stale_hits: Counter,
    pub(crate) refreshes: Counter,
    pub(crate) fail_safe_serves: Counter,
    pub(crate) soft_timeouts: Counter,
    pub(crate) load_timeouts: Counter,
    pub(crate) coalesced: Counter,
    pub(crate) stale_writes: Counter,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            hits: self.hits.get() + self.near_hits.get(),
            negative_hits: self.negative_hits.get(),
            misses: self.misses.get(),
            loads: self.loads.get(),
            load_errors: self.load_errors.get(),
            lease_waits: self.lease_waits.get(),
            lease_wait_timeouts: self.lease_wait_timeouts.get(),
            fills: self.fills.get(),
            refused_fills: self.refused_fills.get(),
            decode_errors: self.decode_errors.get(),
            store_errors: self.store_errors.get(),
            bloom_rejections: self.bloom_rejections.get(),
            stale_hits: self.stale_hits.get(),
            refreshes: self.refreshes.get(),
            fail_safe_serves: self.fail_safe_serves.get(),
            soft_timeouts: self.soft_timeouts.get(),
            load_timeouts: self.load_timeouts.get(),
            coalesced: self.coalesced.get(),
            stale_writes: self.stale_writes.get(),
            near_hits: self.near_hits.get(),
            near_clears: 0,
            breaker_opens: 0,
            short_circuits: 0,
            retried_invalidations: 0,
            dropped_invalidations: 0,
            pending_invalidations: 0,
            breaker_open: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since() {
        let before = Stats {
            hits: 5,
            misses: 2,
            pending_invalidations: 9,
            ..Stats::default()
        };
        let now = Stats {
            hits: 8,
            misses: 2,
            loads: 1,
            pending_invalidations: 3,
            ..Stats::default()
        };
        let d = now.since(&before);
        assert_eq!(
            (d.hits, d.misses, d.loads, d.pending_invalidations),
            (3, 0, 1, 3)
        );
    }

    #[test]
    fn a_per_thread_counter_sums_every_thread() {
        let hits = HitCounter::new();
        // Two waves: the second wave's threads reuse the first's ids, and
        // with them their cells.
        for wave in 1..=2 {
            std::thread::scope(|s| {
                for _ in 0..12 {
                    s.spawn(|| {
                        for _ in 0..10_000 {
                            hits.inc();
                        }
                    });
                }
            });
            assert_eq!(hits.get(), wave * 120_000);
        }
    }

    #[test]
    fn hit_rate() {
        assert_eq!(Stats::default().hit_rate(), 0.0);
        let s = Stats {
            hits: 6,
            negative_hits: 2,
            misses: 2,
            ..Stats::default()
        };
        assert_eq!(s.lookups(), 10);
        assert!((s.hit_rate() - 0.8).abs() < 1e-12);
    }
}

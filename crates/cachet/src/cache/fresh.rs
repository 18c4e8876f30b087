//! Freshness policy: when an entry is fresh, stale but servable, or expired, and
//! when a fresh entry should be refreshed early.
//!
//! An entry has a *soft expiry* (in its envelope) and a *hard* TTL (the store's
//! TTL on the key). Until the soft expiry it is fresh. After it, for the
//! stale-while-revalidate window, it is served at once while one background load
//! refreshes it. Past the window it is expired: callers wait for a load, and the
//! entry is kept only as the fail-safe fallback, until the store's TTL ends it.
//! Without any of these features, entries have no soft expiry and a fill's TTL
//! is the value TTL, as before.

use std::time::Duration;

use cachet_core::Meta;
use rand::Rng as _;

/// Fail-safe: when a load fails or times out and the cache still holds an
/// expired value, serve that value instead of the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailSafe {
    /// How long past its soft expiry a value may still be served when loads
    /// fail. Entries are kept that long in the store.
    pub max_staleness: Duration,
    /// After a failed load, how long this process serves the fallback without
    /// trying the source again, so that a failing source is not hammered.
    pub throttle: Duration,
}

impl FailSafe {
    /// Fail-safe with the given maximum staleness and throttle.
    pub fn new(max_staleness: Duration, throttle: Duration) -> Self {
        Self {
            max_staleness,
            throttle,
        }
    }
}

/// Refresh-ahead: keys read often are reloaded in the background shortly before
/// their soft expiry, so that their readers never wait for a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefreshAhead {
    /// How long before the soft expiry the refresh may start.
    pub ahead: Duration,
    /// How many reads of a key within `ahead` of its soft expiry (and within
    /// `window`) make it hot enough to refresh.
    pub min_reads: u32,
    /// The window in which those reads are counted.
    pub window: Duration,
}

impl RefreshAhead {
    /// Refresh keys read at least `min_reads` times within `window`, once they
    /// are within `ahead` of their soft expiry.
    pub fn new(ahead: Duration, min_reads: u32, window: Duration) -> Self {
        Self {
            ahead,
            min_reads: min_reads.max(1),
            window,
        }
    }
}

/// A cache's freshness settings.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Freshness {
    pub(crate) stale_for: Duration,
    pub(crate) fail_safe: Option<FailSafe>,
    pub(crate) refresh_ahead: Option<RefreshAhead>,
    /// β of probabilistic early refresh (XFetch).
    pub(crate) early_refresh: Option<f64>,
}

/// Where an entry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Fresh,
    /// Past its soft expiry, within the stale-while-revalidate window.
    Stale,
    /// Past the window: a load is needed; the value is a fail-safe fallback
    /// for this long past its soft expiry.
    Expired(Duration),
}

impl Freshness {
    /// Whether entries carry a soft expiry at all.
    pub(crate) fn soft(&self) -> bool {
        !self.stale_for.is_zero()
            || self.fail_safe.is_some()
            || self.refresh_ahead.is_some()
            || self.early_refresh.is_some()
    }

    /// How long an entry is kept past its soft expiry.
    pub(crate) fn retention(&self) -> Duration {
        let fail_safe = self.fail_safe.map_or(Duration::ZERO, |f| f.max_staleness);
        self.stale_for.max(fail_safe)
    }

    /// Where an entry with this envelope stands at `now` (Unix ms).
    #[inline]
    pub(crate) fn state(&self, meta: &Meta, now_ms: u64) -> State {
        let soft = meta.soft_expiry_ms;
        if soft == 0 || now_ms < soft {
            return State::Fresh;
        }
        let past = Duration::from_millis(now_ms - soft);
        if past < self.stale_for {
            State::Stale
        } else {
            State::Expired(past)
        }
    }

    /// Whether an expired value `past` its soft expiry may still be served when
    /// a load fails.
    pub(crate) fn fail_safe_allows(&self, past: Duration) -> bool {
        self.fail_safe.is_some_and(|f| past <= f.max_staleness)
    }

    /// XFetch (Vattani et al., VLDB 2015): refresh a fresh entry early with a
    /// probability that grows as its expiry nears, scaled by how long its load
    /// took: refresh when `now − Δ·β·ln(u) ≥ expiry`, `u` uniform in (0, 1].
    pub(crate) fn refresh_early(&self, meta: &Meta, now_ms: u64) -> bool {
        let Some(beta) = self.early_refresh else {
            return false;
        };
        if meta.soft_expiry_ms == 0 || meta.negative {
            return false;
        }
        let delta_ms = f64::from(meta.load_time_us) / 1000.0;
        let u: f64 = rand::rng().random_range(f64::MIN_POSITIVE..=1.0);
        // Millisecond times stay far below 2^53: the conversions are exact.
        #[allow(clippy::cast_precision_loss)]
        let now = now_ms as f64;
        #[allow(clippy::cast_precision_loss)]
        let expiry = meta.soft_expiry_ms as f64;
        now - delta_ms * beta * u.ln() >= expiry
    }

    /// Whether a fresh entry is within refresh-ahead's zone before its soft expiry.
    pub(crate) fn in_ahead_zone(&self, meta: &Meta, now_ms: u64) -> bool {
        match self.refresh_ahead {
            Some(ra) if meta.soft_expiry_ms != 0 && !meta.negative => {
                let ahead = u64::try_from(ra.ahead.as_millis()).unwrap_or(u64::MAX);
                now_ms.saturating_add(ahead) >= meta.soft_expiry_ms
            }
            _ => false,
        }
    }
}

/// Per-key read counts inside the refresh-ahead zone.
pub(crate) struct AheadReads {
    counts: quick_cache::sync::Cache<Box<str>, (u64, u32)>,
}

impl AheadReads {
    pub(crate) fn new() -> Self {
        Self {
            counts: quick_cache::sync::Cache::new(10_000),
        }
    }

    /// Counts one read of `key` in the zone; true when the key just became hot
    /// (and its count starts over). Counts are approximate under concurrency.
    pub(crate) fn hot(&self, key: &str, ra: &RefreshAhead, now_ms: u64) -> bool {
        let window = u64::try_from(ra.window.as_millis()).unwrap_or(u64::MAX);
        let (start, n) = match self.counts.get(key) {
            Some((start, n)) if now_ms.saturating_sub(start) <= window => (start, n + 1),
            _ => (now_ms, 1),
        };
        if n >= ra.min_reads {
            self.counts.remove(key);
            true
        } else {
            self.counts.insert(key.into(), (start, n));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(soft: u64, load_us: u32) -> Meta {
        Meta {
            soft_expiry_ms: soft,
            load_time_us: load_us,
            ..Meta::default()
        }
    }

    #[test]
    fn states() {
        let f = Freshness {
            stale_for: Duration::from_secs(10),
            fail_safe: Some(FailSafe::new(
                Duration::from_secs(60),
                Duration::from_secs(1),
            )),
            ..Freshness::default()
        };
        assert!(f.soft());
        assert_eq!(f.retention(), Duration::from_secs(60));
        assert_eq!(f.state(&meta(0, 0), 5), State::Fresh);
        assert_eq!(f.state(&meta(1_000, 0), 999), State::Fresh);
        assert_eq!(f.state(&meta(1_000, 0), 1_000), State::Stale);
        assert_eq!(f.state(&meta(1_000, 0), 10_999), State::Stale);
        assert_eq!(
            f.state(&meta(1_000, 0), 11_000),
            State::Expired(Duration::from_secs(10))
        );
        assert!(f.fail_safe_allows(Duration::from_secs(60)));
        assert!(!f.fail_safe_allows(Duration::from_secs(61)));
        assert!(!Freshness::default().soft());
    }

    #[test]
    fn xfetch_refreshes_more_often_near_expiry_and_for_slow_loads() {
        let f = Freshness {
            early_refresh: Some(1.0),
            ..Freshness::default()
        };
        let rate = |now: u64, load_us: u32| {
            (0..10_000)
                .filter(|_| f.refresh_early(&meta(100_000, load_us), now))
                .count()
        };
        // A 1 s load, 10 s before expiry: e^-10, practically never.
        assert!(rate(90_000, 1_000_000) < 10);
        // 1 s before expiry: e^-1 ≈ 37%.
        let near = rate(99_000, 1_000_000);
        assert!((3_000..4_400).contains(&near), "{near}");
        // A 1 ms load 1 s before expiry: never.
        assert_eq!(rate(99_000, 1_000), 0);
        // At or past expiry: always.
        assert_eq!(rate(100_000, 1_000), 10_000);
    }

    #[test]
    fn ahead_reads_count_within_the_window() {
        let ra = RefreshAhead::new(Duration::from_secs(5), 3, Duration::from_secs(10));
        let reads = AheadReads::new();
        assert!(!reads.hot("k", &ra, 0));
        assert!(!reads.hot("k", &ra, 1_000));
        assert!(reads.hot("k", &ra, 2_000));
        // The count starts over after it fired, and after the window.
        assert!(!reads.hot("k", &ra, 3_000));
        assert!(!reads.hot("k", &ra, 50_000));
        let f = Freshness {
            refresh_ahead: Some(ra),
            ..Freshness::default()
        };
        assert!(f.in_ahead_zone(&meta(10_000, 0), 5_000));
        assert!(!f.in_ahead_zone(&meta(10_000, 0), 4_999));
    }
}

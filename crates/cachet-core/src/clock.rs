//! Wall-clock time for TTLs and soft expiry, with a mock for tests.
//!
//! Times are Unix milliseconds because they are written into entries that other
//! processes read (soft expiry); the in-process store also uses them for its TTLs,
//! so a test can expire entries by advancing a [`MockClock`] instead of sleeping.
//!
//! Reading the system clock costs 20–30 ns, as much as a whole in-process cache
//! hit, so hit paths use [`Clock::coarse_ms`]: a value refreshed every millisecond
//! by one background thread (`cachet-clock`, started on first use), at most a
//! few milliseconds behind. An entry may therefore outlive its TTL by that much.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the current time in Unix milliseconds.
///
/// Cloning is cheap. [`Clock::system`] reads the operating system's clock;
/// [`Clock::mock`] returns a clock that only moves when told to.
#[derive(Clone, Default)]
pub struct Clock {
    mock: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The operating system's wall clock.
    pub fn system() -> Self {
        Self { mock: None }
    }

    /// A clock that starts at a fixed instant and moves only through the returned
    /// [`MockClock`] handle.
    pub fn mock() -> MockClock {
        MockClock {
            now: Arc::new(AtomicU64::new(MockClock::START_MS)),
        }
    }

    /// The current time in milliseconds since the Unix epoch.
    #[inline]
    pub fn now_ms(&self) -> u64 {
        match &self.mock {
            None => system_ms(),
            Some(now) => now.load(Ordering::Acquire),
        }
    }

    /// The current time in milliseconds since the Unix epoch, read cheaply: up to
    /// a few milliseconds behind [`now_ms`](Self::now_ms) for the system clock,
    /// exact for a mock.
    #[inline]
    pub fn coarse_ms(&self) -> u64 {
        match &self.mock {
            None => coarse::now_ms(),
            Some(now) => now.load(Ordering::Acquire),
        }
    }

    /// Whether this is a mock clock.
    pub fn is_mock(&self) -> bool {
        self.mock.is_some()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mock {
            None => f.write_str("Clock::System"),
            Some(now) => write!(f, "Clock::Mock({})", now.load(Ordering::Relaxed)),
        }
    }
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The shared coarse clock: one thread stores the time every millisecond.
mod coarse {
    use super::{AtomicU64, Once, Ordering, system_ms};
    use std::time::Duration;

    /// The time the ticker last stored; `0` before it started, `u64::MAX` if it
    /// could not start (then every read asks the system clock).
    static NOW_MS: AtomicU64 = AtomicU64::new(0);
    static START: Once = Once::new();

    const TICK: Duration = Duration::from_millis(1);
    const NO_TICKER: u64 = u64::MAX;

    #[inline]
    pub(super) fn now_ms() -> u64 {
        let now = NOW_MS.load(Ordering::Relaxed);
        // One comparison for both rare cases: 0 and `NO_TICKER`.
        if now.wrapping_sub(1) < NO_TICKER - 1 {
            return now;
        }
        now_ms_slow(now)
    }

    #[cold]
    fn now_ms_slow(now: u64) -> u64 {
        if now == 0 {
            START.call_once(start);
        }
        match NOW_MS.load(Ordering::Relaxed) {
            NO_TICKER => system_ms(),
            now => now,
        }
    }

    fn start() {
        NOW_MS.store(system_ms().max(1), Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("cachet-clock".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TICK);
                    NOW_MS.store(system_ms().max(1), Ordering::Relaxed);
                }
            });
        if spawned.is_err() {
            NOW_MS.store(NO_TICKER, Ordering::Relaxed);
        }
    }
}

/// The handle that moves a mock [`Clock`].
#[derive(Clone, Debug)]
pub struct MockClock {
    now: Arc<AtomicU64>,
}

impl MockClock {
    /// Where every mock clock starts: 2023-11-14T22:13:20Z, far from zero so that
    /// "zero means unset" fields are never confused with real times.
    pub const START_MS: u64 = 1_700_000_000_000;

    /// A [`Clock`] that reads this handle.
    pub fn clock(&self) -> Clock {
        Clock {
            mock: Some(Arc::clone(&self.now)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.now.fetch_add(ms, Ordering::AcqRel);
    }

    /// The current mock time in Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_moves_only_when_advanced() {
        let mock = Clock::mock();
        let clock = mock.clock();
        assert_eq!(clock.now_ms(), MockClock::START_MS);
        mock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now_ms(), MockClock::START_MS + 1500);
        assert!(clock.is_mock());
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(Clock::system().now_ms() > 1_577_836_800_000);
    }

    #[test]
    fn coarse_clock_follows_the_system_clock() {
        let clock = Clock::system();
        let before = clock.now_ms();
        let coarse = clock.coarse_ms();
        // Started on first use with the current time; a tick is 1 ms, and a busy
        // machine may delay the ticker, hence the generous bound.
        assert!(
            coarse + 1_000 >= before && coarse <= clock.now_ms(),
            "{coarse} vs {before}"
        );
        let mock = Clock::mock();
        mock.advance(Duration::from_millis(5));
        assert_eq!(mock.clock().coarse_ms(), mock.now_ms());
    }
}

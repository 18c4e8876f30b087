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
//! The thread ticks only while the clock is read: after 100 ticks without a
//! read it sleeps, and the next read asks the system clock and wakes it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The shared coarse clock: one thread stores the time every millisecond
/// while it is read.
mod coarse {
    use super::{AtomicU64, Ordering, system_ms};
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicBool;
    use std::thread::Thread;
    use std::time::Duration;

    /// The time the ticker last stored; `0` while there is none (before the
    /// ticker starts, and while it sleeps), `u64::MAX` if it could not start
    /// (then every read asks the system clock).
    static NOW_MS: AtomicU64 = AtomicU64::new(0);
    /// Set by reads, cleared by the ticker at each tick: whether the clock
    /// was read since the last one.
    static READ: AtomicBool = AtomicBool::new(false);
    /// The ticker, to wake it; `None` if it could not start.
    static TICKER: OnceLock<Option<Thread>> = OnceLock::new();

    const TICK: Duration = Duration::from_millis(1);
    /// Ticks without a read after which the ticker sleeps until the next read.
    const IDLE_TICKS: u32 = 100;
    const NO_TICKER: u64 = u64::MAX;

    #[inline]
    pub(super) fn now_ms() -> u64 {
        let now = NOW_MS.load(Ordering::Relaxed);
        // One comparison for both rare cases: 0 and `NO_TICKER`.
        if now.wrapping_sub(1) < NO_TICKER - 1 {
            // Stores only what changes: the first read after a tick.
            if !READ.load(Ordering::Relaxed) {
                READ.store(true, Ordering::Relaxed);
            }
            return now;
        }
        now_ms_slow(now)
    }

    /// A read with no tick to read: the ticker is asleep or not started (it
    /// is woken or started, and this read asks the system clock), or it
    /// could not start.
    #[cold]
    fn now_ms_slow(now: u64) -> u64 {
        if now == NO_TICKER {
            return system_ms();
        }
        let mut started = false;
        let ticker = TICKER.get_or_init(|| {
            started = true;
            start()
        });
        let Some(ticker) = ticker else {
            return system_ms();
        };
        let now = system_ms().max(1);
        READ.store(true, Ordering::Relaxed);
        // The reads until the ticker's next tick see this one.
        let _ = NOW_MS.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        // A ticker just started is ticking already.
        if !started {
            ticker.unpark();
        }
        now
    }

    fn start() -> Option<Thread> {
        let spawned = std::thread::Builder::new()
            .name("cachet-clock".into())
            .spawn(tick);
        match spawned {
            Ok(handle) => Some(handle.thread().clone()),
            Err(_) => {
                NOW_MS.store(NO_TICKER, Ordering::Relaxed);
                None
            }
        }
    }

    /// Stores the time every tick while the clock is read, and sleeps after
    /// [`IDLE_TICKS`] ticks without a read: an idle process is not woken a
    /// thousand times a second.
    fn tick() {
        let mut idle = 0;
        loop {
            std::thread::sleep(TICK);
            if READ.swap(false, Ordering::Relaxed) {
                idle = 0;
            } else {
                idle += 1;
            }
            if idle < IDLE_TICKS {
                NOW_MS.store(system_ms().max(1), Ordering::Relaxed);
                continue;
            }
            // From here a read takes the slow path, which wakes this thread
            // (an unpark before the park makes the park return at once).
            NOW_MS.store(0, Ordering::Relaxed);
            std::thread::park();
            idle = 0;
        }
    }

    /// Whether the ticker is ticking (false while it sleeps).
    #[cfg(test)]
    pub(super) fn ticking() -> bool {
        NOW_MS.load(Ordering::Relaxed) != 0
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

    #[test]
    fn the_coarse_clock_sleeps_while_unread_and_a_read_wakes_it() {
        use std::time::Instant;
        let clock = Clock::system();
        assert!(clock.coarse_ms() > 0);
        // Unread, the ticker stops after `IDLE_TICKS` ticks (1 ms each, or
        // longer on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(10);
        while coarse::ticking() {
            assert!(
                Instant::now() < deadline,
                "the ticker still ticks 10 s after the last read"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // A read while it sleeps is the system clock's time...
        let before = clock.now_ms();
        let read = clock.coarse_ms();
        assert!(
            read + 1_000 >= before && read <= clock.now_ms(),
            "{read} vs {before}"
        );
        // ...and wakes it: the coarse time moves on again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while clock.coarse_ms() <= read {
            assert!(Instant::now() < deadline, "the ticker did not wake");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(coarse::ticking());
    }
}

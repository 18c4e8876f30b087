//! Log lines that an outage would otherwise repeat once per operation or per
//! key: a store failure worked around, a fail-safe serve, an invalidation
//! dropped for want of room.

use std::sync::atomic::{AtomicU64, Ordering};

/// At most one line of a kind a second (per cache, or per breaker). The count
/// of lines held back goes with the next one (`held_back`); the counters in
/// [`Stats`](crate::Stats) count every event.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    /// When the last line was logged (Unix ms, at least 1); 0 before.
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

impl LogLimit {
    const PERIOD_MS: u64 = 1_000;

    /// Whether a line may be logged at `now_ms`: `Some` of the number held
    /// back since the last one, or `None` (and one more held back).
    pub(crate) fn allow(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let now = now_ms.max(1);
        if (last != 0 && now.saturating_sub(last) < Self::PERIOD_MS)
            || self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_count_of_those_held_back() {
        let limit = LogLimit::default();
        assert_eq!(limit.allow(100), Some(0));
        assert_eq!(limit.allow(110), None);
        assert_eq!(limit.allow(1_099), None);
        assert_eq!(limit.allow(1_100), Some(2));
        assert_eq!(limit.allow(1_600), None);
        assert_eq!(limit.allow(5_000), Some(1));
        assert_eq!(limit.allow(5_001), None);
        // A mock clock may start at 0.
        assert_eq!(LogLimit::default().allow(0), Some(0));
    }
}

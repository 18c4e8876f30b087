//! Small pieces the background workers of sibling crates share (the outbox
//! relay, the write-behind flusher): a jittered exponential backoff and text
//! clipped for log lines.

use std::fmt;
use std::time::Duration;

/// Exponential backoff from `min` to `max`, each pause drawn uniformly from the
/// upper half of the current step so that workers do not retry in step.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    current: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `min` and doubling up to `max` (at least `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            current: min,
            max: max.max(min),
        }
    }

    /// Starts again from `min`.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next pause, then doubles the step (up to `max`).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.current.mul_f64(rand::random_range(0.5..=1.0));
        self.current = (self.current * 2).min(self.max);
        pause
    }
}

/// The most characters of a text [`Clipped`] shows.
const MAX_LOGGED: usize = 200;

/// Text for a log line (a store key, an error), quoted, and cut short with its
/// length if long.
#[derive(Debug)]
pub struct Clipped<'a>(pub &'a str);

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(MAX_LOGGED) {
            Some((at, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..at], self.0.len()),
            None => write!(f, "{:?}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_bound_and_resets() {
        let min = Duration::from_millis(100);
        let mut b = Backoff::new(min, Duration::from_millis(800));
        for i in 0..8u32 {
            let p = b.next_pause();
            let ceiling = (min * 2u32.pow(i)).min(Duration::from_millis(800));
            assert!(p <= ceiling && p >= ceiling / 2, "{i}: {p:?}");
        }
        b.reset();
        assert!(b.next_pause() <= min);
    }

    #[test]
    fn long_text_is_clipped_in_logs() {
        assert_eq!(Clipped("a\nb").to_string(), "\"a\\nb\"");
        let long = "x".repeat(1000);
        let shown = Clipped(&long).to_string();
        assert!(
            shown.len() < 300 && shown.ends_with("(1000 bytes)"),
            "{shown}"
        );
    }
}

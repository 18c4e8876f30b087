//! Per-entry expiry: an [`Expiry`] policy decides, from a key and its value,
//! how long the value stays fresh, and whether to cache it at all.
//!
//! The builder's [`ttl`](crate::CacheBuilder::ttl),
//! [`jitter`](crate::CacheBuilder::jitter) and
//! [`negative_ttl`](crate::CacheBuilder::negative_ttl) configure the built-in
//! policy, [`Ttl`]; [`expiry`](crate::CacheBuilder::expiry) replaces it.
//!
//! Past its fresh life an entry is a miss, or, with stale-while-revalidate or
//! fail-safe, stale for their windows, which the cache adds to the store TTL.
//!
//! ```
//! use std::time::Duration;
//! use cachet::{Cache, Expiry};
//!
//! /// Prices of items on sale change often; the rest rarely. Errors (a
//! /// negative price) are not cached at all.
//! struct ByKind;
//!
//! impl Expiry<str, i64> for ByKind {
//!     fn fresh_for(&self, key: &str, price: Option<&i64>) -> Option<Duration> {
//!         match price {
//!             Some(p) if *p < 0 => None,
//!             Some(_) if key.starts_with("sale:") => Some(Duration::from_secs(5)),
//!             Some(_) => Some(Duration::from_secs(600)),
//!             None => Some(Duration::from_secs(30)),
//!         }
//!     }
//! }
//!
//! # fn main() -> Result<(), cachet::Error> {
//! let prices: Cache<str, i64> = Cache::builder("prices").expiry(ByKind).build()?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use rand::Rng as _;

/// Decides the fresh life of each value a cache writes, in the spirit of
/// moka's `Expiry`.
pub trait Expiry<K: ?Sized, V>: Send + Sync + 'static {
    /// How long `value`, just loaded or written for `key`, stays fresh;
    /// `value` is `None` for "not found". `None` means: do not cache it (a
    /// write of it still removes the entry that was there).
    fn fresh_for(&self, key: &K, value: Option<&V>) -> Option<Duration>;

    /// The longest a near cache (L1) may keep `value` without asking the
    /// shared store again. Defaults to [`fresh_for`](Self::fresh_for); a
    /// policy that draws lives at random should return its shortest.
    fn near_for(&self, key: &K, value: Option<&V>) -> Option<Duration> {
        self.fresh_for(key, value)
    }
}

/// The built-in policy: values live `ttl`, spread by `jitter`, and "not found"
/// lives `negative_ttl` (not cached when it is `None`).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Ttl {
    /// The base fresh life of values.
    pub ttl: Duration,
    /// Each value's life is drawn uniformly from `ttl × (1 ± jitter)`, in `[0, 1)`.
    pub jitter: f64,
    /// The life of a cached "not found"; `None` turns negative caching off.
    pub negative_ttl: Option<Duration>,
}

impl Ttl {
    /// The policy of `ttl` with `jitter`, and `negative_ttl` for "not found".
    pub fn new(ttl: Duration, jitter: f64, negative_ttl: Option<Duration>) -> Self {
        Self {
            ttl,
            jitter,
            negative_ttl,
        }
    }
}

impl<K: ?Sized, V> Expiry<K, V> for Ttl {
    fn fresh_for(&self, _: &K, value: Option<&V>) -> Option<Duration> {
        if value.is_none() {
            return self.negative_ttl;
        }
        if self.jitter == 0.0 {
            return Some(self.ttl);
        }
        let factor = rand::rng().random_range((1.0 - self.jitter)..=(1.0 + self.jitter));
        Some(self.ttl.mul_f64(factor))
    }

    fn near_for(&self, _: &K, value: Option<&V>) -> Option<Duration> {
        match value {
            Some(_) => Some(self.ttl.mul_f64(1.0 - self.jitter)),
            None => self.negative_ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_draws_within_the_jitter_and_l1_takes_the_shortest() {
        let p = Ttl::new(Duration::from_secs(10), 0.2, None);
        for _ in 0..1000 {
            let life = Expiry::<u64, u64>::fresh_for(&p, &1, Some(&1)).unwrap();
            assert!((Duration::from_secs(8)..=Duration::from_secs(12)).contains(&life));
        }
        assert_eq!(
            Expiry::<u64, u64>::near_for(&p, &1, Some(&1)),
            Some(Duration::from_secs(8))
        );
        assert_eq!(Expiry::<u64, u64>::fresh_for(&p, &1, None), None);
    }
}

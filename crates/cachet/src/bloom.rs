//! A Bloom filter of the keys that exist, shared through the store, against
//! cache penetration.
//!
//! Negative caching stops *repeated* lookups of a missing key from reaching the
//! database, but not lookups of ever new missing keys (enumeration, scrapers, a
//! client bug): each one misses the cache and costs a query. A [`BloomFilter`]
//! holds the keys that exist in the source of truth, as `m` bits set by `k`
//! hash functions per key; a key whose bits are not all set is certainly not
//! among them, so the caller can answer "not found" without touching the source.
//! A key whose bits are all set *might* exist: either it does, or it is a false
//! positive (at the rate [`BloomOptions::false_positive_rate`] when the filter
//! holds [`BloomOptions::expected_items`] keys), and the lookup goes on as usual.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn cachet::Store>, ids: Vec<u64>)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use cachet::{BloomFilter, BloomOptions, KeyLayout};
//!
//! let layout = KeyLayout::new("cachet:", "users")?;
//! let filter = BloomFilter::new(&layout, store, BloomOptions::new(1_000_000, 0.01))?;
//! // Once, and after deletions: every id in the database (SELECT id FROM users).
//! filter.rebuild(ids).await?;
//! // On every INSERT, before its COMMIT.
//! filter.insert(&42u64).await?;
//! if !filter.might_contain(&7u64).await? {
//!     // Certainly no user 7: no cache lookup, no query.
//! }
//! # Ok(()) }
//! ```
//!
//! # Costs
//!
//! - **Space**: `m / 8` bytes, about 1.2 bytes per expected key at 1% false
//!   positives (9.6 bits per key; 14.4 at 0.1%). On Redis it is one string under
//!   one `:sys:` key without TTL (see [`BloomKey`]); in process, one array of
//!   atomic words per filter in the [`MemoryStore`](crate::MemoryStore).
//! - **Round trips** on Redis: [`might_contain`](BloomFilter::might_contain) is
//!   one `EVALSHA` (up to `k` `GETBIT`s, stopping at the first clear bit);
//!   [`insert`](BloomFilter::insert) one; [`insert_many`](BloomFilter::insert_many)
//!   one per [`INSERT_BATCH`](BloomFilter::INSERT_BATCH) keys;
//!   [`rebuild`](BloomFilter::rebuild) one per MiB of bitmap. In process, none:
//!   `k` atomic loads or `fetch_or`s.
//! - **Rebuild**: the new bitmap, `m / 8` bytes, is built in the caller's memory,
//!   and Redis holds old and new side by side until the swap.
//! - **CPU**: one 128-bit hash of the key's escaped form per operation; the `k`
//!   positions derive from it.
//! - **Load**: every check of a cache reads the same key, so on Redis Cluster
//!   they all go to the one node that holds its slot.
//!
//! # When to use it, and its conditions
//!
//! Use it when lookups of keys that do not exist are frequent and do not repeat,
//! and the source's keys can be listed (for [`rebuild`](BloomFilter::rebuild)).
//! It answers correctly only if:
//!
//! 1. **Every key that exists is in the filter.** Call
//!    [`insert`](BloomFilter::insert) for every new key, best *before* the
//!    transaction that creates it commits: a key inserted into the filter whose
//!    transaction then aborts costs a false positive, while a committed row whose
//!    key is not yet in the filter is reported "not found". A key missing from the
//!    filter is a wrong "not found" for as long as it stays missing.
//! 2. **Rebuilds are how keys leave.** A Bloom filter cannot delete: a deleted
//!    key still reads "might contain" (a false positive, harmless but costly), and
//!    its bits stay set, so the filter stays as full as if it still existed.
//!    [`rebuild`](BloomFilter::rebuild)
//!    from the source replaces the whole filter at once; do it on deployment, then
//!    periodically or after many deletions. Keys inserted *while* a rebuild runs
//!    (after the rebuild's read of the source began, before its swap) are not in
//!    the new filter: insert them again after the rebuild (for example the rows
//!    created since the read began), or rebuild while no keys are being created.
//! 3. **The filter is sized for the keys.** Past `expected_items` the
//!    false-positive rate grows (at twice as many keys, 1% becomes about 16%);
//!    rebuild with larger options before that. Options of another size are
//!    another filter (their shape is in its key), so processes that disagree on
//!    them never read each other's bits; the new filter rules nothing out until
//!    it is rebuilt, and the old key stays until it is deleted.
//!
//! A filter that is not built (never rebuilt, or lost with a Redis restart
//! without persistence, an eviction under an `allkeys-*` policy, a flush) rules
//! nothing out: [`might_contain`](BloomFilter::might_contain) returns `true`, and
//! insertions are dropped until the next rebuild. A store failure is an error;
//! treat it as "might contain".

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use cachet_core::{
    BloomBits, BloomKey, CacheKey, Capability, KeyLayout, Store, StoreError, escape_key,
};

use crate::error::Error;

/// How large a [`BloomFilter`] is: the number of keys it is sized for and the
/// false-positive rate it then has.
///
/// The filter has `m = ceil(-n ln p / (ln 2)²)` bits and `k = round(m / n · ln 2)`
/// hash functions (at least 1), the sizes that minimise `m` for `n` keys at rate
/// `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BloomOptions {
    /// The number of keys the filter is sized for, `n`; at least 1.
    pub expected_items: u64,
    /// The false-positive rate with `expected_items` keys in the filter, `p`;
    /// strictly between 0 and 1.
    pub false_positive_rate: f64,
}

impl BloomOptions {
    /// The most hash functions a filter may use: `k` is about `-log2 p`, so this
    /// bounds `p` from below at about 10⁻¹⁹.
    pub const MAX_HASHES: u32 = 64;

    /// Options for `expected_items` keys at `false_positive_rate`.
    pub const fn new(expected_items: u64, false_positive_rate: f64) -> Self {
        Self {
            expected_items,
            false_positive_rate,
        }
    }

    /// `(m, k)`: the filter's bits and hash functions, or why there are none.
    fn shape(&self) -> Result<(u64, u32), String> {
        let n = self.expected_items;
        let p = self.false_positive_rate;
        if n == 0 {
            return Err("a Bloom filter's expected_items must be at least 1".into());
        }
        if !(p > 0.0 && p < 1.0) {
            return Err(format!(
                "a Bloom filter's false_positive_rate must lie strictly between 0 and 1, not {p}"
            ));
        }
        let ln2 = std::f64::consts::LN_2;
        // Integers below 2^53 convert exactly; beyond that the sizing is
        // approximate anyway, and the filter would not fit.
        #[allow(clippy::cast_precision_loss)]
        let n = n as f64;
        let m = (-n * p.ln() / (ln2 * ln2)).ceil();
        if m > BloomKey::MAX_BITS as f64 {
            return Err(format!(
                "a Bloom filter for {} keys at {p} needs {m} bits, more than the 2^32 \
                 one filter can have",
                self.expected_items
            ));
        }
        let k = (m / n * ln2).round().max(1.0);
        if k > f64::from(Self::MAX_HASHES) {
            return Err(format!(
                "a Bloom filter at {p} needs {k} hash functions, more than {}",
                Self::MAX_HASHES
            ));
        }
        // Both are checked in range above, and whole.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(((m as u64).max(1), k as u32))
    }
}

/// A Bloom filter of a cache's existing keys, kept in a [`Store`] and shared by
/// every process on that store. See the [module docs](crate::bloom) for its
/// costs and conditions.
///
/// Cloning is cheap; clones share the filter.
#[derive(Clone)]
pub struct BloomFilter {
    inner: Arc<Inner>,
}

struct Inner {
    key: BloomKey,
    hashes: u32,
    options: BloomOptions,
    store: Arc<dyn Store>,
}

impl Inner {
    /// The store's Bloom bits (checked when the filter was made).
    fn bits(&self) -> Result<&dyn BloomBits, StoreError> {
        self.store
            .bloom_bits()
            .ok_or_else(|| Capability::BloomBits.missing())
    }
}

impl BloomFilter {
    /// How many keys [`insert_many`](Self::insert_many) sends per round trip.
    pub const INSERT_BATCH: usize = 1024;

    /// The filter of the cache with keys in `layout`, in `store`, sized by
    /// `options`. Nothing is sent to the store.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when the options are out
    /// of range, the filter would exceed 2³² bits, or the store does not offer
    /// [`BloomBits`].
    pub fn new(
        layout: &KeyLayout,
        store: Arc<dyn Store>,
        options: BloomOptions,
    ) -> Result<Self, Error> {
        let (bits, hashes) = options
            .shape()
            .map_err(|message| Error::config(layout.namespace(), message))?;
        if store.bloom_bits().is_none() {
            return Err(Error::config(
                layout.namespace(),
                format!(
                    "a Bloom filter needs a store that offers {}, and {store:?} does not",
                    Capability::BloomBits
                ),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                key: BloomKey::new(layout, bits, hashes),
                hashes,
                options,
                store,
            }),
        })
    }

    /// The filter's size in bits, `m`.
    pub fn bits(&self) -> u64 {
        self.inner.key.bits()
    }

    /// The number of hash functions, `k`: bits set per key and probed per check.
    pub fn hashes(&self) -> u32 {
        self.inner.hashes
    }

    /// The filter's size in bytes, `ceil(m / 8)`: what it takes in the store.
    pub fn bytes(&self) -> u64 {
        self.inner.key.byte_len()
    }

    /// The options the filter was sized by.
    pub fn options(&self) -> BloomOptions {
        self.inner.options
    }

    /// The filter's key in the store.
    pub fn key(&self) -> &BloomKey {
        &self.inner.key
    }

    /// The `k` bit positions of `key`, the same in every process and build.
    ///
    /// The key's escaped form (as in store keys) is hashed with XXH3-128, and the
    /// positions are `g_i = h1 + i·h2 mod m` for `i` in `0..k` (Kirsch and
    /// Mitzenmacher, "Less hashing, same performance", 2006), with `h1` and `h2`
    /// the hash's low and high 64 bits.
    pub fn positions<K: CacheKey + ?Sized>(&self, key: &K) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.inner.hashes as usize);
        self.push_positions(key, &mut out);
        out
    }

    fn push_positions<K: CacheKey + ?Sized>(&self, key: &K, out: &mut Vec<u64>) {
        // XXH3 rather than std's hashers: `RandomState` is seeded per process
        // and `DefaultHasher`'s algorithm may change between Rust releases,
        // while every process and every build must agree on a key's bits.
        // XXH3's output is fixed by its specification on every platform, it
        // is fast on short keys and of full quality (it passes SMHasher), one
        // 128-bit hash gives both halves double hashing needs, and the crate
        // is already in the dependency tree. The golden test pins it.
        let h = xxhash_rust::xxh3::xxh3_128(escape_key(key).as_bytes());
        let m = self.bits();
        // Splitting the 128-bit hash into its two halves.
        #[allow(clippy::cast_possible_truncation)]
        let (h1, h2) = (h as u64, (h >> 64) as u64);
        let mut at = h1 % m;
        // A step of 0 mod m would probe one bit k times.
        let step = match h2 % m {
            0 => 1 % m,
            s => s,
        };
        for _ in 0..self.inner.hashes {
            out.push(at);
            // Both are below m ≤ 2^32: no overflow.
            at = (at + step) % m;
        }
    }

    /// Whether `key` might exist: `false` means it certainly is not in the
    /// filter, `true` that it is, or is a false positive, or that the filter is
    /// not built. One round trip on Redis.
    ///
    /// The returned future does not borrow `key`.
    ///
    /// # Errors
    /// When the store fails; treat it as `true`.
    pub fn might_contain<K: CacheKey + ?Sized>(
        &self,
        key: &K,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send + '_ {
        let positions = self.positions(key);
        async move {
            self.inner
                .bits()?
                .bloom_check(&self.inner.key, &positions)
                .await
        }
    }

    /// Adds `key` to the filter. One round trip on Redis. Dropped if the filter
    /// is not built.
    ///
    /// The returned future does not borrow `key`.
    ///
    /// # Errors
    /// When the store fails.
    pub fn insert<K: CacheKey + ?Sized>(
        &self,
        key: &K,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + '_ {
        let positions = self.positions(key);
        async move {
            self.inner
                .bits()?
                .bloom_add(&self.inner.key, &positions)
                .await
        }
    }

    /// Adds `keys` to the filter, [`INSERT_BATCH`](Self::INSERT_BATCH) keys per
    /// round trip on Redis, each batch atomically. Dropped if the filter is not
    /// built.
    ///
    /// The keys are hashed when this is called; the returned future holds their
    /// positions, `8·k` bytes per key, not the keys.
    ///
    /// # Errors
    /// When the store fails; the batches before the failing one are in the filter.
    pub fn insert_many<K, I>(
        &self,
        keys: I,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + '_
    where
        K: CacheKey,
        I: IntoIterator<Item = K>,
    {
        let per_batch = Self::INSERT_BATCH * self.inner.hashes as usize;
        let mut batches = Vec::new();
        let mut batch = Vec::new();
        for key in keys {
            if batch.len() >= per_batch {
                batches.push(std::mem::take(&mut batch));
            }
            self.push_positions(&key, &mut batch);
        }
        batches.push(batch);
        async move {
            for batch in batches.iter().filter(|b| !b.is_empty()) {
                self.inner.bits()?.bloom_add(&self.inner.key, batch).await?;
            }
            Ok(())
        }
    }

    /// Replaces the filter with one holding exactly `keys`, which should be every
    /// key that exists in the source of truth: the way to build the filter in the
    /// first place, and the only way deleted keys leave it (a Bloom filter cannot
    /// delete). Checks running meanwhile see the old filter or the new one, never
    /// a mix.
    ///
    /// The bitmap is built here, in `m / 8` bytes of memory, when this is called;
    /// the returned future holds it, not the keys, and sends it in one round trip
    /// per MiB on Redis. Keys inserted by anyone between the moment `keys` were
    /// read from the source and the swap are not in the new filter: see the
    /// [module docs](crate::bloom).
    ///
    /// # Errors
    /// When the store fails; the filter is then unchanged.
    pub fn rebuild<K, I>(&self, keys: I) -> impl Future<Output = Result<(), StoreError>> + Send + '_
    where
        K: CacheKey,
        I: IntoIterator<Item = K>,
    {
        // Below 2^29: a filter has at most 2^32 bits.
        #[allow(clippy::cast_possible_truncation)]
        let mut bitmap = vec![0u8; self.bytes() as usize];
        let mut positions = Vec::with_capacity(self.inner.hashes as usize);
        let mut count = 0u64;
        for key in keys {
            positions.clear();
            self.push_positions(&key, &mut positions);
            for &p in &positions {
                // Redis's bit order: bit 0 is the high bit of byte 0.
                #[allow(clippy::cast_possible_truncation)]
                let byte = (p / 8) as usize;
                bitmap[byte] |= 0x80 >> (p % 8);
            }
            count += 1;
        }
        if count > self.inner.options.expected_items {
            tracing::warn!(
                filter = %self.inner.key,
                keys = count,
                expected = self.inner.options.expected_items,
                "Bloom filter rebuilt with more keys than it is sized for; \
                 its false-positive rate is above the configured one"
            );
        }
        let bitmap = Bytes::from(bitmap);
        async move {
            self.inner
                .bits()?
                .bloom_replace(&self.inner.key, bitmap)
                .await
        }
    }
}

impl fmt::Debug for BloomFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BloomFilter")
            .field("key", &self.inner.key)
            .field("bits", &self.bits())
            .field("hashes", &self.inner.hashes)
            .field("store", &self.inner.store)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_options_are_refused() {
        for (n, p) in [
            (0, 0.01),
            (10, 0.0),
            (10, 1.0),
            (10, -0.5),
            (10, f64::NAN),
            (u64::MAX, 0.01),
            (10, 1e-30),
        ] {
            assert!(BloomOptions::new(n, p).shape().is_err(), "{n} {p}");
        }
        assert_eq!(BloomOptions::new(1, 0.99).shape(), Ok((1, 1)));
    }
}

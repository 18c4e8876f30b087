//! [`BloomKey`]: where a cache's Bloom filter lives and what shape it has.
//!
//! A Bloom filter is a bitmap of `bits` bits in the store, one per cache
//! namespace, kept under the system key
//!
//! ```text
//! {prefix}{namespace}:sys:bloom:{{namespace}}:m{bits}:k{hashes}
//! ```
//!
//! - it is a `:sys:` structure, so it lives without a TTL: it is the store's
//!   durable state, rebuilt rather than expired;
//! - the namespace in braces is its Redis Cluster hash tag, so a rebuild's
//!   temporary key ([`BloomKey::temp_key`]) lies in the same slot and can be
//!   renamed over it;
//! - the size and the number of hash functions are part of the name, because
//!   positions computed for one shape mean nothing in a bitmap of another: a
//!   process configured differently uses a different filter instead of reading
//!   wrong bits from this one.
//!
//! On Redis the bitmap is a string of `ceil(bits / 8)` bytes in the bit order of
//! `SETBIT`/`GETBIT`: bit `i` is bit `7 - i % 8` of byte `i / 8`.
//!
//! A filter is *built* when it exists with exactly that many bytes, which only a
//! [`BloomBits::bloom_replace`](crate::BloomBits::bloom_replace) makes happen. A filter
//! that is not built (never built, or lost with a Redis restart, an eviction or
//! a flush) rules nothing out: checks report every key as possibly present, and
//! additions to it are dropped. So a lost filter costs its protection, never a
//! wrong "not found".

use std::fmt;

use crate::key::KeyLayout;
use crate::store::StoreError;

/// The name and shape of a cache's Bloom filter in a store. See the
/// [module docs](self).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BloomKey {
    key: String,
    bits: u64,
}

impl BloomKey {
    /// The largest filter, in bits: a Redis string holds at most 512 MiB, and
    /// `SETBIT` takes offsets below 2³².
    pub const MAX_BITS: u64 = 1 << 32;

    /// The filter of `bits` bits probed by `hashes` hash functions for the cache
    /// with keys in `layout`.
    ///
    /// # Panics
    /// If `bits` is zero or above [`MAX_BITS`](Self::MAX_BITS), or `hashes` is zero.
    pub fn new(layout: &KeyLayout, bits: u64, hashes: u32) -> Self {
        assert!(
            (1..=Self::MAX_BITS).contains(&bits),
            "a Bloom filter has 1 to 2^32 bits, not {bits}"
        );
        assert!(
            hashes > 0,
            "a Bloom filter needs at least one hash function"
        );
        let ns = layout.namespace();
        Self {
            key: layout.sys_key(&format!("bloom:{{{ns}}}:m{bits}:k{hashes}")),
            bits,
        }
    }

    /// The bitmap's key.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The filter's size in bits.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// The bitmap's size in bytes, `ceil(bits / 8)`.
    pub fn byte_len(&self) -> u64 {
        self.bits.div_ceil(8)
    }

    /// A temporary key in the filter's hash slot, `{key}:tmp:{id}`, where a
    /// rebuild writes the new bitmap before renaming it over the filter.
    pub fn temp_key(&self, id: &str) -> String {
        format!("{}:tmp:{id}", self.key)
    }

    /// Checks that every position lies inside the filter.
    ///
    /// # Errors
    /// a protocol [`StoreError`] naming the first position that does not.
    pub fn check_positions(&self, positions: &[u64]) -> Result<(), StoreError> {
        match positions.iter().find(|&&p| p >= self.bits) {
            Some(p) => Err(StoreError::protocol(format!(
                "bit {p} is outside the Bloom filter {} of {} bits",
                self.key, self.bits
            ))),
            None => Ok(()),
        }
    }

    /// Checks that `bitmap` has the filter's [`byte_len`](Self::byte_len).
    ///
    /// # Errors
    /// a protocol [`StoreError`] when it does not.
    pub fn check_bitmap(&self, bitmap: &[u8]) -> Result<(), StoreError> {
        if bitmap.len() as u64 == self.byte_len() {
            Ok(())
        } else {
            Err(StoreError::protocol(format!(
                "a bitmap of {} bytes for the Bloom filter {}, which has {} bytes",
                bitmap.len(),
                self.key,
                self.byte_len()
            )))
        }
    }
}

impl fmt::Debug for BloomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.key, f)
    }
}

impl fmt::Display for BloomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_slot() {
        let layout = KeyLayout::new("cachet:", "users").unwrap();
        let k = BloomKey::new(&layout, 9_586, 7);
        assert_eq!(k.as_str(), "cachet:users:sys:bloom:{users}:m9586:k7");
        assert_eq!(
            k.temp_key("ab"),
            "cachet:users:sys:bloom:{users}:m9586:k7:tmp:ab"
        );
        assert_eq!(k.byte_len(), 1_199);
        assert_eq!(BloomKey::new(&layout, 8, 1).byte_len(), 1);
        assert_ne!(k, BloomKey::new(&layout, 9_586, 3));
        assert!(k.check_positions(&[0, 9_585]).is_ok());
        assert!(k.check_positions(&[0, 9_586]).is_err());
        assert!(k.check_bitmap(&[0; 1_199]).is_ok());
        assert!(k.check_bitmap(&[0; 1_200]).is_err());
    }

    #[test]
    #[should_panic(expected = "1 to 2^32 bits")]
    fn zero_bits_is_refused() {
        let layout = KeyLayout::new("cachet:", "users").unwrap();
        let _ = BloomKey::new(&layout, 0, 1);
    }
}

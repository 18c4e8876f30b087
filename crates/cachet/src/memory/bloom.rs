//! The Bloom filters of a [`MemoryStore`](super::MemoryStore): one bitmap of
//! atomic words per filter key.
//!
//! A check and an insertion take a read lock on the map of filters only to clone
//! the bitmap's `Arc`; the bits themselves are atomic words, so concurrent
//! insertions never lose one another's bits. A rebuild builds a whole new bitmap
//! and swaps the `Arc` under the write lock: a check holds either the old bitmap
//! or the new one, as `RENAME` gives on Redis.
//!
//! Bit `i` is bit `63 - i % 64` of word `i / 64`, so the words read as big-endian
//! `u64`s from the bytes of Redis's bit order (bit `7 - i % 8` of byte `i / 8`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use cachet_core::{BloomKey, StoreError};
use parking_lot::RwLock;

/// The Bloom filters of one store, by key. A filter exists once it was built by
/// [`replace`](Self::replace); until then it rules nothing out, like a missing
/// filter on Redis.
#[derive(Default)]
pub(crate) struct Blooms {
    filters: RwLock<HashMap<String, Arc<Bitmap>>>,
}

struct Bitmap {
    bits: u64,
    words: Box<[AtomicU64]>,
}

fn mask(position: u64) -> (usize, u64) {
    // A filter has at most 2^32 bits, so a word index fits a usize.
    #[allow(clippy::cast_possible_truncation)]
    let word = (position / 64) as usize;
    (word, 1 << (63 - position % 64))
}

impl Blooms {
    /// The built bitmap of `filter`, if it has one of the right size.
    fn bitmap(&self, filter: &BloomKey) -> Option<Arc<Bitmap>> {
        self.filters
            .read()
            .get(filter.as_str())
            .filter(|b| b.bits == filter.bits())
            .cloned()
    }

    /// Whether all `positions` are set; `true` if the filter is not built.
    pub(crate) fn check(&self, filter: &BloomKey, positions: &[u64]) -> Result<bool, StoreError> {
        filter.check_positions(positions)?;
        let Some(bitmap) = self.bitmap(filter) else {
            return Ok(true);
        };
        Ok(positions.iter().all(|&p| {
            let (word, bit) = mask(p);
            bitmap.words[word].load(Ordering::Relaxed) & bit != 0
        }))
    }

    /// Sets `positions`; nothing if the filter is not built.
    pub(crate) fn add(&self, filter: &BloomKey, positions: &[u64]) -> Result<(), StoreError> {
        filter.check_positions(positions)?;
        if let Some(bitmap) = self.bitmap(filter) {
            for &p in positions {
                let (word, bit) = mask(p);
                bitmap.words[word].fetch_or(bit, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Replaces the filter's bitmap with `bytes`, in Redis's bit order.
    pub(crate) fn replace(&self, filter: &BloomKey, bytes: &Bytes) -> Result<(), StoreError> {
        filter.check_bitmap(bytes)?;
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                AtomicU64::new(u64::from_be_bytes(word))
            })
            .collect();
        let bitmap = Arc::new(Bitmap {
            bits: filter.bits(),
            words,
        });
        self.filters
            .write()
            .insert(filter.as_str().to_owned(), bitmap);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_core::KeyLayout;

    #[test]
    fn bits_follow_redis_order() {
        let layout = KeyLayout::new("cachet:", "t").unwrap();
        let filter = BloomKey::new(&layout, 70, 1);
        let blooms = Blooms::default();
        assert!(blooms.check(&filter, &[3]).unwrap(), "not built");
        blooms.add(&filter, &[3]).unwrap();
        let mut bytes = vec![0u8; 9];
        bytes[0] = 0b1000_0001; // bits 0 and 7
        bytes[8] = 0b0100_0000; // bit 65
        blooms.replace(&filter, &Bytes::from(bytes)).unwrap();
        for p in 0..70 {
            let set = matches!(p, 0 | 7 | 65);
            assert_eq!(blooms.check(&filter, &[p]).unwrap(), set, "bit {p}");
        }
        blooms.add(&filter, &[3, 69]).unwrap();
        assert!(blooms.check(&filter, &[0, 3, 69]).unwrap());
        assert!(blooms.check(&filter, &[70]).is_err());
        assert!(
            blooms
                .replace(&filter, &Bytes::from_static(&[0; 8]))
                .is_err()
        );
        // Another shape of the same namespace is another, unbuilt filter.
        let other = BloomKey::new(&layout, 70, 2);
        assert!(blooms.check(&other, &[1]).unwrap());
    }
}

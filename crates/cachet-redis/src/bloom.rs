//! The Bloom filter primitives of [`RedisStore`]: a bitmap in one Redis string.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use cachet_core::{BloomKey, StoreFuture, ttl_millis};

use crate::{RedisStore, protocol, scripts};

/// A rebuild sends its bitmap in chunks of this many bytes, one round trip each,
/// so that no single command carries (and no single script copies) a bitmap of
/// hundreds of megabytes; a filter of up to 8 Mbit is one chunk.
const CHUNK: usize = 1 << 20;

/// The TTL of a rebuild's temporary key, renewed by every chunk: what a rebuild
/// that dies half-way leaves behind expires.
const TEMP_TTL: Duration = Duration::from_secs(60);

impl RedisStore {
    pub(crate) fn bloom_check_at<'a>(
        &'a self,
        filter: &'a BloomKey,
        positions: &'a [u64],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            filter.check_positions(positions)?;
            let reply: i64 = scripts::BLOOM_CHECK
                .key(filter.as_str())
                .arg(filter.byte_len())
                .arg(positions)
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            match reply {
                1 => Ok(true),
                0 => Ok(false),
                -1 => {
                    tracing::debug!(filter = %filter, "Bloom filter not built; it rules nothing out");
                    Ok(true)
                }
                other => Err(protocol("bloom check", &redis::Value::Int(other))),
            }
        })
    }

    pub(crate) fn bloom_add_at<'a>(
        &'a self,
        filter: &'a BloomKey,
        positions: &'a [u64],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            filter.check_positions(positions)?;
            if positions.is_empty() {
                return Ok(());
            }
            let added: i64 = scripts::BLOOM_ADD
                .key(filter.as_str())
                .arg(filter.byte_len())
                .arg(positions)
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            if added == 0 {
                tracing::debug!(filter = %filter, "Bloom filter not built; insertion dropped");
            }
            Ok(())
        })
    }

    pub(crate) fn bloom_replace_with<'a>(
        &'a self,
        filter: &'a BloomKey,
        bits: Bytes,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            filter.check_bitmap(&bits)?;
            // Unique per rebuild, so two concurrent rebuilds never write into
            // each other's temporary key.
            let mut id = String::with_capacity(32);
            for b in self.inner.tokens.next_token().as_bytes() {
                let _ = write!(id, "{b:02x}");
            }
            let temp = filter.temp_key(&id);
            // `check_bitmap` saw at least one byte: a filter has at least one bit.
            let last = (bits.len() - 1) / CHUNK * CHUNK;
            let mut conn = self.conn();
            for at in (0..last).step_by(CHUNK) {
                let _: i64 = scripts::BLOOM_UPLOAD
                    .key(&temp)
                    .arg(at)
                    .arg(&bits[at..at + CHUNK])
                    .arg(ttl_millis(TEMP_TTL))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| self.err(e))?;
            }
            let _: i64 = scripts::BLOOM_COMMIT
                .key(filter.as_str())
                .key(&temp)
                .arg(last)
                .arg(&bits[last..])
                .arg(bits.len())
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_core::{BloomBits, KeyLayout};
    use cachet_testkit::RedisServer;

    /// A filter of several chunks is uploaded whole, and its temporary keys go.
    #[tokio::test]
    async fn a_rebuild_of_several_chunks_lands_whole() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let layout = KeyLayout::new("cachet:", "big").unwrap();
        let bits = (CHUNK as u64 * 2 + 3) * 8 - 5;
        let filter = BloomKey::new(&layout, bits, 3);
        let mut bitmap = vec![0u8; usize::try_from(filter.byte_len()).unwrap()];
        let set = [0, 7, 8, CHUNK as u64 * 8 - 1, CHUNK as u64 * 8, bits - 1];
        for p in set {
            bitmap[usize::try_from(p / 8).unwrap()] |= 0x80 >> (p % 8);
        }
        store
            .bloom_replace(&filter, Bytes::from(bitmap))
            .await
            .unwrap();
        for p in set {
            assert!(store.bloom_check(&filter, &[p]).await.unwrap(), "bit {p}");
            let bit = server.command(&["GETBIT", filter.as_str(), &p.to_string()]);
            assert_eq!(bit, "1", "bit {p} as Redis numbers it");
        }
        for p in [1, 6, 9, CHUNK as u64 * 8 + 1, bits - 2] {
            assert!(!store.bloom_check(&filter, &[p]).await.unwrap(), "bit {p}");
        }
        assert_eq!(
            server.command(&["STRLEN", filter.as_str()]),
            filter.byte_len().to_string()
        );
        assert_eq!(server.command(&["PTTL", filter.as_str()]), "-1");
        assert_eq!(server.command(&["DBSIZE"]), "1", "no temporary key left");
    }

    /// An upload whose temporary key vanished between chunks fails rather than
    /// installing a bitmap with a hole.
    #[tokio::test]
    async fn a_rebuild_whose_temporary_key_expired_fails() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let layout = KeyLayout::new("cachet:", "big").unwrap();
        let filter = BloomKey::new(&layout, 64, 1);
        let temp = filter.temp_key("t");
        let commit = |at: usize| {
            let mut s = scripts::BLOOM_COMMIT.key(filter.as_str());
            s.key(&temp).arg(at).arg(&[0xffu8; 4][..]).arg(8);
            s
        };
        // The first half never arrived.
        let lost: Result<i64, _> = commit(4).invoke_async(&mut store.conn()).await;
        assert!(lost.is_err());
        assert_eq!(server.command(&["EXISTS", filter.as_str()]), "0");
        // A commit of the wrong total size is refused too.
        let short: Result<i64, _> = commit(0).invoke_async(&mut store.conn()).await;
        assert!(short.is_err());
        assert_eq!(server.command(&["DBSIZE"]), "0");
    }
}

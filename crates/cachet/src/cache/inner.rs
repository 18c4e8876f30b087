//! The primitives under [`Cache`](super::Cache): the only code that knows
//! whether the store is the cache's typed in-process table or a [`Store`]
//! reached through the protocol.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use cachet_core::{
    Acquire, AcquireMode, CacheKey, Capability, Clock, Entry, Fill, GroupKey, KeyLayout,
    LeaseToken, Meta, Payload, PayloadKind, Read, Store, StoreError, StoreKey, Versioned,
};
use futures::future::join_all;

use super::fresh::{AheadReads, Freshness, State};
use super::tags::{Claimed, TagsFn};
use crate::bloom::BloomFilter;
use crate::breaker::Guarded;
use crate::codec::{Codec, CodecError};
use crate::expiry::Expiry;
use crate::flight::Flights;
use crate::log_limit::LogLimit;
use crate::memory::{Acquired, LocalTier, Slot, TypedTier};
use crate::metrics::{self, Histograms};
use crate::near::{Near, NearCache};
use crate::stats::Counters;
use crate::{Error, Stats};

pub(crate) struct Settings<V> {
    pub(crate) layout: KeyLayout,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_wait: Duration,
    pub(crate) fresh: Freshness,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) hard_timeout: Option<Duration>,
    pub(crate) clock: Clock,
    /// The source version of a value, for version-checked writes.
    pub(crate) version_of: Option<VersionFn<V>>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) codec: Arc<dyn Codec<V>>,
    /// The largest encoded value sent to a byte store.
    pub(crate) max_value_bytes: Option<crate::error::ValueLimit>,
}

/// A value's version in the source of truth.
pub(crate) type VersionFn<V> = Arc<dyn Fn(&V) -> u64 + Send + Sync>;

/// Maps a key to its escaped group.
pub(crate) type GroupFn<K> = Arc<dyn Fn(&K) -> String + Send + Sync>;

/// How a cache partitions its entries for bulk invalidation: by group, by tags.
pub(crate) struct Partitions<K: ?Sized, V> {
    pub(crate) group: Option<GroupFn<K>>,
    pub(crate) tags: Option<TagsFn<K, V>>,
}

pub(crate) struct Inner<K: ?Sized + ToOwned, V> {
    pub(crate) s: Settings<V>,
    /// How long each value stays fresh.
    pub(crate) expiry: Arc<dyn Expiry<K, V>>,
    /// The filter of keys that exist, when configured.
    pub(crate) bloom: Option<BloomFilter>,
    /// The key's group, for caches with groups.
    pub(crate) group: Option<GroupFn<K>>,
    /// The value's tags, for caches with tags.
    pub(crate) tags: Option<TagsFn<K, V>>,
    /// The cache's typed table when the store is a `MemoryStore`.
    pub(crate) local: Option<Arc<TypedTier<K, V>>>,
    pub(crate) kind: PayloadKind,
    pub(crate) counters: Counters,
    pub(crate) histograms: Histograms,
    pub(crate) flights: Arc<Flights<V>>,
    /// Reads of keys near their soft expiry, for refresh-ahead.
    pub(crate) ahead_reads: AheadReads,
    /// Fail-safe fallbacks served without asking the source again until the
    /// time (Unix ms) they hold, after a failed load.
    pub(crate) throttled: quick_cache::sync::Cache<Box<str>, (u64, Option<V>)>,
    /// The near cache (L1) in front of a shared store, when configured.
    pub(crate) near: Option<Arc<Near<K, V>>>,
    /// Dropped with the cache, which ends its bus task.
    pub(crate) _bus_stop: tokio::sync::watch::Sender<()>,
    /// The circuit breaker in front of a shared store (also `s.store`).
    pub(crate) breaker: Option<Arc<Guarded>>,
    /// Rate limits of the warnings of store failures and of fail-safe serves.
    store_warnings: LogLimit,
    pub(crate) fail_safe_warnings: LogLimit,
}

/// What a lookup found.
pub(crate) enum Lookup<V> {
    /// A fresh value, or a cached "not found".
    Fresh(Option<V>, Meta),
    /// A value past its soft expiry, within the stale-while-revalidate window.
    Stale(Option<V>, Meta),
    /// A value past the window, this long past its soft expiry: a miss, kept as
    /// the fail-safe fallback.
    Expired(Option<V>, Duration),
    /// Nothing usable; `corrupt` if undecodable bytes are in the way.
    Missing { corrupt: bool },
    /// The store failed.
    Failed(StoreError),
}

/// Stage 1's answer: what the tiers hold for a key.
pub(crate) enum Found<V> {
    /// A near-cache hit (fresh by construction).
    Near(Option<V>),
    /// What the cache's own tier holds, and where.
    Tier(At, Lookup<V>),
}

/// Where a key's entry lives: its group, its store key (formatted when first
/// needed: an in-process hit never formats one), its near-cache ticket.
pub(crate) struct At {
    pub(crate) group: Option<String>,
    skey: Option<StoreKey>,
    pub(crate) ticket: Option<crate::near::Ticket>,
}

impl At {
    /// The entry's store key.
    pub(crate) fn skey<K, V>(&mut self, inner: &Inner<K, V>, key: &K) -> &StoreKey
    where
        K: CacheKey + ?Sized + 'static,
        V: Clone + Send + Sync + 'static,
    {
        self.skey
            .get_or_insert_with(|| inner.key_with(key, self.group.as_deref()))
    }
}

/// What a read-or-lease found, decoded.
pub(crate) enum Claim<V> {
    Hit(Option<V>),
    Corrupt,
    Leased(LeaseToken),
    Busy(Option<Duration>),
}

impl<K, V> metrics::Source for Inner<K, V>
where
    K: CacheKey + ?Sized + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn namespace(&self) -> &str {
        self.s.layout.namespace()
    }

    /// The cache's counters, with the near cache's and the breaker's.
    fn stats(&self) -> Stats {
        let mut stats = self.counters.snapshot();
        let relaxed = Ordering::Relaxed;
        if let Some(near) = &self.near {
            stats.near_clears = near.clears.load(relaxed);
        }
        if let Some(breaker) = &self.breaker {
            let breaker = breaker.layer();
            stats.breaker_opens = breaker.counts.opens.load(relaxed);
            stats.short_circuits = breaker.counts.short_circuits.load(relaxed);
            stats.retried_invalidations = breaker.counts.retried_invalidations.load(relaxed);
            stats.dropped_invalidations = breaker.counts.dropped_invalidations.load(relaxed);
            stats.pending_invalidations = breaker.pending() as u64;
            stats.breaker_open = breaker.is_open();
        }
        stats
    }
}

impl<K, V> Inner<K, V>
where
    K: CacheKey + ?Sized + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn new(
        s: Settings<V>,
        expiry: Arc<dyn Expiry<K, V>>,
        partitions: Partitions<K, V>,
        local: Option<Arc<TypedTier<K, V>>>,
        bloom: Option<BloomFilter>,
        near: Option<NearCache>,
        breaker: Option<Arc<Guarded>>,
    ) -> Self {
        let kind = s.store.payload_kind();
        let counters = Counters::default();
        let histograms = Histograms::new(s.layout.namespace());
        let s_clock = s.clock.clone();
        Self {
            s,
            expiry,
            bloom,
            group: partitions.group,
            tags: partitions.tags,
            local,
            kind,
            counters,
            histograms,
            flights: Arc::new(Flights::new()),
            ahead_reads: AheadReads::new(),
            throttled: quick_cache::sync::Cache::new(1_000),
            near: near.map(|options| Arc::new(Near::new(options, s_clock))),
            _bus_stop: tokio::sync::watch::Sender::new(()),
            breaker,
            store_warnings: LogLimit::default(),
            fail_safe_warnings: LogLimit::default(),
        }
    }

    /// How long a value read or loaded now may stay in the near cache.
    pub(crate) fn near_ttl(&self, key: &K, value: &Option<V>) -> Duration {
        (self.expiry.near_for(key, value.as_ref())).unwrap_or(Duration::ZERO)
    }

    pub(crate) fn namespace(&self) -> &str {
        self.s.layout.namespace()
    }

    /// Whether a batch load fills its keys one at a time: the typed table
    /// never waits, and with tags each fill claims its own keys' tags.
    pub(crate) fn fills_key_by_key(&self) -> bool {
        self.local.is_some() || self.tags.is_some()
    }

    #[inline]
    pub(crate) fn group_of(&self, key: &K) -> Option<String> {
        self.group.as_ref().map(|g| g(key))
    }

    pub(crate) fn key_with(&self, key: &K, group: Option<&str>) -> StoreKey {
        match group {
            Some(group) => self.s.layout.key_in_group(group, key),
            None => self.s.layout.key(key),
        }
    }

    pub(crate) fn key_of(&self, key: &K) -> StoreKey {
        self.key_with(key, self.group_of(key).as_deref())
    }

    /// Logs a store failure that the cache worked around, at most once a second
    /// per cache (see [`LogLimit`]).
    pub(crate) fn warn_store(&self, what: &str, key: &StoreKey, e: &StoreError) {
        let Some(held_back) = self.store_warnings.allow(self.s.clock.coarse_ms()) else {
            return;
        };
        tracing::warn!(cache = self.namespace(), key = key.user_key(), error = %crate::Report(&e), held_back,
            "{what}");
    }

    pub(crate) fn store_error(&self, key: &StoreKey, e: StoreError) -> Error {
        self.counters.store_errors.inc();
        Error::store(self.namespace(), key.user_key(), e)
    }

    /// Classifies and counts what a lookup found.
    #[inline]
    fn found(&self, value: Option<V>, meta: Meta, count: bool) -> Lookup<V> {
        let state = if meta.soft_expiry_ms == 0 {
            State::Fresh
        } else {
            self.s.fresh.state(&meta, self.s.clock.coarse_ms())
        };
        match state {
            State::Fresh => {
                if count {
                    if value.is_some() {
                        self.counters.hits.inc();
                    } else {
                        self.counters.negative_hits.inc();
                    }
                }
                Lookup::Fresh(value, meta)
            }
            State::Stale => {
                if count {
                    self.counters.hits.inc();
                    self.counters.stale_hits.inc();
                }
                Lookup::Stale(value, meta)
            }
            State::Expired(past) => {
                self.count_miss(count);
                Lookup::Expired(value, past)
            }
        }
    }

    fn count_miss(&self, count: bool) {
        if count {
            self.counters.misses.inc();
        }
    }

    /// A hit in the cache's in-process table (or near cache), when it needs no
    /// more than the value: no groups, no soft expiry, and in the typed table
    /// no tags (a near cache drops every entry on a tag invalidation). Counts
    /// only hits; everything else (`None`) takes the full path, which counts it.
    #[inline]
    pub(crate) fn local_hit(&self, key: &K, count: bool) -> Option<Option<V>> {
        if self.group.is_some() {
            return None;
        }
        let Some(local) = &self.local else {
            // A near cache's hit is just as local.
            return self.near_hit(key, None, count);
        };
        if self.tags.is_some() {
            return None;
        }
        let value = local.hit(key)?;
        if count {
            if value.is_some() {
                self.counters.hits.inc();
            } else {
                self.counters.negative_hits.inc();
            }
        }
        Some(value)
    }

    /// [`found`](Self::found), once the entry's tags are checked: an entry
    /// one of whose tags was invalidated since it was filled is a miss, and
    /// the next load replaces it (as a corrupt entry is replaced).
    async fn found_current(&self, value: Option<V>, meta: Meta, count: bool) -> Lookup<V> {
        match self.tags_current(&meta).await {
            Ok(true) => self.found(value, meta, count),
            Ok(false) => {
                self.count_miss(count);
                Lookup::Missing { corrupt: true }
            }
            Err(e) => {
                self.counters.store_errors.inc();
                Lookup::Failed(e)
            }
        }
    }

    /// A lookup on the cache's typed table; in a cache with tags, the entry's
    /// tags are checked as on a shared store.
    #[inline]
    async fn lookup_typed(
        &self,
        local: &TypedTier<K, V>,
        key: &K,
        group: Option<&str>,
        count: bool,
    ) -> Lookup<V> {
        let Some(slot) = local.get(key, group) else {
            self.count_miss(count);
            return Lookup::Missing { corrupt: false };
        };
        let (value, meta) = slot.into_parts();
        if self.tags.is_none() {
            return self.found(value, meta, count);
        }
        self.found_current(value, meta, count).await
    }

    pub(crate) async fn lookup_shared(&self, key: &StoreKey, count: bool) -> Lookup<V> {
        let started = std::time::Instant::now();
        let read = match self.s.store.get_now(key) {
            Some(read) => Ok(read),
            None => self.s.store.get(key).await,
        };
        self.classify(key, read, started, count).await
    }

    /// What a read of the shared store means for the key: decoded, counted,
    /// and classified by freshness.
    async fn classify(
        &self,
        key: &StoreKey,
        read: Result<Read, StoreError>,
        started: std::time::Instant,
        count: bool,
    ) -> Lookup<V> {
        match read {
            Ok(Read::Hit(entry)) => {
                let meta = entry.meta.clone();
                match self.decode(key, entry) {
                    Some(v) => {
                        if count {
                            let took = started.elapsed();
                            self.histograms.store_hit.observe(took);
                        }
                        self.found_current(v, meta, count).await
                    }
                    None => {
                        self.count_miss(count);
                        Lookup::Missing { corrupt: true }
                    }
                }
            }
            Ok(Read::Miss) => {
                self.count_miss(count);
                Lookup::Missing { corrupt: false }
            }
            Ok(Read::Corrupt) => {
                self.decode_failed(key, &"stored bytes are not a cachet entry");
                self.count_miss(count);
                Lookup::Missing { corrupt: true }
            }
            Err(e) => {
                self.counters.store_errors.inc();
                Lookup::Failed(e)
            }
        }
    }

    /// Stage 1 of the read path: what the tiers hold for `key`, the near cache
    /// first. A fresh value read from the shared store is put in the near cache.
    #[inline]
    pub(crate) async fn lookup_tiers(&self, key: &K, count: bool) -> Found<V> {
        let group = self.group_of(key);
        let Some(local) = &self.local else {
            if let Some(v) = self.near_hit(key, group.as_deref(), count) {
                return Found::Near(v);
            }
            let skey = self.key_with(key, group.as_deref());
            let ticket = self.near.as_ref().and_then(|n| n.ticket(&skey));
            let lookup = self.lookup_shared(&skey, count).await;
            if let Lookup::Fresh(v, meta) = &lookup {
                self.near_put(key, &skey, ticket, v, meta.soft_expiry_ms);
            }
            let at = At {
                group,
                skey: Some(skey),
                ticket,
            };
            return Found::Tier(at, lookup);
        };
        let lookup = (self.lookup_typed(&**local, key, group.as_deref(), count)).await;
        let at = At {
            group,
            skey: None,
            ticket: None,
        };
        Found::Tier(at, lookup)
    }

    /// Stage 1 for many keys: [`lookup_tiers`](Self::lookup_tiers) for each,
    /// the shared store's reads sent as one batch read.
    pub(crate) async fn lookup_tiers_many(&self, keys: &[&K], count: bool) -> Vec<Found<V>> {
        let mut found = Vec::with_capacity(keys.len());
        if self.local.is_some() {
            // In-process lookups never wait: one by one.
            for key in keys {
                found.push(self.lookup_tiers(key, count).await);
            }
            return found;
        }
        let mut pending = Vec::new();
        let mut skeys = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let group = self.group_of(key);
            if let Some(v) = self.near_hit(key, group.as_deref(), count) {
                found.push(Found::Near(v));
                continue;
            }
            let skey = self.key_with(key, group.as_deref());
            let ticket = self.near.as_ref().and_then(|n| n.ticket(&skey));
            // A placeholder, replaced below.
            found.push(Found::Near(None));
            pending.push((i, group, ticket));
            skeys.push(skey);
        }
        if skeys.is_empty() {
            return found;
        }
        let started = std::time::Instant::now();
        let reads = self.s.store.get_many(&skeys).await;
        let mut reads = match reads {
            Ok(reads) => reads.into_iter().map(Ok).collect(),
            Err(e) => each_failed(e, skeys.len()),
        };
        // With tags, each hit reads its tags' generations: concurrently.
        // Without, classifying never waits: one after the other, without
        // `join_all`'s bookkeeping (most of a batch hit's cost otherwise).
        let tagged = reads
            .iter()
            .any(|r| matches!(r, Ok(Read::Hit(entry)) if entry.meta.tags.is_some()));
        let classify = pending.into_iter().zip(skeys).zip(reads.drain(..)).map(
            |(((i, group, ticket), skey), read)| async move {
                let lookup = self.classify(&skey, read, started, count).await;
                if let Lookup::Fresh(v, meta) = &lookup {
                    self.near_put(keys[i], &skey, ticket, v, meta.soft_expiry_ms);
                }
                let at = At {
                    group,
                    skey: Some(skey),
                    ticket,
                };
                (i, Found::Tier(at, lookup))
            },
        );
        if tagged {
            for (i, f) in join_all(classify).await {
                found[i] = f;
            }
        } else {
            for classified in classify {
                let (i, f) = classified.await;
                found[i] = f;
            }
        }
        found
    }

    /// Writes `value` unconditionally, or version-checked, revoking any lease.
    pub(crate) async fn put(
        &self,
        key: &K,
        skey: &StoreKey,
        value: V,
        versioned: bool,
    ) -> Result<Versioned, Error> {
        if let Some(local) = &self.local {
            let Some((mut meta, ttl)) = self.placement(key, Some(&value), Duration::ZERO) else {
                local.invalidate(key);
                return Ok(Versioned::Written);
            };
            meta.tags = self.write_tags(key, skey, &value).await?;
            let slot = Slot::new(Some(value), meta);
            return Ok(if versioned {
                local.set_versioned(key, skey.group(), slot, ttl)
            } else {
                local.set(key, skey.group(), slot, ttl);
                Versioned::Written
            });
        }
        let Some((entry, ttl)) = self.stored_entry(key, skey, &value).await? else {
            // The policy keeps this value out of the cache: the old one goes.
            return self.remove(key, skey).await.map(|()| Versioned::Written);
        };
        let store = &self.s.store;
        let written = if versioned {
            match store.versioned_set() {
                Some(v) => v.set_versioned(skey, entry, ttl).await,
                None => Err(Capability::VersionedSet.missing()),
            }
        } else {
            store
                .set(skey, entry, ttl)
                .await
                .map(|()| Versioned::Written)
        };
        written.map_err(|e| self.store_error(skey, e))
    }

    /// The entry a write of `value` sends to a shared store, and its TTL: where
    /// the policy places it (TTL, soft expiry, version), its tags, then its
    /// payload (codec, size limit). `None` when the policy keeps the value out
    /// of the cache. Every write to a shared store goes through here: `set`,
    /// `write_through`, and write-behind's script.
    pub(crate) async fn stored_entry(
        &self,
        key: &K,
        skey: &StoreKey,
        value: &V,
    ) -> Result<Option<(Entry, Duration)>, Error> {
        let Some((mut meta, ttl)) = self.placement(key, Some(value), Duration::ZERO) else {
            return Ok(None);
        };
        meta.tags = self.write_tags(key, skey, value).await?;
        Ok(Some((self.entry_for(skey, meta, Some(value))?, ttl)))
    }

    /// Deletes `key`'s entry and revokes its lease.
    pub(crate) async fn remove(&self, key: &K, skey: &StoreKey) -> Result<(), Error> {
        match &self.local {
            Some(local) => {
                local.invalidate(key);
                Ok(())
            }
            None => (self.s.store.invalidate(skey).await).map_err(|e| self.store_error(skey, e)),
        }
    }

    /// Moves `group` to a new generation.
    pub(crate) async fn bump_group(&self, gkey: &GroupKey) -> Result<(), Error> {
        if let Some(local) = &self.local {
            local.invalidate_group(gkey.group());
            return Ok(());
        }
        let bumped = match self.s.store.groups() {
            Some(groups) => groups.invalidate_group(gkey).await,
            None => Err(Capability::Groups.missing()),
        };
        bumped.map_err(|e| {
            self.counters.store_errors.inc();
            Error::new(
                crate::ErrorKind::Store,
                self.namespace(),
                Some(gkey.as_str()),
                Some(Box::new(e)),
            )
        })
    }

    /// The remaining TTL of `key`'s entry.
    pub(crate) async fn entry_ttl(&self, key: &K) -> Result<Option<Duration>, Error> {
        if let Some(local) = &self.local {
            return Ok(local.ttls(key).entry);
        }
        let skey = self.key_of(key);
        match self.s.store.ttl(&skey).await {
            // A key without a TTL (`Duration::MAX`) is not an entry cachet wrote.
            Ok(ttls) => Ok(ttls.entry.filter(|ttl| *ttl != Duration::MAX)),
            Err(e) => Err(self.store_error(&skey, e)),
        }
    }

    /// A lookup on whichever store the cache has.
    pub(crate) async fn lookup(&self, key: &K, skey: &StoreKey, count: bool) -> Lookup<V> {
        match &self.local {
            Some(local) => self.lookup_typed(&**local, key, skey.group(), count).await,
            None => self.lookup_shared(skey, count).await,
        }
    }

    /// Decodes an entry: `Some(None)` for a negative entry, `None` (counted) if it
    /// does not decode.
    fn decode(&self, key: &StoreKey, entry: Entry) -> Option<Option<V>> {
        if entry.meta.negative {
            return Some(None);
        }
        match entry.payload {
            Payload::Object(obj) => match obj.downcast_ref::<V>() {
                Some(v) => Some(Some(v.clone())),
                None => {
                    self.decode_failed(key, &"stored object has another type");
                    None
                }
            },
            Payload::Bytes(bytes) => match self.s.codec.decode(&bytes) {
                Ok(v) => Some(Some(v)),
                Err(e) => {
                    self.decode_failed(key, &e);
                    None
                }
            },
            Payload::Empty => {
                self.decode_failed(key, &"positive entry without payload");
                None
            }
        }
    }

    fn decode_failed(&self, key: &StoreKey, why: &dyn fmt::Display) {
        self.counters.decode_errors.inc();
        tracing::debug!(cache = self.namespace(), key = key.user_key(), %why,
            "undecodable entry treated as a miss");
    }

    /// `v` encoded with the cache's codec, within `max_value_bytes`.
    ///
    /// The codec writes into a buffer this thread keeps from one encoding to
    /// the next, and the payload is copied out at its size: one allocation,
    /// where a fresh `Vec` grew (a reallocation each time) and then needed
    /// another allocation to become `Bytes` with room to spare.
    fn encode(&self, key: &StoreKey, v: &V) -> Result<Bytes, Error> {
        /// A buffer grown past this is not kept.
        const KEPT: usize = 64 * 1024;
        thread_local! {
            static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let checked = |buf: &[u8], encoded: Result<(), CodecError>| {
            encoded.map_err(|e| Error::codec(self.namespace(), key.user_key(), e))?;
            match self.s.max_value_bytes {
                Some(limit) if buf.len() > limit.bytes => Err(Error::too_large(
                    self.namespace(),
                    key.user_key(),
                    buf.len(),
                    limit,
                )),
                _ => Ok(Bytes::copy_from_slice(buf)),
            }
        };
        BUFFER.with(|buffer| {
            // A codec that encodes through this cache (it should not) gets a
            // buffer of its own.
            let Ok(mut buf) = buffer.try_borrow_mut() else {
                let mut buf = Vec::new();
                let encoded = self.s.codec.encode(v, &mut buf);
                return checked(&buf, encoded);
            };
            buf.clear();
            let encoded = self.s.codec.encode(v, &mut buf);
            let payload = checked(&buf, encoded);
            if buf.capacity() > KEPT {
                *buf = Vec::new();
            }
            payload
        })
    }

    /// The entry to send for `value`: an error if it does not encode, or if
    /// it is larger than the store accepts (then it is never sent).
    pub(crate) fn entry_for(
        &self,
        key: &StoreKey,
        meta: Meta,
        value: Option<&V>,
    ) -> Result<Entry, Error> {
        let payload = match value {
            None => Payload::Empty,
            Some(v) => match self.kind {
                PayloadKind::Object => Payload::Object(Arc::new(v.clone())),
                PayloadKind::Bytes => Payload::Bytes(self.encode(key, v)?),
            },
        };
        Ok(Entry { meta, payload })
    }

    /// The envelope and store TTL for writing `value` for `key` now; `None`
    /// when the expiry policy says not to cache it.
    pub(crate) fn placement(
        &self,
        key: &K,
        value: Option<&V>,
        load_time: Duration,
    ) -> Option<(Meta, Duration)> {
        let mut meta = Meta {
            negative: value.is_none(),
            load_time_us: u32::try_from(load_time.as_micros()).unwrap_or(u32::MAX),
            version: match (value, &self.s.version_of) {
                (Some(v), Some(version_of)) => version_of(v),
                _ => 0,
            },
            ..Meta::default()
        };
        let fresh = self.expiry.fresh_for(key, value)?;
        if value.is_none() || !self.s.fresh.soft() {
            // The load time serves early refresh only, which needs a soft
            // expiry: without one it takes no room in the entry.
            meta.load_time_us = 0;
            return Some((meta, fresh));
        }
        let fresh_ms = u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX);
        meta.soft_expiry_ms = self.s.clock.now_ms().saturating_add(fresh_ms).max(1);
        Some((meta, fresh + self.s.fresh.retention()))
    }

    /// Read-or-lease.
    pub(crate) async fn acquire(
        &self,
        key: &K,
        skey: &StoreKey,
        mode: AcquireMode,
    ) -> Result<Claim<V>, StoreError> {
        let claim = self.acquire_untagged(key, skey, mode).await?;
        if self.tags.is_none() {
            return Ok(claim.0);
        }
        Ok(match claim {
            (Claim::Leased(token), _) => {
                Claim::Leased(token.with_tag_clock(self.tag_clock().await?))
            }
            (Claim::Hit(v), Some(meta)) => {
                if self.tags_current(&meta).await? {
                    Claim::Hit(v)
                } else {
                    Claim::Corrupt
                }
            }
            (claim, _) => claim,
        })
    }

    /// Read-or-lease, the tags aside: the claim, and the envelope of a hit.
    async fn acquire_untagged(
        &self,
        key: &K,
        skey: &StoreKey,
        mode: AcquireMode,
    ) -> Result<(Claim<V>, Option<Meta>), StoreError> {
        if let Some(local) = &self.local {
            return Ok(
                match local.acquire(key, skey.group(), mode, self.s.lease_ttl) {
                    Acquired::Hit(slot) => {
                        let (value, meta) = slot.into_parts();
                        (Claim::Hit(value), Some(meta))
                    }
                    Acquired::Leased(token) => (Claim::Leased(token), None),
                    Acquired::Busy(left) => (Claim::Busy(Some(left)), None),
                },
            );
        }
        let acquired = self.s.store.acquire(skey, mode, self.s.lease_ttl).await?;
        Ok(self.claim_of(skey, acquired))
    }

    /// [`acquire`](Self::acquire) for many keys: on a shared store one batch
    /// call (on Redis one script per hash slot).
    pub(crate) async fn acquire_many(
        &self,
        keys: &[(&K, &StoreKey)],
        mode: AcquireMode,
    ) -> Result<Vec<Claim<V>>, StoreError> {
        // A local table never waits; with tags, each claim's tags are checked.
        if self.local.is_some() || self.tags.is_some() {
            let mut claims = Vec::with_capacity(keys.len());
            for (key, skey) in keys {
                claims.push(self.acquire(key, skey, mode).await?);
            }
            return Ok(claims);
        }
        let skeys: Vec<StoreKey> = keys.iter().map(|(_, skey)| (*skey).clone()).collect();
        let acquired = self
            .s
            .store
            .acquire_many(&skeys, mode, self.s.lease_ttl)
            .await?;
        Ok(skeys
            .iter()
            .zip(acquired)
            .map(|(skey, a)| self.claim_of(skey, a).0)
            .collect())
    }

    /// What a store's read-or-lease answer means for the key, decoded, with
    /// the envelope of a hit.
    fn claim_of(&self, skey: &StoreKey, acquired: Acquire) -> (Claim<V>, Option<Meta>) {
        match acquired {
            Acquire::Hit(entry) => {
                let meta = entry.meta.clone();
                match self.decode(skey, entry) {
                    Some(v) => (Claim::Hit(v), Some(meta)),
                    None => (Claim::Corrupt, None),
                }
            }
            Acquire::Corrupt => {
                self.decode_failed(skey, &"stored bytes are not a cachet entry");
                (Claim::Corrupt, None)
            }
            Acquire::Leased(token) => (Claim::Leased(token), None),
            Acquire::Busy { expires_in } => (Claim::Busy(expires_in), None),
        }
    }

    /// Fill-if-lease-valid. `Err` carries a codec or store failure, already logged.
    pub(crate) async fn fill(
        &self,
        key: &K,
        skey: &StoreKey,
        token: &LeaseToken,
        mut meta: Meta,
        value: &Option<V>,
        ttl: Duration,
    ) -> Result<Fill, ()> {
        match (self.claim_tags(key, skey, value.as_ref(), token.tag_clock())).await {
            Ok(Claimed::Tags(tags)) => meta.tags = tags,
            Ok(Claimed::Refused) => return Ok(Fill::Refused),
            Err(e) => {
                tracing::error!(error = %crate::Report(&e),
                    "the loaded value is returned but not cached");
                return Err(());
            }
        }
        if let Some(local) = &self.local {
            let slot = Slot::new(value.clone(), meta);
            return Ok(local.fill(key, skey.group(), token, slot, ttl));
        }
        let entry = match self.entry_for(skey, meta, value.as_ref()) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::error!(error = %crate::Report(&e),
                    "the loaded value is returned but not cached");
                return Err(());
            }
        };
        self.s
            .store
            .fill(skey, token, entry, ttl)
            .await
            .map_err(|e| {
                self.counters.store_errors.inc();
                self.warn_store(
                    "fill failed; the value is returned but not cached",
                    skey,
                    &e,
                );
            })
    }

    pub(crate) async fn release(&self, key: &K, skey: &StoreKey, token: &LeaseToken) {
        if let Some(local) = &self.local {
            local.release(key, token);
            return;
        }
        if let Err(e) = self.s.store.release(skey, token).await {
            self.counters.store_errors.inc();
            tracing::debug!(key = %skey, error = %crate::Report(&e), "releasing a lease failed; it expires by its TTL");
        }
    }

    /// Releases a lease without waiting (from a destructor, or after a fill
    /// the store failed): at once in process, in a task on a shared store
    /// (without a runtime the lease simply expires).
    pub(crate) fn release_soon(&self, key: &K, skey: &StoreKey, token: LeaseToken) {
        if let Some(local) = &self.local {
            local.release(key, &token);
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = Arc::clone(&self.s.store);
            let key = skey.clone();
            rt.spawn(async move {
                let _ = store.release(&key, &token).await;
            });
        }
    }

    /// A fail-safe fallback this process serves without asking the source,
    /// after a failed load of `skey`.
    pub(crate) fn throttled_fallback(&self, skey: &StoreKey) -> Option<Option<V>> {
        let (until, value) = self.throttled.get(skey.as_str())?;
        if self.s.clock.coarse_ms() < until {
            Some(value)
        } else {
            self.throttled.remove(skey.as_str());
            None
        }
    }

    /// Serves `fallback` for `skey` without loading, for the fail-safe throttle.
    pub(crate) fn throttle(&self, skey: &StoreKey, fallback: Option<V>) {
        if let Some(fs) = self.s.fresh.fail_safe
            && !fs.throttle.is_zero()
        {
            let ms = u64::try_from(fs.throttle.as_millis()).unwrap_or(u64::MAX);
            let until = self.s.clock.coarse_ms().saturating_add(ms);
            self.throttled
                .insert(skey.as_str().into(), (until, fallback));
        }
    }

    /// Forgets everything this process holds about `key` besides the store: a
    /// load in flight (later callers start a new one), a throttled fallback,
    /// the near cache's entry.
    pub(crate) fn forget(&self, key: &K, skey: &StoreKey) {
        self.flights.detach(skey.as_str());
        if self.s.fresh.fail_safe.is_some() {
            self.throttled.remove(skey.as_str());
        }
        if let Some(near) = &self.near {
            near.invalidate(key, skey);
        }
    }

    /// A near-cache hit, counted. Inlined, so that a call without a group
    /// is the table's hit alone.
    #[inline(always)]
    pub(crate) fn near_hit(&self, key: &K, group: Option<&str>, count: bool) -> Option<Option<V>> {
        let v = self.near.as_ref()?.get(key, group)?;
        if count {
            if v.is_some() {
                self.counters.near_hits.inc();
            } else {
                self.counters.negative_hits.inc();
            }
        }
        Some(v)
    }

    /// Fills the near cache with a fresh value, if the ticket still holds.
    pub(crate) fn near_put(
        &self,
        key: &K,
        skey: &StoreKey,
        ticket: Option<crate::near::Ticket>,
        value: &Option<V>,
        soft_expiry_ms: u64,
    ) {
        if let (Some(near), Some(ticket)) = (&self.near, ticket) {
            let mut ttl = self.near_ttl(key, value);
            if soft_expiry_ms != 0 {
                // L1 never serves a value past its soft expiry.
                let left = soft_expiry_ms.saturating_sub(self.s.clock.coarse_ms());
                ttl = ttl.min(Duration::from_millis(left));
            }
            near.put(key, skey.group(), ticket, value.clone(), ttl);
        }
    }
}

/// A batch read's failure as the failure of each of its `n` reads: the first
/// carries the error, the others its kind and message.
pub(crate) fn each_failed<T>(e: StoreError, n: usize) -> Vec<Result<T, StoreError>> {
    let copy = || StoreError::new(e.kind(), cachet_core::Report(&e).to_string());
    let mut failed: Vec<_> = (1..n).map(|_| Err(copy())).collect();
    failed.insert(0, Err(e));
    failed
}

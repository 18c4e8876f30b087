//! [`Cache`]: the typed front end over a store.
//!
//! The read-through algorithm (lookup, single-flight, acquire, load, fill) is
//! written once, in [`Cache::get_or_load`] and the `Inner::load*` methods; the
//! `Inner` primitives below it (`lookup`, `acquire`, `fill`, `release`, …) are the
//! only places that know whether the store is a cache's typed in-process table or
//! a [`Store`] reached through the protocol.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachet_core::{
    Acquire, AcquireMode, CacheKey, Entry, Fill, KeyLayout, LeaseToken, Meta, Payload, PayloadKind,
    Read, Store, StoreError, StoreKey,
};
use rand::Rng as _;

use crate::Error;
use crate::bloom::BloomFilter;
use crate::builder::CacheBuilder;
use crate::codec::Codec;
use crate::error::BoxError;
use crate::flight::{self, Flights, Outcome, Role};
use crate::memory::{Acquired, LocalTier, Slot};
use crate::stats::{Counters, Stats};

/// How many times a caller starts over after the in-process leader it followed
/// was cancelled, before it loads on its own.
const MAX_FOLLOW_ROUNDS: usize = 8;
/// Upper bound on acquire attempts in one load, on top of the `lease_wait` deadline.
const MAX_ACQUIRE_ROUNDS: usize = 64;
/// First and largest pause while another process holds the lease.
const FIRST_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// A typed cache of `V` values under keys `K`, over a store.
///
/// Cloning is cheap; clones share everything, counters included.
///
/// See the [crate docs](crate) for the guarantees and for what concurrent
/// callers of [`get_or_load`](Cache::get_or_load) see.
pub struct Cache<K: ?Sized, V> {
    inner: Arc<Inner<K, V>>,
}

pub(crate) struct Settings<V> {
    pub(crate) layout: KeyLayout,
    pub(crate) ttl: Duration,
    pub(crate) jitter: f64,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_wait: Duration,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) codec: Arc<dyn Codec<V>>,
}

/// Maps a key to its escaped group.
pub(crate) type GroupFn<K> = Arc<dyn Fn(&K) -> String + Send + Sync>;

struct Inner<K: ?Sized, V> {
    s: Settings<V>,
    /// The filter of keys that exist, when configured.
    bloom: Option<BloomFilter>,
    /// The key's group, for caches with groups.
    group: Option<GroupFn<K>>,
    /// The cache's typed table when the store is a `MemoryStore`.
    local: Option<Arc<dyn LocalTier<K, V>>>,
    kind: PayloadKind,
    counters: Counters,
    flights: Flights<V>,
}

/// What a lookup found.
enum Lookup<V> {
    /// A value, or a cached "not found".
    Found(Option<V>),
    /// Nothing usable; `corrupt` if undecodable bytes are in the way.
    Missing { corrupt: bool },
    /// The store failed.
    Failed(StoreError),
}

/// What a read-or-lease found, decoded.
enum Claim<V> {
    Hit(Option<V>),
    Corrupt,
    Leased(LeaseToken),
    Busy(Option<Duration>),
}

impl<K: ?Sized, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: ?Sized, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner.s;
        f.debug_struct("Cache")
            .field("namespace", &s.layout.namespace())
            .field("prefix", &s.layout.prefix())
            .field("ttl", &s.ttl)
            .field("jitter", &s.jitter)
            .field("negative_ttl", &s.negative_ttl)
            .field("lease_ttl", &s.lease_ttl)
            .field("lease_wait", &s.lease_wait)
            .field("store", &s.store)
            .field("codec", &s.codec)
            .finish()
    }
}

impl<K, V> Cache<K, V>
where
    K: CacheKey + ?Sized,
    V: Clone + Send + Sync + 'static,
{
    /// A builder for a cache whose keys live under `namespace`.
    ///
    /// The namespace is 1 to 64 characters from `[A-Za-z0-9_.-]`; it also labels
    /// the cache's metrics.
    pub fn builder(namespace: impl Into<String>) -> CacheBuilder<K, V> {
        CacheBuilder::new(namespace.into())
    }

    pub(crate) fn from_settings(
        s: Settings<V>,
        group: Option<GroupFn<K>>,
        local: Option<Arc<dyn LocalTier<K, V>>>,
        bloom: Option<BloomFilter>,
    ) -> Self {
        let kind = s.store.payload_kind();
        let counters = Counters::new(s.layout.namespace());
        Self {
            inner: Arc::new(Inner {
                s,
                bloom,
                group,
                local,
                kind,
                counters,
                flights: Flights::new(),
            }),
        }
    }

    /// Reads a value. `Ok(None)` when there is no entry or the entry is a cached
    /// "not found"; undecodable entries count as misses.
    ///
    /// # Errors
    /// When the store fails.
    #[inline]
    pub async fn get(&self, key: &K) -> Result<Option<V>, Error> {
        self.read(key, true).await
    }

    /// Like [`get`](Self::get), but not counted in the statistics.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn peek(&self, key: &K) -> Result<Option<V>, Error> {
        self.read(key, false).await
    }

    #[inline]
    async fn read(&self, key: &K, count: bool) -> Result<Option<V>, Error> {
        let inner = &*self.inner;
        if let Some(local) = &inner.local {
            let group = inner.group_of(key);
            return Ok(
                match inner.lookup_local(&**local, key, group.as_deref(), count) {
                    Lookup::Found(v) => v,
                    _ => None,
                },
            );
        }
        let skey = inner.key_of(key);
        match inner.lookup_shared(&skey, count).await {
            Lookup::Found(v) => Ok(v),
            Lookup::Missing { .. } => Ok(None),
            Lookup::Failed(e) => Err(inner.store_error(&skey, e)),
        }
    }

    /// Reads a value, and on a miss loads it with `loader` and fills the cache,
    /// guarded by a lease. `loader` returns `Ok(None)` for "not found", which is
    /// cached as a negative entry for the negative TTL.
    ///
    /// Concurrent calls for one key in one process run one loader; across
    /// processes, one caller holds the lease and the others wait for its fill (at
    /// most `lease_wait`). If the store fails, the loader's value is returned
    /// without caching. See the [crate docs](crate#concurrent-calls-on-the-same-key).
    ///
    /// # Errors
    /// When the loader fails, an [`ErrorKind::Load`](crate::ErrorKind::Load)
    /// error naming the key, whose source is the loader's error. Store failures
    /// are not errors here: the loader's value is returned instead.
    pub async fn get_or_load<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        let (skey, first) = match &inner.local {
            Some(local) => {
                let group = inner.group_of(key);
                match inner.lookup_local(&**local, key, group.as_deref(), true) {
                    Lookup::Found(v) => return Ok(v),
                    other => (inner.key_with(key, group.as_deref()), other),
                }
            }
            None => {
                let skey = inner.key_of(key);
                match inner.lookup_shared(&skey, true).await {
                    Lookup::Found(v) => return Ok(v),
                    other => (skey, other),
                }
            }
        };
        if let Some(bloom) = &inner.bloom
            && !matches!(first, Lookup::Failed(_))
        {
            match bloom.might_contain(key).await {
                Ok(true) => {}
                Ok(false) => {
                    inner.counters.bloom_rejections.inc();
                    return Ok(None);
                }
                // Unknown: the load goes on.
                Err(e) => {
                    inner.counters.store_errors.inc();
                    tracing::debug!(cache = self.namespace(), key = skey.user_key(), error = %e,
                        "Bloom filter check failed; loading");
                }
            }
        }
        let (mode, store_up) = match first {
            Lookup::Found(_) | Lookup::Missing { corrupt: false } => (AcquireMode::IfAbsent, true),
            Lookup::Missing { corrupt: true } => (AcquireMode::Replace, true),
            Lookup::Failed(e) => {
                tracing::warn!(cache = self.namespace(), key = skey.user_key(), error = %e,
                    "store read failed; loading from the source without caching");
                (AcquireMode::IfAbsent, false)
            }
        };
        for _ in 0..MAX_FOLLOW_ROUNDS {
            match inner.flights.join(skey.as_str()) {
                Role::Leader(leader) => {
                    let outcome = inner.load(key, &skey, mode, store_up, loader).await;
                    leader.finish(&outcome);
                    return outcome;
                }
                Role::Follower(rx) => {
                    if let Some(outcome) = flight::follow(rx).await {
                        return outcome;
                    }
                    // The leader was cancelled: start over, perhaps as leader.
                }
            }
        }
        inner.load(key, &skey, mode, store_up, loader).await
    }

    /// Writes a value with a (jittered) TTL, replacing any entry and revoking any
    /// lease, so that a load that started before this write cannot overwrite it.
    ///
    /// # Errors
    /// When the value cannot be encoded or the store fails.
    pub async fn set(&self, key: &K, value: V) -> Result<(), Error> {
        let inner = &*self.inner;
        let skey = inner.key_of(key);
        inner.flights.detach(skey.as_str());
        if let Some(bloom) = &inner.bloom
            && let Err(e) = bloom.insert(key).await
        {
            return Err(inner.store_error(&skey, e));
        }
        let ttl = inner.value_ttl();
        if let Some(local) = &inner.local {
            local.set(key, skey.group(), Slot::new(Some(value)), ttl);
            return Ok(());
        }
        let entry = inner
            .entry_for(Meta::default(), Some(&value))
            .map_err(|e| Error::codec(self.namespace(), skey.user_key(), e))?;
        inner
            .s
            .store
            .set(&skey, entry, ttl)
            .await
            .map_err(|e| inner.store_error(&skey, e))
    }

    /// Deletes the entry and revokes any lease: a load that read the source before
    /// the write that led to this call cannot fill. Call it after the write commits.
    ///
    /// # Errors
    /// When the store fails; the entry may then still be there until its TTL.
    pub async fn invalidate(&self, key: &K) -> Result<(), Error> {
        let inner = &*self.inner;
        let skey = inner.key_of(key);
        inner.flights.detach(skey.as_str());
        if let Some(local) = &inner.local {
            local.invalidate(key);
            return Ok(());
        }
        inner
            .s
            .store
            .invalidate(&skey)
            .await
            .map_err(|e| inner.store_error(&skey, e))
    }

    /// A delayed double-delete: queues a second invalidation of `key` to run after
    /// `delay`, then invalidates now.
    ///
    /// The second delete clobbers a value that a writer or reader *without* a
    /// lease (legacy code, another service, plain `set` after a stale read) put
    /// back after the first one. Fills through [`get_or_load`](Self::get_or_load)
    /// do not need it. The queue lives in the store, so on Redis the second
    /// delete survives this process; a [`DeferredWorker`](crate::DeferredWorker)
    /// must run somewhere to execute it. The delete is queued before the first
    /// one runs, so a crash in between still leaves the queued one.
    ///
    /// # Errors
    /// When the store fails to queue or to delete; the other step is still tried.
    pub async fn invalidate_twice(&self, key: &K, delay: Duration) -> Result<(), Error> {
        let inner = &*self.inner;
        let skey = inner.key_of(key);
        let queued = inner.s.store.defer_invalidate(&skey, delay).await;
        let now = self.invalidate(key).await;
        queued.map_err(|e| inner.store_error(&skey, e))?;
        now
    }

    /// Invalidates every key of `group` at once, in O(1): the group gets a new
    /// generation, entries of older ones read as misses and expire by their TTL,
    /// and loads that took their lease before cannot fill. The group's
    /// generation is a `:sys:` key; if it is evicted, it comes back as a value it
    /// never had, so old entries never reappear.
    ///
    /// `group` must be written like the values the cache's
    /// [`group_by`](crate::CacheBuilder::group_by) function returns.
    ///
    /// # Errors
    /// When the cache has no groups, or the store fails.
    pub async fn invalidate_group<G: CacheKey + ?Sized>(&self, group: &G) -> Result<(), Error> {
        let inner = &*self.inner;
        if inner.group.is_none() {
            return Err(Error::config(
                self.namespace(),
                "invalidate_group needs a cache built with group_by",
            ));
        }
        let gkey = inner.s.layout.group_key(group);
        if let Some(local) = &inner.local {
            local.invalidate_group(gkey.group());
            return Ok(());
        }
        inner.s.store.invalidate_group(&gkey).await.map_err(|e| {
            inner.counters.store_errors.inc();
            Error::new(
                crate::ErrorKind::Store,
                self.namespace(),
                Some(gkey.as_str()),
                Some(Box::new(e)),
            )
        })
    }

    /// The remaining TTL of `key`'s entry, `None` if there is none.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn ttl(&self, key: &K) -> Result<Option<Duration>, Error> {
        let inner = &*self.inner;
        if let Some(local) = &inner.local {
            return Ok(local.ttls(key).entry);
        }
        let skey = inner.key_of(key);
        match inner.s.store.ttl(&skey).await {
            Ok(ttls) => Ok(ttls.entry),
            Err(e) => Err(inner.store_error(&skey, e)),
        }
    }

    /// A snapshot of this cache's counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// The cache's namespace.
    pub fn namespace(&self) -> &str {
        self.inner.s.layout.namespace()
    }

    /// The store key under which `key`'s entry lives.
    pub fn store_key(&self, key: &K) -> StoreKey {
        self.inner.key_of(key)
    }

    /// The cache's key layout.
    pub fn layout(&self) -> &KeyLayout {
        &self.inner.s.layout
    }

    /// The store this cache was built on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.s.store
    }

    /// The cache's Bloom filter, when built with [`bloom`](crate::CacheBuilder::bloom):
    /// insert new keys into it and rebuild it from the source.
    pub fn bloom(&self) -> Option<&BloomFilter> {
        self.inner.bloom.as_ref()
    }
}

impl<K, V> Inner<K, V>
where
    K: CacheKey + ?Sized,
    V: Clone + Send + Sync + 'static,
{
    fn namespace(&self) -> &str {
        self.s.layout.namespace()
    }

    #[inline]
    fn group_of(&self, key: &K) -> Option<String> {
        self.group.as_ref().map(|g| g(key))
    }

    fn key_with(&self, key: &K, group: Option<&str>) -> StoreKey {
        match group {
            Some(group) => self.s.layout.key_in_group(group, key),
            None => self.s.layout.key(key),
        }
    }

    fn key_of(&self, key: &K) -> StoreKey {
        self.key_with(key, self.group_of(key).as_deref())
    }

    fn store_error(&self, key: &StoreKey, e: StoreError) -> Error {
        self.counters.store_errors.inc();
        Error::store(self.namespace(), key.user_key(), e)
    }

    fn count_found(&self, found: &Option<V>, count: bool) {
        if count {
            if found.is_some() {
                self.counters.hits.inc();
            } else {
                self.counters.negative_hits.inc();
            }
        }
    }

    fn count_miss(&self, count: bool) {
        if count {
            self.counters.misses.inc();
        }
    }

    #[inline]
    fn lookup_local(
        &self,
        local: &dyn LocalTier<K, V>,
        key: &K,
        group: Option<&str>,
        count: bool,
    ) -> Lookup<V> {
        match local.get(key, group) {
            Some(slot) => {
                self.count_found(&slot.value, count);
                Lookup::Found(slot.value)
            }
            None => {
                self.count_miss(count);
                Lookup::Missing { corrupt: false }
            }
        }
    }

    async fn lookup_shared(&self, key: &StoreKey, count: bool) -> Lookup<V> {
        let read = match self.s.store.get_now(key) {
            Some(read) => Ok(read),
            None => self.s.store.get(key).await,
        };
        match read {
            Ok(Read::Hit(entry)) => match self.decode(key, entry) {
                Some(v) => {
                    self.count_found(&v, count);
                    Lookup::Found(v)
                }
                None => {
                    self.count_miss(count);
                    Lookup::Missing { corrupt: true }
                }
            },
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

    fn entry_for(&self, meta: Meta, value: Option<&V>) -> Result<Entry, BoxError> {
        let payload = match value {
            None => Payload::Empty,
            Some(v) => match self.kind {
                PayloadKind::Object => Payload::Object(Arc::new(v.clone())),
                PayloadKind::Bytes => {
                    let mut buf = Vec::new();
                    self.s.codec.encode(v, &mut buf)?;
                    Payload::Bytes(buf.into())
                }
            },
        };
        Ok(Entry { meta, payload })
    }

    /// A value's TTL, drawn uniformly from `ttl × (1 ± jitter)`.
    fn value_ttl(&self) -> Duration {
        if self.s.jitter == 0.0 {
            return self.s.ttl;
        }
        let factor = rand::rng().random_range((1.0 - self.s.jitter)..=(1.0 + self.s.jitter));
        self.s.ttl.mul_f64(factor)
    }

    /// Read-or-lease.
    async fn acquire(
        &self,
        key: &K,
        skey: &StoreKey,
        mode: AcquireMode,
    ) -> Result<Claim<V>, StoreError> {
        if let Some(local) = &self.local {
            return Ok(
                match local.acquire(key, skey.group(), mode, self.s.lease_ttl) {
                    Acquired::Hit(slot) => Claim::Hit(slot.value),
                    Acquired::Leased(token) => Claim::Leased(token),
                    Acquired::Busy(left) => Claim::Busy(Some(left)),
                },
            );
        }
        Ok(
            match self.s.store.acquire(skey, mode, self.s.lease_ttl).await? {
                Acquire::Hit(entry) => match self.decode(skey, entry) {
                    Some(v) => Claim::Hit(v),
                    None => Claim::Corrupt,
                },
                Acquire::Corrupt => {
                    self.decode_failed(skey, &"stored bytes are not a cachet entry");
                    Claim::Corrupt
                }
                Acquire::Leased(token) => Claim::Leased(token),
                Acquire::Busy { expires_in } => Claim::Busy(expires_in),
            },
        )
    }

    /// A plain read while waiting for another caller's lease; not counted.
    async fn reread(&self, key: &K, skey: &StoreKey) -> Lookup<V> {
        match &self.local {
            Some(local) => self.lookup_local(&**local, key, skey.group(), false),
            None => self.lookup_shared(skey, false).await,
        }
    }

    /// Fill-if-lease-valid. `Err` carries a codec or store failure, already logged.
    async fn fill(
        &self,
        key: &K,
        skey: &StoreKey,
        token: &LeaseToken,
        meta: Meta,
        value: &Option<V>,
        ttl: Duration,
    ) -> Result<Fill, ()> {
        if let Some(local) = &self.local {
            let slot = Slot::new(value.clone());
            return Ok(local.fill(key, skey.group(), token, slot, ttl));
        }
        let entry = match self.entry_for(meta, value.as_ref()) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::error!(cache = self.namespace(), key = skey.user_key(), error = %e,
                    "the loaded value cannot be encoded; it is returned but not cached");
                return Err(());
            }
        };
        self.s
            .store
            .fill(skey, token, entry, ttl)
            .await
            .map_err(|e| {
                self.counters.store_errors.inc();
                tracing::warn!(cache = self.namespace(), key = skey.user_key(), error = %e,
                    "fill failed; the value is returned but not cached");
            })
    }

    async fn release(&self, key: &K, skey: &StoreKey, token: &LeaseToken) {
        if let Some(local) = &self.local {
            local.release(key, token);
            return;
        }
        if let Err(e) = self.s.store.release(skey, token).await {
            self.counters.store_errors.inc();
            tracing::debug!(key = %skey, error = %e, "releasing a lease failed; it expires by its TTL");
        }
    }

    /// Loads a missing value under a lease (or, with the store down, without).
    async fn load<F, Fut, E>(
        &self,
        key: &K,
        skey: &StoreKey,
        mut mode: AcquireMode,
        store_up: bool,
        loader: F,
    ) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        if !store_up {
            return self.load_unfilled(skey, loader).await;
        }
        let deadline = tokio::time::Instant::now() + self.s.lease_wait;
        let mut backoff = FIRST_BACKOFF;
        let mut waited = false;
        for _ in 0..MAX_ACQUIRE_ROUNDS {
            let claim = match self.acquire(key, skey, mode).await {
                Ok(claim) => claim,
                Err(e) => {
                    self.counters.store_errors.inc();
                    tracing::warn!(cache = self.namespace(), key = skey.user_key(), error = %e,
                        "taking a lease failed; loading without caching");
                    return self.load_unfilled(skey, loader).await;
                }
            };
            match claim {
                Claim::Hit(v) => return Ok(v),
                Claim::Corrupt => mode = AcquireMode::Replace,
                Claim::Leased(token) => return self.load_and_fill(key, skey, token, loader).await,
                Claim::Busy(expires_in) => {
                    if !waited {
                        self.counters.lease_waits.inc();
                        waited = true;
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        self.counters.lease_wait_timeouts.inc();
                        return self.load_unfilled(skey, loader).await;
                    }
                    let mut pause = backoff.min(deadline - now);
                    if let Some(left) = expires_in {
                        // No point sleeping past the holder's lease expiry.
                        pause = pause.min(left.max(Duration::from_millis(1)));
                    }
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // The holder has probably filled by now; a plain read is cheaper
                    // than another acquire.
                    match self.reread(key, skey).await {
                        Lookup::Found(v) => return Ok(v),
                        Lookup::Missing { corrupt: true } => mode = AcquireMode::Replace,
                        Lookup::Missing { corrupt: false } => {}
                        Lookup::Failed(e) => {
                            tracing::warn!(cache = self.namespace(), key = skey.user_key(), error = %e,
                                "store read failed while waiting for a lease; loading without caching");
                            return self.load_unfilled(skey, loader).await;
                        }
                    }
                }
            }
        }
        self.load_unfilled(skey, loader).await
    }

    async fn load_and_fill<F, Fut, E>(
        &self,
        key: &K,
        skey: &StoreKey,
        token: LeaseToken,
        loader: F,
    ) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let mut lease = LeaseGuard {
            inner: self,
            key,
            skey,
            token,
            armed: true,
        };
        let started = Instant::now();
        let loaded = loader().await;
        let load_time = started.elapsed();
        let value = match loaded {
            Ok(value) => value,
            Err(e) => {
                self.counters.load_errors.inc();
                lease.armed = false;
                self.release(key, skey, &token).await;
                return Err(Error::load(self.namespace(), skey.user_key(), e.into()));
            }
        };
        self.counters.loads.inc();
        lease.armed = false;
        let ttl = match value {
            Some(_) => Some(self.value_ttl()),
            None => self.s.negative_ttl,
        };
        let Some(ttl) = ttl else {
            // Negative caching is off.
            self.release(key, skey, &token).await;
            return Ok(value);
        };
        let meta = Meta {
            negative: value.is_none(),
            load_time_us: u32::try_from(load_time.as_micros()).unwrap_or(u32::MAX),
            ..Meta::default()
        };
        match self.fill(key, skey, &token, meta, &value, ttl).await {
            Ok(Fill::Filled) => {}
            Ok(Fill::Refused) => self.counters.refused_fills.inc(),
            Err(()) => self.release(key, skey, &token).await,
        }
        Ok(value)
    }

    async fn load_unfilled<F, Fut, E>(&self, skey: &StoreKey, loader: F) -> Outcome<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        match loader().await {
            Ok(v) => {
                self.counters.loads.inc();
                Ok(v)
            }
            Err(e) => {
                self.counters.load_errors.inc();
                Err(Error::load(self.namespace(), skey.user_key(), e.into()))
            }
        }
    }
}

/// Releases a lease if the load holding it is dropped before it ends (the
/// caller's future was cancelled), so that others need not wait for its TTL.
struct LeaseGuard<'a, K: ?Sized, V> {
    inner: &'a Inner<K, V>,
    key: &'a K,
    skey: &'a StoreKey,
    token: LeaseToken,
    armed: bool,
}

impl<K: ?Sized, V> Drop for LeaseGuard<'_, K, V> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(local) = &self.inner.local {
            local.release(self.key, &self.token);
            return;
        }
        // Without a runtime the lease simply expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = Arc::clone(&self.inner.s.store);
            let key = self.skey.clone();
            let token = self.token;
            rt.spawn(async move {
                let _ = store.release(&key, &token).await;
            });
        }
    }
}

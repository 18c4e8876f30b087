//! [`Cache`]: the typed front end over a store.
//!
//! The read path is written once, as named stages (`read.rs`: lookup → plan →
//! admission → coalesce → load and fill, the loads in tasks of their own in
//! `load.rs`); `get`, `peek` and `get_or_load` share its lookup. Writes go
//! through one routine, `Cache::write`, whose entry for a shared store
//! (`Inner::stored_entry`: policy, version, tags, codec) write-behind's script
//! writes too. The primitives in `inner.rs` are the
//! only code that knows whether the store is the cache's typed in-process table
//! or a [`Store`] reached through the protocol; `fresh.rs` decides what is
//! fresh or stale.

mod batch;
mod calls;
mod fresh;
mod inner;
mod load;
mod read;
mod tags;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cachet_core::{CacheKey, Capability, KeyLayout, Store, StoreKey, Versioned};

pub(crate) use fresh::Freshness;
pub use fresh::{FailSafe, RefreshAhead};
pub(crate) use inner::{GroupFn, Partitions, Settings, VersionFn};
pub(crate) use tags::TagsFn;

use inner::{Found, Inner, Lookup};

use crate::Error;
use crate::bloom::BloomFilter;
use crate::breaker::Guarded;
use crate::builder::CacheBuilder;
use crate::error::BoxError;
use crate::expiry::Expiry;
use crate::memory::TypedTier;
use crate::near::NearCache;
use crate::stats::Stats;

/// Applies a store's invalidation notices to a cache's near cache, until the
/// cache is dropped.
async fn follow_bus<K, V>(
    inner: std::sync::Weak<Inner<K, V>>,
    store: Arc<dyn Store>,
    head: String,
    mut stop: tokio::sync::watch::Receiver<()>,
) where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let Some(bus) = store.bus() else {
        return; // Checked when the cache was built.
    };
    let mut events = tokio::select! {
        subscribed = bus.subscribe_invalidations(&head) => match subscribed {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(cache = %head, error = %crate::Report(&e),
                    "the store offers no invalidation bus; the near cache stays unused");
                return;
            }
        },
        _ = stop.changed() => return,
    };
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.changed() => return,
        };
        let (Some(event), Some(inner)) = (event, inner.upgrade()) else {
            return;
        };
        if let Some(near) = &inner.near {
            for skey in near.apply(event) {
                inner.flights.detach(skey.as_str());
            }
        }
    }
}

/// Per-call settings of [`Cache::get_or_load_with`]; unset fields take the
/// cache's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Once this long has passed waiting for a load, return the stale value if
    /// the cache holds one (the load goes on in the background and fills).
    pub soft_timeout: Option<Duration>,
    /// Give up on a loader after this long: the call fails with a timeout
    /// error, or serves the fail-safe fallback.
    pub hard_timeout: Option<Duration>,
}

impl LoadOptions {
    /// Options that take every setting from the cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the soft timeout.
    #[must_use]
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// Sets the hard timeout.
    #[must_use]
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = Some(timeout);
        self
    }
}

/// A typed cache of `V` values under keys `K`, over a store.
///
/// Cloning is cheap; clones share everything, counters included.
///
/// See the [crate docs](crate) for the guarantees and for what concurrent
/// callers of [`get_or_load`](Cache::get_or_load) see.
pub struct Cache<K: ?Sized + ToOwned, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K: ?Sized + ToOwned, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: ?Sized + ToOwned, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner.s;
        f.debug_struct("Cache")
            .field("namespace", &s.layout.namespace())
            .field("prefix", &s.layout.prefix())
            .field("lease_ttl", &s.lease_ttl)
            .field("lease_wait", &s.lease_wait)
            .field("freshness", &s.fresh)
            .field("store", &s.store)
            .field("codec", &s.codec)
            .finish_non_exhaustive()
    }
}

impl<K, V> Cache<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
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
        expiry: Arc<dyn Expiry<K, V>>,
        partitions: Partitions<K, V>,
        local: Option<Arc<TypedTier<K, V>>>,
        bloom: Option<BloomFilter>,
        near: Option<NearCache>,
        breaker: Option<Arc<Guarded>>,
    ) -> Self {
        let inner = Arc::new(Inner::new(
            s, expiry, partitions, local, bloom, near, breaker,
        ));
        let source: Arc<dyn crate::metrics::Source> = inner.clone();
        crate::metrics::register(Arc::downgrade(&source));
        if inner.near.is_some() {
            let stop = inner._bus_stop.subscribe();
            let head = format!("{}{}", inner.s.layout.prefix(), inner.namespace());
            tokio::spawn(follow_bus(
                Arc::downgrade(&inner),
                Arc::clone(&inner.s.store),
                head,
                stop,
            ));
        }
        Self { inner }
    }

    /// Reads a value. `Ok(None)` when there is no entry, the entry is a cached
    /// "not found", or it is past its stale-while-revalidate window; undecodable
    /// entries count as misses. A stale entry within the window is returned (and
    /// counted in [`Stats::stale_hits`]); `get` never loads.
    ///
    /// # Errors
    /// When the store fails.
    #[inline]
    pub fn get<'a>(
        &'a self,
        key: &'a K,
    ) -> impl Future<Output = Result<Option<V>, Error>> + Send + 'a {
        calls::Get::new(self, key)
    }

    /// Like [`get`](Self::get), but not counted in the statistics.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn peek(&self, key: &K) -> Result<Option<V>, Error> {
        self.read(key, false).await
    }

    /// `get` and `peek`: stage 1 of the read path, and nothing else.
    #[inline]
    async fn read(&self, key: &K, count: bool) -> Result<Option<V>, Error> {
        let found = self.inner.lookup_tiers(key, count).await;
        self.served(key, found)
    }

    /// What a read serves from what stage 1 found.
    pub(super) fn served(&self, key: &K, found: Found<V>) -> Result<Option<V>, Error> {
        match found {
            Found::Near(v) => Ok(v),
            Found::Tier(_, Lookup::Fresh(v, _) | Lookup::Stale(v, _)) => Ok(v),
            Found::Tier(mut at, Lookup::Failed(e)) => {
                let skey = at.skey(&self.inner, key);
                Err(self.inner.store_error(skey, e))
            }
            Found::Tier(..) => Ok(None),
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
    /// The loader runs in a task of its own on the current tokio runtime, so
    /// that it completes and fills even if this call is cancelled; hence the
    /// `'static` bounds (move owned handles, such as a cloned pool, into it).
    ///
    /// # Errors
    /// When the loader fails or times out (and no fail-safe value applies), an
    /// error naming the key whose source is the loader's error. Store failures
    /// are not errors here: the loader's value is returned instead. Outside a
    /// tokio runtime, a call that must load fails with an error of kind
    /// [`Load`](crate::ErrorKind::Load) that says so (a hit in process is
    /// still served).
    #[inline]
    pub fn get_or_load<'a, F, Fut, E>(
        &'a self,
        key: &'a K,
        loader: F,
    ) -> impl Future<Output = Result<Option<V>, Error>> + Send + 'a
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        self.get_or_load_with(key, LoadOptions::default(), loader)
    }

    /// [`get_or_load`](Self::get_or_load) with per-call [`LoadOptions`].
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load).
    #[inline]
    pub fn get_or_load_with<'a, F, Fut, E>(
        &'a self,
        key: &'a K,
        options: LoadOptions,
        loader: F,
    ) -> impl Future<Output = Result<Option<V>, Error>> + Send + 'a
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        calls::GetOrLoad::new(self, key, options, loader)
    }

    /// Writes a value with a (jittered) TTL, replacing any entry and revoking any
    /// lease, so that a load that started before this write cannot overwrite it.
    ///
    /// # Errors
    /// When the value cannot be encoded or the store fails.
    pub async fn set(&self, key: &K, value: V) -> Result<(), Error> {
        self.write(key, value, false).await.map(|_| ())
    }

    /// The one write routine of `set` and `write_through`: the entry is written
    /// (version-checked or not) with the lease revoked, and what this process
    /// holds of the key is forgotten before and after.
    async fn write(&self, key: &K, value: V, versioned: bool) -> Result<Versioned, Error> {
        let inner = &*self.inner;
        let skey = inner.key_of(key);
        inner.forget(key, &skey);
        if let Some(bloom) = &inner.bloom
            && let Err(e) = bloom.insert(key).await
        {
            return Err(inner.store_error(&skey, e));
        }
        let written = inner.put(key, &skey, value, versioned).await;
        // A read of the old value may have filled L1 meanwhile.
        inner.forget(key, &skey);
        written
    }

    /// Write-through: runs `write` against the source of truth, then caches the
    /// value it returns, version-checked: if the cache already holds a version
    /// at least as new (a concurrent writer that committed later got there
    /// first), the older value is not written (counted in
    /// [`Stats::stale_writes`]). Like [`set`](Self::set), it revokes any lease,
    /// so a load that read the row before the write cannot fill afterwards.
    ///
    /// `write` returns the value as stored (for instance from
    /// `UPDATE … RETURNING *`), whose version the cache's
    /// [`version_by`](crate::CacheBuilder::version_by) function reads.
    ///
    /// # Errors
    /// When the cache has no `version_by`, `write` fails (nothing is cached
    /// then), or the store fails (the source was written; the cache entry is
    /// then left to its TTL).
    pub async fn write_through<F, Fut, E>(&self, key: &K, write: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        if inner.s.version_of.is_none() {
            return Err(Error::config(
                self.namespace(),
                "write_through needs a cache built with version_by",
            ));
        }
        let value = write()
            .await
            .map_err(|e| Error::write(self.namespace(), inner.key_of(key).user_key(), e.into()))?;
        let outcome = self.write(key, value.clone(), true).await?;
        if matches!(outcome, Versioned::Stale { .. }) {
            inner.counters.stale_writes.inc();
        }
        Ok(value)
    }

    /// Deletes the entry and revokes any lease: a load that read the source before
    /// the write that led to this call cannot fill. Call it after the write commits.
    ///
    /// # Errors
    /// When the store fails; the entry may then still be there until its TTL.
    pub async fn invalidate(&self, key: &K) -> Result<(), Error> {
        let inner = &*self.inner;
        let skey = inner.key_of(key);
        inner.forget(key, &skey);
        let deleted = inner.remove(key, &skey).await;
        // A read of the old value may have filled L1 meanwhile.
        inner.forget(key, &skey);
        deleted
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
        let queued = match inner.s.store.deferred_queue() {
            Some(queue) => queue.defer_invalidate(&skey, delay).await,
            None => Err(Capability::DeferredQueue.missing()),
        };
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
        inner.bump_group(&inner.s.layout.group_key(group)).await
    }

    /// Invalidates every entry carrying `tag` (see
    /// [`tags_by`](crate::CacheBuilder::tags_by)) at once, in O(1): one
    /// generation moves on, no entry is listed or scanned. Entries filled under
    /// its older generations read as misses and expire by their TTL, and loads
    /// that began before cannot fill a value carrying the tag. On Redis it costs
    /// two commands (the cache's tag clock, then the tag's generation).
    ///
    /// # Errors
    /// When the cache has no tags, or the store fails.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<(), Error> {
        let inner = &*self.inner;
        if inner.tags.is_none() {
            return Err(Error::config(
                self.namespace(),
                "invalidate_tag needs a cache built with tags_by",
            ));
        }
        inner.bump_tag(&inner.s.layout.tag_key(tag)).await
    }

    /// Delivers what this cache still holds for the store before the process
    /// exits, within `within`: invalidations kept after a store failure (see
    /// [`CircuitBreaker`](crate::CircuitBreaker)), then the notices of the
    /// invalidation bus queued for other processes' near caches (which a
    /// process that simply returns from `main` loses). Call it last, from a
    /// shutdown handler; the cache stays usable, and a second call sends what
    /// was queued since.
    ///
    /// Workers with a life of their own stop on their own handles:
    /// [`DeferredWorker::shutdown`](crate::DeferredWorker::shutdown), the outbox
    /// relay's and the write-behind flusher's stop signals.
    ///
    /// # Errors
    /// An [`ErrorKind::Shutdown`](crate::ErrorKind::Shutdown) error saying
    /// what could not be delivered in time (and naming up to 5 keys).
    pub async fn close(&self, within: Duration) -> Result<(), Error> {
        let inner = &*self.inner;
        let deadline = tokio::time::Instant::now() + within;
        let kept = match &inner.breaker {
            Some(breaker) => breaker.layer().drain(deadline).await,
            None => Vec::new(),
        };
        let notices = match tokio::time::timeout_at(deadline, inner.s.store.flush()).await {
            Ok(Ok(0)) => None,
            Ok(Ok(lost)) => Some(format!("{lost} bus notices could not be published")),
            Ok(Err(e)) => Some(format!("bus notices: {}", crate::Report(&e))),
            Err(_) => Some(format!("bus notices were still queued after {within:?}")),
        };
        if kept.is_empty() && notices.is_none() {
            return Ok(());
        }
        let mut left = Vec::new();
        if !kept.is_empty() {
            let named = kept.iter().take(5).map(String::as_str).collect::<Vec<_>>();
            left.push(format!(
                "{} kept invalidations did not reach the store within {within:?} ({}{}); \
                 their entries live until their TTL",
                kept.len(),
                named.join(", "),
                if kept.len() > 5 { ", …" } else { "" },
            ));
        }
        left.extend(notices);
        Err(Error::shutdown(self.namespace(), left.join("; ")))
    }

    /// The remaining TTL of `key`'s entry in the store, `None` if there is none
    /// (or the key holds something without a TTL, which cachet never writes).
    /// With stale-while-revalidate or fail-safe this includes the time the entry
    /// is kept past its soft expiry.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn ttl(&self, key: &K) -> Result<Option<Duration>, Error> {
        self.inner.entry_ttl(key).await
    }

    /// A snapshot of this cache's counters.
    pub fn stats(&self) -> Stats {
        crate::metrics::Source::stats(&*self.inner)
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

    /// The entry a write of `value` under `key` stores in the shared store,
    /// and its TTL, as [`set`](Self::set) prepares it; `None` when the expiry
    /// policy keeps the value out of the cache. Write-behind's script stores
    /// it along with its enqueue.
    #[cfg(feature = "write-behind")]
    pub(crate) async fn stored_entry(
        &self,
        key: &K,
        skey: &StoreKey,
        value: &V,
    ) -> Result<Option<(crate::store::Entry, Duration)>, Error> {
        self.inner.stored_entry(key, skey, value).await
    }

    /// The cache's [`version_by`](crate::CacheBuilder::version_by) function.
    #[cfg(feature = "write-behind")]
    pub(crate) fn version_fn(&self) -> Option<&VersionFn<V>> {
        self.inner.s.version_of.as_ref()
    }

    /// The cache's codec.
    #[cfg(feature = "write-behind")]
    pub(crate) fn codec(&self) -> &Arc<dyn crate::Codec<V>> {
        &self.inner.s.codec
    }

    /// The cache's Bloom filter, when built with [`bloom`](crate::CacheBuilder::bloom):
    /// insert new keys into it and rebuild it from the source.
    pub fn bloom(&self) -> Option<&BloomFilter> {
        self.inner.bloom.as_ref()
    }
}

//! [`CacheBuilder`]: configuration of a [`Cache`], validated at [`CacheBuilder::build`].

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use cachet_core::{CacheKey, Capability, Clock, KeyLayout, PayloadKind, Store};

use crate::bloom::{BloomFilter, BloomOptions};
use crate::breaker::{self, CircuitBreaker};
use crate::cache::{
    Cache, FailSafe, Freshness, GroupFn, RefreshAhead, Settings, TagsFn, VersionFn,
};
use crate::codec::{Codec, Postcard};
use crate::expiry::{Expiry, Ttl};
use crate::near::NearCache;
use crate::{Error, MemoryStore};

/// Where a cache keeps its entries: chosen once, by [`CacheBuilder::memory`]
/// or [`CacheBuilder::store`].
#[derive(Debug)]
enum Backend {
    /// A [`MemoryStore`] of the cache's own.
    Default,
    /// A typed table of this [`MemoryStore`].
    Memory(MemoryStore),
    /// A store spoken to through the [`Store`] protocol.
    Shared(Arc<dyn Store>),
}

/// Builds a [`Cache`]. Start with [`Cache::builder`].
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`ttl`](Self::ttl) | 60 s | base TTL of a value |
/// | [`jitter`](Self::jitter) | 0.1 | TTLs are drawn uniformly from `ttl × (1 ± jitter)` |
/// | [`negative_ttl`](Self::negative_ttl) | 10 s | TTL of a cached "not found"; zero disables negative caching |
/// | [`lease_ttl`](Self::lease_ttl) | 5 s | how long a loader may take before its fill is refused and another caller may load |
/// | [`lease_wait`](Self::lease_wait) | 2 s | how long a caller waits for another process's lease before loading without filling |
/// | [`memory`](Self::memory) or [`store`](Self::store) | a new [`MemoryStore`] | where entries live |
/// | [`codec`](Self::codec) | [`Postcard`] | how values become bytes for byte stores |
/// | [`prefix`](Self::prefix) | `cachet:` | first part of every key |
/// | [`max_value_bytes`](Self::max_value_bytes) | what the store accepts | largest encoded value sent to a byte store |
#[must_use = "a builder does nothing until .build() is called"]
pub struct CacheBuilder<K: ?Sized, V, C = Postcard> {
    namespace: String,
    prefix: String,
    ttl: Duration,
    jitter: f64,
    negative_ttl: Duration,
    expiry: Option<Arc<dyn Expiry<K, V>>>,
    lease_ttl: Duration,
    lease_wait: Duration,
    backend: Backend,
    clock: Option<Clock>,
    group: Option<GroupFn<K>>,
    tags: Option<TagsFn<K, V>>,
    bloom: Option<BloomOptions>,
    near: Option<NearCache>,
    breaker: Option<CircuitBreaker>,
    version_of: Option<VersionFn<V>>,
    fresh: Freshness,
    soft_timeout: Option<Duration>,
    hard_timeout: Option<Duration>,
    max_value_bytes: Option<usize>,
    codec: C,
    _types: PhantomData<fn(&K) -> V>,
}

impl<K: ?Sized, V, C: std::fmt::Debug> std::fmt::Debug for CacheBuilder<K, V, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("namespace", &self.namespace)
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("jitter", &self.jitter)
            .field("negative_ttl", &self.negative_ttl)
            .field("lease_ttl", &self.lease_ttl)
            .field("lease_wait", &self.lease_wait)
            .field("backend", &self.backend)
            .field("grouped", &self.group.is_some())
            .field("tagged", &self.tags.is_some())
            .field("bloom", &self.bloom)
            .field("freshness", &self.fresh)
            .field("soft_timeout", &self.soft_timeout)
            .field("hard_timeout", &self.hard_timeout)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl<K: ?Sized, V> CacheBuilder<K, V, Postcard> {
    pub(crate) fn new(namespace: String) -> Self {
        Self {
            namespace,
            prefix: KeyLayout::DEFAULT_PREFIX.to_owned(),
            ttl: Duration::from_secs(60),
            jitter: 0.1,
            negative_ttl: Duration::from_secs(10),
            expiry: None,
            lease_ttl: Duration::from_secs(5),
            lease_wait: Duration::from_secs(2),
            backend: Backend::Default,
            clock: None,
            group: None,
            tags: None,
            bloom: None,
            near: None,
            breaker: Some(CircuitBreaker::default()),
            version_of: None,
            fresh: Freshness::default(),
            soft_timeout: None,
            hard_timeout: None,
            max_value_bytes: None,
            codec: Postcard,
            _types: PhantomData,
        }
    }
}

impl<K: ?Sized, V, C> CacheBuilder<K, V, C> {
    /// The base TTL of values.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The TTL spread: each fill draws its TTL uniformly from
    /// `ttl × (1 - spread) ..= ttl × (1 + spread)`, so entries filled together do
    /// not expire together. `0` turns jitter off; must be below `1`.
    pub fn jitter(mut self, spread: f64) -> Self {
        self.jitter = spread;
        self
    }

    /// The TTL of negative entries ("not found"). `Duration::ZERO` turns negative
    /// caching off.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// A policy that decides each value's fresh life from its key and value,
    /// and whether to cache it at all, in place of the built-in [`Ttl`] that
    /// [`ttl`](Self::ttl), [`jitter`](Self::jitter) and
    /// [`negative_ttl`](Self::negative_ttl) configure (which it then ignores).
    /// See [`Expiry`].
    pub fn expiry(mut self, policy: impl Expiry<K, V>) -> Self {
        self.expiry = Some(Arc::new(policy));
        self
    }

    /// The TTL of a lease. A loader slower than this has its fill refused, and
    /// after it another caller may take the lease.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long a caller that finds another caller's lease (in another process)
    /// waits for the value before loading for itself without filling.
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    /// The key prefix, `cachet:` by default: empty, or ending with `:` (so
    /// that no two (prefix, namespace) pairs share keys; see [`KeyLayout`]).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Keeps entries in this process, in `store`'s typed table for this
    /// cache's prefix and namespace: a hit is one map lookup and a clone of
    /// `V`, with no key formatting and no encoding. Without `memory` or
    /// [`store`](Self::store), a cache gets a [`MemoryStore`] of its own.
    pub fn memory(mut self, store: MemoryStore) -> Self {
        self.backend = Backend::Memory(store);
        self
    }

    /// The store entries live in (Redis, a Redis Cluster, a store of your
    /// own, or an `Arc<dyn Store>` chosen at run time); the cache speaks the
    /// [`Store`] protocol to it. Stores are cheap handles; one store may serve
    /// many caches with different namespaces.
    ///
    /// A [`MemoryStore`] given here serves the same entries as through
    /// [`memory`](Self::memory), at the cost of the protocol (a formatted key,
    /// a string-keyed lookup, the breaker and a boxed future per call: about
    /// ten times a `memory` hit, 0.48 µs against 0.04 µs in a tight loop on a
    /// 2-core machine); prefer `memory` for it.
    pub fn store<S: Store>(mut self, store: S) -> Self {
        self.backend = Backend::Shared(Arc::new(store));
        self
    }

    /// The clock of soft expiry (stale-while-revalidate, fail-safe), and of the
    /// default in-process store's TTLs when no store is given. Defaults to the
    /// in-process store's clock, or the system clock. Tests use [`Clock::mock`]
    /// to expire entries without sleeping.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Gives each entry the tags `tags` returns for its key and value (none for
    /// a cached "not found"), so that [`Cache::invalidate_tag`] drops every
    /// entry carrying a tag at once, in O(1), without listing or scanning
    /// entries. An entry may carry up to 255 tags (each at most 255 bytes once
    /// escaped); repeated tags count once.
    ///
    /// Tags are as safe as [groups](Self::group_by): a load that began before
    /// a tag was invalidated cannot fill a value carrying it, and a tag's lost
    /// generation (a `:sys:` key on Redis) never makes old entries current
    /// again. Unlike a group, a tag does not place the entry: entries stay
    /// spread over the cluster, and the tags are checked on every read.
    ///
    /// What it costs, for an entry carrying `n` tags:
    ///
    /// - **bytes**: the entry records each tag with its generation: 1 byte,
    ///   then 9 bytes plus the escaped name per tag;
    /// - **a hit** on Redis is the `GET` of the entry, then one `MGET` of its
    ///   tags' generations: 2 round trips whatever `n` (each tag adds its key
    ///   to the request and its generation, 16 digits, to the reply). On
    ///   Redis Cluster tag keys live in slots of their own: the `MGET` is one
    ///   `MGET` per slot of the tags, sent concurrently, so a hit waits for the
    ///   `GET` and then for the slowest of them. On the in-process store the
    ///   check is `n` map lookups, off the untagged hit's fast path;
    /// - **a miss** adds a read of the cache's tag clock before the load and,
    ///   at the fill, one `MGET` of the tags' generations (and, for a tag
    ///   seen for the first time, two commands more);
    /// - [`Cache::invalidate_tag`] is two commands, whatever number of entries
    ///   carry the tag.
    ///
    /// An entry without tags (a "not found", or a value whose list is empty)
    /// costs what it costs in a cache without tags. Tags need the store's tag
    /// invalidation. A [near cache](Self::near_cache) in front does not know
    /// which of its entries carry a tag: every tag invalidation, from any
    /// process, empties it (a near hit checks no tags).
    ///
    /// ```
    /// # async fn example() -> Result<(), cachet::Error> {
    /// use cachet::{Cache, MemoryStore};
    ///
    /// #[derive(Clone, serde::Serialize, serde::Deserialize)]
    /// struct Product { shop: u32, category: String }
    ///
    /// let products: Cache<u64, Product> = Cache::builder("products")
    ///     .memory(MemoryStore::new(1_000))
    ///     .tags_by(|_id: &u64, p: &Product| vec![format!("shop:{}", p.shop), p.category.clone()])
    ///     .build()?;
    /// let load = |shop, category: &str| {
    ///     let p = Product { shop, category: category.to_owned() };
    ///     move || async move { Ok::<_, std::io::Error>(Some(p)) }
    /// };
    /// products.get_or_load(&1, load(7, "books")).await?;
    /// products.get_or_load(&2, load(7, "games")).await?;
    /// products.get_or_load(&3, load(8, "books")).await?;
    ///
    /// products.invalidate_tag("books").await?;
    /// assert!(products.get(&1).await?.is_none());
    /// assert!(products.get(&2).await?.is_some());
    /// assert!(products.get(&3).await?.is_none());
    /// products.invalidate_tag("shop:7").await?;
    /// assert!(products.get(&2).await?.is_none());
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().unwrap().block_on(example()).unwrap();
    /// ```
    pub fn tags_by<F>(mut self, tags: F) -> Self
    where
        F: Fn(&K, &V) -> Vec<String> + Send + Sync + 'static,
    {
        self.tags = Some(Arc::new(tags));
        self
    }

    /// Puts every key in a group (a tenant, a user…) so that
    /// [`Cache::invalidate_group`] drops the whole group in O(1).
    ///
    /// On Redis the group is the hash tag of its keys: a group's entries, leases
    /// and generation share one slot, so a read is one script that checks the
    /// generation too (a hit costs one `EVALSHA` instead of a `GET`), and a very
    /// hot group is a hot slot on Redis Cluster. Pick groups that spread load.
    pub fn group_by<G, F>(mut self, group: F) -> Self
    where
        G: CacheKey,
        F: Fn(&K) -> G + Send + Sync + 'static,
    {
        self.group = Some(Arc::new(move |k: &K| cachet_core::escape_key(&group(k))));
        self
    }

    /// The circuit breaker in front of a shared store (on by default, see
    /// [`CircuitBreaker`]): after repeated failures, operations skip the store
    /// for a cooldown instead of each paying the response timeout, and
    /// invalidations that could not reach the store are retried until they do.
    /// `None` turns it off.
    pub fn circuit_breaker(mut self, breaker: Option<CircuitBreaker>) -> Self {
        self.breaker = breaker;
        self
    }

    /// How to read a value's version in the source of truth (a row version,
    /// `updated_at` in microseconds, a sequence): stored with every entry, and
    /// checked by [`Cache::write_through`] so that an older write never
    /// overwrites a newer one.
    pub fn version_by(mut self, version: impl Fn(&V) -> u64 + Send + Sync + 'static) -> Self {
        self.version_of = Some(Arc::new(version));
        self
    }

    /// A near cache (L1): decoded values in this process in front of a shared
    /// store, kept coherent by the store's invalidation bus. See
    /// [`NearCache`] for what it guarantees. Only for a shared store (an
    /// in-process store needs none); the cache must be built inside a tokio
    /// runtime, which runs the bus subscription.
    pub fn near_cache(mut self, options: NearCache) -> Self {
        self.near = Some(options);
        self
    }

    /// Stale-while-revalidate: for `window` past an entry's fresh life (the
    /// TTL), [`Cache::get_or_load`] returns it at once and refreshes it in the
    /// background, one refresh per key across all processes (the refresh takes
    /// the key's lease). Past the window, callers wait for a load. Entries are
    /// kept in the store for the window on top of their TTL.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.fresh.stale_for = window;
        self
    }

    /// Fail-safe: when a load fails or hits the hard timeout and the cache holds
    /// a value at most `max_staleness` past its fresh life, serve it instead of
    /// the error, and for `throttle` serve it in this process without asking the
    /// source again. Entries are kept `max_staleness` past their TTL.
    pub fn fail_safe(mut self, max_staleness: Duration, throttle: Duration) -> Self {
        self.fresh.fail_safe = Some(FailSafe::new(max_staleness, throttle));
        self
    }

    /// Refresh-ahead: keys read often near the end of their fresh life are
    /// reloaded in the background before it ends. See [`RefreshAhead`].
    pub fn refresh_ahead(mut self, policy: RefreshAhead) -> Self {
        self.fresh.refresh_ahead = Some(policy);
        self
    }

    /// Probabilistic early refresh (XFetch, Vattani et al., VLDB 2015): a hit
    /// refreshes the entry in the background with a probability that rises as
    /// its fresh life ends and as its load was slow: when
    /// `now − load_time·beta·ln(random) ≥ expiry`. `beta` is usually 1; larger
    /// refreshes earlier.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.fresh.early_refresh = Some(beta);
        self
    }

    /// Default soft timeout of loads (see [`LoadOptions::soft_timeout`](crate::LoadOptions::soft_timeout)).
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// Default hard timeout of loads (see [`LoadOptions::hard_timeout`](crate::LoadOptions::hard_timeout)).
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = Some(timeout);
        self
    }

    /// Guards loads with a Bloom filter of the keys that exist: a miss whose key
    /// the filter rules out returns "not found" without calling the loader
    /// (counted in [`Stats::bloom_rejections`](crate::Stats::bloom_rejections)).
    ///
    /// The filter rules nothing out until it is built with
    /// [`BloomFilter::rebuild`] from the source's keys (reach it through
    /// [`Cache::bloom`]); after that, every new key must be inserted
    /// ([`Cache::set`] does it), or lookups of that key answer "not found". See
    /// the [`bloom`](crate::bloom) module for costs and conditions.
    pub fn bloom(mut self, options: BloomOptions) -> Self {
        self.bloom = Some(options);
        self
    }

    /// The largest encoded value this cache sends to a byte store (Redis).
    /// A larger one is never sent: `set` and `write_through` fail with an
    /// [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge) error naming the
    /// key, the size and the limit; a loaded one is returned but not cached.
    /// Defaults to what the store accepts (for Redis, the server's
    /// `proto-max-bulk-len`, read at connect); a smaller value here wins.
    pub fn max_value_bytes(mut self, limit: usize) -> Self {
        self.max_value_bytes = Some(limit);
        self
    }

    /// The codec values are stored with on byte stores.
    pub fn codec<C2>(self, codec: C2) -> CacheBuilder<K, V, C2> {
        CacheBuilder {
            namespace: self.namespace,
            prefix: self.prefix,
            ttl: self.ttl,
            jitter: self.jitter,
            negative_ttl: self.negative_ttl,
            expiry: self.expiry,
            lease_ttl: self.lease_ttl,
            lease_wait: self.lease_wait,
            backend: self.backend,
            clock: self.clock,
            group: self.group,
            tags: self.tags,
            bloom: self.bloom,
            near: self.near,
            breaker: self.breaker,
            version_of: self.version_of,
            fresh: self.fresh,
            soft_timeout: self.soft_timeout,
            hard_timeout: self.hard_timeout,
            max_value_bytes: self.max_value_bytes,
            codec,
            _types: PhantomData,
        }
    }
}

impl<K, V, C> CacheBuilder<K, V, C>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    C: Codec<V>,
{
    /// Rejects a configuration that needs a capability the store lacks,
    /// naming both.
    fn check_capabilities(
        needs: &[(bool, &str, Capability)],
        ns: &str,
        store: &dyn Store,
    ) -> Result<(), Error> {
        for &(_, setting, capability) in needs.iter().filter(|(set, ..)| *set) {
            if !capability.offered_by(store) {
                return Err(Error::config(
                    ns,
                    format!(
                        "{setting} needs a store that offers {capability}, and {store:?} does not"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Validates the settings and builds the cache.
    ///
    /// # Errors
    /// An [`ErrorKind::Config`](crate::ErrorKind::Config) error naming the
    /// setting that is wrong.
    pub fn build(self) -> Result<Cache<K, V>, Error> {
        let ns = &self.namespace;
        let layout =
            KeyLayout::new(&self.prefix, ns).map_err(|e| Error::config(ns, e.to_string()))?;
        if self.ttl.is_zero() {
            return Err(Error::config(ns, "ttl must be positive"));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(Error::config(
                ns,
                format!("jitter must be in [0, 1), got {}", self.jitter),
            ));
        }
        if self.lease_ttl.is_zero() {
            return Err(Error::config(ns, "lease_ttl must be positive"));
        }
        if let Some(beta) = self.fresh.early_refresh
            && !(beta > 0.0 && beta.is_finite())
        {
            return Err(Error::config(
                ns,
                format!("early_refresh beta must be positive, got {beta}"),
            ));
        }
        let needs = [
            (self.group.is_some(), "group_by", Capability::Groups),
            (self.tags.is_some(), "tags_by", Capability::Tags),
            (
                self.near.is_some(),
                "near_cache",
                Capability::InvalidationBus,
            ),
            (self.bloom.is_some(), "bloom", Capability::BloomBits),
            (
                self.version_of.is_some(),
                "version_by",
                Capability::VersionedSet,
            ),
        ];
        let (store, memory) = match self.backend {
            Backend::Shared(store) => (store, None),
            Backend::Memory(memory) => (Arc::new(memory.clone()) as Arc<dyn Store>, Some(memory)),
            Backend::Default => {
                let clock = self.clock.clone().unwrap_or_default();
                let memory = MemoryStore::with_clock(MemoryStore::DEFAULT_CAPACITY, clock);
                (Arc::new(memory.clone()) as Arc<dyn Store>, Some(memory))
            }
        };
        // Soft expiry is read against the store's clock when it has one.
        let clock = match (&self.clock, &memory) {
            (Some(clock), _) => clock.clone(),
            (None, Some(memory)) => memory.clock().clone(),
            (None, None) => Clock::system(),
        };
        let local = match memory {
            Some(memory) => Some(
                memory
                    .table::<K, V>(&format!("{}{}", layout.prefix(), layout.namespace()))
                    .map_err(|e| Error::config(ns, e))?,
            ),
            None => None,
        };
        if store.payload_kind() == PayloadKind::Bytes && !self.codec.can_encode() {
            return Err(Error::config(
                ns,
                format!("{store:?} keeps bytes, so the cache needs a codec, not NoCodec"),
            ));
        }
        if self.near.is_some() {
            if local.is_some() {
                return Err(Error::config(
                    ns,
                    "near_cache is for a shared store; the in-process store needs none",
                ));
            }
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(Error::config(
                    ns,
                    "near_cache needs a tokio runtime when the cache is built (it runs the bus subscription)",
                ));
            }
        }
        Self::check_capabilities(&needs, ns, &*store)?;
        let breaker = match (&local, self.breaker) {
            (None, Some(settings)) => {
                Some(breaker::guard(Arc::clone(&store), settings, clock.clone()))
            }
            _ => None,
        };
        let store = match &breaker {
            Some(guarded) => Arc::clone(guarded) as Arc<dyn Store>,
            None => store,
        };
        let bloom = match self.bloom {
            Some(options) => Some(BloomFilter::new(&layout, Arc::clone(&store), options)?),
            None => None,
        };
        let expiry = self.expiry.unwrap_or_else(|| {
            let negative = (!self.negative_ttl.is_zero()).then_some(self.negative_ttl);
            Arc::new(Ttl::new(self.ttl, self.jitter, negative))
        });
        Ok(Cache::from_settings(
            Settings {
                layout,
                lease_ttl: self.lease_ttl,
                lease_wait: self.lease_wait,
                fresh: self.fresh,
                soft_timeout: self.soft_timeout,
                hard_timeout: self.hard_timeout,
                clock,
                version_of: self.version_of,
                max_value_bytes: {
                    let limit = |bytes, by_store| crate::error::ValueLimit { bytes, by_store };
                    match (self.max_value_bytes, store.max_payload_bytes()) {
                        (Some(ours), Some(store)) if store < ours => Some(limit(store, true)),
                        (Some(ours), _) => Some(limit(ours, false)),
                        (None, store) => store.map(|store| limit(store, true)),
                    }
                },
                store,
                codec: Arc::new(self.codec),
            },
            expiry,
            crate::cache::Partitions {
                group: self.group,
                tags: self.tags,
            },
            local,
            bloom,
            self.near,
            breaker,
        ))
    }
}

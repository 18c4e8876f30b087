//! A typed cache for services that put a shared cache in front of a database,
//! built to keep the hard parts right: no stale value resurrected by a slow
//! reader, one load per key however many callers, "not found" cached without
//! being confused with a value, a TTL on everything.
//!
//! - [Quick start](#quick-start)
//! - [The guarantee: lease-guarded fills](#the-guarantee-lease-guarded-fills)
//! - [Closing the remaining holes](#closing-the-remaining-holes)
//! - [How the guarantee is checked](#how-the-guarantee-is-checked)
//! - [Concurrent calls on the same key](#concurrent-calls-on-the-same-key)
//! - [Freshness: stale-while-revalidate, refresh-ahead, fail-safe](#freshness-stale-while-revalidate-refresh-ahead-fail-safe)
//! - [Group invalidation](#group-invalidation)
//! - [Tags](#tags)
//! - [Two tiers: the near cache](#two-tiers-the-near-cache)
//! - [Write paths](#write-paths)
//! - [Stores](#stores)
//! - [Expiry](#expiry)
//! - [Costs](#costs)
//! - [Metrics](#metrics)
//! - [Measuring consistency: the audit](#measuring-consistency-the-audit)
//!
//! # Quick start
//!
//! ```
//! use std::time::Duration;
//! use cachet::Cache;
//!
//! #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
//! struct User { id: u64, name: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), cachet::Error> {
//! // The in-process store is the default; `.store(RedisStore::connect(url).await?)`
//! // shares the cache between processes.
//! let users: Cache<u64, User> = Cache::builder("users")
//!     .ttl(Duration::from_secs(60))
//!     .jitter(0.2)
//!     .negative_ttl(Duration::from_secs(5))
//!     .build()?;
//!
//! // Read-through: on a miss the loader runs once and its value is cached.
//! let user = users
//!     .get_or_load(&42, || async {
//!         // SELECT ... WHERE id = 42
//!         Ok::<_, std::io::Error>(Some(User { id: 42, name: "Ada".into() }))
//!     })
//!     .await?;
//! assert_eq!(user.unwrap().name, "Ada");
//!
//! // "Not found" is cached too, as a negative entry.
//! let missing = users.get_or_load(&7, || async { Ok::<_, std::io::Error>(None) }).await?;
//! assert_eq!(missing, None);
//!
//! // After writing the database, invalidate: the entry is deleted and any load
//! // in progress is prevented from filling.
//! users.invalidate(&42).await?;
//! assert_eq!(users.get(&42).await?, None);
//! assert_eq!(users.stats().negative_hits, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # The guarantee: lease-guarded fills
//!
//! Plain cache-aside has a race that leaves a stale value in the cache until its
//! TTL: a reader misses and reads the old row; a writer commits the new row and
//! deletes the key; the reader then writes the old row into the cache. cachet
//! closes it with leases: a reader that misses takes a lease token *before* it
//! reads the source; [`Cache::invalidate`] and [`Cache::set`] revoke the lease;
//! the fill is one atomic store operation that writes only if the lease is still
//! valid. So, **provided that**
//!
//! 1. loaders read the source of truth after the lease is taken, from the primary
//!    (or any replica that has applied every write whose invalidation already ran);
//! 2. every write to the source is followed, after its commit, by an
//!    [`invalidate`](Cache::invalidate) (or [`set`](Cache::set)) that reaches the store,
//!
//! an entry filled by [`get_or_load`](Cache::get_or_load) never holds a value older
//! than the last invalidation that completed before the fill. When condition 2
//! fails (the process dies between commit and invalidate, the store is
//! unreachable), the TTL is the backstop: every entry and every lease has one.
//!
//! A caller may still *receive* a value that a concurrent write is replacing: a
//! read that overlaps a write can return either version. What cannot happen is the
//! cache *keeping* the old version after the write's invalidation.
//!
//! The conditions, spelled out:
//!
//! - **Primary reads.** A loader that reads a lagging replica can read a row older
//!   than an invalidation that already ran, and fill it with a valid lease. Read
//!   the primary in loaders (or accept replica lag as extra staleness).
//! - **The invalidation must run.** Through [`Cache::invalidate`] after the commit,
//!   through the [`outbox`](#closing-the-remaining-holes) in the same transaction,
//!   or through [`Cache::invalidate_group`] for a whole group (or
//!   [`Cache::invalidate_tag`] for every entry carrying a tag).
//! - **Redis keeps what it acknowledged.** A lease or an invalidation lost in a
//!   Redis crash or failover (no persistence, asynchronous replication) is lost:
//!   a failover to a replica that missed the `DEL` can bring an old entry back.
//!   The TTL bounds it. Across a crash of the Redis process, only
//!   `appendfsync always` keeps every acknowledged write (`everysec` may not
//!   have written the last seconds to the file).
//! - **Clocks.** Lease and entry TTLs run on the store's clock (Redis, or this
//!   process for [`MemoryStore`]); no correctness property depends on clients'
//!   clocks agreeing.
//!
//! # Closing the remaining holes
//!
//! - **A writer that dies between its commit and its invalidation**: record the
//!   invalidation in the same transaction with the transactional outbox (feature
//!   `outbox`, `cachet::outbox`): a relay delivers it at least once, after a
//!   restart too.
//! - **Writers or readers outside cachet** (legacy code that does `GET`/`SET`
//!   without leases): [`Cache::invalidate_twice`] deletes now and again after a
//!   delay, from a durable queue in the store run by a [`DeferredWorker`], so the
//!   second delete survives the writer's process.
//!
//! # How the guarantee is checked
//!
//! - A model of readers, writers, the database and the cache, checked
//!   exhaustively with stateright (crate `cachet-model`): it finds the stale
//!   entry of naive cache-aside, finds none with leases (with lease expiry, 2
//!   readers and 2 writers), finds the crash hole, and finds none with the outbox.
//! - One conformance suite runs the protocol's tests against both stores, the
//!   reader/writer race included.
//! - A torture test on a real Redis and PostgreSQL runs readers and writers with
//!   random delays between the load and the fill, and counts stale entries after
//!   quiescence: zero with leases, and more than zero for naive cache-aside in the
//!   same run, so the harness can see staleness.
//!
//! # Concurrent calls on the same key
//!
//! For [`get_or_load`](Cache::get_or_load) on one key:
//!
//! - **In one process**, the first caller that misses starts its loader in a
//!   task of its own; callers that arrive while it runs do not run theirs. They
//!   wait and receive a clone of the same result, error included (counted in
//!   [`Stats::coalesced`]). Cancelling a caller does not cancel the load: it
//!   completes, fills, and serves the callers still waiting. A caller that
//!   arrives after an [`invalidate`](Cache::invalidate) or [`set`](Cache::set) of
//!   the key in this process never joins a load that started before it.
//! - **Across processes** sharing a store, the first process to miss takes the
//!   lease. Others find it taken, wait with exponential backoff (2 ms doubling to
//!   8 ms) for the fill and read it; if `lease_wait` passes first, they load for
//!   themselves and return the value without caching it. If the lease holder dies,
//!   its lease expires after `lease_ttl` and the next caller takes over.
//! - A loader slower than `lease_ttl` still returns its value to its callers, but
//!   its fill is refused (counted in [`Stats::refused_fills`]). A loader slower
//!   than the hard timeout ([`LoadOptions::hard_timeout`]) is abandoned: its
//!   callers get a timeout error (or the fail-safe value) and its lease is released.
//!
//! # Freshness: stale-while-revalidate, refresh-ahead, fail-safe
//!
//! | feature | builder | what callers see | cost |
//! |---|---|---|---|
//! | stale-while-revalidate | [`stale_while_revalidate`](CacheBuilder::stale_while_revalidate) | past the TTL and within the window, the stale value at once; one background refresh per key across all processes (it takes the lease) | entries kept `window` longer in the store; one load per refresh |
//! | refresh-ahead | [`refresh_ahead`](CacheBuilder::refresh_ahead) | hot keys reloaded before their TTL ends, so their readers never wait | a read counter per key near expiry, in process; one load per refresh |
//! | early refresh (XFetch) | [`early_refresh`](CacheBuilder::early_refresh) | entries refreshed early with a probability rising near expiry and with load time | one random draw and a logarithm per hit |
//! | fail-safe | [`fail_safe`](CacheBuilder::fail_safe) | when a load fails or times out, the last value (up to a maximum staleness), then that value without asking the source for a throttle period | entries kept `max_staleness` longer; one fallback per key in process during a throttle |
//! | soft timeout | [`LoadOptions::soft_timeout`], [`soft_timeout`](CacheBuilder::soft_timeout) | after it, the stale value if there is one; the load goes on in the background and fills | — |
//! | hard timeout | [`LoadOptions::hard_timeout`], [`hard_timeout`](CacheBuilder::hard_timeout) | after it, a timeout error (or the fail-safe value) | — |
//!
//! An entry's fresh life (its soft expiry) is in its envelope; its TTL in the
//! store covers the stale window and the fail-safe staleness on top. Background
//! refreshes are lease-guarded like any fill, so an invalidation that lands
//! during a refresh wins. Soft expiry compares the envelope's time with this
//! process's clock: clocks that disagree shift when entries turn stale, never
//! what an invalidation removes. Fail-safe throttling is per process: after a
//! failed load, a process may serve the fallback for up to the throttle period
//! even if another process invalidated the key meanwhile (this process's own
//! invalidations drop it).
//!
//! # Group invalidation
//!
//! A cache built with [`CacheBuilder::group_by`] puts every key in a group (a
//! tenant, a user). [`Cache::invalidate_group`] then drops the whole group in one
//! O(1) step: the group's generation moves on, entries filled under older
//! generations read as misses and expire by their TTL, and loads that took their
//! lease earlier cannot fill. No `SCAN`, no `KEYS`. A generation that is evicted
//! or lost comes back as a value it never had (server time in microseconds on
//! Redis, a never-repeating counter in process), so old entries never reappear.
//!
//! On Redis a group is the hash tag of its keys, so an entry and its generation
//! are read by one script in one round trip (a hit costs an `EVALSHA` instead of
//! a `GET`), and all of a group's keys live in one slot: a very hot group is a hot
//! slot on Redis Cluster.
//!
//! # Tags
//!
//! A cache built with [`CacheBuilder::tags_by`] gives each entry up to 255
//! tags, computed from its key and value. [`Cache::invalidate_tag`] drops every
//! entry carrying a tag in O(1), with no list of keys and no scan: the tag's
//! generation moves on. The entry records each tag with its generation when it
//! was filled, and a read serves it only while all of them are current. The
//! guarantees are those of groups: a load that began before an invalidation of
//! one of its value's tags cannot fill (the load reads the cache's *tag clock*
//! after taking its lease; the fill is refused if a tag moved past it), and a
//! lost generation never makes an old entry current again (a tag without a
//! generation matches nothing; a new one is drawn from the clock, which only
//! moves forward, even once lost). A value carrying a tag seen for the first
//! time is refused its fill if any tag of the cache was invalidated during
//! its load, since a new tag cannot be told from a lost one; the next load
//! fills.
//!
//! Groups stay the fast path: a group decides its keys' slot, so one script
//! reads an entry and its generation in one round trip. A tag places nothing:
//! on Redis a tagged hit is the entry's `GET` and then one `MGET` of its tags'
//! generations (on Redis Cluster, one `MGET` per slot of the tags, sent
//! concurrently): two round trips whatever the number of tags. Each tag adds
//! 9 bytes and its escaped name to the entry (the list 1 byte more), and its key and generation
//! (about 55 bytes more, for a short tag) to the `MGET`; see
//! [`CacheBuilder::tags_by`] for the full costs. A near cache in front is
//! emptied by every tag invalidation.
//!
//! # Two tiers: the near cache
//!
//! [`CacheBuilder::near_cache`] puts an in-process tier (L1, decoded values, a
//! hit is a map lookup) in front of a shared store (L2, Redis). It stays
//! coherent through the store's invalidation bus: every invalidation, write and
//! group invalidation made through a store with the bus on, in any process,
//! removes the entry from every L1 within milliseconds (a tag invalidation
//! empties every L1 of the cache: L1 does not know which entries carry the
//! tag); an invalidation that
//! lands while an L1 fill is in flight wins; L1 is emptied whenever the bus
//! subscription breaks or comes back (a lost message must not become a stale
//! L1), and is neither read nor filled while it is down. A server that stalls
//! (paused, failing over) delivers no notice: the subscription counts as
//! broken once a ping goes unanswered for the store's bus heartbeat
//! (`RedisStoreBuilder::bus_heartbeat`, 1 s by default), so during a stall L1
//! serves what it holds for at most about two heartbeats. Every L1 entry also
//! has a short TTL, the bound on staleness should a notice be lost while the
//! subscription stays up. See [`NearCache`].
//!
//! # Write paths
//!
//! | path | call | the write returns after | guarantee |
//! |---|---|---|---|
//! | delete-on-write | [`Cache::invalidate`] after the commit | the commit and one `DEL` | the next read loads the new row; leases stop older loads from filling |
//! | delete-on-write, durable | `outbox::Outbox::record` in the write's transaction (feature `outbox`) | the commit alone | a relay delivers the invalidation at least once, even if the writer dies after `COMMIT` |
//! | delayed double-delete | [`Cache::invalidate_twice`] after the commit | one `DEL` and one queued delete | a second delete after the delay clobbers what a writer or reader *without* a lease put back |
//! | write-through | [`Cache::write_through`] | the commit and one versioned `SET` | the cache holds the newest version; an older concurrent write never overwrites it |
//! | write-behind | `write_behind::WriteBehind::write_behind` (feature `write-behind`) | the write is in a durable Redis stream | applied to the source later, batched, at least once, idempotent by version |
//!
//! Delete-on-write is the default and the cheapest to get right; the outbox
//! closes its one hole (a writer that dies between commit and invalidation) for
//! one more `INSERT` per transaction. Delayed double-delete is for code paths
//! that fill without leases. Write-through suits values read right after they
//! are written. Write-behind absorbs write bursts (in `cachet lab`, a write is
//! acknowledged several times faster at the median and the source sees one
//! transaction per batch instead of one per write), at the cost of the source
//! lagging behind and of depending on Redis's durability (AOF) for acknowledged
//! writes.
//!
//! # Stores
//!
//! | store | where | payload | hit cost |
//! |---|---|---|---|
//! | [`MemoryStore`] | in process (the default) | decoded values in a typed table per cache | one map lookup and a clone of `V`; no key formatting, no decoding |
//! | `RedisStore` (feature `redis`, on by default) | Redis ≥ 7 | envelope + codec bytes | one `GET` round trip and a decode |
//!
//! Both implement the same [`Store`] protocol and pass the same conformance suite.
//! The trait's required methods are the core protocol; groups, tags, version-checked
//! sets, the invalidation bus (which near caches need), the deferred queue and
//! Bloom bits are [capabilities](store::Capability) a store offers through
//! accessors, and [`CacheBuilder::build`] refuses a configuration that needs one
//! the store lacks, naming both. To count, delay or guard a store's calls, wrap
//! it in a [`StoreLayer`](store::StoreLayer) (see [`store::Layered`]); the
//! circuit breaker is one.
//!
//! # Expiry
//!
//! [`ttl`](CacheBuilder::ttl), [`jitter`](CacheBuilder::jitter) and
//! [`negative_ttl`](CacheBuilder::negative_ttl) configure the built-in policy,
//! [`Ttl`]; an [`Expiry`] given to [`expiry`](CacheBuilder::expiry) decides each
//! value's fresh life from its key and value instead, or keeps it out of the
//! cache.
//!
//! # Costs
//!
//! On Redis: a hit is one `GET`. A miss is the `GET`, one `EVALSHA` that takes
//! the lease (or finds the value), the load, and one `EVALSHA` that fills (value
//! and TTL in one `SET … PX`) and consumes the lease: one round trip more than
//! naive cache-aside. [`invalidate`](Cache::invalidate) is one `DEL` of the entry and its
//! lease; [`set`](Cache::set) one `EVALSHA`; with the invalidation bus on,
//! each (and [`write_through`](Cache::write_through)) sends its notice in the same round trip after a quiet millisecond
//! (a `PUBLISH` pipelined after the `DEL`, or from the script), and queues it
//! for the bus's batching task otherwise.
//! [`get_many`](Cache::get_many) sends one `MGET` (which a cluster
//! connection splits by node; keys with groups are read by one script each);
//! [`get_or_load_many`](Cache::get_or_load_many) adds one lease script per hash
//! slot of the missing keys, **one** loader call for all of them, and one fill
//! script per hash slot of the loaded keys. Each entry carries an envelope
//! header of 2 bytes plus the fields it sets (soft expiry, version, load time,
//! group generation: 4 or 8 bytes each, 30 at most) and a 4-byte checksum of
//! its payload (see [`store::envelope`]), so an
//! entry whose bytes were changed reads as a miss; a lease is a 16-byte token
//! under its own key, alive only during a load. In a cache with
//! [tags](#tags), a hit of an entry with tags adds one `MGET` of their
//! generations (one per slot on a cluster), and the entry 1 byte plus 9 bytes
//! and the name per tag; measured by the test
//! `a_tagged_hit_costs_one_mget_and_its_tags_bytes` (`tests/redis.rs`): 66
//! bytes on the wire for an untagged hit, 85 more with one tag, 217 more with
//! three and 548 more with eight (tags `t1`…`t8` in namespace `cost<n>`).
//!
//! # Metrics
//!
//! [`Cache::stats`] returns the counters (see [`Stats`] for their meaning).
//! [`metrics::publish`] hands every cache's counters to the
//! [`metrics`](https://docs.rs/metrics) facade's recorder, labelled
//! `cache = <namespace>`: call it before each scrape, or run
//! [`metrics::spawn_publisher`]. Loads, lease waits and store hits are timed
//! into histograms as they happen. The [`metrics`](mod@metrics) module lists
//! every name.
//!
//! Each load and each fill runs in a `tracing` span at debug level,
//! `cachet.load` and `cachet.fill`, with the fields `cache`, `key_hash` (a
//! 64-bit hash of the store key: keys may hold personal data) and `outcome`
//! (`found`, `not_found`, `error`, `timeout`; `filled`, `refused`, `failed`;
//! `batch` for the loads and fills of a batch),
//! so tracing-opentelemetry and other span exporters see them.
//!
//! # Measuring consistency: the audit
//!
//! [`audit::Auditor`] samples reads the cache served and, off the caller's
//! path, re-reads the source of truth through a check (typically the loader) at
//! each of several bounds after the read: a read is *inconsistent within M*
//! only if the cache still disagrees with the source M after it. It reports
//! nines at each bound (1 s, 10 s, 60 s by default), keeps its source reads
//! within a budget per second, and exports the figures as metrics. What it
//! measures, and what it does not (a sample of the reads served from the
//! cache, not every read; checks against the primary), is in the
//! [module docs](audit). `cachet lab --scenario audit` shows the figures for
//! naive cache-aside, leases, and leases with the outbox under writer crashes.
#![deny(missing_docs)]

pub mod audit;
pub mod bloom;
mod breaker;
mod builder;
mod cache;
pub mod codec;
mod deferred;
mod error;
pub mod expiry;
mod flight;
mod log_limit;
mod memory;
pub mod metrics;
mod near;
mod stats;

pub use bloom::{BloomFilter, BloomOptions};
pub use breaker::CircuitBreaker;
pub use builder::CacheBuilder;
pub use cache::{Cache, FailSafe, LoadOptions, RefreshAhead};
pub use codec::{Codec, Json, NoCodec, Postcard};
pub use deferred::{DeferredWorker, DeferredWorkerOptions};
pub use error::{BoxError, Error, ErrorKind};
pub use expiry::{Expiry, Ttl};
pub use memory::MemoryStore;
pub use near::NearCache;
pub use stats::Stats;

pub use cachet_core::{CacheKey, Clock, KeyLayout, MockClock, Report, Store, StoreError, StoreKey};

/// What a store implementation, or a layer around one, needs: the protocol
/// types of the [`Store`] trait, its capabilities, and [`StoreLayer`](store::StoreLayer).
///
/// A cache's users need none of it; see [`cachet_core`] for the protocol's
/// rules.
pub mod store {
    pub use cachet_core::envelope;
    pub use cachet_core::{
        Acquire, AcquireMode, BloomBits, BloomKey, BusEvent, CacheKey, Capability, Deferred,
        DeferredQueue, Entry, Fill, GroupKey, Groups, InvalidationBus, KeyWriter, Layered,
        LeaseToken, Meta, Notice, Op, Payload, PayloadKind, Read, Store, StoreError,
        StoreErrorKind, StoreFuture, StoreKey, StoreLayer, TagGeneration, TagKey, Tags,
        TokenSource, Ttls, Versioned, VersionedSet, ttl_millis,
    };
}

#[cfg(feature = "redis")]
pub use cachet_redis::{RedisStore, RedisStoreBuilder, ServerInfo};

/// The transactional outbox for PostgreSQL (feature `outbox`): invalidations
/// recorded in the writer's transaction and delivered by a relay.
#[cfg(feature = "outbox")]
pub use cachet_outbox as outbox;

// Its docs are the module's own (`write_behind/mod.rs`), so that their
// links resolve inside it.
#[cfg(feature = "write-behind")]
pub mod write_behind;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

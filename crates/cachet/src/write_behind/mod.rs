//! Write-behind on a durable Redis stream (feature `write-behind`): a write
//! returns once the cache entry is written and the write is durably queued
//! in Redis; flushers apply queued writes to the
//! source of truth later, in batches, coalesced per key, and lose nothing they
//! were given.
//!
//! - [Choosing a write strategy](#choosing-a-write-strategy)
//! - [Example](#example)
//! - [The guarantee](#the-guarantee)
//! - [Durability: what a Redis crash can take](#durability-what-a-redis-crash-can-take)
//! - [Backpressure](#backpressure)
//! - [Flushing](#flushing)
//! - [The sink must be idempotent](#the-sink-must-be-idempotent)
//! - [Limitations](#limitations)
//! - [Costs](#costs)
//! - [Redis keys](#redis-keys)
//!
//! # Choosing a write strategy
//!
//! | strategy | call | write latency | the source of truth | the cache | a write is lost when |
//! |---|---|---|---|---|---|
//! | delete-on-write | your `UPDATE … COMMIT`, then [`Cache::invalidate`](crate::Cache::invalidate) | the commit + one `DEL` | written before the call returns | entry deleted; the next read loads | never (the `DEL` can be: the TTL bounds the staleness, the outbox closes it) |
//! | write-through | [`Cache::write_through`](crate::Cache::write_through) | the commit + one `EVALSHA` | written before the call returns | new value, version-checked | never |
//! | write-behind | [`WriteBehind::write_behind`] | one `EVALSHA` (+ a `WAIT`) | written later by a [`Flusher`], batched | new value at once | Redis loses it: see [durability](#durability-what-a-redis-crash-can-take) |
//!
//! - **Delete-on-write** is the default: simplest, the database is always
//!   right, and a read after the write loads the new row (one extra load per
//!   write). Use it unless writes are the bottleneck.
//! - **Write-through** saves that load: the written value is cached at once.
//!   Still one database transaction per write.
//! - **Write-behind** takes the database off the write path: a write costs one
//!   Redis round trip, and a key written many times between two flushes costs
//!   the database one row write. Use it for hot, frequently rewritten keys
//!   (counters, session state, last-seen times) whose writes may reach the
//!   database late. The price: the database lags (other readers of the
//!   database see old rows until the flush), every write must carry a
//!   version, the sink must be idempotent, and a write is only as durable as
//!   Redis's persistence.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use cachet::{BoxError, Cache, RedisStore};
//! use cachet::write_behind::{OnFull, Sink, Write, WriteBehind, WriteOutcome};
//!
//! #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
//! struct Counter { version: u64, hits: u64 }
//!
//! /// Applies batches to PostgreSQL (see "The sink must be idempotent").
//! struct Postgres { /* a connection pool */ }
//!
//! impl Sink<u64, Counter> for Postgres {
//!     async fn apply(&self, batch: &[Write<u64, Counter>]) -> Result<(), BoxError> {
//!         // BEGIN; INSERT … ON CONFLICT (id) DO UPDATE … WHERE t.version < excluded.version; COMMIT
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let url = "redis://cache.internal:6379/";
//! let store = RedisStore::connect(url).await?;
//! let counters: Cache<u64, Counter> = Cache::builder("counters")
//!     .store(store.clone())
//!     .ttl(Duration::from_secs(600))
//!     .version_by(|c: &Counter| c.version)
//!     .build()?;
//!
//! // Entries are written as the cache writes them: its TTL, versions, codec.
//! let wb = WriteBehind::builder(store, &counters)
//!     .max_backlog(100_000)
//!     .on_full(OnFull::Block { timeout: Duration::from_millis(200) })
//!     .build()
//!     .await?; // logs what a Redis crash could lose, if anything
//!
//! // Somewhere (one or more processes): flushers.
//! let flusher = wb.flusher(Postgres {}).connect(url).await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let task = tokio::spawn({
//!     let flusher = flusher.clone();
//!     async move { flusher.run(async { let _ = stopped.await; }).await }
//! });
//!
//! // A write: cached and queued in one step; the database gets it later.
//! let queued = wb.write_behind(&7, Counter { version: 42, hits: 1234 }).await?;
//! assert!(matches!(queued, WriteOutcome::Queued { .. }));
//! assert_eq!(counters.get(&7).await?.map(|c| c.hits), Some(1234));
//!
//! let _ = stop.send(());
//! task.await?;
//! # Ok(()) }
//! ```
//!
//! # The guarantee
//!
//! A write acknowledged by [`write_behind`](WriteBehind::write_behind)
//! (it returned [`WriteOutcome::Queued`]) is applied to the sink at least once, or
//! moved to the dead-letter stream as a [poison write](#flushing), **provided that**
//! Redis keeps it (see [durability](#durability-what-a-redis-crash-can-take))
//! and some flusher eventually runs. Flushers may crash at any point, any
//! number of times:
//!
//! - an entry leaves the stream only in the script that acknowledges it, run
//!   after the sink committed its batch (`XACK` and `XDEL` together), or in the
//!   one that copies it to the dead-letter stream; it is never trimmed;
//! - an entry read by a flusher that dies stays pending in the consumer group,
//!   and is claimed by another flusher (`XAUTOCLAIM`) once it has been idle for
//!   [`min_idle`](FlusherBuilder::min_idle);
//! - a flusher that dies after its sink committed and before it acknowledged
//!   leaves the batch to be applied again: hence the idempotent sink.
//!
//! So when all writes have been flushed, the source of truth holds, for each
//! key, the acknowledged write with the highest version.
//!
//! In the cache, the entry is written in the same atomic step as the enqueue,
//! exactly as [`Cache::set`](crate::Cache::set) writes it (the same routine
//! prepares it: the cache's expiry policy gives its TTL, jitter and soft
//! expiry, its `version_by` the version, its codec the bytes; a value the
//! policy keeps out of the cache is queued and its old entry deleted), and the key's lease is
//! revoked, so a load that read the old row cannot fill over it; like the
//! store's own writes, the step publishes a notice on the cache's invalidation
//! bus, so near caches (L1) in every process drop the old value. After a batch
//! is applied, its keys' leases are revoked again and entries older than the
//! applied version deleted (with a notice too): an entry that expired before
//! the flush and was refilled from the old row does not outlive the flush.
//!
//! # Durability: what a Redis crash can take
//!
//! "Durably queued" means: in Redis. What a crash of the Redis server loses
//! depends on its persistence settings, which [`WriteBehindBuilder::build`]
//! reads (`CONFIG GET`) and reports in one `tracing` warning when acknowledged
//! writes could be lost (or when it could not check: an ACL that forbids
//! `CONFIG`). [`WriteBehind::durability`] returns the verdict.
//!
//! | Redis setting | acknowledged writes a crash can lose |
//! |---|---|
//! | `appendonly no` | all since the last RDB snapshot; all of them if snapshots are off |
//! | `appendonly yes`, `appendfsync no` | what the kernel had not written back: about 30 s on Linux |
//! | `appendonly yes`, `appendfsync everysec` (Redis's default with AOF) | up to about one second (two when the disk is slow) |
//! | `appendonly yes`, `appendfsync always` | none (with `no-appendfsync-on-rewrite yes`: up to about 30 s during a background rewrite or save) |
//!
//! **For writes that must not be lost, use `appendfsync always`, or
//! [`wait_replicas`](WriteBehindBuilder::wait_replicas)** (`WAIT` after each
//! write: the write then survives the loss of the primary if a replica that
//! acknowledged it takes over). A failover to a replica that had not received
//! a write loses it, whatever the disk settings; one to a replica that had
//! not received a flushed write's acknowledgement applies that write again. A `maxmemory-policy` of
//! `allkeys-*` may evict the stream itself (it has no TTL), queued writes and
//! all: use `volatile-lru` or `volatile-lfu` (every cache entry and lease
//! carries a TTL, so these evict cache entries as `allkeys-*` would, and never
//! the stream), or `noeviction`; build warns about it too.
//!
//! # Backpressure
//!
//! The backlog is the stream's length (`XLEN`): unflushed writes, since
//! flushed ones are deleted. The write script checks it first: at
//! [`max_backlog`](WriteBehindBuilder::max_backlog) or beyond, a write is
//! refused with [`Error::Full`] (naming the key and the backlog), or, with
//! [`OnFull::Block`], retried with backoff until there is room or the timeout
//! passes. A refused write wrote nothing, neither the entry nor the stream.
//! Nothing is ever trimmed to make room.
//!
//! # Flushing
//!
//! A [`Flusher`] is a consumer of the stream's consumer group; run several,
//! in one process or many, each with its own consumer name. Each round of
//! [`Flusher::run`]:
//!
//! 0. after a round that failed for a reason not the writes' own (the sink
//!    called its error [transient](Sink::is_transient), or a Redis call
//!    failed, perhaps after its reply had delivered entries), takes the
//!    entries this flusher holds again (`XPENDING` of its consumer, then
//!    `XCLAIM` to itself, in one script), so that they are retried after the
//!    backoff rather than after `min_idle`; they are applied as in steps 3
//!    to 5;
//! 1. when a claim is due, `XAUTOCLAIM`s entries pending for at least
//!    [`min_idle`](FlusherBuilder::min_idle) (their flusher died, or their
//!    batch failed), reading each one's delivery count (`XPENDING`) in the same
//!    script. An entry delivered more than
//!    [`max_deliveries`](FlusherBuilder::max_deliveries) times without ever
//!    being acknowledged is moved to the dead-letter stream untried: it most
//!    likely crashes or stalls the flushers that take it. The others are
//!    applied as in steps 3 to 5;
//! 2. `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s >`: up to
//!    [`batch_size`](FlusherBuilder::batch_size) new entries;
//! 3. coalesces them per key: the highest version wins, and the others are
//!    acknowledged with it;
//! 4. calls [`Sink::apply`] once for the batch. If the sink refuses it, it
//!    calls it again for each key alone, so that the writes the sink refuses
//!    fail alone and the others go through (after three failures in a row with
//!    no success, the round stops: the sink is failing, not the writes);
//! 5. only for what the sink applied, acknowledges and deletes the entries
//!    (`XACK` + `XDEL`, one script). A write the sink refuses, alone, on its
//!    [`max_attempts`](FlusherBuilder::max_attempts)-th delivery or later is a
//!    **poison write**: it is moved to the dead-letter stream (copied with its
//!    delivery count and the reason, then acknowledged and deleted, in one
//!    script), logged at `error` level and counted in
//!    [`FlusherStats::dead_lettered`]; never dropped. Other entries the sink
//!    refused stay pending and are claimed again after `min_idle`, by this
//!    flusher or another (entries of a transient failure are retried as in
//!    step 0), and the flusher backs off (100 ms doubling to
//!    [`max_backoff`](FlusherBuilder::max_backoff)).
//!
//! Why two bounds rather than "delivered more than `max_attempts` times": a
//! flusher that dies while it holds entries leaves their delivery counts
//! raised without an attempt, so under that rule a few crashes in a row
//! dead-letter writes the sink never refused. Here nothing is dead-lettered
//! for `max_attempts` without a refusal by the sink, and `max_deliveries`, set
//! well above it, still catches the write that kills every flusher that takes
//! it.
//!
//! An entry that does not decode (another codec, a key type that does not
//! [decode](crate::CacheKey::decode_key)) is dead-lettered at once. Failures
//! that [`Sink::is_transient`] calls transient (a lost connection) do not count
//! as attempts (their delivery counts are set back with `XCLAIM … RETRYCOUNT`),
//! so an outage of the source of truth sends nothing to the dead-letter
//! stream. [`WriteBehind::replay_dead_letters`] moves dead letters back once
//! their cause is fixed.
//!
//! Flushers that stop or die leave their consumer names in the group; a
//! flusher deletes those idle for [`prune_idle`](FlusherBuilder::prune_idle)
//! that hold no pending entry (never one that does: that would drop its
//! entries).
//!
//! Every loop is bounded: a round handles at most `batch_size` claimed and
//! `batch_size` new entries, each sink call has a time limit
//! ([`sink_timeout`](FlusherBuilder::sink_timeout)), a read blocks at most
//! [`block`](FlusherBuilder::block), and shutdown is honoured between rounds.
//!
//! # The sink must be idempotent
//!
//! A batch can be applied more than once (a flusher died before
//! acknowledging it, or `min_idle` passed while it ran), and batches of one
//! key can arrive out of order (a failed batch retried after a newer one
//! succeeded). So [`Sink::apply`] writes the batch in one transaction and
//! only where its version is newer than the stored one:
//!
//! ```sql
//! INSERT INTO items AS t (id, version, value)
//! SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[])
//! ON CONFLICT (id) DO UPDATE SET version = excluded.version, value = excluded.value
//! WHERE t.version < excluded.version
//! ```
//!
//! Applied twice, or after a newer version, it changes nothing. Versions come
//! from the value (the cache's [`version_by`](crate::CacheBuilder::version_by)), and each
//! write of a key must carry a higher version than the one before: a write
//! whose version is not newer than the cached entry's is not queued at all
//! ([`WriteOutcome::Stale`]).
//!
//! # Limitations
//!
//! - **A single Redis node, not Redis Cluster.** The write script writes the
//!   cache entry (in its key's hash slot) and the stream (in the stream's) in
//!   one step; Redis Cluster refuses scripts over several slots.
//!   [`build`](WriteBehindBuilder::build) refuses a store on a cluster.
//!   Replicas (with Sentinel) are fine.
//! - **The database lags.** Until its flush, a write is only in Redis: code
//!   that reads the database directly sees the old row, and if the cache entry
//!   expires (or is evicted) before the flush, a cache miss loads the old row
//!   too, until the flush deletes it. Keep the TTL well above the flush lag.
//! - The write revokes the key's lease in Redis, which stops fills of loads in
//!   other processes, but a load in progress in *this* process may still
//!   return the old value to its callers (it cannot cache it).
//!
//! # Costs
//!
//! - **A write**: one `EVALSHA` (`XLEN`, `GET` for the version check, `SET … PX`,
//!   `DEL` of the lease, `XADD`, a `PUBLISH` on the bus channel, which costs
//!   little when no near cache listens), the value's bytes sent once; plus a `WAIT` in
//!   the same pipeline with `wait_replicas`, plus a Bloom filter update if the
//!   cache has one. With `appendfsync always`, Redis fsyncs once per event
//!   loop turn, so concurrent writes share fsyncs.
//! - **A batch**: one `XREADGROUP`, one sink call, one `EVALSHA` to
//!   acknowledge (`XACK`, `XDEL`, and per key a `DEL` of the lease and a `GET`).
//! - **Claims**: one `EVALSHA` every `min_idle / 2` (and at once while a scan
//!   has more); claimed entries are applied like new ones.
//! - **A refused batch**: one more sink call per key, then one acknowledging
//!   `EVALSHA` per key applied.
//! - **Memory**: each unflushed write's value is held twice, in the entry and
//!   in the stream, until flushed; the backlog bound caps it.
//!
//! # Redis keys
//!
//! | key | what | TTL |
//! |---|---|---|
//! | `{prefix}{namespace}:sys:wb` | the stream of unflushed writes, with the consumer group | none (a system structure; flushed entries are deleted) |
//! | `{prefix}{namespace}:sys:wb:dead` | the dead-letter stream: `key`, `version`, `value`, `origin_id`, `deliveries`, `reason` | none; never trimmed: inspect it, [replay](WriteBehind::replay_dead_letters) or delete it |
//!
//! Stream entries hold `key` (the store key), `version` (decimal) and `value`
//! (the codec's bytes).
#![deny(missing_docs)]

mod durability;
mod error;
mod flusher;
mod scripts;
mod write;

pub use durability::Durability;
pub use error::Error;
pub use flusher::{Flusher, FlusherBuilder, FlusherStats, Sink, Write};
pub use write::{OnFull, WriteBehind, WriteBehindBuilder, WriteOutcome};

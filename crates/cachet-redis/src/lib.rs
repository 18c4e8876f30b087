//! The Redis store of cachet.
//!
//! [`RedisStore`] speaks the lease protocol of [`cachet_core::store`] to Redis ≥ 7
//! (or Valkey) through one multiplexed, automatically reconnecting connection
//! (redis-rs `ConnectionManager`), to a [Redis Cluster](#redis-cluster), or to
//! the primary that [Redis Sentinel](#redis-sentinel) names.
//! Each primitive is one round trip, but for those of tags, whose keys are in
//! other slots than the entry's:
//!
//! | primitive | Redis command |
//! |---|---|
//! | `get` | `GET entry` |
//! | `acquire` | `EVALSHA` of `ACQUIRE`: `GET entry`, else `SET lease token NX PX ttl` |
//! | `fill` | `EVALSHA` of `FILL`: compare the lease, `SET entry bytes PX ttl`, `DEL lease` |
//! | `release` | `EVALSHA` of `RELEASE`: compare-and-delete of the lease |
//! | `set` | `EVALSHA` of `SET`: `SET entry bytes PX ttl`, `DEL lease` |
//! | `set_versioned` | `EVALSHA` of `SET_VERSIONED`: compare the versions in the envelopes, then as `SET` |
//! | `invalidate` | `DEL entry lease` |
//! | `invalidate_group` | `EVALSHA` of `BUMP`: `SET` the group's generation to a value it never had |
//! | `tag_clock` | `EVALSHA` of `TAG_CLOCK`: `GET` the cache's tag clock, started if missing |
//! | `tag_generations` | `MGET` of the tag generations (on a cluster, one `MGET` per slot, concurrently) |
//! | `claim_tags` | as `tag_generations`; for each tag without a generation, `tag_clock` and `EVALSHA` of `RAISE_TAG` |
//! | `invalidate_tag` | `EVALSHA` of `BUMP` on the tag clock, then `EVALSHA` of `RAISE_TAG`: the tag's generation to the new clock value |
//! | `defer_invalidate` | `EVALSHA` of `DEFER`: `ZADD` to a due set scored by server time + delay |
//! | `run_deferred` | `EVALSHA` of `CLAIM` per shard, one `DEL` per item, one `ZREM` to acknowledge |
//! | `bloom_check` | `EVALSHA` of `BLOOM_CHECK`: `STRLEN` of the filter, then `GETBIT` per position until one is clear |
//! | `bloom_add` | `EVALSHA` of `BLOOM_ADD`: `STRLEN` of the filter, then `SETBIT` per position (of every key in the batch) |
//! | `bloom_replace` | `EVALSHA` of `BLOOM_UPLOAD` per MiB of bitmap but the last (`SETRANGE` of a temporary key in the filter's slot), then `EVALSHA` of `BLOOM_COMMIT`: the last `SETRANGE`, `RENAME` over the filter, `PERSIST` |
//!
//! A hit is a plain `GET` rather than a script. One at a time, a tiny script
//! costs the same round trip as a `GET` on this machine (23.5 µs vs 23.8 µs),
//! but with 64 tasks sharing a connection the server does 327 k `GET`/s against
//! 221 k `EVALSHA`/s: the script's server CPU shows as soon as there is load
//! (see `docs/decisions.md`). Misses, which pay one extra round trip for the
//! lease, are the rarer case.
//!
//! On a cache with groups, every primitive on an entry is a script that also
//! reads the group's generation (in the same slot): a hit is then one `EVALSHA`
//! instead of a `GET`.
//!
//! Scripts run with `EVALSHA`; after a server restart or `SCRIPT FLUSH` the
//! `NOSCRIPT` reply makes the client load the script and retry once. Every key
//! written carries a TTL (`PX`). Entry and lease keys share a hash tag, so each
//! script's keys lie in one Redis Cluster slot.
//!
//! A Bloom filter is one Redis string of `ceil(bits / 8)` bytes under a `:sys:`
//! key without TTL (see [`cachet_core::bloom`]), in the slot of its rebuild's
//! temporary key; a filter that is missing or of another size counts as not
//! built and rules nothing out.
//!
//! # The invalidation bus
//!
//! Unless turned off ([`RedisStoreBuilder::invalidation_bus`]), every
//! successful `invalidate`, `set`, `set_versioned`, `invalidate_group` and
//! `invalidate_tag` —
//! whoever calls it: a `Cache`, an outbox relay, a deferred-invalidation worker —
//! also sends a notice to the near caches of that cache in every process, on
//! the cache's channel (`{prefix}{namespace}:sys:bus`). An `invalidate`,
//! `set` or `set_versioned` after a quiet millisecond sends its notice in its
//! own round trip (a `PUBLISH` pipelined after the `DEL`, or from the write's
//! script; not on a cluster); the others are queued for a background task that batches them
//! (what arrives within 1 ms, at most 512) into one `PUBLISH` per channel. So
//! no operation pays an extra round trip, a lone write's notice is out when
//! the write returns, a write burst costs a few messages, and while notices
//! keep coming a write does not even wake the task. [`InvalidationBus::subscribe_invalidations`] keeps a subscription up,
//! reconnecting with backoff, pinging every second, and reports every loss and
//! recovery: a near cache empties itself on both, since pub/sub drops what is
//! sent while a subscriber is away. Pub/sub was chosen over RESP3 client
//! tracking because tracking makes the server remember every key each client
//! read and sends one invalidation per key read (or, in broadcast mode, every key
//! of a prefix), needs RESP3 on the data connection, and cannot batch; pub/sub
//! sends exactly the notices of the caches a process follows, and `PUBLISH`
//! reaches every node of a cluster.
//!
//! # TLS
//!
//! A `rediss://` URL connects over TLS (rustls, with the `ring` provider),
//! for one server and for a cluster alike; the invalidation bus's
//! subscriptions use the same settings. The server's certificate is always
//! verified, against the system's root certificates unless
//! [`tls_ca_pem`](RedisStoreBuilder::tls_ca_pem) gives the CA to trust;
//! [`tls_client_cert_pem`](RedisStoreBuilder::tls_client_cert_pem) presents a
//! client certificate to a server that requires one (`tls-auth-clients yes`):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cachet_redis::RedisStore;
//!
//! let store = RedisStore::builder("rediss://:password@redis.internal:6380/")
//!     .tls_ca_pem(std::fs::read("/etc/redis/ca.crt")?)
//!     .tls_client_cert_pem(
//!         std::fs::read("/etc/redis/client.crt")?,
//!         std::fs::read("/etc/redis/client.key")?,
//!     )
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! The name checked against the certificate (and sent as SNI) is the host of
//! the URL, a DNS name or an IP address: connect by the name the certificate
//! was issued for. redis-rs offers no separate server name. On a cluster,
//! the nodes are reached at the addresses they announce, so their
//! certificates must name those.
//!
//! Only [`danger_accept_invalid_certs`](RedisStoreBuilder::danger_accept_invalid_certs)
//! turns verification off, and every `connect` with it logs a warning. The
//! `#insecure` URL fragment that redis-rs understands is refused, so that a
//! URL from configuration cannot quietly do it. A failed handshake (a
//! certificate that does not verify, a client certificate missing or refused)
//! is an `Unavailable` error that says "TLS handshake with Redis failed", with
//! rustls's reason as its cause. TLS settings with a plain `redis://` URL are a
//! configuration error.
//!
//! # Redis Cluster
//!
//! Give the store the URL of one or more nodes of the cluster; it discovers the
//! others, sends each command to the master serving its keys' slot, and follows
//! `MOVED` and `ASK` redirections (redis-rs `cluster_async::ClusterConnection`):
//!
//! ```no_run
//! # async fn demo() -> Result<(), cachet_core::StoreError> {
//! use std::time::Duration;
//! use cachet_redis::RedisStore;
//!
//! let store = RedisStore::connect_cluster(&[
//!     "redis://10.0.0.1:6379/",
//!     "redis://10.0.0.2:6379/",
//! ])
//! .await?;
//!
//! // With the options of `RedisStore::builder`:
//! let store = RedisStore::cluster_builder(["redis://10.0.0.1:6379/"])
//!     .response_timeout(Duration::from_millis(200))
//!     .deferred_shards(32)
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! The response timeout bounds a whole request, redirections and retries
//! included. Everything else works as on one server: a hit is still one `GET`.
//!
//! **Cross-slot operations are never sent.** Every primitive is one command, one
//! script or one pipeline whose keys share a hash tag (`{…}`), hence a slot:
//!
//! | keys sent together | their hash tag |
//! |---|---|
//! | an entry and its lease (`…:v:{key}`, `…:l:{key}`) | the key |
//! | an entry of a group, its lease, the group's generation (`…:sys:gen:{group}`) | the group |
//! | one shard of the deferred queue: its due and claimed sets | the shard's number, `{N}` |
//! | a Bloom filter and the temporary key of its rebuild | the cache's namespace |
//!
//! So a script only ever touches one slot, and a `ttl` is one pipeline of two
//! `PTTL`s to the entry's node. Nothing is batched across keys: a deferred
//! invalidation is claimed from its shard by one script, then deleted by its
//! own `DEL` on its entry's slot.
//!
//! Scripts run with `EVALSHA` on the keys' node. A node that does not have a
//! script (a new or restarted node, a failover, `SCRIPT FLUSH`) answers
//! `NOSCRIPT`, and the script is loaded on that node alone and the call
//! retried, so that a reload never waits for the other nodes; each node loads
//! each script the first time it runs it.
//!
//! **Hot slots.** A slot lives on one master, so all traffic to one hash tag
//! lands on one node, whatever the size of the cluster:
//!
//! - *a hot key* is one node's load, as on any Redis: a cluster does not spread
//!   it;
//! - *a hot group*: every entry of a group shares the group's slot, so that one
//!   script reads an entry with its generation, and a group invalidation is one
//!   `SET`. A group that takes a large share of the traffic (a big tenant) puts
//!   that share on one node. Keep groups to sets of keys of moderate traffic, or
//!   split a big tenant into several groups and invalidate each;
//! - *a Bloom filter* is one key per cache: every miss checks it (one script)
//!   and every write adds to it, all on the node serving the namespace's slot.
//!   On a cache with heavy miss traffic that node carries it all;
//! - *the deferred queue* defaults to 16 shards on a cluster (1 on one server),
//!   two sorted sets each in its own slot, so that deferred invalidations spread
//!   over the nodes; a [`run_deferred`](cachet_core::DeferredQueue::run_deferred) then costs one
//!   round trip per shard when nothing is due. The shards' hash tags are
//!   their numbers alone, so keep braces out of the system prefix.
//!
//! # Redis Sentinel
//!
//! Give the store the sentinels and the name they know the primary by; it
//! connects to the primary they name and follows it across failovers:
//!
//! ```no_run
//! # async fn demo() -> Result<(), cachet_core::StoreError> {
//! use cachet_redis::RedisStore;
//!
//! let store = RedisStore::sentinel_builder(
//!     [
//!         "redis://10.0.0.1:26379/",
//!         "redis://10.0.0.2:26379/",
//!         "redis://10.0.0.3:26379/",
//!     ],
//!     "mymaster",
//! )
//! .node_auth("cachet", "primary-password")
//! .connect()
//! .await?;
//! # Ok(()) }
//! ```
//!
//! The sentinels' own credentials go in their URLs; the data nodes' in
//! [`node_auth`](RedisStoreBuilder::node_auth), and their database, if not 0,
//! in [`node_database`](RedisStoreBuilder::node_database). With `rediss://` sentinels,
//! the data nodes are reached over TLS too, with the same [TLS](#tls)
//! settings.
//!
//! The primary is found by redis-rs's `SentinelClient` (the sentinels asked,
//! their answers taken in order, a primary flagged down skipped, the node
//! checked with `ROLE`), each time within the connection timeout; the sentinel
//! that answers a `PING` first is asked first, so that one that accepts
//! connections and never answers does not hold up the lookup. The store asks again, in the
//! background, when its connection breaks, when the node answers `READONLY`
//! (a primary demoted to replica: writes must not keep failing there), when a
//! reply times out (the connection is replaced only if the sentinels name
//! another node), and when a sentinel announces a failover on its
//! `+switch-master` channel, which the store follows: a requested failover
//! leaves the old primary up and writable until the sentinels demote it, up to
//! ten seconds later; the store goes to the primary the announcement names,
//! even if the sentinel it then asks has not caught up yet (for 30 seconds
//! after it, and once that node says it is a primary). In case an announcement
//! goes unheard, the store also asks after each attempt to subscribe, and pings
//! the sentinel it listens to every second, leaving one that does not answer.
//! Calls made while the primary is looked for wait for the new connection
//! within their response timeout. The invalidation bus's
//! subscriptions ask the sentinels at each reconnect.
//!
//! A failover loses what the old primary acknowledged but had not replicated,
//! invalidations included: an entry may be stale until its TTL afterwards.
//! `docs/production.md` says what a failover costs and how to bound it.
#![deny(missing_docs)]

mod bloom;
mod bus;
mod cluster;
#[doc(hidden)]
pub mod fuzz;
mod info;
mod scripts;
mod sentinel;
mod tls;

pub use cluster::RedisConnection;

/// Lua source of `generation(key)`, which every script that reads or stamps a
/// group's generation calls: it returns the generation under `key`, creating a
/// missing one from the server's time in microseconds (later than any the
/// group had before it was lost, so old entries stay orphaned). For scripts of
/// other crates that write grouped entries (write-behind), so that they create
/// generations exactly as this store does.
pub const GENERATION_LUA: &str = scripts::GENERATION;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cachet_core::BloomKey;
use cachet_core::{
    Acquire, AcquireMode, BloomBits, BusEvent, Deferred, DeferredQueue, Entry, Fill, FillOf,
    GroupKey, Groups, InvalidationBus, LeaseToken, Payload, PayloadKind, Read, Store, StoreError,
    StoreFuture, StoreKey, TagKey, Tags, TokenSource, Ttls, Versioned, VersionedSet, envelope,
    ttl_millis,
};
use cluster::Target;
pub use info::ServerInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// A [`Store`] on Redis or on a [Redis Cluster](crate#redis-cluster). Cloning is
/// cheap; clones share the connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), cachet_core::StoreError> {
/// use std::time::Duration;
/// use cachet_redis::RedisStore;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .response_timeout(Duration::from_millis(200))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConnection,
    tokens: TokenSource,
    response_timeout: Duration,
    connection_timeout: Duration,
    /// Redacted.
    target: Target,
    deferred: Box<[QueueShard]>,
    deferred_visibility: Duration,
    /// Where the next `run_deferred` starts, so shards take turns.
    next_shard: AtomicUsize,
    /// Sends invalidation notices, when the bus is on.
    publisher: Option<bus::Publisher>,
    /// The server (a cluster's first node, Sentinel's primary) that
    /// subscriptions connect to, with the store's TLS settings.
    nodes: sentinel::Nodes,
    /// The largest payload sent in one entry.
    max_payload: usize,
    /// How often a bus subscription pings, and how long it waits for the pong.
    bus_heartbeat: Duration,
}

/// One shard of the deferred-invalidation queue: two sorted sets in one slot.
struct QueueShard {
    due: String,
    claimed: String,
}

/// Configures a [`RedisStore`]. Start with [`RedisStore::builder`].
#[must_use = "a builder does nothing until .connect() is called"]
#[derive(Clone, Debug)]
pub struct RedisStoreBuilder {
    target: Target,
    response_timeout: Duration,
    connection_timeout: Duration,
    system_prefix: String,
    deferred_shards: u16,
    deferred_visibility: Duration,
    invalidation_bus: bool,
    bus_heartbeat: Duration,
    eviction_check: bool,
    max_payload: Option<usize>,
    tls: tls::TlsOptions,
    /// A Sentinel-only setting (`node_auth`, `node_database`) given to a store
    /// that is not on Sentinel: its name.
    misplaced: Option<&'static str>,
}

impl RedisStoreBuilder {
    /// The ACL user (empty: the default user) and password for the data nodes
    /// of a [Sentinel](crate#redis-sentinel) store, the primary that the
    /// sentinels name; the sentinels' own credentials go in their URLs.
    /// Only for stores from [`RedisStore::sentinel_builder`]: on one server or
    /// a cluster, the credentials go in the URL, and `connect` refuses this.
    pub fn node_auth(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        let auth = (username.into(), password.into());
        match &mut self.target {
            Target::Sentinel(target) => target.node_auth = Some(auth),
            _ => self.misplaced = Some("node_auth"),
        }
        self
    }

    /// The database (`SELECT`) on the data nodes of a
    /// [Sentinel](crate#redis-sentinel) store; 0 by default. Only for stores
    /// from [`RedisStore::sentinel_builder`] (the sentinels' URLs carry no
    /// database): on one server the database goes in the URL
    /// (`redis://host:6379/3`), and a cluster has only database 0; `connect`
    /// refuses this there.
    pub fn node_database(mut self, db: u32) -> Self {
        match &mut self.target {
            Target::Sentinel(target) => target.node_db = i64::from(db),
            _ => self.misplaced = Some("node_database"),
        }
        self
    }

    /// The largest payload (encoded value) the store sends in one entry.
    /// Defaults to what the server accepts: its `proto-max-bulk-len` (read at
    /// connect; 512 MiB, Redis's default, if `CONFIG` is not allowed) less
    /// room for the envelope. A smaller value here wins. A larger payload is
    /// refused by the cache before it is sent, so it never reaches a server
    /// that would close the connection every other call shares.
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload = Some(limit);
        self
    }

    /// Whether to read the server's `maxmemory` and `maxmemory-policy` when
    /// connecting and warn (one `tracing` line) about settings that break the
    /// guarantees (default: yes). See [`ServerInfo::warnings`].
    pub fn eviction_check(mut self, on: bool) -> Self {
        self.eviction_check = on;
        self
    }

    /// Whether the store publishes a notice on the invalidation bus after every
    /// invalidation, write and group invalidation (default: yes). Near caches
    /// in other processes rely on it; turn it off only where no near cache is
    /// used. See [the bus](crate#the-invalidation-bus).
    pub fn invalidation_bus(mut self, on: bool) -> Self {
        self.invalidation_bus = on;
        self
    }

    /// How often a near cache's bus subscription pings the server, and how
    /// long it waits for the answer before it counts the subscription as lost
    /// (default 1 s; at least 10 ms). A lost subscription empties the near
    /// cache and keeps it out of use until it is back. So while Redis stalls
    /// (`CLIENT PAUSE`, a failover, a blocked server), when notices cannot
    /// arrive, a near cache serves what it holds for at most about twice this
    /// long. Shorter is fresher during a stall, at the cost of that many more
    /// `PING`s per near cache, and of spurious losses on a slow network.
    pub fn bus_heartbeat(mut self, every: Duration) -> Self {
        self.bus_heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// How long to wait for a reply before failing the operation (default
    /// 500 ms). A cache read that fails falls back to the source of truth, so this
    /// bounds the latency a slow or unreachable Redis adds.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long to wait for a connection (default 1 s): `connect` fails once
    /// this has passed, however many attempts the client made meanwhile.
    ///
    /// On a [Sentinel](crate#redis-sentinel) store it bounds the whole
    /// lookup of the primary; within it, redis-rs asks each sentinel with
    /// limits of its own that cannot be set (1 s to connect, 500 ms to
    /// answer), so a longer timeout does not wait longer for one slow
    /// sentinel.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The prefix of the store's own `:sys:` structures (default `cachet:`): the
    /// deferred-invalidation queue lives at `{prefix}sys:deferred:{N}:due` and
    /// `…:claimed`. These keys have no TTL; they are the store's durable state.
    pub fn system_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.system_prefix = prefix.into();
        self
    }

    /// How many shards the deferred-invalidation queue has (default 1 on one
    /// server, 16 on a cluster). Each shard is one pair of sorted sets in its own
    /// hash slot; on Redis Cluster, more shards spread the queue over more nodes,
    /// so that no single slot takes every deferred invalidation. A
    /// [`run_deferred`](cachet_core::DeferredQueue::run_deferred) visits the shards one after another:
    /// one round trip per shard when nothing is due.
    pub fn deferred_shards(mut self, shards: u16) -> Self {
        self.deferred_shards = shards.max(1);
        self
    }

    /// How long a claimed deferred invalidation may stay unacknowledged before
    /// another worker runs it again (default 10 s).
    pub fn deferred_visibility(mut self, timeout: Duration) -> Self {
        self.deferred_visibility = timeout;
        self
    }

    /// Trusts the CA certificates in `pem` (PEM, one or more certificates)
    /// for `rediss://` connections, instead of the system's roots. See
    /// [TLS](crate#tls).
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_ca = Some(pem.into().into());
        self
    }

    /// Presents this client certificate (PEM chain) and its private key (PEM)
    /// on `rediss://` connections, for servers that require mutual TLS
    /// (`tls-auth-clients yes`). See [TLS](crate#tls).
    pub fn tls_client_cert_pem(
        mut self,
        cert_chain: impl Into<Vec<u8>>,
        private_key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((cert_chain.into().into(), private_key.into().into()));
        self
    }

    /// **Turns off verification of the server's certificate** on `rediss://`
    /// connections (default: verification on). The traffic is still
    /// encrypted, but to whoever answers: anyone on the path can pose as the
    /// server and read or change what the cache stores. Meant for a test
    /// server with a throwaway certificate; every `connect` with it on logs a
    /// warning. A URL cannot do this: a `#insecure` fragment is refused.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.tls.accept_invalid_certs = accept;
        self
    }

    /// Connects.
    ///
    /// # Errors
    /// When a URL is invalid, or the server (on a cluster, every node given)
    /// cannot be reached. An error of the latter kind names the server
    /// without its password, then what failed (`cannot connect to
    /// redis://app:***@host:6379/0: no connection within the connection timeout
    /// (1s)`), and has the client's error, if any, as its source.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        if let Some(setting) = self.misplaced {
            return Err(StoreError::config(format!(
                "{setting} is for Sentinel stores; on one server give it in the Redis URL"
            )));
        }
        self.tls.warn_if_insecure(&self.target);
        let (conn, nodes) = self.connect_target().await?;
        let shards = (0..self.deferred_shards)
            .map(|i| QueueShard {
                due: format!("{}sys:deferred:{{{i}}}:due", self.system_prefix),
                claimed: format!("{}sys:deferred:{{{i}}}:claimed", self.system_prefix),
            })
            .collect();
        let publisher = self
            .invalidation_bus
            .then(|| bus::Publisher::spawn(conn.clone()));
        let eviction_check = self.eviction_check;
        let server_limit = bulk_limit(&conn)
            .await
            .map_err(|e| e.context(self.target.describe()))?
            - ENVELOPE_ROOM;
        let max_payload = self
            .max_payload
            .map_or(server_limit, |ours| ours.min(server_limit));
        let store = RedisStore {
            inner: Arc::new(Inner {
                publisher,
                nodes,
                max_payload,
                bus_heartbeat: self.bus_heartbeat,
                conn,
                tokens: TokenSource::new(),
                response_timeout: self.response_timeout,
                connection_timeout: self.connection_timeout,
                target: self.target.redacted(),
                deferred: shards,
                deferred_visibility: self.deferred_visibility,
                next_shard: AtomicUsize::new(0),
            }),
        };
        if eviction_check {
            store.check_eviction_settings().await;
        }
        Ok(store)
    }

    /// The connection, and where connections of one's own go.
    async fn connect_target(&self) -> Result<(RedisConnection, sentinel::Nodes), StoreError> {
        Ok(match &self.target {
            Target::Server(url) => (
                (self.connect_server(url).await).map_err(|e| naming(e, &redact_url(url)))?,
                sentinel::Nodes::Fixed(Box::new(self.tls.client(url)?)),
            ),
            Target::Cluster(urls) => (
                cluster::connect(
                    urls,
                    self.response_timeout,
                    self.connection_timeout,
                    &self.tls,
                )
                .await
                .map_err(|e| naming(e, &self.target.describe()))?,
                sentinel::Nodes::Fixed(Box::new(
                    self.tls.client(urls.first().map_or("", String::as_str))?,
                )),
            ),
            Target::Sentinel(target) => {
                let primary = sentinel::connect(
                    target,
                    &self.tls,
                    self.response_timeout,
                    self.connection_timeout,
                )
                .await?;
                (
                    RedisConnection::sentinel(primary.clone(), self.response_timeout),
                    sentinel::Nodes::Primary(primary),
                )
            }
        })
    }

    async fn connect_server(&self, url: &str) -> Result<RedisConnection, StoreError> {
        let client = self.tls.client(url)?;
        managed(client, self.response_timeout, self.connection_timeout).await
    }
}

/// A reconnecting connection to one server (redis-rs `ConnectionManager`),
/// each call within `response_timeout`, the first connect within
/// `connection_timeout` whatever the retries.
async fn managed(
    client: redis::Client,
    response_timeout: Duration,
    connection_timeout: Duration,
) -> Result<RedisConnection, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(connection_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let connecting = ConnectionManager::new_with_config(client, config);
    let conn = within_connect_timeout(connection_timeout, connecting)
        .await?
        .map_err(|e| connect_err(e, connection_timeout))?;
    Ok(RedisConnection::server(conn, response_timeout))
}

/// Bytes kept out of the server's bulk limit for the envelope around a
/// payload (its fixed fields are a few dozen bytes).
const ENVELOPE_ROOM: usize = 1024;

/// The server's `proto-max-bulk-len`: the largest string a command may carry;
/// Redis's default when `CONFIG` is not allowed or the reply is odd. An
/// error if the server wants a password that the URL does not give: every
/// call would fail.
async fn bulk_limit(conn: &RedisConnection) -> Result<usize, StoreError> {
    const REDIS_DEFAULT: usize = 512 * 1024 * 1024;
    let mut conn = conn.clone();
    let reply: Result<Vec<String>, redis::RedisError> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("proto-max-bulk-len")
        .query_async(&mut conn)
        .await;
    if let Err(e) = &reply
        && e.code() == Some("NOAUTH")
    {
        return Err(StoreError::config(
            "it requires authentication (NOAUTH), and the URL gives no password: \
             redis://user:password@host:port/, or redis://:password@host:port/ for the \
             default user",
        ));
    }
    let limit = reply
        .ok()
        .and_then(|kv| kv.into_iter().nth(1)?.parse().ok());
    Ok(limit.unwrap_or(REDIS_DEFAULT).max(ENVELOPE_ROOM * 2))
}

impl RedisStore {
    /// Connects with default settings.
    ///
    /// # Errors
    /// When the URL is invalid or the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// A builder for a store on the server at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            target: Target::Server(url.into()),
            response_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(1),
            system_prefix: "cachet:".to_owned(),
            deferred_shards: 1,
            deferred_visibility: Duration::from_secs(10),
            invalidation_bus: true,
            bus_heartbeat: bus::HEARTBEAT,
            eviction_check: true,
            max_payload: None,
            tls: tls::TlsOptions::default(),
            misplaced: None,
        }
    }

    /// Connects to a Redis Cluster through any of its nodes
    /// (`redis://host:port/` each), with default settings. See
    /// [Redis Cluster](crate#redis-cluster).
    ///
    /// # Errors
    /// When a URL is invalid, no node can be reached, or they are not cluster nodes.
    pub async fn connect_cluster<S: AsRef<str>>(urls: &[S]) -> Result<Self, StoreError> {
        Self::cluster_builder(urls.iter().map(AsRef::as_ref))
            .connect()
            .await
    }

    /// A builder for a store on the Redis Cluster that these nodes belong to
    /// (any of its nodes will do; the others are discovered). Its deferred
    /// queue has 16 shards unless set otherwise.
    pub fn cluster_builder<I>(urls: I) -> RedisStoreBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        RedisStoreBuilder {
            target: Target::Cluster(urls.into_iter().map(Into::into).collect()),
            deferred_shards: 16,
            ..Self::builder(String::new())
        }
    }

    /// Connects to the primary that these Redis Sentinel nodes
    /// (`redis://host:port/` each) name for `master`, with default settings.
    /// See [Redis Sentinel](crate#redis-sentinel).
    ///
    /// # Errors
    /// When a URL is invalid, or no sentinel names a primary that can be reached.
    pub async fn connect_sentinel<S: AsRef<str>>(
        sentinels: &[S],
        master: &str,
    ) -> Result<Self, StoreError> {
        Self::sentinel_builder(sentinels.iter().map(AsRef::as_ref), master)
            .connect()
            .await
    }

    /// A builder for a store on the primary that these Redis Sentinel nodes
    /// name for `master` (give all of them: they are asked in turn). The store
    /// follows the primary across failovers; see
    /// [Redis Sentinel](crate#redis-sentinel).
    pub fn sentinel_builder<I>(sentinels: I, master: impl Into<String>) -> RedisStoreBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        RedisStoreBuilder {
            target: Target::Sentinel(sentinel::SentinelTarget {
                urls: sentinels.into_iter().map(Into::into).collect(),
                master: master.into(),
                node_auth: None,
                node_db: 0,
            }),
            ..Self::builder(String::new())
        }
    }

    /// A handle on the underlying connection, for commands outside the protocol
    /// (on a cluster, each with its keys in one slot): write-behind's scripts,
    /// the CLI's admin commands. Not part of the documented API, which exposes
    /// no redis-rs type.
    #[doc(hidden)]
    pub fn connection(&self) -> RedisConnection {
        self.inner.conn.clone()
    }

    /// A connection of one's own to the store's server (on Sentinel, to the
    /// primary the sentinels name, followed across failovers on its own), with
    /// the store's TLS settings and connection timeout, and calls bounded by
    /// `response_timeout`: write-behind's flushers, whose blocking reads must
    /// not hold the shared connection. Not part of the documented API, which
    /// exposes no redis-rs type.
    ///
    /// # Errors
    /// When the server (or, on Sentinel, the primary) cannot be reached, or
    /// on a cluster, which has no single server.
    #[doc(hidden)]
    pub async fn own_connection(
        &self,
        response_timeout: Duration,
    ) -> Result<RedisConnection, StoreError> {
        match &self.inner.nodes {
            _ if self.is_cluster() => Err(StoreError::config(
                "a connection of one's own needs a single Redis server, not a Redis Cluster",
            )),
            sentinel::Nodes::Primary(primary) => Ok(RedisConnection::sentinel(
                primary.sibling(response_timeout).await?,
                response_timeout,
            )),
            sentinel::Nodes::Fixed(client) => {
                let client = client.as_ref().clone();
                managed(client, response_timeout, self.inner.connection_timeout).await
            }
        }
    }

    /// A connection of one's own to the server at `url`, with the store's
    /// connection timeout and calls bounded by `response_timeout` (TLS only as
    /// the URL's scheme asks: no CA or client certificate). Not part of the
    /// documented API.
    ///
    /// # Errors
    /// When the URL is invalid or the server cannot be reached within the
    /// connection timeout.
    #[doc(hidden)]
    pub async fn connection_to(
        &self,
        url: &str,
        response_timeout: Duration,
    ) -> Result<RedisConnection, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::config(format!("invalid Redis URL: {e}")))?;
        managed(client, response_timeout, self.inner.connection_timeout).await
    }

    /// Whether the store is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    /// Memory, eviction and hit counters of the server (on a cluster, of the
    /// node that answers). `CONFIG` may be forbidden by ACLs: those fields are
    /// then `None`.
    ///
    /// # Errors
    /// When the server cannot be reached or `INFO` fails.
    pub async fn server_info(&self) -> Result<ServerInfo, StoreError> {
        let mut conn = self.conn();
        let config = |name: &'static str| {
            let mut conn = self.conn();
            async move {
                let reply: Result<Vec<String>, _> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut conn)
                    .await;
                reply.ok().and_then(|kv| kv.into_iter().nth(1))
            }
        };
        let maxmemory = config("maxmemory").await.and_then(|v| v.parse().ok());
        let policy = config("maxmemory-policy").await;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(ServerInfo {
            maxmemory,
            policy,
            ..ServerInfo::default()
        }
        .with_info(&info))
    }

    fn conn(&self) -> RedisConnection {
        self.inner.conn.clone()
    }

    async fn check_eviction_settings(&self) {
        match self.server_info().await {
            Ok(info) => {
                let warnings = info.warnings();
                if !warnings.is_empty() {
                    tracing::warn!(store = ?self, "Redis settings weaken cachet's guarantees: {}", warnings.join("; "));
                }
            }
            Err(e) => {
                tracing::warn!(store = ?self, error = %cachet_core::Report(&e), "could not read the Redis eviction settings")
            }
        }
    }

    /// The notice of `key` to send with its write, and the publisher to tell
    /// if it is refused; `None` when the bus is off, or when the notice is to
    /// be queued ([`notify_key`](Self::notify_key)) after the write.
    fn inline_notice<'k>(
        &self,
        key: &'k StoreKey,
    ) -> Option<(&bus::Publisher, bus::InlineNotice<'k>)> {
        let publisher = self.inner.publisher.as_ref()?;
        Some((publisher, publisher.inline_key(key)?))
    }

    /// Runs a write's script, which publishes `inline`'s notice after the
    /// write, if there is one.
    async fn invoke_write<T: redis::FromRedisValue>(
        &self,
        script: &mut redis::ScriptInvocation<'_>,
        inline: &Option<(&bus::Publisher, bus::InlineNotice<'_>)>,
    ) -> Result<T, StoreError> {
        if let Some((_, notice)) = inline {
            script.arg(notice.channel()).arg(notice.line());
        }
        (script.invoke_async(&mut self.conn()).await).map_err(|e| self.err(e))
    }

    /// After a write's script: queues the notice of `key` if the script wrote
    /// and did not send it, or counts it if the server refused it.
    fn noticed(
        &self,
        key: &StoreKey,
        inline: Option<(&bus::Publisher, bus::InlineNotice<'_>)>,
        wrote: bool,
        refused: bool,
    ) {
        match inline {
            None if wrote => self.notify_key(key),
            Some((publisher, notice)) if refused => {
                publisher.inline_failed(&notice, &"PUBLISH refused in the write's script");
            }
            _ => {}
        }
    }

    /// Tells near caches that `key` changed.
    fn notify_key(&self, key: &StoreKey) {
        if let Some(publisher) = &self.inner.publisher {
            publisher.key(key);
        }
    }

    fn err(&self, e: redis::RedisError) -> StoreError {
        self.inner.conn.error(e)
    }

    /// `keys` with their positions, in one batch on a single server, one per
    /// hash slot on a cluster (a script may only touch keys of one slot).
    fn by_slot<'k>(&self, keys: Vec<&'k StoreKey>) -> Vec<Vec<(usize, &'k StoreKey)>> {
        let keys = keys.into_iter().enumerate();
        if !self.is_cluster() {
            return vec![keys.collect()];
        }
        let mut slots: std::collections::BTreeMap<u16, Vec<(usize, &StoreKey)>> =
            std::collections::BTreeMap::new();
        for (i, key) in keys {
            slots
                .entry(cluster::slot(key.as_str()))
                .or_default()
                .push((i, key));
        }
        slots.into_values().collect()
    }

    /// The names of the deferred-invalidation queue's sorted sets, shard by shard.
    pub fn deferred_queue_keys(&self) -> Vec<(String, String)> {
        self.inner
            .deferred
            .iter()
            .map(|s| (s.due.clone(), s.claimed.clone()))
            .collect()
    }

    fn shard_of(&self, key: &StoreKey) -> &QueueShard {
        // FNV-1a: stable across processes, unlike the std hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.as_str().bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let n = self.inner.deferred.len() as u64;
        // The remainder is below the shard count, a u16.
        #[allow(clippy::cast_possible_truncation)]
        let i = (h % n) as usize;
        &self.inner.deferred[i]
    }

    /// Claims, runs and acknowledges due items of one shard.
    async fn run_shard(
        &self,
        shard: &QueueShard,
        max: usize,
    ) -> Result<(usize, Option<Duration>), StoreError> {
        let mut conn = self.conn();
        let (members, next_due, now): (Vec<Vec<u8>>, i64, i64) = scripts::CLAIM
            .key(&shard.due)
            .key(&shard.claimed)
            .arg(max)
            .arg(ttl_millis(self.inner.deferred_visibility))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        let mut done = Vec::with_capacity(members.len());
        let mut failure = None;
        for member in members {
            let key = std::str::from_utf8(&member)
                .ok()
                .and_then(|m| m.split_once('|'))
                .and_then(|(_, key)| StoreKey::parse(key));
            match key {
                Some(key) => match self.invalidate(&key).await {
                    Ok(()) => done.push(member),
                    // Left claimed: it runs again after the visibility timeout.
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                },
                None => {
                    tracing::error!(member = %String::from_utf8_lossy(&member),
                        "dropping a malformed deferred invalidation");
                    done.push(member);
                }
            }
        }
        let ran = done.len();
        if !done.is_empty() {
            let _: i64 = redis::cmd("ZREM")
                .arg(&shard.claimed)
                .arg(done)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.err(e))?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let next = (next_due >= 0)
            .then(|| Duration::from_millis(u64::try_from(next_due - now).unwrap_or(0)));
        Ok((ran, next))
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RedisStore");
        match &self.inner.target {
            Target::Server(url) => d.field("url", url),
            Target::Cluster(urls) => d
                .field("cluster", urls)
                .field("deferred_shards", &self.inner.deferred.len()),
            Target::Sentinel(target) => d.field("sentinel", target),
        };
        d.field("response_timeout", &self.inner.response_timeout)
            .finish()
    }
}

/// The lease key of an entry key, as a command argument written straight into
/// the command: no `String` of its own ([`StoreKey::lease_key`] is the same
/// key).
struct LeaseKey<'a>(&'a StoreKey);

impl redis::ToRedisArgs for LeaseKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use bytes::BufMut as _;
        let (head, tail) = self.0.lease_key_parts();
        // At its size: a script's key is a `Vec` of its own, which would
        // otherwise grow at each part.
        let mut arg = out.bufmut_for_next_arg(head.len() + 1 + tail.len());
        arg.put_slice(head.as_bytes());
        arg.put_u8(b'l');
        arg.put_slice(tail.as_bytes());
    }
}

/// A command `name` with room for `args` more arguments of `bytes` bytes in
/// all, so that adding them does not grow its buffers.
pub(crate) fn command(name: &'static str, args: usize, bytes: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(args + 1, name.len() + bytes);
    cmd.arg(name);
    cmd
}

/// A redis-rs error as the cause of a [`StoreError`]. redis-rs shows an I/O
/// error's text in its own and also returns that error as its source; as a
/// cause here, a source the text already shows is left out, so that a chain
/// printed cause by cause (as `anyhow`'s `{:#}` does) shows it once.
#[derive(Debug)]
pub(crate) struct RedisCause(pub(crate) redis::RedisError);

impl std::fmt::Display for RedisCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for RedisCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let source = std::error::Error::source(&self.0)?;
        (!self.0.to_string().contains(&source.to_string())).then_some(source)
    }
}

/// A failed call as a store error: a timeout names `timeout`, the response
/// timeout of the connection that made the call.
fn map_err(e: redis::RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        StoreError::new(
            cachet_core::StoreErrorKind::Timeout,
            format!("no reply within the response timeout ({timeout:?})"),
        )
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::unavailable(RedisCause(e))
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
        StoreError::new(
            cachet_core::StoreErrorKind::Other,
            "Redis refused the credentials (user name and password)",
        )
        .with_source(RedisCause(e))
    } else {
        StoreError::other(RedisCause(e))
    }
}

/// A failure to connect: as [`map_err`], but a failed TLS handshake says so.
fn connect_err(e: redis::RedisError, timeout: Duration) -> StoreError {
    if !e.is_timeout() && tls::is_handshake_failure(&e) {
        StoreError::new(
            cachet_core::StoreErrorKind::Unavailable,
            "TLS handshake with Redis failed: check the CA certificate (server certificate \
             verification) and the client certificate",
        )
        .with_source(RedisCause(e))
    } else {
        map_err(e, timeout)
    }
}

/// Runs a connection attempt within the connect timeout: past it, the attempt
/// is dropped and the error names the limit.
pub(crate) async fn within_connect_timeout<T>(
    limit: Duration,
    connecting: impl std::future::Future<Output = T>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, connecting).await.map_err(|_| {
        StoreError::new(
            cachet_core::StoreErrorKind::Timeout,
            format!("no connection within the connection timeout ({limit:?})"),
        )
    })
}

/// A failure to connect to `server` (shown without its password), which it
/// then names. A configuration error names its setting already, and a
/// Sentinel store's errors name the master.
fn naming(e: StoreError, server: &str) -> StoreError {
    if e.kind() == cachet_core::StoreErrorKind::Config {
        return e;
    }
    e.context(format_args!("cannot connect to {server}"))
}

/// `url` as logs and error messages show it: its password replaced by
/// `***`, the rest (the user name too) as given. A URL without a password is
/// shown as it is. Works on any `scheme://user:password@host…` URL.
///
/// ```
/// use cachet_redis::redact_url;
/// assert_eq!(redact_url("redis://app:s3cret@db:6379/0"), "redis://app:***@db:6379/0");
/// assert_eq!(redact_url("rediss://:s3cret@db:6380"), "rediss://:***@db:6380");
/// assert_eq!(redact_url("redis://db:6379/0?name=a@b"), "redis://db:6379/0?name=a@b");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = match rest[..authority_end].rfind('@') {
        Some(at) => at,
        // An `@` past the host belongs to the path or the query, unless the
        // URL is malformed: a password with an unescaped `/`, `?` or `#`
        // ends the host early, and its rest would show.
        None => match rest.rfind('@') {
            Some(at) if !valid_without_password(url) => at,
            _ => return url.to_owned(),
        },
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Whether `url` is a valid Redis URL without a password.
fn valid_without_password(url: &str) -> bool {
    redis::IntoConnectionInfo::into_connection_info(url)
        .is_ok_and(|info| info.redis_settings().password().is_none())
}

fn encode(entry: &Entry) -> Result<Vec<u8>, StoreError> {
    match &entry.payload {
        Payload::Empty => Ok(envelope::encode(&entry.meta, &[])),
        Payload::Bytes(b) => Ok(envelope::encode(&entry.meta, b)),
        Payload::Object(_) => Err(StoreError::unsupported(
            "RedisStore keeps bytes; encode values with a codec",
        )),
    }
}

fn decode(bytes: Bytes) -> Option<Entry> {
    match envelope::decode(&bytes) {
        Ok((meta, payload)) => Some(Entry {
            payload: if meta.negative {
                Payload::Empty
            } else {
                Payload::Bytes(payload)
            },
            meta,
        }),
        Err(e) => {
            tracing::debug!(error = %cachet_core::Report(&e), "undecodable entry in Redis");
            None
        }
    }
}

fn read_of(bytes: Option<Bytes>) -> Read {
    match bytes {
        None => Read::Miss,
        Some(b) => decode(b).map_or(Read::Corrupt, Read::Hit),
    }
}

/// A read of a grouped key: an entry filled under an older generation is orphaned.
fn current(read: Read, generation: u64) -> Read {
    match read {
        Read::Hit(entry) if entry.meta.generation != generation => Read::Miss,
        other => other,
    }
}

/// Takes the generation off the end of a grouped script's reply.
fn split_generation(reply: &mut redis::Value) -> Result<u64, StoreError> {
    let bad = |reply: &redis::Value| protocol("generation", reply);
    let redis::Value::Array(items) = reply else {
        return Err(bad(reply));
    };
    let generation = match items.pop() {
        Some(redis::Value::BulkString(g)) => {
            std::str::from_utf8(&g).ok().and_then(|g| g.parse().ok())
        }
        _ => None,
    };
    generation.ok_or_else(|| bad(reply))
}

fn protocol(what: &str, reply: &redis::Value) -> StoreError {
    StoreError::protocol(format!("{what}: {reply:?}"))
}

/// The acquire scripts' mode argument.
fn mode_arg(mode: AcquireMode) -> &'static str {
    match mode {
        AcquireMode::IfAbsent => "0",
        AcquireMode::Replace => "1",
    }
}

/// The results of a batch's slots, each tagged with its key's position, in
/// the order of the batch's `n` keys.
fn in_order<T>(n: usize, per_slot: Vec<Vec<(usize, T)>>) -> Result<Vec<T>, StoreError> {
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(n).collect();
    for (i, t) in per_slot.into_iter().flatten() {
        out[i] = Some(t);
    }
    out.into_iter()
        .map(|t| t.ok_or_else(|| StoreError::protocol("a batch left a key without a result")))
        .collect()
}

fn parse_acquire(reply: redis::Value, token: LeaseToken) -> Result<Acquire, StoreError> {
    use redis::Value;
    let Value::Array(items) = &reply else {
        return Err(protocol("acquire", &reply));
    };
    match items.as_slice() {
        [Value::Int(1), Value::BulkString(b)] => {
            Ok(decode(Bytes::copy_from_slice(b)).map_or(Acquire::Corrupt, Acquire::Hit))
        }
        [Value::Int(2)] => Ok(Acquire::Leased(token)),
        [Value::Int(3), Value::Int(pttl)] => Ok(Acquire::Busy {
            expires_in: u64::try_from(*pttl).ok().map(Duration::from_millis),
        }),
        _ => Err(protocol("acquire", &reply)),
    }
}

/// A version-checked write's reply, and whether its notice was refused.
fn parse_versioned(reply: &redis::Value) -> Result<(Versioned, bool), StoreError> {
    use redis::Value;
    match reply {
        Value::Array(items) => match items.as_slice() {
            [Value::Int(1)] => Ok((Versioned::Written, false)),
            [Value::Int(1), Value::Int(0)] => Ok((Versioned::Written, true)),
            [Value::Int(0), Value::BulkString(v)] if v.len() == 8 => {
                let mut b = [0; 8];
                b.copy_from_slice(v);
                let current = u64::from_be_bytes(b);
                Ok((Versioned::Stale { current }, false))
            }
            _ => Err(protocol("set_versioned", reply)),
        },
        _ => Err(protocol("set_versioned", reply)),
    }
}

impl Store for RedisStore {
    fn payload_kind(&self) -> PayloadKind {
        PayloadKind::Bytes
    }

    fn max_payload_bytes(&self) -> Option<usize> {
        Some(self.inner.max_payload)
    }

    fn get<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Read> {
        if let Some(group) = key.group_key() {
            return Box::pin(async move {
                let (bytes, generation): (Option<Bytes>, u64) = scripts::GET_GROUPED
                    .key(key.as_str())
                    .key(group.as_str())
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(current(read_of(bytes), generation))
            });
        }
        Box::pin(async move {
            let read: Result<Option<Bytes>, _> = command("GET", 1, key.as_str().len())
                .arg(key.as_str())
                .query_async(&mut self.conn())
                .await;
            match read {
                Ok(bytes) => Ok(read_of(bytes)),
                // Not a string (someone else's key): not an entry, to be replaced.
                Err(e) if e.code() == Some("WRONGTYPE") => Ok(Read::Corrupt),
                Err(e) => Err(self.err(e)),
            }
        })
    }

    /// One `MGET` (a cluster connection splits it by hash slot, one request
    /// per node). Grouped keys are read with their group's generation, one
    /// script each, pipelined on the connection.
    fn get_many<'a>(&'a self, keys: &'a [StoreKey]) -> StoreFuture<'a, Vec<Read>> {
        Box::pin(async move {
            if keys.len() < 2 || keys.iter().any(|k| k.group().is_some()) {
                return futures::future::try_join_all(keys.iter().map(|k| self.get(k))).await;
            }
            let mut mget = redis::cmd("MGET");
            for key in keys {
                mget.arg(key.as_str());
            }
            // A key holding another type reads as nil: a miss, replaced when
            // it is filled.
            let values: Vec<Option<Bytes>> = mget
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            if values.len() != keys.len() {
                return Err(StoreError::protocol(format!(
                    "MGET of {} keys answered {} values",
                    keys.len(),
                    values.len()
                )));
            }
            Ok(values.into_iter().map(read_of).collect())
        })
    }

    /// One script per hash slot (one in all on a single server), the slots'
    /// scripts sent concurrently. Grouped keys take one script each.
    fn acquire_many<'a>(
        &'a self,
        keys: &'a [StoreKey],
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Vec<Acquire>> {
        Box::pin(async move {
            if keys.len() < 2 || keys.iter().any(|k| k.group().is_some()) {
                let each = keys.iter().map(|k| self.acquire(k, mode, lease_ttl));
                return futures::future::try_join_all(each).await;
            }
            let per_slot =
                self.by_slot(keys.iter().collect())
                    .into_iter()
                    .map(|batch| async move {
                        let tokens: Vec<LeaseToken> = batch
                            .iter()
                            .map(|_| self.inner.tokens.next_token())
                            .collect();
                        let mut script = scripts::ACQUIRE_MANY.prepare_invoke();
                        for (_, key) in &batch {
                            script.key(key.as_str()).key(LeaseKey(key));
                        }
                        script.arg(ttl_millis(lease_ttl)).arg(mode_arg(mode));
                        for token in &tokens {
                            script.arg(&token.as_bytes()[..]);
                        }
                        let replies: Vec<redis::Value> = script
                            .invoke_async(&mut self.conn())
                            .await
                            .map_err(|e| self.err(e))?;
                        if replies.len() != batch.len() {
                            return Err(protocol("acquire", &redis::Value::Array(replies)));
                        }
                        let claims = replies
                            .into_iter()
                            .zip(tokens)
                            .map(|(reply, token)| parse_acquire(reply, token))
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok::<_, StoreError>(
                            batch
                                .into_iter()
                                .map(|(i, _)| i)
                                .zip(claims)
                                .collect::<Vec<_>>(),
                        )
                    });
            in_order(keys.len(), futures::future::try_join_all(per_slot).await?)
        })
    }

    /// One script per hash slot (one in all on a single server), the slots'
    /// scripts sent concurrently. Grouped keys take one script each.
    fn fill_many<'a>(&'a self, fills: &'a [FillOf<'a>]) -> StoreFuture<'a, Vec<Fill>> {
        Box::pin(async move {
            if fills.len() < 2 || fills.iter().any(|f| f.key.group().is_some()) {
                let each = fills
                    .iter()
                    .map(|f| self.fill(f.key, f.lease, f.entry.clone(), f.ttl));
                return futures::future::try_join_all(each).await;
            }
            let encoded = fills
                .iter()
                .map(|f| encode(&f.entry))
                .collect::<Result<Vec<_>, _>>()?;
            let keys = fills.iter().map(|f| f.key).collect();
            let per_slot = self.by_slot(keys).into_iter().map(|batch| {
                let encoded = &encoded;
                async move {
                    let mut script = scripts::FILL_MANY.prepare_invoke();
                    for &(i, key) in &batch {
                        let f = &fills[i];
                        script.key(key.as_str()).key(LeaseKey(key));
                        script
                            .arg(&f.lease.as_bytes()[..])
                            .arg(&encoded[i][..])
                            .arg(ttl_millis(f.ttl));
                    }
                    let filled: Vec<i64> = script
                        .invoke_async(&mut self.conn())
                        .await
                        .map_err(|e| self.err(e))?;
                    if filled.len() != batch.len() {
                        return Err(StoreError::protocol(format!(
                            "a fill of {} keys answered {} results",
                            batch.len(),
                            filled.len()
                        )));
                    }
                    let filled = filled
                        .into_iter()
                        .map(|n| if n == 1 { Fill::Filled } else { Fill::Refused });
                    Ok::<_, StoreError>(
                        batch
                            .into_iter()
                            .map(|(i, _)| i)
                            .zip(filled)
                            .collect::<Vec<_>>(),
                    )
                }
            });
            in_order(fills.len(), futures::future::try_join_all(per_slot).await?)
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: AcquireMode,
        lease_ttl: Duration,
    ) -> StoreFuture<'a, Acquire> {
        Box::pin(async move {
            let token = self.inner.tokens.next_token();
            let Some(group) = key.group_key() else {
                let reply: redis::Value = scripts::ACQUIRE
                    .key(key.as_str())
                    .key(LeaseKey(key))
                    .arg(&token.as_bytes()[..])
                    .arg(ttl_millis(lease_ttl))
                    .arg(mode_arg(mode))
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(|e| self.err(e))?;
                return parse_acquire(reply, token);
            };
            let mut mode = mode;
            // At most twice: an entry of an older generation is orphaned, and
            // the second attempt replaces it.
            for _ in 0..2 {
                let mut reply: redis::Value = scripts::ACQUIRE_GROUPED
                    .key(key.as_str())
                    .key(LeaseKey(key))
                    .key(group.as_str())
                    .arg(&token.as_bytes()[..])
                    .arg(ttl_millis(lease_ttl))
                    .arg(mode_arg(mode))
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(|e| self.err(e))?;
                let generation = split_generation(&mut reply)?;
                match parse_acquire(reply, token.with_generation(generation))? {
                    Acquire::Hit(entry) if entry.meta.generation != generation => {
                        mode = AcquireMode::Replace;
                    }
                    other => return Ok(other),
                }
            }
            Err(StoreError::protocol(
                "acquire in Replace mode returned an entry",
            ))
        })
    }

    fn fill<'a>(
        &'a self,
        key: &'a StoreKey,
        lease: &'a LeaseToken,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Fill> {
        Box::pin(async move {
            let mut entry = entry;
            entry.meta.generation = lease.generation();
            let bytes = encode(&entry)?;
            let script = match key.group_key() {
                Some(group) => {
                    let mut s = scripts::FILL_GROUPED.key(key.as_str());
                    s.key(LeaseKey(key)).key(group.as_str());
                    s
                }
                None => {
                    let mut s = scripts::FILL.key(key.as_str());
                    s.key(LeaseKey(key));
                    s
                }
            };
            let mut script = script;
            script
                .arg(&lease.as_bytes()[..])
                .arg(bytes)
                .arg(ttl_millis(ttl));
            if key.group().is_some() {
                script.arg(lease.generation());
            }
            let filled: i64 = script
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            Ok(if filled == 1 {
                Fill::Filled
            } else {
                Fill::Refused
            })
        })
    }

    fn release<'a>(&'a self, key: &'a StoreKey, lease: &'a LeaseToken) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let released: i64 = scripts::RELEASE
                .key(LeaseKey(key))
                .arg(&lease.as_bytes()[..])
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            Ok(released == 1)
        })
    }

    fn set<'a>(&'a self, key: &'a StoreKey, entry: Entry, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let bytes = encode(&entry)?;
            let mut script = match key.group_key() {
                Some(group) => {
                    let mut s = scripts::SET_GROUPED.key(key.as_str());
                    s.key(LeaseKey(key)).key(group.as_str());
                    s
                }
                None => {
                    let mut s = scripts::SET.key(key.as_str());
                    s.key(LeaseKey(key));
                    s
                }
            };
            script.arg(bytes).arg(ttl_millis(ttl));
            let inline = self.inline_notice(key);
            let published: i64 = self.invoke_write(&mut script, &inline).await?;
            self.noticed(key, inline, true, published != 1);
            Ok(())
        })
    }

    /// Waits until every bus notice queued so far is published.
    fn flush(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let Some(publisher) = &self.inner.publisher else {
                return Ok(0);
            };
            publisher.flush().await.ok_or_else(|| {
                StoreError::new(
                    cachet_core::StoreErrorKind::Unavailable,
                    "the task publishing invalidation notices has stopped (its runtime shut down?)",
                )
            })
        })
    }

    fn invalidate<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // The lease key is as long as the entry key.
            let mut del = command("DEL", 2, 2 * key.as_str().len());
            del.arg(key.as_str()).arg(LeaseKey(key));
            let Some((publisher, notice)) = self.inline_notice(key) else {
                let _: i64 = (del.query_async(&mut self.conn()).await).map_err(|e| self.err(e))?;
                self.notify_key(key);
                return Ok(());
            };
            // The notice in the same round trip, after the `DEL`; a refused
            // `PUBLISH` does not fail the invalidation.
            let mut pipe = redis::Pipeline::with_capacity(2);
            pipe.add_command(del)
                .cmd("PUBLISH")
                .arg(notice.channel())
                .arg(notice.line())
                .ignore_errors();
            let replies: Vec<redis::Value> =
                (pipe.query_async(&mut self.conn()).await).map_err(|e| self.err(e))?;
            match replies.as_slice() {
                [redis::Value::Int(_), redis::Value::Int(_)] => Ok(()),
                [redis::Value::Int(_), refused] => {
                    publisher.inline_failed(&notice, &format_args!("{refused:?}"));
                    Ok(())
                }
                [redis::Value::ServerError(e), _] => Err(self.err(e.clone().into())),
                _ => Err(protocol("invalidate", &redis::Value::Array(replies))),
            }
        })
    }

    fn ttl<'a>(&'a self, key: &'a StoreKey) -> StoreFuture<'a, Ttls> {
        Box::pin(async move {
            let (entry, lease): (i64, i64) = redis::pipe()
                .cmd("PTTL")
                .arg(key.as_str())
                .cmd("PTTL")
                .arg(LeaseKey(key))
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            Ok(Ttls {
                entry: pttl(entry),
                lease: pttl(lease),
            })
        })
    }

    fn groups(&self) -> Option<&dyn Groups> {
        Some(self)
    }

    fn tags(&self) -> Option<&dyn Tags> {
        Some(self)
    }

    fn versioned_set(&self) -> Option<&dyn VersionedSet> {
        Some(self)
    }

    fn bus(&self) -> Option<&dyn InvalidationBus> {
        Some(self)
    }

    fn deferred_queue(&self) -> Option<&dyn DeferredQueue> {
        Some(self)
    }

    fn bloom_bits(&self) -> Option<&dyn BloomBits> {
        Some(self)
    }
}

impl Groups for RedisStore {
    fn invalidate_group<'a>(&'a self, group: &'a GroupKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let _: String = scripts::BUMP
                .key(group.as_str())
                .arg(1)
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            if let Some(publisher) = &self.inner.publisher {
                publisher.group(group);
            }
            Ok(())
        })
    }
}

/// The clock value at which a tag generation was made (see `scripts::RAISE_TAG`).
const fn made_at(generation: u64) -> u64 {
    generation & !1
}

impl RedisStore {
    async fn tag_clock_at(&self, clock_key: &str) -> Result<u64, StoreError> {
        let clock: String = scripts::TAG_CLOCK
            .key(clock_key)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        number(&clock, clock_key)
    }

    async fn raise_tag(&self, tag: &TagKey, to: u64) -> Result<u64, StoreError> {
        let generation: String = scripts::RAISE_TAG
            .key(tag.as_str())
            .arg(to)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.err(e))?;
        number(&generation, tag.as_str())
    }
}

/// A number a script returned for `key`.
fn number(reply: &str, key: &str) -> Result<u64, StoreError> {
    reply.parse().map_err(|_| {
        StoreError::protocol(format!(
            "{key} holds {reply:?} after a script made it a number"
        ))
    })
}

impl Tags for RedisStore {
    fn tag_clock<'a>(&'a self, head: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move { self.tag_clock_at(&format!("{head}:sys:tagclock")).await })
    }

    /// One `MGET`; on a cluster, redis-rs splits it into one `MGET` per slot,
    /// sent concurrently. A generation that is not a number reads as none.
    fn tag_generations<'a>(&'a self, tags: &'a [TagKey]) -> StoreFuture<'a, Vec<Option<u64>>> {
        Box::pin(async move {
            if tags.is_empty() {
                return Ok(Vec::new());
            }
            let mut mget = redis::cmd("MGET");
            for tag in tags {
                mget.arg(tag.as_str());
            }
            let values: Vec<Option<Bytes>> = mget
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            Ok(values
                .iter()
                .map(|v| {
                    v.as_deref()
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                })
                .collect())
        })
    }

    /// The generations are read with one `MGET` (per slot); a tag without one
    /// is given the tag clock plus one, if the clock is still at most `since`.
    /// These steps are not one atomic script (the keys are in different
    /// slots), and need not be: an invalidation after the `MGET` gives the
    /// tag a generation the entry did not record.
    fn claim_tags<'a>(
        &'a self,
        tags: &'a [TagKey],
        since: u64,
    ) -> StoreFuture<'a, Option<Vec<u64>>> {
        Box::pin(async move {
            let current = self.tag_generations(tags).await?;
            let mut clock = None;
            let mut claimed = Vec::with_capacity(tags.len());
            for (tag, generation) in tags.iter().zip(current) {
                let generation = match generation {
                    Some(g) => g,
                    None => {
                        let now = match clock {
                            Some(now) => now,
                            None => *clock.insert(self.tag_clock_at(&tag.clock_key()).await?),
                        };
                        if made_at(now) > since {
                            return Ok(None);
                        }
                        self.raise_tag(tag, made_at(now) + 1).await?
                    }
                };
                if made_at(generation) > since {
                    return Ok(None);
                }
                claimed.push(generation);
            }
            Ok(Some(claimed))
        })
    }

    /// Two commands: the clock moves on, then the tag's generation is raised to it.
    fn invalidate_tag<'a>(&'a self, tag: &'a TagKey) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let clock_key = tag.clock_key();
            let now: String = scripts::BUMP
                .key(&clock_key)
                .arg(2)
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            self.raise_tag(tag, number(&now, &clock_key)?).await?;
            if let Some(publisher) = &self.inner.publisher {
                publisher.tag(tag);
            }
            Ok(())
        })
    }
}

impl VersionedSet for RedisStore {
    fn set_versioned<'a>(
        &'a self,
        key: &'a StoreKey,
        entry: Entry,
        ttl: Duration,
    ) -> StoreFuture<'a, Versioned> {
        Box::pin(async move {
            let bytes = encode(&entry)?;
            let mut script = match key.group_key() {
                Some(group) => {
                    let mut s = scripts::SET_VERSIONED_GROUPED.key(key.as_str());
                    s.key(LeaseKey(key)).key(group.as_str());
                    s
                }
                None => {
                    let mut s = scripts::SET_VERSIONED.key(key.as_str());
                    s.key(LeaseKey(key));
                    s
                }
            };
            script.arg(bytes).arg(ttl_millis(ttl));
            let inline = self.inline_notice(key);
            let reply: redis::Value = self.invoke_write(&mut script, &inline).await?;
            let (versioned, refused) = parse_versioned(&reply)?;
            self.noticed(key, inline, versioned == Versioned::Written, refused);
            Ok(versioned)
        })
    }
}

impl InvalidationBus for RedisStore {
    fn subscribe_invalidations<'a>(
        &'a self,
        head: &'a str,
    ) -> StoreFuture<'a, tokio::sync::mpsc::Receiver<BusEvent>> {
        let events = bus::subscribe(self.inner.nodes.clone(), head, self.inner.bus_heartbeat);
        Box::pin(std::future::ready(Ok(events)))
    }
}

impl DeferredQueue for RedisStore {
    fn defer_invalidate<'a>(&'a self, key: &'a StoreKey, delay: Duration) -> StoreFuture<'a, ()> {
        self.defer(key, delay)
    }

    fn run_deferred(&self, max: usize) -> StoreFuture<'_, Deferred> {
        self.run_all_shards(max)
    }
}

impl BloomBits for RedisStore {
    fn bloom_check<'a>(
        &'a self,
        filter: &'a BloomKey,
        positions: &'a [u64],
    ) -> StoreFuture<'a, bool> {
        self.bloom_check_at(filter, positions)
    }

    fn bloom_add<'a>(&'a self, filter: &'a BloomKey, positions: &'a [u64]) -> StoreFuture<'a, ()> {
        self.bloom_add_at(filter, positions)
    }

    fn bloom_replace<'a>(&'a self, filter: &'a BloomKey, bits: Bytes) -> StoreFuture<'a, ()> {
        self.bloom_replace_with(filter, bits)
    }
}

impl RedisStore {
    fn defer<'a>(&'a self, key: &'a StoreKey, delay: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let token = self.inner.tokens.next_token();
            let mut member = String::with_capacity(33 + key.as_str().len());
            for b in token.as_bytes() {
                member.push_str(&format!("{b:02x}"));
            }
            member.push('|');
            member.push_str(key.as_str());
            let _: i64 = scripts::DEFER
                .key(&self.shard_of(key).due)
                .arg(member)
                .arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn run_all_shards(&self, max: usize) -> StoreFuture<'_, Deferred> {
        Box::pin(async move {
            let shards = &self.inner.deferred;
            let start = self.inner.next_shard.fetch_add(1, Ordering::Relaxed);
            let mut ran = 0;
            let mut next_due_in: Option<Duration> = None;
            for i in 0..shards.len() {
                let shard = &shards[(start + i) % shards.len()];
                let (n, next) = self
                    .run_shard(shard, max.saturating_sub(ran).max(1))
                    .await?;
                ran += n;
                next_due_in = match (next_due_in, next) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if ran >= max {
                    // More may be due right now.
                    next_due_in = Some(Duration::ZERO);
                    break;
                }
            }
            Ok(Deferred { ran, next_due_in })
        })
    }
}

/// A `PTTL` reply: -2 for no key, -1 for a key without TTL.
fn pttl(ms: i64) -> Option<Duration> {
    match ms {
        -1 => Some(Duration::MAX),
        ms => u64::try_from(ms).ok().map(Duration::from_millis),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachet_core::{KeyLayout, Meta};
    use cachet_testkit::RedisServer;

    fn value() -> Entry {
        Entry {
            meta: Meta::default(),
            payload: Payload::Bytes(Bytes::from_static(b"v")),
        }
    }

    #[test]
    fn a_lease_key_argument_is_the_lease_key() {
        let layout = KeyLayout::new("cachet:", "t").unwrap();
        for key in [layout.key("k"), layout.key("a:b{c}"), layout.key(&7u64)] {
            let written = redis::ToRedisArgs::to_redis_args(&LeaseKey(&key));
            assert_eq!(written, vec![key.lease_key().into_bytes()]);
        }
        let grouped = layout.key_in_group("g", "k");
        let written = redis::ToRedisArgs::to_redis_args(&LeaseKey(&grouped));
        assert_eq!(written, vec![grouped.lease_key().into_bytes()]);
    }

    #[tokio::test]
    async fn a_claim_whose_worker_died_runs_again_after_the_visibility_timeout() {
        let server = RedisServer::start();
        let store = RedisStore::builder(server.url())
            .deferred_visibility(Duration::from_millis(100))
            .deferred_shards(3)
            .connect()
            .await
            .unwrap();
        let key = KeyLayout::new("cachet:", "t").unwrap().key("k");
        store
            .set(&key, value(), Duration::from_secs(60))
            .await
            .unwrap();
        store.defer_invalidate(&key, Duration::ZERO).await.unwrap();
        // A worker claims the item, then dies before deleting.
        let shard = store.shard_of(&key);
        let (claimed, _, _): (Vec<Vec<u8>>, i64, i64) = scripts::CLAIM
            .key(&shard.due)
            .key(&shard.claimed)
            .arg(10)
            .arg(100)
            .invoke_async(&mut store.conn())
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(
            store.run_deferred(10).await.unwrap().ran,
            0,
            "still claimed"
        );
        assert_eq!(server.command(&["EXISTS", key.as_str()]), "1");
        // Redis expires the claim on its own clock; let it pass.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(store.run_deferred(10).await.unwrap().ran, 1);
        assert_eq!(server.command(&["EXISTS", key.as_str()]), "0");
        for (due, claimed) in store.deferred_queue_keys() {
            assert_eq!(server.command(&["EXISTS", &due, &claimed]), "0");
        }
    }

    #[tokio::test]
    async fn concurrent_workers_run_each_item_once() {
        let server = RedisServer::start();
        let a = RedisStore::builder(server.url())
            .deferred_shards(4)
            .connect()
            .await
            .unwrap();
        let b = RedisStore::builder(server.url())
            .deferred_shards(4)
            .connect()
            .await
            .unwrap();
        let layout = KeyLayout::new("cachet:", "t").unwrap();
        for i in 0..300 {
            a.defer_invalidate(&layout.key(&i), Duration::ZERO)
                .await
                .unwrap();
        }
        let (ra, rb) = tokio::join!(
            async {
                let mut n = 0;
                for _ in 0..100 {
                    n += a.run_deferred(7).await.unwrap().ran;
                }
                n
            },
            async {
                let mut n = 0;
                for _ in 0..100 {
                    n += b.run_deferred(7).await.unwrap().ran;
                }
                n
            }
        );
        assert_eq!(ra + rb, 300, "{ra} + {rb}");
        assert!(ra > 0 && rb > 0, "both workers took part: {ra} + {rb}");
        let stats = server.command(&["INFO", "keyspace"]);
        assert!(!stats.contains("keys="), "queue left behind: {stats}");
    }

    /// A server that accepts connections and never answers.
    async fn mute_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..64 {
                match listener.accept().await {
                    Ok((socket, _)) => held.push(socket),
                    Err(_) => return,
                }
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn connecting_to_a_mute_server_fails_within_the_connection_timeout() {
        let (addr, server) = mute_server().await;
        let limit = Duration::from_millis(400);
        let started = std::time::Instant::now();
        let e = RedisStore::builder(format!("redis://{addr}/"))
            .connection_timeout(limit)
            .response_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_err();
        let took = started.elapsed();
        server.abort();
        assert!(e.is_timeout(), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "cannot connect to redis://{addr}/: no connection within the connection timeout (400ms)"
            )
        );
        // Bounded by the limit, not by retries of it nor by the response timeout.
        assert!(took < limit * 2, "took {took:?}");
    }

    /// A store that cannot connect says to what, without its password, and
    /// why, with the client's error as the cause.
    #[tokio::test]
    async fn a_refused_connection_names_the_server_but_not_its_password() {
        // A port nothing listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let targets = [
            RedisStore::builder(format!("redis://app:hunter2@{addr}/0")),
            RedisStore::cluster_builder([format!("redis://:hunter2@{addr}")]),
        ];
        let named = [
            format!("cannot connect to redis://app:***@{addr}/0: store unreachable"),
            format!(
                "cannot connect to the Redis Cluster at redis://:***@{addr}: store unreachable"
            ),
        ];
        for (builder, named) in targets.into_iter().zip(named) {
            let e = builder
                .connection_timeout(Duration::from_secs(5))
                .connect()
                .await
                .unwrap_err();
            assert_eq!(e.kind(), cachet_core::StoreErrorKind::Unavailable, "{e:?}");
            assert_eq!(e.to_string(), named);
            let report = cachet_core::Report(&e).to_string();
            assert!(!report.contains("hunter2"), "{report}");
            assert!(report.len() > named.len(), "the cause follows: {report}");
        }
    }

    /// Credentials the server refuses: said as such, naming the server, and
    /// the password given shown nowhere.
    #[tokio::test]
    async fn refused_credentials_are_named_as_such() {
        let server = RedisServer::start();
        assert_eq!(
            server.command(&["CONFIG", "SET", "requirepass", "right-one"]),
            "OK"
        );
        let e = RedisStore::builder(format!("redis://:wrong-one@127.0.0.1:{}/", server.port()))
            .connect()
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot connect to redis://:***@127.0.0.1:{}/: Redis refused the credentials \
                 (user name and password)",
                server.port()
            )
        );
        assert!(!e.is_outage(), "{e:?}");
        let report = cachet_core::Report(&e).to_string();
        assert!(!report.contains("wrong-one"), "{report}");
    }

    #[test]
    fn builders_never_show_a_password() {
        let one = RedisStore::builder("redis://app:hunter2@db.internal:6379/0");
        let many = RedisStore::cluster_builder(["redis://:hunter2@a:7000", "redis://b:7001"]);
        for shown in [format!("{one:?}"), format!("{many:?}"), format!("{one:#?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("***@"), "{shown}");
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:secret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        // A user without a password, and an `@` past the host: nothing to hide.
        assert_eq!(
            redact_url("postgres://u@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(
            redact_url("redis://h:6379/0?name=a:b@c"),
            "redis://h:6379/0?name=a:b@c"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        // A password with an unescaped `/`, `?` or `#`: the URL is malformed,
        // and the host seems to end inside the password.
        for url in [
            "redis://user:pa/ss@127.0.0.1:6379/",
            "redis://user:pa?ss@127.0.0.1:6379/",
            "redis://:pa#ss@127.0.0.1:6379/0",
            "redis://user:12/ss@host:6379/",
        ] {
            let shown = redact_url(url);
            assert!(
                !shown.contains("ss") && shown.contains(":***@"),
                "{url} shown as {shown}"
            );
        }
        assert_eq!(
            redact_url("redis://user:pa/ss@127.0.0.1:6379/"),
            "redis://user:***@127.0.0.1:6379/"
        );
    }

    #[test]
    fn malformed_replies_are_protocol_errors() {
        let t = LeaseToken::from_bytes([0; 16]);
        assert!(parse_acquire(redis::Value::Nil, t).is_err());
        assert!(parse_acquire(redis::Value::Array(vec![redis::Value::Int(9)]), t).is_err());
        assert!(matches!(
            parse_acquire(redis::Value::Array(vec![redis::Value::Int(2)]), t),
            Ok(Acquire::Leased(_))
        ));
        assert!(matches!(
            parse_acquire(
                redis::Value::Array(vec![
                    redis::Value::Int(1),
                    redis::Value::BulkString(b"junk".to_vec())
                ]),
                t
            ),
            Ok(Acquire::Corrupt)
        ));
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use cachet_core::StoreErrorKind;

    #[tokio::test]
    async fn an_invalid_url_is_a_configuration_error() {
        let e = RedisStore::connect("not a url").await.unwrap_err();
        assert!(e.kind() == StoreErrorKind::Config, "{e:?}");
        assert!(
            e.to_string()
                .starts_with("invalid store configuration: invalid Redis URL \"not a url\""),
            "{e}"
        );
    }
}

#[cfg(test)]
mod eviction_tests {
    use super::*;
    use cachet_testkit::{RedisServer, RedisServerOptions};

    #[tokio::test]
    async fn reads_the_eviction_settings_and_counters() {
        let server = RedisServer::start_with(RedisServerOptions {
            extra_args: vec![
                ("maxmemory".into(), "64mb".into()),
                ("maxmemory-policy".into(), "noeviction".into()),
            ],
            ..RedisServerOptions::default()
        });
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let info = store.server_info().await.unwrap();
        assert_eq!(info.maxmemory, Some(64 * 1024 * 1024));
        assert_eq!(info.policy.as_deref(), Some("noeviction"));
        assert!(info.used_memory.unwrap() > 0);
        assert_eq!(info.evicted_keys, Some(0));
        assert!(info.warnings()[0].contains("noeviction"), "{info}");

        let fine = RedisServer::start_with(RedisServerOptions {
            extra_args: vec![
                ("maxmemory".into(), "64mb".into()),
                ("maxmemory-policy".into(), "allkeys-lru".into()),
            ],
            ..RedisServerOptions::default()
        });
        let store = RedisStore::connect(&fine.url()).await.unwrap();
        let w = store.server_info().await.unwrap().warnings();
        assert!(w.len() == 1 && w[0].contains("allkeys-lru"), "{w:?}");
    }

    #[tokio::test]
    async fn a_forbidden_config_is_tolerated() {
        let server = RedisServer::start();
        // A user that may do everything but CONFIG.
        assert_eq!(
            server.command(&[
                "ACL", "SETUSER", "app", "on", ">secret", "~*", "&*", "+@all", "-config"
            ]),
            "OK"
        );
        let url = format!("redis://app:secret@127.0.0.1:{}/", server.port());
        let store = RedisStore::connect(&url).await.unwrap();
        let info = store.server_info().await.unwrap();
        assert_eq!(info.policy, None);
        assert!(info.warnings()[0].contains("CONFIG not allowed"));
    }
}

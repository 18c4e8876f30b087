//! [`WriteBehind`]: writes acknowledged once queued in Redis.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::Codec;
use crate::store::{Entry, Meta, Payload, PayloadKind, envelope};
use crate::{Cache, CacheKey, RedisStore};
use cachet_core::ttl_millis;
use redis::{ScriptInvocation, ServerErrorKind, Value};
use tokio::time::Instant;

use super::durability::{self, Durability};
use super::flusher::FlusherBuilder;
use super::{Error, scripts};

/// First pause of a write waiting for room ([`OnFull::Block`]); it doubles up
/// to [`MAX_FULL_PAUSE`].
const MIN_FULL_PAUSE: Duration = Duration::from_millis(1);
const MAX_FULL_PAUSE: Duration = Duration::from_millis(50);
/// Longest stream name accepted.
const MAX_NAME: usize = 64;

/// What [`write_behind`](WriteBehind::write_behind) does when the backlog is
/// full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFull {
    /// Refuse the write at once with [`Error::Full`]. The default.
    #[default]
    Error,
    /// Wait for room, retrying with backoff (1 ms doubling to 50 ms), up to
    /// `timeout`; then refuse it with [`Error::Full`].
    Block {
        /// The longest a write waits.
        timeout: Duration,
    },
}

/// What [`write_behind`](WriteBehind::write_behind) did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum WriteOutcome {
    /// The entry is written and the write queued for the flushers, under this
    /// stream id.
    Queued {
        /// The write's id in the stream.
        id: String,
    },
    /// The cache already holds this key at a version at least as new (a
    /// concurrent writer got there first): nothing was written or queued.
    Stale {
        /// The version the cache holds.
        current: u64,
    },
}

/// Write-behind over a [`Cache`] on Redis: writes are acknowledged once the
/// cache entry is written and the write durably queued in a Redis stream; a
/// [`Flusher`](crate::write_behind::Flusher) applies them to the source of truth later. See
/// the [module docs](crate::write_behind).
///
/// Cloning is cheap; clones share everything.
pub struct WriteBehind<K: ?Sized + ToOwned, V> {
    pub(crate) inner: Arc<Shared<K, V>>,
}

pub(crate) struct Shared<K: ?Sized + ToOwned, V> {
    pub(crate) cache: Cache<K, V>,
    pub(crate) store: RedisStore,
    pub(crate) codec: Arc<dyn Codec<V>>,
    pub(crate) stream: String,
    pub(crate) dead: String,
    /// The cache's invalidation bus channel (see `cachet-redis`).
    pub(crate) bus: String,
    max_backlog: u64,
    on_full: OnFull,
    wait_replicas: Option<(usize, Duration)>,
    durability: Durability,
}

impl<K: ?Sized + ToOwned, V> Clone for WriteBehind<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: ?Sized + ToOwned, V> fmt::Debug for WriteBehind<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner;
        f.debug_struct("WriteBehind")
            .field("stream", &s.stream)
            .field("store", &s.store)
            .field("codec", &s.codec)
            .field("max_backlog", &s.max_backlog)
            .field("on_full", &s.on_full)
            .field("wait_replicas", &s.wait_replicas)
            .field("durability", &s.durability)
            .finish_non_exhaustive()
    }
}

/// Configures a [`WriteBehind`]. Start with [`WriteBehind::builder`].
///
/// The entries it writes are the cache's: TTL (jitter included) and soft
/// expiry from its [expiry policy](crate::CacheBuilder::expiry), versions from
/// its [`version_by`](crate::CacheBuilder::version_by) (required), bytes from
/// its codec, as [`Cache::set`] writes them.
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`stream_name`](Self::stream_name) | `wb` | the stream is `{prefix}{namespace}:sys:{name}` |
/// | [`max_backlog`](Self::max_backlog) | 100 000 | most unflushed writes in the stream |
/// | [`on_full`](Self::on_full) | [`OnFull::Error`] | refuse or wait when the backlog is full |
/// | [`wait_replicas`](Self::wait_replicas) | none | `WAIT` for replicas after each write |
#[must_use = "a builder does nothing until .build() is called"]
pub struct WriteBehindBuilder<K: ?Sized + ToOwned, V> {
    store: RedisStore,
    cache: Cache<K, V>,
    stream_name: String,
    max_backlog: u64,
    on_full: OnFull,
    wait_replicas: Option<(usize, Duration)>,
}

impl<K: ?Sized + ToOwned, V> fmt::Debug for WriteBehindBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehindBuilder")
            .field("store", &self.store)
            .field("cache", &self.cache)
            .field("stream_name", &self.stream_name)
            .field("max_backlog", &self.max_backlog)
            .field("on_full", &self.on_full)
            .field("wait_replicas", &self.wait_replicas)
            .finish()
    }
}

impl<K: ?Sized + ToOwned, V> WriteBehindBuilder<K, V> {
    /// The stream's name within the cache's keys (default `wb`): the stream is
    /// `{prefix}{namespace}:sys:{name}`, its dead-letter stream
    /// `{prefix}{namespace}:sys:{name}:dead`. 1 to 64 characters from
    /// `[A-Za-z0-9_.:-]`.
    pub fn stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream_name = name.into();
        self
    }

    /// The most unflushed writes the stream may hold (default 100 000, at
    /// least 1). A write beyond it is refused or waits, per
    /// [`on_full`](Self::on_full); nothing is ever trimmed.
    pub fn max_backlog(mut self, writes: u64) -> Self {
        self.max_backlog = writes.max(1);
        self
    }

    /// What a write does when the backlog is full (default [`OnFull::Error`]).
    pub fn on_full(mut self, on_full: OnFull) -> Self {
        self.on_full = on_full;
        self
    }

    /// After each write, `WAIT` until `replicas` replicas have it, at most
    /// `timeout`; fewer is reported as [`Error::NotReplicated`] (the write is
    /// queued nonetheless).
    ///
    /// `WAIT` holds the connection it is sent on until the replicas answer:
    /// give this write-behind a [`RedisStore`] of its own (connect once more),
    /// so that the cache's reads do not queue behind it, and keep `timeout`
    /// below that store's response timeout.
    pub fn wait_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.wait_replicas = Some((replicas, timeout));
        self
    }
}

impl<K, V> WriteBehindBuilder<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Validates the settings, reads the server's persistence settings and
    /// logs what a crash could lose (see [`Durability`]), and builds.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting that is wrong: no `version_by`, a
    /// cache whose values live in process, a store on a Redis Cluster, an
    /// invalid stream name, TTL or jitter.
    pub async fn build(self) -> Result<WriteBehind<K, V>, Error> {
        let cache = self.cache;
        let ns = cache.namespace();
        if cache.version_fn().is_none() {
            return Err(Error::Config(format!(
                "cache `{ns}`: write-behind needs a cache built with version_by: versions order \
                 the writes of a key"
            )));
        }
        if cache.store().payload_kind() != PayloadKind::Bytes {
            return Err(Error::Config(format!(
                "cache `{ns}` keeps its values in process; write-behind needs the cache on the \
                 RedisStore it is given"
            )));
        }
        if self.store.is_cluster() {
            return Err(Error::Config(format!(
                "cache `{ns}`: write-behind needs a single Redis node, not a Redis Cluster (each \
                 write updates the entry and the stream, in different slots, in one script)"
            )));
        }
        if !cache.codec().can_encode() {
            return Err(Error::Config(format!(
                "cache `{ns}`: write-behind needs a codec that encodes, not NoCodec"
            )));
        }
        let name = &self.stream_name;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if !name_ok {
            return Err(Error::Config(format!(
                "invalid stream name {name:?}: use 1 to {MAX_NAME} characters from [A-Za-z0-9_.:-]"
            )));
        }
        let stream = cache.layout().sys_key(name);
        let bus = cache.layout().sys_key("bus");
        let config = durability::read_config(&mut self.store.connection()).await;
        durability::report(&stream, &config, self.wait_replicas.map(|(n, _)| n));
        Ok(WriteBehind {
            inner: Arc::new(Shared {
                dead: format!("{stream}:dead"),
                stream,
                bus,
                store: self.store,
                codec: Arc::clone(cache.codec()),
                max_backlog: self.max_backlog,
                on_full: self.on_full,
                wait_replicas: self.wait_replicas,
                durability: config.durability,
                cache,
            }),
        })
    }
}

/// What the write script answered.
enum Reply {
    Full(u64),
    Stale(u64),
    Queued(String),
}

impl<K, V> WriteBehind<K, V>
where
    K: CacheKey + ?Sized + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A builder for write-behind on `cache`, whose store must be `store` (a
    /// single Redis node). The stream lives among the cache's keys.
    ///
    /// `cache` gives everything about the entries: the key layout (groups
    /// included), the expiry policy, the versions, the codec and the Bloom
    /// filter.
    pub fn builder(store: RedisStore, cache: &Cache<K, V>) -> WriteBehindBuilder<K, V> {
        WriteBehindBuilder {
            store,
            cache: cache.clone(),
            stream_name: "wb".to_owned(),
            max_backlog: 100_000,
            on_full: OnFull::Error,
            wait_replicas: None,
        }
    }

    /// Writes `value` to the cache and queues it for the flushers, in one
    /// atomic step (one `EVALSHA`, plus a `WAIT` with
    /// [`wait_replicas`](WriteBehindBuilder::wait_replicas)):
    ///
    /// 1. if the stream already holds `max_backlog` unflushed writes, refuse (or
    ///    wait, per [`OnFull`]);
    /// 2. if the cache holds the key at a version at least as new, return
    ///    [`WriteOutcome::Stale`] and write nothing;
    /// 3. otherwise set the entry as [`Cache::set`] would (envelope, TTL,
    ///    revoking the key's lease so that a load in progress cannot overwrite
    ///    it, a notice on the invalidation bus for near caches), and append
    ///    `{key, version, value}` to the stream.
    ///
    /// Once this returns [`WriteOutcome::Queued`], the write is in Redis: readers of
    /// the cache see it, and a flusher will apply it to the source of truth,
    /// however many flushers crash meanwhile. Whether it survives a crash of
    /// Redis itself depends on Redis's persistence ([`durability`](Self::durability)).
    ///
    /// # Errors
    /// [`Error::Full`] when the backlog is full; [`Error::NotReplicated`] when
    /// `WAIT` fell short (the write is queued); [`Error::Value`] when the value
    /// does not encode or the Bloom filter cannot be updated;
    /// [`Error::KeyNotDecodable`] when the key type cannot be read back from its
    /// store key; [`Error::Redis`] when Redis fails (the write may or may not be
    /// queued).
    pub async fn write_behind(&self, key: &K, value: V) -> Result<WriteOutcome, Error> {
        let s = &*self.inner;
        let skey = s.cache.store_key(key);
        let user = skey.user_key();
        if K::decode_key(user).is_none() {
            return Err(Error::KeyNotDecodable {
                stream: s.stream.clone(),
                key: user.to_owned(),
            });
        }
        let value_error = |action, source| Error::Value {
            stream: s.stream.clone(),
            action,
            key: user.to_owned(),
            source,
        };
        if let Some(bloom) = s.cache.bloom() {
            bloom
                .insert(key)
                .await
                .map_err(|e| value_error("adding to the Bloom filter", Box::new(e)))?;
        }
        let version = s.cache.version_fn().map_or(0, |f| f(&value));
        // The entry as `set` stores it. A value the expiry policy keeps out of
        // the cache is queued all the same, with a TTL of 0: the script then
        // deletes the entry instead of writing it.
        let (entry, payload_len, ttl) = match s.cache.stored_entry(key, &skey, &value).await {
            Ok(Some((
                Entry {
                    meta,
                    payload: Payload::Bytes(bytes),
                },
                ttl,
            ))) => (
                envelope::encode(&meta, &bytes),
                bytes.len(),
                ttl_millis(ttl).max(1),
            ),
            Ok(Some(_)) => {
                return Err(value_error(
                    "encoding",
                    "the cache's store keeps objects, not bytes".into(),
                ));
            }
            Ok(None) => {
                let mut payload = Vec::new();
                (s.codec.encode(&value, &mut payload)).map_err(|e| value_error("encoding", e))?;
                let meta = Meta {
                    version,
                    ..Meta::default()
                };
                (envelope::encode(&meta, &payload), payload.len(), 0)
            }
            Err(e) => return Err(value_error("encoding", Box::new(e))),
        };
        let lease = skey.lease_key();
        let group = skey.group_key();
        let mut invocation = scripts::WRITE.key(skey.as_str());
        invocation.key(&lease).key(&s.stream);
        if let Some(group) = &group {
            invocation.key(group.as_str());
        }
        invocation
            .arg(entry)
            .arg(ttl)
            .arg(s.max_backlog)
            .arg(version)
            .arg(&s.bus)
            .arg(payload_len);

        let started = Instant::now();
        let mut pause = MIN_FULL_PAUSE;
        // Bounded by the Block timeout: every turn but the last sleeps at
        // least MIN_FULL_PAUSE.
        loop {
            let (reply, acked) = self.invoke(&invocation).await.map_err(Error::redis(
                &s.store.connection(),
                &s.stream,
                "queueing a write",
                Some(user),
            ))?;
            match parse_reply(reply).map_err(Error::redis(
                &s.store.connection(),
                &s.stream,
                "queueing a write",
                Some(user),
            ))? {
                Reply::Queued(id) => {
                    if let (Some((wanted, timeout)), Some(acked)) = (s.wait_replicas, acked)
                        && acked < wanted as u64
                    {
                        return Err(Error::NotReplicated {
                            stream: s.stream.clone(),
                            key: user.to_owned(),
                            acked,
                            wanted,
                            timeout,
                        });
                    }
                    return Ok(WriteOutcome::Queued { id });
                }
                Reply::Stale(current) => return Ok(WriteOutcome::Stale { current }),
                Reply::Full(backlog) => {
                    let full = |waited| Error::Full {
                        stream: s.stream.clone(),
                        key: user.to_owned(),
                        backlog,
                        max_backlog: s.max_backlog,
                        waited,
                    };
                    let OnFull::Block { timeout } = s.on_full else {
                        return Err(full(None));
                    };
                    let waited = started.elapsed();
                    let Some(left) = timeout.checked_sub(waited).filter(|l| !l.is_zero()) else {
                        return Err(full(Some(waited)));
                    };
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(MAX_FULL_PAUSE);
                }
            }
        }
    }

    /// Runs the write script, followed by `WAIT` in the same pipeline (so on
    /// the same connection) when replicas are awaited; returns the script's
    /// reply and the replicas that acknowledged.
    async fn invoke(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> redis::RedisResult<(Value, Option<u64>)> {
        let mut conn = self.inner.store.connection();
        let Some((replicas, timeout)) = self.inner.wait_replicas else {
            return invocation.invoke_async(&mut conn).await.map(|v| (v, None));
        };
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation)
            .cmd("WAIT")
            .arg(replicas)
            .arg(ttl_millis(timeout));
        pipe.ignore_errors();
        // Twice at most: the second time after loading the script.
        for _ in 0..2 {
            let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
            let mut replies = replies.into_iter();
            let (Some(script), Some(wait)) = (replies.next(), replies.next()) else {
                return Err(unexpected("WAIT pipeline", &Value::Nil));
            };
            if let Value::ServerError(e) = &script
                && e.kind() == Some(ServerErrorKind::NoScript)
            {
                invocation.load_async(&mut conn).await?;
                continue;
            }
            let script = script.extract_error()?;
            let acked: u64 = redis::from_redis_value(wait.extract_error()?)?;
            return Ok((script, Some(acked)));
        }
        Err(unexpected(
            "script still missing after SCRIPT LOAD",
            &Value::Nil,
        ))
    }

    /// What a crash of the Redis server can lose of the acknowledged writes,
    /// as read from its configuration when this was built.
    pub fn durability(&self) -> &Durability {
        &self.inner.durability
    }

    /// The stream's key.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// The dead-letter stream's key: writes the flushers gave up on.
    pub fn dead_letter_stream(&self) -> &str {
        &self.inner.dead
    }

    /// The cache this write-behind writes to.
    pub fn cache(&self) -> &Cache<K, V> {
        &self.inner.cache
    }

    /// Unflushed writes: the stream's length (`XLEN`; flushed writes are
    /// deleted from it).
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn backlog(&self) -> Result<u64, Error> {
        let s = &*self.inner;
        redis::cmd("XLEN")
            .arg(&s.stream)
            .query_async(&mut s.store.connection())
            .await
            .map_err(Error::redis(
                &s.store.connection(),
                &s.stream,
                "reading the backlog",
                None,
            ))
    }

    /// Writes in the dead-letter stream.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn dead_letters(&self) -> Result<u64, Error> {
        let s = &*self.inner;
        redis::cmd("XLEN")
            .arg(&s.dead)
            .query_async(&mut s.store.connection())
            .await
            .map_err(Error::redis(
                &s.store.connection(),
                &s.stream,
                "reading the dead-letter stream",
                None,
            ))
    }

    /// Moves up to `max` writes from the dead-letter stream back to the
    /// stream, oldest first, each in one atomic step, for the flushers to try
    /// again (after fixing what made the sink refuse them). The backlog bound
    /// does not apply. Returns how many were moved.
    ///
    /// # Errors
    /// When Redis fails.
    pub async fn replay_dead_letters(&self, max: usize) -> Result<usize, Error> {
        let s = &*self.inner;
        scripts::REPLAY
            .key(&s.stream)
            .key(&s.dead)
            .arg(max.max(1))
            .invoke_async(&mut s.store.connection())
            .await
            .map_err(Error::redis(
                &s.store.connection(),
                &s.stream,
                "replaying dead letters",
                None,
            ))
    }

    /// A builder for a [`Flusher`](crate::write_behind::Flusher) of this write-behind's
    /// stream that applies writes with `sink`.
    pub fn flusher<S>(&self, sink: S) -> FlusherBuilder<K, V, S> {
        FlusherBuilder::new(self.clone(), sink)
    }
}

fn parse_reply(reply: Value) -> redis::RedisResult<Reply> {
    let Value::Array(items) = &reply else {
        return Err(unexpected("write", &reply));
    };
    match items.as_slice() {
        [Value::Int(0), Value::Int(backlog)] => {
            Ok(Reply::Full(u64::try_from(*backlog).unwrap_or(0)))
        }
        [Value::Int(1), Value::BulkString(id)] => {
            Ok(Reply::Queued(String::from_utf8_lossy(id).into_owned()))
        }
        [Value::Int(2), Value::BulkString(v)] if v.len() == 8 => {
            let mut b = [0; 8];
            b.copy_from_slice(v);
            Ok(Reply::Stale(u64::from_be_bytes(b)))
        }
        _ => Err(unexpected("write", &reply)),
    }
}

pub(crate) fn unexpected(what: &str, reply: &Value) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{what}: {reply:?}"),
    ))
}

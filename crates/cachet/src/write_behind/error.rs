//! The write-behind error type.

use std::fmt;
use std::time::Duration;

use crate::BoxError;
use cachet_redis::RedisConnection;

/// An error from a [`WriteBehind`](crate::write_behind::WriteBehind) or a
/// [`Flusher`](crate::write_behind::Flusher).
///
/// Every message names the stream and, for a write, the key (escaped as in
/// store keys); [`source`] gives the cause where there is one, which the
/// message does not repeat.
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backlog is full: the write was refused and nothing was written.
    #[error(
        "write-behind stream {stream} is full: {backlog} unflushed writes (max_backlog \
         {max_backlog}); the write of key {key} was refused{}",
        Waited(*waited)
    )]
    Full {
        /// The stream.
        stream: String,
        /// The key whose write was refused.
        key: String,
        /// Unflushed writes in the stream at the last attempt.
        backlog: u64,
        /// The configured bound.
        max_backlog: u64,
        /// How long the write waited for room ([`OnFull::Block`](crate::write_behind::OnFull::Block)).
        waited: Option<Duration>,
    },
    /// The write is queued and acknowledged by the primary, but fewer replicas
    /// than asked acknowledged it within the timeout: it will be flushed, but a
    /// failover before the replicas catch up may lose it.
    #[error(
        "write-behind stream {stream}: the write of key {key} is queued on the primary, but only \
         {acked} of {wanted} replicas acknowledged it within {timeout:?}"
    )]
    NotReplicated {
        /// The stream.
        stream: String,
        /// The key.
        key: String,
        /// Replicas that acknowledged the write.
        acked: u64,
        /// Replicas asked for.
        wanted: usize,
        /// The `WAIT` timeout.
        timeout: Duration,
    },
    /// A Redis command failed. For a write, whether it was queued is unknown:
    /// the reply may have been lost after the script ran.
    #[error("write-behind stream {stream}: {action} failed{}", ForKey(key.as_deref()))]
    Redis {
        /// The stream.
        stream: String,
        /// What was being done.
        action: &'static str,
        /// The key, for a write.
        key: Option<String>,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The value could not be encoded (for a write) or the Bloom filter could
    /// not be updated.
    #[error("write-behind stream {stream}: {action} the value of key {key} failed")]
    Value {
        /// The stream.
        stream: String,
        /// What was being done.
        action: &'static str,
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The key cannot be read back from its store key, so a flusher could not
    /// hand it to the sink: the key type's
    /// [`CacheKey::decode_key`](crate::CacheKey::decode_key) returns `None`.
    #[error(
        "write-behind stream {stream}: key {key} cannot be read back from its store key; \
         implement CacheKey::decode_key for the key type"
    )]
    KeyNotDecodable {
        /// The stream.
        stream: String,
        /// The key, escaped.
        key: String,
    },
    /// The sink failed to apply a batch; its entries stay pending and are
    /// retried.
    #[error("write-behind stream {stream}: the sink failed on a batch of {writes} writes")]
    Sink {
        /// The stream.
        stream: String,
        /// Writes in the failed batch.
        writes: usize,
        /// The sink's error.
        #[source]
        source: BoxError,
    },
    /// The write-behind or flusher was configured wrongly.
    #[error("write-behind: {0}")]
    Config(String),
}

impl Error {
    /// Whether the write was refused because the backlog is full.
    pub fn is_full(&self) -> bool {
        matches!(self, Error::Full { .. })
    }

    /// Maps a Redis error; allocates only when there is one.
    pub(crate) fn redis<'a>(
        conn: &'a RedisConnection,
        stream: &'a str,
        action: &'static str,
        key: Option<&'a str>,
    ) -> impl FnOnce(redis::RedisError) -> Self + use<'a> {
        move |e| Error::Redis {
            stream: stream.to_owned(),
            action,
            key: key.map(str::to_owned),
            source: Box::new(conn.error(e)),
        }
    }
}

struct Waited(Option<Duration>);

impl fmt::Display for Waited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(waited) => write!(f, " after waiting {waited:?} for room"),
            None => Ok(()),
        }
    }
}

struct ForKey<'a>(Option<&'a str>);

impl fmt::Display for ForKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key) => write!(f, " for key {key}"),
            None => Ok(()),
        }
    }
}

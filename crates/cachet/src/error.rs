//! The cache's error type.

use std::fmt;
use std::sync::Arc;

use cachet_core::StoreError;

/// A boxed error, as loaders and codecs return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, broadly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The loader returned an error, or could not be run (outside a tokio
    /// runtime).
    Load,
    /// The loader did not finish within the hard timeout.
    Timeout,
    /// A write to the source of truth (write-through) failed.
    Write,
    /// The store failed (unreachable, timed out, unexpected reply).
    Store,
    /// A value could not be encoded for the store.
    Codec,
    /// A value was larger than the store accepts; it was not sent.
    TooLarge,
    /// [`Cache::close`](crate::Cache::close) could not deliver everything.
    Shutdown,
    /// The cache was configured wrongly.
    Config,
}

/// An error from a [`Cache`](crate::Cache) operation.
///
/// Cloning is cheap: concurrent callers of one load share the same error. The
/// message names the cache, the key and what failed; [`source`] gives the cause
/// (the loader's own error for [`ErrorKind::Load`], so it can be downcast),
/// which the message never repeats: print the chain, for instance with
/// [`Report`](crate::Report), anyhow's `{:#}` or a log that records sources.
///
/// [`source`]: std::error::Error::source
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    cache: Box<str>,
    key: Option<Box<str>>,
    message: Option<Box<str>>,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The largest encoded value a cache sends to its store: the store's own
/// limit (on Redis, the server's `proto-max-bulk-len` less room for the
/// envelope) or the builder's `max_value_bytes`, whichever is lower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ValueLimit {
    pub(crate) bytes: usize,
    /// Whether the store's limit is the lower one.
    pub(crate) by_store: bool,
}

impl Error {
    pub(crate) fn new(
        kind: ErrorKind,
        cache: &str,
        key: Option<&str>,
        source: Option<BoxError>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                cache: cache.into(),
                key: key.map(Into::into),
                message: None,
                source: source.map(Arc::from),
            }),
        }
    }

    pub(crate) fn load(cache: &str, key: &str, source: BoxError) -> Self {
        Self::new(ErrorKind::Load, cache, Some(key), Some(source))
    }

    /// A load asked for outside a tokio runtime: the loader runs in a task of
    /// its own, which needs one.
    pub(crate) fn no_runtime(cache: &str, key: &str) -> Self {
        Self::with_message(
            ErrorKind::Load,
            cache,
            Some(key),
            "the loader runs in a tokio task, and this call is not within a tokio runtime".into(),
        )
    }

    pub(crate) fn timeout(cache: &str, key: &str, after: std::time::Duration) -> Self {
        Self::with_message(
            ErrorKind::Timeout,
            cache,
            Some(key),
            format!("the loader did not finish within {after:?}"),
        )
    }

    pub(crate) fn write(cache: &str, key: &str, source: BoxError) -> Self {
        Self::new(ErrorKind::Write, cache, Some(key), Some(source))
    }

    pub(crate) fn store(cache: &str, key: &str, source: StoreError) -> Self {
        Self::new(ErrorKind::Store, cache, Some(key), Some(Box::new(source)))
    }

    pub(crate) fn codec(cache: &str, key: &str, source: BoxError) -> Self {
        Self::new(ErrorKind::Codec, cache, Some(key), Some(source))
    }

    /// A value of `size` bytes, over `limit`.
    pub(crate) fn too_large(cache: &str, key: &str, size: usize, limit: ValueLimit) -> Self {
        let ValueLimit {
            bytes: limit,
            by_store,
        } = limit;
        let set_by = if by_store {
            "the store's limit: on Redis, the server's proto-max-bulk-len less room for the envelope"
        } else {
            "max_value_bytes"
        };
        Self::with_message(
            ErrorKind::TooLarge,
            cache,
            Some(key),
            format!(
                "the encoded value is {size} bytes, over the limit of {limit} bytes ({set_by}); it was not sent"
            ),
        )
    }

    pub(crate) fn shutdown(cache: &str, message: String) -> Self {
        Self::with_message(ErrorKind::Shutdown, cache, None, message)
    }

    pub(crate) fn config(cache: &str, message: impl Into<String>) -> Self {
        Self::with_message(ErrorKind::Config, cache, None, message.into())
    }

    /// An error whose message says it all: it has no source.
    pub(crate) fn with_message(
        kind: ErrorKind,
        cache: &str,
        key: Option<&str>,
        message: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                cache: cache.into(),
                key: key.map(Into::into),
                message: Some(message.into()),
                source: None,
            }),
        }
    }

    /// What went wrong, broadly.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The namespace of the cache that failed.
    pub fn cache(&self) -> &str {
        &self.inner.cache
    }

    /// The key the operation was for, escaped as in store keys.
    pub fn key(&self) -> Option<&str> {
        self.inner.key.as_deref()
    }

    /// Whether the loader failed.
    pub fn is_load(&self) -> bool {
        self.inner.kind == ErrorKind::Load
    }

    /// Whether the store failed.
    pub fn is_store(&self) -> bool {
        self.inner.kind == ErrorKind::Store
    }

    /// Whether the loader or the store timed out.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == ErrorKind::Timeout
            || self
                .inner
                .source
                .as_deref()
                .and_then(|s| s.downcast_ref::<StoreError>())
                .is_some_and(StoreError::is_timeout)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        write!(f, "cache `{}`", i.cache)?;
        let what = match i.kind {
            ErrorKind::Load | ErrorKind::Timeout => "loading",
            ErrorKind::Write => "writing",
            ErrorKind::Store => "store operation on",
            ErrorKind::Codec => "encoding the value of",
            ErrorKind::TooLarge => "storing the value of",
            ErrorKind::Shutdown => "closing",
            ErrorKind::Config => "configuration",
        };
        match (&i.key, i.kind) {
            (Some(key), _) => write!(f, ": {what} key `{key}` failed")?,
            (None, ErrorKind::Config) => write!(f, ": invalid {what}")?,
            (None, _) => write!(f, ": {what} failed")?,
        }
        // The source, if any, is not repeated here: it is `source()`.
        if let Some(message) = &i.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("cache", &self.inner.cache)
            .field("key", &self.inner.key)
            .field("message", &self.inner.message)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct DbDown;
    impl fmt::Display for DbDown {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("connection refused")
        }
    }
    impl std::error::Error for DbDown {}

    #[test]
    fn messages_name_cache_key_and_cause() {
        let e = Error::load("users", "42", Box::new(DbDown));
        assert_eq!(e.to_string(), "cache `users`: loading key `42` failed");
        assert_eq!(
            crate::Report(&e).to_string(),
            "cache `users`: loading key `42` failed: connection refused"
        );
        assert!(e.is_load());
        let source = std::error::Error::source(&e).unwrap();
        assert!(source.downcast_ref::<DbDown>().is_some());

        let e = Error::store(
            "users",
            "42",
            StoreError::timeout(std::time::Duration::from_millis(5)),
        );
        assert!(e.is_timeout());
        assert_eq!(
            e.to_string(),
            "cache `users`: store operation on key `42` failed"
        );
        assert_eq!(
            crate::Report(&e).to_string(),
            "cache `users`: store operation on key `42` failed: store did not answer within 5ms"
        );

        let e = Error::timeout("users", "42", std::time::Duration::from_secs(2));
        assert_eq!(
            e.to_string(),
            "cache `users`: loading key `42` failed: the loader did not finish within 2s"
        );
        assert!(std::error::Error::source(&e).is_none());

        let e = Error::config("users", "ttl must be positive");
        assert_eq!(
            e.to_string(),
            "cache `users`: invalid configuration: ttl must be positive"
        );
    }
}

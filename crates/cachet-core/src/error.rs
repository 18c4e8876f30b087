//! [`StoreError`]: what a store reports, as a kind, a message and a cause.
//!
//! Like every cachet error, its message never repeats its cause: the cause is
//! given by [`source`](std::error::Error::source), and [`Report`] prints the
//! whole chain on one line where a log or a terminal needs it.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// A boxed error from a store's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of store failure a [`StoreError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached or the connection broke.
    Unavailable,
    /// The store did not answer in time.
    Timeout,
    /// The store answered with something the protocol does not expect.
    Protocol,
    /// The store was configured wrongly (an invalid URL, a bad option).
    Config,
    /// The store does not offer what was asked (a capability, or a payload of
    /// a representation it cannot keep).
    Unsupported,
    /// Any other failure reported by the store's client.
    Other,
}

/// A store failure: a [kind](StoreErrorKind), a message, and the client's
/// error as its [`source`](std::error::Error::source) where there is one.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl StoreError {
    /// An error of `kind` with `message` and no cause.
    pub fn new(kind: StoreErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The same error, its message led by what was being done (`"cannot
    /// connect to redis://host:6379/"`): one message that says both, the
    /// cause still its source.
    #[must_use]
    pub fn context(mut self, doing: impl fmt::Display) -> Self {
        self.message = format!("{doing}: {}", self.message).into();
        self
    }

    /// The store could not be reached: `source` says why.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Unavailable, "store unreachable").with_source(source)
    }

    /// The store did not answer within `limit`.
    pub fn timeout(limit: Duration) -> Self {
        Self::new(
            StoreErrorKind::Timeout,
            format!("store did not answer within {limit:?}"),
        )
    }

    /// The store's reply breaks the protocol.
    pub fn protocol(message: impl fmt::Display) -> Self {
        Self::new(
            StoreErrorKind::Protocol,
            format!("unexpected store reply: {message}"),
        )
    }

    /// The store is configured wrongly.
    pub fn config(message: impl fmt::Display) -> Self {
        Self::new(
            StoreErrorKind::Config,
            format!("invalid store configuration: {message}"),
        )
    }

    /// The store does not offer `what`.
    pub fn unsupported(what: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StoreErrorKind::Unsupported, what)
    }

    /// Any other failure of the store's client.
    pub fn other(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Other, "store command failed").with_source(source)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether the failure is a timeout.
    pub fn is_timeout(&self) -> bool {
        self.kind == StoreErrorKind::Timeout
    }

    /// Whether the store could not be reached or did not answer: the failures
    /// a circuit breaker counts.
    pub fn is_outage(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Unavailable | StoreErrorKind::Timeout
        )
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Displays an error and its causes on one line, `error: cause: cause…`, for
/// logs and terminals.
///
/// A cause whose message is the one just shown, or ends it after a `": "`, is
/// left out: some errors (redis-rs's and sqlx's around an I/O error, for two)
/// both print their cause and return it as their source.
#[derive(Debug)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'a));

impl<'a> Report<'a> {
    /// The messages of the error and its causes, outermost first, each once.
    pub fn messages(&self) -> impl Iterator<Item = String> + 'a {
        let mut next: Option<&'a (dyn std::error::Error + 'a)> = Some(self.0);
        let mut previous: Option<String> = None;
        std::iter::from_fn(move || {
            while let Some(e) = next {
                next = e.source();
                let message = e.to_string();
                if !previous.as_deref().is_some_and(|p| shows(p, &message)) {
                    previous = Some(message.clone());
                    return Some(message);
                }
            }
            None
        })
    }
}

/// Whether `message` already shows `cause`: it is `cause`, or ends with
/// `": "` and `cause`.
fn shows(message: &str, cause: &str) -> bool {
    message
        .strip_suffix(cause)
        .is_some_and(|head| head.is_empty() || head.ends_with(": "))
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, message) in self.messages().enumerate() {
            if i > 0 {
                f.write_str(": ")?;
            }
            f.write_str(&message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_never_repeats_the_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = StoreError::unavailable(io);
        assert_eq!(e.to_string(), "store unreachable");
        assert_eq!(e.kind(), StoreErrorKind::Unavailable);
        assert!(e.is_outage() && !e.is_timeout());
        let source = std::error::Error::source(&e).unwrap();
        assert_eq!(source.to_string(), "refused");
        assert_eq!(Report(&e).to_string(), "store unreachable: refused");

        // A cause that prints its own cause, and returns it as its source,
        // is shown once.
        #[derive(Debug)]
        struct Echo(std::io::Error);
        impl fmt::Display for Echo {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl std::error::Error for Echo {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = StoreError::unavailable(Echo(io));
        assert_eq!(Report(&e).to_string(), "store unreachable: refused");

        // One that prints it after a message of its own (sqlx's `Io`, say).
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "error communicating with database: {}", self.0)
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = StoreError::unavailable(Wrap(io));
        assert_eq!(
            Report(&e).to_string(),
            "store unreachable: error communicating with database: refused"
        );
        // A message that merely ends with the same letters keeps its cause.
        #[derive(Debug)]
        struct Paused(std::io::Error);
        impl fmt::Display for Paused {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("paused")
            }
        }
        impl std::error::Error for Paused {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = StoreError::unavailable(Paused(std::io::Error::other("used")));
        assert_eq!(Report(&e).to_string(), "store unreachable: paused: used");

        let e = StoreError::timeout(Duration::from_millis(5));
        assert!(e.is_timeout() && e.is_outage());
        assert_eq!(Report(&e).to_string(), "store did not answer within 5ms");
        assert!(std::error::Error::source(&e).is_none());
    }
}

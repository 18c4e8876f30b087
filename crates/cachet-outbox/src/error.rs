//! The outbox's error type.

use std::time::Duration;

use cachet_core::StoreError;

/// An error from an [`Outbox`](crate::Outbox) or a [`Relay`](crate::Relay).
///
/// Every message names the outbox table and what failed; [`source`] gives
/// the cause (the `sqlx` or store error), which the message does not repeat.
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configured table name is not a plain SQL identifier.
    #[error(
        "invalid outbox table name {0:?}: use a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes), optionally schema-qualified (schema.table)"
    )]
    InvalidTable(String),
    /// The configured notification channel is not a plain SQL identifier.
    #[error(
        "invalid outbox channel name {0:?}: use a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
    )]
    InvalidChannel(String),
    /// A database statement failed.
    #[error("outbox table {table}: {action} failed")]
    Database {
        /// The outbox table.
        table: String,
        /// What was being done, such as "recording invalidations".
        action: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// The store refused or failed an invalidation; the batch was rolled back and
    /// its rows stay for the next attempt.
    #[error("outbox table {table}: invalidating {key} failed, rows kept for the next attempt")]
    Store {
        /// The outbox table.
        table: String,
        /// The store key whose invalidation failed.
        key: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A batch did not finish in time; its rows stay for the next attempt.
    #[error(
        "outbox table {table}: a batch did not finish within {after:?}; its rows are kept for the next attempt"
    )]
    Timeout {
        /// The outbox table.
        table: String,
        /// The time limit that passed.
        after: Duration,
    },
}

impl Error {
    /// Maps a database error; allocates only when there is one.
    pub(crate) fn db<'a>(
        table: &'a str,
        action: &'static str,
    ) -> impl FnOnce(sqlx::Error) -> Self + use<'a> {
        move |source| Error::Database {
            table: table.to_owned(),
            action,
            source,
        }
    }

    /// The outbox table the error is about, if it is about one.
    pub fn table(&self) -> Option<&str> {
        match self {
            Error::InvalidTable(_) | Error::InvalidChannel(_) => None,
            Error::Database { table, .. }
            | Error::Store { table, .. }
            | Error::Timeout { table, .. } => Some(table),
        }
    }
}

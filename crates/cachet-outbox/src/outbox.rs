//! [`Outbox`]: the table, its DDL, and recording invalidations.

use std::sync::Arc;

use cachet_core::StoreKey;
use sqlx::postgres::{PgConnection, PgPool};

use crate::Error;

/// The table and channel names used when none are configured.
const DEFAULT_NAME: &str = "cachet_outbox";

/// An outbox table and its notification channel. Cloning is cheap.
///
/// [`record`](Self::record) writes invalidations into the table inside the
/// caller's transaction; a [`Relay`](crate::Relay) delivers them. See the
/// [crate docs](crate).
///
/// ```
/// use cachet_outbox::Outbox;
///
/// let default = Outbox::new();
/// assert_eq!(default.table(), "cachet_outbox");
///
/// let custom = Outbox::builder()
///     .table("app.cache_outbox")
///     .channel("app_cache_outbox")
///     .build()?;
/// assert_eq!(custom.table(), "app.cache_outbox");
/// assert!(Outbox::builder().table("Robert'); DROP TABLE").build().is_err());
/// # Ok::<(), cachet_outbox::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: String,
    channel: String,
    notify: bool,
    sql: Sql,
}

/// Every statement on the table, formatted once.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) create: String,
    pub(crate) insert_one: String,
    pub(crate) insert_many: String,
    pub(crate) select_batch: String,
    pub(crate) delete_batch: String,
}

/// Configures an [`Outbox`]. Start with [`Outbox::builder`].
#[must_use = "a builder does nothing until .build() is called"]
#[derive(Clone, Debug)]
pub struct OutboxBuilder {
    table: String,
    channel: String,
    notify: bool,
}

impl OutboxBuilder {
    /// The table (default `cachet_outbox`): a lowercase SQL identifier
    /// (`[a-z_][a-z0-9_]*`, at most 63 bytes), optionally qualified by a schema
    /// (`schema.table`; the schema must exist).
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// The `NOTIFY` channel (default `cachet_outbox`), a lowercase SQL identifier.
    /// Writers and relays of one table must agree on it.
    pub fn channel(mut self, name: impl Into<String>) -> Self {
        self.channel = name.into();
        self
    }

    /// Whether [`Outbox::record`] notifies relays (default `true`).
    ///
    /// At COMMIT, PostgreSQL serializes the transactions that sent a
    /// notification on one cluster-wide queue lock. Where that matters (many
    /// thousands of writing commits per second), turn notifications off: writers
    /// then only insert, and relays of this outbox do not listen and find rows by
    /// polling alone, so delivery takes up to one poll interval.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Validates the names.
    ///
    /// # Errors
    /// [`Error::InvalidTable`] or [`Error::InvalidChannel`] when a
    /// name is not a plain identifier as described above.
    pub fn build(self) -> Result<Outbox, Error> {
        let mut parts = self.table.split('.');
        let table_ok = match (parts.next(), parts.next(), parts.next()) {
            (Some(t), None, _) => is_identifier(t),
            (Some(s), Some(t), None) => is_identifier(s) && is_identifier(t),
            _ => false,
        };
        if !table_ok {
            return Err(Error::InvalidTable(self.table));
        }
        if !is_identifier(&self.channel) {
            return Err(Error::InvalidChannel(self.channel));
        }
        // Quoting a lowercase identifier names the same object as writing it bare,
        // and keeps reserved words (`user`, `order`) usable.
        let quoted = self
            .table
            .split('.')
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".");
        let sql = Sql::new(&quoted, self.notify);
        Ok(Outbox {
            inner: Arc::new(Inner {
                table: self.table,
                channel: self.channel,
                notify: self.notify,
                sql,
            }),
        })
    }
}

/// `[a-z_][a-z0-9_]*`, at most 63 bytes (PostgreSQL's `NAMEDATALEN - 1`).
fn is_identifier(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// The DDL of the table, identical to `migrations/0001_cachet_outbox.sql` for
/// `table = "cachet_outbox"`.
fn ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (\n    \
         id          BIGSERIAL   PRIMARY KEY,\n    \
         store_key   TEXT        NOT NULL,\n    \
         enqueued_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);"
    )
}

impl Sql {
    fn new(table: &str, notify: bool) -> Self {
        // A data-modifying CTE runs to completion even though the outer SELECT
        // does not read it: insert and notify in one statement, one round trip.
        let (insert_one, insert_many) = if notify {
            (
                format!(
                    "WITH recorded AS (INSERT INTO {table} (store_key) VALUES ($1)) \
                     SELECT pg_notify($2, '')"
                ),
                format!(
                    "WITH recorded AS (INSERT INTO {table} (store_key) SELECT unnest($1::text[])) \
                     SELECT pg_notify($2, '')"
                ),
            )
        } else {
            (
                format!("INSERT INTO {table} (store_key) VALUES ($1)"),
                format!("INSERT INTO {table} (store_key) SELECT unnest($1::text[])"),
            )
        };
        Self {
            create: ddl(table),
            insert_one,
            insert_many,
            select_batch: format!(
                "SELECT id, store_key FROM {table} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
            ),
            delete_batch: format!("DELETE FROM {table} WHERE id = ANY($1)"),
        }
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// The outbox `cachet_outbox`, notifying on channel `cachet_outbox`.
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default names are valid identifiers")
    }

    /// A builder, to choose the table or the channel.
    pub fn builder() -> OutboxBuilder {
        OutboxBuilder {
            table: DEFAULT_NAME.to_owned(),
            channel: DEFAULT_NAME.to_owned(),
            notify: true,
        }
    }

    /// The table's name, as configured (`table` or `schema.table`).
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The notification channel.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// Whether [`record`](Self::record) notifies (see [`OutboxBuilder::notify`]).
    pub fn notifies(&self) -> bool {
        self.inner.notify
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    /// Creates the table if it does not exist.
    ///
    /// This runs the statement of `migrations/0001_cachet_outbox.sql` with the
    /// configured table name, under a transaction-scoped advisory lock so that
    /// processes starting together do not race. Users of their own migration
    /// tool can apply that file instead; the two are the same.
    ///
    /// # Errors
    /// [`Error::Database`] when the statement fails (for instance, the
    /// schema of a qualified name does not exist).
    pub async fn migrate(&self, pool: &PgPool) -> Result<(), Error> {
        let table = self.table();
        let action = "creating the table";
        let mut tx = pool.begin().await.map_err(Error::db(table, action))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("cachet_outbox migrate {table}"))
            .execute(&mut *tx)
            .await
            .map_err(Error::db(table, action))?;
        sqlx::query(&self.inner.sql.create)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(table, action))?;
        tx.commit().await.map_err(Error::db(table, action))
    }

    /// Records that `key` must be invalidated once the current transaction
    /// commits: one `INSERT` and, unless turned off, one `pg_notify`, in a single
    /// statement on `conn`.
    ///
    /// Call it inside the transaction that changes the data the entry derives
    /// from (pass `&mut tx`), so that the row commits or rolls back with the
    /// change. The notification is transactional too: relays hear it at COMMIT,
    /// and not at all after a rollback. Called outside a transaction, the row
    /// commits at once, which defeats the purpose.
    ///
    /// # Errors
    /// [`Error::Database`] when the statement fails; the caller's
    /// transaction is then aborted, as after any failed statement.
    pub async fn record(&self, conn: &mut PgConnection, key: &StoreKey) -> Result<(), Error> {
        let q = sqlx::query(&self.inner.sql.insert_one).bind(key.as_str());
        let q = if self.inner.notify {
            q.bind(&self.inner.channel)
        } else {
            q
        };
        q.execute(conn)
            .await
            .map_err(Error::db(self.table(), "recording an invalidation"))?;
        Ok(())
    }

    /// [`record`](Self::record) for several keys, still one statement. Does
    /// nothing for an empty slice. A key given twice is recorded twice (and
    /// invalidated once per relay batch).
    ///
    /// # Errors
    /// As [`record`](Self::record).
    pub async fn record_all(
        &self,
        conn: &mut PgConnection,
        keys: &[StoreKey],
    ) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = keys.iter().map(StoreKey::as_str).collect();
        let q = sqlx::query(&self.inner.sql.insert_many).bind(keys);
        let q = if self.inner.notify {
            q.bind(&self.inner.channel)
        } else {
            q
        };
        q.execute(conn)
            .await
            .map_err(Error::db(self.table(), "recording invalidations"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["cachet_outbox", "_x", "a1", "app.cache_outbox", "user"] {
            assert!(Outbox::builder().table(ok).build().is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "1a",
            "Outbox",
            "a-b",
            "a b",
            "a.b.c",
            ".a",
            "a.",
            "a\"b",
            "a;drop",
            long.as_str(),
        ] {
            let err = Outbox::builder().table(bad).build().unwrap_err();
            assert!(matches!(err, Error::InvalidTable(_)), "{bad}");
            assert!(err.to_string().contains("outbox table name"), "{err}");
        }
        assert!(matches!(
            Outbox::builder().channel("a.b").build(),
            Err(Error::InvalidChannel(_))
        ));
        assert!(Outbox::builder().channel(&long[..63]).build().is_ok());
    }

    #[test]
    fn reserved_words_and_schemas_are_quoted() {
        let o = Outbox::builder().table("app.user").build().unwrap();
        assert!(o.sql().create.contains("\"app\".\"user\" ("));
        assert!(
            o.sql()
                .delete_batch
                .starts_with("DELETE FROM \"app\".\"user\" ")
        );
    }

    /// The migration file and [`Outbox::migrate`] run the same statement.
    #[test]
    fn migration_file_matches_migrate() {
        let file = include_str!("../migrations/0001_cachet_outbox.sql");
        let statement: String = file
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(statement.trim(), ddl(DEFAULT_NAME));
        // `migrate` quotes the name, which for a lowercase identifier is the same.
        assert_eq!(Outbox::new().sql().create, ddl("\"cachet_outbox\""));
    }

    #[test]
    fn notify_can_be_turned_off() {
        let o = Outbox::builder().notify(false).build().unwrap();
        assert!(!o.notifies());
        assert!(!o.sql().insert_one.contains("pg_notify"));
        assert!(!o.sql().insert_many.contains("pg_notify"));
        assert!(Outbox::new().sql().insert_one.contains("pg_notify"));
    }
}

//! A transactional outbox for cachet: cache invalidations recorded in the
//! writer's PostgreSQL transaction and delivered to the store at least once.
//!
//! - [Why](#why)
//! - [Example](#example)
//! - [The guarantee](#the-guarantee)
//! - [Delivery](#delivery)
//! - [Costs](#costs)
//! - [The table](#the-table)
//!
//! # Why
//!
//! cachet's leases keep a cached entry from being older than the last
//! invalidation that ran, *provided that* every committed write is followed by
//! an invalidation that reaches the store (condition 2 of
//! [the guarantee](https://docs.rs/cachet/latest/cachet/#the-guarantee-lease-guarded-fills)).
//! A process that dies between its COMMIT and its `invalidate`, or whose store is
//! unreachable at that moment, leaves the old value cached until its TTL.
//!
//! With an outbox, the writer records the invalidation *in the same transaction*
//! as the data change ([`Outbox::record`]), so the two commit or roll back
//! together, and a [`Relay`] delivers each committed record to the store,
//! retrying until the store takes it.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use cachet::{Cache, RedisStore};
//! use cachet_outbox::{Outbox, Relay};
//! use sqlx::postgres::PgPool;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let pool = PgPool::connect("postgres://app@db.internal/app").await?;
//! let store = RedisStore::connect("redis://cache.internal:6379/").await?;
//! let users: Cache<u64, String> = Cache::builder("users").store(store).build()?;
//!
//! let outbox = Outbox::new(); // table and channel `cachet_outbox`
//! outbox.migrate(&pool).await?; // or apply migrations/0001_cachet_outbox.sql
//!
//! // One relay per service instance is typical; several are safe together.
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let relay = Relay::new(outbox.clone(), pool.clone(), Arc::clone(users.store()));
//! let relay_task = tokio::spawn(async move {
//!     relay.run(async { let _ = stopped.await; }).await;
//! });
//!
//! // A write: the data change and its invalidation commit together.
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE users SET name = $1 WHERE id = $2")
//!     .bind("Ada")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! outbox.record(&mut tx, &users.store_key(&42)).await?;
//! tx.commit().await?;
//!
//! // Optional: invalidate at once as well, so readers see the write without
//! // waiting for the relay; its later delivery then repeats a harmless delete.
//! users.invalidate(&42).await?;
//!
//! let _ = stop.send(());
//! relay_task.await?;
//! # Ok(())
//! # }
//! ```
//!
//! # The guarantee
//!
//! **Provided that**
//!
//! 1. every transaction that changes data a cache entry derives from calls
//!    [`Outbox::record`] (or [`record_all`](Outbox::record_all)) for the entry's
//!    key on that transaction's connection, before it commits;
//! 2. a [`Relay`] on the same table and channel eventually runs against the store
//!    that holds the entry (for an in-process `MemoryStore`, the very store
//!    instance the caches use, in the same process);
//! 3. the loaders meet condition 1 of cachet's guarantee (they read the primary,
//!    after taking the lease),
//!
//! then every committed write is followed by an invalidation of its keys that
//! reaches the store, even if the writer dies right after COMMIT or the store is
//! down at that moment. So cachet's guarantee holds without relying on the writer
//! to survive: once the relay has delivered a write's record, no entry filled
//! from a read older than that write remains, and no such fill can still land
//! (the invalidation revoked its lease).
//!
//! What it does not do: between the COMMIT and the delivery the old entry is
//! still served. That window is normally milliseconds (the relay is woken by
//! `NOTIFY`), at most one poll interval when a notification is lost, and as long
//! as the store or the relay is down otherwise; the TTL still bounds it. A
//! rolled-back transaction records nothing. If no relay ever runs, rows
//! accumulate and only the TTL helps.
//!
//! # Delivery
//!
//! At least once, in batches: a [`Relay`] locks up to
//! [`batch_size`](Relay::batch_size) rows with `SELECT … FOR UPDATE SKIP LOCKED`,
//! invalidates their keys, deletes them and commits, all in one transaction. A
//! relay that dies (or fails to reach the store) before that COMMIT leaves the
//! rows in place, and they are delivered again; invalidating twice is harmless.
//! Relays sharing a table never deliver the same row concurrently. Rows are taken
//! in `id` order, roughly but not strictly the order of their commits; order does
//! not matter for invalidations.
//!
//! [`Relay::run`] is woken by `LISTEN` on the outbox's channel and also polls
//! (every second by default), so a lost notification or a broken listener
//! connection only delays delivery; the listener reconnects with bounded backoff.
//! A failing store makes it back off and retry. [`Relay::stats`] counts delivered
//! rows, malformed rows (a key that does not parse: logged, deleted, never
//! retried) and failed attempts.
//!
//! A store error fails the whole batch, whatever its cause, and the batch is
//! retried until it succeeds: a key the store kept refusing would hold back its
//! batch, and the rows after it, while every failure is logged and counted.
//! An unreachable store is the expected cause; `DEL` on Redis has no other.
//!
//! # Costs
//!
//! - **In the writer's transaction**: one statement per [`record`](Outbox::record)
//!   (or per [`record_all`](Outbox::record_all), whatever the number of keys), an
//!   `INSERT` and a `pg_notify` together: one round trip (statements are
//!   prepared once per connection), one row and its index entry. At COMMIT, PostgreSQL takes a cluster-wide lock to queue the
//!   notification, which serializes notifying commits; at very high write rates,
//!   [`OutboxBuilder::notify`] turns notifications off and relays then rely on
//!   polling alone.
//! - **Per relay batch**: four database round trips (`BEGIN`, the locking
//!   `SELECT`, the `DELETE`, `COMMIT`) plus one store invalidation per distinct
//!   key (one `DEL` on Redis), up to 16 at a time.
//! - **Idle**: each relay runs an empty batch (`BEGIN`, `SELECT`, `COMMIT`) once
//!   per poll interval, and keeps one extra connection open for `LISTEN`, outside
//!   the pool it was given.
//! - **Table**: rows live from commit to delivery, so the table stays small, but
//!   every row is a dead tuple once deleted: autovacuum reclaims them.
//!
//! # The table
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS cachet_outbox (
//!     id          BIGSERIAL   PRIMARY KEY,
//!     store_key   TEXT        NOT NULL,
//!     enqueued_at TIMESTAMPTZ NOT NULL DEFAULT now()
//! );
//! ```
//!
//! [`Outbox::migrate`] runs exactly this statement (with the configured table
//! name); the crate ships it as `migrations/0001_cachet_outbox.sql` for those who
//! create their schema with their own migration tool. The two are the same.
//! `store_key` holds [`StoreKey::as_str`](cachet_core::StoreKey::as_str), which
//! the relay reads back with [`StoreKey::parse`](cachet_core::StoreKey::parse).
#![deny(missing_docs)]

mod error;
mod outbox;
mod relay;

pub use error::Error;
pub use outbox::{Outbox, OutboxBuilder};
pub use relay::{Relay, RelayStats};

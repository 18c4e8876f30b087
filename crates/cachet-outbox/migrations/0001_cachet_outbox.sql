-- The cachet outbox: one row per cache invalidation recorded by
-- `cachet_outbox::Outbox::record` inside the writer's transaction, deleted by a
-- `cachet_outbox::Relay` once delivered to the cache.
--
-- `Outbox::migrate` runs this same statement (with the configured table name).
-- Use this file instead if your own migration tool creates the schema; rename
-- the table here if you configured another one.
CREATE TABLE IF NOT EXISTS cachet_outbox (
    id          BIGSERIAL   PRIMARY KEY,
    store_key   TEXT        NOT NULL,
    enqueued_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

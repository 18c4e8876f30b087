//! Reaching the store past the cache, as an operator, an eviction or a restart
//! would: deleting entries and `:sys:` keys by name, and counting the commands
//! Redis executed.
//!
//! On Redis this is a connection of its own, separate from the cache's, that
//! only ever deletes keys the scenario itself wrote (by their exact names, never
//! by `SCAN`, `KEYS` or a flush). In process it is the cache's [`Store`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cachet::{Store, StoreKey};

use super::Lab;
use super::source::redact_url;

/// Keys per pipelined round trip when deleting many.
const DELETE_BATCH: usize = 512;
/// How long one admin command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The lab's back door to its store.
#[derive(Clone)]
pub(super) enum Admin {
    /// The in-process store, through the `Store` protocol.
    Memory(Arc<dyn Store>),
    /// A connection of its own to the lab's Redis.
    Redis(redis::aio::MultiplexedConnection),
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admin::Memory(store) => f.debug_tuple("Memory").field(store).finish(),
            Admin::Redis(_) => f.write_str("Redis"),
        }
    }
}

impl Admin {
    /// A back door to the lab's store: a new connection on Redis.
    pub(super) async fn open(lab: &Lab) -> Result<Self> {
        let Some(url) = &lab.args.redis_url else {
            return Ok(Self::Memory(Arc::clone(&lab.store)));
        };
        let shown = redact_url(url);
        let client = redis::Client::open(url.as_str())
            .with_context(|| format!("invalid Redis URL {shown}"))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .with_context(|| format!("cannot open an admin connection to Redis at {shown}"))?;
        Ok(Self::Redis(conn))
    }

    /// Whether the store is Redis.
    pub(super) fn is_redis(&self) -> bool {
        matches!(self, Admin::Redis(_))
    }

    /// Deletes entries behind the cache's back: on Redis a `DEL` of each entry
    /// key (pipelined), in process [`Store::invalidate`].
    pub(super) async fn delete_entries(&self, keys: &[StoreKey]) -> Result<()> {
        match self {
            Admin::Memory(store) => {
                for key in keys {
                    store
                        .invalidate(key)
                        .await
                        .with_context(|| format!("cannot delete {key}"))?;
                }
            }
            Admin::Redis(conn) => {
                for batch in keys.chunks(DELETE_BATCH) {
                    let mut pipe = redis::pipe();
                    for key in batch {
                        pipe.cmd("DEL").arg(key.as_str()).ignore();
                    }
                    let mut conn = conn.clone();
                    let () = pipe
                        .query_async(&mut conn)
                        .await
                        .context("cannot delete entries through the admin connection")?;
                }
            }
        }
        Ok(())
    }

    /// Deletes one key by name on Redis (a generation, a Bloom filter);
    /// returns whether it existed. In process there is no such key: `false`.
    pub(super) async fn delete_key(&self, key: &str) -> Result<bool> {
        match self {
            Admin::Memory(_) => Ok(false),
            Admin::Redis(conn) => {
                let mut conn = conn.clone();
                let n: i64 = redis::cmd("DEL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .with_context(|| format!("cannot delete {key}"))?;
                Ok(n > 0)
            }
        }
    }

    /// Best-effort deletion of the `:sys:` keys a scenario created (they have
    /// no TTL), so that a shared Redis keeps nothing of the run.
    pub(super) async fn forget_sys_keys(&self, keys: &[String]) {
        for key in keys {
            if let Err(e) = self.delete_key(key).await {
                tracing::warn!(key, error = %e, "cannot delete a lab system key");
            }
        }
    }

    /// The commands Redis has executed since its statistics were last reset
    /// (`INFO commandstats`, commands run inside scripts included), not counting
    /// `INFO` itself; `None` in process.
    pub(super) async fn commands(&self) -> Result<Option<u64>> {
        let Admin::Redis(conn) = self else {
            return Ok(None);
        };
        let mut conn = conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .context("cannot read INFO commandstats")?;
        Ok(Some(command_calls(&info)))
    }
}

/// The sum of `calls=` over `cmdstat_*` lines, without `cmdstat_info`.
fn command_calls(info: &str) -> u64 {
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter(|line| !line.starts_with("info:"))
        .filter_map(|line| {
            let calls = line.split_once("calls=")?.1;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_calls_skip_info() {
        let info = "# Commandstats\r\n\
            cmdstat_get:calls=12,usec=30,usec_per_call=2.50,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_info:calls=3,usec=300,usec_per_call=100.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_client|setinfo:calls=2,usec=1,usec_per_call=0.50,rejected_calls=0,failed_calls=0\r\n";
        assert_eq!(command_calls(info), 14);
    }
}

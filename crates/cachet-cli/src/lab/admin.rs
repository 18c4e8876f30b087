//! Reaching the store past the cache, as an operator, an eviction or a restart
//! would: deleting entries and `:sys:` keys by name, counting the commands
//! Redis executed, and disturbing the servers (disconnecting the lab's own
//! pub/sub clients, pausing every client).
//!
//! On Redis these are connections of its own, separate from the cache's, that
//! only ever delete keys the scenario itself wrote (by their exact names, never
//! by `SCAN`, `KEYS` or a flush); on a Redis Cluster, key commands are routed
//! by slot and server commands go to every master. In process it is the
//! cache's [`Store`].

use std::sync::Arc;

use anyhow::{Context as _, Result};
use cachet::{Store, StoreKey};
use cachet_redis::RedisConnection;

use super::Lab;
use crate::target::{Node, RedisTarget};

/// Keys per `DEL` when deleting many.
const DELETE_BATCH: usize = 512;

/// The lab's back door to its store.
#[derive(Clone, Debug)]
pub(super) enum Admin {
    /// The in-process store, through the `Store` protocol.
    Memory(Arc<dyn Store>),
    /// Connections of its own to the lab's Redis.
    Redis(Box<RedisAdmin>),
}

/// Connections of the lab's own to a Redis server or cluster: one that routes
/// each command by its key (to the node serving the key's slot on a cluster),
/// and one to each server behind the target (every master of a cluster) for
/// commands about a server (`INFO`, `CLIENT …`).
#[derive(Clone)]
pub(super) struct RedisAdmin {
    target: RedisTarget,
    keys: RedisConnection,
    nodes: Vec<(Node, redis::aio::MultiplexedConnection)>,
}

impl std::fmt::Debug for RedisAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<&str> = self.nodes.iter().map(|(n, _)| n.addr.as_str()).collect();
        f.debug_struct("RedisAdmin")
            .field("target", &self.target.describe())
            .field("nodes", &nodes)
            .finish_non_exhaustive()
    }
}

/// A pub/sub client of one server: the server's index in the admin's list,
/// and the client's id there.
pub(super) type PubSubClient = (usize, u64);

impl Admin {
    /// A back door to the lab's store: new connections on Redis.
    pub(super) async fn open(lab: &Lab) -> Result<Self> {
        match &lab.redis {
            None => Ok(Self::Memory(lab.store.protocol())),
            Some(target) => Ok(Self::Redis(Box::new(RedisAdmin::connect(target).await?))),
        }
    }

    /// Whether the store is Redis.
    pub(super) fn is_redis(&self) -> bool {
        matches!(self, Admin::Redis(_))
    }

    /// Deletes entries behind the cache's back: on Redis a `DEL` of each entry
    /// key (many keys per command; on a cluster split by slot), in process
    /// [`Store::invalidate`].
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
            Admin::Redis(redis) => {
                for batch in keys.chunks(DELETE_BATCH) {
                    let mut del = redis::cmd("DEL");
                    for key in batch {
                        del.arg(key.as_str());
                    }
                    let _: i64 = del
                        .query_async(&mut redis.keys.clone())
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
            Admin::Redis(redis) => redis.delete_key(key).await,
        }
    }

    /// Best-effort deletion of the `:sys:` keys a scenario created (they have
    /// no TTL), so that a shared Redis keeps nothing of the run.
    pub(super) async fn forget_sys_keys(&self, keys: &[String]) {
        for key in keys {
            if let Err(e) = self.delete_key(key).await {
                tracing::warn!(key, error = %format!("{e:#}"), "cannot delete a lab system key");
            }
        }
    }

    /// The commands Redis has executed since its statistics were last reset
    /// (`INFO commandstats`, commands run inside scripts included; on a cluster
    /// summed over the masters), not counting `INFO` itself; `None` in process.
    pub(super) async fn commands(&self) -> Result<Option<u64>> {
        match self {
            Admin::Memory(_) => Ok(None),
            Admin::Redis(redis) => redis.commands().await.map(Some),
        }
    }
}

impl RedisAdmin {
    /// Opens the connections.
    pub(super) async fn connect(target: &RedisTarget) -> Result<Self> {
        let store = target.admin_store().await?;
        let keys = store.connection();
        let mut nodes = Vec::new();
        for node in target.masters(&keys).await? {
            let conn = node.connect().await?;
            nodes.push((node, conn));
        }
        Ok(Self {
            target: target.clone(),
            keys,
            nodes,
        })
    }

    /// Deletes one key by name; returns whether it existed.
    pub(super) async fn delete_key(&self, key: &str) -> Result<bool> {
        let n: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut self.keys.clone())
            .await
            .with_context(|| format!("cannot delete {key}"))?;
        Ok(n > 0)
    }

    /// `INFO commandstats` of every server.
    async fn commandstats(&self) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for (node, conn) in &self.nodes {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn.clone())
                .await
                .with_context(|| format!("cannot read INFO commandstats of {}", node.addr))?;
            out.push(info);
        }
        Ok(out)
    }

    /// Commands executed, as [`Admin::commands`].
    pub(super) async fn commands(&self) -> Result<u64> {
        Ok(self
            .commandstats()
            .await?
            .iter()
            .map(|i| command_calls(i))
            .sum())
    }

    /// Calls of one command (`publish`, say), summed over the servers.
    pub(super) async fn calls_of(&self, command: &str) -> Result<u64> {
        Ok(self
            .commandstats()
            .await?
            .iter()
            .map(|i| calls_of(i, command))
            .sum())
    }

    /// The pub/sub clients of every server (`CLIENT LIST TYPE pubsub`).
    pub(super) async fn pubsub_clients(&self) -> Result<Vec<PubSubClient>> {
        let mut out = Vec::new();
        for (i, (node, conn)) in self.nodes.iter().enumerate() {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut conn.clone())
                .await
                .with_context(|| format!("cannot list the pub/sub clients of {}", node.addr))?;
            out.extend(client_ids(&list).into_iter().map(|id| (i, id)));
        }
        Ok(out)
    }

    /// Disconnects these clients (`CLIENT KILL ID …`); returns how many were
    /// found and disconnected.
    pub(super) async fn kill_clients(&self, clients: &[PubSubClient]) -> Result<u64> {
        let mut killed = 0;
        for (i, (node, conn)) in self.nodes.iter().enumerate() {
            for (_, id) in clients.iter().filter(|(n, _)| *n == i) {
                let n: i64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(*id)
                    .query_async(&mut conn.clone())
                    .await
                    .with_context(|| format!("cannot disconnect client {id} of {}", node.addr))?;
                killed += u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(killed)
    }

    /// Makes every server hang for `ms` milliseconds (`CLIENT PAUSE ms ALL`).
    pub(super) async fn pause_all(&self, ms: u64) -> Result<()> {
        for (node, conn) in &self.nodes {
            let () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(ms)
                .arg("ALL")
                .query_async(&mut conn.clone())
                .await
                .with_context(|| format!("cannot pause {}", node.addr))?;
        }
        Ok(())
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

/// The `calls=` of `cmdstat_<command>`, 0 if the command never ran.
fn calls_of(info: &str, command: &str) -> u64 {
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter_map(|line| line.strip_prefix(command)?.strip_prefix(":calls="))
        .filter_map(|calls| calls.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// The `id=` of every client in `CLIENT LIST` output.
fn client_ids(list: &str) -> Vec<u64> {
    list.lines()
        .filter_map(|line| line.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .filter_map(|id| id.parse().ok())
        .collect()
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
        assert_eq!(calls_of(info, "get"), 12);
        assert_eq!(calls_of(info, "client|setinfo"), 2);
        assert_eq!(calls_of(info, "publish"), 0);
    }

    #[test]
    fn client_ids_are_read_from_client_list() {
        let list = "id=7 addr=127.0.0.1:5 laddr=127.0.0.1:6 fd=9 name= age=1 sub=1\n\
            id=12 addr=127.0.0.1:7 laddr=127.0.0.1:6 fd=10 name= age=0 sub=1\n";
        assert_eq!(client_ids(list), vec![7, 12]);
    }
}

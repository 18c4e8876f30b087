//! The connection of a [`RedisStore`](crate::RedisStore): one server, a
//! Redis Cluster, or the primary that Redis Sentinel names.

use std::fmt;
use std::time::Duration;

use cachet_core::StoreError;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Arg, Cmd, ErrorKind, Pipeline, RedisFuture, ServerErrorKind, Value};

use crate::redact_url;
use crate::sentinel::{self, Primary, SentinelTarget};

/// Where a store connects: one server, the seed nodes of a cluster, or the
/// sentinels of a primary. Its `Debug` never shows a password.
#[derive(Clone)]
pub(crate) enum Target {
    Server(String),
    Cluster(Vec<String>),
    Sentinel(SentinelTarget),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server(url) => f.debug_tuple("Server").field(&redact_url(url)).finish(),
            Self::Cluster(urls) => {
                let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                f.debug_tuple("Cluster").field(&urls).finish()
            }
            Self::Sentinel(target) => target.fmt(f),
        }
    }
}

impl Target {
    /// The target in words, without passwords, for error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Server(url) => format!("the Redis server at {}", redact_url(url)),
            Self::Cluster(urls) => {
                let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                format!("the Redis Cluster at {}", urls.join(", "))
            }
            Self::Sentinel(target) => format!("the primary of Sentinel master {:?}", target.master),
        }
    }

    /// The same target with passwords taken out of the URLs, for logs.
    pub(crate) fn redacted(&self) -> Self {
        match self {
            Self::Server(url) => Self::Server(redact_url(url)),
            Self::Cluster(urls) => Self::Cluster(urls.iter().map(|u| redact_url(u)).collect()),
            Self::Sentinel(target) => Self::Sentinel(target.redacted()),
        }
    }
}

/// The connection of a [`RedisStore`](crate::RedisStore), from
/// [`RedisStore::connection`](crate::RedisStore::connection): a multiplexed,
/// reconnecting connection to one server (redis-rs `ConnectionManager`), or a
/// Redis Cluster connection (redis-rs `cluster_async::ClusterConnection`) that
/// routes each command to the node serving its keys' slot and follows `MOVED`
/// and `ASK` redirections, or a connection to the primary that Redis Sentinel
/// names, which follows it across failovers.
///
/// It is a [`redis::aio::ConnectionLike`], so `redis::cmd(…).query_async(&mut
/// conn)` and `Script::invoke_async` work on both. On a cluster, send only
/// commands whose keys share one slot: a command or script over several slots is
/// refused with `CROSSSLOT`. Cloning is cheap; clones share the connection.
#[derive(Clone)]
pub struct RedisConnection {
    conn: Conn,
    /// What bounds each call, for errors that name it.
    response_timeout: Duration,
}

#[derive(Clone)]
enum Conn {
    Server(ConnectionManager),
    Cluster(Cluster),
    Sentinel(Primary),
}

/// A cluster connection, and where the last command through this handle got
/// `NOSCRIPT`.
///
/// `Script::invoke_async` sends `EVALSHA`; if the node serving the keys' slot
/// answers `NOSCRIPT` (it restarted, failed over, or had `SCRIPT FLUSH`), it
/// sends `SCRIPT LOAD` on the same handle and retries. redis-rs routes a bare
/// `SCRIPT LOAD` to every node of the cluster and waits for all of them, so a
/// single node that hangs would fail (by timeout) every script whose own node
/// needs a reload. Here a `SCRIPT LOAD` right after a `NOSCRIPT` goes to the
/// node that answered it, the one that needs the script: each node loads a
/// script when it first runs it. Any other `SCRIPT LOAD` goes to every node.
#[derive(Clone)]
struct Cluster {
    conn: ClusterConnection,
    noscript: Option<Route>,
}

impl RedisConnection {
    pub(crate) fn server(conn: ConnectionManager, response_timeout: Duration) -> Self {
        Self {
            conn: Conn::Server(conn),
            response_timeout,
        }
    }

    pub(crate) fn sentinel(primary: Primary, response_timeout: Duration) -> Self {
        Self {
            conn: Conn::Sentinel(primary),
            response_timeout,
        }
    }

    /// `e`, the failure of a call on this connection, as a store error: a
    /// timeout names the connection's response timeout, a broken connection
    /// reads as the store being unavailable. Not part of the documented API,
    /// which exposes no redis-rs type.
    #[doc(hidden)]
    pub fn error(&self, e: redis::RedisError) -> StoreError {
        crate::map_err(e, self.response_timeout)
    }

    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.conn {
            Conn::Server(_) => "RedisConnection::Server",
            Conn::Cluster(_) => "RedisConnection::Cluster",
            Conn::Sentinel(_) => "RedisConnection::Sentinel",
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.conn {
            Conn::Server(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(cluster) => cluster.req_packed_command(cmd),
            Conn::Sentinel(primary) => Box::pin(primary.call(
                move |mut conn| async move { conn.req_packed_command(cmd).await },
                sentinel::is_readonly,
            )),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.conn {
            Conn::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            // Routed by the slot of its keys; every pipeline the store sends
            // keeps its keys in one slot.
            Conn::Cluster(cluster) => cluster.conn.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(primary) => {
                Box::pin(primary.call(
                    move |mut conn| async move {
                        conn.req_packed_commands(pipeline, offset, count).await
                    },
                    |values: &Vec<Value>| values.iter().any(sentinel::is_readonly),
                ))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.conn {
            Conn::Server(conn) => conn.get_db(),
            Conn::Cluster(cluster) => cluster.conn.get_db(),
            Conn::Sentinel(_) => 0,
        }
    }
}

impl Cluster {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Self { conn, noscript } = self;
        let reload = noscript.take();
        let mut args = cmd.args_iter().map(|a| match a {
            Arg::Simple(a) => a,
            _ => &[],
        });
        match args.next() {
            Some(name) if name.eq_ignore_ascii_case(b"EVALSHA") => {
                // `EVALSHA sha numkeys key…`: routed by the first key.
                let _sha = args.next();
                let route = match (args.next(), args.next()) {
                    (Some(n), Some(key)) if n != b"0" => {
                        Some(Route::with_key(key, SlotAddr::Master))
                    }
                    _ => None,
                };
                Box::pin(async move {
                    let reply = conn.req_packed_command(cmd).await;
                    // A server's error reply is a value here; the caller turns
                    // it into an error.
                    let missing = match &reply {
                        Ok(Value::ServerError(e)) => e.kind() == Some(ServerErrorKind::NoScript),
                        Err(e) => e.kind() == ErrorKind::Server(ServerErrorKind::NoScript),
                        Ok(_) => false,
                    };
                    if missing {
                        *noscript = route;
                    }
                    reply
                })
            }
            Some(name)
                if name.eq_ignore_ascii_case(b"SCRIPT")
                    && args.next().is_some_and(|a| a.eq_ignore_ascii_case(b"LOAD")) =>
            {
                match reload {
                    Some(route) => Box::pin(conn.route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )),
                    None => conn.req_packed_command(cmd),
                }
            }
            _ => conn.req_packed_command(cmd),
        }
    }
}

/// Connects to a cluster through any of its nodes.
pub(crate) async fn connect(
    urls: &[String],
    response_timeout: Duration,
    connection_timeout: Duration,
    tls: &crate::tls::TlsOptions,
) -> Result<RedisConnection, StoreError> {
    if urls.is_empty() {
        return Err(StoreError::config(
            "a Redis Cluster store needs the URL of at least one node",
        ));
    }
    let nodes = urls
        .iter()
        .map(|url| tls.connection_info(url))
        .collect::<Result<Vec<_>, _>>()?;
    let client = tls
        .cluster(ClusterClient::builder(nodes))
        // Per request to a node, and for a whole request with its redirections
        // and retries.
        .response_timeout(response_timeout)
        .connection_timeout(connection_timeout)
        // Redirections (`MOVED`, `ASK`) count as retries; waits between retries
        // of a failed node stay well inside the response timeout.
        .retries(3)
        .min_retry_wait(5)
        .max_retry_wait(500)
        .build()
        .map_err(|e| {
            StoreError::config("invalid Redis Cluster configuration")
                .with_source(crate::RedisCause(e))
        })?;
    let connecting = client.get_async_connection();
    let connected = crate::within_connect_timeout(connection_timeout, connecting).await?;
    let conn = connected.map_err(|e| {
        if e.to_string().contains("cluster support disabled") {
            let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
            StoreError::config(format!("{} is not a Redis Cluster node", urls.join(", ")))
                .with_source(crate::RedisCause(e))
        } else {
            crate::connect_err(e, connection_timeout)
        }
    })?;
    Ok(RedisConnection {
        conn: Conn::Cluster(Cluster {
            conn,
            noscript: None,
        }),
        response_timeout,
    })
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// part between the first `{` and the next `}`, if not empty) or of the whole
/// key, modulo 16384.
pub(crate) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_are_the_clusters() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(super::slot("foo"), 12182);
        assert_eq!(super::slot("bar"), 5061);
        assert_eq!(super::slot("{user1000}.following"), super::slot("user1000"));
        // An empty tag hashes the whole key.
        assert_ne!(super::slot("foo{}{bar}"), super::slot("bar"));
        assert_eq!(super::slot("foo{{bar}}zap"), super::slot("{bar"));
    }

    use std::time::Instant;

    use super::*;
    use crate::RedisStore;
    use cachet_core::StoreErrorKind;

    #[tokio::test]
    async fn a_cluster_needs_valid_node_urls() {
        let none: [&str; 0] = [];
        let e = RedisStore::connect_cluster(&none).await.unwrap_err();
        assert!(e.kind() == StoreErrorKind::Config, "{e:?}");
        let e = RedisStore::connect_cluster(&["redis://127.0.0.1:1/", "not a url"])
            .await
            .unwrap_err();
        assert!(e.kind() == StoreErrorKind::Config, "{e:?}");
        assert!(e.to_string().contains("\"not a url\""), "{e}");
        let e = RedisStore::connect_cluster(&["redis://:secret@bad host:1/"])
            .await
            .unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_to_connect_promptly() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Instant::now();
        let e = RedisStore::cluster_builder([format!("redis://127.0.0.1:{port}/")])
            .connection_timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap_err();
        assert!(e.kind() == StoreErrorKind::Unavailable, "{e:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn targets_are_redacted() {
        let t = Target::Cluster(vec!["redis://:pw@a:1/".into(), "redis://b:2/".into()]);
        assert_eq!(
            format!("{:?}", t.redacted()),
            r#"Cluster(["redis://:***@a:1/", "redis://b:2/"])"#
        );
    }
}

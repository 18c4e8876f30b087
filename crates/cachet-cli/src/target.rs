//! Where Redis is, for every command: one server (`--redis-url`) or a Redis
//! Cluster (`--redis-cluster`), and the servers behind it.
//!
//! A [`RedisTarget`] builds [`RedisStore`]s (`RedisStore::builder` or
//! `RedisStore::cluster_builder`) and, for commands about a server rather than a
//! key (`INFO`, `CLIENT …`), lists the servers to send them to: the server
//! itself, or every master of the cluster (from `CLUSTER NODES`), each reached
//! by a plain connection of its own.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cachet::{RedisConnection, RedisStore, RedisStoreBuilder};
use clap::Args;

/// How long an administrative command may take.
pub(crate) const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `--redis-url` or `--redis-cluster`, one of them required: for the commands
/// that only make sense against Redis (`stats`, `inspect`, the lab's child
/// processes).
#[derive(Clone, Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct RedisArgs {
    /// The Redis server
    #[arg(long, value_name = "URL")]
    pub(crate) redis_url: Option<String>,
    /// The nodes of a Redis Cluster (any of them will do; the others are
    /// discovered), comma-separated or repeated
    #[arg(long, value_name = "URL,…", value_delimiter = ',')]
    pub(crate) redis_cluster: Vec<String>,
}

impl RedisArgs {
    /// The target these flags name.
    pub(crate) fn target(&self) -> Result<RedisTarget> {
        RedisTarget::from_flags(self.redis_url.as_deref(), &self.redis_cluster)?
            .context("give --redis-url or --redis-cluster")
    }
}

/// One Redis server, or the seed nodes of a Redis Cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RedisTarget {
    Server(String),
    Cluster(Vec<String>),
}

/// One server behind a target: the server itself, or a master of the cluster.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    /// `host:port`, as the server or `CLUSTER NODES` names it.
    pub(crate) addr: String,
    /// A URL for it, with the scheme and credentials of the target's URL.
    pub(crate) url: String,
}

impl RedisTarget {
    /// The target of `--redis-url URL` or `--redis-cluster URL,…`; `None` when
    /// neither is given.
    pub(crate) fn from_flags(url: Option<&str>, cluster: &[String]) -> Result<Option<Self>> {
        let nodes: Vec<String> = cluster
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        match (url, nodes.is_empty()) {
            (Some(_), false) => bail!("give either --redis-url or --redis-cluster, not both"),
            (Some(url), true) => Ok(Some(Self::Server(url.to_owned()))),
            (None, false) => Ok(Some(Self::Cluster(nodes))),
            (None, true) if !cluster.is_empty() => {
                bail!("--redis-cluster needs the URL of at least one node")
            }
            (None, true) => Ok(None),
        }
    }

    /// `redis` or `redis-cluster`, for the lab's rows.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Server(_) => "redis",
            Self::Cluster(_) => "redis-cluster",
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The target for messages, without passwords.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Server(url) => redact_url(url),
            Self::Cluster(urls) => {
                let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                format!("cluster {}", urls.join(","))
            }
        }
    }

    /// A store builder for this target, with the library's defaults.
    pub(crate) fn builder(&self) -> RedisStoreBuilder {
        match self {
            Self::Server(url) => RedisStore::builder(url.clone()),
            Self::Cluster(urls) => RedisStore::cluster_builder(urls.iter().cloned()),
        }
    }

    /// A store builder for one more connection to a target whose settings were
    /// already checked (by the first connection of a run): without the
    /// eviction check, which would repeat its warnings for every connection.
    pub(crate) fn another(&self) -> RedisStoreBuilder {
        self.builder().eviction_check(false)
    }

    /// Connects `builder` (made from [`builder`](Self::builder)), with an error
    /// that names the target.
    pub(crate) async fn connect(&self, builder: RedisStoreBuilder) -> Result<RedisStore> {
        builder
            .connect()
            .await
            .with_context(|| format!("cannot connect to Redis at {}", self.describe()))
    }

    /// The first connection of a run: a store with the library's defaults, whose
    /// eviction check warns about settings that weaken the guarantees. On a
    /// cluster the library's check cannot read the settings (it asks one
    /// `INFO` of the cluster connection, which answers for every master at
    /// once), so each master is checked through a connection of its own.
    pub(crate) async fn connect_checked(&self) -> Result<RedisStore> {
        match self {
            Self::Server(_) => self.connect(self.builder()).await,
            Self::Cluster(_) => {
                let store = self.connect(self.another()).await?;
                for node in self.masters(&store.connection()).await? {
                    // Connecting runs the check; the store is not needed after.
                    let checked = RedisStore::builder(node.url.clone())
                        .invalidation_bus(false)
                        .connect()
                        .await;
                    if let Err(e) = checked {
                        tracing::warn!(node = %node.addr, error = %cachet::Report(&e),
                            "cannot check the eviction settings of a cluster node");
                    }
                }
                Ok(store)
            }
        }
    }

    /// A store for administrative commands: no invalidation bus, no eviction
    /// warning at connect, a long response timeout.
    pub(crate) async fn admin_store(&self) -> Result<RedisStore> {
        let builder = self
            .builder()
            .invalidation_bus(false)
            .eviction_check(false)
            .response_timeout(ADMIN_TIMEOUT)
            .connection_timeout(ADMIN_TIMEOUT);
        self.connect(builder).await
    }

    /// The flags that name this target on a command line of the lab's child
    /// processes.
    pub(crate) fn child_args(&self) -> Vec<String> {
        match self {
            Self::Server(url) => vec!["--redis-url".into(), url.clone()],
            Self::Cluster(urls) => vec!["--redis-cluster".into(), urls.join(",")],
        }
    }

    /// The servers behind this target: the server, or every master of the
    /// cluster as `CLUSTER NODES` (sent through `conn`, a connection of a store
    /// on this target) lists them.
    pub(crate) async fn masters(&self, conn: &RedisConnection) -> Result<Vec<Node>> {
        match self {
            Self::Server(url) => Ok(vec![Node {
                addr: host_port(url).unwrap_or_else(|| redact_url(url)),
                url: url.clone(),
            }]),
            Self::Cluster(urls) => {
                let seed = urls.first().context("a cluster target without URLs")?;
                let mut conn = conn.clone();
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await
                    .with_context(|| format!("cannot list the nodes of {}", self.describe()))?;
                let nodes: Vec<Node> = cluster_masters(&text)
                    .into_iter()
                    .map(|(host, port)| Node {
                        addr: format!("{host}:{port}"),
                        url: with_host_port(seed, &host, port),
                    })
                    .collect();
                if nodes.is_empty() {
                    bail!(
                        "{} lists no master in CLUSTER NODES:\n{text}",
                        self.describe()
                    );
                }
                Ok(nodes)
            }
        }
    }
}

impl Node {
    /// A plain connection of its own to this server (no cluster routing), for
    /// commands about the server itself.
    pub(crate) async fn connect(&self) -> Result<redis::aio::MultiplexedConnection> {
        let shown = redact_url(&self.url);
        let client = redis::Client::open(self.url.as_str())
            .with_context(|| format!("invalid Redis URL {shown}"))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(ADMIN_TIMEOUT))
            .set_response_timeout(Some(ADMIN_TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .with_context(|| format!("cannot connect to the Redis server at {shown}"))
    }
}

/// The masters of `CLUSTER NODES` output that are up, as (host, port).
fn cluster_masters(text: &str) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master")
            || flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"))
        {
            continue;
        }
        // `host:port@cport[,hostname]`
        let addr = addr.split([',', '@']).next().unwrap_or_default();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        if let (false, Ok(port)) = (host.is_empty(), port.parse::<u16>()) {
            out.push((host.to_owned(), port));
        }
    }
    out
}

/// The `host:port` of a URL, if it has one.
fn host_port(url: &str) -> Option<String> {
    let (start, end) = authority(url)?;
    let authority = &url[start..end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| host.to_owned())
}

/// The byte range of a URL's host and port (after any `user:pass@`).
fn authority(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = start + rest.find(['/', '?']).unwrap_or(rest.len());
    let host_start = url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    Some((host_start, end))
}

/// `url` with its host and port replaced, keeping scheme, credentials and path.
fn with_host_port(url: &str, host: &str, port: u16) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    match authority(url) {
        Some((start, end)) => format!("{}{host}:{port}{}", &url[..start], &url[end..]),
        None => format!("redis://{host}:{port}/"),
    }
}

/// `url` with any password replaced, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_one_target() {
        assert_eq!(RedisTarget::from_flags(None, &[]).unwrap(), None);
        assert_eq!(
            RedisTarget::from_flags(Some("redis://a:1/"), &[]).unwrap(),
            Some(RedisTarget::Server("redis://a:1/".into()))
        );
        let nodes = vec!["redis://a:1/".to_owned(), " ".to_owned()];
        assert_eq!(
            RedisTarget::from_flags(None, &nodes).unwrap(),
            Some(RedisTarget::Cluster(vec!["redis://a:1/".into()]))
        );
        assert!(RedisTarget::from_flags(None, &[String::new()]).is_err());
        assert!(RedisTarget::from_flags(Some("redis://a:1/"), &nodes).is_err());
    }

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let text = "\
            56a2 127.0.0.1:7102@17102 master - 0 1 2 connected 5461-10922\n\
            f275 127.0.0.1:7103@17103,host-c myself,master - 0 0 3 connected 10923-16383\n\
            92d1 127.0.0.1:7101@17101 slave 56a2 0 1 1 connected\n\
            aaaa 127.0.0.1:7104@17104 master,fail - 0 1 4 disconnected\n\
            bbbb ::1:7105@17105 master - 0 1 5 connected 0-5460\n";
        assert_eq!(
            cluster_masters(text),
            vec![
                ("127.0.0.1".to_owned(), 7102),
                ("127.0.0.1".to_owned(), 7103),
                ("::1".to_owned(), 7105)
            ]
        );
    }

    #[test]
    fn node_urls_keep_scheme_and_credentials() {
        assert_eq!(
            with_host_port("redis://:pw@seed:1/0", "10.0.0.2", 7000),
            "redis://:pw@10.0.0.2:7000/0"
        );
        assert_eq!(
            with_host_port("rediss://seed:1", "::1", 7000),
            "rediss://[::1]:7000"
        );
        assert_eq!(host_port("redis://u:p@h:6379/"), Some("h:6379".into()));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("redis://:secret@h:6379/"),
            "redis://:***@h:6379/"
        );
        assert_eq!(
            redact_url("postgres://u@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(redact_url("redis://h:6379/"), "redis://h:6379/");
    }
}

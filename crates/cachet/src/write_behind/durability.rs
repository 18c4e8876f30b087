//! What a Redis crash can take from acknowledged writes, read from the
//! server's persistence settings.

use std::collections::HashMap;
use std::fmt;

use redis::aio::ConnectionLike;

/// How much of what [`write_behind`](crate::write_behind::WriteBehind::write_behind)
/// acknowledged a crash of the Redis server (process or machine) can lose,
/// judging by its persistence settings (`appendonly`, `appendfsync`,
/// `no-appendfsync-on-rewrite`).
///
/// A write is acknowledged when the script that queued it returns, so what
/// matters is whether Redis had it on disk by then. This is about one server;
/// with replicas, [`wait_replicas`](crate::write_behind::WriteBehindBuilder::wait_replicas)
/// makes a write survive the loss of the primary when a replica that
/// acknowledged it takes over.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `appendonly yes`, `appendfsync always`: each write is fsynced to the
    /// append-only file before its reply. Nothing acknowledged is lost.
    Always,
    /// `appendfsync always` with `no-appendfsync-on-rewrite yes`: nothing is
    /// lost, except while an AOF rewrite or RDB save runs in the background,
    /// when fsyncs are skipped and up to about 30 s (the kernel's writeback
    /// delay on Linux) can be.
    AlwaysExceptDuringRewrites,
    /// `appendonly yes`, `appendfsync everysec`: up to about one second of
    /// acknowledged writes (two when the disk is slow).
    EverySecond,
    /// `appendonly yes`, `appendfsync no`: whatever the kernel had not written
    /// back, about 30 s on Linux by default.
    OperatingSystem,
    /// `appendonly no`: everything since the last RDB snapshot, or everything
    /// if snapshots are off.
    SinceLastSnapshot,
    /// The settings could not be read (an ACL forbids `CONFIG`, or the command
    /// was renamed); the reason.
    Unknown(String),
}

impl Durability {
    /// Classifies the values of `appendonly`, `appendfsync` and
    /// `no-appendfsync-on-rewrite` as `CONFIG GET` returns them.
    pub fn classify(appendonly: &str, appendfsync: &str, no_fsync_on_rewrite: &str) -> Self {
        if !appendonly.eq_ignore_ascii_case("yes") {
            return Durability::SinceLastSnapshot;
        }
        match appendfsync.to_ascii_lowercase().as_str() {
            "always" if no_fsync_on_rewrite.eq_ignore_ascii_case("yes") => {
                Durability::AlwaysExceptDuringRewrites
            }
            "always" => Durability::Always,
            "everysec" => Durability::EverySecond,
            "no" => Durability::OperatingSystem,
            other => Durability::Unknown(format!("unrecognized appendfsync {other:?}")),
        }
    }

    /// Whether a crash can lose acknowledged writes; `None` when unknown.
    pub fn may_lose_writes(&self) -> Option<bool> {
        match self {
            Durability::Always => Some(false),
            Durability::Unknown(_) => None,
            _ => Some(true),
        }
    }

    /// What a crash can lose, in words.
    pub fn loss_window(&self) -> &str {
        match self {
            Durability::Always => "nothing (appendfsync always)",
            Durability::AlwaysExceptDuringRewrites => {
                "nothing, except up to about 30 s while an AOF rewrite or RDB save runs \
                 (appendfsync always with no-appendfsync-on-rewrite yes)"
            }
            Durability::EverySecond => "up to about one second of writes (appendfsync everysec)",
            Durability::OperatingSystem => {
                "what the kernel had not written back, about 30 s on Linux (appendfsync no)"
            }
            Durability::SinceLastSnapshot => {
                "every write since the last RDB snapshot, or all of them if snapshots are off \
                 (appendonly no)"
            }
            Durability::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::Unknown(why) => write!(f, "unknown ({why})"),
            other => f.write_str(other.loss_window()),
        }
    }
}

/// What the server's configuration says, for [`Durability`] and eviction.
#[derive(Clone, Debug)]
pub(crate) struct ServerConfig {
    pub(crate) durability: Durability,
    /// `maxmemory-policy`, when readable.
    pub(crate) eviction: Option<String>,
}

/// Reads the persistence settings with `CONFIG GET`; a refusal (ACL, renamed
/// command) gives [`Durability::Unknown`], never an error.
pub(crate) async fn read_config(conn: &mut impl ConnectionLike) -> ServerConfig {
    let reply: Result<HashMap<String, String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .arg("appendfsync")
        .arg("no-appendfsync-on-rewrite")
        .arg("maxmemory-policy")
        .query_async(conn)
        .await;
    match reply {
        Ok(config) => {
            let get = |name: &str| config.get(name).map_or("", String::as_str);
            let durability = if config.contains_key("appendonly") {
                Durability::classify(
                    get("appendonly"),
                    get("appendfsync"),
                    get("no-appendfsync-on-rewrite"),
                )
            } else {
                Durability::Unknown("CONFIG GET did not return appendonly".into())
            };
            ServerConfig {
                durability,
                eviction: config.get("maxmemory-policy").cloned(),
            }
        }
        Err(e) => ServerConfig {
            durability: Durability::Unknown(format!("CONFIG GET failed: {e}")),
            eviction: None,
        },
    }
}

/// Logs, once, what a crash of this server can lose, and whether the stream
/// can be evicted.
pub(crate) fn report(stream: &str, config: &ServerConfig, replicas: Option<usize>) {
    let d = &config.durability;
    match (d, d.may_lose_writes()) {
        (Durability::Unknown(why), _) => tracing::warn!(
            stream,
            reason = %why,
            "could not check Redis persistence (CONFIG GET); acknowledged write-behind writes \
             may be lost on a Redis crash: use appendfsync always or wait_replicas for writes \
             that must not be lost"
        ),
        (_, Some(true)) => tracing::warn!(
            stream,
            can_lose = d.loss_window(),
            wait_replicas = ?replicas,
            "acknowledged write-behind writes can be lost on a Redis crash: {}; use appendfsync \
             always or wait_replicas for writes that must not be lost",
            d.loss_window()
        ),
        _ => tracing::debug!(stream, "Redis fsyncs every write (appendfsync always)"),
    }
    if let Some(policy) = &config.eviction
        && policy.starts_with("allkeys")
    {
        tracing::warn!(
            stream,
            maxmemory_policy = %policy,
            "Redis may evict keys without a TTL under memory pressure, the write-behind stream \
             included, losing queued writes: use volatile-lru or volatile-lfu (cache entries \
             all have a TTL, so they are evicted as before, never the stream) or noeviction"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_every_setting() {
        use Durability::*;
        assert_eq!(
            Durability::classify("no", "always", "no"),
            SinceLastSnapshot
        );
        assert_eq!(
            Durability::classify("no", "everysec", "no"),
            SinceLastSnapshot
        );
        assert_eq!(Durability::classify("yes", "always", "no"), Always);
        assert_eq!(
            Durability::classify("yes", "always", "yes"),
            AlwaysExceptDuringRewrites
        );
        assert_eq!(Durability::classify("yes", "everysec", "no"), EverySecond);
        assert_eq!(Durability::classify("YES", "EverySec", "no"), EverySecond);
        assert_eq!(Durability::classify("yes", "no", "no"), OperatingSystem);
        assert!(matches!(
            Durability::classify("yes", "sometimes", "no"),
            Unknown(_)
        ));
    }

    #[test]
    fn only_always_is_safe() {
        assert_eq!(Durability::Always.may_lose_writes(), Some(false));
        for d in [
            Durability::AlwaysExceptDuringRewrites,
            Durability::EverySecond,
            Durability::OperatingSystem,
            Durability::SinceLastSnapshot,
        ] {
            assert_eq!(d.may_lose_writes(), Some(true), "{d:?}");
            assert!(
                d.loss_window().contains("appendfsync") || d.loss_window().contains("appendonly")
            );
        }
        assert_eq!(Durability::Unknown("x".into()).may_lose_writes(), None);
        assert!(
            Durability::SinceLastSnapshot
                .to_string()
                .contains("since the last RDB snapshot")
        );
        assert!(Durability::EverySecond.to_string().contains("one second"));
    }
}

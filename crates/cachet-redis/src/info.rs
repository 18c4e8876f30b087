//! What the server says about memory and eviction, and the settings that break
//! cachet's guarantees.

use std::fmt;

/// Memory and eviction facts read from the server (`CONFIG GET`, `INFO`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerInfo {
    /// `maxmemory` in bytes (`0` = no limit); `None` if `CONFIG` is not allowed.
    pub maxmemory: Option<u64>,
    /// `maxmemory-policy`; `None` if `CONFIG` is not allowed.
    pub policy: Option<String>,
    /// `used_memory` in bytes.
    pub used_memory: Option<u64>,
    /// Keys evicted since the server started (`evicted_keys`).
    pub evicted_keys: Option<u64>,
    /// Key lookups that found the key (`keyspace_hits`).
    pub keyspace_hits: Option<u64>,
    /// Key lookups that did not (`keyspace_misses`).
    pub keyspace_misses: Option<u64>,
}

impl ServerInfo {
    /// Parses `INFO` text (the `# Memory` and `# Stats` sections are enough).
    pub(crate) fn with_info(mut self, info: &str) -> Self {
        for line in info.lines() {
            let Some((name, value)) = line.trim().split_once(':') else {
                continue;
            };
            let value = value.parse().ok();
            match name {
                "used_memory" => self.used_memory = value,
                "evicted_keys" => self.evicted_keys = value,
                "keyspace_hits" => self.keyspace_hits = value,
                "keyspace_misses" => self.keyspace_misses = value,
                _ => {}
            }
        }
        self
    }

    /// The server's own hit rate, between 0 and 1, if it counted any lookup.
    pub fn keyspace_hit_rate(&self) -> Option<f64> {
        let (hits, misses) = (self.keyspace_hits?, self.keyspace_misses?);
        let total = hits + misses;
        // Counts below 2^53 convert exactly.
        #[allow(clippy::cast_precision_loss)]
        let rate = (total > 0).then(|| hits as f64 / total as f64);
        rate
    }

    /// What in these settings weakens cachet's guarantees, one sentence each.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        match (self.maxmemory, self.policy.as_deref()) {
            (None, _) | (_, None) => out.push(
                "cannot read maxmemory / maxmemory-policy (CONFIG not allowed): check them by hand"
                    .to_owned(),
            ),
            (Some(max), Some(policy)) => {
                if policy == "noeviction" {
                    let headroom = match (max, self.used_memory) {
                        (0, _) => "no maxmemory set".to_owned(),
                        (max, Some(used)) => format!("{used} of {max} bytes used"),
                        (max, None) => format!("maxmemory {max} bytes"),
                    };
                    out.push(format!(
                        "maxmemory-policy noeviction: when memory is full, fills, leases and \
                         invalidations fail instead of old entries being evicted ({headroom}); \
                         use volatile-lru or volatile-lfu (every cachet entry has a TTL, and the \
                         durable :sys: structures are kept), or allkeys-lru or allkeys-lfu if \
                         neither the deferred queue nor write-behind is used"
                    ));
                } else if policy.starts_with("volatile-") {
                    out.push(format!(
                        "maxmemory-policy {policy}: only keys with a TTL are evicted; every cachet \
                         entry has one, but keys without a TTL (cachet's :sys: structures, other \
                         applications' keys) are never evicted and can fill memory until writes \
                         fail; watch used memory"
                    ));
                } else if policy.starts_with("allkeys-") {
                    out.push(format!(
                        "maxmemory-policy {policy}: any key may be evicted, including cachet's \
                         durable :sys: structures (the deferred-invalidation queue, write-behind \
                         streams), which would lose queued second deletes or writes; if you use \
                         them, a volatile-* policy keeps them (every cachet entry has a TTL)"
                    ));
                }
                if max == 0 && policy != "noeviction" {
                    out.push(
                        "maxmemory is 0 (no limit): the eviction policy never runs, and the server \
                         grows until the machine runs out of memory"
                            .to_owned(),
                    );
                }
            }
        }
        out
    }
}

impl fmt::Display for ServerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        write!(
            f,
            "maxmemory {} bytes, policy {}, used {} bytes, evicted keys {}, keyspace hits {}, misses {}",
            show(self.maxmemory),
            self.policy.as_deref().unwrap_or("?"),
            show(self.used_memory),
            show(self.evicted_keys),
            show(self.keyspace_hits),
            show(self.keyspace_misses),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(max: u64, policy: &str) -> ServerInfo {
        ServerInfo {
            maxmemory: Some(max),
            policy: Some(policy.into()),
            used_memory: Some(100),
            ..ServerInfo::default()
        }
    }

    #[test]
    fn classifies_settings() {
        let w = info(1 << 30, "allkeys-lru").warnings();
        assert!(
            w.len() == 1 && w[0].contains("durable :sys: structures"),
            "{w:?}"
        );
        let w = info(1 << 30, "noeviction").warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("noeviction") && w[0].contains("100 of 1073741824 bytes used"),
            "{w:?}"
        );
        // Its advice agrees with the other policies' warnings: allkeys-* only
        // without the durable structures.
        assert!(
            w[0].contains("use volatile-lru or volatile-lfu")
                && w[0].contains("allkeys-lru or allkeys-lfu if neither"),
            "{w:?}"
        );
        assert!(info(1 << 30, "volatile-lru").warnings()[0].contains("volatile-lru"));
        let w = info(0, "allkeys-lfu").warnings();
        assert!(w.iter().any(|w| w.contains("no limit")), "{w:?}");
        assert!(ServerInfo::default().warnings()[0].contains("CONFIG not allowed"));
    }

    #[test]
    fn parses_info() {
        let i = ServerInfo::default()
            .with_info("# Stats\r\nkeyspace_hits:30\r\nkeyspace_misses:10\r\nevicted_keys:2\r\n");
        assert_eq!(i.evicted_keys, Some(2));
        assert_eq!(i.keyspace_hit_rate(), Some(0.75));
    }
}

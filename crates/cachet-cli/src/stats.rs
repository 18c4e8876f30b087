//! `cachet stats`: what a Redis server says about its memory, its eviction and
//! its hit counters, and what in its settings weakens cachet's guarantees.
//!
//! The facts come from the library (`RedisStore::server_info`: `CONFIG GET
//! maxmemory` and `maxmemory-policy`, `INFO memory stats`), and so do the
//! warnings (`ServerInfo::warnings`). On a Redis Cluster every master is asked
//! on a connection of its own, and the counters are also summed.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};
use cachet::ServerInfo;
use clap::Args;
use serde_json::json;

use crate::target::{AdminArgs, redact_url};

/// Flags of `cachet stats`.
#[derive(Debug, Args)]
#[command(
    about = "Print a Redis server's memory, eviction and hit counters, and the settings that \
             weaken cachet's guarantees",
    long_about = "Print a Redis server's memory, eviction and hit counters (maxmemory, the \
        eviction policy, used memory, evicted keys, keyspace hits and misses and their rate), \
        then one line per setting that weakens cachet's guarantees. On a Redis Cluster, every \
        master is shown, then the sums. Read-only: CONFIG GET and INFO."
)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    redis: AdminArgs,
    /// Print one JSON object per server (and, on a cluster, one for the sums)
    /// on stdout, and nothing else
    #[arg(long)]
    json: bool,
}

/// Runs `cachet stats`.
pub(crate) async fn run(args: StatsArgs) -> Result<()> {
    let target = args.redis.target()?;
    let store = target.admin_store().await?;
    let nodes = target.masters(&store.connection()).await?;
    let mut servers = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let shown = redact_url(&node.url);
        let store = target.connect(target.admin(node.builder())).await?;
        let info = store
            .server_info()
            .await
            .with_context(|| format!("cannot read the server information of {shown}"))?;
        servers.push((shown, info));
    }
    let total = target.is_cluster().then(|| sum(&servers));
    let mut out = String::new();
    for (server, info) in &servers {
        if args.json {
            out.push_str(&json_line(server, info));
        } else {
            out.push_str(&text(server, info));
        }
        out.push('\n');
    }
    if let Some(total) = &total {
        let label = format!("cluster total ({} masters)", servers.len());
        if args.json {
            out.push_str(&json_line(&label, total));
        } else {
            out.push_str(&text(&label, total));
        }
        out.push('\n');
    }
    crate::write_stdout(&out)
}

/// The counters of every server added up; settings only when all agree.
fn sum(servers: &[(String, ServerInfo)]) -> ServerInfo {
    let add = |f: fn(&ServerInfo) -> Option<u64>| {
        servers
            .iter()
            .map(|(_, i)| f(i))
            .try_fold(0_u64, |acc, v| Some(acc + v?))
    };
    let same = |f: fn(&ServerInfo) -> Option<String>| {
        let first = servers.first().and_then(|(_, i)| f(i))?;
        servers
            .iter()
            .all(|(_, i)| f(i).as_deref() == Some(first.as_str()))
            .then_some(first)
    };
    let mut total = ServerInfo::default();
    total.maxmemory = add(|i| i.maxmemory);
    total.policy = same(|i| i.policy.clone());
    total.used_memory = add(|i| i.used_memory);
    total.evicted_keys = add(|i| i.evicted_keys);
    total.keyspace_hits = add(|i| i.keyspace_hits);
    total.keyspace_misses = add(|i| i.keyspace_misses);
    total
}

fn json_line(server: &str, info: &ServerInfo) -> String {
    json!({
        "server": server,
        "maxmemory": info.maxmemory,
        "maxmemory_policy": info.policy,
        "used_memory": info.used_memory,
        "evicted_keys": info.evicted_keys,
        "keyspace_hits": info.keyspace_hits,
        "keyspace_misses": info.keyspace_misses,
        "keyspace_hit_rate": info.keyspace_hit_rate(),
        "warnings": info.warnings(),
    })
    .to_string()
}

fn text(server: &str, info: &ServerInfo) -> String {
    let count = |v: Option<u64>| v.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
    let maxmemory = match info.maxmemory {
        None => "unknown (CONFIG not allowed)".to_owned(),
        Some(0) => "0 (no limit)".to_owned(),
        Some(b) => bytes(b),
    };
    let mut out = format!("{server}\n");
    let mut line = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<17} {value}");
    };
    line("maxmemory", maxmemory);
    line(
        "maxmemory-policy",
        info.policy
            .clone()
            .unwrap_or_else(|| "unknown (CONFIG not allowed)".to_owned()),
    );
    line(
        "used memory",
        info.used_memory.map_or_else(|| "unknown".to_owned(), bytes),
    );
    line("evicted keys", count(info.evicted_keys));
    line("keyspace hits", count(info.keyspace_hits));
    line("keyspace misses", count(info.keyspace_misses));
    line(
        "hit rate",
        info.keyspace_hit_rate().map_or_else(
            || "none (no lookups yet)".to_owned(),
            |r| format!("{:.1}%", r * 100.0),
        ),
    );
    for warning in info.warnings() {
        let _ = writeln!(out, "warning: {warning}");
    }
    out.pop();
    out
}

/// Bytes, with a binary unit when large.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    // Display only.
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64;
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit} ({n} bytes)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(12), "12 bytes");
        assert_eq!(bytes(1536), "1.5 KiB (1536 bytes)");
        assert_eq!(bytes(3 << 30), "3.0 GiB (3221225472 bytes)");
    }

    #[test]
    fn cluster_sums_need_every_node() {
        let mut a = ServerInfo::default();
        a.keyspace_hits = Some(3);
        a.policy = Some("allkeys-lru".into());
        let mut b = a.clone();
        b.keyspace_hits = Some(4);
        let total = sum(&[("a".into(), a.clone()), ("b".into(), b)]);
        assert_eq!(total.keyspace_hits, Some(7));
        assert_eq!(total.policy.as_deref(), Some("allkeys-lru"));
        assert_eq!(total.keyspace_misses, None);
        let mut c = a.clone();
        c.policy = Some("noeviction".into());
        assert_eq!(sum(&[("a".into(), a), ("c".into(), c)]).policy, None);
    }

    #[test]
    fn text_has_one_line_per_warning() {
        let mut info = ServerInfo::default();
        info.maxmemory = Some(0);
        info.policy = Some("noeviction".into());
        let t = text("redis://h:1/", &info);
        assert!(
            t.starts_with("redis://h:1/\n  maxmemory         0 (no limit)\n"),
            "{t}"
        );
        assert_eq!(
            t.lines().filter(|l| l.starts_with("warning: ")).count(),
            1,
            "{t}"
        );
    }
}

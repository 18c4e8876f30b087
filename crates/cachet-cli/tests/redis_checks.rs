//! What a lab run must leave behind on a Redis it was given.

use cachet_testkit::{RedisCluster, RedisServer};

use crate::util::{Cachet, Rows};

/// Runs `cachet lab` with `args` on a throwaway Redis, checks that every row
/// ran there and that the run left it clean, and returns the rows.
pub(crate) fn lab_on_redis(args: &[&str]) -> Rows {
    let redis = RedisServer::start();
    let rows = Cachet::lab()
        .args(args)
        .args(["--redis-url", &redis.url()])
        .rows();
    assert!(
        !rows.rows.is_empty(),
        "no rows
{}",
        rows.stderr
    );
    for row in &rows.rows {
        assert_eq!(row["store"], "redis", "{row}");
    }
    assert_clean(&redis);
    rows
}

/// Every key left on `redis` expires, except the store's `:sys:` structures,
/// and no command that scans or flushes a whole database ran.
pub(crate) fn assert_clean(redis: &RedisServer) {
    assert_server_clean(|args| redis.command(args));
}

/// [`assert_clean`] on every node of a cluster.
pub(crate) fn assert_cluster_clean(cluster: &RedisCluster) {
    for node in 0..cluster.nodes().len() {
        assert_server_clean(|args| cluster.command(node, args));
    }
}

pub(crate) fn assert_server_clean(command: impl Fn(&[&str]) -> String) {
    let mut cursor = "0".to_owned();
    for _ in 0..10_000 {
        let reply = command(&["SCAN", &cursor, "COUNT", "1000"]);
        let mut lines = reply.lines();
        cursor = lines.next().unwrap_or("0").to_owned();
        for key in lines {
            if key.contains(":sys:") {
                continue;
            }
            let pttl = command(&["PTTL", key]);
            assert_ne!(pttl, "-1", "key {key} has no TTL");
        }
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(cursor, "0", "SCAN did not finish");

    let stats = command(&["INFO", "commandstats"]);
    for forbidden in ["cmdstat_keys", "cmdstat_flushdb", "cmdstat_flushall"] {
        assert!(
            !stats.contains(forbidden),
            "the lab ran {forbidden}:\n{stats}"
        );
    }
}

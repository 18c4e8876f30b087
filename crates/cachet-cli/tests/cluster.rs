//! `--redis-cluster`: the scenarios on a Redis Cluster, `bench` and `stats`
//! over its masters, and a cluster flag given a server that is not a cluster
//! node.

use cachet_testkit::{RedisCluster, RedisServer};

use crate::redis_checks::assert_cluster_clean;
use crate::util::Cachet;
use crate::{bloom, durability, groups, near_cache, write_behind};

#[test]
fn scenarios_run_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    // Any node will do: give two of the three.
    let seeds = urls[..2].join(",");
    let rows = Cachet::lab()
        .args(durability::RACE)
        .args(durability::STAMPEDE)
        .args(bloom::ARGS)
        .args(groups::ARGS)
        .args(near_cache::ARGS)
        .args(write_behind::ARGS)
        .args(["--redis-cluster", &seeds])
        .rows();
    for row in &rows.rows {
        assert_eq!(row["store"], "redis-cluster", "{row}");
        assert_eq!(row["database"], "sqlite", "{row}");
    }

    // Leases and the rows that close the remaining holes: nothing stale; and
    // naive cache-aside shows that the run could see staleness.
    for word in ["lease", "double-delete", "outbox"] {
        let row = rows.find("race", word);
        assert_eq!(row["stale_entries"], 0, "{word}: {row}");
        assert_eq!(row["errors"], 0, "{word}: {row}");
    }
    assert!(
        rows.u64("race", "naive", "stale_entries") > 0,
        "{:#?}",
        rows.rows
    );
    // One load however the callers reach the cluster.
    for word in ["single-flight", "connections", "processes"] {
        let row = rows.find("stampede", word);
        assert_eq!(row["db_queries"], 1, "{word}: {row}");
        assert_eq!(row["loads"], 1, "{word}: {row}");
        assert_eq!(row["errors"], 0, "{word}: {row}");
    }
    assert!(rows.u64("stampede", "naive", "db_queries") >= 50);
    bloom::assert_bloom(&rows);
    // The generation key is also deleted on a cluster, and nothing old returns.
    assert_eq!(rows.u64("groups", "evicted", "stale_entries"), 0);
    groups::assert_groups(&rows);
    near_cache::assert_near_cache(&rows);
    // Write-behind needs a single node: skipped, saying why.
    assert!(
        !rows.rows.iter().any(|r| r["scenario"] == "write-behind"),
        "{:#?}",
        rows.rows
    );
    let skipped = rows
        .stderr
        .lines()
        .find(|l| l.starts_with("write-behind: skipped"))
        .unwrap_or_else(|| panic!("no write-behind line in\n{}", rows.stderr));
    assert!(skipped.contains("single Redis node"), "{skipped}");

    assert_cluster_clean(&cluster);

    // `stats` asks every master and adds up.
    let lines = Cachet::command("stats")
        .args(["--redis-cluster", &urls[0]])
        .json();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let hits: u64 = lines[..3]
        .iter()
        .map(|l| l["keyspace_hits"].as_u64().unwrap())
        .sum();
    assert!(hits > 0, "{lines:#?}");
    assert_eq!(lines[3]["keyspace_hits"], hits, "{lines:#?}");
    assert!(
        lines[3]["server"].as_str().unwrap().contains("cluster"),
        "{lines:#?}"
    );
    for line in &lines[..3] {
        assert!(line["maxmemory"].is_u64(), "{line}");
        assert!(line["warnings"].is_array(), "{line}");
    }
}

#[test]
fn bench_runs_on_a_redis_cluster_and_deletes_what_it_wrote() {
    let cluster = RedisCluster::start();
    cluster.command_for_key("someone-else", &["SET", "someone-else", "1"]);
    let rows = Cachet::command("bench")
        .args(["--redis-cluster", &cluster.urls()[1]])
        .args(["--duration", "100ms", "--tasks", "2", "--keys", "300"])
        .json();
    assert_eq!(rows.len(), 5, "{rows:?}");
    for row in &rows {
        assert!(row["cachet"]["ops"].as_u64().unwrap() > 0, "{row}");
        assert!(row["baseline"]["ops"].as_u64().unwrap() > 0, "{row}");
    }
    // Both sides reached every master: the keys spread over the slots.
    for node in 0..cluster.nodes().len() {
        let calls = cluster.command(node, &["INFO", "commandstats"]);
        for command in ["get", "set", "del", "evalsha"] {
            assert!(
                calls.contains(&format!("cmdstat_{command}:")),
                "node {node}: {calls}"
            );
        }
    }
    // Only the key it did not write is left.
    let keys: u64 = cluster
        .command_all(&["DBSIZE"])
        .iter()
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert_eq!(keys, 1);
    assert_eq!(
        cluster.command_for_key("someone-else", &["GET", "someone-else"]),
        "1"
    );
    cluster.command_for_key("someone-else", &["DEL", "someone-else"]);
    assert_cluster_clean(&cluster);
}

#[test]
fn a_server_that_is_not_a_cluster_node_is_refused() {
    let redis = RedisServer::start();
    let stderr = Cachet::lab()
        .args(["--redis-cluster", &redis.url(), "--scenario", "race"])
        .failure();
    assert!(stderr.contains("not a Redis Cluster node"), "{stderr}");
    assert!(stderr.contains(&redis.url()), "{stderr}");
    let stderr = Cachet::command("stats")
        .args(["--redis-cluster", &redis.url()])
        .failure();
    assert!(stderr.contains("not a Redis Cluster node"), "{stderr}");
}

//! The avalanche, vanish, groups and penetration scenarios against a Redis and a
//! PostgreSQL of the test's own.

use cachet_testkit::{PgDatabase, RedisServer};

use crate::util::Cachet;
use crate::{avalanche, bloom, groups, vanish};

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn new_scenarios_on_redis_and_postgres() {
    let redis = RedisServer::start();
    let db = PgDatabase::create().await;
    let (redis_url, db_url) = (redis.url(), db.url().to_owned());
    let rows = tokio::task::spawn_blocking(move || {
        Cachet::lab()
            .args(avalanche::ARGS)
            .args(vanish::ARGS)
            .args(groups::ARGS)
            .args(bloom::ARGS)
            .args(["--redis-url", &redis_url, "--database-url", &db_url])
            .rows()
    })
    .await
    .unwrap();
    for row in &rows.rows {
        assert_eq!(row["store"], "redis");
        assert_eq!(row["database"], "postgres");
    }
    avalanche::assert_avalanche(&rows);
    vanish::assert_vanish(&rows);
    // On Redis the generation key is also evicted, and nothing old comes back.
    assert_eq!(rows.u64("groups", "evicted", "stale_entries"), 0);
    groups::assert_groups(&rows);
    bloom::assert_bloom(&rows);

    // Only `:sys:` keys (generations, Bloom filters) may live without a TTL.
    let mut cursor = "0".to_owned();
    for _ in 0..10_000 {
        let reply = redis.command(&["SCAN", &cursor, "COUNT", "1000"]);
        let mut lines = reply.lines();
        cursor = lines.next().unwrap_or("0").to_owned();
        for key in lines {
            if !key.contains(":sys:") {
                let pttl = redis.command(&["PTTL", key]);
                assert_ne!(pttl, "-1", "key {key} has no TTL");
            }
        }
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(cursor, "0", "SCAN did not finish");

    let stats = redis.command(&["INFO", "commandstats"]);
    for forbidden in ["cmdstat_keys", "cmdstat_flushdb", "cmdstat_flushall"] {
        assert!(
            !stats.contains(forbidden),
            "the lab ran {forbidden}:\n{stats}"
        );
    }
}

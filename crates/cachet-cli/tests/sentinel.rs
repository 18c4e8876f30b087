//! `cachet bench` and `cachet lab` on the primary of a Redis Sentinel
//! deployment (`--redis-sentinel`, `--sentinel-master`), the lab's child
//! processes included.

use cachet_testkit::RedisSentinels;

use crate::redis_checks::assert_server_clean;
use crate::util::Cachet;

/// The Sentinel flags of `sentinels`.
fn flags(sentinels: &RedisSentinels) -> [String; 4] {
    [
        "--redis-sentinel".into(),
        sentinels.sentinel_urls().join(","),
        "--sentinel-master".into(),
        RedisSentinels::MASTER.into(),
    ]
}

#[test]
fn bench_and_lab_run_on_the_primary_the_sentinels_name_and_clean_up() {
    let sentinels = RedisSentinels::start();
    let primary = sentinels.primary().expect("a primary");
    let on_primary = |args: &[&str]| sentinels.nodes()[primary].command(args);
    on_primary(&["SET", "someone-else", "1"]);

    let rows = Cachet::command("bench")
        .args(flags(&sentinels))
        .args(["--duration", "100ms", "--tasks", "2", "--keys", "300"])
        .json();
    assert_eq!(rows.len(), 5, "{rows:?}");
    let on_redis = ["near_hit", "redis_hit", "redis_miss", "invalidate"];
    for row in &rows {
        let store = if on_redis.contains(&row["row"].as_str().unwrap()) {
            "redis"
        } else {
            "memory"
        };
        assert_eq!(row["store"], store, "{row}");
        assert!(row["cachet"]["ops"].as_u64().unwrap() > 0, "{row}");
    }
    // It wrote on the primary, and deleted what it wrote.
    let calls = on_primary(&["INFO", "commandstats"]);
    assert!(calls.contains("cmdstat_set:"), "{calls}");
    assert_eq!(on_primary(&["DBSIZE"]), "1");

    let rows = Cachet::lab()
        .args(flags(&sentinels))
        .args([
            "--scenario",
            "stampede",
            "--callers",
            "40",
            "--load-ms",
            "50",
        ])
        .rows();
    let across = rows
        .rows
        .iter()
        .find(|r| {
            r["strategy"]
                .as_str()
                .unwrap_or_default()
                .contains("processes")
        })
        .unwrap_or_else(|| panic!("no row of several processes: {:#?}", rows.rows));
    // The children found the primary through the sentinels too.
    assert_eq!(across["store"], "redis-sentinel", "{across}");
    assert_eq!(across["db_queries"], 1, "{across}");
    assert_eq!(on_primary(&["GET", "someone-else"]), "1");

    // Write-behind's flusher takes one server's URL: skipped, saying why,
    // and the lab goes on.
    let rows = Cachet::lab()
        .args(flags(&sentinels))
        .args(["--scenario", "write-behind"])
        .rows();
    assert!(rows.rows.is_empty(), "{:#?}", rows.rows);
    let skipped = (rows.stderr.lines())
        .find(|l| l.starts_with("write-behind: skipped"))
        .unwrap_or_else(|| panic!("no write-behind line in\n{}", rows.stderr));
    assert!(skipped.contains("single Redis node"), "{skipped}");
    assert!(skipped.contains("sentinel"), "{skipped}");
    on_primary(&["DEL", "someone-else"]);
    assert_server_clean(on_primary);
}

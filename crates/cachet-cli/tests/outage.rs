//! `outage`: Redis unavailable mid-run, with and without the circuit breaker.

use cachet_testkit::RedisServer;

use crate::redis_checks::assert_clean;
use crate::util::{Cachet, Rows};

/// Small sizes.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "outage",
    "--outage-keys",
    "200",
    "--outage-ms",
    "2000",
    "--outage-down-ms",
    "700",
    "--outage-read-rate",
    "1000",
    "--outage-write-rate",
    "100",
];

/// The relations an outage run must show, whatever the Redis.
pub(crate) fn assert_outage(rows: &Rows) {
    const S: &str = "outage";
    let protected = rows.find(S, "protected");
    assert_eq!(rows.u64(S, "protected", "errors"), 0, "{protected}");
    assert_eq!(rows.u64(S, "protected", "stale_entries"), 0, "{protected}");
    assert!(
        rows.u64(S, "protected", "breaker_opens") >= 1,
        "{protected}"
    );
    assert!(rows.u64(S, "protected", "outage_ms") > 0, "{protected}");
    rows.u64(S, "protected", "outage_max_us");
    // Without a breaker: reported, not required.
    let naive = rows.find(S, "naive");
    println!(
        "outage, naive: errors {}, stale entries {}, failed invalidations {}, reads in outage \
         p99 {} µs; protected: p99 {} µs, breaker opened {}, skipped {}, retried {}",
        naive["errors"],
        naive["stale_entries"],
        naive["failed_invalidations"],
        naive["outage_p99_us"],
        protected["outage_p99_us"],
        protected["breaker_opens"],
        protected["short_circuits"],
        protected["retried_invalidations"],
    );
    assert!(naive["stale_entries"].is_u64(), "{naive}");
    assert!(naive["breaker_opens"].is_null(), "{naive}");
}

#[test]
fn the_breaker_keeps_reads_up_and_entries_fresh_through_a_restart() {
    // Embedded: a private redis-server with an append-only file, killed and
    // restarted mid-run.
    let rows = Cachet::lab().args(ARGS).rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["store"], "redis", "{row}");
    }
    assert_outage(&rows);
    // What the library logs about the outage the lab staged is labelled so.
    let breaker: Vec<&str> = rows
        .stderr
        .lines()
        .filter(|l| l.contains("cachet::breaker"))
        .collect();
    assert!(!breaker.is_empty(), "{}", rows.stderr);
    for line in breaker {
        assert!(
            line.starts_with("(expected, staged by the lab: Redis outage)"),
            "{line}"
        );
    }
}

#[test]
fn a_given_server_is_only_paused_and_only_when_allowed() {
    let redis = RedisServer::start();
    let rows = Cachet::lab()
        .args(ARGS)
        .args(["--redis-url", &redis.url()])
        .rows();
    assert!(rows.rows.is_empty(), "{:#?}", rows.rows);
    let skipped: Vec<&str> = rows
        .stderr
        .lines()
        .filter(|l| l.contains("skipped"))
        .collect();
    assert_eq!(skipped.len(), 1, "{}", rows.stderr);
    assert!(skipped[0].contains("--allow-disruption"), "{}", rows.stderr);
    let stats = redis.command(&["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_client|pause"), "{stats}");

    let rows = Cachet::lab()
        .args(ARGS)
        .args(["--redis-url", &redis.url(), "--allow-disruption"])
        .rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    assert_outage(&rows);
    // Paused, never killed.
    assert_eq!(redis.command(&["PING"]), "PONG");
    let stats = redis.command(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_client|pause"), "{stats}");
    assert_clean(&redis);
}

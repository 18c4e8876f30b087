//! `near-cache`: near caches in several instances, kept coherent by the
//! invalidation bus, against near caches whose notices never arrive.

use cachet_testkit::RedisServer;

use crate::redis_checks::assert_clean;
use crate::util::{Cachet, Rows};

/// Small sizes, and a bus window wide enough that a busy machine's slow
/// notices cannot pass for staleness.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "near-cache",
    "--near-keys",
    "100",
    "--near-ms",
    "800",
    "--near-read-rate",
    "2000",
    "--near-write-rate",
    "100",
    "--near-bus-window-ms",
    "250",
];

/// The relations a near-cache run must show, whatever the Redis.
pub(crate) fn assert_near_cache(rows: &Rows) {
    const S: &str = "near-cache";
    // Without notices, L1 keeps old values long after the writes.
    assert!(rows.u64(S, "naive", "stale_reads") > 0, "{:#?}", rows.rows);
    assert!(
        rows.u64(S, "naive", "stale_reads_past_window") > 0,
        "{:#?}",
        rows.rows
    );
    assert_eq!(rows.find(S, "naive")["messages_per_write"], 0.0);
    for word in ["coherent", "disconnected"] {
        let row = rows.find(S, word);
        // A notice arrives a moment after `invalidate` returns, so a read in
        // that moment may see the old value; none later.
        assert_eq!(
            rows.u64(S, word, "stale_reads_past_window"),
            0,
            "{word}: {row}"
        );
        assert!(
            rows.u64(S, word, "stale_read_max_lag_us") < 250_000,
            "{word}: {row}"
        );
        assert_eq!(rows.u64(S, word, "errors"), 0, "{word}: {row}");
        let messages = row["messages_per_write"].as_f64().unwrap();
        assert!(messages > 0.0 && messages <= 1.0, "{word}: {row}");
        assert!(
            row["near_hit_rate"].as_f64().unwrap() > 0.5,
            "{word}: {row}"
        );
        rows.u64(S, word, "p50_us");
        rows.u64(S, word, "p99_us");
    }
    // The broken subscriptions emptied L1, once on the loss and once back.
    assert!(
        rows.u64(S, "disconnected", "near_clears") >= 2,
        "{:#?}",
        rows.rows
    );
    assert_eq!(rows.u64(S, "naive", "errors"), 0);
}

#[test]
fn near_caches_stay_coherent_through_the_invalidation_bus() {
    let redis = RedisServer::start();
    let rows = Cachet::lab()
        .args(ARGS)
        .args(["--redis-url", &redis.url()])
        .rows();
    assert_eq!(rows.rows.len(), 3, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["store"], "redis", "{row}");
        println!(
            "{:<45} stale reads {} ({} past the window, last {} µs after its write)",
            row["strategy"].as_str().unwrap(),
            row["stale_reads"],
            row["stale_reads_past_window"],
            row["stale_read_max_lag_us"],
        );
    }
    assert_near_cache(&rows);
    assert_clean(&redis);
    // Only the lab's own subscriptions were disconnected.
    let stats = redis.command(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_client|kill"), "{stats}");
}

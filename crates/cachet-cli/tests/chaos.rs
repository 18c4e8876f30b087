//! `chaos`: a mixed load while Redis is killed and restarted, paused, and the
//! source of truth goes down, one fault at a time.

use cachet_testkit::RedisServer;

use crate::redis_checks::assert_clean;
use crate::util::{Cachet, Rows};

/// A short run with a fixed seed: the three faults fall within 4 s.
const ARGS: &[&str] = &["--scenario", "chaos", "--chaos-ms", "4000", "--seed", "7"];

/// Whether `redis-server` is on `PATH`: the embedded run starts one of its own.
fn redis_server_on_path() -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("redis-server").is_file())
    })
}

/// The relations a chaos run must show, whatever the Redis.
fn assert_chaos(rows: &Rows, faults: &[&str]) {
    const S: &str = "chaos";
    assert_eq!(rows.rows.len(), 3, "{:#?}", rows.rows);
    let protected = rows.find(S, "protected");
    // Reads fall back to the source while Redis is away, and find Redis while
    // the source is: no error reaches a reader.
    assert_eq!(rows.u64(S, "protected", "errors"), 0, "{protected}");
    assert_eq!(
        rows.u64(S, "protected", "stale_reads_past_window"),
        0,
        "{protected}"
    );
    // Write-behind keeps taking writes while the source is down, and its
    // queue, kept in Redis across the kill, loses none of those it acknowledged.
    let behind = rows.find(S, "write-behind");
    assert!(
        rows.u64(S, "write-behind", "acknowledged_while_source_down") > 0,
        "{behind}"
    );
    assert_eq!(
        rows.u64(S, "write-behind", "applied"),
        rows.u64(S, "write-behind", "acknowledged"),
        "{behind}"
    );
    for slug in ["naive", "protected", "write-behind"] {
        let row = rows.find(S, slug);
        // Cache-aside writes go to the source first, write-behind's to a queue
        // that is flushed before the end: none is lost.
        assert_eq!(rows.u64(S, slug, "lost_writes"), 0, "{row}");
        assert!(rows.u64(S, slug, "acknowledged") > 0, "{row}");
        assert!(rows.u64(S, slug, "requests") > 0, "{row}");
        assert_eq!(row["store"], "redis", "{row}");
        // Every fault happened: named in the label, and its time counted.
        let label = row["strategy"].as_str().unwrap_or_default();
        for fault in faults {
            assert!(label.contains(&format!(" {fault}@")), "{fault}: {row}");
        }
        assert!(rows.u64(S, slug, "outage_ms") > 0, "{row}");
        assert!(rows.u64(S, slug, "source_down_ms") > 0, "{row}");
        rows.u64(S, slug, "outage_p99_us");
        rows.u64(S, slug, "p99_us");
    }
    let naive = rows.find(S, "naive");
    println!(
        "chaos: {}\nerrors naive {} vs protected {}; stale past the window {} vs {}; read p99 in \
         faults {} vs {} µs, outside {} vs {} µs",
        protected["strategy"],
        naive["errors"],
        protected["errors"],
        naive["stale_reads_past_window"],
        protected["stale_reads_past_window"],
        naive["outage_p99_us"],
        protected["outage_p99_us"],
        naive["p99_us"],
        protected["p99_us"],
    );
}

#[test]
fn protected_reads_stay_up_and_fresh_through_kill_pause_and_source_restart() {
    if !redis_server_on_path() {
        eprintln!("skipped: the chaos scenario needs redis-server on PATH");
        return;
    }
    let rows = Cachet::lab().args(ARGS).rows();
    assert_chaos(&rows, &["kill", "pause", "db-down"]);
    // The kill broke every reader's bus subscription: each near cache emptied
    // itself when it broke and when it came back.
    assert!(
        rows.u64("chaos", "protected", "near_clears") >= 6,
        "{}",
        rows.find("chaos", "protected")
    );
    // What the library logs about the staged faults is labelled so.
    let warnings: Vec<&str> = rows.stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert!(!warnings.is_empty(), "{}", rows.stderr);
    for line in warnings {
        assert!(
            line.starts_with("(expected, staged by the lab: chaos: Redis and source faults)"),
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
        .filter(|l| l.contains("chaos: skipped"))
        .collect();
    assert_eq!(skipped.len(), 1, "{}", rows.stderr);
    assert!(skipped[0].contains("--allow-disruption"), "{}", rows.stderr);
    let stats = redis.command(&["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_client|pause"), "{stats}");

    let rows = Cachet::lab()
        .args(ARGS)
        .args(["--redis-url", &redis.url(), "--allow-disruption"])
        .rows();
    // Paused, never killed: the only Redis fault on a server the lab did not start.
    assert_chaos(&rows, &["pause", "db-down"]);
    assert!(
        !rows.find("chaos", "protected")["strategy"]
            .as_str()
            .unwrap_or_default()
            .contains("kill@")
    );
    assert_eq!(redis.command(&["PING"]), "PONG");
    let stats = redis.command(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_client|pause"), "{stats}");
    assert_clean(&redis);
}

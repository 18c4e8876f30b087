//! The torture test of the race on a real Redis and PostgreSQL: readers and
//! writers on a few hot rows with random delays between each load's read and
//! its fill, counted by operations, once with long leases and once with leases
//! shorter than the slowest loads (so they expire mid-load). After quiescence
//! the lease rows (lease-guarded, and lease + outbox with crashing writers)
//! and the delayed double-delete must hold no stale entry, while naive
//! cache-aside, in the same runs, must: proof that the harness sees staleness
//! when there is some. (The crash row without an outbox is left to the
//! embedded tests; it adds nothing here.)

use std::time::{Duration, Instant};

use cachet_testkit::{PgDatabase, RedisServer};

use crate::redis_checks::assert_clean;
use crate::util::{Cachet, Rows};

/// Operations per row. The lease-guarded and outbox rows of the two runs
/// together make 4 × this many racing operations.
const OPS: u64 = 25_000;
/// Racing operations the lease rows must add up to.
const LEASE_OPS: u64 = 100_000;
/// The whole test stays within this, even in a debug build on 2 cores busy with
/// other tests (alone it takes under a minute).
const TIME_BUDGET: Duration = Duration::from_secs(120);

const COMMON: &[&str] = &[
    "--scenario",
    "race",
    "--readers",
    "32",
    "--writers",
    "2",
    "--hot-rows",
    "32",
    "--max-delay-ms",
    "40",
    // Far past the slowest reader, so that a busy machine cannot push a stale
    // fill beyond the second delete.
    "--second-delete-ms",
    "300",
    // Writers back to back in the crash row too: the most racing writes.
    "--crash-pause-ms",
    "0",
    "--race-row",
    "naive",
    "--race-row",
    "lease",
    "--race-row",
    "outbox",
];

fn run(redis_url: &str, db_url: &str, extra: &[&str]) -> Rows {
    Cachet::lab()
        .args(COMMON)
        .args(["--race-ops", &OPS.to_string()])
        .args(["--redis-url", redis_url, "--database-url", db_url])
        .args(extra)
        .rows()
}

fn show(label: &str, rows: &Rows) {
    for r in &rows.rows {
        println!(
            "{label:<11} {:<34} ops {:>6} writes {:>5} db_queries {:>5} refused_fills {:>5} \
             crashed {:>4} stale {} errors {} ({} ms)",
            r["strategy"].as_str().unwrap_or("?"),
            r["requests"],
            r["writes"],
            r["db_queries"],
            r["refused_fills"],
            r["crashed_writes"],
            r["stale_entries"],
            r["errors"],
            r["elapsed_ms"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn race_torture_on_redis_and_postgres() {
    let redis = RedisServer::start();
    let db = PgDatabase::create().await;
    let (redis_url, db_url) = (redis.url(), db.url().to_owned());
    let started = Instant::now();
    let (long, short) = tokio::task::spawn_blocking(move || {
        // Leases of 5 s: never expire during a load.
        let long = run(&redis_url, &db_url, &["--race-row", "double-delete"]);
        // Leases of 20 ms against loads of up to 40 ms: many expire mid-load.
        let short = run(&redis_url, &db_url, &["--lease-ttl-ms", "20"]);
        (long, short)
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    show("long lease", &long);
    show("short lease", &short);
    println!("torture: {elapsed:?} in all");

    let mut lease_ops = 0;
    for (label, rows) in [("long lease", &long), ("short lease", &short)] {
        for row in &rows.rows {
            assert_eq!(row["store"], "redis");
            assert_eq!(row["database"], "postgres");
            assert_eq!(row["requests"], OPS, "{label}: {row}");
        }
        for word in ["lease", "outbox", "double-delete"] {
            if word == "double-delete" && label == "short lease" {
                continue;
            }
            let row = rows.find("race", word);
            assert_eq!(row["stale_entries"], 0, "{label}: stale entries in {row}");
            assert_eq!(row["errors"], 0, "{label}: errors in {row}");
            if word != "double-delete" {
                lease_ops += rows.u64("race", word, "requests");
            }
        }
        assert!(
            rows.u64("race", "naive", "stale_entries") > 0,
            "{label}: naive cache-aside left no stale entry, so this run could not have \
             shown any: {:#?}",
            rows.rows
        );
        assert!(rows.u64("race", "lease", "refused_fills") > 0, "{label}");
    }
    assert!(
        lease_ops >= LEASE_OPS,
        "only {lease_ops} lease-guarded operations"
    );
    // Short leases expired mid-load more often than long ones, and the fills
    // they guarded were refused rather than written.
    assert!(
        short.u64("race", "lease", "refused_fills") > long.u64("race", "lease", "refused_fills"),
        "short leases were refused no more often than long ones"
    );
    // The crashed writers' records were delivered; without the outbox the
    // crashes were visible.
    for rows in [&long, &short] {
        let outbox = rows.find("race", "outbox");
        assert!(rows.u64("race", "outbox", "crashed_writes") > 0);
        assert_eq!(outbox["outbox_delivered"], outbox["writes"], "{outbox}");
    }

    assert_clean(&redis);
    assert!(
        elapsed < TIME_BUDGET,
        "the torture took {elapsed:?}, over its budget of {TIME_BUDGET:?}"
    );
}

//! The rows that close the remaining holes of cache-aside: delayed
//! double-delete, the transactional outbox against crashed writers, the durable
//! second delete across a killed process, and single-flight across independent
//! caches.

use cachet_testkit::RedisServer;

use crate::redis_checks::assert_clean;
use crate::util::Cachet;

/// The race at test size (see `util::SMALL`), with a second delete well past the
/// slowest reader so that a busy machine cannot push a fill beyond it.
pub(crate) const RACE: &[&str] = &[
    "--scenario",
    "race",
    "--readers",
    "16",
    "--hot-rows",
    "32",
    "--race-ms",
    "400",
    "--max-delay-ms",
    "50",
    "--second-delete-ms",
    "300",
];

#[test]
fn embedded_race_rows_close_the_holes() {
    let rows = Cachet::lab().args(RACE).rows();
    let strategies: Vec<&str> = rows
        .rows
        .iter()
        .map(|r| r["slug"].as_str().unwrap())
        .collect();
    assert_eq!(strategies.len(), 5, "{strategies:?}");
    for row in &rows.rows {
        // Rows run for --race-ms, and say how many requests that was.
        assert!(row["time_box_ms"].is_u64(), "{row}");
        assert_eq!(row["store"], "memory");
        assert_eq!(row["database"], "sqlite");
        assert_eq!(row["errors"], 0, "errors in {row}");
    }
    assert!(
        rows.u64("race", "naive", "stale_entries") > 0,
        "{:#?}",
        rows.rows
    );
    assert_eq!(rows.u64("race", "lease", "stale_entries"), 0);

    let dd = rows.find("race", "double-delete");
    assert_eq!(dd["stale_entries"], 0, "{dd}");
    assert_eq!(
        dd["deferred_ran"], dd["writes"],
        "every second delete ran: {dd}"
    );

    let outbox = rows.find("race", "outbox");
    assert_eq!(outbox["stale_entries"], 0, "{outbox}");
    assert!(rows.u64("race", "outbox", "crashed_writes") > 0, "{outbox}");
    assert_eq!(
        outbox["outbox_delivered"], outbox["writes"],
        "every write's record was delivered: {outbox}"
    );

    let without = rows.find("race", "no-outbox");
    assert!(
        rows.u64("race", "no-outbox", "crashed_writes") > 0,
        "{without}"
    );
    assert!(without["stale_entries"].is_u64(), "{without}");
}

#[test]
fn race_table_has_a_summary_line_per_row_kind() {
    let output = Cachet::lab()
        .args(RACE)
        .args(["--race-ops", "2000"])
        .output();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    for line in [
        "\nrace: ",
        "\nrace, delayed double-delete: ",
        "\nrace, lease + outbox: ",
        "\nrace, writer crash without outbox: ",
    ] {
        assert!(stdout.contains(line), "no {line:?} in\n{stdout}");
    }
    assert!(stdout.contains("probabilistic"), "{stdout}");
    assert!(stdout.contains("SQLite"), "{stdout}");
}

#[test]
fn race_ops_runs_a_fixed_number_of_operations() {
    let rows = Cachet::lab()
        .args(RACE)
        .args([
            "--race-ops",
            "3000",
            "--race-row",
            "lease",
            "--race-row",
            "naive",
        ])
        .args(["--lease-ttl-ms", "10"])
        .rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["requests"], 3000, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        // A fixed count of operations, not a fixed time.
        assert!(row["time_box_ms"].is_null(), "{row}");
    }
    // Leases of 10 ms expire during loads of up to 50 ms: refused, not stale.
    assert_eq!(rows.u64("race", "lease", "stale_entries"), 0);
    assert!(rows.u64("race", "lease", "refused_fills") > 0);
}

#[test]
fn killed_writer_keeps_its_second_delete_on_redis() {
    let redis = RedisServer::start();
    let rows = Cachet::lab()
        .args(["--scenario", "double-delete", "--redis-url", &redis.url()])
        .args([
            "--double-delete-keys",
            "50",
            "--double-delete-delay-ms",
            "500",
        ])
        .rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["store"], "redis");
        assert_eq!(row["errors"], 0, "errors in {row}");
    }
    assert_eq!(rows.u64("double-delete", "naive", "stale_entries"), 50);
    assert_eq!(rows.u64("double-delete", "durable", "stale_entries"), 0);
    assert_eq!(rows.u64("double-delete", "durable", "deferred_ran"), 50);
    assert_clean(&redis);
    // The run's deferred queue drained, so even its `:sys:` keys are gone.
    assert_eq!(redis.command(&["DBSIZE"]), "0");
}

#[test]
fn double_delete_runs_on_a_private_redis_server_when_none_is_given() {
    let rows = Cachet::lab()
        .args(["--scenario", "double-delete", "--double-delete-keys", "20"])
        .args(["--double-delete-delay-ms", "300"])
        .rows();
    assert_eq!(rows.u64("double-delete", "naive", "stale_entries"), 20);
    assert_eq!(rows.u64("double-delete", "durable", "stale_entries"), 0);
    assert_eq!(rows.find("double-delete", "durable")["database"], "sqlite");
}

#[test]
fn double_delete_without_redis_is_skipped_not_failed() {
    // No redis-server on PATH, no --redis-url.
    let empty = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args(["lab", "--scenario", "double-delete"])
        .env("PATH", empty.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    let skipped: Vec<&str> = stdout.lines().filter(|l| l.contains("skipped")).collect();
    assert_eq!(skipped.len(), 1, "{stdout}");
    assert!(skipped[0].contains("redis-server"), "{stdout}");
    assert!(!stdout.contains("durable double-delete"), "{stdout}");

    // With --json: no rows on stdout, the one line on stderr.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args(["lab", "--scenario", "double-delete", "--json"])
        .env("PATH", empty.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("skipped"), "{stderr}");
}

/// The stampede at test size.
pub(crate) const STAMPEDE: &[&str] = &[
    "--scenario",
    "stampede",
    "--callers",
    "200",
    "--load-ms",
    "50",
];

#[test]
fn stampede_across_four_caches_or_processes_loads_once() {
    let redis = RedisServer::start();
    for backend in [None, Some(redis.url())] {
        let mut lab = Cachet::lab().args(STAMPEDE);
        if let Some(url) = &backend {
            lab = lab.args(["--redis-url", url]);
        }
        let rows = lab.rows();
        // Without --redis-url the processes share a private redis-server.
        assert_eq!(rows.rows.len(), 4, "{:#?}", rows.rows);
        for word in ["connections", "processes"] {
            let row = rows.find("stampede", word);
            assert_eq!(row["db_queries"], 1, "{row}");
            assert_eq!(row["loads"], 1, "{row}");
            assert_eq!(row["errors"], 0, "{row}");
            assert_eq!(row["requests"], 200, "{row}");
        }
    }
    assert_clean(&redis);
}

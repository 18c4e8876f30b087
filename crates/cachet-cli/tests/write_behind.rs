//! `write-behind`: a burst of writes, synchronous vs write-behind with its
//! flusher killed mid-stream and restarted.

use cachet_testkit::{PgDatabase, RedisServer, RedisServerOptions};

use crate::redis_checks::assert_clean;
use crate::util::{Cachet, Rows, SMALL};

/// The scenario alone, at the sizes of `util::SMALL`.
pub(crate) const ARGS: &[&str] = &["--scenario", "write-behind"];

/// What every write-behind run must show, whatever the backends.
pub(crate) fn assert_write_behind(rows: &Rows) {
    const S: &str = "write-behind";
    let behind = rows.find(S, "behind");
    for field in ["acknowledged", "applied", "lost_writes", "transactions"] {
        assert!(behind[field].is_u64(), "{field} of {behind}");
    }
    assert_eq!(rows.u64(S, "behind", "lost_writes"), 0, "{behind}");
    assert_eq!(rows.u64(S, "behind", "errors"), 0, "{behind}");
    assert_eq!(behind["applied"], behind["acknowledged"], "{behind}");
    assert_eq!(rows.u64(S, "behind", "acknowledged"), 1000, "{behind}");
    assert!(rows.u64(S, "behind", "flusher_kills") >= 1, "{behind}");

    let sync = rows.find(S, "synchronous");
    assert_eq!(rows.u64(S, "synchronous", "lost_writes"), 0, "{sync}");
    assert_eq!(rows.u64(S, "synchronous", "errors"), 0, "{sync}");
    assert_eq!(sync["applied"], sync["acknowledged"], "{sync}");
    assert_eq!(rows.u64(S, "synchronous", "transactions"), 1000, "{sync}");
    assert!(
        rows.u64(S, "behind", "transactions") < rows.u64(S, "synchronous", "transactions"),
        "write-behind batches: {behind}\nsynchronous: {sync}"
    );
}

#[test]
fn write_behind_loses_nothing_when_its_flusher_is_killed() {
    // Embedded: a private redis-server with an append-only file.
    let rows = Cachet::lab().args(SMALL).args(ARGS).rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["store"], "redis", "{row}");
        assert_eq!(row["database"], "sqlite", "{row}");
    }
    assert_write_behind(&rows);
}

#[test]
fn the_summary_reports_latency_transactions_and_lost_writes() {
    let stdout = Cachet::lab().args(SMALL).args(ARGS).stdout();
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("write-behind: "))
        .unwrap_or_else(|| panic!("no summary in\n{stdout}"));
    for words in ["p50", "transactions", "SIGKILLed", "lost_writes 0"] {
        assert!(summary.contains(words), "no {words:?} in {summary}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn write_behind_on_a_given_redis_and_postgres_cleans_up() {
    let redis = RedisServer::start_with(RedisServerOptions {
        append_only: true,
        ..RedisServerOptions::default()
    });
    let db = PgDatabase::create().await;
    let (redis_url, db_url) = (redis.url(), db.url().to_owned());
    let rows = tokio::task::spawn_blocking(move || {
        Cachet::lab()
            .args(SMALL)
            .args(ARGS)
            .args(["--redis-url", &redis_url, "--database-url", &db_url])
            .rows()
    })
    .await
    .unwrap();
    for row in &rows.rows {
        assert_eq!(row["store"], "redis", "{row}");
        assert_eq!(row["database"], "postgres", "{row}");
    }
    assert_write_behind(&rows);
    assert_clean(&redis);
    // The stream is deleted and every key the run wrote invalidated: nothing
    // is left, `:sys:` or not.
    assert_eq!(redis.command(&["DBSIZE"]), "0");
}

#[test]
fn bad_sizes_are_refused_with_the_cause() {
    let stderr = Cachet::lab()
        .args([
            "--scenario",
            "write-behind",
            "--wb-writes",
            "100",
            "--wb-batch",
            "100",
        ])
        .failure();
    assert!(stderr.contains("--wb-writes"), "{stderr}");
    let stderr = Cachet::lab()
        .args(["--scenario", "write-behind", "--wb-kills", "0"])
        .failure();
    assert!(stderr.contains("--wb-kills"), "{stderr}");
}

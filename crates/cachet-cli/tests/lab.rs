//! `cachet lab` end to end: embedded, and against real Redis and PostgreSQL.

use cachet_testkit::{PgDatabase, RedisServer};
use sqlx::Connection as _;

use crate::util::{Cachet, SMALL};

#[test]
fn embedded_run_shows_each_failure_and_its_fix() {
    let rows = Cachet::lab().args(SMALL).rows();
    rows.assert_lab_properties(2000, 50);
    for row in &rows.rows {
        // The double-delete, near-cache, outage, write-behind and chaos
        // scenarios, and the stampede's callers in several processes, need
        // Redis: they start a private redis-server (on PATH wherever the tests
        // run).
        let across_processes = row["scenario"] == "stampede"
            && row["strategy"].as_str().unwrap().contains("processes");
        let store = if across_processes
            || [
                "double-delete",
                "near-cache",
                "outage",
                "write-behind",
                "chaos",
            ]
            .contains(&row["scenario"].as_str().unwrap())
        {
            "redis"
        } else {
            "memory"
        };
        assert_eq!(row["store"], store, "{row}");
        assert_eq!(row["database"], "sqlite");
    }
    // The race's rows that close the remaining holes.
    assert_eq!(rows.u64("race", "double-delete", "stale_entries"), 0);
    assert_eq!(rows.u64("race", "outbox", "stale_entries"), 0);
    assert!(rows.find("race", "no-outbox")["crashed_writes"].is_u64());
    assert_eq!(rows.u64("double-delete", "naive", "stale_entries"), 50);
    assert_eq!(rows.u64("double-delete", "durable", "stale_entries"), 0);
    assert_eq!(rows.u64("stampede", "connections", "db_queries"), 1);
    crate::near_cache::assert_near_cache(&rows);
    crate::outage::assert_outage(&rows);
    crate::write_behind::assert_write_behind(&rows);
    crate::refresh_ahead::assert_refresh_ahead(&rows);
    crate::fail_safe::assert_fail_safe(&rows);
    crate::write_through_race::assert_write_through_race(&rows);
    // The durability note about the lab's own throwaway redis-server is
    // labelled as such.
    for line in rows.stderr.lines().filter(|l| l.contains("durability")) {
        assert!(line.starts_with("(expected, staged by the lab"), "{line}");
    }
}

#[test]
fn table_output_has_a_row_per_strategy_and_a_line_per_scenario() {
    let output = Cachet::lab()
        .args(SMALL)
        .args(["--scenario", "penetration", "--scenario", "stampede"])
        .output();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("penetration ") || l.starts_with("stampede "))
        .collect();
    let penetration = rows
        .iter()
        .filter(|l| l.starts_with("penetration "))
        .count();
    assert_eq!(penetration, 4, "{stdout}");
    assert!(rows.len() >= penetration + 2, "{stdout}");
    // Scenarios run in the order asked for.
    assert!(rows[0].starts_with("penetration"), "{stdout}");
    assert!(stdout.contains("\npenetration: "), "{stdout}");
    assert!(stdout.contains("\nstampede: "), "{stdout}");
    assert!(!stdout.contains("race"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn redis_and_postgres_run_cleans_up_after_itself() {
    let redis = RedisServer::start();
    let db = PgDatabase::create().await;
    let (redis_url, db_url) = (redis.url(), db.url().to_owned());
    let rows = tokio::task::spawn_blocking(move || {
        Cachet::lab()
            .args(SMALL)
            .args(["--redis-url", &redis_url, "--database-url", &db_url])
            .rows()
    })
    .await
    .unwrap();
    rows.assert_lab_properties(2000, 50);
    for row in &rows.rows {
        assert_eq!(row["store"], "redis");
        assert_eq!(row["database"], "postgres");
    }
    assert_eq!(rows.u64("race", "double-delete", "stale_entries"), 0);
    assert_eq!(rows.u64("race", "outbox", "stale_entries"), 0);
    assert_eq!(rows.u64("double-delete", "naive", "stale_entries"), 50);
    assert_eq!(rows.u64("double-delete", "durable", "stale_entries"), 0);
    assert_eq!(rows.u64("stampede", "connections", "db_queries"), 1);
    assert_eq!(rows.u64("stampede", "processes", "db_queries"), 1);
    crate::near_cache::assert_near_cache(&rows);
    crate::write_behind::assert_write_behind(&rows);
    crate::refresh_ahead::assert_refresh_ahead(&rows);
    crate::fail_safe::assert_fail_safe(&rows);
    crate::write_through_race::assert_write_through_race(&rows);
    // The outage scenario disrupts a server it was given only when allowed to.
    assert!(
        !rows.rows.iter().any(|r| r["scenario"] == "outage"),
        "{:#?}",
        rows.rows
    );
    assert!(rows.stderr.contains("outage: skipped"), "{}", rows.stderr);

    // Every key left behind expires.
    let mut cursor = "0".to_owned();
    for _ in 0..10_000 {
        let reply = redis.command(&["SCAN", &cursor, "COUNT", "1000"]);
        let mut lines = reply.lines();
        cursor = lines.next().unwrap_or("0").to_owned();
        for key in lines {
            let pttl = redis.command(&["PTTL", key]);
            assert_ne!(pttl, "-1", "key {key} has no TTL");
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

    // The lab's schema is gone.
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let (left,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'cachet_lab_%'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(left, 0, "the lab left its schema behind");
    conn.close().await.unwrap();
}

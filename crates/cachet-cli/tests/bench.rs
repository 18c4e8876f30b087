//! `cachet bench`: every row kind reported with its documented fields, and a
//! Redis that cannot be reached named in the error. Nothing here judges speed.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use cachet_testkit::RedisServer;
use serde_json::Value;

use crate::util::Cachet;

const ROWS: [&str; 5] = [
    "memory_hit",
    "near_hit",
    "redis_hit",
    "redis_miss",
    "invalidate",
];

fn positive(row: &Value, path: &[&str]) -> f64 {
    let mut v = row;
    for p in path {
        v = &v[p];
    }
    let n = v
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {row}"));
    assert!(n > 0.0, "{path:?} is not positive in {row}");
    n
}

#[test]
fn bench_reports_every_row_with_its_fields() {
    let rows = Cachet::command("bench")
        .args(["--duration", "200ms"])
        .json();
    // redis-server is installed wherever the tests run, so no row is skipped.
    for kind in ROWS {
        let of_kind: Vec<&Value> = rows.iter().filter(|r| r["row"] == kind).collect();
        let tasks: Vec<u64> = of_kind
            .iter()
            .map(|r| r["tasks"].as_u64().unwrap())
            .collect();
        // Hits at every --tasks count, misses and invalidations at the ends.
        let expected: &[u64] = if kind.ends_with("_hit") {
            &[1, 4, 16, 64]
        } else {
            &[1, 64]
        };
        assert_eq!(tasks, expected, "{kind}: {rows:?}");
        for row in of_kind {
            check_fields(row);
            assert_eq!(row["keys"], 10_000, "{row}");
            assert_eq!(row["value_size"], 100, "{row}");
        }
    }
    assert_eq!(rows.len(), 16, "{rows:?}");
}

/// The documented fields of a row, each present, numbers positive.
fn check_fields(row: &Value) {
    for field in ["store", "cachet_op", "baseline_op"] {
        assert!(row[field].is_string(), "{field} in {row}");
    }
    for side in ["cachet", "baseline"] {
        for field in ["ops", "ops_per_sec", "p50_ns", "p99_ns", "p999_ns"] {
            positive(row, &[side, field]);
        }
        let p50 = positive(row, &[side, "p50_ns"]);
        let p999 = positive(row, &[side, "p999_ns"]);
        assert!(p50 <= p999, "{row}");
    }
    for field in ["p50_ratio", "throughput_ratio", "value_size", "keys"] {
        positive(row, &[field]);
    }
}

#[test]
fn bench_on_a_given_redis_deletes_what_it_wrote() {
    let redis = RedisServer::start();
    redis.command(&["SET", "someone-else", "1"]);
    let rows = Cachet::command("bench")
        .args(["--redis-url", &redis.url()])
        .args(["--duration", "100ms", "--tasks", "2", "--keys", "300"])
        .json();
    assert_eq!(rows.len(), 5, "{rows:?}");
    for row in &rows {
        check_fields(row);
    }
    // Only the key it did not write is left.
    assert_eq!(redis.command(&["DBSIZE"]), "1");
    assert_eq!(redis.command(&["GET", "someone-else"]), "1");
}

#[test]
fn bench_prints_a_table_with_every_row() {
    let stdout = Cachet::command("bench")
        .args(["--duration", "40ms", "--tasks", "2", "--keys", "100"])
        .stdout();
    assert!(stdout.contains("private redis-server"), "{stdout}");
    for kind in ROWS {
        assert!(
            stdout.lines().any(|l| l.starts_with(kind)),
            "{kind}:\n{stdout}"
        );
    }
    for line in stdout.lines() {
        assert!(line.chars().count() <= 120, "{line}");
    }
}

#[test]
fn bench_on_an_unreachable_redis_fails_fast_naming_it() {
    // A port just released by the OS: nothing listens on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let shown = format!("redis://:***@127.0.0.1:{port}/");
    let url = format!("redis://:hunter2@127.0.0.1:{port}/");
    let start = Instant::now();
    let stderr = Cachet::command("bench")
        .args(["--redis-url", &url, "--duration", "200ms", "--json"])
        .failure();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(stderr.contains(&shown), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
}

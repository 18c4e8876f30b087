//! `fail-safe`: the source of truth down mid-run, with and without fail-safe.

use crate::redis_checks::lab_on_redis;
use crate::util::{Cachet, Rows};

/// Small sizes: a 200 ms TTL, the source down for 400 ms of a 1 s run, a
/// maximum staleness of 1 s.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "fail-safe",
    "--fs-keys",
    "50",
    "--fs-ttl-ms",
    "200",
    "--fs-ms",
    "1000",
    "--fs-down-ms",
    "400",
    "--fs-max-stale-ms",
    "1000",
];

/// The relations a fail-safe run must show, whatever the store.
pub(crate) fn assert_fail_safe(rows: &Rows) {
    const S: &str = "fail-safe";
    // Without fail-safe, reads of expired keys fail while the source is down.
    assert!(rows.u64(S, "naive", "errors") > 0, "{:#?}", rows.rows);
    // With it, none fails: the last value is served instead…
    assert_eq!(rows.u64(S, "fail-safe", "errors"), 0, "{:#?}", rows.rows);
    assert!(
        rows.u64(S, "fail-safe", "fail_safe_serves") > 0,
        "{:#?}",
        rows.rows
    );
    // …past its TTL, but never past the configured maximum.
    let served = rows.u64(S, "fail-safe", "max_staleness_served_ms");
    let max = rows.u64(S, "fail-safe", "max_staleness_ms");
    assert_eq!(max, 1000);
    assert!(served > 0, "no stale value served\n{:#?}", rows.rows);
    assert!(
        served <= max,
        "served {served} ms past the TTL, maximum {max}"
    );
    for slug in ["naive", "fail-safe"] {
        assert_eq!(rows.u64(S, slug, "source_down_ms"), 400);
        assert!(rows.u64(S, slug, "requests") > 0);
        assert!(rows.find(S, slug)["time_box_ms"].is_u64());
    }
}

#[test]
fn fail_safe_serves_stale_within_its_maximum_while_the_source_is_down() {
    let output = Cachet::lab().args(ARGS).args(["--json"]).output();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // The library's warnings about the failed loads are labelled as staged.
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert!(!warnings.is_empty(), "{stderr}");
    for line in &warnings {
        assert!(
            line.starts_with("(expected, staged by the lab: source of truth outage)"),
            "{line}"
        );
    }
    let rows = Cachet::lab().args(ARGS).rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    assert_fail_safe(&rows);
}

#[test]
fn fail_safe_on_redis() {
    assert_fail_safe(&lab_on_redis(ARGS));
}

//! `refresh-ahead`: hot keys under a short TTL, plain expiry against
//! refresh-ahead and XFetch.

use crate::redis_checks::lab_on_redis;
use crate::util::{Cachet, Rows};

/// Small sizes: 20 hot keys read 2000 times a second for four TTLs.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "refresh-ahead",
    "--ra-keys",
    "20",
    "--ra-ttl-ms",
    "300",
    "--ra-load-ms",
    "20",
    "--ra-ms",
    "1200",
    "--ra-rate",
    "2000",
];

/// The relations a refresh-ahead run must show, whatever the store.
pub(crate) fn assert_refresh_ahead(rows: &Rows) {
    const S: &str = "refresh-ahead";
    for slug in ["plain", "refresh-ahead", "xfetch"] {
        assert_eq!(rows.u64(S, slug, "errors"), 0, "{:#?}", rows.rows);
        assert!(rows.u64(S, slug, "requests") > 0, "{:#?}", rows.rows);
        assert!(
            rows.find(S, slug)["time_box_ms"].is_u64(),
            "{:#?}",
            rows.rows
        );
    }
    // Every hot key expires at least three times in the run, and with a plain
    // TTL each expiry is a reader's miss.
    let plain = rows.u64(S, "plain", "caller_misses");
    assert!(plain >= 20, "plain TTL: {plain} misses\n{:#?}", rows.rows);
    assert_eq!(rows.u64(S, "plain", "refreshes"), 0);
    // Refresh-ahead reloads hot keys before they expire: readers rarely miss.
    let ahead = rows.u64(S, "refresh-ahead", "caller_misses");
    assert!(
        ahead * 4 <= plain,
        "refresh-ahead: {ahead} misses vs {plain}\n{:#?}",
        rows.rows
    );
    assert!(rows.u64(S, "refresh-ahead", "refreshes") >= 20);
    // XFetch refreshes early with a probability: fewer misses, some refreshes.
    let xfetch = rows.u64(S, "xfetch", "caller_misses");
    assert!(
        xfetch < plain,
        "XFetch: {xfetch} misses vs {plain}\n{:#?}",
        rows.rows
    );
    assert!(rows.u64(S, "xfetch", "refreshes") > 0);
    // The background reloads still reach the source.
    assert!(rows.u64(S, "refresh-ahead", "loads") > 0);
}

#[test]
fn refresh_ahead_keeps_hot_keys_off_the_callers_path() {
    let rows = Cachet::lab().args(ARGS).rows();
    assert_eq!(rows.rows.len(), 3, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["store"], "memory", "{row}");
    }
    assert_refresh_ahead(&rows);
}

#[test]
fn refresh_ahead_on_redis() {
    assert_refresh_ahead(&lab_on_redis(ARGS));
}

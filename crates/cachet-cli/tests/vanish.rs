//! `vanish`: entries deleted behind the cache's back are misses, never errors.

use crate::util::{Cachet, Rows};

/// Small sizes.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "vanish",
    "--vanish-keys",
    "300",
    "--vanish-ms",
    "500",
];

/// The relations a vanish run must show, whatever the backends.
pub(crate) fn assert_vanish(rows: &Rows) {
    for word in ["baseline", "vanish"] {
        assert_eq!(
            rows.u64("vanish", word, "errors"),
            0,
            "errors with {word}: {:#?}",
            rows.rows
        );
    }
    let vanished = rows.u64("vanish", "vanish", "vanished");
    assert!(vanished >= 300, "only {vanished} entries vanished");
    let extra = rows.u64("vanish", "vanish", "loads") - rows.u64("vanish", "baseline", "loads");
    assert!(extra > 0, "no extra loads: {:#?}", rows.rows);
    assert!(rows.u64("vanish", "vanish", "db_queries") > 0);
    for field in ["p50_us", "p99_us"] {
        rows.u64("vanish", "vanish", field);
    }
}

#[test]
fn vanished_entries_are_loaded_again_without_errors() {
    let rows = Cachet::lab().args(ARGS).rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    assert_vanish(&rows);
}

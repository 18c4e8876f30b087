//! `write-through-race`: an older write's cache write landing after a newer
//! one's, with a plain `SET` and with cachet's versioned write.

use crate::redis_checks::lab_on_redis;
use crate::util::{Cachet, Rows};

/// 100 keys, each written twice.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "write-through-race",
    "--wtr-keys",
    "100",
    "--wtr-max-pause-ms",
    "20",
];

/// The relations a write-through-race run must show, whatever the store.
pub(crate) fn assert_write_through_race(rows: &Rows) {
    const S: &str = "write-through-race";
    for slug in ["naive", "versioned"] {
        assert_eq!(rows.u64(S, slug, "errors"), 0, "{:#?}", rows.rows);
        assert_eq!(rows.u64(S, slug, "writes"), 200);
    }
    // The older value reaches the cache last about half the time: a plain SET
    // leaves it there.
    let naive = rows.u64(S, "naive", "stale_entries");
    assert!(naive > 0, "naive left no stale entry\n{:#?}", rows.rows);
    // The versioned write refuses it every time.
    assert_eq!(
        rows.u64(S, "versioned", "stale_entries"),
        0,
        "{:#?}",
        rows.rows
    );
    assert!(rows.u64(S, "versioned", "older_writes_refused") > 0);
    assert!(rows.find(S, "naive")["older_writes_refused"].is_null());
}

#[test]
fn a_versioned_write_never_leaves_the_older_value() {
    let rows = Cachet::lab().args(ARGS).rows();
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["store"], "memory", "{row}");
        assert_eq!(row["database"], "sqlite", "{row}");
    }
    assert_write_through_race(&rows);
}

#[test]
fn write_through_race_on_redis() {
    assert_write_through_race(&lab_on_redis(ARGS));
}

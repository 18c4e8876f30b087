//! `penetration` with lookups of random IDs that never repeat: negative caching
//! cannot help, a Bloom filter answers all but its false positives.

use crate::util::{Cachet, Rows};

pub(crate) const LOOKUPS: u64 = 2_000;

/// Small sizes.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "penetration",
    "--lookups",
    "2000",
    "--missing-ids",
    "50",
];

/// The relations the random-ID rows must show, whatever the backends.
pub(crate) fn assert_bloom(rows: &Rows) {
    assert_eq!(
        rows.u64("penetration", "negative-random", "db_queries"),
        LOOKUPS,
        "random IDs never repeat, so each costs a query"
    );
    assert_eq!(rows.u64("penetration", "bloom", "requests"), LOOKUPS);
    let bloom = rows.u64("penetration", "bloom", "db_queries");
    assert!(
        bloom * 20 < LOOKUPS,
        "the Bloom filter let {bloom} of {LOOKUPS} lookups through"
    );
    for word in ["naive", "negative", "negative-random", "bloom"] {
        assert_eq!(rows.u64("penetration", word, "errors"), 0);
    }
}

#[test]
fn a_bloom_filter_stops_lookups_of_random_missing_ids() {
    let rows = Cachet::lab().args(ARGS).rows();
    assert_eq!(rows.rows.len(), 4, "{:#?}", rows.rows);
    // The rows that were there before keep their meaning.
    assert_eq!(rows.u64("penetration", "naive", "db_queries"), LOOKUPS);
    assert!(rows.u64("penetration", "negative", "db_queries") <= 50);
    assert_bloom(&rows);
}

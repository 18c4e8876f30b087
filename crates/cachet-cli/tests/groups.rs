//! `groups`: one tenant invalidated by generation or key by key.

use crate::util::{Cachet, Rows};

const PER_TENANT: u64 = 50;

/// Small sizes.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "groups",
    "--tenants",
    "4",
    "--keys-per-tenant",
    "50",
];

/// The relations a groups run must show, whatever the backends.
pub(crate) fn assert_groups(rows: &Rows) {
    let mut words = vec!["generation", "one-by-one"];
    // On Redis and Redis Cluster alike.
    if rows
        .rows
        .iter()
        .any(|r| r["store"].as_str().unwrap_or("").starts_with("redis"))
    {
        words.push("evicted");
    }
    for word in &words {
        assert_eq!(
            rows.u64("groups", word, "stale_entries"),
            0,
            "{word}: entries of the invalidated tenant still readable: {:#?}",
            rows.rows
        );
        assert_eq!(
            rows.u64("groups", word, "other_groups_lost"),
            0,
            "{word}: other tenants lost entries: {:#?}",
            rows.rows
        );
        assert_eq!(rows.u64("groups", word, "errors"), 0);
        rows.u64("groups", word, "invalidate_us");
    }
    assert_eq!(rows.u64("groups", "generation", "round_trips"), 1);
    assert_eq!(rows.u64("groups", "one-by-one", "round_trips"), PER_TENANT);
    let generation = rows.u64("groups", "generation", "store_commands");
    let naive = rows.u64("groups", "one-by-one", "store_commands");
    assert!(
        generation < naive && naive >= PER_TENANT,
        "store commands: generation {generation}, one by one {naive}"
    );
}

#[test]
fn a_generation_bump_drops_one_tenant_and_only_it() {
    let rows = Cachet::lab().args(ARGS).rows();
    // In process the generation cannot be evicted from outside: no such row.
    assert_eq!(rows.rows.len(), 2, "{:#?}", rows.rows);
    assert_groups(&rows);
}

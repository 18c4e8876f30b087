//! Exhaustive checks of cache-aside, leases, and leases with an outbox.

use cachet_model::{
    Action, CACHES_WHEN_QUIET, CacheModel, FRESH_WHEN_QUIET, NO_STALE_FILL, Reader, Strategy,
    Writer,
};
use stateright::{Checker, Model, Path};

/// Runs the model to completion and prints what it explored.
fn check(name: &str, model: &CacheModel) -> impl Checker<CacheModel> + use<> {
    let checker = model.clone().check();
    assert!(checker.is_done(), "{name}: the exploration did not finish");
    println!(
        "{name}: {} unique states ({} generated), depth {}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth()
    );
    checker
}

/// Fails with the counterexample's trace if `property` has one.
fn assert_holds(model: &CacheModel, checker: &impl Checker<CacheModel>, property: &'static str) {
    if let Some(path) = checker.discovery(property) {
        panic!(
            "counterexample to \"{property}\":\n{}",
            model.explain(&path)
        );
    }
}

/// Returns the counterexample to `property`, printing its trace.
fn counterexample(
    model: &CacheModel,
    checker: &impl Checker<CacheModel>,
    property: &'static str,
) -> Path<cachet_model::State, Action> {
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("no counterexample to \"{property}\" was found"));
    println!(
        "counterexample to \"{property}\":\n{}",
        model.explain(&path)
    );
    path
}

/// 1. Plain cache-aside: a reader that read before a write sets the old value
///    after the writer's `DEL`, and it stays.
#[test]
fn naive_cache_aside_leaves_a_stale_entry() {
    let model = CacheModel::new(Strategy::Naive, 1, 1);
    let checker = check("naive, 1 reader, 1 writer", &model);

    let path = counterexample(&model, &checker, FRESH_WHEN_QUIET);
    let last = path.last_state();
    assert!(
        last.entry.is_some_and(|v| v < last.db),
        "the final entry is not stale:\n{}",
        model.explain(&path)
    );
    // The same race also breaks the lease property: the `SET` lands after a `DEL`.
    counterexample(&model, &checker, NO_STALE_FILL);
}

/// 2. Leases, two readers and two writers, leases expiring at any moment: no run
///    ends stale, and no fill undoes a completed invalidation.
#[test]
fn leases_keep_the_cache_fresh() {
    let model = CacheModel::new(Strategy::Leases, 2, 2).with_lease_expiry();
    let checker = check("leases, 2 readers, 2 writers, expiry", &model);

    assert_holds(&model, &checker, FRESH_WHEN_QUIET);
    assert_holds(&model, &checker, NO_STALE_FILL);
    assert!(
        checker.discovery(CACHES_WHEN_QUIET).is_some(),
        "no run ends with a cached entry: fills never succeed"
    );
    let states = checker.unique_state_count();
    assert!(
        states > 1_000,
        "only {states} states: the model is degenerate"
    );
}

/// 3. Leases cannot help when the invalidation never happens: a writer that dies
///    after its commit leaves the entry filled before the commit in place, and only
///    the entry TTL would end it.
#[test]
fn leases_need_the_invalidation_to_run() {
    let model = CacheModel::new(Strategy::Leases, 2, 2).with_writer_crashes();
    let checker = check("leases, 2 readers, 2 writers, crashes", &model);

    let path = counterexample(&model, &checker, FRESH_WHEN_QUIET);
    assert!(
        path.last_state().writers.contains(&Writer::Crashed),
        "the stale run has no crashed writer:\n{}",
        model.explain(&path)
    );
    // Leases still do their part: no fill is older than a completed invalidation.
    assert_holds(&model, &checker, NO_STALE_FILL);
}

/// 4. With an outbox row committed alongside each write and a relay delivering it,
///    crashed writers no longer leave stale entries.
#[test]
fn an_outbox_covers_crashed_writers() {
    let model = CacheModel::new(Strategy::LeasesWithOutbox, 2, 2)
        .with_writer_crashes()
        .with_lease_expiry();
    let checker = check(
        "leases + outbox, 2 readers, 2 writers, crashes, expiry",
        &model,
    );

    assert_holds(&model, &checker, FRESH_WHEN_QUIET);
    assert_holds(&model, &checker, NO_STALE_FILL);
    assert!(checker.discovery(CACHES_WHEN_QUIET).is_some());
    let states = checker.unique_state_count();
    assert!(
        states > 8_000,
        "only {states} states: the model is degenerate"
    );
}

/// The interleaving that breaks plain cache-aside, replayed against leases: the
/// writer's invalidation revokes the reader's lease, and its fill is refused.
#[test]
fn leases_refuse_the_naive_race() {
    let race = [
        Action::Lookup(0),
        Action::ReadDb(0),
        Action::Commit(0),
        Action::Invalidate(0),
        Action::Fill(0),
    ];
    let naive = CacheModel::new(Strategy::Naive, 1, 1);
    let leases = CacheModel::new(Strategy::Leases, 1, 1);
    for (model, expected) in [(naive, Some(0)), (leases, None)] {
        let init = model.init_states().remove(0);
        let path = Path::from_actions(&model, init, &race).expect("the race is a valid run");
        let last = path.last_state();
        assert_eq!(last.readers, [Reader::Done]);
        assert_eq!(last.db, 1);
        assert_eq!(
            last.entry,
            expected,
            "{:?}:\n{}",
            model.strategy,
            model.explain(&path)
        );
    }
}

/// A reader slower than its lease: after the lease expires another reader takes a
/// new one, and the slow reader's fill with the old token is refused.
#[test]
fn an_expired_token_cannot_fill() {
    let model = CacheModel::new(Strategy::Leases, 2, 0).with_lease_expiry();
    let run = [
        Action::Lookup(0),
        Action::ReadDb(0),
        Action::ExpireLease,
        Action::Lookup(1),
        Action::Fill(0),
    ];
    let init = model.init_states().remove(0);
    let path = Path::from_actions(&model, init, &run).expect("a valid run");
    let last = path.last_state();
    assert_eq!(last.entry, None, "{}", model.explain(&path));
    let Reader::Missed { lease: Some(new) } = last.readers[1] else {
        panic!("reader 1 holds no lease:\n{}", model.explain(&path));
    };
    assert_eq!(last.lease.map(|l| (l.token, l.alive)), Some((new, true)));
}

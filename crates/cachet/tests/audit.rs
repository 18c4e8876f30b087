//! The consistency audit against a source made inconsistent on purpose: every
//! count is exact. Time is tokio's paused clock, so bounds of seconds pass at
//! once and in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachet::Cache;
use cachet::audit::{AuditOptions, AuditReport, Auditor, Nines};

const S1: Duration = Duration::from_secs(1);
const S10: Duration = Duration::from_secs(10);
const S60: Duration = Duration::from_secs(60);

/// The source of truth: a map the test changes when it wants.
#[derive(Clone, Default)]
struct Source {
    rows: Arc<Mutex<HashMap<u64, u64>>>,
    failing: Arc<Mutex<Vec<u64>>>,
}

impl Source {
    fn set(&self, key: u64, value: u64) {
        self.rows.lock().unwrap().insert(key, value);
    }

    fn fail(&self, key: u64) {
        self.failing.lock().unwrap().push(key);
    }

    /// The check function an auditor calls.
    fn check(
        &self,
    ) -> impl Fn(&u64) -> std::future::Ready<Result<Option<u64>, std::io::Error>> + Send + Sync + 'static
    {
        let source = self.clone();
        move |key: &u64| {
            if source.failing.lock().unwrap().contains(key) {
                return std::future::ready(Err(std::io::Error::other("source down")));
            }
            std::future::ready(Ok(source.rows.lock().unwrap().get(key).copied()))
        }
    }
}

/// A cache and a source holding `value(k) = k` for keys `1..=n`, in agreement.
async fn fixture(n: u64) -> (Cache<u64, u64>, Source) {
    let cache: Cache<u64, u64> = Cache::builder("audited")
        .ttl(Duration::from_secs(3600))
        .jitter(0.0)
        .build()
        .unwrap();
    let source = Source::default();
    for k in 1..=n {
        source.set(k, k);
        cache.set(&k, k).await.unwrap();
    }
    (cache, source)
}

/// Every read sampled, no budget limit, the default bounds.
fn all_reads() -> AuditOptions {
    AuditOptions::new()
        .sample_rate(1.0)
        .bounds([S1, S10, S60])
        .budget(f64::INFINITY)
        .capacity(100_000)
}

/// `(checked, inconsistent)` at each bound.
fn per_bound(report: &AuditReport) -> Vec<(u64, u64)> {
    report
        .bounds
        .iter()
        .map(|b| (b.checked, b.inconsistent))
        .collect()
}

async fn read_all(auditor: &Auditor<u64, u64>, keys: impl IntoIterator<Item = u64>) {
    for k in keys {
        assert_eq!(auditor.get(&k).await.unwrap(), Some(k));
    }
}

#[tokio::test(start_paused = true)]
async fn seven_keys_the_source_disagrees_with_are_seven_inconsistent_at_every_bound() {
    let (cache, source) = fixture(1000).await;
    let wrong = [3, 97, 250, 251, 500, 777, 1000];
    for k in wrong {
        source.set(k, k + 1_000_000);
    }
    let auditor = Auditor::spawn(&cache, all_reads(), source.check()).unwrap();
    read_all(&auditor, 1..=1000).await;
    let report = auditor.finish().await;
    assert_eq!(per_bound(&report), vec![(1000, 7); 3], "{report:?}");
    assert_eq!(
        (
            report.observed,
            report.sampled,
            report.dropped,
            report.skipped
        ),
        (1000, 1000, 0, 0)
    );
    assert_eq!((report.errors, report.pending), (0, 0));
    // One look for each agreeing read; two (the look and its confirmation) at
    // each of the three bounds for each disagreeing one.
    assert_eq!(report.source_reads, 993 + 7 * 2 * 3);
    let at_1s = report.at(S1).unwrap();
    assert_eq!(at_1s.consistent(), 993);
    match at_1s.nines() {
        Nines::Measured(n) => assert!((n - -(7.0_f64 / 1000.0).log10()).abs() < 1e-12),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_that_heals_after_two_seconds_is_inconsistent_within_1s_but_not_10s() {
    let (cache, source) = fixture(10).await;
    // Key 1: the source disagrees until it is written back at 2 s.
    source.set(1, 100);
    // Key 2: the cache holds an old value until an invalidation at 5 s.
    source.set(2, 200);
    // Key 3: disagrees for longer than every bound.
    source.set(3, 300);
    let auditor = Auditor::spawn(&cache, all_reads(), source.check()).unwrap();
    read_all(&auditor, 1..=10).await;
    let (healer, invalidator) = (source.clone(), cache.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        healer.set(1, 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        invalidator.invalidate(&2).await.unwrap();
    });
    let report = auditor.finish().await;
    assert_eq!(
        per_bound(&report),
        vec![(10, 3), (10, 1), (10, 1)],
        "{report:?}"
    );
    assert_eq!(report.at(S10).unwrap().nines(), Nines::Measured(1.0));
}

#[tokio::test(start_paused = true)]
async fn a_write_whose_invalidation_lands_within_the_confirm_delay_is_not_counted() {
    let (cache, source) = fixture(2).await;
    let options = all_reads().confirm(Duration::from_millis(100));
    let auditor = Auditor::spawn(&cache, options, source.check()).unwrap();
    read_all(&auditor, 1..=2).await;
    let (writer, invalidator) = (source.clone(), cache.clone());
    tokio::spawn(async move {
        // Both keys are written just before the 1 s check; key 1's
        // invalidation lands before the second look (at 1.1 s), key 2's after.
        tokio::time::sleep(Duration::from_millis(990)).await;
        writer.set(1, 11);
        writer.set(2, 22);
        tokio::time::sleep(Duration::from_millis(60)).await;
        invalidator.invalidate(&1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        invalidator.invalidate(&2).await.unwrap();
    });
    let report = auditor.finish().await;
    assert_eq!(
        per_bound(&report),
        vec![(2, 1), (2, 0), (2, 0)],
        "{report:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn reads_over_the_budget_are_skipped_never_counted_consistent() {
    let (cache, source) = fixture(100).await;
    // A bucket of 10 reads a second (10 of burst), full when the checks at
    // 1 s run together: 10 checks run, 90 find no budget.
    let options = all_reads().budget(10.0);
    let auditor = Auditor::spawn(&cache, options, source.check()).unwrap();
    read_all(&auditor, 1..=100).await;
    let report = auditor.finish().await;
    assert_eq!(per_bound(&report), vec![(10, 0); 3], "{report:?}");
    assert_eq!((report.skipped, report.source_reads), (90, 10));
    assert_eq!(
        report.at(S60).unwrap().nines(),
        Nines::NoneSeen { checked: 10 }
    );
}

#[tokio::test(start_paused = true)]
async fn a_confirmation_over_the_budget_is_skipped_too() {
    let (cache, source) = fixture(100).await;
    for k in 1..=100 {
        source.set(k, k + 1000);
    }
    let options = all_reads().budget(10.0).confirm(Duration::from_millis(100));
    let auditor = Auditor::spawn(&cache, options, source.check()).unwrap();
    read_all(&auditor, 1..=100).await;
    let report = auditor.finish().await;
    // At 1 s: 10 first looks disagree and 90 reads are skipped; at 1.1 s the
    // bucket has refilled by one read: one confirmation runs, 9 are skipped.
    // The one read left has the budget for both looks at 10 s and 60 s.
    assert_eq!(per_bound(&report), vec![(1, 1); 3], "{report:?}");
    assert_eq!(report.skipped, 99);
    assert_eq!(report.source_reads, 10 + 1 + 2 + 2);
}

#[tokio::test(start_paused = true)]
async fn reads_past_the_capacity_are_dropped_and_counted() {
    let (cache, source) = fixture(20).await;
    let auditor = Auditor::spawn(&cache, all_reads().capacity(5), source.check()).unwrap();
    read_all(&auditor, 1..=20).await;
    assert_eq!(auditor.report().pending, 5);
    let report = auditor.finish().await;
    assert_eq!((report.sampled, report.dropped), (20, 15));
    assert_eq!(per_bound(&report), vec![(5, 0); 3]);
    // Reads offered after `finish` are not audited.
    read_all(&auditor, 1..=3).await;
    let after = auditor.report();
    assert_eq!((after.observed, after.sampled, after.pending), (23, 20, 0));
}

#[tokio::test(start_paused = true)]
async fn failed_checks_leave_the_audit_as_errors() {
    let (cache, source) = fixture(10).await;
    source.set(4, 40);
    for k in [1, 2, 3] {
        source.fail(k);
    }
    let auditor = Auditor::spawn(&cache, all_reads(), source.check()).unwrap();
    read_all(&auditor, 1..=10).await;
    let report = auditor.finish().await;
    assert_eq!(report.errors, 3);
    assert_eq!(per_bound(&report), vec![(7, 1); 3], "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn observe_audits_values_the_caller_got_from_the_cache() {
    let (cache, source) = fixture(3).await;
    source.set(2, 20);
    let auditor = Auditor::spawn(&cache, all_reads(), source.check()).unwrap();
    for k in 1..=3 {
        let v = cache
            .get_or_load(&k, || async { Ok::<_, std::io::Error>(None) })
            .await
            .unwrap()
            .unwrap();
        auditor.observe(&k, &v);
    }
    let report = auditor.finish().await;
    assert_eq!(per_bound(&report), vec![(3, 1); 3]);
}

#[tokio::test(start_paused = true)]
async fn the_sample_rate_picks_that_share_of_reads() {
    let (cache, source) = fixture(1000).await;
    let none = Auditor::spawn(&cache, all_reads().sample_rate(0.0), source.check()).unwrap();
    read_all(&none, 1..=1000).await;
    let report = none.finish().await;
    assert_eq!((report.observed, report.sampled), (1000, 0));
    assert_eq!(per_bound(&report), vec![(0, 0); 3]);
    assert_eq!(report.at(S1).unwrap().nines(), Nines::NoData);

    let tenth = Auditor::spawn(&cache, all_reads().sample_rate(0.1), source.check()).unwrap();
    read_all(&tenth, 1..=1000).await;
    let report = tenth.finish().await;
    // Binomial(1000, 0.1): mean 100, standard deviation 9.5; the range is
    // more than 5 deviations wide on each side.
    assert!((50..=150).contains(&report.sampled), "{report:?}");
    assert_eq!(report.at(S1).unwrap().checked, report.sampled);
}

#[tokio::test(start_paused = true)]
async fn out_of_range_options_are_refused() {
    let (cache, source) = fixture(1).await;
    let refused = |options: AuditOptions| {
        let e = Auditor::spawn(&cache, options, source.check()).unwrap_err();
        assert_eq!(e.kind(), cachet::ErrorKind::Config, "{e}");
        e.to_string()
    };
    assert!(refused(all_reads().sample_rate(1.5)).contains("sample rate"));
    assert!(refused(all_reads().bounds([])).contains("bound"));
    assert!(refused(all_reads().budget(0.0)).contains("budget"));
    assert!(refused(all_reads().capacity(0)).contains("capacity"));
    let e = refused(
        all_reads()
            .bounds([S1, Duration::from_millis(1050)])
            .confirm(Duration::from_millis(100)),
    );
    assert!(e.contains("confirm"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn the_figures_reach_the_metrics_facade() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let (cache, source) = fixture(1000).await;
    for k in [10, 20, 30, 40, 50, 60, 70] {
        source.set(k, 0);
    }
    let auditor = metrics::with_local_recorder(&recorder, || {
        Auditor::spawn(&cache, all_reads(), source.check()).unwrap()
    });
    read_all(&auditor, 1..=1000).await;
    auditor.finish().await;
    let mut counters = HashMap::new();
    let mut gauges = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let mut labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
        match value {
            DebugValue::Counter(n) => {
                counters.insert(name, n);
            }
            DebugValue::Gauge(g) => {
                gauges.insert(name, g.into_inner());
            }
            DebugValue::Histogram(_) => {}
        }
    }
    let c = |name: &str| {
        counters
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("{name} in {counters:?}"))
    };
    assert_eq!(c("cachet_audit_samples_total{cache=audited}"), 1000);
    assert_eq!(c("cachet_audit_reads_total{cache=audited}"), 1000);
    for bound in ["1s", "10s", "60s"] {
        assert_eq!(
            c(&format!(
                "cachet_audit_checked_total{{bound={bound},cache=audited}}"
            )),
            1000
        );
        assert_eq!(
            c(&format!(
                "cachet_audit_inconsistent_total{{bound={bound},cache=audited}}"
            )),
            7
        );
        let nines = gauges[&format!("cachet_audit_nines{{bound={bound},cache=audited}}")];
        assert!((nines - -(0.007_f64).log10()).abs() < 1e-9, "{nines}");
    }
    assert_eq!(gauges["cachet_audit_pending{cache=audited}"], 0.0);
}

#[test]
fn nines_read_as_measured_or_as_none_seen() {
    assert_eq!(Nines::Measured(2.5).to_string(), "2.50");
    let none = Nines::NoneSeen { checked: 1_000_000 };
    assert_eq!(none.at_least(), Some(6.0));
    assert_eq!(none.to_string(), "≥ 6.0 (none inconsistent of 1000000)");
    assert_eq!(Nines::NoData.at_least(), None);
    assert_eq!(
        cachet::audit::bound_label(Duration::from_millis(250)),
        "250ms"
    );
    assert_eq!(cachet::audit::bound_label(S60), "60s");
}

#[tokio::test(start_paused = true)]
async fn reads_of_one_key_due_together_share_their_looks() {
    let (cache, source) = fixture(2).await;
    source.set(2, 20);
    let auditor = Auditor::spawn(&cache, all_reads(), source.check()).unwrap();
    for _ in 0..500 {
        read_all(&auditor, 1..=2).await;
    }
    let report = auditor.finish().await;
    // Each read is judged, and counted, on its own.
    assert_eq!(per_bound(&report), vec![(1000, 500); 3], "{report:?}");
    // Key 1: one look at 1 s. Key 2: a look and its confirmation at each bound.
    assert_eq!(report.source_reads, 1 + 2 * 3);
}

#[tokio::test(start_paused = true)]
async fn a_cache_that_moved_on_between_the_two_looks_is_not_counted() {
    let (cache, source) = fixture(1).await;
    source.set(1, 2);
    let auditor = Auditor::spawn(&cache, all_reads(), source.check()).unwrap();
    read_all(&auditor, 1..=1).await;
    let (writer, filler) = (source.clone(), cache.clone());
    tokio::spawn(async move {
        // Between the looks at 1 s and 1.1 s, another write lands and the
        // cache is filled with what the source held before it: the cache
        // still disagrees, but with a value of its own, not the one seen.
        tokio::time::sleep(Duration::from_millis(1050)).await;
        writer.set(1, 3);
        filler.set(&1, 2).await.unwrap();
    });
    let report = auditor.finish().await;
    assert_eq!(per_bound(&report), vec![(1, 0); 3], "{report:?}");
}

#[test]
fn none_seen_never_rounds_up_to_a_nine_it_did_not_show() {
    let none = Nines::NoneSeen { checked: 999_999 };
    assert_eq!(none.to_string(), "≥ 5.9 (none inconsistent of 999999)");
}

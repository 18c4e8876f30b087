//! The lab's results: one [`Row`] per scenario and strategy, the latency
//! histogram rows are built from, and the two renderings, JSON lines and an
//! aligned table.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The outcome of one strategy in one scenario.
///
/// Fields that do not apply to a scenario are `None` and render as JSON `null`,
/// so every row has the same shape for scripts.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: &'static str,
    /// The strategy's stable name within its scenario (`naive`, `lease`…):
    /// what summaries, tests and `--json` consumers find a row by.
    pub(crate) slug: &'static str,
    /// The strategy as the table shows it; free to change.
    pub(crate) strategy: &'static str,
    pub(crate) store: &'static str,
    pub(crate) database: &'static str,
    /// Operations the workload issued: reads and writes.
    pub(crate) requests: u64,
    /// How long the workload ran when it runs for a fixed time rather than a
    /// fixed count (`requests` then depends on the machine: the notes state
    /// both, so two runs can be compared).
    pub(crate) time_box_ms: Option<u64>,
    /// Of which writes (UPDATE, then invalidate when there is a cache).
    pub(crate) writes: u64,
    /// Read queries sent to the source of truth.
    pub(crate) db_queries: u64,
    /// Loader runs the cache counted (`None` for rows not using `get_or_load`).
    pub(crate) loads: Option<u64>,
    /// Hot rows whose cached value differs from the database after quiescing.
    pub(crate) stale_entries: Option<u64>,
    /// Operations that returned an error.
    pub(crate) errors: u64,
    pub(crate) p50_us: Option<u64>,
    pub(crate) p99_us: Option<u64>,
    /// Fraction of cache lookups answered by the cache, 0 to 1.
    pub(crate) hit_rate: Option<f64>,
    /// Read queries this row spared the database compared with sending every
    /// read to it.
    pub(crate) db_queries_saved: Option<u64>,
    /// Fills the cache refused because an invalidation revoked the lease.
    pub(crate) refused_fills: Option<u64>,
    /// Writes that committed but whose writer died before invalidating.
    pub(crate) crashed_writes: Option<u64>,
    /// Deferred second deletes (delayed double-delete) that ran.
    pub(crate) deferred_ran: Option<u64>,
    /// Invalidations an outbox relay delivered.
    pub(crate) outbox_delivered: Option<u64>,
    /// The most read queries sent to the source of truth in any 100 ms of the
    /// run (a sliding window).
    pub(crate) peak_db_queries_per_100ms: Option<u64>,
    /// Read queries sent to the source of truth in each 100 ms of the run.
    pub(crate) db_queries_per_100ms: Option<Vec<u64>>,
    /// How long the row's invalidation took, in microseconds.
    pub(crate) invalidate_us: Option<u64>,
    /// Commands the store executed while that invalidation ran: on Redis the
    /// change in `INFO commandstats` (commands inside scripts and any other
    /// client's included), in process the calls made to the store.
    pub(crate) store_commands: Option<u64>,
    /// Round trips to the store that invalidation took.
    pub(crate) round_trips: Option<u64>,
    /// Entries of other groups that were no longer readable afterwards.
    pub(crate) other_groups_lost: Option<u64>,
    /// Entries deleted behind the cache's back (evicted, flushed, deleted by hand).
    pub(crate) vanished: Option<u64>,
    /// Reads that returned a value older than the last write completed
    /// before the read started (near cache).
    pub(crate) stale_reads: Option<u64>,
    /// Of which those that started later after the write than the invalidation
    /// bus needs to deliver its notice (`--near-bus-window-ms`).
    pub(crate) stale_reads_past_window: Option<u64>,
    /// The longest a read started after a write completed and still returned
    /// an older value, in microseconds (0 without stale reads).
    pub(crate) stale_read_max_lag_us: Option<u64>,
    /// Fraction of reads answered by a near cache (L1), 0 to 1.
    pub(crate) near_hit_rate: Option<f64>,
    /// Times near caches were emptied because their bus subscription broke or
    /// came back.
    pub(crate) near_clears: Option<u64>,
    /// Invalidation-bus messages (`PUBLISH`es Redis executed, any client's
    /// included) per write.
    pub(crate) messages_per_write: Option<f64>,
    /// How long the store was unavailable (killed or paused), in milliseconds.
    pub(crate) outage_ms: Option<u64>,
    /// Latency of the reads that started while the store was unavailable.
    pub(crate) outage_p50_us: Option<u64>,
    pub(crate) outage_p99_us: Option<u64>,
    pub(crate) outage_max_us: Option<u64>,
    /// Invalidations that failed (reported to the writer).
    pub(crate) failed_invalidations: Option<u64>,
    /// Times the circuit breaker opened.
    pub(crate) breaker_opens: Option<u64>,
    /// Store operations the open breaker skipped.
    pub(crate) short_circuits: Option<u64>,
    /// Failed invalidations the breaker kept and later delivered.
    pub(crate) retried_invalidations: Option<u64>,
    /// Writes acknowledged to the writers.
    pub(crate) acknowledged: Option<u64>,
    /// Of which those whose effect is in the source of truth at the end: their
    /// key's row holds their version and value, or a newer version.
    pub(crate) applied: Option<u64>,
    /// Acknowledged writes not in the source of truth at the end.
    pub(crate) lost_writes: Option<u64>,
    /// Of the acknowledged writes, those made while the source of truth was
    /// down (write-behind queues them).
    pub(crate) acknowledged_while_source_down: Option<u64>,
    /// Write transactions begun on the source of truth.
    pub(crate) transactions: Option<u64>,
    /// Times a write-behind flusher was killed (SIGKILL) and another started.
    pub(crate) flusher_kills: Option<u64>,
    /// Writes a killed flusher held that the last one claimed.
    pub(crate) reclaimed: Option<u64>,
    /// Lookups that missed and made their caller wait for a load (background
    /// refreshes not counted).
    pub(crate) caller_misses: Option<u64>,
    /// Background refreshes the cache started (refresh-ahead, XFetch,
    /// stale-while-revalidate).
    pub(crate) refreshes: Option<u64>,
    /// How long the source of truth was down (failing every query), in
    /// milliseconds.
    pub(crate) source_down_ms: Option<u64>,
    /// Values served although past their fresh life because their loads
    /// failed (fail-safe).
    pub(crate) fail_safe_serves: Option<u64>,
    /// The most a value served was past its fresh life, in milliseconds.
    pub(crate) max_staleness_served_ms: Option<u64>,
    /// The configured bound on that (fail-safe's maximum staleness), in
    /// milliseconds.
    pub(crate) max_staleness_ms: Option<u64>,
    /// Writes whose value the cache refused because it held a newer version.
    pub(crate) older_writes_refused: Option<u64>,
    /// The consistency audit's figures (`cachet::audit`).
    pub(crate) audit: Option<AuditFigures>,
    pub(crate) elapsed_ms: u64,
    pub(crate) seed: u64,
}

impl Row {
    /// A row with the identity fields set and every measurement empty.
    pub(crate) fn new(
        scenario: &'static str,
        slug: &'static str,
        strategy: &'static str,
        ctx: RowContext,
    ) -> Self {
        Self {
            scenario,
            slug,
            strategy,
            store: ctx.store,
            database: ctx.database,
            requests: 0,
            time_box_ms: None,
            writes: 0,
            db_queries: 0,
            loads: None,
            stale_entries: None,
            errors: 0,
            p50_us: None,
            p99_us: None,
            hit_rate: None,
            db_queries_saved: None,
            refused_fills: None,
            crashed_writes: None,
            deferred_ran: None,
            outbox_delivered: None,
            peak_db_queries_per_100ms: None,
            db_queries_per_100ms: None,
            invalidate_us: None,
            store_commands: None,
            round_trips: None,
            other_groups_lost: None,
            vanished: None,
            stale_reads: None,
            stale_reads_past_window: None,
            stale_read_max_lag_us: None,
            near_hit_rate: None,
            near_clears: None,
            messages_per_write: None,
            outage_ms: None,
            outage_p50_us: None,
            outage_p99_us: None,
            outage_max_us: None,
            failed_invalidations: None,
            breaker_opens: None,
            short_circuits: None,
            retried_invalidations: None,
            acknowledged: None,
            applied: None,
            lost_writes: None,
            acknowledged_while_source_down: None,
            transactions: None,
            flusher_kills: None,
            reclaimed: None,
            caller_misses: None,
            refreshes: None,
            source_down_ms: None,
            fail_safe_serves: None,
            max_staleness_served_ms: None,
            max_staleness_ms: None,
            older_writes_refused: None,
            audit: None,
            elapsed_ms: 0,
            seed: ctx.seed,
        }
    }

    /// Fills the latency columns.
    pub(crate) fn with_latency(mut self, latency: &Latency) -> Self {
        self.p50_us = latency.quantile_us(0.50);
        self.p99_us = latency.quantile_us(0.99);
        self
    }

    /// Marks the row's workload as running for `duration`, whatever the
    /// number of requests it made.
    pub(crate) fn time_boxed(mut self, duration: Duration) -> Self {
        self.time_box_ms = Some(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        self
    }

    pub(crate) fn elapsed(mut self, elapsed: Duration) -> Self {
        self.elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

/// What a consistency audit found (see `cachet::audit`).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AuditFigures {
    /// Reads served by the cache that were audited.
    pub(crate) sampled: u64,
    /// Of which not audited: too many in the audit at once.
    pub(crate) dropped: u64,
    /// Of which left without a verdict: no source-read budget for a check.
    pub(crate) skipped: u64,
    /// Of which left without a verdict: a check's read failed.
    pub(crate) errors: u64,
    /// Source reads the checks made.
    pub(crate) source_reads: u64,
    /// The figures at each bound, in increasing order.
    pub(crate) bounds: Vec<AuditBound>,
}

/// The audit's figures at one bound.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AuditBound {
    pub(crate) bound_ms: u64,
    /// Reads with a verdict within the bound.
    pub(crate) checked: u64,
    /// Reads whose cache entry still disagreed with the source the bound after.
    pub(crate) inconsistent: u64,
    /// `-log10(inconsistent / checked)`; `null` when none was inconsistent
    /// (nothing was measured then).
    pub(crate) nines: Option<f64>,
    /// `nines`, or with none inconsistent `log10(checked)`: the most nines
    /// the reads checked can show.
    pub(crate) nines_at_least: Option<f64>,
}

impl AuditBound {
    /// "5.12 nines (7 of 1000000)", "≥ 6.0 nines (0 of 1000000)".
    pub(crate) fn describe(&self) -> String {
        match (self.nines, self.nines_at_least) {
            (Some(n), _) => format!("{n:.2} nines ({} of {})", self.inconsistent, self.checked),
            // Rounded down: 0 of 999 999 does not show 6 nines.
            (None, Some(n)) => format!(
                "≥ {:.1} nines (0 of {})",
                (n * 10.0).floor() / 10.0,
                self.checked
            ),
            (None, None) => "no reads checked".to_owned(),
        }
    }
}

/// What every row of one run shares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowContext {
    pub(crate) store: &'static str,
    pub(crate) database: &'static str,
    pub(crate) seed: u64,
}

/// Finds a scenario's row by its strategy's slug.
pub(crate) fn find<'a>(rows: &'a [Row], scenario: &str, slug: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.slug == slug)
}

/// A latency histogram in microseconds.
#[derive(Clone, Debug)]
pub(crate) struct Latency {
    hist: Histogram<u64>,
}

impl Latency {
    /// One hour is far past any bounded lab operation; larger values saturate.
    const MAX_US: u64 = 3_600_000_000;

    pub(crate) fn new() -> Self {
        Self {
            // Bounds and precision are constants known to be valid.
            hist: Histogram::new_with_bounds(1, Self::MAX_US, 3).expect("valid histogram bounds"),
        }
    }

    pub(crate) fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, Self::MAX_US);
        self.hist.saturating_record(us);
    }

    pub(crate) fn merge(&mut self, other: &Self) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    pub(crate) fn quantile_us(&self, q: f64) -> Option<u64> {
        (!self.hist.is_empty()).then(|| self.hist.value_at_quantile(q))
    }

    pub(crate) fn max_us(&self) -> Option<u64> {
        (!self.hist.is_empty()).then(|| self.hist.max())
    }
}

/// One JSON object, on one line.
pub(crate) fn json_line(row: &Row) -> String {
    // A struct of numbers and strings always serializes.
    serde_json::to_string(row).expect("rows serialize")
}

/// The widest the table gets, in columns.
pub(crate) const TABLE_WIDTH: u16 = 120;

/// The table, rows in the order given, at most
/// [`TABLE_WIDTH`] columns wide (long strategy names wrap); each row with
/// measurements of its own gets a note number, and the notes follow the table.
pub(crate) fn table(rows: &[Row]) -> String {
    use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
    const HEADERS: [&str; 12] = [
        "scenario", "strategy", "requests", "queries", "loads", "stale", "errors", "p50", "p99",
        "hit", "saved", "note",
    ];
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(TABLE_WIDTH)
        .set_header(HEADERS);
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if i >= 2 {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut notes = Vec::new();
    for r in rows {
        let detail = detail(r);
        let note = if detail.is_empty() {
            String::new()
        } else {
            notes.push((r, detail));
            format!("[{}]", notes.len())
        };
        t.add_row([
            r.scenario.to_owned(),
            r.strategy.to_owned(),
            r.requests.to_string(),
            r.db_queries.to_string(),
            opt(r.loads),
            opt(r.stale_entries),
            r.errors.to_string(),
            r.p50_us.map_or_else(|| "-".to_owned(), format_us),
            r.p99_us.map_or_else(|| "-".to_owned(), format_us),
            r.hit_rate
                .map_or_else(|| "-".to_owned(), |h| format!("{:.1}%", h * 100.0)),
            opt(r.db_queries_saved),
            note,
        ]);
    }
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if !notes.is_empty() {
        out.push('\n');
    }
    for (i, (r, detail)) in notes.iter().enumerate() {
        let text = format!("[{}] {} {}: {detail}", i + 1, r.scenario, r.strategy);
        out.push_str(&wrap(&text, usize::from(TABLE_WIDTH), 4));
    }
    out
}

/// `text` wrapped at word boundaries to `width` columns, continuation lines
/// indented by `indent` spaces.
fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let len = line.chars().count();
        if len > indent && len + 1 + word.chars().count() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = " ".repeat(indent);
        } else if !line.is_empty() && !line.ends_with(' ') {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `n` and a noun, plural unless `n` is 1.
pub(crate) fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// How many times, in words: "once", "twice", "3 times".
pub(crate) fn times(n: u64) -> String {
    match n {
        1 => "once".to_owned(),
        2 => "twice".to_owned(),
        n => format!("{n} times"),
    }
}

/// The measurements only some scenarios have, as short text.
fn detail(r: &Row) -> String {
    let mut parts = Vec::new();
    if let Some(ms) = r.time_box_ms {
        parts.push(format!(
            "{} in {} (time-boxed)",
            count(r.requests, "request"),
            format_ms(ms)
        ));
    }
    if let Some(audit) = &r.audit {
        let within: Vec<String> = audit
            .bounds
            .iter()
            .map(|b| {
                let bound = cachet::audit::bound_label(Duration::from_millis(b.bound_ms));
                format!("within {bound} {}", b.describe())
            })
            .collect();
        parts.push(within.join(", "));
        if audit.skipped + audit.dropped + audit.errors > 0 {
            parts.push(format!(
                "audit skipped {}, dropped {}, failed {}",
                audit.skipped, audit.dropped, audit.errors
            ));
        }
    }
    if let Some(peak) = r.peak_db_queries_per_100ms {
        parts.push(format!("peak {peak} queries/100ms"));
    }
    if let Some(us) = r.invalidate_us {
        let mut s = format!("invalidation {}", format_us(us));
        if let Some(c) = r.store_commands {
            let _ = write!(s, ", {}", count(c, "command"));
        }
        if let Some(rt) = r.round_trips {
            let _ = write!(s, ", {}", count(rt, "round trip"));
        }
        parts.push(s);
    }
    if let Some(lost) = r.other_groups_lost {
        parts.push(format!("other groups lost {lost}"));
    }
    if let Some(crashed) = r.crashed_writes {
        parts.push(format!("crashed writes {crashed}"));
    }
    if let Some(delivered) = r.outbox_delivered {
        parts.push(format!("outbox delivered {delivered}"));
    }
    if let Some(ran) = r.deferred_ran {
        parts.push(format!("second deletes run {ran}"));
    }
    if let Some(stale) = r.stale_reads {
        let mut s = format!("stale reads {stale}");
        if let (true, Some(lag)) = (stale > 0, r.stale_read_max_lag_us) {
            let _ = write!(s, " (up to {} after the write", format_us(lag));
            if let Some(late) = r.stale_reads_past_window {
                let _ = write!(s, ", {late} past the bus window");
            }
            s.push(')');
        }
        parts.push(s);
    }
    if let Some(share) = r.near_hit_rate {
        parts.push(format!("L1 hits {:.1}%", share * 100.0));
    }
    if let Some(m) = r.messages_per_write {
        parts.push(format!("{m:.2} messages/write"));
    }
    if let Some(clears) = r.near_clears {
        parts.push(format!("L1 clears {clears}"));
    }
    if let Some(max) = r.outage_max_us {
        let p99 = r.outage_p99_us.map_or_else(|| "?".to_owned(), format_us);
        // The write-behind lane times its writes; every other row its reads.
        let calls = if r.acknowledged_while_source_down.is_some() {
            "writes"
        } else {
            "reads"
        };
        parts.push(format!(
            "{calls} in outage p99 {p99}, max {}",
            format_us(max)
        ));
    }
    if let Some(failed) = r.failed_invalidations {
        parts.push(format!("failed invalidations {failed}"));
    }
    if let Some(opens) = r.breaker_opens {
        let skipped = r.short_circuits.unwrap_or(0);
        parts.push(format!("breaker opened {opens}, skipped {skipped} calls"));
    }
    if let Some(tx) = r.transactions {
        parts.push(format!("{} on the source", count(tx, "transaction")));
    }
    if let (Some(acked), Some(applied), Some(lost)) = (r.acknowledged, r.applied, r.lost_writes) {
        parts.push(format!(
            "acknowledged {acked}, applied {applied}, lost_writes {lost}"
        ));
    }
    if let Some(n) = r.acknowledged_while_source_down {
        parts.push(format!("{n} of them while the source was down"));
    }
    if let Some(misses) = r.caller_misses {
        parts.push(format!("misses on the caller's path {misses}"));
    }
    if let Some(n) = r.refreshes {
        parts.push(format!("background refreshes {n}"));
    }
    if let Some(ms) = r.source_down_ms {
        parts.push(format!("source down {}", format_ms(ms)));
    }
    if let Some(n) = r.fail_safe_serves {
        parts.push(format!("fail-safe serves {n}"));
    }
    if let Some(ms) = r.max_staleness_served_ms {
        let mut s = format!("served up to {} past the TTL", format_ms(ms));
        if let Some(max) = r.max_staleness_ms {
            let _ = write!(s, " (maximum {})", format_ms(max));
        }
        parts.push(s);
    }
    if let Some(n) = r.older_writes_refused {
        parts.push(format!("older writes refused {n}"));
    }
    if let Some(kills) = r.flusher_kills {
        let mut s = format!("flusher killed and restarted {}", times(kills));
        if let Some(n) = r.reclaimed {
            let _ = write!(s, ", {n} writes reclaimed");
        }
        parts.push(s);
    }
    parts.join("; ")
}

/// Milliseconds as a short human duration.
pub(crate) fn format_ms(ms: u64) -> String {
    format_us(ms.saturating_mul(1_000))
}

/// Microseconds as a short human duration.
pub(crate) fn format_us(us: u64) -> String {
    // Display only: precision loss past 2^53 µs is irrelevant.
    #[allow(clippy::cast_precision_loss)]
    let f = us as f64;
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", f / 1e3)
    } else {
        format!("{:.2}s", f / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RowContext {
        RowContext {
            store: "memory",
            database: "sqlite",
            seed: 1,
        }
    }

    #[test]
    fn table_aligns_and_fits_120_columns() {
        let mut a = Row::new("write-behind", "naive", "naive cache-aside", ctx());
        a.requests = 12_345;
        a.stale_entries = Some(3);
        a.p50_us = Some(1_234_567);
        a.p99_us = Some(12_345_678);
        a.hit_rate = Some(0.999);
        a.db_queries_saved = Some(123_456);
        let mut b = Row::new(
            "write-behind",
            "durable",
            "durable double-delete (killed after first delete)",
            ctx(),
        );
        b.requests = 7;
        b.stale_entries = Some(0);
        b.transactions = Some(4000);
        b.acknowledged = Some(4000);
        b.applied = Some(4000);
        b.lost_writes = Some(0);
        b.flusher_kills = Some(1);
        b.reclaimed = Some(93);
        let c = Row::new("stampede", "naive", "naive cache-aside", ctx());
        let t = table(&[a, b, c]);
        for line in t.lines() {
            assert!(
                line.chars().count() <= 120,
                "{} columns: {line}\n{t}",
                line.chars().count()
            );
        }
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("scenario"), "{t}");
        // Each row starts with its scenario.
        assert!(lines[1].starts_with("write-behind "), "{t}");
        assert!(lines[2].starts_with("write-behind "), "{t}");
        assert!(lines.iter().any(|l| l.starts_with("stampede ")), "{t}");
        // Right-aligned numbers end in the same column.
        let end = |needle: &str| {
            lines
                .iter()
                .find_map(|l| l.find(needle).map(|i| i + needle.len()))
                .unwrap()
        };
        assert_eq!(end("12345"), end("      7"), "{t}");
        // The long measurements are a note below the table.
        assert!(t.contains("[1] write-behind durable double-delete"), "{t}");
        assert!(t.contains("lost_writes 0"), "{t}");
    }

    #[test]
    fn json_uses_null_for_missing_fields() {
        let row = Row::new("penetration", "negative", "negative caching", ctx());
        let v: serde_json::Value = serde_json::from_str(&json_line(&row)).unwrap();
        assert_eq!(v["scenario"], "penetration");
        assert!(v["stale_entries"].is_null());
        assert!(v["hit_rate"].is_null());
        assert_eq!(v["errors"], 0);
    }

    #[test]
    fn latency_quantiles() {
        let mut l = Latency::new();
        assert_eq!(l.quantile_us(0.5), None);
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let mut other = Latency::new();
        other.record(Duration::ZERO);
        l.merge(&other);
        let p50 = l.quantile_us(0.5).unwrap();
        assert!((49_000..=51_000).contains(&p50), "{p50}");
        assert_eq!(format_us(999), "999µs");
        assert_eq!(format_us(50_300), "50.3ms");
        assert_eq!(format_us(2_500_000), "2.50s");
    }
}

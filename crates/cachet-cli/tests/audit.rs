//! `cachet lab --scenario audit`: consistency in nines within each bound, for
//! naive cache-aside, leases and leases + outbox under writer crashes.

use serde_json::Value;

use crate::util::Cachet;

/// `(checked, inconsistent)` at each bound of a row.
fn per_bound(row: &Value) -> Vec<(u64, u64)> {
    row["audit"]["bounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no audit bounds in {row}"))
        .iter()
        .map(|b| {
            (
                b["checked"].as_u64().unwrap(),
                b["inconsistent"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn audit_shows_nines_per_strategy_at_each_bound() {
    // Fewer reads and shorter bounds than by default, for a debug binary; the
    // scripted holes make naive's and leases' inconsistencies certain.
    let rows = Cachet::lab()
        .args([
            "--scenario",
            "audit",
            "--audit-reads",
            "100000",
            "--audit-bounds-ms",
            "1000,3000",
            "--audit-max-ms",
            "5000",
        ])
        .rows();
    assert_eq!(rows.rows.len(), 3, "{:#?}", rows.rows);
    for row in &rows.rows {
        assert_eq!(row["scenario"], "audit");
        assert_eq!(row["errors"], 0, "{row}");
        let audit = &row["audit"];
        assert_eq!(audit["skipped"], 0, "{row}");
        assert_eq!(audit["dropped"], 0, "{row}");
        let bounds: Vec<u64> = audit["bounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["bound_ms"].as_u64().unwrap())
            .collect();
        assert_eq!(bounds, [1000, 3000]);
        let checked = per_bound(row)[0].0;
        assert!(checked > 1000, "{row}");
        assert_eq!(Some(checked), audit["sampled"].as_u64(), "{row}");
    }

    let protected = rows.find("audit", "outbox");
    for (checked, inconsistent) in per_bound(protected) {
        assert_eq!(inconsistent, 0, "{protected}");
        let at_least = protected["audit"]["bounds"][0]["nines_at_least"]
            .as_f64()
            .unwrap();
        assert!((at_least - (checked as f64).log10()).abs() < 1e-9);
    }
    assert!(protected["audit"]["bounds"][0]["nines"].is_null());

    // The scripted race and crash leave naive with stale entries for the
    // whole row, and leases with the crash's.
    for word in ["naive", "lease"] {
        let row = rows.find("audit", word);
        for (checked, inconsistent) in per_bound(row) {
            assert!(inconsistent > 0, "{row}");
            assert!(inconsistent < checked, "{row}");
        }
        assert!(row["audit"]["bounds"][0]["nines"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn audit_table_prints_nines_per_strategy_at_each_bound() {
    let stdout = Cachet::lab()
        .args([
            "--scenario",
            "audit",
            "--audit-reads",
            "20000",
            "--audit-bounds-ms",
            "300,1000",
        ])
        .stdout();
    // The notes below the table, each joined from its wrapped lines.
    let mut notes: Vec<String> = Vec::new();
    for l in stdout.lines() {
        match (l.starts_with('['), l.strip_prefix("    "), notes.last_mut()) {
            (true, _, _) => notes.push(l.to_owned()),
            (false, Some(more), Some(note)) => {
                note.push(' ');
                note.push_str(more);
            }
            _ => {}
        }
    }
    for strategy in ["naive cache-aside", "lease-guarded", "lease + outbox"] {
        let line = notes
            .iter()
            .find(|l| l.contains(&format!("audit {strategy} ")))
            .unwrap_or_else(|| panic!("no {strategy} row in\n{stdout}"));
        assert!(line.contains("within 300ms"), "{line}");
        assert!(line.contains("within 1s"), "{line}");
        assert!(line.contains("nines"), "{line}");
    }
    assert!(stdout.contains("\naudit: every read"), "{stdout}");
}

//! `avalanche`: keys filled together expire together, unless their TTLs are
//! jittered.

use crate::util::{Cachet, Rows};

/// Small sizes: two waves of expiries in under 2 s. Few keys and a TTL that is
/// not too short keep the relation clear on a slow, busy machine: the fixed
/// TTL's wave holds every key within about 100 ms as long as the source can
/// reload them that fast (and still most of them when it cannot), while ±30%
/// jitter spreads them over 540 ms.
pub(crate) const ARGS: &[&str] = &[
    "--scenario",
    "avalanche",
    "--avalanche-keys",
    "150",
    "--avalanche-ttl-ms",
    "900",
    "--avalanche-ms",
    "1900",
];

/// The relations an avalanche run must show, whatever the backends.
pub(crate) fn assert_avalanche(rows: &Rows) {
    let peak = |word| rows.u64("avalanche", word, "peak_db_queries_per_100ms");
    let fixed = peak("fixed");
    assert!(fixed > 0, "no expiry wave: {:#?}", rows.rows);
    for word in ["jitter", "swr"] {
        let protected = peak(word);
        assert!(
            protected < fixed,
            "{word}: peak {protected} not below the fixed TTL's {fixed}: {:#?}",
            rows.rows
        );
        assert_eq!(rows.u64("avalanche", word, "errors"), 0);
    }
    assert_eq!(rows.u64("avalanche", "fixed", "errors"), 0);
    // Entries did expire and were loaded again, within the run.
    assert!(rows.u64("avalanche", "fixed", "db_queries") > 0);
    // Queries per 100 ms add up to the total.
    let row = rows.find("avalanche", "fixed");
    let series: u64 = row["db_queries_per_100ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(series, rows.u64("avalanche", "fixed", "db_queries"));
}

#[test]
fn jitter_spreads_the_expiry_wave() {
    let dir = std::env::temp_dir().join(format!("cachet-plot-{}", std::process::id()));
    let rows = Cachet::lab()
        .args(ARGS)
        .args(["--plot".as_ref(), dir.as_os_str()])
        .rows();
    assert_eq!(rows.rows.len(), 3, "{:#?}", rows.rows);
    assert_avalanche(&rows);

    // --plot wrote one chart with a line per strategy.
    let svg = std::fs::read_to_string(dir.join("avalanche.svg"));
    let _ = std::fs::remove_dir_all(&dir);
    let svg = svg.expect("no avalanche.svg");
    assert!(svg.starts_with("<svg"), "{svg}");
    assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
}

//! `--metrics-addr`: a running lab serves Prometheus's `/metrics`, scraped
//! with a real HTTP client, and it holds every name the shipped Grafana
//! dashboard queries.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::Cachet;

/// The metric names the dashboard's queries use.
fn dashboard_names() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../dashboards/cachet.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("cachet_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    names
}

/// The metric names in a Prometheus text exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_running_lab_serves_every_name_the_dashboard_uses() {
    let wanted = dashboard_names();
    assert!(wanted.len() >= 10, "{wanted:?}");
    let mut child = Cachet::lab()
        .args([
            "--scenario",
            "race",
            "--scenario",
            "hit-rate",
            "--scenario",
            "audit",
            "--audit-reads",
            "20000",
            "--audit-bounds-ms",
            "500,1000",
            "--audit-max-ms",
            "3000",
            "--metrics-addr",
            "127.0.0.1:0",
            "--json",
        ])
        .into_command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the lab ended without announcing its metrics address"
        );
        if let Some(at) = line.find("http://") {
            break line[at..].trim().to_owned();
        }
    };
    // Keep draining stderr so the lab never blocks on it.
    std::thread::spawn(move || for _ in stderr.lines() {});

    // Scrape until every name has appeared or the lab is done.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut scrapes = 0;
    let status = loop {
        if let Ok(mut response) = ureq::get(&url).call() {
            assert_eq!(response.status(), 200);
            let body = response.body_mut().read_to_string().unwrap();
            seen.extend(exposed_names(&body));
            scrapes += 1;
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the lab did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(scrapes > 0, "never scraped {url}");
    let missing: Vec<_> = wanted.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries names /metrics never had: {missing:?}\nseen: {seen:?}"
    );
}

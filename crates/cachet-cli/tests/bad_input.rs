//! Bad input ends with a clear message and a non-zero exit, never a panic.

use std::net::TcpListener;

use crate::util::Cachet;

#[test]
fn unknown_scenario_is_rejected() {
    let stderr = Cachet::lab().args(["--scenario", "nope"]).failure();
    assert!(stderr.contains("invalid value 'nope'"), "{stderr}");
    // The message lists what is accepted.
    for name in ["race", "stampede", "penetration", "hit-rate"] {
        assert!(stderr.contains(name), "{stderr}");
    }
}

#[test]
fn unreachable_redis_names_the_url_and_the_cause() {
    // A port just released by the OS: nothing listens on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let stderr = Cachet::lab()
        .args(["--redis-url", &url, "--scenario", "race", "--race-ms", "10"])
        .failure();
    assert!(stderr.contains(&url), "{stderr}");
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
}

#[test]
fn non_postgres_database_url_is_rejected() {
    let stderr = Cachet::lab()
        .args([
            "--database-url",
            "mysql://root@127.0.0.1/db",
            "--scenario",
            "race",
        ])
        .failure();
    assert!(stderr.contains("mysql://root@127.0.0.1/db"), "{stderr}");
    assert!(stderr.contains("postgres://"), "{stderr}");
}

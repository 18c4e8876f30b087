//! Bad input ends with a clear message and a non-zero exit, never a panic.

use std::net::TcpListener;
use std::time::{Duration, Instant};

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
fn stats_and_inspect_wait_for_a_silent_server_no_longer_than_their_timeout() {
    // It accepts connections (the kernel does, into the backlog) and never
    // answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/", silent.local_addr().unwrap());
    for command in [
        vec!["stats", "--timeout", "300ms"],
        vec![
            "inspect",
            "--namespace",
            "users",
            "--key",
            "1",
            "--timeout",
            "0.3s",
        ],
    ] {
        let start = Instant::now();
        let stderr = Cachet::command(command[0])
            .args(&command[1..])
            .args(["--redis-url", &url])
            .failure();
        // Well below the default of 10 s: the flag's limit fired.
        let took = start.elapsed();
        assert!(took < Duration::from_secs(8), "{command:?} took {took:?}");
        assert!(stderr.contains(&url), "{stderr}");
        assert!(stderr.contains("timeout (300ms)"), "{stderr}");
    }
    drop(silent);
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

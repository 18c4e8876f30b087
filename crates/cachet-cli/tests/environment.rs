//! Where Redis is, given by flags and by `CACHET_*` variables together: a
//! flag wins over a variable, a variable that does not apply to the target
//! chosen is ignored, and two targets from the environment are refused by
//! the names of their variables.

use std::net::TcpListener;

use cachet_testkit::{RedisCluster, RedisServer};

use crate::util::Cachet;

/// The URL of a loopback port nothing listens on.
fn nothing_at() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    format!("redis://127.0.0.1:{port}/")
}

/// The command line of each command that takes the target flags, short of
/// them.
fn commands() -> Vec<Vec<&'static str>> {
    vec![
        vec!["stats", "--timeout", "2s"],
        vec![
            "inspect",
            "--namespace",
            "users",
            "--key",
            "1",
            "--timeout",
            "2s",
        ],
        vec![
            "bench",
            "--duration",
            "100ms",
            "--tasks",
            "1",
            "--keys",
            "100",
        ],
        vec!["lab", "--scenario", "race", "--race-ms", "10"],
    ]
}

#[test]
fn a_target_flag_wins_over_the_variable_of_another_target() {
    let cluster = RedisCluster::start();
    let stdout = Cachet::command("stats")
        .env("CACHET_REDIS_URL", &nothing_at())
        .args(["--redis-cluster", &cluster.urls()[0]])
        .stdout();
    assert!(stdout.contains("cluster total (3 masters)"), "{stdout}");

    let server = RedisServer::start();
    for (variable, value) in [
        ("CACHET_REDIS_CLUSTER", nothing_at()),
        ("CACHET_REDIS_SENTINEL", nothing_at()),
    ] {
        let stdout = Cachet::command("stats")
            .env(variable, &value)
            .env("CACHET_SENTINEL_MASTER", "mymaster")
            .args(["--redis-url", &server.url()])
            .stdout();
        assert!(stdout.contains("maxmemory"), "{variable}: {stdout}");
    }
}

#[test]
fn every_command_takes_a_target_flag_over_another_targets_variable() {
    // Nothing listens at either: each command gets as far as connecting to
    // the target of the flag.
    for command in commands() {
        let flagged = nothing_at();
        let output = Cachet::command(command[0])
            .args(&command[1..])
            .env("CACHET_REDIS_URL", &nothing_at())
            .args(["--redis-cluster", &flagged])
            .output();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_ne!(output.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(
            !stderr.contains("cannot be used with"),
            "{command:?}: {stderr}"
        );
        assert!(!stderr.contains("--redis-url"), "{command:?}: {stderr}");
    }
}

#[test]
fn sentinel_variables_are_ignored_for_another_target() {
    let server = RedisServer::start();
    let stdout = Cachet::command("stats")
        .env("CACHET_REDIS_URL", &server.url())
        .env("CACHET_SENTINEL_DB", "3")
        .stdout();
    assert!(stdout.contains("maxmemory"), "{stdout}");

    let stdout = Cachet::command("stats")
        .env("CACHET_SENTINEL_MASTER", "mymaster")
        .env("CACHET_SENTINEL_DB", "3")
        .env("CACHET_SENTINEL_NODE_USER", "app")
        .env("CACHET_SENTINEL_NODE_PASSWORD", "hunter2")
        .args(["--redis-url", &server.url()])
        .stdout();
    assert!(stdout.contains("maxmemory"), "{stdout}");

    // The lab without a Redis: the variables have nothing to apply to.
    let rows = Cachet::lab()
        .env("CACHET_SENTINEL_DB", "3")
        .env("CACHET_SENTINEL_NODE_PASSWORD", "hunter2")
        .args(["--scenario", "race", "--race-ms", "10"])
        .rows();
    assert!(!rows.rows.is_empty());

    // Typed, a Sentinel flag without a Sentinel target is still refused.
    let stderr = Cachet::command("stats")
        .env("CACHET_REDIS_URL", &server.url())
        .args(["--sentinel-db", "3"])
        .failure();
    assert!(stderr.contains("--sentinel-db"), "{stderr}");
}

#[test]
fn two_targets_from_the_environment_are_refused_by_their_variables() {
    for command in commands() {
        let output = Cachet::command(command[0])
            .args(&command[1..])
            .env("CACHET_REDIS_URL", &nothing_at())
            .env("CACHET_REDIS_CLUSTER", &nothing_at())
            .output();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command:?}: {stderr}");
        for variable in ["CACHET_REDIS_URL", "CACHET_REDIS_CLUSTER"] {
            assert!(stderr.contains(variable), "{command:?}: {stderr}");
        }
        assert!(
            !stderr.contains("cannot be used with"),
            "{command:?}: {stderr}"
        );
        assert!(!stderr.contains("'--redis-url"), "{command:?}: {stderr}");
    }

    // A variable set to nothing names nothing.
    let stderr = Cachet::command("stats")
        .env("CACHET_REDIS_URL", &nothing_at())
        .env("CACHET_REDIS_CLUSTER", "")
        .failure();
    assert!(stderr.contains("cannot connect"), "{stderr}");

    // Both typed: refused as conflicting flags.
    let output = Cachet::command("stats")
        .args(["--redis-url", &nothing_at()])
        .args(["--redis-cluster", &nothing_at()])
        .output();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--redis-url"), "{stderr}");
    assert!(stderr.contains("--redis-cluster"), "{stderr}");
}

#[test]
fn a_url_with_a_fragment_is_refused_in_terms_of_the_url() {
    let server = RedisServer::start();
    let with_fragment = format!("{}#insecure", server.url());
    let at = server.url();
    let at = at.trim_start_matches("redis://").trim_end_matches('/');
    let password_with_hash = format!("redis://:pa#ss3cret@{at}/");
    for args in [
        ["--redis-url", with_fragment.as_str()],
        ["--redis-cluster", with_fragment.as_str()],
        ["--redis-url", password_with_hash.as_str()],
    ] {
        let stderr = Cachet::command("stats").args(args).failure();
        assert!(stderr.contains("fragment"), "{args:?}: {stderr}");
        assert!(stderr.contains("%23"), "{args:?}: {stderr}");
        assert!(!stderr.contains("RedisStoreBuilder"), "{args:?}: {stderr}");
        assert!(!stderr.contains("danger_accept"), "{args:?}: {stderr}");
        assert!(!stderr.contains("ss3cret"), "{args:?}: {stderr}");
    }
}

//! `rediss://` from the command line: `--redis-ca`, `--redis-cert`,
//! `--redis-key`, also for the lab's child processes and the bench's
//! baselines.

use cachet_testkit::{ClientAuth, RedisCluster, RedisServer, TestPki};

use crate::util::Cachet;

fn tls_flags(pki: &TestPki) -> Vec<String> {
    vec![
        "--redis-ca".into(),
        pki.ca_file.display().to_string(),
        "--redis-cert".into(),
        pki.client.cert_file.display().to_string(),
        "--redis-key".into(),
        pki.client.key_file.display().to_string(),
    ]
}

#[test]
fn stats_over_mutual_tls() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Required);
    let stdout = Cachet::command("stats")
        .args(["--redis-url", &server.tls_url()])
        .args(tls_flags(&pki))
        .stdout();
    assert!(stdout.contains("maxmemory"), "{stdout}");

    // The same from the environment.
    let stdout = Cachet::command("stats")
        .env("CACHET_REDIS_URL", &server.tls_url())
        .env("CACHET_REDIS_CA", &pki.ca_file.display().to_string())
        .env(
            "CACHET_REDIS_CERT",
            &pki.client.cert_file.display().to_string(),
        )
        .env(
            "CACHET_REDIS_KEY",
            &pki.client.key_file.display().to_string(),
        )
        .stdout();
    assert!(stdout.contains("maxmemory"), "{stdout}");

    // Without the client certificate the server refuses.
    let stderr = Cachet::command("stats")
        .args(["--redis-url", &server.tls_url()])
        .args(["--redis-ca", &pki.ca_file.display().to_string()])
        .failure();
    assert!(stderr.contains("TLS handshake"), "{stderr}");
}

#[test]
fn a_wrong_ca_or_an_insecure_fragment_is_refused() {
    let pki = TestPki::generate();
    let other = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let stderr = Cachet::command("stats")
        .args(["--redis-url", &server.tls_url()])
        .args(["--redis-ca", &other.ca_file.display().to_string()])
        .failure();
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    let stderr = Cachet::command("stats")
        .args(["--redis-url", &format!("{}#insecure", server.tls_url())])
        .failure();
    assert!(stderr.contains("has a fragment"), "{stderr}");
    assert!(!stderr.contains("danger_accept_invalid_certs"), "{stderr}");

    let stderr = Cachet::command("stats")
        .args(["--redis-url", &server.tls_url()])
        .args(["--redis-cert", &pki.client.cert_file.display().to_string()])
        .failure();
    assert!(stderr.contains("--redis-key"), "{stderr}");
}

#[test]
fn a_ca_file_without_a_certificate_is_refused_before_connecting() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    // A private key is PEM, but no certificate.
    for ca in [garbage, pki.client.key_file.clone()] {
        let ca = ca.display().to_string();
        let stderr = Cachet::command("stats")
            .args(["--redis-url", &server.tls_url()])
            .args(["--redis-ca", &ca])
            .failure();
        assert!(
            stderr.contains(&format!("--redis-ca {ca} holds no PEM certificate")),
            "{stderr}"
        );
        assert!(!stderr.contains("TLS handshake"), "{stderr}");
    }
}

#[test]
fn lab_child_processes_get_the_tls_settings() {
    let pki = TestPki::generate();
    // Mutual TLS required: a child without the client certificate fails.
    let server = RedisServer::start_tls(&pki, ClientAuth::Required);
    let rows = Cachet::lab()
        .args(crate::durability::STAMPEDE)
        .args(["--scenario", "double-delete", "--double-delete-keys", "20"])
        .args(["--double-delete-delay-ms", "300"])
        .args(["--redis-url", &server.tls_url()])
        .args(tls_flags(&pki))
        .rows();
    let processes = rows.find("stampede", "processes");
    assert_eq!(processes["errors"], 0, "{processes}");
    assert_eq!(processes["db_queries"], 1, "{processes}");
    assert_eq!(processes["store"], "redis", "{processes}");
    assert_eq!(rows.u64("double-delete", "durable", "stale_entries"), 0);
}

#[test]
fn stats_and_bench_over_a_tls_cluster() {
    let pki = TestPki::generate();
    let cluster = RedisCluster::start_tls(&pki);
    let urls = cluster.tls_urls();
    let stdout = Cachet::command("stats")
        .args(["--redis-cluster", &urls[0]])
        .args(tls_flags(&pki))
        .stdout();
    // Every master, reached on its TLS port, and the total.
    for node in cluster.nodes() {
        let addr = format!("127.0.0.1:{}", node.tls_port());
        assert!(stdout.contains(&addr), "{addr} missing:\n{stdout}");
    }
    assert!(stdout.contains("cluster total (3 masters)"), "{stdout}");

    // The bench's baselines connect to the cluster with the same settings.
    let rows = Cachet::command("bench")
        .args(["--redis-cluster", &urls[1]])
        .args(tls_flags(&pki))
        .args(["--duration", "100ms", "--tasks", "1", "--keys", "100"])
        .json();
    assert_eq!(rows.len(), 5, "{rows:?}");
    for row in &rows {
        assert!(row["baseline"]["ops"].as_u64().unwrap() > 0, "{row}");
    }
}

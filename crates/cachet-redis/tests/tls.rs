//! `rediss://`: the store over TLS, with a private CA, mutual TLS, a wrong CA,
//! the invalidation bus and a cluster. Certificates are made per test.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachet_core::{BusEvent, Entry, KeyLayout, Meta, Notice, Payload, Read, Store, StoreErrorKind};
use cachet_redis::{RedisStore, RedisStoreBuilder};
use cachet_testkit::{ClientAuth, RedisCluster, RedisServer, TestPki};

fn entry(v: &'static [u8]) -> Entry {
    Entry {
        meta: Meta::default(),
        payload: Payload::Bytes(Bytes::from_static(v)),
    }
}

fn trusting(builder: RedisStoreBuilder, pki: &TestPki) -> RedisStoreBuilder {
    builder.tls_ca_pem(pki.ca_pem.as_bytes())
}

fn with_client_cert(builder: RedisStoreBuilder, pki: &TestPki) -> RedisStoreBuilder {
    trusting(builder, pki).tls_client_cert_pem(
        pki.client.cert_pem.as_bytes(),
        pki.client.key_pem.as_bytes(),
    )
}

/// A write and a read back through the protocol, and the server saw it.
async fn round_trip(store: &RedisStore, key: &str) {
    let key = KeyLayout::new("cachet:", "tls").unwrap().key(key);
    store
        .set(&key, entry(b"over tls"), Duration::from_secs(60))
        .await
        .unwrap();
    match store.get(&key).await.unwrap() {
        Read::Hit(Entry {
            payload: Payload::Bytes(b),
            ..
        }) => assert_eq!(&b[..], b"over tls"),
        other => panic!("expected a hit, got {other:?}"),
    }
}

/// The full chain of an error, for assertions on what a user reads.
fn chain(e: &dyn std::error::Error) -> String {
    cachet_core::Report(e).to_string()
}

#[tokio::test]
async fn reads_and_writes_over_tls_with_a_private_ca() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let store = trusting(RedisStore::builder(server.tls_url()), &pki)
        .connect()
        .await
        .unwrap();
    round_trip(&store, "a").await;
    // The entry is where a plain client of the same server sees it.
    let key = KeyLayout::new("cachet:", "tls").unwrap().key("a");
    assert_eq!(server.command(&["EXISTS", key.as_str()]), "1");
    // The connection really is TLS: the server counts it.
    let clients = server.command(&["CLIENT", "LIST"]);
    assert!(clients.lines().count() >= 2, "{clients}");
}

#[tokio::test]
async fn localhost_verifies_as_well_as_the_ip() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let url = format!("rediss://localhost:{}/", server.tls_port());
    let store = trusting(RedisStore::builder(url), &pki)
        .connect()
        .await
        .unwrap();
    round_trip(&store, "b").await;
}

#[tokio::test]
async fn mutual_tls_works_with_a_client_certificate_and_fails_without() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Required);
    let store = with_client_cert(RedisStore::builder(server.tls_url()), &pki)
        .connect()
        .await
        .unwrap();
    round_trip(&store, "c").await;

    let limit = Duration::from_secs(2);
    let started = Instant::now();
    let e = trusting(RedisStore::builder(server.tls_url()), &pki)
        .connection_timeout(limit)
        .connect()
        .await
        .unwrap_err();
    assert!(started.elapsed() < limit * 2, "{:?}", started.elapsed());
    assert!(e.is_outage(), "{e:?}");
    let shown = chain(&e);
    assert!(shown.contains("TLS"), "{shown}");
}

#[tokio::test]
async fn a_wrong_ca_fails_promptly_and_says_why() {
    let pki = TestPki::generate();
    let other = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let limit = Duration::from_secs(2);
    let started = Instant::now();
    let e = trusting(RedisStore::builder(server.tls_url()), &other)
        .connection_timeout(limit)
        .connect()
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took <= limit + Duration::from_millis(500), "took {took:?}");
    assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e:?}");
    let shown = chain(&e);
    assert!(shown.contains("TLS"), "{shown}");
    assert!(shown.to_lowercase().contains("certificate"), "{shown}");

    // No CA at all: the system's roots do not know the private CA either.
    let e = RedisStore::builder(server.tls_url())
        .connection_timeout(limit)
        .connect()
        .await
        .unwrap_err();
    assert!(chain(&e).to_lowercase().contains("certificate"), "{e:?}");
}

#[tokio::test]
async fn a_url_fragment_cannot_turn_off_verification() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let url = format!(
        "rediss://:hunter2@127.0.0.1:{}/#insecure",
        server.tls_port()
    );
    let e = RedisStore::builder(url.clone())
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Config, "{e:?}");
    let shown = chain(&e);
    assert!(shown.contains("danger_accept_invalid_certs"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    // A `#` in an unescaped password starts a fragment: no part of it shows.
    let e = RedisStore::builder("rediss://:pass#word@127.0.0.1:1/")
        .connect()
        .await
        .unwrap_err();
    assert!(!chain(&e).contains("word"), "{}", chain(&e));
    let e = RedisStore::cluster_builder([url])
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Config, "{e:?}");
}

#[tokio::test]
async fn only_an_explicit_opt_in_skips_verification() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let store = RedisStore::builder(server.tls_url())
        .danger_accept_invalid_certs(true)
        .connect()
        .await
        .unwrap();
    round_trip(&store, "d").await;
}

#[tokio::test]
async fn tls_settings_on_a_plain_url_are_refused() {
    let pki = TestPki::generate();
    let server = RedisServer::start();
    let e = trusting(RedisStore::builder(server.url()), &pki)
        .connect()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Config, "{e:?}");
    assert!(e.to_string().contains("rediss://"), "{e}");
}

#[tokio::test]
async fn builders_never_show_certificates_or_keys() {
    let pki = TestPki::generate();
    let builder = with_client_cert(RedisStore::builder("rediss://:pw@h:1/"), &pki);
    let shown = format!("{builder:?}");
    assert!(!shown.contains("BEGIN"), "{shown}");
    assert!(!shown.contains(":pw@"), "{shown}");
    assert!(shown.contains("client_cert: \"<set>\""), "{shown}");
}

/// Waits (bounded) for the next event of a subscription.
async fn next_event(events: &mut tokio::sync::mpsc::Receiver<BusEvent>) -> BusEvent {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("no bus event within 10 s")
        .expect("subscription closed")
}

#[tokio::test]
async fn the_invalidation_bus_runs_over_mutual_tls() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Required);
    let connect = || {
        with_client_cert(RedisStore::builder(server.tls_url()), &pki)
            .eviction_check(false)
            .connect()
    };
    let (reader, writer) = (connect().await.unwrap(), connect().await.unwrap());
    let layout = KeyLayout::new("cachet:", "tls-bus").unwrap();
    let bus = reader.bus().expect("RedisStore has a bus");
    let key = layout.key("k");
    let mut events = bus.subscribe_invalidations(key.head()).await.unwrap();
    assert!(matches!(next_event(&mut events).await, BusEvent::Connected));
    writer.invalidate(&key).await.unwrap();
    match next_event(&mut events).await {
        BusEvent::Notices(notices) => {
            assert!(notices.contains(&Notice::Key(key.clone())), "{notices:?}");
        }
        other => panic!("expected notices, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls() {
    let pki = TestPki::generate();
    let cluster = RedisCluster::start_tls(&pki);
    let store = with_client_cert(RedisStore::cluster_builder(cluster.tls_urls()), &pki)
        .connect()
        .await
        .unwrap();
    assert!(store.is_cluster());
    // Keys on every node.
    for i in 0..30 {
        round_trip(&store, &format!("k{i}")).await;
    }
    let key = KeyLayout::new("cachet:", "tls").unwrap().key("k0");
    assert_eq!(
        cluster.command_for_key(key.as_str(), &["EXISTS", key.as_str()]),
        "1"
    );

    // A wrong CA fails there too.
    let other = TestPki::generate();
    let e = trusting(RedisStore::cluster_builder(cluster.tls_urls()), &other)
        .connection_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert!(e.is_outage(), "{e:?}");
    assert!(chain(&e).to_lowercase().contains("certificate"), "{e:?}");
}

#[tokio::test]
async fn skipping_verification_warns_at_every_connect() {
    let pki = TestPki::generate();
    let server = RedisServer::start_tls(&pki, ClientAuth::Optional);
    let logs = cachet_testkit::Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    assert_eq!(
        server.command(&["CONFIG", "SET", "requirepass", "hunter2"]),
        "OK"
    );
    let url = format!("rediss://:hunter2@127.0.0.1:{}/", server.tls_port());
    for _ in 0..2 {
        RedisStore::builder(url.clone())
            .danger_accept_invalid_certs(true)
            .eviction_check(false)
            .connect()
            .await
            .unwrap();
    }
    trusting(RedisStore::builder(url), &pki)
        .eviction_check(false)
        .connect()
        .await
        .unwrap();
    let text = logs.text();
    let warnings = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("certificate verification is OFF"))
        .count();
    assert_eq!(warnings, 2, "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}
